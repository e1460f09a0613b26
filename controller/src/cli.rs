//! Command-line surface of `unistor`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use protocol::names::PeerName;
use protocol::tls::{self, Role};

use crate::Error;

/// Declarative storage for BlueField-3 DPU fleets and Ceph.
#[derive(Debug, Parser)]
#[command(name = "unistor", version)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create the CA and issue certificates for the controller and the agents.
    #[command(subcommand)]
    Pki(Pki),
    /// Connect to one agent and print its hello and its report.
    Inspect(crate::inspect::InspectArgs),
    /// Check the manifests in a directory; every problem is listed with file, line and field.
    Validate {
        /// The manifest directory.
        dir: PathBuf,
    },
    /// Print the JSON Schema of a manifest document, for editors.
    Schema,
    /// Show what apply would do. Exit 0: no changes; 2: changes pending; 1: error.
    Plan(crate::ops::PlanArgs),
    /// Converge the fleet to the manifests.
    Apply(crate::ops::ApplyArgs),
    /// The fleet: clusters, DPUs with their hosts, volumes with their health.
    Status(crate::ops::StatusArgs),
    /// The GitOps daemon: keeps the fleet converged to the manifest directory; serves a
    /// dashboard, a JSON API and Prometheus metrics.
    Watch(crate::watch::WatchArgs),
    /// Tell the daemon to leave a volume or a DPU alone (`volume/NAME`, `dpu/NAME`).
    Suspend(crate::ops::SuspendArgs),
    /// Tell the daemon to reconcile a suspended volume or DPU again.
    Resume(crate::ops::SuspendArgs),
    /// Cut a silent DPU's SNAP off the clusters (`dpu/NAME`: its cephx identity loses its OSD
    /// caps, its clients are blocklisted), so its volumes may be exposed elsewhere.
    Fence(crate::ops::FenceArgs),
    /// Undo `fence`.
    Unfence(crate::ops::FenceArgs),
}

/// `unistor pki ...`
#[derive(Debug, Subcommand)]
pub enum Pki {
    /// Create a CA in DIR (ca.crt, ca.key). Refuses to overwrite one.
    Init {
        /// The PKI directory.
        #[arg(long)]
        dir: PathBuf,
        /// Validity of the CA.
        #[arg(long, default_value = "10years", value_parser = humantime::parse_duration)]
        validity: Duration,
    },
    /// Issue NAME.crt and NAME.key, signed by the CA in DIR.
    Issue(IssueArgs),
}

/// `unistor pki issue`
#[derive(Debug, Args)]
pub struct IssueArgs {
    /// The PKI directory holding the CA.
    #[arg(long)]
    pub dir: PathBuf,
    /// The peer's name (a DNS label): the agent's name as manifests give it, or the controller's.
    #[arg(long)]
    pub name: String,
    /// What the certificate is for.
    #[arg(long, value_enum)]
    pub role: RoleArg,
    /// Validity of the certificate.
    #[arg(long, default_value = "1year", value_parser = humantime::parse_duration)]
    pub validity: Duration,
}

/// Certificate roles.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RoleArg {
    /// The controller (TLS client).
    Controller,
    /// An agent (TLS server).
    Agent,
}

/// Runs a `pki` subcommand.
pub fn pki(p: Pki) -> Result<(), Error> {
    match p {
        Pki::Init { dir, validity } => {
            tls::init_ca(&dir, validity)?;
            println!("CA created in {}", dir.display());
        }
        Pki::Issue(a) => {
            let name = PeerName::parse("--name", &a.name)?;
            let role = match a.role {
                RoleArg::Controller => Role::Controller,
                RoleArg::Agent => Role::Agent,
            };
            tls::issue(&a.dir, &name, role, a.validity)?;
            println!(
                "issued {}/{name}.crt and {name}.key ({:?})",
                a.dir.display(),
                a.role
            );
        }
    }
    Ok(())
}
