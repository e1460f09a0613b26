//! The fleet simulator: many simulated DPUs in one process.
//!
//! Each DPU is a real dpu-agent endpoint — its own name and certificate, its own TCP listener,
//! fencing token, ledger and state directory — over its own SNAP emulator, a task of this
//! process on the DPU's own socket ([`snap::InProcessSnap`]). Only the process is shared (and,
//! in real-Ceph mode, one librados connection per set of credentials, where each real SNAP
//! would hold its own). A DPU's agent can be stopped and started again while its SNAP keeps
//! running: the DPU's network went away and came back.
//!
//! [`Fleet::control`] reads commands, one per line: `stop A B` / `start A B` (DPUs A..=B),
//! `stats`, `quit`. Each is answered with one line starting `fleet-sim: `.

pub mod snap;

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use dpu_agent::agent::AgentSettings;
use dpu_agent::{Config, PlatformConfig, StartError};
use protocol::names::PeerName;
use protocol::server::{ServerConfig, ServerStats};
use protocol::tls::{PkiPaths, Role};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::snap::{EmulatorTemplate, InProcessSnap};

/// How the fleet runs.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// CA and the DPUs' certificates (`NAME.crt`, `NAME.key`).
    pub pki_dir: PathBuf,
    /// Issue a DPU's certificate from `ca.key` when it has none (a lab's convenience).
    pub issue_missing: bool,
    /// One directory per DPU is made here.
    pub state_dir: PathBuf,
    /// DPU `i` is named `PREFIX-i`.
    pub prefix: String,
    /// DPUs.
    pub dpus: usize,
    /// The address every agent listens on (each on a port of the system's choosing).
    pub listen_ip: IpAddr,
    /// Each agent's SNAP supervision interval.
    pub poll_interval: Duration,
    /// Each agent's heartbeat interval.
    pub heartbeat: Duration,
    /// A full report is pushed at least this often.
    pub full_report_every: Duration,
    /// How each DPU's SNAP runs.
    pub emulator: EmulatorTemplate,
}

/// Errors starting the fleet.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// A DPU's name is not a valid peer name.
    #[error("DPU name {0:?} is not a DNS label")]
    Name(String),
    /// A certificate could not be issued.
    #[error("cannot issue the certificate of {name}")]
    Issue {
        /// The DPU.
        name: String,
        /// Cause.
        #[source]
        source: protocol::tls::TlsError,
    },
    /// An agent did not start.
    #[error("DPU {name} did not start")]
    Agent {
        /// The DPU.
        name: String,
        /// Cause.
        #[source]
        source: StartError,
    },
}

struct RunningAgent {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), StartError>>,
}

struct Dpu {
    name: PeerName,
    dir: PathBuf,
    snap: Arc<InProcessSnap>,
    /// Where its agent listened last: a restarted agent listens there again.
    addr: Option<SocketAddr>,
    agent: Option<RunningAgent>,
}

/// The simulated DPUs.
pub struct Fleet {
    config: FleetConfig,
    dpus: Vec<Dpu>,
    stats: Arc<ServerStats>,
    rate: Arc<Mutex<RateMeter>>,
    meter: JoinHandle<()>,
}

/// Connections accepted per second, over a sliding second, and the highest seen.
#[derive(Debug, Default)]
struct RateMeter {
    samples: VecDeque<(tokio::time::Instant, u64)>,
    peak: u64,
}

impl RateMeter {
    fn sample(&mut self, accepted: u64) {
        let now = tokio::time::Instant::now();
        self.samples.push_back((now, accepted));
        while self
            .samples
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(1))
        {
            self.samples.pop_front();
        }
        let oldest = self.samples.front().map_or(accepted, |s| s.1);
        self.peak = self.peak.max(accepted - oldest);
    }
}

impl Fleet {
    /// Makes every DPU's directory and certificate (when asked to issue) and starts every agent.
    pub async fn start(config: FleetConfig) -> Result<Self, FleetError> {
        let stats = Arc::new(ServerStats::default());
        let rate = Arc::new(Mutex::new(RateMeter::default()));
        let meter = tokio::spawn(meter(stats.clone(), rate.clone()));
        let mut fleet = Self {
            dpus: vec![],
            stats,
            rate,
            meter,
            config,
        };
        for i in 0..fleet.config.dpus {
            let raw = format!("{}-{i}", fleet.config.prefix);
            let name = PeerName::parse("--prefix", &raw).map_err(|_| FleetError::Name(raw))?;
            let dir = fleet.config.state_dir.join(name.as_str());
            if fleet.config.issue_missing {
                issue_if_missing(&fleet.config.pki_dir, &name)?;
            }
            let serial = format!("MT{i:08}SIM");
            let snap = Arc::new(InProcessSnap::new(
                &dir,
                serial,
                fleet.config.emulator.clone(),
            ));
            fleet.dpus.push(Dpu {
                name,
                dir,
                snap,
                addr: None,
                agent: None,
            });
        }
        fleet
            .start_range(0, fleet.dpus.len().saturating_sub(1))
            .await?;
        Ok(fleet)
    }

