//! What the daemon knows and shows: the last good desired state, what the agents reported, the
//! last reconcile, recent events, suspensions, and the Prometheus metrics. One lock; readers (the
//! HTTP handlers) take snapshots, the reconciler and the watchers write.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};

use crate::manifest::Desired;
use crate::plan::{Blocked, Drift, Observed};
use crate::status::FleetStatus;

/// Events kept for the dashboard.
const EVENTS_KEPT: usize = 200;

/// Now, as RFC 3339 (seconds).
pub fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

spelled! {
    /// What an event is about.
    EventKind {
        /// The daemon itself (start, stop).
        Daemon = "daemon",
        /// The manifests (loaded, refused).
        Manifests = "manifests",
        /// An agent's session.
        Agent = "agent",
        /// A reconcile's end.
        Reconcile = "reconcile",
        /// A step's end.
        Step = "step",
        /// Drift found.
        Drift = "drift",
        /// A suspension or resumption.
        Suspend = "suspend",
    } default Daemon
}

spelled! {
    /// How a step ended, as `unistor_steps_total` labels it.
    StepResult {
        /// Done.
        Done = "done",
        /// Failed.
        Failed = "failed",
        /// Not run.
        Skipped = "skipped",
    } default Done
}

/// One thing that happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// When (RFC 3339).
    pub at: String,
    /// What it is about.
    pub kind: EventKind,
    /// How much it matters.
    pub level: Level,
    /// What.
    pub message: String,
}

/// The manifests as the daemon last read them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestState {
    /// The directory (canonical).
    pub dir: PathBuf,
    /// Whether the last read was valid (when not, the last good state stays in force).
    pub valid: bool,
    /// The problems of the last read, one per line.
    pub error: Option<String>,
    /// When the desired state in force was loaded.
    pub loaded_at: Option<String>,
    /// Rises with every new desired state.
    pub generation: u64,
}

/// How much an event matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Things going as they should.
    Info,
    /// Something to look at (a failed step, a lost session).
    Warning,
    /// Something that stopped work (a refused plan).
    Error,
}

spelled! {
    /// How a reconcile ended (the API's `result`, the metrics' label).
    ReconcileResult {
        /// No valid manifests yet, or agents not observed.
        Waiting = "waiting",
        /// Everything as the manifests say.
        Converged = "converged",
        /// Steps failed, were skipped or remain, or a lease was lost; retried with backoff.
        Pending = "pending",
        /// Nothing left that may run, but objects are held back (by the planner, with its
        /// reasons, or suspended).
        HeldBack = "held_back",
        /// Report-only mode found differences.
        Drift = "drift",
        /// The safety rails refused the plan.
        Refused = "refused",
    } default Waiting
}

/// How the last reconcile went.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileSummary {
    /// Its number: reconciles are numbered from 1 in the order they start.
    #[serde(default)]
    pub seq: u64,
    /// When it started.
    pub at: String,
    /// What triggered it.
    pub reason: String,
    /// How long it took.
    pub duration_ms: u64,
    /// How it ended.
    pub result: ReconcileResult,
    /// Steps done.
    pub steps_done: usize,
    /// Steps failed or skipped.
    pub steps_failed: usize,
    /// Details (rails' refusal, failures).
    pub message: Option<String>,
    /// The generation of the manifests it reconciled to.
    pub generation: u64,
}

/// One agent's session.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentState {
    /// `cluster/ceph` or `dpu/dpu-a`.
    pub target: String,
    /// Its address.
    pub address: String,
    /// Whether the session is up.
    pub connected: bool,
    /// Since when (RFC 3339).
    pub since: String,
    /// Why it is down.
    pub error: Option<String>,
}

/// Volumes and DPUs the daemon leaves alone (kept across restarts).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Suspended {
    /// Volume names.
    pub volumes: BTreeSet<String>,
    /// DPU names.
    pub dpus: BTreeSet<String>,
}

