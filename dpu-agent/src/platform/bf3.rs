//! BlueField-3: firmware settings (`mlxconfig`), hugepages, the `doca_snap` static pod, readiness
//! (`crictl`, then the socket), following `shared/snap-reference.md` §1.
//!
//! Nothing here reboots anything: firmware changes are set for the next boot and reported as
//! "host power cycle required". Every tool runs as argv with a deadline ([`agent_kit::exec`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use agent_kit::exec::{self, Exec};
use protocol::dpu::{BlueFieldFacts, DeployReport, SnapSpec, StepOutcome};
use serde_json::json;

use super::{wait_for_socket, DeployError, Platform, Steps};
use crate::snap::Snap;

/// The pod file kubelet reads.
pub const POD_FILE: &str = "doca_snap.yaml";

/// Where things are on the DPU.
#[derive(Debug, Clone)]
pub struct Bf3Config {
    /// The MST device, e.g. `/dev/mst/mt41692_pciconf0`.
    pub device: String,
    /// kubelet's static-pod directory (`/etc/kubelet.d`).
    pub kubelet_dir: PathBuf,
    /// Where the pod file is staged before it is renamed into `kubelet_dir`. Must be on the same
    /// filesystem and outside `kubelet_dir` (kubelet treats every file there as a manifest).
    pub staging_dir: PathBuf,
    /// Directory of `mlxconfig`, `crictl`, `flint`, `mget_temp`; `None` searches `PATH`.
    pub tool_dir: Option<PathBuf>,
    /// `/proc`, for hugepages.
    pub proc_root: PathBuf,
    /// `/etc`, for `mlnx-release`.
    pub etc_root: PathBuf,
    /// `crictl --runtime-endpoint`.
    pub runtime_endpoint: String,
    /// Deadline of each tool run.
    pub tool_timeout: Duration,
    /// How long to wait for the container and the socket.
    pub ready_timeout: Duration,
}

impl Bf3Config {
    /// The defaults of a BlueField-3 running the BFB's Ubuntu.
    pub fn standard() -> Self {
        Self {
            device: "/dev/mst/mt41692_pciconf0".into(),
            kubelet_dir: "/etc/kubelet.d".into(),
            staging_dir: "/etc/unistor/staging".into(),
            tool_dir: None,
            proc_root: "/proc".into(),
            etc_root: "/etc".into(),
            runtime_endpoint: "unix:///run/containerd/containerd.sock".into(),
            tool_timeout: Duration::from_secs(90),
            ready_timeout: Duration::from_secs(300),
        }
    }
}

/// The BlueField-3 platform.
pub struct BlueField3 {
    config: Bf3Config,
}

/// Values of one `mlxconfig` parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FwValue {
    current: u64,
    next_boot: u64,
}

/// Parses `mlxconfig -e q` output: rows `NAME  Default  Current  Next-Boot`, values like `1`,
/// `True(1)` or `EMBEDDED_CPU(1)`; a leading `*` marks non-default rows.
fn parse_mlxconfig(out: &str) -> BTreeMap<String, FwValue> {
    fn num(v: &str) -> Option<u64> {
        let inner = match (v.find('('), v.rfind(')')) {
            (Some(a), Some(b)) if b > a => &v[a + 1..b],
            _ => v,
        };
        inner.parse().ok()
    }
    let mut map = BTreeMap::new();
    for line in out.lines() {
        let cols: Vec<&str> = line.split_whitespace().filter(|c| *c != "*").collect();
        if cols.len() < 4
            || !cols[0]
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        {
            continue;
        }
        let n = cols.len();
        if let (Some(current), Some(next_boot)) = (num(cols[n - 2]), num(cols[n - 1])) {
            map.insert(cols[0].to_string(), FwValue { current, next_boot });
        }
    }
    map
}

impl BlueField3 {
    /// A platform with `config`.
    pub fn new(config: Bf3Config) -> Self {
        Self { config }
    }

    fn tool(&self, name: &str) -> Exec {
        let program = match &self.config.tool_dir {
            Some(d) => d.join(name),
            None => PathBuf::from(name),
        };
        Exec::new(program).timeout(self.config.tool_timeout)
    }

    async fn run(&self, e: Exec) -> Result<String, String> {
        exec::run(&e)
            .await
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .map_err(|e| protocol::error::chain(&e))
    }

    fn crictl(&self) -> Exec {
        self.tool("crictl")
            .args(["--runtime-endpoint", &self.config.runtime_endpoint])
    }

