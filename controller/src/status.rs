//! The fleet's status: clusters, DPUs with their hosts, and each volume's chain
//! (image -> bdev -> namespace -> controller -> attached -> host function) with the first broken
//! link. One model, [`FleetStatus`], serves `unistor status` (text and JSON), the watch daemon's
//! JSON API and its dashboard.

use std::fmt::Write;

use protocol::dpu::{DpuReport, SnapInventory};
use protocol::{ImageState, ImageStatus};
use serde::{Deserialize, Serialize};

use crate::manifest::{Desired, Volume};
use crate::plan::{names, Observed};

spelled! {
    /// A volume's state, and a DPU's health.
    Health {
        /// Whole: every link of the chain in place; a DPU's SNAP running with all its objects.
        Ok = "ok",
        /// A link missing or wrong (pending work, or held back); SNAP not running or objects
        /// missing.
        Degraded = "degraded",
        /// Its agent (or the cluster's) does not report.
        Unknown = "unknown",
    } default Unknown
}

spelled! {
    /// A Ceph cluster's health as its monitors say it, or unknown.
    ClusterHealth {
        /// `HEALTH_OK`.
        HealthOk = "HEALTH_OK",
        /// `HEALTH_WARN`.
        HealthWarn = "HEALTH_WARN",
        /// `HEALTH_ERR`.
        HealthErr = "HEALTH_ERR",
        /// Its agent does not report (or the monitors said something else).
        Unknown = "unknown",
    } default Unknown
}

impl ClusterHealth {
    /// From the monitors' word.
    pub fn parse(s: &str) -> Self {
        Self::ALL
            .iter()
            .copied()
            .find(|h| h.as_str() == s)
            .unwrap_or(Self::Unknown)
    }
}

spelled! {
    /// A link of a volume's chain.
    LinkKind {
        /// The RBD image.
        Image = "image",
        /// SNAP's bdev on it.
        Bdev = "bdev",
        /// The NVMe namespace.
        Namespace = "namespace",
        /// The NVMe controller.
        Controller = "controller",
        /// The namespace attached to the controller.
        Attached = "attached",
        /// The host seeing it.
        Host = "host",
    } default Image
}

spelled! {
    /// Whether a link is there.
    LinkState {
        /// There, as wanted.
        Ok = "ok",
        /// Missing or wrong: the first such link breaks the chain.
        Broken = "broken",
        /// After the first broken link: not looked at.
        Unchecked = "unchecked",
    } default Unchecked
}

spelled! {
    /// What the host does with a volume's device.
    HostUseState {
        /// Held open (by `host_openers`).
        Open = "open",
        /// Not open, but the host's driver has its controller enabled.
        Enabled = "enabled",
        /// Seen, not used.
        Idle = "idle",
        /// The platform cannot tell.
        Unknown = "unknown",
    } default Unknown
}

/// Everything the status views show.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FleetStatus {
    /// Ceph clusters.
    pub clusters: Vec<ClusterStatus>,
    /// DPUs.
    pub dpus: Vec<DpuStatus>,
    /// Volumes.
    pub volumes: Vec<VolumeStatus>,
    /// Counts over the whole fleet (whatever page the lists above are).
    #[serde(default)]
    pub summary: Summary,
    /// Which part of the fleet the lists above are, when a [`Selection`] chose it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page: Option<Page>,
}

/// The counts a fleet's status leads with.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Volumes the manifests want.
    pub volumes: usize,
    /// Whose whole chain is in place.
    pub volumes_ok: usize,
    /// With a link missing or wrong (pending work, or held back).
    pub volumes_degraded: usize,
    /// On an agent that does not answer.
    pub volumes_unknown: usize,
    /// DPUs the manifests name.
    pub dpus: usize,
    /// Whose agent reports.
    pub dpus_up: usize,
    /// Whose agent does not.
    pub dpus_down: usize,
    /// Up, but SNAP not running or objects missing.
    pub dpus_degraded: usize,
    /// Ceph clusters.
    pub clusters: usize,
    /// Not reachable or not `HEALTH_OK`.
    pub clusters_unhealthy: usize,
}

/// Which volumes and DPUs a view lists: filters, then a page. Every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Selection {
    /// A volume's state (`ok`, `degraded`, `unknown`) or a DPU's health; `problems` for every
    /// volume and DPU that is not ok.
    pub state: Option<String>,
    /// Exactly this host.
    pub host: Option<String>,
    /// Exactly this DPU.
    pub dpu: Option<String>,
    /// A volume label: `key` (present) or `key=value`.
    pub label: Option<String>,
    /// Text found in a volume's, image's, host's or DPU's name.
    pub q: Option<String>,
    /// Matches skipped before the page.
    pub offset: usize,
    /// Matches on the page (volumes and DPUs each).
    pub limit: Option<usize>,
}

/// Which part of the fleet a view lists.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Page {
    /// Matches skipped.
    pub offset: usize,
    /// Page size.
    pub limit: usize,
    /// Volumes that match the filters.
    pub volumes_matched: usize,
    /// DPUs that match the filters.
    pub dpus_matched: usize,
}

impl Selection {
    /// A page of `limit` when none is set.
    pub const DEFAULT_LIMIT: usize = 1000;

    fn state_matches(&self, state: Health) -> bool {
        match self.state.as_deref() {
            None | Some("") => true,
            Some("problems") => state != Health::Ok,
            Some(s) => s == state.as_str(),
        }
    }

