//! The agent: commands from the controller, the supervision loop and the report.
//!
//! Every SNAP mutation, and every supervision pass, holds the ledger lock: a command and a replay
//! never interleave, and the ledger always describes what SNAP was last told.

use std::path::PathBuf;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use protocol::dpu::{
    Attachment, BdevSpec, BlueFieldFacts, ControllerSpec, DpuReport, NamespaceSpec, RbdCluster,
    ReplayReport, ReportChange, ReportOrder, SnapInventory, SnapSpec, SnapState, SnapStatus,
    SubsystemSpec,
};
use protocol::lease::Fence;
use protocol::names::{
    check_cephx_key, check_env, check_host_port, check_image_ref, check_image_tag, check_nqn,
    check_object_name, check_uuid, CephClientId, ImageName, NameError, PoolName,
};
use protocol::server::Handler;
use protocol::{AgentKind, Command, ErrorCode, Event, Reply, WireError};
use tokio::sync::{broadcast, Mutex};
use tracing::{info, warn};

use crate::ledger::{self, Intent, LedgerStore};
use crate::platform::{DeployError, Platform};
use crate::snap::{Done, OpError, Snap};

/// Command families this agent serves.
pub const CAPABILITIES: &[&str] = &["lease", "dpu.report", "dpu.snap", "dpu.nvme"];

/// Runtime settings.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// `/proc`.
    pub proc_root: PathBuf,
    /// `/sys`.
    pub sys_root: PathBuf,
    /// Replay the ledger when SNAP lost objects.
    pub replay: bool,
    /// A full report is pushed at least this often.
    pub full_report_every: Duration,
}

#[derive(Debug, Default)]
struct Observed {
    reachable: bool,
    restarts: u64,
    missing: Vec<String>,
    /// SNAP held none of the ledger's objects at the last look.
    emptied: bool,
    last_replay: Option<ReplayReport>,
    bluefield: Option<(tokio::time::Instant, Option<BlueFieldFacts>)>,
}

/// How long after the last command that changed SNAP its report is pushed.
pub const PUSH_AFTER_COMMANDS: Duration = Duration::from_millis(250);

/// The DPU agent.
pub struct DpuAgent {
    snap: Snap,
    platform: Arc<dyn Platform>,
    ledger: Mutex<LedgerStore>,
    events: broadcast::Sender<Event>,
    settings: AgentSettings,
    observed: StdMutex<Observed>,
    /// Commands that changed SNAP. Part of what makes a report new: after a controller's heal,
    /// a drift that takes the same objects away again looks like the last push, and must be
    /// pushed all the same.
    applied: std::sync::atomic::AtomicU64,
    /// Told after each command that changed SNAP: the report is pushed once a burst of them is
    /// over, not at the next supervision tick (controllers that did not send the commands, such
    /// as the other controller replicas, see the change within [`PUSH_AFTER_COMMANDS`]).
    commanded: tokio::sync::Notify,
    /// This process's report numbering: reports are built one at a time, each numbered as it
    /// starts, so a higher number never holds an older view than a lower one.
    reports: Mutex<ReportOrder>,
}

fn name_err(e: NameError) -> WireError {
    e.into()
}

fn op_err(e: OpError) -> WireError {
    let msg = protocol::error::chain(&e);
    let code = match &e {
        OpError::Snap(crate::snap::SnapError::Timeout { .. }) => ErrorCode::Timeout,
        OpError::Snap(crate::snap::SnapError::TooLarge { .. }) => ErrorCode::InvalidArgument,
        OpError::Snap(_) => ErrorCode::CommandFailed,
        OpError::Conflict { .. } => ErrorCode::Conflict,
        OpError::Missing { .. } => ErrorCode::NotFound,
        OpError::Busy { .. } => ErrorCode::InUse,
    };
    WireError::new(code, msg)
}

fn deploy_err(e: DeployError) -> WireError {
    let (code, report) = match &e {
        DeployError::Step { report, .. } => (ErrorCode::CommandFailed, report),
        DeployError::NotReady { report, .. } => (ErrorCode::Timeout, report),
    };
    let steps: Vec<String> = report
        .steps
        .iter()
        .map(|s| format!("{} {:?}: {}", s.step, s.outcome, s.detail))
        .collect();
    WireError::new(code, format!("{e} [steps: {}]", steps.join("; ")))
}

