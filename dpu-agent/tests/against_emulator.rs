//! The dpu-agent against the SNAP emulator: create and teardown paths, retries, conflicts,
//! hostile input, lost state after a SNAP restart, and the ledger replay that restores it.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{probe, Emu};
use dpu_agent::agent::{AgentSettings, DpuAgent};
use dpu_agent::platform::sim::SimConfig;
use dpu_agent::PlatformConfig;
use protocol::dpu::{
    Attachment, BdevSpec, ControllerSpec, FunctionRef, NameRef, NamespaceRef, NamespaceSpec,
    NqnRef, RbdCluster, SnapState, SubsystemSpec,
};
use protocol::lease::Fence;
use protocol::server::Handler;
use protocol::{Command, Empty, ErrorCode, Reply};
use serde_json::{json, Value};

const NQN: &str = "nqn.2024-01.io.unistor:host-a";
const UUID: &str = "6f1d0d2a-3c4b-4e5f-8a9b-0c1d2e3f4a5b";

struct Setup {
    _dir: tempfile::TempDir,
    emu: Emu,
    agent: Arc<DpuAgent>,
    state: std::path::PathBuf,
}

fn build_agent(dir: &std::path::Path, socket: &std::path::Path, replay: bool) -> Arc<DpuAgent> {
    dpu_agent::build(
        &dir.join("state"),
        socket.to_path_buf(),
        Duration::from_secs(5),
        // The emulator is started by the test, not by the platform: the simulation platform
        // here only answers for the report.
        PlatformConfig::Simulation(SimConfig {
            emulator: "/nonexistent".into(),
            socket: socket.to_path_buf(),
            state_file: dir.join("state/simulated-snap.json"),
            log_file: dir.join("emu.log"),
            extra_args: vec![],
            host_dir: dir.join("host"),
            ready_timeout: Duration::from_secs(5),
        }),
        AgentSettings {
            proc_root: "/proc".into(),
            sys_root: "/sys".into(),
            replay,
            full_report_every: Duration::from_secs(300),
        },
    )
    .unwrap()
}

async fn setup(replay: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("spdk.sock");
    let emu = Emu::start(&socket).await;
    let agent = build_agent(dir.path(), &socket, replay);
    Setup {
        state: dir.path().join("state"),
        _dir: dir,
        emu,
        agent,
    }
}

fn create_path() -> Vec<Command> {
    vec![
        Command::RegisterRbdCluster(RbdCluster {
            name: "ceph1".into(),
            user_id: "snap-a".into(),
            mon_hosts: vec!["127.0.0.1:6789".into()],
            key: "AQD0nXFlAAAAABAAnb1T8z9wOLo5k6d2zC2h3Q==".into(),
        }),
        Command::CreateBdev(BdevSpec {
            name: "vol-a".into(),
            cluster: "ceph1".into(),
            pool: "rbd".into(),
            image: "vol-a".into(),
            block_size: 4096,
        }),
        Command::CreateSubsystem(SubsystemSpec {
            nqn: NQN.into(),
            serial: "UNISTOR0001".into(),
            model: "unistor volume".into(),
            max_namespaces: 32,
        }),
        Command::CreateNamespace(NamespaceSpec {
            nqn: NQN.into(),
            nsid: 7,
            bdev: "vol-a".into(),
            uuid: UUID.into(),
        }),
        Command::CreateController(ControllerSpec {
            name: "ctrl-host-a".into(),
            nqn: NQN.into(),
            function: FunctionRef { pf: 0, vf: Some(2) },
            num_queues: 12,
            mdts: 6,
        }),
        Command::AttachNamespace(Attachment {
            controller: "ctrl-host-a".into(),
            nsid: 7,
            force: false,
        }),
        Command::ResumeController(NameRef {
            name: "ctrl-host-a".into(),
        }),
    ]
}

fn teardown_path() -> Vec<Command> {
    vec![
        Command::SuspendController(NameRef {
            name: "ctrl-host-a".into(),
        }),
        Command::DetachNamespace(Attachment {
            controller: "ctrl-host-a".into(),
            nsid: 7,
            force: false,
        }),
        Command::DestroyController(NameRef {
            name: "ctrl-host-a".into(),
        }),
        Command::DestroyNamespace(NamespaceRef {
            nqn: NQN.into(),
            nsid: 7,
        }),
        Command::DestroySubsystem(NqnRef { nqn: NQN.into() }),
        Command::DeleteBdev(NameRef {
            name: "vol-a".into(),
        }),
        Command::UnregisterRbdCluster(NameRef {
            name: "ceph1".into(),
        }),
    ]
}