/// The JSON API's answer and the dashboard's data.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DaemonView {
    /// When this view was made.
    pub generated_at: String,
    /// When the daemon started.
    pub started_at: String,
    /// False in report-only mode (`--no-heal`).
    pub heal: bool,
    /// Whether a reconcile runs now.
    pub reconciling: bool,
    /// The manifests.
    pub manifests: ManifestState,
    /// The last reconcile.
    pub last_reconcile: Option<ReconcileSummary>,
    /// Agents' sessions.
    pub agents: Vec<AgentState>,
    /// Clusters, DPUs, volumes.
    pub fleet: FleetStatus,
    /// Steps the last plan still had (one line each).
    pub pending: Vec<String>,
    /// Drift found by the last plan.
    pub drift: Vec<Drift>,
    /// What the planner held back.
    pub blocked: Vec<Blocked>,
    /// Suspensions.
    pub suspended: Suspended,
    /// Recent events, newest last.
    pub events: Vec<EventRecord>,
    /// Steps the last plan had (`pending` lists at most a page of them).
    #[serde(default)]
    pub pending_total: usize,
    /// Agents the manifests name (`agents` lists those of the listed clusters and DPUs).
    #[serde(default)]
    pub agents_total: usize,
    /// Of them, with a session up.
    #[serde(default)]
    pub agents_connected: usize,
    /// The last hour, one sample per reconcile, oldest first.
    #[serde(default)]
    pub history: Vec<Sample>,
    /// The controller replicas, when this daemon is one of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<ReplicasView>,
}

/// The controller replicas as this one sees them (issue 24).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicasView {
    /// This replica's name.
    pub this: String,
    /// The live replicas (holders of the membership lease in RADOS).
    pub members: Vec<String>,
    /// Whether this replica may write now (its membership renewed within TTL x 2/3).
    pub fresh: bool,
    /// The last error talking to RADOS.
    pub error: Option<String>,
    /// Shards (DPUs and `@gone-images`) each replica owns.
    pub owned: BTreeMap<String, usize>,
    /// Shards no live replica owns now (being taken over, or no replica can).
    pub unowned: Vec<String>,
    /// Shards this replica took over since it started.
    pub taken: u64,
    /// Shards it gave up since it started.
    pub released: u64,
    /// librados operations its coordination issued since it started (renewals, map reads,
    /// takes and releases).
    #[serde(default)]
    pub rados_ops: u64,
}

