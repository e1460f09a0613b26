//! `unistor watch`: the GitOps daemon. It watches the manifest directory (debounced; a bad read
//! keeps the last good desired state), keeps sessions with every agent, and reconciles on a
//! manifest change, on an agent's event, on a reconnect, on request and every `--resync`.
//!
//! One reconciler task runs every pass, so no object is ever reconciled twice at once; triggers
//! that arrive meanwhile are coalesced into the next pass. Every pass recomputes from full state
//! (observe everything, plan, execute, observe again): level-triggered, never edge-driven.

pub mod http;
mod sessions;
pub mod state;
pub mod triggers;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use notify::Watcher;
use tokio::sync::mpsc;
use tracing::Instrument;

use crate::execute::Outcome;
use crate::manifest;
use crate::ops::{Common, OpsError, Rails};
use crate::plan::{self, Observed, Plan, Step, Target};
use crate::reconcile::{self, Driver, Inputs, Made, Next, Reread, Verdict};
use crate::replica::Replica;
use sessions::Sessions;
use state::{EventKind, Level, ReconcileResult, ReconcileSummary, Shared, StepResult};
use triggers::{Answered, Queue, Reason, Triggers};

/// `unistor watch`
#[derive(Debug, Clone, Args)]
pub struct WatchArgs {
    /// Manifests and agents.
    #[command(flatten)]
    pub common: Common,
    /// What removals are allowed.
    #[command(flatten)]
    pub rails: Rails,
    /// Address of the dashboard, the JSON API and the metrics.
    #[arg(long, default_value = "127.0.0.1:7480")]
    pub listen: SocketAddr,
    /// Another name the HTTP API answers to (`host` or `host:port`; repeatable), e.g. behind
    /// a proxy. Requests naming any other `Host` are refused (DNS rebinding); loopback names
    /// and the listen address are always allowed.
    #[arg(long = "allow-host")]
    pub allow_host: Vec<String>,
    /// How long an HTTP client has to send a request's headers; slower ones are dropped.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub http_header_timeout: Duration,
    /// Full reconcile (manifests re-read, every agent observed) at least this often.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    pub resync: Duration,
    /// Report drift, change nothing.
    #[arg(long)]
    pub no_heal: bool,
    /// Quiet time after a change in the manifest directory before it is read.
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
    pub debounce: Duration,
    /// Where the daemon keeps suspensions across restarts.
    #[arg(long, default_value = "unistor-state")]
    pub state_dir: PathBuf,
    /// Passes of observe-plan-execute per reconcile before waiting for the next trigger.
    #[arg(long, default_value_t = 5)]
    pub passes: usize,
    /// New agent sessions per second, all agents together: after a restart, a fleet's sessions
    /// come back at this rate instead of all at once (1,000 agents: 10 s at 100/s).
    #[arg(long, default_value_t = 100.0)]
    pub connect_rate: f64,
    /// Run as one of several replicas sharing the fleet, coordinating through RADOS objects in
    /// this pool (`unistor.<owner>.members` and `unistor.<owner>.shards`): each replica writes
    /// only its shards' DPUs and images; a silent replica's shards are taken over when its
    /// membership expires (`--replica-ttl`).
    #[command(flatten)]
    pub replicas: ReplicaArgs,
}

/// Options of a replica (`--replicas-in` turns them on).
#[derive(Debug, Clone, Args)]
pub struct ReplicaArgs {
    /// The RADOS pool the replicas coordinate in.
    #[arg(long = "replicas-in", value_name = "POOL")]
    pub pool: Option<String>,
    /// This replica's name, unique among the replicas (default: the host's name).
    #[arg(long = "replica-name")]
    pub name: Option<String>,
    /// Membership lease: a replica silent this long loses its shards (it stops writing after
    /// two thirds of it).
    #[arg(long = "replica-ttl", default_value = "15s", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    /// Ceph configuration file of the coordination cluster.
    #[arg(long = "rados-conf", default_value = "/etc/ceph/ceph.conf")]
    pub conf: PathBuf,
    /// Its cephx user, without `client.` (caps on the pool above are enough).
    #[arg(long = "rados-id", default_value = "unistor-ctl")]
    pub id: String,
    /// Its keyring.
    #[arg(long = "rados-keyring")]
    pub keyring: Option<PathBuf>,
}

