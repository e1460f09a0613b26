//! The planner: a pure function of (desired, observed) to a plan. No I/O, no clock, no
//! randomness: the same inputs give the same plan, byte for byte.
//!
//! Per volume the chain is: SNAP installed -> rbd image -> cluster registered in SNAP -> bdev ->
//! subsystem -> namespace -> controller (created suspended) -> namespace attached -> controller
//! resumed. Teardown runs in reverse. Existing matching objects are adopted, never duplicated.
//! Only objects unistor owns are ever removed: images carrying `unistor.managed-by`, SNAP objects
//! named by unistor's convention (see [`names`]).

mod create;
pub mod model;
mod place;
pub mod sim;
pub mod snapshots;
mod teardown;

use std::collections::BTreeMap;

/// Fast, deterministic hashing for the planner's internal lookups (keys are our own names).
type HashMap<K, V> = rustc_hash::FxHashMap<K, V>;

use protocol::dpu::{DpuReport, FunctionRef, SnapState};
use protocol::{CephReport, Command};

use crate::manifest::{Desired, Dpu, Volume};
pub use model::*;

/// Names of the SNAP objects unistor makes; anything else on a DPU is never touched.
pub mod names {
    use protocol::dpu::FunctionRef;

    /// Prefix of every NQN unistor creates.
    pub const NQN_PREFIX: &str = "nqn.2024-01.io.unistor:";
    /// Prefix of bdevs, controllers and SNAP cluster names unistor creates.
    pub const PREFIX: &str = "unistor-";

    /// The subsystem of one function of one DPU.
    pub fn nqn(dpu: &str, f: FunctionRef) -> String {
        format!("{NQN_PREFIX}{}:{f}", dpu.to_ascii_lowercase())
    }
    /// Whether `nqn` is [`nqn`]`(dpu, f)`, told without formatting it: a plan compares every
    /// subsystem SNAP reports with the one it wants, and a converged one formats nothing.
    pub fn is_nqn(nqn: &str, dpu: &str, f: FunctionRef) -> bool {
        let Some(rest) = nqn.strip_prefix(NQN_PREFIX) else {
            return false;
        };
        let (Some(d), Some(func)) = (rest.get(..dpu.len()), rest.get(dpu.len()..)) else {
            return false;
        };
        // The DPU's name in lower case (ASCII: the same length), then `:` and the function.
        d.bytes()
            .zip(dpu.bytes())
            .all(|(a, b)| a == b.to_ascii_lowercase())
            && func
                .strip_prefix(':')
                .is_some_and(|func| is_function(func, f))
    }

    /// Whether `s` is `f` as [`FunctionRef`]'s `Display` writes it (`pf0`, `pf0vf3`).
    fn is_function(s: &str, f: FunctionRef) -> bool {
        let Some(s) = s.strip_prefix("pf") else {
            return false;
        };
        match (s.split_once("vf"), f.vf) {
            (None, None) => is_decimal(s, f.pf),
            (Some((pf, vf)), Some(n)) => is_decimal(pf, f.pf) && is_decimal(vf, n),
            _ => false,
        }
    }

