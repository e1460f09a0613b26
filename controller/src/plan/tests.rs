//! The planner against an in-memory model of the agents: applying a plan converges, a second
//! plan is empty, plans are deterministic, and nothing unistor does not own is ever removed.

use std::path::PathBuf;

use proptest::prelude::*;
use protocol::dpu::{BdevInfo, NamespaceInfo, SubsystemInfo};
use protocol::{Command, ImageState, ImageStatus};

use super::sim::World;
use super::*;
use crate::manifest::load_texts;

/// Every dependency comes earlier in the plan.
fn check_order(p: &Plan) {
    for s in &p.steps {
        assert!(s.depends_on.iter().all(|d| *d < s.id), "{s:?}");
    }
}

fn desired(files: &[(&str, String)]) -> Desired {
    let texts: Vec<(PathBuf, String)> = files
        .iter()
        .map(|(f, t)| (PathBuf::from(f), t.clone()))
        .collect();
    load_texts(&texts).unwrap_or_else(|e| panic!("{e:?}"))
}

use super::sim::examples;

#[test]
fn examples_converge_from_empty_in_one_pass_and_then_plan_nothing() {
    let d = examples();
    let mut w = World::empty(&d);
    let first = plan(&d, &w.observed(), &Options::default());
    // Order of the chain for one volume.
    let ops: Vec<&str> = first
        .steps
        .iter()
        .filter(|s| {
            s.volume.as_deref() == Some("db-data")
                || s.volume.is_none() && s.target == Target::Dpu("dpu-a".into())
        })
        .map(|s| match &s.action {
            Action::Send(Command::InstallSnap(_)) => "install",
            Action::Send(Command::CreateImage(_)) => "image",
            Action::RegisterCluster { .. } => "register",
            Action::Send(Command::CreateBdev(_)) => "bdev",
            Action::Send(Command::CreateSubsystem(_)) => "subsystem",
            Action::Send(Command::CreateNamespace(_)) => "namespace",
            Action::Send(Command::CreateController(_)) => "controller",
            Action::Send(Command::AttachNamespace(_)) => "attach",
            Action::Send(Command::ResumeController(_)) => "resume",
            _ => "other",
        })
        .collect();
    for (a, b) in [
        ("install", "register"),
        ("register", "bdev"),
        ("bdev", "namespace"),
        ("namespace", "attach"),
        ("controller", "attach"),
        ("attach", "resume"),
    ] {
        let pa = ops.iter().position(|o| *o == a).unwrap();
        let pb = ops.iter().position(|o| *o == b).unwrap();
        assert!(pa < pb, "{a} before {b} in {ops:?}");
    }
    assert!(
        first.steps.iter().all(|s| s.risk == Risk::Safe),
        "creating is safe"
    );
    assert_eq!(w.converge(&d, 5), 1, "one pass converges");
    // Stable: planning again and again gives nothing.
    assert!(plan(&d, &w.observed(), &Options::default()).is_empty());
}

#[test]
fn unknown_agents_are_never_treated_as_empty() {
    let d = examples();
    let mut w = World::empty(&d);
    w.converge(&d, 5);
    let mut o = w.observed();
    o.dpus.insert(
        "dpu-a".into(),
        Known::Unknown {
            reason: "connection refused".into(),
        },
    );
    o.clusters.insert(
        "ceph-lab".into(),
        Known::Unknown {
            reason: "timeout".into(),
        },
    );
    let p = plan(&d, &o, &Options::default());
    assert!(p.steps.is_empty(), "{:?}", p.steps);
    assert!(p
        .unknown
        .iter()
        .any(|u| u.contains("dpu/dpu-a: connection refused")));
    // Even with an empty manifest set, an unknown DPU's objects are not torn down.
    let p = plan(&Desired::default(), &o, &Options::default());
    assert!(!p
        .steps
        .iter()
        .any(|s| s.target == Target::Dpu("dpu-a".into())));
}

/// The examples converged, and the examples with db-wal moved from dpu-a (host-a) to dpu-b.
fn db_wal_moved_to_dpu_b() -> (Desired, World, Desired) {
    let d = examples();
    let mut w = World::empty(&d);
    w.converge(&d, 5);
    let mut moved = d.clone();
    let v = moved.volumes.get_mut("db-wal").unwrap();
    v.host = "host-b".into();
    v.dpu = "dpu-b".into();
    (d, w, moved)
}

/// One image is never open on two DPUs: a volume moved off a DPU that does not report is held
/// with the reason; off one that reports, its new bdev waits for every removal on the old one.
#[test]
fn a_moved_volume_is_never_exposed_by_two_dpus() {
    let (_, w, moved) = db_wal_moved_to_dpu_b();
    let creates_bdev_on_b = |p: &Plan| {
        p.steps
            .iter()
            .find(|s| {
                s.target == Target::Dpu("dpu-b".into())
                    && matches!(&s.action, Action::Send(Command::CreateBdev(b)) if b.image.as_str() == "db-wal")
            })
            .cloned()
    };

    // dpu-a silent (its SNAP may still serve host-a): nothing of db-wal is made on dpu-b.
    let mut o = w.observed();
    o.dpus.insert(
        "dpu-a".into(),
        Known::Unknown {
            reason: "connection refused".into(),
        },
    );
    let p = plan(&moved, &o, &Options::default());
    assert!(creates_bdev_on_b(&p).is_none(), "{:#?}", p.steps);
    let held = p
        .blocked
        .iter()
        .find(|b| b.object == "volume/db-wal")
        .expect("db-wal is held");
    for part in ["dpu/dpu-a is not reporting", "never open on two DPUs"] {
        assert!(held.reason.contains(part), "{part}: {}", held.reason);
    }
    // A volume whose image this plan creates is nobody's yet: not held.
    let mut fresh = moved.clone();
    let f = fresh.volumes.get_mut("db-wal").unwrap();
    f.image = protocol::names::ImageName::parse("i", "db-wal-new").unwrap();
    assert!(plan(&fresh, &o, &Options::default())
        .blocked
        .iter()
        .all(|b| b.object != "volume/db-wal"));

    // dpu-a reports: its removals of db-wal come first, the new bdev waits for each of them.
    let p = plan(&moved, &w.observed(), &Options::default());
    let create = creates_bdev_on_b(&p).expect("created on dpu-b");
    let delete = p
        .steps
        .iter()
        .find(|s| {
            s.target == Target::Dpu("dpu-a".into())
                && matches!(s.action, Action::Send(Command::DeleteBdev(_)))
        })
        .expect("dpu-a lets its bdev go");
    assert!(
        create.depends_on.contains(&delete.id),
        "{create:?} waits for {delete:?}"
    );
    // Applied in any order its dependencies allow, with the simulator's invariant.
    for seed in 1..20 {
        let mut w = w.clone();
        w.converge_shuffled(&moved, 5, seed);
    }
}

