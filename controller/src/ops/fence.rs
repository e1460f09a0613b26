//! `unistor fence dpu/NAME` and `unistor unfence dpu/NAME`: cut a DPU's SNAP off every cluster
//! of the manifests (its own cephx identity loses its OSD caps, its connected clients are
//! blocklisted, the fence is recorded in the cluster), so that the volumes of a DPU that went
//! silent can be exposed elsewhere without two DPUs ever writing one image; and undo it.
//!
//! Each cluster's ceph-agent does the work under this controller's lease (one writer). Killed
//! part way: the clusters done are fenced, a cluster in progress holds a `fencing` record that
//! counts for nothing until `fence` runs again; the plan keeps the volumes held meanwhile.

use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use protocol::{Command, FenceRequest, Reply, UnfenceRequest};

use super::{connect, load, Common, OpsError};
use crate::manifest::Desired;
use crate::plan::Target;

/// `unistor fence|unfence`
#[derive(Debug, Args)]
pub struct FenceArgs {
    /// `dpu/NAME`.
    pub object: String,
    /// Manifests and agents.
    #[command(flatten)]
    pub common: Common,
    /// Why (recorded with the fence, shown by `status`).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// How long to wait for a cluster's lease held by another controller.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub lease_wait: Duration,
}

/// `unistor fence|unfence dpu/NAME`.
pub async fn fence_cmd(a: FenceArgs, on: bool) -> Result<ExitCode, OpsError> {
    let invalid = |why: String| OpsError::Invalid(format!("{}: {why}", a.object));
    let Some(("dpu", dpu)) = a.object.split_once('/') else {
        return Err(invalid("expected dpu/NAME".into()));
    };
    let desired = load(&a.common.dir)?;
    if !desired.dpus.contains_key(dpu) {
        return Err(invalid(format!(
            "no DPU of that name in {}",
            a.common.dir.display()
        )));
    }
    // The clusters' agents only: the DPU itself may be the one that cannot be reached.
    let clusters = Desired {
        clusters: desired.clusters.clone(),
        ..Desired::default()
    };
    let fleet = connect(&a.common, &clusters).await?;
    let by = crate::execute::this_instance();
    let mut failed = 0;
    for (name, c) in &desired.clusters {
        let target = Target::Cluster(name.clone());
        let client_id = c
            .snap_client_of(dpu)
            .map_err(|e| invalid(e.to_string()))?
            .to_string();
        let cmd = if on {
            Command::FenceClient(FenceRequest {
                dpu: dpu.to_string(),
                client_id,
                by: by.clone(),
                reason: a.reason.clone(),
            })
        } else {
            Command::UnfenceClient(UnfenceRequest {
                dpu: dpu.to_string(),
                client_id,
            })
        };
        let result = match fleet.get(&target) {
            Ok(agent) => crate::execute::with_lease(&agent, a.lease_wait, cmd).await,
            Err(e) => Err(e.into()),
        };
        match result {
            Ok(Reply::Fence(f)) => println!(
                "dpu/{dpu} fenced off {target}: client.{} may no longer reach the OSDs; {} client(s) blocklisted{}",
                f.client_id,
                f.blocklisted.len(),
                if f.blocklisted.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", f.blocklisted.join(", "))
                }
            ),
            Ok(_) => println!("dpu/{dpu} unfenced on {target}"),
            Err(e) => {
                failed += 1;
                eprintln!("{target}: {}", protocol::error::chain(&e));
            }
        }
    }
    if failed > 0 {
        return Err(OpsError::Invalid(format!(
            "{} on {failed} cluster(s) of {} failed; run it again",
            if on { "the fence" } else { "the unfence" },
            desired.clusters.len()
        )));
    }
    Ok(ExitCode::SUCCESS)
}
