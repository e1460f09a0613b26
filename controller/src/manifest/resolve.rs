//! Resolution: typed documents checked one by one and against each other (duplicates, shared
//! images, NSID collisions, hosts without a DPU...) into the desired state.

use std::collections::BTreeMap;

use protocol::dpu::{FirmwareSpec, FunctionRef, SnapSpec};
use protocol::names::{
    check_env, check_host_port, check_image_ref, check_image_tag, check_uuid, CephClientId,
    ImageName, NameError, PeerName, PoolName, SnapName, VolumeName,
};

use super::types::{self, *};
use super::yaml::{locate, Doc};
use super::{
    derived_uuid, parse_size, CloneSource, Cluster, Desired, Dpu, LoadError, Source, Volume,
    VolumeSnapshots,
};

pub(super) struct Ctx<'a> {
    pub(super) errors: Vec<LoadError>,
    pub(super) docs: &'a [(Doc<'a>, Document)],
}

impl Ctx<'_> {
    fn err(&mut self, doc: usize, path: &str, message: impl Into<String>) {
        let d = &self.docs[doc].0;
        let keys: Vec<&str> = path.split('.').filter(|k| !k.is_empty()).collect();
        let line = d.first_line + locate(&d.text, &keys).unwrap_or(0);
        self.errors.push(LoadError {
            file: d.file.to_path_buf(),
            line,
            field: path.to_string(),
            message: message.into(),
        });
    }

    fn name_err(&mut self, doc: usize, path: &str, e: NameError) {
        self.err(doc, path, format!("{}: {}", e.shown, e.reason));
    }

    fn source(&self, doc: usize) -> Source {
        let d = &self.docs[doc].0;
        Source {
            file: d.file.to_path_buf(),
            line: d.first_line,
        }
    }
}

fn check_meta<S>(ctx: &mut Ctx<'_>, i: usize, o: &Object<S>) -> bool {
    let mut ok = true;
    if o.api_version != API_VERSION {
        ctx.err(
            i,
            "apiVersion",
            format!("{:?} is not {API_VERSION:?}", o.api_version),
        );
        ok = false;
    }
    if let Err(e) = VolumeName::parse("metadata.name", &o.metadata.name) {
        ctx.name_err(i, "metadata.name", e);
        ok = false;
    }
    ok
}

pub(super) fn resolve(ctx: &mut Ctx<'_>) -> Desired {
    let mut d = Desired::default();
    unique_names(ctx);
    let docs = ctx.docs;
    for (i, (_, doc)) in docs.iter().enumerate() {
        match doc {
            Document::CephCluster(o) => {
                if let Some(c) = resolve_cluster(ctx, i, o) {
                    d.clusters.entry(c.name.clone()).or_insert(c);
                }
            }
            Document::Dpu(o) => {
                if let Some(x) = resolve_dpu(ctx, i, o) {
                    d.dpus.entry(x.name.clone()).or_insert(x);
                }
            }
            Document::Volume(_) => {}
        }
    }
    let hosts = one_dpu_per_host(ctx);
    let mut set = VolumeSet::default();
    for (i, (_, doc)) in docs.iter().enumerate() {
        let Document::Volume(o) = doc else { continue };
        let Some(v) = resolve_volume(ctx, i, o, &d, &hosts) else {
            continue;
        };
        if set.admit(ctx, i, &v) {
            d.volumes.entry(v.name.to_string()).or_insert(v);
        }
    }
    d
}

/// Names are unique per kind.
fn unique_names(ctx: &mut Ctx<'_>) {
    let mut seen: BTreeMap<(&str, String), usize> = BTreeMap::new();
    for (i, (_, doc)) in ctx.docs.iter().enumerate() {
        let (kind, name) = match doc {
            Document::CephCluster(o) => ("CephCluster", &o.metadata.name),
            Document::Dpu(o) => ("Dpu", &o.metadata.name),
            Document::Volume(o) => ("Volume", &o.metadata.name),
        };
        if let Some(first) = seen.insert((kind, name.clone()), i) {
            let at = ctx.source(first);
            ctx.err(
                i,
                "metadata.name",
                format!("{kind} {name:?} is defined twice (also at {at})"),
            );
        }
    }
}

