//! Real-Ceph mode: `bdev_rbd_register_cluster` checks the credentials against the cluster and
//! `bdev_rbd_create` checks that the image exists and takes its real size, as SPDK's librados and
//! librbd calls would. Failures answer -1 "Operation not permitted", as SPDK does.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde::Deserialize;
use tokio::process::Command;
use tracing::warn;

use crate::state::{ClusterParams, RbdCreateParams, RpcError};

/// Where the Ceph CLI is and how long to wait for it.
#[derive(Debug, Clone)]
pub struct RealCeph {
    /// Directory of `rados` and `rbd`; `None` searches `PATH`.
    pub bin_dir: Option<PathBuf>,
    /// Deadline of each check (librados' own connect timeout plays this role in SPDK).
    pub timeout: Duration,
}

/// Connection arguments for one cluster; keeps the temporary key file alive.
struct Conn {
    args: Vec<String>,
    _keyfile: Option<tempfile::NamedTempFile>,
}

fn conn_args(
    user_id: Option<&str>,
    config: Option<&BTreeMap<String, String>>,
    config_file: Option<&str>,
    key_file: Option<&str>,
) -> Result<Conn, RpcError> {
    let mut args = vec![];
    let mut keyfile = None;
    match config_file {
        Some(f) => args.extend(["--conf".into(), f.to_string()]),
        // No config file at all: everything comes from the parameters.
        None => args.extend(["--conf".into(), "/dev/null".into()]),
    }
    if let Some(k) = key_file {
        args.extend(["--keyring".into(), k.to_string()]);
    }
    args.extend(["--id".into(), user_id.unwrap_or("admin").to_string()]);
    for (k, v) in config.into_iter().flatten() {
        match k.as_str() {
            // The secret goes through a 0600 file, never argv.
            "key" => {
                let mut f = tempfile::NamedTempFile::new().map_err(|_| RpcError::eperm())?;
                f.write_all(v.as_bytes()).map_err(|_| RpcError::eperm())?;
                args.extend(["--keyfile".into(), f.path().display().to_string()]);
                keyfile = Some(f);
            }
            "mon_host" => args.extend(["--mon-host".into(), v.clone()]),
            // Other options as `--name value` (librados' config names).
            other if other.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') => {
                args.extend([format!("--{other}"), v.clone()]);
            }
            _ => return Err(RpcError::eperm()),
        }
    }
    Ok(Conn {
        args,
        _keyfile: keyfile,
    })
}

#[derive(Deserialize)]
struct Info {
    size: u64,
}

impl RealCeph {
    async fn run(&self, tool: &str, conn: &Conn, tail: &[&str]) -> Result<Vec<u8>, RpcError> {
        let program = match &self.bin_dir {
            Some(d) => d.join(tool),
            None => PathBuf::from(tool),
        };
        let child = Command::new(program)
            .args(&conn.args)
            .args([
                "--client_mount_timeout",
                &self.timeout.as_secs().max(1).to_string(),
            ])
            .args(tail)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                warn!(tool, error = %e, "Cannot run the Ceph CLI.");
                RpcError::eperm()
            })?;
        let out = tokio::time::timeout(
            self.timeout + Duration::from_secs(5),
            child.wait_with_output(),
        )
        .await
        .map_err(|_| RpcError::eperm())?
        .map_err(|_| RpcError::eperm())?;
        if !out.status.success() {
            warn!(tool, stderr = %String::from_utf8_lossy(&out.stderr).trim(), "Ceph check failed.");
            return Err(RpcError::eperm());
        }
        Ok(out.stdout)
    }

    /// Connects with the cluster's credentials (`rados lspools`).
    pub async fn check_cluster(&self, p: &ClusterParams) -> Result<(), RpcError> {
        let conn = conn_args(
            p.user_id.as_deref(),
            p.config_param.as_ref(),
            p.config_file.as_deref(),
            p.key_file.as_deref(),
        )?;
        self.run("rados", &conn, &["lspools"]).await.map(|_| ())
    }

    /// Opens the image (`rbd info`) with the cluster's or the request's credentials; its size.
    pub async fn image_size(
        &self,
        p: &RbdCreateParams,
        cluster: Option<&ClusterParams>,
    ) -> Result<u64, RpcError> {
        let conn = match cluster {
            Some(c) => conn_args(
                c.user_id.as_deref(),
                c.config_param.as_ref(),
                c.config_file.as_deref(),
                c.key_file.as_deref(),
            )?,
            None => conn_args(p.user_id.as_deref(), p.config.as_ref(), None, None)?,
        };
        let out = self
            .run(
                "rbd",
                &conn,
                &[
                    "info",
                    "--format",
                    "json",
                    "--pool",
                    &p.pool_name,
                    "--",
                    &p.rbd_name,
                ],
            )
            .await?;
        let info: Info = serde_json::from_slice(&out).map_err(|_| RpcError::eperm())?;
        Ok(info.size)
    }
}