    /// Whether `s` is `n` written in decimal (no sign, no leading zero).
    fn is_decimal(s: &str, n: u32) -> bool {
        let mut digits = [0u8; 10];
        let (mut at, mut n) = (digits.len(), n);
        loop {
            at -= 1;
            digits[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        s.as_bytes() == &digits[at..]
    }
    /// The controller of one function.
    pub fn controller(f: FunctionRef) -> String {
        format!("{PREFIX}{f}")
    }
    /// The bdev of a volume.
    pub fn bdev(volume: &str) -> String {
        format!("{PREFIX}{volume}")
    }
    /// SNAP's name for a Ceph cluster.
    pub fn cluster(cluster: &str) -> String {
        format!("{PREFIX}{cluster}")
    }
    /// The name a unistor SNAP object was made from (`unistor-db` -> `db`), if it is one.
    pub fn unprefixed(name: &str) -> Option<&str> {
        name.strip_prefix(PREFIX)
    }
    /// Whether a SNAP object name is unistor's.
    pub fn owned(name: &str) -> bool {
        name.starts_with(PREFIX) || name.starts_with(NQN_PREFIX)
    }
}

/// The values unistor gives every SNAP object it creates, in one place: each is in the plan
/// (`plan --output json` shows it) and is what the dpu-agent is sent.
pub mod snap_values {
    /// Block size of every bdev (4 KiB: what NVMe hosts and RBD objects align to).
    pub const BLOCK_SIZE: u32 = 4096;
    /// Model number of every subsystem.
    pub const MODEL: &str = "unistor volume";
    /// Namespaces a subsystem may hold (SNAP's `nn`/`mnan`).
    pub const MAX_NAMESPACES: u32 = 1024;
    /// Maximum data transfer size of every controller, as a power of two of 4 KiB pages (7 =
    /// 512 KiB).
    pub const MDTS: u32 = 7;

    /// A 20-character NVMe serial derived from the NQN.
    pub fn serial(nqn: &str) -> String {
        let h = super::fnv(nqn);
        format!("UNISTOR{:013X}", h & 0x000F_FFFF_FFFF_FFFF)
    }
}

/// Knobs of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Value of `unistor.managed-by` on images this deployment owns.
    pub owner: String,
    /// Which cluster health halts the steps that write to the cluster.
    pub health_gate: HealthGate,
    /// Threads the per-DPU phases may use (1: all on the caller's). The plan is the same,
    /// byte for byte, whatever the number.
    pub threads: usize,
    /// The wall clock at planning, seconds since the Unix epoch: when scheduled snapshots are
    /// due (None: no scheduled snapshot is taken or pruned).
    pub now: Option<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            owner: "unistor".into(),
            health_gate: HealthGate::standard(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            now: None,
        }
    }
}

/// Which health of a Ceph cluster halts every step that writes to it (images created, grown,
/// restored, trashed, deleted, their policy rewritten). Steps that need no write to it go on:
/// SNAP objects over images that are already right, other clusters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthGate {
    /// `HEALTH_ERR` halts.
    pub on_error: bool,
    /// Each of these health checks halts, whatever the overall status.
    pub checks: Vec<String>,
}

/// A `--health-gate` item that is not a health check name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a health check name: use standard, off, or names like HEALTH_ERR,OSD_FULL")]
pub struct GateError(pub String);

impl HealthGate {
    /// `HEALTH_ERR`, a full OSD or pool, or inactive placement groups.
    pub fn standard() -> Self {
        Self {
            on_error: true,
            checks: ["OSD_FULL", "POOL_FULL", "PG_AVAILABILITY"]
                .map(String::from)
                .to_vec(),
        }
    }

    /// Nothing halts.
    pub fn off() -> Self {
        Self {
            on_error: false,
            checks: vec![],
        }
    }

    /// `standard`, `off`, or a comma-separated list of `HEALTH_ERR` and check names
    /// (`HEALTH_ERR,OSD_FULL,OSD_NEARFULL`).
    pub fn parse(s: &str) -> Result<Self, GateError> {
        match s {
            "standard" => return Ok(Self::standard()),
            "off" => return Ok(Self::off()),
            _ => {}
        }
        let mut gate = Self::off();
        for item in s.split(',').map(str::trim) {
            let valid = !item.is_empty()
                && item
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            if !valid {
                return Err(GateError(item.to_string()));
            }
            if item == "HEALTH_ERR" {
                gate.on_error = true;
            } else {
                gate.checks.push(item.to_string());
            }
        }
        Ok(gate)
    }

    /// Why `report`'s cluster is closed to writes, when it is.
    pub fn halts(&self, report: &CephReport) -> Option<String> {
        self.halts_health(&report.health)
    }

    /// Why a cluster of health `h` is closed to writes, when it is.
    pub fn halts_health(&self, h: &protocol::CephHealth) -> Option<String> {
        let failing: Vec<String> = self
            .checks
            .iter()
            .filter_map(|c| h.checks.get(c).map(|summary| format!("{c}: {summary}")))
            .collect();
        if !failing.is_empty() {
            return Some(failing.join("; "));
        }
        (self.on_error && h.status == "HEALTH_ERR").then(|| {
            let checks: Vec<String> = h.checks.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            format!("HEALTH_ERR ({})", checks.join("; "))
        })
    }
}

/// Clusters closed to writes by the health gate, with the reason.
fn halted<'a>(observed: &'a Observed, gate: &HealthGate) -> BTreeMap<&'a str, String> {
    observed
        .clusters
        .iter()
        .filter_map(|(name, k)| {
            let why = gate.halts(k.get()?)?;
            Some((
                name.as_str(),
                format!("cluster {name} is closed to writes by the health gate: {why}"),
            ))
        })
        .collect()
}