impl ReplicaArgs {
    /// The replica's options, when `--replicas-in` is given; names checked against the
    /// allow-lists.
    pub fn options(&self, owner: &str) -> Result<Option<crate::replica::ReplicaOptions>, OpsError> {
        let Some(pool) = &self.pool else {
            return Ok(None);
        };
        let name = match &self.name {
            Some(n) => n.clone(),
            None => protocol::ControllerInstance::this_process().host,
        };
        protocol::names::PeerName::parse("--replica-name", &name)?;
        protocol::names::PoolName::parse("--replicas-in", pool)?;
        if self.ttl < Duration::from_secs(3) {
            return Err(OpsError::Invalid(format!(
                "--replica-ttl {}: at least 3s (a replica renews every third of it)",
                humantime::format_duration(self.ttl)
            )));
        }
        let keyring = self
            .keyring
            .clone()
            .unwrap_or_else(|| PathBuf::from(format!("/etc/ceph/ceph.client.{}.keyring", self.id)));
        Ok(Some(crate::replica::ReplicaOptions {
            connect: ceph_lib::ConnectSpec::with_files(&self.id, &self.conf, &keyring),
            pool: pool.clone(),
            owner: owner.to_string(),
            name,
            ttl: self.ttl,
        }))
    }
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(a: WatchArgs) -> Result<(), OpsError> {
    let replica = a.replicas.options(&a.common.owner)?.map(Replica::new);
    if let Some(r) = &replica {
        // Agents name the lease holder by its instance: "... (replica ctl-a)".
        protocol::ControllerInstance::label_this_process(&format!("replica {}", r.name()));
    }
    let state = Shared::new(&a.common.dir, &a.state_dir, !a.no_heal);
    let (tx, rx) = triggers::queue(triggers::CAPACITY);
    let sessions = Arc::new(Sessions::new(
        crate::ops::fleet_options(&a.common)?,
        a.connect_rate,
        state.clone(),
        tx.clone(),
    ));
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .map_err(|source| OpsError::File {
            path: PathBuf::from(a.listen.to_string()),
            source,
        })?;
    let local = listener.local_addr().map_err(|source| OpsError::File {
        path: PathBuf::from(a.listen.to_string()),
        source,
    })?;
    // The first line tells scripts (and people) where the dashboard is.
    println!("unistor watch: dashboard on http://{local}/ (API /api/v1/status, metrics /metrics)");
    state.event(
        EventKind::Daemon,
        Level::Info,
        format!(
            "started: manifests {}, {} mode, resync every {}",
            a.common.dir.display(),
            if a.no_heal { "report-only" } else { "heal" },
            humantime::format_duration(a.resync)
        ),
    );
    reload(&a.common.dir, &state, &sessions, &tx).await;
    let coordinator = replica.as_ref().map(|r| {
        state.set_replica(r.clone());
        if let Some((d, _)) = state.desired() {
            r.set_dpus(&d);
        }
        state.event(
            EventKind::Daemon,
            Level::Info,
            format!(
                "replica {} of {:?}: coordinating in RADOS pool {} (lease {})",
                r.options.name,
                r.options.owner,
                r.options.pool,
                humantime::format_duration(r.options.ttl)
            ),
        );
        let (tx, state) = (tx.clone(), state.clone());
        r.spawn(move |why| {
            state.event(EventKind::Daemon, Level::Info, format!("replica: {why}"));
            tx.send(Reason::Shards);
        })
    });

    let watcher = watch_dir(
        &a.common.dir,
        a.debounce,
        state.clone(),
        sessions.clone(),
        tx.clone(),
    )?;
    let limits = http::Limits {
        allowed: http::AllowedHosts::new(local, &a.allow_host),
        header_timeout: a.http_header_timeout,
    };
    let server = tokio::spawn(http::serve(listener, state.clone(), tx.clone(), limits));
    let reconciler = tokio::spawn(reconcile_loop(
        a.clone(),
        state.clone(),
        sessions.clone(),
        tx.clone(),
        rx,
    ));
    drop(tx);

    shutdown_signal().await;
    state.event(
        EventKind::Daemon,
        Level::Info,
        "stopping: a pass in progress ends at a step boundary (a second signal: now)",
    );
    state.stop();
    drop(watcher);
    let mut reconciler = reconciler;
    tokio::select! {
        _ = &mut reconciler => {}
        _ = shutdown_signal() => reconciler.abort(),
    }
    server.abort();
    if let (Some(r), Some(thread)) = (&replica, coordinator) {
        // Nothing runs any more: the shards go back, the others take them over now.
        r.stop();
        let _ = tokio::task::spawn_blocking(move || thread.join()).await;
    }
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// Reads the manifests; a valid new set replaces the one in force, an invalid one is reported
/// and changes nothing. The files are read on a blocking thread, never on the runtime's: the
/// API, the sessions and the dashboard go on answering while they are read.
async fn reload(dir: &Path, state: &Shared, sessions: &Sessions, tx: &Triggers) {
    let owned = dir.to_path_buf();
    let mut cache = state.take_parse_cache();
    let read = tokio::task::spawn_blocking(move || {
        let r = manifest::load_dir_with(&owned, &mut cache);
        (r, cache)
    });
    let loaded = match read.await {
        Ok((r, cache)) => {
            state.put_parse_cache(cache);
            r
        }
        Err(e) => Err(vec![manifest::LoadError {
            file: dir.to_path_buf(),
            line: 0,
            field: String::new(),
            message: format!("reading the manifests failed: {e}"),
        }]),
    };
    match loaded {
        Ok(d) => {
            let summary = format!(
                "{} cluster(s), {} DPU(s), {} volume(s)",
                d.clusters.len(),
                d.dpus.len(),
                d.volumes.len()
            );
            sessions.update(&d);
            if let Some(r) = state.replica() {
                r.set_dpus(&d);
            }
            if state.set_desired(d) {
                state.event(
                    EventKind::Manifests,
                    Level::Info,
                    format!("loaded: {summary}"),
                );
                let generation = state.desired().map_or(0, |(_, g)| g);
                tx.send(Reason::ManifestsChanged { generation });
            }
        }
        Err(errors) => {
            let list = errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("\n");
            state.event(
                EventKind::Manifests,
                Level::Error,
                format!(
                    "{} problem(s); the last good manifests stay in force:\n{list}",
                    errors.len()
                ),
            );
            state.manifest_error(list);
        }
    }
}

/// Watches the manifest directory; after `debounce` of quiet (at most 10 x `debounce` after the
/// first change, so a stream of writes cannot starve it) the directory is read again. Its parent
/// is watched too, so that a directory swapped in place (git-sync replaces a symlink to a new
/// worktree for every commit) is followed: the recursive watch moves to the new target.
fn watch_dir(
    dir: &Path,
    debounce: Duration,
    state: Arc<Shared>,
    sessions: Arc<Sessions>,
    tx: Triggers,
) -> Result<Arc<std::sync::Mutex<notify::RecommendedWatcher>>, OpsError> {
    let (ftx, mut frx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if let Ok(ev) = res {
            if !matches!(ev.kind, notify::EventKind::Access(_)) {
                let _ = ftx.send(());
            }
        }
    })
    .map_err(|e| OpsError::File {
        path: dir.to_path_buf(),
        source: std::io::Error::other(e),
    })?;
    watcher
        .watch(dir, notify::RecursiveMode::Recursive)
        .map_err(|e| OpsError::File {
            path: dir.to_path_buf(),
            source: std::io::Error::other(e),
        })?;
    let absolute = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    if let Some(parent) = absolute.parent() {
        // Best effort: without it, a swapped directory is still re-read at every resync.
        if let Err(e) = watcher.watch(parent, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %parent.display(), error = %e, "Cannot watch the manifests' parent directory.");
        }
    }
    let watcher = Arc::new(std::sync::Mutex::new(watcher));
    let dir = dir.to_path_buf();
    let w = watcher.clone();
    tokio::spawn(async move {
        let mut target = dir.canonicalize().ok();
        while settled(&mut frx, debounce).await.is_some() {
            let now = dir.canonicalize().ok();
            if now != target {
                // The directory was replaced: watch what the path names now.
                let mut w = w.lock().unwrap_or_else(|e| e.into_inner());
                let _ = w.unwatch(&dir);
                if let Err(e) = w.watch(&dir, notify::RecursiveMode::Recursive) {
                    tracing::warn!(dir = %dir.display(), error = %e, "Cannot watch the manifests again; they are re-read at every resync.");
                }
                target = now;
            }
            reload(&dir, &state, &sessions, &tx).await;
        }
    });
    Ok(watcher)
}

