//! Simulation: "deploying SNAP" starts the SNAP emulator and supervises it.
//!
//! The deployed spec is remembered in the agent's state directory, so an agent that restarts
//! starts the emulator again (empty, as a SNAP restart is; the ledger replay refills it).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use protocol::dpu::{BlueFieldFacts, DeployReport, SnapSpec, StepOutcome};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::{wait_for_socket, DeployError, Platform, Steps};
use crate::snap::Snap;

/// How the emulator is run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The `snap-emulator` binary.
    pub emulator: PathBuf,
    /// SNAP's socket path.
    pub socket: PathBuf,
    /// Where the deployed spec is remembered.
    pub state_file: PathBuf,
    /// The emulator's log file.
    pub log_file: PathBuf,
    /// Extra emulator arguments (e.g. `--real-ceph`, `--latency *=5ms`).
    pub extra_args: Vec<String>,
    /// How long to wait for the socket.
    pub ready_timeout: Duration,
}

struct Running {
    spec: SnapSpec,
    child: Child,
}

/// The simulation platform.
pub struct Simulation {
    config: SimConfig,
    running: Mutex<Option<Running>>,
}

impl Simulation {
    /// A simulation; restarts the emulator if a deployment was remembered.
    pub fn new(config: SimConfig) -> Self {
        Self {
            config,
            running: Mutex::new(None),
        }
    }

    fn remembered(&self) -> Option<SnapSpec> {
        let bytes = std::fs::read(&self.config.state_file).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    fn spawn(&self, spec: &SnapSpec) -> std::io::Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.config.log_file)?;
        Command::new(&self.config.emulator)
            .arg("--socket")
            .arg(&self.config.socket)
            .args([
                "--pfs",
                &spec.firmware.nvme_pfs.to_string(),
                "--vfs-per-pf",
                &spec.firmware.nvme_vfs.to_string(),
            ])
            .args(&self.config.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
    }
}

#[async_trait::async_trait]
impl Platform for Simulation {
    fn name(&self) -> &'static str {
        "simulation"
    }

    async fn install(&self, spec: &SnapSpec, snap: &Snap) -> Result<DeployReport, DeployError> {
        let mut steps = Steps::new(self.name());
        let mut running = self.running.lock().await;
        let alive = match running.as_mut() {
            Some(r) => matches!(r.child.try_wait(), Ok(None)),
            None => false,
        };
        if alive && running.as_ref().is_some_and(|r| &r.spec == spec) {
            steps.push("emulator", StepOutcome::Unchanged, "running with this spec");
        } else {
            if let Some(mut old) = running.take() {
                let _ = old.child.kill().await;
                steps.push("emulator", StepOutcome::Changed, "stopped the previous one");
            }
            let child = match self.spawn(spec) {
                Ok(c) => c,
                Err(e) => {
                    return Err(steps.fail(
                        "emulator",
                        format!("cannot start {}: {e}", self.config.emulator.display()),
                    ))
                }
            };
            let bytes = serde_json::to_vec(spec).expect("serializable");
            if let Err(e) = agent_kit::fsutil::write_atomic(&self.config.state_file, &bytes) {
                warn!(error = %e, "Cannot remember the deployment.");
            }
            steps.push(
                "emulator",
                StepOutcome::Changed,
                format!("started {}:{} (pid {:?})", spec.image, spec.tag, child.id()),
            );
            *running = Some(Running {
                spec: spec.clone(),
                child,
            });
        }
        drop(running);
        match wait_for_socket(snap, self.config.ready_timeout).await {
            Ok(v) => {
                steps.push("ready", StepOutcome::Unchanged, format!("answers: {v}"));
                Ok(steps.finish(true))
            }
            Err(e) => Err(steps.not_ready(self.config.ready_timeout, e)),
        }
    }

    async fn remove(&self) -> Result<DeployReport, DeployError> {
        let mut steps = Steps::new(self.name());
        let _ = std::fs::remove_file(&self.config.state_file);
        match self.running.lock().await.take() {
            Some(mut r) => {
                let _ = r.child.kill().await;
                steps.push("emulator", StepOutcome::Changed, "stopped");
            }
            None => steps.push("emulator", StepOutcome::Unchanged, "not running"),
        }
        Ok(steps.finish(false))
    }

    async fn deployed(&self) -> Option<String> {
        let running = self.running.lock().await;
        running
            .as_ref()
            .map(|r| format!("{}:{}", r.spec.image, r.spec.tag))
            .or_else(|| self.remembered().map(|s| format!("{}:{}", s.image, s.tag)))
    }

    async fn bluefield_facts(&self) -> Option<BlueFieldFacts> {
        None
    }

    async fn supervise(&self) -> bool {
        let mut running = self.running.lock().await;
        let spec = match running.as_mut() {
            Some(r) => match r.child.try_wait() {
                Ok(None) => return false,
                Ok(Some(status)) => {
                    warn!(%status, "SNAP emulator exited; restarting it.");
                    r.spec.clone()
                }
                Err(_) => return false,
            },
            // Remembered from before an agent restart.
            None => match self.remembered() {
                Some(spec) => {
                    info!("Restarting the SNAP emulator deployed before the agent restarted.");
                    spec
                }
                None => return false,
            },
        };
        match self.spawn(&spec) {
            Ok(child) => {
                *running = Some(Running { spec, child });
                true
            }
            Err(e) => {
                warn!(error = %e, "Cannot restart the SNAP emulator.");
                *running = None;
                false
            }
        }
    }
}
