//! Golden-image boot volumes (issue 25) end to end on the real cluster: an OS image imported
//! with a pattern, adopted as a volume that declares snapshot `v1` (taken by unistor); 50
//! volumes declared as clones of that snapshot are created by the daemon once it exists
//! (format-2 clones, each with unistor's keys; one flattened by its policy); every simulated
//! host reads the golden bytes through SNAP; one host's writes land in its own clone only: the
//! golden image, its snapshot and the other clones are unchanged; `v1` dropped from the
//! manifest under `Delete` is kept while the clones live, and the plan names them.

use std::path::PathBuf;
use std::time::Duration;

use e2e::host;
use e2e::lab::{volume, Lab};
use e2e::{unique, volume_yaml, write_like_an_editor, Cluster};
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(600);

/// Volumes cloned.
const CLONES: usize = 50;

/// What the golden image holds in its first [`GOLDEN_BYTES`]: one byte, as `qemu-io -P` checks.
const GOLDEN: u8 = 0x47;
const GOLDEN_BYTES: u64 = 1 << 20;

/// The first `len` bytes of `spec` (an image or `image@snapshot`), read with `rbd export`.
fn head(c: &Cluster, spec: &str, len: usize) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export");
    c.cli_ok(
        "rbd",
        &["export", "--no-progress", spec, file.to_str().unwrap()],
    );
    let mut b = std::fs::read(&file).unwrap();
    b.truncate(len);
    b
}

fn device_of(s: &Value, v: &str) -> PathBuf {
    PathBuf::from(
        volume(s, v)["host_device"]
            .as_str()
            .unwrap_or_else(|| panic!("no host device for {v}: {}", volume(s, v))),
    )
}