fn check_snap_spec(s: &SnapSpec) -> Result<(), WireError> {
    check_image_ref("image", &s.image).map_err(name_err)?;
    check_image_tag("tag", &s.tag).map_err(name_err)?;
    for (k, v) in &s.env {
        check_env("env", k, v).map_err(name_err)?;
    }
    let quantity = |field: &str, v: &str| {
        let ok = !v.is_empty()
            && v.len() <= 16
            && v.chars().all(|c| c.is_ascii_alphanumeric() || c == '.');
        if ok {
            Ok(())
        } else {
            Err(WireError::new(
                ErrorCode::InvalidArgument,
                format!("invalid {field} {v:?}: a Kubernetes quantity such as 8, 500m or 4Gi"),
            )
            .with_field(field))
        }
    };
    quantity("cpu", &s.cpu)?;
    quantity("memory", &s.memory)?;
    s.firmware
        .check()
        .map_err(|why| WireError::new(ErrorCode::InvalidArgument, why).with_field("firmware"))
}

fn check_cluster(c: &RbdCluster) -> Result<(), WireError> {
    check_object_name("name", &c.name).map_err(name_err)?;
    CephClientId::parse("user_id", &c.user_id).map_err(name_err)?;
    if c.mon_hosts.is_empty() {
        return Err(
            WireError::new(ErrorCode::InvalidArgument, "at least one monitor is needed")
                .with_field("mon_hosts"),
        );
    }
    for (i, m) in c.mon_hosts.iter().enumerate() {
        check_host_port(&format!("mon_hosts[{i}]"), m).map_err(name_err)?;
    }
    check_cephx_key("key", &c.key).map_err(name_err)
}

fn check_bdev(b: &BdevSpec) -> Result<(), WireError> {
    check_object_name("name", &b.name).map_err(name_err)?;
    check_object_name("cluster", &b.cluster).map_err(name_err)?;
    PoolName::parse("pool", &b.pool).map_err(name_err)?;
    ImageName::parse("image", &b.image).map_err(name_err)?;
    if !matches!(b.block_size, 512 | 4096) {
        return Err(WireError::new(
            ErrorCode::InvalidArgument,
            format!("block size {} is not 512 or 4096", b.block_size),
        )
        .with_field("block_size"));
    }
    Ok(())
}

fn check_subsystem(s: &SubsystemSpec) -> Result<(), WireError> {
    check_nqn("nqn", &s.nqn).map_err(name_err)?;
    for (field, v, max) in [("serial", &s.serial, 20), ("model", &s.model, 40)] {
        if v.is_empty() || v.len() > max || !v.chars().all(|c| c.is_ascii_graphic() || c == ' ') {
            return Err(WireError::new(
                ErrorCode::InvalidArgument,
                format!("invalid {field} {v:?}: 1-{max} printable ASCII characters"),
            )
            .with_field(field));
        }
    }
    if s.max_namespaces == 0 || s.max_namespaces > 1024 {
        return Err(
            WireError::new(ErrorCode::InvalidArgument, "max_namespaces must be 1-1024")
                .with_field("max_namespaces"),
        );
    }
    Ok(())
}

/// A bdev resize: at least 1 MiB, at most the largest volume.
fn check_resize(mib: u64) -> Result<(), WireError> {
    let bytes = mib.saturating_mul(1 << 20);
    if mib == 0 {
        return Err(WireError::new(
            ErrorCode::InvalidArgument,
            "new_size_mib must be at least 1",
        )
        .with_field("new_size_mib"));
    }
    protocol::limits::check_volume_bytes(bytes)
        .map_err(|why| WireError::new(ErrorCode::InvalidArgument, why).with_field("new_size_mib"))
}

fn check_qos(q: &protocol::dpu::QosLimits) -> Result<(), WireError> {
    q.check()
        .map_err(|(field, why)| WireError::new(ErrorCode::InvalidArgument, why).with_field(field))
}

fn check_nsid(nsid: u32) -> Result<(), WireError> {
    if nsid == 0 || nsid > 1024 {
        return Err(WireError::new(
            ErrorCode::InvalidArgument,
            format!("nsid {nsid} is not 1-1024"),
        )
        .with_field("nsid"));
    }
    Ok(())
}

