//! `snap-emulator`: flags in, [`snap_emulator::run`] out. Exits 1 after a simulated crash.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use snap_emulator::{ceph::RealCeph, Config, Exit, Faults};

/// Serves SNAP's JSON-RPC socket like DOCA SNAP-4 on a BlueField-3.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Socket path.
    #[arg(long, default_value = "/var/tmp/spdk.sock")]
    socket: PathBuf,
    /// Static NVMe PFs (at most 4).
    #[arg(long, default_value_t = 2)]
    pfs: u32,
    /// VFs per PF (at most 127).
    #[arg(long, default_value_t = 8)]
    vfs_per_pf: u32,
    /// Device serial used in VUIDs.
    #[arg(long, default_value = "MT2328XZ17DF")]
    serial: String,
    /// Behave as an SPDK built without RBD (`bdev_rbd_*` answer -32601).
    #[arg(long)]
    no_rbd: bool,
    /// Check clusters and images against the real Ceph cluster the requests name.
    #[arg(long)]
    real_ceph: bool,
    /// Image size assumed for bdevs when not in real-Ceph mode.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    default_image_size: u64,
    /// Init file replayed at start (repeatable).
    #[arg(long = "init-conf")]
    init_conf: Vec<PathBuf>,
    /// Latency per method, `METHOD=DURATION` or `*=DURATION` (repeatable).
    #[arg(long, value_parser = parse_latency)]
    latency: Vec<(String, Duration)>,
    /// Latency per method after the call took effect, before its answer (repeatable).
    #[arg(long, value_parser = parse_latency)]
    reply_latency: Vec<(String, Duration)>,
    /// Probability that a call fails with -5 before taking effect.
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Seed of the fault generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Exit (as a crash, leaving the socket file) after this many calls.
    #[arg(long)]
    exit_after: Option<u64>,
    /// Start in SPDK's startup state: serve only `rpc_get_methods`, `spdk_get_version` and
    /// `framework_*` until `framework_start_init` (as `snap_service --wait-for-rpc`).
    #[arg(long)]
    wait_for_rpc: bool,
    /// Serve the simulated host's devices here: an NBD socket per namespace attached to a
    /// started controller (`<controller>-n<nsid>.nbd`), and the host's account (`host.json`).
    #[arg(long)]
    host_dir: Option<PathBuf>,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s {
        s if s.ends_with("GiB") => (&s[..s.len() - 3], 1u64 << 30),
        s if s.ends_with("MiB") => (&s[..s.len() - 3], 1u64 << 20),
        s => (s, 1),
    };
    num.parse::<u64>()
        .map(|n| n * mult)
        .map_err(|e| format!("{s:?}: {e}"))
}

fn parse_latency(s: &str) -> Result<(String, Duration), String> {
    let (m, d) = s.split_once('=').ok_or("expected METHOD=DURATION")?;
    let d = humantime::parse_duration(d).map_err(|e| e.to_string())?;
    Ok((m.to_string(), d))
}

fn main() -> ExitCode {
    // A usage error exits 1, as unistor's other programs do (clap's own code is 2).
    let a = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = Config {
        socket: a.socket,
        pfs: a.pfs,
        vfs_per_pf: a.vfs_per_pf,
        serial: a.serial,
        rbd: !a.no_rbd,
        real_ceph: a.real_ceph.then(|| RealCeph::new(Duration::from_secs(20))),
        init_files: a.init_conf,
        faults: Faults {
            latency: a.latency.into_iter().collect::<BTreeMap<_, _>>(),
            reply_latency: a.reply_latency.into_iter().collect::<BTreeMap<_, _>>(),
            error_rate: a.error_rate,
            seed: a.seed,
            exit_after: a.exit_after,
        },
        default_image_size: a.default_image_size,
        wait_for_rpc: a.wait_for_rpc,
        host_dir: a.host_dir,
    };
    let rt = tokio::runtime::Runtime::new().expect("tokio runtime");
    let shutdown = async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    match rt.block_on(snap_emulator::run(config, shutdown)) {
        Ok(Exit::Stopped) => ExitCode::SUCCESS,
        Ok(Exit::Crashed) => ExitCode::FAILURE,
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("snap-emulator: {msg}");
            ExitCode::from(64)
        }
    }
}
