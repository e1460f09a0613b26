//! The chaos suite: faults injected into a lab on the real Ceph cluster (a ceph-agent, simulated
//! DPUs — dpu-agent + SNAP emulator in real-Ceph mode, each with a simulated host), each loop
//! followed by a re-run to convergence and the same invariants:
//!
//! - no duplicate bdev, no NSID twice in a subsystem, no UUID twice in the fleet;
//! - no image open on two DPUs (sampled after every fault, and by `rbd status`);
//! - every wanted volume exposed on its DPU, its image live with this deployment's keys;
//! - the pool's index and the live images carrying this deployment's keys match one to one;
//! - every removed volume's image kept, trashed or deleted as its policy says;
//! - every kept volume's bytes, written through its host before the faults, read back.
//!
//! Loops (seeded, bounded in iterations and time): the controller SIGKILLed part way through
//! create, grow, move and remove plans; the ceph-agent's process group SIGKILLed during creates
//! and removals; two controllers with one certificate (the watch daemon and a CI `apply`); the
//! daemon's link to a DPU blackholed (sockets left open) while a volume moves off it; a
//! dpu-agent SIGKILLed between SNAP's change and its ledger, then SNAP killed with no controller
//! connected. Prints the seed and `N passed, M failed`; exits 1 when any failed.
//!
//! Run it with `scripts/chaos.sh` (a private cluster) or by hand with `UNISTOR_CEPH_*` set:
//! `cargo run -p e2e --bin chaos -- --quick --seed 7`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e::lab::{namespaces, Lab};
use e2e::{
    bin, ceph_agent_command, emulator_pids, host, reconciled, show, snap_call, spawn_announced,
    try_snap_call, unique, Cluster, QUICK_SWEEP,
};
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;

#[derive(Debug, clap::Parser)]
struct Args {
    /// Seed of every random choice (the time when absent); printed, to replay a run.
    #[arg(long)]
    seed: Option<u64>,
    /// A few iterations of each loop (the test suite's run).
    #[arg(long)]
    quick: bool,
    /// Iterations of the controller-kill loop (the others scale from it).
    #[arg(long, default_value_t = 20)]
    iterations: usize,
    /// Run only these loops (comma-separated: controller, ceph-agent, two-controllers,
    /// osd-pause, paused-controller, partition, dpu-agent, clock); all when absent.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Stop starting iterations after this long.
    #[arg(long, default_value = "40m", value_parser = humantime::parse_duration)]
    max_time: Duration,
}

/// Every random choice, from the run's seed (a run replays from it).
type Rng = fastrand::Rng;

/// A number below `n` (0 when `n` is 0).
fn below(rng: &mut Rng, n: u64) -> u64 {
    rng.u64(..n.max(1))
}

/// A wanted volume as the suite tracks it.
#[derive(Debug, Clone)]
struct Vol {
    dpu: usize,
    size_mib: u64,
    policy: &'static str,
    /// The byte written through its host, once it was exposed.
    pattern: Option<u8>,
}

const POLICIES: [&str; 3] = ["Retain", "Trash", "Delete"];
/// What each volume's host writes, and reads back.
const SPAN: u64 = 64 * 1024;

struct World<'c> {
    c: &'c Cluster,
    lab: Lab,
    /// Position in `lab.procs` of the ceph-agent and of each DPU's agent.
    ceph_proc: usize,
    dpu_procs: Vec<usize>,
    vols: BTreeMap<String, Vol>,
    removed: Vec<(String, &'static str)>,
    prefix: String,
    next: usize,
}

impl<'c> World<'c> {
    fn new(c: &'c Cluster, dpus: usize, dpu_args: &[&str], prefix: &str) -> Self {
        Self::new_with_env(c, dpus, dpu_args, prefix, &[])
    }

    /// [`World::new`], every agent with `env` set too.
    fn new_with_env(
        c: &'c Cluster,
        dpus: usize,
        dpu_args: &[&str],
        prefix: &str,
        env: &[(String, std::path::PathBuf)],
    ) -> Self {
        let lab = Lab::start_with_env(c, dpus, dpu_args, env);
        Self {
            c,
            lab,
            ceph_proc: 0,
            dpu_procs: (1..=dpus).collect(),
            vols: BTreeMap::new(),
            removed: vec![],
            prefix: unique(prefix),
            next: 0,
        }
    }

    fn write(&self) {
        let sizes: Vec<String> = self
            .vols
            .values()
            .map(|v| format!("{}Mi", v.size_mib))
            .collect();
        let list: Vec<(&str, usize, &str, &str)> = self
            .vols
            .iter()
            .zip(&sizes)
            .map(|((n, v), s)| (n.as_str(), v.dpu, s.as_str(), v.policy))
            .collect();
        self.lab.write(self.c, &list);
    }

