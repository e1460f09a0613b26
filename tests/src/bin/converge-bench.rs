//! Convergence benchmark against the real Ceph cluster: N simulated DPUs (dpu-agent + SNAP
//! emulator, real-Ceph mode) with M volumes each, converged from empty by `unistor apply`; in the
//! same run the floor (the same number of plain `rbd create` calls back to back, plus the SNAP
//! calls at the emulator's latency); then the watch daemon's time from a manifest edit to
//! convergence. Run it with `scripts/bench.sh` (which starts a private cluster), or by hand with
//! `UNISTOR_CEPH_*` set: `cargo run --release -p e2e --bin converge-bench -- --dpus 50 --volumes 4`.
//! `BENCH_EVENTS=1` prints the daemon's events after each edit and keeps its log and the
//! ceph-agent's in the temporary directory (with `UNISTOR_SPAN_TIMES=1` too, the logs have each
//! span's busy and idle time).

use std::time::{Duration, Instant};

use e2e::{
    ceph_agent_command, dpu_agent_command, fleet_yaml, issue_pki, show, spawn_announced, unique,
    unistor, volume_yaml, write_like_an_editor, Cluster, Daemon, FleetSim, Procs, ANY_PORT,
};

#[path = "converge-bench/clones.rs"]
mod clones;
#[path = "converge-bench/fleet.rs"]
mod fleet;
#[path = "converge-bench/qos.rs"]
mod qos;
#[path = "converge-bench/replicas.rs"]
mod replicas;

/// Converges N simulated DPUs x M volumes from empty against the real Ceph cluster
/// (`UNISTOR_CEPH_*`, as `scripts/bench.sh` sets them) and reports the time against its floor.
#[derive(Debug, clap::Parser)]
struct Args {
    /// Simulated DPUs.
    #[arg(long, default_value_t = 50)]
    dpus: usize,
    /// Volumes per DPU.
    #[arg(long, default_value_t = 4)]
    volumes: usize,
    /// The emulator's latency per SNAP call, in ms.
    #[arg(long, default_value_t = 2)]
    snap_latency_ms: u64,
    /// Manifest edits timed in watch mode.
    #[arg(long, default_value_t = 5)]
    edits: usize,
    /// Simulate the DPUs in one `fleet-sim` process instead of a dpu-agent and an emulator
    /// process each; then also time a daemon restart (the reconnect storm) and the loss of a
    /// tenth of the fleet.
    #[arg(long)]
    fleet: bool,
    /// Controller replicas (issue 24) on the converged fleet instead of one daemon: sharing,
    /// steady-state cost, RADOS operations, five failovers (pool `unistor-ctl` is created).
    #[arg(long, default_value_t = 0)]
    replicas: usize,
    /// The replicas' membership lease.
    #[arg(long, default_value = "15s")]
    replica_ttl: String,
    /// Every volume a clone of one golden snapshot, created in one apply against a floor of
    /// plain `rbd clone`; then every host's first 16 MiB read through SNAP (issue 25).
    #[arg(long)]
    clone_storm: bool,
    /// Per-volume QoS: one volume's host load under an IOPS limit of this many I/Os per
    /// second (and a read bandwidth limit, `--qos-mib`) against the same load unlimited.
    #[arg(long)]
    qos: Option<u64>,
    /// The read bandwidth limit of `--qos`, MiB/s.
    #[arg(long, default_value_t = 16)]
    qos_mib: u64,
}

/// CPU seconds of a process: (its own, its reaped children's), from /proc/PID/stat.
fn cpu(pid: &str) -> (f64, f64) {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return (0.0, 0.0);
    };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // utime, stime, cutime, cstime are fields 14-17; `rest` starts at field 3.
    let tick = 100.0;
    let at = |n: usize| f.get(n - 3).copied().unwrap_or(0.0) / tick;
    (at(14) + at(15), at(16) + at(17))
}

/// CPU seconds, by program, of every process on the machine (own time only).
fn cpu_by_program() -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = e.file_name().to_string_lossy().to_string();
        if !pid.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        *out.entry(comm.trim().to_string()).or_insert(0.0) += cpu(&pid).0;
    }
    out
}

