//! `examples/lab` itself, converged by `unistor apply` on real agents (the ceph-agent on the
//! one-node cluster, three dpu-agents on emulated SNAP), then changed: a volume grown, one
//! removed under each deletion policy.

use std::path::Path;

use e2e::{issue_pki, show, snap_call, spawn_ceph_agent, spawn_dpu_agent, unistor, Cluster, Procs};

/// Copies `examples/lab` with the agents' real addresses and the test cluster's pools.
fn copy_examples(to: &Path, addrs: &[(&str, String)], c: &Cluster) {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/lab");
    std::fs::create_dir_all(to).unwrap();
    for f in ["ceph.yaml", "dpus.yaml", "volumes.yaml"] {
        let mut text = std::fs::read_to_string(from.join(f)).unwrap();
        for (old, new) in addrs {
            text = text.replace(old, new);
        }
        text = text
            .replace("pool: rbd2", &format!("pool: {}", c.pool2))
            .replace("pool: rbd,", &format!("pool: {},", c.pool))
            .replace("pool: rbd}", &format!("pool: {}}}", c.pool))
            .replace(
                "pools: [rbd, rbd2]",
                &format!("pools: [{}, {}]", c.pool, c.pool2),
            )
            // Image names unique to this run, so reruns against one cluster never collide.
            .replace(
                "image: scratch-host-b",
                &format!("image: scratch-host-b-{}", std::process::id()),
            );
        std::fs::write(to.join(f), text).unwrap();
    }
}

#[test]
fn examples_converge_then_follow_a_change() {
    let c = Cluster::from_env();
    for img in ["db-data", "db-wal", "logs-c"] {
        // A previous run against the same cluster may have left them: start clean.
        let _ = c.cli(
            "rbd",
            &["rm", "--no-progress", &format!("{}/{img}", c.pool)],
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    issue_pki(&pki, &["ceph-1", "dpu-a", "dpu-b", "dpu-c"]);
    let mut procs = Procs::default();
    let ceph = spawn_ceph_agent(&mut procs, &c, "ceph-1", &pki, &dir.path().join("ceph"));
    let mut addrs = vec![("127.0.0.1:7400", ceph)];
    for (d, port) in [
        ("dpu-a", "127.0.0.1:7411"),
        ("dpu-b", "127.0.0.1:7412"),
        ("dpu-c", "127.0.0.1:7413"),
    ] {
        addrs.push((
            port,
            spawn_dpu_agent(&mut procs, d, &pki, &dir.path().join(d)),
        ));
    }
    let m = dir.path().join("manifests");
    copy_examples(&m, &addrs, &c);
    let (ms, ps) = (m.to_str().unwrap(), pki.to_str().unwrap());

    let apply = unistor(&["apply", ms, "--pki-dir", ps, "--auto-approve"]);
    assert!(apply.status.success(), "{}", show(&apply));
    let plan = unistor(&["plan", ms, "--pki-dir", ps]);
    assert_eq!(plan.status.code(), Some(0), "{}", show(&plan));
    let status = unistor(&["status", ms, "--pki-dir", ps]);
    assert!(status.status.success(), "{}", show(&status));
    let subs = snap_call(&dir.path().join("dpu-a/spdk.sock"), "nvme_subsystem_list");
    let ns = subs[0]["namespaces"].as_array().unwrap();
    assert_eq!(ns.len(), 2, "db-data and db-wal on host-a: {subs}");
    assert_eq!(ns[0]["nsid"], 1, "pinned NSID");

    // Grow db-wal; remove logs-c (Trash) and scratch-b (Delete); db-data stays.
    let vols = std::fs::read_to_string(m.join("volumes.yaml")).unwrap();
    let docs: Vec<&str> = vols.split("\n---\n").collect();
    let kept: Vec<String> = docs
        .iter()
        .filter(|d| d.contains("name: db-"))
        .map(|d| d.replace("size: 512Mi", "size: 1Gi"))
        .collect();
    std::fs::write(m.join("volumes.yaml"), kept.join("\n---\n")).unwrap();
    let refused = unistor(&["apply", ms, "--pki-dir", ps, "--auto-approve"]);
    assert_eq!(refused.status.code(), Some(1), "{}", show(&refused));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("--allow-delete"));
    let apply = unistor(&[
        "apply",
        ms,
        "--pki-dir",
        ps,
        "--auto-approve",
        "--allow-delete",
    ]);
    assert!(apply.status.success(), "{}", show(&apply));
    assert_eq!(
        c.rbd_info(&c.pool, "db-wal").unwrap()["size"].as_u64(),
        Some(1 << 30)
    );
    assert!(c.rbd_info(&c.pool, "logs-c").is_none());
    assert!(
        c.cli_ok("rbd", &["trash", "ls", &c.pool])
            .contains("logs-c"),
        "Trash policy"
    );
    assert!(
        !c.cli_ok("rbd", &["ls", &c.pool2])
            .contains(&format!("scratch-host-b-{}", std::process::id())),
        "Delete policy"
    );
    assert!(
        snap_call(&dir.path().join("dpu-c/spdk.sock"), "nvme_subsystem_list")
            .as_array()
            .unwrap()
            .is_empty()
    );
    let plan = unistor(&["plan", ms, "--pki-dir", ps]);
    assert_eq!(plan.status.code(), Some(0), "{}", show(&plan));
    // Clean the Retain volumes' images, which unistor itself never deletes.
    for img in ["db-data", "db-wal"] {
        let _ = c.cli(
            "rbd",
            &["rm", "--no-progress", &format!("{}/{img}", c.pool)],
        );
    }
}
