//! `unistor plan` and `unistor apply` end to end: the ceph-agent on the real cluster and two
//! dpu-agents on emulated SNAP (real-Ceph mode), converging manifests from empty, then a changed
//! set; exit codes, the stale saved plan and the empty-manifest guard.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use e2e::{bin, free_port, unique, wait_until, Cluster};
use serde_json::{json, Value};

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn unistor(args: &[&str]) -> Output {
    Command::new(bin("unistor"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run unistor")
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn probe(socket: &Path, method: &str) -> Value {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    s.write_all(
        json!({"jsonrpc": "2.0", "id": 1, "method": method})
            .to_string()
            .as_bytes(),
    )
    .unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str::<Value>(&line).unwrap()["result"].clone()
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
    let p = pki.to_str().unwrap();
    assert!(unistor(&["pki", "init", "--dir", p]).status.success());
    for (n, r) in [
        ("controller", "controller"),
        ("ceph-e2e", "agent"),
        ("dpu-e2e-0", "agent"),
        ("dpu-e2e-1", "agent"),
    ] {
        assert!(
            unistor(&["pki", "issue", "--dir", p, "--name", n, "--role", r])
                .status
                .success()
        );
    }
    let mut procs = vec![];
    let ceph_addr = format!("127.0.0.1:{}", free_port());
    procs.push(
        Command::new(bin("ceph-agent"))
            .args(["--name", "ceph-e2e", "--listen", &ceph_addr, "--pki-dir", p])
            .arg("--state-dir")
            .arg(dir.path().join("ceph-state"))
            .arg("--ceph-conf")
            .arg(&c.conf)
            .arg("--keyring")
            .arg(&c.keyring)
            .args(["--client-id", &c.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut dpu_addrs = vec![];
    for i in 0..2 {
        let addr = format!("127.0.0.1:{}", free_port());
        let state = dir.path().join(format!("dpu{i}"));
        procs.push(
            Command::new(bin("dpu-agent"))
                .args([
                    "--name",
                    &format!("dpu-e2e-{i}"),
                    "--listen",
                    &addr,
                    "--pki-dir",
                    p,
                ])
                .args(["--platform", "simulation", "--poll-interval", "500ms"])
                .arg("--state-dir")
                .arg(&state)
                .arg("--snap-socket")
                .arg(state.join("spdk.sock"))
                .arg("--emulator")
                .arg(bin("snap-emulator"))
                .arg("--emulator-arg=--real-ceph")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        dpu_addrs.push(addr);
    }
    for a in std::iter::once(&ceph_addr).chain(dpu_addrs.iter()) {
        wait_until(Duration::from_secs(30), "agents to listen", || {
            std::net::TcpStream::connect(a).is_ok()
        });
    }
    std::fs::create_dir_all(dir.path().join("manifests")).unwrap();
    Lab {
        dir,
        ceph_addr,
        dpu_addrs: [dpu_addrs[0].clone(), dpu_addrs[1].clone()],
        _procs: Procs(procs),
    }
}

fn write_manifests(lab: &Lab, c: &Cluster, volumes: &[(&str, usize, &str, &str)]) {
    let dir = lab.manifests();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
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
        lab.ceph_addr,
        c.pool,
        unique("snap-e2e"),
        lab.dpu_addrs[0],
        lab.dpu_addrs[1]
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

fn common<'a>(lab: &'a Lab, m: &'a str, pki: &'a str) -> Vec<&'a str> {
    let _ = lab;
    vec![m, "--pki-dir", pki]
}

#[test]
fn plan_and_apply_converge_then_follow_changes() {
    let c = Cluster::from_env();
    let lab = start(&c);
    let keep = unique("keep");
    let grow = unique("grow");
    let gone = unique("gone");
    write_manifests(
        &lab,
        &c,
        &[
            (&keep, 0, "256Mi", "Retain"),
            (&grow, 0, "128Mi", "Retain"),
            (&gone, 1, "64Mi", "Trash"),
        ],
    );
    let m = lab.manifests().display().to_string();
    let pki = lab.pki();
    let args = common(&lab, &m, &pki);

    let plan = unistor(&[&["plan"][..], &args].concat());
    assert_eq!(code(&plan), 2, "changes pending: {}", show(&plan));
    assert!(String::from_utf8_lossy(&plan.stdout).contains("+ dpu/dpu-0 install SNAP"));

    let apply = unistor(&[&["apply", "--auto-approve"][..], &args].concat());
    assert_eq!(code(&apply), 0, "{}", show(&apply));
    let again = unistor(&[&["plan"][..], &args].concat());
    assert_eq!(code(&again), 0, "converged: {}", show(&again));
    let status = unistor(&[&["status"][..], &args].concat());
    assert_eq!(code(&status), 0, "{}", show(&status));
    let text = String::from_utf8_lossy(&status.stdout);
    assert_eq!(text.matches(" ok ").count(), 3, "{text}");

    // Checked independently: images with ownership and policy, namespaces started on the DPUs.
    let info = c.rbd_info(&c.pool, &keep).expect("image created");
    assert_eq!(info["size"].as_u64(), Some(256 << 20));
    let meta: Value = serde_json::from_str(&c.cli_ok(
        "rbd",
        &[
            "image-meta",
            "list",
            "--format",
            "json",
            &format!("{}/{gone}", c.pool),
        ],
    ))
    .unwrap();
    assert_eq!(meta["unistor.deletion-policy"], "Trash");
    let subs = probe(&lab.socket(0), "nvme_subsystem_list");
    let ns: Vec<&Value> = subs
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["namespaces"].as_array().unwrap())
        .collect();
    assert_eq!(ns.len(), 2, "{subs}");
    assert!(subs[0]["controllers"][0]["state"] == "STARTED", "{subs}");

    // A saved plan goes stale when the world changes.
    write_manifests(
        &lab,
        &c,
        &[(&keep, 0, "256Mi", "Retain"), (&grow, 0, "512Mi", "Retain")],
    );
    let saved = lab.dir.path().join("plan.json");
    let plan = unistor(&[&["plan", "--out", saved.to_str().unwrap()][..], &args].concat());
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
    let stale = unistor(&[&["apply", "--plan", saved.to_str().unwrap()][..], &args].concat());
    assert_eq!(code(&stale), 1, "{}", show(&stale));
    assert!(
        String::from_utf8_lossy(&stale.stderr).contains("stale"),
        "{}",
        show(&stale)
    );

    // Applying the changed set: grown, and the removed Trash volume trashed.
    let apply = unistor(&[&["apply", "--auto-approve"][..], &args].concat());
    assert_eq!(code(&apply), 0, "{}", show(&apply));
    assert_eq!(
        c.rbd_info(&c.pool, &grow).unwrap()["size"].as_u64(),
        Some(512 << 20)
    );
    assert!(c.rbd_info(&c.pool, &gone).is_none(), "trashed");
    assert!(c
        .cli_ok("rbd", &["trash", "ls", "--format", "json", &c.pool])
        .contains(&gone));
    assert!(probe(&lab.socket(1), "nvme_subsystem_list")
        .as_array()
        .unwrap()
        .is_empty());

    // A broken link shows in status: the image moved to the trash behind unistor's back; apply
    // restores it.
    c.cli_ok("rbd", &["trash", "mv", &format!("{}/{keep}", c.pool)]);
    let status = unistor(&[&["status"][..], &args].concat());
    assert_eq!(code(&status), 1, "{}", show(&status));
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("is in the trash"),
        "{}",
        show(&status)
    );
    let fix = unistor(&[&["apply", "--auto-approve"][..], &args].concat());
    assert_eq!(code(&fix), 0, "drift is repaired: {}", show(&fix));
    assert!(
        c.rbd_info(&c.pool, &keep).is_some(),
        "restored from the trash"
    );

    // The empty-manifest guard: nothing is detached.
    write_manifests(&lab, &c, &[]);
    let apply = unistor(&[&["apply", "--auto-approve"][..], &args].concat());
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
