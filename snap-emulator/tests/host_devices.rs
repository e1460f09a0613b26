//! The simulated host's devices: each namespace attached to a started controller is an NBD
//! device the host uses with qemu-utils; it appears and goes with SNAP's objects, and the host's
//! account (`host.json`) says which devices it has open. Memory mode (no Ceph): the real-Ceph
//! path (blocks through librbd into the image) is in the end-to-end tests.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{create_path, Emu, UUID1};
use e2e::host::{self, Opener};
use serde_json::{json, Value};

async fn emu_with_host() -> (Emu, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let host_dir = dir.path().join("host");
    let socket = dir.path().join("spdk.sock");
    let h = host_dir.clone();
    let emu = Emu::start_at(dir, socket, move |c| {
        c.host_dir = Some(h);
        c.default_image_size = 64 << 20;
    })
    .await;
    (emu, host_dir)
}

/// Polls (off the async threads) until `cond` holds about the host's devices.
async fn wait_host(dir: &Path, what: &str, cond: impl Fn(&[host::Device]) -> bool) {
    let start = Instant::now();
    loop {
        let d = host::devices(dir);
        if cond(&d) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "gave up waiting for {what}: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_started_controllers_namespace_is_a_host_device_with_its_identity() {
    let (emu, dir) = emu_with_host().await;
    let mut c = emu.client().await;
    assert!(
        host::devices(&dir).is_empty(),
        "no device before SNAP has one"
    );
    create_path(&mut c).await;
    let d = host::devices(&dir);
    assert_eq!(d.len(), 1, "{d:?}");
    assert_eq!(
        (d[0].controller.as_str(), d[0].nsid, d[0].uuid.as_str()),
        ("NVMeCtrl1", 1, UUID1)
    );
    assert_eq!(d[0].size, 64 << 20);
    assert!(!d[0].enabled && d[0].open == 0, "{d:?}");
    let dev = d[0].path.clone();
    // The host writes and reads its blocks.
    let p = dev.clone();
    assert!(blocking(move || host::write_pattern(&p, 0xa5, 8192, 65536)).await);
    let p = dev.clone();
    assert!(blocking(move || host::reads_pattern(&p, 0xa5, 8192, 65536)).await);
    let p = dev.clone();
    assert!(
        blocking(move || host::reads_pattern(&p, 0, 0, 8192)).await,
        "never written: zeroes"
    );
    let p = dev.clone();
    assert!(
        !blocking(move || host::reads_pattern(&p, 0x11, 8192, 4096)).await,
        "a wrong pattern is told apart"
    );
    let p = dev.clone();
    assert_eq!(blocking(move || host::size(&p)).await, Some(64 << 20));
    // A suspended controller is not the host's: the device goes, and comes back on resume.
    c.ok("nvme_controller_suspend", json!({"ctrl_id": "NVMeCtrl1"}))
        .await;
    assert!(host::devices(&dir).is_empty());
    assert!(!dev.exists(), "the socket goes with the device");
    c.ok("nvme_controller_resume", json!({"ctrl_id": "NVMeCtrl1"}))
        .await;
    let p = dev.clone();
    assert!(
        blocking(move || host::reads_pattern(&p, 0xa5, 8192, 65536)).await,
        "the same blocks behind the same device"
    );
    // Growing the bdev: the host reads the new size when it opens the device again.
    c.ok(
        "bdev_rbd_resize",
        json!({"name": "rbd-vol1", "new_size": 128}),
    )
    .await;
    assert_eq!(host::devices(&dir)[0].size, 128 << 20);
    let p = dev.clone();
    assert_eq!(blocking(move || host::size(&p)).await, Some(128 << 20));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_host_account_says_which_devices_are_open_and_removal_closes_them() {
    let (emu, dir) = emu_with_host().await;
    let mut c = emu.client().await;
    create_path(&mut c).await;
    let dev = host::devices(&dir)[0].path.clone();
    let p = dev.clone();
    let mut opener = blocking(move || Opener::open(&p)).await;
    wait_host(&dir, "the device open", |d| {
        d.len() == 1 && d[0].open == 1 && d[0].enabled
    })
    .await;
    // A second opener counts too; closing it goes back to one.
    let p = dev.clone();
    let second = blocking(move || Opener::open(&p)).await;
    wait_host(&dir, "two openers", |d| d[0].open == 2).await;
    blocking(move || drop(second)).await;
    wait_host(&dir, "one opener", |d| d[0].open == 1).await;
    // Detaching takes the device from the host, even while open (the gate is unistor's).
    c.ok(
        "nvme_controller_detach_ns",
        json!({"ctrl_id": "NVMeCtrl1", "nsid": 1}),
    )
    .await;
    assert!(host::devices(&dir).is_empty());
    assert!(!dev.exists());
    assert!(opener.running(), "qemu-io only notices at its next I/O");
    blocking(move || drop(opener)).await;
    // Deleting the bdev under an attached, started namespace hot-removes the device too.
    c.ok(
        "nvme_controller_attach_ns",
        json!({"ctrl_id": "NVMeCtrl1", "nsid": 1}),
    )
    .await;
    assert_eq!(host::devices(&dir).len(), 1);
    c.ok("bdev_rbd_delete", json!({"name": "rbd-vol1"})).await;
    assert!(host::devices(&dir).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snap_stopping_takes_the_devices_and_a_new_one_serves_the_same_path() {
    let (emu, dir) = emu_with_host().await;
    let mut c = emu.client().await;
    create_path(&mut c).await;
    let before = host::devices(&dir);
    drop(c);
    let (tmp, socket) = emu.stop().await;
    assert!(host::devices(&dir).is_empty(), "{:?}", host::view(&dir));
    assert!(!before[0].path.exists());
    let h = dir.clone();
    let emu = Emu::start_at(tmp, socket, move |c| {
        c.host_dir = Some(h);
        c.default_image_size = 64 << 20;
    })
    .await;
    let mut c = emu.client().await;
    create_path(&mut c).await;
    assert_eq!(
        host::devices(&dir),
        before,
        "same controller, NSID, UUID and path"
    );
    let v: Value = host::view(&dir);
    assert!(v["controllers"].is_array(), "{v}");
}