/// Metadata keys unistor reads on images (their one home is [`protocol::meta`]).
pub use protocol::meta::{
    MANAGED_BY as META_MANAGED_BY, POLICY as META_POLICY, RETENTION as META_RETENTION,
    VOLUME as META_VOLUME,
};

/// Steps, drift and holds being written. A builder may be a fragment of the plan, made on its
/// own thread for part of the fleet: its step ids start at `base` (the plan's length when the
/// phase began) and [`Builder::absorb`] renumbers them in place, so a plan made on many threads
/// is the plan made on one, byte for byte.
#[derive(Default)]
struct Builder {
    base: usize,
    plan: Plan,
}

impl Builder {
    /// The id the next step gets.
    fn next_id(&self) -> usize {
        self.base + self.plan.steps.len()
    }

    /// An empty fragment whose first step will be `base` (the plan's [`Builder::next_id`] when
    /// the phase began).
    fn at(base: usize) -> Builder {
        Builder {
            base,
            plan: Plan::default(),
        }
    }

    /// Appends a fragment made by [`Builder::at`] while this builder was unchanged or
    /// only grew by other fragments; returns the id its first step got (its step `x` is now
    /// `x - base + that`).
    fn absorb(&mut self, frag: Builder) -> usize {
        // Ids below the fragment's base are steps of earlier phases: they stay.
        self.absorb_with(frag, |d| d)
    }

    /// [`Builder::absorb`], the ids below the fragment's base (steps of other fragments it
    /// depends on) mapped by `earlier` to where those steps now are.
    fn absorb_with(&mut self, frag: Builder, earlier: impl Fn(usize) -> usize) -> usize {
        let (at, base) = (self.next_id(), frag.base);
        for mut s in frag.plan.steps {
            s.id = s.id - base + at;
            for d in &mut s.depends_on {
                *d = if *d >= base {
                    *d - base + at
                } else {
                    earlier(*d)
                };
            }
            self.plan.steps.push(s);
        }
        self.plan.drift.extend(frag.plan.drift);
        self.plan.blocked.extend(frag.plan.blocked);
        self.plan.unverified.extend(frag.plan.unverified);
        at
    }

    fn push(
        &mut self,
        target: Target,
        action: Action,
        risk: Risk,
        deps: &[Option<usize>],
        volume: Option<&str>,
    ) -> usize {
        let id = self.next_id();
        let mut depends_on: Deps = deps.iter().flatten().copied().collect();
        depends_on.sort_unstable();
        depends_on.dedup();
        self.plan.steps.push(Step {
            id,
            target,
            action,
            risk,
            depends_on,
            volume: volume.map(Box::from),
        });
        id
    }

    fn drift(&mut self, object: String, field: &str, desired: String, observed: String) {
        self.plan.drift.push(Drift {
            object,
            field: field.into(),
            desired,
            observed,
        });
    }

    fn block(&mut self, object: String, reason: String) {
        self.plan.blocked.push(Blocked { object, reason });
    }
}

/// Runs `f` over `items` in contiguous chunks, on up to `threads` threads, and returns each
/// chunk's result in item order (so what is merged from them does not depend on `threads`).
fn par_chunks<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&[T]) -> R + Sync + Send,
) -> Vec<R> {
    par_ranges(items.len(), threads, |r| f(&items[r]))
}

/// [`par_chunks`] over the positions `0..len`, given as contiguous ranges.
fn par_ranges<R: Send>(
    len: usize,
    threads: usize,
    f: impl Fn(std::ops::Range<usize>) -> R + Sync + Send,
) -> Vec<R> {
    use rayon::prelude::*;
    // Below this many items a chunk costs more to hand over than it saves.
    const MIN_CHUNK: usize = 64;
    // A few chunks per thread: DPUs differ in work, the threads pick up what is left.
    let chunks = (threads * 4).min(len / MIN_CHUNK);
    if threads <= 1 || chunks <= 1 {
        return vec![f(0..len)];
    }
    let size = len.div_ceil(chunks);
    (0..len.div_ceil(size))
        .into_par_iter()
        .map(|c| f(c * size..((c + 1) * size).min(len)))
        .collect()
}

