//! Running external tools: argv only, never a shell; a deadline on every run, then SIGTERM to the
//! process group, then SIGKILL; stderr carried into the error.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::process::Command;
use tracing::{debug, warn};

/// At most this much stdout or stderr is kept per run.
const MAX_OUTPUT: u64 = 256 * 1024 * 1024;
/// At most this much stderr goes into an error message.
const MAX_STDERR_IN_ERROR: usize = 2048;

/// One run of a program.
#[derive(Debug, Clone)]
pub struct Exec {
    /// The program: a path, or a name looked up on `PATH`.
    pub program: PathBuf,
    /// Its arguments, each one argv element.
    pub args: Vec<OsString>,
    /// Deadline of the run.
    pub timeout: Duration,
    /// Time between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Bytes written to its standard input (then closed); `None`: `/dev/null`.
    pub stdin: Option<Vec<u8>>,
}

impl Exec {
    /// `program` with no arguments, a 90 s deadline and a 5 s kill grace.
    pub fn new(program: impl Into<PathBuf>) -> Self {
        Self {
            program: program.into(),
            args: vec![],
            timeout: Duration::from_secs(90),
            kill_grace: Duration::from_secs(5),
            stdin: None,
        }
    }

    /// Feeds `bytes` to its standard input.
    pub fn stdin(mut self, bytes: Vec<u8>) -> Self {
        self.stdin = Some(bytes);
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

    /// Sets the deadline.
    pub fn timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }

    /// The command line for logs and errors.
    pub fn display(&self) -> String {
        let mut s = self.program.display().to_string();
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
    /// Exit code.
    pub code: i32,
    /// Standard output.
    pub stdout: Vec<u8>,
    /// Standard error, lossily decoded.
    pub stderr: String,
}

/// Errors running a program.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
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
    #[error("`{command}` timed out after {after:?} and was killed")]
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
        /// Its standard error (the last part).
        stderr: String,
    },
}

impl ExecError {
    /// The exit code of a failed run.
    pub fn code(&self) -> Option<i32> {
        match self {
            ExecError::Failed { code, .. } => Some(*code),
            _ => None,
        }
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

/// Runs `e` to completion; a non-zero exit is [`ExecError::Failed`].
pub async fn run(e: &Exec) -> Result<Output, ExecError> {
    let command = e.display();
    let started = std::time::Instant::now();
    let mut child = Command::new(&e.program)
        .args(&e.args)
        .stdin(if e.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own process group, so that a deadline stops the helpers it forked too.
        .process_group(0)
        .spawn()
        .map_err(|source| ExecError::Spawn {
            command: command.clone(),
            source,
        })?;
    // Written by a task of its own, so that a program that reads its input only after writing
    // output cannot deadlock against us; a program that exits early closes the pipe (ignored).
    let in_task = match (e.stdin.clone(), child.stdin.take()) {
        (Some(bytes), Some(mut pipe)) => Some(tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = pipe.write_all(&bytes).await;
            let _ = pipe.shutdown().await;
        })),
        _ => None,
    };
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
    let status = match tokio::time::timeout(e.timeout, child.wait()).await {
        Ok(status) => status.map_err(|source| ExecError::Spawn {
            command: command.clone(),
            source,
        })?,
        Err(_) => {
            warn!(command, after = ?e.timeout, "Deadline passed: sending SIGTERM.");
            let group = child.id().map(|pid| nix::unistd::Pid::from_raw(pid as i32));
            if let Some(pg) = group {
                let _ = nix::sys::signal::killpg(pg, nix::sys::signal::Signal::SIGTERM);
            }
            if tokio::time::timeout(e.kill_grace, child.wait())
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
            if let Some(t) = in_task {
                t.abort();
            }
            return Err(ExecError::Timeout {
                command,
                after: e.timeout,
            });
        }
    };
    if let Some(t) = in_task {
        let _ = t.await;
    }
    let stdout = out_task.await.unwrap_or_default();
    let stderr = String::from_utf8_lossy(&err_task.await.unwrap_or_default()).into_owned();
    let code = status.code().unwrap_or(-1);
    debug!(command, code, elapsed = ?started.elapsed(), "Command finished.");
    if code != 0 {
        return Err(ExecError::Failed {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &std::path::Path, name: &str, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn quick(program: PathBuf) -> Exec {
        let mut e = Exec::new(program).timeout(Duration::from_millis(300));
        e.kill_grace = Duration::from_millis(300);
        e
    }

    #[tokio::test]
    async fn arguments_reach_the_program_verbatim() {
        let dir = tempfile::tempdir().unwrap();
        let p = script(
            dir.path(),
            "echoargs",
            r#"for a in "$@"; do printf '%s\n' "$a"; done"#,
        );
        let out = run(&Exec::new(p).args(["a b", "$(id)", "--", "*"]))
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
        let p = script(
            dir.path(),
            "rbd",
            "echo 'rbd: error opening image x: (2) No such file or directory' >&2; exit 2",
        );
        let e = run(&Exec::new(p).args(["info"])).await.unwrap_err();
        assert_eq!(e.code(), Some(2));
        assert!(e.to_string().contains("No such file"), "{e}");
        assert!(e.to_string().contains("rbd info`"), "{e}");
    }

    #[tokio::test]
    async fn deadline_then_sigterm() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("got-term");
        let p = script(
            dir.path(),
            "slow",
            &format!(
                "trap 'touch {}; exit 143' TERM; sleep 30 & wait",
                marker.display()
            ),
        );
        let e = run(&quick(p)).await.unwrap_err();
        assert!(matches!(e, ExecError::Timeout { .. }), "{e}");
        assert!(marker.exists(), "the process saw SIGTERM first");
    }

    #[tokio::test]
    async fn deadline_then_sigkill_when_term_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let p = script(
            dir.path(),
            "stubborn",
            &format!(
                "echo $$ > {}; trap '' TERM; while :; do sleep 0.05; done",
                pidfile.display()
            ),
        );
        let e = run(&quick(p)).await.unwrap_err();
        assert!(matches!(e, ExecError::Timeout { .. }), "{e}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let alive = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
        assert!(!alive, "process {pid} survived SIGKILL");
    }

    #[tokio::test]
    async fn stdin_reaches_the_program() {
        let dir = tempfile::tempdir().unwrap();
        let p = script(dir.path(), "count", "wc -c");
        let bytes = vec![7u8; 300 * 1024];
        let out = run(&Exec::new(p).stdin(bytes)).await.unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), "307200");
    }

    #[tokio::test]
    async fn a_missing_program_is_a_spawn_error() {
        let e = run(&Exec::new("/nonexistent/tool")).await.unwrap_err();
        assert!(matches!(e, ExecError::Spawn { .. }), "{e}");
    }
}