/// Waits for a change, then for `quiet` without another one, but at most `10 x quiet` after the
/// first: a burst (a `git checkout` of many files, an editor's write-and-rename) counts once, and
/// a stream of writes cannot hold the reload back for ever. None when the watcher is gone.
async fn settled(rx: &mut mpsc::UnboundedReceiver<()>, quiet: Duration) -> Option<()> {
    rx.recv().await?;
    let first = tokio::time::Instant::now();
    loop {
        let left = (quiet * 10).saturating_sub(first.elapsed());
        if left.is_zero() {
            return Some(());
        }
        match tokio::time::timeout(quiet.min(left), rx.recv()).await {
            Ok(Some(())) => continue,
            Ok(None) => return None,
            Err(_) => return Some(()),
        }
    }
}

/// Drops the steps of suspended volumes and DPUs, and every step that depends on one dropped;
/// except that a controller shared with a suspended volume is still resumed for the others (the
/// suspended one is hot-attached once it is resumed). Returns what is left and how many were
/// held back.
pub fn without_suspended(mut p: Plan, s: &state::Suspended) -> (Plan, usize) {
    let mut dropped: BTreeSet<usize> = BTreeSet::new();
    for step in &mut p.steps {
        let dpu = matches!(&step.target, Target::Dpu(d) if s.dpus.contains(d));
        let volume = step
            .volume
            .as_ref()
            .is_some_and(|v| s.volumes.contains(&**v));
        if !dpu
            && !volume
            && matches!(
                step.action,
                plan::Action::Send(protocol::Command::ResumeController(_))
            )
        {
            step.depends_on.retain(|d| !dropped.contains(d));
            continue;
        }
        if dpu || volume || step.depends_on.iter().any(|d| dropped.contains(d)) {
            dropped.insert(step.id);
        }
    }
    p.steps.retain(|st| !dropped.contains(&st.id));
    (p, dropped.len())
}

