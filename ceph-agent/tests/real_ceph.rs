//! The ceph-agent's operations against a real Ceph cluster, each effect checked independently with
//! the real `rbd`, `rados` and `ceph` CLI.
//!
//! Needs a running cluster: `scripts/test.sh` starts one; by hand,
//! `scripts/ceph-dev-cluster.sh up /tmp/unistor-ceph && . /tmp/unistor-ceph/env`.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use ceph_agent::ceph::{Ceph, CephError, ImageSpec, Owner};
use ceph_agent::runner::{ProcessRunner, ProcessRunnerConfig};
use e2e::{unique, wait_until, Cluster};
use protocol::names::{CephClientId, PoolName};
use protocol::{ImageState, Ownership};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn cluster() -> Cluster {
    Cluster::from_env()
}

fn ceph_ops(c: &Cluster) -> Ceph<ProcessRunner> {
    ceph_ops_with(c, Path::Library)
}

/// Which way the agent's creates, renames, listings and index writes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// librados/librbd in process (the default).
    Library,
    /// Commands only (`--no-librbd`).
    Cli,
}

fn ceph_ops_with(c: &Cluster, path: Path) -> Ceph<ProcessRunner> {
    Ceph::new(runner_for(c, path), Some(&c.id))
}

fn runner_for(c: &Cluster, path: Path) -> ProcessRunner {
    ProcessRunner::new(ProcessRunnerConfig {
        conf: Some(c.conf.clone()),
        keyring: Some(c.keyring.clone()),
        client_id: Some(c.id.clone()),
        timeout: Duration::from_secs(60),
        library: path == Path::Library,
        ..ProcessRunnerConfig::default()
    })
}

fn cli(c: &Cluster, tool: &str, args: &[&str]) -> (i32, String, String) {
    c.cli(tool, args)
}

fn cli_ok(c: &Cluster, tool: &str, args: &[&str]) -> String {
    c.cli_ok(tool, args)
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("bad json {s:?}: {e}"))
}

fn rbd_info(c: &Cluster, pool: &str, image: &str) -> Option<serde_json::Value> {
    c.rbd_info(pool, image)
}

fn rbd_meta(c: &Cluster, pool: &str, image: &str) -> BTreeMap<String, String> {
    let spec = format!("{pool}/{image}");
    let out = cli_ok(c, "rbd", &["image-meta", "list", "--format", "json", &spec]);
    if out.trim().is_empty() {
        return BTreeMap::new();
    }
    serde_json::from_str(&out).unwrap()
}

fn trash_names(c: &Cluster, pool: &str) -> Vec<String> {
    let out = cli_ok(c, "rbd", &["trash", "ls", "--format", "json", pool]);
    json(&out)
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_string())
        .collect()
}

/// Whether the pool's index names the image (in its own key or in a batch key).
fn indexed(c: &Cluster, pool: &str, image: &str) -> bool {
    c.index_entry(pool, image).is_some()
}

fn owner(volume: &str) -> Owner {
    Owner::parse(&Ownership {
        managed_by: "unistor-test".into(),
        volume: volume.into(),
    })
    .unwrap()
}

fn spec(pool: &str, image: &str) -> ImageSpec {
    ImageSpec::parse(pool, image).unwrap()
}

/// An `rbd watch` process: a real watcher on the image until dropped.
struct Watcher(std::process::Child);

impl Watcher {
    fn start(c: &Cluster, pool: &str, image: &str) -> Self {
        let child = c
            .command("rbd")
            .args(["watch", &format!("{pool}/{image}")])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let w = Watcher(child);
        wait_until(Duration::from_secs(30), "the watcher to register", || {
            let out = cli_ok(
                c,
                "rbd",
                &["status", "--format", "json", &format!("{pool}/{image}")],
            );
            !json(&out)["watchers"].as_array().unwrap().is_empty()
        });
        w
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        // `rbd watch` exits cleanly (and unwatches) on a newline.
        use std::io::Write;
        if let Some(stdin) = self.0.stdin.as_mut() {
            let _ = stdin.write_all(b"\n");
        }
        let _ = self.0.wait();
    }
}

/// A golden image: `size` bytes, its first MiB a pattern, with snapshot `v1`.
fn golden(c: &Cluster, name: &str, size: u64) -> Vec<u8> {
    let pattern: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 ^ 0x5a).collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("golden.raw");
    let mut bytes = pattern.clone();
    bytes.resize(size as usize, 0);
    std::fs::write(&file, &bytes).unwrap();
    let spec = format!("{}/{name}", c.pool);
    cli_ok(
        c,
        "rbd",
        &["import", "--no-progress", file.to_str().unwrap(), &spec],
    );
    cli_ok(c, "rbd", &["snap", "create", &format!("{spec}@v1")]);
    pattern
}

/// The first `len` bytes of an image, read back with `rbd export`.
fn head_of(c: &Cluster, pool: &str, image: &str, len: usize) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("out.raw");
    cli_ok(
        c,
        "rbd",
        &[
            "export",
            "--no-progress",
            &format!("{pool}/{image}"),
            file.to_str().unwrap(),
        ],
    );
    let mut b = std::fs::read(&file).unwrap();
    b.truncate(len);
    b
}

/// A volume cloned from a golden image's snapshot: a format-2 clone (the snapshot unprotected)
/// with unistor's keys, grown to the size asked, holding the golden bytes; the same create again
/// is success; a size below the snapshot's and a missing snapshot are refused, and nothing is
/// left behind.
#[tokio::test]
async fn a_clone_of_a_golden_snapshot_is_grown_owned_and_holds_its_bytes() {
    clone_case(Path::Library).await
}

#[tokio::test]
async fn a_clone_of_a_golden_snapshot_is_grown_owned_and_holds_its_bytes_through_the_cli() {
    clone_case(Path::Cli).await
}