async fn run_all(agent: &DpuAgent, cmds: Vec<Command>) {
    for c in cmds {
        let name = c.name();
        if let Err(e) = agent.handle(c, Fence::none()).await {
            panic!("{name} failed: {e:?}");
        }
    }
}

/// What SNAP has for our namespace and controller, read directly from its socket.
async fn snap_view(socket: &std::path::Path) -> (Value, Value) {
    let subs = probe(socket, "nvme_subsystem_list", Value::Null).await;
    let sub = subs
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["nqn"] == NQN)
        .cloned()
        .unwrap_or(Value::Null);
    let ctrl = sub["controllers"][0].clone();
    (sub, ctrl)
}

async fn assert_exposed(socket: &std::path::Path) {
    let (sub, ctrl) = snap_view(socket).await;
    assert_eq!(sub["sn"], "UNISTOR0001");
    let ns = &sub["namespaces"][0];
    assert_eq!(
        (ns["nsid"].as_u64(), ns["uuid"].as_str()),
        (Some(7), Some(UUID))
    );
    assert_eq!(ns["bdev"], "vol-a");
    assert_eq!(ctrl["ctrl_id"], "ctrl-host-a");
    assert_eq!(ctrl["num_queues"], 12);
    assert_eq!(ctrl["mdts"], 6);
    assert_eq!(ctrl["state"], "STARTED");
    assert_eq!(ctrl["namespaces"][0]["nsid"], 7);
    assert_eq!(ctrl["pci_bdf"], "26:0c.2", "PF0 VF2");
    // SNAP (SPDK v24.01) lists the registration's credentials, never its name.
    let bdevs = probe(socket, "bdev_get_bdevs", json!({"name": "vol-a"})).await;
    let rbd = bdevs[0]["driver_specific"]["rbd"].as_object().unwrap();
    assert!(!rbd.contains_key("cluster_name"), "{rbd:?}");
    assert_eq!(rbd["user_id"], "snap-a");
}

