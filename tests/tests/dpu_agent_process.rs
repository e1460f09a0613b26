//! The real binaries end to end: a `dpu-agent` on the simulation platform deploys the SNAP
//! emulator (in real-Ceph mode) when told to, takes fenced commands from a controller over mutual
//! TLS, and, when SNAP is killed while no controller is connected, restores every namespace with
//! the same identity on its own.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use e2e::{bin, unique, wait_until, Cluster};
use protocol::client::{AgentClient, ClientOptions};
use protocol::dpu::{
    Attachment, BdevSpec, ControllerSpec, FirmwareSpec, FunctionRef, NameRef, NamespaceSpec,
    RbdCluster, SnapSpec, SnapState, SubsystemSpec,
};
use protocol::names::PeerName;
use protocol::tls::{self, PkiPaths};
use protocol::{Command as Cmd, Empty, ErrorCode, Reply};
use serde_json::Value;

const AGENT: &str = "dpu-e2e";
const NQN: &str = "nqn.2024-01.io.unistor:e2e";
const UUID: &str = "0a1b2c3d-4e5f-4a6b-8c7d-9e0f1a2b3c4d";

struct Agent {
    child: Child,
    addr: String,
    socket: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        // The agent and its emulator (in the agent's process group), SIGTERM first, so that the
        // emulator closes its images.
        e2e::stop_group(&mut self.child);
        // An emulator started by an earlier agent of this test is in that agent's group.
        if let Some(pid) = emulator_pid(&self.socket) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn start_agent(pki: &Path, state: &Path, socket: &Path) -> Agent {
    start_agent_with(pki, state, socket, &[])
}

/// An agent whose emulator gets `emulator_args` besides `--real-ceph`.
fn start_agent_with(pki: &Path, state: &Path, socket: &Path, emulator_args: &[&str]) -> Agent {
    let mut cmd = Command::new(bin("dpu-agent"));
    cmd.process_group(0)
        .args([
            "--name",
            AGENT,
            "--listen",
            e2e::ANY_PORT,
            "--platform",
            "simulation",
        ])
        .arg("--pki-dir")
        .arg(pki)
        .arg("--state-dir")
        .arg(state)
        .arg("--snap-socket")
        .arg(socket)
        .args([
            "--poll-interval",
            "300ms",
            "--heartbeat",
            "1s",
            "--ready-timeout",
            "30s",
        ])
        .arg("--emulator")
        .arg(bin("snap-emulator"))
        .args(["--emulator-arg=--real-ceph"])
        .args(emulator_args.iter().map(|a| format!("--emulator-arg={a}")))
        .stdin(Stdio::null())
        .stderr(Stdio::inherit());
    let (child, addr) = e2e::spawn_announced(&mut cmd, "listening on ");
    Agent {
        child,
        addr,
        socket: socket.to_path_buf(),
    }
}

/// The pid of the snap-emulator serving `socket`.
fn emulator_pid(socket: &Path) -> Option<i32> {
    e2e::emulator_pids(socket).first().copied()
}

async fn session(pki: &Path, addr: &str) -> AgentClient {
    AgentClient::connect(
        addr,
        &PeerName::parse("agent", AGENT).unwrap(),
        tls::client_config(&PkiPaths::in_dir(pki, "controller")).unwrap(),
        ClientOptions::default(),
    )
    .await
    .unwrap()
}

fn probe(socket: &Path, method: &str) -> Value {
    e2e::snap_call(socket, method)
}

fn mon_host(c: &Cluster) -> String {
    std::fs::read_to_string(&c.conf)
        .unwrap()
        .lines()
        .find_map(|l| l.trim().strip_prefix("mon host = ").map(str::to_string))
        .unwrap()
}

/// SNAP as the tests install it: one PF with two VFs.
fn snap_spec() -> SnapSpec {
    SnapSpec {
        image: "nvcr.io/nvidia/doca/doca_snap".into(),
        tag: "4.5.0-6-doca2.9.0".into(),
        env: Default::default(),
        hugepages_mib: 0,
        cpu: "2".into(),
        memory: "1Gi".into(),
        firmware: FirmwareSpec {
            nvme_pfs: 1,
            nvme_vfs: 2,
        },
    }
}

/// The commands that expose `image` to the host: cluster, bdev, subsystem, namespace 3,
/// controller on PF 0 VF 1, attachment, resume.
fn exposure_commands(c: &Cluster, key: &str, image: &str) -> Vec<Cmd> {
    let image = image.to_string();
    vec![
        Cmd::RegisterRbdCluster(RbdCluster {
            name: "ceph1".into(),
            user_id: c.id.clone(),
            mon_hosts: vec![mon_host(c)],
            key: key.trim().into(),
        }),
        Cmd::CreateBdev(BdevSpec {
            name: image.clone(),
            cluster: "ceph1".into(),
            pool: c.pool.clone(),
            image: image.clone(),
            block_size: 4096,
        }),
        Cmd::CreateSubsystem(SubsystemSpec {
            nqn: NQN.into(),
            serial: "E2E0001".into(),
            model: "unistor e2e".into(),
            max_namespaces: 8,
        }),
        Cmd::CreateNamespace(NamespaceSpec {
            nqn: NQN.into(),
            nsid: 3,
            bdev: image.clone(),
            uuid: UUID.into(),
        }),
        Cmd::CreateController(ControllerSpec {
            name: "ctrl-e2e".into(),
            nqn: NQN.into(),
            function: FunctionRef { pf: 0, vf: Some(1) },
            num_queues: 8,
            mdts: 7,
        }),
        Cmd::AttachNamespace(Attachment {
            controller: "ctrl-e2e".into(),
            nsid: 3,
            force: false,
        }),
        Cmd::ResumeController(NameRef {
            name: "ctrl-e2e".into(),
        }),
    ]
}

#[tokio::test(flavor = "multi_thread")]
async fn dpu_agent_deploys_snap_exposes_a_volume_and_heals_a_snap_restart_alone() {
    let c = Cluster::from_env();
    let image = unique("dpu-e2e");
    c.cli_ok(
        "rbd",
        &["create", "--size", "512M", &format!("{}/{image}", c.pool)],
    );
    let key = c.cli_ok("ceph", &["auth", "get-key", &format!("client.{}", c.id)]);

    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    e2e::issue_pki(&pki_dir, &[AGENT]);
    let socket = dir.path().join("spdk.sock");
    let agent = start_agent(&pki_dir, &dir.path().join("state"), &socket);

    let a = session(&pki_dir, &agent.addr).await;
    assert_eq!(a.hello().kind, protocol::AgentKind::Dpu);
    // Mutations are fenced.
    let spec = snap_spec();
    let e = a
        .request(Cmd::InstallSnap(Box::new(spec.clone())))
        .await
        .unwrap_err();
    assert_eq!(e.wire().unwrap().code, ErrorCode::NoLease);
    a.acquire_lease(Duration::from_secs(60)).await.unwrap();
    match a.request(Cmd::InstallSnap(Box::new(spec))).await.unwrap() {
        Reply::Deploy(d) => assert!(d.ready, "{d:?}"),
        other => panic!("{other:?}"),
    }

    for cmd in exposure_commands(&c, &key, &image) {
        let name = cmd.name();
        a.request(cmd)
            .await
            .unwrap_or_else(|e| panic!("{name}: {}", protocol::error::chain(&e)));
    }
    // The bdev has the real image's size (real-Ceph mode opened the image).
    let bdevs = probe(&socket, "bdev_get_bdevs");
    assert_eq!(bdevs[0]["num_blocks"], (512u64 << 20) / 4096);
    a.close().await;

    // SNAP dies while no controller is connected.
    let before = emulator_pid(&socket).expect("the emulator runs");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(before),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(
        Duration::from_secs(30),
        "SNAP to be back with its namespace",
        || {
            emulator_pid(&socket).is_some_and(|p| p != before)
                && e2e::try_snap_call(&socket, "nvme_subsystem_list")
                    .is_ok_and(|s| s[0]["controllers"][0]["state"] == "STARTED")
        },
    );
    let subs = probe(&socket, "nvme_subsystem_list");
    let ns = &subs[0]["namespaces"][0];
    assert_eq!(
        (ns["nsid"].as_u64(), ns["uuid"].as_str()),
        (Some(3), Some(UUID))
    );
    let ctrl = &subs[0]["controllers"][0];
    assert_eq!(
        (ctrl["ctrl_id"].as_str(), ctrl["num_queues"].as_u64()),
        (Some("ctrl-e2e"), Some(8))
    );
    assert_eq!(ctrl["pci_bdf"], "26:0c.1");

    // The controller, reconnecting, is told what happened.
    let a = session(&pki_dir, &agent.addr).await;
    let report = match a.request(Cmd::DpuReport(Empty {})).await.unwrap() {
        Reply::DpuReport(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(report.snap.state, SnapState::Running);
    assert!(report.snap.restarts >= 1);
    assert!(report.missing.is_empty(), "{:?}", report.missing);
    let replay = report.last_replay.expect("the replay is reported");
    assert!(
        replay
            .restored
            .iter()
            .any(|r| r == &format!("namespace {NQN}/3")),
        "{replay:?}"
    );
    assert!(replay.failed.is_empty(), "{replay:?}");
    a.close().await;
    drop(agent);
    // The emulator killed above held the image open (as SNAP's librbd does): Ceph keeps its
    // watch until the watch times out (30 s), then the image can go.
    let spec = format!("{}/{image}", c.pool);
    e2e::wait_until(
        Duration::from_secs(90),
        "the crashed emulator's watch to time out",
        || c.cli("rbd", &["rm", "--no-progress", &spec]).0 == 0,
    );
}

/// SNAP installed and everything of `exposure_commands` before the namespace done, on a
/// fresh session.
async fn install_and_expose_up_to_the_namespace(a: &AgentClient, cmds: &mut Vec<Cmd>) {
    a.acquire_lease(Duration::from_secs(60)).await.unwrap();
    a.request(Cmd::InstallSnap(Box::new(snap_spec())))
        .await
        .unwrap();
    while !matches!(cmds.first(), Some(Cmd::CreateNamespace(_))) {
        let cmd = cmds.remove(0);
        let name = cmd.name();
        a.request(cmd)
            .await
            .unwrap_or_else(|e| panic!("{name}: {}", protocol::error::chain(&e)));
    }
}

fn namespace_3(socket: &Path) -> bool {
    e2e::try_snap_call(socket, "nvme_subsystem_list").is_ok_and(|s| {
        s[0]["namespaces"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n["nsid"] == 3 && n["uuid"] == UUID))
    })
}

/// Write-ahead: the agent is SIGKILLed after SNAP created a namespace and before the ledger said
/// so (the emulator answers 20 s after the change), then SNAP is SIGKILLed too, with no controller
/// connected. The next agent finds the command pending, SNAP empty, and restores the namespace
/// with its NSID and UUID. Before write-ahead, the replay did not know the namespace.
#[tokio::test(flavor = "multi_thread")]
async fn an_agent_killed_between_snaps_change_and_its_ledger_loses_nothing_when_snap_dies_too() {
    let c = Cluster::from_env();
    let image = unique("dpu-wal");
    let spec = format!("{}/{image}", c.pool);
    c.cli_ok("rbd", &["create", "--size", "64M", &spec]);
    let key = c.cli_ok("ceph", &["auth", "get-key", &format!("client.{}", c.id)]);
    let dir = tempfile::tempdir().unwrap();
    let pki_dir = dir.path().join("pki");
    e2e::issue_pki(&pki_dir, &[AGENT]);
    let (state, socket) = (dir.path().join("state"), dir.path().join("spdk.sock"));

    let mut agent = start_agent_with(
        &pki_dir,
        &state,
        &socket,
        &["--reply-latency=nvme_namespace_create=20s"],
    );
    let a = session(&pki_dir, &agent.addr).await;
    let mut cmds = exposure_commands(&c, &key, &image);
    install_and_expose_up_to_the_namespace(&a, &mut cmds).await;
    let create_ns = cmds.remove(0);
    let pending = tokio::spawn(async move { a.request(create_ns).await });
    wait_until(
        Duration::from_secs(30),
        "SNAP to have the namespace (its answer held back)",
        || namespace_3(&socket),
    );
    let ledger = std::fs::read_to_string(state.join("snap-ledger.json")).unwrap();
    assert!(
        ledger.contains("\"pending\""),
        "the intent is written ahead: {ledger}"
    );

    // The agent alone dies (not its group: SNAP runs on), then SNAP.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = agent.child.wait();
    assert!(
        pending.await.unwrap().is_err(),
        "the controller got no answer"
    );
    let snap = emulator_pid(&socket).expect("SNAP outlives its agent");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(snap),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until(Duration::from_secs(10), "SNAP to be gone", || {
        emulator_pid(&socket).is_none()
    });

    // A new agent, no controller: SNAP back with the namespace the old agent was killed over.
    let agent2 = start_agent(&pki_dir, &state, &socket);
    wait_until(
        Duration::from_secs(60),
        "SNAP back with namespace 3 and its UUID",
        || namespace_3(&socket),
    );
    let ledger = std::fs::read_to_string(state.join("snap-ledger.json")).unwrap();
    assert!(!ledger.contains("\"pending\""), "settled: {ledger}");
    assert!(ledger.contains(UUID), "recorded: {ledger}");
    drop(agent2);
    drop(agent);
    e2e::wait_until(
        Duration::from_secs(90),
        "the killed emulator's watch to time out",
        || c.cli("rbd", &["rm", "--no-progress", &spec]).0 == 0,
    );
}
