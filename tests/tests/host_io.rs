//! A host that does I/O, end to end on the real cluster: the simulated host of a DPU writes and
//! reads its NVMe namespaces (NBD devices served by the SNAP emulator, with qemu-io), and the
//! bytes are in the RBD image; they survive a SNAP crash (same NSID and UUID after the agent's
//! replay) and an agent restart (the devices stay readable the whole time); a grown volume is
//! seen grown by the host; a volume whose device the host holds open is not removed unless
//! asked to.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use e2e::host::{self, Opener};
use e2e::lab::{volume, Lab};
use e2e::{emulator_pids, show, unique, unistor, wait_until, Cluster};
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(120);

/// The host device of volume `v`, as the daemon's status names it.
fn device_of(s: &Value, v: &str) -> PathBuf {
    PathBuf::from(
        volume(s, v)["host_device"]
            .as_str()
            .unwrap_or_else(|| panic!("no host device for {v}: {}", volume(s, v))),
    )
}

/// The bytes of `len` at `offset` of image `pool/image`, read with `rbd export`.
fn image_bytes(c: &Cluster, pool: &str, image: &str, offset: u64, len: u64) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("export");
    c.cli_ok(
        "rbd",
        &["export", &format!("{pool}/{image}"), file.to_str().unwrap()],
    );
    let all = std::fs::read(&file).unwrap();
    all[offset as usize..(offset + len) as usize].to_vec()
}

/// SIGTERM to the agent at `lab.procs[at]` alone, not its group (its SNAP runs on); reaped.
fn stop_agent_alone(lab: &mut Lab, at: usize) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(lab.procs.0[at].id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let _ = lab.procs.0[at].wait();
}

fn the_device(host_dir: &Path, path: &Path) -> Option<host::Device> {
    host::devices(host_dir).into_iter().find(|d| d.path == path)
}

