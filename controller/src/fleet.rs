//! The agents of a manifest set: connect to all of them concurrently, each with its own deadline,
//! and gather what they report. An agent that cannot be reached is Unknown, never empty.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use protocol::client::{AgentClient, ClientOptions};
use protocol::dpu::DpuReport;
use protocol::names::PeerName;
use protocol::{CephChanges, CephReport, ChangesQuery, Command, Empty, ImageStatus, Reply};
use tokio::task::JoinSet;

use crate::manifest::Desired;
use crate::plan::{Known, Observed, Target};

/// Why the fleet has no session with an agent.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetError {
    /// It could not be reached (connection, TLS, identity), or its session was lost.
    #[error("{reason}")]
    Unreachable {
        /// The agent.
        target: Target,
        /// What went wrong, as the client said it.
        reason: String,
    },
    /// The manifests name no such agent.
    #[error("not in the manifests")]
    NotInManifests(Target),
}

/// Connected agents, by target; why for those that could not be reached.
pub struct Fleet {
    /// Sessions.
    pub agents: BTreeMap<Target, Result<Arc<AgentClient>, FleetError>>,
}

/// How the fleet is reached.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// TLS client configuration (the controller's certificate).
    pub tls: Arc<rustls::ClientConfig>,
    /// Client timers.
    pub client: ClientOptions,
    /// Deadline of one agent's report.
    pub report_timeout: Duration,
}

impl Fleet {
    /// Connects to every agent the manifests name, concurrently.
    pub async fn connect(desired: &Desired, opts: &FleetOptions) -> Self {
        let mut targets: Vec<(Target, PeerName, String)> = vec![];
        for c in desired.clusters.values() {
            targets.push((
                Target::Cluster(c.name.clone()),
                c.agent.clone(),
                c.address.clone(),
            ));
        }
        for d in desired.dpus.values() {
            targets.push((
                Target::Dpu(d.name.clone()),
                d.agent.clone(),
                d.address.clone(),
            ));
        }
        let mut set = JoinSet::new();
        for (target, name, addr) in targets {
            let tls = opts.tls.clone();
            let client = opts.client.clone();
            set.spawn(async move {
                let r = AgentClient::connect(&addr, &name, tls, client)
                    .await
                    .map(Arc::new)
                    .map_err(|e| FleetError::Unreachable {
                        target: target.clone(),
                        reason: protocol::error::chain(&e),
                    });
                (target, r)
            });
        }
        let mut agents = BTreeMap::new();
        while let Some(Ok((t, r))) = set.join_next().await {
            agents.insert(t, r);
        }
        Self { agents }
    }

    /// The session with `target`, or why there is none.
    pub fn get(&self, target: &Target) -> Result<Arc<AgentClient>, FleetError> {
        match self.agents.get(target) {
            Some(Ok(c)) => Ok(c.clone()),
            Some(Err(e)) => Err(e.clone()),
            None => Err(FleetError::NotInManifests(target.clone())),
        }
    }

    /// Reads every connected agent from scratch, concurrently, each within `timeout`.
    pub async fn observe(&self, timeout: Duration) -> Observed {
        let mut informer = Informer::default();
        informer.refresh(self, timeout).await;
        informer.observed().clone()
    }

    /// Closes every session cleanly.
    pub async fn close(self) {
        for (_, c) in self.agents {
            if let Ok(c) = c {
                if let Ok(c) = Arc::try_unwrap(c) {
                    c.close().await;
                }
            }
        }
    }
}

/// Asks the clusters about the images `p` would create that their reports do not hold, and
/// those `p` held because their report came from the pool's index alone: one that exists
/// after all (made outside unistor) joins `observed`, and an index-only one is replaced by what
/// its own keys say, so that the plan made again shows it as not owned, or adopts it when the
/// volume asks. Returns how many were found. Costs
/// commands only for images about to be created; a cluster that cannot answer keeps the plan
/// as it is (its agent still refuses to create over an image it does not own).
pub async fn probe_creates(p: &crate::plan::Plan, observed: &mut Observed, fleet: &Fleet) -> usize {
    let mut found = 0;
    for (cluster, refs) in to_probe(p, observed) {
        let existing = probe_cluster(fleet, &cluster, &refs).await;
        if existing.is_empty() {
            continue;
        }
        found += existing.len();
        // This pass's copy only: the informer's report is not changed.
        if let Some(Known::Known { report }) = observed.clusters.get_mut(&cluster) {
            merge_probed(Arc::make_mut(report), existing);
        }
    }
    found
}