/// A silent DPU fenced off the volume's cluster no longer holds the move back; a fence still in
/// progress (`fencing`) does; and nothing is exposed on a fenced DPU.
#[test]
fn a_fenced_dpu_lets_its_volumes_go_and_gets_none() {
    let (d, w, moved) = db_wal_moved_to_dpu_b();
    let cluster = moved.volumes["db-wal"].cluster.clone();
    let bdev_on = |p: &Plan, dpu: &str| {
        p.steps.iter().any(|s| {
            s.target == Target::Dpu(dpu.into())
                && matches!(&s.action, Action::Send(Command::CreateBdev(b)) if b.image.as_str() == "db-wal")
        })
    };
    let fenced = |o: &mut Observed, dpu: &str, state| {
        let Some(Known::Known { report }) = o.clusters.get_mut(&cluster) else {
            panic!("the cluster is known")
        };
        std::sync::Arc::make_mut(report).fences = vec![protocol::FenceRecord {
            dpu: dpu.into(),
            client_id: format!("snap.{dpu}"),
            state,
            at_unix_ms: 1,
            by: "ops".into(),
            reason: "dead".into(),
            caps_before: Default::default(),
            blocklisted: vec!["10.0.0.1:0/7".into()],
        }];
    };
    let mut o = w.observed();
    o.dpus.insert(
        "dpu-a".into(),
        Known::Unknown {
            reason: "connection refused".into(),
        },
    );
    fenced(&mut o, "dpu-a", protocol::FenceState::Fencing);
    assert!(
        !bdev_on(&plan(&moved, &o, &Options::default()), "dpu-b"),
        "half a fence is none"
    );
    fenced(&mut o, "dpu-a", protocol::FenceState::Fenced);
    let p = plan(&moved, &o, &Options::default());
    assert!(bdev_on(&p, "dpu-b"), "{:#?} {:#?}", p.steps, p.blocked);

    // The volume back to dpu-a, fenced and reporting again: nothing made there.
    let mut back = moved.clone();
    let v = back.volumes.get_mut("db-wal").unwrap();
    v.host = "host-a".into();
    v.dpu = "dpu-a".into();
    let mut w2 = World::empty(&d);
    w2.converge(&moved, 5);
    let mut o = w2.observed();
    fenced(&mut o, "dpu-a", protocol::FenceState::Fenced);
    let p = plan(&back, &o, &Options::default());
    assert!(!bdev_on(&p, "dpu-a"), "{:#?}", p.steps);
    let held = p
        .blocked
        .iter()
        .find(|b| b.object == "volume/db-wal")
        .expect("held");
    assert!(
        held.reason.contains("is fenced off cluster"),
        "{}",
        held.reason
    );
}