async fn clone_case(path: Path) {
    let c = cluster();
    let ceph = ceph_ops_with(&c, path);
    let gold = unique("golden");
    let pattern = golden(&c, &gold, 16 * MIB);
    let src = ceph_agent::ceph::SnapSpec::parse(&protocol::SnapshotRef {
        pool: c.pool.clone(),
        image: gold.clone(),
        snapshot: "v1".into(),
    })
    .unwrap();
    let name = unique("boot");
    let s = spec(&c.pool, &name);
    let o = owner(&name);
    let library_before = ceph.library_calls();
    let st = ceph
        .create_image_from(&s, 64 * MIB, &[], &o, None, Some(&src))
        .await
        .unwrap();
    assert_eq!((st.state, st.size_bytes), (ImageState::Live, 64 * MIB));
    let through_library = ceph.library_calls() - library_before;
    match path {
        // The snapshot's size, the clone with its keys and grow, the rename, the index entry.
        Path::Library => assert!(through_library >= 3, "{through_library}"),
        Path::Cli => assert_eq!(through_library, 0),
    }
    let info = rbd_info(&c, &c.pool, &name).expect("rbd sees the clone");
    assert_eq!(info["size"].as_u64(), Some(64 * MIB));
    assert_eq!(info["parent"]["image"], gold.as_str(), "{info}");
    assert_eq!(info["parent"]["snapshot"], "v1", "{info}");
    let meta = rbd_meta(&c, &c.pool, &name);
    assert_eq!(meta["unistor.volume"], name);
    assert!(indexed(&c, &c.pool, &name));
    assert_eq!(head_of(&c, &c.pool, &name, MIB as usize), pattern);
    // The snapshot was never protected: format 2 needs no protection.
    let snaps = cli_ok(
        &c,
        "rbd",
        &[
            "snap",
            "ls",
            "--format",
            "json",
            &format!("{}/{gold}", c.pool),
        ],
    );
    assert_eq!(json(&snaps)[0]["protected"], "false", "{snaps}");
    // Again: success, nothing changed.
    let again = ceph
        .create_image_from(&s, 64 * MIB, &[], &o, None, Some(&src))
        .await
        .unwrap();
    assert_eq!(again.size_bytes, 64 * MIB);
    assert_eq!(
        again.parent.as_deref(),
        Some(format!("{}/{gold}@v1", c.pool).as_str()),
        "its report names the parent"
    );
    // Flattened: no parent any more, the same bytes; again is success.
    let flat = ceph.flatten_image(&s, &o).await.unwrap();
    assert_eq!(flat.parent, None);
    let info = rbd_info(&c, &c.pool, &name).unwrap();
    assert!(info.get("parent").is_none(), "{info}");
    assert_eq!(head_of(&c, &c.pool, &name, MIB as usize), pattern);
    assert_eq!(ceph.flatten_image(&s, &o).await.unwrap().parent, None);
    // Another volume's image is not flattened.
    let e = ceph
        .flatten_image(&s, &owner("someone-else"))
        .await
        .unwrap_err();
    assert!(matches!(e, CephError::NotOwned { .. }), "{e}");

    // Smaller than the snapshot: refused before anything is written.
    let small = unique("small");
    let e = ceph
        .create_image_from(
            &spec(&c.pool, &small),
            8 * MIB,
            &[],
            &owner(&small),
            None,
            Some(&src),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, CephError::Invalid { .. }), "{e}");
    assert!(e.to_string().contains("cannot be smaller"), "{e}");
    // A snapshot that does not exist: said so.
    let none = ceph_agent::ceph::SnapSpec::parse(&protocol::SnapshotRef {
        pool: c.pool.clone(),
        image: gold.clone(),
        snapshot: "v9".into(),
    })
    .unwrap();
    let e = ceph
        .create_image_from(
            &spec(&c.pool, &small),
            64 * MIB,
            &[],
            &owner(&small),
            None,
            Some(&none),
        )
        .await
        .unwrap_err();
    assert!(matches!(e, CephError::NotFound { .. }), "{e}");
    assert!(e.to_string().contains("@v9"), "{e}");
    assert!(rbd_info(&c, &c.pool, &small).is_none());
    let ls = cli_ok(&c, "rbd", &["ls", &c.pool]);
    assert!(!ls.contains(&format!(".unistor-new.{small}")), "{ls}");
    assert!(!ls.contains(&format!(".unistor-new.{name}")), "{ls}");
}

#[tokio::test]
async fn snapshots_are_taken_listed_recorded_and_kept_while_clones_hold_them() {
    snapshot_case(Path::Library).await
}

#[tokio::test]
async fn snapshots_are_taken_listed_recorded_and_kept_while_clones_hold_them_through_the_cli() {
    snapshot_case(Path::Cli).await
}