/// One DPU per host; returns host to DPU.
fn one_dpu_per_host(ctx: &mut Ctx<'_>) -> BTreeMap<String, String> {
    let mut hosts: BTreeMap<String, String> = BTreeMap::new();
    for (i, (_, doc)) in ctx.docs.iter().enumerate() {
        if let Document::Dpu(o) = doc {
            if let Some(other) = hosts.insert(o.spec.host.clone(), o.metadata.name.clone()) {
                if other != o.metadata.name {
                    ctx.err(
                        i,
                        "spec.host",
                        format!(
                            "host {:?} already has DPU {other:?}; volumes name hosts, so a host has one DPU",
                            o.spec.host
                        ),
                    );
                }
            }
        }
    }
    hosts
}

/// The set-wide rules of volumes, checked as each is added: an image used once, one queue
/// count per function (volumes on one function share its controller), an NSID once per
/// function.
#[derive(Default)]
struct VolumeSet {
    queues: BTreeMap<(String, FunctionRef), (u32, String, usize)>,
    images: BTreeMap<(String, String, String), (String, usize)>,
    slots: BTreeMap<(String, FunctionRef, u32), (String, usize)>,
}

impl VolumeSet {
    /// Whether `v` (document `i`) may join the set; the error said when not.
    fn admit(&mut self, ctx: &mut Ctx<'_>, i: usize, v: &Volume) -> bool {
        let img = (v.cluster.clone(), v.pool.to_string(), v.image.to_string());
        if let Some((other, at)) = self.images.get(&img) {
            let at = ctx.source(*at);
            ctx.err(
                i,
                "spec.rbd",
                format!(
                    "image {}/{}/{} is already used by volume {other:?} ({at})",
                    img.0, img.1, img.2
                ),
            );
            return false;
        }
        self.images.insert(img, (v.name.to_string(), i));
        let key = (v.dpu.clone(), v.function);
        if let Some((q, other, at)) = self.queues.get(&key) {
            if *q != v.queues {
                let at = ctx.source(*at);
                ctx.err(
                    i,
                    "spec.queues",
                    format!(
                        "{} queues, but volume {other:?} ({at}) on the same function ({} of DPU {}) has {q}: they share one controller",
                        v.queues, v.function, v.dpu
                    ),
                );
                return false;
            }
        } else {
            self.queues.insert(key, (v.queues, v.name.to_string(), i));
        }
        if let Some(nsid) = v.nsid {
            let slot = (v.dpu.clone(), v.function, nsid);
            if let Some((other, at)) = self.slots.get(&slot) {
                let at = ctx.source(*at);
                ctx.err(
                    i,
                    "spec.nvme.nsid",
                    format!(
                        "DPU {} function {} NSID {nsid} is already volume {other:?} ({at})",
                        v.dpu, v.function
                    ),
                );
                return false;
            }
            self.slots.insert(slot, (v.name.to_string(), i));
        }
        true
    }
}

fn resolve_agent(ctx: &mut Ctx<'_>, i: usize, a: &AgentRef) -> Option<PeerName> {
    let name = PeerName::parse("spec.agent.name", &a.name)
        .map_err(|e| ctx.name_err(i, "spec.agent.name", e))
        .ok();
    if let Err(e) = check_host_port("spec.agent.address", &a.address) {
        ctx.name_err(i, "spec.agent.address", e);
        return None;
    }
    name
}

fn resolve_cluster(ctx: &mut Ctx<'_>, i: usize, o: &Object<CephClusterSpec>) -> Option<Cluster> {
    let ok = check_meta(ctx, i, o);
    let agent = resolve_agent(ctx, i, &o.spec.agent);
    let mut pools = vec![];
    if o.spec.pools.is_empty() {
        ctx.err(i, "spec.pools", "at least one pool is needed");
    }
    for (n, p) in o.spec.pools.iter().enumerate() {
        match PoolName::parse(&format!("spec.pools[{n}]"), p) {
            Ok(p) => pools.push(p),
            Err(e) => ctx.name_err(i, "spec.pools", e),
        }
    }
    for m in &o.spec.monitors {
        if let Err(e) = check_host_port("spec.monitors", m) {
            ctx.name_err(i, "spec.monitors", e);
        }
    }
    let client = CephClientId::parse(
        "spec.snapIdentity.clientId",
        &o.spec.snap_identity.client_id,
    )
    .map_err(|e| ctx.name_err(i, "spec.snapIdentity.clientId", e))
    .ok();
    if o.spec.snap_identity.client_id == "admin" {
        ctx.err(
            i,
            "spec.snapIdentity.clientId",
            "SNAP must not use client.admin: name a least-privilege identity",
        );
        return None;
    }
    Some(Cluster {
        name: o.metadata.name.clone(),
        agent: agent?,
        address: o.spec.agent.address.clone(),
        monitors: o.spec.monitors.clone(),
        pools: if ok && pools.len() == o.spec.pools.len() {
            pools
        } else {
            return None;
        },
        snap_client: client?,
        source: ctx.source(i),
    })
}

