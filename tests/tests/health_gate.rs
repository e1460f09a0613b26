//! The Ceph health gate, on a cluster of the test's own (the suite's cluster is shared: making
//! it unhealthy or full would gate every other test): a cluster in HEALTH_ERR halts every write
//! of an apply, which says why and exits 1; a really full OSD (writes to it block) gives a
//! bounded answer, never a hang; healthy again, the same apply converges.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use e2e::{
    fleet_yaml, issue_pki, show, spawn_ceph_agent, spawn_dpu_agent, unique, unistor, volume_yaml,
    wait_until, PrivateCluster, Procs,
};

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// The image's size on the cluster.
fn size(pc: &PrivateCluster, image: &str) -> Option<u64> {
    let (_, out, _) = pc.cluster.cli(
        "rbd",
        &["info", "--format", "json", &format!("rbd/{image}")],
    );
    serde_json::from_str::<serde_json::Value>(&out).ok()?["size"].as_u64()
}

/// Sets the cluster's fullness ratios, in the order given (`ceph osd set-<kind>-ratio`).
fn ratios(pc: &PrivateCluster, set: &[(&str, &str)]) {
    for (kind, value) in set {
        let cmd = format!("set-{kind}-ratio");
        pc.cluster.cli_ok("ceph", &["osd", &cmd, value]);
    }
}

fn write(dir: &Path, fleet: &str, volumes: &[(&str, &str)]) {
    let mut text = fleet.to_string();
    for (name, size) in volumes {
        text.push_str(&volume_yaml(name, 0, size, "rbd", "Retain"));
    }
    std::fs::write(dir.join("fleet.yaml"), text).unwrap();
}

