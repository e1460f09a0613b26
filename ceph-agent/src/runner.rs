//! Running the Ceph CLI through [`agent_kit::exec`]: argv only, never a shell; a deadline on every
//! command, then SIGTERM, then SIGKILL; stderr carried into the error.
//!
//! The [`Runner`] trait is the seam for tests: the real [`ProcessRunner`] spawns processes, a fake
//! records invocations (and proves that refused input never spawned anything).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use agent_kit::exec::Exec;

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
    /// Bytes for its standard input, if it reads any.
    pub stdin: Option<Vec<u8>>,
}

impl Invocation {
    /// Starts an invocation of `tool`.
    pub fn new(tool: Tool) -> Self {
        Self {
            tool,
            args: vec![],
            stdin: None,
        }
    }

    /// Feeds `bytes` to its standard input.
    pub fn stdin(mut self, bytes: Vec<u8>) -> Self {
        self.stdin = Some(bytes);
        self
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

    /// Whether it is a short read: a report's `ceph` commands, one image's info, watchers or
    /// metadata, one index entry. These get their own, shorter deadline: a stuck cluster must
    /// not hold a report (or an in-use check) for as long as a create may take. Listings of a
    /// whole pool (`rbd ls --long` opens every image; the index; the trash) grow with the pool
    /// and keep the long deadline.
    pub fn is_read(&self) -> bool {
        let words: Vec<std::borrow::Cow<'_, str>> = self
            .args
            .iter()
            .take(2)
            .map(|a| a.to_string_lossy())
            .collect();
        let first = words.first().map(|w| w.as_ref()).unwrap_or("");
        let second = words.get(1).map(|w| w.as_ref()).unwrap_or("");
        match self.tool {
            Tool::Ceph => !matches!(first, "auth"),
            Tool::Rbd => match first {
                "info" | "status" => true,
                "image-meta" => matches!(second, "list" | "get"),
                _ => false,
            },
            Tool::Rados => self
                .args
                .iter()
                .any(|a| matches!(a.to_string_lossy().as_ref(), "getomapval" | "stat")),
        }
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

pub use agent_kit::exec::{ExecError as CliError, Output};

/// Runs invocations.
#[async_trait::async_trait]
pub trait Runner: Send + Sync + 'static {
    /// Runs one command to completion; a non-zero exit is a [`CliError::Failed`].
    async fn run(&self, inv: Invocation) -> Result<Output, CliError>;

    /// librados/librbd in process, for the operations [`crate::library`] lists; `None` runs
    /// them as commands too.
    fn library(&self) -> Option<&crate::library::Library> {
        None
    }
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
    /// Deadline of a command that only reads (at most `timeout`).
    pub read_timeout: Duration,
    /// Time between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Directory holding the `ceph`, `rbd` and `rados` binaries; `None` searches `PATH`.
    pub bin_dir: Option<PathBuf>,
    /// Whether the operations of [`crate::library`] go through librados/librbd in process
    /// (else every operation is a command).
    pub library: bool,
}

impl Default for ProcessRunnerConfig {
    fn default() -> Self {
        Self {
            conf: None,
            keyring: None,
            client_id: None,
            timeout: Duration::from_secs(90),
            read_timeout: Duration::from_secs(20),
            kill_grace: Duration::from_secs(5),
            bin_dir: None,
            library: true,
        }
    }
}

/// Spawns real processes through [`agent_kit::exec`].
#[derive(Debug, Clone)]
pub struct ProcessRunner {
    config: ProcessRunnerConfig,
    library: Option<std::sync::Arc<crate::library::Library>>,
}

impl ProcessRunner {
    /// A runner with `config`.
    pub fn new(config: ProcessRunnerConfig) -> Self {
        let library = config.library.then(|| {
            std::sync::Arc::new(crate::library::Library::new(
                config.conf.as_deref(),
                config.keyring.as_deref(),
                config.client_id.as_deref(),
                config.timeout,
                config.read_timeout,
            ))
        });
        Self { config, library }
    }

    fn exec(&self, inv: &Invocation) -> Exec {
        let program = match &self.config.bin_dir {
            Some(dir) => dir.join(inv.tool.name()),
            None => PathBuf::from(inv.tool.name()),
        };
        let mut args: Vec<OsString> = vec![];
        if let Some(conf) = &self.config.conf {
            args.extend(["--conf".into(), conf.into()]);
        }
        if let Some(keyring) = &self.config.keyring {
            args.extend(["--keyring".into(), keyring.into()]);
        }
        if let Some(id) = &self.config.client_id {
            args.extend(["--id".into(), id.into()]);
        }
        args.extend(inv.args.iter().cloned());
        let timeout = if inv.is_read() {
            self.config.read_timeout.min(self.config.timeout)
        } else {
            self.config.timeout
        };
        let mut e = Exec::new(program).args(args).timeout(timeout);
        e.kill_grace = self.config.kill_grace;
        e.stdin = inv.stdin.clone();
        e
    }
}

#[async_trait::async_trait]
impl Runner for ProcessRunner {
    async fn run(&self, inv: Invocation) -> Result<Output, CliError> {
        agent_kit::exec::run(&self.exec(&inv)).await
    }

    fn library(&self) -> Option<&crate::library::Library> {
        self.library.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv(tool: Tool, args: &[&str]) -> Invocation {
        Invocation::new(tool).args(args.iter().copied())
    }

    #[test]
    fn reads_are_told_from_writes() {
        for (tool, args) in [
            (Tool::Ceph, &["status", "--format", "json"][..]),
            (Tool::Ceph, &["tell", "mon.a", "sessions"]),
            (Tool::Rbd, &["status", "--format", "json", "--", "rbd/a"]),
            (Tool::Rbd, &["image-meta", "list", "--", "rbd/a"]),
            (
                Tool::Rados,
                &["-p", "rbd", "getomapval", "unistor.index", "a"],
            ),
        ] {
            assert!(inv(tool, args).is_read(), "{tool:?} {args:?}");
        }
        for (tool, args) in [
            // Whole-pool listings grow with the pool: the long deadline.
            (Tool::Rbd, &["ls", "--long", "--format", "json", "rbd"][..]),
            (Tool::Rbd, &["trash", "ls", "--format", "json", "rbd"]),
            (Tool::Rados, &["-p", "rbd", "listomapvals", "unistor.index"]),
            (Tool::Ceph, &["auth", "get-or-create", "client.snap"][..]),
            (Tool::Rbd, &["import", "--export-format", "2", "-", "rbd/a"]),
            (Tool::Rbd, &["image-meta", "set", "--", "rbd/a", "k", "v"]),
            (Tool::Rbd, &["trash", "mv", "--", "rbd/a"]),
            (
                Tool::Rados,
                &["-p", "rbd", "setomapval", "unistor.index", "a"],
            ),
        ] {
            assert!(!inv(tool, args).is_read(), "{tool:?} {args:?}");
        }
    }

    /// A stuck cluster: a read is killed at the read deadline, not at the (long) deadline of
    /// every command, and the error says so.
    #[tokio::test]
    async fn a_stuck_read_ends_at_its_own_deadline() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ceph = dir.path().join("ceph");
        std::fs::write(&ceph, "#!/bin/sh\nexec sleep 600\n").unwrap();
        std::fs::set_permissions(&ceph, std::fs::Permissions::from_mode(0o755)).unwrap();
        let runner = ProcessRunner::new(ProcessRunnerConfig {
            timeout: Duration::from_secs(600),
            read_timeout: Duration::from_millis(300),
            kill_grace: Duration::from_millis(100),
            bin_dir: Some(dir.path().to_path_buf()),
            ..ProcessRunnerConfig::default()
        });
        let e = runner
            .run(inv(Tool::Ceph, &["status", "--format", "json"]))
            .await
            .unwrap_err();
        match e {
            CliError::Timeout { after, .. } => assert_eq!(after, Duration::from_millis(300)),
            other => panic!("{other}"),
        }
    }

    #[test]
    fn connection_options_come_first_and_arguments_verbatim() {
        let r = ProcessRunner::new(ProcessRunnerConfig {
            conf: Some("/etc/ceph/ceph.conf".into()),
            keyring: Some("/k".into()),
            client_id: Some("unistor".into()),
            bin_dir: Some("/opt/ceph/bin".into()),
            ..ProcessRunnerConfig::default()
        });
        let e = r.exec(&Invocation::new(Tool::Rbd).args(["info", "--", "img"]));
        assert_eq!(
            e.display(),
            "/opt/ceph/bin/rbd --conf /etc/ceph/ceph.conf --keyring /k --id unistor info -- img"
        );
    }
}