async fn snapshot_case(path: Path) {
    let c = cluster();
    let ceph = ceph_ops_with(&c, path);
    let name = unique("snapped");
    let s = spec(&c.pool, &name);
    let o = owner(&name);
    ceph.create_image(&s, 16 * MIB, &[], &o, None)
        .await
        .unwrap();
    let snap = |n: &str| {
        ceph_agent::ceph::SnapSpec::of_op(&protocol::SnapshotOp {
            pool: c.pool.clone(),
            image: name.clone(),
            snapshot: n.into(),
            owner: protocol::Ownership {
                managed_by: "unistor".into(),
                volume: name.clone(),
            },
        })
        .unwrap()
    };
    // A declared name: recorded in unistor.snapshots, taken; again is success.
    let st = ceph.create_snapshot(&snap("before"), &o).await.unwrap();
    assert_eq!(
        st.snapshots
            .iter()
            .map(|x| x.name.as_str())
            .collect::<Vec<_>>(),
        ["before"]
    );
    assert_eq!(
        st.metadata.get("unistor.snapshots").map(String::as_str),
        Some("before")
    );
    ceph.create_snapshot(&snap("before"), &o).await.unwrap();
    // A scheduled one: taken, not recorded; ids rise.
    let st = ceph
        .create_snapshot(&snap("auto-1765000000"), &o)
        .await
        .unwrap();
    assert_eq!(st.snapshots.len(), 2, "{:?}", st.snapshots);
    assert!(st.snapshots[1].id > st.snapshots[0].id);
    assert_eq!(
        st.metadata.get("unistor.snapshots").map(String::as_str),
        Some("before")
    );
    let listed = json(&cli_ok(
        &c,
        "rbd",
        &[
            "snap",
            "ls",
            "--format",
            "json",
            &format!("{}/{name}", c.pool),
        ],
    ));
    assert_eq!(listed.as_array().map(Vec::len), Some(2), "{listed}");
    // Another volume's image: refused.
    let e = ceph
        .create_snapshot(&snap("x"), &owner("someone-else"))
        .await
        .unwrap_err();
    assert!(matches!(e, CephError::NotOwned { .. }), "{e}");
    // A clone of `before` holds it: its removal is refused, naming the clone.
    let clone = unique("restored");
    let src = ceph_agent::ceph::SnapSpec::parse(&protocol::SnapshotRef {
        pool: c.pool.clone(),
        image: name.clone(),
        snapshot: "before".into(),
    })
    .unwrap();
    ceph.create_image_from(
        &spec(&c.pool, &clone),
        16 * MIB,
        &[],
        &owner(&clone),
        None,
        Some(&src),
    )
    .await
    .unwrap();
    // Its depth, read through librbd: 1 (a clone of an image that is no clone); a clone of a
    // snapshot of that clone is 2 (through the CLI it is not walked: unknown).
    let read_again = ceph
        .remove_snapshot(&snap("none"), &owner(&name))
        .await
        .unwrap();
    assert_eq!(read_again.clone_depth, None, "not a clone");
    let grand = unique("grand");
    cli_ok(
        &c,
        "rbd",
        &["snap", "create", &format!("{}/{clone}@g1", c.pool)],
    );
    let from_clone = ceph_agent::ceph::SnapSpec::parse(&protocol::SnapshotRef {
        pool: c.pool.clone(),
        image: clone.clone(),
        snapshot: "g1".into(),
    })
    .unwrap();
    ceph.create_image_from(
        &spec(&c.pool, &grand),
        16 * MIB,
        &[],
        &owner(&grand),
        None,
        Some(&from_clone),
    )
    .await
    .unwrap();
    let (d1, d2) = (
        ceph.grow_image(&spec(&c.pool, &clone), 16 * MIB, &owner(&clone))
            .await
            .unwrap()
            .clone_depth,
        ceph.grow_image(&spec(&c.pool, &grand), 16 * MIB, &owner(&grand))
            .await
            .unwrap()
            .clone_depth,
    );
    match path {
        Path::Library => assert_eq!((d1, d2), (Some(1), Some(2))),
        Path::Cli => assert_eq!((d1, d2), (None, None)),
    }
    cli(
        &c,
        "rbd",
        &["rm", "--no-progress", &format!("{}/{grand}", c.pool)],
    );
    cli(
        &c,
        "rbd",
        &["snap", "rm", &format!("{}/{clone}@g1", c.pool)],
    );
    let e = ceph.remove_snapshot(&snap("before"), &o).await.unwrap_err();
    assert!(matches!(e, CephError::HasClones { .. }), "{e}");
    assert!(e.to_string().contains(&clone), "{e}");
    assert_eq!(e.to_wire().code, protocol::ErrorCode::InUse);
    let listed = json(&cli_ok(
        &c,
        "rbd",
        &[
            "snap",
            "ls",
            "--format",
            "json",
            &format!("{}/{name}", c.pool),
        ],
    ));
    assert_eq!(
        listed.as_array().map(Vec::len),
        Some(2),
        "still there: {listed}"
    );
    // Flattened, the clone no longer holds it: removed, its name dropped; again is success.
    ceph.flatten_image(&spec(&c.pool, &clone), &owner(&clone))
        .await
        .unwrap();
    let st = ceph.remove_snapshot(&snap("before"), &o).await.unwrap();
    assert_eq!(
        st.snapshots
            .iter()
            .map(|x| x.name.as_str())
            .collect::<Vec<_>>(),
        ["auto-1765000000"]
    );
    assert_eq!(st.metadata.get("unistor.snapshots"), None);
    ceph.remove_snapshot(&snap("before"), &o).await.unwrap();
    // Killed between a removal and the key's rewrite (or between the key and the take): the
    // key names a snapshot that does not exist. A take of it takes it; a removal drops it.
    cli_ok(
        &c,
        "rbd",
        &[
            "image-meta",
            "set",
            &format!("{}/{name}", c.pool),
            "unistor.snapshots",
            "ghost,kept",
        ],
    );
    let st = ceph.create_snapshot(&snap("kept"), &o).await.unwrap();
    assert!(st.snapshots.iter().any(|x| x.name == "kept"));
    assert_eq!(
        st.metadata.get("unistor.snapshots").map(String::as_str),
        Some("ghost,kept")
    );
    let st = ceph.remove_snapshot(&snap("ghost"), &o).await.unwrap();
    assert_eq!(
        st.metadata.get("unistor.snapshots").map(String::as_str),
        Some("kept")
    );
    ceph.remove_snapshot(&snap("kept"), &o).await.unwrap();
    // Removed by hand: the next read reports it gone.
    cli_ok(
        &c,
        "rbd",
        &[
            "snap",
            "rm",
            "--no-progress",
            &format!("{}/{name}@auto-1765000000", c.pool),
        ],
    );
    let st = ceph.remove_snapshot(&snap("none"), &o).await.unwrap();
    assert!(st.snapshots.is_empty(), "{:?}", st.snapshots);
    remove_what_it_made(&c, &[name, clone]);
}

#[tokio::test]
async fn create_is_idempotent_and_writes_ownership() {
    create_case(Path::Library).await
}

#[tokio::test]
async fn create_is_idempotent_and_writes_ownership_through_the_cli() {
    create_case(Path::Cli).await
}

