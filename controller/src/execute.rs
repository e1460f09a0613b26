//! The executor: runs a plan's steps, one at a time per DPU, a few at a time per ceph-agent, in
//! parallel across agents, each as soon as its dependencies are done (a ready queue fed by
//! dependency counts; no waves, no rescans). Transient failures are retried with capped
//! exponential backoff; permanent ones are not ([`StepError`] decides which, in one place). A
//! failed step skips the steps that depend on it and nothing else, so one failing host never
//! blocks the others. Mutations carry the agents' leases (fencing), renewed for as long as the
//! execution runs and taken again if lost. Every command has a deadline of its own
//! ([`deadline_of`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use protocol::client::{AgentClient, ClientError};
use protocol::dpu::RbdCluster;
use protocol::ErrorCode;
use protocol::{Command, IssueSnapIdentity, Reply};
use serde::Serialize;
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::fleet::Fleet;
use crate::manifest::Desired;
use crate::plan::{Action, Observed, Plan, Step, Target};

/// Steps one ceph-agent is given at once (it runs mutations of different images concurrently).
pub const CLUSTER_PARALLEL: usize = 16;

/// Knobs of an execution.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// `unistor.managed-by` on images.
    pub owner: String,
    /// Whether `DeleteImage` steps may run.
    pub allow_delete: bool,
    /// Whether a detach may pull a device the host holds open (`--allow-in-use`).
    pub allow_in_use: bool,
    /// Lease duration taken on each agent.
    pub lease_ttl: Duration,
    /// How long to wait for a lease another controller holds (0: refused at once).
    pub lease_wait: Duration,
    /// Attempts per step for transient errors.
    pub attempts: u32,
    /// First retry delay (doubles, capped at 5 s).
    pub backoff: Duration,
    /// Deadline of installing SNAP (the platform's readiness wait is inside it).
    pub install_deadline: Duration,
    /// Deadline of one ceph-agent mutation (a few `rbd` commands, each with its own deadline
    /// on the agent).
    pub ceph_deadline: Duration,
    /// Deadline of one SNAP call through a dpu-agent.
    pub snap_deadline: Duration,
    /// Set when the caller is stopping: steps not started yet are skipped, steps running
    /// finish (the execution ends at a step boundary, leases released).
    pub stop: Option<tokio::sync::watch::Receiver<bool>>,
    /// The health gate, checked again before each step that writes to a cluster (the plan
    /// was gated on the health it saw; a cluster may fail during the pass).
    pub health_gate: crate::plan::HealthGate,
    /// Once the leases are taken, read every DPU again and run nothing when another DPU now
    /// exposes an image this plan would open (the plan was made before its leases: another
    /// controller may have moved the volume meanwhile). `apply` sets it.
    pub verify_exposures: bool,
    /// A controller replica's standing (`replica.rs`): which claim each agent's lease is taken
    /// under, and whether a step may still run. `None`: a single controller.
    pub authority: Option<Arc<dyn Authority>>,
}

/// What a controller replica may write (issue 24). The executor asks before every step and
/// every attempt, and before renewing its leases.
pub trait Authority: Send + Sync + std::fmt::Debug {
    /// The claim `target`'s lease is taken under (`None`: unclaimed); an error when this
    /// replica may not write there at all.
    fn claim(&self, target: &Target) -> Result<Option<protocol::ShardClaim>, String>;
    /// Why `step` may not run now, if it may not.
    fn forbids(&self, desired: &Desired, step: &Step) -> Option<String>;
    /// The shard and token `step`'s command carries (the agent refuses it below the shard's
    /// highest token: the ceph-agent serves every shard under one unclaimed lease).
    fn command_claim(&self, desired: &Desired, step: &Step) -> Option<protocol::ShardClaim>;
    /// Whether the leases may still be renewed.
    fn fresh(&self) -> bool;
}

impl Default for ExecOptions {
    fn default() -> Self {
        Self {
            owner: "unistor".into(),
            allow_delete: false,
            allow_in_use: false,
            lease_ttl: Duration::from_secs(120),
            lease_wait: Duration::ZERO,
            attempts: 4,
            backoff: Duration::from_millis(200),
            install_deadline: Duration::from_secs(15 * 60),
            ceph_deadline: Duration::from_secs(6 * 60),
            snap_deadline: Duration::from_secs(30),
            stop: None,
            health_gate: crate::plan::HealthGate::standard(),
            verify_exposures: false,
            authority: None,
        }
    }
}

/// How one step ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// Done.
    Done,
    /// Failed.
    Failed {
        /// Why.
        error: String,
        /// Whether a later pass may succeed.
        transient: bool,
    },
    /// Not run: a dependency failed or its agent is unusable.
    Skipped {
        /// Why.
        reason: String,
    },
}

/// How a failed step is to be treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Retrying later may succeed (timeouts, busy agents, lost sessions, failed CLI commands).
    Transient,
    /// Our lease lapsed or was superseded: another controller may have written since the plan
    /// was made, so the rest of this plan is not run on that agent (the next pass re-plans on
    /// fresh observations).
    Lease,
    /// Retrying the same thing cannot succeed (invalid, not owned, conflict, refused).
    Permanent,
}

/// Why a step failed, and whether it is worth trying again.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct StepError {
    /// What happened.
    pub message: String,
    /// Transient, lease, or permanent.
    pub class: ErrorClass,
    /// The agent whose lease to take again, when it is not the step's own.
    pub agent_target: Option<Target>,
}

