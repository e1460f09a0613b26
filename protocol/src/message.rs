//! Messages: the JSON carried in each frame.
//!
//! Every frame holds one [`Message`], an object tagged by `"type"`. See `docs/protocol.md`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::dpu::{
    Attachment, BdevQos, BdevResize, BdevSpec, ControllerSpec, DeployReport, DpuReport, NameRef,
    NamespaceRef, NamespaceSpec, NqnRef, RbdCluster, ReplayReport, SnapSpec, SubsystemSpec,
};
use crate::error::WireError;

/// The protocol version this build speaks. Peers must match exactly.
pub const PROTOCOL_VERSION: u32 = 1;

/// One frame's content.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    /// First message of the controller on a new connection.
    ControllerHello(ControllerHello),
    /// The agent's answer to [`Message::ControllerHello`].
    AgentHello(AgentHello),
    /// A command from the controller.
    Request(Request),
    /// The agent's answer to one request, correlated by `id`.
    Response(Response),
    /// Something the agent pushes without being asked.
    Event(EventEnvelope),
    /// Keepalive probe; the peer answers with `pong` carrying the same nonce.
    Ping {
        /// Echoed in the pong.
        nonce: u64,
    },
    /// Keepalive answer.
    Pong {
        /// The ping's nonce.
        nonce: u64,
    },
    /// A connection-level error not tied to a request (malformed frame, failed handshake).
    Error(WireError),
}

impl Message {
    /// Serializes to JSON bytes for one frame.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("messages always serialize")
    }

    /// Parses one frame's JSON.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// The controller introduces itself. Its identity is the name in its certificate, not this field.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerHello {
    /// [`PROTOCOL_VERSION`] of the controller.
    pub version: u32,
    /// Informational name of the controller instance.
    pub name: String,
    /// The controller's liveness interval: it pings this often and takes the agent for dead
    /// after three silent intervals; the agent then pushes no heartbeats of its own (the pongs
    /// are) and takes the controller for gone after three intervals without a frame. Absent:
    /// the agent's own heartbeat interval and idle timeout. A fleet of N agents asks about N/50
    /// seconds, so the controller hears at most 50 a second whatever N.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_ms: Option<u64>,
}

/// Bounds of [`ControllerHello::heartbeat_ms`] (an agent clamps what it is asked to them).
pub const HEARTBEAT_BOUNDS: (std::time::Duration, std::time::Duration) = (
    std::time::Duration::from_secs(1),
    std::time::Duration::from_secs(300),
);

/// Three silent liveness intervals, plus a margin for a busy peer: then the peer is gone.
pub fn silence_limit(interval: std::time::Duration) -> std::time::Duration {
    interval * 3 + std::time::Duration::from_secs(5)
}

/// What kind of agent answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentKind {
    /// Operates a Ceph cluster through its CLI.
    Ceph,
    /// Runs on a BlueField DPU and drives SNAP.
    Dpu,
}

impl std::fmt::Display for AgentKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AgentKind::Ceph => "ceph",
            AgentKind::Dpu => "dpu",
        })
    }
}

/// The agent introduces itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentHello {
    /// [`PROTOCOL_VERSION`] of the agent.
    pub version: u32,
    /// The agent's kind.
    pub kind: AgentKind,
    /// The agent's name (also the DNS name in its certificate).
    pub name: String,
    /// Command families the agent serves, e.g. `lease`, `ceph.report`, `ceph.image`.
    pub capabilities: Vec<String>,
    /// The authenticated identity the agent sees for this controller.
    pub peer: String,
    /// The current lease, if any controller holds one.
    pub lease: Option<LeaseInfo>,
}

/// A command from the controller.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// Chosen by the controller; echoed in the response. Unique per connection.
    pub id: u64,
    /// The fencing token of the controller's lease; required for mutating commands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<u64>,
    /// A controller replica's shard and token for this command (issue 24): the agent refuses
    /// it below the highest token that shard has shown it, and raises that token otherwise.
    /// Absent from a single controller's requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<ShardClaim>,
    /// What to do.
    pub command: Command,
}

/// The answer to one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// The request's id.
    pub id: u64,
    /// Success or a typed error.
    pub outcome: Outcome,
}

/// Success or failure of one request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The command took effect (or had already).
    Ok(Reply),
    /// The command failed.
    Error(WireError),
}

