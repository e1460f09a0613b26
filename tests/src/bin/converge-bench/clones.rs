//! A clone storm (`--clone-storm`, issue 25): every volume of the benchmark is a clone of one
//! golden snapshot (64 MiB, its first 16 MiB a pattern), created in one `unistor apply`; its floor
//! in the same run is the same number of plain `rbd clone` back to back; then every simulated
//! host reads its first 16 MiB through SNAP (8 hosts at a time), and the bytes are checked.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use e2e::{host, unique, Cluster};

use super::{ms, BenchLab};

/// What the golden image holds in its first [`HEAD`] bytes.
pub(super) const PATTERN: u8 = 0x47;
const HEAD: u64 = 16 << 20;

/// Makes the golden image (64 MiB, the pattern in its first 16 MiB) and its snapshot `v1`;
/// returns its name.
pub(super) fn golden(c: &Cluster) -> String {
    let name = unique("golden-os");
    let dir = tempfile::tempdir().expect("tempdir");
    let raw = dir.path().join("os.raw");
    let mut bytes = vec![PATTERN; HEAD as usize];
    bytes.resize(64 << 20, 0);
    std::fs::write(&raw, &bytes).expect("write the golden image");
    let spec = format!("{}/{name}", c.pool);
    c.cli_ok(
        "rbd",
        &["import", "--no-progress", raw.to_str().unwrap(), &spec],
    );
    c.cli_ok("rbd", &["snap", "create", &format!("{spec}@v1")]);
    name
}

/// `n` plain `rbd clone` of the golden snapshot back to back (then removed, not timed).
pub(super) fn floor(c: &Cluster, golden: &str, n: usize) -> Duration {
    let names: Vec<String> = (0..n).map(|i| unique(&format!("cfloor{i}"))).collect();
    let snap = format!("{}/{golden}@v1", c.pool);
    let t = Instant::now();
    for img in &names {
        c.cli_ok(
            "rbd",
            &[
                "clone",
                "--rbd-default-clone-format",
                "2",
                &snap,
                &format!("{}/{img}", c.pool),
            ],
        );
    }
    let took = t.elapsed();
    super::remove_images(c, &names);
    took
}

/// Every host reads its first 16 MiB (8 at a time), checked against the pattern; the time.
pub(super) fn hosts_read(lab: &BenchLab<'_>, dpus: usize) -> Duration {
    let devices: Vec<PathBuf> = (0..dpus)
        .flat_map(|i| host::devices(&lab.dir.path().join(format!("dpu{i}")).join("host")))
        .map(|d| d.path)
        .collect();
    assert_eq!(devices.len(), lab.vols.len(), "every volume has its device");
    let t = Instant::now();
    let bad = std::sync::Mutex::new(vec![]);
    std::thread::scope(|s| {
        for chunk in devices.chunks(devices.len().div_ceil(8).max(1)) {
            let bad = &bad;
            s.spawn(move || {
                for dev in chunk {
                    if !host::reads_pattern(dev, PATTERN, 0, HEAD) {
                        bad.lock().unwrap().push(dev.display().to_string());
                    }
                }
            });
        }
    });
    let bad = bad.into_inner().unwrap();
    assert!(
        bad.is_empty(),
        "hosts that did not read the golden bytes: {bad:?}"
    );
    t.elapsed()
}

/// The storm: apply against its floor, then the hosts' first reads.
pub(super) fn run(lab: &BenchLab<'_>, golden: &str, dpus: usize, snap_floor: Duration) {
    let n = lab.vols.len();
    let floor = floor(lab.c, golden, n);
    println!(
        "converge-bench: clone storm: {n} volumes cloned from {}/{golden}@v1 on {dpus} DPUs",
        lab.c.pool
    );
    let t = Instant::now();
    let converge = lab.apply();
    let read = hosts_read(lab, dpus);
    let all = t.elapsed();
    println!("  floor: {n} x rbd clone back to back: {}", ms(floor));
    println!(
        "  apply / floor (rbd clone + SNAP):    {:.2}x",
        converge.as_secs_f64() / (floor + snap_floor).as_secs_f64()
    );
    println!(
        "  {n} hosts read their first 16 MiB (8 at a time, pattern checked): {} after the apply; {} from the apply's start",
        ms(read),
        ms(all)
    );
}
