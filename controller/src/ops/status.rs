//! `unistor status`: the fleet's status, from the watch daemon when one runs for the same
//! manifests, else from the agents.

use std::process::ExitCode;

use clap::Args;

use super::daemon::from_daemon;
use super::{connect, load, Common, Format, OpsError};

/// `unistor status`
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Manifests and agents.
    #[command(flatten)]
    pub common: Common,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Format,
    /// The watch daemon to read from when it runs for the same manifest directory.
    #[arg(long, env = "UNISTOR_DAEMON", default_value = "http://127.0.0.1:7480")]
    pub daemon: String,
    /// Ask the agents directly, even when a daemon runs.
    #[arg(long)]
    pub direct: bool,
}

/// `unistor status`: exit 0 when every volume is ok, 1 otherwise. Read from the watch daemon
/// when one runs for the same manifests (it holds sessions with every agent), else from the
/// agents.
pub async fn status_cmd(a: StatusArgs) -> Result<ExitCode, OpsError> {
    let daemon = if a.direct {
        None
    } else {
        let (url, dir) = (a.daemon.clone(), a.common.dir.clone());
        tokio::task::spawn_blocking(move || from_daemon(&url, &dir))
            .await
            .ok()
            .flatten()
    };
    let status = match daemon {
        Some(view) => {
            if matches!(a.output, Format::Text) {
                println!(
                    "From the watch daemon at {} (last reconcile: {}).\n",
                    a.daemon,
                    view.last_reconcile
                        .as_ref()
                        .map(|r| format!("{} at {}", r.result, r.at))
                        .unwrap_or_else(|| "none yet".into())
                );
            }
            view.fleet
        }
        None => {
            let desired = load(&a.common.dir)?;
            let fleet = connect(&a.common, &desired).await?;
            let observed = fleet.observe(a.common.report_timeout).await;
            crate::status::FleetStatus::new(&desired, &observed)
        }
    };
    match a.output {
        Format::Text => print!("{}", status.render()),
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&status).expect("serializable")
        ),
    }
    Ok(if status.all_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