/// A pushed event with a per-connection sequence number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventEnvelope {
    /// Rises by one for every event sent on this connection.
    pub seq: u64,
    /// The event.
    pub event: Event,
}

/// Events the agents push.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Event {
    /// Cheap liveness signal.
    Heartbeat {
        /// Milliseconds since the agent started.
        uptime_ms: u64,
    },
    /// The ceph-agent's view of the cluster changed: its generation is now `generation`. The
    /// controller pulls what changed with [`Command::CephChanges`] (a nudge, never the data: a
    /// report of thousands of images does not fit one event, and a missed nudge loses nothing).
    CephChanged {
        /// The agent's generation after the change.
        generation: u64,
    },
    /// The DPU's report changed (or the periodic full report is due).
    DpuReport(Box<DpuReport>),
    /// The DPU agent replayed its ledger into SNAP (e.g. after SNAP restarted).
    SnapReplayed(ReplayReport),
    /// The agent is shutting down and will close the connection.
    ShuttingDown,
}

/// Commands. Mutating commands need a valid fencing token; see [`Command::is_mutating`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Command {
    /// Take or renew the agent's lease for `ttl_ms` milliseconds.
    AcquireLease(AcquireLease),
    /// Give the lease up (only its holder may).
    ReleaseLease(ReleaseLease),
    /// Full report of the Ceph cluster (every managed image in one reply: small clusters and
    /// `unistor inspect`; the controller pages with [`Command::CephChanges`]).
    CephReport(Empty),
    /// What changed in the agent's view since a generation, one page at a time.
    CephChanges(ChangesQuery),
    /// The cluster's health, at most a second old: what an apply checks between the steps
    /// that write to the cluster (the health gate).
    CephHealth(Empty),
    /// The live watchers of some images (looked up now, not from the agent's view).
    ImageWatchers(ImageList),
    /// Some images as the cluster has them now, whoever owns them: the controller asks about
    /// the images its volumes name that the agent's view does not hold (an image made outside
    /// unistor must show in a plan as not owned, not as one to create).
    ProbeImages(ImageList),
    /// Create an RBD image owned by unistor (idempotent).
    CreateImage(Box<CreateImage>),
    /// Take over an existing image that carries no owner: write the ownership and policy keys
    /// (refused while it has watchers, or when it belongs to someone; idempotent).
    AdoptImage(Box<AdoptImage>),
    /// Grow an image (never shrinks).
    GrowImage(GrowImage),
    /// Copy a clone's parent data into it, so that it no longer depends on its snapshot
    /// (idempotent: an image that is not a clone is left as it is).
    FlattenImage(FlattenImage),
    /// Take a snapshot of an owned image (idempotent: an existing snapshot of that name is
    /// success). A name that is not a scheduled one (`auto-<seconds>`) is recorded in the
    /// image's `unistor.snapshots` key first, so that a later removal knows it as unistor's.
    CreateSnapshot(SnapshotOp),
    /// Remove a snapshot of an owned image (idempotent: a missing one is success); refused
    /// (`in_use`, naming them) while it has clones.
    RemoveSnapshot(SnapshotOp),
    /// Move an image to the RBD trash.
    TrashImage(TrashImage),
    /// Restore an image from the trash.
    RestoreImage(ImageRef),
    /// Delete an image (refused while it has watchers).
    DeleteImage(DeleteImage),
    /// Create (or update) a least-privilege cephx identity for SNAP and return its key.
    IssueSnapIdentity(IssueSnapIdentity),
    /// Fence one DPU's SNAP off the cluster: its identity loses its OSD caps, its connected
    /// clients are blocklisted, and the fence is recorded in the cluster.
    FenceClient(FenceRequest),
    /// Undo [`Command::FenceClient`]: caps restored, blocklist entries removed, record removed.
    UnfenceClient(UnfenceRequest),
    /// Full report of a DPU.
    DpuReport(Empty),
    /// Deploy SNAP (or converge an existing deployment to this spec).
    InstallSnap(Box<SnapSpec>),
    /// Replace a running SNAP with this spec (refused when none is installed).
    UpgradeSnap(Box<SnapSpec>),
    /// Remove SNAP (refused while SNAP still has controllers).
    RemoveSnap(Empty),
    /// Register a Ceph cluster in SNAP.
    RegisterRbdCluster(RbdCluster),
    /// Unregister a Ceph cluster.
    UnregisterRbdCluster(NameRef),
    /// Create an rbd bdev.
    CreateBdev(BdevSpec),
    /// Delete a bdev.
    DeleteBdev(NameRef),
    /// Grow a bdev (and its image) to a size in MiB.
    ResizeBdev(BdevResize),
    /// Set a bdev's QoS rate limits (SPDK's `bdev_set_qos_limit`; all four, 0 = no limit).
    SetBdevQos(BdevQos),
    /// Create an NVMe subsystem.
    CreateSubsystem(SubsystemSpec),
    /// Destroy an (empty) NVMe subsystem.
    DestroySubsystem(NqnRef),
    /// Create a namespace.
    CreateNamespace(NamespaceSpec),
    /// Destroy a namespace.
    DestroyNamespace(NamespaceRef),
    /// Create a controller (suspended).
    CreateController(ControllerSpec),
    /// Destroy a controller.
    DestroyController(NameRef),
    /// Attach a namespace to a controller.
    AttachNamespace(Attachment),
    /// Detach a namespace from a controller.
    DetachNamespace(Attachment),
    /// Suspend a controller.
    SuspendController(NameRef),
    /// Resume a controller.
    ResumeController(NameRef),
}

