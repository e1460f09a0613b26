//! Running the Ceph CLI: argv only, never a shell; a deadline on every command, then SIGTERM, then
//! SIGKILL; stderr carried into the error.
//!
//! The [`Runner`] trait is the seam for tests: the real [`ProcessRunner`] spawns processes, a fake
//! records invocations (and proves that refused input never spawned anything).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tracing::{debug, warn};

/// The CLI tools the agent uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    /// `ceph`
    Ceph,
    /// `rbd`
    Rbd,
    /// `rados`
    Rados,
}

impl Tool {
    /// The program name.
    pub fn name(self) -> &'static str {
        match self {
            Tool::Ceph => "ceph",
            Tool::Rbd => "rbd",
            Tool::Rados => "rados",
        }
    }
}

/// One command line: a tool and its arguments (the connection options are added by the runner).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// Which tool.
    pub tool: Tool,
    /// Its arguments, each one argv element.
    pub args: Vec<OsString>,
}

impl Invocation {
    /// Starts an invocation of `tool`.
    pub fn new(tool: Tool) -> Self {
        Self { tool, args: vec![] }
    }

    /// Appends one argument.
    pub fn arg(mut self, a: impl Into<OsString>) -> Self {
        self.args.push(a.into());
        self
    }

    /// Appends arguments.
    pub fn args<I, A>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = A>,
        A: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The command line for logs and errors. Every argument was checked before it got here.
    pub fn display(&self) -> String {
        let mut s = self.tool.name().to_string();
        for a in &self.args {
            s.push(' ');
            s.push_str(&a.to_string_lossy());
        }
        s
    }
}