    fn add(&mut self, rng: &mut Rng) -> String {
        let name = format!("{}-{}", self.prefix, self.next);
        self.next += 1;
        let dpu = below(rng, self.dpu_procs.len() as u64) as usize;
        let policy = POLICIES[below(rng, 3) as usize];
        self.vols.insert(
            name.clone(),
            Vol {
                dpu,
                size_mib: 64,
                policy,
                pattern: None,
            },
        );
        name
    }

    /// Removes a volume, never the last one (an empty manifest set is refused by design).
    fn remove(&mut self, rng: &mut Rng) {
        if self.vols.len() < 2 {
            return;
        }
        if let Some(name) = self.pick(rng) {
            let v = self.vols.remove(&name).expect("picked");
            self.removed.push((name, v.policy));
        }
    }

    fn pick(&self, rng: &mut Rng) -> Option<String> {
        let n = self.vols.len() as u64;
        (n > 0).then(|| {
            self.vols
                .keys()
                .nth(below(rng, n) as usize)
                .expect("in range")
                .clone()
        })
    }

    fn args(&self) -> Vec<String> {
        vec![
            self.lab.manifests().display().to_string(),
            "--pki-dir".into(),
            self.lab.pki().display().to_string(),
            "--owner".into(),
            self.lab.owner.clone(),
            "--auto-approve".into(),
            "--allow-delete".into(),
            // The loops remove batches (ten at a time in the full run).
            "--max-removals".into(),
            "50".into(),
        ]
    }