/// The images to ask each cluster about: those the plan creates that its report does not hold
/// (a create that only rewrites the policy of an image it holds is not asked), and those
/// reported from the index alone.
fn to_probe(
    p: &crate::plan::Plan,
    observed: &Observed,
) -> BTreeMap<String, Vec<protocol::ImageRef>> {
    let mut wanted: BTreeMap<&str, BTreeSet<(&str, &str)>> = BTreeMap::new();
    for s in &p.steps {
        if let (Target::Cluster(c), Some(Command::CreateImage(x))) = (&s.target, s.action.sent()) {
            wanted
                .entry(c.as_str())
                .or_default()
                .insert((x.pool.as_str(), x.image.as_str()));
        }
    }
    let mut unverified: BTreeMap<&str, BTreeSet<(&str, &str)>> = BTreeMap::new();
    for (c, pool, image) in &p.unverified {
        unverified
            .entry(c.as_str())
            .or_default()
            .insert((pool.as_str(), image.as_str()));
    }
    for c in unverified.keys() {
        wanted.entry(c).or_default();
    }
    let mut out = BTreeMap::new();
    for (cluster, mut images) in wanted {
        let Some(Known::Known { report }) = observed.clusters.get(cluster) else {
            continue;
        };
        for i in &report.images {
            images.remove(&(i.pool.as_str(), i.image.as_str()));
        }
        // Images reported from the index alone are read from the image itself.
        images.extend(unverified.remove(cluster).unwrap_or_default());
        if images.is_empty() {
            continue;
        }
        let refs = images
            .into_iter()
            .map(|(pool, image)| protocol::ImageRef {
                pool: pool.into(),
                image: image.into(),
            })
            .collect();
        out.insert(cluster.to_string(), refs);
    }
    out
}

/// Asks `cluster` which of `refs` exist (64 a request); the live ones. A cluster that cannot
/// be asked answers none (the create itself then meets the image, and refuses what is not
/// ours).
async fn probe_cluster(
    fleet: &Fleet,
    cluster: &str,
    refs: &[protocol::ImageRef],
) -> Vec<ImageStatus> {
    let client = match fleet.get(&Target::Cluster(cluster.to_string())) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(cluster, error = %e, "Cannot ask the cluster about the images to create.");
            return vec![];
        }
    };
    let mut existing = vec![];
    for chunk in refs.chunks(64) {
        let asked = protocol::ImageList {
            images: chunk.to_vec(),
        };
        match client.request(Command::ProbeImages(asked)).await {
            Ok(Reply::Images(l)) => existing.extend(
                l.images
                    .into_iter()
                    .filter(|i| i.state == protocol::ImageState::Live),
            ),
            Ok(other) => {
                tracing::warn!(cluster, reply = ?other, "Unexpected reply to probe_images.");
            }
            Err(e) => {
                tracing::warn!(cluster, error = %protocol::error::chain(&e), "Cannot ask the cluster about the images to create.");
            }
        }
    }
    existing
}

/// Puts probed images into a report in one walk: what it holds of them is replaced, the rest
/// appended.
fn merge_probed(report: &mut CephReport, existing: Vec<ImageStatus>) {
    let mut at = vec![None; existing.len()];
    {
        let probed: std::collections::HashMap<(&str, &str), usize> = existing
            .iter()
            .enumerate()
            .map(|(k, i)| ((i.pool.as_str(), i.image.as_str()), k))
            .collect();
        for (p, held) in report.images.iter().enumerate() {
            if let Some(&k) = probed.get(&(held.pool.as_str(), held.image.as_str())) {
                at[k] = Some(p);
            }
        }
    }
    for (i, p) in existing.into_iter().zip(at) {
        match p {
            Some(p) => report.images[p] = i,
            None => report.images.push(i),
        }
    }
}

/// Images asked for per page of `ceph_changes` (the agent caps it too).
const PAGE: u32 = 1000;