impl StepError {
    /// The one place that decides what an agent's error means for a step.
    pub fn from_client(e: &ClientError) -> Self {
        let class = match e.wire() {
            Some(w) => match w.code {
                ErrorCode::NoLease | ErrorCode::StaleToken => ErrorClass::Lease,
                c if c.is_transient() => ErrorClass::Transient,
                _ => ErrorClass::Permanent,
            },
            // Timeouts, closed sessions, connection failures: the agent may come back.
            None => ErrorClass::Transient,
        };
        Self {
            message: protocol::error::chain(e),
            class,
            agent_target: None,
        }
    }

    /// A permanent failure.
    pub fn permanent(message: String) -> Self {
        Self {
            message,
            class: ErrorClass::Permanent,
            agent_target: None,
        }
    }

    /// A transient failure.
    pub fn transient(message: String) -> Self {
        Self {
            message,
            class: ErrorClass::Transient,
            agent_target: None,
        }
    }

    /// No session with the agent (it may come back).
    pub fn unreachable(why: impl std::fmt::Display) -> Self {
        Self::transient(why.to_string())
    }

    /// The agent answered with something else than the command's reply.
    pub fn unexpected(reply: &Reply) -> Self {
        Self::permanent(format!("unexpected reply {reply:?}"))
    }

    /// The error came from `target` (not the step's own agent).
    fn on(mut self, target: Target) -> Self {
        self.agent_target = Some(target);
        self
    }

    fn into_outcome(self) -> Outcome {
        Outcome::Failed {
            error: self.message,
            transient: self.class != ErrorClass::Permanent,
        }
    }
}

/// How long a command may take: installing SNAP waits for the platform's readiness; a
/// ceph-agent mutation runs a few CLI commands; a SNAP call is quick.
pub fn deadline_of(c: &Command, o: &ExecOptions) -> Duration {
    match c {
        Command::InstallSnap(_) | Command::UpgradeSnap(_) | Command::RemoveSnap(_) => {
            o.install_deadline
        }
        Command::CreateImage(_)
        | Command::GrowImage(_)
        | Command::FlattenImage(_)
        | Command::CreateSnapshot(_)
        | Command::RemoveSnapshot(_)
        | Command::TrashImage(_)
        | Command::RestoreImage(_)
        | Command::DeleteImage(_)
        | Command::IssueSnapIdentity(_)
        | Command::FenceClient(_)
        | Command::UnfenceClient(_)
        | Command::CephReport(_)
        | Command::CephChanges(_)
        | Command::ImageWatchers(_) => o.ceph_deadline,
        _ => o.snap_deadline,
    }
}

/// Results of one execution, one per step.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExecReport {
    /// Step id to outcome.
    pub outcomes: BTreeMap<usize, Outcome>,
    /// Agents whose lease was lost during the execution: another controller may have held it
    /// and written there, so whatever was planned before is stale (callers stop, observe
    /// everything again).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub lost_leases: Vec<Target>,
    /// Why nothing ran: the plan was stale once its leases were taken (see
    /// [`ExecOptions::verify_exposures`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stale: Option<String>,
}

impl ExecReport {
    /// Steps done.
    pub fn done(&self) -> usize {
        self.outcomes
            .values()
            .filter(|o| **o == Outcome::Done)
            .count()
    }
    /// Steps that failed or were skipped.
    pub fn problems(&self) -> usize {
        self.outcomes.len() - self.done()
    }
}

/// One SNAP identity's key, issued once (concurrent registrations wait for the same issue).
type KeyCell = Arc<tokio::sync::OnceCell<String>>;

/// The data a step needs besides its action.
struct Context {
    desired: Desired,
    observed: Observed,
    opts: ExecOptions,
    /// SNAP's cephx key per cluster and DPU, issued once per execution (each DPU's SNAP has an
    /// identity of its own: a fence cuts that DPU alone off the cluster).
    identities: std::sync::Mutex<BTreeMap<(String, String), KeyCell>>,
    /// Identity issues in flight, all clusters together (see [`ISSUING`]).
    issuing: tokio::sync::Semaphore,
    /// Agents whose lease this execution lost: nothing more of the plan runs there.
    lost: Arc<std::sync::Mutex<BTreeSet<Target>>>,
    health: HealthChecks,
}

/// Every agent `step` commands: its own, and the cluster a SNAP registration asks for SNAP's
/// cephx identity.
pub fn commanded(step: &Step) -> impl Iterator<Item = Target> {
    let also = match &step.action {
        Action::RegisterCluster { cluster, .. } => Some(Target::Cluster(cluster.clone())),
        _ => None,
    };
    std::iter::once(step.target.clone()).chain(also)
}

impl Context {
    /// The agent `step` would command whose lease this execution lost, if any.
    fn lost_lease(&self, step: &Step) -> Option<Target> {
        let lost = self.lost.lock().unwrap_or_else(|p| p.into_inner());
        commanded(step).find(|t| lost.contains(t))
    }
}

/// How long a cluster's health, once read, holds for the steps that write to it.
const HEALTH_FRESH: Duration = Duration::from_secs(2);

/// The health gate during a pass: each cluster's health read again at most every
/// [`HEALTH_FRESH`], however many steps write to it (one lookup at a time per execution).
struct HealthChecks {
    gate: crate::plan::HealthGate,
    seen: tokio::sync::Mutex<BTreeMap<String, (tokio::time::Instant, Option<String>)>>,
}

impl HealthChecks {
    fn new(gate: crate::plan::HealthGate) -> Self {
        Self {
            gate,
            seen: Default::default(),
        }
    }

