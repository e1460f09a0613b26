//! `unistor plan`: the diff, and a saved plan for `apply --plan`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Args;

use super::{
    connect, fingerprint, load, write_plan_file, Common, Format, OpsError, SavedPlan,
    SAVED_PLAN_VERSION,
};
use crate::render;

/// `unistor plan`
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Manifests and agents.
    #[command(flatten)]
    pub common: Common,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Format,
    /// Save the plan (with a fingerprint of what was observed) for `unistor apply --plan FILE`.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `unistor plan`: exit 0 when nothing is to do, 2 when changes are pending, 1 on error, when an
/// agent could not be observed or when anything is held back.
pub async fn plan_cmd(a: PlanArgs) -> Result<ExitCode, OpsError> {
    let desired = load(&a.common.dir)?;
    let fleet = connect(&a.common, &desired).await?;
    let mut observed = fleet.observe(a.common.report_timeout).await;
    let opts = super::plan_options(&a.common);
    let p = super::plan_probed(&desired, &mut observed, &fleet, &opts).await;
    if let Some(path) = &a.out {
        let saved = SavedPlan {
            version: SAVED_PLAN_VERSION,
            fingerprint: fingerprint(&desired, &observed),
            plan: p.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&saved).expect("serializable");
        write_plan_file(path, &bytes)?;
    }
    match a.output {
        Format::Text => print!("{}", render::human(&p)),
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&p).expect("serializable")
        ),
    }
    if let Ok(f) = Arc::try_unwrap(fleet) {
        f.close().await;
    }
    // "No changes" is only said of a fleet that was seen whole.
    if !p.unknown.is_empty() {
        eprintln!(
            "unistor: {} agent(s) could not be observed; nothing of theirs was planned:\n  {}",
            p.unknown.len(),
            p.unknown.join("\n  ")
        );
        return Ok(ExitCode::FAILURE);
    }
    // Something held back is never "nothing to do": a person has to act.
    if !p.blocked.is_empty() {
        eprintln!(
            "unistor: {} object(s) held back (listed first above)",
            p.blocked.len()
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(if p.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
