//! DPU-agent commands, replies and reports.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How SNAP is deployed on a DPU.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapSpec {
    /// Container image without tag, e.g. `nvcr.io/nvidia/doca/doca_snap`.
    pub image: String,
    /// Image tag, e.g. `4.5.0-6-doca2.9.0`.
    pub tag: String,
    /// Container environment (`NVME_EMU_PROVIDER`, `APP_ARGS`...).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Hugepages (2 MiB pages) the DPU must have, in MiB.
    #[serde(default = "default_hugepages")]
    pub hugepages_mib: u64,
    /// CPU limit of the container, e.g. `16`.
    #[serde(default = "default_cpu")]
    pub cpu: String,
    /// Memory limit of the container, e.g. `4Gi`.
    #[serde(default = "default_memory")]
    pub memory: String,
    /// NVMe emulation firmware settings.
    #[serde(default)]
    pub firmware: FirmwareSpec,
}

fn default_hugepages() -> u64 {
    4096
}
fn default_cpu() -> String {
    "16".into()
}
fn default_memory() -> String {
    "4Gi".into()
}

/// Static NVMe PFs a BlueField-3 can expose (`NVME_EMULATION_NUM_PF`).
pub const BLUEFIELD3_PFS: std::ops::RangeInclusive<u32> = 1..=4;
/// VFs per PF a BlueField-3 can expose (`NVME_EMULATION_NUM_VF`).
pub const BLUEFIELD3_MAX_VFS: u32 = 127;

/// The NVMe emulation the firmware must expose.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirmwareSpec {
    /// `NVME_EMULATION_NUM_PF` (1-4).
    pub nvme_pfs: u32,
    /// `NVME_EMULATION_NUM_VF` (0-127).
    pub nvme_vfs: u32,
}

impl FirmwareSpec {
    /// Why a BlueField-3 cannot expose this, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        if !BLUEFIELD3_PFS.contains(&self.nvme_pfs) || self.nvme_vfs > BLUEFIELD3_MAX_VFS {
            return Err(format!(
                "a BlueField-3 offers {}-{} static NVMe PFs and 0-{BLUEFIELD3_MAX_VFS} VFs each; asked {} and {}",
                BLUEFIELD3_PFS.start(),
                BLUEFIELD3_PFS.end(),
                self.nvme_pfs,
                self.nvme_vfs
            ));
        }
        Ok(())
    }
}

impl Default for FirmwareSpec {
    fn default() -> Self {
        Self {
            nvme_pfs: 1,
            nvme_vfs: 0,
        }
    }
}

/// A Ceph cluster SNAP's librbd connects to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RbdCluster {
    /// Name in SNAP.
    pub name: String,
    /// cephx user (without `client.`).
    pub user_id: String,
    /// Monitor addresses, `host:port`.
    pub mon_hosts: Vec<String>,
    /// The user's secret key (base64).
    pub key: String,
}

/// An rbd bdev.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BdevSpec {
    /// Bdev name.
    pub name: String,
    /// Registered cluster.
    pub cluster: String,
    /// Pool.
    pub pool: String,
    /// Image (must exist).
    pub image: String,
    /// Block size (512 or 4096).
    pub block_size: u32,
}

/// Grows an rbd bdev to `new_size_mib` MiB: SPDK's `bdev_rbd_resize`, which resizes the image
/// through the bdev's own librbd handle and tells the host the new capacity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BdevResize {
    /// Bdev name.
    pub name: String,
    /// The new size in MiB (never smaller than the bdev).
    pub new_size_mib: u64,
}

/// A bdev's QoS rate limits as SPDK keeps them (`bdev_set_qos_limit`, and `bdev_get_bdevs`'
/// `assigned_rate_limits`): I/Os per second (a multiple of 1000) and MiB per second (SPDK
/// calls them MB); 0 is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QosLimits {
    /// Reads and writes per second.
    #[serde(default)]
    pub rw_ios_per_sec: u64,
    /// Read and write MiB per second.
    #[serde(default)]
    pub rw_mbytes_per_sec: u64,
    /// Read MiB per second.
    #[serde(default)]
    pub r_mbytes_per_sec: u64,
    /// Write MiB per second.
    #[serde(default)]
    pub w_mbytes_per_sec: u64,
}

