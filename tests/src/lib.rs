//! Helpers for tests that need real things: the one-node Ceph cluster, the project's binaries,
//! free loopback ports. The end-to-end tests themselves are in `tests/tests/`.

pub mod lab;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How to get a cluster, for failure messages.
pub const HOW_TO_START_CEPH: &str = "this test needs a running Ceph cluster and UNISTOR_CEPH_* \
    set: run `scripts/test.sh` (starts one), or `scripts/ceph-dev-cluster.sh up \
    /tmp/unistor-ceph && . /tmp/unistor-ceph/env` and run the tests again";

/// The cluster the tests use, from the variables `scripts/ceph-dev-cluster.sh` writes.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// `ceph.conf`.
    pub conf: PathBuf,
    /// Admin keyring.
    pub keyring: PathBuf,
    /// Admin cephx id.
    pub id: String,
    /// An rbd pool.
    pub pool: String,
    /// A second rbd pool.
    pub pool2: String,
}

impl Cluster {
    /// Reads the environment; panics with instructions when the cluster is not there.
    pub fn from_env() -> Self {
        let var = |k: &str| {
            std::env::var(k).unwrap_or_else(|_| panic!("{k} is not set: {HOW_TO_START_CEPH}"))
        };
        let c = Cluster {
            conf: var("UNISTOR_CEPH_CONF").into(),
            keyring: var("UNISTOR_CEPH_KEYRING").into(),
            id: var("UNISTOR_CEPH_ID"),
            pool: var("UNISTOR_CEPH_POOL"),
            pool2: var("UNISTOR_CEPH_POOL2"),
        };
        assert!(
            c.conf.exists(),
            "{} does not exist: {HOW_TO_START_CEPH}",
            c.conf.display()
        );
        c
    }