impl Command {
    /// Whether the command changes anything (and so needs the lease).
    pub fn is_mutating(&self) -> bool {
        match self {
            Command::AcquireLease(_)
            | Command::ReleaseLease(_)
            | Command::CephReport(_)
            | Command::CephChanges(_)
            | Command::CephHealth(_)
            | Command::ImageWatchers(_)
            | Command::ProbeImages(_)
            | Command::DpuReport(_) => false,
            Command::CreateImage(_)
            | Command::AdoptImage(_)
            | Command::GrowImage(_)
            | Command::FlattenImage(_)
            | Command::CreateSnapshot(_)
            | Command::RemoveSnapshot(_)
            | Command::TrashImage(_)
            | Command::RestoreImage(_)
            | Command::DeleteImage(_)
            | Command::IssueSnapIdentity(_)
            | Command::FenceClient(_)
            | Command::UnfenceClient(_)
            | Command::InstallSnap(_)
            | Command::UpgradeSnap(_)
            | Command::RemoveSnap(_)
            | Command::RegisterRbdCluster(_)
            | Command::UnregisterRbdCluster(_)
            | Command::CreateBdev(_)
            | Command::DeleteBdev(_)
            | Command::ResizeBdev(_)
            | Command::SetBdevQos(_)
            | Command::CreateSubsystem(_)
            | Command::DestroySubsystem(_)
            | Command::CreateNamespace(_)
            | Command::DestroyNamespace(_)
            | Command::CreateController(_)
            | Command::DestroyController(_)
            | Command::AttachNamespace(_)
            | Command::DetachNamespace(_)
            | Command::SuspendController(_)
            | Command::ResumeController(_) => true,
        }
    }

    /// The command's wire name, for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Command::AcquireLease(_) => "acquire_lease",
            Command::ReleaseLease(_) => "release_lease",
            Command::CephReport(_) => "ceph_report",
            Command::CephChanges(_) => "ceph_changes",
            Command::CephHealth(_) => "ceph_health",
            Command::ImageWatchers(_) => "image_watchers",
            Command::ProbeImages(_) => "probe_images",
            Command::AdoptImage(_) => "adopt_image",
            Command::CreateImage(_) => "create_image",
            Command::GrowImage(_) => "grow_image",
            Command::FlattenImage(_) => "flatten_image",
            Command::CreateSnapshot(_) => "create_snapshot",
            Command::RemoveSnapshot(_) => "remove_snapshot",
            Command::TrashImage(_) => "trash_image",
            Command::RestoreImage(_) => "restore_image",
            Command::DeleteImage(_) => "delete_image",
            Command::IssueSnapIdentity(_) => "issue_snap_identity",
            Command::FenceClient(_) => "fence_client",
            Command::UnfenceClient(_) => "unfence_client",
            Command::DpuReport(_) => "dpu_report",
            Command::InstallSnap(_) => "install_snap",
            Command::UpgradeSnap(_) => "upgrade_snap",
            Command::RemoveSnap(_) => "remove_snap",
            Command::RegisterRbdCluster(_) => "register_rbd_cluster",
            Command::UnregisterRbdCluster(_) => "unregister_rbd_cluster",
            Command::CreateBdev(_) => "create_bdev",
            Command::DeleteBdev(_) => "delete_bdev",
            Command::ResizeBdev(_) => "resize_bdev",
            Command::SetBdevQos(_) => "set_bdev_qos",
            Command::CreateSubsystem(_) => "create_subsystem",
            Command::DestroySubsystem(_) => "destroy_subsystem",
            Command::CreateNamespace(_) => "create_namespace",
            Command::DestroyNamespace(_) => "destroy_namespace",
            Command::CreateController(_) => "create_controller",
            Command::DestroyController(_) => "destroy_controller",
            Command::AttachNamespace(_) => "attach_namespace",
            Command::DetachNamespace(_) => "detach_namespace",
            Command::SuspendController(_) => "suspend_controller",
            Command::ResumeController(_) => "resume_controller",
        }
    }
}

