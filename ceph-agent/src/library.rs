//! librados and librbd in the agent's own process (the `ceph-lib` crate), for the calls on an
//! edit's path and for the sweep: listing a pool's image names (the probe before a create),
//! creating an image with its ownership keys, renaming it into place, writing the pool index's
//! omap keys, reading an image's size, features and metadata (read-only, no watch), and the
//! monitors' `status` and `df` (the cluster's health, which the controller's health gate reads
//! before writing steps). Through
//! the CLI each of these is a process that connects to the monitors, authenticates and reads
//! the maps before its one operation (about 50 ms on the lab's machine); here they share one
//! connection made once, and cost their RADOS round trips.
//!
//! Everything else (reports, sweeps, trash, identities, fencing) stays on the CLI: the
//! [`crate::runner::Runner`] seam and its fakes see those commands as before. A runner without a
//! library (the tests' fakes, or `--no-librbd`) runs the same operations as commands, so both
//! paths do the same thing in the same order (see `ceph::images`).
//!
//! The libraries are loaded and the connection made at the first call; when they cannot be
//! loaded (no `librados2`/`librbd1`, which `ceph-common` installs with the `rbd` command), the
//! agent says so once and keeps to the CLI. A connection that fails is tried again after
//! [`RECONNECT_AFTER`]; meanwhile calls use the CLI (which will likely fail the same way, with
//! the command's own error).
//!
//! Errors keep the CLI's shape ([`CliError`]: the call, its errno as the exit code, the errno's
//! text as stderr, `(17) File exists` as `rbd` prints it), so the callers' handling of EEXIST and
//! ENOENT is one piece of code for both paths. Deadlines as on the CLI: librados' own op timeouts
//! are the runner's command deadline, so a write returns ETIMEDOUT itself and never outlives its
//! caller's lock; a short read (one image's size, features and metadata) is also cut at the read
//! deadline (the thread it blocked finishes on its own; a read holds no lock).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ceph_lib::{ConnectSpec, LibError, Pool, Rados};

use crate::runner::CliError;

/// How long after a failed connection the library is tried again.
pub const RECONNECT_AFTER: Duration = Duration::from_secs(30);

/// How long a call may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A read of one image, as `rbd info`: cut at the read deadline (`--read-timeout`).
    ShortRead,
    /// A write or a whole-pool listing: librados' op timeouts (`--command-timeout`).
    Long,
}

/// The connection and the pools opened on it.
#[derive(Debug)]
pub struct Library {
    spec: ConnectSpec,
    timeout: Duration,
    read_timeout: Duration,
    state: tokio::sync::Mutex<State>,
}

#[derive(Debug)]
enum State {
    /// Not tried yet.
    Idle,
    Connected {
        rados: Arc<Rados>,
        pools: HashMap<String, Arc<Pool>>,
    },
    /// The libraries cannot be loaded: the CLI for good.
    Unavailable,
    /// The last connection failed; not tried again before this.
    Failed { retry_at: Instant },
}

impl Library {
    /// A library that connects as the CLI would with `conf`, `keyring` and `client_id`.
    pub fn new(
        conf: Option<&std::path::Path>,
        keyring: Option<&std::path::Path>,
        client_id: Option<&str>,
        timeout: Duration,
        read_timeout: Duration,
    ) -> Self {
        let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
        Self {
            spec: ConnectSpec {
                user_id: client_id.map(str::to_string),
                config_file: conf.map(path),
                key_file: keyring.map(path),
                options: vec![],
            },
            timeout,
            read_timeout: read_timeout.min(timeout),
            state: tokio::sync::Mutex::new(State::Idle),
        }
    }