fn check_namespace(n: &NamespaceSpec) -> Result<(), WireError> {
    check_nqn("nqn", &n.nqn).map_err(name_err)?;
    check_nsid(n.nsid)?;
    check_object_name("bdev", &n.bdev).map_err(name_err)?;
    check_uuid("uuid", &n.uuid).map_err(name_err)
}

fn check_controller(c: &ControllerSpec) -> Result<(), WireError> {
    check_object_name("name", &c.name).map_err(name_err)?;
    check_nqn("nqn", &c.nqn).map_err(name_err)?;
    if c.function.pf > 3 || c.function.vf.is_some_and(|v| v > 126) {
        return Err(WireError::new(
            ErrorCode::InvalidArgument,
            format!(
                "function {} is outside a BlueField-3's PF 0-3, VF 0-126",
                c.function
            ),
        )
        .with_field("function"));
    }
    if !(1..=32).contains(&c.num_queues) || c.mdts > 10 {
        return Err(WireError::new(
            ErrorCode::InvalidArgument,
            "num_queues must be 1-32 and mdts 0-10",
        )
        .with_field("num_queues"));
    }
    Ok(())
}

fn check_attachment(a: &Attachment) -> Result<(), WireError> {
    check_object_name("controller", &a.controller).map_err(name_err)?;
    check_nsid(a.nsid)
}

impl DpuAgent {
    /// An agent over `snap` and `platform`, with `ledger`.
    pub fn new(
        snap: Snap,
        platform: Arc<dyn Platform>,
        ledger: LedgerStore,
        settings: AgentSettings,
    ) -> Self {
        // SNAP does not list which registration a bdev uses; what the agent told it does.
        for b in ledger.get().bdevs.values() {
            snap.know_bdev_cluster(&b.name, &b.cluster);
        }
        Self {
            snap,
            platform,
            ledger: Mutex::new(ledger),
            events: broadcast::channel(64).0,
            settings,
            observed: StdMutex::new(Observed::default()),
            applied: Default::default(),
            commanded: tokio::sync::Notify::new(),
            reports: Mutex::new(ReportOrder {
                instance: fastrand::u64(1..),
                seq: 0,
            }),
        }
    }

    /// SNAP.
    pub fn snap(&self) -> &Snap {
        &self.snap
    }