#[test]
fn a_wanted_volume_held_back_keeps_its_image_while_a_gone_one_loses_its() {
    // Every image is to be deleted with its volume.
    let d = examples();
    let mut w = World::empty(&d);
    w.converge(&d, 5);
    for img in &mut w.clusters.get_mut("ceph-lab").unwrap().images {
        img.metadata.insert(META_POLICY.into(), "Delete".into());
    }
    // scratch-b is gone from the manifests; logs-c is still wanted, but its DPU is unknown, so
    // its chain is not planned and its image is not found through it: the name decides.
    let mut fewer = d.clone();
    fewer.volumes.remove("scratch-b");
    let mut o = w.observed();
    o.dpus.insert(
        "dpu-c".into(),
        Known::Unknown {
            reason: "connection refused".into(),
        },
    );
    for threads in [1, 4] {
        let p = plan(
            &fewer,
            &o,
            &Options {
                threads,
                ..Options::default()
            },
        );
        check_order(&p);
        let deleted: Vec<&str> = p
            .steps
            .iter()
            .filter_map(|s| match &s.action {
                Action::Send(
                    Command::DeleteImage(protocol::DeleteImage { owner, .. })
                    | Command::TrashImage(protocol::TrashImage { owner, .. }),
                ) => Some(owner.volume.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(deleted, ["scratch-b"], "{threads} threads");
        assert!(p.blocked.iter().any(|b| b.object == "volume/logs-c"));
    }
}

#[test]
fn growing_and_refusing_to_shrink() {
    let d = examples();
    let mut w = World::empty(&d);
    w.converge(&d, 5);
    let mut bigger = d.clone();
    bigger.volumes.get_mut("db-wal").unwrap().size_bytes = 1 << 30;
    let p = plan(&bigger, &w.observed(), &Options::default());
    // The image grows, then the bdev follows so that the host sees the new size.
    assert_eq!(p.steps.len(), 2, "{:?}", p.steps);
    assert!(
        matches!(p.steps[0].action, Action::GrowImage { ref grow, .. } if grow.size_bytes == 1 << 30)
    );
    assert!(
        matches!(&p.steps[1].action, Action::Send(Command::ResizeBdev(protocol::dpu::BdevResize { name, new_size_mib: 1024 })) if name == "unistor-db-wal")
    );
    assert_eq!(p.steps[1].depends_on.as_slice(), [p.steps[0].id]);
    for field in ["size", "bdev.size"] {
        assert!(p
            .drift
            .iter()
            .any(|x| x.object == "volume/db-wal" && x.field == field));
    }
    // A bdev that did not follow an image grown earlier is grown alone; the plan is empty only
    // once the host's view has the new size.
    let mut grown = w.clone();
    grown.apply(&p.steps[0], &Options::default().owner);
    let p2 = plan(&bigger, &grown.observed(), &Options::default());
    assert_eq!(p2.steps.len(), 1, "{:?}", p2.steps);
    assert!(matches!(
        p2.steps[0].action,
        Action::Send(Command::ResizeBdev(_))
    ));
    grown.apply(&p2.steps[0], &Options::default().owner);
    assert!(plan(&bigger, &grown.observed(), &Options::default())
        .steps
        .is_empty());
    let mut smaller = d.clone();
    smaller.volumes.get_mut("db-wal").unwrap().size_bytes = 256 << 20;
    let p = plan(&smaller, &w.observed(), &Options::default());
    assert!(p.steps.is_empty());
    assert!(p
        .blocked
        .iter()
        .any(|b| b.object == "volume/db-wal" && b.reason.contains("shrinking")));
    // Held back leads the text, and "No changes" is not said of it.
    let text = crate::render::human(&p);
    assert!(
        text.starts_with("Held back (1):\n  ! volume/db-wal: shrinking"),
        "{text}"
    );
    assert!(!text.contains("No changes"), "{text}");
}

#[test]
fn removal_follows_the_policy_written_on_the_image() {
    let d = examples();
    let mut w = World::empty(&d);
    w.converge(&d, 5);
    // The policies, as the executor writes them on the images.
    for (v, policy) in [("logs-c", "Trash"), ("scratch-b", "Delete")] {
        let c = w.clusters.get_mut("ceph-lab").unwrap();
        let img = c
            .images
            .iter_mut()
            .find(|i| i.metadata[META_VOLUME] == v)
            .unwrap();
        img.metadata.insert(META_POLICY.into(), policy.into());
        img.metadata.insert(META_RETENTION.into(), "259200".into());
    }
    let mut fewer = d.clone();
    for v in ["db-data", "logs-c", "scratch-b"] {
        fewer.volumes.remove(v);
    }
    let p = plan(&fewer, &w.observed(), &Options::default());
    check_order(&p);
    let has = |f: &dyn Fn(&Action) -> bool| p.steps.iter().any(|s| f(&s.action));
    assert!(has(
        &|a| matches!(a, Action::Send(Command::TrashImage(protocol::TrashImage { image, retain_secs: 259200, .. })) if image == "logs-c")
    ));
    assert!(has(
        &|a| matches!(a, Action::Send(Command::DeleteImage(protocol::DeleteImage { image, .. })) if image == "scratch-host-b")
    ));
    assert!(
        !has(
            &|a| matches!(a, Action::Send(Command::TrashImage(protocol::TrashImage { image, .. }) | Command::DeleteImage(protocol::DeleteImage { image, .. })) if image == "db-data")
        ),
        "Retain keeps the image"
    );
    assert!(has(&|a| matches!(
        a,
        Action::Send(Command::DetachNamespace(_))
    )));
    // db-wal stays on host-a's PF0 controller, which therefore stays.
    assert!(!p
        .steps
        .iter()
        .any(|s| s.target == Target::Dpu("dpu-a".into())
            && matches!(&s.action, Action::Send(Command::DestroyController(_)))));
    for s in &p.steps {
        if let Action::Send(Command::DeleteImage(_) | Command::TrashImage(_)) = s.action {
            assert_eq!(s.risk, Risk::DataDestroying);
            assert!(
                !s.depends_on.is_empty(),
                "the image goes after its namespace"
            );
        }
    }
    w.converge(&fewer, 5);
    let imgs = &w.clusters["ceph-lab"].images;
    assert!(imgs
        .iter()
        .any(|i| i.image == "db-data" && i.state == ImageState::Live));
    assert!(!imgs.iter().any(|i| i.image == "scratch-host-b"));
}

#[test]
fn nsids_are_derived_stably_and_adopted() {
    let d = examples();
    let mut w = World::empty(&d);
    w.converge(&d, 5);
    let nsid_of = |w: &World, volume: &str| -> u32 {
        let bdev = names::bdev(volume);
        w.dpus
            .values()
            .filter_map(|r| r.inventory.as_ref())
            .flat_map(|i| &i.subsystems)
            .flat_map(|s| &s.namespaces)
            .find(|n| n.bdev == bdev)
            .unwrap()
            .nsid
    };
    let logs = nsid_of(&w, "logs-c");
    // A volume added later does not move an existing one.
    let extra = "apiVersion: unistor.io/v1alpha1\nkind: Volume\nmetadata: {name: added}\nspec:\n  host: host-c\n  size: 1Gi\n  rbd: {cluster: ceph-lab, pool: rbd}\n".to_string();
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/lab");
    let mut files: Vec<(&str, String)> = ["ceph.yaml", "dpus.yaml", "volumes.yaml"]
        .iter()
        .map(|f| (*f, std::fs::read_to_string(dir.join(f)).unwrap()))
        .collect();
    files.push(("added.yaml", extra));
    let more = desired(&files);
    w.converge(&more, 5);
    assert_eq!(nsid_of(&w, "logs-c"), logs);
    assert_ne!(nsid_of(&w, "added"), logs);
}

#[test]
fn foreign_snap_objects_and_images_are_never_touched() {
    let d = examples();
    let mut w = World::empty(&d);
    w.converge(&d, 5);
    let inv = w.inv("dpu-b");
    inv.bdevs.push(BdevInfo {
        name: "someone-elses".into(),
        pool: Some("rbd".into()),
        image: Some("x".into()),
        cluster: None,
        block_size: 512,
        num_blocks: 1,
        qos: Default::default(),
    });
    inv.subsystems.push(SubsystemInfo {
        nqn: "nqn.2016-06.io.spdk:other".into(),
        serial: "s".into(),
        model: "m".into(),
        namespaces: vec![NamespaceInfo {
            nsid: 1,
            bdev: "someone-elses".into(),
            uuid: "u".into(),
            controller: None,
        }],
    });
    w.clusters
        .get_mut("ceph-lab")
        .unwrap()
        .images
        .push(ImageStatus {
            pool: "rbd".into(),
            image: "foreign".into(),
            state: ImageState::Live,
            size_bytes: 1,
            features: vec![],
            watchers: None,
            metadata: [
                (
                    META_MANAGED_BY.to_string(),
                    "another-deployment".to_string(),
                ),
                (META_VOLUME.to_string(), "gone".to_string()),
                (META_POLICY.to_string(), "Delete".to_string()),
            ]
            .into(),
            unverified: false,
            parent: None,
            clone_depth: None,
            snapshots: vec![],
        });
    // Even the empty manifest set removes nothing foreign.
    let p = plan(&Desired::default(), &w.observed(), &Options::default());
    for s in &p.steps {
        let text = format!("{:?}", s.action);
        assert!(
            !text.contains("someone-elses")
                && !text.contains("io.spdk:other")
                && !text.contains("foreign"),
            "{text}"
        );
    }
}

#[test]
fn two_deployments_on_one_dpu_leave_each_other_alone() {
    // Deployment "unistor" converges the examples; "team-b" then plans for a manifest set that
    // names the same DPUs and clusters but none of those volumes.
    let d = examples();
    let mut w = World::empty(&d);
    w.converge(&d, 5);
    let other = Desired {
        volumes: Default::default(),
        ..d.clone()
    };
    let b = Options {
        owner: "team-b".into(),
        ..Options::default()
    };
    let p = plan(&other, &w.observed(), &b);
    assert!(
        p.steps.is_empty(),
        "team-b may not tear down unistor's volumes: {}",
        crate::render::human(&p)
    );
    // The SNAP objects of a volume whose image cannot be seen are left, and said so.
    let mut blind = w.observed();
    blind.clusters.insert(
        "ceph-lab".into(),
        Known::Unknown {
            reason: "down".into(),
        },
    );
    let mut fewer = d.clone();
    fewer.volumes.remove("logs-c");
    let p = plan(&fewer, &blind, &Options::default());
    assert!(p.steps.is_empty(), "{}", crate::render::human(&p));
    assert!(
        p.blocked.iter().any(
            |x| x.reason.contains("unistor-logs-c") && x.reason.contains("cannot be confirmed")
        ),
        "{:?}",
        p.blocked
    );
    // Its owner still removes it.
    let p = plan(&fewer, &w.observed(), &Options::default());
    assert!(p
        .steps
        .iter()
        .any(|s| matches!(&s.action, Action::Send(Command::DeleteBdev(protocol::dpu::NameRef { name })) if name == "unistor-logs-c")));
}

fn arb_volumes() -> impl Strategy<Value = Vec<(u8, u32, Option<u8>, bool, u16)>> {
    // (host index, size in MiB, vf, pinned nsid?, nsid)
    proptest::collection::vec(
        (
            0u8..3,
            1u32..4096,
            proptest::option::of(0u8..4),
            any::<bool>(),
            1u16..200,
        ),
        0..12,
    )
}

fn fleet(vols: &[(u8, u32, Option<u8>, bool, u16)]) -> Option<Desired> {
    let mut text = String::from(
        "apiVersion: unistor.io/v1alpha1\nkind: CephCluster\nmetadata: {name: c}\nspec:\n  agent: {name: ceph-1, address: 127.0.0.1:1}\n  pools: [rbd]\n  snapIdentity: {clientId: snap}\n",
    );
    for h in 0..3 {
        text.push_str(&format!(
            "---\napiVersion: unistor.io/v1alpha1\nkind: Dpu\nmetadata: {{name: dpu-{h}}}\nspec:\n  agent: {{name: dpu-{h}, address: 127.0.0.1:2}}\n  host: host-{h}\n  snap: {{version: '4.5', functions: {{pfs: 1, vfsPerPf: 4}}}}\n"
        ));
    }
    let mut slots = std::collections::BTreeSet::new();
    for (i, (h, size, vf, pin, nsid)) in vols.iter().enumerate() {
        let vf = vf.map(|v| format!(", vf: {v}")).unwrap_or_default();
        let nsid = if *pin {
            if !slots.insert((*h, vf.clone(), *nsid)) {
                return None;
            }
            format!(", nsid: {nsid}")
        } else {
            String::new()
        };
        text.push_str(&format!(
            "---\napiVersion: unistor.io/v1alpha1\nkind: Volume\nmetadata: {{name: v{i}}}\nspec:\n  host: host-{h}\n  size: {size}Mi\n  rbd: {{cluster: c, pool: rbd}}\n  nvme: {{pf: 0{vf}{nsid}}}\n"
        ));
    }
    Some(desired(&[("fleet.yaml", text)]))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_fleet_converges_deterministically(vols in arb_volumes(), keep in proptest::collection::vec(any::<bool>(), 12), seed in any::<u64>()) {
        let Some(d) = fleet(&vols) else { return Ok(()) };
        let mut w = World::empty(&d);
        let o = w.observed();
        prop_assert_eq!(plan(&d, &o, &Options::default()), plan(&d, &o, &Options::default()));
        // Steps in any order their dependencies allow, as the executor may run them.
        w.converge_shuffled(&d, 5, seed);
        prop_assert!(plan(&d, &w.observed(), &Options::default()).is_empty());
        // Every desired volume is exposed: namespace attached to a started controller.
        for v in d.volumes.values() {
            let inv = w.dpus[&v.dpu].inventory.as_ref().unwrap();
            let bdev = names::bdev(v.name.as_str());
            let ns = inv.subsystems.iter().flat_map(|s| &s.namespaces).find(|n| n.bdev == bdev);
            let ns = ns.expect("namespace exists");
            prop_assert_eq!(&ns.uuid, &v.uuid);
            let c = inv.controllers.iter().find(|c| Some(&c.name) == ns.controller.as_ref()).expect("attached");
            prop_assert_eq!(c.state.as_str(), "STARTED");
        }
        // Then a random subset goes away: it converges again, and images are retained.
        let subset: Vec<_> = vols.iter().enumerate().filter(|(i, _)| keep[*i]).map(|(_, v)| *v).collect();
        if let Some(d2) = fleet(&subset) {
            let images_before = w.clusters["c"].images.len();
            w.converge_shuffled(&d2, 5, seed.rotate_left(17));
            prop_assert_eq!(w.clusters["c"].images.len(), images_before, "Retain is the default");
        }
    }
}

/// Compares `actual` with a golden file; `UNISTOR_UPDATE_GOLDEN=1` rewrites it.
fn golden(name: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("UNISTOR_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (UNISTOR_UPDATE_GOLDEN=1 writes it)",
            path.display()
        )
    });
    assert_eq!(
        actual,
        want,
        "{} differs (UNISTOR_UPDATE_GOLDEN=1 rewrites it)",
        path.display()
    );
}

#[test]
fn golden_plans() {
    let d = examples();
    let mut w = World::empty(&d);
    let from_empty = plan(&d, &w.observed(), &Options::default());
    golden(
        "examples-from-empty.txt",
        &crate::render::human(&from_empty),
    );
    let json = serde_json::to_string_pretty(&from_empty).unwrap() + "\n";
    golden("examples-from-empty.json", &json);
    // `Action::op` spells each action as a saved plan does.
    let saved: serde_json::Value = serde_json::from_str(&json).unwrap();
    for (s, v) in from_empty
        .steps
        .iter()
        .zip(saved["steps"].as_array().unwrap())
    {
        assert_eq!(v["action"]["op"], s.action.op());
    }
    // A saved plan reads back as the same plan (`apply --plan`).
    let back: Plan = serde_json::from_str(&json).unwrap();
    assert_eq!(back, from_empty);
    w.converge(&d, 5);
    let mut changed = d.clone();
    changed.volumes.remove("logs-c");
    changed.volumes.get_mut("db-wal").unwrap().size_bytes = 1 << 30;
    let p = plan(&changed, &w.observed(), &Options::default());
    golden("examples-changed.txt", &crate::render::human(&p));
    golden(
        "examples-changed.json",
        &(serde_json::to_string_pretty(&p).unwrap() + "\n"),
    );
}

#[test]
fn the_examples_converge_and_change_in_any_order_their_dependencies_allow() {
    let d = examples();
    let mut changed = d.clone();
    changed.volumes.remove("logs-c");
    changed.volumes.remove("scratch-b");
    changed.volumes.get_mut("db-wal").unwrap().size_bytes = 1 << 30;
    for seed in 0..300u64 {
        let mut w = World::empty(&d);
        w.converge_shuffled(&d, 5, seed);
        w.converge_shuffled(&changed, 5, seed ^ 0x9e37_79b9);
        assert!(plan(&changed, &w.observed(), &Options::default()).is_empty());
        // And back: what was removed comes again.
        w.converge_shuffled(&d, 5, seed.wrapping_mul(31));
    }
}

#[test]
fn a_forgotten_dependency_is_caught_by_some_order() {
    // The check itself can fail: drop every edge of a plan from empty, and some order applies
    // a step before what it needs.
    let d = examples();
    let w = World::empty(&d);
    let mut p = plan(&d, &w.observed(), &Options::default());
    for s in &mut p.steps {
        s.depends_on.clear();
    }
    let caught = (0..50u64).any(|seed| {
        let mut w = World::empty(&d);
        let mut rng = seed | 1;
        let order = crate::plan::sim::random_topological_order(&p.steps, &mut rng);
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            for i in order {
                w.apply(&p.steps[i], &Options::default().owner);
            }
        }))
        .is_err()
    });
    assert!(caught, "no order broke a plan without dependencies");
}

