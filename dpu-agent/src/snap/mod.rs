//! SNAP, typed: the inventory read from its list methods, and idempotent operations.
//!
//! Idempotency is decided by listing SNAP's state, never by parsing error text: every operation
//! looks first and does nothing when the object is already as wanted; when a call fails it looks
//! again, and succeeds if the object is there after all (someone else made it).
//!
//! Method and key names follow the keys DPF sends to real SNAP where they are known
//! (`shared/snap-reference.md` §3): controllers are addressed by `ctrl_id`, functions by
//! `pci_bdf`, namespaces carry `bdev_type: "spdk"`. `nvme_controller_create` takes the name as
//! `ctrl` (the CLI's flag; not verified) and is always sent with `suspended: true`.

pub mod client;
pub mod methods;

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use protocol::dpu::{
    BdevInfo, BdevSpec, ControllerInfo, ControllerSpec, FunctionInfo, FunctionRef, NamespaceInfo,
    NamespaceSpec, QosLimits, RbdCluster, SnapInventory, SubsystemInfo, SubsystemSpec,
};
use serde::Deserialize;
use serde_json::Value;

use methods::{self as m, Method as _};

pub use client::{SnapClient, SnapError};

/// Errors of SNAP operations.
#[derive(Debug, thiserror::Error)]
pub enum OpError {
    /// SNAP refused or could not be reached.
    #[error(transparent)]
    Snap(#[from] SnapError),
    /// An object of that name exists with another spec.
    #[error("{what} already exists with a different spec: {diff}")]
    Conflict {
        /// The object.
        what: String,
        /// The differences.
        diff: String,
    },
    /// A prerequisite is missing.
    #[error("{what} does not exist")]
    Missing {
        /// The object.
        what: String,
    },
    /// The object is in use.
    #[error("{what} is in use: {detail}")]
    Busy {
        /// The object.
        what: String,
        /// By what.
        detail: String,
    },
}

impl OpError {
    /// Whether SNAP may have applied the call although no answer says so: it was sent and no
    /// answer came (timeout, connection lost, garbled reply). Refusals, and checks that stopped
    /// before any call, left SNAP as it was.
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            OpError::Snap(
                SnapError::Timeout { .. } | SnapError::Io { .. } | SnapError::Protocol { .. }
            )
        )
    }
}

/// Whether an operation changed anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Done {
    /// Already as wanted.
    Unchanged,
    /// Changed.
    Changed,
}

#[derive(Deserialize)]
struct RawFunction {
    pf_index: u32,
    #[serde(default)]
    vf_index: Option<u32>,
    pci_bdf: String,
    #[serde(default)]
    vhca_id: u32,
    #[serde(default)]
    vuid: String,
    #[serde(default)]
    ctrl_id: Option<String>,
    #[serde(default)]
    vfs: Vec<RawFunction>,
}

#[derive(Deserialize)]
struct RawSubsystem {
    nqn: String,
    #[serde(default)]
    sn: String,
    #[serde(default)]
    mn: String,
    #[serde(default)]
    controllers: Vec<RawController>,
    #[serde(default)]
    namespaces: Vec<RawNamespace>,
}

#[derive(Deserialize)]
struct RawController {
    ctrl_id: String,
    #[serde(default)]
    nqn: String,
    #[serde(default)]
    pci_bdf: Option<String>,
    #[serde(default)]
    num_queues: u32,
    #[serde(default)]
    mdts: u32,
    #[serde(default)]
    state: String,
    #[serde(default)]
    namespaces: Vec<RawNamespace>,
}

#[derive(Deserialize)]
struct RawNamespace {
    nsid: u32,
    #[serde(default)]
    bdev: String,
    #[serde(default)]
    uuid: String,
    #[serde(default)]
    controllers: Vec<RawCtrlRef>,
}

#[derive(Deserialize)]
struct RawCtrlRef {
    ctrl_id: String,
}

#[derive(Deserialize)]
struct RawBdev {
    name: String,
    #[serde(default)]
    block_size: u32,
    #[serde(default)]
    num_blocks: u64,
    #[serde(default)]
    driver_specific: Value,
    /// `{rw_ios_per_sec, rw_mbytes_per_sec, r_mbytes_per_sec, w_mbytes_per_sec}`, 0 = none.
    #[serde(default)]
    assigned_rate_limits: Option<RawQos>,
}

