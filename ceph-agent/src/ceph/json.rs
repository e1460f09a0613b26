//! The JSON the `ceph`, `rbd` and `rados` CLIs print, as far as the agent reads it.

use super::*;

#[derive(Debug, Deserialize)]
pub(super) struct RbdInfo {
    pub(super) size: u64,
    #[serde(default)]
    pub(super) features: Vec<String>,
    /// A clone's parent snapshot.
    #[serde(default)]
    pub(super) parent: Option<RbdParent>,
    /// How many snapshots it has.
    #[serde(default)]
    pub(super) snapshot_count: u64,
}

/// One entry of `rbd snap ls --format json`.
#[derive(Debug, Deserialize)]
pub(super) struct RbdSnap {
    pub(super) id: u64,
    pub(super) name: String,
}

/// One entry of `rbd children --format json`.
#[derive(Debug, Deserialize)]
pub(super) struct RbdChild {
    pub(super) pool: String,
    pub(super) image: String,
    #[serde(default)]
    pub(super) trash: bool,
}

/// `rbd info`'s `parent` of a clone.
#[derive(Debug, Deserialize)]
pub(super) struct RbdParent {
    pub(super) pool: String,
    pub(super) image: String,
    pub(super) snapshot: String,
}

impl RbdParent {
    /// `pool/image@snapshot`.
    pub(super) fn spec(&self) -> String {
        format!("{}/{}@{}", self.pool, self.image, self.snapshot)
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct RbdStatus {
    #[serde(default)]
    pub(super) watchers: Vec<RbdWatcher>,
}

#[derive(Debug, Deserialize)]
pub(super) struct RbdWatcher {
    pub(super) address: String,
}

/// One session in `ceph tell mon.X sessions`.
#[derive(Debug, Deserialize)]
pub(super) struct MonSessionJson {
    #[serde(default)]
    pub(super) entity_name: String,
    pub(super) addrs: SessionAddrsJson,
}

#[derive(Debug, Deserialize)]
pub(super) struct SessionAddrsJson {
    #[serde(default)]
    pub(super) addrvec: Vec<SessionAddrJson>,
}

#[derive(Debug, Deserialize)]
pub(super) struct SessionAddrJson {
    pub(super) addr: String,
    #[serde(default)]
    pub(super) nonce: u64,
}

#[derive(Debug, Clone, Deserialize)]
pub(super) struct TrashEntry {
    pub(super) id: String,
    pub(super) name: String,
    #[serde(default)]
    pub(super) status: String,
}

/// One entry of `rbd ls --long`.
#[derive(Debug, Deserialize)]
pub(super) struct LsEntry {
    pub(super) image: String,
    pub(super) size: u64,
}

#[derive(Debug, Deserialize)]
pub(super) struct CephStatusJson {
    pub(super) fsid: String,
    pub(super) health: HealthJson,
    #[serde(default)]
    pub(super) monmap: EpochJson,
    #[serde(default)]
    pub(super) osdmap: EpochJson,
}

/// A map's epoch in `ceph status` (0 when absent: then the map is always re-read).
#[derive(Debug, Default, Deserialize)]
pub(super) struct EpochJson {
    #[serde(default)]
    pub(super) epoch: u64,
}

/// The cluster part of the last report, and the map epochs it was read at.
#[derive(Debug)]
pub(super) struct ClusterCache {
    pub(super) at: Instant,
    pub(super) report: CephReport,
    pub(super) monmap_epoch: u64,
    pub(super) osdmap_epoch: u64,
    /// Pools with the rbd application.
    pub(super) rbd_pools: BTreeSet<String>,
}

#[derive(Debug, Deserialize)]
pub(super) struct HealthJson {
    pub(super) status: String,
    #[serde(default)]
    pub(super) checks: BTreeMap<String, CheckJson>,
}

#[derive(Debug, Deserialize)]
pub(super) struct CheckJson {
    pub(super) summary: SummaryJson,
}

#[derive(Debug, Deserialize)]
pub(super) struct SummaryJson {
    pub(super) message: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct MonDumpJson {
    pub(super) mons: Vec<MonJson>,
}

impl MonDumpJson {
    pub(super) fn monitors(self) -> Vec<MonitorInfo> {
        self.mons
            .into_iter()
            .map(|m| MonitorInfo {
                name: m.name,
                addrs: m
                    .public_addrs
                    .addrvec
                    .into_iter()
                    .map(|a| format!("{}:{}", a.kind, a.addr))
                    .collect(),
            })
            .collect()
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct MonJson {
    pub(super) name: String,
    pub(super) public_addrs: AddrVecJson,
}

#[derive(Debug, Deserialize)]
pub(super) struct AddrVecJson {
    pub(super) addrvec: Vec<AddrJson>,
}

#[derive(Debug, Deserialize)]
pub(super) struct AddrJson {
    #[serde(rename = "type")]
    pub(super) kind: String,
    pub(super) addr: String,
}

#[derive(Debug, Deserialize)]
pub(super) struct DfJson {
    pub(super) stats: DfStatsJson,
    pub(super) pools: Vec<DfPoolJson>,
}

#[derive(Debug, Deserialize)]
pub(super) struct DfStatsJson {
    pub(super) total_bytes: u64,
    pub(super) total_avail_bytes: u64,
    pub(super) total_used_raw_bytes: u64,
}

#[derive(Debug, Deserialize)]
pub(super) struct DfPoolJson {
    pub(super) name: String,
    pub(super) id: u64,
    pub(super) stats: DfPoolStatsJson,
}

#[derive(Debug, Deserialize)]
pub(super) struct DfPoolStatsJson {
    pub(super) stored: u64,
    pub(super) max_avail: u64,
}

#[derive(Debug, Deserialize)]
pub(super) struct PoolDetailJson {
    pub(super) pool_name: String,
    #[serde(default)]
    pub(super) application_metadata: BTreeMap<String, serde_json::Value>,
}
