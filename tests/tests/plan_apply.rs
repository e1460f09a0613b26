//! `unistor plan` and `unistor apply` end to end: the ceph-agent on the real cluster and two
//! dpu-agents on emulated SNAP (real-Ceph mode), converging manifests from empty, then a changed
//! set; exit codes, the stale saved plan and the empty-manifest guard.

use std::path::{Path, PathBuf};
use std::process::Output;

use e2e::{
    issue_pki, show, snap_call, spawn_ceph_agent, spawn_dpu_agent, unique, unistor, wait_until,
    Cluster, Procs,
};
use serde_json::Value;

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn probe(socket: &Path, method: &str) -> Value {
    snap_call(socket, method)
}

struct Lab {
    dir: tempfile::TempDir,
    ceph_addr: String,
    dpu_addrs: [String; 2],
    _procs: Procs,
}

impl Lab {
    fn pki(&self) -> String {
        self.dir.path().join("pki").display().to_string()
    }
    fn socket(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("dpu{i}/spdk.sock"))
    }
    fn manifests(&self) -> PathBuf {
        self.dir.path().join("manifests")
    }
}

fn start(c: &Cluster) -> Lab {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    issue_pki(&pki, &["ceph-e2e", "dpu-e2e-0", "dpu-e2e-1"]);
    let mut procs = Procs::default();
    let ceph_addr = spawn_ceph_agent(
        &mut procs,
        c,
        "ceph-e2e",
        &pki,
        &dir.path().join("ceph-state"),
    );
    let dpu_addrs = [0, 1].map(|i| {
        spawn_dpu_agent(
            &mut procs,
            &format!("dpu-e2e-{i}"),
            &pki,
            &dir.path().join(format!("dpu{i}")),
        )
    });
    std::fs::create_dir_all(dir.path().join("manifests")).unwrap();
    Lab {
        dir,
        ceph_addr,
        dpu_addrs,
        _procs: procs,
    }
}

fn write_manifests(lab: &Lab, c: &Cluster, volumes: &[(&str, usize, &str, &str)]) {
    let dir = lab.manifests();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // One SNAP identity for the whole test: SNAP's watch is recognised by it.
    let snap_id = format!("snap-e2e-{}", std::process::id());
    let base = format!(
        "apiVersion: unistor.io/v1alpha1
kind: CephCluster
metadata: {{name: ceph}}
spec:
  agent: {{name: ceph-e2e, address: '{}'}}
  pools: [{}]
  snapIdentity: {{clientId: {}}}
---
apiVersion: unistor.io/v1alpha1
kind: Dpu
metadata: {{name: dpu-0}}
spec:
  agent: {{name: dpu-e2e-0, address: '{}'}}
  host: host-0
  snap: {{version: 4.5.0, functions: {{pfs: 1, vfsPerPf: 2}}}}
---
apiVersion: unistor.io/v1alpha1
kind: Dpu
metadata: {{name: dpu-1}}
spec:
  agent: {{name: dpu-e2e-1, address: '{}'}}
  host: host-1
  snap: {{version: 4.5.0, functions: {{pfs: 1, vfsPerPf: 2}}}}
",
        lab.ceph_addr, c.pool, snap_id, lab.dpu_addrs[0], lab.dpu_addrs[1]
    );
    std::fs::write(dir.join("fleet.yaml"), base).unwrap();
    let mut vols = String::new();
    for (name, host, size, policy) in volumes {
        vols.push_str(&format!(
            "---\napiVersion: unistor.io/v1alpha1\nkind: Volume\nmetadata: {{name: {name}}}\nspec:\n  host: host-{host}\n  size: {size}\n  rbd: {{cluster: ceph, pool: {}}}\n  deletionPolicy: {policy}\n  trashRetention: 1h\n",
            c.pool
        ));
    }
    std::fs::write(dir.join("volumes.yaml"), vols).unwrap();
}

/// Manifests, certificates, and an owner of our own: other tests share the cluster, and a
/// deployment only ever touches the images it owns.
fn common<'a>(m: &'a str, pki: &'a str, owner: &'a str) -> Vec<&'a str> {
    vec![m, "--pki-dir", pki, "--owner", owner]
}

/// One lab and its volumes through a story: converge, go stale, change, repair, refuse.
struct Scenario<'a> {
    c: &'a Cluster,
    lab: Lab,
    keep: String,
    grow: String,
    gone: String,
    manifests: String,
    pki: String,
    owner: String,
}

impl Scenario<'_> {
    /// `unistor` with `cmd` then the manifests, certificates and owner.
    fn unistor(&self, cmd: &[&str]) -> Output {
        unistor(&[cmd, &common(&self.manifests, &self.pki, &self.owner)].concat())
    }
}