    /// The id of the running SNAP container, if any.
    async fn container(&self) -> Result<Option<String>, String> {
        let out = self
            .run(
                self.crictl()
                    .args(["ps", "-s", "running", "-q", "--name", "snap"]),
            )
            .await?;
        Ok(out
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_string))
    }

    /// Firmware: returns `Some(report)` when a power cycle is needed (and deployment stops).
    async fn firmware(&self, spec: &SnapSpec, steps: &mut Steps) -> Result<bool, String> {
        let want: [(&str, u64); 4] = [
            ("INTERNAL_CPU_MODEL", 1),
            ("NVME_EMULATION_ENABLE", 1),
            ("NVME_EMULATION_NUM_PF", u64::from(spec.firmware.nvme_pfs)),
            ("NVME_EMULATION_NUM_VF", u64::from(spec.firmware.nvme_vfs)),
        ];
        let out = self
            .run(
                self.tool("mlxconfig")
                    .args(["-d", &self.config.device, "-e", "q"])
                    .args(want.iter().map(|(k, _)| *k)),
            )
            .await?;
        let have = parse_mlxconfig(&out);
        let mut to_set = vec![];
        let mut pending = vec![];
        for (k, v) in want {
            let Some(h) = have.get(k) else {
                return Err(format!("mlxconfig did not report {k}"));
            };
            if h.next_boot != v {
                to_set.push(format!("{k}={v}"));
            } else if h.current != v {
                pending.push(format!("{k}={v}"));
            }
        }
        if !to_set.is_empty() {
            self.run(
                self.tool("mlxconfig")
                    .args(["-d", &self.config.device, "-y", "s"])
                    .args(to_set.iter().map(String::as_str)),
            )
            .await?;
            steps.push(
                "firmware",
                StepOutcome::PowerCycleRequired,
                format!(
                    "set {} for the next boot; a host power cycle is required (nothing was rebooted)",
                    to_set.join(" ")
                ),
            );
            return Ok(true);
        }
        if !pending.is_empty() {
            steps.push(
                "firmware",
                StepOutcome::PowerCycleRequired,
                format!(
                    "{} set for the next boot but not active; a host power cycle is required",
                    pending.join(" ")
                ),
            );
            return Ok(true);
        }
        steps.push(
            "firmware",
            StepOutcome::Unchanged,
            "NVMe emulation enabled as specified",
        );
        Ok(false)
    }

    fn hugepages(&self, spec: &SnapSpec) -> Result<String, String> {
        let meminfo = std::fs::read_to_string(self.config.proc_root.join("meminfo"))
            .map_err(|e| format!("cannot read meminfo: {e}"))?;
        let field = |k: &str| {
            meminfo
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let have_mib = field("HugePages_Total:") * field("Hugepagesize:") / 1024;
        if have_mib < spec.hugepages_mib {
            return Err(format!(
                "{have_mib} MiB of hugepages reserved, {} MiB needed (reserve them with \
                 hugepagesz=2048kB hugepages=N on the kernel command line)",
                spec.hugepages_mib
            ));
        }
        Ok(format!(
            "{have_mib} MiB reserved, {} MiB needed",
            spec.hugepages_mib
        ))
    }

    /// The static pod, as kubelet reads it.
    pub fn pod_yaml(spec: &SnapSpec) -> String {
        let env: Vec<_> = spec
            .env
            .iter()
            .map(|(k, v)| json!({"name": k, "value": v}))
            .collect();
        let hugepages = format!("{}Mi", spec.hugepages_mib);
        let host_path = |name: &str, path: &str| json!({"name": name, "hostPath": {"path": path}});
        let pod = json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "snap", "labels": {"app": "snap", "app.kubernetes.io/managed-by": "unistor"}},
            "spec": {
                "hostNetwork": true,
                "restartPolicy": "Always",
                "containers": [{
                    "name": "snap",
                    "image": format!("{}:{}", spec.image, spec.tag),
                    "imagePullPolicy": "IfNotPresent",
                    "securityContext": {"privileged": true, "capabilities": {"add": ["IPC_LOCK", "SYS_RAWIO", "SYS_NICE"]}},
                    "env": env,
                    "resources": {
                        "requests": {"cpu": spec.cpu, "memory": spec.memory, "hugepages-2Mi": hugepages},
                        "limits": {"cpu": spec.cpu, "memory": spec.memory, "hugepages-2Mi": hugepages},
                    },
                    "volumeMounts": [
                        {"name": "hugepages", "mountPath": "/dev/hugepages"},
                        {"name": "dev-shm", "mountPath": "/dev/shm"},
                        {"name": "spdk-sock", "mountPath": "/var/tmp"},
                        {"name": "nvda-snap", "mountPath": "/etc/nvda_snap"},
                        {"name": "snap-log", "mountPath": "/var/log/snap-log"},
                    ],
                }],
                "volumes": [
                    {"name": "hugepages", "emptyDir": {"medium": "HugePages"}},
                    host_path("dev-shm", "/dev/shm"),
                    host_path("spdk-sock", "/var/tmp"),
                    host_path("nvda-snap", "/etc/nvda_snap"),
                    host_path("snap-log", "/var/log/snap-log"),
                ],
            },
        });
        let mut out =
            String::from("# Written by unistor's dpu-agent; changes here are overwritten.\n");
        out.push_str(&serde_yaml::to_string(&pod).expect("serializable"));
        out
    }

    /// Writes the pod file atomically through the staging directory; false when unchanged.
    fn write_pod(&self, yaml: &str) -> Result<bool, String> {
        let target = self.config.kubelet_dir.join(POD_FILE);
        if std::fs::read_to_string(&target).ok().as_deref() == Some(yaml) {
            return Ok(false);
        }
        let staged = self.config.staging_dir.join(POD_FILE);
        std::fs::create_dir_all(&self.config.staging_dir)
            .and_then(|()| agent_kit::fsutil::write_atomic(&staged, yaml.as_bytes()))
            .and_then(|()| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o644))
            })
            .and_then(|()| std::fs::rename(&staged, &target))
            .map_err(|e| format!("cannot place {}: {e}", target.display()))?;
        Ok(true)
    }

    async fn wait_ready(
        &self,
        snap: &Snap,
        previous: Option<&str>,
        steps: Steps,
    ) -> Result<DeployReport, DeployError> {
        let deadline = self.config.ready_timeout;
        let start = tokio::time::Instant::now();
        let mut steps = steps;
        loop {
            let last = match self.container().await {
                Ok(Some(id)) if Some(id.as_str()) != previous => {
                    let left = deadline.saturating_sub(start.elapsed());
                    return match wait_for_socket(snap, left).await {
                        Ok(v) => {
                            steps.push(
                                "ready",
                                StepOutcome::Changed,
                                format!("container {id} running; SNAP answers: {v}"),
                            );
                            Ok(steps.finish(true))
                        }
                        Err(e) => Err(steps.not_ready(
                            deadline,
                            format!(
                                "container {id} is running but its socket does not answer: {e}"
                            ),
                        )),
                    };
                }
                Ok(Some(id)) => format!("only the previous container {id} is running"),
                Ok(None) => "crictl shows no running snap container".into(),
                Err(e) => e,
            };
            if start.elapsed() >= deadline {
                return Err(steps.not_ready(deadline, last));
            }
            tokio::time::sleep(Duration::from_secs(1).min(deadline / 10)).await;
        }
    }
}

