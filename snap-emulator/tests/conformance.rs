//! Conformance of the emulator at the socket level: stream rules, methods, key aliases,
//! invariants, errors, restart semantics and faults (shared/snap-reference.md, sections 2-4, 6).

mod common;

use std::time::Duration;

use common::{create_path, Client, Emu, NQN, UUID1};
use serde_json::{json, Value};
use snap_emulator::Exit;
use tokio::io::AsyncWriteExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_split_at_awkward_places_and_coalesced() {
    let emu = Emu::start(|_| {}).await;
    let mut c = emu.client().await;
    // Split inside the method name, inside an escape, inside a multibyte character, inside a
    // number, and between the two braces that close the request.
    let req = br#"{"jsonrpc":"2.0","method":"nvme_subsystem_create","id":12345,"params":{"nqn":"nqn.2022-10.io.nvda.nvme:\u00e9x","model_number":"caf\xc3\xa9"}}"#;
    let req: Vec<u8> = String::from_utf8_lossy(req)
        .replace("\\xc3\\xa9", "é")
        .into_bytes();
    let esc = req.windows(2).position(|w| w == b"\\u").unwrap() + 1;
    let utf8 = req.iter().position(|&b| b == 0xc3).unwrap() + 1;
    let num = req.windows(5).position(|w| w == b"12345").unwrap() + 2;
    let cuts = [10, num, esc, utf8, req.len() - 1];
    let mut cuts = cuts.to_vec();
    cuts.sort_unstable();
    c.raw_split(&req, &cuts).await;
    let r = c.response().await;
    assert_eq!(r["id"], 12345);
    assert_eq!(r["result"], true);

    // Two requests (and a third without id) in one write; responses in order, none for the
    // id-less success.
    c.raw(br#"{"jsonrpc":"2.0","id":"a","method":"spdk_get_version"}{"method":"nvme_subsystem_create","params":{"nqn":"nqn.2022-10.io.nvda.nvme:1"}}  {"id":"b","method":"nvme_subsystem_list"}"#).await;
    let a = c.response().await;
    assert_eq!(a["id"], "a");
    assert_eq!(a["result"]["fields"]["major"], 24);
    let b = c.response().await;
    assert_eq!(b["id"], "b");
    assert_eq!(
        b["result"].as_array().unwrap().len(),
        2,
        "the id-less create happened"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_success_reply_without_id_but_errors_are_sent() {
    let emu = Emu::start(|_| {}).await;
    let mut c = emu.client().await;
    c.raw(br#"{"jsonrpc":"2.0","method":"nvme_subsystem_create","params":{"nqn":"nqn.2022-10.io.nvda.nvme:0"},"id":null}"#).await;
    c.raw(br#"{"method":"no_such_method"}"#).await;
    let e = c.response().await;
    assert_eq!(e["id"], Value::Null);
    assert_eq!(e["error"]["code"], -32601);
    let list = c.ok("nvme_subsystem_list", Value::Null).await;
    assert_eq!(list.as_array().unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parse_error_closes_the_connection() {
    let emu = Emu::start(|_| {}).await;
    let mut c = emu.client().await;
    c.raw(br#"{"jsonrpc":"2.0","id":1,"method":"spdk_get_version"} {"id":2,"method":]"#)
        .await;
    assert_eq!(
        c.response().await["id"],
        1,
        "the valid request before is served"
    );
    let e = c.response().await;
    assert_eq!(e["error"]["code"], -32700);
    assert_eq!(e["error"]["message"], "Parse error");
    assert_eq!(e["id"], Value::Null);
    assert!(c.line().await.is_none(), "closed after a parse error");
    // Nesting past serde_json's limit is a parse error too, not a crash.
    let mut c = emu.client().await;
    c.raw(format!("{}{}", "[".repeat(5000), "]".repeat(5000)).as_bytes())
        .await;
    assert_eq!(c.response().await["error"]["code"], -32700);
    assert!(c.line().await.is_none());
    // The emulator still serves.
    let mut c = emu.client().await;
    c.ok("spdk_get_version", Value::Null).await;
}

/// SPDK v24.01 lib/jsonrpc/jsonrpc_server.c `parse_single_request`: the envelope is decoded
/// with `spdk_json_decode_object` (unknown and duplicate keys fail), then `jsonrpc` and `method`
/// are checked, and only then is the id taken; so every envelope error but a bad `params` is
/// answered with `id: null`. `jsonrpc_parse_request`: a batch or a scalar is -32600 too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_and_batches_are_refused() {
    let emu = Emu::start(|_| {}).await;
    let mut c = emu.client().await;
    let raw = |v: Value| serde_json::to_string(&v).unwrap();
    for (bad, echo) in [
        (
            raw(json!([{"jsonrpc":"2.0","id":1,"method":"spdk_get_version"}])),
            Value::Null,
        ),
        (
            raw(json!({"jsonrpc":"1.0","id":2,"method":"spdk_get_version"})),
            Value::Null,
        ),
        (raw(json!({"jsonrpc":"2.0","id":3})), Value::Null),
        (raw(json!({"jsonrpc":"2.0","id":4,"method":7})), Value::Null),
        (
            raw(json!({"jsonrpc":"2.0","id":5,"method":"spdk_get_version","params":"x"})),
            json!(5),
        ),
        (
            raw(json!({"jsonrpc":"2.0","id":{"x":1},"method":"spdk_get_version"})),
            Value::Null,
        ),
        (
            raw(json!({"jsonrpc":"2.0","id":7,"method":"spdk_get_version","extra":1})),
            Value::Null,
        ),
        (
            r#"{"jsonrpc":"2.0","id":8,"method":"spdk_get_version","method":"spdk_get_version"}"#
                .to_string(),
            Value::Null,
        ),
        (raw(json!("just a string")), Value::Null),
    ] {
        c.raw(bad.as_bytes()).await;
        let r = c.response().await;
        assert_eq!(r["error"]["code"], -32600, "{bad} -> {r}");
        assert_eq!(r["error"]["message"], "Invalid request");
        assert_eq!(r["id"], echo, "{bad}");
    }
    // The connection survives them all.
    c.ok("spdk_get_version", Value::Null).await;
}

/// SPDK's decoders (lib/json/json_util.c `_json_decode_object`, `spdk_json_decode_string` via
/// `spdk_json_strdup`): a duplicate key or a `null` where a string, number or boolean is
/// expected fails the params, optional or not; module/bdev/rbd/bdev_rbd_rpc.c answers that with
/// -32603 "spdk_json_decode_object failed". An empty bdev name is refused by lib/bdev/bdev.c
/// `bdev_register` (-EINVAL) and found by no lookup (-ENODEV); an empty cluster name is a name
/// like any other to module/bdev/rbd/bdev_rbd.c `rbd_register_cluster`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decoders_refuse_nulls_duplicates_and_empty_bdev_names() {
    let emu = Emu::start(|_| {}).await;
    let mut c = emu.client().await;
    register(&mut c, "ceph1").await;
    let create = json!({"name": "b1", "pool_name": "p", "rbd_name": "i", "block_size": 4096, "cluster_name": "ceph1"});
    // `null` for optional strings: not "absent".
    for (method, params) in [
        ("bdev_get_bdevs", json!({"name": null})),
        ("bdev_rbd_get_clusters_info", json!({"name": null})),
        ("bdev_rbd_create", {
            let mut p = create.clone();
            p["uuid"] = Value::Null;
            p
        }),
    ] {
        let r = c.call_raw(method, params.clone()).await;
        assert_eq!(r["error"]["code"], -32603, "{method} {params}: {r}");
        assert_eq!(r["error"]["message"], "spdk_json_decode_object failed");
    }
    // SNAP's methods decode the same way and answer -32602.
    assert_eq!(
        c.err(
            "nvme_subsystem_create",
            json!({"nqn": NQN, "serial_number": null})
        )
        .await,
        -32602
    );
    // A key given twice.
    c.raw(br#"{"jsonrpc":"2.0","id":"d","method":"bdev_get_bdevs","params":{"name":"b1","name":"b1"}}"#)
        .await;
    let r = c.response().await;
    assert_eq!(r["id"], "d", "the envelope was fine: {r}");
    assert_eq!(r["error"]["code"], -32603, "{r}");
    // Empty names.
    let mut empty = create.clone();
    empty["name"] = json!("");
    let r = c.call_raw("bdev_rbd_create", empty).await;
    assert_eq!(r["error"]["code"], -22, "{r}");
    assert_eq!(r["error"]["message"], "Invalid argument");
    assert_eq!(c.err("bdev_get_bdevs", json!({"name": ""})).await, -19);
    assert_eq!(c.err("bdev_rbd_delete", json!({"name": ""})).await, -19);
    register(&mut c, "").await;
    let info = c
        .ok("bdev_rbd_get_clusters_info", json!({"name": ""}))
        .await;
    assert_eq!(info["user_id"], "snap", "{info}");
    // Nothing was created by the refused calls.
    assert_eq!(c.ok("bdev_get_bdevs", Value::Null).await, json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_methods_and_bad_params() {
    let emu = Emu::start(|_| {}).await;
    let mut c = emu.client().await;
    assert_eq!(c.err("nvme_everything_create", Value::Null).await, -32601);
    // SNAP methods: unknown or missing keys, or non-object params.
    assert_eq!(
        c.err(
            "nvme_subsystem_create",
            json!({"nqn": NQN, "colour": "red"})
        )
        .await,
        -32602
    );
    assert_eq!(c.err("nvme_subsystem_create", json!({})).await, -32602);
    assert_eq!(c.err("nvme_subsystem_create", json!([NQN])).await, -32602);
    // SPDK's bdev methods: -32603 "spdk_json_decode_object failed".
    let r = c
        .call_raw(
            "bdev_rbd_create",
            json!({"pool_name": "rbd", "block_size": 512}),
        )
        .await;
    assert_eq!(r["error"]["code"], -32603);
    assert_eq!(r["error"]["message"], "spdk_json_decode_object failed");
    let r = c
        .call_raw("spdk_get_version", json!({"verbose": true}))
        .await;
    assert_eq!(r["error"]["code"], -32602);
    assert_eq!(
        r["error"]["message"],
        "spdk_get_version method requires no parameters"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_create_path_and_what_the_lists_show() {
    let emu = Emu::start(|_| {}).await;
    let mut c = emu.client().await;
    create_path(&mut c).await;
    let subs = c.ok("nvme_subsystem_list", Value::Null).await;
    let fns = c.ok("emulation_function_list", json!({"all": true})).await;
    let bdevs = c.ok("bdev_get_bdevs", json!({"name": "rbd-vol1"})).await;
    let info = c
        .ok("bdev_rbd_get_clusters_info", json!({"name": "ceph1"}))
        .await;
    check_lists(&subs, &fns, &bdevs, &info);
    // Controller listing, by both key spellings.
    let l1 = c
        .ok("nvme_controller_list", json!({"ctrl_id": "NVMeCtrl1"}))
        .await;
    let l2 = c
        .ok("nvme_controller_list", json!({"ctrl": "NVMeCtrl1"}))
        .await;
    assert_eq!(l1, l2);
    let nl = c.ok("nvme_namespace_list", json!({"nqn": NQN})).await;
    assert_eq!(nl[0]["uuid"], UUID1);
}

fn check_lists(subs: &Value, fns: &Value, bdevs: &Value, info: &Value) {
    let s = &subs[0];
    assert_eq!(
        (s["nqn"].as_str(), s["sn"].as_str(), s["mn"].as_str()),
        (Some(NQN), Some("SN0001"), Some("unistor"))
    );
    assert_eq!(
        (s["nn"].as_u64(), s["mnan"].as_u64()),
        (Some(1024), Some(1024))
    );
    let ctrl = &s["controllers"][0];
    assert_eq!(ctrl["ctrl_id"], "NVMeCtrl1");
    assert_eq!(ctrl["state"], "STARTED");
    assert_eq!(ctrl["num_queues"], 8);
    assert_eq!(
        ctrl["namespaces"][0],
        json!({"nsid": 1, "bdev": "rbd-vol1", "uuid": UUID1})
    );
    let ns = &s["namespaces"][0];
    assert_eq!(ns["ready"], "Yes");
    assert_eq!(ns["max inflights per weight"], 65535);
    assert_eq!(ns["controllers"], json!([{"ctrl_id": "NVMeCtrl1"}]));

    assert_eq!(fns.as_array().unwrap().len(), 2, "two PFs");
    assert_eq!(fns[0]["ctrl_id"], "NVMeCtrl1");
    assert_eq!(fns[0]["pci_bdf"], "26:00.2");
    assert_eq!(fns[0]["vuid"], "MT2328XZ17DFNVMES0D0F2");
    assert_eq!(fns[0]["emulation_type"], "NVME");
    assert_eq!(fns[0]["vfs"].as_array().unwrap().len(), 4);
    assert!(
        fns[0]["vfs"][0].get("ctrl_id").is_none(),
        "free VF has no ctrl_id"
    );
    assert!(fns[1].get("ctrl_id").is_none());

    let b = &bdevs[0];
    assert_eq!(b["product_name"], "Ceph Rbd Disk");
    assert_eq!(b["block_size"], 4096);
    assert_eq!(b["num_blocks"], (1u64 << 30) / 4096);
    assert_eq!(b["claimed"], true);
    // SPDK v24.01 `bdev_rbd_dump_info_json` / `bdev_rbd_cluster_dump_entry`
    // (module/bdev/rbd/bdev_rbd.c): the registration's credentials, never its name.
    let rbd = b["driver_specific"]["rbd"].as_object().unwrap();
    assert_eq!(rbd["rbd_name"], "vol1");
    assert_eq!(rbd["pool_name"], "rbd");
    assert!(!rbd.contains_key("cluster_name"), "{rbd:?}");
    assert!(!rbd.contains_key("core_mask"), "{rbd:?}");
    assert_eq!(rbd["user_id"], info["user_id"]);
    assert_eq!(info["user_id"], "snap");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn teardown_path_in_reverse_order() {
    let emu = Emu::start(|_| {}).await;
    let mut c = emu.client().await;
    create_path(&mut c).await;
    c.ok(
        "nvme_controller_suspend",
        json!({"ctrl": "NVMeCtrl1", "admin_only": true, "timeout_ms": 20}),
    )
    .await;
    let l = c.ok("nvme_controller_list", Value::Null).await;
    assert_eq!(l[0]["state"], "SUSPENDED");
    c.ok(
        "nvme_controller_detach_ns",
        json!({"ctrl": "NVMeCtrl1", "nsid": 1}),
    )
    .await;
    c.ok(
        "nvme_controller_destroy",
        json!({"ctrl_id": "NVMeCtrl1", "force": true}),
    )
    .await;
    c.ok("nvme_namespace_destroy", json!({"nqn": NQN, "nsid": 1}))
        .await;
    c.ok("nvme_subsystem_destroy", json!({"nqn": NQN})).await;
    c.ok("bdev_rbd_delete", json!({"name": "rbd-vol1"})).await;
    assert_eq!(
        c.ok("bdev_rbd_unregister_cluster", json!({"name": "ceph1"}))
            .await,
        true
    );
    assert_eq!(c.ok("nvme_subsystem_list", Value::Null).await, json!([]));
    assert_eq!(c.ok("bdev_get_bdevs", Value::Null).await, json!([]));
    assert_eq!(c.err("bdev_rbd_get_clusters_info", Value::Null).await, -2);
    let fns = c.ok("emulation_function_list", Value::Null).await;
    assert!(
        fns[0].get("ctrl_id").is_none(),
        "the function is free again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invariants() {
    let emu = Emu::start(|_| {}).await;
    let mut c = emu.client().await;
    create_path(&mut c).await;
    // One SNAP, its state built up step by step.
    duplicates_and_namespaces(&mut c).await;
    one_controller_per_function_and_namespace(&mut c).await;
    busy_and_unknown_objects(&mut c).await;
    sizes_names_and_hot_removal(&mut c).await;
}

/// Duplicate objects are -17; a namespace needs its bdev, a bdev backs one namespace; auto NSIDs take the lowest free one.
async fn duplicates_and_namespaces(c: &mut Client) {
    // Duplicates: -17.
    assert_eq!(
        c.err("nvme_subsystem_create", json!({"nqn": NQN})).await,
        -17
    );
    c.ok("bdev_rbd_create", json!({"name": "b2", "pool_name": "rbd", "rbd_name": "vol2", "block_size": 512, "cluster_name": "ceph1"})).await;
    assert_eq!(
        c.err("bdev_rbd_create", json!({"name": "b2", "pool_name": "rbd", "rbd_name": "vol2", "block_size": 512, "cluster_name": "ceph1"})).await,
        -17
    );
    assert_eq!(
        c.err(
            "nvme_namespace_create",
            json!({"nqn": NQN, "nsid": 1, "bdev_name": "b2"})
        )
        .await,
        -17,
        "NSID unique per subsystem"
    );
    // A namespace's bdev must exist; a bdev backs one namespace.
    assert_eq!(
        c.err(
            "nvme_namespace_create",
            json!({"nqn": NQN, "nsid": 2, "bdev_name": "nope"})
        )
        .await,
        -19
    );
    assert_eq!(
        c.err(
            "nvme_namespace_create",
            json!({"nqn": NQN, "nsid": 2, "bdev_name": "rbd-vol1"})
        )
        .await,
        -16
    );
    // Auto NSID takes the lowest free one.
    c.ok(
        "nvme_namespace_create",
        json!({"nqn": NQN, "bdev_name": "b2"}),
    )
    .await;
    let ns = c.ok("nvme_namespace_list", json!({"nqn": NQN})).await;
    assert_eq!(ns[1]["nsid"], 2);
}

/// One controller per function, by any selector; one controller per namespace.
async fn one_controller_per_function_and_namespace(c: &mut Client) {
    // One controller per function (by any selector).
    assert_eq!(
        c.err("nvme_controller_create", json!({"nqn": NQN, "pf_id": 0}))
            .await,
        -17
    );
    assert_eq!(
        c.err(
            "nvme_controller_create",
            json!({"nqn": NQN, "pci_bdf": "26:00.2"})
        )
        .await,
        -17
    );
    assert_eq!(
        c.err(
            "nvme_controller_create",
            json!({"nqn": NQN, "vuid": "MT2328XZ17DFNVMES0D0F2"})
        )
        .await,
        -17
    );
    assert_eq!(
        c.err("nvme_controller_create", json!({"nqn": NQN, "pf_id": 9}))
            .await,
        -19
    );
    assert_eq!(
        c.err(
            "nvme_controller_create",
            json!({"nqn": "nqn.2022-10.io.nvda.nvme:x", "pf_id": 1})
        )
        .await,
        -19
    );
    // One controller per namespace.
    let vf = c
        .ok(
            "nvme_controller_create",
            json!({"nqn": NQN, "pf_id": 0, "vf_id": 1, "ctrl": "VfCtrl", "suspended": true}),
        )
        .await;
    assert_eq!(vf["ctrl_id"], "VfCtrl");
    assert_eq!(
        c.err(
            "nvme_controller_attach_ns",
            json!({"ctrl": "VfCtrl", "nsid": 1})
        )
        .await,
        -16
    );
    assert_eq!(
        c.err(
            "nvme_controller_attach_ns",
            json!({"ctrl": "NVMeCtrl1", "nsid": 1})
        )
        .await,
        -17
    );
    assert_eq!(
        c.err(
            "nvme_controller_attach_ns",
            json!({"ctrl": "VfCtrl", "nsid": 9})
        )
        .await,
        -19
    );
    assert_eq!(
        c.err(
            "nvme_controller_detach_ns",
            json!({"ctrl": "VfCtrl", "nsid": 2})
        )
        .await,
        -19
    );
}

/// Objects in use are -16 (or -1 for a cluster); unknown ones -19 or -2.
async fn busy_and_unknown_objects(c: &mut Client) {
    // Busy objects.
    assert_eq!(
        c.err("nvme_controller_destroy", json!({"ctrl_id": "NVMeCtrl1"}))
            .await,
        -16
    );
    assert_eq!(
        c.err("nvme_namespace_destroy", json!({"nqn": NQN, "nsid": 1}))
            .await,
        -16
    );
    assert_eq!(
        c.err("nvme_subsystem_destroy", json!({"nqn": NQN})).await,
        -16
    );
    assert_eq!(
        c.err("bdev_rbd_unregister_cluster", json!({"name": "ceph1"}))
            .await,
        -1,
        "clusters are refcounted by bdevs"
    );
    // Unknown objects.
    assert_eq!(c.err("bdev_rbd_delete", json!({"name": "nope"})).await, -19);
    assert_eq!(c.err("bdev_get_bdevs", json!({"name": "nope"})).await, -19);
    assert_eq!(
        c.err("nvme_controller_resume", json!({"ctrl_id": "nope"}))
            .await,
        -19
    );
    assert_eq!(
        c.err(
            "bdev_rbd_create",
            json!({"pool_name": "rbd", "rbd_name": "x", "block_size": 512, "cluster_name": "nope"})
        )
        .await,
        -1
    );
    assert_eq!(
        c.err("bdev_rbd_register_cluster", json!({"name": "ceph1"}))
            .await,
        -1,
        "duplicate cluster"
    );
}

/// Sizes and identities are checked; default names follow SPDK; deleting a bdev under a namespace hot-removes it.
async fn sizes_names_and_hot_removal(c: &mut Client) {
    // Sizes and identities.
    assert_eq!(
        c.err("bdev_rbd_resize", json!({"name": "b2", "new_size": 1}))
            .await,
        -22
    );
    c.ok("bdev_rbd_resize", json!({"name": "b2", "new_size": 2048}))
        .await;
    assert_eq!(
        c.ok("bdev_get_bdevs", json!({"name": "b2"})).await[0]["num_blocks"],
        (2048u64 << 20) / 512
    );
    assert_eq!(
        c.err("nvme_subsystem_create", json!({"nqn": "not-an-nqn"}))
            .await,
        -22
    );
    assert_eq!(
        c.err(
            "nvme_namespace_create",
            json!({"nqn": NQN, "nsid": 3, "bdev_name": "x", "uuid": "nope"})
        )
        .await,
        -22
    );
    // Default bdev names follow SPDK (`Ceph<N>`, N counting every bdev created so far, named or
    // not, even one refused as a duplicate name: module/bdev/rbd/bdev_rbd.c `bdev_rbd_create`
    // counts before `spdk_bdev_register`): here b1, b2 and the second b2. `sn`/`mn` are accepted
    // as aliases.
    let n = c.ok("bdev_rbd_create", json!({"pool_name": "rbd", "rbd_name": "vol3", "block_size": 512, "cluster_name": "ceph1"})).await;
    assert_eq!(n, "Ceph3");
    c.ok(
        "nvme_subsystem_create",
        json!({"nqn": "nqn.2022-10.io.nvda.nvme:9", "sn": "S9", "mn": "M9"}),
    )
    .await;
    let subs = c.ok("nvme_subsystem_list", Value::Null).await;
    assert_eq!(subs[1]["sn"], "S9");
    // Deleting a bdev under a namespace hot-removes it: the namespace reports not ready.
    c.ok("bdev_rbd_delete", json!({"name": "rbd-vol1"})).await;
    let ns = c.ok("nvme_namespace_list", json!({"nqn": NQN})).await;
    assert_eq!(ns[0]["ready"], "No");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rbd_not_compiled_in() {
    let emu = Emu::start(|c| c.rbd = false).await;
    let mut c = emu.client().await;
    assert_eq!(
        c.err("bdev_rbd_register_cluster", json!({"name": "c"}))
            .await,
        -32601
    );
    assert_eq!(
        c.err(
            "bdev_rbd_create",
            json!({"pool_name": "p", "rbd_name": "i", "block_size": 512})
        )
        .await,
        -32601
    );
    let methods = c.ok("rpc_get_methods", Value::Null).await;
    let methods: Vec<&str> = methods
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert!(methods.contains(&"nvme_subsystem_create"));
    assert!(!methods.iter().any(|m| m.starts_with("bdev_rbd")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_loses_state_and_replays_init_files() {
    let emu = Emu::start(|_| {}).await;
    let mut c = emu.client().await;
    create_path(&mut c).await;
    let (dir, socket) = emu.stop().await;
    assert!(
        c.line().await.is_none(),
        "a stopped SNAP closes its connections"
    );

    let emu = Emu::start_at(dir, socket.clone(), |_| {}).await;
    let mut c = emu.client().await;
    assert_eq!(
        c.ok("nvme_subsystem_list", Value::Null).await,
        json!([]),
        "state is lost"
    );
    assert_eq!(c.ok("bdev_get_bdevs", Value::Null).await, json!([]));
    let (dir, socket) = emu.stop().await;

    let init = dir.path().join("snap_rpc_init.conf");
    std::fs::write(
        &init,
        format!("# replayed at start\nnvme_subsystem_create --nqn {NQN}\nnvme_controller_create --nqn {NQN} --ctrl NVMeCtrl1 --pf_id 0 --admin_only\n"),
    )
    .unwrap();
    let emu = Emu::start_at(dir, socket, |cfg| cfg.init_files = vec![init]).await;
    let mut c = emu.client().await;
    let subs = c.ok("nvme_subsystem_list", Value::Null).await;
    assert_eq!(subs[0]["nqn"], NQN);
    assert_eq!(subs[0]["controllers"][0]["ctrl_id"], "NVMeCtrl1");
    assert_eq!(subs[0]["controllers"][0]["admin_only"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_after_n_calls_is_a_crash_that_leaves_the_socket() {
    let emu = Emu::start(|c| c.faults.exit_after = Some(3)).await;
    let mut c = emu.client().await;
    c.ok("spdk_get_version", Value::Null).await;
    c.ok("nvme_subsystem_create", json!({"nqn": NQN})).await;
    c.ok("nvme_subsystem_list", Value::Null).await;
    let mut emu = emu;
    assert_eq!(emu.inner.wait().await, Some(Exit::Crashed));
    assert!(emu.socket.exists(), "a crash leaves the socket file behind");
    // A new instance clears the stale socket and starts empty.
    let emu2 = Emu::start_at(emu._dir, emu.socket.clone(), |_| {}).await;
    let mut c = emu2.client().await;
    assert_eq!(c.ok("nvme_subsystem_list", Value::Null).await, json!([]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn injected_errors_take_no_effect() {
    let emu = Emu::start(|c| {
        c.faults.error_rate = 0.5;
        c.faults.seed = 42;
    })
    .await;
    let mut c = emu.client().await;
    let mut created = 0;
    let mut failed = 0;
    for i in 0..40 {
        let r = c
            .call_raw(
                "nvme_subsystem_create",
                json!({"nqn": format!("nqn.2022-10.io.nvda.nvme:{i}")}),
            )
            .await;
        match r["error"]["code"].as_i64() {
            Some(-5) => failed += 1,
            None => created += 1,
            Some(other) => panic!("unexpected {other}"),
        }
        // The liveness probe is never failed.
        c.ok("spdk_get_version", Value::Null).await;
    }
    assert!(
        created > 5 && failed > 5,
        "{created} created, {failed} failed"
    );
    let list = loop {
        let r = c.call_raw("nvme_subsystem_list", Value::Null).await;
        if r.get("result").is_some() {
            break r["result"].clone();
        }
    };
    assert_eq!(list.as_array().unwrap().len(), created);
}

/// SPDK runs every RPC handler on its one app thread (lib/jsonrpc/jsonrpc_server_tcp.c
/// `spdk_jsonrpc_server_poll` calls them in turn): a slow call holds back a fast one on another
/// connection, which is answered right after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpcs_run_one_at_a_time_on_the_app_thread() {
    let emu = Emu::start(|c| {
        c.faults
            .latency
            .insert("nvme_subsystem_list".into(), Duration::from_millis(500));
    })
    .await;
    let mut slow = emu.client().await;
    let mut fast = emu.client().await;
    slow.raw(br#"{"id":1,"method":"nvme_subsystem_list"}"#)
        .await;
    // The slow call holds the app thread before the fast one is sent.
    tokio::time::sleep(Duration::from_millis(50)).await;
    fast.raw(br#"{"id":2,"method":"spdk_get_version"}"#).await;
    let pending = tokio::time::timeout(Duration::from_millis(200), fast.line()).await;
    assert!(pending.is_err(), "the fast call waits for the slow one");
    assert_eq!(slow.response().await["id"], 1);
    assert_eq!(fast.response().await["id"], 2);
}

/// A handler that completes later gives the app thread back (lib/bdev/bdev_rpc.c
/// `rpc_bdev_get_bdevs` waits in `spdk_bdev_open_async`), so requests pipelined behind it on the
/// same connection run and are answered first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_call_lets_the_next_ones_run_and_answers_last() {
    let emu = Emu::start(|_| {}).await;
    let mut c = emu.client().await;
    register(&mut c, "ceph1").await;
    c.raw(
        serde_json::to_string(&json!(
            {"jsonrpc": "2.0", "id": "wait", "method": "bdev_get_bdevs", "params": {"name": "late", "timeout": 5000}}
        ))
        .unwrap()
        .as_bytes(),
    )
    .await;
    c.raw(serde_json::to_string(&json!({"jsonrpc": "2.0", "id": "make", "method": "bdev_rbd_create", "params": {"name": "late", "pool_name": "p", "rbd_name": "i", "block_size": 4096, "cluster_name": "ceph1"}})).unwrap().as_bytes()).await;
    let first = c.response().await;
    assert_eq!(first["id"], "make", "{first}");
    let second = c.response().await;
    assert_eq!(second["id"], "wait", "{second}");
    assert_eq!(second["result"][0]["name"], "late", "{second}");
}

/// Requests read before the client went away still run (lib/jsonrpc/jsonrpc_server_tcp.c
/// `jsonrpc_server_free_conn_request` leaves outstanding requests to finish; their responses are
/// dropped by `jsonrpc_server_send_response`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_run_after_the_client_is_gone() {
    let emu = Emu::start(|c| {
        c.faults
            .latency
            .insert("nvme_subsystem_create".into(), Duration::from_millis(100));
    })
    .await;
    let mut gone = emu.client().await;
    let mut reqs = String::new();
    for i in 0..3 {
        reqs.push_str(
            &serde_json::to_string(&json!({"jsonrpc": "2.0", "id": i, "method": "nvme_subsystem_create", "params": {"nqn": format!("nqn.2022-10.io.nvda.nvme:{i}")}}))
                .unwrap(),
        );
    }
    gone.raw(reqs.as_bytes()).await;
    drop(gone);
    let mut c = emu.client().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let list = c.ok("nvme_subsystem_list", Value::Null).await;
        if list.as_array().unwrap().len() == 3 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "requests of a departed client were dropped: {list}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `--wait-for-rpc`: SPDK starts in `SPDK_RPC_STARTUP` (lib/rpc/rpc.c `g_rpc_state`) and
/// `jsonrpc_handler` answers -1 with its message for a runtime method; `framework_start_init`
/// (lib/event/app.c `rpc_framework_start_init`) switches to runtime, after which it is the one
/// refused; `framework_wait_init` answers once initialized; `rpc_get_methods {current}` lists
/// what the state serves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_state_until_framework_start_init() {
    let emu = Emu::start(|c| c.wait_for_rpc = true).await;
    let mut c = emu.client().await;
    c.ok("spdk_get_version", Value::Null).await;
    let r = c.call_raw("nvme_subsystem_list", Value::Null).await;
    assert_eq!(r["error"]["code"], -1, "{r}");
    assert_eq!(
        r["error"]["message"],
        "Method may only be called after framework is initialized using framework_start_init RPC."
    );
    let now = c.ok("rpc_get_methods", json!({"current": true})).await;
    let mut now: Vec<&str> = now
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    now.sort_unstable();
    assert_eq!(
        now,
        [
            "framework_start_init",
            "framework_wait_init",
            "rpc_get_methods",
            "spdk_get_version"
        ]
    );
    assert!(
        c.ok("rpc_get_methods", Value::Null)
            .await
            .as_array()
            .unwrap()
            .len()
            > 4,
        "without `current`, every method"
    );
    // Someone waits for the framework on another connection.
    let mut waiter = emu.client().await;
    waiter
        .raw(br#"{"jsonrpc":"2.0","id":"w","method":"framework_wait_init"}"#)
        .await;
    let early = tokio::time::timeout(Duration::from_millis(100), waiter.line()).await;
    assert!(
        early.is_err(),
        "framework_wait_init waits in the startup state"
    );
    assert_eq!(c.err("framework_start_init", json!({"x": 1})).await, -32602);
    assert_eq!(c.ok("framework_start_init", Value::Null).await, json!(true));
    assert_eq!(waiter.response().await["result"], true);
    c.ok("nvme_subsystem_list", Value::Null).await;
    let r = c.call_raw("framework_start_init", Value::Null).await;
    assert_eq!(r["error"]["code"], -1, "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("Method may only be called before framework is initialized."),
        "{r}"
    );
    assert_eq!(c.ok("framework_wait_init", Value::Null).await, json!(true));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_cap_and_request_size_limit() {
    let emu = Emu::start(|_| {}).await;
    let mut open = vec![];
    for _ in 0..64 {
        let mut c = emu.client().await;
        c.ok("spdk_get_version", Value::Null).await;
        open.push(c);
    }
    // SPDK v24.01 lib/jsonrpc/jsonrpc_server_tcp.c: `spdk_jsonrpc_server_poll` accepts only
    // while one of its 64 connection slots is free; the 65th waits in the listen backlog.
    let mut extra = emu.client().await;
    extra
        .s
        .write_all(br#"{"id":65,"method":"spdk_get_version"}"#)
        .await
        .unwrap();
    let waiting = tokio::time::timeout(Duration::from_millis(300), extra.line()).await;
    assert!(
        waiting.is_err(),
        "the 65th connection is neither served nor closed"
    );
    // One closes: the waiting one is served, neither refused nor lost.
    drop(open.pop());
    assert_eq!(extra.response().await["id"], 65);
    drop(open);
    // A request over 32 KiB is refused by closing the connection.
    let mut c = emu.client().await;
    let big = format!(
        r#"{{"id":1,"method":"nvme_subsystem_create","params":{{"nqn":"nqn.{}"#,
        "x".repeat(40 * 1024)
    );
    let _ = c.s.write_all(big.as_bytes()).await;
    assert!(c.line().await.is_none());
}

/// Registers rbd cluster `name` with inline credentials.
async fn register(c: &mut Client, name: &str) {
    c.ok(
        "bdev_rbd_register_cluster",
        json!({"name": name, "user_id": "snap", "config_param": {"mon_host": "127.0.0.1:6789", "key": "AQD0nXFlAAAAABAAnb1T8z9wOLo5k6d2zC2h3Q=="}}),
    )
    .await;
}

/// SPDK v24.01 lib/bdev/bdev.c `bdev_register`: every bdev's lower-case UUID becomes an alias
/// (`spdk_bdev_alias_add`, unless it is the name), in the one name tree that names and aliases
/// share (`bdev_name_add`: `-EEXIST` for a taken one) and that `spdk_bdev_get_by_name` searches;
/// lib/bdev/bdev_rpc.c `rpc_dump_bdev_info` lists the aliases.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bdev_uuids_are_aliases() {
    let emu = Emu::start(|_| {}).await;
    let mut c = emu.client().await;
    register(&mut c, "ceph1").await;
    let upper = UUID1.to_ascii_uppercase();
    c.ok("bdev_rbd_create", json!({"name": "a", "pool_name": "rbd", "rbd_name": "a", "block_size": 4096, "cluster_name": "ceph1", "uuid": upper})).await;
    let by_uuid = c.ok("bdev_get_bdevs", json!({"name": UUID1})).await;
    assert_eq!(by_uuid[0]["name"], "a", "found by its UUID");
    assert_eq!(by_uuid[0]["aliases"], json!([UUID1]), "listed lower-case");
    assert_eq!(by_uuid[0]["uuid"], UUID1);
    // The UUID is taken, as a name and as an alias.
    assert_eq!(
        c.err("bdev_rbd_create", json!({"name": "b", "pool_name": "rbd", "rbd_name": "b", "block_size": 4096, "cluster_name": "ceph1", "uuid": UUID1})).await,
        -17
    );
    assert_eq!(
        c.err("bdev_rbd_create", json!({"name": UUID1, "pool_name": "rbd", "rbd_name": "b", "block_size": 4096, "cluster_name": "ceph1"})).await,
        -17
    );
    let all = c.ok("bdev_get_bdevs", Value::Null).await;
    assert_eq!(all.as_array().unwrap().len(), 1);
}

/// SPDK v24.01 lists bdevs in registration order (`rpc_bdev_get_bdevs` walks
/// `spdk_bdev_first`/`spdk_bdev_next` over the TAILQ `bdev_register` appends to) and rbd
/// clusters likewise (`bdev_rbd_get_clusters_info` walks the `g_map_bdev_rbd_cluster` STAILQ),
/// each cluster's optional fields only where set (`dump_single_cluster_entry`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_keep_registration_order() {
    let emu = Emu::start(|_| {}).await;
    let mut c = emu.client().await;
    for name in ["zeta", "alpha"] {
        register(&mut c, name).await;
    }
    for name in ["zz", "aa", "mm"] {
        c.ok("bdev_rbd_create", json!({"name": name, "pool_name": "rbd", "rbd_name": name, "block_size": 4096, "cluster_name": "alpha"})).await;
    }
    let bdevs = c.ok("bdev_get_bdevs", Value::Null).await;
    let names: Vec<&str> = bdevs
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["zz", "aa", "mm"]);
    let clusters = c.ok("bdev_rbd_get_clusters_info", Value::Null).await;
    let names: Vec<&str> = clusters
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["cluster_name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["zeta", "alpha"]);
    let zeta = clusters[0].as_object().unwrap();
    assert!(
        !zeta.contains_key("config_file") && !zeta.contains_key("core_mask"),
        "{zeta:?}"
    );
}

/// SPDK v24.01 `jsonrpc_parse_request` (lib/jsonrpc/jsonrpc_server.c): a request `spdk_json_parse`
/// refuses — nested deeper than `SPDK_JSON_MAX_NESTING_DEPTH` (64, lib/json/json_parse.c) — or
/// one of more than `SPDK_JSONRPC_MAX_VALUES` (1,024) values, counted as `spdk_json_parse` counts
/// (one per scalar and member name, two per container), is a parse error with `id: null`, and the
/// connection is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_limits_are_spdks() {
    let emu = Emu::start(|_| {}).await;
    let nested = |depth: usize| {
        format!(
            r#"{{"id":1,"method":"spdk_get_version","params":{{"x":{}1{}}}}}"#,
            "[".repeat(depth - 2),
            "]".repeat(depth - 2)
        )
    };
    // 64 containers deep (the request object, params, 62 arrays): answered.
    let mut c = emu.client().await;
    c.raw(nested(64).as_bytes()).await;
    let ok: Value = serde_json::from_str(&c.line().await.expect("an answer")).unwrap();
    assert_eq!(ok["id"], 1, "{ok}");
    // 65: a parse error, then the connection closes.
    c.raw(nested(65).as_bytes()).await;
    let e: Value = serde_json::from_str(&c.line().await.expect("an answer")).unwrap();
    assert_eq!(
        (e["error"]["code"].as_i64(), &e["id"]),
        (Some(-32700), &Value::Null)
    );
    assert!(c.line().await.is_none(), "closed");

    // 1,024 values pass (the envelope: begin, 3 names, id, method, end = 7 values; params: an
    // array of n numbers = n + 2 values, after its name), 1,025 do not.
    let many = |n: usize| {
        format!(
            r#"{{"id":2,"method":"spdk_get_version","params":[{}]}}"#,
            vec!["0"; n].join(",")
        )
    };
    let mut c = emu.client().await;
    c.raw(many(1024 - 9).as_bytes()).await;
    let ok: Value = serde_json::from_str(&c.line().await.expect("an answer")).unwrap();
    assert_eq!(ok["id"], 2, "{ok}");
    c.raw(many(1024 - 8).as_bytes()).await;
    let e: Value = serde_json::from_str(&c.line().await.expect("an answer")).unwrap();
    assert_eq!(e["error"]["code"], -32700, "{e}");
    assert!(c.line().await.is_none(), "closed");
}

/// SPDK v24.01 `rpc_bdev_get_bdevs` (lib/bdev/bdev_rpc.c): with a `name`, `timeout` (ms) waits for
/// the bdev to appear (`spdk_bdev_open_async` with `timeout_ms`), then answers -19.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_bdevs_waits_for_a_named_bdev_up_to_its_timeout() {
    let emu = Emu::start(|_| {}).await;
    let mut c = emu.client().await;
    register(&mut c, "ceph1").await;
    // Nobody creates it: -19 once the timeout has passed (and not before).
    let t = std::time::Instant::now();
    assert_eq!(
        c.err("bdev_get_bdevs", json!({"name": "late", "timeout": 300}))
            .await,
        -19
    );
    // A lower bound, not a speed check: the answer cannot come before the timeout ran out.
    assert!(t.elapsed() >= Duration::from_millis(300), "it waited");
    // Created by another client while the first waits: found.
    let waiter = tokio::spawn({
        let mut c = emu.client().await;
        async move {
            c.ok("bdev_get_bdevs", json!({"name": "late", "timeout": 30000}))
                .await
        }
    });
    let mut other = emu.client().await;
    other.ok("bdev_rbd_create", json!({"name": "late", "pool_name": "rbd", "rbd_name": "late", "block_size": 4096, "cluster_name": "ceph1"})).await;
    let found = waiter.await.unwrap();
    assert_eq!(found[0]["name"], "late");
}

/// SPDK v24.01 `bdev_set_qos_limit` (lib/bdev/bdev_rpc.c `rpc_bdev_set_qos_limit`, lib/bdev/bdev.c
/// `spdk_bdev_set_qos_rate_limits`): a missing bdev is -19; no limit given is -22 "No rate
/// limits specified"; an unknown parameter fails the decoder (-32603); an IOPS limit is rounded
/// up to a multiple of 1000; limits not given are left as they were; 0 lifts one; by name or
/// UUID alias; `bdev_get_bdevs` shows them in `assigned_rate_limits` (bandwidth in MB).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_limits_are_set_rounded_and_listed_as_spdk_does() {
    let emu = Emu::start(|_| {}).await;
    let mut c = emu.client().await;
    register(&mut c, "ceph1").await;
    c.ok("bdev_rbd_create", json!({"name": "q", "pool_name": "rbd", "rbd_name": "q", "block_size": 4096, "cluster_name": "ceph1", "uuid": UUID1})).await;
    let limits = |v: &Value| v[0]["assigned_rate_limits"].clone();
    assert_eq!(
        limits(&c.ok("bdev_get_bdevs", json!({"name": "q"})).await),
        json!({"rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 0})
    );
    assert_eq!(
        c.err(
            "bdev_set_qos_limit",
            json!({"name": "nope", "rw_ios_per_sec": 1000})
        )
        .await,
        -19
    );
    let e = c.call_raw("bdev_set_qos_limit", json!({"name": "q"})).await;
    assert_eq!(e["error"]["code"], -22, "{e}");
    assert_eq!(e["error"]["message"], "No rate limits specified");
    assert_eq!(
        c.err("bdev_set_qos_limit", json!({"name": "q", "iops": 1000}))
            .await,
        -32603
    );
    let r = c
        .ok(
            "bdev_set_qos_limit",
            json!({"name": "q", "rw_ios_per_sec": 2500, "r_mbytes_per_sec": 20}),
        )
        .await;
    assert_eq!(r, true);
    assert_eq!(
        limits(&c.ok("bdev_get_bdevs", json!({"name": "q"})).await),
        json!({"rw_ios_per_sec": 3000, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 20, "w_mbytes_per_sec": 0}),
        "rounded up; bandwidth in MB"
    );
    // Through the UUID alias; the read limit not given stays; 0 lifts the IOPS limit.
    c.ok(
        "bdev_set_qos_limit",
        json!({"name": UUID1, "rw_ios_per_sec": 0, "w_mbytes_per_sec": 5}),
    )
    .await;
    assert_eq!(
        limits(&c.ok("bdev_get_bdevs", json!({"name": "q"})).await),
        json!({"rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 20, "w_mbytes_per_sec": 5})
    );
}