#[test]
fn an_unknown_deletion_policy_on_an_image_is_reported_never_taken_for_retain() {
    let d = examples();
    let mut w = World::empty(&d);
    w.converge(&d, 5);
    w.image_named("ceph-lab", "logs-c")
        .metadata
        .insert(META_POLICY.into(), "Trsh".into());
    let mut fewer = d.clone();
    fewer.volumes.remove("logs-c");
    let p = plan(&fewer, &w.observed(), &Options::default());
    assert!(
        !p.steps.iter().any(|s| matches!(
            s.action,
            Action::Send(Command::TrashImage(_) | Command::DeleteImage(_))
        )),
        "{:?}",
        p.steps
    );
    assert!(
        p.blocked.iter().any(|b| b.object == "volume/logs-c"
            && b.reason.contains("\"Trsh\" is not Retain, Trash or Delete")),
        "{:?}",
        p.blocked
    );
    // Its SNAP objects still go: the host-side teardown does not depend on the policy.
    assert!(p
        .steps
        .iter()
        .any(|s| matches!(&s.action, Action::Send(Command::DeleteBdev(protocol::dpu::NameRef { name })) if name == "unistor-logs-c")));
}

/// A cluster in HEALTH_ERR (or with a gated check) gets no write: images are neither created,
/// grown, nor trashed, and the plan says why; what needs no write to it goes on. Off, it plans.
#[test]
fn the_health_gate_holds_every_write_to_a_failing_cluster() {
    let d = examples();
    let mut w = World::empty(&d);
    w.converge(&d, 5);
    let cluster = d.clusters.keys().next().unwrap().clone();
    let mut changed = d.clone();
    changed.volumes.get_mut("db-wal").unwrap().size_bytes = 1 << 30;
    let gone = changed
        .volumes
        .iter()
        .find(|(_, v)| v.deletion_policy != protocol::meta::DeletionPolicy::Retain)
        .map(|(n, _)| n.clone())
        .expect("an example volume that is not retained");
    changed.volumes.remove(&gone);
    let mut failing = w.clone();
    let report = failing.clusters.get_mut(&cluster).unwrap();
    report.health.status = "HEALTH_ERR".into();
    report.health.checks.insert(
        "OSD_OUT_OF_ORDER_FULL".into(),
        "full ratio(s) out of order".into(),
    );
    let p = plan(&changed, &failing.observed(), &Options::default());
    assert!(
        p.steps.iter().all(|s| matches!(s.target, Target::Dpu(_))
            && !matches!(s.action, Action::Send(Command::ResizeBdev(_)))),
        "no write to the cluster: {}",
        crate::render::human(&p)
    );
    // The removed volume's SNAP objects go (no write to Ceph); its image stays, said so.
    assert!(p
        .steps
        .iter()
        .any(|s| s.volume.as_deref() == Some(gone.as_str())));
    for object in ["volume/db-wal".to_string(), format!("volume/{gone}")] {
        assert!(
            p.blocked.iter().any(|b| b.object == object
                && b.reason.contains("health gate")
                && b.reason.contains("OSD_OUT_OF_ORDER_FULL")),
            "{object} held with the reason: {:?}",
            p.blocked
        );
    }
    // Off, the same world plans the writes.
    let off = Options {
        health_gate: HealthGate::off(),
        ..Options::default()
    };
    let p = plan(&changed, &failing.observed(), &off);
    assert!(p
        .steps
        .iter()
        .any(|s| matches!(s.action, Action::GrowImage { .. })));
    assert!(p.blocked.is_empty(), "{:?}", p.blocked);
    // A gated check halts whatever the overall status; an unlisted warning does not.
    let mut near = w.clone();
    let report = near.clusters.get_mut(&cluster).unwrap();
    report.health.status = "HEALTH_WARN".into();
    report
        .health
        .checks
        .insert("OSD_NEARFULL".into(), "1 nearfull osd(s)".into());
    let strict = Options {
        health_gate: HealthGate::parse("HEALTH_ERR,OSD_NEARFULL").unwrap(),
        ..Options::default()
    };
    assert!(!plan(&changed, &near.observed(), &strict).blocked.is_empty());
    let standard = plan(&changed, &near.observed(), &Options::default());
    assert!(standard
        .steps
        .iter()
        .any(|s| matches!(s.action, Action::GrowImage { .. })));
    assert!(HealthGate::parse("osd full").is_err());
}