    /// Starts the agents of DPUs `from..=to` that are not running; each says where it listens.
    pub async fn start_range(&mut self, from: usize, to: usize) -> Result<usize, FleetError> {
        let mut started = 0;
        for i in from..=to.min(self.dpus.len().saturating_sub(1)) {
            if self.dpus[i].agent.is_some() {
                continue;
            }
            let addr = self.start_agent(i).await?;
            self.dpus[i].addr = Some(addr);
            started += 1;
        }
        Ok(started)
    }

    async fn start_agent(&mut self, i: usize) -> Result<SocketAddr, FleetError> {
        let c = &self.config;
        let d = &self.dpus[i];
        let listen = d.addr.unwrap_or(SocketAddr::new(c.listen_ip, 0));
        let mut server = ServerConfig::new(d.name.as_str());
        server.heartbeat_interval = c.heartbeat;
        let config = Config {
            name: d.name.clone(),
            listen,
            pki: PkiPaths::in_dir(&c.pki_dir, d.name.as_str()),
            state_dir: d.dir.clone(),
            snap_socket: d.snap.socket().to_path_buf(),
            snap_timeout: Duration::from_secs(60),
            platform: PlatformConfig::Custom(d.snap.clone()),
            poll_interval: c.poll_interval,
            settings: AgentSettings {
                proc_root: "/proc".into(),
                sys_root: "/sys".into(),
                replay: true,
                full_report_every: c.full_report_every,
            },
            server,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let (bound_tx, bound) = oneshot::channel::<SocketAddr>();
        let task = tokio::spawn(dpu_agent::run_counted(
            config,
            self.stats.clone(),
            move |a| {
                let _ = bound_tx.send(a);
            },
            async {
                let _ = stopped.await;
            },
        ));
        let name = d.name.to_string();
        match bound.await {
            Ok(addr) => {
                self.dpus[i].agent = Some(RunningAgent { stop, task });
                Ok(addr)
            }
            // The agent ended before it listened: its error says why.
            Err(_) => match task.await {
                Ok(Err(source)) => Err(FleetError::Agent { name, source }),
                _ => Err(FleetError::Agent {
                    name,
                    source: StartError::Platform("ended before listening".into()),
                }),
            },
        }
    }

    /// Stops the agents of DPUs `from..=to` (their SNAP keeps running): they drain and close.
    pub async fn stop_range(&mut self, from: usize, to: usize) -> usize {
        let mut stopping = vec![];
        for d in self.dpus.iter_mut().take(to.saturating_add(1)).skip(from) {
            if let Some(a) = d.agent.take() {
                let _ = a.stop.send(());
                stopping.push(a.task);
            }
        }
        let n = stopping.len();
        for t in stopping {
            let _ = t.await;
        }
        n
    }

    /// Agents running now.
    pub fn up(&self) -> usize {
        self.dpus.iter().filter(|d| d.agent.is_some()).count()
    }

    /// The fleet's counters as one JSON line.
    pub fn stats(&self) -> serde_json::Value {
        let rate = self.rate.lock().unwrap_or_else(|e| e.into_inner());
        serde_json::json!({
            "dpus": self.dpus.len(),
            "up": self.up(),
            "accepted": self.stats.accepted.load(Ordering::Relaxed),
            "peak_accepts_per_sec": rate.peak,
            "requests": self.stats.requests.load(Ordering::Relaxed),
            "rejected_over_cap": self.stats.rejected_over_cap.load(Ordering::Relaxed),
            "handshake_timeouts": self.stats.handshake_timeouts.load(Ordering::Relaxed),
            "rss_kib": proc_status("VmRSS:"),
            "peak_rss_kib": proc_status("VmHWM:"),
        })
    }

    /// Images a bdev of more than one DPU's SNAP opens now (`pool/image: dpu-a, dpu-b`): the
    /// fleet's invariant is that there are none. Every SNAP is asked (`bdev_get_bdevs`); a SNAP
    /// that does not answer is left out.
    pub async fn exposed_twice(&self) -> Vec<String> {
        let mut on: std::collections::BTreeMap<String, Vec<&str>> = Default::default();
        for d in &self.dpus {
            let client = dpu_agent::snap::SnapClient::new(d.snap.socket(), Duration::from_secs(5));
            let Ok(list) = client.call("bdev_get_bdevs", None).await else {
                continue;
            };
            for b in list.as_array().into_iter().flatten() {
                let rbd = &b["driver_specific"]["rbd"];
                if let (Some(pool), Some(image)) =
                    (rbd["pool_name"].as_str(), rbd["rbd_name"].as_str())
                {
                    on.entry(format!("{pool}/{image}"))
                        .or_default()
                        .push(d.name.as_str());
                }
            }
        }
        on.into_iter()
            .filter(|(_, dpus)| dpus.len() > 1)
            .map(|(image, dpus)| format!("{image}: {}", dpus.join(", ")))
            .collect()
    }

    /// Forgets the highest connection rate seen (a new measurement starts).
    pub fn reset_peak(&self) {
        self.rate.lock().unwrap_or_else(|e| e.into_inner()).peak = 0;
    }

    /// Serves commands from `input` until `quit`, its end, or `shutdown`; then stops everything.
    pub async fn control(
        mut self,
        input: impl AsyncBufRead + Unpin,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        let mut lines = input.lines();
        tokio::pin!(shutdown);
        loop {
            let line = tokio::select! {
                l = lines.next_line() => l,
                _ = &mut shutdown => break,
            };
            let line = match line {
                Ok(Some(l)) => l,
                // No more commands: serve until told to stop.
                Ok(None) | Err(_) => {
                    shutdown.as_mut().await;
                    break;
                }
            };
            match self.command(&line).await {
                Some(answer) => say(&answer),
                None => break,
            }
        }
        self.shutdown().await;
    }

    /// One command; `None` for `quit`.
    async fn command(&mut self, line: &str) -> Option<String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let range = |w: &[&str]| -> Option<(usize, usize)> {
            Some((w.get(1)?.parse().ok()?, w.get(2)?.parse().ok()?))
        };
        Some(match (words.first().copied(), range(&words)) {
            (Some("stop"), Some((a, b))) => format!("stopped {}", self.stop_range(a, b).await),
            (Some("start"), Some((a, b))) => match self.start_range(a, b).await {
                Ok(n) => format!("started {n}"),
                Err(e) => format!("error: {}", protocol::error::chain(&e)),
            },
            (Some("stats"), _) => self.stats().to_string(),
            (Some("exposed-twice"), _) => {
                let twice = self.exposed_twice().await;
                format!("exposed twice: {} {}", twice.len(), twice.join("; "))
                    .trim_end()
                    .to_string()
            }
            (Some("reset-peak"), _) => {
                self.reset_peak();
                "peak reset".into()
            }
            (Some("quit"), _) => return None,
            _ => format!(
                "error: unknown command {line:?} (stop A B, start A B, stats, exposed-twice, reset-peak, quit)"
            ),
        })
    }

