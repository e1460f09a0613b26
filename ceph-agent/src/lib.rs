//! The ceph-agent: runs on a Ceph admin node and operates the cluster for the controller.
//!
//! Tasks: the protocol server's accept loop and one task per controller connection
//! ([`protocol::server`]); one report task that polls the cluster and pushes the report to every
//! connected controller when it changes (and every `full_every` polls regardless).
//!
//! Modules: [`runner`] spawns `ceph`/`rbd`/`rados` (argv only, deadlines, SIGTERM then SIGKILL);
//! [`ceph`] turns operations into command lines and parses their JSON; [`handler`] routes wire
//! commands, checking every name before it goes further.

pub mod ceph;
pub mod handler;
pub mod import_stream;
pub mod index;
pub mod library;
pub mod runner;
pub mod view;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use protocol::names::PeerName;
use protocol::server::{ServerConfig, ServerStats};
use protocol::tls::PkiPaths;
use tracing::info;

use crate::ceph::Ceph;
use crate::handler::CephHandler;
use crate::runner::{ProcessRunner, ProcessRunnerConfig};

/// Everything the agent needs to start.
#[derive(Debug, Clone)]
pub struct Config {
    /// The agent's name (DNS label; its certificate names it).
    pub name: PeerName,
    /// Where to listen.
    pub listen: SocketAddr,
    /// CA, certificate and key.
    pub pki: PkiPaths,
    /// Where the fencing token is kept.
    pub state_dir: PathBuf,
    /// How to run the Ceph CLI.
    pub cli: ProcessRunnerConfig,
    /// How often the cluster's status is re-read.
    pub report_interval: Duration,
    /// The image view's sweep.
    pub view: crate::ceph::ViewOptions,
    /// Limits and timers of the protocol server.
    pub server: ServerConfig,
}

pub use protocol::server::StartError;

/// Binds and serves until `shutdown` completes, then drains.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), StartError> {
    let p = protocol::server::prepare(config.listen, &config.pki, &config.state_dir).await?;
    let own_id = config.cli.client_id.clone();
    let handler = Arc::new(CephHandler::new(Ceph::with_options(
        ProcessRunner::new(config.cli.clone()),
        own_id.as_deref(),
        config.view.clone(),
    )));
    let reporter = tokio::spawn(handler.clone().report_loop(config.report_interval));
    info!(name = %config.name, addr = %p.local, "ceph-agent listening.");
    protocol::server::announce(config.name.as_str(), p.local);
    protocol::server::run(
        p.listener,
        p.tls,
        handler,
        p.leases,
        config.server,
        Arc::new(ServerStats::default()),
        shutdown,
    )
    .await;
    reporter.abort();
    info!("ceph-agent stopped.");
    Ok(())
}