/// `assigned_rate_limits` as SPDK writes it (extra keys tolerated).
#[derive(Deserialize, Default)]
struct RawQos {
    #[serde(default)]
    rw_ios_per_sec: u64,
    #[serde(default)]
    rw_mbytes_per_sec: u64,
    #[serde(default)]
    r_mbytes_per_sec: u64,
    #[serde(default)]
    w_mbytes_per_sec: u64,
}

#[derive(Deserialize)]
struct RawCluster {
    cluster_name: String,
}

fn parse<T: for<'de> Deserialize<'de>>(method: &str, v: Value) -> Result<T, SnapError> {
    serde_json::from_value(v).map_err(|e| SnapError::Protocol {
        method: method.into(),
        detail: e.to_string(),
    })
}

/// An operation re-lists SNAP when its view is older than this (the agent's supervision
/// re-lists far more often: every poll).
pub const VIEW_MAX_AGE: Duration = Duration::from_secs(60);

/// SNAP behind its socket, and a view of its objects kept up to date by the agent's own calls,
/// so that an operation costs the one call that does it, not a listing of everything.
#[derive(Debug)]
pub struct Snap {
    client: SnapClient,
    /// The inventory as last listed, with the agent's own changes since applied; `None` after
    /// SNAP stopped answering (it may have restarted and lost everything).
    view: Mutex<Option<(Instant, SnapInventory)>>,
    /// Which cluster registration each rbd bdev uses. SNAP does not list it (SPDK v24.01's
    /// `bdev_rbd_dump_info_json` writes the registration's credentials, never its name), so it
    /// comes from the agent's own calls and, across restarts, from its ledger.
    bdev_clusters: Mutex<HashMap<String, String>>,
}

impl Snap {
    /// SNAP through `client`.
    pub fn new(client: SnapClient) -> Self {
        Self {
            client,
            view: Mutex::new(None),
            bdev_clusters: Mutex::default(),
        }
    }

    /// Records that bdev `bdev` uses cluster registration `cluster` (from the ledger at start).
    pub fn know_bdev_cluster(&self, bdev: &str, cluster: &str) {
        self.bdev_clusters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(bdev.to_string(), cluster.to_string());
    }