impl ReplicasView {
    /// For people: the live replicas and what each owns, the shards nobody owns, and whether
    /// the replica answering may write.
    pub fn render(&self) -> String {
        let owned: Vec<String> = self
            .members
            .iter()
            .map(|m| {
                let this = if *m == self.this { " (answering)" } else { "" };
                format!(
                    "{m}{this} {} shard(s)",
                    self.owned.get(m).copied().unwrap_or(0)
                )
            })
            .collect();
        let mut out = format!(
            "Replicas: {} live: {}\n",
            self.members.len(),
            owned.join(", ")
        );
        if !self.unowned.is_empty() {
            out.push_str(&format!(
                "  No owner now (being taken over, or no replica can): {}\n",
                self.unowned.join(", ")
            ));
        }
        if !self.fresh {
            out.push_str(&format!(
                "  {} is self-fenced: it has not renewed its membership in RADOS in time and writes nothing{}\n",
                self.this,
                self.error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            ));
        }
        out.push('\n');
        out
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ResultLabel {
    result: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct AgentLabel {
    agent: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReplicaLabel {
    replica: String,
}

/// The daemon's metrics.
pub struct Metrics {
    registry: Registry,
    reconcile_seconds: Histogram,
    reconciles: Family<ResultLabel, Counter>,
    steps: Family<OutcomeLabel, Counter>,
    drift: Gauge,
    pending: Gauge,
    agent_up: Family<AgentLabel, Gauge>,
    volumes_desired: Gauge,
    volumes_converged: Gauge,
    manifests_valid: Gauge,
    liveness: Counter,
    replica_shards: Family<ReplicaLabel, Gauge>,
    unowned_shards: Gauge,
    replica_fresh: Gauge,
    rados_ops: Counter,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("unistor");
        let reconcile_seconds =
            Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0]);
        registry.register(
            "reconcile_duration_seconds",
            "Time of one reconcile (observe, plan, execute, until converged or stuck)",
            reconcile_seconds.clone(),
        );
        let reconciles = Family::default();
        registry.register("reconciles", "Reconciles by result", reconciles.clone());
        let steps = Family::default();
        registry.register("steps", "Plan steps run, by outcome", steps.clone());
        let drift = Gauge::default();
        registry.register(
            "drift_items",
            "Field-level differences the last plan found",
            drift.clone(),
        );
        let pending = Gauge::default();
        registry.register(
            "pending_steps",
            "Steps the last plan still had",
            pending.clone(),
        );
        let agent_up = Family::default();
        registry.register(
            "agent_connected",
            "1 when the session with the agent is up",
            agent_up.clone(),
        );
        let volumes_desired = Gauge::default();
        registry.register(
            "volumes_desired",
            "Volumes the manifests want",
            volumes_desired.clone(),
        );
        let volumes_converged = Gauge::default();
        registry.register(
            "volumes_converged",
            "Volumes whose whole chain is in place",
            volumes_converged.clone(),
        );
        let manifests_valid = Gauge::default();
        registry.register(
            "manifests_valid",
            "1 when the last read of the manifests was valid",
            manifests_valid.clone(),
        );
        let liveness = Counter::default();
        registry.register(
            "liveness_messages_received",
            "Liveness messages (pongs, agent heartbeats) the daemon received from its agents",
            liveness.clone(),
        );
        let replica_shards = Family::default();
        registry.register(
            "replica_shards",
            "Shards (DPUs and @gone-images) each live controller replica owns, as this replica sees the map (replicas only)",
            replica_shards.clone(),
        );
        let unowned_shards = Gauge::default();
        registry.register(
            "replica_unowned_shards",
            "Shards no live replica owns (replicas only)",
            unowned_shards.clone(),
        );
        let replica_fresh = Gauge::default();
        registry.register(
            "replica_may_write",
            "1 while this replica's membership in RADOS is fresh enough to write (replicas only)",
            replica_fresh.clone(),
        );
        let rados_ops = Counter::default();
        registry.register(
            "replica_rados_operations",
            "librados operations this replica's coordination issued (replicas only)",
            rados_ops.clone(),
        );
        // Every series exists from the start, at 0: a rate over a counter that appears only
        // with its first increment misses that increment, and an alert on it has no series.
        for outcome in StepResult::ALL {
            let _ = steps.get_or_create(&OutcomeLabel {
                outcome: outcome.as_str().into(),
            });
        }
        for result in ReconcileResult::ALL {
            let _ = reconciles.get_or_create(&ResultLabel {
                result: result.as_str().into(),
            });
        }
        Self {
            registry,
            reconcile_seconds,
            reconciles,
            steps,
            drift,
            pending,
            agent_up,
            volumes_desired,
            volumes_converged,
            manifests_valid,
            liveness,
            replica_shards,
            unowned_shards,
            replica_fresh,
            rados_ops,
        }
    }

    /// Sets the replica gauges from `view`.
    fn replicas(&self, view: &ReplicasView) {
        self.replica_shards.clear();
        for (replica, n) in &view.owned {
            self.replica_shards
                .get_or_create(&ReplicaLabel {
                    replica: replica.clone(),
                })
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        self.unowned_shards
            .set(i64::try_from(view.unowned.len()).unwrap_or(i64::MAX));
        self.replica_fresh.set(i64::from(view.fresh));
        self.rados_ops
            .inc_by(view.rados_ops.saturating_sub(self.rados_ops.get()));
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let seen = protocol::client::liveness_received();
        self.liveness
            .inc_by(seen.saturating_sub(self.liveness.get()));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String");
        out
    }

    /// Counts one step's outcome.
    pub fn step(&self, outcome: StepResult) {
        self.steps
            .get_or_create(&OutcomeLabel {
                outcome: outcome.as_str().into(),
            })
            .inc();
    }
}

/// Mutable state behind the lock.
#[derive(Default)]
struct Inner {
    desired: Option<Arc<Desired>>,
    manifests: ManifestState,
    observed: Observed,
    last_reconcile: Option<ReconcileSummary>,
    reconciling: bool,
    /// The number of the last reconcile started.
    started: u64,
    agents: BTreeMap<String, AgentState>,
    pending: Vec<String>,
    pending_total: usize,
    drift: Vec<Drift>,
    blocked: Vec<Blocked>,
    suspended: Suspended,
    events: VecDeque<EventRecord>,
    last_errors: BTreeMap<String, String>,
    /// The status of the whole fleet as of the last observation (walked once per pass, not
    /// once per request).
    fleet: Option<Arc<FleetStatus>>,
    history: VecDeque<Sample>,
}

/// How long the dashboard's charts look back.
const HISTORY: std::time::Duration = std::time::Duration::from_secs(3600);
/// Samples kept at most (one per reconcile: reconciles come at least 5 s apart here on average).
const HISTORY_KEPT: usize = 720;

/// One point of the dashboard's charts, taken when a reconcile ends.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    /// Seconds since the Unix epoch.
    pub at: u64,
    /// The reconcile's duration.
    pub reconcile_ms: u64,
    /// Steps its plan had left.
    pub pending: usize,
    /// Agents with a session up.
    pub agents_connected: usize,
    /// Agents the manifests name.
    pub agents: usize,
}

/// The daemon's shared state.
pub struct Shared {
    inner: RwLock<Inner>,
    started_at: String,
    heal: bool,
    suspend_file: PathBuf,
    /// Metrics.
    pub metrics: Metrics,
    /// Turns true when the daemon stops: the pass in progress ends at a step boundary.
    stop: tokio::sync::watch::Sender<bool>,
    /// The manifests' documents as last parsed (a reload parses only what changed).
    parse_cache: std::sync::Mutex<crate::manifest::ParseCache>,
    /// This daemon's replica standing, when it is one of several.
    replica: std::sync::OnceLock<Arc<crate::replica::Replica>>,
}

impl Shared {
    /// New state; suspensions are read back from `state_dir`.
    pub fn new(dir: &Path, state_dir: &Path, heal: bool) -> Arc<Self> {
        let suspend_file = state_dir.join("suspended.json");
        let suspended = std::fs::read(&suspend_file)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        let inner = Inner {
            manifests: ManifestState {
                dir: dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf()),
                ..ManifestState::default()
            },
            suspended,
            ..Inner::default()
        };
        Arc::new(Self {
            inner: RwLock::new(inner),
            started_at: now(),
            heal,
            suspend_file,
            metrics: Metrics::new(),
            stop: tokio::sync::watch::channel(false).0,
            parse_cache: Default::default(),
            replica: Default::default(),
        })
    }