/// FNV-1a: a stable hash (the same on every machine and release) for derived NSIDs, NVMe
/// serials and plan fingerprints.
pub fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Steps `ids` as dependencies (none when absent): what a step waits for when it waits for a
/// group of others (a DPU's removals, a subsystem's, a controller's attachments).
fn after(ids: Option<&Vec<usize>>) -> Vec<Option<usize>> {
    ids.into_iter().flatten().map(|s| Some(*s)).collect()
}

/// Computes the plan: what is unknown; then, DPU by DPU, where its volumes go, its removals,
/// SNAP, and its volume chains (see [`place`], [`teardown`] and [`create`]); then the images of
/// gone volumes.
///
/// The plan lists every DPU's removals first, then the images of gone volumes, then SNAP on
/// every DPU, then every DPU's chains. It is made DPU by DPU all the same, each DPU's phases one
/// after the other while its report is in the cache (a fleet's reports are far larger than the
/// cache, so a pass per phase would fetch each report from memory once per phase), DPUs in
/// chunks on all threads; each chunk's phases are fragments of the plan, merged in that order.
pub fn plan(desired: &Desired, observed: &Observed, opts: &Options) -> Plan {
    let mut b = Builder::default();
    b.plan.unknown = unknown(desired, observed);
    let volumes: Vec<&Volume> = desired.volumes.values().collect();
    let group = || place::group_by_dpu(desired, &volumes);
    let ((by_dpu, members), images) = if opts.threads > 1 {
        rayon::join(group, || index_images(observed))
    } else {
        (group(), index_images(observed))
    };
    let halted = halted(observed, &opts.health_gate);
    let dpus = dpus(desired, observed, &by_dpu, &members);
    let silent = silent_dpus(desired, observed);
    let fenced: BTreeMap<&str, Vec<&protocol::FenceRecord>> = observed
        .clusters
        .iter()
        .filter_map(|(n, k)| Some((n.as_str(), k.get()?.fences.iter().collect())))
        .collect();
    let cx = create::Context {
        observed,
        opts,
        images: &images,
        halted: &halted,
        silent: &silent,
        fenced: &fenced,
    };
    let parts = par_chunks(&dpus, opts.threads, |dpus| plan_dpus(&cx, &volumes, dpus));
    // Every DPU's removals; then the images of gone volumes, which wait for them.
    let mut moved = Vec::with_capacity(parts.len());
    let mut of_volume = teardown::ByVolume::default();
    let mut claimed: BTreeMap<&str, Vec<bool>> = BTreeMap::new();
    let mut rest = Vec::with_capacity(parts.len());
    for part in parts {
        // Removals number from 0: each one's id moves by where the fragment starts.
        let at = b.absorb(part.removals);
        moved.push(at);
        for (volume, steps) in part.of_volume {
            of_volume
                .entry(volume)
                .or_default()
                .extend(steps.into_iter().map(|s| s + at));
        }
        for (cluster, image) in part.claims {
            let bits = claimed
                .entry(cluster)
                .or_insert_with(|| vec![false; images.get(cluster).map_or(0, |c| c.images.len())]);
            bits[image as usize] = true;
        }
        rest.push((part.installs, part.chains));
    }
    teardown::images_of_gone_volumes(
        &mut b, observed, opts, &volumes, &of_volume, &claimed, &halted,
    );
    // SNAP on every DPU (after its removals), then every DPU's chains (after its SNAP).
    let mut chains = Vec::with_capacity(rest.len());
    for ((installs, c), &removals) in rest.into_iter().zip(&moved) {
        let installs = b.absorb_with(installs, |d| d + removals);
        chains.push((c, removals, installs));
    }
    let first_chain = b.next_id();
    for (c, removals, installs) in chains {
        b.absorb_with(c, |d| {
            if d >= INSTALLS {
                d - INSTALLS + installs
            } else {
                d + removals
            }
        });
    }
    one_dpu_at_a_time(&mut b.plan.steps[first_chain..], &of_volume);
    b.plan
}

