//! The rails and the saved plan's fingerprint.

use super::rails::others;
use super::*;
use crate::plan::sim::World;

fn args() -> Rails {
    Rails {
        allow_delete: false,
        allow_empty: false,
        allow_in_use: false,
        max_removals: 5,
    }
}

#[test]
fn snaps_own_watch_is_not_in_use_but_anybody_elses_is() {
    let (desired, _) = converged();
    let mut cluster = desired.clusters.values().next().expect("a cluster").clone();
    cluster.snap_client = protocol::names::CephClientId::parse("c", "snap").unwrap();
    let w = protocol::ImageWatchers {
        pool: "rbd".into(),
        image: "a".into(),
        watchers: vec![
            "10.0.0.5:0/1".into(),
            "10.0.0.6:0/4".into(),
            "10.0.0.9:0/2".into(),
            "10.0.0.7:0/3".into(),
            "10.0.0.8:0/5".into(),
        ],
        clients: vec![
            "client.snap".into(),
            "client.snap.dpu-a".into(),
            "client.admin".into(),
            String::new(),
            "client.snapshot".into(),
        ],
    };
    assert_eq!(
        others(&w, Some(&cluster)),
        [
            "10.0.0.9:0/2 (client.admin)",
            "10.0.0.7:0/3",
            "10.0.0.8:0/5 (client.snapshot)"
        ],
        "SNAP's own (shared or per DPU) is expected; a known stranger, an unknown one and a \
         look-alike are not"
    );
    // Without a known SNAP identity (or entities), every watcher counts.
    assert_eq!(others(&w, None).len(), 5);
    let bare = protocol::ImageWatchers {
        clients: vec![],
        ..w
    };
    assert_eq!(others(&bare, Some(&cluster)).len(), 5);
    assert_eq!(
        cluster.snap_client_of("dpu-a").unwrap().as_str(),
        "snap.dpu-a"
    );
}

use crate::plan::sim::converged_examples as converged;

#[test]
fn the_empty_manifest_guard() {
    let (d, w) = converged();
    let empty = Desired {
        volumes: Default::default(),
        ..d
    };
    let p = plan::plan(&empty, &w.observed(), &Options::default());
    let e = check_rails(&p, &empty, &w.observed(), &args())
        .unwrap_err()
        .to_string();
    assert!(e.contains("--allow-empty"), "{e}");
    let a = Rails {
        allow_empty: true,
        allow_delete: true,
        ..args()
    };
    check_rails(&p, &empty, &w.observed(), &a).unwrap();
}

#[test]
fn the_deletion_budget() {
    let (d, w) = converged();
    let mut fewer = d.clone();
    fewer.volumes.retain(|k, _| k == "db-data");
    let p = plan::plan(&fewer, &w.observed(), &Options::default());
    let a = Rails {
        max_removals: 2,
        allow_delete: true,
        ..args()
    };
    let e = check_rails(&p, &fewer, &w.observed(), &a)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("removes 3 volumes") && e.contains("--max-removals"),
        "{e}"
    );
    check_rails(
        &p,
        &fewer,
        &w.observed(),
        &Rails {
            max_removals: 3,
            ..a
        },
    )
    .unwrap();
}

#[test]
fn deletes_need_the_flag_and_volumes_in_use_stay() {
    let (d, mut w) = converged();
    let mut fewer = d.clone();
    fewer.volumes.remove("scratch-b");
    let p = plan::plan(&fewer, &w.observed(), &Options::default());
    let e = check_rails(&p, &fewer, &w.observed(), &args())
        .unwrap_err()
        .to_string();
    assert!(e.contains("needs --allow-delete"), "{e}");
    let mut fewer = d.clone();
    fewer.volumes.remove("db-data");
    let img = w.image_named("ceph-lab", "db-data");
    img.watchers = Some(vec!["10.0.0.5:0/1234".into()]);
    let p = plan::plan(&fewer, &w.observed(), &Options::default());
    let e = check_rails(&p, &fewer, &w.observed(), &args())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("db-data is in use") && e.contains("--allow-in-use"),
        "{e}"
    );
}