/// The reconciler: one reconcile at a time, each for the batch of reasons queued since the
/// last; unfinished work retried with backoff (2 s, doubling, capped at a minute or the resync).
async fn reconcile_loop(
    a: WatchArgs,
    state: Arc<Shared>,
    sessions: Arc<Sessions>,
    tx: Triggers,
    mut queue: Queue,
) {
    let mut resync = tokio::time::interval(a.resync);
    resync.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    resync.tick().await;
    let mut retry: Option<(tokio::time::Instant, u32)> = None;
    let mut answered = Answered::default();
    let mut last: Option<(ReconcileResult, Option<String>)> = None;
    let mut stopping = state.stopping();
    loop {
        if state.is_stopping() {
            return;
        }
        let retry_at = retry.map(|(at, _)| at);
        // A snapshot schedule wakes the reconciler when due (by the wall clock, which the
        // schedule's names use; at least 2 s apart, at most a resync away).
        let wall = protocol::clock::unix_ms() / 1000;
        let schedule_at = state.next_snapshot_due(wall).map(|due| {
            let wait = Duration::from_secs(due.saturating_sub(wall).max(2)).min(a.resync);
            tokio::time::Instant::now() + wait
        });
        let mut batch = tokio::select! {
            b = queue.next() => match b {
                Some(b) => b,
                None => return,
            },
            _ = stopping.changed() => return,
            _ = resync.tick() => {
                reload(&a.common.dir, &state, &sessions, &tx).await;
                BTreeSet::from([Reason::Resync])
            }
            _ = async { tokio::time::sleep_until(retry_at.expect("guarded")).await }, if retry_at.is_some() => {
                BTreeSet::from([Reason::Retry])
            }
            _ = async { tokio::time::sleep_until(schedule_at.expect("guarded")).await }, if schedule_at.is_some() => {
                BTreeSet::from([Reason::Schedule])
            }
        };
        queue.drain_into(&mut batch);
        // The echo of the last reconcile's own steps (reports it read again after them) asks
        // for nothing new.
        batch.retain(|r| !answered.covers(r));
        if batch.is_empty() {
            continue;
        }
        if batch.iter().any(Reason::rereads_all) {
            // Planned on reports read after the request, not on what is held.
            sessions.mark_all();
        }
        let (summary, next) = reconcile_once(&a, &state, &sessions, &batch, &mut answered).await;
        let now = (summary.result, summary.message.clone());
        if summary.steps_done + summary.steps_failed > 0 || last.as_ref() != Some(&now) {
            record_end(&state, &summary);
        }
        last = Some(now);
        retry = match next {
            Next::Retry => {
                let n = retry.map_or(0, |(_, n)| n + 1);
                let delay = (Duration::from_secs(2) * 2u32.saturating_pow(n.min(5)))
                    .min(Duration::from_secs(60))
                    .min(a.resync);
                Some((tokio::time::Instant::now() + delay, n))
            }
            Next::WaitForChange => None,
        };
    }
}

