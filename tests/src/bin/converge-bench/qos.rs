//! Per-volume QoS (`--qos`, issue 25): one volume on one simulated DPU, its host's load run with
//! `qemu-img bench` (4 KiB reads for IOPS, 64 KiB reads for bandwidth, 16 in flight) through
//! SNAP's emulator, first without a limit (the floor: what the path delivers unpaced, which
//! must be well above the limits for the figures to mean anything), then under an IOPS limit
//! and a read-bandwidth limit set by the manifest; the achieved rate over about 5 s against
//! each limit. Then the time for a live change of the limit to land in SNAP.

use std::time::{Duration, Instant};

use e2e::host;
use e2e::lab::{volume, Lab};
use e2e::{try_snap_call_with, unique, volume_yaml, write_like_an_editor, Cluster};

const CONVERGE: Duration = Duration::from_secs(300);

/// The rate `count` requests of `size` bytes achieved: requests per second.
fn rate(dev: &std::path::Path, count: u64, size: u64) -> f64 {
    let secs = host::bench(dev, count, 16, size, false).expect("qemu-img bench");
    count as f64 / secs
}

pub fn run(c: &Cluster, iops: u64, mib: u64) {
    let lab = Lab::start(c, 1, &[]);
    lab.write(c, &[]);
    let v = unique("qos");
    let file = lab.manifests().join("volumes.yaml");
    let manifest = |qos: &str| {
        write_like_an_editor(
            &file,
            &format!("{}{qos}", volume_yaml(&v, 0, "256Mi", &c.pool, "Retain")),
        )
    };
    manifest("");
    let d = lab.daemon(&[]);
    let s = d.wait_converged(CONVERGE, 1);
    let dev = std::path::PathBuf::from(volume(&s, &v)["host_device"].as_str().expect("a device"));
    // Written once, so that reads come from the cluster rather than from unallocated extents.
    assert!(host::write_pattern(&dev, 0x5a, 0, 64 << 20));
    println!("converge-bench: QoS on one volume (qemu-img bench, 16 in flight)");
    let floor_iops = rate(&dev, 20_000, 4096);
    let floor_mib = rate(&dev, 2_000, 65536) * 65536.0 / f64::from(1 << 20);
    println!(
        "  floor (no limit): {floor_iops:.0} IOPS of 4 KiB, {floor_mib:.1} MiB/s of 64 KiB reads"
    );
    let sock = lab.socket(0);
    let landed = |want: u64| {
        let b = try_snap_call_with(
            &sock,
            "bdev_get_bdevs",
            serde_json::json!({"name": format!("unistor-{v}")}),
        )
        .unwrap_or_default();
        b[0]["assigned_rate_limits"]["rw_ios_per_sec"].as_u64() == Some(want)
    };
    manifest(&format!("  qos: {{iops: {iops}}}\n"));
    let t = Instant::now();
    d.wait_for(CONVERGE, "the IOPS limit", |_| landed(iops));
    let set = t.elapsed();
    let got = rate(&dev, iops * 5, 4096);
    println!(
        "  limit {iops} IOPS: {got:.0} IOPS = {:.3} of the limit (set in {} ms from the edit)",
        got / iops as f64,
        set.as_millis()
    );
    manifest(&format!("  qos: {{readBandwidth: {mib}Mi}}\n"));
    d.wait_for(CONVERGE, "the bandwidth limit", |_| landed(0));
    let got = rate(&dev, mib * 16 * 5, 65536) * 65536.0 / f64::from(1 << 20);
    println!(
        "  limit {mib} MiB/s read: {got:.1} MiB/s = {:.3} of the limit",
        got / mib as f64
    );
    // A live change (halved, in SPDK's steps of 1000), timed from the edit to SNAP holding it.
    let changed = (iops / 2000 * 1000).max(1000);
    manifest(&format!("  qos: {{iops: {changed}}}\n"));
    let t = Instant::now();
    d.wait_for(CONVERGE, "the changed limit", |_| landed(changed));
    println!(
        "  live change to {changed} IOPS in SNAP: {} ms from the edit",
        t.elapsed().as_millis()
    );
    let got = rate(&dev, changed * 5, 4096);
    println!(
        "  limit {changed} IOPS: {got:.0} IOPS = {:.3} of the limit",
        got / changed as f64
    );
}
