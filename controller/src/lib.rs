//! The unistor controller: manifests (`validate`, `schema`), the planner and the executor
//! (`plan`, `apply`), the fleet's status (`status`), the GitOps daemon (`watch`, with its
//! dashboard, JSON API and metrics), and the PKI commands. See ARCHITECTURE.md.

/// Defines a status enum: one spelling for the wire, the dashboard and the text tables.
macro_rules! spelled {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal),+ $(,)? } default $d:ident) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vm])* #[serde(rename = $s)] $v,)+
        }
        impl $name {
            /// Every value.
            pub const ALL: &'static [Self] = &[$(Self::$v),+];
            /// Its one spelling.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),+ }
            }
        }
        impl Default for $name {
            fn default() -> Self {
                Self::$d
            }
        }
        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }
    };
}

pub mod cli;
pub mod coord;
pub mod execute;
pub mod fleet;
pub mod inspect;
pub mod manifest;
pub mod ops;
pub mod plan;
pub mod reconcile;
pub mod render;
pub mod replica;
pub mod shards;
pub mod status;
pub mod watch;

use std::process::ExitCode;

pub use cli::Cli;

/// Errors of the controller's commands, each naming what it was working on.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A name on the command line failed its allow-list.
    #[error("invalid argument")]
    Name(#[from] protocol::names::NameError),
    /// PKI or TLS setup failed.
    #[error("PKI")]
    Tls(#[from] protocol::tls::TlsError),
    /// Talking to an agent failed.
    #[error("agent")]
    Agent(#[from] protocol::client::ClientError),
    /// Writing output failed.
    #[error("cannot write output")]
    Output(#[from] std::io::Error),
    /// `plan` or `apply` failed.
    #[error(transparent)]
    Ops(#[from] ops::OpsError),
}

/// Runs one command line.
pub async fn run(cli: Cli) -> Result<ExitCode, Error> {
    match cli.command {
        cli::Command::Pki(p) => cli::pki(p).map(|()| ExitCode::SUCCESS),
        cli::Command::Inspect(i) => inspect::run(i).await.map(|()| ExitCode::SUCCESS),
        cli::Command::Validate { dir } => Ok(validate(&dir)),
        cli::Command::Plan(a) => Ok(ops::plan_cmd(a).await?),
        cli::Command::Apply(a) => Ok(ops::apply_cmd(a).await?),
        cli::Command::Status(a) => Ok(ops::status_cmd(a).await?),
        cli::Command::Watch(a) => {
            watch::run(a).await?;
            Ok(ExitCode::SUCCESS)
        }
        cli::Command::Suspend(a) => Ok(ops::suspend_cmd(a, true)?),
        cli::Command::Resume(a) => Ok(ops::suspend_cmd(a, false)?),
        cli::Command::Fence(a) => Ok(ops::fence_cmd(a, true).await?),
        cli::Command::Unfence(a) => Ok(ops::fence_cmd(a, false).await?),
        cli::Command::Schema => {
            let s = serde_json::to_string_pretty(&manifest::schema()).expect("serializable");
            println!("{s}");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `unistor validate`: 0 when valid, 1 with every problem on stderr.
fn validate(dir: &std::path::Path) -> ExitCode {
    match manifest::load_dir(dir) {
        Ok(d) => {
            println!(
                "{}: {} cluster(s), {} DPU(s), {} volume(s): valid",
                dir.display(),
                d.clusters.len(),
                d.dpus.len(),
                d.volumes.len()
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!("{} problem(s) in {}", errors.len(), dir.display());
            ExitCode::FAILURE
        }
    }
}