/// What the daemon does as a reconcile goes: suspended objects' steps dropped from each plan,
/// plans, observations and steps recorded for the status, what was planned on remembered.
struct Recorder<'a> {
    state: &'a Shared,
    desired: &'a manifest::Desired,
    sessions: &'a Sessions,
    answered: std::sync::Mutex<&'a mut Answered>,
}

impl Driver for Recorder<'_> {
    fn shape(&self, p: Plan) -> (Plan, usize) {
        let (p, held) = without_suspended(p, &self.state.suspended());
        match self.state.replica() {
            // Other replicas' steps are theirs, not held back: not counted.
            Some(r) => (r.scope(self.desired, p), held),
            None => (p, held),
        }
    }

    fn planned(&self, _made: Made, _observed: &Observed, p: &Plan) -> Result<(), OpsError> {
        self.state.planned(p);
        Ok(())
    }

    fn step(&self, s: &Step, o: &Outcome) {
        step_done(self.state, s, o);
    }

    fn observed(&self, o: &Observed) {
        let generations = self.sessions.informer().lock().generations().clone();
        self.answered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .record(o, generations);
        self.state.observed(o.clone());
    }
}

/// One reconcile of the daemon (see [`crate::reconcile`]), recorded; and what to do next.
async fn reconcile_once(
    a: &WatchArgs,
    state: &Shared,
    sessions: &Sessions,
    batch: &BTreeSet<Reason>,
    answered: &mut Answered,
) -> (ReconcileSummary, Next) {
    let started = Instant::now();
    let reason = batch
        .iter()
        .map(ToString::to_string)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect::<Vec<_>>()
        .join("; ");
    let mut summary = ReconcileSummary {
        seq: state.begin_reconcile(),
        at: state::now(),
        reason,
        ..ReconcileSummary::default()
    };
    let Some((desired, generation)) = state.desired() else {
        summary.result = ReconcileResult::Waiting;
        summary.message = Some("no valid manifests yet".into());
        state.reconciled(summary.clone());
        return (summary, Next::WaitForChange);
    };
    summary.generation = generation;
    state.reconciling(true);
    let fleet = Arc::new(sessions.snapshot());
    let (opts, mut exec) = crate::ops::run_options(&a.common, &a.rails);
    exec.stop = Some(state.stopping());
    if let Some(r) = state.replica() {
        // Agent leases shorter than the time before another replica can take a shard over;
        // another replica's pass on the ceph-agent is waited for.
        exec.lease_ttl = r.options.agent_lease();
        exec.lease_wait = r.options.ttl;
        exec.authority = Some(r.clone());
    }
    let inputs = Inputs {
        desired: &desired,
        fleet: &fleet,
        informer: sessions.informer(),
        opts: &opts,
        exec: &exec,
        rails: &a.rails,
        passes: a.passes,
        heal: !a.no_heal,
        reread: Reread::Commanded,
        report_timeout: a.common.report_timeout,
    };
    let recorder = Recorder {
        state,
        desired: &desired,
        sessions,
        answered: std::sync::Mutex::new(answered),
    };
    let kinds: BTreeSet<&str> = batch.iter().map(Reason::kind).collect();
    let span = tracing::info_span!(
        "reconcile",
        seq = summary.seq,
        generation,
        reason = ?kinds,
    );
    let next = match reconcile::reconcile(&inputs, &recorder)
        .instrument(span)
        .await
    {
        Ok(out) => {
            summary.steps_done = out.steps_done;
            summary.steps_failed = out.steps_failed;
            summary.result = result_of(&out.verdict);
            if !out.verdict.converged() {
                summary.message = Some(out.verdict.to_string());
            }
            match &out.verdict {
                Verdict::Refused(r) => {
                    state.event(
                        EventKind::Reconcile,
                        Level::Error,
                        protocol::error::chain(r),
                    );
                }
                Verdict::Drift { drift, .. } => report_drift(state, drift),
                _ => {}
            }
            out.verdict.next()
        }
        Err(e) => {
            summary.result = ReconcileResult::Pending;
            summary.message = Some(protocol::error::chain(&e));
            Next::Retry
        }
    };
    summary.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    state.reconciled(summary.clone());
    (summary, next)
}