    /// The common filters: state (or health), exact host and DPU, text in any of `names`.
    fn common(&self, state: Health, host: &str, dpu: &str, names: &[&str]) -> bool {
        let exact = |want: &Option<String>, have: &str| {
            want.as_deref().is_none_or(|w| w.is_empty() || w == have)
        };
        let text = match self.q.as_deref() {
            None | Some("") => true,
            Some(q) => names.iter().any(|n| n.contains(q)),
        };
        self.state_matches(state) && exact(&self.host, host) && exact(&self.dpu, dpu) && text
    }

    fn volume(&self, v: &VolumeStatus) -> bool {
        let label = match self.label.as_deref() {
            None | Some("") => true,
            Some(l) => match l.split_once('=') {
                Some((k, val)) => v.labels.get(k).is_some_and(|x| x == val),
                None => v.labels.contains_key(l),
            },
        };
        label
            && self.common(
                v.state,
                &v.host,
                &v.dpu,
                &[&v.volume, &v.image, &v.host, &v.dpu],
            )
    }

    fn dpu(&self, d: &DpuStatus) -> bool {
        self.common(d.health, &d.host, &d.name, &[&d.name, &d.host])
    }
}

/// One Ceph cluster.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// Manifest name.
    pub name: String,
    /// Its agent.
    pub agent: String,
    /// Whether its agent reports.
    pub reachable: bool,
    /// As the monitors say it.
    pub health: ClusterHealth,
    /// Active health checks, `NAME: summary`.
    pub checks: Vec<String>,
    /// Raw bytes.
    pub total_bytes: u64,
    /// Raw bytes used.
    pub used_bytes: u64,
    /// Raw bytes available.
    pub avail_bytes: u64,
    /// Images unistor manages there.
    pub images: usize,
    /// Why it is unknown.
    pub error: Option<String>,
}

/// One DPU.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DpuStatus {
    /// Manifest name.
    pub name: String,
    /// The host it sits in.
    pub host: String,
    /// Its agent.
    pub agent: String,
    /// Whether its agent reports.
    pub reachable: bool,
    /// Ok, degraded (SNAP not running or missing objects) or unknown.
    pub health: Health,
    /// `bluefield3` or `simulation`.
    pub platform: String,
    /// SNAP's state (none while the agent does not report).
    pub snap_state: Option<protocol::dpu::SnapState>,
    /// SNAP's version as it answers.
    pub snap_version: Option<String>,
    /// The deployed image:tag.
    pub snap_image: Option<String>,
    /// SNAP restarts seen by the agent.
    pub snap_restarts: u64,
    /// Firmware version.
    pub firmware: Option<String>,
    /// ASIC temperature, °C.
    pub temperature_c: Option<i32>,
    /// CPU model.
    pub cpu_model: String,
    /// CPUs.
    pub cpus: u32,
    /// 1-minute load.
    pub load1: f64,
    /// Memory, bytes.
    pub mem_total_bytes: u64,
    /// Memory available, bytes.
    pub mem_available_bytes: u64,
    /// Objects SNAP lost that the agent has not restored.
    pub missing: Vec<String>,
    /// Why it is unknown.
    pub error: Option<String>,
    /// Fences of its SNAP, one per cluster (`cluster/ceph: fenced 2026-...Z by ...: reason`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fenced: Vec<String>,
    /// The controller replica that owns it (replicas only; `None` there: no owner now).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
}

/// One link of a volume's chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    /// Which link.
    pub link: LinkKind,
    /// Whether it is there.
    pub state: LinkState,
    /// What was found.
    pub detail: String,
}

/// One volume.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct VolumeStatus {
    /// Volume.
    pub volume: String,
    /// Host.
    pub host: String,
    /// DPU.
    pub dpu: String,
    /// `cluster/pool/image`.
    pub image: String,
    /// Desired size.
    pub desired_bytes: u64,
    /// Size the image has (0 when unknown).
    pub size_bytes: u64,
    /// Size the host sees: the bdev's (0 when unknown). Below `size_bytes` while SNAP has not
    /// followed a grown image.
    #[serde(default)]
    pub host_bytes: u64,
    /// Function (`pf0`, `pf0vf3`).
    pub function: String,
    /// NSID as SNAP has it (or pinned).
    pub nsid: Option<u32>,
    /// Namespace UUID.
    pub uuid: String,
    /// Deletion policy.
    pub policy: String,
    /// Whole, degraded or unknown.
    pub state: Health,
    /// The first link that is not there, when degraded; why, when unknown.
    pub detail: String,
    /// The chain, link by link.
    pub chain: Vec<Link>,
    /// The last error a step of this volume met (the daemon fills it in).
    pub last_error: Option<String>,
    /// Whether reconciliation is suspended for it (the daemon fills it in).
    pub suspended: bool,
    /// Where the host has the volume's device, when the DPU's platform can tell.
    #[serde(default)]
    pub host_device: Option<String>,
    /// What the host does with it. Open or enabled makes removing the volume "in use".
    #[serde(default)]
    pub host_use: HostUseState,
    /// How many openers the host has on the device.
    #[serde(default)]
    pub host_openers: u32,
    /// The volume's labels, from its manifest.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, String>,
}