    /// A listed bdev as the inventory shows it, with the cluster the agent knows it uses.
    fn bdev_info(&self, b: RawBdev) -> BdevInfo {
        let cluster = self
            .bdev_clusters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&b.name)
            .cloned();
        bdev_info(b, cluster)
    }

    fn view_lock(&self) -> std::sync::MutexGuard<'_, Option<(Instant, SnapInventory)>> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The view, listing SNAP afresh when there is none or it is older than [`VIEW_MAX_AGE`].
    pub async fn current(&self) -> Result<SnapInventory, SnapError> {
        if let Some((at, inv)) = self.view_lock().as_ref() {
            if at.elapsed() < VIEW_MAX_AGE {
                return Ok(inv.clone());
            }
        }
        self.inventory().await
    }

    /// The view as it is, without asking SNAP (`None` when SNAP was not listed yet, or stopped
    /// answering since).
    pub fn cached(&self) -> Option<SnapInventory> {
        self.view_lock().as_ref().map(|(_, inv)| inv.clone())
    }

    /// Forgets the view: the next operation lists SNAP again.
    pub fn invalidate(&self) {
        *self.view_lock() = None;
    }

    /// Applies one of our own changes to the view.
    fn update(&self, f: impl FnOnce(&mut SnapInventory)) {
        if let Some((_, inv)) = self.view_lock().as_mut() {
            f(inv);
        }
    }

    /// The raw client.
    pub fn client(&self) -> &SnapClient {
        &self.client
    }

    /// `spdk_get_version`'s version string.
    pub async fn version(&self) -> Result<String, SnapError> {
        Ok(self.client.invoke(&m::GetVersion {}).await?.version)
    }

    /// Lists every object SNAP has (four calls), and makes that the view.
    pub async fn inventory(&self) -> Result<SnapInventory, SnapError> {
        match self.list().await {
            Ok(inv) => {
                *self.view_lock() = Some((Instant::now(), inv.clone()));
                Ok(inv)
            }
            Err(e) => {
                self.invalidate();
                Err(e)
            }
        }
    }

    /// Lists every object SNAP has without touching the view (for readers outside the agent's
    /// command lock, whose listing could predate a command that just ran).
    pub async fn list(&self) -> Result<SnapInventory, SnapError> {
        let functions = self.client.invoke(&m::FunctionList { all: true }).await?;
        let subsystems = self.client.invoke(&m::SubsystemList {}).await?;
        let bdevs = self.client.invoke(&m::BdevList {}).await?;
        let clusters = match self.client.invoke(&m::ClusterList {}).await {
            Ok(v) => Some(v),
            // -2: none registered; -32601: SPDK built without RBD.
            Err(e) if matches!(e.code(), Some(-2) | Some(-32601)) => None,
            Err(e) => return Err(e),
        };
        let known = self.bdev_clusters.lock().unwrap_or_else(|e| e.into_inner());
        inventory_from_replies(
            SnapReplies {
                functions,
                subsystems,
                bdevs,
                clusters,
            },
            |bdev| known.get(bdev).cloned(),
        )
    }

    /// Runs `call`; on failure looks again with `check`, which says whether the wanted state
    /// holds after all.
    /// On success `apply` records the change in the view.
    async fn act<M, F>(
        &self,
        method: M,
        check: F,
        apply: impl FnOnce(&mut SnapInventory),
    ) -> Result<Done, OpError>
    where
        M: m::Method,
        F: Fn(&SnapInventory) -> bool,
    {
        match self.client.invoke(&method).await {
            Ok(_) => {
                self.update(apply);
                Ok(Done::Changed)
            }
            Err(e) if !e.is_unreachable() => {
                let inv = self.inventory().await?;
                if check(&inv) {
                    Ok(Done::Changed)
                } else {
                    Err(e.into())
                }
            }
            Err(e) => {
                self.invalidate();
                Err(e.into())
            }
        }
    }

    /// Registers a Ceph cluster.
    pub async fn register_cluster(&self, c: &RbdCluster) -> Result<Done, OpError> {
        let has = |inv: &SnapInventory| inv.clusters.contains(&c.name);
        if has(&self.current().await?) {
            return Ok(Done::Unchanged);
        }
        let params = m::RegisterCluster {
            name: c.name.clone(),
            user_id: c.user_id.clone(),
            config_param: m::ConfigParam {
                mon_host: c.mon_hosts.join(","),
                key: c.key.clone(),
            },
        };
        self.act(params, has, |inv| inv.clusters.push(c.name.clone()))
            .await
    }

    /// Unregisters a cluster (SNAP refuses while bdevs use it).
    pub async fn unregister_cluster(&self, name: &str) -> Result<Done, OpError> {
        let inv = self.current().await?;
        if !inv.clusters.iter().any(|c| c == name) {
            return Ok(Done::Unchanged);
        }
        let users: Vec<&str> = inv
            .bdevs
            .iter()
            .filter(|b| b.cluster.as_deref() == Some(name))
            .map(|b| b.name.as_str())
            .collect();
        if !users.is_empty() {
            return Err(OpError::Busy {
                what: format!("rbd cluster {name}"),
                detail: format!("bdevs {}", users.join(", ")),
            });
        }
        self.act(
            m::UnregisterCluster { name: name.into() },
            |inv| !inv.clusters.iter().any(|c| c == name),
            |inv| inv.clusters.retain(|c| c != name),
        )
        .await
    }

    /// Creates an rbd bdev.
    pub async fn create_bdev(&self, b: &BdevSpec) -> Result<Done, OpError> {
        let inv = self.current().await?;
        if let Some(have) = inv.bdevs.iter().find(|x| x.name == b.name) {
            let same = have.pool.as_deref() == Some(b.pool.as_str())
                && have.image.as_deref() == Some(b.image.as_str())
                && have.block_size == b.block_size;
            return if same {
                Ok(Done::Unchanged)
            } else {
                Err(OpError::Conflict {
                    what: format!("bdev {}", b.name),
                    diff: format!(
                        "it is {}/{} with {}-byte blocks",
                        have.pool.as_deref().unwrap_or("?"),
                        have.image.as_deref().unwrap_or("?"),
                        have.block_size
                    ),
                })
            };
        }
        if !inv.clusters.contains(&b.cluster) {
            return Err(OpError::Missing {
                what: format!("rbd cluster {}", b.cluster),
            });
        }
        let params = m::BdevCreate {
            name: b.name.clone(),
            pool_name: b.pool.clone(),
            rbd_name: b.image.clone(),
            block_size: b.block_size,
            cluster_name: b.cluster.clone(),
        };
        self.know_bdev_cluster(&b.name, &b.cluster);
        let done = self
            .act(
                params,
                |inv| inv.bdevs.iter().any(|x| x.name == b.name),
                |_| {},
            )
            .await?;
        // The size comes from the image: ask SNAP for this one bdev.
        if let Ok(v) = self
            .client
            .invoke(&m::BdevGet {
                name: b.name.clone(),
            })
            .await
        {
            if let Ok(raw) = parse::<Vec<RawBdev>>(m::BdevGet::NAME, v) {
                let new: Vec<BdevInfo> = raw.into_iter().map(|x| self.bdev_info(x)).collect();
                self.update(|inv| {
                    inv.bdevs.retain(|x| x.name != b.name);
                    inv.bdevs.extend(new);
                });
                return Ok(done);
            }
        }
        // Not listed: let the next operation list SNAP again.
        self.invalidate();
        Ok(done)
    }

    /// Deletes a bdev; refused while a namespace uses it.
    pub async fn delete_bdev(&self, name: &str) -> Result<Done, OpError> {
        let inv = self.current().await?;
        if !inv.bdevs.iter().any(|b| b.name == name) {
            return Ok(Done::Unchanged);
        }
        if let Some((nqn, ns)) = inv.subsystems.iter().find_map(|s| {
            s.namespaces
                .iter()
                .find(|n| n.bdev == name)
                .map(|n| (&s.nqn, n.nsid))
        }) {
            return Err(OpError::Busy {
                what: format!("bdev {name}"),
                detail: format!("namespace {nqn}/{ns} uses it"),
            });
        }
        self.act(
            m::BdevDelete { name: name.into() },
            |inv| !inv.bdevs.iter().any(|b| b.name == name),
            |inv| inv.bdevs.retain(|b| b.name != name),
        )
        .await
    }

    /// Grows a bdev to `new_size_mib` MiB (`bdev_rbd_resize`); a bdev already that large is
    /// unchanged. SPDK refuses to shrink, and so does this, before asking.
    pub async fn resize_bdev(&self, name: &str, new_size_mib: u64) -> Result<Done, OpError> {
        let inv = self.current().await?;
        let Some(have) = inv.bdevs.iter().find(|b| b.name == name) else {
            return Err(OpError::Missing {
                what: format!("bdev {name}"),
            });
        };
        let bytes = have.num_blocks * u64::from(have.block_size);
        let want = new_size_mib << 20;
        if bytes == want {
            return Ok(Done::Unchanged);
        }
        if bytes > want {
            return Err(OpError::Conflict {
                what: format!("bdev {name}"),
                diff: format!("it has {bytes} bytes; {new_size_mib} MiB would shrink it"),
            });
        }
        let block_size = u64::from(have.block_size.max(1));
        self.act(
            m::BdevResize {
                name: name.into(),
                new_size: new_size_mib,
            },
            |inv| {
                inv.bdevs
                    .iter()
                    .any(|b| b.name == name && b.num_blocks * u64::from(b.block_size) >= want)
            },
            |inv| {
                for b in inv.bdevs.iter_mut().filter(|b| b.name == name) {
                    b.num_blocks = want / block_size;
                }
            },
        )
        .await
    }

    /// Sets bdev `name`'s QoS limits (`bdev_set_qos_limit`, all four); limits already in
    /// force are unchanged. Live: the host keeps its device, I/O is only paced.
    pub async fn set_qos(&self, name: &str, limits: QosLimits) -> Result<Done, OpError> {
        let inv = self.current().await?;
        let Some(have) = inv.bdevs.iter().find(|b| b.name == name) else {
            return Err(OpError::Missing {
                what: format!("bdev {name}"),
            });
        };
        if have.qos == limits {
            return Ok(Done::Unchanged);
        }
        self.act(
            m::BdevQos {
                name: name.into(),
                rw_ios_per_sec: limits.rw_ios_per_sec,
                rw_mbytes_per_sec: limits.rw_mbytes_per_sec,
                r_mbytes_per_sec: limits.r_mbytes_per_sec,
                w_mbytes_per_sec: limits.w_mbytes_per_sec,
            },
            |inv| inv.bdevs.iter().any(|b| b.name == name && b.qos == limits),
            |inv| {
                for b in inv.bdevs.iter_mut().filter(|b| b.name == name) {
                    b.qos = limits;
                }
            },
        )
        .await
    }

    /// Creates a subsystem.
    pub async fn create_subsystem(&self, s: &SubsystemSpec) -> Result<Done, OpError> {
        let inv = self.current().await?;
        if let Some(have) = inv.subsystems.iter().find(|x| x.nqn == s.nqn) {
            return if have.serial == s.serial && have.model == s.model {
                Ok(Done::Unchanged)
            } else {
                Err(OpError::Conflict {
                    what: format!("subsystem {}", s.nqn),
                    diff: format!("serial {:?}, model {:?}", have.serial, have.model),
                })
            };
        }
        let params = m::SubsystemCreate {
            nqn: s.nqn.clone(),
            serial_number: s.serial.clone(),
            model_number: s.model.clone(),
            nn: s.max_namespaces,
            mnan: s.max_namespaces,
        };
        self.act(
            params,
            |inv| inv.subsystems.iter().any(|x| x.nqn == s.nqn),
            |inv| {
                inv.subsystems.push(SubsystemInfo {
                    nqn: s.nqn.clone(),
                    serial: s.serial.clone(),
                    model: s.model.clone(),
                    namespaces: vec![],
                })
            },
        )
        .await
    }

    /// Destroys an empty subsystem.
    pub async fn destroy_subsystem(&self, nqn: &str) -> Result<Done, OpError> {
        let inv = self.current().await?;
        let Some(sub) = inv.subsystems.iter().find(|s| s.nqn == nqn) else {
            return Ok(Done::Unchanged);
        };
        let ctrls: Vec<&str> = inv
            .controllers
            .iter()
            .filter(|c| c.nqn == nqn)
            .map(|c| c.name.as_str())
            .collect();
        if !sub.namespaces.is_empty() || !ctrls.is_empty() {
            return Err(OpError::Busy {
                what: format!("subsystem {nqn}"),
                detail: format!(
                    "{} namespace(s), controllers [{}]",
                    sub.namespaces.len(),
                    ctrls.join(", ")
                ),
            });
        }
        self.act(
            m::SubsystemDestroy { nqn: nqn.into() },
            |inv| !inv.subsystems.iter().any(|s| s.nqn == nqn),
            |inv| inv.subsystems.retain(|s| s.nqn != nqn),
        )
        .await
    }

    /// Creates a namespace with a fixed NSID and UUID.
    pub async fn create_namespace(&self, n: &NamespaceSpec) -> Result<Done, OpError> {
        let inv = self.current().await?;
        let Some(sub) = inv.subsystems.iter().find(|s| s.nqn == n.nqn) else {
            return Err(OpError::Missing {
                what: format!("subsystem {}", n.nqn),
            });
        };
        if let Some(have) = sub.namespaces.iter().find(|x| x.nsid == n.nsid) {
            return if have.bdev == n.bdev && have.uuid.eq_ignore_ascii_case(&n.uuid) {
                Ok(Done::Unchanged)
            } else {
                Err(OpError::Conflict {
                    what: format!("namespace {}/{}", n.nqn, n.nsid),
                    diff: format!("bdev {}, uuid {}", have.bdev, have.uuid),
                })
            };
        }
        if !inv.bdevs.iter().any(|b| b.name == n.bdev) {
            return Err(OpError::Missing {
                what: format!("bdev {}", n.bdev),
            });
        }
        let params = m::NamespaceCreate {
            nqn: n.nqn.clone(),
            nsid: n.nsid,
            bdev_name: n.bdev.clone(),
            uuid: n.uuid.clone(),
            bdev_type: "spdk",
        };
        self.act(
            params,
            |inv| has_namespace(inv, &n.nqn, n.nsid),
            |inv| {
                if let Some(s) = inv.subsystems.iter_mut().find(|s| s.nqn == n.nqn) {
                    s.namespaces.push(NamespaceInfo {
                        nsid: n.nsid,
                        bdev: n.bdev.clone(),
                        uuid: n.uuid.clone(),
                        controller: None,
                    });
                }
            },
        )
        .await
    }

    /// Destroys a namespace (refused while attached).
    pub async fn destroy_namespace(&self, nqn: &str, nsid: u32) -> Result<Done, OpError> {
        let inv = self.current().await?;
        let Some(ns) = inv
            .subsystems
            .iter()
            .find(|s| s.nqn == nqn)
            .and_then(|s| s.namespaces.iter().find(|n| n.nsid == nsid))
        else {
            return Ok(Done::Unchanged);
        };
        if let Some(c) = &ns.controller {
            return Err(OpError::Busy {
                what: format!("namespace {nqn}/{nsid}"),
                detail: format!("attached to controller {c}"),
            });
        }
        self.act(
            m::NamespaceDestroy {
                nqn: nqn.into(),
                nsid,
            },
            |inv| !has_namespace(inv, nqn, nsid),
            |inv| {
                for s in inv.subsystems.iter_mut().filter(|s| s.nqn == nqn) {
                    s.namespaces.retain(|n| n.nsid != nsid);
                }
            },
        )
        .await
    }

    /// Creates a controller, suspended, on a free function.
    pub async fn create_controller(&self, c: &ControllerSpec) -> Result<Done, OpError> {
        let inv = self.current().await?;
        if let Some(have) = inv.controllers.iter().find(|x| x.name == c.name) {
            return if have.nqn == c.nqn && have.function == Some(c.function) {
                Ok(Done::Unchanged)
            } else {
                Err(OpError::Conflict {
                    what: format!("controller {}", c.name),
                    diff: format!("subsystem {}, function {:?}", have.nqn, have.function),
                })
            };
        }
        if !inv.subsystems.iter().any(|s| s.nqn == c.nqn) {
            return Err(OpError::Missing {
                what: format!("subsystem {}", c.nqn),
            });
        }
        let f = inv
            .functions
            .iter()
            .find(|f| f.function == c.function)
            .ok_or_else(|| OpError::Missing {
                what: format!("function {}", c.function),
            })?;
        if let Some(other) = &f.controller {
            return Err(OpError::Busy {
                what: format!("function {} ({})", c.function, f.pci_bdf),
                detail: format!("controller {other} is bound to it"),
            });
        }
        let params = m::ControllerCreate {
            nqn: c.nqn.clone(),
            ctrl: c.name.clone(),
            pci_bdf: f.pci_bdf.clone(),
            num_queues: c.num_queues,
            mdts: c.mdts,
            suspended: true,
        };
        self.act(
            params,
            |inv| inv.controllers.iter().any(|x| x.name == c.name),
            |inv| {
                for f in inv
                    .functions
                    .iter_mut()
                    .filter(|f| f.function == c.function)
                {
                    f.controller = Some(c.name.clone());
                }
                inv.controllers.push(ControllerInfo {
                    name: c.name.clone(),
                    nqn: c.nqn.clone(),
                    function: Some(c.function),
                    num_queues: c.num_queues,
                    mdts: c.mdts,
                    state: "SUSPENDED".into(),
                    namespaces: vec![],
                });
            },
        )
        .await
    }

    /// Destroys a controller that has no namespaces attached.
    pub async fn destroy_controller(&self, name: &str) -> Result<Done, OpError> {
        let inv = self.current().await?;
        let Some(c) = inv.controllers.iter().find(|c| c.name == name) else {
            return Ok(Done::Unchanged);
        };
        if !c.namespaces.is_empty() {
            return Err(OpError::Busy {
                what: format!("controller {name}"),
                detail: format!(
                    "namespaces {:?} are attached; detach them first",
                    c.namespaces
                ),
            });
        }
        // `force` as DPF sends it; safe because nothing is attached.
        self.act(
            m::ControllerDestroy {
                ctrl_id: name.into(),
                force: true,
            },
            |inv| !inv.controllers.iter().any(|c| c.name == name),
            |inv| {
                inv.controllers.retain(|c| c.name != name);
                for f in inv.functions.iter_mut() {
                    if f.controller.as_deref() == Some(name) {
                        f.controller = None;
                    }
                }
            },
        )
        .await
    }

    fn controller<'a>(inv: &'a SnapInventory, name: &str) -> Result<&'a ControllerInfo, OpError> {
        inv.controllers
            .iter()
            .find(|c| c.name == name)
            .ok_or_else(|| OpError::Missing {
                what: format!("controller {name}"),
            })
    }

    /// Attaches a namespace of the controller's subsystem.
    pub async fn attach(&self, ctrl: &str, nsid: u32) -> Result<Done, OpError> {
        let inv = self.current().await?;
        let c = Self::controller(&inv, ctrl)?;
        if c.namespaces.contains(&nsid) {
            return Ok(Done::Unchanged);
        }
        if !has_namespace(&inv, &c.nqn, nsid) {
            return Err(OpError::Missing {
                what: format!("namespace {}/{nsid}", c.nqn),
            });
        }
        self.act(
            m::AttachNamespace {
                ctrl_id: ctrl.into(),
                nsid,
            },
            |inv| Self::attached(inv, ctrl, nsid),
            |inv| set_attached(inv, ctrl, nsid, true),
        )
        .await
    }

    fn attached(inv: &SnapInventory, ctrl: &str, nsid: u32) -> bool {
        inv.controllers
            .iter()
            .any(|c| c.name == ctrl && c.namespaces.contains(&nsid))
    }

    /// Detaches a namespace.
    pub async fn detach(&self, ctrl: &str, nsid: u32) -> Result<Done, OpError> {
        let inv = self.current().await?;
        let Some(c) = inv.controllers.iter().find(|c| c.name == ctrl) else {
            return Ok(Done::Unchanged);
        };
        if !c.namespaces.contains(&nsid) {
            return Ok(Done::Unchanged);
        }
        self.act(
            m::DetachNamespace {
                ctrl_id: ctrl.into(),
                nsid,
            },
            |inv| !Self::attached(inv, ctrl, nsid),
            |inv| set_attached(inv, ctrl, nsid, false),
        )
        .await
    }

    /// Suspends (`resume = false`) or resumes a controller. A controller that does not exist
    /// runs nothing: suspending it succeeds.
    pub async fn set_running(&self, ctrl: &str, resume: bool) -> Result<Done, OpError> {
        let inv = self.current().await?;
        if !resume && !inv.controllers.iter().any(|c| c.name == ctrl) {
            return Ok(Done::Unchanged);
        }
        let c = Self::controller(&inv, ctrl)?;
        let want = if resume { "STARTED" } else { "SUSPENDED" };
        if c.state.eq_ignore_ascii_case(want) {
            return Ok(Done::Unchanged);
        }
        let check = |inv: &SnapInventory| {
            inv.controllers
                .iter()
                .any(|c| c.name == ctrl && c.state.eq_ignore_ascii_case(want))
        };
        let apply = |inv: &mut SnapInventory| {
            for c in inv.controllers.iter_mut().filter(|c| c.name == ctrl) {
                c.state = want.to_string();
            }
        };
        let ctrl_id = ctrl.to_string();
        if resume {
            self.act(m::ResumeController { ctrl_id }, check, apply)
                .await
        } else {
            self.act(m::SuspendController { ctrl_id }, check, apply)
                .await
        }
    }
}