/// What the controller knows of every agent, kept between passes: a cluster's images as of a
/// generation of its agent (refreshed with the changes since), a DPU's last report. A pass
/// re-reads only the agents marked stale (new sessions, agents a pass commanded, agents that said
/// they changed), so its cost follows what changed, not the size of the fleet.
#[derive(Debug, Default)]
pub struct Informer {
    observed: Observed,
    /// Cluster name to the agent generation its images are as of.
    generations: BTreeMap<String, u64>,
    /// Targets to re-read at the next refresh.
    stale: BTreeSet<Target>,
}

/// An [`Informer`] shared by tasks (the daemon's sessions put pushed reports into it while a
/// pass reads it). Its lock is held only to list the reads and to take their results in, never
/// while an agent is read.
#[derive(Debug, Default)]
pub struct SharedInformer(std::sync::Mutex<Informer>);

impl SharedInformer {
    /// The informer itself, for a moment.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Informer> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// What the agents of `fleet` report, brought up to date: only the agents marked stale
    /// (new sessions, agents that said they changed, agents a pass commanded) are read.
    pub async fn observe(&self, fleet: &Fleet, timeout: Duration) -> Observed {
        let jobs = self.lock().jobs(fleet);
        let results = run_jobs(jobs, timeout).await;
        let mut informer = self.lock();
        informer.apply(results);
        informer.observed().clone()
    }

    /// Re-read these agents at the next [`SharedInformer::observe`].
    pub fn mark<'a>(&self, targets: impl IntoIterator<Item = &'a Target>) {
        let mut informer = self.lock();
        for t in targets {
            informer.mark(t.clone());
        }
    }
}

/// What one target's refresh brought back.
pub enum Fetched {
    /// Pages of a cluster agent's changes, in order.
    Cluster(Result<Vec<Page>, String>),
    /// A DPU's report.
    Dpu(Result<Box<DpuReport>, String>),
}

/// One page of a cluster agent's changes, as read.
pub struct Page {
    /// The first page of a full read: it replaces what was known rather than adding to it.
    restart: bool,
    changes: CephChanges,
}

/// One target to read: its session, and for a cluster the generation its images are as of.
pub struct Job {
    target: Target,
    client: Arc<AgentClient>,
    since: u64,
}

impl Informer {
    /// What is known now.
    pub fn observed(&self) -> &Observed {
        &self.observed
    }

    /// Each cluster's agent view generation its images are as of.
    pub fn generations(&self) -> &BTreeMap<String, u64> {
        &self.generations
    }

    /// Re-read `target` at the next refresh.
    pub fn mark(&mut self, target: Target) {
        self.stale.insert(target);
    }

    /// Forget `target` (its session ended: a new one starts from scratch).
    pub fn reset(&mut self, target: &Target) {
        match target {
            Target::Cluster(n) => {
                self.generations.remove(n);
                self.observed.clusters.remove(n);
            }
            Target::Dpu(n) => {
                self.observed.dpus.remove(n);
            }
        }
        self.stale.insert(target.clone());
    }

    /// A cluster's agent said its view is at `generation`: re-read it if that is news.
    pub fn cluster_changed(&mut self, name: &str, generation: u64) -> bool {
        if self.generations.get(name) == Some(&generation) {
            return false;
        }
        self.stale.insert(Target::Cluster(name.to_string()));
        true
    }

    /// A DPU pushed its report. False, and nothing changes, when a newer report of the same
    /// agent process is held (a read answered after this push was made, applied before it).
    pub fn set_dpu(&mut self, name: &str, report: Box<DpuReport>) -> bool {
        // A DPU marked stale stays so: this push may predate what a pass just did there.
        self.put_dpu(name.to_string(), Arc::from(report))
    }

    /// Holds `report` for DPU `name` unless the one held is newer (see
    /// [`protocol::dpu::ReportOrder`]); says whether it did.
    fn put_dpu(&mut self, name: String, report: Arc<DpuReport>) -> bool {
        if let Some(Known::Known { report: held }) = self.observed.dpus.get(&name) {
            if report.order.older_than(&held.order) {
                return false;
            }
        }
        self.observed.dpus.insert(name, Known::Known { report });
        true
    }

