//! Simulation: "deploying SNAP" starts the SNAP emulator and supervises it.
//!
//! The emulator is SNAP's container: it outlives its agent. The agent never kills it on exit (a
//! stopped or crashed agent leaves the host's namespaces served); whoever started the agent owns
//! the emulator's lifetime (it stays in the agent's process group, so the lab and the tests stop
//! both with the group). The deployed spec and the emulator's pid are remembered in the agent's
//! state directory: an agent that starts again adopts the emulator still serving its socket, and
//! starts a new one (empty, as a SNAP restart is; the ledger replay refills it) only when none is
//! running.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use protocol::dpu::{BlueFieldFacts, DeployReport, HostUse, SnapSpec, StepOutcome};
use tokio::process::{Child, Command};
use tokio::sync::Mutex;
use tracing::{info, warn};

use super::{DeployError, Platform, Steps};
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
    /// The simulated host's directory: its devices and its account (`host.json`).
    pub host_dir: PathBuf,
    /// How long to wait for the socket.
    pub ready_timeout: Duration,
}

/// What the state file keeps.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Remembered {
    spec: SnapSpec,
    /// The emulator's pid (absent in files of older agents).
    #[serde(default)]
    pid: Option<u32>,
}

/// A running emulator: started by this agent, or adopted from the agent before it.
enum Proc {
    Child(Child),
    Adopted(u32),
}

struct Running {
    spec: SnapSpec,
    proc: Proc,
}

impl Running {
    fn pid(&self) -> Option<u32> {
        match &self.proc {
            Proc::Child(c) => c.id(),
            Proc::Adopted(pid) => Some(*pid),
        }
    }

    /// Whether it still runs (a child that ended is reaped here).
    fn alive(&mut self, socket: &std::path::Path) -> bool {
        match &mut self.proc {
            Proc::Child(c) => matches!(c.try_wait(), Ok(None)),
            Proc::Adopted(pid) => is_emulator(*pid, socket),
        }
    }

    /// Stops it as a container stop does: SIGTERM (it closes its images), SIGKILL after `grace`.
    async fn stop(mut self, socket: &std::path::Path, grace: Duration) {
        use nix::sys::signal::{kill, Signal};
        let Some(pid) = self.pid() else { return };
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = tokio::time::Instant::now() + grace;
        while self.alive(socket) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.alive(socket) {
            let _ = kill(pid, Signal::SIGKILL);
        }
        if let Proc::Child(c) = &mut self.proc {
            let _ = c.wait().await;
        }
    }
}

/// Whether `pid` is a live (not zombie) `snap-emulator` serving `socket`.
fn is_emulator(pid: u32, socket: &std::path::Path) -> bool {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let Ok(stat) = std::fs::read_to_string(proc_dir.join("stat")) else {
        return false;
    };
    // The state follows the command name's closing parenthesis.
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X']));
    let Ok(cmd) = std::fs::read(proc_dir.join("cmdline")) else {
        return false;
    };
    let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
    let sock = socket.as_os_str().as_encoded_bytes();
    !zombie && args.first().is_some_and(|a| a.ends_with(b"snap-emulator")) && args.contains(&sock)
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

    fn remembered(&self) -> Option<Remembered> {
        let bytes = std::fs::read(&self.config.state_file).ok()?;
        serde_json::from_slice(&bytes).ok().or_else(|| {
            // An older agent's file: the spec alone.
            let spec = serde_json::from_slice(&bytes).ok()?;
            Some(Remembered { spec, pid: None })
        })
    }

    fn remember(&self, spec: &SnapSpec, pid: Option<u32>) {
        let r = Remembered {
            spec: spec.clone(),
            pid,
        };
        let bytes = serde_json::to_vec(&r).expect("serializable");
        if let Err(e) = agent_kit::fsutil::write_atomic(&self.config.state_file, &bytes) {
            warn!(error = %e, "Cannot remember the deployment.");
        }
    }

    /// The emulator an earlier agent started, if it still serves our socket.
    fn adoptable(&self) -> Option<Running> {
        let r = self.remembered()?;
        let pid = r.pid.filter(|p| is_emulator(*p, &self.config.socket))?;
        Some(Running {
            spec: r.spec,
            proc: Proc::Adopted(pid),
        })
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
            .arg("--host-dir")
            .arg(&self.config.host_dir)
            .args(&self.config.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // SNAP's container outlives its agent: never killed when the agent goes.
            .kill_on_drop(false)
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
        if running.is_none() {
            *running = self.adoptable();
        }
        let socket = &self.config.socket;
        let alive = running.as_mut().is_some_and(|r| r.alive(socket));
        if alive && running.as_ref().is_some_and(|r| &r.spec == spec) {
            steps.push("emulator", StepOutcome::Unchanged, "running with this spec");
        } else {
            if let Some(old) = running.take() {
                old.stop(socket, self.config.ready_timeout).await;
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
            self.remember(spec, child.id());
            steps.push(
                "emulator",
                StepOutcome::Changed,
                format!("started {}:{} (pid {:?})", spec.image, spec.tag, child.id()),
            );
            *running = Some(Running {
                spec: spec.clone(),
                proc: Proc::Child(child),
            });
        }
        drop(running);
        steps.until_ready(snap, self.config.ready_timeout).await
    }

    async fn remove(&self) -> Result<DeployReport, DeployError> {
        let mut steps = Steps::new(self.name());
        let mut running = self.running.lock().await;
        if running.is_none() {
            *running = self.adoptable();
        }
        let _ = std::fs::remove_file(&self.config.state_file);
        match running.take() {
            Some(r) => {
                r.stop(&self.config.socket, self.config.ready_timeout).await;
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
            .or_else(|| {
                self.remembered()
                    .map(|r| format!("{}:{}", r.spec.image, r.spec.tag))
            })
    }

    async fn bluefield_facts(&self) -> Option<BlueFieldFacts> {
        None
    }

    /// The simulated host's own account, while a SNAP serves the socket (a stopped SNAP's
    /// devices are gone; a crashed one's account is stale until the next SNAP rewrites it).
    async fn host_use(&self) -> Option<HostUse> {
        if std::os::unix::net::UnixStream::connect(&self.config.socket).is_err() {
            return Some(HostUse::default());
        }
        let bytes = std::fs::read(self.config.host_dir.join("host.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    async fn supervise(&self) -> bool {
        let mut running = self.running.lock().await;
        let socket = &self.config.socket;
        if running.as_mut().is_some_and(|r| r.alive(socket)) {
            return false;
        }
        let spec = match running.as_mut() {
            Some(r) => {
                warn!(pid = ?r.pid(), "SNAP emulator exited; restarting it.");
                r.spec.clone()
            }
            // Deployed before this agent started: adopt the emulator if it still runs.
            None => match self.adoptable() {
                Some(r) => {
                    info!(pid = ?r.pid(), "Adopted the SNAP emulator an earlier agent started.");
                    *running = Some(r);
                    return false;
                }
                None => match self.remembered() {
                    Some(r) => {
                        info!("Starting the SNAP emulator deployed before the agent restarted.");
                        r.spec
                    }
                    None => return false,
                },
            },
        };
        match self.spawn(&spec) {
            Ok(child) => {
                self.remember(&spec, child.id());
                *running = Some(Running {
                    spec,
                    proc: Proc::Child(child),
                });
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
