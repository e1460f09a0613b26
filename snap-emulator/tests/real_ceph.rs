//! Real-Ceph mode against the one-node cluster: credentials are checked by connecting, images by
//! opening them, and bdevs report the image's real size.

use std::time::Duration;

use e2e::{unique, Cluster};
use serde_json::{json, Value};
use snap_emulator::{ceph::RealCeph, Config, Emulator, Faults};

fn emulator() -> std::sync::Arc<Emulator> {
    Emulator::new(&Config {
        socket: "/nonexistent".into(),
        pfs: 1,
        vfs_per_pf: 0,
        serial: "MT0000TEST".into(),
        rbd: true,
        real_ceph: Some(RealCeph::new(Duration::from_secs(10))),
        init_files: vec![],
        faults: Faults::default(),
        default_image_size: 1 << 30,
        wait_for_rpc: false,
        host_dir: None,
    })
    .unwrap()
}

fn mon_host(c: &Cluster) -> String {
    let conf = std::fs::read_to_string(&c.conf).unwrap();
    conf.lines()
        .find_map(|l| l.trim().strip_prefix("mon host = "))
        .expect("mon host in ceph.conf")
        .to_string()
}

#[tokio::test]
async fn clusters_and_images_are_checked_against_ceph() {
    let c = Cluster::from_env();
    let key = c.cli_ok("ceph", &["auth", "get-key", &format!("client.{}", c.id)]);
    let image = unique("emu");
    c.cli_ok(
        "rbd",
        &["create", "--size", "256M", &format!("{}/{image}", c.pool)],
    );
    let emu = emulator();

    // Wrong key: -1, as SPDK answers a failed rados_connect.
    let bad = emu
        .call(
            "bdev_rbd_register_cluster",
            &json!({"name": "bad", "user_id": c.id, "config_param": {"mon_host": mon_host(&c), "key": "AQBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB=="}}),
        )
        .await;
    assert_eq!(bad.unwrap_err().code, -1);

    let ok = emu
        .call(
            "bdev_rbd_register_cluster",
            &json!({"name": "ceph1", "user_id": c.id, "config_param": {"mon_host": mon_host(&c), "key": key.trim()}}),
        )
        .await
        .unwrap();
    assert_eq!(ok, json!("ceph1"));
    // Files work as well.
    emu.call(
        "bdev_rbd_register_cluster",
        &json!({"name": "ceph2", "user_id": c.id, "config_file": c.conf, "key_file": c.keyring}),
    )
    .await
    .unwrap();

    let name = emu
        .call(
            "bdev_rbd_create",
            &json!({"name": "b1", "pool_name": c.pool, "rbd_name": image, "block_size": 4096, "cluster_name": "ceph1"}),
        )
        .await
        .unwrap();
    assert_eq!(name, json!("b1"));
    let bdevs = emu
        .call("bdev_get_bdevs", &json!({"name": "b1"}))
        .await
        .unwrap();
    assert_eq!(
        bdevs[0]["num_blocks"],
        (256u64 << 20) / 4096,
        "the real size"
    );

    let missing = emu
        .call(
            "bdev_rbd_create",
            &json!({"name": "b2", "pool_name": c.pool, "rbd_name": "no-such-image", "block_size": 4096, "cluster_name": "ceph2"}),
        )
        .await;
    assert_eq!(missing.unwrap_err().code, -1);
    let all = emu.call("bdev_get_bdevs", &Value::Null).await.unwrap();
    assert_eq!(
        all.as_array().unwrap().len(),
        1,
        "nothing created for a missing image"
    );
}

/// A 64 MiB image and an emulator in real-Ceph mode with cluster `ceph1` registered.
async fn with_registered_cluster(prefix: &str) -> (Cluster, std::sync::Arc<Emulator>, String) {
    let c = Cluster::from_env();
    let image = unique(prefix);
    c.cli_ok(
        "rbd",
        &["create", "--size", "64M", &format!("{}/{image}", c.pool)],
    );
    let emu = emulator();
    emu.call(
        "bdev_rbd_register_cluster",
        &json!({"name": "ceph1", "user_id": c.id, "config_file": c.conf, "key_file": c.keyring}),
    )
    .await
    .unwrap();
    (c, emu, image)
}