async fn create_case(path: Path) {
    let c = cluster();
    let ceph = ceph_ops_with(&c, path);
    let name = unique("create");
    let s = spec(&c.pool, &name);
    let o = owner(&name);

    ceph.load().await.unwrap();
    let (before, library_before) = (ceph.calls(), ceph.library_calls());
    let st = ceph.create_image(&s, GIB, &[], &o, None).await.unwrap();
    assert_eq!(st.state, ImageState::Live);
    assert_eq!(st.size_bytes, GIB);
    // The index entry, one call that makes the image with its ownership keys under a temporary
    // name (`rbd import`, or librbd's create and metadata set), and the rename that puts it in
    // place.
    assert_eq!(ceph.calls() - before, 3, "a create is three calls");
    let through_library = ceph.library_calls() - library_before;
    match path {
        Path::Library => assert_eq!(through_library, 3, "all three in process"),
        Path::Cli => assert_eq!(through_library, 0, "all three commands"),
    }

    let info = rbd_info(&c, &c.pool, &name).expect("rbd sees the image");
    assert_eq!(info["size"].as_u64(), Some(GIB));
    let features: Vec<&str> = info["features"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f.as_str().unwrap())
        .collect();
    assert_eq!(features, ["layering", "exclusive-lock"]);
    let meta = rbd_meta(&c, &c.pool, &name);
    assert_eq!(meta["unistor.managed-by"], "unistor-test");
    assert_eq!(meta["unistor.volume"], name);
    assert!(indexed(&c, &c.pool, &name));

    // The same create again succeeds and changes nothing.
    let again = ceph.create_image(&s, GIB, &[], &o, None).await.unwrap();
    assert_eq!(again.size_bytes, GIB);
    // A different spec under the same name is a conflict, and the image is untouched.
    let e = ceph
        .create_image(&s, 2 * GIB, &[], &o, None)
        .await
        .unwrap_err();
    assert!(matches!(e, CephError::Conflict { .. }), "{e}");
    assert!(e.to_string().contains("size"), "{e}");
    assert_eq!(
        rbd_info(&c, &c.pool, &name).unwrap()["size"].as_u64(),
        Some(GIB)
    );
}

#[tokio::test]
async fn concurrent_creates_share_their_index_writes() {
    let c = cluster();
    let ceph = ceph_ops(&c);
    ceph.load().await.unwrap();
    let names: Vec<String> = (0..12).map(|i| unique(&format!("burst{i}"))).collect();
    let before = ceph.calls();
    let creates = names.iter().map(|n| {
        let (s, o) = (spec(&c.pool, n), owner(n));
        let ceph = &ceph;
        async move { ceph.create_image(&s, 64 * MIB, &[], &o, None).await }
    });
    for r in futures::future::join_all(creates).await {
        r.unwrap();
    }
    // One `rbd import` (under the temporary name) and one `rbd rename` each; the index entries
    // were group-committed: the first create's flush, then one flush (one key written) for the
    // eleven that waited behind it.
    let commands = ceph.calls() - before;
    assert_eq!(commands, 12 * 2 + 2, "12 creates cost {commands} commands");
    // Read back independently, and by an agent that starts afresh.
    let fresh = ceph_ops(&c).report().await.unwrap();
    for n in &names {
        let entry = c
            .index_entry(&c.pool, n)
            .unwrap_or_else(|| panic!("{n} indexed"));
        assert_eq!(entry["volume"], n.as_str());
        let img = fresh
            .images
            .iter()
            .find(|i| &i.image == n)
            .unwrap_or_else(|| panic!("{n} reported"));
        assert_eq!(img.metadata["unistor.volume"], n.as_str());
        assert_eq!(rbd_meta(&c, &c.pool, n)["unistor.volume"], n.as_str());
    }
}

#[tokio::test]
async fn the_deletion_policy_is_written_and_updated_in_the_index() {
    let c = cluster();
    let ceph = ceph_ops(&c);
    let name = unique("policy");
    let (s, o) = (spec(&c.pool, &name), owner(&name));
    let trash = ceph_agent::ceph::Policy::parse(&protocol::ImagePolicy {
        deletion: protocol::meta::DeletionPolicy::Trash,
        trash_retention_secs: 3600,
    })
    .expect("a valid policy");
    let st = ceph
        .create_image(&s, 64 * MIB, &[], &o, Some(&trash))
        .await
        .unwrap();
    assert_eq!(st.metadata["unistor.deletion-policy"], "Trash");
    // The policy lives in the pool's index (one command per pool reads it back), so an agent
    // that starts afresh knows it without opening the image.
    let policy_seen_afresh = || async {
        let r = ceph_ops(&c).report().await.unwrap();
        let img = r.images.iter().find(|i| i.image == name).cloned().unwrap();
        (
            img.metadata["unistor.deletion-policy"].clone(),
            img.metadata["unistor.trash-retention-secs"].clone(),
        )
    };
    assert_eq!(policy_seen_afresh().await, ("Trash".into(), "3600".into()));
    let meta = rbd_meta(&c, &c.pool, &name);
    assert_eq!(meta["unistor.managed-by"], "unistor-test");
    assert_eq!(meta["unistor.volume"], name);
    let delete = ceph_agent::ceph::Policy::parse(&protocol::ImagePolicy {
        deletion: protocol::meta::DeletionPolicy::Delete,
        trash_retention_secs: 0,
    })
    .expect("a valid policy");
    let st = ceph
        .create_image(&s, 64 * MIB, &[], &o, Some(&delete))
        .await
        .unwrap();
    assert_eq!(st.metadata["unistor.deletion-policy"], "Delete");
    assert_eq!(policy_seen_afresh().await, ("Delete".into(), "0".into()));
    // An unknown policy does not even decode from the wire.
    assert!(serde_json::from_value::<protocol::ImagePolicy>(
        serde_json::json!({"deletion": "Shred", "trash_retention_secs": 0})
    )
    .is_err());
}

#[tokio::test]
async fn grow_but_never_shrink() {
    let c = cluster();
    let ceph = ceph_ops(&c);
    let name = unique("grow");
    let (s, o) = (spec(&c.pool, &name), owner(&name));
    ceph.create_image(&s, 256 * MIB, &[], &o, None)
        .await
        .unwrap();

    let st = ceph.grow_image(&s, GIB, &o).await.unwrap();
    assert_eq!(st.size_bytes, GIB);
    assert_eq!(
        rbd_info(&c, &c.pool, &name).unwrap()["size"].as_u64(),
        Some(GIB)
    );
    // Same size: no-op.
    ceph.grow_image(&s, GIB, &o).await.unwrap();

    let e = ceph.grow_image(&s, 512 * MIB, &o).await.unwrap_err();
    assert!(matches!(e, CephError::Shrink { .. }), "{e}");
    assert_eq!(e.to_wire().code, protocol::ErrorCode::ShrinkRefused);
    assert_eq!(
        rbd_info(&c, &c.pool, &name).unwrap()["size"].as_u64(),
        Some(GIB),
        "the image kept its size"
    );
}

