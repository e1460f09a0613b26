//! The executor: runs a plan's steps, one at a time per DPU, a few at a time per ceph-agent, in
//! parallel across agents, each as soon as its dependencies are done (no waves). Transient failures are retried with capped exponential backoff;
//! permanent ones are not. A failed step skips the steps that depend on it and nothing else, so
//! one failing host never blocks the others. Mutations carry the agents' leases (fencing).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use protocol::client::{AgentClient, ClientError};
use protocol::dpu::{
    Attachment, BdevSpec, ControllerSpec, NameRef, NamespaceRef, NamespaceSpec, NqnRef, RbdCluster,
    SubsystemSpec,
};
use protocol::{
    Command, CreateImage, DeleteImage, GrowImage, ImagePolicy, ImageRef, IssueSnapIdentity,
    Ownership, Reply, TrashImage,
};
use serde::Serialize;
use tokio::task::JoinSet;

use crate::fleet::Fleet;
use crate::manifest::Desired;
use crate::plan::{Action, Observed, Plan, Step, Target};

/// Steps one ceph-agent is given at once (it runs mutations of different images concurrently).
pub const CLUSTER_PARALLEL: usize = 8;

/// Knobs of an execution.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    /// `unistor.managed-by` on images.
    pub owner: String,
    /// Whether `DeleteImage` steps may run.
    pub allow_delete: bool,
    /// Lease duration taken on each agent.
    pub lease_ttl: Duration,
    /// Attempts per step for transient errors.
    pub attempts: u32,
    /// First retry delay (doubles, capped at 5 s).
    pub backoff: Duration,
}

