//! Talking to the watch daemon over its HTTP API: `unistor suspend|resume`, and the status it
//! holds.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use super::OpsError;

/// `unistor suspend|resume`
#[derive(Debug, Args)]
pub struct SuspendArgs {
    /// `volume/NAME` or `dpu/NAME`.
    pub object: String,
    /// The watch daemon.
    #[arg(long, env = "UNISTOR_DAEMON", default_value = "http://127.0.0.1:7480")]
    pub daemon: String,
}

fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// `unistor suspend|resume KIND/NAME`: asks the daemon.
pub fn suspend_cmd(a: SuspendArgs, on: bool) -> Result<ExitCode, OpsError> {
    let Some((kind, name)) = a.object.split_once('/') else {
        return Err(OpsError::Daemon {
            daemon: a.daemon,
            why: format!("{:?}: expected volume/NAME or dpu/NAME", a.object),
        });
    };
    let url = format!(
        "{}/api/v1/{}/{kind}/{name}",
        a.daemon.trim_end_matches('/'),
        if on { "suspend" } else { "resume" }
    );
    let daemon_err = |why: String| OpsError::Daemon {
        daemon: a.daemon.clone(),
        why,
    };
    let mut resp = http_agent()
        .post(&url)
        // The daemon takes state changes only as JSON (cross-site forms cannot send it).
        .header("Content-Type", "application/json")
        .send("{}")
        .map_err(|e| daemon_err(e.to_string()))?;
    let body: serde_json::Value = resp
        .body_mut()
        .read_json()
        .map_err(|e| daemon_err(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(daemon_err(
            body["error"].as_str().unwrap_or("request refused").into(),
        ));
    }
    println!(
        "{kind}/{name}: {}{}",
        body["state"].as_str().unwrap_or("?"),
        if body["changed"].as_bool() == Some(false) {
            " (already)"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// The daemon's view, when a daemon answers at `url` for the manifest directory `dir`.
pub(super) fn from_daemon(
    url: &str,
    dir: &std::path::Path,
    sel: &crate::status::Selection,
) -> Option<crate::watch::state::DaemonView> {
    let mut req = http_agent().get(&format!("{}/api/v1/status", url.trim_end_matches('/')));
    let q = [
        ("state", sel.state.clone()),
        ("host", sel.host.clone()),
        ("dpu", sel.dpu.clone()),
        ("label", sel.label.clone()),
        ("q", sel.q.clone()),
        ("offset", Some(sel.offset.to_string())),
        ("limit", sel.limit.map(|l| l.to_string())),
    ];
    for (k, v) in q {
        if let Some(v) = v {
            req = req.query(k, v);
        }
    }
    let mut resp = req.call().ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let view: crate::watch::state::DaemonView = resp.body_mut().read_json().ok()?;
    let same = dir.canonicalize().ok()? == view.manifests.dir;
    same.then_some(view)
}