#[tokio::test]
async fn trash_restore_and_delete() {
    let c = cluster();
    let ceph = ceph_ops(&c);
    let name = unique("trash");
    let (s, o) = (spec(&c.pool, &name), owner(&name));
    ceph.create_image(&s, 64 * MIB, &[], &o, None)
        .await
        .unwrap();

    let st = ceph.trash_image(&s, 3600, &o).await.unwrap();
    match &st.state {
        ImageState::Trashed { trash_status, .. } => {
            assert!(trash_status.contains("protected until"), "{trash_status}")
        }
        other => panic!("expected trashed, got {other:?}"),
    }
    assert!(rbd_info(&c, &c.pool, &name).is_none(), "no longer live");
    assert!(trash_names(&c, &c.pool).contains(&name));
    // Trashing again is success.
    ceph.trash_image(&s, 3600, &o).await.unwrap();
    // Deleting a trashed image is refused: restore first.
    let e = ceph.delete_image(&s, &o).await.unwrap_err();
    assert!(matches!(e, CephError::NotFound { .. }), "{e}");
    assert!(trash_names(&c, &c.pool).contains(&name));

    let st = ceph.restore_image(&s).await.unwrap();
    assert_eq!(st.state, ImageState::Live);
    assert_eq!(st.size_bytes, 64 * MIB);
    assert!(rbd_info(&c, &c.pool, &name).is_some());
    assert!(!trash_names(&c, &c.pool).contains(&name));
    assert_eq!(
        rbd_meta(&c, &c.pool, &name)["unistor.volume"],
        name,
        "metadata kept"
    );
    // Restoring a live image is success.
    ceph.restore_image(&s).await.unwrap();

    ceph.delete_image(&s, &o).await.unwrap();
    assert!(rbd_info(&c, &c.pool, &name).is_none());
    assert!(!indexed(&c, &c.pool, &name), "index entry removed");
    // Deleting what is gone is success.
    ceph.delete_image(&s, &o).await.unwrap();
}

#[tokio::test]
async fn images_with_watchers_are_neither_deleted_nor_trashed() {
    let c = cluster();
    let ceph = ceph_ops(&c);
    let name = unique("watched");
    let (s, o) = (spec(&c.pool, &name), owner(&name));
    ceph.create_image(&s, 64 * MIB, &[], &o, None)
        .await
        .unwrap();
    {
        let _watcher = Watcher::start(&c, &c.pool, &name);
        let e = ceph.delete_image(&s, &o).await.unwrap_err();
        assert!(matches!(e, CephError::InUse { .. }), "{e}");
        assert_eq!(e.to_wire().code, protocol::ErrorCode::InUse);
        let e = ceph.trash_image(&s, 60, &o).await.unwrap_err();
        assert!(matches!(e, CephError::InUse { .. }), "{e}");
        assert!(rbd_info(&c, &c.pool, &name).is_some(), "still there");
        // The live lookup names who watches: the monitors' sessions give each address its
        // cephx entity (the test's `rbd watch` runs as the admin identity).
        let w = ceph.image_watchers(std::slice::from_ref(&s)).await.unwrap();
        assert_eq!(w[0].watchers.len(), 1, "{w:?}");
        assert_eq!(w[0].clients, [format!("client.{}", c.id)], "{w:?}");
    }
    wait_until(Duration::from_secs(60), "the watcher to go", || {
        let out = cli_ok(
            &c,
            "rbd",
            &["status", "--format", "json", &format!("{}/{name}", c.pool)],
        );
        json(&out)["watchers"].as_array().unwrap().is_empty()
    });
    ceph.delete_image(&s, &o).await.unwrap();
    assert!(rbd_info(&c, &c.pool, &name).is_none());
}

#[tokio::test]
async fn images_unistor_does_not_own_are_never_touched() {
    let c = cluster();
    let ceph = ceph_ops(&c);
    let name = unique("foreign");
    let full = format!("{}/{name}", c.pool);
    cli_ok(&c, "rbd", &["create", "--size", "64M", &full]);
    let (s, o) = (spec(&c.pool, &name), owner(&name));

    for e in [
        ceph.create_image(&s, 64 * MIB, &[], &o, None)
            .await
            .unwrap_err(),
        ceph.grow_image(&s, GIB, &o).await.unwrap_err(),
        ceph.trash_image(&s, 60, &o).await.unwrap_err(),
        ceph.delete_image(&s, &o).await.unwrap_err(),
        ceph.restore_image(&s).await.unwrap_err(),
    ] {
        assert!(matches!(e, CephError::NotOwned { .. }), "{e}");
        assert_eq!(e.to_wire().code, protocol::ErrorCode::NotOwned);
    }
    let info = rbd_info(&c, &c.pool, &name).expect("still there");
    assert_eq!(info["size"].as_u64(), Some(64 * MIB), "not grown");
    assert!(
        rbd_meta(&c, &c.pool, &name).is_empty(),
        "no metadata written"
    );
    assert!(!indexed(&c, &c.pool, &name));

    // An image owned by another volume is not this volume's either.
    let other = unique("other");
    let so = spec(&c.pool, &other);
    ceph.create_image(&so, 64 * MIB, &[], &owner(&other), None)
        .await
        .unwrap();
    let e = ceph
        .delete_image(&so, &owner("intruder"))
        .await
        .unwrap_err();
    assert!(matches!(e, CephError::NotOwned { .. }), "{e}");
    assert!(rbd_info(&c, &c.pool, &other).is_some());
    cli_ok(&c, "rbd", &["rm", "--no-progress", &full]);
}