    fn observed(&self) -> std::sync::MutexGuard<'_, Observed> {
        self.observed.lock().expect("observed lock")
    }

    async fn bluefield(&self) -> Option<BlueFieldFacts> {
        let cached = self.observed().bluefield.clone();
        if let Some((at, facts)) = cached {
            if at.elapsed() < Duration::from_secs(300) {
                return facts;
            }
        }
        let facts = self.platform.bluefield_facts().await;
        self.observed().bluefield = Some((tokio::time::Instant::now(), facts.clone()));
        facts
    }

    /// The full report.
    pub async fn report(&self) -> DpuReport {
        let mut numbering = self.reports.lock().await;
        numbering.seq += 1;
        let order = *numbering;
        let host = crate::status::host_facts(&self.settings.proc_root, &self.settings.sys_root);
        let bluefield = self.bluefield().await;
        let image = self.platform.deployed().await;
        let version = self.snap.version().await.ok();
        // The view (re-listed by every supervision pass, kept up to date by our own calls) and
        // the ledger, read together under the ledger's lock: a command holds it from its intent
        // to its settle, so neither is read half way through one. (Read apart, a command
        // settling in between put its new object in the ledger and not in the view: the report
        // said SNAP had lost it, and every other controller replica warned of drift.)
        let (inventory, ledger) = {
            let store = self.ledger.lock().await;
            let inventory = match version {
                Some(_) => match self.snap.cached() {
                    Some(inv) => Some(inv),
                    None => self.snap.list().await.ok(),
                },
                None => None,
            };
            (inventory, store.get().clone())
        };
        let host_use = self.platform.host_use().await;
        let missing = inventory
            .as_ref()
            .map(|inv| ledger::missing(&ledger, inv))
            .unwrap_or_default();
        let obs = self.observed();
        let state = match (&version, &image) {
            (Some(_), _) => SnapState::Running,
            (None, Some(_)) if obs.reachable => SnapState::Unreachable,
            (None, Some(_)) => SnapState::Starting,
            (None, None) => SnapState::NotInstalled,
        };
        DpuReport {
            platform: self.platform.name().into(),
            host,
            bluefield,
            snap: SnapStatus {
                state,
                version,
                image,
                restarts: obs.restarts,
            },
            inventory,
            missing,
            ledger_generation: ledger.generation,
            last_replay: obs.last_replay.clone(),
            host_use,
            order,
        }
    }

    /// One supervision pass: restart SNAP if the platform runs it, look at SNAP, count restarts,
    /// and replay the ledger when SNAP lost objects. Returns the replay, if one ran.
    pub async fn supervise_once(&self) -> Option<ReplayReport> {
        let restarted = self.platform.supervise().await;
        let mut store = self.ledger.lock().await;
        let inv: Option<SnapInventory> = self.snap.inventory().await.ok();
        let Some(inv) = inv else {
            self.observed().reachable = false;
            return None;
        };
        // A command whose outcome was not known (the agent died, or SNAP did not answer):
        // settled before anything is compared, so the replay below restores it if it was done.
        if let Err(e) = self.settle_pending(&mut store, &inv) {
            warn!(error = %protocol::error::chain(&e), "Cannot settle the ledger's pending command.");
        }
        let missing = ledger::missing(store.get(), &inv);
        // A SNAP that restarted (the platform started it again, or it holds none of what it
        // was told) lost its in-memory state: the replay is its documented crash recovery and
        // waits for nobody. Anything less — one object changed out of band — is drift: reported
        // (`missing`), and repaired only by the controller when its mode says so.
        let emptied = ledger::emptied(store.get(), &inv);
        let restart = {
            let mut obs = self.observed();
            let restart = restarted || (emptied && !obs.emptied);
            if restart {
                obs.restarts += 1;
                warn!(
                    missing = missing.len(),
                    restarts = obs.restarts,
                    "SNAP restarted and lost its configuration."
                );
            } else if !missing.is_empty() && missing != obs.missing {
                warn!(
                    missing = ?missing,
                    "SNAP's objects changed out of band; left for the controller."
                );
            }
            obs.emptied = emptied;
            obs.reachable = true;
            obs.missing = missing.clone();
            restart || emptied
        };
        if missing.is_empty() || !self.settings.replay || !restart {
            return None;
        }
        let reason = format!(
            "SNAP is missing {} object(s): {}",
            missing.len(),
            missing.join(", ")
        );
        let report = ledger::replay(&self.snap, store.get(), reason).await;
        info!(
            restored = report.restored.len(),
            failed = report.failed.len(),
            "Replayed the ledger into SNAP."
        );
        let after = self
            .snap
            .inventory()
            .await
            .map(|inv| ledger::missing(store.get(), &inv))
            .unwrap_or(missing);
        {
            let mut obs = self.observed();
            obs.missing = after;
            obs.last_replay = Some(report.clone());
        }
        let _ = self.events.send(Event::SnapReplayed(report.clone()));
        Some(report)
    }

    /// Supervises forever: every `interval`, a pass; pushes the report when it changes and at
    /// least every `full_report_every`.
    pub async fn supervise_loop(self: Arc<Self>, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The last report pushed, and the count of applied commands then.
        let mut last: Option<(DpuReport, u64)> = None;
        let mut last_full = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.commanded.notified() => {
                    // Once no command has come for a moment: a pass's burst is one push.
                    while tokio::time::timeout(PUSH_AFTER_COMMANDS, self.commanded.notified())
                        .await
                        .is_ok()
                    {}
                }
            }
            self.supervise_once().await;
            if self.events.receiver_count() == 0 {
                continue;
            }
            let report = self.report().await;
            let applied = self.applied.load(std::sync::atomic::Ordering::Relaxed);
            // What counts as a change is `DpuReport::change_from`'s (the controller reconciles
            // on the same definition); a command applied since counts too (see `applied`).
            let changed = last.as_ref().is_none_or(|(before, n)| {
                *n != applied || report.change_from(before) != ReportChange::None
            });
            let due = last_full.elapsed() >= self.settings.full_report_every;
            if due || changed {
                last = Some((report.clone(), applied));
                last_full = tokio::time::Instant::now();
                let _ = self.events.send(Event::DpuReport(Box::new(report)));
            }
        }
    }

    /// Runs `op` on SNAP under the ledger lock and the command's lease, its `intent` written
    /// ahead and settled after (see `ledger`'s docs). Dies before the intent is written: nothing
    /// happened. Between it and SNAP's answer: the intent is resolved by the next agent against
    /// SNAP. After the answer, before the settle: the same, and SNAP shows it done.
    async fn with_ledger(
        &self,
        fence: &Fence,
        intent: Option<Intent>,
        op: impl std::future::Future<Output = Result<Done, OpError>>,
    ) -> Result<Reply, WireError> {
        let internal = |e: ledger::LedgerError| {
            WireError::new(ErrorCode::Internal, protocol::error::chain(&e))
        };
        let mut store = self.ledger.lock().await;
        let _executing = fence.enter()?;
        // An earlier command's outcome still open (SNAP did not answer it) is settled first,
        // so that the ledger never holds two guesses.
        if store.get().pending.is_some()
            && !self
                .settle_against_snap(&mut store)
                .await
                .map_err(internal)?
        {
            return Err(WireError::new(
                ErrorCode::Busy,
                "SNAP cannot be asked whether an earlier command took effect; try again",
            ));
        }
        let written_ahead = intent.is_some();
        if let Some(intent) = intent {
            store.begin(intent).map_err(internal)?;
        }
        let result = op.await;
        self.applied
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.commanded.notify_one();
        if written_ahead {
            match &result {
                Ok(_) => store.settle(true).map_err(internal)?,
                // Refused, or never sent: SNAP is as it was.
                Err(e) if !e.outcome_unknown() => store.settle(false).map_err(internal)?,
                // No answer: SNAP decides, now or at the next supervision pass.
                Err(_) => {
                    self.settle_against_snap(&mut store)
                        .await
                        .map_err(internal)?;
                }
            }
        }
        result.map_err(op_err)?;
        Ok(Reply::Done(protocol::Empty {}))
    }

    /// Settles the pending intent against a fresh listing of SNAP; false when SNAP cannot be
    /// listed (the intent stays pending).
    async fn settle_against_snap(
        &self,
        store: &mut LedgerStore,
    ) -> Result<bool, ledger::LedgerError> {
        match self.snap.inventory().await {
            Ok(inv) => self.settle_pending(store, &inv).map(|()| true),
            Err(_) => Ok(false),
        }
    }

    /// Settles the ledger's pending intent against `inv` (see [`ledger::resolve`]).
    fn settle_pending(
        &self,
        store: &mut LedgerStore,
        inv: &SnapInventory,
    ) -> Result<(), ledger::LedgerError> {
        let Some(resolution) = ledger::resolve(store.get(), inv) else {
            return Ok(());
        };
        info!(intent = ?store.get().pending, ?resolution, "Settled a command whose outcome was not known.");
        store.settle(resolution != ledger::Resolution::NotDone)
    }

    async fn dispatch(&self, command: Command, fence: &Fence) -> Result<Reply, WireError> {
        match command {
            Command::DpuReport(_) => Ok(Reply::DpuReport(Box::new(self.report().await))),
            Command::InstallSnap(spec) => {
                check_snap_spec(&spec)?;
                let _executing = fence.enter()?;
                self.install(&spec).await
            }
            Command::UpgradeSnap(spec) => {
                check_snap_spec(&spec)?;
                if self.platform.deployed().await.is_none() {
                    return Err(WireError::new(
                        ErrorCode::NotFound,
                        "SNAP is not installed; install it first",
                    ));
                }
                let _executing = fence.enter()?;
                self.install(&spec).await
            }
            Command::RemoveSnap(_) => self.remove_snap(fence).await,
            c @ (Command::RegisterRbdCluster(_)
            | Command::UnregisterRbdCluster(_)
            | Command::CreateBdev(_)
            | Command::DeleteBdev(_)
            | Command::ResizeBdev(_)
            | Command::SetBdevQos(_)
            | Command::CreateSubsystem(_)
            | Command::DestroySubsystem(_)
            | Command::CreateNamespace(_)
            | Command::DestroyNamespace(_)) => self.storage(c, fence).await,
            c @ (Command::CreateController(_)
            | Command::DestroyController(_)
            | Command::AttachNamespace(_)
            | Command::DetachNamespace(_)
            | Command::SuspendController(_)
            | Command::ResumeController(_)) => self.controllers(c, fence).await,
            other => Err(WireError::new(
                ErrorCode::UnsupportedCommand,
                format!("the dpu agent does not serve {}", other.name()),
            )),
        }
    }

    /// A detach the host would feel is refused while the host holds the device open, when the
    /// platform can tell: the controller's plan-time check may be older than the host's open.
    async fn refuse_if_open(&self, a: &protocol::dpu::Attachment) -> Result<(), WireError> {
        let Some(host) = self.platform.host_use().await else {
            return Ok(());
        };
        match host.device(&a.controller, a.nsid).filter(|d| d.open > 0) {
            Some(d) => Err(WireError::new(
                ErrorCode::InUse,
                format!(
                    "the host holds {} open (nsid {} of {}, {} opener(s)); detach with force (--allow-in-use) to pull it anyway",
                    d.device, a.nsid, a.controller, d.open
                ),
            )
            .with_field("nsid")),
            None => Ok(()),
        }
    }

    /// Removes SNAP, unless it still backs controllers (the host would see dead functions).
    async fn remove_snap(&self, fence: &Fence) -> Result<Reply, WireError> {
        let store = self.ledger.lock().await;
        let _executing = fence.enter()?;
        let mut ctrls: Vec<String> = store.get().controllers.keys().cloned().collect();
        if let Ok(inv) = self.snap.inventory().await {
            ctrls.extend(inv.controllers.into_iter().map(|c| c.name));
        }
        ctrls.sort();
        ctrls.dedup();
        if !ctrls.is_empty() {
            return Err(WireError::new(
                ErrorCode::InUse,
                format!(
                    "SNAP still backs controllers {}: destroy them first, or the host sees dead functions",
                    ctrls.join(", ")
                ),
            ));
        }
        let report = self.platform.remove().await.map_err(deploy_err)?;
        Ok(Reply::Deploy(report))
    }

    /// Clusters, bdevs, subsystems and namespaces: checked, done in SNAP, kept in the ledger.
    async fn storage(&self, command: Command, fence: &Fence) -> Result<Reply, WireError> {
        match command {
            Command::RegisterRbdCluster(c) => {
                check_cluster(&c)?;
                let op = self.snap.register_cluster(&c);
                self.with_ledger(fence, Some(Intent::RegisterCluster(c.clone())), op)
                    .await
            }
            Command::UnregisterRbdCluster(n) => {
                check_object_name("name", &n.name).map_err(name_err)?;
                let op = self.snap.unregister_cluster(&n.name);
                let intent = Intent::UnregisterCluster {
                    name: n.name.clone(),
                };
                self.with_ledger(fence, Some(intent), op).await
            }
            Command::CreateBdev(b) => {
                check_bdev(&b)?;
                let op = self.snap.create_bdev(&b);
                self.with_ledger(fence, Some(Intent::CreateBdev(b.clone())), op)
                    .await
            }
            Command::DeleteBdev(n) => {
                check_object_name("name", &n.name).map_err(name_err)?;
                let op = self.snap.delete_bdev(&n.name);
                let intent = Intent::DeleteBdev {
                    name: n.name.clone(),
                };
                self.with_ledger(fence, Some(intent), op).await
            }
            Command::ResizeBdev(r) => {
                check_object_name("name", &r.name).map_err(name_err)?;
                check_resize(r.new_size_mib)?;
                // Nothing for the ledger: a replayed bdev opens its image at the image's size.
                let op = self.snap.resize_bdev(&r.name, r.new_size_mib);
                self.with_ledger(fence, None, op).await
            }
            Command::SetBdevQos(q) => {
                check_object_name("name", &q.name).map_err(name_err)?;
                check_qos(&q.limits)?;
                let op = self.snap.set_qos(&q.name, q.limits);
                let intent = Intent::SetQos {
                    name: q.name.clone(),
                    limits: q.limits,
                };
                self.with_ledger(fence, Some(intent), op).await
            }
            Command::CreateSubsystem(s) => {
                check_subsystem(&s)?;
                let op = self.snap.create_subsystem(&s);
                self.with_ledger(fence, Some(Intent::CreateSubsystem(s.clone())), op)
                    .await
            }
            Command::DestroySubsystem(n) => {
                check_nqn("nqn", &n.nqn).map_err(name_err)?;
                let op = self.snap.destroy_subsystem(&n.nqn);
                let intent = Intent::DestroySubsystem { nqn: n.nqn.clone() };
                self.with_ledger(fence, Some(intent), op).await
            }
            Command::CreateNamespace(n) => {
                check_namespace(&n)?;
                let op = self.snap.create_namespace(&n);
                self.with_ledger(fence, Some(Intent::CreateNamespace(n.clone())), op)
                    .await
            }
            Command::DestroyNamespace(n) => {
                check_nqn("nqn", &n.nqn).map_err(name_err)?;
                check_nsid(n.nsid)?;
                let op = self.snap.destroy_namespace(&n.nqn, n.nsid);
                let intent = Intent::DestroyNamespace {
                    nqn: n.nqn.clone(),
                    nsid: n.nsid,
                };
                self.with_ledger(fence, Some(intent), op).await
            }
            other => unreachable!("not a storage command: {}", other.name()),
        }
    }

    /// Controllers and attachments: checked, done in SNAP, kept in the ledger.
    async fn controllers(&self, command: Command, fence: &Fence) -> Result<Reply, WireError> {
        match command {
            Command::CreateController(c) => {
                check_controller(&c)?;
                let op = self.snap.create_controller(&c);
                self.with_ledger(fence, Some(Intent::CreateController(c.clone())), op)
                    .await
            }
            Command::DestroyController(n) => {
                check_object_name("name", &n.name).map_err(name_err)?;
                let op = self.snap.destroy_controller(&n.name);
                let intent = Intent::DestroyController {
                    name: n.name.clone(),
                };
                self.with_ledger(fence, Some(intent), op).await
            }
            Command::AttachNamespace(a) => {
                check_attachment(&a)?;
                let op = self.snap.attach(&a.controller, a.nsid);
                let intent = Intent::Attach {
                    controller: a.controller.clone(),
                    nsid: a.nsid,
                    attached: true,
                };
                self.with_ledger(fence, Some(intent), op).await
            }
            Command::DetachNamespace(a) => {
                check_attachment(&a)?;
                if !a.force {
                    self.refuse_if_open(&a).await?;
                }
                let op = self.snap.detach(&a.controller, a.nsid);
                let intent = Intent::Attach {
                    controller: a.controller.clone(),
                    nsid: a.nsid,
                    attached: false,
                };
                self.with_ledger(fence, Some(intent), op).await
            }
            Command::SuspendController(n) => self.set_running(fence, &n.name, false).await,
            Command::ResumeController(n) => self.set_running(fence, &n.name, true).await,
            other => unreachable!("not a controller command: {}", other.name()),
        }
    }

    async fn set_running(
        &self,
        fence: &Fence,
        name: &str,
        running: bool,
    ) -> Result<Reply, WireError> {
        check_object_name("name", name).map_err(name_err)?;
        let op = self.snap.set_running(name, running);
        let intent = Intent::Run {
            controller: name.to_string(),
            running,
        };
        self.with_ledger(fence, Some(intent), op).await
    }

    async fn install(&self, spec: &SnapSpec) -> Result<Reply, WireError> {
        let report = self
            .platform
            .install(spec, &self.snap)
            .await
            .map_err(deploy_err)?;
        if report.ready {
            // A fresh SNAP has nothing: give it the ledger now rather than at the next tick.
            self.supervise_once().await;
        }
        Ok(Reply::Deploy(report))
    }
}

#[async_trait::async_trait]
impl Handler for DpuAgent {
    fn kind(&self) -> AgentKind {
        AgentKind::Dpu
    }

    fn capabilities(&self) -> Vec<String> {
        CAPABILITIES.iter().map(|s| s.to_string()).collect()
    }

    async fn handle(&self, command: Command, fence: Fence) -> Result<Reply, WireError> {
        self.dispatch(command, &fence).await
    }

    fn subscribe(&self) -> Option<broadcast::Receiver<Event>> {
        Some(self.events.subscribe())
    }
}