    /// `unistor apply`, started (its own process group) but not waited for.
    fn spawn_apply(&self, extra: &[&str]) -> Child {
        let mut cmd = Command::new(bin("unistor"));
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        // What it printed, for a failed iteration's post-mortem (CHAOS_LOGS=DIR).
        let (out, err) = match std::env::var_os("CHAOS_LOGS") {
            Some(dir) => {
                let at = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis());
                let f = |ext: &str| {
                    std::fs::File::create(Path::new(&dir).join(format!("apply-{at}.{ext}")))
                        .map(Stdio::from)
                        .unwrap_or_else(|_| Stdio::null())
                };
                (f("out"), f("err"))
            }
            None => (Stdio::null(), Stdio::null()),
        };
        cmd.arg("apply")
            .args(self.args())
            .args(extra)
            .arg("--verbose")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("run unistor apply")
    }

    /// `unistor apply --verbose` with its stdout and stderr piped (one line per step as it
    /// ends; its log, each failed attempt included).
    fn spawn_apply_piped(&self) -> Child {
        let mut cmd = Command::new(bin("unistor"));
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.arg("apply")
            .args(self.args())
            .arg("--verbose")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run unistor apply")
    }

    /// Applies until converged (a few passes: a fault may leave work for several).
    fn converge(&self) -> Result<(), String> {
        let mut last = String::new();
        for _ in 0..4 {
            let o = Command::new(bin("unistor"))
                .arg("apply")
                .args(self.args())
                .args(["--lease-wait", "3m"])
                .stdin(Stdio::null())
                .output()
                .expect("run unistor apply");
            if o.status.success() {
                return Ok(());
            }
            last = show(&o);
        }
        Err(format!("did not converge: {last}"))
    }

    /// The host of every newly exposed volume writes its pattern.
    fn write_patterns(&mut self, rng: &mut Rng) -> Result<(), String> {
        let todo: Vec<String> = self
            .vols
            .iter()
            .filter(|(_, v)| v.pattern.is_none())
            .map(|(n, _)| n.clone())
            .collect();
        for name in todo {
            let pattern = 1 + below(rng, 250) as u8;
            let dev = self.device(&name)?;
            if !host::write_pattern(&dev, pattern, 0, SPAN) {
                return Err(format!("{name}: the host cannot write {}", dev.display()));
            }
            self.vols.get_mut(&name).expect("listed").pattern = Some(pattern);
        }
        Ok(())
    }

    /// The host device of volume `name` (on its DPU, by its namespace's UUID).
    fn device(&self, name: &str) -> Result<std::path::PathBuf, String> {
        let v = &self.vols[name];
        let bdev = format!("unistor-{name}");
        let uuid = namespaces(&self.lab.socket(v.dpu))
            .into_iter()
            .find(|(b, _, _)| *b == bdev)
            .map(|(_, _, u)| u)
            .ok_or_else(|| format!("{name}: no namespace on dpu-{}", v.dpu))?;
        // The host sees a device once its controller is started: polled, bounded.
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            let found = host::devices(&self.lab.host_dir(v.dpu))
                .into_iter()
                .find(|d| d.uuid == uuid);
            match found {
                Some(d) => return Ok(d.path),
                None if Instant::now() > until => {
                    return Err(format!("{name}: host-{} has no device {uuid}", v.dpu))
                }
                None => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// (DPU, pool, image) of every bdev in the fleet.
    fn bdevs(&self) -> Vec<(usize, String, String)> {
        let mut out = vec![];
        for d in 0..self.dpu_procs.len() {
            let Ok(list) = try_snap_call(&self.lab.socket(d), "bdev_get_bdevs") else {
                continue;
            };
            for b in list.as_array().into_iter().flatten() {
                let rbd = &b["driver_specific"]["rbd"];
                out.push((
                    d,
                    rbd["pool_name"].as_str().unwrap_or("?").to_string(),
                    rbd["rbd_name"].as_str().unwrap_or("?").to_string(),
                ));
            }
        }
        out
    }

    /// No image open on two DPUs, now.
    fn one_dpu_per_image(&self) -> Result<(), String> {
        let mut on: BTreeMap<(String, String), BTreeSet<usize>> = BTreeMap::new();
        for (d, pool, image) in self.bdevs() {
            on.entry((pool, image)).or_default().insert(d);
        }
        match on.iter().find(|(_, d)| d.len() > 1) {
            Some(((p, i), d)) => Err(format!("{p}/{i} open on DPUs {d:?}")),
            None => Ok(()),
        }
    }

    /// This run's live images with their sizes in bytes (one `rbd ls --long`).
    fn live_sizes(&self) -> BTreeMap<String, u64> {
        let out = self
            .c
            .cli_ok("rbd", &["ls", "--long", "--format", "json", &self.c.pool]);
        let all: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap_or_default();
        all.into_iter()
            .filter_map(|i| {
                let name = i["image"].as_str()?;
                // Snapshots are listed too; images only.
                if i.get("snapshot").is_some() || !name.starts_with(&self.prefix) {
                    return None;
                }
                Some((name.to_string(), i["size"].as_u64().unwrap_or(0)))
            })
            .collect()
    }

    fn trashed(&self) -> BTreeSet<String> {
        let out = self
            .c
            .cli_ok("rbd", &["trash", "ls", "--format", "json", &self.c.pool]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["name"].as_str().map(str::to_string))
            .collect()
    }

    fn keys(&self, image: &str) -> BTreeMap<String, String> {
        let spec = format!("{}/{image}", self.c.pool);
        let out = self
            .c
            .cli_ok("rbd", &["image-meta", "list", "--format", "json", &spec]);
        if out.trim().is_empty() {
            return BTreeMap::new();
        }
        serde_json::from_str(&out).unwrap_or_default()
    }

    fn watchers(&self, image: &str) -> usize {
        let spec = format!("{}/{image}", self.c.pool);
        let out = self.c.cli_ok("rbd", &["status", "--format", "json", &spec]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
        v["watchers"].as_array().map_or(0, Vec::len)
    }

    /// Every invariant of the module's docs.
    fn check(&self) -> Result<(), String> {
        self.one_dpu_per_image()?;
        let bdevs = self.bdevs();
        let mut seen = BTreeSet::new();
        for b in &bdevs {
            if !seen.insert(b) {
                return Err(format!("bdev twice: {b:?}"));
            }
        }
        let mut uuids = BTreeSet::new();
        for d in 0..self.dpu_procs.len() {
            let subs = snap_call(&self.lab.socket(d), "nvme_subsystem_list");
            for s in subs.as_array().into_iter().flatten() {
                let mut nsids = BTreeSet::new();
                for n in s["namespaces"].as_array().into_iter().flatten() {
                    if !nsids.insert(n["nsid"].as_u64()) {
                        return Err(format!("NSID twice in {}: {n}", s["nqn"]));
                    }
                    if !uuids.insert(n["uuid"].as_str().unwrap_or("").to_string()) {
                        return Err(format!("UUID twice in the fleet: {n}"));
                    }
                }
            }
        }
        let sizes = self.live_sizes();
        let live: BTreeSet<String> = sizes.keys().cloned().collect();
        let trash = self.trashed();
        for (name, v) in &self.vols {
            let Some(&size) = sizes.get(name) else {
                return Err(format!("{name}: wanted, its image is not live"));
            };
            if size != v.size_mib << 20 {
                return Err(format!(
                    "{name}: {size} bytes, the manifests say {} MiB",
                    v.size_mib
                ));
            }
            let keys = self.keys(name);
            if keys.get("unistor.managed-by") != Some(&self.lab.owner) {
                return Err(format!(
                    "{name}: its image lacks the owner's keys: {keys:?}"
                ));
            }
            if !bdevs.iter().any(|(d, _, i)| *d == v.dpu && i == name) {
                return Err(format!("{name}: not exposed on dpu-{}", v.dpu));
            }
            // A SNAP killed with the image open leaves its watch until Ceph times it out
            // (30 s): a dead process, not a second DPU. Polled, bounded.
            let until = Instant::now() + Duration::from_secs(45);
            while self.watchers(name) > 1 {
                if Instant::now() > until {
                    return Err(format!("{name}: more than one watcher for 45 s"));
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        }
        for (name, policy) in &self.removed {
            let ok = match *policy {
                "Retain" => live.contains(name),
                "Trash" => !live.contains(name) && trash.contains(name),
                _ => !live.contains(name) && !trash.contains(name),
            };
            if !ok {
                return Err(format!(
                    "{name}: removed with {policy}, live {}, in the trash {}",
                    live.contains(name),
                    trash.contains(name)
                ));
            }
        }
        // The index and the images carrying this deployment's keys, one to one.
        for name in &live {
            let ours = self.keys(name).get("unistor.managed-by") == Some(&self.lab.owner);
            let indexed = self
                .c
                .index_entry(&self.c.pool, name)
                .is_some_and(|e| e["managed_by"].as_str() == Some(self.lab.owner.as_str()));
            if ours != indexed {
                return Err(format!(
                    "{name}: carries the owner's keys {ours}, in the index {indexed}"
                ));
            }
        }
        for (name, v) in &self.vols {
            let Some(p) = v.pattern else { continue };
            let dev = self.device(name)?;
            if !host::reads_pattern(&dev, p, 0, SPAN) {
                return Err(format!(
                    "{name}: the bytes written before the faults changed"
                ));
            }
        }
        Ok(())
    }

    fn restart_ceph_agent(&mut self) {
        self.restart_ceph_agent_with(&[]);
    }

    /// A new ceph-agent (on the same address and state) with `extra` arguments.
    fn restart_ceph_agent_with(&mut self, extra: &[&str]) {
        let addr = self.lab.ceph_addr.clone();
        let (child, _) = spawn_announced(
            ceph_agent_command(
                self.c,
                &self.lab.ceph_agent,
                &addr,
                &self.lab.pki(),
                &self.lab.dir.path().join("ceph-state"),
            )
            .args(["--report-interval", "2s"])
            .args(QUICK_SWEEP)
            .args(extra)
            .envs(self.lab.env.iter().map(|(k, v)| (k, v))),
            "listening on ",
        );
        self.lab.procs.0.push(child);
        self.ceph_proc = self.lab.procs.0.len() - 1;
    }
}

/// Runs `ceph osd unpause` when dropped.
struct Unpause<'c>(&'c Cluster);

impl Drop for Unpause<'_> {
    fn drop(&mut self) {
        let (code, _, err) = self.0.cli("ceph", &["osd", "unpause"]);
        if code != 0 {
            eprintln!("chaos: ceph osd unpause failed: {err}");
        }
    }
}

/// `ceph osd pause` for longer than the ceph-agent's command deadline (6 s here) during creates
/// or removals: its commands are killed at their deadline, the apply fails what they were, and
/// once the cluster is unpaused a re-run converges with every invariant.
fn osd_pause(w: &mut World<'_>, rng: &mut Rng, batch: usize) -> Result<String, String> {
    sigkill_group(&mut w.lab.procs.0[w.ceph_proc]);
    w.restart_ceph_agent_with(&["--command-timeout", "6s", "--read-timeout", "3s"]);
    // Its view loaded before the pause (it answers reports from memory).
    w.converge()?;
    let creating = w.vols.len() < batch || below(rng, 2) == 0;
    for _ in 0..batch {
        if creating {
            w.add(rng);
        } else {
            w.remove(rng);
        }
    }
    w.write();
    // The OSDs paused, then the apply started: its cluster commands run into the pause, are
    // killed at their 6 s deadline and retried; unpaused 9 s later whatever happens meanwhile
    // (a panic included).
    let unpause = Unpause(w.c);
    let (code, _, err) = w.c.cli("ceph", &["osd", "pause"]);
    if code != 0 {
        return Err(format!("ceph osd pause: {err}"));
    }
    let mut apply = w.spawn_apply_piped();
    let lines = read_lines(&mut apply);
    let paused = sample_for(w, 9_000);
    drop(unpause);
    // What it said of its steps (the failures at the deadline among them), for the summary.
    let failed_at_deadline = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = failed_at_deadline.clone();
    std::thread::spawn(move || {
        for l in lines {
            if l.contains("timed out") {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    });
    let until = Instant::now() + Duration::from_secs(180);
    let ended = loop {
        match apply.try_wait() {
            Ok(Some(s)) => break Ok(s),
            Ok(None) if Instant::now() > until => break Err("apply did not end".to_string()),
            Ok(None) => std::thread::sleep(Duration::from_millis(200)),
            Err(e) => break Err(e.to_string()),
        }
    };
    sigkill_group(&mut apply);
    sigkill_group(&mut w.lab.procs.0[w.ceph_proc]);
    w.restart_ceph_agent();
    paused?;
    let status = ended?;
    w.converge()?;
    w.write_patterns(rng)?;
    w.check()?;
    Ok(format!(
        "{} {batch} with the OSDs paused for 9 s; apply exited {:?}, {} line(s) of it timed out",
        if creating { "create" } else { "remove" },
        status.code(),
        failed_at_deadline.load(std::sync::atomic::Ordering::Relaxed)
    ))
}

fn sigkill_group(child: &mut Child) {
    let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
    let _ = child.wait();
}

/// Waits up to `limit` for `child` (`what`) to end, sampling every 100 ms that no image is open
/// on two DPUs; its exit status.
fn wait_sampling(
    w: &World<'_>,
    child: &mut Child,
    limit: Duration,
    what: &str,
) -> Result<std::process::ExitStatus, String> {
    let until = Instant::now() + limit;
    loop {
        w.one_dpu_per_image()?;
        match child.try_wait().map_err(|e| e.to_string())? {
            Some(s) => return Ok(s),
            None if Instant::now() > until => return Err(format!("{what} did not end")),
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Sleeps `ms`, sampling every 100 ms that no image is open on two DPUs.
fn sample_for(w: &World<'_>, ms: u64) -> Result<(), String> {
    let until = Instant::now() + Duration::from_millis(ms);
    loop {
        w.one_dpu_per_image()?;
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(());
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

/// The controller SIGKILLed at a random step of its plan, 0-300 ms after the step before it
/// ended (its `--verbose` lines say when each step ends), in a create, grow, move or remove plan.
fn controller_kill(w: &mut World<'_>, rng: &mut Rng) -> Result<String, String> {
    let what = match below(rng, 4) {
        0 => {
            w.add(rng);
            w.add(rng);
            "create"
        }
        1 => {
            let Some(n) = w.pick(rng) else {
                return Ok("nothing to grow".into());
            };
            w.vols.get_mut(&n).expect("picked").size_mib += 64;
            "grow"
        }
        2 => {
            let Some(n) = w.pick(rng) else {
                return Ok("nothing to move".into());
            };
            let dpus = w.dpu_procs.len();
            let v = w.vols.get_mut(&n).expect("picked");
            v.dpu = (v.dpu + 1) % dpus;
            "move"
        }
        _ => {
            w.remove(rng);
            "remove"
        }
    };
    w.write();
    let mut apply = w.spawn_apply_piped();
    let lines = read_lines(&mut apply);
    let killed = kill_at_a_step(w, rng, &mut apply, &lines);
    sigkill_group(&mut apply);
    let at = killed?;
    w.converge()?;
    w.write_patterns(rng)?;
    w.check()?;
    Ok(format!("{what}, killed {at}"))
}

/// The lines `child` prints on its stdout, as they come (a thread reads them); its stderr, when
/// piped, is read too and its lines sent prefixed with `stderr: `.
fn read_lines(child: &mut Child) -> std::sync::mpsc::Receiver<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(err) = child.stderr.take() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                if tx.send(format!("stderr: {line}")).is_err() {
                    break;
                }
            }
        });
    }
    if let Some(out) = child.stdout.take() {
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

/// Waits for the first pass's step count, picks a step k, waits until k steps ended, then 0-300
/// ms more, sampling the one-DPU-per-image invariant all along; says where it stopped (the
/// caller kills). An apply that ends first (nothing to do) is fine.
fn kill_at_a_step(
    w: &World<'_>,
    rng: &mut Rng,
    apply: &mut Child,
    lines: &std::sync::mpsc::Receiver<String>,
) -> Result<String, String> {
    let until = Instant::now() + Duration::from_secs(120);
    let mut steps: Option<u64> = None;
    let mut k = 0;
    let mut ended = 0;
    loop {
        w.one_dpu_per_image()?;
        if Instant::now() > until {
            return Err("the apply neither planned nor ended in time".into());
        }
        match lines.recv_timeout(Duration::from_millis(100)) {
            Ok(line) => {
                if steps.is_none() {
                    if let Some(n) = line
                        .strip_prefix("Pass 1: ")
                        .and_then(|r| r.split_whitespace().next())
                        .and_then(|n| n.parse::<u64>().ok())
                    {
                        steps = Some(n);
                        k = below(rng, n);
                    }
                } else if line.trim_start().starts_with('[')
                    && (line.contains("... done")
                        || line.contains("... FAILED")
                        || line.contains("... skipped"))
                {
                    ended += 1;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let _ = apply.wait();
                return Ok(format!("never: it ended after {ended} step(s)"));
            }
        }
        if let Some(n) = steps {
            if ended >= k {
                let extra = below(rng, 301);
                sample_for(w, extra)?;
                return Ok(format!("at step {} of {n} (+{extra} ms)", k + 1));
            }
        }
    }
}

/// The ceph-agent's process group SIGKILLed 0-2 s into creates or removals, then started again.
fn ceph_agent_kill(w: &mut World<'_>, rng: &mut Rng, batch: usize) -> Result<String, String> {
    let what = if w.vols.len() < batch {
        "create"
    } else {
        ["create", "grow", "remove"][below(rng, 3) as usize]
    };
    let mut grown = BTreeSet::new();
    for _ in 0..batch {
        match what {
            "create" => {
                w.add(rng);
            }
            "grow" => {
                if let Some(n) = w.pick(rng) {
                    if grown.insert(n.clone()) {
                        w.vols.get_mut(&n).expect("picked").size_mib += 64;
                    }
                }
            }
            _ => w.remove(rng),
        }
    }
    w.write();
    let after = below(rng, 2000);
    let mut apply = w.spawn_apply(&[]);
    std::thread::sleep(Duration::from_millis(after));
    sigkill_group(&mut w.lab.procs.0[w.ceph_proc]);
    sigkill_group(&mut apply);
    w.restart_ceph_agent();
    w.converge()?;
    w.write_patterns(rng)?;
    w.check()?;
    Ok(format!(
        "{what} {batch}, ceph-agent killed after {after} ms"
    ))
}

/// A dpu-agent SIGKILLed while SNAP holds the answer to a namespace it created (the emulator
/// answers 2 s after the change), then SNAP SIGKILLed, with no controller connected; the next
/// agent restores the namespace alone.
fn dpu_agent_kill(w: &mut World<'_>, rng: &mut Rng) -> Result<String, String> {
    let name = w.add(rng);
    let d = w.vols[&name].dpu;
    w.write();
    let socket = w.lab.socket(d);
    let bdev = format!("unistor-{name}");
    let mut apply = w.spawn_apply(&[]);
    let until = Instant::now() + Duration::from_secs(60);
    while !namespaces_or_none(&socket)
        .iter()
        .any(|(b, _, _)| *b == bdev)
    {
        if Instant::now() > until {
            sigkill_group(&mut apply);
            return Err(format!("{name}: its namespace never appeared"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The agent alone (SNAP runs on), before SNAP's answer reaches it.
    let agent = &mut w.lab.procs.0[w.dpu_procs[d]];
    let _ = kill(Pid::from_raw(agent.id() as i32), Signal::SIGKILL);
    let _ = agent.wait();
    sigkill_group(&mut apply);
    for pid in emulator_pids(&socket) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    w.dpu_procs[d] = w.lab.start_dpu(d);
    let until = Instant::now() + Duration::from_secs(60);
    while !namespaces_or_none(&socket)
        .iter()
        .any(|(b, _, _)| *b == bdev)
    {
        if Instant::now() > until {
            return Err(format!("{name}: not restored by the new agent alone"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    w.converge()?;
    w.write_patterns(rng)?;
    w.check()?;
    Ok(format!("{name} on dpu-{d}"))
}

fn namespaces_or_none(socket: &Path) -> Vec<(String, u64, String)> {
    if try_snap_call(socket, "nvme_subsystem_list").is_err() {
        return vec![];
    }
    namespaces(socket)
}

/// The watch daemon and a CI `apply`, one certificate, one change between them.
fn two_controllers(
    w: &mut World<'_>,
    rng: &mut Rng,
    daemon: &e2e::Daemon,
) -> Result<String, String> {
    if below(rng, 2) == 0 || w.vols.is_empty() {
        w.add(rng);
    } else {
        w.remove(rng);
    }
    w.write();
    let mut apply = w.spawn_apply(&["--lease-wait", "2m"]);
    let sampled = sample_for(w, 500);
    let status = apply.wait().map_err(|e| e.to_string())?;
    sampled?;
    let until = Instant::now() + Duration::from_secs(120);
    while !reconciled(&daemon.status()) {
        if Instant::now() > until {
            return Err("the daemon did not converge".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    w.converge()?;
    w.write_patterns(rng)?;
    w.check()?;
    Ok(format!("apply exited {:?}", status.code()))
}

/// A controller SIGSTOPped part way through creating two volumes on dpu-0, for longer than its
/// lease; meanwhile another moves one of them to dpu-1. Continued, the first writes nothing
/// under its old token and does not take the lease again to go on with its stale plan: one
/// image is never exposed by two DPUs (sampled every 100 ms), and a re-run converges.
fn paused_controller(w: &mut World<'_>, rng: &mut Rng) -> Result<String, String> {
    let a = w.add(rng);
    let b = w.add(rng);
    for n in [&a, &b] {
        w.vols.get_mut(n).expect("added").dpu = 0;
    }
    w.write();
    let mut first = w.spawn_apply(&["--lease-ttl", "2s"]);
    let after = 200 + below(rng, 800);
    let sampled = sample_for(w, after);
    let group = Pid::from_raw(first.id() as i32);
    let _ = killpg(group, Signal::SIGSTOP);
    let result: Result<(), String> = (|| {
        sampled?;
        w.vols.get_mut(&a).expect("added").dpu = 1;
        w.write();
        // Past the paused one's lease: the other takes over.
        sample_for(w, 2500)?;
        let mut second = w.spawn_apply(&["--lease-wait", "1m"]);
        let ran = wait_sampling(
            w,
            &mut second,
            Duration::from_secs(180),
            "the second controller",
        );
        sigkill_group(&mut second);
        ran?;
        let _ = killpg(group, Signal::SIGCONT);
        // The first goes on where it stopped: sampled until it ends.
        wait_sampling(
            w,
            &mut first,
            Duration::from_secs(120),
            "the continued controller",
        )
        .map(|_| ())
    })();
    let _ = killpg(group, Signal::SIGCONT);
    sigkill_group(&mut first);
    result?;
    w.converge()?;
    w.write_patterns(rng)?;
    w.check()?;
    Ok(format!("paused after {after} ms; {a} moved meanwhile"))
}

/// The agents' wall clocks jumped by 300 s one way, then the other (through their seam, the
/// file `UNISTOR_CLOCK_SKEW_FILE` names) while an `apply` runs: it converges (exit 0: no lease
/// lost or stolen, no certificate refused — they are valid from an hour before their issue).
fn clock_jump(w: &mut World<'_>, rng: &mut Rng, skew: &Path) -> Result<String, String> {
    w.add(rng);
    w.add(rng);
    w.write();
    let first: i64 = if below(rng, 2) == 0 { 300 } else { -300 };
    let at = below(rng, 1000);
    let mut apply = w.spawn_apply(&[]);
    let ran = (|| {
        sample_for(w, at)?;
        std::fs::write(skew, first.to_string()).map_err(|e| e.to_string())?;
        sample_for(w, 1000)?;
        std::fs::write(skew, (-first).to_string()).map_err(|e| e.to_string())?;
        match wait_sampling(w, &mut apply, Duration::from_secs(180), "apply")? {
            s if s.success() => Ok(()),
            s => Err(format!("apply across the jumps exited {s}")),
        }
    })();
    sigkill_group(&mut apply);
    let _ = std::fs::write(skew, "0");
    ran?;
    w.converge()?;
    w.write_patterns(rng)?;
    w.check()?;
    Ok(format!(
        "clocks {first:+} s after {at} ms, then {:+} s",
        -first
    ))
}

/// A TCP forwarder between the controller and one agent whose link can be cut: blackholed,
/// it keeps both sockets open and drops every byte (a partition, not a refusal).
struct Link {
    addr: String,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Link {
    fn to(upstream: String) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind the forwarder");
        let addr = listener.local_addr().expect("its address").to_string();
        listener.set_nonblocking(true).expect("nonblocking");
        let (cut, stop) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (c, s) = (cut.clone(), stop.clone());
        std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let Ok((down, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let Ok(up) = std::net::TcpStream::connect(&upstream) else {
                    continue;
                };
                let _ = down.set_nonblocking(false);
                for (from, to) in [
                    (down.try_clone(), up.try_clone()),
                    (up.try_clone(), down.try_clone()),
                ] {
                    let (Ok(mut from), Ok(mut to)) = (from, to) else {
                        continue;
                    };
                    let (c, s) = (c.clone(), s.clone());
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let _ = from.set_read_timeout(Some(Duration::from_millis(200)));
                        let mut buf = [0u8; 16 * 1024];
                        while !s.load(Ordering::SeqCst) {
                            match from.read(&mut buf) {
                                Ok(0) => break,
                                // Cut: read and dropped, the sockets left open.
                                Ok(_) if c.load(Ordering::SeqCst) => {}
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        break;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock
                                            | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => break,
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Self { addr, cut, stop }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// The daemon's link to dpu-0 blackholed (sockets left open) while the manifests move a volume
/// off it: sampled every 100 ms for 30 s, the image is never exposed by both DPUs; the link
/// healed, the move completes with the bytes intact.
fn partition(
    w: &mut World<'_>,
    rng: &mut Rng,
    link: &Link,
    daemon: &e2e::Daemon,
    cut_ms: u64,
) -> Result<String, String> {
    let wait_converged = |what: &str| -> Result<(), String> {
        let until = Instant::now() + Duration::from_secs(180);
        while !reconciled(&daemon.status()) {
            if Instant::now() > until {
                return Err(format!("the daemon did not converge {what}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    };
    // A volume on dpu-0, exposed and written.
    let name = w.add(rng);
    w.vols.get_mut(&name).expect("added").dpu = 0;
    w.write();
    wait_converged("before the cut")?;
    w.converge()?;
    w.write_patterns(rng)?;
    link.set_cut(true);
    w.vols.get_mut(&name).expect("added").dpu = 1;
    w.write();
    let sampled = sample_for(w, cut_ms);
    link.set_cut(false);
    sampled?;
    wait_converged("after the heal")?;
    w.converge()?;
    w.check()?;
    Ok(format!("{name} moved off a cut-off dpu-0"))
}

struct Tally {
    passed: usize,
    failed: usize,
    /// Iterations not started because the time was up.
    not_run: usize,
}

impl Tally {
    /// Runs one iteration; a panic in it (a helper's assertion) is that iteration's failure.
    fn run(&mut self, loop_name: &str, i: usize, f: impl FnOnce() -> Result<String, String>) {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|p| {
            let why = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            Err(format!("panicked: {why}"))
        });
        self.record(loop_name, i, r);
    }

    fn record(&mut self, loop_name: &str, i: usize, r: Result<String, String>) {
        match r {
            Ok(what) => {
                self.passed += 1;
                println!("chaos: {loop_name} #{i}: ok ({what})");
            }
            Err(why) => {
                self.failed += 1;
                println!("chaos: {loop_name} #{i}: FAILED: {why}");
            }
        }
    }
}

fn main() {
    let a = <Args as clap::Parser>::parse();
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1)
    });
    println!(
        "chaos: seed {seed}{}",
        if a.quick { " (quick)" } else { "" }
    );
    let mut rng = Rng::with_seed(seed);
    let c = Cluster::from_env();
    let started = Instant::now();
    let in_time = || started.elapsed() < a.max_time;
    let wanted = |l: &str| a.only.is_empty() || a.only.iter().any(|o| o == l);
    // Iterations per loop: the quick run (scripts/test.sh) one or two of each, in minutes; the
    // full run scales from --iterations.
    let n = a.iterations;
    let count = |quick: usize, full: usize| if a.quick { quick } else { full.max(1) };
    let mut tally = Tally {
        passed: 0,
        failed: 0,
        not_run: 0,
    };

    // Runs `loop_name` `times` times (unless not wanted); iterations the time does not allow
    // are counted and said, never dropped silently.
    macro_rules! repeat {
        ($loop_name:expr, $times:expr, $body:expr) => {
            if wanted($loop_name) {
                for i in 0..$times {
                    if !in_time() {
                        tally.not_run += $times - i;
                        println!("chaos: {} #{i}..: not run (out of time)", $loop_name);
                        break;
                    }
                    tally.run($loop_name, i, || $body);
                }
            }
        };
    }
    let controllers = [
        "controller",
        "ceph-agent",
        "osd-pause",
        "two-controllers",
        "paused-controller",
        "clock",
    ];
    if controllers.iter().any(|l| wanted(l)) {
        // The agents (not the controllers) get the clock seam; its file says 0 but in the
        // clock loop.
        let skew = std::env::temp_dir().join(format!("chaos-skew-{}", std::process::id()));
        let _ = std::fs::write(&skew, "0");
        let env = [("UNISTOR_CLOCK_SKEW_FILE".to_string(), skew.clone())];
        let mut w = World::new_with_env(&c, 2, &[], "chaos-ctl", &env);
        for _ in 0..3 {
            w.add(&mut rng);
        }
        w.write();
        let setup = w.converge().and_then(|()| w.write_patterns(&mut rng));
        tally.record("setup", 0, setup.map(|()| "3 volumes".into()));
        repeat!("controller", count(1, n), controller_kill(&mut w, &mut rng));
        let batch = if a.quick { 3 } else { 10 };
        repeat!(
            "ceph-agent",
            count(1, n / 2),
            ceph_agent_kill(&mut w, &mut rng, batch)
        );
        repeat!(
            "osd-pause",
            count(1, n / 2),
            osd_pause(&mut w, &mut rng, batch)
        );
        repeat!(
            "paused-controller",
            count(1, n / 4),
            paused_controller(&mut w, &mut rng)
        );
        if wanted("two-controllers") {
            let daemon = w.lab.daemon(&[]);
            repeat!(
                "two-controllers",
                count(1, n / 2),
                two_controllers(&mut w, &mut rng, &daemon)
            );
            drop(daemon);
        }
        repeat!(
            "clock",
            count(1, n / 4),
            clock_jump(&mut w, &mut rng, &skew)
        );
        drop(w);
        let _ = std::fs::remove_file(&skew);
    }
    if wanted("partition") {
        // dpu-0 reached through a link that can be cut.
        let mut w = World::new(&c, 2, &[], "chaos-cut");
        let link = Link::to(w.lab.dpus[0].1.clone());
        w.lab.dpus[0].1 = link.addr.clone();
        w.add(&mut rng);
        w.write();
        let daemon = w.lab.daemon(&[]);
        let cut_ms = if a.quick { 10_000 } else { 30_000 };
        repeat!(
            "partition",
            count(1, n / 3),
            partition(&mut w, &mut rng, &link, &daemon, cut_ms)
        );
        drop(daemon);
    }
    if wanted("dpu-agent") {
        let mut w = World::new(
            &c,
            1,
            &["--emulator-arg=--reply-latency=nvme_namespace_create=2s"],
            "chaos-dpu",
        );
        repeat!(
            "dpu-agent",
            count(1, n / 2),
            dpu_agent_kill(&mut w, &mut rng)
        );
    }
    println!(
        "chaos: seed {seed}: {} passed, {} failed in {:.0} s{}",
        tally.passed,
        tally.failed,
        started.elapsed().as_secs_f64(),
        if tally.not_run > 0 {
            format!(" ({} iteration(s) not run: out of time)", tally.not_run)
        } else {
            String::new()
        }
    );
    if tally.failed > 0 {
        std::process::exit(1);
    }
}