fn images_of(c: &Cluster, pool: &str) -> Vec<String> {
    serde_json::from_str(&cli_ok(c, "rbd", &["ls", "--format", "json", pool])).unwrap()
}

/// An image is made under a temporary name and renamed once complete: what a create cut short
/// leaves is a temporary image, which the next create of it (or the next agent) removes; an
/// image under the final name without unistor's keys is never taken for unistor's, even when
/// the pool's index names it.
#[tokio::test]
async fn an_interrupted_create_leaves_only_a_temporary_image_and_keyless_images_are_not_ours() {
    interrupted_create_case(Path::Library).await
}

#[tokio::test]
async fn an_interrupted_create_through_the_cli_is_completed_the_same_way() {
    interrupted_create_case(Path::Cli).await
}

/// A temporary image without keys is also what a librbd create killed between its
/// `rbd_create4` and its `rbd_metadata_set` leaves.
async fn interrupted_create_case(path: Path) {
    let c = cluster();
    let ceph = ceph_ops_with(&c, path);
    let name = unique("interrupted");
    let (s, o) = (spec(&c.pool, &name), owner(&name));
    let tmp = format!(".unistor-new.{name}");
    let index_intent = |n: &str| {
        let v = format!(r#"{{"managed_by":"unistor","volume":"{n}","features":["layering"]}}"#);
        cli_ok(
            &c,
            "rados",
            &["--pool", &c.pool, "setomapval", "unistor.index", n, &v],
        );
    };
    // What a create killed during `rbd import` leaves: its intent, a partial temporary image.
    index_intent(&name);
    cli_ok(
        &c,
        "rbd",
        &["create", "--size", "1M", "--pool", &c.pool, "--", &tmp],
    );
    ceph.create_image(&s, 64 * MIB, &[], &o, None)
        .await
        .unwrap();
    assert_eq!(rbd_meta(&c, &c.pool, &name)["unistor.volume"], name);
    assert!(
        !images_of(&c, &c.pool).contains(&tmp),
        "the leftover is gone"
    );

    // A new agent's start-up load removes a leftover whose create never came back.
    let other = unique("abandoned");
    let tmp2 = format!(".unistor-new.{other}");
    index_intent(&other);
    cli_ok(
        &c,
        "rbd",
        &["create", "--size", "1M", "--pool", &c.pool, "--", &tmp2],
    );
    // A young one may be a create in flight (another agent process): left alone.
    let fresh = ceph_ops_with(&c, path);
    fresh.report().await.unwrap();
    assert!(
        images_of(&c, &c.pool).contains(&tmp2),
        "left at load: made moments ago"
    );
    // Old enough (here: any age), removed.
    let fresh = Ceph::with_options(
        runner_for(&c, path),
        Some(&c.id),
        ceph_agent::ceph::ViewOptions {
            leftover_age: Duration::ZERO,
            ..Default::default()
        },
    );
    fresh.report().await.unwrap();
    assert!(!images_of(&c, &c.pool).contains(&tmp2), "removed at load");

    // Under the final name without keys: someone's hand-made image, whatever the index says.
    let hand = unique("handmade");
    index_intent(&hand);
    cli_ok(
        &c,
        "rbd",
        &["create", "--size", "64M", &format!("{}/{hand}", c.pool)],
    );
    // A starting agent reports it from the index, marked as such; asked, it reads the keys.
    let fresh = ceph_ops(&c);
    let report = fresh.report().await.unwrap();
    let listed = report.images.iter().find(|i| i.image == hand).unwrap();
    assert!(listed.unverified, "{listed:?}");
    let probed = fresh
        .probe_images(&[spec(&c.pool, &hand)])
        .await
        .unwrap()
        .remove(0);
    assert!(!probed.unverified);
    assert_eq!(probed.metadata.managed_by(), None, "no keys: nobody's");
    let e = fresh
        .create_image(&spec(&c.pool, &hand), 64 * MIB, &[], &owner(&hand), None)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not created by unistor"), "{e}");
    assert!(rbd_meta(&c, &c.pool, &hand).is_empty(), "left untouched");
}

#[tokio::test]
async fn report_describes_the_cluster() {
    let c = cluster();
    let ceph = ceph_ops(&c);
    let name = unique("report");
    let (s, o) = (spec(&c.pool, &name), owner(&name));
    ceph.create_image(&s, 128 * MIB, &[], &o, None)
        .await
        .unwrap();
    let trashed = unique("report-trashed");
    let st = spec(&c.pool, &trashed);
    ceph.create_image(&st, 64 * MIB, &[], &owner(&trashed), None)
        .await
        .unwrap();
    ceph.trash_image(&st, 600, &owner(&trashed)).await.unwrap();

    let library_before = ceph.library_calls();
    let r = ceph.report().await.unwrap();
    // The monitors' `status` and `df` came over the library's connection, not as processes.
    assert!(ceph.library_calls() - library_before >= 2);
    assert_eq!(r.fsid, cli_ok(&c, "ceph", &["fsid"]).trim());
    assert!(
        ["HEALTH_OK", "HEALTH_WARN"].contains(&r.health.status.as_str()),
        "{:?}",
        r.health
    );
    assert!(
        r.monitors
            .iter()
            .any(|m| m.addrs.iter().any(|a| a.contains("127.0.0.1"))),
        "{:?}",
        r.monitors
    );
    assert!(r.capacity.total_bytes > 0 && r.capacity.avail_bytes <= r.capacity.total_bytes);
    let pool = r.pools.iter().find(|p| p.name == c.pool).unwrap();
    assert!(pool.rbd_enabled);
    let img = r
        .images
        .iter()
        .find(|i| i.image == name)
        .expect("managed image reported");
    assert_eq!(img.size_bytes, 128 * MIB);
    assert!(!img.in_use());
    assert_eq!(img.metadata["unistor.volume"], name);
    let t = r.images.iter().find(|i| i.image == trashed).unwrap();
    assert!(matches!(t.state, ImageState::Trashed { .. }), "{t:?}");
    // Images unistor does not manage are not listed.
    let foreign = unique("unlisted");
    cli_ok(
        &c,
        "rbd",
        &["create", "--size", "8M", &format!("{}/{foreign}", c.pool)],
    );
    let r = ceph.report().await.unwrap();
    assert!(!r.images.iter().any(|i| i.image == foreign));
}

/// A SNAP identity (named from `prefix`) issued on the test pool: its id, the checked id, the
/// pool, and what the agent answered.
async fn issued(
    ceph: &Ceph<ProcessRunner>,
    c: &Cluster,
    prefix: &str,
) -> (String, CephClientId, PoolName, protocol::CephIdentity) {
    let id = unique(prefix);
    let cid = CephClientId::parse("client_id", &id).unwrap();
    let pool = PoolName::parse("pool", &c.pool).unwrap();
    let ident = ceph
        .issue_identity(&cid, std::slice::from_ref(&pool))
        .await
        .unwrap();
    (id, cid, pool, ident)
}

/// Whether `rbd ls POOL` works as `ident` (its keyring written into `dir`).
fn lists_as<'a>(
    c: &'a Cluster,
    ident: &protocol::CephIdentity,
    dir: &tempfile::TempDir,
) -> impl Fn(&str) -> bool + 'a {
    let keyring = dir.path().join("keyring");
    std::fs::write(
        &keyring,
        format!("[{}]\n\tkey = {}\n", ident.entity, ident.key),
    )
    .unwrap();
    let id = ident
        .entity
        .strip_prefix("client.")
        .expect("a client entity")
        .to_string();
    move |pool: &str| {
        Command::new("rbd")
            .arg("--conf")
            .arg(&c.conf)
            .arg("--keyring")
            .arg(&keyring)
            .args(["--id", &id, "ls", pool])
            .stdin(Stdio::null())
            .output()
            .unwrap()
            .status
            .success()
    }
}

