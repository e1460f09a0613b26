//! The fleet commands: `plan` and `apply` (observe, plan, check the safety rails, execute,
//! re-plan), `status`, `suspend`/`resume`. One module per command, the rails apart; what they
//! share (arguments, loading, connecting, the saved plan's fingerprint) is here.

mod apply;
mod daemon;
mod fence;
mod plan_cmd;
mod rails;
mod status;

pub use apply::{apply_cmd, exit_code, ApplyArgs};
pub use daemon::{suspend_cmd, SuspendArgs};
pub use fence::{fence_cmd, FenceArgs};
pub use plan_cmd::{plan_cmd, PlanArgs};
pub use rails::{check_rails, with_live_watchers, Rails, Refusal};
pub use status::{status_cmd, StatusArgs};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use protocol::client::ClientOptions;
use protocol::names::PeerName;
use protocol::tls::{self, PkiPaths};
use serde::{Deserialize, Serialize};

use crate::execute::ExecOptions;
use crate::fleet::{Fleet, FleetOptions};
use crate::manifest::{self, Desired};
use crate::plan::{self, Observed, Options, Plan};

/// What every fleet command needs.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// The manifest directory.
    pub dir: PathBuf,
    /// PKI directory with ca.crt and the controller's certificate.
    #[arg(long, default_value = "pki")]
    pub pki_dir: PathBuf,
    /// The controller's certificate name in the PKI directory.
    #[arg(long, default_value = "controller")]
    pub controller: String,
    /// Value of `unistor.managed-by`: which images this deployment owns.
    #[arg(long, default_value = "unistor")]
    pub owner: String,
    /// Deadline of each agent's report.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub report_timeout: Duration,
    /// Which Ceph health halts every step that writes to the cluster: `standard` (HEALTH_ERR,
    /// OSD_FULL, POOL_FULL, PG_AVAILABILITY), `off`, or a comma-separated list of HEALTH_ERR
    /// and health check names.
    #[arg(long, default_value = "standard", value_parser = crate::plan::HealthGate::parse)]
    pub health_gate: crate::plan::HealthGate,
}

/// Output formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    /// For people.
    Text,
    /// The plan as JSON.
    Json,
}

/// The format of a saved plan: 2 since steps carry the commands they send.
const SAVED_PLAN_VERSION: u32 = 2;

/// A saved plan.
#[derive(Debug, Serialize, Deserialize)]
struct SavedPlan {
    version: u32,
    fingerprint: String,
    plan: Plan,
}