    /// The connection, made first if needed; `None` when the CLI must do it. The state's
    /// lock is held while connecting: calls meanwhile wait for the one connection.
    async fn connected(&self) -> Option<tokio::sync::MutexGuard<'_, State>> {
        let mut state = self.state.lock().await;
        if let State::Failed { retry_at } = *state {
            if Instant::now() < retry_at {
                return None;
            }
        }
        if matches!(*state, State::Idle | State::Failed { .. }) {
            let spec = self.spec.clone();
            let secs = self.timeout.as_secs();
            let connected = tokio::task::spawn_blocking(move || Rados::connect(&spec, secs))
                .await
                .unwrap_or_else(|e| Err(LibError::Load(e.to_string())));
            *state = match connected {
                Ok(rados) => {
                    tracing::info!("librados connected: the calls of an edit's path and the sweep's reads skip the CLI.");
                    State::Connected {
                        rados,
                        pools: HashMap::new(),
                    }
                }
                Err(e @ LibError::Load(_)) => {
                    tracing::warn!(error = %e, "librados/librbd cannot be loaded; every operation uses the CLI.");
                    State::Unavailable
                }
                Err(e) => {
                    tracing::warn!(error = %e, retry_in = ?RECONNECT_AFTER, "librados cannot connect; the CLI meanwhile.");
                    State::Failed {
                        retry_at: Instant::now() + RECONNECT_AFTER,
                    }
                }
            };
        }
        matches!(*state, State::Connected { .. }).then_some(state)
    }

    /// The pool's context, connecting first if needed; `None` when the CLI must do it.
    async fn pool(&self, pool: &str) -> Option<Arc<Pool>> {
        let mut state = self.connected().await?;
        let State::Connected { rados, pools } = &mut *state else {
            return None;
        };
        if let Some(p) = pools.get(pool) {
            return Some(p.clone());
        }
        let (rados, name) = (rados.clone(), pool.to_string());
        // A missing pool is not cached: the CLI gives the call its usual error.
        let opened = tokio::task::spawn_blocking(move || rados.pool(&name))
            .await
            .ok()?
            .ok()?;
        let opened = Arc::new(opened);
        pools.insert(pool.to_string(), opened.clone());
        Some(opened)
    }

    /// Runs `f` on `pool`'s context on a blocking thread; `None` when the CLI must do it.
    /// `what` names the operation in errors, as a command line would.
    pub async fn call<T: Send + 'static>(
        &self,
        pool: &str,
        what: impl Into<String>,
        kind: Kind,
        f: impl FnOnce(&Pool) -> Result<T, LibError> + Send + 'static,
    ) -> Option<Result<T, CliError>> {
        let p = self.pool(pool).await?;
        Some(self.blocking(what.into(), kind, move || f(&p)).await)
    }

    /// Sends `command` (a monitor command's JSON) on the connection; `None` when the CLI must.
    pub async fn mon_command(
        &self,
        what: impl Into<String>,
        command: String,
    ) -> Option<Result<Vec<u8>, CliError>> {
        let rados = match &*self.connected().await? {
            State::Connected { rados, .. } => rados.clone(),
            _ => return None,
        };
        let f = move || rados.mon_command(&command);
        Some(self.blocking(what.into(), Kind::ShortRead, f).await)
    }

    /// `f` on a blocking thread, within `kind`'s deadline.
    async fn blocking<T: Send + 'static>(
        &self,
        what: String,
        kind: Kind,
        f: impl FnOnce() -> Result<T, LibError> + Send + 'static,
    ) -> Result<T, CliError> {
        let task = tokio::task::spawn_blocking(f);
        let joined = match kind {
            Kind::Long => task.await,
            // The blocked thread goes on to librados' own timeout; nothing waits for it.
            Kind::ShortRead => match tokio::time::timeout(self.read_timeout, task).await {
                Ok(joined) => joined,
                Err(_) => {
                    return Err(CliError::Timeout {
                        command: what,
                        after: self.read_timeout,
                    })
                }
            },
        };
        match joined {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(failed(what, e)),
            Err(e) => Err(failed(what, LibError::Load(e.to_string()))),
        }
    }
}

/// A library error in the CLI's shape: errno as the exit code and `(errno) text` as stderr.
fn failed(command: String, e: LibError) -> CliError {
    let (code, stderr) = match &e {
        LibError::Call { call, errno } => {
            let text = std::io::Error::from_raw_os_error(*errno).to_string();
            let text = text.split(" (os error").next().unwrap_or(&text).to_string();
            (*errno, format!("{call}: ({errno}) {text}"))
        }
        other => (-1, other.to_string()),
    };
    CliError::Failed {
        command,
        code,
        stderr,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_errno_reads_as_rbd_prints_it() {
        let e = failed(
            "librbd rename rbd/.unistor-new.a a".into(),
            LibError::Call {
                call: "rbd_rename",
                errno: 17,
            },
        );
        assert_eq!(e.code(), Some(17));
        match e {
            CliError::Failed {
                command, stderr, ..
            } => {
                assert_eq!(command, "librbd rename rbd/.unistor-new.a a");
                assert_eq!(stderr, "rbd_rename: (17) File exists");
            }
            other => panic!("{other}"),
        }
    }

    /// Without the libraries' connection (a cluster that is not there), calls fall back to the
    /// CLI (`None`) instead of failing, and the connection is not retried at every call.
    #[tokio::test]
    async fn a_connection_that_fails_leaves_the_calls_to_the_cli() {
        let dir = tempfile::tempdir().unwrap();
        let conf = dir.path().join("ceph.conf");
        // A monitor address nothing listens on, and a mount that gives up fast.
        std::fs::write(&conf, "[global]\nmon_host = 127.0.0.1:1\n").unwrap();
        let lib = Library::new(
            Some(&conf),
            None,
            None,
            Duration::from_secs(1),
            Duration::from_secs(1),
        );
        let got = lib
            .call("rbd", "librbd ls rbd", Kind::Long, |p| p.image_names())
            .await;
        assert!(got.is_none());
        let first = match *lib.state.lock().await {
            State::Failed { retry_at } => Some(retry_at),
            State::Unavailable => None,
            ref other => panic!("{other:?}"),
        };
        assert!(lib
            .call("rbd", "librbd ls rbd", Kind::Long, |p| p.image_names())
            .await
            .is_none());
        // Not tried again before its time: the same retry time.
        let second = match *lib.state.lock().await {
            State::Failed { retry_at } => Some(retry_at),
            State::Unavailable => None,
            ref other => panic!("{other:?}"),
        };
        assert_eq!(first, second);
    }
}
