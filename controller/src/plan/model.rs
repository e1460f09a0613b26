//! What the planner reads (observed state) and writes (plans).

use std::collections::BTreeMap;
use std::fmt;

use protocol::dpu::DpuReport;
pub use protocol::dpu::{Attachment, BdevSpec, ControllerSpec, NamespaceSpec, SubsystemSpec};
use protocol::{CephReport, Command};
use serde::{Deserialize, Serialize};

/// An agent's state, or why it is not known. Unknown is never treated as empty.
///
/// A report is shared (`Arc`): the informer keeps the last one of each agent, and every pass,
/// the daemon's status and a plan read it without copying; it is copied only when changed while
/// someone still reads the old one (`Arc::make_mut`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Known<T> {
    /// Reported.
    Known {
        /// The report.
        report: std::sync::Arc<T>,
    },
    /// Not reachable or not answering.
    Unknown {
        /// Why.
        reason: String,
    },
}

impl<T> Known<T> {
    /// The report, when known.
    pub fn get(&self) -> Option<&T> {
        match self {
            Known::Known { report } => Some(report),
            Known::Unknown { .. } => None,
        }
    }
}

/// Everything the agents reported.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Observed {
    /// Ceph clusters by manifest name.
    pub clusters: BTreeMap<String, Known<CephReport>>,
    /// DPUs by manifest name.
    pub dpus: BTreeMap<String, Known<DpuReport>>,
}

/// How much a step can hurt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Risk {
    /// Nothing a host or its data notices.
    Safe,
    /// A host sees a device change or disappear.
    HostVisible,
    /// Data goes away (trash or delete).
    DataDestroying,
}

impl fmt::Display for Risk {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Risk::Safe => "safe",
            Risk::HostVisible => "host-visible",
            Risk::DataDestroying => "data-destroying",
        })
    }
}

/// Which agent runs a step.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(tag = "kind", content = "name", rename_all = "snake_case")]
pub enum Target {
    /// A ceph-agent, by cluster name.
    Cluster(String),
    /// A dpu-agent, by DPU name.
    Dpu(String),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Cluster(c) => write!(f, "cluster/{c}"),
            Target::Dpu(d) => write!(f, "dpu/{d}"),
        }
    }
}

/// One change: the command its agent is sent, built where the step is planned and sent as it
/// is (the executor adds only what a flag decides at execution: `force` of a detach).
///
/// Two actions are not a plain command: a registration (the command carries SNAP's cephx key,
/// issued by the cluster when the step runs, never written into a plan) and a grow (the size
/// it grows from is kept for people and logs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Action {
    /// Register a cluster in SNAP (with SNAP's cephx identity, issued on the cluster first).
    RegisterCluster {
        /// SNAP's name for it.
        name: String,
        /// The manifest's cluster.
        cluster: String,
    },
    /// Grow an image.
    GrowImage {
        /// The size observed when planned.
        from_bytes: u64,
        /// The command.
        grow: protocol::GrowImage,
    },
    /// Exactly this command to the step's agent.
    #[serde(untagged)]
    Send(Command),
}

impl Action {
    /// The action's name, as a saved plan spells it (`op`).
    pub fn op(&self) -> &'static str {
        match self {
            Action::RegisterCluster { .. } => "register_cluster",
            Action::GrowImage { .. } => "grow_image",
            Action::Send(c) => c.name(),
        }
    }

    /// The command sent, when it is known at planning (all but a registration).
    pub fn command(&self) -> Option<Command> {
        match self {
            Action::RegisterCluster { .. } => None,
            Action::GrowImage { grow, .. } => Some(Command::GrowImage(grow.clone())),
            Action::Send(c) => Some(c.clone()),
        }
    }

    /// The command, when it is a plain one.
    pub fn sent(&self) -> Option<&Command> {
        match self {
            Action::Send(c) => Some(c),
            _ => None,
        }
    }
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// Position in the plan (steps are in a valid execution order).
    pub id: usize,
    /// The agent that runs it.
    pub target: Target,
    /// What.
    pub action: Action,
    /// How much it can hurt.
    pub risk: Risk,
    /// Steps that must succeed first.
    pub depends_on: Deps,
    /// The volume it serves, when one.
    pub volume: Option<Box<str>>,
}

/// A step's dependencies: most steps have one or two, held inline (no allocation per step; a
/// plan from empty has hundreds of thousands of steps).
pub type Deps = smallvec::SmallVec<[usize; 2]>;

/// A difference between desired and observed, field by field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Drift {
    /// `volume/db-data`, `dpu/dpu-a`...
    pub object: String,
    /// The field.
    pub field: String,
    /// Desired.
    pub desired: String,
    /// Observed.
    pub observed: String,
}

/// Something the planner will not do, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Blocked {
    /// The object.
    pub object: String,
    /// Why.
    pub reason: String,
}

/// A plan.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Steps in execution order.
    pub steps: Vec<Step>,
    /// Differences found.
    pub drift: Vec<Drift>,
    /// What is held back.
    pub blocked: Vec<Blocked>,
    /// Agents whose state is unknown: nothing of theirs is touched.
    pub unknown: Vec<String>,
    /// Images a volume was held for because their report came from the pool's index alone
    /// (cluster, pool, image): read them (`probe_images`) and plan again.
    #[serde(skip)]
    pub unverified: Vec<(String, String, String)>,
}

impl Plan {
    /// Whether there is anything to do.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}