/// A command without parameters.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

/// Parameters of [`Command::AcquireLease`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcquireLease {
    /// Requested lease duration; the agent clamps it to its own bounds.
    pub ttl_ms: u64,
    /// The controller process asking. Two processes with one certificate are two holders: a
    /// lease is renewed only for the instance it was granted to. Absent (older controllers):
    /// the certificate's name alone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<ControllerInstance>,
    /// Renew only: extend the live lease granted with this token, and grant nothing new
    /// (`no_lease` or `stale_token` when it lapsed or changed hands). A controller keeping a
    /// plan's leases renews this way: a lease that lapsed must not be taken again behind the
    /// plan's back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew: Option<u64>,
    /// A controller replica's claim (issue 24): the shard it holds in RADOS and that shard's
    /// fencing token. An agent grants a claimed lease only for the highest token each shard has
    /// shown it, and a higher claim ends a lower one's lease at once. Absent: a single
    /// controller, as before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claim: Option<ShardClaim>,
}

/// A shard and the fencing token a replica holds for it (`controller::coord`). A shard is one
/// DPU (its name), or `@gone-images` (the images of volumes gone from every manifest).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardClaim {
    /// The shard.
    pub shard: String,
    /// Its token, from RADOS; only grows.
    pub token: u64,
}

/// Parameters of [`Command::ReleaseLease`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseLease {
    /// The process releasing it: only the one it was granted to may.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<ControllerInstance>,
}

/// One controller process: what a lease is granted to, beside the certificate's name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerInstance {
    /// Random, drawn once per process.
    pub id: String,
    /// The host it runs on.
    pub host: String,
    /// Its process id there.
    pub pid: u32,
    /// Its command line, shortened (e.g. `unistor watch manifests/`).
    pub command: String,
}

impl ControllerInstance {
    /// Longest `id`, `host` or `command` an agent accepts.
    pub const MAX_FIELD: usize = 256;

    /// Names this process's role in its instance's command from now on (a controller replica:
    /// `replica ctl-a`), so that an agent refusing another controller names the replica holding
    /// its lease. The first label stays.
    pub fn label_this_process(label: &str) {
        let _ = THIS_PROCESS_LABEL.set(label.chars().take(Self::MAX_FIELD / 4).collect());
    }

    /// This process, the same value for every call (one id per process).
    pub fn this_process() -> Self {
        static ME: std::sync::OnceLock<ControllerInstance> = std::sync::OnceLock::new();
        let mut me = Self::unlabelled(&ME);
        if let Some(label) = THIS_PROCESS_LABEL.get() {
            me.command = format!("{} ({label})", me.command);
        }
        me
    }

