//! SNAP's in-memory object model and its methods, with SNAP's and SPDK's invariants and errors.
//!
//! Everything here lives in memory only, as in SNAP: a restart loses it. The rules follow
//! `shared/snap-reference.md` sections 3, 4 and 6; where SNAP's behaviour is not verified, SPDK's
//! conventions are used (negative errno codes with `strerror` messages).

use std::collections::{BTreeMap, BTreeSet};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::functions::{FnKey, Function};

/// A JSON-RPC error object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    /// The code (negative errno for method errors, -326xx for protocol errors).
    pub code: i64,
    /// The message.
    pub message: String,
}

impl RpcError {
    /// An error with `code` and `message`.
    pub fn new(code: i64, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
    /// -1 "Operation not permitted" (SPDK's answer to every Ceph failure).
    pub fn eperm() -> Self {
        Self::new(-1, "Operation not permitted")
    }
    /// -2 "No such file or directory".
    pub fn enoent() -> Self {
        Self::new(-2, "No such file or directory")
    }
    /// -5 "Input/output error" (injected faults).
    pub fn eio() -> Self {
        Self::new(-5, "Input/output error")
    }
    /// -16 "Device or resource busy".
    pub fn ebusy() -> Self {
        Self::new(-16, "Device or resource busy")
    }
    /// -17 "File exists".
    pub fn eexist() -> Self {
        Self::new(-17, "File exists")
    }
    /// -19 "No such device".
    pub fn enodev() -> Self {
        Self::new(-19, "No such device")
    }
    /// -22 "Invalid argument".
    pub fn einval() -> Self {
        Self::new(-22, "Invalid argument")
    }
    /// -32601 "Method not found".
    pub fn method_not_found() -> Self {
        Self::new(-32601, "Method not found")
    }
    /// -32602 "Invalid parameters".
    pub fn invalid_params() -> Self {
        Self::new(-32602, "Invalid parameters")
    }
    /// -32603 "spdk_json_decode_object failed": how SPDK's bdev methods report bad params.
    pub fn decode_failed() -> Self {
        Self::new(-32603, "spdk_json_decode_object failed")
    }
}

/// Every method the emulator serves.
pub const SNAP_METHODS: &[&str] = &[
    "emulation_function_list",
    "nvme_subsystem_create",
    "nvme_subsystem_destroy",
    "nvme_subsystem_list",
    "nvme_namespace_create",
    "nvme_namespace_destroy",
    "nvme_namespace_list",
    "nvme_controller_create",
    "nvme_controller_destroy",
    "nvme_controller_list",
    "nvme_controller_attach_ns",
    "nvme_controller_detach_ns",
    "nvme_controller_suspend",
    "nvme_controller_resume",
    "bdev_get_bdevs",
    "spdk_get_version",
    "rpc_get_methods",
    "framework_start_init",
    "framework_wait_init",
];

/// Methods SPDK serves before `framework_start_init` (registered with `SPDK_RPC_STARTUP` in
/// SPDK v24.01: `rpc_get_methods` and `spdk_get_version` in lib/rpc/rpc.c, `framework_start_init`
/// and `framework_wait_init` in lib/event/app.c). Every other method is `SPDK_RPC_RUNTIME` only.
pub const STARTUP_METHODS: &[&str] = &[
    "rpc_get_methods",
    "spdk_get_version",
    "framework_start_init",
    "framework_wait_init",
];

/// Methods SPDK serves once initialized; `framework_start_init` is the one that is not.
fn runtime_method(method: &str) -> bool {
    method != "framework_start_init"
}

/// A key the server adds to `params` when the request named one member twice: SPDK's
/// `spdk_json_decode_object` (lib/json/json_util.c `_json_decode_object`) fails an object with a
/// duplicate key, so the method answers as for any undecodable params. No decoder knows it.
pub const DUPLICATE_KEY: &str = "\u{0}duplicate key";

/// The SPDK RBD methods (absent when SPDK is "built without RBD").
pub const RBD_METHODS: &[&str] = &[
    "bdev_rbd_register_cluster",
    "bdev_rbd_unregister_cluster",
    "bdev_rbd_get_clusters_info",
    "bdev_rbd_create",
    "bdev_rbd_delete",
    "bdev_rbd_resize",
    "bdev_set_qos_limit",
];

#[derive(Debug, Clone)]
struct Namespace {
    bdev: String,
    uuid: String,
    ctrl: Option<String>,
}

#[derive(Debug, Clone)]
struct Subsystem {
    sn: String,
    mn: String,
    nn: u32,
    mnan: u32,
    namespaces: BTreeMap<u32, Namespace>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CtrlState {
    Suspended,
    Started,
}

#[derive(Debug, Clone)]
struct Controller {
    nqn: String,
    function: FnKey,
    num_queues: u32,
    mdts: u32,
    admin_only: bool,
    state: CtrlState,
    nsids: BTreeSet<u32>,
}

/// A registered Ceph cluster (`bdev_rbd_register_cluster`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterParams {
    /// Cluster name.
    pub name: String,
    /// cephx user (without `client.`).
    #[serde(default)]
    pub user_id: Option<String>,
    /// Config options, e.g. `mon_host` and `key`.
    #[serde(default)]
    pub config_param: Option<BTreeMap<String, String>>,
    /// A config file path.
    #[serde(default)]
    pub config_file: Option<String>,
    /// A key file path.
    #[serde(default)]
    pub key_file: Option<String>,
    /// librados thread core mask.
    #[serde(default)]
    pub core_mask: Option<String>,
}

/// `bdev_rbd_create` params.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RbdCreateParams {
    /// Pool.
    pub pool_name: String,
    /// Existing image.
    pub rbd_name: String,
    /// Block size.
    pub block_size: u32,
    /// Bdev name (default `Ceph<N>`).
    #[serde(default)]
    pub name: Option<String>,
    /// cephx user when no cluster is named.
    #[serde(default)]
    pub user_id: Option<String>,
    /// Config when no cluster is named.
    #[serde(default)]
    pub config: Option<BTreeMap<String, String>>,
    /// A registered cluster.
    #[serde(default)]
    pub cluster_name: Option<String>,
    /// Bdev UUID.
    #[serde(default)]
    pub uuid: Option<String>,
}