#[test]
fn host_writes_reach_the_image_and_survive_a_snap_crash_and_a_grow() {
    let c = Cluster::from_env();
    let lab = Lab::start(&c, 1, &[]);
    let v = unique("hostio");
    lab.write(&c, &[(&v, 0, "64Mi", "Retain")]);
    let d = lab.daemon(&[]);
    let s = d.wait_converged(CONVERGE, 1);
    let dev = device_of(&s, &v);
    let seen = the_device(&lab.host_dir(0), &dev).expect("the host lists it");
    assert_eq!(seen.uuid, volume(&s, &v)["uuid"], "{seen:?}");
    assert_eq!(seen.size, 64 << 20);

    // The host writes; the bytes are in the image.
    const AT: u64 = 3 << 20;
    const LEN: u64 = 256 << 10;
    assert!(host::write_pattern(&dev, 0x5a, AT, LEN), "host write");
    let bytes = image_bytes(&c, &c.pool, &v, AT - 4096, LEN + 8192);
    assert!(
        bytes[4096..4096 + LEN as usize].iter().all(|b| *b == 0x5a),
        "the pattern is in the image"
    );
    assert!(
        bytes[..4096].iter().all(|b| *b == 0)
            && bytes[4096 + LEN as usize..].iter().all(|b| *b == 0),
        "and nothing around it"
    );
    // SNAP's watcher is on the image while the bdev exists.
    let status = c.cli_ok(
        "rbd",
        &["status", "--format", "json", &format!("{}/{v}", c.pool)],
    );
    let watchers: Value = serde_json::from_str(&status).unwrap();
    assert_eq!(
        watchers["watchers"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );

    // SNAP crashes; the agent restarts it and replays its ledger: the host finds the same
    // bytes at the same NSID and UUID, on the same device.
    let pids = emulator_pids(&lab.socket(0));
    assert_eq!(pids.len(), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pids[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The new emulator serving the device, not the crashed one's account left behind.
    wait_until(CONVERGE, "SNAP back with the device", || {
        emulator_pids(&lab.socket(0))
            .first()
            .is_some_and(|p| *p != pids[0])
            && the_device(&lab.host_dir(0), &dev).is_some_and(|x| x.nsid == seen.nsid)
            && host::size(&dev).is_some()
    });
    let again = the_device(&lab.host_dir(0), &dev).unwrap();
    assert_eq!((again.nsid, &again.uuid), (seen.nsid, &seen.uuid));
    assert!(
        host::reads_pattern(&dev, 0x5a, AT, LEN),
        "same bytes after the crash"
    );

    // Grown in the manifest: image, bdev and the host's device all show the new size.
    lab.write(&c, &[(&v, 0, "128Mi", "Retain")]);
    let s = d.wait_for(CONVERGE, "the grown volume ok", |s| {
        volume(s, &v)["state"] == "ok" && volume(s, &v)["host_bytes"].as_u64() == Some(128 << 20)
    });
    assert_eq!(volume(&s, &v)["size_bytes"].as_u64(), Some(128 << 20));
    assert_eq!(
        host::size(&dev),
        Some(128 << 20),
        "the host reads the new size"
    );
    assert_eq!(the_device(&lab.host_dir(0), &dev).unwrap().size, 128 << 20);
    assert!(host::reads_pattern(&dev, 0x5a, AT, LEN));
}

#[test]
fn a_device_the_host_holds_open_is_not_removed_unless_asked() {
    let c = Cluster::from_env();
    let lab = Lab::start(&c, 1, &[]);
    let [busy, idle] = ["busy", "idle"].map(unique);
    lab.write(
        &c,
        &[(&busy, 0, "64Mi", "Retain"), (&idle, 0, "64Mi", "Retain")],
    );
    let m = lab.manifests().display().to_string();
    let pki = lab.pki().display().to_string();
    let apply = |extra: &[&str]| {
        let mut a = vec![
            "apply",
            &m,
            "--pki-dir",
            &pki,
            "--owner",
            &lab.owner,
            "--auto-approve",
        ];
        a.extend_from_slice(extra);
        unistor(&a)
    };
    let first = apply(&[]);
    assert_eq!(first.status.code(), Some(0), "{}", show(&first));
    let status = unistor(&[
        "status",
        &m,
        "--pki-dir",
        &pki,
        "--owner",
        &lab.owner,
        "--output",
        "json",
        "--direct",
    ]);
    let s: Value =
        serde_json::from_slice(&status.stdout).unwrap_or_else(|e| panic!("{e}: {}", show(&status)));
    let s = serde_json::json!({ "fleet": s });
    let dev = device_of(&s, &busy);
    let _holder = Opener::open(&dev);
    wait_until(Duration::from_secs(10), "the host to hold it open", || {
        the_device(&lab.host_dir(0), &dev).is_some_and(|d| d.open == 1)
    });

    // Removing the open one is refused, naming the device.
    lab.write(&c, &[(&idle, 0, "64Mi", "Retain")]);
    let refused = apply(&[]);
    assert_ne!(refused.status.code(), Some(0), "{}", show(&refused));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains(&format!("volume {busy} is in use"))
            && err.contains(&dev.display().to_string()),
        "{}",
        show(&refused)
    );
    assert!(
        the_device(&lab.host_dir(0), &dev).is_some(),
        "still attached"
    );

    // The idle one goes without the flag (the other stays in the manifests).
    lab.write(&c, &[(&busy, 0, "64Mi", "Retain")]);
    let gone = apply(&[]);
    assert_eq!(gone.status.code(), Some(0), "{}", show(&gone));
    assert_eq!(host::devices(&lab.host_dir(0)).len(), 1);

    // Asked to, it detaches the open one too.
    lab.write(&c, &[]);
    let forced = apply(&["--allow-in-use", "--allow-empty"]);
    assert_eq!(forced.status.code(), Some(0), "{}", show(&forced));
    assert!(host::devices(&lab.host_dir(0)).is_empty());
}

#[test]
fn a_dpu_agent_restart_leaves_the_hosts_devices_readable_throughout() {
    let c = Cluster::from_env();
    let mut lab = Lab::start(&c, 1, &[]);
    let v = unique("steady");
    lab.write(&c, &[(&v, 0, "64Mi", "Retain")]);
    let d = lab.daemon(&[]);
    let s = d.wait_converged(CONVERGE, 1);
    let dev = device_of(&s, &v);
    assert!(host::write_pattern(&dev, 0x3c, 0, 65536));
    let emulator = emulator_pids(&lab.socket(0));
    let holder = Opener::open(&dev);

    // A reader on the host, all the while.
    let stop = Arc::new(AtomicBool::new(false));
    let (reads, failures) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
    let reader = {
        let (stop, reads, failures, dev) =
            (stop.clone(), reads.clone(), failures.clone(), dev.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                if host::reads_pattern(&dev, 0x3c, 0, 65536) {
                    reads.fetch_add(1, Ordering::SeqCst);
                } else {
                    failures.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
    };
    // The agent alone is stopped (SIGTERM, not its group), then started again.
    stop_agent_alone(&mut lab, 1);
    let during = reads.load(Ordering::SeqCst);
    wait_until(
        Duration::from_secs(10),
        "reads while the agent is down",
        || reads.load(Ordering::SeqCst) >= during + 3,
    );
    lab.start_dpu(0);
    d.wait_for(CONVERGE, "the agent back", |s| {
        s["agents"]
            .as_array()
            .is_some_and(|a| a.iter().all(|a| a["connected"] == true))
    });
    let after = reads.load(Ordering::SeqCst);
    wait_until(Duration::from_secs(10), "reads after the restart", || {
        reads.load(Ordering::SeqCst) >= after + 3
    });
    stop.store(true, Ordering::SeqCst);
    reader.join().unwrap();
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "every read worked ({} reads)",
        reads.load(Ordering::SeqCst)
    );
    assert_eq!(
        emulator_pids(&lab.socket(0)),
        emulator,
        "the same SNAP throughout"
    );
    let mut holder = holder;
    assert!(
        holder.running(),
        "the host's open device was never taken away"
    );
    let s = d.wait_converged(CONVERGE, 1);
    assert_eq!(
        s["fleet"]["dpus"][0]["snap_restarts"].as_u64(),
        Some(0),
        "the new agent adopted SNAP: {}",
        s["fleet"]["dpus"][0]
    );
    assert_eq!(the_device(&lab.host_dir(0), &dev).map(|d| d.open), Some(1));
}

/// The clients (`rbd status` watchers) that have `pool/image` open.
fn watchers(c: &Cluster, pool: &str, image: &str) -> usize {
    let out = c.cli_ok(
        "rbd",
        &["status", "--format", "json", &format!("{pool}/{image}")],
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    v["watchers"].as_array().map_or(0, Vec::len)
}

/// Two DPUs; a volume (named from `prefix`) exposed on dpu 0 and written through host 0
/// (0x5a); then dpu 0's agent alone stopped (its SNAP keeps serving host 0) and the volume moved
/// to dpu 1 in the manifests. The lab, the volume, host 0's device.
fn moved_off_a_silent_dpu(c: &Cluster, prefix: &str) -> (Lab, String, PathBuf) {
    let mut lab = Lab::start(c, 2, &[]);
    let v = unique(prefix);
    lab.write(c, &[(&v, 0, "64Mi", "Retain")]);
    let d = lab.daemon(&[]);
    let s = d.wait_converged(CONVERGE, 1);
    let dev = device_of(&s, &v);
    assert!(host::write_pattern(&dev, 0x5a, 0, 65536));
    drop(d);
    stop_agent_alone(&mut lab, 1);
    lab.write(c, &[(&v, 1, "64Mi", "Retain")]);
    (lab, v, dev)
}

/// One image is never open on two DPUs. dpu 0's agent is stopped (its SNAP still serves host 0)
/// and the manifests move the volume to dpu 1: `plan` and `apply` hold it, naming the silent DPU,
/// and nothing is made on dpu 1 (one watcher, host 1 has no device). Back, dpu 0 lets it go
/// first, then dpu 1 exposes it with the bytes host 0 wrote.
#[test]
fn a_volume_moved_off_a_silent_dpu_is_held_until_that_dpu_reports() {
    let c = Cluster::from_env();
    let (mut lab, v, dev) = moved_off_a_silent_dpu(&c, "moving");
    let (m, p) = (
        lab.manifests().display().to_string(),
        lab.pki().display().to_string(),
    );
    let owner = lab.owner.clone();
    let common = ["--pki-dir", p.as_str(), "--owner", owner.as_str()];
    let plan = unistor(&[&["plan", m.as_str()][..], &common].concat());
    let text = show(&plan);
    assert_eq!(plan.status.code(), Some(1), "{text}");
    let silent = "dpu/dpu-0 is not reporting";
    assert!(text.contains(silent), "{text}");
    assert!(!text.contains("create bdev"), "{text}");
    let apply = unistor(&[&["apply", m.as_str(), "--auto-approve"][..], &common].concat());
    assert_eq!(apply.status.code(), Some(1), "{}", show(&apply));
    assert_eq!(watchers(&c, &c.pool, &v), 1, "open on dpu 0 only");
    assert!(host::devices(&lab.host_dir(1)).is_empty());
    assert!(
        host::reads_pattern(&dev, 0x5a, 0, 65536),
        "host 0 still served"
    );

    // dpu 0 is back: the move goes through, one DPU at a time, the bytes intact.
    lab.start_dpu(0);
    let apply = unistor(&[&["apply", m.as_str(), "--auto-approve"][..], &common].concat());
    assert_eq!(apply.status.code(), Some(0), "{}", show(&apply));
    assert!(host::devices(&lab.host_dir(0)).is_empty());
    let moved = host::devices(&lab.host_dir(1));
    assert_eq!(moved.len(), 1, "{moved:?}");
    assert!(host::reads_pattern(&moved[0].path, 0x5a, 0, 65536));
    assert_eq!(watchers(&c, &c.pool, &v), 1);
}

/// A silent DPU fenced: `unistor fence dpu/dpu-0` takes its SNAP's own cephx identity's OSD caps
/// and blocklists its clients, records the fence in the cluster (shown by `status`); the volume
/// held for it then moves to dpu 1 with the bytes host 0 wrote, and what host 0 tries to write
/// after the fence never reaches the image. Back, dpu 0 lets go of its stale exposure; the
/// unfence gives the identity its caps back and lifts the blocklist.
#[test]
fn a_fenced_dpu_can_no_longer_write_and_its_volume_moves_with_its_bytes() {
    let c = Cluster::from_env();
    let (mut lab, _v, dev) = moved_off_a_silent_dpu(&c, "fenced");
    let (m, p) = (
        lab.manifests().display().to_string(),
        lab.pki().display().to_string(),
    );
    let owner = lab.owner.clone();
    let common = ["--pki-dir", p.as_str(), "--owner", owner.as_str()];
    let run = |args: &[&str]| unistor(&[args, &[m.as_str()], &common].concat());
    let plan = run(&["plan"]);
    assert!(
        show(&plan).contains("dpu/dpu-0 is not reporting"),
        "{}",
        show(&plan)
    );

    let entity = format!("client.{}.dpu-0", lab.snap_id);
    let fence = run(&["fence", "dpu/dpu-0", "--reason", "agent dead since 09:12"]);
    let text = show(&fence);
    assert_eq!(fence.status.code(), Some(0), "{text}");
    assert!(text.contains("fenced off cluster/ceph"), "{text}");
    assert!(
        !text.contains(" 0 client(s) blocklisted"),
        "its SNAP was connected: {text}"
    );
    let caps = c.cli_ok("ceph", &["auth", "get", &entity, "--format", "json"]);
    assert!(!caps.contains("\"osd\""), "no OSD caps left: {caps}");
    let status = run(&["status"]);
    assert!(
        show(&status).contains("FENCED cluster/ceph: fenced")
            && show(&status).contains("agent dead"),
        "{}",
        show(&status)
    );
    // Host 0 writes after the fence: it fails, or never ends; it does not land.
    let late = host::io_within(&dev, &["write -P 17 0 65536"], Duration::from_secs(10));
    assert!(
        late.as_ref().is_none_or(
            |o| !String::from_utf8_lossy(&o.stdout).contains("wrote ") || !o.status.success()
        ),
        "a fenced SNAP wrote: {late:?}"
    );

    eprintln!(
        "fence: {}; host 0's write after it: {}",
        String::from_utf8_lossy(&fence.stdout).trim(),
        match &late {
            None => "never ended (killed after 10 s)".to_string(),
            Some(o) => format!("failed: {}", String::from_utf8_lossy(&o.stdout).trim()),
        }
    );
    // The move goes on to dpu 1 (dpu 0, fenced, no longer holds it back), bytes intact.
    let apply = run(&["apply", "--auto-approve"]);
    let moved = host::devices(&lab.host_dir(1));
    assert_eq!(moved.len(), 1, "{moved:?} {}", show(&apply));
    assert!(
        host::reads_pattern(&moved[0].path, 0x5a, 0, 65536),
        "the bytes of before the fence, not the fenced host's late write"
    );

    // dpu 0 back: its stale exposure goes; then the unfence lifts the blocklist and the caps.
    lab.start_dpu(0);
    let apply = run(&["apply", "--auto-approve"]);
    assert_eq!(apply.status.code(), Some(0), "{}", show(&apply));
    assert!(host::devices(&lab.host_dir(0)).is_empty());
    let unfence = run(&["unfence", "dpu/dpu-0"]);
    assert_eq!(unfence.status.code(), Some(0), "{}", show(&unfence));
    let caps = c.cli_ok("ceph", &["auth", "get", &entity, "--format", "json"]);
    assert!(caps.contains("\"osd\""), "caps restored: {caps}");
    assert!(!show(&run(&["status"])).contains("FENCED"));
    let blocklist = c.cli_ok("ceph", &["osd", "blocklist", "ls", "--format", "json"]);
    for a in text
        .split(['(', ')', ',', ' '])
        .filter(|w| w.contains(":") && w.contains('/'))
    {
        assert!(!blocklist.contains(a), "{a} still blocklisted: {blocklist}");
    }
    assert!(host::reads_pattern(&moved[0].path, 0x5a, 0, 65536));
}