/// How a verdict shows in the status and the metrics.
pub fn result_of(v: &Verdict) -> ReconcileResult {
    match v {
        Verdict::Converged => ReconcileResult::Converged,
        Verdict::HeldBack { .. } => ReconcileResult::HeldBack,
        Verdict::Waiting { .. } => ReconcileResult::Waiting,
        Verdict::Refused(_) => ReconcileResult::Refused,
        Verdict::Drift { .. } => ReconcileResult::Drift,
        Verdict::LeaseLost { .. } | Verdict::Stale { .. } | Verdict::Remaining { .. } => {
            ReconcileResult::Pending
        }
    }
}

/// Report-only mode: every drift item as an event.
fn report_drift(state: &Shared, drift: &[plan::Drift]) {
    for d in drift {
        state.event(
            EventKind::Drift,
            Level::Warning,
            format!(
                "{} {}: want {}, found {}",
                d.object, d.field, d.desired, d.observed
            ),
        );
    }
}

/// The reconcile's event: what it did, unless it found everything converged and did nothing.
fn record_end(state: &Shared, summary: &ReconcileSummary) {
    let level = if summary.result == ReconcileResult::Converged {
        Level::Info
    } else {
        Level::Warning
    };
    if summary.steps_done + summary.steps_failed == 0
        && summary.result == ReconcileResult::Converged
    {
        return;
    }
    state.event(
        EventKind::Reconcile,
        level,
        format!(
            "{} after {} ms ({}): {} step(s) done, {} failed or skipped{}",
            summary.result,
            summary.duration_ms,
            summary.reason,
            summary.steps_done,
            summary.steps_failed,
            summary
                .message
                .as_deref()
                .map(|m| format!("; {m}"))
                .unwrap_or_default()
        ),
    );
}