/// SPDK's unit of an IOPS limit (`SPDK_BDEV_QOS_MIN_IOS_PER_SEC`, lib/bdev/bdev.c v24.01): a
/// limit that is not a multiple of it is rounded up, silently for the caller.
pub const QOS_IOPS_STEP: u64 = 1000;
/// The largest bandwidth limit unistor accepts, MiB/s (1 TiB/s: far above any device; SPDK's
/// own ceiling, `SPDK_BDEV_QOS_MAX_MBYTES_PER_SEC`, is where bytes overflow 64 bits).
pub const QOS_MAX_MIB_PER_SEC: u64 = 1 << 20;
/// The largest IOPS limit unistor accepts (a billion per second).
pub const QOS_MAX_IOPS: u64 = 1_000_000_000;

impl QosLimits {
    /// No limit at all.
    pub fn is_none(&self) -> bool {
        *self == Self::default()
    }

    /// Checks the limits as SPDK would take them without changing them: IOPS a multiple of
    /// [`QOS_IOPS_STEP`], each within its bound. The error names the field and the nearest
    /// values SPDK keeps as given.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let iops = self.rw_ios_per_sec;
        if !iops.is_multiple_of(QOS_IOPS_STEP) {
            let below = iops / QOS_IOPS_STEP * QOS_IOPS_STEP;
            let above = below + QOS_IOPS_STEP;
            let nearest = if below == 0 {
                format!("{above}")
            } else {
                format!("{below} or {above}")
            };
            return Err((
                "rw_ios_per_sec",
                format!(
                    "{iops} IOPS: SPDK's bdev QoS counts I/Os in steps of {QOS_IOPS_STEP} per second and would round it up to {above}; use {nearest}"
                ),
            ));
        }
        if iops > QOS_MAX_IOPS {
            return Err((
                "rw_ios_per_sec",
                format!("{iops} IOPS is above {QOS_MAX_IOPS}"),
            ));
        }
        for (field, v) in [
            ("rw_mbytes_per_sec", self.rw_mbytes_per_sec),
            ("r_mbytes_per_sec", self.r_mbytes_per_sec),
            ("w_mbytes_per_sec", self.w_mbytes_per_sec),
        ] {
            if v > QOS_MAX_MIB_PER_SEC {
                return Err((field, format!("{v} MiB/s is above {QOS_MAX_MIB_PER_SEC}")));
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for QosLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_none() {
            return f.write_str("no limit");
        }
        let mut parts = vec![];
        if self.rw_ios_per_sec > 0 {
            parts.push(format!("{} IOPS", self.rw_ios_per_sec));
        }
        for (v, what) in [
            (self.rw_mbytes_per_sec, "MiB/s"),
            (self.r_mbytes_per_sec, "MiB/s read"),
            (self.w_mbytes_per_sec, "MiB/s write"),
        ] {
            if v > 0 {
                parts.push(format!("{v} {what}"));
            }
        }
        f.write_str(&parts.join(", "))
    }
}

/// Sets a bdev's QoS limits: all four, so the call says the whole wanted state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BdevQos {
    /// Bdev name.
    pub name: String,
    /// The limits.
    pub limits: QosLimits,
}

/// An NVMe subsystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubsystemSpec {
    /// NQN.
    pub nqn: String,
    /// Serial number.
    pub serial: String,
    /// Model number.
    pub model: String,
    /// Namespaces allowed (`nn` and `mnan`).
    pub max_namespaces: u32,
}

/// An NVMe namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSpec {
    /// Subsystem.
    pub nqn: String,
    /// NSID (stable across re-creation).
    pub nsid: u32,
    /// Backing bdev.
    pub bdev: String,
    /// UUID (stable across re-creation).
    pub uuid: String,
}