impl FleetStatus {
    /// Builds the status from the manifests and what the agents report.
    pub fn new(desired: &Desired, observed: &Observed) -> Self {
        let clusters = desired
            .clusters
            .values()
            .map(|c| cluster_status(c, observed))
            .collect();
        let dpus = desired
            .dpus
            .values()
            .map(|d| dpu_status(d, observed))
            .collect();
        // Each cluster's images by (pool, name), once: a volume's lookup costs no scan.
        let images: std::collections::HashMap<(&str, &str, &str), &ImageStatus> = observed
            .clusters
            .iter()
            .filter_map(|(name, k)| Some((name, k.get()?)))
            .flat_map(|(name, r)| {
                r.images
                    .iter()
                    .map(move |i| ((name.as_str(), i.pool.as_str(), i.image.as_str()), i))
            })
            .collect();
        let volumes = desired
            .volumes
            .values()
            .map(|v| {
                let key = (v.cluster.as_str(), v.pool.as_str(), v.image.as_str());
                chain_of(v, observed, images.get(&key).copied())
            })
            .collect();
        let mut s = Self {
            clusters,
            dpus,
            volumes,
            ..Self::default()
        };
        s.count();
        s
    }

    /// Whether every volume is ok (the whole fleet's, whatever page is listed).
    pub fn all_ok(&self) -> bool {
        self.summary.volumes_ok == self.summary.volumes
    }

    /// Counts the fleet.
    fn count(&mut self) {
        let vol = |state: Health| self.volumes.iter().filter(|v| v.state == state).count();
        let dpu = |f: &dyn Fn(&DpuStatus) -> bool| self.dpus.iter().filter(|d| f(d)).count();
        self.summary = Summary {
            volumes: self.volumes.len(),
            volumes_ok: vol(Health::Ok),
            volumes_degraded: vol(Health::Degraded),
            volumes_unknown: vol(Health::Unknown),
            dpus: self.dpus.len(),
            dpus_up: dpu(&|d| d.reachable),
            dpus_down: dpu(&|d| !d.reachable),
            dpus_degraded: dpu(&|d| d.reachable && d.health != Health::Ok),
            clusters: self.clusters.len(),
            clusters_unhealthy: self
                .clusters
                .iter()
                .filter(|c| !c.reachable || c.health != ClusterHealth::HealthOk)
                .count(),
        };
    }

    /// The volumes and DPUs `sel` chooses, a page of each (the clusters and the summary stay
    /// the whole fleet's); only what is on the page is copied.
    pub fn selected(&self, sel: &Selection) -> Self {
        let limit = sel.limit.unwrap_or(Selection::DEFAULT_LIMIT);
        let mut volumes_matched = 0;
        let mut volumes = vec![];
        for v in self.volumes.iter().filter(|v| sel.volume(v)) {
            if volumes_matched >= sel.offset && volumes.len() < limit {
                volumes.push(v.clone());
            }
            volumes_matched += 1;
        }
        let mut dpus_matched = 0;
        let mut dpus = vec![];
        for d in self.dpus.iter().filter(|d| sel.dpu(d)) {
            if dpus_matched >= sel.offset && dpus.len() < limit {
                dpus.push(d.clone());
            }
            dpus_matched += 1;
        }
        Self {
            clusters: self.clusters.clone(),
            dpus,
            volumes,
            summary: self.summary.clone(),
            page: Some(Page {
                offset: sel.offset,
                limit,
                volumes_matched,
                dpus_matched,
            }),
        }
    }

    /// The counts, first of all: one line each for volumes, DPUs and clusters.
    pub fn render_summary(&self) -> String {
        let m = &self.summary;
        format!(
            "Volumes: {} ({} ok, {} degraded, {} unknown)\nDPUs:    {} ({} up, {} down, {} degraded)\nClusters: {} ({} not healthy)\n\n",
            m.volumes,
            m.volumes_ok,
            m.volumes_degraded,
            m.volumes_unknown,
            m.dpus,
            m.dpus_up,
            m.dpus_down,
            m.dpus_degraded,
            m.clusters,
            m.clusters_unhealthy
        )
    }

    /// The problems (a selection of what is not ok), one line each.
    pub fn render_problems(&self) -> String {
        let mut out = String::from("Problems:\n");
        for d in &self.dpus {
            let state = snap_word(d.snap_state);
            let why = d.error.as_deref().unwrap_or(state);
            let _ = writeln!(out, "  dpu {:<20} {:<9} {why}", d.name, d.health);
        }
        for v in &self.volumes {
            let _ = writeln!(out, "  volume {:<18} {:<9} {}", v.volume, v.state, v.detail);
        }
        if let Some(p) = &self.page {
            let (shown, all) = (
                self.volumes.len() + self.dpus.len(),
                p.volumes_matched + p.dpus_matched,
            );
            if all > shown {
                let _ = writeln!(
                    out,
                    "  ... {} more: unistor status --state problems",
                    all - shown
                );
            }
        }
        out.push('\n');
        out
    }

    /// The status tables, for people.
    pub fn render(&self) -> String {
        self.render_for(false)
    }

    /// [`FleetStatus::render`], with each DPU's owning controller replica when `replicas` (a
    /// DPU no replica owns says so).
    pub fn render_for(&self, replicas: bool) -> String {
        let mut out = String::new();
        self.render_clusters(&mut out);
        self.render_dpus(&mut out, replicas);
        self.render_volumes(&mut out);
        self.render_paging(&mut out);
        out
    }