/// Runs `unistor` (its output not a terminal: one line per step) and notes when the apply's
/// phases happened: the first pass's start, the first and last step of each kind, the end.
fn timed_apply(args: &[&str]) -> (std::process::Output, String) {
    use std::io::BufRead;
    let t = Instant::now();
    let mut child = std::process::Command::new(e2e::bin("unistor"))
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run unistor");
    let stderr = child.stderr.take().expect("piped");
    let err = std::thread::spawn(move || {
        let mut v = vec![];
        let _ = std::io::Read::read_to_end(&mut std::io::BufReader::new(stderr), &mut v);
        v
    });
    let mut stdout = vec![];
    // (kind, first, last) in order of first appearance.
    let mut kinds: Vec<(String, Duration, Duration)> = vec![];
    let mut marks = vec![];
    for line in std::io::BufReader::new(child.stdout.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
    {
        let at = t.elapsed();
        if line.starts_with("Pass ") || line.starts_with("Converged") {
            marks.push(format!(
                "{} at {}",
                line.split(':').next().unwrap_or(""),
                ms(at)
            ));
        }
        // "  [id] + target create-image ... done": the kind is the word after the target.
        if let Some(rest) = line.trim_start().strip_prefix('[') {
            let words: Vec<&str> = rest.split_whitespace().collect();
            if let Some(kind) = words.get(3) {
                match kinds.iter_mut().find(|k| k.0 == *kind) {
                    Some(k) => k.2 = at,
                    None => kinds.push((kind.to_string(), at, at)),
                }
            }
        }
        stdout.extend_from_slice(line.as_bytes());
        stdout.push(b'\n');
    }
    let status = child.wait().expect("wait for unistor");
    let stderr = err.join().unwrap_or_default();
    let steps: Vec<String> = kinds
        .iter()
        .map(|(k, a, b)| format!("{k} {}-{}", ms(*a), ms(*b)))
        .collect();
    let timeline = format!("{}; steps: {}", marks.join(", "), steps.join(", "));
    (
        std::process::Output {
            status,
            stdout,
            stderr,
        },
        timeline,
    )
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

fn main() -> std::process::ExitCode {
    // Arguments first: `--help` and a typo need no cluster.
    let a = match agent_kit::cli::parse::<Args>() {
        Ok(a) => a,
        Err(code) => return code,
    };
    let c = Cluster::from_env();
    let n = a.dpus * a.volumes;
    // The floor, part one: plain `rbd create` of the same number of images, back to back.
    // The floor, part two: SNAP calls per DPU (DPUs work in parallel, each serially):
    // register, subsystem, controller, resume, and per volume bdev, namespace, attach.
    let snap_calls_per_dpu = 4 + 3 * a.volumes;
    let snap_floor = Duration::from_millis(a.snap_latency_ms * snap_calls_per_dpu as u64);
    if let Some(iops) = a.qos {
        qos::run(&c, iops, a.qos_mib);
        return std::process::ExitCode::SUCCESS;
    }
    if a.clone_storm {
        let golden = clones::golden(&c);
        let lab = BenchLab::start_cloning(&c, &a, Some(golden.clone()));
        clones::run(&lab, &golden, a.dpus, snap_floor);
        return std::process::ExitCode::SUCCESS;
    }
    let rbd_floor = rbd_floor(&c, n);
    let lab = BenchLab::start(&c, &a);
    println!(
        "converge-bench: {} DPUs x {} volumes = {n} volumes, SNAP latency {} ms/call",
        a.dpus, a.volumes, a.snap_latency_ms
    );
    let converge = lab.apply();
    println!("  floor: {n} x rbd create:           {}", ms(rbd_floor));
    println!(
        "  floor: {snap_calls_per_dpu} SNAP calls per DPU:      {}",
        ms(snap_floor)
    );
    println!(
        "  apply / floor:                   {:.2}x",
        converge.as_secs_f64() / (rbd_floor + snap_floor).as_secs_f64()
    );
    let floor = edit_floor(&c, a.snap_latency_ms);
    if a.replicas > 0 {
        replicas::run(&lab, a.replicas, &a.replica_ttl);
    } else if a.fleet {
        fleet::watch(&lab, a.edits, floor);
    } else {
        lab.watch(a.edits, floor);
    }
    std::process::ExitCode::SUCCESS
}

/// `n` plain `rbd create` back to back (then removed): the floor of creating `n` images.
fn rbd_floor(c: &Cluster, n: usize) -> Duration {
    let floor_names: Vec<String> = (0..n).map(|i| unique(&format!("floor{i}"))).collect();
    let t = Instant::now();
    for img in &floor_names {
        c.cli_ok(
            "rbd",
            &["create", "--size", "64M", &format!("{}/{img}", c.pool)],
        );
    }
    let took = t.elapsed();
    remove_images(c, &floor_names);
    took
}

/// Removes the floor's images (not measured), 8 at a time.
fn remove_images(c: &Cluster, names: &[String]) {
    std::thread::scope(|s| {
        for chunk in names.chunks(names.len().div_ceil(8).max(1)) {
            s.spawn(move || {
                for img in chunk {
                    c.cli_ok(
                        "rbd",
                        &["rm", "--no-progress", &format!("{}/{img}", c.pool)],
                    );
                }
            });
        }
    });
}

/// Volumes per manifest file.
const PER_FILE: usize = 500;

/// The daemon's debounce: part of an edit's floor.
const DEBOUNCE: Duration = Duration::from_millis(200);

/// The floor of an edit that adds one volume on a DPU whose function already has its
/// controller: the debounce, one `rbd create` (the median of 5 back to back, in this run) and
/// the chain's SNAP calls at the emulator's latency (bdev, namespace, attach).
fn edit_floor(c: &Cluster, snap_latency_ms: u64) -> Duration {
    let names: Vec<String> = (0..5).map(|i| unique(&format!("efloor{i}"))).collect();
    let mut took = vec![];
    for img in &names {
        let t = Instant::now();
        c.cli_ok(
            "rbd",
            &["create", "--size", "64M", &format!("{}/{img}", c.pool)],
        );
        took.push(t.elapsed());
    }
    for img in &names {
        c.cli_ok(
            "rbd",
            &["rm", "--no-progress", &format!("{}/{img}", c.pool)],
        );
    }
    took.sort();
    DEBOUNCE + took[2] + Duration::from_millis(3 * snap_latency_ms)
}

/// Edit -> converged times against their floor, one line.
fn report_edits(times: &[Duration], floor: Duration) {
    let mut sorted = times.to_vec();
    sorted.sort();
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or_default();
    println!(
        "  watch: edit (one volume added) -> converged: {} (median {}; floor {}: debounce {}, one rbd create, 3 SNAP calls) = {:.2}x the floor",
        times.iter().map(|t| ms(*t)).collect::<Vec<_>>().join(", "),
        ms(median),
        ms(floor),
        ms(DEBOUNCE),
        median.as_secs_f64() / floor.as_secs_f64().max(1e-9)
    );
}

/// The benchmark's fleet: a ceph-agent and simulated DPUs, manifests of `vols`.
struct BenchLab<'a> {
    c: &'a Cluster,
    dir: tempfile::TempDir,
    procs: Procs,
    /// Sizes edits gave volumes, by index.
    sizes: std::cell::RefCell<std::collections::BTreeMap<usize, String>>,
    /// The DPUs, when one process simulates them all.
    fleet: std::cell::RefCell<Option<FleetSim>>,
    /// (volume, DPU index).
    vols: Vec<(String, usize)>,
    owner: String,
    /// The golden image every volume is cloned from (`--clone-storm`).
    golden: Option<String>,
}

impl<'a> BenchLab<'a> {
    fn start(c: &'a Cluster, a: &Args) -> Self {
        Self::start_cloning(c, a, None)
    }

    /// [`BenchLab::start`], every volume a clone of `golden`'s snapshot `v1` when given.
    fn start_cloning(c: &'a Cluster, a: &Args, golden: Option<String>) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = dir.path().join("pki");
        let ceph_name = unique("ceph-bench");
        let dpu_names: Vec<String> = (0..a.dpus)
            .map(|i| format!("{}-{i}", unique("dpu-bench")))
            .collect();
        let mut names: Vec<&str> = vec![&ceph_name];
        if !a.fleet {
            names.extend(dpu_names.iter().map(String::as_str));
        }
        issue_pki(&pki, &names);
        let mut procs = Procs::default();
        // Every agent binds port 0 and says which port it got.
        let mut ceph_cmd =
            ceph_agent_command(c, &ceph_name, ANY_PORT, &pki, &dir.path().join("ceph"));
        ceph_cmd.args(["--report-interval", "10s"]);
        if std::env::var_os("BENCH_EVENTS").is_some() {
            // Its log beside the daemon's, for the same questions.
            let log = std::env::temp_dir().join("converge-bench-ceph-agent.log");
            ceph_cmd.stderr(std::fs::File::create(&log).expect("ceph-agent log"));
        }
        let (child, ceph_addr) = spawn_announced(&mut ceph_cmd, "listening on ");
        procs.0.push(child);
        let latency = format!("--emulator-arg=--latency=*={}ms", a.snap_latency_ms);
        let mut pairs = vec![];
        let sim = a.fleet.then(|| {
            // Each DPU as on its own machine: SNAP answers at its latency, the agent polls SNAP
            // every 10 s and heartbeats every 10 s (1,000 agents: 100 heartbeats/s in all).
            let latency = format!("{}ms", a.snap_latency_ms);
            let prefix = unique("dpu-bench");
            FleetSim::start(
                &pki,
                &dir.path().join("fleet"),
                &prefix,
                a.dpus,
                &[
                    "--real-ceph",
                    "--snap-latency",
                    &latency,
                    "--poll-interval",
                    "10s",
                    "--heartbeat",
                    "10s",
                ],
            )
        });
        if let Some(f) = &sim {
            pairs.clone_from(&f.agents);
        }
        for (i, name) in dpu_names.iter().enumerate().filter(|_| !a.fleet) {
            let state = dir.path().join(format!("dpu{i}"));
            let (child, addr) = spawn_announced(
                &mut dpu_agent_command(
                    name,
                    ANY_PORT,
                    &pki,
                    &state,
                    &[&latency, "--poll-interval", "2s"],
                ),
                "listening on ",
            );
            procs.0.push(child);
            pairs.push((name.clone(), addr));
        }
        let m = dir.path().join("manifests");
        std::fs::create_dir_all(&m).unwrap();
        let pairs: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(n, a)| (n.as_str(), a.as_str()))
            .collect();
        let fleet = fleet_yaml(
            &ceph_name,
            &ceph_addr,
            &c.pool,
            &unique("snap-bench"),
            &pairs,
        );
        std::fs::write(m.join("fleet.yaml"), fleet).unwrap();
        let vols = (0..a.dpus * a.volumes)
            .map(|i| (unique(&format!("bv{i}")), i / a.volumes))
            .collect();
        let lab = Self {
            c,
            dir,
            procs,
            fleet: std::cell::RefCell::new(sim),
            sizes: Default::default(),
            vols,
            owner: unique("bench"),
            golden,
        };
        lab.write_volumes(None);
        lab
    }

    fn manifests(&self) -> String {
        self.dir.path().join("manifests").display().to_string()
    }

    fn pki(&self) -> String {
        self.dir.path().join("pki").display().to_string()
    }

    /// Writes the volumes at 64 MiB or the size an earlier edit gave them, volume `grown.0` at
    /// `grown.1` (images only grow: an edit never undoes an earlier one). The volumes are split
    /// in files of [`PER_FILE`] (a manifest file is at most 1 MiB), and an edit rewrites only its
    /// own file, as an operator's commit would.
    fn write_volumes(&self, grown: Option<(usize, &str)>) {
        let mut sizes = self.sizes.borrow_mut();
        if let Some((g, size)) = grown {
            sizes.insert(g, size.to_string());
        }
        let files = self.vols.len().div_ceil(PER_FILE);
        for f in 0..files {
            if grown.is_some_and(|(g, _)| g / PER_FILE != f) {
                continue;
            }
            let text: String = (f * PER_FILE..((f + 1) * PER_FILE).min(self.vols.len()))
                .map(|i| {
                    let (v, h) = &self.vols[i];
                    let size = sizes.get(&i).map_or("64Mi", String::as_str);
                    let mut y = volume_yaml(v, *h, size, &self.c.pool, "Retain");
                    if let Some(g) = &self.golden {
                        y.push_str(&format!(
                            "  source:\n    snapshot: {{pool: {}, image: {g}, name: v1}}\n",
                            self.c.pool
                        ));
                    }
                    y
                })
                .collect();
            write_like_an_editor(
                &self
                    .dir
                    .path()
                    .join("manifests")
                    .join(format!("volumes-{f:03}.yaml")),
                &text,
            );
        }
    }

    /// `unistor apply` from empty, timed, with the CPU it cost by program; then a plan that
    /// must be empty. Returns the apply's wall time.
    fn apply(&self) -> Duration {
        let (ms_dir, pki_s) = (self.manifests(), self.pki());
        let before = cpu_by_program();
        let ceph_agent_pid = self.procs.0[0].id().to_string();
        let (_, agent_children_before) = cpu(&ceph_agent_pid);
        let (_, unistor_before) = cpu("self");
        let t = Instant::now();
        let (apply, timeline) = timed_apply(&[
            "apply",
            &ms_dir,
            "--pki-dir",
            &pki_s,
            "--owner",
            &self.owner,
            "--auto-approve",
        ]);
        let converge = t.elapsed();
        let after = cpu_by_program();
        let (_, agent_children_after) = cpu(&ceph_agent_pid);
        let (_, unistor_after) = cpu("self");
        assert!(apply.status.success(), "{}", show(&apply));
        let plan = unistor(&["plan", &ms_dir, "--pki-dir", &pki_s, "--owner", &self.owner]);
        assert_eq!(plan.status.code(), Some(0), "{}", show(&plan));
        println!("  unistor apply from empty:        {}", ms(converge));
        for l in String::from_utf8_lossy(&apply.stdout)
            .lines()
            .filter(|l| l.starts_with("Pass") || l.starts_with("Converged") || l.contains("FAILED"))
            .take(20)
        {
            println!("    {l}");
        }
        let mut spent: Vec<(String, f64)> = after
            .iter()
            .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
            .filter(|(_, v)| *v >= 0.5)
            .collect();
        spent.push((
            "ceph-agent's CLI commands".into(),
            agent_children_after - agent_children_before,
        ));
        spent.push(("unistor apply".into(), unistor_after - unistor_before));
        spent.sort_by(|a, b| b.1.total_cmp(&a.1));
        println!(
            "    CPU during the apply ({:.0} s of wall time on {} cores): {}",
            converge.as_secs_f64(),
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            spent
                .iter()
                .map(|(k, v)| format!("{k} {v:.1} s"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!("    timeline: {timeline}");
        converge
    }

    /// The watch daemon on the benchmark's manifests (its state in the benchmark's directory).
    fn daemon(&self) -> Daemon {
        Daemon::start(
            &[
                &self.manifests(),
                "--pki-dir",
                &self.pki(),
                "--owner",
                &self.owner,
                "--state-dir",
                &self.dir.path().join("watch").display().to_string(),
                "--resync",
                "1h",
                "--debounce",
                &format!("{}ms", DEBOUNCE.as_millis()),
            ],
            &self.dir.path().join("watch.log"),
        )
    }

    /// Watch mode: `edits` manifest edits (a volume grown each) to convergence, then an image
    /// grown behind unistor's back until the status shows it; the peak memory of everything.
    fn watch(&self, edits: usize, floor: Duration) {
        let mut d = self.daemon();
        d.wait_converged(Duration::from_secs(600), self.vols.len());
        let edit_times = self.add_volume_edits(&mut d, edits);
        let found = self.out_of_band_resize(&d);
        let metrics = d.get("/metrics");
        let reconcile_line = metrics
            .lines()
            .filter(|l| {
                l.starts_with("unistor_reconcile_duration_seconds_sum")
                    || l.starts_with("unistor_reconcile_duration_seconds_count")
            })
            .collect::<Vec<_>>()
            .join(", ");
        report_edits(&edit_times, floor);
        println!("    daemon: {reconcile_line}");
        println!(
            "  watch: image resized with rbd by hand -> shown: {}",
            ms(found)
        );
        self.print_rss(&d);
    }

    /// Adds `edits` volumes one at a time (each in a manifest file of its own, on DPU `e` of the
    /// fleet), and times each from the file written to the volume ok, polling every 10 ms.
    fn add_volume_edits(&self, d: &mut Daemon, edits: usize) -> Vec<Duration> {
        let dpus = self.vols.last().map_or(1, |(_, h)| h + 1);
        let poll = std::mem::replace(&mut d.poll, Duration::from_millis(10));
        let mut times = vec![];
        for e in 0..edits {
            let name = unique(&format!("edit{e}"));
            let text = volume_yaml(&name, e % dpus, "64Mi", &self.c.pool, "Retain");
            let t = Instant::now();
            write_like_an_editor(
                &self
                    .dir
                    .path()
                    .join("manifests")
                    .join(format!("edit-{e:03}.yaml")),
                &text,
            );
            d.wait_for_at(
                &format!("q={name}&limit=5"),
                Duration::from_secs(600),
                "the edit to converge",
                |s| {
                    s["fleet"]["volumes"].as_array().is_some_and(|v| {
                        v.iter()
                            .any(|v| v["volume"] == name.as_str() && v["state"] == "ok")
                    })
                },
            );
            times.push(t.elapsed());
            // Why it took what it took: the daemon's reconciles and steps since the edit.
            if std::env::var_os("BENCH_EVENTS").is_some() {
                let s = d.status_at("limit=0");
                let events = s["events"].as_array().cloned().unwrap_or_default();
                for ev in events.iter().rev().take(12).rev() {
                    println!(
                        "    edit {e}: {} {} {}",
                        ev["at"], ev["kind"], ev["message"]
                    );
                }
            }
        }
        d.poll = poll;
        if std::env::var_os("BENCH_EVENTS").is_some() {
            let kept = std::env::temp_dir().join("converge-bench-daemon.log");
            if std::fs::copy(&d.log, &kept).is_ok() {
                println!("    the daemon's log: {}", kept.display());
            }
        }
        times
    }

    /// An image grown with the rbd CLI behind unistor's back, until the daemon's status shows it
    /// (found by the ceph-agent's sweep).
    fn out_of_band_resize(&self, d: &Daemon) -> Duration {
        let (victim, _) = &self.vols[self.vols.len() - 1];
        let t = Instant::now();
        self.c.cli_ok(
            "rbd",
            &[
                "resize",
                "--no-progress",
                "--size",
                "96M",
                &format!("{}/{victim}", self.c.pool),
            ],
        );
        d.wait_for(
            Duration::from_secs(900),
            "the out-of-band resize to show",
            |s| {
                s["fleet"]["volumes"].as_array().is_some_and(|v| {
                    v.iter()
                        .any(|v| v["volume"] == victim.as_str() && v["size_bytes"] == 96u64 << 20)
                })
            },
        );
        t.elapsed()
    }

    /// Peak RSS of the daemon, the ceph-agent, the largest dpu-agent and the largest emulator.
    fn print_rss(&self, d: &Daemon) {
        let daemon_rss = peak_rss(d.child.id());
        let ceph_rss = peak_rss(self.procs.0[0].id());
        let agents = &self.procs.0[1..];
        let dpu_rss = agents.iter().map(|p| peak_rss(p.id())).max().unwrap_or(0);
        // The emulators are the dpu-agents' children (simulation's stand-in for SNAP).
        let agents: std::collections::BTreeSet<u32> = agents.iter().map(|p| p.id()).collect();
        let emulator_rss = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
            .filter(|pid| {
                let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                let ppid = stat
                    .rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
                stat.contains("(snap-emulator)") && ppid.is_some_and(|p| agents.contains(&p))
            })
            .map(peak_rss)
            .max()
            .unwrap_or(0);
        println!(
            "  peak RSS: daemon {} MiB, ceph-agent {} MiB, largest dpu-agent {} MiB, largest snap-emulator {} MiB",
            daemon_rss / 1024,
            ceph_rss / 1024,
            dpu_rss / 1024,
            emulator_rss / 1024
        );
    }
}

/// A process's peak resident memory (KiB), from /proc.
fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
}