/// One image is never open on two DPUs: a volume moving between DPUs gets its new bdev only
/// after every removal of it elsewhere succeeded (a removal that fails — the host holds the
/// device open — skips the new chain, which the next pass plans again). Steps `chains` are the
/// plan's chains; `of_volume` its removals by volume. A converged plan has neither.
fn one_dpu_at_a_time(chains: &mut [Step], of_volume: &teardown::ByVolume) {
    if of_volume.is_empty() {
        return;
    }
    for s in chains {
        let (Action::Send(Command::CreateBdev(_)), Some(v)) = (&s.action, &s.volume) else {
            continue;
        };
        if let Some(removals) = of_volume.get(&**v) {
            s.depends_on.extend(removals.iter().copied());
            s.depends_on.sort_unstable();
            s.depends_on.dedup();
        }
    }
}

/// DPUs the manifests name whose state is not known (not answering, or not observed): what
/// they expose cannot be told.
fn silent_dpus<'a>(desired: &'a Desired, observed: &'a Observed) -> Vec<&'a str> {
    // Both in name order: one walk, not a search per DPU.
    let mut seen = observed.dpus.iter().peekable();
    let mut out = vec![];
    for name in desired.dpus.keys() {
        while seen.next_if(|(n, _)| *n < name).is_some() {}
        let known = seen
            .peek()
            .is_some_and(|(n, k)| *n == name && matches!(k, Known::Known { .. }));
        if !known {
            out.push(name.as_str());
        }
    }
    out
}

/// Where a chunk's SNAP installs and chains number their steps, until merged: above any plan's
/// length, so that a dependency tells which fragment it is in (removals number from 0). The
/// controller runs on 64-bit machines only.
const INSTALLS: usize = 1 << 48;
const CHAINS: usize = 2 << 48;

/// One DPU to plan for: what is known of it, what the manifests want of it.
struct DpuWork<'a> {
    name: &'a str,
    /// Its report, when it reported.
    report: Option<&'a DpuReport>,
    /// Its manifest, when it has one.
    spec: Option<&'a Dpu>,
    /// The volumes wanted on it (positions in name order), with their DPU.
    wanted: &'a [usize],
}

/// Every DPU there is something to plan for, in name order: those that report (their
/// removals), those in the manifests (SNAP), those volumes are wanted on (chains).
fn dpus<'a>(
    desired: &'a Desired,
    observed: &'a Observed,
    by_dpu: &'a [(&'a str, std::ops::Range<usize>)],
    members: &'a [usize],
) -> Vec<DpuWork<'a>> {
    let mut reported = observed
        .dpus
        .iter()
        .map(|(n, k)| (n.as_str(), k.get()))
        .peekable();
    let mut specs = desired.dpus.iter().map(|(n, d)| (n.as_str(), d)).peekable();
    let mut wanted = by_dpu.iter().peekable();
    let mut out = Vec::with_capacity(desired.dpus.len().max(observed.dpus.len()));
    loop {
        // The least name among the three walks, each already in name order.
        let next = [
            reported.peek().map(|r| r.0),
            specs.peek().map(|s| s.0),
            wanted.peek().map(|w| w.0),
        ]
        .into_iter()
        .flatten()
        .min();
        let Some(name) = next else { break };
        out.push(DpuWork {
            name,
            report: reported.next_if(|r| r.0 == name).and_then(|r| r.1),
            spec: specs.next_if(|s| s.0 == name).map(|s| s.1),
            wanted: wanted
                .next_if(|w| w.0 == name)
                .map_or(&[][..], |(_, r)| &members[r.clone()]),
        });
    }
    out
}

/// What a chunk of DPUs planned: fragments of the plan, each numbered from its own base.
struct Part<'a> {
    /// Removals (ids from 0).
    removals: Builder,
    /// SNAP installs (ids from [`INSTALLS`]; they wait for removals).
    installs: Builder,
    /// Chains (ids from [`CHAINS`]; they wait for removals and installs).
    chains: Builder,
    /// Removal steps by volume (what its image's removal waits for).
    of_volume: teardown::ByVolume,
    /// Images found to be their wanted volume's own.
    claims: create::Claims<'a>,
}