/// 300 DPUs with two volumes each; `changed` moves, removes, grows and adds some.
fn wide_fleet(changed: bool) -> Desired {
    let mut text = String::from(
        "apiVersion: unistor.io/v1alpha1\nkind: CephCluster\nmetadata: {name: c}\nspec:\n  agent: {name: ceph-1, address: 127.0.0.1:1}\n  pools: [rbd]\n  snapIdentity: {clientId: snap}\n",
    );
    let dpus = 300;
    for h in 0..dpus {
        text.push_str(&format!(
            "---\napiVersion: unistor.io/v1alpha1\nkind: Dpu\nmetadata: {{name: dpu-{h}}}\nspec:\n  agent: {{name: dpu-{h}, address: 127.0.0.1:2}}\n  host: host-{h}\n  snap: {{version: '4.5', functions: {{pfs: 1, vfsPerPf: 4}}}}\n"
        ));
    }
    for i in 0..dpus * 2 {
        let mut host = i / 2;
        let mut size = 64;
        if changed {
            match i % 10 {
                // Gone, its image deleted.
                0 => continue,
                // Moved to the next DPU.
                3 => host = (host + 1) % dpus,
                // Grown.
                5 => size = 128,
                _ => {}
            }
        }
        text.push_str(&format!(
            "---\napiVersion: unistor.io/v1alpha1\nkind: Volume\nmetadata: {{name: v{i}}}\nspec:\n  host: host-{host}\n  size: {size}Mi\n  deletionPolicy: Delete\n  rbd: {{cluster: c, pool: rbd}}\n  nvme: {{pf: 0, vf: {}}}\n",
            i % 4
        ));
    }
    if changed {
        for h in (0..dpus).step_by(7) {
            text.push_str(&format!(
                "---\napiVersion: unistor.io/v1alpha1\nkind: Volume\nmetadata: {{name: new{h}}}\nspec:\n  host: host-{h}\n  size: 64Mi\n  rbd: {{cluster: c, pool: rbd}}\n  nvme: {{pf: 0}}\n"
            ));
        }
    }
    desired(&[("wide.yaml", text)])
}

#[test]
fn a_plan_made_on_many_threads_is_the_plan_made_on_one() {
    // Wide enough that every per-DPU phase is cut into chunks planned on their own threads.
    let before = wide_fleet(false);
    let mut w = World::empty(&before);
    w.converge(&before, 3);
    let after = wide_fleet(true);
    let o = w.observed();
    let one = Options {
        threads: 1,
        ..Options::default()
    };
    let p = plan(&after, &o, &one);
    check_order(&p);
    // Every phase has work: removals, images deleted and grown, new chains.
    for kind in [
        "destroy_namespace",
        "delete_bdev",
        "delete_image",
        "grow_image",
        "create_image",
        "create_namespace",
        "attach_namespace",
        "resume_controller",
    ] {
        let n = p
            .steps
            .iter()
            .filter(|s| serde_json::to_value(&s.action).unwrap()["op"] == kind)
            .count();
        assert!(n > 10, "{kind}: {n} steps");
    }
    for threads in [2, 3, 8] {
        let many = Options {
            threads,
            ..Options::default()
        };
        assert_eq!(plan(&after, &o, &many), p, "{threads} threads");
    }
    // And the fleet converges from the plan made on many threads.
    let mut w2 = w.clone();
    let many = Options {
        threads: 4,
        ..Options::default()
    };
    for s in &plan(&after, &o, &many).steps {
        w2.apply(s, &many.owner);
    }
    assert!(plan(&after, &w2.observed(), &many).is_empty());
}

/// `d` with one more volume `name` (db-wal's spec, 1 GiB, NSID derived) on image `image`.
fn one_more_volume(d: &Desired, name: &str, image: &str) -> (Desired, crate::manifest::Volume) {
    let mut new = d.volumes["db-wal"].clone();
    new.name = protocol::names::VolumeName::parse("v", name).unwrap();
    new.image = protocol::names::ImageName::parse("i", image).unwrap();
    new.size_bytes = 1 << 30;
    new.nsid = None;
    new.uuid = crate::manifest::derived_uuid(&new.cluster, new.pool.as_str(), image);
    let mut wanted = d.clone();
    wanted.volumes.insert(name.into(), new.clone());
    (wanted, new)
}

/// What `w` shows, with `img` added to cluster `cluster`'s report.
fn observed_with(w: &World, cluster: &str, img: protocol::ImageStatus) -> Observed {
    let mut o = w.observed();
    let Known::Known { report } = o.clusters.get_mut(cluster).unwrap() else {
        unreachable!()
    };
    std::sync::Arc::make_mut(report).images.push(img);
    o
}

/// The pool's index records intent; only the image's own keys make it unistor's. An image the
/// report holds from the index alone (its agent just started) gets no bdev until it is read:
/// held, and listed for the probe; read with unistor's keys it is exposed, read without them
/// it is not owned.
#[test]
fn an_image_known_from_the_index_alone_is_exposed_only_once_its_keys_are_read() {
    let d = examples();
    let mut w = World::empty(&d);
    w.converge(&d, 5);
    let (wanted, new) = one_more_volume(&d, "indexed", "indexed-img");
    let image = |unverified: bool, keys: bool| protocol::ImageStatus {
        pool: new.pool.to_string(),
        image: new.image.to_string(),
        state: protocol::ImageState::Live,
        size_bytes: new.size_bytes,
        features: vec![],
        watchers: None,
        metadata: if keys {
            [
                (META_MANAGED_BY.to_string(), "unistor".to_string()),
                (META_VOLUME.to_string(), "indexed".to_string()),
            ]
            .into()
        } else {
            Default::default()
        },
        unverified,
        parent: None,
        clone_depth: None,
        snapshots: vec![],
    };
    let with = |img: protocol::ImageStatus| observed_with(&w, &new.cluster, img);
    let bdev = |p: &Plan| {
        p.steps.iter().any(
            |s| matches!(&s.action, Action::Send(Command::CreateBdev(b)) if b.image.as_str() == "indexed-img"),
        )
    };
    // From the index: held, asked about.
    let p = plan(&wanted, &with(image(true, true)), &Options::default());
    assert!(!bdev(&p), "{:?}", p.steps);
    assert!(p
        .blocked
        .iter()
        .any(|b| b.object == "volume/indexed" && b.reason.contains("index only")));
    assert_eq!(
        p.unverified,
        vec![(
            new.cluster.clone(),
            new.pool.to_string(),
            "indexed-img".to_string()
        )]
    );
    // Read, with unistor's keys: exposed.
    let p = plan(&wanted, &with(image(false, true)), &Options::default());
    assert!(bdev(&p) && p.unverified.is_empty(), "{:?}", p.blocked);
    // Read, without them (made by hand under a name the index still holds): not owned.
    let p = plan(&wanted, &with(image(false, false)), &Options::default());
    assert!(!bdev(&p));
    assert!(p
        .blocked
        .iter()
        .any(|b| b.object == "volume/indexed" && b.reason.contains("carries no owner")));
}