#[test]
fn an_unhealthy_or_full_cluster_gets_no_write_and_the_apply_says_why() {
    let pc = PrivateCluster::up();
    let c = &pc.cluster;
    // A fresh cluster from the project's script is healthy (no insecure global_id reclaim
    // warning): once its placement groups are active, HEALTH_OK with no check at all.
    e2e::wait_until(
        std::time::Duration::from_secs(60),
        "a fresh cluster's HEALTH_OK",
        || pc.health().trim() == "HEALTH_OK",
    );
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    issue_pki(&pki, &["ceph-gate", "dpu-gate-0"]);
    let mut procs = Procs::default();
    let ceph_addr = spawn_ceph_agent(&mut procs, c, "ceph-gate", &pki, &dir.path().join("ceph"));
    let dpu_addr = spawn_dpu_agent(&mut procs, "dpu-gate-0", &pki, &dir.path().join("dpu0"));
    let manifests = dir.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    let snap_id = unique("snap-gate");
    let fleet_of = |ceph: &str, dpu: &str| {
        fleet_yaml("ceph-gate", ceph, "rbd", &snap_id, &[("dpu-gate-0", dpu)])
    };
    let fleet = fleet_of(&ceph_addr, &dpu_addr);
    let (m, p) = (manifests.display().to_string(), pki.display().to_string());
    let run = |cmd: &[&str]| unistor(&[cmd, &[m.as_str(), "--pki-dir", p.as_str()]].concat());
    let (a, b) = (unique("a"), unique("b"));
    write(&manifests, &fleet, &[(&a, "64Mi")]);
    let o = run(&["apply", "--auto-approve"]);
    assert_eq!(code(&o), 0, "healthy, it converges: {}", show(&o));
    // An entry as an older agent wrote it (its own key, the bare volume name), for an image
    // made here: a starting agent must read that image itself.
    let legacy = unique("legacy");
    c.cli_ok(
        "rbd",
        &["create", "--size", "16M", &format!("rbd/{legacy}")],
    );
    c.cli_ok(
        "rados",
        &["-p", "rbd", "setomapval", "unistor.index", &legacy, &legacy],
    );

    // HEALTH_ERR (full ratios out of order): nothing is written, the apply says why, exits 1.
    ratios(&pc, &[("nearfull", "0.97")]);
    wait_until(Duration::from_secs(60), "HEALTH_ERR", || {
        pc.health().starts_with("HEALTH_ERR")
    });
    write(&manifests, &fleet, &[(&a, "128Mi"), (&b, "64Mi")]);
    // The agent reads the cluster's health on its report interval.
    wait_until(Duration::from_secs(60), "the plan to see the gate", || {
        String::from_utf8_lossy(&run(&["plan"]).stdout).contains("health gate")
    });
    let o = run(&["apply", "--auto-approve"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(code(&o), 1, "{}", show(&o));
    assert!(out.starts_with("Held back (2):"), "{}", show(&o));
    assert!(
        out.contains("cluster ceph is closed to writes by the health gate: HEALTH_ERR"),
        "{}",
        show(&o)
    );
    assert!(out.contains("OSD_OUT_OF_ORDER_FULL"), "{}", show(&o));
    assert_eq!(size(&pc, &a), Some(64 << 20), "not grown");
    assert_eq!(size(&pc, &b), None, "not created");
    // `--health-gate off` is the operator's explicit say-so.
    let o = run(&["plan", "--health-gate", "off"]);
    assert_eq!(code(&o), 2, "{}", show(&o));

    // Really full: writes to the OSD block. The apply still ends, says why, and writes nothing.
    ratios(
        &pc,
        &[
            ("nearfull", "0.000001"),
            ("backfillfull", "0.000005"),
            ("full", "0.00001"),
        ],
    );
    wait_until(Duration::from_secs(60), "OSD_FULL", || {
        pc.health().contains("full osd")
    });
    wait_until(
        Duration::from_secs(60),
        "the plan to see the full OSD",
        || String::from_utf8_lossy(&run(&["plan"]).stdout).contains("OSD_FULL"),
    );
    let started = Instant::now();
    let o = run(&["apply", "--auto-approve"]);
    let took = started.elapsed();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(code(&o), 1, "{}", show(&o));
    assert!(out.contains("OSD_FULL"), "{}", show(&o));
    eprintln!("apply on a full cluster answered in {took:?}");
    assert_eq!(size(&pc, &a), Some(64 << 20), "not grown");

    // An older agent's index entry makes a starting agent read that image's metadata. Through
    // librbd the read is a read-only open, which a full cluster still answers: the cluster is
    // observed and the plan holds the volumes back, saying why.
    drop(procs);
    let mut procs = Procs::default();
    let starting = |procs: &mut Procs, state: &str, extra: &[&str]| {
        let (agent, ceph_addr) = e2e::spawn_announced(
            e2e::ceph_agent_command(c, "ceph-gate", e2e::ANY_PORT, &pki, &dir.path().join(state))
                .args(e2e::QUICK_SWEEP)
                .args(["--read-timeout", "3s"])
                .args(extra),
            "listening on ",
        );
        procs.0.push(agent);
        ceph_addr
    };
    let ceph_addr = starting(&mut procs, "ceph2", &[]);
    let dpu_addr = spawn_dpu_agent(&mut procs, "dpu-gate-0", &pki, &dir.path().join("dpu0"));
    let fleet = fleet_of(&ceph_addr, &dpu_addr);
    write(&manifests, &fleet, &[(&a, "128Mi"), (&b, "64Mi")]);
    let o = run(&["plan"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(code(&o), 1, "{}", show(&o));
    assert!(
        out.contains("closed to writes by the health gate"),
        "{}",
        show(&o)
    );
    assert!(!String::from_utf8_lossy(&o.stderr).contains("could not be observed"));

    // Through the CLI (`--no-librbd`), `rbd image-meta list` opens the image for writing and
    // blocks on the full cluster: the read ends at the agent's read deadline, the cluster is
    // Unknown, "timed out", and plan exits 1 — no hang.
    drop(procs);
    let mut procs = Procs::default();
    let ceph_addr = starting(&mut procs, "ceph2b", &["--no-librbd"]);
    let dpu_addr = spawn_dpu_agent(&mut procs, "dpu-gate-0", &pki, &dir.path().join("dpu0"));
    let fleet = fleet_of(&ceph_addr, &dpu_addr);
    write(&manifests, &fleet, &[(&a, "128Mi"), (&b, "64Mi")]);
    let o = run(&["plan"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(code(&o), 1, "{}", show(&o));
    assert!(err.contains("could not be observed"), "{}", show(&o));
    assert!(
        err.contains("cluster/ceph") && err.contains("timed out"),
        "{}",
        show(&o)
    );

    // Healthy again: the same manifests converge.
    ratios(
        &pc,
        &[
            ("full", "0.95"),
            ("backfillfull", "0.90"),
            ("nearfull", "0.85"),
        ],
    );
    wait_until(Duration::from_secs(60), "no longer HEALTH_ERR", || {
        !pc.health().starts_with("HEALTH_ERR")
    });
    // The agent with the short read deadline goes: on a loaded machine a healthy cluster's
    // `ceph df` may take longer than 3 s, and that is not what the rest is about.
    drop(procs);
    let mut procs = Procs::default();
    let ceph_addr = spawn_ceph_agent(&mut procs, c, "ceph-gate", &pki, &dir.path().join("ceph3"));
    let dpu_addr = spawn_dpu_agent(&mut procs, "dpu-gate-0", &pki, &dir.path().join("dpu0"));
    let fleet = fleet_of(&ceph_addr, &dpu_addr);
    write(&manifests, &fleet, &[(&a, "128Mi"), (&b, "64Mi")]);
    wait_until(
        Duration::from_secs(60),
        "the plan to see it healthy",
        || !String::from_utf8_lossy(&run(&["plan"]).stdout).contains("health gate"),
    );
    let o = run(&["apply", "--auto-approve"]);
    assert_eq!(code(&o), 0, "{}", show(&o));
    assert_eq!(size(&pc, &a), Some(128 << 20));
    assert_eq!(size(&pc, &b), Some(64 << 20));
    drop(procs);
}