    /// Whether `target` has been read at all.
    pub fn knows(&self, target: &Target) -> bool {
        match target {
            Target::Cluster(n) => self.generations.contains_key(n),
            Target::Dpu(n) => matches!(self.observed.dpus.get(n), Some(Known::Known { .. })),
        }
    }

    /// Whether `target` is to be read now: not known yet, or marked. The mark is taken here,
    /// when the read is listed, not when its answer comes in: a target marked while its read is
    /// in flight (its agent changed after answering) stays marked for the next refresh.
    /// Clearing it on the answer lost that change until the agent's next one (found by the
    /// replica pause test: a replica never saw the image another replica had created).
    fn due(&mut self, target: &Target) -> bool {
        self.stale.remove(target) || !self.knows(target)
    }

    /// Brings every target of `fleet` up to date that is stale or not known yet; targets without
    /// a session are Unknown; targets not in `fleet` are forgotten.
    pub async fn refresh(&mut self, fleet: &Fleet, timeout: Duration) {
        let jobs = self.jobs(fleet);
        let results = run_jobs(jobs, timeout).await;
        self.apply(results);
    }

    /// What [`Informer::refresh`] has to read (no I/O: a daemon holds its lock only for this and
    /// for [`Informer::apply`], never while agents are read).
    pub fn jobs(&mut self, fleet: &Fleet) -> Vec<Job> {
        self.observed
            .clusters
            .retain(|n, _| fleet.agents.contains_key(&Target::Cluster(n.clone())));
        self.observed
            .dpus
            .retain(|n, _| fleet.agents.contains_key(&Target::Dpu(n.clone())));
        let mut jobs = vec![];
        for (t, c) in &fleet.agents {
            let client = match c {
                Ok(c) => c.clone(),
                Err(e) => {
                    self.unknown(t, e.to_string());
                    continue;
                }
            };
            if !self.due(t) {
                continue;
            }
            let since = match t {
                Target::Cluster(n) => self.generations.get(n).copied().unwrap_or(0),
                Target::Dpu(_) => 0,
            };
            jobs.push(Job {
                target: t.clone(),
                client,
                since,
            });
        }
        jobs
    }

    /// Takes in what [`run_jobs`] read.
    pub fn apply(&mut self, results: Vec<(Target, Fetched)>) {
        for (t, fetched) in results {
            match (t, fetched) {
                (Target::Cluster(n), Fetched::Cluster(Ok(pages))) => {
                    let mut report = match self.observed.clusters.remove(&n) {
                        Some(Known::Known { report }) if self.generations.contains_key(&n) => {
                            Some(report)
                        }
                        _ => None,
                    };
                    let mut generation = self.generations.get(&n).copied().unwrap_or(0);
                    for Page {
                        restart,
                        changes: page,
                    } in pages
                    {
                        let r = match (report.as_mut(), restart) {
                            (Some(r), false) => Arc::make_mut(r),
                            _ => Arc::make_mut(report.insert(Arc::new(empty_report()))),
                        };
                        let images = std::mem::take(&mut r.images);
                        *r = CephReport {
                            images,
                            ..page.cluster
                        };
                        apply_changes(&mut r.images, page.images, &page.removed);
                        generation = page.generation;
                    }
                    if let Some(report) = report {
                        self.generations.insert(n.clone(), generation);
                        self.observed.clusters.insert(n, Known::Known { report });
                    }
                }
                (Target::Dpu(n), Fetched::Dpu(Ok(report))) => {
                    self.put_dpu(n, Arc::from(report));
                }
                (t, Fetched::Cluster(Err(e)) | Fetched::Dpu(Err(e))) => self.unknown(&t, e),
                (t, _) => self.unknown(&t, "mismatched reply".into()),
            }
        }
    }

    fn unknown(&mut self, t: &Target, reason: String) {
        match t {
            Target::Cluster(n) => {
                self.generations.remove(n);
                self.observed
                    .clusters
                    .insert(n.clone(), Known::Unknown { reason });
            }
            Target::Dpu(n) => {
                self.observed
                    .dpus
                    .insert(n.clone(), Known::Unknown { reason });
            }
        }
    }
}