/// An emulated PCI function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionRef {
    /// PF index.
    pub pf: u32,
    /// VF index, for a VF.
    #[serde(default)]
    pub vf: Option<u32>,
}

impl std::fmt::Display for FunctionRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.vf {
            Some(vf) => write!(f, "pf{}vf{vf}", self.pf),
            None => write!(f, "pf{}", self.pf),
        }
    }
}

/// An NVMe controller on a function. Always created suspended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerSpec {
    /// Controller name.
    pub name: String,
    /// Subsystem.
    pub nqn: String,
    /// The function it backs.
    pub function: FunctionRef,
    /// I/O queues.
    pub num_queues: u32,
    /// MDTS.
    pub mdts: u32,
}

/// A namespace attached to a controller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    /// Controller name.
    pub controller: String,
    /// NSID (in the controller's subsystem).
    pub nsid: u32,
    /// Detach even while the host holds the namespace's device open (`--allow-in-use`); without
    /// it the dpu-agent refuses, when its platform can tell (absent on the wire means false).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub force: bool,
}

/// Names an object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameRef {
    /// The name.
    pub name: String,
}

/// Names a subsystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NqnRef {
    /// The NQN.
    pub nqn: String,
}

/// Names a namespace.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceRef {
    /// Subsystem.
    pub nqn: String,
    /// NSID.
    pub nsid: u32,
}

/// How one deployment step went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepOutcome {
    /// Already as desired.
    Unchanged,
    /// Changed to the desired state.
    Changed,
    /// Set, but takes effect only after a host power cycle (nothing was rebooted).
    PowerCycleRequired,
    /// Failed; see the detail.
    Failed,
}

/// One step of a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployStep {
    /// Step name (`firmware`, `hugepages`, `pod`, `ready`...).
    pub step: String,
    /// Outcome.
    pub outcome: StepOutcome,
    /// What was found or done.
    pub detail: String,
}

/// What a deployment did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeployReport {
    /// `bluefield3` or `simulation`.
    pub platform: String,
    /// Steps in order.
    pub steps: Vec<DeployStep>,
    /// Whether SNAP answers on its socket now.
    pub ready: bool,
}

/// SNAP's runtime state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapState {
    /// Not deployed.
    NotInstalled,
    /// Deployed, not answering yet.
    Starting,
    /// Answering on its socket.
    Running,
    /// Deployed (or expected) but not answering.
    Unreachable,
}

/// SNAP as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapStatus {
    /// State.
    pub state: SnapState,
    /// `spdk_get_version` answer.
    pub version: Option<String>,
    /// Deployed image and tag.
    pub image: Option<String>,
    /// SNAP restarts the agent has seen (state lost on its socket).
    pub restarts: u64,
}

/// Facts about the machine the agent runs on.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HostFacts {
    /// Hostname.
    pub hostname: String,
    /// CPU model.
    pub cpu_model: String,
    /// CPUs online.
    pub cpus: u32,
    /// Memory, bytes.
    pub mem_total_bytes: u64,
    /// Memory available, bytes.
    pub mem_available_bytes: u64,
    /// Hugepages in total.
    pub hugepages_total: u64,
    /// Hugepages free.
    pub hugepages_free: u64,
    /// Hugepage size, KiB.
    pub hugepage_size_kib: u64,
    /// Load averages (1, 5, 15 min).
    pub load: [f64; 3],
    /// Seconds since boot.
    pub uptime_secs: u64,
    /// Network interfaces.
    pub interfaces: Vec<NetInterface>,
}

/// One network interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetInterface {
    /// Name.
    pub name: String,
    /// `operstate`.
    pub state: String,
    /// MAC address.
    pub mac: String,
    /// MTU.
    pub mtu: u32,
    /// Link speed in Mb/s, when known.
    pub speed_mbps: Option<u32>,
}

/// BlueField facts, when the tools exist.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BlueFieldFacts {
    /// Firmware version (`flint q`).
    pub firmware_version: Option<String>,
    /// PSID.
    pub psid: Option<String>,
    /// `/etc/mlnx-release`.
    pub release: Option<String>,
    /// ASIC temperature (`mget_temp`), °C.
    pub temperature_c: Option<i32>,
}