    fn unlabelled(me: &'static std::sync::OnceLock<ControllerInstance>) -> Self {
        me.get_or_init(|| {
            let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "unknown-host".into());
            let mut command = std::env::args()
                .map(|a| {
                    std::path::Path::new(&a)
                        .file_name()
                        .filter(|_| a.starts_with('/'))
                        .map(|f| f.to_string_lossy().into_owned())
                        .unwrap_or(a)
                })
                .take(4)
                .collect::<Vec<_>>()
                .join(" ");
            command.truncate(Self::MAX_FIELD / 2);
            Self::new(host, command)
        })
        .clone()
    }

    /// A new instance with a fresh random id (tests run several in one process).
    pub fn new(host: String, command: String) -> Self {
        Self {
            id: format!("{:016x}{:08x}", fastrand::u64(..), std::process::id()),
            host,
            pid: std::process::id(),
            command,
        }
    }

    /// Checks the bounds an agent holds a peer's instance to.
    pub fn check(&self) -> Result<(), crate::WireError> {
        let ok = |s: &str| s.len() <= Self::MAX_FIELD && !s.chars().any(char::is_control);
        if self.id.is_empty() || !ok(&self.id) || !ok(&self.host) || !ok(&self.command) {
            return Err(crate::WireError::new(
                crate::ErrorCode::InvalidArgument,
                format!(
                    "controller instance: id, host and command must be at most {} characters without control characters",
                    Self::MAX_FIELD
                ),
            )
            .with_field("instance"));
        }
        Ok(())
    }
}

/// See [`ControllerInstance::label_this_process`].
static THIS_PROCESS_LABEL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

impl std::fmt::Display for ControllerInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "`{}` (pid {} on {}, instance {})",
            self.command,
            self.pid,
            self.host,
            self.id.chars().take(8).collect::<String>()
        )
    }
}

/// Names one image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRef {
    /// Pool name.
    pub pool: String,
    /// Image name.
    pub image: String,
}

/// Who owns an image: written as `rbd image-meta` on it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ownership {
    /// Value of `unistor.managed-by`: the unistor deployment that owns the image.
    pub managed_by: String,
    /// Value of `unistor.volume`: the volume the image backs.
    pub volume: String,
}

/// Parameters of [`Command::CreateImage`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateImage {
    /// Pool name.
    pub pool: String,
    /// Image name.
    pub image: String,
    /// Size in bytes; a multiple of 1 MiB.
    pub size_bytes: u64,
    /// RBD features; empty means `layering,exclusive-lock`.
    #[serde(default)]
    pub features: Vec<String>,
    /// Ownership metadata to write.
    pub owner: Ownership,
    /// What removing the volume does to the image, written as image metadata so that it
    /// survives the manifest. Also updated when the image already exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<ImagePolicy>,
    /// Make it a copy-on-write clone of this snapshot (clone format 2), grown to `size_bytes`
    /// when that is larger than the snapshot; absent: an empty image. Only creation reads it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_from: Option<SnapshotRef>,
}

/// An RBD snapshot: `pool/image@snapshot`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRef {
    /// Pool of the image.
    pub pool: String,
    /// The image.
    pub image: String,
    /// The snapshot's name.
    pub snapshot: String,
}

impl std::fmt::Display for SnapshotRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}@{}", self.pool, self.image, self.snapshot)
    }
}

/// Parameters of [`Command::AdoptImage`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdoptImage {
    /// Pool name.
    pub pool: String,
    /// Image name.
    pub image: String,
    /// Ownership metadata to write.
    pub owner: Ownership,
    /// The deletion policy to write with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<ImagePolicy>,
}

/// The deletion policy written on an image (`unistor.deletion-policy`,
/// `unistor.trash-retention-secs`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImagePolicy {
    /// `Retain`, `Trash` or `Delete`.
    pub deletion: crate::meta::DeletionPolicy,
    /// How long a trashed image is protected.
    pub trash_retention_secs: u64,
}

/// Parameters of [`Command::GrowImage`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrowImage {
    /// Pool name.
    pub pool: String,
    /// Image name.
    pub image: String,
    /// New size in bytes; must not be smaller than the current size.
    pub size_bytes: u64,
    /// The owner the image must carry.
    pub owner: Ownership,
}

/// Parameters of [`Command::FlattenImage`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlattenImage {
    /// Pool name.
    pub pool: String,
    /// Image name.
    pub image: String,
    /// The owner the image must carry.
    pub owner: Ownership,
}

/// Parameters of [`Command::CreateSnapshot`] and [`Command::RemoveSnapshot`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotOp {
    /// Pool name.
    pub pool: String,
    /// Image name.
    pub image: String,
    /// Snapshot name.
    pub snapshot: String,
    /// The owner the image must carry.
    pub owner: Ownership,
}

/// One snapshot of an image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The cluster's id for it: later snapshots of an image have higher ids.
    pub id: u64,
    /// Its name.
    pub name: String,
}

