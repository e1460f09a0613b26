//! The manifest kinds, as operators write them (Kubernetes-style documents).

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The one API version this build reads.
pub const API_VERSION: &str = "unistor.io/v1alpha1";

/// One YAML document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", deny_unknown_fields)]
pub enum Document {
    /// A Ceph cluster and the ceph-agent that operates it.
    CephCluster(Object<CephClusterSpec>),
    /// A DPU, the agent on it and the host it sits in.
    Dpu(Object<DpuSpec>),
    /// An NVMe namespace for a host, backed by an RBD image.
    Volume(Object<VolumeSpec>),
}

/// `apiVersion`, `metadata`, `spec`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Object<S> {
    /// Must be `unistor.io/v1alpha1`.
    pub api_version: String,
    /// Name and labels.
    pub metadata: Metadata,
    /// The desired state.
    pub spec: S,
}

/// Object metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Metadata {
    /// Unique per kind: 1-63 characters of a-z 0-9 . _ - (letters and digits first).
    pub name: String,
    /// Free-form labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// How the controller reaches an agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AgentRef {
    /// The agent's name, as its certificate names it.
    pub name: String,
    /// `host:port` of the agent.
    pub address: String,
}

/// A Ceph cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CephClusterSpec {
    /// Its ceph-agent.
    pub agent: AgentRef,
    /// Monitor addresses SNAP connects to (`host:port`); default: the monitors the agent reports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub monitors: Vec<String>,
    /// Pools volumes may use.
    pub pools: Vec<String>,
    /// The cephx identity SNAP uses (created with `profile rbd` on `pools`).
    pub snap_identity: SnapIdentity,
}

/// SNAP's cephx identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapIdentity {
    /// The id, without `client.`.
    pub client_id: String,
}

/// A DPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DpuSpec {
    /// Its dpu-agent.
    pub agent: AgentRef,
    /// The host the DPU sits in (volumes name hosts).
    pub host: String,
    /// How SNAP runs on it.
    pub snap: SnapSettings,
}

/// SNAP settings of a DPU.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapSettings {
    /// Container image without tag.
    #[serde(default = "default_image")]
    pub image: String,
    /// Image tag (the SNAP version).
    pub version: String,
    /// Container environment.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Hugepages to require, e.g. `4Gi`.
    #[serde(default = "default_hugepages")]
    pub hugepages: String,
    /// Emulated functions.
    #[serde(default)]
    pub functions: FunctionSettings,
}

fn default_image() -> String {
    "nvcr.io/nvidia/doca/doca_snap".into()
}
fn default_hugepages() -> String {
    "4Gi".into()
}

/// The NVMe functions the firmware exposes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FunctionSettings {
    /// Static PFs (1-4 on a BlueField-3).
    pub pfs: u32,
    /// VFs per PF (0-127).
    pub vfs_per_pf: u32,
}

impl Default for FunctionSettings {
    fn default() -> Self {
        Self {
            pfs: 1,
            vfs_per_pf: 0,
        }
    }
}

/// What happens to the image when the volume is removed from the manifests: the wire's type,
/// one definition from manifest to agent.
pub use protocol::meta::DeletionPolicy;

/// A volume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeSpec {
    /// The host that sees the volume (the DPU in that host serves it).
    pub host: String,
    /// Size in binary units: `512Mi`, `100Gi`, `2Ti`.
    pub size: String,
    /// The backing image.
    pub rbd: RbdRef,
    /// Where the host sees it.
    #[serde(default)]
    pub nvme: NvmePlacement,
    /// I/O queues of the controller (1-32).
    #[serde(default = "default_queues")]
    pub queues: u32,
    /// What removal does to the image.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,
    /// How long a trashed image is protected, e.g. `7d` (Trash policy).
    #[serde(default = "default_retention")]
    pub trash_retention: String,
    /// What a new image starts as: absent, empty; `snapshot`, a copy-on-write clone of an RBD
    /// snapshot (a golden image), grown to `size` when that is larger. Read only when the image
    /// is created: an existing image is never re-cloned.
    #[serde(default)]
    pub source: Option<Box<VolumeSource>>,
    /// Snapshots of the image that unistor takes and keeps: named ones, and a schedule.
    #[serde(default)]
    pub snapshots: Option<Box<Snapshots>>,
    /// Rate limits SNAP applies to the volume (SPDK's bdev QoS), changed live; absent: none.
    #[serde(default)]
    pub qos: Option<Box<VolumeQos>>,
}