    /// A command for a real Ceph CLI tool, pointed at the cluster as admin.
    pub fn command(&self, tool: &str) -> Command {
        let mut cmd = Command::new(tool);
        cmd.arg("--conf")
            .arg(&self.conf)
            .arg("--keyring")
            .arg(&self.keyring)
            .arg("--id")
            .arg(&self.id)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs a real CLI tool: (exit code, stdout, stderr).
    pub fn cli(&self, tool: &str, args: &[&str]) -> (i32, String, String) {
        let out = self
            .command(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool}: {e}: {HOW_TO_START_CEPH}"));
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Runs a real CLI tool that must succeed; returns stdout.
    pub fn cli_ok(&self, tool: &str, args: &[&str]) -> String {
        let (code, out, err) = self.cli(tool, args);
        assert_eq!(code, 0, "{tool} {args:?} failed: {err}");
        out
    }

    /// How long a test agent's sweep may take to come round to an image in `pool`: it re-reads
    /// every image of the pool (the suite's other tests leave theirs there too), at most a few
    /// at a time; a second each on a loaded 2-core machine, a minute at least.
    pub fn sweep_bound(&self, pool: &str) -> Duration {
        let images = self
            .cli("rbd", &["ls", pool])
            .1
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count();
        Duration::from_secs(60 + 2 * images as u64)
    }

    /// `rbd info` of an image as JSON, or `None` when it does not exist.
    pub fn rbd_info(&self, pool: &str, image: &str) -> Option<serde_json::Value> {
        let spec = format!("{pool}/{image}");
        let (code, out, _) = self.cli("rbd", &["info", "--format", "json", &spec]);
        (code == 0).then(|| serde_json::from_str(&out).expect("rbd info prints JSON"))
    }

    /// An image's entry in a pool's unistor index, read with `rados listomapkeys` and
    /// `rados getomapval`, independently of the agent's own parser: the image's own key holds its
    /// entry, a batch key (`~b.`...) a JSON map of images to entries.
    pub fn index_entry(&self, pool: &str, image: &str) -> Option<serde_json::Value> {
        let (code, keys, _) = self.cli("rados", &["--pool", pool, "listomapkeys", "unistor.index"]);
        if code != 0 {
            return None;
        }
        let file = tempfile::NamedTempFile::new().expect("temp file");
        let path = file.path().to_str().expect("utf-8 path");
        let get = |key: &str| -> Vec<u8> {
            self.cli_ok(
                "rados",
                &["--pool", pool, "getomapval", "unistor.index", key, path],
            );
            std::fs::read(path).expect("value written")
        };
        if keys.lines().any(|k| k == image) {
            let raw = get(image);
            return Some(serde_json::from_slice(&raw).unwrap_or_else(
                |_| serde_json::json!({ "volume": String::from_utf8_lossy(&raw) }),
            ));
        }
        keys.lines().filter(|k| k.starts_with("~b.")).find_map(|k| {
            let batch: serde_json::Value =
                serde_json::from_slice(&get(k)).expect("a batch key holds JSON");
            batch.get(image).cloned()
        })
    }
}

/// A name no other test (or test process) uses.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A one-node cluster of a test's own (`scripts/ceph-dev-cluster.sh` in a temporary directory),
/// for what must not happen to the suite's shared cluster: making it unhealthy or full. Stopped
/// and removed on drop.
pub struct PrivateCluster {
    dir: tempfile::TempDir,
    /// The cluster, as the other helpers take it.
    pub cluster: Cluster,
}

impl PrivateCluster {
    /// Starts one (about 15 s). The monitor's port must be written into the monitor map before
    /// the monitor runs, so it cannot be the system's choice: the script's `--port auto` (below
    /// the ephemeral range, nothing listening on it), tried again should another take it first.
    pub fn up() -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ceph-dev-cluster.sh");
        let mut tried = vec![];
        for attempt in 1..=3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let out = Command::new("bash")
                .arg(&script)
                .arg("up")
                .arg(dir.path())
                .args(["--port", "auto"])
                .stdin(Stdio::null())
                .output()
                .expect("runs the cluster script");
            if out.status.success() {
                let d = dir.path();
                return PrivateCluster {
                    cluster: Cluster {
                        conf: d.join("ceph.conf"),
                        keyring: d.join("admin.keyring"),
                        id: "admin".into(),
                        pool: "rbd".into(),
                        pool2: "rbd2".into(),
                    },
                    dir,
                };
            }
            tried.push(format!(
                "attempt {attempt}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
            stop_cluster(&script, dir.path());
        }
        panic!("no private cluster could start:\n{}", tried.join("\n"));
    }

    /// `ceph health` (the status word and the checks' summary).
    pub fn health(&self) -> String {
        self.cluster.cli("ceph", &["health"]).1
    }

    /// Every daemon of the cluster (monitor, manager, OSD) SIGSTOPped: a client's RADOS traffic
    /// is blackholed (connections stay open, nothing answers). They are resumed when the guard
    /// is dropped (a failing test too).
    pub fn freeze(&self) -> Frozen {
        let pids: Vec<nix::unistd::Pid> = std::fs::read_dir(self.dir.path().join("run"))
            .expect("the cluster's run directory")
            .filter_map(|e| {
                let p = e.ok()?.path();
                if p.extension()? != "pid" {
                    return None;
                }
                let pid = std::fs::read_to_string(&p).ok()?.trim().parse().ok()?;
                Some(nix::unistd::Pid::from_raw(pid))
            })
            .collect();
        assert!(pids.len() >= 3, "monitor, manager and OSD pids: {pids:?}");
        for &p in &pids {
            nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
        }
        Frozen(pids)
    }
}

/// A [`PrivateCluster`] whose daemons are stopped; SIGCONT on drop.
pub struct Frozen(Vec<nix::unistd::Pid>);

impl Drop for Frozen {
    fn drop(&mut self) {
        for &p in &self.0 {
            let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGCONT);
        }
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/ceph-dev-cluster.sh");
        stop_cluster(&script, self.dir.path());
    }
}

/// `ceph-dev-cluster.sh down DIR`: its daemons stopped by pid.
fn stop_cluster(script: &Path, dir: &Path) {
    let _ = Command::new("bash")
        .arg(script)
        .arg("down")
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Path of one of the workspace's binaries (built by `cargo build --workspace --bins`).
pub fn bin(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps, binaries (the benchmark too) one level up.
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("target/<profile>");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target/<profile>");
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// Spawns `cmd` (which binds port 0 and says where it listens on stdout) and returns it with the
/// address it announced: the text after `after` in its first such line, up to a space or `/`.
/// No port is guessed beforehand, so none can be taken meanwhile. The rest of its stdout is
/// drained. Panics, with what it printed, if it says nothing within 30 s.
pub fn spawn_announced(cmd: &mut Command, after: &str) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    let mut child = cmd.stdout(Stdio::piped()).spawn().expect("spawn");
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    let after = after.to_string();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(out).lines();
        let mut said = vec![];
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if let Some((_, rest)) = line.split_once(after.as_str()) {
                let addr: String = rest
                    .chars()
                    .take_while(|c| !c.is_whitespace() && *c != '/')
                    .collect();
                let _ = tx.send(Ok(addr));
                // Keep reading so that the child never blocks on a full pipe.
                for _ in lines.by_ref() {}
                return;
            }
            said.push(line);
        }
        let _ = tx.send(Err(said.join("\n")));
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Ok(addr)) => (child, addr),
        Ok(Err(said)) => {
            let status = child.wait().ok();
            panic!(
                "{cmd:?} ended ({status:?}) without saying where it listens; it printed:\n{said}"
            )
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{cmd:?} said nothing about where it listens within 30 s")
        }
    }
}