#[test]
fn fifty_hosts_boot_from_clones_of_one_golden_snapshot() {
    let c = Cluster::from_env();
    let lab = Lab::start(&c, 2, &[]);
    // The golden OS image: 16 MiB, its first MiB the pattern.
    let gold = unique("golden-os");
    let dir = tempfile::tempdir().unwrap();
    let raw = dir.path().join("os.raw");
    let mut bytes = vec![GOLDEN; GOLDEN_BYTES as usize];
    bytes.resize(16 << 20, 0);
    std::fs::write(&raw, &bytes).unwrap();
    let gold_spec = format!("{}/{gold}", c.pool);
    c.cli_ok(
        "rbd",
        &["import", "--no-progress", raw.to_str().unwrap(), &gold_spec],
    );

    // The golden image adopted as a volume (attached to host 0) that declares snapshot `v1`
    // (unistor takes it, so unistor knows it as its own); 50 boot volumes, 25 per DPU, each a
    // clone of it (the first grown to 32 MiB), held by the planner until `v1` exists.
    let names: Vec<String> = (0..CLONES).map(|i| unique(&format!("boot{i}"))).collect();
    lab.write(&c, &[]);
    let golden_volume = |names: &str| {
        format!(
            "---\napiVersion: unistor.io/v1alpha1\nkind: Volume\nmetadata: {{name: {gold}}}\nspec:\n  host: host-0\n  size: 16Mi\n  rbd: {{cluster: ceph, pool: {}, adopt: true}}\n  snapshots: {{names: [{names}], deletionPolicy: Delete}}\n",
            c.pool
        )
    };
    let clones: String = names
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let size = if i == 0 { "32Mi" } else { "16Mi" };
            // The second is flattened once made.
            let flatten = if i == 1 { "    flatten: always\n" } else { "" };
            format!(
                "{}  source:\n    volumeSnapshot: {{volume: {gold}, name: v1}}\n{flatten}",
                volume_yaml(n, i % 2, size, &c.pool, "Retain"),
            )
        })
        .collect();
    let file = lab.manifests().join("volumes.yaml");
    write_like_an_editor(&file, &format!("{}{clones}", golden_volume("v1")));
    let d = lab.daemon(&[]);
    let s = d.wait_converged(CONVERGE, CLONES + 1);
    // One clone step per volume (the daemon's log: its status keeps only recent events).
    let log = std::fs::read_to_string(&d.log).unwrap();
    let from = format!("from snapshot {gold_spec}@v1");
    let cloned = log
        .lines()
        .filter(|l| l.contains(" done: + cluster/") && l.contains(&from))
        .count();
    assert_eq!(cloned, CLONES, "one clone step per volume");

    // The flattened one: no parent any more, one flatten step.
    let flattened = log
        .lines()
        .filter(|l| l.contains(" done: ") && l.contains("flatten image") && l.contains(&names[1]))
        .count();
    assert_eq!(flattened, 1, "one flatten step");
    let info = c.rbd_info(&c.pool, &names[1]).unwrap();
    assert!(info.get("parent").is_none(), "flattened: {info}");
    // Each other image: a clone of the snapshot, owned by its volume.
    for (i, n) in names.iter().enumerate().filter(|(i, _)| *i != 1) {
        let info = c.rbd_info(&c.pool, n).expect("the clone exists");
        assert_eq!(info["parent"]["image"], gold.as_str(), "{info}");
        assert_eq!(info["parent"]["snapshot"], "v1", "{info}");
        let want: u64 = if i == 0 { 32 << 20 } else { 16 << 20 };
        assert_eq!(info["size"].as_u64(), Some(want), "{n}");
    }
    // The status says what each image is: a clone of the snapshot, or flattened.
    let image_detail = |v: &str| {
        volume(&s, v)["chain"][0]["detail"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let s = d.wait_for(CONVERGE, "the status to show the flatten", |s| {
        volume(s, &names[1])["chain"][0]["detail"]
            .as_str()
            .is_some_and(|t| t.contains("flattened"))
    });
    assert!(
        image_detail(&names[0]).contains(&format!("clone of {gold_spec}@v1")),
        "{}",
        image_detail(&names[0])
    );
    // Every host reads the golden bytes through SNAP.
    let devices: Vec<PathBuf> = names.iter().map(|n| device_of(&s, n)).collect();
    for (n, dev) in names.iter().zip(&devices) {
        assert!(
            host::reads_pattern(dev, GOLDEN, 0, GOLDEN_BYTES),
            "{n} reads the golden image through {}",
            dev.display()
        );
    }
    assert_eq!(host::size(&devices[0]), Some(32 << 20), "grown");

    // One host writes its own blocks: only its clone changes.
    assert!(host::write_pattern(&devices[0], 0x99, 0, 64 << 10));
    assert!(host::reads_pattern(&devices[0], 0x99, 0, 64 << 10));
    assert!(host::reads_pattern(&devices[1], GOLDEN, 0, GOLDEN_BYTES));
    assert!(host::reads_pattern(&devices[2], GOLDEN, 0, GOLDEN_BYTES));
    let golden_now = head(&c, &gold_spec, GOLDEN_BYTES as usize);
    assert!(golden_now.iter().all(|b| *b == GOLDEN), "the golden image");
    let snapshot_now = head(&c, &format!("{gold_spec}@v1"), GOLDEN_BYTES as usize);
    assert!(snapshot_now.iter().all(|b| *b == GOLDEN), "its snapshot");
    let own = head(&c, &format!("{}/{}", c.pool, names[0]), 64 << 10);
    assert!(
        own.iter().all(|b| *b == 0x99),
        "the writer's clone has its bytes"
    );

    // `v1` dropped from the golden volume under Delete: kept while its clones live (one is
    // flattened, so 49 depend on it), and the plan names them.
    write_like_an_editor(&file, &format!("{}{clones}", golden_volume("")));
    let want = format!(
        "snapshot {gold_spec}@v1 is not removed: {} clone(s)",
        CLONES - 1
    );
    d.wait_for(CONVERGE, "the held golden snapshot in the plan", |s| {
        s["blocked"].as_array().is_some_and(|b| {
            b.iter().any(|x| {
                x["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains(&want) && r.contains(&names[0]))
            })
        })
    });
    let snaps = c.cli_ok("rbd", &["snap", "ls", "--format", "json", &gold_spec]);
    assert!(snaps.contains("\"v1\""), "still there: {snaps}");
}
