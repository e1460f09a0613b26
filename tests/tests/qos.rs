//! Per-volume QoS (issue 25) end to end: a volume declared with an IOPS limit gets it on its
//! bdev in SNAP (`bdev_set_qos_limit`, read back from `bdev_get_bdevs`); the simulated host's
//! reads are paced by it (a lower bound: N reads at L IOPS cannot finish before (N - L/1000) / L
//! seconds, SPDK's one slice of burst aside — not a speed check); a live change lands with no
//! detach (same device, same namespace, no teardown step); the agent's ledger holds the limits
//! and SNAP killed gets them back; a limit changed by hand through
//! SNAP's RPC is put back; removing the field lifts it. The rate held against the limit is
//! measured by `scripts/bench.sh --qos`.

use std::time::Duration;

use e2e::host;
use e2e::lab::{namespaces, volume, Lab};
use e2e::{emulator_pids, try_snap_call_with, unique, volume_yaml, write_like_an_editor, Cluster};

const CONVERGE: Duration = Duration::from_secs(300);

/// SNAP's limits on the bdev of `volume`, as `bdev_get_bdevs` lists them.
fn limits(socket: &std::path::Path, volume: &str) -> serde_json::Value {
    let b = try_snap_call_with(
        socket,
        "bdev_get_bdevs",
        serde_json::json!({"name": format!("unistor-{volume}")}),
    )
    .unwrap_or_default();
    b[0]["assigned_rate_limits"].clone()
}

#[test]
fn a_volume_s_limits_pace_its_host_and_change_live() {
    let c = Cluster::from_env();
    let lab = Lab::start(&c, 1, &[]);
    lab.write(&c, &[]);
    let v = unique("paced");
    let manifest = |qos: &str| {
        write_like_an_editor(
            &lab.manifests().join("volumes.yaml"),
            &format!("{}{qos}", volume_yaml(&v, 0, "64Mi", &c.pool, "Retain")),
        );
    };
    manifest("  qos: {iops: 1000, readBandwidth: 64Mi}\n");
    let d = lab.daemon(&[]);
    let s = d.wait_converged(CONVERGE, 1);
    let sock = lab.socket(0);
    assert_eq!(
        limits(&sock, &v),
        serde_json::json!({"rw_ios_per_sec": 1000, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 64, "w_mbytes_per_sec": 0})
    );
    let bdev_detail = volume(&s, &v)["chain"][1]["detail"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        bdev_detail.contains("QoS 1000 IOPS, 64 MiB/s read"),
        "the status shows the limits: {bdev_detail}"
    );
    // The dashboard's data column says it too (headless chromium, the page after its scripts).
    let dom = e2e::browser_dom(&format!("{}/", d.url));
    assert!(
        dom.contains("QoS 1000 IOPS, 64 MiB/s read"),
        "the dashboard shows the limits"
    );
    let dev = std::path::PathBuf::from(volume(&s, &v)["host_device"].as_str().unwrap());
    let ns_before = namespaces(&sock);
    // Paced: 600 reads at 1000 IOPS take at least 0.59 s (one slice of burst allowed).
    let secs = host::bench(&dev, 600, 8, 4096, false).expect("qemu-img bench");
    assert!(secs >= 0.59, "600 reads at 1000 IOPS in {secs} s");

    // Live change: the limit lands; the device, its namespace and controller stay.
    manifest("  qos: {iops: 20000}\n");
    let want = serde_json::json!({"rw_ios_per_sec": 20000, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 0});
    let s = d.wait_for(CONVERGE, "the new limit", |_| limits(&sock, &v) == want);
    assert_eq!(namespaces(&sock), ns_before, "nothing detached or re-made");
    assert_eq!(
        volume(&s, &v)["host_device"].as_str(),
        Some(dev.to_str().unwrap()),
        "the same device"
    );
    assert!(
        host::reads_pattern(&dev, 0, 0, 4096),
        "the host keeps reading"
    );
    let log = std::fs::read_to_string(&d.log).unwrap();
    assert!(
        log.lines().any(|l| l.contains(" done: ")
            && l.contains("set QoS of bdev")
            && l.contains("20000 IOPS")),
        "one QoS step"
    );
    assert!(
        !log.lines()
            .any(|l| l.contains(" done: ")
                && (l.contains("detach") || l.contains("destroy namespace"))),
        "no detach"
    );

    // The agent's ledger holds the limits (what a replay sets again after a SNAP restart);
    // SNAP killed, its limits are back on the same device.
    let ledger = std::fs::read_to_string(lab.state(0).join("snap-ledger.json")).unwrap();
    let l: serde_json::Value = serde_json::from_str(&ledger).unwrap();
    assert_eq!(
        l["qos"][format!("unistor-{v}")]["rw_ios_per_sec"],
        20000,
        "{ledger}"
    );
    let pids = emulator_pids(&sock);
    assert_eq!(pids.len(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    d.wait_for(CONVERGE, "SNAP back with its limits", |_| {
        emulator_pids(&sock).first().is_some_and(|p| *p != pids[0]) && limits(&sock, &v) == want
    });

    // Changed by hand through SNAP's RPC: put back.
    try_snap_call_with(
        &sock,
        "bdev_set_qos_limit",
        serde_json::json!({"name": format!("unistor-{v}"), "rw_ios_per_sec": 0}),
    )
    .unwrap();
    d.wait_for(CONVERGE, "the limit put back", |_| {
        limits(&sock, &v) == want
    });

    // The field removed: lifted.
    manifest("");
    let none = serde_json::json!({"rw_ios_per_sec": 0, "rw_mbytes_per_sec": 0, "r_mbytes_per_sec": 0, "w_mbytes_per_sec": 0});
    d.wait_for(CONVERGE, "the limits lifted", |_| limits(&sock, &v) == none);
}