#[test]
fn an_image_made_outside_unistor_is_adopted_only_when_asked() {
    let d = examples();
    let mut w = World::empty(&d);
    w.converge(&d, 5);
    // The cluster holds an image for a new volume that nobody owns (made with `rbd create`).
    let (mut wanted, new) = one_more_volume(&d, "legacy", "legacy-img");
    let foreign = |size: u64, watchers: Option<Vec<String>>| protocol::ImageStatus {
        pool: new.pool.to_string(),
        image: new.image.to_string(),
        state: protocol::ImageState::Live,
        size_bytes: size,
        features: vec![],
        watchers,
        metadata: Default::default(),
        unverified: false,
        parent: None,
        clone_depth: None,
        snapshots: vec![],
    };
    let with = |img: protocol::ImageStatus| observed_with(&w, &new.cluster, img);
    let creates = |p: &Plan| {
        p.steps
            .iter()
            .filter(|s| matches!(s.action, Action::Send(Command::CreateImage(_))))
            .count()
    };
    // Not asked: reported as not owned, nothing planned for it, never a create over it.
    let p = plan(
        &wanted,
        &with(foreign(512 << 20, None)),
        &Options::default(),
    );
    assert_eq!(creates(&p), 0, "{:?}", p.steps);
    assert!(p
        .steps
        .iter()
        .all(|s| s.volume.as_deref() != Some("legacy")));
    assert!(
        p.blocked.iter().any(|b| b.object == "volume/legacy"
            && b.reason.contains("carries no owner")
            && b.reason.contains("adopt: true")),
        "{:?}",
        p.blocked
    );
    // Asked: its own step first, then grown to the manifest's size, then its SNAP chain.
    wanted.volumes.get_mut("legacy").unwrap().adopt = true;
    let o = with(foreign(512 << 20, None));
    let p = plan(&wanted, &o, &Options::default());
    assert!(p.blocked.is_empty(), "{:?}", p.blocked);
    assert_eq!(creates(&p), 0);
    let adopt = p
        .steps
        .iter()
        .find(|s| matches!(s.action.sent(), Some(Command::AdoptImage(x)) if x.image == "legacy-img" && x.owner.volume == "legacy"))
        .expect("an adopt step");
    let grow = p
        .steps
        .iter()
        .find(|s| matches!(s.action, Action::GrowImage { from_bytes, ref grow } if from_bytes == 512 << 20 && grow.size_bytes == 1 << 30))
        .expect("grown to the manifest's size");
    assert_eq!(grow.depends_on.as_slice(), [adopt.id]);
    let bdev = p
        .steps
        .iter()
        .find(|s| matches!(&s.action, Action::Send(Command::CreateBdev(b)) if b.image == "legacy-img"))
        .expect("its bdev");
    assert!(bdev.depends_on.contains(&grow.id), "{bdev:?}");
    assert!(crate::render::human(&p).contains("adopt image"));
    // Applied, the image is ours and the fleet converges.
    let mut w2 = w.clone();
    let img = foreign(512 << 20, None);
    let report = w2.clusters.get_mut(&new.cluster).unwrap();
    report.images.push(img);
    for s in &p.steps {
        w2.apply(s, "unistor");
    }
    assert!(plan(&wanted, &w2.observed(), &Options::default()).is_empty());
    // In use, or larger than the manifest: refused, with the reason.
    for (img, why) in [
        (
            foreign(512 << 20, Some(vec!["10.0.0.9:0/42".into()])),
            "in use",
        ),
        (foreign(2 << 30, None), "more than the volume's"),
    ] {
        let p = plan(&wanted, &with(img), &Options::default());
        assert!(p.steps.iter().all(|s| !matches!(
            s.action,
            Action::Send(Command::AdoptImage(_) | Command::CreateImage(_))
        ) || s.volume.as_deref() != Some("legacy")));
        assert!(
            p.blocked
                .iter()
                .any(|b| b.object == "volume/legacy" && b.reason.contains(why)),
            "{why}: {:?}",
            p.blocked
        );
    }
}

#[test]
fn an_nqn_is_recognised_without_being_formatted() {
    use protocol::dpu::FunctionRef;
    let functions = [
        FunctionRef { pf: 0, vf: None },
        FunctionRef { pf: 1, vf: None },
        FunctionRef { pf: 10, vf: None },
        FunctionRef { pf: 0, vf: Some(0) },
        FunctionRef { pf: 0, vf: Some(3) },
        FunctionRef {
            pf: 1,
            vf: Some(12),
        },
        FunctionRef {
            pf: u32::MAX,
            vf: Some(u32::MAX),
        },
    ];
    for dpu in ["dpu-a", "DPU-B", "d"] {
        for &f in &functions {
            for &g in &functions {
                for other in ["dpu-a", "dpu-b", "DPU-B", "d", "dd"] {
                    let nqn = names::nqn(other, g);
                    assert_eq!(
                        names::is_nqn(&nqn, dpu, f),
                        nqn == names::nqn(dpu, f),
                        "{nqn} against {dpu} {f}"
                    );
                }
            }
        }
    }
    // What the formatter never writes is never taken for it.
    let f = FunctionRef { pf: 0, vf: Some(3) };
    for nqn in [
        "nqn.2024-01.io.unistor:dpu-a:pf00vf3",
        "nqn.2024-01.io.unistor:dpu-a:pf0vf03",
        "nqn.2024-01.io.unistor:DPU-A:pf0vf3",
        "nqn.2024-01.io.unistor:dpu-a:pf0vf3x",
        "nqn.2024-01.io.unistor:dpu-a:pf0vf",
        "nqn.2024-01.io.unistor:dpu-a:pf+0vf3",
        "nqn.2024-01.io.unistor:dpu-apf0vf3",
        "nqn.2024-01.io.unistor:dpu-a",
        "nqn.2024-01.io.other:dpu-a:pf0vf3",
    ] {
        assert!(!names::is_nqn(nqn, "dpu-a", f), "{nqn}");
    }
    assert!(names::is_nqn(
        "nqn.2024-01.io.unistor:dpu-a:pf0vf3",
        "dpu-a",
        f
    ));
}

/// A volume cloned from a golden snapshot: its create carries the source; with
/// `flatten: always` a flatten step follows the create (nothing waits for it), the next pass
/// plans nothing once the image has no parent, and a clone found with its parent again (made
/// before the policy changed) gets its flatten alone.
#[test]
fn a_clone_is_created_from_its_snapshot_and_flattened_when_asked() {
    use crate::manifest::CloneSource;
    use protocol::names::{ImageName, PoolName, SnapName};
    let mut d = examples();
    let src = |flatten| CloneSource {
        pool: PoolName::parse("pool", "rbd").unwrap(),
        image: ImageName::parse("image", "golden-os").unwrap(),
        snapshot: SnapName::parse("snapshot", "v1").unwrap(),
        flatten,
        max_depth: None,
        volume: None,
    };
    d.volumes.get_mut("db-data").unwrap().clone_from = Some(src(true));
    let mut w = World::empty(&d);
    let p = plan(&d, &w.observed(), &Options::default());
    check_order(&p);
    let create = p
        .steps
        .iter()
        .find(|s| matches!(s.action.sent(), Some(Command::CreateImage(x)) if x.image == "db-data"))
        .expect("its create");
    let Some(Command::CreateImage(c)) = create.action.sent() else {
        unreachable!()
    };
    assert_eq!(
        c.clone_from.as_ref().map(ToString::to_string).as_deref(),
        Some("rbd/golden-os@v1")
    );
    let flattens: Vec<&Step> = p
        .steps
        .iter()
        .filter(|s| matches!(s.action.sent(), Some(Command::FlattenImage(_))))
        .collect();
    assert_eq!(flattens.len(), 1, "{:?}", p.steps);
    assert_eq!(flattens[0].depends_on.as_slice(), [create.id]);
    assert!(
        p.steps
            .iter()
            .all(|s| !s.depends_on.contains(&flattens[0].id)),
        "nothing waits for the flatten"
    );
    let text = crate::render::human(&p);
    assert!(text.contains("clone image rbd/db-data"), "{text}");
    assert!(text.contains("from snapshot rbd/golden-os@v1"), "{text}");
    assert!(text.contains("flatten image rbd/db-data"), "{text}");
    // Applied (the world's clone loses its parent when flattened): converged.
    assert_eq!(w.converge(&d, 5), 1);
    // Without the policy a clone stays one: nothing to do.
    d.volumes.get_mut("db-data").unwrap().clone_from = Some(src(false));
    let mut w2 = World::empty(&d);
    w2.converge(&d, 5);
    assert!(plan(&d, &w2.observed(), &Options::default()).is_empty());
    // The policy set on a clone that exists: its flatten, alone.
    d.volumes.get_mut("db-data").unwrap().clone_from = Some(src(true));
    let p = plan(&d, &w2.observed(), &Options::default());
    assert_eq!(p.steps.len(), 1, "{:?}", p.steps);
    assert!(matches!(
        p.steps[0].action.sent(),
        Some(Command::FlattenImage(x)) if x.image == "db-data"
    ));
}

