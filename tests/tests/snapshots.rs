//! Declared snapshots (issue 25) end to end on the real cluster: a volume's schedule (every
//! 10 s, keep 2) run by the daemon keeps exactly `keep` scheduled snapshots as new ones are
//! taken; a named snapshot taken of an attached volume holds the bytes the host had written;
//! a new volume restored from it (a clone) reads those bytes through SNAP while the original
//! goes on with newer ones; and the snapshot, dropped from the manifest under `Delete`, is
//! not removed while the restored volume is its clone: the plan says which volume holds it.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use e2e::host;
use e2e::lab::{volume, Lab};
use e2e::{unique, volume_yaml, write_like_an_editor, Cluster};

const CONVERGE: Duration = Duration::from_secs(300);

/// The snapshots of image `spec` (`pool/image`), names in id order.
fn snapshots(c: &Cluster, spec: &str) -> Vec<String> {
    let out = c.cli_ok("rbd", &["snap", "ls", "--format", "json", spec]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let mut s: Vec<(u64, String)> = v
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .filter_map(|x| Some((x["id"].as_u64()?, x["name"].as_str()?.to_string())))
        .collect();
    s.sort();
    s.into_iter().map(|(_, n)| n).collect()
}

fn scheduled(names: &[String]) -> Vec<&String> {
    names.iter().filter(|n| n.starts_with("auto-")).collect()
}

#[test]
fn a_schedule_keeps_its_count_and_a_restore_reads_the_bytes_of_its_snapshot() {
    let c = Cluster::from_env();
    let lab = Lab::start(&c, 1, &[]);
    lab.write(&c, &[]);
    let db = unique("db");
    let restored = unique("restored");
    let spec = format!("{}/{db}", c.pool);
    let manifest = |names: &str, policy: &str, restore: bool| {
        let mut text = format!(
            "{}  snapshots:\n    names: [{names}]\n    schedule: {{every: 10s, keep: 2}}\n    deletionPolicy: {policy}\n",
            volume_yaml(&db, 0, "16Mi", &c.pool, "Retain")
        );
        if restore {
            text += &format!(
                "{}  source:\n    volumeSnapshot: {{volume: {db}, name: before}}\n",
                volume_yaml(&restored, 0, "16Mi", &c.pool, "Retain")
            );
        }
        write_like_an_editor(&lab.manifests().join("volumes.yaml"), &text);
    };
    manifest("", "Delete", false);
    let d = lab.daemon(&[]);
    let s = d.wait_converged(CONVERGE, 1);
    let dev = std::path::PathBuf::from(volume(&s, &db)["host_device"].as_str().unwrap());

    // The host writes A; the named snapshot is declared and taken; the host writes B.
    assert!(host::write_pattern(&dev, 0xa1, 0, 1 << 20));
    manifest("before", "Delete", false);
    let deadline = Instant::now() + CONVERGE;
    while !snapshots(&c, &spec).contains(&"before".to_string()) {
        assert!(
            Instant::now() < deadline,
            "snapshot `before` was never taken"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(host::write_pattern(&dev, 0xb2, 0, 1 << 20));

    // The schedule: watched until three scheduled snapshots were seen; exactly `keep` (2)
    // stay, and never more than one above it (between a take and its pruning).
    let mut seen = BTreeSet::new();
    let mut most = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let now = snapshots(&c, &spec);
        let auto = scheduled(&now);
        most = most.max(auto.len());
        seen.extend(auto.iter().map(|s| s.to_string()));
        if seen.len() >= 3 && auto.len() == 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "schedule: seen {seen:?}, now {now:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(most <= 3, "at most keep + 1 at any time: {most}");
    assert!(snapshots(&c, &spec).contains(&"before".to_string()));

    // A restore as a new volume: a clone of `before`, reading A; the original reads B.
    manifest("before", "Delete", true);
    let s = d.wait_for(CONVERGE, "the restored volume", |s| {
        volume(s, &restored)["state"] == "ok"
    });
    let info = c.rbd_info(&c.pool, &restored).unwrap();
    assert_eq!(info["parent"]["image"], db.as_str(), "{info}");
    assert_eq!(info["parent"]["snapshot"], "before", "{info}");
    // The status says what the image holds: the named snapshot and the schedule's count
    // (waited for: between a take and its pruning it is one more).
    let want = "snapshots: before, 2 scheduled (every 10s, keep 2)";
    // The kept set by name, as the cluster has it.
    d.wait_for(CONVERGE, "the snapshots in the status", |s| {
        let kept = snapshots(&c, &spec);
        volume(s, &db)["chain"][0]["detail"]
            .as_str()
            .is_some_and(|t| {
                t.contains(want) && scheduled(&kept).iter().all(|n| t.contains(n.as_str()))
            })
    });
    let dom = e2e::browser_dom(&format!("{}/", d.url));
    assert!(
        dom.contains("clone of ") && dom.contains(&format!("{spec}@before")),
        "the dashboard shows the restore's source"
    );
    assert!(
        dom.contains("snapshots: before, "),
        "the dashboard shows the snapshots"
    );
    let rdev = std::path::PathBuf::from(volume(&s, &restored)["host_device"].as_str().unwrap());
    assert!(
        host::reads_pattern(&rdev, 0xa1, 0, 1 << 20),
        "the bytes as of the snapshot"
    );
    assert!(
        host::reads_pattern(&dev, 0xb2, 0, 1 << 20),
        "the original goes on"
    );

    // `before` dropped under Delete: kept while the restore is its clone, and the plan says so.
    manifest("", "Delete", true);
    let want = format!("snapshot {spec}@before is not removed");
    let s = d.wait_for(CONVERGE, "the held snapshot in the plan", |s| {
        s["blocked"].as_array().is_some_and(|b| {
            b.iter().any(|x| {
                x["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains(&want) && r.contains(&restored))
            })
        })
    });
    assert!(
        snapshots(&c, &spec).contains(&"before".to_string()),
        "{}",
        s["blocked"]
    );
    // Its name stays recorded as unistor's; no removal step ran.
    let log = std::fs::read_to_string(&d.log).unwrap();
    assert!(
        !log.lines()
            .any(|l| l.contains("remove snapshot") && l.contains("@before")),
        "no removal of `before` was attempted"
    );
}
