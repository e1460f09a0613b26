//! Where SNAP runs: on a BlueField-3 ([`bf3`]: firmware settings, hugepages, a static pod for
//! kubelet) or, on machines without one, as a supervised emulator process ([`sim`]).

pub mod bf3;
pub mod sim;

use std::time::Duration;

use protocol::dpu::{BlueFieldFacts, DeployReport, DeployStep, SnapSpec, StepOutcome};

use crate::snap::Snap;

/// Errors deploying SNAP. Each carries the steps done so far.
#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    /// A tool failed.
    #[error("{step}: {detail}")]
    Step {
        /// The step.
        step: &'static str,
        /// What failed.
        detail: String,
        /// The report up to the failure.
        report: DeployReport,
    },
    /// SNAP did not become ready in time.
    #[error("SNAP did not become ready within {waited:?}: {detail}")]
    NotReady {
        /// How long we waited.
        waited: Duration,
        /// The last thing seen.
        detail: String,
        /// The report up to the failure.
        report: DeployReport,
    },
}

/// A SNAP platform.
#[async_trait::async_trait]
pub trait Platform: Send + Sync + 'static {
    /// `bluefield3` or `simulation`.
    fn name(&self) -> &'static str;

    /// Deploys SNAP as `spec` says, or converges an existing deployment to it (an upgrade when
    /// the image or tag changed). Idempotent; reports each step.
    async fn install(&self, spec: &SnapSpec, snap: &Snap) -> Result<DeployReport, DeployError>;

    /// Removes SNAP.
    async fn remove(&self) -> Result<DeployReport, DeployError>;

    /// The deployed `image:tag`, if any.
    async fn deployed(&self) -> Option<String>;

    /// BlueField facts, when the tools are there.
    async fn bluefield_facts(&self) -> Option<BlueFieldFacts>;

    /// What the host does with SNAP's devices, when this platform can tell (`None`: it cannot).
    async fn host_use(&self) -> Option<protocol::dpu::HostUse> {
        None
    }

    /// Called on every supervision tick: a platform that runs SNAP itself restarts it here.
    /// Returns true when SNAP was (re)started.
    async fn supervise(&self) -> bool {
        false
    }
}

/// Collects a deployment's steps.
#[derive(Debug)]
pub struct Steps {
    report: DeployReport,
}

impl Steps {
    /// An empty report for `platform`.
    pub fn new(platform: &str) -> Self {
        Self {
            report: DeployReport {
                platform: platform.into(),
                steps: vec![],
                ready: false,
            },
        }
    }

    /// Records a step.
    pub fn push(&mut self, step: &str, outcome: StepOutcome, detail: impl Into<String>) {
        self.report.steps.push(DeployStep {
            step: step.into(),
            outcome,
            detail: detail.into(),
        });
    }

    /// A failed step as an error.
    pub fn fail(mut self, step: &'static str, detail: impl Into<String>) -> DeployError {
        let detail = detail.into();
        self.push(step, StepOutcome::Failed, detail.clone());
        DeployError::Step {
            step,
            detail,
            report: self.report,
        }
    }

    /// Not ready in time, as an error.
    pub fn not_ready(mut self, waited: Duration, detail: impl Into<String>) -> DeployError {
        let detail = detail.into();
        self.push("ready", StepOutcome::Failed, detail.clone());
        DeployError::NotReady {
            waited,
            detail,
            report: self.report,
        }
    }

    /// The final report.
    pub fn finish(mut self, ready: bool) -> DeployReport {
        self.report.ready = ready;
        self.report
    }

    /// The last step of a deployment that started SNAP: waits until it answers (`ready`), or
    /// fails after `timeout`.
    pub async fn until_ready(
        mut self,
        snap: &Snap,
        timeout: Duration,
    ) -> Result<DeployReport, DeployError> {
        match wait_for_socket(snap, timeout).await {
            Ok(v) => {
                self.push("ready", StepOutcome::Unchanged, format!("answers: {v}"));
                Ok(self.finish(true))
            }
            Err(e) => Err(self.not_ready(timeout, e)),
        }
    }
}

/// Polls `snap` until `spdk_get_version` answers or `deadline` passes; the last error otherwise.
pub async fn wait_for_socket(snap: &Snap, deadline: Duration) -> Result<String, String> {
    let start = tokio::time::Instant::now();
    loop {
        match snap.version().await {
            Ok(v) => return Ok(v),
            Err(e) if start.elapsed() >= deadline => return Err(protocol::error::chain(&e)),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}