    /// Why `cluster` is closed to writes now, if it is; `read` fetches its health. A health
    /// that cannot be read does not close it (the step itself then finds out what is wrong).
    async fn closed<F, Fut>(&self, cluster: &str, read: F) -> Option<String>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<protocol::CephHealth, Unread>>,
    {
        if self.gate == crate::plan::HealthGate::off() {
            return None;
        }
        let mut seen = self.seen.lock().await;
        if let Some((at, why)) = seen.get(cluster) {
            if at.elapsed() < HEALTH_FRESH {
                return why.clone();
            }
        }
        let why = match read().await {
            Ok(h) => self.gate.halts_health(&h).map(|why| {
                format!("cluster {cluster} is closed to writes by the health gate: {why}")
            }),
            Err(e) => {
                tracing::warn!(cluster, error = %protocol::error::chain(&e), "Cannot read the cluster's health between steps.");
                None
            }
        };
        seen.insert(
            cluster.to_string(),
            (tokio::time::Instant::now(), why.clone()),
        );
        why
    }
}

/// An image this plan opens on one DPU (a bdev it creates) that another DPU exposes now, read
/// after the plan's leases were taken, unless the plan removes it there first (a move): the
/// plan was made on an older view. Unreachable DPUs are not asked (the planner already holds
/// volumes while a DPU is silent).
async fn exposed_elsewhere(plan: &Plan, fleet: &Fleet) -> Option<String> {
    let creates: Vec<(&Target, &protocol::dpu::BdevSpec)> = plan
        .steps
        .iter()
        .filter_map(|s| match &s.action {
            Action::Send(Command::CreateBdev(b)) => Some((&s.target, b)),
            _ => None,
        })
        .collect();
    if creates.is_empty() {
        return None;
    }
    let removed = |t: &Target, bdev: &str| {
        plan.steps.iter().any(|s| {
            s.target == *t
                && matches!(&s.action, Action::Send(Command::DeleteBdev(n)) if n.name == bdev)
        })
    };
    let mut reads = JoinSet::new();
    for (t, c) in &fleet.agents {
        let (Target::Dpu(_), Ok(c)) = (t, c) else {
            continue;
        };
        let (t, c) = (t.clone(), c.clone());
        reads.spawn(async move {
            let asked = Command::DpuReport(protocol::Empty {});
            (t, c.request_within(asked, Duration::from_secs(20)).await)
        });
    }
    let mut found = None;
    while let Some(Ok((t, r))) = reads.join_next().await {
        let Ok(Reply::DpuReport(r)) = r else {
            continue;
        };
        let Some(inv) = &r.inventory else {
            continue;
        };
        for (target, b) in &creates {
            let open = inv.bdevs.iter().any(|x| {
                x.cluster.as_deref() == Some(b.cluster.as_str())
                    && x.pool.as_deref() == Some(b.pool.as_str())
                    && x.image.as_deref() == Some(b.image.as_str())
            });
            if **target != t && open && !removed(&t, &b.name) {
                found.get_or_insert_with(|| {
                    format!(
                        "{t} exposes {}/{} now; planned again on fresh reports",
                        b.pool, b.image
                    )
                });
            }
        }
    }
    found
}

/// The cluster a step writes to, if it writes to one: its image steps, and a bdev resize
/// (which grows the image through SNAP).
fn writes_to<'a>(desired: &'a Desired, step: &'a Step) -> Option<&'a str> {
    match (&step.target, &step.action) {
        (Target::Cluster(c), Action::GrowImage { .. }) => Some(c),
        (Target::Cluster(c), Action::Send(cmd)) if cmd.is_mutating() => Some(c),
        (Target::Dpu(_), Action::Send(Command::ResizeBdev(_))) => step
            .volume
            .as_deref()
            .and_then(|v| desired.volumes.get(v))
            .map(|v| v.cluster.as_str()),
        _ => None,
    }
}