impl Default for ExecOptions {
    fn default() -> Self {
        Self {
            owner: "unistor".into(),
            allow_delete: false,
            lease_ttl: Duration::from_secs(120),
            attempts: 4,
            backoff: Duration::from_millis(200),
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

/// Results of one execution, one per step.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ExecReport {
    /// Step id to outcome.
    pub outcomes: BTreeMap<usize, Outcome>,
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

/// The data a step needs besides its action.
struct Context {
    desired: Desired,
    observed: Observed,
    opts: ExecOptions,
    /// SNAP's cephx key per cluster, issued once per execution and shared by every DPU's
    /// registration (the lock also keeps those requests from piling up on the ceph-agent).
    identities: tokio::sync::Mutex<BTreeMap<String, String>>,
}

fn err_text(e: &ClientError) -> (String, bool) {
    let transient = match e.wire() {
        Some(w) => w.code.is_transient(),
        None => true,
    };
    (protocol::error::chain(e), transient)
}

/// Turns one action into agent commands (some actions need a command on another agent first).
async fn run_action(ctx: &Context, fleet: &Fleet, step: &Step) -> Result<(), (String, bool)> {
    let agent = fleet.get(&step.target).map_err(|e| (e, true))?;
    let send = |c: Arc<AgentClient>, cmd: Command| async move {
        c.request(cmd).await.map_err(|e| err_text(&e))
    };
    let owner = |volume: &str| Ownership {
        managed_by: ctx.opts.owner.clone(),
        volume: volume.into(),
    };
    let cmd = match &step.action {
        Action::InstallSnap { spec } => {
            return match send(agent, Command::InstallSnap((**spec).clone())).await? {
                Reply::Deploy(d) if d.ready => Ok(()),
                Reply::Deploy(d) => Err((
                    format!(
                        "SNAP not ready: {}",
                        d.steps
                            .iter()
                            .map(|s| format!("{} {:?}: {}", s.step, s.outcome, s.detail))
                            .collect::<Vec<_>>()
                            .join("; ")
                    ),
                    false,
                )),
                other => Err((format!("unexpected reply {other:?}"), false)),
            };
        }
        Action::CreateImage {
            pool,
            image,
            size_bytes,
            volume,
            policy,
            retain_secs,
        } => Command::CreateImage(CreateImage {
            pool: pool.clone(),
            image: image.clone(),
            size_bytes: *size_bytes,
            features: vec![],
            owner: owner(volume),
            policy: Some(ImagePolicy {
                deletion: policy.clone(),
                trash_retention_secs: *retain_secs,
            }),
        }),
        Action::GrowImage {
            pool,
            image,
            to_bytes,
            volume,
            ..
        } => Command::GrowImage(GrowImage {
            pool: pool.clone(),
            image: image.clone(),
            size_bytes: *to_bytes,
            owner: owner(volume),
        }),
        Action::RestoreImage { pool, image } => Command::RestoreImage(ImageRef {
            pool: pool.clone(),
            image: image.clone(),
        }),
        Action::TrashImage {
            pool,
            image,
            retain_secs,
            volume,
        } => Command::TrashImage(TrashImage {
            pool: pool.clone(),
            image: image.clone(),
            retain_secs: *retain_secs,
            owner: owner(volume),
        }),
        Action::DeleteImage {
            pool,
            image,
            volume,
        } => {
            if !ctx.opts.allow_delete {
                return Err((
                    format!(
                        "deleting image {pool}/{image} (volume {volume}, policy Delete) needs --allow-delete"
                    ),
                    false,
                ));
            }
            Command::DeleteImage(DeleteImage {
                pool: pool.clone(),
                image: image.clone(),
                owner: owner(volume),
            })
        }
        Action::RegisterCluster { name, cluster } => {
            let c = ctx
                .desired
                .clusters
                .get(cluster)
                .ok_or_else(|| (format!("cluster {cluster} is not in the manifests"), false))?;
            let ceph = fleet
                .get(&Target::Cluster(cluster.clone()))
                .map_err(|e| (format!("cluster {cluster}: {e}"), true))?;
            let key = {
                let mut keys = ctx.identities.lock().await;
                match keys.get(cluster) {
                    Some(k) => k.clone(),
                    None => {
                        let identity = match send(
                            ceph,
                            Command::IssueSnapIdentity(IssueSnapIdentity {
                                client_id: c.snap_client.to_string(),
                                pools: c.pools.iter().map(|p| p.to_string()).collect(),
                            }),
                        )
                        .await?
                        {
                            Reply::Identity(i) => i,
                            other => return Err((format!("unexpected reply {other:?}"), false)),
                        };
                        keys.insert(cluster.clone(), identity.key.clone());
                        identity.key
                    }
                }
            };
            let mon_hosts = if c.monitors.is_empty() {
                monitors_of(ctx, cluster)
            } else {
                c.monitors.clone()
            };
            if mon_hosts.is_empty() {
                return Err((
                    format!("no monitor addresses known for cluster {cluster}"),
                    true,
                ));
            }
            Command::RegisterRbdCluster(RbdCluster {
                name: name.clone(),
                user_id: c.snap_client.to_string(),
                mon_hosts,
                key,
            })
        }
        Action::CreateBdev {
            name,
            cluster,
            pool,
            image,
        } => Command::CreateBdev(BdevSpec {
            name: name.clone(),
            cluster: cluster.clone(),
            pool: pool.clone(),
            image: image.clone(),
            block_size: 4096,
        }),
        Action::DeleteBdev { name } => Command::DeleteBdev(NameRef { name: name.clone() }),
        Action::CreateSubsystem { nqn } => Command::CreateSubsystem(SubsystemSpec {
            nqn: nqn.clone(),
            serial: serial(nqn),
            model: "unistor volume".into(),
            max_namespaces: 1024,
        }),
        Action::DestroySubsystem { nqn } => Command::DestroySubsystem(NqnRef { nqn: nqn.clone() }),
        Action::CreateNamespace {
            nqn,
            nsid,
            bdev,
            uuid,
        } => Command::CreateNamespace(NamespaceSpec {
            nqn: nqn.clone(),
            nsid: *nsid,
            bdev: bdev.clone(),
            uuid: uuid.clone(),
        }),
        Action::DestroyNamespace { nqn, nsid } => Command::DestroyNamespace(NamespaceRef {
            nqn: nqn.clone(),
            nsid: *nsid,
        }),
        Action::CreateController {
            name,
            nqn,
            function,
            queues,
        } => Command::CreateController(ControllerSpec {
            name: name.clone(),
            nqn: nqn.clone(),
            function: *function,
            num_queues: *queues,
            mdts: 7,
        }),
        Action::DestroyController { name } => {
            Command::DestroyController(NameRef { name: name.clone() })
        }
        Action::Attach { controller, nsid } => Command::AttachNamespace(Attachment {
            controller: controller.clone(),
            nsid: *nsid,
        }),
        Action::Detach { controller, nsid } => Command::DetachNamespace(Attachment {
            controller: controller.clone(),
            nsid: *nsid,
        }),
        Action::Resume { controller } => Command::ResumeController(NameRef {
            name: controller.clone(),
        }),
    };
    send(agent, cmd).await.map(|_| ())
}

/// A 20-character NVMe serial derived from the NQN.
fn serial(nqn: &str) -> String {
    let h = crate::plan::fnv(nqn);
    format!("UNISTOR{:013X}", h & 0x000F_FFFF_FFFF_FFFF)
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
    let mut last = (String::new(), false);
    for attempt in 1..=ctx.opts.attempts.max(1) {
        match run_action(ctx, fleet, step).await {
            Ok(()) => return Outcome::Done,
            Err((e, transient)) => {
                tracing::info!(step = step.id, attempt, transient, error = %e, "Step failed.");
                last = (e, transient);
                if !transient {
                    break;
                }
                if attempt < ctx.opts.attempts {
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
    Outcome::Failed {
        error: last.0,
        transient: last.1,
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
    });
    let mut report = ExecReport::default();
    // Leases first: an agent whose lease cannot be taken runs nothing.
    let mut unusable: BTreeMap<Target, String> = BTreeMap::new();
    // Every agent a step commands: its own, and the cluster a SNAP registration asks for
    // SNAP's cephx identity.
    let targets: BTreeSet<Target> = plan
        .steps
        .iter()
        .flat_map(|s| {
            let also = match &s.action {
                Action::RegisterCluster { cluster, .. } => Some(Target::Cluster(cluster.clone())),
                _ => None,
            };
            std::iter::once(s.target.clone()).chain(also)
        })
        .collect();
    for t in &targets {
        match fleet.get(t) {
            Ok(c) => {
                if let Err(e) = c.acquire_lease(opts.lease_ttl).await {
                    unusable.insert(
                        t.clone(),
                        format!("no lease: {}", protocol::error::chain(&e)),
                    );
                }
            }
            Err(e) => {
                unusable.insert(t.clone(), e);
            }
        }
    }
    // No barrier between steps: whenever one ends, whatever became runnable starts. One step
    // per DPU at a time (SNAP works through its socket one call after the other), up to
    // CLUSTER_PARALLEL per ceph-agent (which serializes per image); agents in parallel; a DPU's
    // runnable steps start in plan order.
    let mut pending: Vec<&Step> = plan.steps.iter().collect();
    let mut running: BTreeMap<Target, usize> = BTreeMap::new();
    let mut set = JoinSet::new();
    loop {
        let mut still = vec![];
        for s in pending {
            let failed_dep = s
                .depends_on
                .iter()
                .find(|d| matches!(report.outcomes.get(d), Some(o) if *o != Outcome::Done));
            if let Some(d) = failed_dep {
                let o = Outcome::Skipped {
                    reason: format!("step {d} did not succeed"),
                };
                progress(s, &o);
                report.outcomes.insert(s.id, o);
                continue;
            }
            if let Some(why) = unusable.get(&s.target) {
                let o = Outcome::Skipped {
                    reason: format!("{}: {why}", s.target),
                };
                progress(s, &o);
                report.outcomes.insert(s.id, o);
                continue;
            }
            let ready = s.depends_on.iter().all(|d| report.outcomes.contains_key(d));
            let limit = match s.target {
                Target::Cluster(_) => CLUSTER_PARALLEL,
                Target::Dpu(_) => 1,
            };
            let n = running.entry(s.target.clone()).or_default();
            if ready && *n < limit {
                *n += 1;
                let ctx = ctx.clone();
                let s = s.clone();
                let fleet = fleet.clone();
                set.spawn(async move {
                    let o = run_with_retries(&ctx, &fleet, &s).await;
                    (s, o)
                });
            } else {
                still.push(s);
            }
        }
        pending = still;
        match set.join_next().await {
            Some(Ok((s, o))) => {
                if let Some(n) = running.get_mut(&s.target) {
                    *n -= 1;
                }
                progress(&s, &o);
                report.outcomes.insert(s.id, o);
            }
            // A step's task panicked: its agent's slot stays taken, its dependents never run.
            Some(Err(e)) => tracing::error!(error = %e, "A step's task failed."),
            None => break,
        }
    }
    for s in pending {
        let o = Outcome::Skipped {
            reason: "a step it depends on did not finish".into(),
        };
        progress(s, &o);
        report.outcomes.insert(s.id, o);
    }
    for t in &targets {
        if !unusable.contains_key(t) {
            if let Ok(c) = fleet.get(t) {
                let _ = c.release_lease().await;
            }
        }
    }
    report
}
