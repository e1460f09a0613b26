//! Deploying SNAP on a BlueField-3, with stand-in `mlxconfig`, `crictl`, `flint` and `mget_temp`
//! that record their calls and print what the real tools print, and a stand-in kubelet that
//! starts SNAP (the emulator) when the pod file appears.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{probe, Emu};
use dpu_agent::agent::{AgentSettings, DpuAgent};
use dpu_agent::platform::bf3::Bf3Config;
use dpu_agent::PlatformConfig;
use protocol::dpu::{FirmwareSpec, SnapSpec, StepOutcome, SubsystemSpec};
use protocol::lease::Fence;
use protocol::server::Handler;
use protocol::{Command, Empty, ErrorCode, Reply};
use serde_json::Value;

struct Dpu {
    dir: tempfile::TempDir,
    agent: Arc<DpuAgent>,
}

impl Dpu {
    fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
    fn calls(&self) -> String {
        std::fs::read_to_string(self.path("tools/calls.log")).unwrap_or_default()
    }
    fn pod_file(&self) -> PathBuf {
        self.path("etc/kubelet.d/doca_snap.yaml")
    }
}

fn script(dir: &Path, name: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let p = dir.join(name);
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// A DPU whose firmware holds `fw` (`NAME CURRENT NEXT` lines) and `hugepages` 2 MiB pages.
fn dpu(fw: &str, hugepages: u64, ready_timeout: Duration) -> Dpu {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let tools = root.join("tools");
    for d in [
        "tools",
        "proc",
        "etc/kubelet.d",
        "etc/unistor/staging",
        "state",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(tools.join("fw"), fw).unwrap();
    let state = tools.display();
    script(
        &tools,
        "mlxconfig",
        &format!(
            r#"echo "mlxconfig $*" >> {state}/calls.log
dev=$2
case "$3" in
  -e)
    printf '\nDevice #1:\n----------\n\nDevice type:        BlueField3\nDevice:             %s\n\n' "$dev"
    printf 'Configurations:                                      Default         Current         Next Boot\n'
    while read k cur next; do printf '        %-40s %-15s %-15s %-15s\n' "$k" "0" "$cur" "$next"; done < {state}/fw
    ;;
  -y)
    shift 4
    for kv in "$@"; do
      k=${{kv%%=*}}; v=${{kv#*=}}
      awk -v k="$k" -v v="$v" '$1==k {{$3=v}} {{print}}' {state}/fw > {state}/fw.new && mv {state}/fw.new {state}/fw
    done
    echo 'Applying... Done!'
    echo '-I- Please reboot machine to load new configurations.'
    ;;
  *) echo "unexpected: $*" >&2; exit 2 ;;
esac"#
        ),
    );
    script(
        &tools,
        "crictl",
        &format!(
            r#"echo "crictl $*" >> {state}/calls.log
[ -f {state}/container ] && cat {state}/container
exit 0"#
        ),
    );
    script(
        &tools,
        "flint",
        "printf 'Image type:            FS4\\nFW Version:            32.41.1000\\nFW Release Date:       28.4.2024\\nPSID:                  MT_0000000884\\nSecurity Attributes:   secure-fw\\n'",
    );
    script(&tools, "mget_temp", "echo 52");
    std::fs::write(
        root.join("etc/mlnx-release"),
        "bf-bundle-2.9.0-90_24.10_ubuntu-22.04_prod\n",
    )
    .unwrap();
    std::fs::write(
        root.join("proc/meminfo"),
        format!("MemTotal:       32000000 kB\nHugePages_Total:    {hugepages}\nHugePages_Free:     {hugepages}\nHugepagesize:       2048 kB\n"),
    )
    .unwrap();
    let agent = dpu_agent::build(
        &root.join("state"),
        root.join("spdk.sock"),
        Duration::from_secs(5),
        PlatformConfig::BlueField3(Bf3Config {
            device: "/dev/mst/mt41692_pciconf0".into(),
            kubelet_dir: root.join("etc/kubelet.d"),
            staging_dir: root.join("etc/unistor/staging"),
            tool_dir: Some(tools.clone()),
            proc_root: root.join("proc"),
            etc_root: root.join("etc"),
            runtime_endpoint: "unix:///run/containerd/containerd.sock".into(),
            tool_timeout: Duration::from_secs(10),
            ready_timeout,
        }),
        AgentSettings {
            proc_root: "/proc".into(),
            sys_root: "/sys".into(),
            replay: true,
            full_report_every: Duration::from_secs(300),
        },
    )
    .unwrap();
    Dpu { dir, agent }
}

const FW_READY: &str = "INTERNAL_CPU_MODEL 1 1\nNVME_EMULATION_ENABLE 1 1\nNVME_EMULATION_NUM_PF 2 2\nNVME_EMULATION_NUM_VF 4 4\n";

fn spec(tag: &str) -> SnapSpec {
    SnapSpec {
        image: "nvcr.io/nvidia/doca/doca_snap".into(),
        tag: tag.into(),
        env: [("NVME_EMU_PROVIDER".to_string(), "dpa".to_string())].into(),
        hugepages_mib: 2048,
        cpu: "8".into(),
        memory: "2Gi".into(),
        firmware: FirmwareSpec {
            nvme_pfs: 2,
            nvme_vfs: 4,
        },
    }
}

/// kubelet and the container runtime: a new pod file means a new SNAP (the emulator) with a new
/// container id; no pod file means no SNAP.
fn kubelet(root: PathBuf) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let pod = root.join("etc/kubelet.d/doca_snap.yaml");
        let socket = root.join("spdk.sock");
        let mut seen: Option<String> = None;
        let mut emu: Option<Emu> = None;
        let mut n = 0;
        loop {
            let now = std::fs::read_to_string(&pod).ok();
            if now != seen {
                if let Some(mut e) = emu.take() {
                    e.stop().await;
                    let _ = std::fs::remove_file(root.join("tools/container"));
                }
                if now.is_some() {
                    // Pulling and starting takes a moment.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    emu = Some(Emu::start(&socket).await);
                    n += 1;
                    std::fs::write(root.join("tools/container"), format!("c0ffee{n}\n")).unwrap();
                }
                seen = now;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

fn deploy_report(r: Result<Reply, protocol::WireError>) -> protocol::dpu::DeployReport {
    match r {
        Ok(Reply::Deploy(d)) => d,
        other => panic!("expected a deploy report, got {other:?}"),
    }
}

fn outcome(r: &protocol::dpu::DeployReport, step: &str) -> StepOutcome {
    r.steps
        .iter()
        .find(|s| s.step == step)
        .unwrap_or_else(|| panic!("no step {step} in {r:?}"))
        .outcome
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn firmware_changes_need_a_power_cycle_and_nothing_is_rebooted() {
    let d = dpu(
        "INTERNAL_CPU_MODEL 1 1\nNVME_EMULATION_ENABLE 0 0\nNVME_EMULATION_NUM_PF 1 1\nNVME_EMULATION_NUM_VF 0 0\n",
        2048,
        Duration::from_secs(5),
    );
    let r = deploy_report(
        d.agent
            .handle(Command::InstallSnap(Box::new(spec("4.5.0"))), Fence::none())
            .await,
    );
    assert!(!r.ready);
    assert_eq!(outcome(&r, "firmware"), StepOutcome::PowerCycleRequired);
    let detail = &r.steps[0].detail;
    assert!(detail.contains("power cycle"), "{detail}");
    assert!(d.calls().contains(
        "mlxconfig -d /dev/mst/mt41692_pciconf0 -y s NVME_EMULATION_ENABLE=1 NVME_EMULATION_NUM_PF=2 NVME_EMULATION_NUM_VF=4"
    ), "{}", d.calls());
    assert!(
        !d.pod_file().exists(),
        "SNAP is not deployed before the power cycle"
    );

    // Asked again before the power cycle: still pending, nothing set twice.
    let r = deploy_report(
        d.agent
            .handle(Command::InstallSnap(Box::new(spec("4.5.0"))), Fence::none())
            .await,
    );
    assert_eq!(outcome(&r, "firmware"), StepOutcome::PowerCycleRequired);
    assert!(r.steps[0].detail.contains("not active"), "{:?}", r.steps);
    assert_eq!(d.calls().matches(" -y s ").count(), 1);
    for line in d.calls().lines() {
        assert!(line.starts_with("mlxconfig "), "only mlxconfig ran: {line}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploy_upgrade_and_remove() {
    let d = dpu(FW_READY, 2048, Duration::from_secs(20));
    let kubelet = kubelet(d.dir.path().to_path_buf());

    let r = deploy_report(
        d.agent
            .handle(
                Command::InstallSnap(Box::new(spec("4.5.0-6-doca2.9.0"))),
                Fence::none(),
            )
            .await,
    );
    assert!(r.ready, "{r:?}");
    assert_eq!(outcome(&r, "firmware"), StepOutcome::Unchanged);
    assert_eq!(outcome(&r, "hugepages"), StepOutcome::Unchanged);
    assert_eq!(outcome(&r, "pod"), StepOutcome::Changed);
    assert_eq!(outcome(&r, "ready"), StepOutcome::Changed);
    let pod: Value = serde_yaml::from_str(&std::fs::read_to_string(d.pod_file()).unwrap()).unwrap();
    assert_eq!(
        pod["spec"]["containers"][0]["image"],
        "nvcr.io/nvidia/doca/doca_snap:4.5.0-6-doca2.9.0"
    );
    assert_eq!(
        pod["spec"]["containers"][0]["resources"]["limits"]["hugepages-2Mi"],
        "2048Mi"
    );
    assert_eq!(
        std::fs::read_dir(d.path("etc/unistor/staging"))
            .unwrap()
            .count(),
        0,
        "nothing left in staging"
    );
    assert_eq!(
        std::fs::read_dir(d.path("etc/kubelet.d")).unwrap().count(),
        1,
        "only the pod file in kubelet's directory"
    );

    // Idempotent.
    let r = deploy_report(
        d.agent
            .handle(
                Command::InstallSnap(Box::new(spec("4.5.0-6-doca2.9.0"))),
                Fence::none(),
            )
            .await,
    );
    assert!(r.ready);
    assert_eq!(outcome(&r, "pod"), StepOutcome::Unchanged);

    // Configuration made before an upgrade is replayed into the new SNAP.
    d.agent
        .handle(
            Command::CreateSubsystem(SubsystemSpec {
                nqn: "nqn.2024-01.io.unistor:a".into(),
                serial: "S1".into(),
                model: "M1".into(),
                max_namespaces: 4,
            }),
            Fence::none(),
        )
        .await
        .unwrap();
    let r = deploy_report(
        d.agent
            .handle(
                Command::UpgradeSnap(Box::new(spec("4.6.0-doca2.10.0"))),
                Fence::none(),
            )
            .await,
    );
    assert!(r.ready, "{r:?}");
    assert_eq!(outcome(&r, "pod"), StepOutcome::Changed);
    assert!(
        r.steps.last().unwrap().detail.contains("c0ffee2"),
        "a new container: {r:?}"
    );
    let subs = probe(&d.path("spdk.sock"), "nvme_subsystem_list", Value::Null).await;
    assert_eq!(
        subs[0]["nqn"], "nqn.2024-01.io.unistor:a",
        "replayed after the upgrade"
    );
    let report = match d
        .agent
        .handle(Command::DpuReport(Empty {}), Fence::none())
        .await
        .unwrap()
    {
        Reply::DpuReport(r) => r,
        other => panic!("{other:?}"),
    };
    assert_eq!(
        report.snap.image.as_deref(),
        Some("nvcr.io/nvidia/doca/doca_snap:4.6.0-doca2.10.0")
    );
    let bf = report.bluefield.expect("BlueField facts from the tools");
    assert_eq!(bf.firmware_version.as_deref(), Some("32.41.1000"));
    assert_eq!(bf.psid.as_deref(), Some("MT_0000000884"));
    assert_eq!(bf.temperature_c, Some(52));
    assert!(bf.release.unwrap().starts_with("bf-bundle"));

    let r = deploy_report(
        d.agent
            .handle(Command::RemoveSnap(Empty {}), Fence::none())
            .await,
    );
    assert!(!r.ready);
    assert!(!d.pod_file().exists());
    assert_eq!(outcome(&r, "stopped"), StepOutcome::Changed);
    let e = d
        .agent
        .handle(Command::UpgradeSnap(Box::new(spec("4.6.0"))), Fence::none())
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::NotFound, "nothing to upgrade");
    kubelet.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_that_never_becomes_ready_is_a_clear_timeout() {
    let d = dpu(FW_READY, 2048, Duration::from_secs(2));
    let e = d
        .agent
        .handle(Command::InstallSnap(Box::new(spec("4.5.0"))), Fence::none())
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::Timeout, "{e:?}");
    assert!(
        e.message.contains("did not become ready within 2s")
            && e.message.contains("crictl shows no running snap container"),
        "{}",
        e.message
    );
    assert!(
        d.pod_file().exists(),
        "the pod was written; kubelet never started it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_few_hugepages_is_refused_before_anything_is_deployed() {
    let d = dpu(FW_READY, 16, Duration::from_secs(2));
    let e = d
        .agent
        .handle(Command::InstallSnap(Box::new(spec("4.5.0"))), Fence::none())
        .await
        .unwrap_err();
    assert_eq!(e.code, ErrorCode::CommandFailed);
    assert!(
        e.message
            .contains("32 MiB of hugepages reserved, 2048 MiB needed"),
        "{}",
        e.message
    );
    assert!(!d.pod_file().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_snap_specs_are_refused() {
    let d = dpu(FW_READY, 2048, Duration::from_secs(2));
    let mut bad_tag = spec("4.5.0");
    bad_tag.tag = "x; rm -rf /".into();
    let mut bad_env = spec("4.5.0");
    bad_env
        .env
        .insert("A".into(), "line\nbreak: injected".into());
    let mut bad_image = spec("4.5.0");
    bad_image.image = "../../etc/passwd".into();
    let mut too_many = spec("4.5.0");
    too_many.firmware.nvme_pfs = 5;
    for (field, s) in [
        ("tag", bad_tag),
        ("env.A", bad_env),
        ("image", bad_image),
        ("firmware", too_many),
    ] {
        let e = d
            .agent
            .handle(Command::InstallSnap(Box::new(s)), Fence::none())
            .await
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some(field), "{e:?}");
    }
    assert!(d.calls().is_empty(), "no tool ran: {}", d.calls());
}