#[derive(Debug, Clone)]
struct Bdev {
    pool: String,
    image: String,
    block_size: u32,
    num_blocks: u64,
    /// Lower case.
    uuid: String,
    cluster: Option<String>,
    user_id: Option<String>,
    /// Whether the UUID is also the name (then it is no alias).
    uuid_is_name: bool,
    /// QoS limits in SPDK's internal units (I/Os and bytes per second; 0 = not defined), in
    /// `qos_rpc_type` order: rw IOPS, rw bytes, r bytes, w bytes.
    qos: crate::qos::Limits,
    /// Registration order: SPDK lists bdevs in it (`spdk_bdev_first`/`spdk_bdev_next` walk
    /// `g_bdev_mgr.bdevs`, a TAILQ appended to by `bdev_register`).
    seq: u64,
}

impl Bdev {
    /// The bdev's alias: its UUID, unless that is its name.
    fn alias(&self) -> Option<&str> {
        (!self.uuid_is_name).then_some(self.uuid.as_str())
    }
}

/// The whole SNAP state.
#[derive(Debug)]
pub struct State {
    functions: Vec<Function>,
    subsystems: BTreeMap<String, Subsystem>,
    controllers: BTreeMap<String, Controller>,
    bdevs: BTreeMap<String, Bdev>,
    clusters: BTreeMap<String, ClusterParams>,
    next_ctrl: u32,
    next_bdev: u32,
    /// Registration counter (bdevs and clusters are listed in registration order).
    registered: u64,
    /// Cluster names in registration order (SPDK's `g_map_bdev_rbd_cluster` STAILQ).
    cluster_order: Vec<String>,
    uuid_seed: u64,
    rbd_enabled: bool,
    /// Past `framework_start_init` (SPDK's `SPDK_RPC_RUNTIME` state); false only for an SPDK
    /// started with `--wait-for-rpc` until that call.
    pub runtime: bool,
    /// Image size assumed for bdevs when no real cluster is consulted.
    pub default_image_size: u64,
}