fn resolve_dpu(ctx: &mut Ctx<'_>, i: usize, o: &Object<DpuSpec>) -> Option<Dpu> {
    let before = ctx.errors.len();
    check_meta(ctx, i, o);
    let agent = resolve_agent(ctx, i, &o.spec.agent);
    if let Err(e) = VolumeName::parse("spec.host", &o.spec.host) {
        ctx.name_err(i, "spec.host", e);
    }
    let s = &o.spec.snap;
    if let Err(e) = check_image_ref("spec.snap.image", &s.image) {
        ctx.name_err(i, "spec.snap.image", e);
    }
    if let Err(e) = check_image_tag("spec.snap.version", &s.version) {
        ctx.name_err(i, "spec.snap.version", e);
    }
    for (k, v) in &s.env {
        if let Err(e) = check_env("spec.snap.env", k, v) {
            ctx.name_err(i, "spec.snap.env", e);
        }
    }
    let hugepages = match parse_size(&s.hugepages) {
        Ok(b) => b >> 20,
        Err(e) => {
            ctx.err(i, "spec.snap.hugepages", e.to_string());
            0
        }
    };
    let f = &s.functions;
    use protocol::dpu::{BLUEFIELD3_MAX_VFS, BLUEFIELD3_PFS};
    if !BLUEFIELD3_PFS.contains(&f.pfs) {
        ctx.err(
            i,
            "spec.snap.functions.pfs",
            format!(
                "{} PFs; a BlueField-3 offers {}-{} static NVMe PFs",
                f.pfs,
                BLUEFIELD3_PFS.start(),
                BLUEFIELD3_PFS.end()
            ),
        );
    }
    if f.vfs_per_pf > BLUEFIELD3_MAX_VFS {
        ctx.err(
            i,
            "spec.snap.functions.vfsPerPf",
            format!(
                "{} VFs per PF; a BlueField-3 offers at most {BLUEFIELD3_MAX_VFS}",
                f.vfs_per_pf
            ),
        );
    }
    if ctx.errors.len() > before {
        return None;
    }
    Some(Dpu {
        name: o.metadata.name.clone(),
        agent: agent?,
        address: o.spec.agent.address.clone(),
        host: o.spec.host.clone(),
        snap: SnapSpec {
            image: s.image.clone(),
            tag: s.version.clone(),
            env: s.env.clone(),
            hugepages_mib: hugepages,
            cpu: "8".into(),
            memory: "2Gi".into(),
            firmware: FirmwareSpec {
                nvme_pfs: f.pfs,
                nvme_vfs: f.vfs_per_pf,
            },
        },
        source: ctx.source(i),
    })
}

fn resolve_volume(
    ctx: &mut Ctx<'_>,
    i: usize,
    o: &Object<VolumeSpec>,
    d: &Desired,
    hosts: &BTreeMap<String, String>,
) -> Option<Volume> {
    let before = ctx.errors.len();
    check_meta(ctx, i, o);
    let s = &o.spec;
    let dpu = match hosts.get(&s.host) {
        Some(dpu) => d.dpus.get(dpu),
        None => {
            ctx.err(
                i,
                "spec.host",
                format!("host {:?} has no DPU: no Dpu manifest names it", s.host),
            );
            None
        }
    };
    let size = parse_size(&s.size)
        .map_err(|e| ctx.err(i, "spec.size", e.to_string()))
        .ok();
    let (cluster, pool, image) = resolve_rbd(ctx, i, o, d);
    let function = FunctionRef {
        pf: s.nvme.pf,
        vf: s.nvme.vf,
    };
    check_nvme(ctx, i, &s.nvme, dpu);
    if !(1..=32).contains(&s.queues) {
        ctx.err(i, "spec.queues", format!("{} queues; 1-32", s.queues));
    }
    let retention = humantime::parse_duration(&s.trash_retention)
        .map_err(|e| e.to_string())
        .and_then(|d| protocol::limits::check_retention_secs(d.as_secs()).map(|()| d))
        .map_err(|e| {
            ctx.err(
                i,
                "spec.trashRetention",
                format!("{:?}: {e}", s.trash_retention),
            )
        })
        .ok();
    let clone_from = s
        .source
        .as_ref()
        .and_then(|src| resolve_source(ctx, i, src, cluster));
    let snapshots = s
        .snapshots
        .as_ref()
        .and_then(|x| resolve_snapshots(ctx, i, x));
    let qos = s
        .qos
        .as_ref()
        .map_or_else(Default::default, |q| resolve_qos(ctx, i, q));
    if ctx.errors.len() > before {
        return None;
    }
    let (dpu, size, cluster, pool, image, retention) =
        (dpu?, size?, cluster?, pool?, image?, retention?);
    Some(Volume {
        name: VolumeName::parse("metadata.name", &o.metadata.name).ok()?,
        host: s.host.clone(),
        dpu: dpu.name.clone(),
        size_bytes: size,
        uuid: s
            .nvme
            .uuid
            .clone()
            .unwrap_or_else(|| derived_uuid(&cluster.name, pool.as_str(), image.as_str())),
        cluster: cluster.name.clone(),
        pool,
        image,
        function,
        nsid: s.nvme.nsid,
        queues: s.queues,
        deletion_policy: s.deletion_policy,
        trash_retention: retention,
        adopt: s.rbd.adopt,
        clone_from,
        snapshots,
        qos,
        labels: o.metadata.labels.clone(),
        source: ctx.source(i),
    })
}