/// Polls `cond` every 100 ms until it holds; panics after `limit`, naming `what`.
pub fn wait_until(limit: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "gave up after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Processes stopped, with everything they started, when dropped (see [`stop_group`]). Each
/// is spawned as the leader of its own process group (the commands here set that up).
#[derive(Default)]
pub struct Procs(pub Vec<std::process::Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            stop_group(c);
        }
    }
}

/// Stops `leader`'s process group: SIGTERM to all of it (a SNAP emulator then closes its images,
/// so Ceph drops its watches at once instead of after the watch timeout), a poll until the group
/// is gone (at most 10 s), then SIGKILL, and reaps the leader. Also reaches what a leader killed
/// earlier left behind in its group (an emulator that outlived its agent).
pub fn stop_group(leader: &mut std::process::Child) {
    use nix::sys::signal::{killpg, Signal};
    let pgid = nix::unistd::Pid::from_raw(leader.id() as i32);
    let _ = killpg(pgid, Signal::SIGTERM);
    let _ = leader.kill();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let _ = leader.try_wait();
        if killpg(pgid, None).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = killpg(pgid, Signal::SIGKILL);
    let _ = leader.wait();
}

/// Runs `unistor` with `args`.
pub fn unistor(args: &[&str]) -> std::process::Output {
    Command::new(bin("unistor"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run unistor")
}

/// An output for assertion messages.
pub fn show(o: &std::process::Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `unistor inspect` of agent `agent` at `addr` with the controller's certificate in `pki`,
/// JSON output.
pub fn inspect(agent: &str, addr: &str, pki: &Path) -> std::process::Output {
    unistor(&[
        "inspect",
        "--agent",
        agent,
        "--addr",
        addr,
        "--pki-dir",
        pki.to_str().expect("utf-8 path"),
        "--output",
        "json",
    ])
}

/// Creates a CA in `dir` and certificates for the controller and `agents`.
pub fn issue_pki(dir: &Path, agents: &[&str]) {
    let d = dir.to_str().expect("utf-8 path");
    let ok = |args: &[&str]| {
        let o = unistor(args);
        assert!(o.status.success(), "{}", show(&o));
    };
    ok(&["pki", "init", "--dir", d]);
    ok(&[
        "pki",
        "issue",
        "--dir",
        d,
        "--name",
        "controller",
        "--role",
        "controller",
    ]);
    for a in agents {
        ok(&["pki", "issue", "--dir", d, "--name", a, "--role", "agent"]);
    }
}

/// The command line of a ceph-agent named `name` listening on `addr`, on the test cluster.
pub fn ceph_agent_command(
    c: &Cluster,
    name: &str,
    addr: &str,
    pki: &Path,
    state: &Path,
) -> Command {
    let mut cmd = Command::new(bin("ceph-agent"));
    cmd.args(["--name", name, "--listen", addr])
        .process_group(0)
        .arg("--pki-dir")
        .arg(pki)
        .arg("--state-dir")
        .arg(state)
        .arg("--ceph-conf")
        .arg(&c.conf)
        .arg("--keyring")
        .arg(&c.keyring)
        .args(["--client-id", &c.id])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// The address agents and tests bind to: the system picks the port.
pub const ANY_PORT: &str = "127.0.0.1:0";

/// Tests change images behind unistor's back and wait for the sweep to find it: a quick sweep
/// over the few images a test has.
pub const QUICK_SWEEP: &[&str] = &[
    "--sweep-rate",
    "50",
    "--sweep-min-age",
    "1s",
    "--pool-refresh",
    "2s",
];

/// Starts a ceph-agent named `name` (sweeping quickly) on a port of the system's choosing;
/// returns its address.
pub fn spawn_ceph_agent(
    procs: &mut Procs,
    c: &Cluster,
    name: &str,
    pki: &Path,
    state: &Path,
) -> String {
    let (child, addr) = spawn_announced(
        ceph_agent_command(c, name, ANY_PORT, pki, state).args(QUICK_SWEEP),
        "listening on ",
    );
    procs.0.push(child);
    addr
}

/// Starts a simulated dpu-agent (SNAP emulator in real-Ceph mode, socket `state/spdk.sock`);
/// returns its address.
pub fn spawn_dpu_agent(procs: &mut Procs, name: &str, pki: &Path, state: &Path) -> String {
    let (child, addr) = spawn_announced(
        &mut dpu_agent_command(name, ANY_PORT, pki, state, &[]),
        "listening on ",
    );
    procs.0.push(child);
    addr
}

/// The command line of a simulated dpu-agent (SNAP emulator in real-Ceph mode, socket
/// `state/spdk.sock`, 500 ms SNAP poll) listening on `addr`, with `extra` arguments.
pub fn dpu_agent_command(
    name: &str,
    addr: &str,
    pki: &Path,
    state: &Path,
    extra: &[&str],
) -> Command {
    let mut cmd = Command::new(bin("dpu-agent"));
    cmd.args(["--name", name, "--listen", addr])
        .process_group(0)
        .args(["--platform", "simulation"]);
    if !extra.iter().any(|a| a.starts_with("--poll-interval")) {
        cmd.args(["--poll-interval", "500ms"]);
    }
    cmd.arg("--pki-dir")
        .arg(pki)
        .arg("--state-dir")
        .arg(state)
        .arg("--snap-socket")
        .arg(state.join("spdk.sock"))
        .arg("--emulator")
        .arg(bin("snap-emulator"))
        .arg("--emulator-arg=--real-ceph")
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// PIDs of the SNAP emulators serving `socket`.
pub fn emulator_pids(socket: &Path) -> Vec<i32> {
    let mut pids = vec![];
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let is_emulator = args.first().is_some_and(|a| a.ends_with(b"snap-emulator"));
        let sock = socket.as_os_str().as_encoded_bytes();
        if is_emulator && args.contains(&sock) {
            pids.push(pid);
        }
    }
    pids
}

/// A `unistor watch` daemon, killed when dropped; its log is in `log`.
pub struct Daemon {
    /// The process.
    pub child: std::process::Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Its stderr.
    pub log: PathBuf,
    /// How often a wait polls the status (200 ms; a benchmark timing edits polls faster).
    pub poll: Duration,
}

impl Daemon {
    /// Starts `unistor watch` with `args` (the manifest directory first), logging to `log`.
    pub fn start(args: &[&str], log: &Path) -> Self {
        let (child, listen) = spawn_announced(
            Command::new(bin("unistor"))
                .arg("watch")
                .args(args)
                .args(["--listen", ANY_PORT])
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stderr(std::fs::File::create(log).expect("daemon log")),
            "dashboard on http://",
        );
        Daemon {
            child,
            url: format!("http://{listen}"),
            log: log.to_path_buf(),
            poll: Duration::from_millis(200),
        }
    }

    /// GET `path` as text.
    pub fn get(&self, path: &str) -> String {
        http_get(&format!("{}{path}", self.url))
    }

    /// Steps the daemon has run to completion (`unistor_steps_total{outcome="done"}`; 0 before
    /// the first).
    pub fn steps_done(&self) -> u64 {
        self.get("/metrics")
            .lines()
            .find(|l| l.starts_with("unistor_steps_total{outcome=\"done\"}"))
            .and_then(|l| l.split_whitespace().last()?.parse().ok())
            .unwrap_or(0)
    }

    /// The JSON API's status.
    pub fn status(&self) -> serde_json::Value {
        self.status_at("")
    }

    /// The JSON API's status with `query` (`limit=0`: the counts alone; `q=NAME`...).
    pub fn status_at(&self, query: &str) -> serde_json::Value {
        serde_json::from_str(&self.get(&format!("/api/v1/status?{query}"))).expect("status is JSON")
    }

    /// Waits until `cond` holds on the status; on timeout panics with the last status and
    /// the end of the daemon's log.
    pub fn wait_for(
        &self,
        limit: Duration,
        what: &str,
        cond: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        self.wait_for_at("", limit, what, cond)
    }

    /// [`Daemon::wait_for`] on the status with `query`.
    pub fn wait_for_at(
        &self,
        query: &str,
        limit: Duration,
        what: &str,
        mut cond: impl FnMut(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let start = Instant::now();
        loop {
            let s = self.status_at(query);
            if cond(&s) {
                return s;
            }
            if start.elapsed() > limit {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                // The newest events, one line each: a long run's list would hide the rest.
                let mut s = s;
                let events: Vec<String> = s["events"]
                    .as_array()
                    .map(|e| {
                        let from = e.len().saturating_sub(30);
                        e[from..].iter().map(|e| e.to_string()).collect()
                    })
                    .unwrap_or_default();
                s["events"] = serde_json::Value::Null;
                panic!(
                    "gave up after {limit:?} waiting for {what}\nlast status (events below): {}\nnewest events:\n{}\ndaemon log (end):\n{}",
                    serde_json::to_string(&s).unwrap_or_default(),
                    events.join("\n"),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(self.poll);
        }
    }

    /// Asks for a reconcile and waits until one that started after the request has ended;
    /// returns the status then. What a test checks afterwards ("nothing happened") has had its
    /// chance to happen, without a fixed sleep.
    pub fn reconcile_now(&self, limit: Duration) -> serde_json::Value {
        let answer = http_post(&format!("{}/api/v1/reconcile", self.url));
        let v: serde_json::Value =
            serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer}"));
        let at = v["done_at_seq"]
            .as_u64()
            .unwrap_or_else(|| panic!("{answer}"));
        self.wait_for(limit, "the requested reconcile to end", |s| {
            s["last_reconcile"]["seq"].as_u64() >= Some(at)
        })
    }

    /// Waits until the last reconcile converged with every volume ok (`n` of them).
    pub fn wait_converged(&self, limit: Duration, n: usize) -> serde_json::Value {
        self.wait_for(limit, &format!("{n} volume(s) converged"), |s| {
            let vols = s["fleet"]["volumes"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[]);
            reconciled(s)
                && s["last_reconcile"]["result"] == "converged"
                && vols.len() == n
                && vols.iter().all(|v| v["state"] == "ok")
        })
    }
}

/// Whether the daemon's last reconcile ran on the manifests in force, and none runs now.
pub fn reconciled(s: &serde_json::Value) -> bool {
    s["reconciling"] == false && s["last_reconcile"]["generation"] == s["manifests"]["generation"]
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain-HTTP client for the daemon on loopback: answers whatever their status, 10 s at most.
fn http() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// POSTs an empty JSON object to `url` (the daemon takes nothing else); the body of the answer.
pub fn http_post(url: &str) -> String {
    http()
        .post(url)
        .header("Content-Type", "application/json")
        .send("{}")
        .unwrap_or_else(|e| panic!("POST {url}: {e}"))
        .body_mut()
        .read_to_string()
        .unwrap_or_else(|e| panic!("POST {url}: {e}"))
}

/// GETs `url`; the body of the answer.
pub fn http_get(url: &str) -> String {
    http()
        .get(url)
        .call()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
        .body_mut()
        .read_to_string()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// A headless browser's view of `url` after its scripts ran: Debian's chromium, `--dump-dom`.
/// Panics with how to install it when it is missing.
pub fn browser_dom(url: &str) -> String {
    let out = browser(url, &["--dump-dom".into()]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A screenshot of `url` (1280 x `height`) in headless chromium, as PNG bytes: the page after its
/// scripts ran. Panics unless the browser wrote a PNG of that size.
pub fn browser_screenshot(url: &str, height: u32) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("screenshot dir");
    let path = dir.path().join("shot.png");
    browser(
        url,
        &[
            format!("--screenshot={}", path.display()),
            format!("--window-size=1280,{height}"),
            "--hide-scrollbars".into(),
        ],
    );
    let png = std::fs::read(&path).expect("the browser wrote a screenshot");
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
    let be = |at: usize| u32::from_be_bytes(png[at..at + 4].try_into().expect("4 bytes"));
    assert_eq!((be(16), be(20)), (1280, height), "the PNG's size (IHDR)");
    png
}

/// Pixels of the PNG `png` within `tolerance` of colour `rgb` (each channel).
pub fn pixels_like(png: &[u8], rgb: [u8; 3], tolerance: u8) -> usize {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(png));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().expect("a PNG");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("a frame");
    let channels = info.color_type.samples();
    buf[..info.buffer_size()]
        .chunks(channels)
        .filter(|p| p.len() >= 3 && (0..3).all(|c| p[c].abs_diff(rgb[c]) <= tolerance))
        .count()
}

fn browser(url: &str, what: &[String]) -> std::process::Output {
    let bin = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|b| {
            Command::new(b)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .unwrap_or_else(|| {
            panic!("no headless browser: install Debian's chromium (`apt-get install chromium`); .ci/run does")
        });
    let profile = tempfile::tempdir().expect("browser profile");
    let out = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(what)
        .arg(url)
        .stdin(Stdio::null())
        .output()
        .expect("run the browser");
    assert!(
        out.status.success(),
        "{bin} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// One JSON-RPC call to SNAP's socket, directly (not through an agent); the `result`.
pub fn snap_call(socket: &Path, method: &str) -> serde_json::Value {
    try_snap_call(socket, method)
        .unwrap_or_else(|e| panic!("{method} on {}: {e}", socket.display()))
}

/// [`snap_call`] that says why it got no answer instead of panicking: for conditions polled
/// while SNAP may be restarting (not listening yet, closing).
pub fn try_snap_call(socket: &Path, method: &str) -> Result<serde_json::Value, String> {
    try_snap_call_with(socket, method, serde_json::Value::Null)
}

/// [`try_snap_call`] with `params` (none when null).
pub fn try_snap_call_with(
    socket: &Path,
    method: &str,
    params: serde_json::Value,
) -> Result<serde_json::Value, String> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).map_err(|e| e.to_string())?;
    let mut req = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method});
    if !params.is_null() {
        req["params"] = params;
    }
    s.write_all(req.to_string().as_bytes())
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| format!("{e}: {line:?}"))?;
    Ok(v["result"].clone())
}

/// Manifests of a fleet: one cluster (agent `ceph_agent` at `ceph_addr`, pool `pool`, SNAP's
/// cephx id `snap_id`) and DPUs `(agent name, address)` named `dpu-<i>` in hosts `host-<i>`.
pub fn fleet_yaml(
    ceph_agent: &str,
    ceph_addr: &str,
    pool: &str,
    snap_id: &str,
    dpus: &[(&str, &str)],
) -> String {
    let mut y = format!(
        "apiVersion: unistor.io/v1alpha1
kind: CephCluster
metadata: {{name: ceph}}
spec:
  agent: {{name: {ceph_agent}, address: '{ceph_addr}'}}
  pools: [{pool}]
  snapIdentity: {{clientId: {snap_id}}}
"
    );
    for (i, (agent, addr)) in dpus.iter().enumerate() {
        y.push_str(&format!(
            "---
apiVersion: unistor.io/v1alpha1
kind: Dpu
metadata: {{name: dpu-{i}}}
spec:
  agent: {{name: {agent}, address: '{addr}'}}
  host: host-{i}
  snap: {{version: 4.5.0, functions: {{pfs: 1, vfsPerPf: 4}}}}
"
        ));
    }
    y
}

/// One volume document: `name` on `host-<host>`, `size` (`64Mi`), image `name` in `pool`.
pub fn volume_yaml(name: &str, host: usize, size: &str, pool: &str, policy: &str) -> String {
    format!(
        "---\napiVersion: unistor.io/v1alpha1\nkind: Volume\nmetadata: {{name: {name}}}\nspec:\n  host: host-{host}\n  size: {size}\n  rbd: {{cluster: ceph, pool: {pool}}}\n  deletionPolicy: {policy}\n  trashRetention: 1h\n"
    )
}

/// Writes `text` to `path` the way editors do: a temporary file in the same directory, renamed
/// over the old one.
pub fn write_like_an_editor(path: &Path, text: &str) {
    let dir = path.parent().expect("a directory");
    let tmp = dir.join(format!(
        ".{}.tmp",
        path.file_name().expect("a file").to_string_lossy()
    ));
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

/// The simulated host of a DPU: its devices (NBD sockets the SNAP emulator serves in the host
/// directory) used with qemu-utils, as a host uses its NVMe namespaces.
pub mod host {
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::process::{Child, Command, Output, Stdio};

    const HOW_TO_GET_QEMU: &str = "the simulated host's I/O needs qemu-io and qemu-img: \
        `apt-get install qemu-utils` (scripts/test.sh installs it)";

    fn url(device: &Path) -> String {
        format!("nbd+unix:///?socket={}", device.display())
    }

    fn qemu(tool: &str) -> Command {
        // Checked once per tool and process, not before every command.
        static FOUND: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
        let mut found = FOUND.lock().unwrap_or_else(|e| e.into_inner());
        if !found.iter().any(|t| t == tool) {
            if Command::new(tool).arg("--version").output().is_err() {
                panic!("{tool} not found: {HOW_TO_GET_QEMU}");
            }
            found.push(tool.to_string());
        }
        Command::new(tool)
    }

    /// The host's account (`host.json`): controllers, and per device NSID, UUID, size, openers.
    pub fn view(host_dir: &Path) -> serde_json::Value {
        std::fs::read(host_dir.join("host.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    /// The host's devices: (device socket, controller, NSID, UUID, size, openers).
    pub fn devices(host_dir: &Path) -> Vec<Device> {
        let v = view(host_dir);
        let mut out = vec![];
        for c in v["controllers"].as_array().into_iter().flatten() {
            for n in c["namespaces"].as_array().into_iter().flatten() {
                out.push(Device {
                    path: PathBuf::from(n["device"].as_str().unwrap_or_default()),
                    controller: c["name"].as_str().unwrap_or_default().to_string(),
                    enabled: c["enabled"].as_bool().unwrap_or(false),
                    nsid: n["nsid"].as_u64().unwrap_or(0) as u32,
                    uuid: n["uuid"].as_str().unwrap_or_default().to_string(),
                    size: n["size_bytes"].as_u64().unwrap_or(0),
                    open: n["open"].as_u64().unwrap_or(0) as u32,
                });
            }
        }
        out
    }

    /// One device of the host.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct Device {
        /// Its NBD socket.
        pub path: PathBuf,
        /// Its controller.
        pub controller: String,
        /// Whether the host's driver has that controller enabled.
        pub enabled: bool,
        /// NSID.
        pub nsid: u32,
        /// UUID.
        pub uuid: String,
        /// Bytes.
        pub size: u64,
        /// Openers.
        pub open: u32,
    }

    /// Runs qemu-io commands (`-c`) on `device`; the output, whatever the exit.
    pub fn io(device: &Path, cmds: &[&str]) -> Output {
        let mut c = qemu("qemu-io");
        c.args(["-f", "raw", &url(device)]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        c.stdin(Stdio::null()).output().expect("run qemu-io")
    }

    /// `qemu-img bench`: `count` requests of `size` bytes (`write`s, else reads), `depth` in
    /// flight, one after the other through the device (wrapping at its end); the seconds it
    /// reported, None when it failed.
    pub fn bench(device: &Path, count: u64, depth: u32, size: u64, write: bool) -> Option<f64> {
        let mut c = qemu("qemu-img");
        c.args(["bench", "-f", "raw"]);
        c.args(["-c", &count.to_string(), "-d", &depth.to_string()]);
        c.args(["-s", &size.to_string()]);
        if write {
            c.args(["-w", "--pattern=7"]);
        }
        c.arg(url(device));
        let o = c.stdin(Stdio::null()).output().expect("run qemu-img bench");
        let out = String::from_utf8_lossy(&o.stdout);
        if !o.status.success() {
            return None;
        }
        out.lines()
            .find_map(|l| l.strip_prefix("Run completed in "))
            .and_then(|t| t.trim_end_matches(" seconds.").trim().parse().ok())
    }

    /// [`io`], given up (killed) after `limit`: None when it did not end by then (an I/O a
    /// fenced SNAP can no longer complete).
    pub fn io_within(device: &Path, cmds: &[&str], limit: std::time::Duration) -> Option<Output> {
        let mut c = qemu("qemu-io");
        c.args(["-f", "raw", &url(device)]);
        for cmd in cmds {
            c.args(["-c", cmd]);
        }
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run qemu-io");
        let until = std::time::Instant::now() + limit;
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                return child.wait_with_output().ok();
            }
            if std::time::Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Writes `len` bytes of `pattern` at `offset` (`qemu-io write -P`); true when it worked.
    pub fn write_pattern(device: &Path, pattern: u8, offset: u64, len: u64) -> bool {
        let o = io(device, &[&format!("write -P {pattern} {offset} {len}")]);
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains("wrote ")
    }

    /// Whether `len` bytes at `offset` read back as `pattern` (`qemu-io read -P`).
    pub fn reads_pattern(device: &Path, pattern: u8, offset: u64, len: u64) -> bool {
        let o = io(device, &[&format!("read -P {pattern} {offset} {len}")]);
        let out = String::from_utf8_lossy(&o.stdout);
        o.status.success() && out.contains("read ") && !out.contains("Pattern verification failed")
    }

    /// The device's size as the host reads it on opening (`qemu-img info`); `None` when it
    /// cannot be opened.
    pub fn size(device: &Path) -> Option<u64> {
        let o = qemu("qemu-img")
            .args(["info", "--output=json", &url(device)])
            .stdin(Stdio::null())
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).ok()?;
        v["virtual-size"].as_u64()
    }

    /// The host holding a device open (an interactive qemu-io on it), until dropped.
    pub struct Opener {
        child: Child,
    }

    impl Opener {
        /// Opens `device` and keeps it open.
        pub fn open(device: &Path) -> Self {
            let child = qemu("qemu-io")
                .args(["-f", "raw", &url(device)])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("run qemu-io");
            Self { child }
        }

        /// Whether the program still runs (it ends when the device goes away and it is told
        /// to read, or when its stdin closes).
        pub fn running(&mut self) -> bool {
            matches!(self.child.try_wait(), Ok(None))
        }
    }

    impl Drop for Opener {
        fn drop(&mut self) {
            if let Some(stdin) = self.child.stdin.as_mut() {
                let _ = stdin.write_all(b"quit\n");
            }
            drop(self.child.stdin.take());
            let start = std::time::Instant::now();
            while start.elapsed() < std::time::Duration::from_secs(5) {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A `fleet-sim` process: many simulated DPUs (each a dpu-agent endpoint over its own SNAP
/// emulator) in one process, driven through its stdin. Stopped with `quit` when dropped (each
/// SNAP closes its images), then with its process group.
pub struct FleetSim {
    /// The process.
    pub child: std::process::Child,
    stdin: std::process::ChildStdin,
    lines: std::sync::mpsc::Receiver<String>,
    /// Each DPU's agent name and address, in order.
    pub agents: Vec<(String, String)>,
}

impl FleetSim {
    /// Starts `dpus` DPUs named `prefix-<i>` (certificates issued from the CA in `pki` when
    /// missing), state under `state`, with `extra` arguments; returns once all listen.
    pub fn start(pki: &Path, state: &Path, prefix: &str, dpus: usize, extra: &[&str]) -> Self {
        use std::io::BufRead;
        let mut child = Command::new(bin("fleet-sim"))
            .arg("--pki-dir")
            .arg(pki)
            .arg("--issue-missing")
            .arg("--state-dir")
            .arg(state)
            .args(["--prefix", prefix, "--dpus", &dpus.to_string()])
            .args(extra)
            .process_group(0)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn fleet-sim");
        let out = child.stdout.take().expect("piped stdout");
        let stdin = child.stdin.take().expect("piped stdin");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut f = Self {
            child,
            stdin,
            lines,
            agents: vec![],
        };
        let up = f.answer(Duration::from_secs(60 + dpus as u64 / 5));
        assert!(up.ends_with("DPUs up"), "fleet-sim said {up:?}");
        assert_eq!(f.agents.len(), dpus, "every DPU said where it listens");
        f
    }

    /// The next `fleet-sim: ` line within `limit`; agents' `listening on` lines seen meanwhile
    /// update [`FleetSim::agents`].
    fn answer(&mut self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = match self.lines.recv_timeout(left) {
                Ok(l) => l,
                Err(e) => panic!("fleet-sim said nothing within {limit:?}: {e}"),
            };
            if let Some(a) = line.strip_prefix("fleet-sim: ") {
                return a.to_string();
            }
            if let Some((name, addr)) = line.split_once(": listening on ") {
                match self.agents.iter_mut().find(|(n, _)| n == name) {
                    Some(a) => a.1 = addr.to_string(),
                    None => self.agents.push((name.to_string(), addr.to_string())),
                }
            }
        }
    }

    /// Sends `cmd` (`stop A B`, `start A B`, `stats`, `reset-peak`) and returns the answer.
    pub fn command(&mut self, cmd: &str) -> String {
        use std::io::Write;
        writeln!(self.stdin, "{cmd}").expect("fleet-sim reads commands");
        self.stdin.flush().expect("flush");
        self.answer(Duration::from_secs(120))
    }

    /// The fleet's counters.
    pub fn stats(&mut self) -> serde_json::Value {
        let s = self.command("stats");
        serde_json::from_str(&s).unwrap_or_else(|e| panic!("stats {s:?}: {e}"))
    }
}

impl Drop for FleetSim {
    fn drop(&mut self) {
        use std::io::Write;
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        stop_group(&mut self.child);
    }
}