    fn render_clusters(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "{:<16} {:<12} {:<12} {:>8} {:>12}",
            "CLUSTER", "AGENT", "HEALTH", "IMAGES", "AVAIL"
        );
        for c in &self.clusters {
            let (images, avail) = if c.reachable {
                (c.images.to_string(), format!("{}Mi", c.avail_bytes >> 20))
            } else {
                ("-".into(), "-".into())
            };
            let _ = writeln!(
                out,
                "{:<16} {:<12} {:<12} {:>8} {:>12}",
                c.name, c.agent, c.health, images, avail
            );
        }
    }

    fn render_dpus(&self, out: &mut String, replicas: bool) {
        let _ = writeln!(
            out,
            "\n{}{:<12} {:<12} {:<9} {:<12} {:<34} {:>8} {:>8}",
            if replicas {
                format!("{:<12} ", "REPLICA")
            } else {
                String::new()
            },
            "DPU",
            "HOST",
            "HEALTH",
            "SNAP",
            "VERSION",
            "RESTARTS",
            "MISSING"
        );
        for d in &self.dpus {
            if replicas {
                let _ = write!(out, "{:<12} ", d.replica.as_deref().unwrap_or("(no owner)"));
            }
            if d.reachable {
                let _ = writeln!(
                    out,
                    "{:<12} {:<12} {:<9} {:<12} {:<34} {:>8} {:>8}",
                    d.name,
                    d.host,
                    d.health,
                    snap_word(d.snap_state),
                    d.snap_image
                        .as_deref()
                        .and_then(|i| i.rsplit(':').next())
                        .unwrap_or("-"),
                    d.snap_restarts,
                    d.missing.len()
                );
            } else {
                let _ = writeln!(
                    out,
                    "{:<12} {:<12} {:<9} {}",
                    d.name,
                    d.host,
                    Health::Unknown,
                    d.error.as_deref().unwrap_or("")
                );
            }
            for f in &d.fenced {
                let _ = writeln!(out, "{:<12} FENCED {f}", "");
            }
        }
    }

    fn render_volumes(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "\n{:<20} {:<10} {:>10} {:<9} {:<8} DETAIL",
            "VOLUME", "HOST", "SIZE", "STATE", "HOST USE"
        );
        for v in &self.volumes {
            // What the host sees, once SNAP serves it; the image's size before.
            let shown = if v.host_bytes > 0 {
                v.host_bytes
            } else {
                v.size_bytes
            };
            let size = if shown > 0 {
                format!("{}Mi", shown >> 20)
            } else {
                "-".into()
            };
            let state = if v.suspended {
                format!("{} (suspended)", v.state)
            } else {
                v.state.to_string()
            };
            let host_use = match v.host_use {
                HostUseState::Open => format!("open({})", v.host_openers),
                HostUseState::Unknown => "-".into(),
                other => other.to_string(),
            };
            let _ = writeln!(
                out,
                "{:<20} {:<10} {:>10} {:<9} {:<8} {}{}",
                v.volume,
                v.host,
                size,
                state,
                host_use,
                v.detail,
                v.last_error
                    .as_deref()
                    .map(|e| format!(" (last error: {e})"))
                    .unwrap_or_default()
            );
        }
    }

    /// Where the lists were cut, and how to see the rest.
    fn render_paging(&self, out: &mut String) {
        if let Some(p) = &self.page {
            let more = |what: &str, shown: usize, matched: usize| {
                (matched > shown).then(|| {
                    format!(
                        "({what} {}-{} of {matched} listed: --offset and --limit page, --state, --host, --dpu, --label and --search filter)\n",
                        p.offset + 1.min(shown),
                        p.offset + shown
                    )
                })
            };
            for line in [
                more("DPUs", self.dpus.len(), p.dpus_matched),
                more("volumes", self.volumes.len(), p.volumes_matched),
            ]
            .into_iter()
            .flatten()
            {
                out.push_str(&line);
            }
        }
    }
}

/// One cluster's status, from its agent's report.
fn cluster_status(c: &crate::manifest::Cluster, observed: &Observed) -> ClusterStatus {
    let mut s = ClusterStatus {
        name: c.name.clone(),
        agent: c.agent.to_string(),
        ..ClusterStatus::default()
    };
    match observed.clusters.get(&c.name) {
        Some(crate::plan::Known::Known { report: r }) => {
            s.reachable = true;
            s.health = ClusterHealth::parse(&r.health.status);
            s.checks = r
                .health
                .checks
                .iter()
                .map(|(k, v)| format!("{k}: {v}"))
                .collect();
            s.total_bytes = r.capacity.total_bytes;
            s.used_bytes = r.capacity.used_bytes;
            s.avail_bytes = r.capacity.avail_bytes;
            s.images = r.images.len();
        }
        Some(crate::plan::Known::Unknown { reason }) => s.error = Some(reason.clone()),
        None => s.error = Some("not observed".into()),
    }
    s
}