/// A volume's QoS limits; each absent field is no limit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeQos {
    /// Reads and writes per second, a multiple of 1000 (SPDK's unit).
    #[serde(default)]
    pub iops: Option<u64>,
    /// Reads and writes together, per second, in whole MiB: `200Mi`, `1Gi`.
    #[serde(default)]
    pub bandwidth: Option<String>,
    /// Reads per second, in whole MiB.
    #[serde(default)]
    pub read_bandwidth: Option<String>,
    /// Writes per second, in whole MiB.
    #[serde(default)]
    pub write_bandwidth: Option<String>,
}

/// A volume's declared snapshots. Each is crash-consistent: it holds every write the cluster
/// acknowledged before it, as a power cut would leave the disk (the host's file system
/// replays its journal when a copy made from it is mounted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Snapshots {
    /// Named snapshots, each taken once and kept while it is listed (not `auto-...`: that
    /// prefix is the schedule's).
    #[serde(default)]
    pub names: Vec<String>,
    /// A snapshot `auto-<seconds>` every `every`; the newest `keep` are kept.
    #[serde(default)]
    pub schedule: Option<SnapshotSchedule>,
    /// What happens to a named snapshot dropped from `names`, and to the scheduled ones when
    /// the schedule goes: `Retain` (default: kept, shown as retained) or `Delete`. A snapshot
    /// with clones is never removed: the plan names the volumes that hold it.
    #[serde(default)]
    pub deletion_policy: SnapshotDeletion,
}

/// A snapshot schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotSchedule {
    /// How often, e.g. `1h` (at least `10s`).
    pub every: String,
    /// How many scheduled snapshots are kept (1-512), the newest.
    pub keep: u32,
}

/// What removing a snapshot from the manifest does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SnapshotDeletion {
    /// Kept on the image.
    #[default]
    Retain,
    /// Removed (unless it has clones).
    Delete,
}

/// Where a volume's image comes from: exactly one of `snapshot` and `volumeSnapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeSource {
    /// An RBD snapshot of the volume's cluster.
    #[serde(default)]
    pub snapshot: Option<SnapshotSource>,
    /// A snapshot of another volume (one it declares in `snapshots.names`): a restore as a
    /// new volume.
    #[serde(default)]
    pub volume_snapshot: Option<VolumeSnapshotSource>,
    /// Whether the clone is flattened once made (its snapshot's data copied in, so that it no
    /// longer depends on the snapshot): `never` (default) or `always`.
    #[serde(default)]
    pub flatten: Flatten,
    /// Flattened once its clone chain is deeper than this (1-15): a clone of a clone of ...
    /// reads through every generation; `flatten: never` with a depth bound.
    #[serde(default)]
    pub max_depth: Option<u32>,
}

/// A clone's flatten policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Flatten {
    /// Stays a clone (copy-on-write: it shares the snapshot's data).
    #[default]
    Never,
    /// Flattened after it is made (a step of its own in the plan).
    Always,
}

/// A snapshot of another volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VolumeSnapshotSource {
    /// The volume (same cluster).
    pub volume: String,
    /// The snapshot (one of its `snapshots.names` until the clone is made).
    pub name: String,
}

/// An RBD snapshot: `pool/image@name`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SnapshotSource {
    /// Pool (one of the cluster's pools).
    pub pool: String,
    /// The image.
    pub image: String,
    /// The snapshot.
    pub name: String,
}

fn default_queues() -> u32 {
    8
}
fn default_retention() -> String {
    "7d".into()
}

/// The backing RBD image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RbdRef {
    /// A `CephCluster` name.
    pub cluster: String,
    /// Pool (one of the cluster's pools).
    pub pool: String,
    /// Image name; default: the volume's name.
    #[serde(default)]
    pub image: Option<String>,
    /// Take over the image when it exists without an owner (made outside unistor): the plan
    /// shows an `adopt image` step, which writes unistor's ownership and policy keys. Refused
    /// while the image has watchers or belongs to someone. Without it such an image is only
    /// reported as not owned.
    #[serde(default)]
    pub adopt: bool,
}

/// NVMe placement. Anything left out is derived from the volume, the same every time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NvmePlacement {
    /// PF index (default 0).
    #[serde(default)]
    pub pf: u32,
    /// VF index; absent means the PF itself.
    #[serde(default)]
    pub vf: Option<u32>,
    /// NSID (1-1024); default derived from the volume.
    #[serde(default)]
    pub nsid: Option<u32>,
    /// Namespace UUID; default derived from the backing image.
    #[serde(default)]
    pub uuid: Option<String>,
}
