//! `dpu-agent`: flags in, [`dpu_agent::run`] out.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use dpu_agent::agent::AgentSettings;
use dpu_agent::platform::{bf3::Bf3Config, sim::SimConfig};
use dpu_agent::{Config, PlatformConfig};
use protocol::names::PeerName;
use protocol::server::ServerConfig;
use protocol::tls::PkiPaths;

/// Deploys and drives SNAP on a BlueField-3 DPU for the unistor controller, over mutual TLS.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// This agent's name; its certificate must name it (a DNS label).
    #[arg(long, env = "DPU_AGENT_NAME")]
    name: String,
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:7401")]
    listen: SocketAddr,
    /// Directory with ca.crt, NAME.crt and NAME.key (see `unistor pki`).
    #[arg(long)]
    pki_dir: PathBuf,
    /// The agent's state (fencing token, SNAP ledger).
    #[arg(long, default_value = "/var/lib/unistor/dpu-agent")]
    state_dir: PathBuf,
    /// Where SNAP runs.
    #[arg(long, value_enum, default_value = "bluefield3")]
    platform: PlatformArg,
    /// SNAP's JSON-RPC socket.
    #[arg(long, default_value = "/var/tmp/spdk.sock")]
    snap_socket: PathBuf,
    /// Deadline of each SNAP request.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    snap_timeout: Duration,
    /// How often SNAP is checked (restarts, lost state).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// Do not replay the ledger when SNAP lost its configuration (report only).
    #[arg(long)]
    no_replay: bool,
    /// Heartbeat interval.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// A full report is pushed at least this often.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    full_report_every: Duration,
    /// How long to wait for SNAP to become ready after a deployment.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    ready_timeout: Duration,
    /// BlueField-3: the MST device.
    #[arg(long, default_value = "/dev/mst/mt41692_pciconf0")]
    mst_device: String,
    /// BlueField-3: kubelet's static-pod directory.
    #[arg(long, default_value = "/etc/kubelet.d")]
    kubelet_dir: PathBuf,
    /// BlueField-3: staging directory for the pod file (same filesystem, outside kubelet_dir).
    #[arg(long, default_value = "/etc/unistor/staging")]
    staging_dir: PathBuf,
    /// Simulation: the snap-emulator binary (default: next to this binary).
    #[arg(long)]
    emulator: Option<PathBuf>,
    /// Simulation: extra emulator arguments, e.g. `--real-ceph` (repeatable).
    #[arg(long = "emulator-arg", allow_hyphen_values = true)]
    emulator_args: Vec<String>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum PlatformArg {
    Bluefield3,
    Simulation,
}

fn main() -> ExitCode {
    let a = match agent_kit::cli::parse::<Args>() {
        Ok(a) => a,
        Err(code) => return code,
    };
    agent_kit::cli::init_tracing("info");
    let name = match PeerName::parse("--name", &a.name) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("dpu-agent: {e}");
            return ExitCode::from(agent_kit::cli::USAGE);
        }
    };
    let platform = match a.platform {
        PlatformArg::Bluefield3 => PlatformConfig::BlueField3(Bf3Config {
            device: a.mst_device,
            kubelet_dir: a.kubelet_dir,
            staging_dir: a.staging_dir,
            ready_timeout: a.ready_timeout,
            ..Bf3Config::standard()
        }),
        PlatformArg::Simulation => {
            let emulator = a.emulator.unwrap_or_else(|| {
                std::env::current_exe()
                    .ok()
                    .and_then(|p| p.parent().map(|d| d.join("snap-emulator")))
                    .unwrap_or_else(|| "snap-emulator".into())
            });
            PlatformConfig::Simulation(SimConfig {
                emulator,
                socket: a.snap_socket.clone(),
                state_file: a.state_dir.join("simulated-snap.json"),
                log_file: a.state_dir.join("snap-emulator.log"),
                extra_args: a.emulator_args,
                host_dir: a.state_dir.join("host"),
                ready_timeout: a.ready_timeout,
            })
        }
    };
    let mut server = ServerConfig::new(name.as_str());
    server.heartbeat_interval = a.heartbeat;
    let config = Config {
        pki: PkiPaths::in_dir(&a.pki_dir, name.as_str()),
        name,
        listen: a.listen,
        state_dir: a.state_dir,
        snap_socket: a.snap_socket,
        snap_timeout: a.snap_timeout,
        platform,
        poll_interval: a.poll_interval,
        settings: AgentSettings {
            proc_root: "/proc".into(),
            sys_root: "/sys".into(),
            replay: !a.no_replay,
            full_report_every: a.full_report_every,
        },
        server,
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    match rt.block_on(dpu_agent::run(config, protocol::shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dpu-agent: {}", protocol::error::chain(&e));
            ExitCode::FAILURE
        }
    }
}