/// A listed bdev as the inventory shows it; `cluster` is what the agent knows (SNAP does not say).
/// What SNAP answered to the four list calls an inventory is made of
/// (`emulation_function_list`, `nvme_subsystem_list`, `bdev_get_bdevs`,
/// `bdev_rbd_get_clusters_info`; the last absent when none is registered).
#[derive(Debug, Clone)]
pub struct SnapReplies {
    /// `emulation_function_list {all: true}`.
    pub functions: Value,
    /// `nvme_subsystem_list`.
    pub subsystems: Value,
    /// `bdev_get_bdevs`.
    pub bdevs: Value,
    /// `bdev_rbd_get_clusters_info`, when SNAP has any.
    pub clusters: Option<Value>,
}

/// The inventory SNAP's list replies describe: what the agent makes of whatever SNAP answers
/// (pure, and fuzzed: a reply of the wrong shape is a protocol error, never a panic).
/// `cluster_of` names the cluster a bdev uses, as the agent remembers it.
pub fn inventory_from_replies(
    r: SnapReplies,
    cluster_of: impl Fn(&str) -> Option<String>,
) -> Result<SnapInventory, SnapError> {
    let fns: Vec<RawFunction> = parse(m::FunctionList::NAME, r.functions)?;
    let subs: Vec<RawSubsystem> = parse(m::SubsystemList::NAME, r.subsystems)?;
    let bdevs: Vec<RawBdev> = parse(m::BdevList::NAME, r.bdevs)?;
    let clusters: Vec<RawCluster> = match r.clusters {
        Some(v) => parse(m::ClusterList::NAME, v)?,
        None => vec![],
    };
    let mut functions = vec![];
    let mut bdf_to_fn = BTreeMap::new();
    for pf in fns {
        for f in std::iter::once(&pf).chain(pf.vfs.iter()) {
            let function = FunctionRef {
                pf: f.pf_index,
                vf: f.vf_index,
            };
            bdf_to_fn.insert(f.pci_bdf.clone(), function);
            functions.push(FunctionInfo {
                function,
                pci_bdf: f.pci_bdf.clone(),
                vhca_id: f.vhca_id,
                vuid: f.vuid.clone(),
                controller: f.ctrl_id.clone().filter(|c| !c.is_empty()),
            });
        }
    }
    let mut controllers = vec![];
    let mut subsystems = vec![];
    for s in subs {
        for c in &s.controllers {
            controllers.push(ControllerInfo {
                name: c.ctrl_id.clone(),
                nqn: if c.nqn.is_empty() {
                    s.nqn.clone()
                } else {
                    c.nqn.clone()
                },
                function: c
                    .pci_bdf
                    .as_ref()
                    .and_then(|b| bdf_to_fn.get(b).copied())
                    .or_else(|| {
                        functions
                            .iter()
                            .find(|f| f.controller.as_deref() == Some(&c.ctrl_id))
                            .map(|f| f.function)
                    }),
                num_queues: c.num_queues,
                mdts: c.mdts,
                state: c.state.clone(),
                namespaces: c.namespaces.iter().map(|n| n.nsid).collect(),
            });
        }
        subsystems.push(SubsystemInfo {
            nqn: s.nqn,
            serial: s.sn,
            model: s.mn,
            namespaces: s
                .namespaces
                .into_iter()
                .map(|n| NamespaceInfo {
                    nsid: n.nsid,
                    bdev: n.bdev,
                    uuid: n.uuid,
                    controller: n.controllers.into_iter().next().map(|c| c.ctrl_id),
                })
                .collect(),
        });
    }
    let bdevs = bdevs
        .into_iter()
        .map(|b| {
            let cluster = cluster_of(&b.name);
            bdev_info(b, cluster)
        })
        .collect();
    Ok(SnapInventory {
        functions,
        subsystems,
        controllers,
        bdevs,
        clusters: clusters.into_iter().map(|c| c.cluster_name).collect(),
    })
}