fn step_done(state: &Shared, s: &Step, o: &Outcome) {
    let line = crate::render::step_line(s);
    match o {
        Outcome::Done => {
            state.metrics.step(StepResult::Done);
            if let Some(v) = &s.volume {
                state.volume_error(v, None);
            }
            state.event(EventKind::Step, Level::Info, format!("done: {line}"));
        }
        Outcome::Failed { error, transient } => {
            state.metrics.step(StepResult::Failed);
            if let Some(v) = &s.volume {
                state.volume_error(v, Some(error.clone()));
            }
            state.event(
                EventKind::Step,
                Level::Error,
                format!(
                    "failed{}: {line}: {error}",
                    if *transient { " (will retry)" } else { "" }
                ),
            );
        }
        Outcome::Skipped { reason } => {
            state.metrics.step(StepResult::Skipped);
            state.event(
                EventKind::Step,
                Level::Warning,
                format!("skipped: {line}: {reason}"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::sim::World;

    #[tokio::test(start_paused = true)]
    async fn a_burst_of_changes_is_one_reload_and_a_stream_cannot_starve_it() {
        let quiet = Duration::from_millis(300);
        let (tx, mut rx) = mpsc::unbounded_channel();
        // A checkout: 50 files written 10 ms apart.
        let burst = tokio::spawn({
            let tx = tx.clone();
            async move {
                for _ in 0..50 {
                    tx.send(()).unwrap();
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        });
        let start = tokio::time::Instant::now();
        assert_eq!(settled(&mut rx, quiet).await, Some(()));
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(490 + 300) && took < Duration::from_millis(900),
            "{took:?}"
        );
        burst.await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_secs(60), settled(&mut rx, quiet))
                .await
                .is_err(),
            "the burst was one change"
        );

        // A writer that never stops: reloaded 10 x quiet after its first write all the same.
        let stream = tokio::spawn({
            let tx = tx.clone();
            async move {
                loop {
                    if tx.send(()).is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
        let start = tokio::time::Instant::now();
        assert_eq!(settled(&mut rx, quiet).await, Some(()));
        assert!(start.elapsed() <= quiet * 10 + Duration::from_millis(10));
        stream.abort();

        drop(tx);
        let _ = stream.await;
        while rx.try_recv().is_ok() {}
        assert_eq!(settled(&mut rx, quiet).await, None, "the watcher is gone");
    }

    #[test]
    fn suspended_volumes_and_dpus_keep_their_steps_and_their_dependents_back() {
        let d = manifest::load_dir(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples"),
        )
        .unwrap();
        let w = World::empty(&d);
        let full = plan::plan(&d, &w.observed(), &plan::Options::default());
        let none = state::Suspended::default();
        assert_eq!(without_suspended(full.clone(), &none), (full.clone(), 0));

        let vol = state::Suspended {
            volumes: ["db-data".to_string()].into(),
            ..Default::default()
        };
        let (p, held) = without_suspended(full.clone(), &vol);
        assert!(held > 0);
        assert!(p
            .steps
            .iter()
            .all(|s| s.volume.as_deref() != Some("db-data")));
        // db-wal shares db-data's controller: it is still attached and resumed.
        assert!(p
            .steps
            .iter()
            .any(|s| s.volume.as_deref() == Some("db-wal")));
        assert!(p
            .steps
            .iter()
            .any(|s| s.target == Target::Dpu("dpu-a".into())
                && matches!(
                    s.action,
                    plan::Action::Send(protocol::Command::ResumeController(_))
                )));
        // What is left still has every dependency.
        let ids: BTreeSet<usize> = p.steps.iter().map(|s| s.id).collect();
        assert!(p
            .steps
            .iter()
            .all(|s| s.depends_on.iter().all(|d| ids.contains(d))));

        let dpu = state::Suspended {
            dpus: ["dpu-a".to_string()].into(),
            ..Default::default()
        };
        let (p, _) = without_suspended(full, &dpu);
        assert!(p
            .steps
            .iter()
            .all(|s| s.target != Target::Dpu("dpu-a".into())));
        assert!(p
            .steps
            .iter()
            .any(|s| s.target == Target::Dpu("dpu-b".into())));
    }
}
