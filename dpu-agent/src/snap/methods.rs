//! Every SNAP JSON-RPC method the agent calls, in one table: its name, its parameters (a type
//! each, serialized as SPDK's `rpc.py` sends them) and its reply. Listing replies are read as
//! JSON values by `inventory_from_replies` (the fuzzed decoder), so their reply type is
//! `Value`; an action's reply is not read (SPDK answers `true`). See `docs/snap.md` for each
//! method's source.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One SNAP method.
pub trait Method: Serialize {
    /// The JSON-RPC method name.
    const NAME: &'static str;
    /// What it answers.
    type Reply: DeserializeOwned;
    /// Sent without `params` (SPDK's methods that take none).
    const NO_PARAMS: bool = false;
}

/// Declares one method: `Type = "name" { fields } -> Reply`.
macro_rules! methods {
    ($(
        $(#[$m:meta])*
        $ty:ident = $name:literal $(no_params $np:tt)? { $($(#[$fm:meta])* $f:ident: $t:ty),* $(,)? } -> $reply:ty;
    )*) => {$(
        $(#[$m])*
        #[derive(Debug, Clone, Serialize)]
        pub struct $ty {
            $($(#[$fm])* pub $f: $t,)*
        }
        impl Method for $ty {
            const NAME: &'static str = $name;
            type Reply = $reply;
            $(const NO_PARAMS: bool = $np;)?
        }
    )*};
}

/// `spdk_get_version`'s answer.
#[derive(Debug, Clone, Deserialize)]
pub struct Version {
    /// The version string.
    #[serde(default)]
    pub version: String,
}

/// A cluster's connection, as `bdev_rbd_register_cluster` takes it.
#[derive(Debug, Clone, Serialize)]
pub struct ConfigParam {
    /// Monitors, comma-separated.
    pub mon_host: String,
    /// The cephx key.
    pub key: String,
}

methods! {
    /// The version SNAP answers.
    GetVersion = "spdk_get_version" no_params true {} -> Version;
    /// The emulation functions (all, managed or not).
    FunctionList = "emulation_function_list" { all: bool } -> Value;
    /// The NVMe subsystems, with their namespaces and controllers.
    SubsystemList = "nvme_subsystem_list" no_params true {} -> Value;
    /// Every bdev.
    BdevList = "bdev_get_bdevs" no_params true {} -> Value;
    /// One bdev.
    BdevGet = "bdev_get_bdevs" { name: String } -> Value;
    /// The registered Ceph clusters.
    ClusterList = "bdev_rbd_get_clusters_info" no_params true {} -> Value;
    /// Registers a Ceph cluster.
    RegisterCluster = "bdev_rbd_register_cluster" {
        name: String, user_id: String, config_param: ConfigParam,
    } -> Value;
    /// Unregisters a Ceph cluster.
    UnregisterCluster = "bdev_rbd_unregister_cluster" { name: String } -> Value;
    /// Creates an rbd bdev (opens its image).
    BdevCreate = "bdev_rbd_create" {
        name: String, pool_name: String, rbd_name: String, block_size: u32, cluster_name: String,
    } -> Value;
    /// Deletes an rbd bdev (closes its image).
    BdevDelete = "bdev_rbd_delete" { name: String } -> Value;
    /// Grows an rbd bdev (and its image) to `new_size` MiB.
    BdevResize = "bdev_rbd_resize" { name: String, new_size: u64 } -> Value;
    /// Sets a bdev's QoS limits (all four given: 0 lifts one).
    BdevQos = "bdev_set_qos_limit" {
        name: String, rw_ios_per_sec: u64, rw_mbytes_per_sec: u64, r_mbytes_per_sec: u64,
        w_mbytes_per_sec: u64,
    } -> Value;
    /// Creates an NVMe subsystem.
    SubsystemCreate = "nvme_subsystem_create" {
        nqn: String, serial_number: String, model_number: String, nn: u32, mnan: u32,
    } -> Value;
    /// Destroys an NVMe subsystem.
    SubsystemDestroy = "nvme_subsystem_destroy" { nqn: String } -> Value;
    /// Creates a namespace on a bdev.
    NamespaceCreate = "nvme_namespace_create" {
        nqn: String, nsid: u32, bdev_name: String, uuid: String, bdev_type: &'static str,
    } -> Value;
    /// Destroys a namespace.
    NamespaceDestroy = "nvme_namespace_destroy" { nqn: String, nsid: u32 } -> Value;
    /// Creates a controller on an emulation function.
    ControllerCreate = "nvme_controller_create" {
        nqn: String, ctrl: String, pci_bdf: String, num_queues: u32, mdts: u32, suspended: bool,
    } -> Value;
    /// Destroys a controller.
    ControllerDestroy = "nvme_controller_destroy" { ctrl_id: String, force: bool } -> Value;
    /// Attaches a namespace to a controller.
    AttachNamespace = "nvme_controller_attach_ns" { ctrl_id: String, nsid: u32 } -> Value;
    /// Detaches a namespace from a controller.
    DetachNamespace = "nvme_controller_detach_ns" { ctrl_id: String, nsid: u32 } -> Value;
    /// Resumes a controller.
    ResumeController = "nvme_controller_resume" { ctrl_id: String } -> Value;
    /// Suspends a controller.
    SuspendController = "nvme_controller_suspend" { ctrl_id: String } -> Value;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_serialize_as_spdk_rpc_sends_them() {
        let v = serde_json::to_value(NamespaceCreate {
            nqn: "nqn.x".into(),
            nsid: 3,
            bdev_name: "b".into(),
            uuid: "u".into(),
            bdev_type: "spdk",
        })
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"nqn": "nqn.x", "nsid": 3, "bdev_name": "b", "uuid": "u", "bdev_type": "spdk"})
        );
        const { assert!(GetVersion::NO_PARAMS && SubsystemList::NO_PARAMS && !BdevGet::NO_PARAMS) };
        assert_eq!(BdevGet::NAME, BdevList::NAME);
        let v = serde_json::to_value(RegisterCluster {
            name: "c".into(),
            user_id: "u".into(),
            config_param: ConfigParam {
                mon_host: "a,b".into(),
                key: "k".into(),
            },
        })
        .unwrap();
        assert_eq!(v["config_param"]["mon_host"], "a,b");
    }
}