/// One emulated function in SNAP's inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionInfo {
    /// Position.
    pub function: FunctionRef,
    /// Host BDF.
    pub pci_bdf: String,
    /// vHCA id.
    pub vhca_id: u32,
    /// VUID.
    pub vuid: String,
    /// Controller bound to it.
    pub controller: Option<String>,
}

/// A subsystem in SNAP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubsystemInfo {
    /// NQN.
    pub nqn: String,
    /// Serial.
    pub serial: String,
    /// Model.
    pub model: String,
    /// Namespaces.
    pub namespaces: Vec<NamespaceInfo>,
}

/// A namespace in SNAP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceInfo {
    /// NSID.
    pub nsid: u32,
    /// Bdev.
    pub bdev: String,
    /// UUID.
    pub uuid: String,
    /// Controller it is attached to.
    pub controller: Option<String>,
}

/// A controller in SNAP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ControllerInfo {
    /// Name.
    pub name: String,
    /// Subsystem.
    pub nqn: String,
    /// Function.
    pub function: Option<FunctionRef>,
    /// Queues.
    pub num_queues: u32,
    /// MDTS.
    pub mdts: u32,
    /// `SUSPENDED` or `STARTED` as SNAP says.
    pub state: String,
    /// Attached NSIDs.
    pub namespaces: Vec<u32>,
}

/// A bdev in SNAP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BdevInfo {
    /// Name.
    pub name: String,
    /// Pool, for rbd bdevs.
    pub pool: Option<String>,
    /// Image, for rbd bdevs.
    pub image: Option<String>,
    /// Cluster, for rbd bdevs.
    pub cluster: Option<String>,
    /// Block size.
    pub block_size: u32,
    /// Blocks.
    pub num_blocks: u64,
    /// Its QoS limits (none when SNAP reports none).
    #[serde(default, skip_serializing_if = "QosLimits::is_none")]
    pub qos: QosLimits,
}

/// SNAP's object inventory.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapInventory {
    /// Functions.
    pub functions: Vec<FunctionInfo>,
    /// Subsystems (with namespaces).
    pub subsystems: Vec<SubsystemInfo>,
    /// Controllers.
    pub controllers: Vec<ControllerInfo>,
    /// Bdevs.
    pub bdevs: Vec<BdevInfo>,
    /// Registered rbd clusters.
    pub clusters: Vec<String>,
}

/// A replay of the ledger into SNAP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplayReport {
    /// When (Unix milliseconds).
    pub at_unix_ms: u64,
    /// Why (e.g. `SNAP restarted: 12 objects missing`).
    pub reason: String,
    /// Objects re-created.
    pub restored: Vec<String>,
    /// Objects that could not be re-created, with the error.
    pub failed: Vec<String>,
}

/// Everything a DPU agent reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DpuReport {
    /// `bluefield3` or `simulation`.
    pub platform: String,
    /// The machine.
    pub host: HostFacts,
    /// BlueField facts, when the tools exist.
    pub bluefield: Option<BlueFieldFacts>,
    /// SNAP's state.
    pub snap: SnapStatus,
    /// SNAP's objects (when it answers).
    pub inventory: Option<SnapInventory>,
    /// Ledger objects SNAP does not have (lost state), e.g. `namespace nqn...:0/1`.
    pub missing: Vec<String>,
    /// Generation of the agent's ledger (rises with every change).
    pub ledger_generation: u64,
    /// The last replay of the ledger.
    pub last_replay: Option<ReplayReport>,
    /// What the host the DPU sits in does with SNAP's controllers, when the platform can tell
    /// (`None`: unknown; SNAP's own RPCs do not say).
    #[serde(default)]
    pub host_use: Option<HostUse>,
    /// Which report this is: a controller holding a newer one from the same agent process
    /// ignores an older one that arrives later (a read answered before a push, applied after
    /// it). Zero from agents that do not number their reports.
    #[serde(default)]
    pub order: ReportOrder,
}