    /// The OpenMetrics text, with the replica gauges as of now.
    pub fn encode_metrics(&self) -> String {
        if self.replica.get().is_some() {
            let g = self.read();
            let mut fleet = FleetStatus::default();
            if let Some(view) = self.replicas_view(&g, &mut fleet) {
                self.metrics.replicas(&view);
            }
        }
        self.metrics.encode()
    }

    /// This daemon is a replica: its status says who owns what.
    pub fn set_replica(&self, r: Arc<crate::replica::Replica>) {
        let _ = self.replica.set(r);
    }

    /// The replica standing, when this daemon is a replica.
    pub fn replica(&self) -> Option<&Arc<crate::replica::Replica>> {
        self.replica.get()
    }

    /// Who owns each listed DPU, and the replicas' view, when this daemon is a replica.
    fn replicas_view(&self, g: &Inner, fleet: &mut FleetStatus) -> Option<ReplicasView> {
        let r = self.replica.get()?;
        let s = r.standing();
        let live = |h: &Option<String>| h.as_ref().filter(|h| s.members.contains(h)).cloned();
        let owner = |shard: &str| s.holders.get(shard).and_then(live);
        for d in &mut fleet.dpus {
            d.replica = owner(&d.name);
        }
        let mut view = ReplicasView {
            this: r.options.name.clone(),
            members: s.members.clone(),
            fresh: s.fresh(std::time::Instant::now()),
            error: s.error.clone(),
            taken: s.taken,
            released: s.released,
            rados_ops: s.rados_ops,
            ..ReplicasView::default()
        };
        let shards = g
            .desired
            .iter()
            .flat_map(|d| d.dpus.keys().map(String::as_str))
            .chain([crate::coord::GONE_IMAGES]);
        for shard in shards {
            match owner(shard) {
                Some(o) => *view.owned.entry(o).or_default() += 1,
                None => view.unowned.push(shard.to_string()),
            }
        }
        Some(view)
    }