/// Reads `jobs` concurrently, each within `timeout`.
pub async fn run_jobs(jobs: Vec<Job>, timeout: Duration) -> Vec<(Target, Fetched)> {
    let mut set = JoinSet::new();
    for job in jobs {
        set.spawn(async move {
            let late = || format!("no report within {timeout:?}");
            let fetched = match &job.target {
                Target::Cluster(_) => Fetched::Cluster(
                    tokio::time::timeout(timeout, fetch_cluster(&job.client, job.since))
                        .await
                        .unwrap_or_else(|_| Err(late())),
                ),
                Target::Dpu(_) => Fetched::Dpu(
                    match tokio::time::timeout(
                        timeout,
                        job.client.request(Command::DpuReport(Empty {})),
                    )
                    .await
                    {
                        Ok(Ok(Reply::DpuReport(r))) => Ok(r),
                        Ok(Ok(other)) => Err(format!("unexpected reply {other:?}")),
                        Ok(Err(e)) => Err(protocol::error::chain(&e)),
                        Err(_) => Err(late()),
                    },
                ),
            };
            (job.target, fetched)
        });
    }
    let mut out = vec![];
    while let Some(r) = set.join_next().await {
        if let Ok(r) = r {
            out.push(r);
        }
    }
    out
}

/// Reads a cluster agent's changes since generation `since` (everything when 0, or when the
/// agent no longer remembers it), page after page; changes made while paging are read once more
/// at the end. The first page of a full read has `restart` set: it replaces what was known.
async fn fetch_cluster(client: &AgentClient, mut since: u64) -> Result<Vec<Page>, String> {
    let mut pages = vec![];
    // At most three rounds: the first (paged) read, and changes made meanwhile.
    for _round in 0..3 {
        let mut after: Option<String> = None;
        let mut first_generation = None;
        let mut last_generation;
        let mut count = 0;
        loop {
            let reply = client
                .request(Command::CephChanges(ChangesQuery {
                    since,
                    after: after.clone(),
                    limit: PAGE,
                }))
                .await
                .map_err(|e| protocol::error::chain(&e))?;
            let Reply::CephChanges(page) = reply else {
                return Err(format!("unexpected reply {reply:?}"));
            };
            let page = *page;
            count += 1;
            first_generation.get_or_insert(page.generation);
            last_generation = page.generation;
            let more = page.more;
            let restart = page.full && after.is_none();
            after = page.images.last().map(ImageStatus::key).or(after);
            pages.push(Page {
                restart,
                changes: page,
            });
            if !more {
                break;
            }
        }
        let first = first_generation.unwrap_or(last_generation);
        if count == 1 || last_generation == first {
            return Ok(pages);
        }
        // Paged while the agent's view moved: read what changed since the first page.
        since = first;
    }
    Ok(pages)
}

fn empty_report() -> CephReport {
    CephReport {
        fsid: String::new(),
        health: protocol::CephHealth {
            status: String::new(),
            checks: BTreeMap::new(),
        },
        monitors: vec![],
        capacity: protocol::Capacity {
            total_bytes: 0,
            used_bytes: 0,
            avail_bytes: 0,
        },
        pools: vec![],
        images: vec![],
        fences: vec![],
    }
}

/// Upserts `changed` into `images` (kept ordered by pool and name) and drops `removed`. A
/// handful of changes are found in place; a page of many is merged in one walk, so that a page
/// costs the report's length once, not once per changed image (an insertion moves everything
/// after it: 80,000 images created one page at a time would otherwise move the report 80,000
/// times).
pub fn apply_changes(images: &mut Vec<ImageStatus>, changed: Vec<ImageStatus>, removed: &[String]) {
    const IN_PLACE: usize = 16;
    if changed.len() + removed.len() <= IN_PLACE {
        apply_in_place(images, changed, removed);
    } else {
        apply_merged(images, changed, removed);
    }
}

fn key(i: &ImageStatus) -> (&str, &str) {
    (i.pool.as_str(), i.image.as_str())
}

/// `pool/image` as (pool, image).
fn removed_key(r: &str) -> Option<(&str, &str)> {
    r.split_once('/')
}