/// How much one DPU report differs from an earlier one: the one definition of "what counts as
/// a change", used by the dpu-agent (what to push) and the controller (what to reconcile on).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReportChange {
    /// Only fast-moving counters (host load, memory, a device's opener count...): not pushed.
    None,
    /// Something the status shows changed (the ledger's generation, a replay, BlueField facts,
    /// how many openers a device has), but nothing a plan decides on: pushed, no reconcile.
    Shown,
    /// Something a plan decides on changed (SNAP's state, image or restarts, its objects, what
    /// is missing, whether the host uses each controller and device): pushed, and reconciled.
    Decides,
}

impl DpuReport {
    /// How `self` differs from `before` (see [`ReportChange`]).
    pub fn change_from(&self, before: &DpuReport) -> ReportChange {
        type InUse<'a> = Vec<(&'a str, bool, Vec<(u32, bool)>)>;
        fn in_use(r: &DpuReport) -> Option<InUse<'_>> {
            r.host_use.as_ref().map(|h| {
                h.controllers
                    .iter()
                    .map(|c| {
                        let open: Vec<(u32, bool)> =
                            c.namespaces.iter().map(|n| (n.nsid, n.open > 0)).collect();
                        (c.name.as_str(), c.enabled, open)
                    })
                    .collect::<Vec<_>>()
            })
        }
        fn snap(r: &DpuReport) -> (SnapState, Option<&str>, u64) {
            (r.snap.state, r.snap.image.as_deref(), r.snap.restarts)
        }
        if snap(self) != snap(before)
            || self.inventory != before.inventory
            || self.missing != before.missing
            || in_use(self) != in_use(before)
        {
            return ReportChange::Decides;
        }
        if self.snap != before.snap
            || self.ledger_generation != before.ledger_generation
            || self.last_replay != before.last_replay
            || self.bluefield != before.bluefield
            || self.host_use != before.host_use
        {
            return ReportChange::Shown;
        }
        ReportChange::None
    }
}

/// The order of a DPU agent's reports: `seq` rises with every report one agent process makes
/// (pushed or asked for), and `instance` tells processes apart (a restarted agent starts again).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct ReportOrder {
    /// Drawn at random when the agent process starts.
    pub instance: u64,
    /// Rises with every report of that process.
    pub seq: u64,
}

impl ReportOrder {
    /// Whether a report numbered `self` is older than one numbered `held` (same process, lower
    /// number). Reports of different processes, or not numbered, are never older.
    pub fn older_than(&self, held: &ReportOrder) -> bool {
        self.instance != 0 && self.instance == held.instance && self.seq < held.seq
    }
}

/// The host's use of SNAP's controllers and namespaces, as the host itself accounts for it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostUse {
    /// Controllers the host sees.
    pub controllers: Vec<HostController>,
}

/// One controller as the host sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostController {
    /// SNAP's name of the controller.
    pub name: String,
    /// Whether the host's driver has it enabled.
    pub enabled: bool,
    /// Its namespaces the host sees as devices.
    pub namespaces: Vec<HostDevice>,
}

/// One namespace as a host device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostDevice {
    /// NSID.
    pub nsid: u32,
    /// The namespace's UUID as the host reads it.
    pub uuid: String,
    /// Bytes, as the host reads them.
    pub size_bytes: u64,
    /// Where the host has it (a device path; an NBD socket in simulation).
    pub device: String,
    /// How many openers the host has on it.
    pub open: u32,
}

impl HostUse {
    /// Controller `name`, if the host sees it.
    pub fn controller(&self, name: &str) -> Option<&HostController> {
        self.controllers.iter().find(|c| c.name == name)
    }

    /// Namespace `nsid` of controller `ctrl`, if the host sees it.
    pub fn device(&self, ctrl: &str, nsid: u32) -> Option<&HostDevice> {
        self.controller(ctrl)?
            .namespaces
            .iter()
            .find(|n| n.nsid == nsid)
    }
}
