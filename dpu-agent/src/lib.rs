//! The dpu-agent: runs on each DPU, deploys SNAP, drives it through its JSON-RPC socket, keeps a
//! ledger of SNAP's desired configuration and replays it when SNAP restarts, and reports the DPU.
//!
//! Tasks: the protocol server ([`protocol::server`]); one supervision task
//! ([`agent::DpuAgent::supervise_loop`]) that restarts a simulated SNAP, detects lost state,
//! replays the ledger and pushes reports.
//!
//! Modules: [`snap`] (JSON-RPC client and idempotent typed operations), [`ledger`],
//! [`platform`] (BlueField-3 and simulation), [`status`] (host facts), [`agent`] (commands,
//! supervision, report).

pub mod agent;
pub mod ledger;
pub mod platform;
pub mod snap;
pub mod status;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use protocol::names::PeerName;
use protocol::server::{ServerConfig, ServerStats};
use protocol::tls::PkiPaths;
use tracing::info;

use crate::agent::{AgentSettings, DpuAgent};
use crate::ledger::LedgerStore;
use crate::platform::Platform;
use crate::snap::{Snap, SnapClient};

/// Which platform runs SNAP.
pub enum PlatformConfig {
    /// A real BlueField-3.
    BlueField3(platform::bf3::Bf3Config),
    /// The SNAP emulator, supervised by the agent.
    Simulation(platform::sim::SimConfig),
    /// A platform the caller built (the fleet simulator runs SNAP in its own process).
    Custom(Arc<dyn Platform>),
}

/// Everything the agent needs to start.
pub struct Config {
    /// The agent's name.
    pub name: PeerName,
    /// Where to listen.
    pub listen: SocketAddr,
    /// CA, certificate and key.
    pub pki: PkiPaths,
    /// The agent's state directory (fencing token, ledger).
    pub state_dir: PathBuf,
    /// SNAP's socket.
    pub snap_socket: PathBuf,
    /// Deadline of each SNAP request.
    pub snap_timeout: Duration,
    /// The platform.
    pub platform: PlatformConfig,
    /// Supervision interval.
    pub poll_interval: Duration,
    /// Settings of the agent.
    pub settings: AgentSettings,
    /// The protocol server's limits and timers.
    pub server: ServerConfig,
}

/// Errors starting the agent.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS material, fencing-token store or listen address.
    #[error(transparent)]
    Serve(#[from] protocol::server::StartError),
    /// State directory or ledger.
    #[error("cannot use state directory {path}")]
    State {
        /// Directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The platform's configuration is unusable.
    #[error("invalid platform configuration: {0}")]
    Platform(String),
}

/// Builds the agent (without serving): for tests that drive it directly.
pub fn build(
    state_dir: &std::path::Path,
    snap_socket: PathBuf,
    snap_timeout: Duration,
    platform: PlatformConfig,
    settings: AgentSettings,
) -> Result<Arc<DpuAgent>, StartError> {
    let state_err = |source: Box<dyn std::error::Error + Send + Sync>| StartError::State {
        path: state_dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(state_dir).map_err(|e| state_err(e.into()))?;
    let ledger =
        LedgerStore::open(&state_dir.join("snap-ledger.json")).map_err(|e| state_err(e.into()))?;
    let platform: Arc<dyn Platform> = match platform {
        PlatformConfig::BlueField3(c) => {
            std::fs::create_dir_all(&c.staging_dir)
                .map_err(|e| StartError::Platform(format!("{}: {e}", c.staging_dir.display())))?;
            if c.kubelet_dir.exists()
                && !platform::bf3::same_filesystem(&c.staging_dir, &c.kubelet_dir)
            {
                return Err(StartError::Platform(format!(
                    "staging directory {} must be on the same filesystem as {}",
                    c.staging_dir.display(),
                    c.kubelet_dir.display()
                )));
            }
            Arc::new(platform::bf3::BlueField3::new(c))
        }
        PlatformConfig::Simulation(c) => Arc::new(platform::sim::Simulation::new(c)),
        PlatformConfig::Custom(p) => p,
    };
    let snap = Snap::new(SnapClient::new(snap_socket, snap_timeout));
    Ok(Arc::new(DpuAgent::new(snap, platform, ledger, settings)))
}

/// Binds and serves until `shutdown` completes, then drains.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    run_counted(config, Arc::new(ServerStats::default()), |_| {}, shutdown).await
}

/// As [`run`], counting the protocol server's connections and requests into `stats` (shared by
/// the agents of one fleet simulator), and telling `bound` the address it listens on.
pub async fn run_counted(
    config: Config,
    stats: Arc<ServerStats>,
    bound: impl FnOnce(SocketAddr),
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let p = protocol::server::prepare(config.listen, &config.pki, &config.state_dir).await?;
    let agent = build(
        &config.state_dir,
        config.snap_socket.clone(),
        config.snap_timeout,
        config.platform,
        config.settings,
    )?;
    let supervisor = tokio::spawn(agent.clone().supervise_loop(config.poll_interval));
    info!(name = %config.name, addr = %p.local, "dpu-agent listening.");
    protocol::server::announce(config.name.as_str(), p.local);
    bound(p.local);
    protocol::server::run(
        p.listener,
        p.tls,
        agent,
        p.leases,
        config.server,
        stats,
        shutdown,
    )
    .await;
    supervisor.abort();
    info!("dpu-agent stopped.");
    Ok(())
}