/// SPDK v24.01 `bdev_rbd_resize` (module/bdev/rbd/bdev_rbd.c): a size in MiB not below the
/// bdev's (else -EINVAL, before anything changes), `rbd_resize` of the image through the bdev's
/// handle, then the bdev's new block count.
#[tokio::test]
async fn resize_grows_the_image_and_the_bdev_and_never_shrinks() {
    let (c, emu, image) = with_registered_cluster("emu-resize").await;
    emu.call(
        "bdev_rbd_create",
        &json!({"name": "b1", "pool_name": c.pool, "rbd_name": image, "block_size": 4096, "cluster_name": "ceph1"}),
    )
    .await
    .unwrap();
    let shrink = emu
        .call("bdev_rbd_resize", &json!({"name": "b1", "new_size": 32}))
        .await;
    assert_eq!(shrink.unwrap_err().code, -22);
    emu.call("bdev_rbd_resize", &json!({"name": "b1", "new_size": 160}))
        .await
        .unwrap();
    let size = c.rbd_info(&c.pool, &image).unwrap()["size"].as_u64();
    assert_eq!(size, Some(160 << 20), "the image grew through librbd");
    let b = emu
        .call("bdev_get_bdevs", &json!({"name": "b1"}))
        .await
        .unwrap();
    assert_eq!(b[0]["num_blocks"], (160u64 << 20) / 4096);
    let missing = emu
        .call("bdev_rbd_resize", &json!({"name": "nope", "new_size": 160}))
        .await;
    assert_eq!(missing.unwrap_err().code, -19);
}

/// The watchers of an image, as `rbd status` lists them.
fn watchers(c: &Cluster, image: &str) -> Vec<serde_json::Value> {
    let out = c.cli_ok(
        "rbd",
        &["status", "--format", "json", &format!("{}/{image}", c.pool)],
    );
    serde_json::from_str::<Value>(&out).unwrap()["watchers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// SPDK v24.01 `bdev_rbd_init_context` opens the image (`rbd_open`) and registers an update
/// watch (`rbd_update_watch`) for as long as the bdev exists; `bdev_rbd_free` unwatches and
/// closes it. So Ceph lists SNAP's watcher exactly while the bdev exists, and a grown image
/// reaches the bdev through the update callback (`spdk_bdev_notify_blockcnt_change`).
#[tokio::test]
async fn a_bdev_holds_its_image_open_and_follows_a_grow() {
    let (c, emu, image) = with_registered_cluster("emu-watch").await;
    assert!(watchers(&c, &image).is_empty());
    emu.call(
        "bdev_rbd_create",
        &json!({"name": "b1", "pool_name": c.pool, "rbd_name": image, "block_size": 4096, "cluster_name": "ceph1"}),
    )
    .await
    .unwrap();
    assert_eq!(watchers(&c, &image).len(), 1, "SNAP's watcher");

    c.cli_ok(
        "rbd",
        &[
            "resize",
            "--no-progress",
            "--size",
            "160M",
            &format!("{}/{image}", c.pool),
        ],
    );
    // The update callback arrives asynchronously, as in SPDK.
    let blocks = || async {
        emu.call("bdev_get_bdevs", &json!({"name": "b1"}))
            .await
            .ok()
            .and_then(|b| b[0]["num_blocks"].as_u64())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while blocks().await != Some((160u64 << 20) / 4096) {
        assert!(
            std::time::Instant::now() < deadline,
            "the bdev never saw the grow"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    emu.call("bdev_rbd_delete", &json!({"name": "b1"}))
        .await
        .unwrap();
    assert!(
        watchers(&c, &image).is_empty(),
        "no watcher after the bdev is deleted"
    );
}