#[test]
fn a_device_the_host_holds_open_or_a_controller_it_enabled_is_in_use() {
    use protocol::dpu::{HostController, HostDevice, HostUse};
    let (d, mut w) = converged();
    let device = |nsid, open| HostDevice {
        nsid,
        uuid: String::new(),
        size_bytes: 0,
        device: format!("/host/unistor-pf0-n{nsid}.nbd"),
        open,
    };
    w.dpus.get_mut("dpu-a").unwrap().host_use = Some(HostUse {
        controllers: vec![HostController {
            name: "unistor-pf0".into(),
            enabled: true,
            namespaces: vec![device(1, 1), device(2, 0)],
        }],
    });
    let without = |w: &World, names: &[&str]| {
        let mut fewer = d.clone();
        for n in names {
            fewer.volumes.remove(*n);
        }
        let p = plan::plan(&fewer, &w.observed(), &Options::default());
        (fewer, p)
    };
    // An idle device on a controller that stays: the host only sees it go.
    let (fewer, p) = without(&w, &["db-wal"]);
    check_rails(&p, &fewer, &w.observed(), &args()).unwrap();
    // The device the host holds open.
    let (fewer, p) = without(&w, &["db-data"]);
    let e = check_rails(&p, &fewer, &w.observed(), &args())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(
            "volume db-data is in use (the host of dpu dpu-a holds /host/unistor-pf0-n1.nbd open"
        ),
        "{e}"
    );
    let mut anyway = args();
    anyway.allow_in_use = true;
    check_rails(&p, &fewer, &w.observed(), &anyway).unwrap();
    // Both: the controller goes too, from under the host's driver.
    let (fewer, p) = without(&w, &["db-data", "db-wal"]);
    let e = check_rails(&p, &fewer, &w.observed(), &args())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("controller unistor-pf0 on dpu dpu-a is enabled by the host's driver (volumes db-data, db-wal)"),
        "{e}"
    );
    // A platform that cannot tell: only the images' watchers speak.
    w.dpus.get_mut("dpu-a").unwrap().host_use = None;
    let (fewer, p) = without(&w, &["db-data", "db-wal"]);
    check_rails(&p, &fewer, &w.observed(), &args()).unwrap();
}

#[test]
fn fingerprints_move_with_the_world_not_with_host_counters() {
    let (d, mut w) = converged();
    let before = fingerprint(&d, &w.observed());
    w.dpus.get_mut("dpu-a").unwrap().host.load = [9.0, 9.0, 9.0];
    assert_eq!(fingerprint(&d, &w.observed()), before);
    w.clusters.get_mut("ceph-lab").unwrap().images[0].size_bytes += 1 << 20;
    assert_ne!(fingerprint(&d, &w.observed()), before);
}

#[test]
fn a_document_moved_to_another_file_leaves_a_saved_plan_fresh() {
    let (d, w) = converged();
    let before = fingerprint(&d, &w.observed());
    let mut moved = d.clone();
    for v in moved.volumes.values_mut() {
        v.source.file = "elsewhere/all-volumes.yaml".into();
        v.source.line += 40;
        v.labels.insert("team".into(), "storage".into());
    }
    moved.dpus.get_mut("dpu-a").unwrap().source.line = 999;
    assert_eq!(fingerprint(&moved, &w.observed()), before);
    let mut grown = d.clone();
    grown.volumes.get_mut("db-data").unwrap().size_bytes += 1 << 30;
    assert_ne!(
        fingerprint(&grown, &w.observed()),
        before,
        "what it means counts"
    );
    let mut retargeted = d.clone();
    retargeted
        .volumes
        .get_mut("db-data")
        .unwrap()
        .deletion_policy = crate::manifest::DeletionPolicy::Delete;
    assert_ne!(fingerprint(&retargeted, &w.observed()), before);
}