    /// Takes the parse cache for a reload (an empty one meanwhile; reloads are one at a time).
    pub fn take_parse_cache(&self) -> crate::manifest::ParseCache {
        std::mem::take(&mut *self.parse_cache.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Gives the parse cache back after a reload.
    pub fn put_parse_cache(&self, cache: crate::manifest::ParseCache) {
        *self.parse_cache.lock().unwrap_or_else(|e| e.into_inner()) = cache;
    }

    /// The daemon is stopping: no step starts from now on, no pass either.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    /// What an execution watches to end at a step boundary when the daemon stops.
    pub fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stop.subscribe()
    }

    /// Whether the daemon is stopping.
    pub fn is_stopping(&self) -> bool {
        *self.stop.borrow()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Records an event (and logs it).
    pub fn event(&self, kind: EventKind, level: Level, message: impl Into<String>) {
        let message = message.into();
        let k = kind.as_str();
        match level {
            Level::Error => tracing::error!(kind = k, "{message}"),
            Level::Warning => tracing::warn!(kind = k, "{message}"),
            Level::Info => tracing::info!(kind = k, "{message}"),
        }
        let mut g = self.write();
        if g.events.len() == EVENTS_KEPT {
            g.events.pop_front();
        }
        g.events.push_back(EventRecord {
            at: now(),
            kind,
            level,
            message,
        });
    }

    /// The desired state in force and its generation.
    pub fn desired(&self) -> Option<(Arc<Desired>, u64)> {
        let g = self.read();
        Some((g.desired.clone()?, g.manifests.generation))
    }

    /// A new valid desired state; returns false when it equals the one in force.
    pub fn set_desired(&self, d: Desired) -> bool {
        let mut g = self.write();
        g.manifests.valid = true;
        g.manifests.error = None;
        if g.desired.as_deref() == Some(&d) {
            return false;
        }
        self.metrics
            .volumes_desired
            .set(i64::try_from(d.volumes.len()).unwrap_or(i64::MAX));
        self.metrics.manifests_valid.set(1);
        g.desired = Some(Arc::new(d));
        g.fleet = None;
        g.manifests.loaded_at = Some(now());
        g.manifests.generation += 1;
        true
    }

    /// An invalid read of the manifests: the last good state stays.
    pub fn manifest_error(&self, error: String) {
        self.metrics.manifests_valid.set(0);
        let mut g = self.write();
        g.manifests.valid = false;
        g.manifests.error = Some(error);
    }

    /// An agent's session changed.
    pub fn agent(&self, target: &str, address: &str, error: Option<String>) {
        self.metrics
            .agent_up
            .get_or_create(&AgentLabel {
                agent: target.into(),
            })
            .set(i64::from(error.is_none()));
        let mut g = self.write();
        g.agents.insert(
            target.into(),
            AgentState {
                target: target.into(),
                address: address.into(),
                connected: error.is_none(),
                since: now(),
                error,
            },
        );
    }

    /// An agent is no longer in the manifests.
    pub fn forget_agent(&self, target: &str) {
        self.metrics.agent_up.remove(&AgentLabel {
            agent: target.into(),
        });
        self.write().agents.remove(target);
    }

    /// A reconcile starts.
    pub fn reconciling(&self, on: bool) {
        self.write().reconciling = on;
    }

    /// A reconcile starts: its number.
    pub fn begin_reconcile(&self) -> u64 {
        let mut g = self.write();
        g.started += 1;
        g.started
    }

    /// The number of the last reconcile started: one numbered above it starts after now.
    pub fn started(&self) -> u64 {
        self.read().started
    }

    /// What the last plan found.
    pub fn planned(&self, p: &crate::plan::Plan) {
        self.metrics
            .drift
            .set(i64::try_from(p.drift.len()).unwrap_or(i64::MAX));
        self.metrics
            .pending
            .set(i64::try_from(p.steps.len()).unwrap_or(i64::MAX));
        let mut g = self.write();
        g.pending_total = p.steps.len();
        // A page of them: a plan of the whole fleet is not formatted line by line each pass.
        g.pending = p
            .steps
            .iter()
            .take(crate::status::Selection::DEFAULT_LIMIT)
            .map(crate::render::step_line)
            .collect();
        g.drift = p.drift.clone();
        g.blocked = p.blocked.clone();
    }

    /// What the agents reported last.
    pub fn observed(&self, o: Observed) {
        // The chains are walked outside the lock: the dashboard keeps reading meanwhile.
        let fleet = self.read().desired.clone().map(|d| {
            let fs = FleetStatus::new(&d, &o);
            self.metrics
                .volumes_converged
                .set(i64::try_from(fs.summary.volumes_ok).unwrap_or(i64::MAX));
            Arc::new(fs)
        });
        let mut g = self.write();
        g.observed = o;
        g.fleet = fleet;
    }

    /// When the earliest snapshot schedule is next due, by wall clock seconds (`now` is the
    /// clock now), from the manifests and the images last observed; None without schedules.
    pub fn next_snapshot_due(&self, now: u64) -> Option<u64> {
        let g = self.read();
        let d = g.desired.as_ref()?;
        let scheduled: Vec<&crate::manifest::Volume> = d
            .volumes
            .values()
            .filter(|v| v.snapshots.as_ref().is_some_and(|s| s.schedule.is_some()))
            .collect();
        if scheduled.is_empty() {
            return None;
        }
        // The reported images by cluster, pool and name, indexed once (not searched per volume:
        // this runs before every reconcile).
        let mut images: std::collections::HashMap<(&str, &str, &str), &protocol::ImageStatus> =
            Default::default();
        for (cluster, k) in &g.observed.clusters {
            for i in k.get().map_or(&[][..], |r| &r.images[..]) {
                images.insert((cluster.as_str(), i.pool.as_str(), i.image.as_str()), i);
            }
        }
        scheduled
            .into_iter()
            .filter_map(|v| {
                // An image not seen yet: its create takes the first; look again after a pass.
                let img = images.get(&(v.cluster.as_str(), v.pool.as_str(), v.image.as_str()))?;
                crate::plan::snapshots::next_due(v, Some(img), now)
            })
            .min()
    }

    /// The observed state last recorded.
    pub fn last_observed(&self) -> Observed {
        self.read().observed.clone()
    }

    /// A step of `volume` failed (None clears it).
    pub fn volume_error(&self, volume: &str, error: Option<String>) {
        let mut g = self.write();
        match error {
            Some(e) => g.last_errors.insert(volume.into(), e),
            None => g.last_errors.remove(volume),
        };
    }

    /// A reconcile ended.
    pub fn reconciled(&self, s: ReconcileSummary) {
        self.metrics
            .reconcile_seconds
            .observe(s.duration_ms as f64 / 1e3);
        self.metrics
            .reconciles
            .get_or_create(&ResultLabel {
                result: s.result.as_str().into(),
            })
            .inc();
        let mut g = self.write();
        let at = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let sample = Sample {
            at,
            reconcile_ms: s.duration_ms,
            pending: g.pending_total,
            agents_connected: g.agents.values().filter(|a| a.connected).count(),
            agents: g.agents.len(),
        };
        while g
            .history
            .front()
            .is_some_and(|f| f.at + HISTORY.as_secs() < at || g.history.len() >= HISTORY_KEPT)
        {
            g.history.pop_front();
        }
        g.history.push_back(sample);
        g.reconciling = false;
        g.last_reconcile = Some(s);
    }

    /// Current suspensions.
    pub fn suspended(&self) -> Suspended {
        self.read().suspended.clone()
    }

    /// Changes a suspension and persists it; returns whether anything changed.
    pub fn set_suspended(&self, kind: &str, name: &str, on: bool) -> Result<bool, std::io::Error> {
        let mut g = self.write();
        let set = if kind == "dpu" {
            &mut g.suspended.dpus
        } else {
            &mut g.suspended.volumes
        };
        let changed = if on {
            set.insert(name.into())
        } else {
            set.remove(name)
        };
        if changed {
            let bytes = serde_json::to_vec_pretty(&g.suspended).expect("serializable");
            if let Some(parent) = self.suspend_file.parent() {
                std::fs::create_dir_all(parent)?;
            }
            agent_kit::fsutil::write_atomic(&self.suspend_file, &bytes)?;
        }
        Ok(changed)
    }

    /// The JSON API's view of the whole fleet (its first page).
    pub fn view(&self) -> DaemonView {
        self.view_of(&crate::status::Selection::default())
    }

    /// The JSON API's view: the counts of the whole fleet, the volumes and DPUs `sel` chooses.
    pub fn view_of(&self, sel: &crate::status::Selection) -> DaemonView {
        let g = self.read();
        let mut fleet = match (&g.fleet, &g.desired) {
            (Some(f), _) => f.selected(sel),
            (None, Some(d)) => FleetStatus::new(d, &g.observed).selected(sel),
            (None, None) => FleetStatus::default(),
        };
        for v in &mut fleet.volumes {
            v.last_error = g.last_errors.get(&v.volume).cloned();
            v.suspended =
                g.suspended.volumes.contains(&v.volume) || g.suspended.dpus.contains(&v.dpu);
        }
        let replicas = self.replicas_view(&g, &mut fleet);
        // The sessions of what is listed.
        let listed: BTreeSet<String> = fleet
            .clusters
            .iter()
            .map(|c| format!("cluster/{}", c.name))
            .chain(fleet.dpus.iter().map(|d| format!("dpu/{}", d.name)))
            .collect();
        DaemonView {
            generated_at: now(),
            started_at: self.started_at.clone(),
            heal: self.heal,
            reconciling: g.reconciling,
            manifests: g.manifests.clone(),
            last_reconcile: g.last_reconcile.clone(),
            agents: listed
                .iter()
                .filter_map(|t| g.agents.get(t).cloned())
                .collect(),
            fleet,
            pending: g
                .pending
                .iter()
                .take(sel.limit.unwrap_or(crate::status::Selection::DEFAULT_LIMIT))
                .cloned()
                .collect(),
            drift: g.drift.clone(),
            blocked: g.blocked.clone(),
            suspended: g.suspended.clone(),
            events: g.events.iter().cloned().collect(),
            pending_total: g.pending_total,
            agents_total: g.agents.len(),
            agents_connected: g.agents.values().filter(|a| a.connected).count(),
            history: g.history.iter().cloned().collect(),
            replicas,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replicas_view_says_who_owns_what_and_what_nobody_owns() {
        let mut r = ReplicasView {
            this: "ctl-a".into(),
            members: vec!["ctl-a".into(), "ctl-b".into()],
            fresh: true,
            owned: [("ctl-a".to_string(), 2), ("ctl-b".to_string(), 1)].into(),
            ..ReplicasView::default()
        };
        let text = r.render();
        assert!(
            text.starts_with("Replicas: 2 live: ctl-a (answering) 2 shard(s), ctl-b 1 shard(s)\n"),
            "{text}"
        );
        assert!(
            !text.contains("No owner") && !text.contains("self-fenced"),
            "{text}"
        );
        r.unowned = vec!["dpu-3".into()];
        r.fresh = false;
        r.error = Some("renewal timed out".into());
        let text = r.render();
        assert!(
            text.contains("No owner now (being taken over, or no replica can): dpu-3"),
            "{text}"
        );
        assert!(
            text.contains("ctl-a is self-fenced") && text.contains("(renewal timed out)"),
            "{text}"
        );
    }

    #[test]
    fn every_counter_is_exported_from_zero() {
        let text = Metrics::new().encode();
        for outcome in StepResult::ALL {
            let line = format!("unistor_steps_total{{outcome=\"{outcome}\"}} 0");
            assert!(text.contains(&line), "{line} in:\n{text}");
        }
        for r in ReconcileResult::ALL {
            let line = format!("unistor_reconciles_total{{result=\"{r}\"}} 0");
            assert!(text.contains(&line), "{line} in:\n{text}");
        }
        let m = Metrics::new();
        m.step(StepResult::Done);
        assert!(m
            .encode()
            .contains("unistor_steps_total{outcome=\"done\"} 1"));
    }

    /// Every metric the shipped alert rules and Grafana dashboard (deploy/) name is one the
    /// daemon serves: a renamed metric fails here, not silently on an operator's screen.
    #[test]
    fn the_shipped_rules_and_dashboard_name_only_metrics_the_daemon_serves() {
        let m = Metrics::new();
        // Families print only once they have a sample.
        m.agent_up
            .get_or_create(&AgentLabel {
                agent: "dpu/a".into(),
            })
            .set(1);
        m.replica_shards
            .get_or_create(&ReplicaLabel {
                replica: "ctl-1".into(),
            })
            .set(1);
        m.reconciles
            .get_or_create(&ResultLabel {
                result: "converged".into(),
            })
            .inc();
        m.steps
            .get_or_create(&OutcomeLabel {
                outcome: "done".into(),
            })
            .inc();
        let served: std::collections::BTreeSet<String> = m
            .encode()
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(String::from)
            .collect();
        assert!(served.contains("unistor_volumes_converged"), "{served:?}");
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let mut named = 0;
        for file in ["prometheus/unistor.rules.yml", "grafana/unistor.json"] {
            let text = std::fs::read_to_string(dir.join(file)).unwrap();
            for (at, _) in text.match_indices("unistor_") {
                let name: String = text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                    .collect();
                // A family's samples: counters end in _total, histograms in _bucket/_sum/_count.
                let base = ["_total", "_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(&name);
                assert!(
                    served.contains(base) || served.contains(&name),
                    "{file} names {name}, which the daemon does not serve ({served:?})"
                );
                named += 1;
            }
        }
        assert!(named >= 20, "the files name the metrics: {named}");
    }
}
