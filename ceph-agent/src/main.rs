//! `ceph-agent`: flags in, [`ceph_agent::run`] out.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use ceph_agent::runner::ProcessRunnerConfig;
use ceph_agent::Config;
use clap::Parser;
use protocol::names::{CephClientId, PeerName};
use protocol::server::ServerConfig;
use protocol::tls::PkiPaths;

/// Operates a Ceph cluster for the unistor controller, over mutual TLS.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// This agent's name; its certificate must name it (a DNS label).
    #[arg(long, env = "CEPH_AGENT_NAME")]
    name: String,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:7400")]
    listen: SocketAddr,
    /// Directory with ca.crt, NAME.crt and NAME.key (see `unistor pki`).
    #[arg(long)]
    pki_dir: PathBuf,
    /// Directory for the agent's own state (the fencing token).
    #[arg(long, default_value = "/var/lib/unistor/ceph-agent")]
    state_dir: PathBuf,
    /// Ceph config file (`ceph -c`).
    #[arg(long, env = "CEPH_CONF")]
    ceph_conf: Option<PathBuf>,
    /// Keyring of the agent's cephx identity.
    #[arg(long)]
    keyring: Option<PathBuf>,
    /// The agent's cephx id, without `client.` (default: Ceph's own default, admin).
    #[arg(long)]
    client_id: Option<String>,
    /// Deadline of every ceph/rbd/rados command; then SIGTERM, then SIGKILL.
    #[arg(long, default_value = "90s", value_parser = humantime::parse_duration)]
    command_timeout: Duration,
    /// Deadline of a short read (the cluster's status, one image's info, watchers or metadata):
    /// a full or stuck cluster fails a report after this, not after a create's time. Listings
    /// of a whole pool keep --command-timeout.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    read_timeout: Duration,
    /// Run every operation as a ceph/rbd/rados command, never through librados/librbd in
    /// process (by default creates, renames, pool listings and index writes use the libraries).
    #[arg(long)]
    no_librbd: bool,
    /// How often the cluster's status (health, capacity, pools) is re-read.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    report_interval: Duration,
    /// Images the background sweep re-reads per second (two `rbd` commands each), to find
    /// changes made behind unistor's back. 10/s re-reads 1,000 images in 100 s.
    #[arg(long, default_value_t = 10.0)]
    sweep_rate: f64,
    /// Images read (or changed by the agent) more recently than this are not re-read yet.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    sweep_min_age: Duration,
    /// How often the per-pool listings (unistor index, trash) are re-read.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pool_refresh: Duration,
    /// Connections allowed from one address.
    #[arg(long, default_value_t = 100)]
    max_connections_per_peer: usize,
}

fn main() -> ExitCode {
    let args = match agent_kit::cli::parse::<Args>() {
        Ok(a) => a,
        Err(code) => return code,
    };
    agent_kit::cli::init_tracing("info");
    let config = match config(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ceph-agent: {e}");
            return ExitCode::from(agent_kit::cli::USAGE);
        }
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(ceph_agent::run(config, protocol::shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ceph-agent: {}", protocol::error::chain(&e));
            ExitCode::FAILURE
        }
    }
}

fn config(args: Args) -> Result<Config, protocol::names::NameError> {
    let name = PeerName::parse("--name", &args.name)?;
    if let Some(id) = &args.client_id {
        CephClientId::parse("--client-id", id)?;
    }
    let mut server = ServerConfig::new(name.as_str());
    server.max_connections_per_peer = args.max_connections_per_peer;
    Ok(Config {
        pki: PkiPaths::in_dir(&args.pki_dir, name.as_str()),
        name,
        listen: args.listen,
        state_dir: args.state_dir,
        cli: ProcessRunnerConfig {
            conf: args.ceph_conf,
            keyring: args.keyring,
            client_id: args.client_id,
            timeout: args.command_timeout,
            read_timeout: args.read_timeout,
            library: !args.no_librbd,
            ..ProcessRunnerConfig::default()
        },
        report_interval: args.report_interval,
        view: ceph_agent::ceph::ViewOptions {
            sweep_rate: args.sweep_rate,
            sweep_min_age: args.sweep_min_age,
            pool_refresh: args.pool_refresh,
            ..Default::default()
        },
        server,
    })
}