/// The cluster registration the agent reports for bdev `vol-a`.
async fn reported_cluster(agent: &DpuAgent) -> Option<String> {
    let inv = report(agent).await.inventory.expect("an inventory");
    inv.bdevs
        .iter()
        .find(|b| b.name == "vol-a")?
        .cluster
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_path_retries_and_teardown() {
    let s = setup(true).await;
    run_all(&s.agent, create_path()).await;
    assert_exposed(&s.emu.socket).await;

    // Every command again: all succeed, nothing changes, the ledger is not rewritten.
    let gen = report(&s.agent).await.ledger_generation;
    run_all(&s.agent, create_path()).await;
    assert_exposed(&s.emu.socket).await;
    let r = report(&s.agent).await;
    assert_eq!(r.ledger_generation, gen);
    assert!(r.missing.is_empty(), "{:?}", r.missing);
    assert_eq!(r.snap.state, SnapState::Running);
    let inv = r.inventory.unwrap();
    let f = inv
        .functions
        .iter()
        .find(|f| f.function == FunctionRef { pf: 0, vf: Some(2) })
        .unwrap();
    assert_eq!(f.controller.as_deref(), Some("ctrl-host-a"));
    assert_eq!(f.vuid, "MT2328XZ17DFNVMES0D0F2VF3");
    // Which registration a bdev uses comes from the agent's own calls (SNAP does not list it),
    // and from its ledger after a restart, even once SNAP was listed afresh.
    assert_eq!(reported_cluster(&s.agent).await.as_deref(), Some("ceph1"));
    let restarted = build_agent(s._dir.path(), &s.emu.socket, true);
    restarted.snap().list().await.unwrap();
    assert_eq!(reported_cluster(&restarted).await.as_deref(), Some("ceph1"));
    drop(restarted);

    // Growing the bdev (what the host sees): done once, unchanged again, never shrunk.
    let grow = |mib| {
        Command::ResizeBdev(protocol::dpu::BdevResize {
            name: "vol-a".into(),
            new_size_mib: mib,
        })
    };
    run_all(&s.agent, vec![grow(2048), grow(2048)]).await;
    let b = probe(&s.emu.socket, "bdev_get_bdevs", json!({"name": "vol-a"})).await;
    assert_eq!(b[0]["num_blocks"], (2048u64 << 20) / 4096);
    let e = s.agent.handle(grow(1024), Fence::none()).await.unwrap_err();
    assert_eq!(e.code, protocol::ErrorCode::Conflict, "{e:?}");

    run_all(&s.agent, teardown_path()).await;
    run_all(&s.agent, teardown_path()).await;
    assert_eq!(
        probe(&s.emu.socket, "nvme_subsystem_list", Value::Null).await,
        json!([])
    );
    assert_eq!(
        probe(&s.emu.socket, "bdev_get_bdevs", Value::Null).await,
        json!([])
    );
    let ledger: Value =
        serde_json::from_slice(&std::fs::read(s.state.join("snap-ledger.json")).unwrap()).unwrap();
    assert_eq!(ledger["controllers"], json!({}));
    assert_eq!(ledger["clusters"], json!({}));
}

async fn report(agent: &DpuAgent) -> protocol::dpu::DpuReport {
    match agent
        .handle(Command::DpuReport(Empty {}), Fence::none())
        .await
        .unwrap()
    {
        Reply::DpuReport(r) => *r,
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snap_restart_shows_as_lost_state_when_replay_is_off() {
    let mut s = setup(false).await;
    run_all(&s.agent, create_path()).await;
    assert!(s.agent.supervise_once().await.is_none());
    s.emu.restart().await;
    assert!(s.agent.supervise_once().await.is_none(), "no replay");
    let r = report(&s.agent).await;
    assert_eq!(r.snap.restarts, 1);
    for want in [
        "rbd cluster ceph1",
        "bdev vol-a",
        &format!("subsystem {NQN}"),
        &format!("namespace {NQN}/7"),
        "controller ctrl-host-a",
    ] {
        assert!(
            r.missing.iter().any(|m| m == want),
            "{want} not in {:?}",
            r.missing
        );
    }
    assert_eq!(
        probe(&s.emu.socket, "nvme_subsystem_list", Value::Null).await,
        json!([])
    );
}

/// One object changed out of band (a namespace detached and destroyed through SNAP's socket,
/// SNAP still running): drift, reported and left for the controller — no replay by the agent,
/// and not counted as a SNAP restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_object_changed_out_of_band_is_drift_not_a_restart() {
    let s = setup(true).await;
    run_all(&s.agent, create_path()).await;
    assert!(s.agent.supervise_once().await.is_none());
    probe(
        &s.emu.socket,
        "nvme_controller_detach_ns",
        json!({"ctrl_id": "ctrl-host-a", "nsid": 7}),
    )
    .await;
    probe(
        &s.emu.socket,
        "nvme_namespace_destroy",
        json!({"nqn": NQN, "nsid": 7}),
    )
    .await;
    assert!(s.agent.supervise_once().await.is_none(), "no replay");
    assert!(s.agent.supervise_once().await.is_none(), "still none");
    let r = report(&s.agent).await;
    assert_eq!(r.snap.restarts, 0, "SNAP did not restart");
    assert!(
        r.missing.contains(&format!("namespace {NQN}/7")),
        "{:?}",
        r.missing
    );
    assert!(r.last_replay.is_none(), "{:?}", r.last_replay);
    let subs = probe(&s.emu.socket, "nvme_subsystem_list", Value::Null).await;
    assert_eq!(subs[0]["namespaces"], json!([]), "left deleted: {subs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_replay_restores_the_same_identity_without_a_controller() {
    let mut s = setup(true).await;
    run_all(&s.agent, create_path()).await;
    s.agent.supervise_once().await;
    s.emu.restart().await;
    // No controller is involved from here on: the agent heals SNAP on its own.
    let replay = s.agent.supervise_once().await.expect("a replay");
    assert!(replay.failed.is_empty(), "{:?}", replay.failed);
    assert!(replay.reason.contains("missing"), "{}", replay.reason);
    assert_eq!(
        replay.restored,
        [
            "rbd cluster ceph1".to_string(),
            "bdev vol-a".into(),
            format!("subsystem {NQN}"),
            format!("namespace {NQN}/7"),
            "controller ctrl-host-a".into(),
            "attachment ctrl-host-a/7".into(),
            "running controller ctrl-host-a".into(),
        ],
        "dependency order, resume last"
    );
    assert_exposed(&s.emu.socket).await;
    let r = report(&s.agent).await;
    assert!(r.missing.is_empty());
    assert_eq!(r.snap.restarts, 1);
    assert_eq!(
        r.last_replay.as_ref(),
        Some(&replay),
        "the replay is reported"
    );

    // An agent restart with a fresh SNAP replays the ledger from disk.
    s.emu.restart().await;
    let agent2 = build_agent(s._dir.path(), &s.emu.socket, true);
    assert!(agent2.supervise_once().await.is_some());
    assert_exposed(&s.emu.socket).await;
}

/// Commands with one hostile or impossible field each, and that field's name.
fn hostile_commands() -> Vec<(&'static str, Command)> {
    vec![
        (
            "nqn",
            Command::CreateSubsystem(SubsystemSpec {
                nqn: "nqn.$(reboot)".into(),
                serial: "S".into(),
                model: "M".into(),
                max_namespaces: 1,
            }),
        ),
        (
            "name",
            Command::CreateBdev(BdevSpec {
                name: "--help".into(),
                cluster: "ceph1".into(),
                pool: "rbd".into(),
                image: "i".into(),
                block_size: 512,
            }),
        ),
        (
            "pool",
            Command::CreateBdev(BdevSpec {
                name: "b".into(),
                cluster: "ceph1".into(),
                pool: "a;rm -rf /".into(),
                image: "i".into(),
                block_size: 512,
            }),
        ),
        (
            "uuid",
            Command::CreateNamespace(NamespaceSpec {
                nqn: NQN.into(),
                nsid: 8,
                bdev: "vol-a".into(),
                uuid: "../x".into(),
            }),
        ),
        (
            "mon_hosts[0]",
            Command::RegisterRbdCluster(RbdCluster {
                name: "c2".into(),
                user_id: "u".into(),
                mon_hosts: vec!["$(id):1".into()],
                key: "AQ==".into(),
            }),
        ),
        (
            "key",
            Command::RegisterRbdCluster(RbdCluster {
                name: "c2".into(),
                user_id: "u".into(),
                mon_hosts: vec!["h:1".into()],
                key: "not a key".into(),
            }),
        ),
        (
            "function",
            Command::CreateController(ControllerSpec {
                name: "x".into(),
                nqn: NQN.into(),
                function: FunctionRef { pf: 9, vf: None },
                num_queues: 1,
                mdts: 1,
            }),
        ),
        (
            "nsid",
            Command::AttachNamespace(Attachment {
                controller: "ctrl-host-a".into(),
                nsid: 0,
                force: false,
            }),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicts_busy_objects_and_hostile_input() {
    let s = setup(true).await;
    run_all(&s.agent, create_path()).await;
    let gen = report(&s.agent).await.ledger_generation;

    let same_nsid_other_uuid = Command::CreateNamespace(NamespaceSpec {
        nqn: NQN.into(),
        nsid: 7,
        bdev: "vol-a".into(),
        uuid: "00000000-0000-4000-8000-000000000001".into(),
    });
    let e = s
        .agent
        .handle(same_nsid_other_uuid, Fence::none())
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Conflict, "{e:?}");
    let busy = Command::DestroyController(NameRef {
        name: "ctrl-host-a".into(),
    });
    assert_eq!(
        s.agent.handle(busy, Fence::none()).await.unwrap_err().code,
        ErrorCode::InUse
    );
    let e = s
        .agent
        .handle(Command::RemoveSnap(Empty {}), Fence::none())
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InUse);
    assert!(e.message.contains("ctrl-host-a"), "{}", e.message);
    let other_fn_taken = Command::CreateController(ControllerSpec {
        name: "second".into(),
        nqn: NQN.into(),
        function: FunctionRef { pf: 0, vf: Some(2) },
        num_queues: 4,
        mdts: 6,
    });
    assert_eq!(
        s.agent
            .handle(other_fn_taken, Fence::none())
            .await
            .unwrap_err()
            .code,
        ErrorCode::InUse
    );

    for (field, cmd) in hostile_commands() {
        let e = s.agent.handle(cmd, Fence::none()).await.unwrap_err();
        assert_eq!(e.field.as_deref(), Some(field), "{e:?}");
        assert!(matches!(
            e.code,
            ErrorCode::InvalidName | ErrorCode::InvalidArgument
        ));
    }
    let e = s
        .agent
        .handle(
            Command::RegisterRbdCluster(RbdCluster {
                name: "c2".into(),
                user_id: "u".into(),
                mon_hosts: vec!["h:1".into()],
                key: "not a key".into(),
            }),
            Fence::none(),
        )
        .await
        .unwrap_err();
    assert!(
        !e.message.contains("not a key"),
        "secrets are never echoed: {}",
        e.message
    );
    assert_eq!(
        report(&s.agent).await.ledger_generation,
        gen,
        "nothing recorded"
    );
    assert_exposed(&s.emu.socket).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_requests_are_never_sent() {
    let s = setup(true).await;
    let huge = "x".repeat(40 * 1024);
    let e = s
        .agent
        .snap()
        .client()
        .call("nvme_subsystem_create", Some(json!({"nqn": huge})))
        .await
        .unwrap_err();
    assert!(
        matches!(e, dpu_agent::snap::SnapError::TooLarge { .. }),
        "{e}"
    );
    let many: Vec<u32> = (0..2000).collect();
    let e = s
        .agent
        .snap()
        .client()
        .call(
            "nvme_subsystem_create",
            Some(json!({"nqn": "nqn.x:y", "list": many})),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(e, dpu_agent::snap::SnapError::TooLarge { .. }),
        "{e}"
    );
    assert_eq!(s.agent.snap().client().connects(), 0, "nothing was sent");
    // The client still works afterwards.
    assert!(s.agent.snap().version().await.unwrap().contains("SPDK"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_snap_fails_commands_and_reports_state() {
    let mut s = setup(true).await;
    s.emu.stop().await;
    let e = s
        .agent
        .handle(create_path().remove(2), Fence::none())
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::CommandFailed);
    assert!(e.message.contains("not answering"), "{}", e.message);
    assert!(e.code.is_transient());
    let r = report(&s.agent).await;
    assert_eq!(r.snap.state, SnapState::NotInstalled);
    assert!(r.inventory.is_none());
    assert!(r.host.cpus >= 1);
}

/// The controller's plan-time check can be older than the host's open: the agent refuses a
/// detach of a device the host holds open unless it is forced (`--allow-in-use`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detach_of_a_device_the_host_holds_open_needs_force() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("spdk.sock");
    let host = dir.path().join("host");
    let _emu = Emu::start_with_host(&socket, &host).await;
    let agent = build_agent(dir.path(), &socket, false);
    run_all(&agent, create_path()).await;
    let dev = e2e::host::devices(&host)
        .into_iter()
        .find(|d| d.controller == "ctrl-host-a" && d.nsid == 7)
        .expect("the host sees nsid 7")
        .path;
    let p = dev.clone();
    let opener = tokio::task::spawn_blocking(move || e2e::host::Opener::open(&p))
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !e2e::host::devices(&host).iter().any(|d| d.open == 1) {
        assert!(
            std::time::Instant::now() < deadline,
            "the host never opened it"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let detach = |force| {
        Command::DetachNamespace(Attachment {
            controller: "ctrl-host-a".into(),
            nsid: 7,
            force,
        })
    };
    let e = agent
        .handle(detach(false), Fence::none())
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::InUse, "{e:?}");
    assert!(
        e.message.contains(&dev.display().to_string()),
        "{}",
        e.message
    );
    let ctrls = probe(&socket, "nvme_controller_list", Value::Null).await;
    assert_eq!(
        ctrls[0]["namespaces"][0]["nsid"], 7,
        "still attached: {ctrls}"
    );
    agent.handle(detach(true), Fence::none()).await.unwrap();
    assert!(e2e::host::devices(&host).is_empty(), "pulled from the host");
    tokio::task::spawn_blocking(move || drop(opener))
        .await
        .unwrap();
}