/// Declared snapshots: a named one is taken once; the schedule takes `auto-<now>` when the
/// newest is `every` old (and after a clock jump back) and keeps the newest `keep`; a name
/// dropped under `Delete` is removed, under `Retain` kept; a snapshot that a clone depends on
/// is never removed and the plan names the clone; a volume restored from another's snapshot
/// waits for it, then is cloned from it.
#[test]
fn declared_snapshots_are_taken_scheduled_pruned_and_kept_while_clones_hold_them() {
    use crate::manifest::{CloneSource, VolumeSnapshots};
    use protocol::names::SnapName;
    let mut d = examples();
    let name = |s: &str| SnapName::parse("snapshot", s).unwrap();
    let db = d.volumes.get_mut("db-data").unwrap();
    db.snapshots = Some(VolumeSnapshots {
        names: vec![name("before-upgrade")],
        schedule: Some((60, 2)),
        delete: true,
    });
    let mut w = World::empty(&d);
    let at = |now| Options {
        now: Some(now),
        ..Options::default()
    };
    let snaps = |w: &World| -> Vec<String> {
        let r = w.observed();
        let c = r.clusters.values().next().unwrap().get().unwrap().clone();
        let i = c.images.iter().find(|i| i.image == "db-data").unwrap();
        i.snapshots.iter().map(|s| s.name.clone()).collect()
    };
    let run = |w: &mut World, d: &Desired, now: u64| -> Plan {
        let p = plan(d, &w.observed(), &at(now));
        check_order(&p);
        for s in &p.steps {
            w.apply(s, "unistor");
        }
        p
    };
    // From empty: the image, then both snapshots after its create.
    let p = run(&mut w, &d, 1000);
    let create = step_where(
        &p,
        |c| matches!(c, Command::CreateImage(x) if x.image == "db-data"),
    );
    let takes = steps_where(&p, |c| matches!(c, Command::CreateSnapshot(_)));
    assert_eq!(takes.len(), 2, "{:?}", p.steps);
    assert!(takes.iter().all(|s| s.depends_on.as_slice() == [create]));
    assert_eq!(snaps(&w), ["before-upgrade", "auto-1000"]);
    let text = crate::render::human(&p);
    assert!(
        text.contains("snapshot image rbd/db-data@auto-1000"),
        "{text}"
    );
    // Not due yet: nothing.
    assert!(plan(&d, &w.observed(), &at(1059)).is_empty());
    // Due: one more; then a third, and the oldest scheduled one goes (keep 2), after it.
    run(&mut w, &d, 1060);
    let p = run(&mut w, &d, 1130);
    let removes = steps_where(
        &p,
        |c| matches!(c, Command::RemoveSnapshot(x) if x.snapshot == "auto-1000"),
    );
    assert_eq!(removes.len(), 1, "{:?}", p.steps);
    assert_eq!(removes[0].risk, Risk::DataDestroying);
    assert_eq!(removes[0].depends_on.len(), 1, "waits for the new one");
    assert_eq!(snaps(&w), ["before-upgrade", "auto-1060", "auto-1130"]);
    // A clock jumped back far (newest more than `every` in the future): one snapshot, not one
    // per pass; `keep` still holds.
    run(&mut w, &d, 500);
    assert_eq!(snaps(&w), ["before-upgrade", "auto-1130", "auto-500"]);
    assert!(plan(&d, &w.observed(), &at(520)).is_empty());
    // Removed by hand: drift, and taken again.
    let c = w.clusters.values_mut().next().unwrap();
    let img = c.images.iter_mut().find(|i| i.image == "db-data").unwrap();
    img.snapshots.retain(|s| s.name != "before-upgrade");
    let p = plan(&d, &w.observed(), &at(520));
    assert!(
        p.drift.iter().any(|x| x.field == "snapshots"),
        "{:?}",
        p.drift
    );
    run(&mut w, &d, 520);
    // A restore: a new volume from db-data@before-upgrade, held until the snapshot exists.
    let mut restored = d.volumes["db-data"].clone();
    restored.name = protocol::names::VolumeName::parse("n", "db-restored").unwrap();
    restored.image = protocol::names::ImageName::parse("n", "db-restored").unwrap();
    restored.snapshots = None;
    restored.nsid = None;
    restored.uuid = "6b1f1c2e-0000-4000-8000-000000000001".into();
    restored.clone_from = Some(CloneSource {
        pool: restored.pool.clone(),
        image: protocol::names::ImageName::parse("n", "db-data").unwrap(),
        snapshot: name("before-upgrade"),
        flatten: false,
        max_depth: None,
        volume: Some(protocol::names::VolumeName::parse("n", "db-data").unwrap()),
    });
    d.volumes.insert("db-restored".into(), restored);
    let mut held = d.clone();
    held.volumes
        .get_mut("db-data")
        .unwrap()
        .snapshots
        .as_mut()
        .unwrap()
        .names
        .clear();
    let w2 = World::empty(&held);
    let p = plan(&held, &w2.observed(), &at(520));
    assert!(
        p.blocked.iter().any(|b| b.object == "volume/db-restored"
            && b.reason
                .contains("waiting for snapshot rbd/db-data@before-upgrade")),
        "{:?}",
        p.blocked
    );
    // In the converged world the restore is a clone of the snapshot.
    run(&mut w, &d, 530);
    let r = w.observed();
    let c = r.clusters.values().next().unwrap().get().unwrap().clone();
    let img = c.images.iter().find(|i| i.image == "db-restored").unwrap();
    assert_eq!(img.parent.as_deref(), Some("rbd/db-data@before-upgrade"));
    // Dropped from the manifest (Delete): not removed while the restore is its clone.
    d.volumes
        .get_mut("db-data")
        .unwrap()
        .snapshots
        .as_mut()
        .unwrap()
        .names
        .clear();
    let p = plan(&d, &w.observed(), &at(540));
    assert!(
        !p.steps.iter().any(|s| matches!(s.action.sent(), Some(Command::RemoveSnapshot(x)) if x.snapshot == "before-upgrade")),
        "{:?}",
        p.steps
    );
    assert!(
        p.blocked.iter().any(|b| b.object == "volume/db-data"
            && b.reason
                .contains("snapshot rbd/db-data@before-upgrade is not removed")
            && b.reason.contains("volume db-restored")),
        "{:?}",
        p.blocked
    );
    // Under Retain it is simply kept; with the clone gone it is removed under Delete.
    d.volumes
        .get_mut("db-data")
        .unwrap()
        .snapshots
        .as_mut()
        .unwrap()
        .delete = false;
    assert!(plan(&d, &w.observed(), &at(540)).blocked.is_empty());
    d.volumes
        .get_mut("db-data")
        .unwrap()
        .snapshots
        .as_mut()
        .unwrap()
        .delete = true;
    let c = w.clusters.values_mut().next().unwrap();
    c.images
        .iter_mut()
        .find(|i| i.image == "db-restored")
        .unwrap()
        .parent = None;
    run(&mut w, &d, 540);
    assert!(
        !snaps(&w).contains(&"before-upgrade".to_string()),
        "{:?}",
        snaps(&w)
    );
}