#[tokio::test]
async fn snap_identity_is_least_privilege() {
    let c = cluster();
    let ceph = ceph_ops(&c);
    let (id, cid, pool, ident) = issued(&ceph, &c, "snap").await;
    assert_eq!(ident.entity, format!("client.{id}"));
    assert_eq!(ident.caps["mon"], "profile rbd");
    assert_eq!(ident.caps["osd"], format!("profile rbd pool={}", c.pool));
    let got = json(&cli_ok(
        &c,
        "ceph",
        &["auth", "get", &ident.entity, "--format", "json"],
    ));
    assert_eq!(got[0]["key"].as_str(), Some(ident.key.as_str()));

    // The key works on its pool and nowhere else.
    let dir = tempfile::tempdir().unwrap();
    let as_snap = lists_as(&c, &ident, &dir);
    assert!(as_snap(&c.pool), "SNAP's key can use its pool");
    assert!(!as_snap(&c.pool2), "SNAP's key cannot use another pool");

    // Issuing again with more pools updates the caps and keeps the key.
    let pool2 = PoolName::parse("pool", &c.pool2).unwrap();
    let again = ceph.issue_identity(&cid, &[pool2, pool]).await.unwrap();
    assert_eq!(again.key, ident.key);
    let mut want = [c.pool.clone(), c.pool2.clone()];
    want.sort();
    assert_eq!(
        again.caps["osd"],
        format!("profile rbd pool={}, profile rbd pool={}", want[0], want[1])
    );
    assert!(as_snap(&c.pool2));
}

/// The report agrees with the cluster after a random mix of the agent's own mutations and
/// changes made behind its back with the rbd CLI, once the sweep has been over every image.
#[tokio::test]
async fn after_own_and_out_of_band_changes_the_report_agrees_with_the_cluster_once_swept() {
    let c = cluster();
    let ceph = Ceph::with_options(
        ProcessRunner::new(ProcessRunnerConfig {
            conf: Some(c.conf.clone()),
            keyring: Some(c.keyring.clone()),
            client_id: Some(c.id.clone()),
            timeout: Duration::from_secs(60),
            ..ProcessRunnerConfig::default()
        }),
        Some(&c.id),
        ceph_agent::ceph::ViewOptions {
            sweep_min_age: Duration::ZERO,
            ..Default::default()
        },
    );
    let seed = std::process::id() as u64;
    let mut rng = fastrand::Rng::with_seed(seed);
    let names: Vec<String> = (0..6).map(|i| unique(&format!("mix{i}"))).collect();
    let mut created: Vec<String> = vec![];
    for round in 0..24 {
        let name = &names[rng.usize(..names.len())];
        let s = spec(&c.pool, name);
        let o = owner(name);
        let live = rbd_info(&c, &c.pool, name);
        let what = rng.u8(..6);
        match (what, live.is_some(), created.contains(name)) {
            (0 | 1, false, _) => {
                ceph.create_image(&s, 64 * MIB, &[], &o, None)
                    .await
                    .unwrap();
                created.push(name.clone());
            }
            (2, true, true) => {
                // Refused when the image was re-tagged meanwhile; either way the report follows.
                let size = live.unwrap()["size"].as_u64().unwrap() + 32 * MIB;
                let _ = ceph.grow_image(&s, size, &o).await;
            }
            (3, true, true) => {
                // Behind the agent's back: grown with the CLI.
                let size = live.unwrap()["size"].as_u64().unwrap() / MIB + 16;
                cli_ok(
                    &c,
                    "rbd",
                    &[
                        "resize",
                        "--no-progress",
                        "--size",
                        &format!("{size}M"),
                        &format!("{}/{name}", c.pool),
                    ],
                );
            }
            (4, true, true) => {
                // Behind the agent's back: moved to the trash, or re-tagged.
                if rng.bool() {
                    cli_ok(&c, "rbd", &["trash", "mv", &format!("{}/{name}", c.pool)]);
                } else {
                    cli_ok(
                        &c,
                        "rbd",
                        &[
                            "image-meta",
                            "set",
                            &format!("{}/{name}", c.pool),
                            "unistor.volume",
                            "someone-else",
                        ],
                    );
                }
            }
            (5, false, true) => {
                let _ = ceph.restore_image(&s).await;
            }
            _ => {}
        }
        let _ = round;
    }
    // The sweep: pool listings, then every image once.
    ceph.refresh_pools().await.unwrap();
    let known = ceph.report().await.unwrap().images.len();
    for _ in 0..known {
        ceph.sweep_one().await.unwrap();
    }
    let report = ceph.report().await.unwrap();
    agrees_with_the_cluster(&c, &report, &created, seed);
    remove_what_it_made(&c, &created);
}