/// Plans a chunk of DPUs, each one's phases in turn.
fn plan_dpus<'a>(
    cx: &create::Context<'a>,
    volumes: &'a [&'a Volume],
    dpus: &[DpuWork<'a>],
) -> Part<'a> {
    let mut part = Part {
        removals: Builder::at(0),
        installs: Builder::at(INSTALLS),
        chains: Builder::at(CHAINS),
        of_volume: teardown::ByVolume::default(),
        claims: Vec::new(),
    };
    let mut placed = place::DpuPlacement::default();
    let mut scratch = create::Scratch::default();
    let mut first: Vec<Option<usize>> = Vec::new();
    // Controller names by function: a handful, formatted once.
    let mut ctrl_names: HashMap<FunctionRef, String> = HashMap::default();
    for dpu in dpus {
        let inv = dpu.report.and_then(|r| r.inventory.as_ref());
        placed.place(dpu.name, volumes, dpu.wanted, inv);
        // Removals first: what is created on a DPU waits for what is removed there.
        let first_removal = part.removals.next_id();
        if let Some(inv) = inv {
            let owner = teardown::Owner {
                inv,
                images: cx.images,
                owner: &cx.opts.owner,
            };
            teardown::DpuTeardown {
                name: dpu.name,
                inv,
                owner,
                placed: &placed,
            }
            .plan(&mut part.removals, &mut part.of_volume);
        }
        // What every later step there waits for: the DPU's removals, then SNAP.
        first.clear();
        let snap = match (dpu.spec, dpu.report) {
            (Some(spec), Some(report)) => {
                first.extend((first_removal..part.removals.next_id()).map(Some));
                let step = install_snap(&mut part.installs, dpu.name, spec, report, &first);
                first.push(step);
                step
            }
            _ => None,
        };
        if placed.len() > 0 {
            create::DpuChain::new(dpu.name, dpu.report, snap, &first, &mut scratch).plan(
                &mut part.chains,
                cx,
                &placed,
                &mut ctrl_names,
                &mut part.claims,
            );
        }
    }
    part
}

/// Agents whose state is unknown (unreachable, or not observed at all): nothing of theirs is
/// touched, and the plan says so.
fn unknown(desired: &Desired, observed: &Observed) -> Vec<String> {
    let mut out = vec![];
    for (name, k) in &observed.clusters {
        if let Known::Unknown { reason } = k {
            out.push(format!("cluster/{name}: {reason}"));
        }
    }
    for (name, k) in &observed.dpus {
        if let Known::Unknown { reason } = k {
            out.push(format!("dpu/{name}: {reason}"));
        }
    }
    for name in desired.clusters.keys() {
        if !observed.clusters.contains_key(name) {
            out.push(format!("cluster/{name}: not observed"));
        }
    }
    // Both in name order: one walk, not a search per DPU.
    let mut seen = observed.dpus.keys().peekable();
    for name in desired.dpus.keys() {
        while seen.next_if(|n| *n < name).is_some() {}
        if seen.peek() != Some(&name) {
            out.push(format!("dpu/{name}: not observed"));
        }
    }
    out
}

/// SNAP on DPU `name`, installed when it is not the wanted version or not running, after
/// `first` (the DPU's removals); the install step, if any.
fn install_snap(
    b: &mut Builder,
    name: &str,
    dpu: &Dpu,
    report: &DpuReport,
    first: &[Option<usize>],
) -> Option<usize> {
    // `image:tag`, compared without formatting it for every DPU.
    let have = report.snap.image.as_deref();
    let same = have
        .and_then(|h| h.strip_prefix(dpu.snap.image.as_str()))
        .and_then(|t| t.strip_prefix(':'))
        == Some(dpu.snap.tag.as_str());
    let running = report.snap.state == SnapState::Running;
    if same && running {
        return None;
    }
    if let Some(h) = have {
        b.drift(
            format!("dpu/{name}"),
            "snap.version",
            format!("{}:{}", dpu.snap.image, dpu.snap.tag),
            h.to_string(),
        );
    }
    // Replacing a running SNAP restarts every controller on it.
    let risk = if running
        && report
            .inventory
            .as_ref()
            .is_some_and(|i| !i.controllers.is_empty())
    {
        Risk::HostVisible
    } else {
        Risk::Safe
    };
    Some(b.push(
        Target::Dpu(name.to_string()),
        Action::Send(Command::InstallSnap(Box::new(dpu.snap.clone()))),
        risk,
        first,
        None,
    ))
}

/// Images of every known cluster by (pool, image): one lookup per volume, not one scan.
fn index_images(observed: &Observed) -> teardown::ImageIndex<'_> {
    observed
        .clusters
        .iter()
        .filter_map(|(name, k)| {
            let r: &CephReport = k.get()?;
            Some((name.as_str(), teardown::ClusterImages::new(&r.images)))
        })
        .collect()
}

#[cfg(test)]
mod tests;
