//! Helpers for tests that need real things: the one-node Ceph cluster, the project's binaries,
//! free loopback ports. The end-to-end tests themselves are in `tests/tests/`.

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

    /// `rbd info` of an image as JSON, or `None` when it does not exist.
    pub fn rbd_info(&self, pool: &str, image: &str) -> Option<serde_json::Value> {
        let spec = format!("{pool}/{image}");
        let (code, out, _) = self.cli("rbd", &["info", "--format", "json", &spec]);
        (code == 0).then(|| serde_json::from_str(&out).expect("rbd info prints JSON"))
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

/// Path of one of the workspace's binaries (built by `cargo build --workspace --bins`).
pub fn bin(name: &str) -> PathBuf {
    // Test executables live in target/<profile>/deps; binaries one level up.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` first (scripts/test.sh does)",
        path.display()
    );
    path
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind 127.0.0.1:0")
        .port()
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

/// Processes killed when dropped.
#[derive(Default)]
pub struct Procs(pub Vec<std::process::Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
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

/// Waits until something listens on `addr`.
pub fn wait_listening(addr: &str) {
    wait_until(Duration::from_secs(30), "the agent to listen", || {
        std::net::TcpStream::connect(addr).is_ok()
    });
}

/// Starts a ceph-agent named `name` on a free port; returns its address.
pub fn spawn_ceph_agent(
    procs: &mut Procs,
    c: &Cluster,
    name: &str,
    pki: &Path,
    state: &Path,
) -> String {
    let addr = format!("127.0.0.1:{}", free_port());
    let child = ceph_agent_command(c, name, &addr, pki, state)
        .spawn()
        .expect("start ceph-agent");
    procs.0.push(child);
    wait_listening(&addr);
    addr
}

/// Starts a simulated dpu-agent (SNAP emulator in real-Ceph mode, socket `state/spdk.sock`);
/// returns its address.
pub fn spawn_dpu_agent(procs: &mut Procs, name: &str, pki: &Path, state: &Path) -> String {
    let addr = format!("127.0.0.1:{}", free_port());
    procs.0.push(
        Command::new(bin("dpu-agent"))
            .args(["--name", name, "--listen", &addr])
            .args(["--platform", "simulation", "--poll-interval", "500ms"])
            .arg("--pki-dir")
            .arg(pki)
            .arg("--state-dir")
            .arg(state)
            .arg("--snap-socket")
            .arg(state.join("spdk.sock"))
            .arg("--emulator")
            .arg(bin("snap-emulator"))
            .arg("--emulator-arg=--real-ceph")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dpu-agent"),
    );
    wait_listening(&addr);
    addr
}

/// One JSON-RPC call to SNAP's socket, directly (not through an agent); the `result`.
pub fn snap_call(socket: &Path, method: &str) -> serde_json::Value {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("SNAP socket");
    let req = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": method});
    s.write_all(req.to_string().as_bytes()).expect("write");
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("read");
    serde_json::from_str::<serde_json::Value>(&line).expect("json")["result"].clone()
}
