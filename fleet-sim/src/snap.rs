//! SNAP for a simulated DPU of the fleet: a SNAP emulator running as a task of this process, on
//! the DPU's own socket, with the DPU's own state (objects, function table, serial). It outlives
//! its agent, as SNAP's container does: an agent stopped and started again (a DPU whose network
//! went away) finds the same emulator. A process restart is a SNAP restart for every DPU: the
//! deployed spec is remembered in the DPU's directory, the emulator starts empty and the agent's
//! ledger replay refills it.

use std::path::PathBuf;
use std::time::Duration;

use dpu_agent::platform::{DeployError, Platform, Steps};
use dpu_agent::snap::Snap;
use protocol::dpu::{BlueFieldFacts, DeployReport, SnapSpec, StepOutcome};
use snap_emulator::{ceph::RealCeph, Config, InProcess};
use tokio::sync::Mutex;
use tracing::warn;

/// How every DPU's emulator runs.
#[derive(Debug, Clone)]
pub struct EmulatorTemplate {
    /// Real-Ceph mode (connections shared by the process), or memory.
    pub real_ceph: Option<RealCeph>,
    /// Latency of every SNAP call.
    pub latency: Duration,
    /// Image size of a bdev when no real cluster is consulted.
    pub default_image_size: u64,
    /// How long to wait for SNAP to answer after starting it.
    pub ready_timeout: Duration,
}

struct Running {
    spec: SnapSpec,
    emulator: InProcess,
}

/// The platform of one simulated DPU.
pub struct InProcessSnap {
    socket: PathBuf,
    spec_file: PathBuf,
    serial: String,
    template: EmulatorTemplate,
    running: Mutex<Option<Running>>,
}

impl InProcessSnap {
    /// SNAP of the DPU whose directory is `dir` (socket `dir/spdk.sock`), device serial `serial`.
    pub fn new(dir: &std::path::Path, serial: String, template: EmulatorTemplate) -> Self {
        Self {
            socket: dir.join("spdk.sock"),
            spec_file: dir.join("snap-spec.json"),
            serial,
            template,
            running: Mutex::new(None),
        }
    }

    /// SNAP's socket.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    fn remembered(&self) -> Option<SnapSpec> {
        serde_json::from_slice(&std::fs::read(&self.spec_file).ok()?).ok()
    }

    async fn start(&self, spec: &SnapSpec) -> InProcess {
        let mut c = Config::with_socket(&self.socket);
        c.pfs = spec.firmware.nvme_pfs;
        c.vfs_per_pf = spec.firmware.nvme_vfs;
        c.serial.clone_from(&self.serial);
        c.real_ceph.clone_from(&self.template.real_ceph);
        c.default_image_size = self.template.default_image_size;
        if !self.template.latency.is_zero() {
            c.faults.latency.insert("*".into(), self.template.latency);
        }
        InProcess::start(c).await
    }

    /// Stops the emulator (the process is stopping: SNAP goes with it).
    pub async fn stop(&self) {
        if let Some(mut r) = self.running.lock().await.take() {
            r.emulator.stop().await;
        }
    }
}

#[async_trait::async_trait]
impl Platform for InProcessSnap {
    fn name(&self) -> &'static str {
        "simulation"
    }

    async fn install(&self, spec: &SnapSpec, snap: &Snap) -> Result<DeployReport, DeployError> {
        let mut steps = Steps::new(self.name());
        let mut running = self.running.lock().await;
        let same = running
            .as_ref()
            .is_some_and(|r| &r.spec == spec && !r.emulator.finished());
        if same {
            steps.push("emulator", StepOutcome::Unchanged, "running with this spec");
        } else {
            if let Some(mut old) = running.take() {
                old.emulator.stop().await;
                steps.push("emulator", StepOutcome::Changed, "stopped the previous one");
            }
            let bytes = serde_json::to_vec(spec).expect("serializable");
            if let Err(e) = agent_kit::fsutil::write_atomic(&self.spec_file, &bytes) {
                return Err(steps.fail("emulator", format!("cannot remember the spec: {e}")));
            }
            let emulator = self.start(spec).await;
            steps.push(
                "emulator",
                StepOutcome::Changed,
                format!("started {}:{} in process", spec.image, spec.tag),
            );
            *running = Some(Running {
                spec: spec.clone(),
                emulator,
            });
        }
        drop(running);
        steps.until_ready(snap, self.template.ready_timeout).await
    }

    async fn remove(&self) -> Result<DeployReport, DeployError> {
        let mut steps = Steps::new(self.name());
        let _ = std::fs::remove_file(&self.spec_file);
        match self.running.lock().await.take() {
            Some(mut r) => {
                r.emulator.stop().await;
                steps.push("emulator", StepOutcome::Changed, "stopped");
            }
            None => steps.push("emulator", StepOutcome::Unchanged, "not running"),
        }
        Ok(steps.finish(false))
    }

    async fn deployed(&self) -> Option<String> {
        let spec = match &*self.running.lock().await {
            Some(r) => Some(r.spec.clone()),
            None => self.remembered(),
        };
        spec.map(|s| format!("{}:{}", s.image, s.tag))
    }

    async fn bluefield_facts(&self) -> Option<BlueFieldFacts> {
        None
    }

    /// A crashed emulator is started again, and one deployed before this process started is
    /// started (empty: the ledger replay refills it).
    async fn supervise(&self) -> bool {
        let mut running = self.running.lock().await;
        let spec = match running.as_ref() {
            Some(r) if !r.emulator.finished() => return false,
            Some(r) => {
                warn!(socket = %self.socket.display(), "SNAP emulator ended; restarting it.");
                r.spec.clone()
            }
            None => match self.remembered() {
                Some(s) => s,
                None => return false,
            },
        };
        let emulator = self.start(&spec).await;
        *running = Some(Running { spec, emulator });
        true
    }
}