fn apply_in_place(images: &mut Vec<ImageStatus>, changed: Vec<ImageStatus>, removed: &[String]) {
    let find =
        |images: &Vec<ImageStatus>, k: (&str, &str)| images.binary_search_by(|i| key(i).cmp(&k));
    for c in changed {
        match find(images, key(&c)) {
            Ok(at) => images[at] = c,
            Err(at) => images.insert(at, c),
        }
    }
    for k in removed.iter().filter_map(|r| removed_key(r)) {
        if let Ok(at) = find(images, k) {
            images.remove(at);
        }
    }
}

fn apply_merged(images: &mut Vec<ImageStatus>, mut changed: Vec<ImageStatus>, removed: &[String]) {
    use std::cmp::Ordering;
    // The changes in key order, of equal keys the last (as upserting one by one keeps): reversed,
    // then a stable sort puts the last first, and `dedup_by` keeps the first of each run.
    changed.reverse();
    changed.sort_by(|a, b| key(a).cmp(&key(b)));
    changed.dedup_by(|later, kept| key(later) == key(kept));
    let gone: BTreeSet<(&str, &str)> = removed.iter().filter_map(|r| removed_key(r)).collect();
    let old = std::mem::take(images);
    let mut out = Vec::with_capacity(old.len() + changed.len());
    let (mut a, mut b) = (old.into_iter().peekable(), changed.into_iter().peekable());
    loop {
        let next = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => match key(x).cmp(&key(y)) {
                Ordering::Less => a.next(),
                Ordering::Greater => b.next(),
                // Replaced by the change.
                Ordering::Equal => {
                    a.next();
                    b.next()
                }
            },
            (Some(_), None) => a.next(),
            (None, Some(_)) => b.next(),
            (None, None) => break,
        };
        if let Some(i) = next.filter(|i| !gone.contains(&key(i))) {
            out.push(i);
        }
    }
    *images = out;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn img(pool: &str, image: &str, size: u64) -> ImageStatus {
        ImageStatus {
            pool: pool.into(),
            image: image.into(),
            state: protocol::ImageState::Live,
            size_bytes: size,
            features: vec![],
            watchers: None,
            metadata: Default::default(),
            unverified: false,
            parent: None,
            clone_depth: None,
            snapshots: vec![],
        }
    }

    #[test]
    fn changes_are_upserted_in_order_and_removals_dropped() {
        let mut v = vec![img("a", "1", 1), img("b", "1", 1)];
        apply_changes(
            &mut v,
            vec![img("a", "2", 5), img("b", "1", 9), img("0", "z", 1)],
            &["a/1".to_string(), "nope/x".to_string()],
        );
        let keys: Vec<(String, u64)> = v.iter().map(|i| (i.key(), i.size_bytes)).collect();
        assert_eq!(
            keys,
            vec![("0/z".into(), 1), ("a/2".into(), 5), ("b/1".into(), 9)]
        );
    }

    proptest::proptest! {
        #[test]
        fn a_page_merged_is_the_page_upserted_one_by_one(
            old in proptest::collection::btree_set((0u8..4, 0u8..40), 0..60),
            changed in proptest::collection::vec((0u8..4, 0u8..40, 0u64..3), 0..60),
            removed in proptest::collection::vec((0u8..5, 0u8..40), 0..20),
        ) {
            let old: Vec<ImageStatus> = old
                .iter()
                .map(|(p, i)| img(&format!("p{p}"), &format!("i{i:02}"), 100))
                .collect();
            let changed: Vec<ImageStatus> = changed
                .iter()
                .map(|(p, i, s)| img(&format!("p{p}"), &format!("i{i:02}"), *s))
                .collect();
            let removed: Vec<String> = removed.iter().map(|(p, i)| format!("p{p}/i{i:02}")).collect();
            let (mut one_by_one, mut merged) = (old.clone(), old);
            apply_in_place(&mut one_by_one, changed.clone(), &removed);
            apply_merged(&mut merged, changed, &removed);
            proptest::prop_assert_eq!(merged, one_by_one);
        }
    }

    /// A full read's only page: `images` at `generation`.
    fn full_page(images: Vec<ImageStatus>, generation: u64) -> Page {
        Page {
            restart: true,
            changes: CephChanges {
                generation,
                full: true,
                more: false,
                cluster: empty_report(),
                images,
                removed: vec![],
            },
        }
    }

    #[test]
    fn a_pass_reads_the_informers_reports_without_copying_them_and_a_change_copies_one() {
        let mut informer = Informer::default();
        let page = full_page;
        let c = Target::Cluster("ceph".into());
        informer.apply(vec![(
            c.clone(),
            Fetched::Cluster(Ok(vec![page(vec![img("rbd", "a", 1)], 1)])),
        )]);
        let pass = informer.observed().clone();
        let report = |o: &Observed| match &o.clusters["ceph"] {
            Known::Known { report } => report.clone(),
            Known::Unknown { reason } => panic!("{reason}"),
        };
        assert!(Arc::ptr_eq(&report(&pass), &report(informer.observed())));
        // A change while the pass still reads the old report: the pass keeps what it read.
        informer.apply(vec![(
            c,
            Fetched::Cluster(Ok(vec![Page {
                restart: false,
                ..page(vec![img("rbd", "b", 2)], 2)
            }])),
        )]);
        assert_eq!(report(&pass).images.len(), 1);
        assert_eq!(report(informer.observed()).images.len(), 2);
    }

    /// A change announced while the cluster's read is in flight is read at the next refresh,
    /// even when that read answers after the announcement (the answer may predate the change).
    #[test]
    fn a_change_announced_during_a_read_is_read_again() {
        let mut informer = Informer::default();
        let c = Target::Cluster("ceph".into());
        let answer = |images, generation| Fetched::Cluster(Ok(vec![full_page(images, generation)]));
        assert!(informer.due(&c), "never read");
        informer.apply(vec![(c.clone(), answer(vec![], 1))]);
        assert!(!informer.due(&c), "known, nothing announced");
        assert!(informer.cluster_changed("ceph", 2));
        // The read is listed; while it is in flight the agent announces generation 3.
        assert!(informer.due(&c));
        assert!(informer.cluster_changed("ceph", 3));
        informer.apply(vec![(c.clone(), answer(vec![img("rbd", "a", 1)], 2))]);
        assert!(informer.due(&c), "generation 3 is still to be read");
        informer.apply(vec![(c.clone(), answer(vec![img("rbd", "a", 1)], 3))]);
        assert!(!informer.due(&c));
        assert!(!informer.cluster_changed("ceph", 3), "already read");
    }

    /// A read answered before a push but applied after it must not put the older view back
    /// (found by CI: a report-only daemon kept showing a namespace destroyed out of band).
    #[test]
    fn an_older_report_of_the_same_agent_never_replaces_a_newer_one() {
        let mut informer = Informer::default();
        let report = |instance, seq, missing: &[&str]| {
            let mut r = crate::plan::sim::bare_dpu();
            r.order = protocol::dpu::ReportOrder { instance, seq };
            r.missing = missing.iter().map(|m| m.to_string()).collect();
            Box::new(r)
        };
        let held = |i: &Informer| match &i.observed().dpus["d"] {
            Known::Known { report } => (report.order.seq, report.missing.clone()),
            Known::Unknown { reason } => panic!("{reason}"),
        };
        assert!(informer.set_dpu("d", report(7, 5, &["ns 1"])));
        // The read the pass started before the push comes back now: older, ignored.
        informer.apply(vec![(
            Target::Dpu("d".into()),
            Fetched::Dpu(Ok(report(7, 4, &[]))),
        )]);
        assert_eq!(held(&informer), (5, vec!["ns 1".to_string()]));
        assert!(
            !informer.set_dpu("d", report(7, 3, &[])),
            "an older push too"
        );
        assert!(informer.set_dpu("d", report(7, 6, &[])));
        assert_eq!(held(&informer), (6, vec![]));
        // A restarted agent numbers from 1 again: another process, taken.
        assert!(informer.set_dpu("d", report(9, 1, &["ns 2"])));
        assert_eq!(held(&informer), (1, vec!["ns 2".to_string()]));
        // Agents that do not number their reports: the last one in wins, as before.
        assert!(informer.set_dpu("d", report(0, 0, &[])));
        assert!(informer.set_dpu("d", report(0, 0, &["x"])));
    }
}
