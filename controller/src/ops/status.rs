//! `unistor status`: the fleet's status, from the watch daemon when one runs for the same
//! manifests, else from the agents.

use std::process::ExitCode;

use clap::Args;

use super::daemon::from_daemon;
use super::{connect, load, Common, Format, OpsError};
use crate::status::{FleetStatus, Selection};

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
    /// Only volumes in this state (`ok`, `degraded`, `unknown`; DPUs by health), or `problems`
    /// for everything that is not ok.
    #[arg(long)]
    pub state: Option<String>,
    /// Only this host's volumes and DPU.
    #[arg(long)]
    pub host: Option<String>,
    /// Only this DPU and its volumes.
    #[arg(long)]
    pub dpu: Option<String>,
    /// Only volumes with this label: `key` or `key=value`.
    #[arg(long)]
    pub label: Option<String>,
    /// Only volumes (and DPUs) whose volume, image, host or DPU name contains this text.
    #[arg(long)]
    pub search: Option<String>,
    /// Skip this many matches (paging).
    #[arg(long, default_value_t = 0)]
    pub offset: usize,
    /// List at most this many volumes and DPUs (the counts are always the whole fleet's).
    #[arg(long, default_value_t = 200)]
    pub limit: usize,
}

impl StatusArgs {
    fn selection(&self) -> Selection {
        Selection {
            state: self.state.clone(),
            host: self.host.clone(),
            dpu: self.dpu.clone(),
            label: self.label.clone(),
            q: self.search.clone(),
            offset: self.offset,
            limit: Some(self.limit),
        }
    }

    fn filtered(&self) -> bool {
        self.state.is_some()
            || self.host.is_some()
            || self.dpu.is_some()
            || self.label.is_some()
            || self.search.is_some()
    }
}

/// How many problems lead the text output.
const PROBLEMS_SHOWN: usize = 20;

/// `unistor status`: exit 0 when every volume is ok, 1 otherwise. Read from the watch daemon
/// when one runs for the same manifests (it holds sessions with every agent), else from the
/// agents.
pub async fn status_cmd(a: StatusArgs) -> Result<ExitCode, OpsError> {
    let sel = a.selection();
    let daemon = if a.direct {
        None
    } else {
        let (url, dir, q) = (a.daemon.clone(), a.common.dir.clone(), sel.clone());
        tokio::task::spawn_blocking(move || from_daemon(&url, &dir, &q))
            .await
            .ok()
            .flatten()
    };
    let text = matches!(a.output, Format::Text);
    // Text leads with the problems (when the listing is not already a filter of its own).
    let problems_sel = Selection {
        state: Some("problems".into()),
        limit: Some(PROBLEMS_SHOWN),
        ..Selection::default()
    };
    let mut problems = None;
    let mut replicas = None;
    let status = match daemon {
        Some(view) => {
            replicas = view.replicas.clone();
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
            if text && !a.filtered() && !view.fleet.all_ok() {
                let (url, dir) = (a.daemon.clone(), a.common.dir.clone());
                let q = problems_sel.clone();
                problems = tokio::task::spawn_blocking(move || from_daemon(&url, &dir, &q))
                    .await
                    .ok()
                    .flatten()
                    .map(|v| v.fleet);
            }
            view.fleet
        }
        None => {
            let desired = load(&a.common.dir)?;
            let fleet = connect(&a.common, &desired).await?;
            let observed = fleet.observe(a.common.report_timeout).await;
            let whole = FleetStatus::new(&desired, &observed);
            if text && !a.filtered() && !whole.all_ok() {
                problems = Some(whole.selected(&problems_sel));
            }
            whole.selected(&sel)
        }
    };
    match a.output {
        Format::Text => {
            print!("{}", status.render_summary());
            if let Some(r) = &replicas {
                print!("{}", r.render());
            }
            if let Some(p) = problems {
                print!("{}", p.render_problems());
            }
            print!("{}", status.render_for(replicas.is_some()));
        }
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