    /// Stops every agent, then every SNAP.
    pub async fn shutdown(mut self) {
        let n = self.dpus.len();
        self.stop_range(0, n).await;
        for d in &self.dpus {
            d.snap.stop().await;
        }
        self.meter.abort();
    }
}

fn say(answer: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "fleet-sim: {answer}");
    let _ = out.flush();
}

async fn meter(stats: Arc<ServerStats>, rate: Arc<Mutex<RateMeter>>) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let accepted = stats.accepted.load(Ordering::Relaxed);
        rate.lock()
            .unwrap_or_else(|e| e.into_inner())
            .sample(accepted);
    }
}

fn issue_if_missing(pki: &Path, name: &PeerName) -> Result<(), FleetError> {
    let paths = PkiPaths::in_dir(pki, name.as_str());
    if paths.cert.exists() && paths.key.exists() {
        return Ok(());
    }
    protocol::tls::issue(pki, name, Role::Agent, Duration::from_secs(30 * 86_400)).map_err(
        |source| FleetError::Issue {
            name: name.to_string(),
            source,
        },
    )
}

/// A line of `/proc/self/status`, in KiB.
fn proc_status(key: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(key))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rate_is_counted_over_the_last_second() {
        let mut m = RateMeter::default();
        m.sample(0);
        m.sample(40);
        m.sample(100);
        assert_eq!(m.peak, 100);
        m.sample(100);
        assert_eq!(m.peak, 100, "the peak stays");
    }
}