/// One DPU's status, from its agent's report and the clusters' fences.
fn dpu_status(d: &crate::manifest::Dpu, observed: &Observed) -> DpuStatus {
    let mut s = DpuStatus {
        name: d.name.clone(),
        host: d.host.clone(),
        agent: d.agent.to_string(),
        ..DpuStatus::default()
    };
    match observed.dpus.get(&d.name) {
        Some(crate::plan::Known::Known { report: r }) => {
            let running = r.snap.state == protocol::dpu::SnapState::Running;
            s.reachable = true;
            s.health = if running && r.missing.is_empty() {
                Health::Ok
            } else {
                Health::Degraded
            };
            s.platform = r.platform.clone();
            s.snap_state = Some(r.snap.state);
            s.snap_version = r.snap.version.clone();
            s.snap_image = r.snap.image.clone();
            s.snap_restarts = r.snap.restarts;
            if let Some(bf) = &r.bluefield {
                s.firmware = bf.firmware_version.clone();
                s.temperature_c = bf.temperature_c;
            }
            s.cpu_model = r.host.cpu_model.clone();
            s.cpus = r.host.cpus;
            s.load1 = r.host.load[0];
            s.mem_total_bytes = r.host.mem_total_bytes;
            s.mem_available_bytes = r.host.mem_available_bytes;
            s.missing = r.missing.clone();
        }
        Some(crate::plan::Known::Unknown { reason }) => s.error = Some(reason.clone()),
        None => s.error = Some("not observed".into()),
    }
    for (cluster, k) in &observed.clusters {
        let Some(r) = k.get() else { continue };
        for f in r.fences.iter().filter(|f| f.dpu == d.name) {
            s.fenced.push(fence_line(cluster, f));
        }
    }
    s
}

/// SNAP's state in one word (`unknown` while its agent does not report).
fn snap_word(state: Option<protocol::dpu::SnapState>) -> &'static str {
    use protocol::dpu::SnapState;
    match state {
        None => Health::Unknown.as_str(),
        Some(SnapState::NotInstalled) => "not_installed",
        Some(SnapState::Starting) => "starting",
        Some(SnapState::Running) => "running",
        Some(SnapState::Unreachable) => "unreachable",
    }
}

/// Walks one volume's chain; the first link that is not there breaks it.
pub fn volume_status(v: &Volume, observed: &Observed) -> VolumeStatus {
    let img = observed
        .clusters
        .get(&v.cluster)
        .and_then(|k| k.get())
        .and_then(|c| {
            c.images
                .iter()
                .find(|i| i.pool == v.pool.as_str() && i.image == v.image.as_str())
        });
    chain_of(v, observed, img)
}

/// [`volume_status`] with the volume's image already looked up.
fn chain_of(v: &Volume, observed: &Observed, img: Option<&ImageStatus>) -> VolumeStatus {
    let mut s = VolumeStatus {
        volume: v.name.to_string(),
        host: v.host.clone(),
        dpu: v.dpu.clone(),
        image: format!("{}/{}/{}", v.cluster, v.pool, v.image),
        desired_bytes: v.size_bytes,
        function: v.function.to_string(),
        nsid: v.nsid,
        uuid: v.uuid.clone(),
        policy: v.deletion_policy.as_str().into(),
        state: Health::Unknown,
        labels: v.labels.clone(),
        ..VolumeStatus::default()
    };
    if observed
        .clusters
        .get(&v.cluster)
        .and_then(|k| k.get())
        .is_none()
    {
        s.detail = format!("cluster {} not reporting", v.cluster);
        return s;
    }
    let Some(dpu) = observed.dpus.get(&v.dpu).and_then(|k| k.get()) else {
        s.detail = format!("dpu {} not reporting", v.dpu);
        return s;
    };
    // Each check: Ok(what was found) or Err(what is missing).
    let mut chain = Chain::default();
    chain.check(LinkKind::Image, || match img {
        Some(i) if i.state == ImageState::Live => {
            s.size_bytes = i.size_bytes;
            // A clone says of what (until it is flattened); a volume declared as a clone
            // whose image has no parent says it is flattened.
            let origin = match (&i.parent, &v.clone_from) {
                (Some(p), _) => match i.clone_depth {
                    Some(d) if d > 1 => format!(", clone of {p} (depth {d})"),
                    _ => format!(", clone of {p}"),
                },
                (None, Some(c)) if c.flatten && !i.unverified => {
                    format!(", flattened (made from {c})")
                }
                _ => String::new(),
            };
            Ok(format!(
                "{}/{} {}Mi{origin}{}",
                v.pool,
                v.image,
                i.size_bytes >> 20,
                snapshots_detail(v, i)
            ))
        }
        Some(_) => Err(Missing(format!(
            "image {}/{} is in the trash",
            v.pool, v.image
        ))),
        None => Err(Missing(format!("image {}/{} missing", v.pool, v.image))),
    });
    let empty = SnapInventory::default();
    let inv = dpu.inventory.as_ref().unwrap_or(&empty);
    let bdev = names::bdev(v.name.as_str());
    chain.check(LinkKind::Bdev, || {
        bdev_link(v, dpu, &bdev, &mut s.host_bytes)
    });
    let nqn = names::nqn(&v.dpu, v.function);
    let ns = inv.subsystems.iter().find(|x| x.nqn == nqn).and_then(|x| {
        x.namespaces
            .iter()
            .find(|n| n.bdev == bdev && v.nsid.is_none_or(|p| p == n.nsid))
    });
    chain.check(LinkKind::Namespace, || match ns {
        Some(n) => {
            s.nsid = Some(n.nsid);
            Ok(format!("nsid {} in {nqn}", n.nsid))
        }
        None => Err(Missing(format!("namespace for {bdev} missing in {nqn}"))),
    });
    let ctrl = names::controller(v.function);
    let c = inv.controllers.iter().find(|c| c.name == ctrl);
    chain.check(LinkKind::Controller, || match c {
        Some(c) => Ok(format!("{ctrl} ({} queues)", c.num_queues)),
        None => Err(Missing(format!("controller {ctrl} missing on {}", v.dpu))),
    });
    chain.check(LinkKind::Attached, || match (c, ns) {
        (Some(c), Some(n)) if c.namespaces.contains(&n.nsid) => {
            Ok(format!("nsid {} on {ctrl}", n.nsid))
        }
        _ => Err(Missing(format!("namespace not attached to {ctrl}"))),
    });
    let seen = host_seen(&mut s, dpu, &ctrl, ns.map(|n| n.nsid));
    chain.check(LinkKind::Host, || host_link(v, &ctrl, c, &seen, s.nsid));
    s.state = if chain.broken.is_some() {
        Health::Degraded
    } else {
        Health::Ok
    };
    s.detail = match chain.broken {
        Some(why) => why,
        None => format!("{} nsid {} on {}", v.function, s.nsid.unwrap_or(0), v.dpu),
    };
    s.chain = chain.links;
    s
}