/// Parameters of [`Command::TrashImage`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrashImage {
    /// Pool name.
    pub pool: String,
    /// Image name.
    pub image: String,
    /// How long the trash entry is protected from `rbd trash purge`, in seconds.
    pub retain_secs: u64,
    /// The owner the image must carry.
    pub owner: Ownership,
}

/// Parameters of [`Command::DeleteImage`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteImage {
    /// Pool name.
    pub pool: String,
    /// Image name.
    pub image: String,
    /// The owner the image must carry.
    pub owner: Ownership,
}

/// Parameters of [`Command::CephChanges`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangesQuery {
    /// The generation the controller has seen; 0 (or one the agent no longer remembers) asks for
    /// everything.
    pub since: u64,
    /// Continue after this image (`pool/image`, from the previous page's last image).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
    /// Images per page (the agent caps it so that a page fits one frame).
    pub limit: u32,
}

/// Parameters of [`Command::ImageWatchers`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageList {
    /// The images.
    pub images: Vec<ImageRef>,
}

/// Parameters of [`Command::IssueSnapIdentity`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueSnapIdentity {
    /// The cephx id, without `client.`.
    pub client_id: String,
    /// Pools the identity may use (`profile rbd pool=...`).
    pub pools: Vec<String>,
}

/// Parameters of [`Command::FenceClient`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FenceRequest {
    /// The DPU fenced (its name in the manifests).
    pub dpu: String,
    /// Its SNAP's cephx id, without `client.`.
    pub client_id: String,
    /// Who asked (the controller process, for the record).
    pub by: String,
    /// Why (free text, at most [`FENCE_REASON_MAX`] characters).
    pub reason: String,
}

/// Longest reason a fence records.
pub const FENCE_REASON_MAX: usize = 200;

/// Parameters of [`Command::UnfenceClient`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnfenceRequest {
    /// The DPU.
    pub dpu: String,
    /// Its SNAP's cephx id, without `client.` (must match the record).
    pub client_id: String,
}

/// Where a fence stands. Only `Fenced` lets a controller expose the DPU's volumes elsewhere:
/// a fence interrupted part way is `Fencing` until it is run again (or undone).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FenceState {
    /// Recorded, not yet complete.
    Fencing,
    /// Caps revoked and every connected client blocklisted.
    Fenced,
}

/// A fence as the cluster records it (`ceph config-key`, `unistor/fence/<dpu>`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FenceRecord {
    /// The DPU.
    pub dpu: String,
    /// Its SNAP's cephx id, without `client.`.
    pub client_id: String,
    /// Where it stands.
    pub state: FenceState,
    /// When it was asked for (Unix milliseconds, the agent's clock).
    pub at_unix_ms: u64,
    /// Who asked.
    pub by: String,
    /// Why.
    pub reason: String,
    /// The identity's caps before the fence (restored by the unfence).
    pub caps_before: BTreeMap<String, String>,
    /// Client addresses blocklisted (`ip:port/nonce`).
    pub blocklisted: Vec<String>,
}

/// Successful results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    /// The lease now held.
    Lease(LeaseInfo),
    /// Nothing to return.
    Done(Empty),
    /// The cluster report.
    CephReport(Box<CephReport>),
    /// One page of what changed in the agent's view.
    CephChanges(Box<CephChanges>),
    /// The cluster's health ([`Command::CephHealth`]).
    Health(CephHealth),
    /// Live watchers, one entry per image asked about.
    Watchers(WatcherList),
    /// Images as the cluster has them, one per image asked about ([`Command::ProbeImages`]).
    Images(ImageStatusList),
    /// An image's state after the command (boxed: the largest reply by far; the wire is the
    /// same).
    Image(Box<ImageStatus>),
    /// A cephx identity.
    Identity(CephIdentity),
    /// A fence as recorded.
    Fence(FenceRecord),
    /// A DPU's report.
    DpuReport(Box<DpuReport>),
    /// What a SNAP deployment did.
    Deploy(DeployReport),
}

/// A lease as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    /// Authenticated name of the controller holding the lease.
    pub holder: String,
    /// Fencing token of this lease; rises with every new grant.
    pub token: u64,
    /// Milliseconds until the lease ends, on the agent's monotonic clock.
    pub remaining_ms: u64,
    /// The controller process holding it (absent for an older controller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<ControllerInstance>,
}