/// Pool name `name` of field `field`: on the allow-list, and one of `cluster`'s pools.
fn cluster_pool(
    ctx: &mut Ctx<'_>,
    i: usize,
    field: &'static str,
    name: &str,
    cluster: Option<&Cluster>,
) -> Option<PoolName> {
    let pool = PoolName::parse(field, name)
        .map_err(|e| ctx.name_err(i, field, e))
        .ok()?;
    if let Some(c) = cluster {
        if !c.pools.contains(&pool) {
            ctx.err(
                i,
                field,
                format!("pool {pool:?} is not one of cluster {:?}'s pools", c.name),
            );
        }
    }
    Some(pool)
}

/// A volume's `spec.source`: exactly one of `snapshot` (names on the allow-lists, the pool one
/// of the cluster's) and `volumeSnapshot` (a snapshot of a volume of the same cluster).
fn resolve_source(
    ctx: &mut Ctx<'_>,
    i: usize,
    src: &types::VolumeSource,
    cluster: Option<&Cluster>,
) -> Option<CloneSource> {
    let flatten = src.flatten == types::Flatten::Always;
    let max_depth = match src.max_depth {
        Some(n) if flatten => {
            ctx.err(
                i,
                "spec.source.maxDepth",
                format!("{n}: `flatten: always` flattens every clone already; give one of them"),
            );
            None
        }
        Some(n) if !(1..=15).contains(&n) => {
            ctx.err(
                i,
                "spec.source.maxDepth",
                format!("{n}: 1-15 clone generations"),
            );
            None
        }
        other => other,
    };
    match (&src.snapshot, &src.volume_snapshot) {
        (Some(s), None) => {
            let pool = cluster_pool(ctx, i, "spec.source.snapshot.pool", &s.pool, cluster);
            let image = ImageName::parse("spec.source.snapshot.image", &s.image)
                .map_err(|e| ctx.name_err(i, "spec.source.snapshot.image", e))
                .ok();
            let snapshot = snap_name(ctx, i, "spec.source.snapshot.name", &s.name);
            Some(CloneSource {
                pool: pool?,
                image: image?,
                snapshot: snapshot?,
                flatten,
                max_depth,
                volume: None,
            })
        }
        (None, Some(v)) => {
            volume_snapshot(ctx, i, v, cluster, flatten).map(|c| CloneSource { max_depth, ..c })
        }
        _ => {
            ctx.err(
                i,
                "spec.source",
                "give exactly one of `snapshot` and `volumeSnapshot`",
            );
            None
        }
    }
}