/// The bdev link of `v`'s chain on `dpu`: the bdev, showing the host at least the desired
/// size (what it shows goes to `host_bytes`).
fn bdev_link(
    v: &Volume,
    dpu: &DpuReport,
    bdev: &str,
    host_bytes: &mut u64,
) -> Result<String, Missing> {
    let Some(inv) = dpu.inventory.as_ref() else {
        return Err(Missing(format!(
            "SNAP on {} is {:?}",
            v.dpu, dpu.snap.state
        )));
    };
    let Some(b) = inv.bdevs.iter().find(|b| b.name == bdev) else {
        return Err(Missing(format!("bdev {bdev} missing on {}", v.dpu)));
    };
    *host_bytes = b.num_blocks * u64::from(b.block_size);
    if *host_bytes < v.size_bytes {
        return Err(Missing(format!(
            "bdev {bdev} shows the host {}Mi of {}Mi",
            *host_bytes >> 20,
            v.size_bytes >> 20
        )));
    }
    if b.qos != v.qos {
        return Err(Missing(format!(
            "bdev {bdev} has QoS {}, the volume asks for {}",
            b.qos, v.qos
        )));
    }
    if b.qos.is_none() {
        Ok(bdev.to_string())
    } else {
        Ok(format!("{bdev}, QoS {}", b.qos))
    }
}

/// What the host's account says of the volume's device (`None`: the platform cannot tell;
/// `Some(None)`: the host does not see it), with the status' host fields filled in.
fn host_seen<'a>(
    s: &mut VolumeStatus,
    dpu: &'a protocol::dpu::DpuReport,
    ctrl: &str,
    nsid: Option<u32>,
) -> Option<Option<(&'a protocol::dpu::HostDevice, bool)>> {
    s.host_use = HostUseState::Unknown;
    let seen = match (&dpu.host_use, nsid) {
        (Some(h), Some(nsid)) => Some(h.device(ctrl, nsid).map(|d| {
            let enabled = h.controller(ctrl).is_some_and(|c| c.enabled);
            (d, enabled)
        })),
        _ => None,
    };
    if let Some(Some((d, enabled))) = &seen {
        s.host_device = Some(d.device.clone());
        s.host_openers = d.open;
        s.host_use = match (d.open, enabled) {
            (n, _) if n > 0 => HostUseState::Open,
            (_, true) => HostUseState::Enabled,
            _ => HostUseState::Idle,
        };
    }
    seen
}

/// The chain's last link: the controller started and, when the host's account is known, the
/// host seeing the namespace with the volume's identity.
fn host_link(
    v: &Volume,
    ctrl: &str,
    c: Option<&protocol::dpu::ControllerInfo>,
    seen: &Option<Option<(&protocol::dpu::HostDevice, bool)>>,
    nsid: Option<u32>,
) -> Result<String, Missing> {
    match (c, seen) {
        (Some(c), _) if !c.state.eq_ignore_ascii_case("STARTED") => {
            Err(Missing(format!("controller {ctrl} is {}", c.state)))
        }
        (None, _) => Err(Missing("no controller".into())),
        // The host's own account, when the platform has it: the device, with this identity.
        (Some(_), Some(None)) => Err(Missing(format!(
            "{} does not see nsid {} of {ctrl}",
            v.host,
            nsid.unwrap_or(0)
        ))),
        (Some(_), Some(Some((d, _)))) if d.uuid != v.uuid => Err(Missing(format!(
            "{} sees UUID {} at nsid {}, not {}",
            v.host, d.uuid, d.nsid, v.uuid
        ))),
        (Some(_), Some(Some((d, _)))) => Ok(format!(
            "{} has {} ({} {} on {})",
            v.host, d.device, v.function, ctrl, v.dpu
        )),
        (Some(_), None) => Ok(format!("{} {} on {}", v.host, v.function, v.dpu)),
    }
}

/// What a link of a chain lacks (its detail in the status).
struct Missing(String);

/// A chain being walked: links after the first broken one are not checked.
#[derive(Default)]
struct Chain {
    links: Vec<Link>,
    broken: Option<String>,
}

