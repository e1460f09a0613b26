//! The unistor controller. So far: the PKI commands and `inspect`, which dials one agent over
//! mutual TLS and prints what it reports. Manifests, the planner and the executor come next (see
//! ARCHITECTURE.md).

pub mod cli;
pub mod inspect;

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
}

/// Runs one command line.
pub async fn run(cli: Cli) -> Result<ExitCode, Error> {
    match cli.command {
        cli::Command::Pki(p) => cli::pki(p).map(|()| ExitCode::SUCCESS),
        cli::Command::Inspect(i) => inspect::run(i).await.map(|()| ExitCode::SUCCESS),
    }
}