/// The state of a Ceph cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CephReport {
    /// Cluster fsid.
    pub fsid: String,
    /// Overall health.
    pub health: CephHealth,
    /// Monitor addresses (v1 and v2 forms as the monmap lists them).
    pub monitors: Vec<MonitorInfo>,
    /// Raw capacity.
    pub capacity: Capacity,
    /// Every pool.
    pub pools: Vec<PoolInfo>,
    /// Images unistor manages (found through its per-pool index, never `rbd ls -l`).
    pub images: Vec<ImageStatus>,
    /// DPUs fenced off the cluster (see [`Command::FenceClient`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fences: Vec<FenceRecord>,
}

/// One page of [`Command::CephChanges`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CephChanges {
    /// The agent's generation when the page was made.
    pub generation: u64,
    /// `images` is every managed image (from `after` on), not a difference: replace what is
    /// known. Set when `since` was 0 or older than the agent remembers.
    pub full: bool,
    /// Another page follows: ask again with `after` = the last image of this one.
    pub more: bool,
    /// The cluster as last read (health, monitors, capacity, pools); its `images` are empty.
    pub cluster: CephReport,
    /// Images that changed since `since` (every image when `full`), ordered by pool and name.
    pub images: Vec<ImageStatus>,
    /// Images no longer managed (`pool/image`) since `since`; empty when `full`.
    pub removed: Vec<String>,
}

/// The reply to [`Command::ProbeImages`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageStatusList {
    /// One entry per image asked about: live (with its metadata and watchers), or missing.
    pub images: Vec<ImageStatus>,
}

/// The reply to [`Command::ImageWatchers`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatcherList {
    /// One entry per image asked about.
    pub images: Vec<ImageWatchers>,
}

/// The watchers of one image, looked up live.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageWatchers {
    /// Pool name.
    pub pool: String,
    /// Image name.
    pub image: String,
    /// Watcher addresses (empty: nobody has it open; the image may also be gone).
    pub watchers: Vec<String>,
    /// The cephx entity of each watcher, in the order of `watchers` (`client.admin`, SNAP's
    /// `client.<id>`...), from the monitors' sessions; empty when it could not be told.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<String>,
}

/// `ceph health`: status and the names and summaries of active checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CephHealth {
    /// `HEALTH_OK`, `HEALTH_WARN` or `HEALTH_ERR`.
    pub status: String,
    /// Active checks: name to summary.
    pub checks: BTreeMap<String, String>,
}

/// One monitor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorInfo {
    /// Monitor name.
    pub name: String,
    /// Its addresses, e.g. `v2:127.0.0.1:3300/0`.
    pub addrs: Vec<String>,
}

/// Cluster capacity in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// Total raw bytes.
    pub total_bytes: u64,
    /// Raw bytes used.
    pub used_bytes: u64,
    /// Raw bytes available.
    pub avail_bytes: u64,
}

/// One pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PoolInfo {
    /// Pool name.
    pub name: String,
    /// Pool id.
    pub id: u64,
    /// Whether the `rbd` application is enabled on it.
    pub rbd_enabled: bool,
    /// Bytes stored (before replication).
    pub stored_bytes: u64,
    /// Bytes that can still be written (after replication).
    pub max_avail_bytes: u64,
}

/// Where an image is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ImageState {
    /// A live image.
    Live,
    /// In the RBD trash.
    Trashed {
        /// Trash id (needed to restore).
        trash_id: String,
        /// Ceph's account of the entry, e.g. `protected until Tue Dec  1 09:59:59 2026`.
        trash_status: String,
    },
    /// In unistor's index, but neither live nor in the trash.
    Missing,
}

/// An image unistor manages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageStatus {
    /// Pool name.
    pub pool: String,
    /// Image name.
    pub image: String,
    /// Live, trashed or missing.
    #[serde(flatten)]
    pub state: ImageState,
    /// Size in bytes (0 unless live).
    pub size_bytes: u64,
    /// Enabled features (empty unless live).
    pub features: Vec<String>,
    /// Watcher addresses, when they were looked up (mutations' replies); reports leave them
    /// out: watchers are looked up live where a decision depends on them
    /// ([`Command::ImageWatchers`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watchers: Option<Vec<String>>,
    /// `unistor.*` image metadata.
    pub metadata: crate::meta::ImageMeta,
    /// Live, but reported from the pool's index and not read from the image yet (its agent
    /// just started; the sweep reads it): the index records intent, only the keys the image
    /// carries make it unistor's, so nothing is exposed on it until it is read.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub unverified: bool,
    /// The snapshot a live image is a clone of (`pool/image@snapshot`), until it is flattened;
    /// None for an image that is not a clone, or not read yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// How many clone generations a clone is from an image that is no clone (1: a clone of a
    /// plain image's snapshot); None when not a clone or not known (read through the CLI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_depth: Option<u32>,
    /// A live image's snapshots (empty: none, or not read yet).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotInfo>,
}