/// QoS: a new volume's bdev gets its limits after it is made; a changed limit is one live step
/// (nothing detached, nothing waits for it) with drift; a limit changed by hand in SNAP is
/// drift put back; the field removed lifts every limit.
#[test]
fn qos_limits_are_set_after_the_bdev_changed_live_and_lifted_when_removed() {
    use protocol::dpu::QosLimits;
    let mut d = examples();
    let limited = QosLimits {
        rw_ios_per_sec: 3000,
        r_mbytes_per_sec: 100,
        ..Default::default()
    };
    d.volumes.get_mut("db-data").unwrap().qos = limited;
    let mut w = World::empty(&d);
    let p = plan(&d, &w.observed(), &Options::default());
    check_order(&p);
    let bdev = step_where(
        &p,
        |c| matches!(c, Command::CreateBdev(b) if b.name == "unistor-db-data"),
    );
    let qos = steps_where(&p, |c| matches!(c, Command::SetBdevQos(_)));
    assert_eq!(qos.len(), 1, "{:?}", p.steps);
    assert!(qos[0].depends_on.contains(&bdev));
    assert!(
        p.steps.iter().all(|s| !s.depends_on.contains(&qos[0].id)),
        "nothing waits"
    );
    let text = crate::render::human(&p);
    assert!(
        text.contains("set QoS of bdev unistor-db-data to 3000 IOPS, 100 MiB/s read"),
        "{text}"
    );
    w.converge(&d, 5);
    // Changed: one step, only that.
    d.volumes.get_mut("db-data").unwrap().qos.rw_ios_per_sec = 5000;
    let p = plan(&d, &w.observed(), &Options::default());
    assert_eq!(p.steps.len(), 1, "{:?}", p.steps);
    assert!(
        matches!(p.steps[0].action.sent(), Some(Command::SetBdevQos(q)) if q.limits.rw_ios_per_sec == 5000)
    );
    assert_eq!(p.steps[0].risk, Risk::Safe);
    assert!(p.drift.iter().any(|x| x.field == "qos"), "{:?}", p.drift);
    w.converge(&d, 5);
    // Changed by hand through SNAP's RPC: drift, put back.
    let inv = w.inv("dpu-a");
    inv.bdevs
        .iter_mut()
        .find(|b| b.name == "unistor-db-data")
        .unwrap()
        .qos = QosLimits::default();
    let p = plan(&d, &w.observed(), &Options::default());
    assert!(
        p.drift
            .iter()
            .any(|x| x.field == "qos" && x.observed == "no limit"),
        "{:?}",
        p.drift
    );
    assert_eq!(w.converge(&d, 5), 1);
    // Removed from the manifest: every limit lifted.
    d.volumes.get_mut("db-data").unwrap().qos = QosLimits::default();
    let p = plan(&d, &w.observed(), &Options::default());
    assert!(
        matches!(p.steps[..], [ref s] if matches!(s.action.sent(), Some(Command::SetBdevQos(q)) if q.limits.is_none()))
    );
    w.converge(&d, 5);
    assert!(plan(&d, &w.observed(), &Options::default()).is_empty());
}

/// `source.maxDepth`: a clone made from a snapshot whose image is itself a clone is one
/// generation deeper; past the bound it is flattened after its create; a live clone reported
/// deeper than the bound gets its flatten alone; within it, nothing.
#[test]
fn a_clone_deeper_than_its_bound_is_flattened() {
    use crate::manifest::{CloneSource, VolumeSnapshots};
    use protocol::names::{ImageName, SnapName, VolumeName};
    let mut d = examples();
    d.volumes.get_mut("db-data").unwrap().snapshots = Some(VolumeSnapshots {
        names: vec![SnapName::parse("s", "s1").unwrap()],
        schedule: None,
        delete: false,
    });
    let mut w = World::empty(&d);
    w.converge(&d, 5);
    let mut r = d.volumes["db-data"].clone();
    r.name = VolumeName::parse("n", "db-copy").unwrap();
    r.image = ImageName::parse("n", "db-copy").unwrap();
    r.snapshots = None;
    r.nsid = None;
    r.uuid = "6b1f1c2e-0000-4000-8000-000000000002".into();
    r.clone_from = Some(CloneSource {
        pool: r.pool.clone(),
        image: ImageName::parse("n", "db-data").unwrap(),
        snapshot: SnapName::parse("s", "s1").unwrap(),
        flatten: false,
        max_depth: Some(1),
        volume: Some(VolumeName::parse("n", "db-data").unwrap()),
    });
    d.volumes.insert("db-copy".into(), r);
    let flattens = |p: &Plan| {
        p.steps
            .iter()
            .filter(|s| matches!(s.action.sent(), Some(Command::FlattenImage(x)) if x.image == "db-copy"))
            .count()
    };
    // db-data is no clone: the copy is depth 1, within the bound.
    assert_eq!(flattens(&plan(&d, &w.observed(), &Options::default())), 0);
    // db-data is itself a clone (depth 1): the copy would be depth 2, past it.
    let c = w.clusters.values_mut().next().unwrap();
    let src = c.images.iter_mut().find(|i| i.image == "db-data").unwrap();
    src.parent = Some("rbd/golden-os@v1".into());
    src.clone_depth = Some(1);
    let p = plan(&d, &w.observed(), &Options::default());
    assert_eq!(flattens(&p), 1, "{:?}", p.steps);
    let create = step_where(
        &p,
        |c| matches!(c, Command::CreateImage(x) if x.image == "db-copy"),
    );
    assert!(p.steps.iter().any(
        |s| matches!(s.action.sent(), Some(Command::FlattenImage(_)))
            && s.depends_on.as_slice() == [create]
    ));
    // Live, reported 3 deep: flattened alone under a bound of 2; nothing under 3.
    d.volumes
        .get_mut("db-copy")
        .unwrap()
        .clone_from
        .as_mut()
        .unwrap()
        .max_depth = Some(3);
    w.converge(&d, 5);
    let c = w.clusters.values_mut().next().unwrap();
    let copy = c.images.iter_mut().find(|i| i.image == "db-copy").unwrap();
    copy.parent = Some("rbd/db-data@s1".into());
    copy.clone_depth = Some(3);
    assert!(plan(&d, &w.observed(), &Options::default()).is_empty());
    d.volumes
        .get_mut("db-copy")
        .unwrap()
        .clone_from
        .as_mut()
        .unwrap()
        .max_depth = Some(2);
    let p = plan(&d, &w.observed(), &Options::default());
    assert_eq!((p.steps.len(), flattens(&p)), (1, 1), "{:?}", p.steps);
}

/// The steps of `p` whose command `f` accepts.
fn steps_where(p: &Plan, f: impl Fn(&Command) -> bool) -> Vec<&Step> {
    p.steps
        .iter()
        .filter(|s| s.action.sent().is_some_and(&f))
        .collect()
}

/// The one step of `p` whose command `f` accepts: its id.
fn step_where(p: &Plan, f: impl Fn(&Command) -> bool) -> usize {
    let found = steps_where(p, f);
    assert_eq!(found.len(), 1, "{:?}", p.steps);
    found[0].id
}