#[async_trait::async_trait]
impl Platform for BlueField3 {
    fn name(&self) -> &'static str {
        "bluefield3"
    }

    async fn install(&self, spec: &SnapSpec, snap: &Snap) -> Result<DeployReport, DeployError> {
        let mut steps = Steps::new(self.name());
        match self.firmware(spec, &mut steps).await {
            Ok(true) => return Ok(steps.finish(false)),
            Ok(false) => {}
            Err(e) => return Err(steps.fail("firmware", e)),
        }
        match self.hugepages(spec) {
            Ok(d) => steps.push("hugepages", StepOutcome::Unchanged, d),
            Err(e) => return Err(steps.fail("hugepages", e)),
        }
        let previous = match self.container().await {
            Ok(c) => c,
            Err(e) => return Err(steps.fail("container", e)),
        };
        let changed = match self.write_pod(&Self::pod_yaml(spec)) {
            Ok(c) => c,
            Err(e) => return Err(steps.fail("pod", e)),
        };
        if changed {
            steps.push(
                "pod",
                StepOutcome::Changed,
                format!(
                    "wrote {}/{POD_FILE} for {}:{}",
                    self.config.kubelet_dir.display(),
                    spec.image,
                    spec.tag
                ),
            );
            // A replaced pod must come back as a new container.
            self.wait_ready(snap, previous.as_deref(), steps).await
        } else {
            steps.push(
                "pod",
                StepOutcome::Unchanged,
                "pod file already as specified",
            );
            self.wait_ready(snap, None, steps).await
        }
    }

    async fn remove(&self) -> Result<DeployReport, DeployError> {
        let mut steps = Steps::new(self.name());
        let target = self.config.kubelet_dir.join(POD_FILE);
        match std::fs::remove_file(&target) {
            Ok(()) => steps.push(
                "pod",
                StepOutcome::Changed,
                format!("removed {}", target.display()),
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                steps.push("pod", StepOutcome::Unchanged, "no pod file")
            }
            Err(e) => {
                return Err(steps.fail("pod", format!("cannot remove {}: {e}", target.display())))
            }
        }
        let start = tokio::time::Instant::now();
        loop {
            match self.container().await {
                Ok(None) => {
                    steps.push("stopped", StepOutcome::Changed, "no snap container runs");
                    return Ok(steps.finish(false));
                }
                Ok(Some(id)) if start.elapsed() >= self.config.ready_timeout => {
                    return Err(steps.fail("stopped", format!("container {id} still runs")))
                }
                Err(e) => return Err(steps.fail("stopped", e)),
                Ok(Some(_)) => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
    }

    async fn deployed(&self) -> Option<String> {
        let text = std::fs::read_to_string(self.config.kubelet_dir.join(POD_FILE)).ok()?;
        let pod: serde_json::Value = serde_yaml::from_str(&text).ok()?;
        pod["spec"]["containers"][0]["image"]
            .as_str()
            .map(str::to_string)
    }

    async fn bluefield_facts(&self) -> Option<BlueFieldFacts> {
        let mut facts = BlueFieldFacts {
            release: std::fs::read_to_string(self.config.etc_root.join("mlnx-release"))
                .ok()
                .map(|s| s.trim().to_string()),
            ..BlueFieldFacts::default()
        };
        if let Ok(out) = self
            .run(self.tool("flint").args(["-d", &self.config.device, "q"]))
            .await
        {
            let field = |k: &str| {
                out.lines()
                    .find_map(|l| l.trim().strip_prefix(k))
                    .map(|v| v.trim_start_matches(':').trim().to_string())
            };
            facts.firmware_version = field("FW Version");
            facts.psid = field("PSID");
        }
        if let Ok(out) = self
            .run(self.tool("mget_temp").args(["-d", &self.config.device]))
            .await
        {
            facts.temperature_c = out.trim().parse().ok();
        }
        (facts != BlueFieldFacts::default()).then_some(facts)
    }
}

/// Whether two paths are on the same filesystem (staging must be).
pub fn same_filesystem(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlxconfig_query_is_parsed() {
        let out = "\nDevice #1:\n----------\n\nDevice type:        BlueField3\nName:               900-9D3B6-00CV-AA0_Ax\nDevice:             /dev/mst/mt41692_pciconf0\n\nConfigurations:                                      Default         Current         Next Boot\n*       INTERNAL_CPU_MODEL                          SEPARATED_HOST(0) EMBEDDED_CPU(1) EMBEDDED_CPU(1)\n        NVME_EMULATION_ENABLE                       False(0)        False(0)        True(1)\n        NVME_EMULATION_NUM_PF                       1               1               2\n        NVME_EMULATION_NUM_VF                       0               0               0\n";
        let m = parse_mlxconfig(out);
        assert_eq!(
            m["INTERNAL_CPU_MODEL"],
            FwValue {
                current: 1,
                next_boot: 1
            }
        );
        assert_eq!(
            m["NVME_EMULATION_ENABLE"],
            FwValue {
                current: 0,
                next_boot: 1
            }
        );
        assert_eq!(
            m["NVME_EMULATION_NUM_PF"],
            FwValue {
                current: 1,
                next_boot: 2
            }
        );
        assert!(!m.contains_key("Device"));
    }

    #[test]
    fn pod_yaml_carries_the_spec() {
        let spec = SnapSpec {
            image: "nvcr.io/nvidia/doca/doca_snap".into(),
            tag: "4.5.0-6-doca2.9.0".into(),
            env: [("NVME_EMU_PROVIDER".to_string(), "dpa".to_string())].into(),
            hugepages_mib: 4096,
            cpu: "8".into(),
            memory: "2Gi".into(),
            firmware: Default::default(),
        };
        let y = BlueField3::pod_yaml(&spec);
        let v: serde_json::Value = serde_yaml::from_str(&y).unwrap();
        let c = &v["spec"]["containers"][0];
        assert_eq!(
            c["image"],
            "nvcr.io/nvidia/doca/doca_snap:4.5.0-6-doca2.9.0"
        );
        assert_eq!(c["env"][0]["name"], "NVME_EMU_PROVIDER");
        assert_eq!(c["resources"]["limits"]["hugepages-2Mi"], "4096Mi");
        assert_eq!(v["spec"]["restartPolicy"], "Always");
    }
}