fn bdev_info(b: RawBdev, cluster: Option<String>) -> BdevInfo {
    let rbd = b.driver_specific.get("rbd");
    let field = |k: &str| {
        rbd.and_then(|r| r.get(k))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    BdevInfo {
        pool: field("pool_name"),
        image: field("rbd_name"),
        cluster,
        name: b.name,
        block_size: b.block_size,
        num_blocks: b.num_blocks,
        qos: b
            .assigned_rate_limits
            .map_or_else(QosLimits::default, |q| QosLimits {
                rw_ios_per_sec: q.rw_ios_per_sec,
                rw_mbytes_per_sec: q.rw_mbytes_per_sec,
                r_mbytes_per_sec: q.r_mbytes_per_sec,
                w_mbytes_per_sec: q.w_mbytes_per_sec,
            }),
    }
}

/// Records an attach (or a detach) of `nsid` to `ctrl` in a view.
fn set_attached(inv: &mut SnapInventory, ctrl: &str, nsid: u32, on: bool) {
    let mut nqn = None;
    for c in inv.controllers.iter_mut().filter(|c| c.name == ctrl) {
        c.namespaces.retain(|n| *n != nsid);
        if on {
            c.namespaces.push(nsid);
        }
        nqn = Some(c.nqn.clone());
    }
    let Some(nqn) = nqn else { return };
    for s in inv.subsystems.iter_mut().filter(|s| s.nqn == nqn) {
        for n in s.namespaces.iter_mut().filter(|n| n.nsid == nsid) {
            n.controller = on.then(|| ctrl.to_string());
        }
    }
}

/// Whether `nqn` has namespace `nsid`.
pub fn has_namespace(inv: &SnapInventory, nqn: &str, nsid: u32) -> bool {
    inv.subsystems
        .iter()
        .any(|s| s.nqn == nqn && s.namespaces.iter().any(|n| n.nsid == nsid))
}