/// Decodes params as SPDK's `spdk_json_decode_object` does: an object (absent params are an
/// empty one), no unknown or duplicate key ([`DUPLICATE_KEY`]), and no `null` member: SPDK's
/// decoders of strings, numbers and booleans (lib/json/json_util.c `spdk_json_decode_string`,
/// via `spdk_json_strdup`, `spdk_json_decode_uint32`, `spdk_json_decode_bool`) refuse a `null`,
/// so an optional key sent as `null` is an error, never "absent".
fn decode<T: DeserializeOwned>(params: &Value, err: fn() -> RpcError) -> Result<T, RpcError> {
    let obj = match params {
        Value::Null => Value::Object(Default::default()),
        Value::Object(o) if o.values().any(Value::is_null) => return Err(err()),
        Value::Object(_) => params.clone(),
        _ => return Err(err()),
    };
    serde_json::from_value(obj).map_err(|_| err())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetMethods {
    #[serde(default)]
    current: bool,
    #[serde(default)]
    include_aliases: bool,
}

fn snap<T: DeserializeOwned>(params: &Value) -> Result<T, RpcError> {
    decode(params, RpcError::invalid_params)
}

fn spdk<T: DeserializeOwned>(params: &Value) -> Result<T, RpcError> {
    decode(params, RpcError::decode_failed)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NoParams {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FnListParams {
    /// Every emulated function is static and exposed, so `all` changes nothing; it is accepted
    /// because SNAP's clients send it.
    #[serde(default, rename = "all")]
    _all: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubsysCreate {
    nqn: String,
    #[serde(default, alias = "sn")]
    serial_number: Option<String>,
    #[serde(default, alias = "mn")]
    model_number: Option<String>,
    #[serde(default)]
    nn: Option<u32>,
    #[serde(default)]
    mnan: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SubsysDestroy {
    nqn: String,
    #[serde(default)]
    force: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NsCreate {
    nqn: String,
    #[serde(default)]
    nsid: Option<u32>,
    bdev_name: String,
    #[serde(default)]
    uuid: Option<String>,
    #[serde(default)]
    bdev_type: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NsRef {
    nqn: String,
    nsid: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NsList {
    #[serde(default)]
    nqn: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CtrlCreate {
    nqn: String,
    #[serde(default, alias = "ctrl_id")]
    ctrl: Option<String>,
    #[serde(default)]
    pf_id: Option<u32>,
    #[serde(default)]
    vf_id: Option<u32>,
    #[serde(default)]
    vhca_id: Option<u32>,
    #[serde(default)]
    pci_bdf: Option<String>,
    #[serde(default)]
    vuid: Option<String>,
    #[serde(default)]
    num_queues: Option<u32>,
    #[serde(default)]
    mdts: Option<u32>,
    #[serde(default)]
    suspended: bool,
    #[serde(default)]
    admin_only: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CtrlRef {
    #[serde(alias = "ctrl")]
    ctrl_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CtrlDestroy {
    #[serde(alias = "ctrl")]
    ctrl_id: String,
    #[serde(default)]
    force: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CtrlSuspend {
    #[serde(alias = "ctrl")]
    ctrl_id: String,
    #[serde(default)]
    admin_only: bool,
    #[serde(default)]
    live_update_notifier: bool,
    #[serde(default)]
    timeout_ms: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CtrlNs {
    #[serde(alias = "ctrl")]
    ctrl_id: String,
    nsid: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CtrlList {
    #[serde(default, alias = "ctrl")]
    ctrl_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NameOnly {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OptName {
    #[serde(default)]
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GetBdevs {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    timeout: Option<u64>,
}

/// `bdev_set_qos_limit`'s parameters (lib/bdev/bdev_rpc.c `rpc_bdev_set_qos_limit_decoders`).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SetQos {
    name: String,
    #[serde(default)]
    rw_ios_per_sec: Option<u64>,
    #[serde(default)]
    rw_mbytes_per_sec: Option<u64>,
    #[serde(default)]
    r_mbytes_per_sec: Option<u64>,
    #[serde(default)]
    w_mbytes_per_sec: Option<u64>,
}

/// `SPDK_BDEV_QOS_MIN_IOS_PER_SEC`.
const QOS_MIN_IOS_PER_SEC: u64 = 1000;
/// `SPDK_BDEV_QOS_MAX_MBYTES_PER_SEC`.
const QOS_MAX_MBYTES_PER_SEC: u64 = u64::MAX / (1024 * 1024);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Resize {
    name: String,
    new_size: u64,
}

/// An NQN as NVMe defines it: `nqn.` prefix, at most 223 bytes.
fn valid_nqn(nqn: &str) -> bool {
    nqn.starts_with("nqn.") && nqn.len() <= 223 && !nqn.chars().any(char::is_control)
}

/// A UUID in canonical 8-4-4-4-12 hex form.
pub fn valid_uuid(u: &str) -> bool {
    let parts: Vec<&str> = u.split('-').collect();
    parts.len() == 5
        && parts
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(p, n)| p.len() == n && p.chars().all(|c| c.is_ascii_hexdigit()))
}

impl State {
    /// An empty SNAP over `functions`.
    pub fn new(functions: Vec<Function>, rbd_enabled: bool, uuid_seed: u64) -> Self {
        Self {
            functions,
            subsystems: BTreeMap::new(),
            controllers: BTreeMap::new(),
            bdevs: BTreeMap::new(),
            clusters: BTreeMap::new(),
            next_ctrl: 1,
            next_bdev: 0,
            registered: 0,
            cluster_order: vec![],
            uuid_seed,
            rbd_enabled,
            runtime: true,
            default_image_size: 1 << 30,
        }
    }

    /// Whether `method` exists in this build.
    pub fn has_method(&self, method: &str) -> bool {
        SNAP_METHODS.contains(&method) || (self.rbd_enabled && RBD_METHODS.contains(&method))
    }

    /// Whether `method` may run in the current state (its `state_mask` covers it).
    fn serves_now(&self, method: &str) -> bool {
        if self.runtime {
            runtime_method(method)
        } else {
            STARTUP_METHODS.contains(&method)
        }
    }

    /// SPDK v24.01 lib/rpc/rpc.c `jsonrpc_handler`: an unknown method is -32601; a known one
    /// outside its state is `SPDK_JSONRPC_ERROR_INVALID_STATE` (-1) with SPDK's message.
    pub fn allowed_now(&self, method: &str) -> Result<(), RpcError> {
        if !self.has_method(method) {
            return Err(RpcError::method_not_found());
        }
        match (self.serves_now(method), self.runtime) {
            (true, _) => Ok(()),
            (false, false) => Err(RpcError::new(
                -1,
                "Method may only be called after framework is initialized using \
                 framework_start_init RPC.",
            )),
            (false, true) => Err(RpcError::new(
                -1,
                "Method may only be called before framework is initialized. Use \
                 --wait-for-rpc command line parameter and then issue this RPC before the \
                 framework_start_init RPC.",
            )),
        }
    }

    fn new_uuid(&mut self) -> String {
        // xorshift64*: deterministic per seed, good enough for unique ids.
        let mut x = self.uuid_seed;
        let mut next = || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_F491_4F6C_DD1D)
        };
        let (a, b) = (next(), next());
        self.uuid_seed = x;
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0x0fff,
            0x8000 | ((b >> 48) & 0x3fff),
            b & 0xffff_ffff_ffff
        )
    }

    /// Runs a method that needs no I/O. `bdev_rbd_register_cluster` and `bdev_rbd_create` come
    /// through [`State::register_cluster`] and [`State::create_rbd_bdev`] after their checks.
    pub fn call(&mut self, method: &str, params: &Value) -> Result<Value, RpcError> {
        self.allowed_now(method)?;
        match method {
            "spdk_get_version" => {
                if !matches!(params, Value::Null) {
                    return Err(RpcError::new(
                        -32602,
                        "spdk_get_version method requires no parameters",
                    ));
                }
                Ok(json!({
                    "version": "SPDK v24.01 (unistor snap-emulator)",
                    "fields": {"major": 24, "minor": 1, "patch": 0, "suffix": ""}
                }))
            }
            "rpc_get_methods" => {
                // lib/rpc/rpc.c `rpc_get_methods`: `current` lists only what this state serves.
                let p: GetMethods = decode(params, RpcError::invalid_params)?;
                let _ = p.include_aliases;
                let mut m: Vec<&str> = SNAP_METHODS.to_vec();
                if self.rbd_enabled {
                    m.extend(RBD_METHODS);
                }
                m.retain(|x| !p.current || self.serves_now(x));
                m.sort_unstable();
                Ok(json!(m))
            }
            "framework_start_init" => {
                // lib/event/app.c `rpc_framework_start_init`: no params; then SPDK_RPC_RUNTIME.
                if !params.is_null() {
                    return Err(RpcError::new(
                        -32602,
                        "framework_start_init requires no parameters",
                    ));
                }
                self.runtime = true;
                Ok(json!(true))
            }
            // Only reached at runtime: in the startup state the server waits instead
            // (lib/event/app.c `rpc_framework_wait_init`).
            "framework_wait_init" => Ok(json!(true)),
            "emulation_function_list" => {
                let _: FnListParams = snap(params)?;
                Ok(self.function_list())
            }
            "nvme_subsystem_create" => self.subsystem_create(snap(params)?),
            "nvme_subsystem_destroy" => self.subsystem_destroy(snap(params)?),
            "nvme_subsystem_list" => {
                let _: NoParams = snap(params)?;
                Ok(self.subsystem_list())
            }
            "nvme_namespace_create" => self.namespace_create(snap(params)?),
            "nvme_namespace_destroy" => self.namespace_destroy(snap(params)?),
            "nvme_namespace_list" => self.namespace_list(snap(params)?),
            "nvme_controller_create" => self.controller_create(snap(params)?),
            "nvme_controller_destroy" => self.controller_destroy(snap(params)?),
            "nvme_controller_list" => self.controller_list(snap(params)?),
            "nvme_controller_attach_ns" => self.attach(snap(params)?),
            "nvme_controller_detach_ns" => self.detach(snap(params)?),
            "nvme_controller_suspend" => {
                let p: CtrlSuspend = snap(params)?;
                let _ = (p.admin_only, p.live_update_notifier, p.timeout_ms);
                self.set_state(&p.ctrl_id, CtrlState::Suspended)
            }
            "nvme_controller_resume" => {
                let p: CtrlRef = snap(params)?;
                self.set_state(&p.ctrl_id, CtrlState::Started)
            }
            "bdev_get_bdevs" => self.get_bdevs(spdk(params)?),
            "bdev_rbd_unregister_cluster" => {
                let p: NameOnly = spdk(params)?;
                self.unregister_cluster(&p.name)
            }
            "bdev_rbd_get_clusters_info" => {
                let p: OptName = spdk(params)?;
                self.clusters_info(p.name.as_deref())
            }
            "bdev_rbd_delete" => {
                let p: NameOnly = spdk(params)?;
                self.delete_bdev(&p.name)
            }
            "bdev_rbd_resize" => {
                let p: Resize = spdk(params)?;
                self.resize_bdev(&p.name, p.new_size)
            }
            "bdev_set_qos_limit" => self.set_qos(spdk(params)?),
            "bdev_rbd_register_cluster" => {
                let p = Self::parse_register(params)?;
                self.register_cluster(p)
            }
            "bdev_rbd_create" => {
                let p = Self::parse_rbd_create(params)?;
                let size = self.default_image_size;
                self.create_rbd_bdev(p, size)
            }
            _ => Err(RpcError::method_not_found()),
        }
    }

    /// Decodes `bdev_rbd_register_cluster` params.
    pub fn parse_register(params: &Value) -> Result<ClusterParams, RpcError> {
        spdk(params)
    }

    /// Decodes `bdev_rbd_create` params.
    pub fn parse_rbd_create(params: &Value) -> Result<RbdCreateParams, RpcError> {
        spdk(params)
    }

    fn function_list(&self) -> Value {
        let ctrl_of = |key: FnKey| {
            self.controllers
                .iter()
                .find(|(_, c)| c.function == key)
                .map(|(id, _)| id.clone())
        };
        let mut pfs = vec![];
        for pf in self.functions.iter().filter(|f| f.key.vf.is_none()) {
            let mut entry = pf.to_json();
            if let Some(id) = ctrl_of(pf.key) {
                entry["ctrl_id"] = json!(id);
            }
            let vfs: Vec<Value> = self
                .functions
                .iter()
                .filter(|f| f.key.pf == pf.key.pf && f.key.vf.is_some())
                .map(|vf| {
                    let mut v = vf.to_json();
                    if let Some(id) = ctrl_of(vf.key) {
                        v["ctrl_id"] = json!(id);
                    }
                    v
                })
                .collect();
            entry["vfs"] = json!(vfs);
            pfs.push(entry);
        }
        json!(pfs)
    }

    fn subsystem_create(&mut self, p: SubsysCreate) -> Result<Value, RpcError> {
        if !valid_nqn(&p.nqn) {
            return Err(RpcError::einval());
        }
        if self.subsystems.contains_key(&p.nqn) {
            return Err(RpcError::eexist());
        }
        let n = self.subsystems.len() + 1;
        self.subsystems.insert(
            p.nqn,
            Subsystem {
                sn: p.serial_number.unwrap_or_else(|| format!("MNC{n:02}")),
                mn: p
                    .model_number
                    .unwrap_or_else(|| "BlueField NVMe SNAP Controller".into()),
                nn: p.nn.unwrap_or(0xFFFF_FFFE),
                mnan: p.mnan.unwrap_or(1024),
                namespaces: BTreeMap::new(),
            },
        );
        Ok(json!(true))
    }

    fn subsystem_destroy(&mut self, p: SubsysDestroy) -> Result<Value, RpcError> {
        let sub = self.subsystems.get(&p.nqn).ok_or_else(RpcError::enodev)?;
        let ctrls: Vec<String> = self
            .controllers
            .iter()
            .filter(|(_, c)| c.nqn == p.nqn)
            .map(|(id, _)| id.clone())
            .collect();
        if !p.force && (!ctrls.is_empty() || !sub.namespaces.is_empty()) {
            return Err(RpcError::ebusy());
        }
        for id in ctrls {
            self.controllers.remove(&id);
        }
        self.subsystems.remove(&p.nqn);
        Ok(json!(true))
    }

    fn ctrl_json(&self, id: &str, c: &Controller) -> Value {
        let sub = &self.subsystems[&c.nqn];
        let f = self
            .function(c.function)
            .expect("controller's function exists");
        let mut v = json!({
            "ctrl_id": id,
            "nqn": c.nqn,
            "vhca_id": f.vhca_id,
            "pci_bdf": f.pci_bdf,
            "pf_index": c.function.pf,
            "mdts": c.mdts,
            "num_queues": c.num_queues,
            "max_queues": 32,
            "admin_only": c.admin_only,
            "plugged": true,
            "state": match c.state { CtrlState::Suspended => "SUSPENDED", CtrlState::Started => "STARTED" },
            "namespaces": c.nsids.iter().map(|n| {
                let ns = &sub.namespaces[n];
                json!({"nsid": n, "bdev": ns.bdev, "uuid": ns.uuid})
            }).collect::<Vec<_>>(),
        });
        if let Some(vf) = c.function.vf {
            v["vf_index"] = json!(vf);
        }
        v
    }

    fn ns_json(&self, nqn: &str, nsid: u32, ns: &Namespace) -> Value {
        json!({
            "nsid": nsid,
            "bdev": ns.bdev,
            "nqn": nqn,
            "uuid": ns.uuid,
            "ready": if ns.ctrl.is_some() && self.bdevs.contains_key(&ns.bdev) { "Yes" } else { "No" },
            "max inflights per weight": 65535,
            "controllers": ns.ctrl.iter().map(|c| json!({"ctrl_id": c})).collect::<Vec<_>>(),
        })
    }

    fn subsystem_list(&self) -> Value {
        let list: Vec<Value> = self
            .subsystems
            .iter()
            .map(|(nqn, s)| {
                json!({
                    "nqn": nqn, "sn": s.sn, "mn": s.mn, "nn": s.nn, "mnan": s.mnan,
                    "controllers": self.controllers.iter().filter(|(_, c)| &c.nqn == nqn)
                        .map(|(id, c)| self.ctrl_json(id, c)).collect::<Vec<_>>(),
                    "namespaces": s.namespaces.iter().map(|(n, ns)| self.ns_json(nqn, *n, ns)).collect::<Vec<_>>(),
                })
            })
            .collect();
        json!(list)
    }

    fn namespace_create(&mut self, p: NsCreate) -> Result<Value, RpcError> {
        if let Some(t) = &p.bdev_type {
            if t != "spdk" {
                return Err(RpcError::einval());
            }
        }
        if let Some(u) = &p.uuid {
            if !valid_uuid(u) {
                return Err(RpcError::einval());
            }
        }
        if !self.bdevs.contains_key(&p.bdev_name) {
            return Err(RpcError::enodev());
        }
        // A bdev backs one namespace (SPDK claims it).
        if self
            .subsystems
            .values()
            .any(|s| s.namespaces.values().any(|n| n.bdev == p.bdev_name))
        {
            return Err(RpcError::ebusy());
        }
        let uuid = match p.uuid {
            Some(u) => u,
            None => self.new_uuid(),
        };
        let sub = self
            .subsystems
            .get_mut(&p.nqn)
            .ok_or_else(RpcError::enodev)?;
        let nsid = match p.nsid {
            Some(0) => return Err(RpcError::einval()),
            Some(n) if n > sub.nn => return Err(RpcError::einval()),
            Some(n) if sub.namespaces.contains_key(&n) => return Err(RpcError::eexist()),
            Some(n) => n,
            None => (1..=sub.nn)
                .find(|n| !sub.namespaces.contains_key(n))
                .ok_or_else(RpcError::ebusy)?,
        };
        if sub.namespaces.len() as u32 >= sub.mnan {
            return Err(RpcError::ebusy());
        }
        sub.namespaces.insert(
            nsid,
            Namespace {
                bdev: p.bdev_name,
                uuid,
                ctrl: None,
            },
        );
        Ok(json!(true))
    }

    fn namespace_destroy(&mut self, p: NsRef) -> Result<Value, RpcError> {
        let sub = self
            .subsystems
            .get_mut(&p.nqn)
            .ok_or_else(RpcError::enodev)?;
        let ns = sub.namespaces.get(&p.nsid).ok_or_else(RpcError::enodev)?;
        if ns.ctrl.is_some() {
            return Err(RpcError::ebusy());
        }
        sub.namespaces.remove(&p.nsid);
        Ok(json!(true))
    }

    fn namespace_list(&self, p: NsList) -> Result<Value, RpcError> {
        let mut out = vec![];
        for (nqn, s) in &self.subsystems {
            if p.nqn.as_ref().is_some_and(|q| q != nqn) {
                continue;
            }
            for (n, ns) in &s.namespaces {
                out.push(self.ns_json(nqn, *n, ns));
            }
        }
        if let Some(q) = &p.nqn {
            if !self.subsystems.contains_key(q) {
                return Err(RpcError::enodev());
            }
        }
        Ok(json!(out))
    }

    fn function(&self, key: FnKey) -> Option<&Function> {
        self.functions.iter().find(|f| f.key == key)
    }

    fn resolve_function(&self, p: &CtrlCreate) -> Result<FnKey, RpcError> {
        let found = if let Some(v) = &p.vuid {
            self.functions.iter().find(|f| &f.vuid == v)
        } else if let Some(b) = &p.pci_bdf {
            self.functions.iter().find(|f| &f.pci_bdf == b)
        } else if let Some(h) = p.vhca_id {
            self.functions.iter().find(|f| f.vhca_id == h)
        } else if let Some(pf) = p.pf_id {
            let key = FnKey { pf, vf: p.vf_id };
            self.functions.iter().find(|f| f.key == key)
        } else {
            return Err(RpcError::einval());
        };
        found.map(|f| f.key).ok_or_else(RpcError::enodev)
    }

    fn controller_create(&mut self, p: CtrlCreate) -> Result<Value, RpcError> {
        if !self.subsystems.contains_key(&p.nqn) {
            return Err(RpcError::enodev());
        }
        let key = self.resolve_function(&p)?;
        if self.controllers.values().any(|c| c.function == key) {
            return Err(RpcError::eexist());
        }
        let num_queues = p.num_queues.unwrap_or(16);
        let mdts = p.mdts.unwrap_or(7);
        if num_queues == 0 || num_queues > 32 || mdts > 10 {
            return Err(RpcError::einval());
        }
        let id = match p.ctrl {
            Some(name) => {
                if name.is_empty() || self.controllers.contains_key(&name) {
                    return Err(RpcError::eexist());
                }
                name
            }
            None => loop {
                let candidate = format!("NVMeCtrl{}", self.next_ctrl);
                self.next_ctrl += 1;
                if !self.controllers.contains_key(&candidate) {
                    break candidate;
                }
            },
        };
        self.controllers.insert(
            id.clone(),
            Controller {
                nqn: p.nqn,
                function: key,
                num_queues,
                mdts,
                admin_only: p.admin_only,
                state: if p.suspended {
                    CtrlState::Suspended
                } else {
                    CtrlState::Started
                },
                nsids: BTreeSet::new(),
            },
        );
        Ok(json!({"ctrl_id": id}))
    }

    fn controller_destroy(&mut self, p: CtrlDestroy) -> Result<Value, RpcError> {
        let c = self
            .controllers
            .get(&p.ctrl_id)
            .ok_or_else(RpcError::enodev)?;
        if !c.nsids.is_empty() && !p.force {
            return Err(RpcError::ebusy());
        }
        let c = self.controllers.remove(&p.ctrl_id).expect("checked");
        if let Some(sub) = self.subsystems.get_mut(&c.nqn) {
            for n in &c.nsids {
                if let Some(ns) = sub.namespaces.get_mut(n) {
                    ns.ctrl = None;
                }
            }
        }
        Ok(json!(true))
    }

    fn controller_list(&self, p: CtrlList) -> Result<Value, RpcError> {
        if let Some(id) = &p.ctrl_id {
            let c = self.controllers.get(id).ok_or_else(RpcError::enodev)?;
            return Ok(json!([self.ctrl_json(id, c)]));
        }
        Ok(json!(self
            .controllers
            .iter()
            .map(|(id, c)| self.ctrl_json(id, c))
            .collect::<Vec<_>>()))
    }

    fn attach(&mut self, p: CtrlNs) -> Result<Value, RpcError> {
        let c = self
            .controllers
            .get_mut(&p.ctrl_id)
            .ok_or_else(RpcError::enodev)?;
        if c.admin_only {
            return Err(RpcError::einval());
        }
        let sub = self
            .subsystems
            .get_mut(&c.nqn)
            .ok_or_else(RpcError::enodev)?;
        let ns = sub
            .namespaces
            .get_mut(&p.nsid)
            .ok_or_else(RpcError::enodev)?;
        match &ns.ctrl {
            Some(owner) if owner == &p.ctrl_id => return Err(RpcError::eexist()),
            Some(_) => return Err(RpcError::ebusy()),
            None => {}
        }
        ns.ctrl = Some(p.ctrl_id.clone());
        c.nsids.insert(p.nsid);
        Ok(json!(true))
    }

    fn detach(&mut self, p: CtrlNs) -> Result<Value, RpcError> {
        let c = self
            .controllers
            .get_mut(&p.ctrl_id)
            .ok_or_else(RpcError::enodev)?;
        if !c.nsids.remove(&p.nsid) {
            return Err(RpcError::enodev());
        }
        if let Some(ns) = self
            .subsystems
            .get_mut(&c.nqn)
            .and_then(|s| s.namespaces.get_mut(&p.nsid))
        {
            ns.ctrl = None;
        }
        Ok(json!(true))
    }

    fn set_state(&mut self, id: &str, state: CtrlState) -> Result<Value, RpcError> {
        let c = self.controllers.get_mut(id).ok_or_else(RpcError::enodev)?;
        c.state = state;
        Ok(json!(true))
    }

    fn bdev_json(&self, name: &str, b: &Bdev) -> Value {
        // As SPDK v24.01's `bdev_rbd_dump_info_json` and `bdev_rbd_cluster_dump_entry`
        // (module/bdev/rbd/bdev_rbd.c): pool and image, then the registration's credentials
        // where set; never the registration's name (nor its core mask).
        let mut rbd = json!({"pool_name": b.pool, "rbd_name": b.image});
        let cl = b.cluster.as_ref().and_then(|c| self.clusters.get(c));
        let user_id = match cl {
            Some(cl) => cl.user_id.as_ref(),
            None => b.user_id.as_ref(),
        };
        if let Some(u) = user_id {
            rbd["user_id"] = json!(u);
        }
        if let Some(cl) = cl {
            if let Some(p) = &cl.config_param {
                rbd["config_param"] = json!(p);
            }
            if let Some(f) = &cl.config_file {
                rbd["config_file"] = json!(f);
            }
            if let Some(k) = &cl.key_file {
                rbd["key_file"] = json!(k);
            }
        }
        let claimed = self
            .subsystems
            .values()
            .any(|s| s.namespaces.values().any(|n| n.bdev == name));
        json!({
            "name": name,
            "aliases": b.alias().into_iter().collect::<Vec<_>>(),
            "product_name": "Ceph Rbd Disk",
            "block_size": b.block_size,
            "num_blocks": b.num_blocks,
            "uuid": b.uuid,
            // `spdk_bdev_get_qos_rate_limits`: bandwidth back in MB, 0 where not defined.
            "assigned_rate_limits": {"rw_ios_per_sec": b.qos[0], "rw_mbytes_per_sec": b.qos[1] >> 20,
                "r_mbytes_per_sec": b.qos[2] >> 20, "w_mbytes_per_sec": b.qos[3] >> 20},
            "claimed": claimed,
            "zoned": false,
            "supported_io_types": {"read": true, "write": true, "unmap": true, "write_zeroes": true, "flush": true,
                "reset": true, "compare": false, "compare_and_write": false, "abort": false, "nvme_admin": false, "nvme_io": false},
            "driver_specific": {"rbd": rbd},
        })
    }

    fn get_bdevs(&self, p: GetBdevs) -> Result<Value, RpcError> {
        let _ = p.timeout;
        match &p.name {
            Some(n) => {
                let (n, b) = self.bdev_by_name(n).ok_or_else(RpcError::enodev)?;
                Ok(json!([self.bdev_json(n, b)]))
            }
            None => {
                let mut all: Vec<(&String, &Bdev)> = self.bdevs.iter().collect();
                all.sort_by_key(|(_, b)| b.seq);
                Ok(json!(all
                    .into_iter()
                    .map(|(n, b)| self.bdev_json(n, b))
                    .collect::<Vec<_>>()))
            }
        }
    }

    /// A bdev by its name or an alias. SPDK v24.01 registers every bdev's lower-case UUID as an
    /// alias (lib/bdev/bdev.c, `bdev_register`: `spdk_bdev_alias_add` unless the UUID is the
    /// name), in the one name tree `spdk_bdev_get_by_name` searches.
    /// What the host sees: every namespace attached to a started, not admin-only controller,
    /// whose bdev exists (a namespace whose bdev was deleted is hot-removed).
    pub fn exposures(&self) -> Vec<crate::host::Exposure> {
        let mut out = vec![];
        for (id, c) in &self.controllers {
            if c.state != CtrlState::Started || c.admin_only {
                continue;
            }
            for nsid in &c.nsids {
                let Some(ns) = self
                    .subsystems
                    .get(&c.nqn)
                    .and_then(|s| s.namespaces.get(nsid))
                else {
                    continue;
                };
                if let Some((bdev, b)) = self.bdev_by_name(&ns.bdev) {
                    out.push(crate::host::Exposure {
                        ctrl: id.clone(),
                        nsid: *nsid,
                        bdev: bdev.clone(),
                        uuid: ns.uuid.clone(),
                        size: b.num_blocks * u64::from(b.block_size),
                    });
                }
            }
        }
        out
    }

    /// Bdev `name`'s size in bytes (by name or alias).
    pub fn bdev_bytes(&self, name: &str) -> Option<u64> {
        self.bdev_by_name(name)
            .map(|(_, b)| b.num_blocks * u64::from(b.block_size))
    }

    fn bdev_by_name(&self, name: &str) -> Option<(&String, &Bdev)> {
        self.bdevs
            .get_key_value(name)
            .or_else(|| self.bdevs.iter().find(|(_, b)| b.alias() == Some(name)))
    }

    /// Registers a cluster (after the caller checked the credentials, in real-Ceph mode).
    pub fn register_cluster(&mut self, p: ClusterParams) -> Result<Value, RpcError> {
        // module/bdev/rbd/bdev_rbd.c `rbd_register_cluster`: a taken name is -1; an empty one is a
        // name like any other.
        if self.clusters.contains_key(&p.name) {
            return Err(RpcError::eperm());
        }
        let name = p.name.clone();
        self.clusters.insert(name.clone(), p);
        self.cluster_order.push(name.clone());
        Ok(json!(name))
    }

    /// Whether a cluster is registered (checked before the real-Ceph probe).
    pub fn cluster(&self, name: &str) -> Option<&ClusterParams> {
        self.clusters.get(name)
    }

    fn unregister_cluster(&mut self, name: &str) -> Result<Value, RpcError> {
        if !self.clusters.contains_key(name)
            || self
                .bdevs
                .values()
                .any(|b| b.cluster.as_deref() == Some(name))
        {
            return Err(RpcError::eperm());
        }
        self.clusters.remove(name);
        self.cluster_order.retain(|n| n != name);
        Ok(json!(true))
    }

    fn clusters_info(&self, name: Option<&str>) -> Result<Value, RpcError> {
        // SPDK v24.01 `dump_single_cluster_entry` (module/bdev/rbd/bdev_rbd.c): the name, then
        // each of the others only where set; the list in registration order.
        let info = |(n, c): (&String, &ClusterParams)| {
            let mut v = json!({"cluster_name": n});
            for (k, x) in [
                ("user_id", json!(c.user_id)),
                ("config_param", json!(c.config_param)),
                ("config_file", json!(c.config_file)),
                ("key_file", json!(c.key_file)),
                ("core_mask", json!(c.core_mask)),
            ] {
                if !x.is_null() {
                    v[k] = x;
                }
            }
            v
        };
        match name {
            Some(n) => {
                let c = self
                    .clusters
                    .get_key_value(n)
                    .ok_or_else(RpcError::enoent)?;
                Ok(info(c))
            }
            None if self.clusters.is_empty() => Err(RpcError::enoent()),
            None => Ok(json!(self
                .cluster_order
                .iter()
                .filter_map(|n| self.clusters.get_key_value(n))
                .map(info)
                .collect::<Vec<_>>())),
        }
    }

    /// Creates an rbd bdev over an image of `image_size` bytes (checked by the caller in
    /// real-Ceph mode).
    pub fn create_rbd_bdev(
        &mut self,
        p: RbdCreateParams,
        image_size: u64,
    ) -> Result<Value, RpcError> {
        if let Some(c) = &p.cluster_name {
            if !self.clusters.contains_key(c) {
                return Err(RpcError::eperm());
            }
        }
        if p.block_size == 0 || !p.block_size.is_power_of_two() || p.block_size < 512 {
            return Err(RpcError::einval());
        }
        if let Some(u) = &p.uuid {
            if !valid_uuid(u) {
                return Err(RpcError::einval());
            }
        }
        // module/bdev/rbd/bdev_rbd.c `bdev_rbd_create`: "Ceph<count>" when unnamed, and the
        // count goes up for every bdev that got this far, named or not.
        let name = p.name.unwrap_or_else(|| format!("Ceph{}", self.next_bdev));
        self.next_bdev += 1;
        // lib/bdev/bdev.c `bdev_register`: "Bdev name must not be an empty string".
        if name.is_empty() {
            return Err(RpcError::einval());
        }
        self.registered += 1;
        let uuid = match p.uuid {
            Some(u) => u.to_ascii_lowercase(),
            None => self.new_uuid(),
        };
        // One name tree for names and aliases (`bdev_name_add`: -EEXIST): neither the name nor the
        // UUID alias may be taken by another bdev's name or alias.
        if self.bdev_by_name(&name).is_some()
            || (uuid != name && self.bdev_by_name(&uuid).is_some())
        {
            return Err(RpcError::eexist());
        }
        self.bdevs.insert(
            name.clone(),
            Bdev {
                pool: p.pool_name,
                image: p.rbd_name,
                block_size: p.block_size,
                num_blocks: image_size / u64::from(p.block_size),
                uuid_is_name: uuid == name,
                qos: [0; 4],
                seq: self.registered,
                uuid,
                cluster: p.cluster_name,
                user_id: p.user_id,
            },
        );
        Ok(json!(name))
    }

    fn delete_bdev(&mut self, name: &str) -> Result<Value, RpcError> {
        // As in SPDK: deleting a bdev under a namespace hot-removes it; the namespace stays and
        // reports not ready.
        self.bdevs.remove(name).ok_or_else(RpcError::enodev)?;
        Ok(json!(true))
    }

    fn resize_bdev(&mut self, name: &str, new_size_mib: u64) -> Result<Value, RpcError> {
        self.check_resize(name, new_size_mib)?;
        let b = self.bdevs.get_mut(name).ok_or_else(RpcError::enodev)?;
        b.num_blocks = (new_size_mib << 20) / u64::from(b.block_size);
        Ok(json!(true))
    }

    /// `bdev_set_qos_limit` as SPDK v24.01 does it: lib/bdev/bdev_rpc.c `rpc_bdev_set_qos_limit`
    /// opens the bdev by name (-19 when missing) and refuses a call with no limit at all
    /// (-22 "No rate limits specified"); lib/bdev/bdev.c `spdk_bdev_set_qos_rate_limits` then
    /// rounds an IOPS limit up to a multiple of `SPDK_BDEV_QOS_MIN_IOS_PER_SEC` (logged, not
    /// refused), clamps MB/s to `SPDK_BDEV_QOS_MAX_MBYTES_PER_SEC` and turns it into bytes, and
    /// `bdev_set_qos_rate_limits` keeps the limits given (0: that limit is lifted), leaving the
    /// ones not given as they were. Answers `true`.
    fn set_qos(&mut self, p: SetQos) -> Result<Value, RpcError> {
        let given = [
            p.rw_ios_per_sec,
            p.rw_mbytes_per_sec,
            p.r_mbytes_per_sec,
            p.w_mbytes_per_sec,
        ];
        let name = match self.bdev_by_name(&p.name) {
            Some((n, _)) => n.clone(),
            None => return Err(RpcError::enodev()),
        };
        if given.iter().all(Option::is_none) {
            return Err(RpcError::new(-22, "No rate limits specified"));
        }
        let b = self.bdevs.get_mut(&name).ok_or_else(RpcError::enodev)?;
        for (i, v) in given.into_iter().enumerate() {
            let Some(mut v) = v else { continue };
            if i == 0 {
                let over = v % QOS_MIN_IOS_PER_SEC;
                if over != 0 {
                    v += QOS_MIN_IOS_PER_SEC - over;
                }
            } else {
                v = v.min(QOS_MAX_MBYTES_PER_SEC) * 1024 * 1024;
            }
            b.qos[i] = v;
        }
        Ok(json!(true))
    }

    /// Bdev `name`'s QoS limits in SPDK's internal units; None when there is no such bdev.
    pub fn qos_of(&self, name: &str) -> Option<crate::qos::Limits> {
        self.bdev_by_name(name).map(|(_, b)| b.qos)
    }

    /// SPDK v24.01's checks before `bdev_rbd_resize` resizes anything
    /// (module/bdev/rbd/bdev_rbd.c, `bdev_rbd_resize`): the bdev exists (-ENODEV), and its size
    /// in whole MiB is not above the new size (-EINVAL).
    fn check_resize(&self, name: &str, new_size_mib: u64) -> Result<&Bdev, RpcError> {
        let b = self.bdevs.get(name).ok_or_else(RpcError::enodev)?;
        let current_mib = u64::from(b.block_size) * b.num_blocks / (1 << 20);
        if current_mib > new_size_mib {
            return Err(RpcError::einval());
        }
        Ok(b)
    }

    /// A bdev's image grew to `bytes`: the bdev shows it (as SPDK's update callback does with
    /// `spdk_bdev_notify_blockcnt_change`); a smaller size is ignored.
    pub fn follow_image_size(&mut self, name: &str, bytes: u64) {
        if let Some(b) = self.bdevs.get_mut(name) {
            let blocks = bytes / u64::from(b.block_size);
            if blocks > b.num_blocks {
                b.num_blocks = blocks;
            }
        }
    }

    /// For real-Ceph mode: decodes `bdev_rbd_resize`, checks it as SPDK does, and says which
    /// image to grow (pool, image, the registration it was opened through) and to how many bytes.
    pub fn resize_target(
        &self,
        params: &Value,
    ) -> Result<(String, String, Option<String>, u64), RpcError> {
        let p: Resize = spdk(params)?;
        let b = self.check_resize(&p.name, p.new_size)?;
        Ok((
            b.pool.clone(),
            b.image.clone(),
            b.cluster.clone(),
            p.new_size << 20,
        ))
    }
}