#[test]
fn plan_and_apply_converge_then_follow_changes() {
    let c = Cluster::from_env();
    let lab = start(&c);
    let [keep, grow, gone] = ["keep", "grow", "gone"].map(unique);
    write_manifests(
        &lab,
        &c,
        &[
            (&keep, 0, "256Mi", "Retain"),
            (&grow, 0, "128Mi", "Retain"),
            (&gone, 1, "64Mi", "Trash"),
        ],
    );
    let s = Scenario {
        c: &c,
        manifests: lab.manifests().display().to_string(),
        pki: lab.pki().to_string(),
        owner: unique("owner"),
        lab,
        keep,
        grow,
        gone,
    };
    converges_from_empty(&s);
    a_saved_plan_goes_stale(&s);
    the_changed_set_applies(&s);
    a_broken_link_is_repaired(&s);
    a_refused_shrink_exits_1(&s);
    an_image_made_outside_is_adopted_only_when_asked(&s);
    an_empty_manifest_set_detaches_nothing(&s);
}

/// Marks volume `name` in the written manifests as adopting its image (`rbd: {adopt: true}`).
fn adopting(lab: &Lab, pool: &str, name: &str) {
    let path = lab.manifests().join("volumes.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    let at = text.find(&format!("metadata: {{name: {name}}}")).unwrap();
    let (head, tail) = text.split_at(at);
    let from = format!("pool: {pool}}}");
    assert!(tail.contains(&from));
    let tail = tail.replacen(&from, &format!("pool: {pool}, adopt: true}}"), 1);
    std::fs::write(&path, format!("{head}{tail}")).unwrap();
}

/// An image made outside unistor (`rbd create`): `plan` and `apply` say it is not owned and exit
/// 1, never create over it or touch it; with `adopt: true` the plan adopts it as its own step,
/// refused while somebody has it open; then `apply` takes it over, grown to the manifest's size,
/// and the image carries the owner's keys.
fn an_image_made_outside_is_adopted_only_when_asked(s: &Scenario<'_>) {
    let (c, lab) = (s.c, &s.lab);
    let legacy = unique("legacy");
    let spec = format!("{}/{legacy}", c.pool);
    c.cli_ok("rbd", &["create", "--size", "64M", &spec]);
    let volumes = [
        (&s.keep[..], 0, "256Mi", "Retain"),
        (&s.grow, 0, "512Mi", "Retain"),
        (&legacy, 1, "128Mi", "Retain"),
    ];
    write_manifests(lab, c, &volumes);
    for cmd in [&["plan"][..], &["apply", "--auto-approve"]] {
        let o = s.unistor(cmd);
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(code(&o), 1, "{cmd:?}: {}", show(&o));
        assert!(out.starts_with("Held back (1):"), "{cmd:?}: {}", show(&o));
        assert!(out.contains("carries no owner"), "{cmd:?}: {}", show(&o));
        assert!(
            !out.contains(&format!("create image {spec}")),
            "{cmd:?}: {}",
            show(&o)
        );
    }
    let meta = c.cli_ok("rbd", &["image-meta", "list", "--format", "json", &spec]);
    assert!(!meta.contains("unistor"), "untouched: {meta}");
    // Somebody has it open: adoption is refused, with the reason.
    adopting(lab, &c.pool, &legacy);
    let mut watch = c.command("rbd");
    // `rbd watch` holds its watch until its standard input ends: a pipe kept open.
    watch
        .args(["watch", &spec])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    std::os::unix::process::CommandExt::process_group(&mut watch, 0);
    let watcher = Procs(vec![watch.spawn().unwrap()]);
    let watched = || {
        let st = c.cli("rbd", &["status", "--format", "json", &spec]).1;
        serde_json::from_str::<Value>(&st)
            .ok()
            .and_then(|v| v["watchers"].as_array().map(|w| !w.is_empty()))
    };
    wait_until(
        std::time::Duration::from_secs(30),
        "rbd watch holds the image",
        || watched() == Some(true),
    );
    let o = s.unistor(&["plan"]);
    assert_eq!(code(&o), 1, "{}", show(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("in use"),
        "{}",
        show(&o)
    );
    drop(watcher);
    wait_until(
        std::time::Duration::from_secs(60),
        "the watch is gone",
        || watched() == Some(false),
    );
    // Asked and free: its own step in the plan, then applied.
    let o = s.unistor(&["plan"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(code(&o), 2, "{}", show(&o));
    assert!(out.contains(&format!("adopt image {spec}")), "{}", show(&o));
    assert!(
        !out.contains(&format!("create image {spec}")),
        "{}",
        show(&o)
    );
    let o = s.unistor(&["apply", "--auto-approve"]);
    assert_eq!(code(&o), 0, "{}", show(&o));
    let meta: Value =
        serde_json::from_str(&c.cli_ok("rbd", &["image-meta", "list", "--format", "json", &spec]))
            .unwrap();
    assert_eq!(meta["unistor.managed-by"], s.owner.as_str(), "{meta}");
    assert_eq!(meta["unistor.volume"], legacy.as_str(), "{meta}");
    assert_eq!(
        c.rbd_info(&c.pool, &legacy).unwrap()["size"].as_u64(),
        Some(128 << 20)
    );
    let o = s.unistor(&["plan"]);
    assert_eq!(code(&o), 0, "{}", show(&o));
}

/// A shrink is refused: `plan` and `apply` lead with it and exit 1, never "No changes" and 0.
fn a_refused_shrink_exits_1(s: &Scenario<'_>) {
    let (c, lab) = (s.c, &s.lab);
    write_manifests(
        lab,
        c,
        &[
            (&s.keep, 0, "128Mi", "Retain"),
            (&s.grow, 0, "512Mi", "Retain"),
        ],
    );
    for cmd in [&["plan"][..], &["apply", "--auto-approve"]] {
        let o = s.unistor(cmd);
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(code(&o), 1, "{cmd:?}: {}", show(&o));
        assert!(out.starts_with("Held back (1):"), "{cmd:?}: {}", show(&o));
        assert!(out.contains("shrinking"), "{cmd:?}: {}", show(&o));
        assert!(!out.contains("No changes"), "{cmd:?}: {}", show(&o));
    }
    assert_eq!(
        c.rbd_info(&c.pool, &s.keep).unwrap()["size"].as_u64(),
        Some(256 << 20),
        "never shrunk"
    );
    write_manifests(
        lab,
        c,
        &[
            (&s.keep, 0, "256Mi", "Retain"),
            (&s.grow, 0, "512Mi", "Retain"),
        ],
    );
    let back = s.unistor(&["plan"]);
    assert_eq!(code(&back), 0, "{}", show(&back));
}

/// `plan` shows the work, `apply` does it, `plan` is then empty and `status` ok; checked independently on the cluster and on SNAP.
fn converges_from_empty(s: &Scenario<'_>) {
    let c = s.c;
    let lab = &s.lab;
    let keep = s.keep.as_str();
    let gone = s.gone.as_str();
    let plan = s.unistor(&["plan"]);
    assert_eq!(code(&plan), 2, "changes pending: {}", show(&plan));
    assert!(String::from_utf8_lossy(&plan.stdout).contains("+ dpu/dpu-0 install SNAP"));

    let apply = s.unistor(&["apply", "--auto-approve"]);
    assert_eq!(code(&apply), 0, "{}", show(&apply));
    let again = s.unistor(&["plan"]);
    assert_eq!(code(&again), 0, "converged: {}", show(&again));
    let status = s.unistor(&["status"]);
    assert_eq!(code(&status), 0, "{}", show(&status));
    let text = String::from_utf8_lossy(&status.stdout);
    let volumes_ok = text
        .lines()
        .filter(|l| l.contains(" ok ") && l.contains(" nsid "))
        .count();
    assert_eq!(volumes_ok, 3, "{text}");

    // Checked independently: images with ownership and policy, namespaces started on the DPUs.
    let info = c.rbd_info(&c.pool, keep).expect("image created");
    assert_eq!(info["size"].as_u64(), Some(256 << 20));
    // The policy is in the pool's unistor index, read back raw with `rados getomapval`.
    let entry = c.index_entry(&c.pool, gone).expect("indexed");
    assert_eq!(entry["policy"], "Trash", "{entry}");
    let subs = probe(&lab.socket(0), "nvme_subsystem_list");
    let ns: Vec<&Value> = subs
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["namespaces"].as_array().unwrap())
        .collect();
    assert_eq!(ns.len(), 2, "{subs}");
    assert!(subs[0]["controllers"][0]["state"] == "STARTED", "{subs}");
}

/// A saved plan is refused once the world changed since it was made.
fn a_saved_plan_goes_stale(s: &Scenario<'_>) {
    let c = s.c;
    let lab = &s.lab;
    let keep = s.keep.as_str();
    let grow = s.grow.as_str();
    // A saved plan goes stale when the world changes.
    write_manifests(
        lab,
        c,
        &[(keep, 0, "256Mi", "Retain"), (grow, 0, "512Mi", "Retain")],
    );
    let saved = lab.dir.path().join("plan.json");
    let plan = s.unistor(&["plan", "--out", saved.to_str().unwrap()]);
    assert_eq!(code(&plan), 2, "{}", show(&plan));
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(text.contains("~ cluster/ceph grow image"), "{text}");
    assert!(
        text.contains("- dpu/dpu-1 destroy namespace") && text.contains("move image"),
        "{text}"
    );
    c.cli_ok(
        "rbd",
        &[
            "resize",
            "--no-progress",
            "--size",
            "192M",
            &format!("{}/{grow}", c.pool),
        ],
    );
    // The agent's sweep finds the resize, within its bound (which grows with the pool).
    wait_until(
        c.sweep_bound(&c.pool),
        "the sweep to see the resize",
        || {
            let p = s.unistor(&["plan"]);
            String::from_utf8_lossy(&p.stdout).contains("192Mi -> 512Mi")
        },
    );
    let stale = s.unistor(&["apply", "--plan", saved.to_str().unwrap()]);
    assert_eq!(code(&stale), 1, "{}", show(&stale));
    assert!(
        String::from_utf8_lossy(&stale.stderr).contains("stale"),
        "{}",
        show(&stale)
    );
}

/// The changed set: grown (for the host too) and the removed Trash volume trashed.
fn the_changed_set_applies(s: &Scenario<'_>) {
    let c = s.c;
    let lab = &s.lab;
    let grow = s.grow.as_str();
    let gone = s.gone.as_str();
    // Applying the changed set: grown, and the removed Trash volume trashed.
    let apply = s.unistor(&["apply", "--auto-approve"]);
    assert_eq!(code(&apply), 0, "{}", show(&apply));
    assert_eq!(
        c.rbd_info(&c.pool, grow).unwrap()["size"].as_u64(),
        Some(512 << 20)
    );
    // The host sees the new size too: SNAP's bdev followed the image (`bdev_rbd_resize`), and
    // only then is the plan empty and the volume ok at 512Mi.
    let bdevs = probe(&lab.socket(0), "bdev_get_bdevs");
    let b = bdevs
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == format!("unistor-{grow}"))
        .unwrap_or_else(|| panic!("bdev for {grow}: {bdevs}"));
    assert_eq!(
        b["num_blocks"].as_u64().unwrap() * b["block_size"].as_u64().unwrap(),
        512 << 20,
        "{b}"
    );
    let after = s.unistor(&["plan"]);
    assert_eq!(code(&after), 0, "{}", show(&after));
    let status = s.unistor(&["status"]);
    assert!(
        String::from_utf8_lossy(&status.stdout)
            .lines()
            .any(|l| l.starts_with(grow) && l.contains("512Mi") && l.contains(" ok ")),
        "{}",
        show(&status)
    );
    assert!(c.rbd_info(&c.pool, gone).is_none(), "trashed");
    assert!(c
        .cli_ok("rbd", &["trash", "ls", "--format", "json", &c.pool])
        .contains(gone));
    assert!(probe(&lab.socket(1), "nvme_subsystem_list")
        .as_array()
        .unwrap()
        .is_empty());
}

/// An image trashed behind unistor's back shows in status, and apply restores it.
fn a_broken_link_is_repaired(s: &Scenario<'_>) {
    let c = s.c;
    let keep = s.keep.as_str();
    // A broken link shows in status: the image moved to the trash behind unistor's back; apply
    // restores it.
    c.cli_ok("rbd", &["trash", "mv", &format!("{}/{keep}", c.pool)]);
    // Found by the agent's sweep (its pool listings), within its bound.
    wait_until(
        c.sweep_bound(&c.pool),
        "the sweep to see the trash move",
        || {
            let s = s.unistor(&["status"]);
            String::from_utf8_lossy(&s.stdout).contains("is in the trash")
        },
    );
    let status = s.unistor(&["status"]);
    assert_eq!(code(&status), 1, "{}", show(&status));
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("is in the trash"),
        "{}",
        show(&status)
    );
    let fix = s.unistor(&["apply", "--auto-approve"]);
    assert_eq!(code(&fix), 0, "drift is repaired: {}", show(&fix));
    assert!(
        c.rbd_info(&c.pool, keep).is_some(),
        "restored from the trash"
    );
}

/// The empty-manifest guard: nothing is detached.
fn an_empty_manifest_set_detaches_nothing(s: &Scenario<'_>) {
    let c = s.c;
    let lab = &s.lab;
    // The empty-manifest guard: nothing is detached.
    write_manifests(lab, c, &[]);
    let apply = s.unistor(&["apply", "--auto-approve"]);
    assert_eq!(code(&apply), 1, "{}", show(&apply));
    assert!(
        String::from_utf8_lossy(&apply.stderr).contains("--allow-empty"),
        "{}",
        show(&apply)
    );
    let subs = probe(&lab.socket(0), "nvme_subsystem_list");
    assert_eq!(
        subs[0]["namespaces"].as_array().unwrap().len(),
        2,
        "still attached"
    );
}