impl Chain {
    fn check(&mut self, link: LinkKind, f: impl FnOnce() -> Result<String, Missing>) {
        let (state, detail) = if self.broken.is_some() {
            (LinkState::Unchecked, String::new())
        } else {
            match f() {
                Ok(d) => (LinkState::Ok, d),
                Err(Missing(e)) => {
                    self.broken = Some(e.clone());
                    (LinkState::Broken, e)
                }
            }
        };
        self.links.push(Link {
            link,
            state,
            detail,
        });
    }
}

/// One fence, as the status shows it.
fn fence_line(cluster: &str, f: &protocol::FenceRecord) -> String {
    let at = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(f.at_unix_ms),
    );
    let state = match f.state {
        protocol::FenceState::Fenced => "fenced",
        protocol::FenceState::Fencing => "fence interrupted (run `unistor fence` again)",
    };
    format!(
        "cluster/{cluster}: {state} {at} by {}{}; {} client(s) blocklisted",
        f.by,
        if f.reason.is_empty() {
            String::new()
        } else {
            format!(": {}", f.reason)
        },
        f.blocklisted.len()
    )
}

/// What a volume's image holds of snapshots, for its image link: the declared names present
/// (and those missing), the schedule's kept count against `keep`, and any others (retained
/// after they left the manifest, or made outside unistor).
fn snapshots_detail(v: &crate::manifest::Volume, i: &protocol::ImageStatus) -> String {
    let want = v.snapshots.as_ref();
    if i.snapshots.is_empty() && want.is_none() {
        return String::new();
    }
    let named: Vec<&str> =
        want.map_or_else(Vec::new, |w| w.names.iter().map(|n| n.as_str()).collect());
    let has = |n: &str| i.snapshots.iter().any(|s| s.name == n);
    let mut parts = Vec::new();
    for n in &named {
        parts.push(if has(n) {
            (*n).to_string()
        } else {
            format!("{n} (not taken yet)")
        });
    }
    // The kept set, newest first (by the cluster's snapshot id): the first few by name.
    let mut kept: Vec<&protocol::SnapshotInfo> = i
        .snapshots
        .iter()
        .filter(|s| protocol::meta::scheduled_at(&s.name).is_some())
        .collect();
    kept.sort_by_key(|s| std::cmp::Reverse(s.id));
    let scheduled = kept.len();
    const SHOWN: usize = 4;
    let mut names: Vec<&str> = kept.iter().take(SHOWN).map(|s| s.name.as_str()).collect();
    let older = scheduled.saturating_sub(SHOWN).to_string() + " older";
    if scheduled > SHOWN {
        names.push(&older);
    }
    let listed = if names.is_empty() {
        String::new()
    } else {
        format!(" [{}]", names.join(" "))
    };
    match want.and_then(|w| w.schedule) {
        Some((every, keep)) => parts.push(format!(
            "{scheduled} scheduled (every {}, keep {keep}){listed}",
            humantime::format_duration(std::time::Duration::from_secs(every))
        )),
        None if scheduled > 0 => {
            parts.push(format!("{scheduled} scheduled (no schedule now){listed}"))
        }
        None => {}
    }
    let others: Vec<&str> = i
        .snapshots
        .iter()
        .map(|s| s.name.as_str())
        .filter(|n| protocol::meta::scheduled_at(n).is_none() && !named.contains(n))
        .collect();
    if !others.is_empty() {
        parts.push(format!("also {}", others.join(", ")));
    }
    format!("; snapshots: {}", parts.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::sim::World;
    use crate::plan::Known;
    use protocol::dpu::{HostController, HostDevice, HostUse};

    use crate::plan::sim::converged_examples as converged;

    /// With replicas the DPU table leads with each DPU's owner, and says when it has none.
    #[test]
    fn the_dpu_table_names_each_dpus_replica_or_says_it_has_none() {
        let (d, w) = converged();
        let mut fs = FleetStatus::new(&d, &w.observed());
        assert!(fs.dpus.len() >= 2, "the test needs two DPUs");
        fs.dpus[0].replica = Some("ctl-b".into());
        let text = fs.render_for(true);
        let row = |name: &str| {
            text.lines()
                .find(|l| l.contains(&format!(" {name} ")))
                .unwrap_or_else(|| panic!("{name} in:\n{text}"))
                .to_string()
        };
        assert!(text.contains("\nREPLICA      DPU "), "{text}");
        assert!(row(&fs.dpus[0].name).starts_with("ctl-b "), "{text}");
        assert!(row(&fs.dpus[1].name).starts_with("(no owner) "), "{text}");
        assert!(
            !fs.render().contains("REPLICA"),
            "a single controller has no owners"
        );
    }

    /// The examples converged, then one DPU gone: counts of the whole fleet, filters, pages.
    #[test]
    fn the_status_counts_the_whole_fleet_and_lists_a_filtered_page() {
        let (d, w) = converged();
        let all = FleetStatus::new(&d, &w.observed());
        let n = d.volumes.len();
        assert_eq!((all.summary.volumes, all.summary.volumes_ok), (n, n));
        assert!(all.all_ok());
        let mut observed = w.observed();
        let gone = d.volumes["db-data"].dpu.clone();
        observed.dpus.insert(
            gone.clone(),
            Known::Unknown {
                reason: "no session".into(),
            },
        );
        let fs = FleetStatus::new(&d, &observed);
        let on_gone = d.volumes.values().filter(|v| v.dpu == gone).count();
        assert!(on_gone >= 2, "the test needs two volumes on one DPU");
        assert_eq!(fs.summary.volumes_unknown, on_gone);
        assert_eq!(fs.summary.volumes_ok, n - on_gone);
        assert_eq!(
            (fs.summary.dpus_down, fs.summary.dpus_up),
            (1, d.dpus.len() - 1)
        );
        assert!(!fs.all_ok());

        // Problems, a page of one: the counts stay the whole fleet's.
        let page = fs.selected(&Selection {
            state: Some("problems".into()),
            limit: Some(1),
            ..Selection::default()
        });
        assert_eq!(page.summary, fs.summary);
        assert_eq!(page.volumes.len(), 1);
        assert_eq!(page.volumes[0].state, Health::Unknown);
        let p = page.page.clone().unwrap();
        assert_eq!((p.volumes_matched, p.dpus_matched), (on_gone, 1));
        assert_eq!(page.dpus[0].name, gone);
        // The next page, then past the end.
        let next = fs.selected(&Selection {
            state: Some("problems".into()),
            offset: 1,
            limit: Some(1),
            ..Selection::default()
        });
        assert_ne!(next.volumes[0].volume, page.volumes[0].volume);
        let past = fs.selected(&Selection {
            offset: n + 5,
            ..Selection::default()
        });
        assert!(past.volumes.is_empty());
        // By label, by text, by DPU.
        let (name, v) = d
            .volumes
            .iter()
            .find(|(_, v)| !v.labels.is_empty())
            .expect("an example volume with a label");
        let (k, val) = v.labels.iter().next().unwrap();
        let by_label = fs.selected(&Selection {
            label: Some(format!("{k}={val}")),
            ..Selection::default()
        });
        assert!(by_label.volumes.iter().any(|x| &x.volume == name));
        assert!(by_label
            .volumes
            .iter()
            .all(|x| x.labels.get(k) == Some(val)));
        let by_key = fs.selected(&Selection {
            label: Some(k.clone()),
            ..Selection::default()
        });
        assert!(by_key.volumes.len() >= by_label.volumes.len());
        let by_text = fs.selected(&Selection {
            q: Some(name[1..name.len() - 1].to_string()),
            ..Selection::default()
        });
        assert!(by_text.volumes.iter().any(|x| &x.volume == name));
        let by_dpu = fs.selected(&Selection {
            dpu: Some(gone.clone()),
            ..Selection::default()
        });
        assert_eq!(by_dpu.volumes.len(), on_gone);
        assert_eq!(by_dpu.dpus.len(), 1);
        let text = fs.render_summary();
        assert!(
            text.contains(&format!(
                "Volumes: {n} ({} ok, 0 degraded, {on_gone} unknown)",
                n - on_gone
            )),
            "{text}"
        );
    }

    fn db_data(d: &Desired, w: &World) -> VolumeStatus {
        volume_status(&d.volumes["db-data"], &w.observed())
    }

    #[test]
    fn status_says_what_the_host_does_with_a_volume() {
        let (d, mut w) = converged();
        let v = db_data(&d, &w);
        assert_eq!(
            (v.state.as_str(), v.host_use.as_str()),
            ("ok", "unknown"),
            "a platform that cannot tell: {v:?}"
        );
        let uuid = d.volumes["db-data"].uuid.clone();
        let mut host = HostUse {
            controllers: vec![HostController {
                name: "unistor-pf0".into(),
                enabled: true,
                namespaces: vec![HostDevice {
                    nsid: 1,
                    uuid: uuid.clone(),
                    size_bytes: 2 << 30,
                    device: "/h/unistor-pf0-n1.nbd".into(),
                    open: 2,
                }],
            }],
        };
        w.dpus.get_mut("dpu-a").unwrap().host_use = Some(host.clone());
        let v = db_data(&d, &w);
        assert_eq!(v.state, Health::Ok, "{v:?}");
        assert_eq!(v.host_use, HostUseState::Open);
        assert_eq!(v.host_openers, 2);
        assert_eq!(v.host_device.as_deref(), Some("/h/unistor-pf0-n1.nbd"));
        assert!(FleetStatus::new(&d, &w.observed())
            .render()
            .contains("open(2)"));
        host.controllers[0].namespaces[0].open = 0;
        w.dpus.get_mut("dpu-a").unwrap().host_use = Some(host.clone());
        assert_eq!(db_data(&d, &w).host_use, HostUseState::Enabled);
        host.controllers[0].enabled = false;
        w.dpus.get_mut("dpu-a").unwrap().host_use = Some(host.clone());
        assert_eq!(db_data(&d, &w).host_use, HostUseState::Idle);
        // The host sees another namespace there: not ok.
        host.controllers[0].namespaces[0].uuid = "00000000-0000-4000-8000-000000000000".into();
        w.dpus.get_mut("dpu-a").unwrap().host_use = Some(host.clone());
        let v = db_data(&d, &w);
        assert_eq!(v.state, Health::Degraded);
        assert!(v.detail.contains("sees UUID 00000000"), "{v:?}");
        // Or none at all.
        host.controllers.clear();
        w.dpus.get_mut("dpu-a").unwrap().host_use = Some(host);
        let v = db_data(&d, &w);
        assert_eq!(v.state, Health::Degraded);
        assert!(
            v.detail.contains("does not see nsid 1 of unistor-pf0"),
            "{v:?}"
        );
    }
}