/// What a finished process gave back.
#[derive(Debug, Clone)]
pub struct Output {
    /// Exit code (Ceph tools exit with the errno of the failure).
    pub code: i32,
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

/// Errors running a command.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The program could not be started.
    #[error("cannot run `{command}`")]
    Spawn {
        /// The command line.
        command: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The deadline passed; the process was terminated.
    #[error("`{command}` did not finish within {after:?} and was killed")]
    Timeout {
        /// The command line.
        command: String,
        /// The deadline.
        after: Duration,
    },
    /// The process exited non-zero (or died from a signal).
    #[error("`{command}` failed with exit code {code}: {stderr}")]
    Failed {
        /// The command line.
        command: String,
        /// Exit code; -1 when killed by a signal.
        code: i32,
        /// Its standard error (last lines).
        stderr: String,
    },
}

impl CliError {
    /// The exit code of a failed command.
    pub fn code(&self) -> Option<i32> {
        match self {
            CliError::Failed { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Runs invocations.
#[async_trait::async_trait]
pub trait Runner: Send + Sync + 'static {
    /// Runs one command to completion; a non-zero exit is a [`CliError::Failed`].
    async fn run(&self, inv: Invocation) -> Result<Output, CliError>;
}

/// How to reach the cluster and how long to wait.
#[derive(Debug, Clone)]
pub struct ProcessRunnerConfig {
    /// `-c`: the cluster config file.
    pub conf: Option<PathBuf>,
    /// `--keyring`.
    pub keyring: Option<PathBuf>,
    /// `--id`: the cephx client id (without `client.`).
    pub client_id: Option<String>,
    /// Deadline of every command.
    pub timeout: Duration,
    /// Time between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Directory holding the `ceph`, `rbd` and `rados` binaries; `None` searches `PATH`.
    pub bin_dir: Option<PathBuf>,
}

impl Default for ProcessRunnerConfig {
    fn default() -> Self {
        Self {
            conf: None,
            keyring: None,
            client_id: None,
            timeout: Duration::from_secs(90),
            kill_grace: Duration::from_secs(5),
            bin_dir: None,
        }
    }
}

/// Spawns real processes.
#[derive(Debug, Clone)]
pub struct ProcessRunner {
    config: ProcessRunnerConfig,
}

/// At most this much stdout or stderr is kept per command.
const MAX_OUTPUT: u64 = 256 * 1024 * 1024;
/// At most this much stderr goes into an error message.
const MAX_STDERR_IN_ERROR: usize = 2048;

impl ProcessRunner {
    /// A runner with `config`.
    pub fn new(config: ProcessRunnerConfig) -> Self {
        Self { config }
    }

    fn command(&self, inv: &Invocation) -> Command {
        let program: OsString = match &self.config.bin_dir {
            Some(dir) => dir.join(inv.tool.name()).into(),
            None => inv.tool.name().into(),
        };
        let mut cmd = Command::new(program);
        if let Some(conf) = &self.config.conf {
            cmd.arg("--conf").arg(conf);
        }
        if let Some(keyring) = &self.config.keyring {
            cmd.arg("--keyring").arg(keyring);
        }
        if let Some(id) = &self.config.client_id {
            cmd.arg("--id").arg(id);
        }
        cmd.args(&inv.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        // Never let the child share our process group's terminal signals.
        cmd.process_group(0);
        cmd
    }
}

fn tail(s: &str) -> String {
    let s = s.trim();
    if s.len() <= MAX_STDERR_IN_ERROR {
        return s.to_string();
    }
    let mut start = s.len() - MAX_STDERR_IN_ERROR;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("...{}", &s[start..])
}

#[async_trait::async_trait]
impl Runner for ProcessRunner {
    async fn run(&self, inv: Invocation) -> Result<Output, CliError> {
        let command = inv.display();
        let started = std::time::Instant::now();
        let mut child = self
            .command(&inv)
            .spawn()
            .map_err(|source| CliError::Spawn {
                command: command.clone(),
                source,
            })?;
        let mut stdout = child.stdout.take().expect("piped");
        let mut stderr = child.stderr.take().expect("piped");
        let out_task = tokio::spawn(async move {
            let mut buf = Vec::new();
            let _ = (&mut stdout).take(MAX_OUTPUT).read_to_end(&mut buf).await;
            buf
        });
        let err_task = tokio::spawn(async move {
            let mut buf = Vec::new();
            let _ = (&mut stderr).take(MAX_OUTPUT).read_to_end(&mut buf).await;
            buf
        });
        let status = match tokio::time::timeout(self.config.timeout, child.wait()).await {
            Ok(status) => status.map_err(|source| CliError::Spawn {
                command: command.clone(),
                source,
            })?,
            Err(_) => {
                warn!(command, after = ?self.config.timeout, "Deadline passed: sending SIGTERM.");
                // The child leads its own process group: signal the group, so that helpers it
                // forked stop too.
                let group = child.id().map(|pid| nix::unistd::Pid::from_raw(pid as i32));
                if let Some(pg) = group {
                    let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGTERM);
                }
                if tokio::time::timeout(self.config.kill_grace, child.wait())
                    .await
                    .is_err()
                {
                    warn!(command, "Still running after SIGTERM: sending SIGKILL.");
                    if let Some(pg) = group {
                        let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGKILL);
                    }
                    let _ = child.kill().await;
                }
                out_task.abort();
                err_task.abort();
                return Err(CliError::Timeout {
                    command,
                    after: self.config.timeout,
                });
            }
        };
        let stdout = out_task.await.unwrap_or_default();
        let stderr = String::from_utf8_lossy(&err_task.await.unwrap_or_default()).into_owned();
        let code = status.code().unwrap_or(-1);
        debug!(command, code, elapsed = ?started.elapsed(), "Command finished.");
        if code != 0 {
            return Err(CliError::Failed {
                command,
                code,
                stderr: tail(&stderr),
            });
        }
        Ok(Output {
            code,
            stdout,
            stderr,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runner_in(dir: &std::path::Path, timeout: Duration) -> ProcessRunner {
        ProcessRunner::new(ProcessRunnerConfig {
            bin_dir: Some(dir.to_path_buf()),
            timeout,
            kill_grace: Duration::from_millis(300),
            ..ProcessRunnerConfig::default()
        })
    }

    fn script(dir: &std::path::Path, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[tokio::test]
    async fn arguments_reach_the_program_verbatim() {
        let dir = tempfile::tempdir().unwrap();
        script(
            dir.path(),
            "rbd",
            r#"for a in "$@"; do printf '%s\n' "$a"; done"#,
        );
        let r = runner_in(dir.path(), Duration::from_secs(10));
        let out = r
            .run(Invocation::new(Tool::Rbd).args(["a b", "$(id)", "--", "*"]))
            .await
            .unwrap();
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "a b\n$(id)\n--\n*\n",
            "no shell expanded anything"
        );
    }

    #[tokio::test]
    async fn failures_carry_exit_code_and_stderr() {
        let dir = tempfile::tempdir().unwrap();
        script(
            dir.path(),
            "rbd",
            "echo 'rbd: error opening image x: (2) No such file or directory' >&2; exit 2",
        );
        let r = runner_in(dir.path(), Duration::from_secs(10));
        let e = r
            .run(Invocation::new(Tool::Rbd).arg("info"))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some(2));
        assert!(e.to_string().contains("No such file"), "{e}");
        assert!(e.to_string().contains("`rbd info`"), "{e}");
    }

    #[tokio::test]
    async fn deadline_then_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("got-term");
        script(
            dir.path(),
            "ceph",
            &format!(
                "trap 'touch {}; exit 143' TERM; sleep 30 & wait",
                marker.display()
            ),
        );
        let r = runner_in(dir.path(), Duration::from_millis(300));
        let e = r.run(Invocation::new(Tool::Ceph)).await.unwrap_err();
        assert!(matches!(e, CliError::Timeout { .. }), "{e}");
        assert!(marker.exists(), "the process saw SIGTERM first");
    }

    #[tokio::test]
    async fn deadline_then_sigkill_when_term_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        script(
            dir.path(),
            "ceph",
            &format!(
                "echo $$ > {}; trap '' TERM; while :; do sleep 0.05; done",
                pidfile.display()
            ),
        );
        let r = runner_in(dir.path(), Duration::from_millis(300));
        let e = r.run(Invocation::new(Tool::Ceph)).await.unwrap_err();
        assert!(matches!(e, CliError::Timeout { .. }), "{e}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The process is gone (reaped by the runner): signalling it fails.
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        assert!(!alive, "process {pid} survived SIGKILL");
    }
}