/// Why something an execution asked an agent outside a step (a cluster's health, a one-off
/// write) has no answer.
#[derive(Debug, thiserror::Error)]
pub enum Unread {
    /// No session with the agent.
    #[error(transparent)]
    Unreachable(#[from] crate::fleet::FleetError),
    /// The request failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The agent answered something else.
    #[error("unexpected reply {0:?}")]
    Unexpected(Box<Reply>),
}

/// [`HealthChecks::closed`] for the cluster `step` writes to, read through its agent.
async fn gate_closed(ctx: &Context, fleet: &Fleet, step: &Step) -> Option<String> {
    let cluster = writes_to(&ctx.desired, step)?;
    let read = || async {
        let c = fleet.get(&Target::Cluster(cluster.to_string()))?;
        match c
            .request_within(
                Command::CephHealth(protocol::Empty {}),
                Duration::from_secs(20),
            )
            .await?
        {
            Reply::Health(h) => Ok(h),
            other => Err(Unread::Unexpected(Box::new(other))),
        }
    };
    ctx.health.closed(cluster, read).await
}

/// Runs one step: the command it carries, sent as it is (a registration, which first needs
/// SNAP's identity from the cluster, has its own path). Only what a flag decides at execution
/// is added: a detach's `force` (`--allow-in-use`), and a delete needs `--allow-delete`.
async fn run_action(ctx: &Context, fleet: &Fleet, step: &Step) -> Result<(), StepError> {
    let agent = fleet.get(&step.target).map_err(StepError::unreachable)?;
    let cmd = match step.action.command() {
        Some(cmd) => with_flags(ctx, cmd)?,
        None => {
            let (Action::RegisterCluster { name, cluster }, Target::Dpu(dpu)) =
                (&step.action, &step.target)
            else {
                return Err(StepError::permanent(format!(
                    "{} is not a DPU's registration: nothing to send",
                    step.action.op()
                )));
            };
            registration(ctx, fleet, name, cluster, dpu).await?
        }
    };
    let claim = ctx
        .opts
        .authority
        .as_ref()
        .and_then(|a| a.command_claim(&ctx.desired, step));
    match send(ctx, &agent, cmd, claim).await? {
        // A SNAP deployment answers how far it got.
        Reply::Deploy(d) if !d.ready => Err(StepError::permanent(format!(
            "SNAP not ready: {}",
            d.steps
                .iter()
                .map(|s| format!("{} {:?}: {}", s.step, s.outcome, s.detail))
                .collect::<Vec<_>>()
                .join("; ")
        ))),
        _ => Ok(()),
    }
}

/// Sends `cmd` within its deadline, with a replica's shard claim.
async fn send(
    ctx: &Context,
    c: &AgentClient,
    cmd: Command,
    claim: Option<protocol::ShardClaim>,
) -> Result<Reply, StepError> {
    let deadline = deadline_of(&cmd, &ctx.opts);
    c.request_claimed(cmd, claim, deadline)
        .await
        .map_err(|e| StepError::from_client(&e))
}

/// What the execution's flags decide in a planned command: the rails decided at plan time;
/// the agent checks a detach again when it runs (`force` only with `--allow-in-use`), and a
/// delete is refused here without `--allow-delete` whatever the plan says.
fn with_flags(ctx: &Context, mut cmd: Command) -> Result<Command, StepError> {
    match &mut cmd {
        Command::DetachNamespace(a) => a.force = ctx.opts.allow_in_use,
        Command::DeleteImage(d) if !ctx.opts.allow_delete => {
            return Err(StepError::permanent(format!(
                "deleting image {}/{} (volume {}, policy Delete) needs --allow-delete",
                d.pool, d.image, d.owner.volume
            )));
        }
        _ => {}
    }
    Ok(cmd)
}

/// Identity issues in flight at once. Each is a request to a cluster's agent made from a DPU's
/// step, beside that agent's own steps (up to [`slots`] of them): 50 DPUs registering at once
/// would otherwise put 66 requests in flight on the one connection, past the 32 an agent
/// answers (`busy`), and the registrations would fail their attempts and wait for a later pass.
const ISSUING: usize = 8;

/// SNAP's cephx key on `dpu` for `cluster`: issued by its ceph-agent once per execution (a
/// fenced DPU's identity is refused there).
async fn snap_key(
    ctx: &Context,
    fleet: &Fleet,
    cluster: &str,
    c: &crate::manifest::Cluster,
    dpu: &str,
    client_id: &protocol::names::CephClientId,
) -> Result<String, StepError> {
    let cell = ctx
        .identities
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry((cluster.to_string(), dpu.to_string()))
        .or_default()
        .clone();
    let key = cell
        .get_or_try_init(|| async {
            let _permit = ctx.issuing.acquire().await.expect("never closed");
            let ceph = fleet
                .get(&Target::Cluster(cluster.to_string()))
                .map_err(|e| StepError::unreachable(format!("cluster {cluster}: {e}")))?;
            let issue = Command::IssueSnapIdentity(IssueSnapIdentity {
                client_id: client_id.to_string(),
                pools: c.pools.iter().map(|p| p.to_string()).collect(),
            });
            // Issued for the DPU's shard: a stale replica's issue is refused like its writes.
            let claim = ctx
                .opts
                .authority
                .as_ref()
                .and_then(|a| a.claim(&Target::Dpu(dpu.to_string())).ok().flatten());
            match send(ctx, &ceph, issue, claim)
                .await
                .map_err(|e| e.on(Target::Cluster(cluster.to_string())))?
            {
                Reply::Identity(i) => Ok(i.key),
                other => Err(StepError::unexpected(&other)),
            }
        })
        .await?;
    Ok(key.clone())
}

/// The registration of `cluster` in SNAP on `dpu` as `name`: that DPU's SNAP identity and the
/// monitors.
async fn registration(
    ctx: &Context,
    fleet: &Fleet,
    name: &str,
    cluster: &str,
    dpu: &str,
) -> Result<Command, StepError> {
    let c = ctx.desired.clusters.get(cluster).ok_or_else(|| {
        StepError::permanent(format!("cluster {cluster} is not in the manifests"))
    })?;
    let client_id = c
        .snap_client_of(dpu)
        .map_err(|e| StepError::permanent(e.to_string()))?;
    let key = snap_key(ctx, fleet, cluster, c, dpu, &client_id).await?;
    let mon_hosts = if c.monitors.is_empty() {
        monitors_of(ctx, cluster)
    } else {
        c.monitors.clone()
    };
    if mon_hosts.is_empty() {
        return Err(StepError::transient(format!(
            "no monitor addresses known for cluster {cluster}"
        )));
    }
    Ok(Command::RegisterRbdCluster(RbdCluster {
        name: name.to_string(),
        user_id: client_id.to_string(),
        mon_hosts,
        key,
    }))
}

/// Monitor `host:port` addresses from a cluster's report (v1 first, as librados dials them).
fn monitors_of(ctx: &Context, cluster: &str) -> Vec<String> {
    let Some(r) = ctx.observed.clusters.get(cluster).and_then(|k| k.get()) else {
        return vec![];
    };
    let mut out = vec![];
    for m in &r.monitors {
        let addr = m
            .addrs
            .iter()
            .find(|a| a.starts_with("v1:"))
            .or_else(|| m.addrs.first());
        if let Some(a) = addr {
            let a = a.split_once(':').map(|(_, rest)| rest).unwrap_or(a);
            out.push(a.trim_end_matches("/0").to_string());
        }
    }
    out
}

async fn run_with_retries(ctx: &Context, fleet: &Fleet, step: &Step) -> Outcome {
    let mut delay = ctx.opts.backoff;
    let mut attempt = 0;
    loop {
        attempt += 1;
        if let Some(reason) = forbidden(ctx, step) {
            return Outcome::Skipped { reason };
        }
        if let Some(t) = ctx.lost_lease(step) {
            return Outcome::Failed {
                error: format!(
                    "not run: the lease on {t} was lost during this execution (another controller may have written since the plan was made); re-planned at the next pass"
                ),
                transient: true,
            };
        }
        let e = match run_action(ctx, fleet, step).await {
            Ok(()) => return Outcome::Done,
            Err(e) => e,
        };
        tracing::info!(step = step.id, attempt, class = ?e.class, error = %e.message, "Step failed.");
        match e.class {
            ErrorClass::Lease => {
                // Never taken again within this plan: a lease that lapsed may have been used
                // by another controller meanwhile, and this plan's view is older than its
                // writes. The next pass observes again.
                let t = e
                    .agent_target
                    .clone()
                    .unwrap_or_else(|| step.target.clone());
                ctx.lost.lock().unwrap_or_else(|p| p.into_inner()).insert(t);
                return Outcome::Failed {
                    error: format!("{}; re-planned at the next pass", e.message),
                    transient: true,
                };
            }
            ErrorClass::Permanent => return e.into_outcome(),
            _ if attempt >= ctx.opts.attempts.max(1) => return e.into_outcome(),
            _ => {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Why a replica may not run `step` now (self-fenced, or its shard gone to another), if so.
fn forbidden(ctx: &Context, step: &Step) -> Option<String> {
    ctx.opts
        .authority
        .as_ref()
        .and_then(|a| a.forbids(&ctx.desired, step))
}

/// Takes the agent's lease, waiting up to `wait` while another controller holds it (polled at
/// most every second, sooner when the holder's lease ends sooner).
async fn acquire_waiting(
    c: &protocol::client::AgentClient,
    ttl: Duration,
    wait: Duration,
    claim: Option<protocol::ShardClaim>,
) -> Result<protocol::LeaseInfo, ClientError> {
    let until = tokio::time::Instant::now() + wait;
    loop {
        let got = match &claim {
            Some(claim) => c.acquire_claimed_lease(ttl, claim.clone()).await,
            None => c.acquire_lease(ttl).await,
        };
        let e = match got {
            Ok(l) => return Ok(l),
            Err(e) => e,
        };
        let held = e.wire().filter(|w| w.code == ErrorCode::LeaseHeld);
        let now = tokio::time::Instant::now();
        let Some(w) = held.filter(|_| now < until) else {
            return Err(e);
        };
        let ends = w
            .lease
            .as_ref()
            .map(|l| Duration::from_millis(l.remaining_ms + 50))
            .unwrap_or(Duration::from_secs(1));
        tokio::time::sleep(ends.min(Duration::from_secs(1)).min(until - now)).await;
    }
}

/// Runs one command on `agent` under this controller's lease (another holder's waited for up
/// to `wait`), released after. For one-off writes outside a plan (`unistor fence`).
pub async fn with_lease(
    agent: &protocol::client::AgentClient,
    wait: Duration,
    cmd: Command,
) -> Result<Reply, Unread> {
    let opts = ExecOptions::default();
    acquire_waiting(agent, opts.lease_ttl, wait, None).await?;
    let deadline = deadline_of(&cmd, &opts);
    let result = agent
        .request_within(cmd, deadline)
        .await
        .map_err(Unread::from);
    // Best effort: the lease also ends with this process's session.
    let _ = agent.release_lease().await;
    result
}

/// Who a one-off write is recorded as made by: this controller process.
pub fn this_instance() -> String {
    let me = protocol::ControllerInstance::this_process();
    format!("{} pid {}", me.host, me.pid)
}

/// Keeps the leases on `targets` (with the tokens they were taken with) for as long as it
/// runs: renewed every third of their TTL, renew-only (`renew_lease`: the agent extends the
/// lease of that token or grants nothing). A renewal refused means the lease lapsed in between
/// (this process was paused, the link was cut...) and another controller may have held it: the
/// target is marked `lost` and the plan goes on nowhere it was made under a token that is no
/// longer ours. (Taking a new lease there, even to release it at once, would open a window in
/// which a step of the stale plan is accepted under the new token.)
async fn keep_leases(
    fleet: Arc<Fleet>,
    mut targets: BTreeMap<Target, u64>,
    opts: ExecOptions,
    lost: Arc<std::sync::Mutex<BTreeSet<Target>>>,
) {
    let ttl = opts.lease_ttl;
    let every = (ttl / 3).max(Duration::from_millis(50));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        if opts.authority.as_ref().is_some_and(|a| !a.fresh()) {
            // A self-fenced replica lets its leases lapse: no step runs meanwhile, and the
            // agents are free for the replica that takes its shards over.
            continue;
        }
        let mut set = JoinSet::new();
        for (t, token) in &targets {
            if let Ok(c) = fleet.get(t) {
                let (t, token) = (t.clone(), *token);
                set.spawn(async move {
                    let gone = match c.renew_lease(ttl, token).await {
                        Ok(_) => false,
                        Err(e) => {
                            let lapsed = e.wire().is_some_and(|w| {
                                matches!(
                                    w.code,
                                    ErrorCode::LeaseHeld | ErrorCode::NoLease | ErrorCode::StaleToken
                                )
                            });
                            tracing::warn!(agent = %t, token, lapsed, error = %protocol::error::chain(&e), "Renewing a lease failed.");
                            lapsed
                        }
                    };
                    (t, gone)
                });
            }
        }
        while let Some(Ok((t, gone))) = set.join_next().await {
            if gone {
                targets.remove(&t);
                lost.lock().unwrap_or_else(|p| p.into_inner()).insert(t);
            }
        }
    }
}

/// How many steps may run at once on a target.
fn slots(t: &Target) -> usize {
    match t {
        Target::Cluster(_) => CLUSTER_PARALLEL,
        // SNAP works through its socket one call after the other.
        Target::Dpu(_) => 1,
    }
}

/// Runs `steps` with `run`, each as soon as its dependencies are done and its target has a free
/// slot ([`slots`]), in plan order among the ready ones of a target. A step whose dependency did
/// not succeed is skipped, and so are its dependents; steps on `unusable` targets are skipped.
/// Scheduling is linear in steps and edges: a ready queue fed by dependency counts.
pub async fn schedule<F, Fut>(
    steps: &[Step],
    unusable: &BTreeMap<Target, String>,
    run: F,
    progress: &(dyn Fn(&Step, &Outcome) + Sync),
) -> ExecReport
where
    F: Fn(Step) -> Fut,
    Fut: std::future::Future<Output = Outcome> + Send + 'static,
{
    let index: HashMap<usize, usize> = steps.iter().enumerate().map(|(i, s)| (s.id, i)).collect();
    let mut waiting: Vec<usize> = vec![0; steps.len()];
    let mut book = Book {
        steps,
        dependents: vec![vec![]; steps.len()],
        done: vec![false; steps.len()],
        report: ExecReport::default(),
        progress,
    };
    let mut orphans = vec![];
    for (i, s) in steps.iter().enumerate() {
        for d in &s.depends_on {
            match index.get(d) {
                Some(&j) => {
                    waiting[i] += 1;
                    book.dependents[j].push(i);
                }
                None => orphans.push((i, *d)),
            }
        }
    }
    for (i, d) in orphans {
        book.skip(i, format!("step {d} it depends on is not in the plan"));
    }
    let mut ready: BTreeMap<&Target, BTreeSet<usize>> = BTreeMap::new();
    let mut running: BTreeMap<&Target, usize> = BTreeMap::new();
    let mut set = JoinSet::new();
    let mut newly: Vec<usize> = (0..steps.len())
        .filter(|&i| waiting[i] == 0 && !book.done[i])
        .collect();
    loop {
        for i in newly.drain(..) {
            if book.done[i] {
                continue;
            }
            if let Some(why) = unusable.get(&steps[i].target) {
                book.skip(i, format!("{}: {why}", steps[i].target));
                continue;
            }
            ready.entry(&steps[i].target).or_default().insert(i);
        }
        // Start what fits.
        for (t, queue) in ready.iter_mut() {
            let n = running.entry(t).or_default();
            while *n < slots(t) {
                let Some(i) = queue.pop_first() else { break };
                *n += 1;
                let fut = run(steps[i].clone());
                set.spawn(async move { (i, fut.await) });
            }
        }
        ready.retain(|_, q| !q.is_empty());
        let Some(joined) = set.join_next().await else {
            break;
        };
        let Ok((i, outcome)) = joined else {
            // A step's task panicked: its slot stays taken, its dependents never run.
            tracing::error!("A step's task failed.");
            continue;
        };
        if let Some(n) = running.get_mut(&steps[i].target) {
            *n -= 1;
        }
        let ok = outcome == Outcome::Done;
        book.end(i, outcome);
        // Step i is done: nothing reads its dependents again.
        for d in std::mem::take(&mut book.dependents[i]) {
            if ok {
                waiting[d] -= 1;
                if waiting[d] == 0 {
                    newly.push(d);
                }
            } else {
                book.skip(d, format!("step {} did not succeed", steps[i].id));
            }
        }
    }
    for i in 0..steps.len() {
        if !book.done[i] {
            let reason = "a step it depends on did not finish".to_string();
            book.end(i, Outcome::Skipped { reason });
        }
    }
    book.report
}

/// What [`schedule`] knows of its steps' ends.
struct Book<'a> {
    steps: &'a [Step],
    /// Step index to the indices of the steps that depend on it.
    dependents: Vec<Vec<usize>>,
    done: Vec<bool>,
    report: ExecReport,
    progress: &'a (dyn Fn(&Step, &Outcome) + Sync),
}

impl Book<'_> {
    /// Step `i` ended with `o`.
    fn end(&mut self, i: usize, o: Outcome) {
        self.done[i] = true;
        (self.progress)(&self.steps[i], &o);
        self.report.outcomes.insert(self.steps[i].id, o);
    }

    /// Ends step `i` and everything that depends on it, transitively, as skipped.
    fn skip(&mut self, i: usize, reason: String) {
        let mut work = vec![(i, reason)];
        while let Some((i, reason)) = work.pop() {
            if self.done[i] {
                continue;
            }
            self.end(i, Outcome::Skipped { reason });
            for &d in &self.dependents[i] {
                work.push((d, format!("step {} did not succeed", self.steps[i].id)));
            }
        }
    }
}

/// Runs `plan`. `progress` is told each step's outcome as it ends.
pub async fn execute(
    plan: &Plan,
    desired: &Desired,
    observed: &Observed,
    fleet: &Arc<Fleet>,
    opts: &ExecOptions,
    progress: &(dyn Fn(&Step, &Outcome) + Sync),
) -> ExecReport {
    let ctx = Arc::new(Context {
        desired: desired.clone(),
        observed: observed.clone(),
        opts: opts.clone(),
        identities: Default::default(),
        issuing: tokio::sync::Semaphore::new(ISSUING),
        lost: Default::default(),
        health: HealthChecks::new(opts.health_gate.clone()),
    });
    // Leases first: an agent whose lease cannot be taken runs nothing.
    let (tokens, unusable) = take_leases(plan, fleet, opts).await;
    let held: Vec<Target> = tokens.keys().cloned().collect();
    let stale = match opts.verify_exposures {
        true => exposed_elsewhere(plan, fleet).await,
        false => None,
    };
    let keeper = tokio::spawn(keep_leases(
        fleet.clone(),
        tokens,
        opts.clone(),
        ctx.lost.clone(),
    ));
    let run = |s: Step| {
        let ctx = ctx.clone();
        let fleet = fleet.clone();
        let stale = stale.clone();
        let stopping = opts.stop.as_ref().is_some_and(|s| *s.borrow());
        // A log filtered by a volume or an agent tells its story step by step.
        let span = tracing::info_span!(
            "step",
            id = s.id,
            target = %s.target,
            volume = s.volume.as_deref().unwrap_or("-"),
            op = s.action.op(),
        );
        async move {
            if let Some(why) = stale {
                return Outcome::Skipped {
                    reason: format!("the plan is stale: {why}"),
                };
            }
            if stopping {
                return Outcome::Skipped {
                    reason: "stopping: not started".into(),
                };
            }
            if let Some(reason) = forbidden(&ctx, &s) {
                return Outcome::Skipped { reason };
            }
            if let Some(reason) = gate_closed(&ctx, &fleet, &s).await {
                return Outcome::Skipped { reason };
            }
            run_with_retries(&ctx, &fleet, &s).await
        }
        .instrument(span)
    };
    let mut report = schedule(&plan.steps, &unusable, run, progress).await;
    report.stale = stale;
    keeper.abort();
    report.lost_leases = ctx
        .lost
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
        .cloned()
        .collect();
    release_leases(fleet, held).await;
    report
}

/// The lease of every agent `plan` commands, taken at once: the tokens held, and why each
/// other agent is unusable.
async fn take_leases(
    plan: &Plan,
    fleet: &Arc<Fleet>,
    opts: &ExecOptions,
) -> (BTreeMap<Target, u64>, BTreeMap<Target, String>) {
    let mut unusable: BTreeMap<Target, String> = BTreeMap::new();
    let targets: BTreeSet<Target> = plan.steps.iter().flat_map(commanded).collect();
    let mut set = JoinSet::new();
    for t in &targets {
        let claim = match opts.authority.as_ref().map(|a| a.claim(t)) {
            None => None,
            Some(Ok(claim)) => claim,
            Some(Err(why)) => {
                unusable.insert(t.clone(), why);
                continue;
            }
        };
        match fleet.get(t) {
            Ok(c) => {
                let (t, ttl, wait) = (t.clone(), opts.lease_ttl, opts.lease_wait);
                set.spawn(async move { (t, acquire_waiting(&c, ttl, wait, claim).await) });
            }
            Err(e) => {
                unusable.insert(t.clone(), e.to_string());
            }
        }
    }
    let mut tokens: BTreeMap<Target, u64> = BTreeMap::new();
    while let Some(Ok((t, got))) = set.join_next().await {
        match got {
            Ok(l) => {
                tokens.insert(t, l.token);
            }
            Err(e) => {
                unusable.insert(t, format!("no lease: {}", protocol::error::chain(&e)));
            }
        }
    }
    (tokens, unusable)
}

/// Gives the leases of `held` back, at once.
async fn release_leases(fleet: &Arc<Fleet>, held: Vec<Target>) {
    let mut set = JoinSet::new();
    for t in held {
        if let Ok(c) = fleet.get(&t) {
            set.spawn(async move {
                let _ = c.release_lease().await;
            });
        }
    }
    while set.join_next().await.is_some() {}
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::plan::{Risk, Step};

    fn step(id: usize, target: Target, deps: &[usize]) -> Step {
        Step {
            id,
            target,
            action: Action::Send(Command::ResumeController(protocol::dpu::NameRef {
                name: format!("c{id}"),
            })),
            risk: Risk::Safe,
            depends_on: deps.iter().copied().collect(),
            volume: None,
        }
    }

    /// A random DAG over a few targets: every step depends on some earlier ones.
    fn random_plan(n: usize, rng: &mut fastrand::Rng) -> Vec<Step> {
        let targets = [
            Target::Cluster("c".into()),
            Target::Dpu("d1".into()),
            Target::Dpu("d2".into()),
            Target::Dpu("d3".into()),
        ];
        (0..n)
            .map(|i| {
                let deps: Vec<usize> = (0..i).filter(|_| rng.u8(..) < 20).collect();
                step(i, targets[rng.usize(..targets.len())].clone(), &deps)
            })
            .collect()
    }

    #[derive(Default)]
    struct Log {
        /// (step, started, ended) in event order.
        events: Vec<(usize, bool)>,
    }

    #[tokio::test(start_paused = true)]
    async fn every_dependency_edge_is_obeyed_when_steps_finish_in_random_order() {
        for seed in 0..20 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let steps = random_plan(60, &mut rng);
            let fails: BTreeSet<usize> = (0..60).filter(|_| rng.u8(..) < 15).collect();
            let delays: Vec<u64> = (0..60).map(|_| rng.u64(1..50)).collect();
            let log = Arc::new(Mutex::new(Log::default()));
            let run = |s: Step| {
                let log = log.clone();
                let (delay, fail) = (delays[s.id], fails.contains(&s.id));
                async move {
                    log.lock().unwrap().events.push((s.id, true));
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    log.lock().unwrap().events.push((s.id, false));
                    if fail {
                        Outcome::Failed {
                            error: "injected".into(),
                            transient: false,
                        }
                    } else {
                        Outcome::Done
                    }
                }
            };
            let report = schedule(&steps, &BTreeMap::new(), run, &|_, _| {}).await;
            assert_eq!(report.outcomes.len(), steps.len(), "seed {seed}");
            let events = log.lock().unwrap().events.clone();
            let ended_at = |id: usize| events.iter().position(|e| *e == (id, false));
            let started_at = |id: usize| events.iter().position(|e| *e == (id, true));
            let mut running: BTreeMap<Target, usize> = BTreeMap::new();
            for (id, start) in &events {
                let n = running.entry(steps[*id].target.clone()).or_default();
                if *start {
                    *n += 1;
                    assert!(*n <= slots(&steps[*id].target), "seed {seed}: slots");
                } else {
                    *n -= 1;
                }
            }
            for s in &steps {
                let outcome = &report.outcomes[&s.id];
                let deps_ok = s
                    .depends_on
                    .iter()
                    .all(|d| report.outcomes[d] == Outcome::Done);
                match started_at(s.id) {
                    Some(start) => {
                        assert!(deps_ok, "seed {seed}: step {} ran after a failure", s.id);
                        for d in &s.depends_on {
                            assert!(
                                ended_at(*d).is_some_and(|e| e < start),
                                "seed {seed}: step {} started before its dependency {d} ended",
                                s.id
                            );
                        }
                    }
                    None => {
                        assert!(
                            matches!(outcome, Outcome::Skipped { .. }) && !deps_ok,
                            "seed {seed}: step {} never ran: {outcome:?}",
                            s.id
                        );
                    }
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_health_gate_is_read_again_between_steps_at_most_every_two_seconds() {
        let checks = HealthChecks::new(crate::plan::HealthGate::standard());
        let reads = std::sync::atomic::AtomicUsize::new(0);
        let health = |status: &str| protocol::CephHealth {
            status: status.into(),
            checks: [("OSD_FULL".to_string(), "1 full osd(s)".to_string())]
                .into_iter()
                .filter(|_| status == "HEALTH_ERR")
                .collect(),
        };
        let read = |status: &'static str| {
            reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let h = health(status);
            async move { Ok(h) }
        };
        assert_eq!(checks.closed("ceph", || read("HEALTH_OK")).await, None);
        // Within the window the health is not read again, whatever it became.
        assert_eq!(checks.closed("ceph", || read("HEALTH_ERR")).await, None);
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 1);
        // After it, a cluster that failed mid-pass closes the next write, with the reason.
        tokio::time::advance(HEALTH_FRESH).await;
        let why = checks.closed("ceph", || read("HEALTH_ERR")).await.unwrap();
        assert!(
            why.contains("cluster ceph is closed to writes by the health gate")
                && why.contains("OSD_FULL"),
            "{why}"
        );
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 2);
        // Another cluster is read on its own; one whose health cannot be read stays open.
        assert_eq!(
            checks
                .closed("other", || async {
                    Err(Unread::Unreachable(
                        crate::fleet::FleetError::NotInManifests(Target::Cluster("other".into())),
                    ))
                })
                .await,
            None
        );
        // Off, nothing is read.
        let off = HealthChecks::new(crate::plan::HealthGate::off());
        assert_eq!(off.closed("ceph", || read("HEALTH_ERR")).await, None);
        assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn the_steps_that_write_to_a_cluster_are_gated_and_the_others_are_not() {
        let d = crate::plan::sim::examples();
        let v = d.volumes.values().next().unwrap();
        let on = |target: Target, action: Action, volume: Option<&str>| Step {
            id: 0,
            target,
            action,
            risk: Risk::Safe,
            depends_on: Default::default(),
            volume: volume.map(Box::from),
        };
        let grow = on(
            Target::Cluster(v.cluster.clone()),
            Action::GrowImage {
                from_bytes: 1,
                grow: protocol::GrowImage {
                    pool: v.pool.to_string(),
                    image: v.image.to_string(),
                    size_bytes: 2,
                    owner: protocol::Ownership {
                        managed_by: "unistor".into(),
                        volume: v.name.to_string(),
                    },
                },
            },
            Some(v.name.as_str()),
        );
        assert_eq!(writes_to(&d, &grow), Some(v.cluster.as_str()));
        let resize = on(
            Target::Dpu(v.dpu.clone()),
            Action::Send(Command::ResizeBdev(protocol::dpu::BdevResize {
                name: "unistor-x".into(),
                new_size_mib: 2,
            })),
            Some(v.name.as_str()),
        );
        assert_eq!(writes_to(&d, &resize), Some(v.cluster.as_str()));
        let resume = on(
            Target::Dpu(v.dpu.clone()),
            Action::Send(Command::ResumeController(protocol::dpu::NameRef {
                name: "unistor-pf0".into(),
            })),
            None,
        );
        assert_eq!(writes_to(&d, &resume), None);
    }
}
