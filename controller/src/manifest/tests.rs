use std::path::{Path, PathBuf};

use super::*;
use protocol::names::check_uuid;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn load(files: &[(&str, &str)]) -> Result<Desired, Vec<LoadError>> {
    let texts: Vec<(PathBuf, String)> = files
        .iter()
        .map(|(f, t)| (PathBuf::from(f), t.to_string()))
        .collect();
    load_texts(&texts)
}

const BASE: &str = "\
apiVersion: unistor.io/v1alpha1
kind: CephCluster
metadata:
  name: ceph-lab
spec:
  agent: {name: ceph-1, address: 127.0.0.1:7400}
  pools: [rbd]
  snapIdentity: {clientId: snap-lab}
---
apiVersion: unistor.io/v1alpha1
kind: Dpu
metadata:
  name: dpu-a
spec:
  agent: {name: dpu-a, address: 127.0.0.1:7411}
  host: host-a
  snap:
    version: 4.5.0
    functions: {pfs: 2, vfsPerPf: 4}
";

fn volume(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: unistor.io/v1alpha1
kind: Volume
metadata:
  name: {name}
spec:
  host: host-a
  size: 1Gi
  rbd:
    cluster: ceph-lab
    pool: rbd
{extra}"
    )
}

fn errors(files: &[(&str, &str)]) -> Vec<String> {
    load(files)
        .expect_err("should be refused")
        .iter()
        .map(|e| e.to_string())
        .collect()
}