impl ImageStatus {
    /// Whether a client has the image open, as far as was looked up.
    pub fn in_use(&self) -> bool {
        self.watchers.as_ref().is_some_and(|w| !w.is_empty())
    }

    /// `pool/image`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.pool, self.image)
    }
}

/// A cephx identity and its secret key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CephIdentity {
    /// Full entity name, `client.<id>`.
    pub entity: String,
    /// The secret key (base64), for SNAP's keyring.
    pub key: String,
    /// Capabilities as granted.
    pub caps: BTreeMap<String, String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_json_shape() {
        let m = Message::Request(Request {
            id: 7,
            fence: Some(3),
            claim: None,
            command: Command::RestoreImage(ImageRef {
                pool: "rbd".into(),
                image: "vol1".into(),
            }),
        });
        let text = String::from_utf8(m.to_bytes()).unwrap();
        assert_eq!(
            text,
            r#"{"type":"request","id":7,"fence":3,"command":{"op":"restore_image","pool":"rbd","image":"vol1"}}"#
        );
        assert_eq!(Message::from_bytes(text.as_bytes()).unwrap(), m);
    }

    #[test]
    fn unknown_command_fields_are_refused() {
        let bad = br#"{"type":"request","id":1,"command":{"op":"restore_image","pool":"rbd","image":"x","force":true}}"#;
        let e = Message::from_bytes(bad).unwrap_err();
        assert!(e.to_string().contains("force"), "{e}");
        let bad = br#"{"type":"request","id":1,"command":{"op":"ceph_report","x":1}}"#;
        assert!(Message::from_bytes(bad).is_err());
        let bad = br#"{"type":"request","id":1,"command":{"op":"format_disk"}}"#;
        assert!(Message::from_bytes(bad).is_err());
    }

    #[test]
    fn response_and_event_shapes() {
        let m = Message::Response(Response {
            id: 2,
            outcome: Outcome::Ok(Reply::Done(Empty {})),
        });
        assert_eq!(
            String::from_utf8(m.to_bytes()).unwrap(),
            r#"{"type":"response","id":2,"outcome":{"ok":{"kind":"done"}}}"#
        );
        let e = Message::Event(EventEnvelope {
            seq: 1,
            event: Event::Heartbeat { uptime_ms: 5 },
        });
        assert_eq!(
            String::from_utf8(e.to_bytes()).unwrap(),
            r#"{"type":"event","seq":1,"event":{"kind":"heartbeat","uptime_ms":5}}"#
        );
    }

    #[test]
    fn new_replies_and_events_round_trip() {
        for m in [
            Message::Response(Response {
                id: 1,
                outcome: Outcome::Ok(Reply::Watchers(WatcherList {
                    images: vec![ImageWatchers {
                        pool: "rbd".into(),
                        image: "a".into(),
                        watchers: vec!["10.0.0.1:0/1".into()],
                        clients: vec!["client.snap".into()],
                    }],
                })),
            }),
            Message::Event(EventEnvelope {
                seq: 1,
                event: Event::CephChanged { generation: 7 },
            }),
            Message::Request(Request {
                id: 2,
                fence: Some(4),
                claim: Some(ShardClaim {
                    shard: "dpu-3".into(),
                    token: 9,
                }),
                command: Command::CephChanges(ChangesQuery {
                    since: 3,
                    after: Some("rbd/a".into()),
                    limit: 10,
                }),
            }),
        ] {
            assert_eq!(Message::from_bytes(&m.to_bytes()).unwrap(), m);
        }
    }

    #[test]
    fn only_mutating_commands_need_the_lease() {
        assert!(!Command::CephReport(Empty {}).is_mutating());
        assert!(Command::RestoreImage(ImageRef {
            pool: "p".into(),
            image: "i".into()
        })
        .is_mutating());
    }
}