/// `spec.source.volumeSnapshot`: the volume's document (same cluster), whose pool and image
/// it names. The snapshot need not be declared any more once the clone is made (a source is
/// read only at creation); until it exists the planner holds the clone and says so.
fn volume_snapshot(
    ctx: &mut Ctx<'_>,
    i: usize,
    v: &types::VolumeSnapshotSource,
    cluster: Option<&Cluster>,
    flatten: bool,
) -> Option<CloneSource> {
    const FIELD: &str = "spec.source.volumeSnapshot";
    let snapshot = snap_name(ctx, i, "spec.source.volumeSnapshot.name", &v.name)?;
    let docs = ctx.docs;
    let Some(o) = docs.iter().find_map(|(_, d)| match d {
        Document::Volume(o) if o.metadata.name == v.volume => Some(o),
        _ => None,
    }) else {
        ctx.err(
            i,
            "spec.source.volumeSnapshot.volume",
            format!("no Volume named {:?}", v.volume),
        );
        return None;
    };
    if cluster.is_some_and(|c| c.name != o.spec.rbd.cluster) {
        ctx.err(
            i,
            FIELD,
            format!(
                "volume {:?} is in cluster {:?}: a clone is made in its snapshot's cluster",
                v.volume, o.spec.rbd.cluster
            ),
        );
        return None;
    }
    let image = o
        .spec
        .rbd
        .image
        .clone()
        .unwrap_or_else(|| o.metadata.name.clone());
    Some(CloneSource {
        pool: PoolName::parse(FIELD, &o.spec.rbd.pool).ok()?,
        image: ImageName::parse(FIELD, &image).ok()?,
        snapshot,
        flatten,
        max_depth: None,
        volume: VolumeName::parse(FIELD, &v.volume).ok(),
    })
}

/// Snapshot name `name` of field `field`, on the allow-list.
fn snap_name(ctx: &mut Ctx<'_>, i: usize, field: &str, name: &str) -> Option<SnapName> {
    SnapName::parse(field, name)
        .map_err(|e| ctx.name_err(i, field, e))
        .ok()
}

/// A volume's `spec.qos`, as SPDK's `bdev_set_qos_limit` keeps it without rounding: IOPS a
/// positive multiple of 1000, bandwidths positive whole MiB per second. A refusal says the rule
/// and the nearest allowed values.
fn resolve_qos(ctx: &mut Ctx<'_>, i: usize, q: &types::VolumeQos) -> protocol::dpu::QosLimits {
    let mut out = protocol::dpu::QosLimits::default();
    if let Some(iops) = q.iops {
        let probe = protocol::dpu::QosLimits {
            rw_ios_per_sec: iops,
            ..Default::default()
        };
        match probe.check() {
            Err((_, why)) => ctx.err(i, "spec.qos.iops", why),
            Ok(()) if iops == 0 => ctx.err(i, "spec.qos.iops", "0: leave `iops` out for no limit"),
            Ok(()) => out.rw_ios_per_sec = iops,
        }
    }
    for (field, value, slot) in [
        (
            "spec.qos.bandwidth",
            &q.bandwidth,
            &mut out.rw_mbytes_per_sec,
        ),
        (
            "spec.qos.readBandwidth",
            &q.read_bandwidth,
            &mut out.r_mbytes_per_sec,
        ),
        (
            "spec.qos.writeBandwidth",
            &q.write_bandwidth,
            &mut out.w_mbytes_per_sec,
        ),
    ] {
        let Some(text) = value else { continue };
        // KiB are read too, to say which whole MiB are nearest.
        let kib = text
            .strip_suffix("Ki")
            .and_then(|n| n.parse::<u64>().ok())
            .map(|n| n.saturating_mul(1024));
        let bytes = match kib.map_or_else(|| parse_size(text), Ok) {
            Ok(b) => b,
            Err(e) => {
                ctx.err(i, field, format!("{e} (a rate per second, e.g. 200Mi)"));
                continue;
            }
        };
        const MIB: u64 = 1 << 20;
        if bytes == 0 || bytes % MIB != 0 {
            let below = bytes / MIB;
            let nearest = if below == 0 {
                "1Mi".to_string()
            } else {
                format!("{below}Mi or {}Mi", below + 1)
            };
            ctx.err(
                i,
                field,
                format!(
                    "{text}/s is not a whole number of MiB/s: SPDK's bdev QoS takes bandwidth in MB (MiB) per second; use {nearest}"
                ),
            );
            continue;
        }
        let mib = bytes / MIB;
        if mib > protocol::dpu::QOS_MAX_MIB_PER_SEC {
            ctx.err(
                i,
                field,
                format!(
                    "{text}/s is above {}Mi/s",
                    protocol::dpu::QOS_MAX_MIB_PER_SEC
                ),
            );
            continue;
        }
        *slot = mib;
    }
    out
}

/// The schedule's bounds: not more often than every 10 s, at most 512 kept.
const MIN_EVERY_SECS: u64 = 10;
const MAX_KEEP: u32 = 512;