#[test]
fn every_example_and_manifest_validates() {
    for dir in ["examples", "manifests"] {
        let d = load_dir(&repo().join(dir)).unwrap_or_else(|e| {
            panic!(
                "{dir}: {}",
                e.iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
        if dir == "examples" {
            assert_eq!(d.clusters.len(), 1);
            assert_eq!(d.dpus.len(), 3);
            assert_eq!(d.volumes.len(), 4);
            let db = &d.volumes["db-data"];
            assert_eq!(db.size_bytes, 2 << 30);
            assert_eq!(db.dpu, "dpu-a");
            assert_eq!(db.nsid, Some(1));
            assert_eq!(db.image.as_str(), "db-data");
            assert_eq!(
                d.volumes["scratch-b"].function,
                FunctionRef { pf: 1, vf: Some(0) }
            );
        }
    }
}

#[test]
fn a_good_set_resolves() {
    let v = volume(
        "vol1",
        "  nvme: {pf: 1, vf: 3, nsid: 4}\n  deletionPolicy: Trash\n  trashRetention: 2d\n",
    );
    let d = load(&[("a.yaml", BASE), ("v.yaml", &v)]).unwrap();
    let v = &d.volumes["vol1"];
    assert_eq!(v.function, FunctionRef { pf: 1, vf: Some(3) });
    assert_eq!(v.deletion_policy, DeletionPolicy::Trash);
    assert_eq!(v.trash_retention, Duration::from_secs(2 * 86400));
    assert_eq!(v.uuid, derived_uuid("ceph-lab", "rbd", "vol1"));
    assert_eq!(v.source.line, 1);
}

#[test]
fn derived_uuids_are_stable_and_distinct() {
    let a = derived_uuid("c", "rbd", "img");
    assert_eq!(a, derived_uuid("c", "rbd", "img"));
    assert_ne!(a, derived_uuid("c", "rbd", "img2"));
    check_uuid("uuid", &a).unwrap();
}

#[test]
fn errors_name_file_line_and_field() {
    let v = volume("vol1", "  sizee: 3Gi\n");
    let e = errors(&[("base.yaml", BASE), ("vols/v.yaml", &v)]);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(e[0].starts_with("vols/v.yaml:"), "{}", e[0]);
    assert!(e[0].contains("unknown field `sizee`"), "{}", e[0]);
    assert!(e[0].contains(": spec.sizee: "), "the field, once: {}", e[0]);
    let v = volume("vol1", "  placement: {function: {pf: 0}}\n");
    let e = errors(&[("base.yaml", BASE), ("v.yaml", &v)]);
    assert!(
        e[0].contains(": spec.placement: "),
        "the field, once: {}",
        e[0]
    );

    // A semantic error points at the field's own line, in the second document of a file.
    let two = format!(
        "{}---\n{}",
        volume("ok1", ""),
        volume("bad", "").replace("size: 1Gi", "size: 10G")
    );
    let e = errors(&[("base.yaml", BASE), ("two.yaml", &two)]);
    assert_eq!(e.len(), 1, "{e:?}");
    let want_line = two.lines().position(|l| l.contains("size: 10G")).unwrap() + 1;
    assert!(
        e[0].starts_with(&format!("two.yaml:{want_line}: spec.size: ")),
        "{} (want line {want_line})",
        e[0]
    );
    assert!(e[0].contains("binary unit"), "{}", e[0]);
}

#[test]
fn every_rule_is_enforced() {
    let cases: Vec<(String, &str)> = vec![
        (
            volume("v", "").replace("size: 1Gi", "size: 0Mi"),
            "spec.size",
        ),
        (
            volume("v", "").replace("size: 1Gi", "size: 1536Ki"),
            "whole number of MiB",
        ),
        (
            volume("v", "").replace("host: host-a", "host: host-z"),
            "has no DPU",
        ),
        (
            volume("v", "").replace("cluster: ceph-lab", "cluster: nope"),
            "no CephCluster",
        ),
        (
            volume("v", "").replace("pool: rbd", "pool: other"),
            "not one of cluster",
        ),
        (volume("v", "  nvme: {pf: 2}\n"), "exposes 2 PF"),
        (volume("v", "  nvme: {pf: 0, vf: 4}\n"), "exposes 4 VF"),
        (volume("v", "  nvme: {nsid: 0}\n"), "NSID 0"),
        (
            volume("v", "  nvme: {uuid: NOT-A-UUID}\n"),
            "spec.nvme.uuid",
        ),
        (volume("v", "  queues: 64\n"), "spec.queues"),
        (volume("v", "  deletionPolicy: Shred\n"), "deletionPolicy"),
        (
            volume("v", "  trashRetention: forever\n"),
            "spec.trashRetention",
        ),
        (volume("a;rm -rf /", ""), "metadata.name"),
        (
            volume("v", "").replace("unistor.io/v1alpha1", "v2"),
            "apiVersion",
        ),
    ];
    for (doc, want) in cases {
        let e = errors(&[("base.yaml", BASE), ("v.yaml", &doc)]);
        assert!(e.iter().any(|e| e.contains(want)), "want {want:?} in {e:?}");
        assert!(e.iter().all(|e| e.starts_with("v.yaml:")), "{e:?}");
    }
}

#[test]
fn set_wide_rules() {
    // Duplicate names.
    let e = errors(&[
        ("a.yaml", BASE),
        ("v1.yaml", &volume("v", "")),
        ("v2.yaml", &volume("v", "")),
    ]);
    assert!(
        e.iter()
            .any(|e| e.contains("defined twice (also at v1.yaml:1)")),
        "{e:?}"
    );
    // One image used twice.
    let e = errors(&[
        ("a.yaml", BASE),
        ("v1.yaml", &volume("v1", "    image: shared\n")),
        ("v2.yaml", &volume("v2", "    image: shared\n")),
    ]);
    assert!(
        e.iter()
            .any(|e| e.contains("already used by volume \"v1\"")),
        "{e:?}"
    );
    // Two volumes on one function and NSID.
    let e = errors(&[
        ("a.yaml", BASE),
        ("v1.yaml", &volume("v1", "  nvme: {pf: 1, nsid: 3}\n")),
        ("v2.yaml", &volume("v2", "  nvme: {pf: 1, nsid: 3}\n")),
    ]);
    assert!(
        e.iter()
            .any(|e| e.contains("NSID 3 is already volume \"v1\"")),
        "{e:?}"
    );
    // Volumes sharing a function share its controller's queue count.
    let e = errors(&[
        ("a.yaml", BASE),
        ("v1.yaml", &volume("v1", "  nvme: {pf: 1}\n  queues: 4\n")),
        ("v2.yaml", &volume("v2", "  nvme: {pf: 1}\n  queues: 16\n")),
    ]);
    assert!(
        e.iter().any(|e| e.contains("share one controller")),
        "{e:?}"
    );
    // More functions than a BlueField-3 offers; two DPUs in one host.
    let big = BASE.replace("{pfs: 2, vfsPerPf: 4}", "{pfs: 5, vfsPerPf: 128}");
    let e = errors(&[("a.yaml", &big)]);
    assert!(e.iter().any(|e| e.contains("1-4 static NVMe PFs")), "{e:?}");
    assert!(e.iter().any(|e| e.contains("at most 127")), "{e:?}");
    let second = BASE
        .split("---\n")
        .nth(1)
        .unwrap()
        .replace("name: dpu-a", "name: dpu-b");
    let e = errors(&[("a.yaml", BASE), ("b.yaml", &second)]);
    assert!(e.iter().any(|e| e.contains("already has DPU")), "{e:?}");
    // SNAP never gets client.admin.
    let admin = BASE.replace("clientId: snap-lab", "clientId: admin");
    assert!(errors(&[("a.yaml", &admin)])
        .iter()
        .any(|e| e.contains("client.admin")));
}

#[test]
fn plain_text_with_ampersands_and_stars_is_not_an_anchor() {
    // A label value in plain YAML: `&` and `*` inside a plain scalar are text.
    let v = volume("v", "").replace(
        "  name: v\n",
        "  name: v\n  labels:\n    note: storage & compute\n    glob: a *b\n    amp: \"&x\"\n",
    );
    assert!(v.contains("storage & compute"));
    let d = load(&[("base.yaml", BASE), ("v.yaml", &v)]).unwrap_or_else(|e| panic!("{e:?}"));
    assert!(d.volumes.contains_key("v"));
}

#[test]
fn hostile_yaml_is_refused_quickly() {
    // An alias bomb ("billion laughs").
    let mut bomb = String::from(
        "a: &a [\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\",\"lol\"]\n",
    );
    for i in 1..10 {
        let prev = (b'a' + i - 1) as char;
        let cur = (b'a' + i) as char;
        bomb.push_str(&format!("{cur}: &{cur} [*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev},*{prev}]\n"));
    }
    bomb.push_str("kind: Volume\n");
    let e = errors(&[("bomb.yaml", &bomb)]);
    assert_eq!(
        e,
        ["bomb.yaml:1: YAML anchors and aliases are not allowed in manifests"]
    );
    // Deep nesting, in flow and in block style.
    let deep = format!(
        "kind: Volume\nspec: {}{}\n",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let e = errors(&[("deep.yaml", &deep)]);
    assert_eq!(e, ["deep.yaml:2: nested deeper than 32 levels"]);
    let mut block = String::from("kind: Volume\n");
    for i in 0..300 {
        block.push_str(&format!("{}k{i}:\n", " ".repeat(i)));
    }
    let e = errors(&[("block.yaml", &block)]);
    assert!(e[0].contains("nested deeper than 32 levels"), "{e:?}");
    // Look-alikes are fine: quoted, or plain scalars that merely hold `&` or `*`.
    let quoted = volume("v", "").replace("size: 1Gi", "size: \"*1Gi\"");
    assert!(errors(&[("base.yaml", BASE), ("q.yaml", &quoted)])[0].contains("spec.size"));
    // An anchor in block style, and one on a scalar, are found at their line.
    let anchored = volume("v", "").replace("  size: 1Gi\n", "  size: &s 1Gi\n");
    assert!(errors(&[("base.yaml", BASE), ("a.yaml", &anchored)])[0]
        .contains("anchors and aliases are not allowed"));
    // A file over the size limit is not even parsed.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("huge.yaml"),
        "a".repeat(MAX_FILE_BYTES as usize + 1),
    )
    .unwrap();
    let e = load_dir(dir.path()).unwrap_err();
    assert!(
        e[0].to_string().contains("manifest files are at most"),
        "{}",
        e[0]
    );
}

#[test]
fn directory_trees_skip_editor_leftovers() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("sub/deeper")).unwrap();
    std::fs::write(dir.path().join("base.yaml"), BASE).unwrap();
    std::fs::write(dir.path().join("sub/deeper/v.yml"), volume("v", "")).unwrap();
    std::fs::write(dir.path().join(".v.yaml.swp"), "garbage: [").unwrap();
    std::fs::write(dir.path().join("v.yaml~"), "garbage: [").unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not yaml").unwrap();
    let d = load_dir(dir.path()).unwrap();
    assert_eq!(d.volumes.len(), 1);
}

#[test]
fn sizes() {
    assert_eq!(parse_size("100Gi").unwrap(), 100 << 30);
    assert_eq!(parse_size("512Mi").unwrap(), 512 << 20);
    assert_eq!(parse_size("2Ti").unwrap(), 2 << 40);
    for bad in ["100G", "100", "1.5Gi", "-1Gi", "Gi", "99999999999999Ti"] {
        assert!(parse_size(bad).is_err(), "{bad}");
    }
}

#[test]
fn schema_covers_every_kind() {
    let s = schema().to_string();
    for k in [
        "CephCluster",
        "Dpu",
        "Volume",
        "deletionPolicy",
        "snapIdentity",
    ] {
        assert!(s.contains(k), "{k} missing from the schema");
    }
}

#[test]
fn hostile_files_in_the_tree_are_refused_by_name_and_never_read() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::write(root.join("base.yaml"), BASE).unwrap();
    std::fs::create_dir(root.join("real")).unwrap();
    std::fs::write(root.join("real/v.txt"), volume("linked", "")).unwrap();
    // A link that stays inside the tree, to a regular file, is followed.
    std::os::unix::fs::symlink(root.join("real/v.txt"), root.join("inside.yaml")).unwrap();
    let d = load_dir(root).unwrap();
    assert!(d.volumes.contains_key("linked"));
    // Endless, outside, and never-ending: each refused, named, and none of them read.
    let outside = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(outside.path(), volume("stolen", "")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", root.join("zero.yaml")).unwrap();
    std::os::unix::fs::symlink(outside.path(), root.join("out.yaml")).unwrap();
    std::os::unix::fs::symlink(root.join("nowhere"), root.join("dangling.yaml")).unwrap();
    let fifo = root.join("zz.yaml");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let e = load_dir(root).unwrap_err();
    let text: Vec<String> = e.iter().map(ToString::to_string).collect();
    let says = |file: &str, what: &str| {
        assert!(
            text.iter().any(|t| t.contains(file) && t.contains(what)),
            "{file}: {what}: {text:#?}"
        )
    };
    says(
        "zero.yaml",
        "a symbolic link to /dev/zero, outside the manifest directory",
    );
    says("out.yaml", "outside the manifest directory");
    says("dangling.yaml", "cannot be followed");
    says("zz.yaml", "a FIFO, not a regular file");
    assert_eq!(e.len(), 4, "{text:#?}");
}

#[test]
fn sizes_and_retentions_past_their_bounds_are_refused_where_they_enter() {
    let e = errors(&[
        ("base.yaml", BASE),
        (
            "v.yaml",
            &volume("v", "").replace("size: 1Gi", "size: 2048Ti"),
        ),
    ]);
    assert!(
        e[0].contains("spec.size") && e[0].contains("largest volume"),
        "{e:?}"
    );
    let e = errors(&[
        ("base.yaml", BASE),
        ("v.yaml", &volume("v", "  trashRetention: 100years\n")),
    ]);
    assert!(
        e[0].contains("spec.trashRetention") && e[0].contains("longest trash retention"),
        "{e:?}"
    );
    assert_eq!(
        parse_size("1024Ti").unwrap(),
        protocol::limits::MAX_VOLUME_BYTES
    );
}

/// A reload through the parse cache gives exactly what a load from nothing gives, whatever
/// changed: a document edited, one added before others (their first lines move), one broken
/// (its error names the same file and line), one removed; and the cache ends holding the last
/// load's documents only.
#[test]
fn a_reload_through_the_parse_cache_equals_a_load_from_nothing() {
    let texts = |files: &[(&str, String)]| -> Vec<(PathBuf, String)> {
        files
            .iter()
            .map(|(f, t)| (PathBuf::from(f), t.clone()))
            .collect()
    };
    let vols = |names: &[&str], extra: &str| -> String {
        names
            .iter()
            .map(|n| volume(n, extra))
            .collect::<Vec<_>>()
            .join("---\n")
    };
    let steps: Vec<Vec<(&str, String)>> = vec![
        vec![
            ("base.yaml", BASE.into()),
            ("v.yaml", vols(&["a", "b", "c"], "")),
        ],
        // One document edited.
        vec![
            ("base.yaml", BASE.into()),
            (
                "v.yaml",
                vols(&["a", "b", "c"], "  deletionPolicy: Delete\n"),
            ),
        ],
        // One added in front: the others' first lines move.
        vec![
            ("base.yaml", BASE.into()),
            ("v.yaml", vols(&["z", "a", "b", "c"], "")),
        ],
        // One broken.
        vec![
            ("base.yaml", BASE.into()),
            ("v.yaml", vols(&["z", "a", "b", "c"], "  sise: 2Gi\n")),
        ],
        // A file removed.
        vec![("base.yaml", BASE.into())],
    ];
    let mut cache = ParseCache::default();
    for (i, files) in steps.iter().enumerate() {
        let t = texts(files);
        let fresh = load_texts(&t);
        let cached = load_texts_with(&t, &mut cache);
        assert_eq!(cached, fresh, "step {i}");
        let documents: usize = t.iter().map(|(f, s)| split_documents(f, s).len()).sum();
        assert_eq!(cache.len(), documents, "step {i}");
    }
    // The broken step's errors were the uncached ones, naming file, line and field.
    let broken = load_texts_with(&texts(&steps[3]), &mut cache).unwrap_err();
    assert!(broken
        .iter()
        .all(|e| e.file == Path::new("v.yaml") && e.line > 0));
}

/// A volume cloned from a golden image's snapshot: the names are checked where they enter and
/// an error names the file, the line and the field; the pool must be one of the cluster's.
#[test]
fn a_clone_source_is_resolved_and_its_names_are_checked() {
    let ok = volume(
        "boot-1",
        "  source:\n    snapshot: {pool: rbd, image: golden-os, name: v1}\n",
    );
    let d = load(&[("base.yaml", BASE), ("v.yaml", &ok)]).unwrap();
    let src = d.volumes["boot-1"].clone_from.as_ref().expect("a source");
    assert_eq!(src.to_string(), "rbd/golden-os@v1");
    let plain = volume("data-1", "");
    let d = load(&[("base.yaml", BASE), ("v.yaml", &plain)]).unwrap();
    assert!(d.volumes["data-1"].clone_from.is_none());

    let bad_name = volume(
        "boot-2",
        "  source:\n    snapshot: {pool: rbd, image: golden-os, name: \"v1;rm\"}\n",
    );
    let e = errors(&[("base.yaml", BASE), ("v.yaml", &bad_name)]);
    assert_eq!(e.len(), 1, "{e:?}");
    assert!(
        e[0].starts_with("v.yaml:") && e[0].contains("spec.source.snapshot.name"),
        "{}",
        e[0]
    );
    assert!(e[0].contains("';'"), "the character named: {}", e[0]);
    let other_pool = volume(
        "boot-3",
        "  source:\n    snapshot: {pool: images, image: golden-os, name: v1}\n",
    );
    let e = errors(&[("base.yaml", BASE), ("v.yaml", &other_pool)]);
    assert!(
        e[0].contains("spec.source.snapshot.pool") && e[0].contains("not one of cluster"),
        "{e:?}"
    );
    let typo = volume(
        "boot-4",
        "  source:\n    snapshot: {pool: rbd, image: golden-os, snap: v1}\n",
    );
    let e = errors(&[("base.yaml", BASE), ("v.yaml", &typo)]);
    assert!(e[0].contains("snap"), "{e:?}");
}

/// `snapshots`: names on the allow-list, not the schedule's prefix, not twice; the schedule
/// within bounds; a restore names a volume of the cluster and one of its declared snapshots.
/// Each error names its file, line and field.
#[test]
fn declared_snapshots_and_restores_are_resolved_and_checked() {
    let db = volume(
        "db",
        "  snapshots:\n    names: [before-upgrade]\n    schedule: {every: 1h, keep: 24}\n    deletionPolicy: Delete\n",
    );
    let restored = volume(
        "db-restored",
        "  source:\n    volumeSnapshot: {volume: db, name: before-upgrade}\n",
    );
    let d = load(&[("base.yaml", BASE), ("db.yaml", &db), ("r.yaml", &restored)]).unwrap();
    let s = d.volumes["db"].snapshots.as_ref().expect("declared");
    assert_eq!(s.names.len(), 1);
    assert_eq!(s.schedule, Some((3600, 24)));
    assert!(s.delete);
    let src = d.volumes["db-restored"]
        .clone_from
        .as_ref()
        .expect("a source");
    assert_eq!(src.to_string(), "rbd/db@before-upgrade");
    assert_eq!(src.volume.as_ref().map(|v| v.as_str()), Some("db"));

    let cases = [
        (
            "  snapshots:\n    names: [auto-1]\n",
            "spec.snapshots.names",
            "auto-",
        ),
        (
            "  snapshots:\n    names: [a, a]\n",
            "spec.snapshots.names",
            "twice",
        ),
        (
            "  snapshots:\n    names: [\"a b\"]\n",
            "spec.snapshots.names",
            "' '",
        ),
        (
            "  snapshots:\n    schedule: {every: 5s, keep: 2}\n",
            "spec.snapshots.schedule.every",
            "less than 10s",
        ),
        (
            "  snapshots:\n    schedule: {every: 1h, keep: 0}\n",
            "spec.snapshots.schedule.keep",
            "1-512",
        ),
        (
            "  source:\n    volumeSnapshot: {volume: db, name: \"x;y\"}\n",
            "spec.source.volumeSnapshot.name",
            "';'",
        ),
        (
            "  source:\n    volumeSnapshot: {volume: nope, name: x}\n",
            "spec.source.volumeSnapshot.volume",
            "no Volume",
        ),
        (
            "  source:\n    flatten: always\n",
            "spec.source",
            "exactly one",
        ),
    ];
    for (spec, field, says) in cases {
        let v = volume("bad", spec);
        let e = errors(&[("base.yaml", BASE), ("db.yaml", &db), ("v.yaml", &v)]);
        assert_eq!(e.len(), 1, "{spec}: {e:?}");
        assert!(
            e[0].starts_with("v.yaml:") && e[0].contains(field) && e[0].contains(says),
            "{spec}: {}",
            e[0]
        );
    }
}

/// `qos`: resolved into SPDK's units; values SPDK would round or refuse are refused with the
/// rule and the nearest allowed values, naming file, line and field.
#[test]
fn qos_limits_are_resolved_and_values_spdk_would_round_are_refused() {
    let ok = volume(
        "db",
        "  qos:\n    iops: 3000\n    readBandwidth: 200Mi\n    writeBandwidth: 1Gi\n",
    );
    let d = load(&[("base.yaml", BASE), ("v.yaml", &ok)]).unwrap();
    let q = d.volumes["db"].qos;
    assert_eq!(
        (
            q.rw_ios_per_sec,
            q.rw_mbytes_per_sec,
            q.r_mbytes_per_sec,
            q.w_mbytes_per_sec
        ),
        (3000, 0, 200, 1024)
    );
    assert!(load(&[("base.yaml", BASE), ("v.yaml", &volume("p", ""))])
        .unwrap()
        .volumes["p"]
        .qos
        .is_none());
    let cases = [
        (
            "  qos:\n    iops: 2500\n",
            "spec.qos.iops",
            "round it up to 3000; use 2000 or 3000",
        ),
        ("  qos:\n    iops: 300\n", "spec.qos.iops", "use 1000"),
        ("  qos:\n    iops: 0\n", "spec.qos.iops", "leave `iops` out"),
        (
            "  qos:\n    bandwidth: 1536Ki\n",
            "spec.qos.bandwidth",
            "use 1Mi or 2Mi",
        ),
        (
            "  qos:\n    readBandwidth: 512Ki\n",
            "spec.qos.readBandwidth",
            "use 1Mi",
        ),
        (
            "  qos:\n    writeBandwidth: fast\n",
            "spec.qos.writeBandwidth",
            "e.g. 200Mi",
        ),
        ("  qos:\n    iopsLimit: 1000\n", "iopsLimit", ""),
    ];
    for (spec, field, says) in cases {
        let v = volume("bad", spec);
        let e = errors(&[("base.yaml", BASE), ("v.yaml", &v)]);
        assert_eq!(e.len(), 1, "{spec}: {e:?}");
        assert!(
            e[0].starts_with("v.yaml:") && e[0].contains(field) && e[0].contains(says),
            "{spec}: {}",
            e[0]
        );
    }
}

/// `source.maxDepth`: 1-15, and not beside `flatten: always`.
#[test]
fn a_clone_depth_bound_is_checked() {
    let ok = volume(
        "c",
        "  source:\n    snapshot: {pool: rbd, image: golden-os, name: v1}\n    maxDepth: 2\n",
    );
    let d = load(&[("base.yaml", BASE), ("v.yaml", &ok)]).unwrap();
    assert_eq!(
        d.volumes["c"].clone_from.as_ref().unwrap().max_depth,
        Some(2)
    );
    for (extra, says) in [
        ("    maxDepth: 0\n", "1-15"),
        ("    maxDepth: 16\n", "1-15"),
        ("    flatten: always\n    maxDepth: 2\n", "give one of them"),
    ] {
        let v = volume(
            "bad",
            &format!("  source:\n    snapshot: {{pool: rbd, image: golden-os, name: v1}}\n{extra}"),
        );
        let e = errors(&[("base.yaml", BASE), ("v.yaml", &v)]);
        assert_eq!(e.len(), 1, "{extra}: {e:?}");
        assert!(
            e[0].contains("spec.source.maxDepth") && e[0].contains(says),
            "{}",
            e[0]
        );
    }
}
