//! `fleet-sim`: flags in, [`fleet_sim::Fleet`] out. Prints `NAME: listening on ADDR` for every
//! DPU, then `fleet-sim: N DPUs up`, then answers commands on stdin (see the crate's docs).

use std::net::IpAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use fleet_sim::snap::EmulatorTemplate;
use fleet_sim::{Fleet, FleetConfig};
use snap_emulator::ceph::{RealCeph, SharedConnections};

/// Many simulated DPUs in one process: each a dpu-agent endpoint over its own SNAP emulator.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Directory with ca.crt and each DPU's NAME.crt and NAME.key.
    #[arg(long)]
    pki_dir: PathBuf,
    /// Issue a DPU's certificate from the CA's key in --pki-dir when it has none.
    #[arg(long)]
    issue_missing: bool,
    /// One directory per DPU is made here.
    #[arg(long)]
    state_dir: PathBuf,
    /// DPUs to simulate.
    #[arg(long, default_value_t = 100)]
    dpus: usize,
    /// DPU i is named PREFIX-i.
    #[arg(long, default_value = "dpu")]
    prefix: String,
    /// Address every agent listens on (each on a port of the system's choosing).
    #[arg(long, default_value = "127.0.0.1")]
    listen_ip: IpAddr,
    /// Each agent's SNAP supervision interval.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    poll_interval: Duration,
    /// Each agent's heartbeat interval.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// A full report is pushed at least this often.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    full_report_every: Duration,
    /// Back bdevs by the real Ceph cluster the requests name (one connection per set of
    /// credentials for the whole process); otherwise bdevs are memory.
    #[arg(long)]
    real_ceph: bool,
    /// Latency of every SNAP call.
    #[arg(long, default_value = "0ms", value_parser = humantime::parse_duration)]
    snap_latency: Duration,
    /// Image size of a bdev without --real-ceph, in MiB.
    #[arg(long, default_value_t = 1024)]
    default_image_mib: u64,
}

fn main() -> ExitCode {
    let a = match agent_kit::cli::parse::<Args>() {
        Ok(a) => a,
        Err(code) => return code,
    };
    agent_kit::cli::init_tracing("warn");
    let timeout = Duration::from_secs(20);
    let config = FleetConfig {
        pki_dir: a.pki_dir,
        issue_missing: a.issue_missing,
        state_dir: a.state_dir,
        prefix: a.prefix,
        dpus: a.dpus,
        listen_ip: a.listen_ip,
        poll_interval: a.poll_interval,
        heartbeat: a.heartbeat,
        full_report_every: a.full_report_every,
        emulator: EmulatorTemplate {
            real_ceph: a
                .real_ceph
                .then(|| RealCeph::sharing(timeout, SharedConnections::default())),
            latency: a.snap_latency,
            default_image_size: a.default_image_mib << 20,
            ready_timeout: timeout,
        },
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    rt.block_on(async {
        let fleet = match Fleet::start(config).await {
            Ok(f) => f,
            Err(e) => {
                eprintln!("fleet-sim: {}", protocol::error::chain(&e));
                return ExitCode::FAILURE;
            }
        };
        println!("fleet-sim: {} DPUs up", fleet.up());
        let stdin = tokio::io::BufReader::new(tokio::io::stdin());
        fleet.control(stdin, protocol::shutdown_signal()).await;
        ExitCode::SUCCESS
    })
}