/// The report says of each image in `created` what the cluster says: live with its size and
/// volume tag, or trashed.
fn agrees_with_the_cluster(
    c: &Cluster,
    report: &protocol::CephReport,
    created: &[String],
    seed: u64,
) {
    for name in created {
        let got = report
            .images
            .iter()
            .find(|i| &i.image == name)
            .unwrap_or_else(|| panic!("seed {seed}: {name} missing from the report"));
        match rbd_info(c, &c.pool, name) {
            Some(info) => {
                assert_eq!(got.state, ImageState::Live, "seed {seed}: {name}");
                assert_eq!(
                    Some(got.size_bytes),
                    info["size"].as_u64(),
                    "seed {seed}: {name} size"
                );
                let meta = rbd_meta(c, &c.pool, name);
                assert_eq!(
                    got.metadata.get("unistor.volume"),
                    meta.get("unistor.volume"),
                    "seed {seed}: {name} volume tag"
                );
            }
            None => {
                let trashed = trash_names(c, &c.pool).contains(&name.to_string());
                assert_eq!(
                    matches!(got.state, ImageState::Trashed { .. }),
                    trashed,
                    "seed {seed}: {name} is {:?}",
                    got.state
                );
            }
        }
    }
}

/// Removes the images (live or trashed) and index entries named in `created`.
fn remove_what_it_made(c: &Cluster, created: &[String]) {
    for name in created {
        let _ = cli(
            c,
            "rbd",
            &["rm", "--no-progress", &format!("{}/{name}", c.pool)],
        );
        for t in trash_ids(c, &c.pool, name) {
            let _ = cli(c, "rbd", &["trash", "rm", "--pool", &c.pool, &t]);
        }
        let _ = cli(
            c,
            "rados",
            &["--pool", &c.pool, "rmomapkey", "unistor.index", name],
        );
    }
}

fn trash_ids(c: &Cluster, pool: &str, name: &str) -> Vec<String> {
    let out = cli_ok(c, "rbd", &["trash", "ls", "--format", "json", pool]);
    json(&out)
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["name"] == name)
        .map(|e| e["id"].as_str().unwrap().to_string())
        .collect()
}

/// The fence's crash window: an agent killed after it recorded the fence (`fencing`, with the
/// caps to restore) and revoked the caps, before the end. Run again, the fence resumes from the
/// record (the caps restored later are those recorded first, not the revoked ones); meanwhile
/// and after, the fenced identity is not issued again (a registration would give its caps
/// back). The unfence restores them, and the key works again.
#[tokio::test]
async fn an_interrupted_fence_resumes_from_its_record_and_is_undone() {
    let c = cluster();
    let ceph = ceph_ops(&c);
    let dpu = unique("dpu");
    let (id, cid, pool, ident) = issued(&ceph, &c, "snapf").await;
    let dir = tempfile::tempdir().unwrap();
    let lists = lists_as(&c, &ident, &dir);
    let as_snap = || lists(&c.pool);
    assert!(as_snap());

    // What a killed fence leaves: its record, `fencing`, and the caps already revoked.
    let record = protocol::FenceRecord {
        dpu: dpu.clone(),
        client_id: id.clone(),
        state: protocol::FenceState::Fencing,
        at_unix_ms: 1,
        by: "a controller that died".into(),
        reason: "agent silent".into(),
        caps_before: ident.caps.clone(),
        blocklisted: vec![],
    };
    cli_ok(
        &c,
        "ceph",
        &[
            "config-key",
            "set",
            &format!("unistor/fence/{dpu}"),
            &serde_json::to_string(&record).unwrap(),
        ],
    );
    cli_ok(
        &c,
        "ceph",
        &["auth", "caps", &ident.entity, "mon", "allow r"],
    );
    let fences = ceph.fences().await.unwrap();
    let mine = fences.iter().find(|f| f.dpu == dpu).expect("recorded");
    assert_eq!(mine.state, protocol::FenceState::Fencing);
    let refused = ceph
        .issue_identity(&cid, std::slice::from_ref(&pool))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("is fenced"), "{refused}");
    assert!(!as_snap(), "no OSD caps");

    let req = protocol::FenceRequest {
        dpu: dpu.clone(),
        client_id: id.clone(),
        by: "ops".into(),
        reason: "agent silent".into(),
    };
    let done = ceph.fence(&req).await.unwrap();
    assert_eq!(done.state, protocol::FenceState::Fenced);
    assert_eq!(done.caps_before, ident.caps, "the caps recorded first");
    assert_eq!(
        done.by, "a controller that died",
        "the record is resumed, not rewritten"
    );
    let report = ceph.report().await.unwrap();
    assert!(report
        .fences
        .iter()
        .any(|f| f.dpu == dpu && f.state == protocol::FenceState::Fenced));
    assert!(!as_snap());

    ceph.unfence(&protocol::UnfenceRequest {
        dpu: dpu.clone(),
        client_id: id.clone(),
    })
    .await
    .unwrap();
    assert!(ceph.fences().await.unwrap().iter().all(|f| f.dpu != dpu));
    let got = json(&cli_ok(
        &c,
        "ceph",
        &["auth", "get", &ident.entity, "--format", "json"],
    ));
    assert_eq!(
        got[0]["caps"]["osd"].as_str(),
        ident.caps.get("osd").map(String::as_str)
    );
    wait_until(Duration::from_secs(30), "the key to work again", as_snap);
    // Unfenced, it is issued again (a registration may go on).
    ceph.issue_identity(&cid, std::slice::from_ref(&pool))
        .await
        .unwrap();
    // An unfence of what is not fenced is nothing to do.
    ceph.unfence(&protocol::UnfenceRequest { dpu, client_id: id })
        .await
        .unwrap();
}