/// Errors of fleet commands (shown as one line, exit 1).
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Manifests are invalid.
    #[error("{count} problem(s) in the manifests:\n{list}")]
    Manifests {
        /// How many.
        count: usize,
        /// One per line.
        list: String,
    },
    /// TLS material.
    #[error("cannot load the controller's certificate")]
    Tls(#[from] protocol::tls::TlsError),
    /// A name.
    #[error("invalid argument")]
    Name(#[from] protocol::names::NameError),
    /// The safety rails refused the plan.
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// A command's argument, or what it asked for, is wrong.
    #[error("{0}")]
    Invalid(String),
    /// The saved plan is stale.
    #[error("the saved plan {path} is stale: {why}; run `unistor plan` again")]
    Stale {
        /// The file.
        path: PathBuf,
        /// What changed.
        why: String,
    },
    /// A file.
    #[error("{path}")]
    File {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not confirmed.
    #[error("apply cancelled")]
    Cancelled,
    /// The watch daemon refused or could not be reached.
    #[error("watch daemon at {daemon}: {why}")]
    Daemon {
        /// Its URL.
        daemon: String,
        /// What went wrong.
        why: String,
    },
}

fn load(dir: &std::path::Path) -> Result<Desired, OpsError> {
    manifest::load_dir(dir).map_err(|errors| OpsError::Manifests {
        count: errors.len(),
        list: errors
            .iter()
            .map(|e| format!("  {e}"))
            .collect::<Vec<_>>()
            .join("\n"),
    })
}

/// How the agents of `c` are reached: the controller's certificate and client timers.
pub fn fleet_options(c: &Common) -> Result<FleetOptions, OpsError> {
    let me = PeerName::parse("--controller", &c.controller)?;
    let tls = tls::client_config(&PkiPaths::in_dir(&c.pki_dir, me.as_str()))?;
    Ok(FleetOptions {
        tls,
        client: ClientOptions {
            controller_name: me.to_string(),
            ..ClientOptions::default()
        },
        report_timeout: c.report_timeout,
    })
}

async fn connect(c: &Common, desired: &Desired) -> Result<Arc<Fleet>, OpsError> {
    Ok(Arc::new(Fleet::connect(desired, &fleet_options(c)?).await))
}

/// A fingerprint of what the plan was made from: the desired state as it serializes (what it
/// means, not where it was written: no file, line or label) and the observed objects (not the
/// fast-moving host counters). Canonical: struct fields in declaration order, maps sorted.
pub fn fingerprint(desired: &Desired, observed: &Observed) -> String {
    let mut stable = serde_json::Map::new();
    for (n, k) in &observed.clusters {
        let v = match k.get() {
            Some(r) => {
                serde_json::json!({"images": r.images, "pools": r.pools.iter().map(|p| (&p.name, p.rbd_enabled)).collect::<Vec<_>>()})
            }
            None => serde_json::json!("unknown"),
        };
        stable.insert(format!("cluster/{n}"), v);
    }
    for (n, k) in &observed.dpus {
        let v = match k.get() {
            Some(r) => {
                serde_json::json!({"snap": [&r.snap.state, &r.snap.image], "inventory": r.inventory})
            }
            None => serde_json::json!("unknown"),
        };
        stable.insert(format!("dpu/{n}"), v);
    }
    stable.insert(
        "desired".into(),
        serde_json::to_value(desired).expect("the desired state serializes"),
    );
    let text = serde_json::Value::Object(stable).to_string();
    format!("{:016x}", plan::fnv(&text))
}
/// Writes a saved plan atomically (a temporary file in the same directory, fsync, rename): a
/// process killed while writing leaves the old file or none, never half a plan that
/// `apply --plan` would then refuse as malformed.
fn write_plan_file(path: &std::path::Path, bytes: &[u8]) -> Result<(), OpsError> {
    agent_kit::fsutil::write_atomic(path, bytes).map_err(|source| OpsError::File {
        path: path.to_path_buf(),
        source,
    })
}

/// Plans, first asking the clusters about any image the plan would create (see
/// [`crate::fleet::probe_creates`]): an image that exists without unistor's keys then shows as
/// not owned, or is adopted when its volume asks, instead of planned as a create.
pub async fn plan_probed(
    desired: &Desired,
    observed: &mut Observed,
    fleet: &Fleet,
    opts: &Options,
) -> Plan {
    // Scheduled snapshots are judged by this controller's wall clock, read once per plan.
    let timed;
    let opts = if opts.now.is_none() {
        timed = Options {
            now: Some(protocol::clock::unix_ms() / 1000),
            ..opts.clone()
        };
        &timed
    } else {
        opts
    };
    let p = plan::plan(desired, observed, opts);
    if crate::fleet::probe_creates(&p, observed, fleet).await == 0 {
        return p;
    }
    plan::plan(desired, observed, opts)
}

/// What planning needs from the command line: the owner and the health gate.
pub fn plan_options(c: &Common) -> Options {
    Options {
        owner: c.owner.clone(),
        health_gate: c.health_gate.clone(),
        ..Options::default()
    }
}

/// What planning and executing need from the command line: the owner, and whether deletes may
/// run.
pub fn run_options(c: &Common, rails: &Rails) -> (Options, ExecOptions) {
    let opts = plan_options(c);
    let exec = ExecOptions {
        owner: c.owner.clone(),
        allow_delete: rails.allow_delete,
        allow_in_use: rails.allow_in_use,
        health_gate: c.health_gate.clone(),
        ..ExecOptions::default()
    };
    (opts, exec)
}

#[cfg(test)]
mod tests;