/// A volume's `spec.snapshots`: names on the allow-list, none the schedule's, none twice; the
/// schedule within its bounds.
fn resolve_snapshots(ctx: &mut Ctx<'_>, i: usize, x: &types::Snapshots) -> Option<VolumeSnapshots> {
    let before = ctx.errors.len();
    let mut names = Vec::with_capacity(x.names.len());
    for n in &x.names {
        let Some(name) = snap_name(ctx, i, "spec.snapshots.names", n) else {
            continue;
        };
        if n.starts_with(protocol::meta::SCHEDULED_PREFIX) {
            ctx.err(
                i,
                "spec.snapshots.names",
                format!(
                    "{n:?} starts with {:?}, which names the schedule's snapshots",
                    protocol::meta::SCHEDULED_PREFIX
                ),
            );
        } else if names.contains(&name) {
            ctx.err(i, "spec.snapshots.names", format!("{n:?} is listed twice"));
        } else {
            names.push(name);
        }
    }
    let schedule = x.schedule.as_ref().and_then(|s| {
        let every = humantime::parse_duration(&s.every)
            .map_err(|e| e.to_string())
            .and_then(|d| {
                if d.as_secs() < MIN_EVERY_SECS {
                    Err(format!("less than {MIN_EVERY_SECS}s"))
                } else if d.as_secs() > protocol::limits::MAX_RETENTION_SECS {
                    Err("more than 10 years".to_string())
                } else {
                    Ok(d.as_secs())
                }
            })
            .map_err(|e| {
                ctx.err(
                    i,
                    "spec.snapshots.schedule.every",
                    format!("{:?}: {e}", s.every),
                )
            })
            .ok();
        if !(1..=MAX_KEEP).contains(&s.keep) {
            ctx.err(
                i,
                "spec.snapshots.schedule.keep",
                format!("{}: keep 1-{MAX_KEEP} snapshots", s.keep),
            );
            return None;
        }
        Some((every?, s.keep))
    });
    if ctx.errors.len() > before {
        return None;
    }
    Some(VolumeSnapshots {
        names,
        schedule,
        delete: x.deletion_policy == types::SnapshotDeletion::Delete,
    })
}

/// A volume's `spec.rbd`: the cluster, a pool of it, the image (the volume's name unless set).
fn resolve_rbd<'d>(
    ctx: &mut Ctx<'_>,
    i: usize,
    o: &Object<VolumeSpec>,
    d: &'d Desired,
) -> (Option<&'d Cluster>, Option<PoolName>, Option<ImageName>) {
    let rbd = &o.spec.rbd;
    let cluster = d.clusters.get(&rbd.cluster);
    if cluster.is_none() {
        ctx.err(
            i,
            "spec.rbd.cluster",
            format!("no CephCluster named {:?}", rbd.cluster),
        );
    }
    let pool = cluster_pool(ctx, i, "spec.rbd.pool", &rbd.pool, cluster);
    let image_name = rbd.image.clone().unwrap_or_else(|| o.metadata.name.clone());
    let image = ImageName::parse("spec.rbd.image", &image_name)
        .map_err(|e| ctx.name_err(i, "spec.rbd.image", e))
        .ok();
    (cluster, pool, image)
}

/// A volume's NVMe placement against its DPU: the PF and VF exist, the NSID and UUID are valid.
fn check_nvme(ctx: &mut Ctx<'_>, i: usize, nvme: &types::NvmePlacement, dpu: Option<&Dpu>) {
    if let Some(dpu) = dpu {
        let fw = &dpu.snap.firmware;
        if nvme.pf >= fw.nvme_pfs {
            ctx.err(
                i,
                "spec.nvme.pf",
                format!(
                    "PF {} but DPU {} exposes {} PF(s)",
                    nvme.pf, dpu.name, fw.nvme_pfs
                ),
            );
        }
        if let Some(vf) = nvme.vf {
            if vf >= fw.nvme_vfs {
                ctx.err(
                    i,
                    "spec.nvme.vf",
                    format!(
                        "VF {vf} but DPU {} exposes {} VF(s) per PF",
                        dpu.name, fw.nvme_vfs
                    ),
                );
            }
        }
    }
    if let Some(n) = nvme.nsid {
        if !(1..=1024).contains(&n) {
            ctx.err(i, "spec.nvme.nsid", format!("NSID {n} is not 1-1024"));
        }
    }
    if let Some(u) = &nvme.uuid {
        if let Err(e) = check_uuid("spec.nvme.uuid", u) {
            ctx.name_err(i, "spec.nvme.uuid", e);
        }
    }
}
