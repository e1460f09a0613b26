//! The planner: a pure function of (desired, observed) to a plan. No I/O, no clock, no
//! randomness: the same inputs give the same plan, byte for byte.
//!
//! Per volume the chain is: SNAP installed -> rbd image -> cluster registered in SNAP -> bdev ->
//! subsystem -> namespace -> controller (created suspended) -> namespace attached -> controller
//! resumed. Teardown runs in reverse. Existing matching objects are adopted, never duplicated.
//! Only objects unistor owns are ever removed: images carrying `unistor.managed-by`, SNAP objects
//! named by unistor's convention (see [`names`]).

pub mod model;
pub mod sim;

use std::collections::{BTreeMap, BTreeSet};

/// Fast, deterministic hashing for the planner's internal lookups (keys are our own names).
type HashMap<K, V> = rustc_hash::FxHashMap<K, V>;

use protocol::dpu::{DpuReport, FunctionRef, SnapInventory, SnapState};
use protocol::{CephReport, ImageState, ImageStatus};

use crate::manifest::{Desired, Volume};
pub use model::*;

/// Names of the SNAP objects unistor makes; anything else on a DPU is never touched.
pub mod names {
    use protocol::dpu::FunctionRef;

    /// Prefix of every NQN unistor creates.
    pub const NQN_PREFIX: &str = "nqn.2024-01.io.unistor:";
    /// Prefix of bdevs, controllers and SNAP cluster names unistor creates.
    pub const PREFIX: &str = "unistor-";

    /// The subsystem of one function of one DPU.
    pub fn nqn(dpu: &str, f: FunctionRef) -> String {
        format!("{NQN_PREFIX}{}:{f}", dpu.to_ascii_lowercase())
    }
    /// The controller of one function.
    pub fn controller(f: FunctionRef) -> String {
        format!("{PREFIX}{f}")
    }
    /// The bdev of a volume.
    pub fn bdev(volume: &str) -> String {
        format!("{PREFIX}{volume}")
    }
    /// SNAP's name for a Ceph cluster.
    pub fn cluster(cluster: &str) -> String {
        format!("{PREFIX}{cluster}")
    }
    /// The name a unistor SNAP object was made from (`unistor-db` -> `db`), if it is one.
    pub fn unprefixed(name: &str) -> Option<&str> {
        name.strip_prefix(PREFIX)
    }
    /// Whether a SNAP object name is unistor's.
    pub fn owned(name: &str) -> bool {
        name.starts_with(PREFIX) || name.starts_with(NQN_PREFIX)
    }
}

/// Knobs of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Value of `unistor.managed-by` on images this deployment owns.
    pub owner: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            owner: "unistor".into(),
        }
    }
}

/// Metadata keys unistor reads on images.
pub const META_MANAGED_BY: &str = "unistor.managed-by";
/// The volume an image backs.
pub const META_VOLUME: &str = "unistor.volume";
/// What removal does (`Retain`, `Trash`, `Delete`); absent means `Retain`.
pub const META_POLICY: &str = "unistor.deletion-policy";
/// Trash retention in seconds.
pub const META_RETENTION: &str = "unistor.trash-retention-secs";

struct Builder {
    plan: Plan,
}

impl Builder {
    fn push(
        &mut self,
        target: Target,
        action: Action,
        risk: Risk,
        deps: &[Option<usize>],
        volume: Option<&str>,
    ) -> usize {
        let id = self.plan.steps.len();
        let mut depends_on: Vec<usize> = deps.iter().flatten().copied().collect();
        depends_on.sort_unstable();
        depends_on.dedup();
        self.plan.steps.push(Step {
            id,
            target,
            action,
            risk,
            depends_on,
            volume: volume.map(str::to_string),
        });
        id
    }

    fn drift(&mut self, object: String, field: &str, desired: String, observed: String) {
        self.plan.drift.push(Drift {
            object,
            field: field.into(),
            desired,
            observed,
        });
    }

    fn block(&mut self, object: String, reason: String) {
        self.plan.blocked.push(Blocked { object, reason });
    }
}

/// FNV-1a: a stable hash (the same on every machine and release) for derived NSIDs, NVMe
/// serials and plan fingerprints.
pub fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Where every wanted volume goes, resolved before planning: its subsystem and NSID, by the
/// volume's position in `desired.volumes` (name order), and the volumes of each DPU. Vectors
/// indexed by position instead of maps keyed by name: planning 80k volumes is bound by memory
/// lookups, and these are the hot ones.
struct Placement<'a> {
    volumes: Vec<&'a Volume>,
    nqn: Vec<String>,
    nsid: Vec<u32>,
    by_name: HashMap<&'a str, usize>,
    /// DPU name -> its volumes (positions, in name order); sorted by DPU name.
    by_dpu: Vec<(&'a str, Vec<usize>)>,
}

impl Placement<'_> {
    /// Whether unistor's bdev `bdev` is wanted on `dpu` (as `nqn`/`nsid` when given).
    fn wants(&self, bdev: &str, dpu: &str, at: Option<(&str, u32)>) -> bool {
        names::unprefixed(bdev)
            .and_then(|v| self.by_name.get(v))
            .is_some_and(|&i| {
                self.volumes[i].dpu == dpu
                    && at.is_none_or(|(nqn, nsid)| self.nqn[i] == nqn && self.nsid[i] == nsid)
            })
    }
}

/// Resolves every volume's NSID: pinned; else the NSID SNAP already gives its UUID; else derived
/// from its name (probing upwards past taken NSIDs). Volumes are visited in name order.
fn place<'a>(desired: &'a Desired, reports: &HashMap<&str, &DpuReport>) -> Placement<'a> {
    let volumes: Vec<&Volume> = desired.volumes.values().collect();
    let nqn: Vec<String> = volumes
        .iter()
        .map(|v| names::nqn(&v.dpu, v.function))
        .collect();
    let by_name = volumes
        .iter()
        .enumerate()
        .map(|(i, v)| (v.name.as_str(), i))
        .collect();
    let mut groups: HashMap<&str, Vec<usize>> = HashMap::default();
    for (i, v) in volumes.iter().enumerate() {
        groups.entry(v.dpu.as_str()).or_default().push(i);
    }
    let mut by_dpu: Vec<(&str, Vec<usize>)> = groups.into_iter().collect();
    by_dpu.sort_unstable_by(|a, b| a.0.cmp(b.0));

    let mut nsid = vec![0; volumes.len()];
    for (dpu, idxs) in &by_dpu {
        let inv = reports.get(dpu).and_then(|r| r.inventory.as_ref());
        // NSIDs taken per function (= per subsystem) of this DPU.
        let mut taken: HashMap<FunctionRef, BTreeSet<u32>> = HashMap::default();
        for &i in idxs {
            if let Some(n) = volumes[i].nsid {
                taken.entry(volumes[i].function).or_default().insert(n);
                nsid[i] = n;
            }
        }
        for &i in idxs.iter().filter(|&&i| volumes[i].nsid.is_none()) {
            let v = volumes[i];
            let sub = inv.and_then(|inv| inv.subsystems.iter().find(|s| s.nqn == nqn[i]));
            let existing = sub.and_then(|s| {
                s.namespaces
                    .iter()
                    .find(|n| n.uuid.eq_ignore_ascii_case(&v.uuid))
                    .map(|n| n.nsid)
            });
            let used = taken.entry(v.function).or_default();
            let n = match existing.filter(|n| !used.contains(n)) {
                Some(n) => n,
                None => {
                    let foreign =
                        |n: u32| sub.is_some_and(|s| s.namespaces.iter().any(|x| x.nsid == n));
                    let start = (fnv(v.name.as_str()) % 1024) as u32;
                    (0..1024)
                        .map(|k| (start + k) % 1024 + 1)
                        .find(|n| !used.contains(n) && !foreign(*n))
                        .unwrap_or(1)
                }
            };
            used.insert(n);
            nsid[i] = n;
        }
    }
    Placement {
        volumes,
        nqn,
        nsid,
        by_name,
        by_dpu,
    }
}

/// Computes the plan.
pub fn plan(desired: &Desired, observed: &Observed, opts: &Options) -> Plan {
    let mut b = Builder {
        plan: Plan::default(),
    };
    for (name, k) in &observed.clusters {
        if let Known::Unknown { reason } = k {
            b.plan.unknown.push(format!("cluster/{name}: {reason}"));
        }
    }
    for (name, k) in &observed.dpus {
        if let Known::Unknown { reason } = k {
            b.plan.unknown.push(format!("dpu/{name}: {reason}"));
        }
    }
    for name in desired.clusters.keys() {
        if !observed.clusters.contains_key(name) {
            b.plan.unknown.push(format!("cluster/{name}: not observed"));
        }
    }
    for name in desired.dpus.keys() {
        if !observed.dpus.contains_key(name) {
            b.plan.unknown.push(format!("dpu/{name}: not observed"));
        }
    }
    // Reports by DPU, looked up once per DPU (hashing beats comparing long shared prefixes).
    let reports: HashMap<&str, &DpuReport> = observed
        .dpus
        .iter()
        .filter_map(|(n, k)| Some((n.as_str(), k.get()?)))
        .collect();
    let placement = place(desired, &reports);
    let images = index_images(observed);

    // Removals first; what is created on a DPU waits for what is removed there (a moved volume's
    // bdev or function is freed before it is used again).
    let removed_on = teardown(&mut b, observed, opts, &placement, &images);
    let after_removals = |dpu: &str| -> Vec<Option<usize>> {
        removed_on
            .get(dpu)
            .into_iter()
            .flatten()
            .map(|s| Some(*s))
            .collect()
    };

    // SNAP on every DPU. Per DPU: what every step there waits for (its removals, then SNAP).
    let mut first_on: HashMap<&str, (Option<usize>, Vec<Option<usize>>)> = HashMap::default();
    for (name, dpu) in &desired.dpus {
        let Some(report) = reports.get(name.as_str()) else {
            continue;
        };
        let mut first = after_removals(name);
        let want = format!("{}:{}", dpu.snap.image, dpu.snap.tag);
        let have = report.snap.image.clone();
        let running = report.snap.state == SnapState::Running;
        let step = if have.as_deref() != Some(want.as_str()) || !running {
            if let Some(h) = &have {
                b.drift(
                    format!("dpu/{name}"),
                    "snap.version",
                    want.clone(),
                    h.clone(),
                );
            }
            // Replacing a running SNAP restarts every controller on it.
            let risk = if running
                && report
                    .inventory
                    .as_ref()
                    .is_some_and(|i| !i.controllers.is_empty())
            {
                Risk::HostVisible
            } else {
                Risk::Safe
            };
            Some(b.push(
                Target::Dpu(name.clone()),
                Action::InstallSnap {
                    spec: Box::new(dpu.snap.clone()),
                },
                risk,
                &first,
                None,
            ))
        } else {
            None
        };
        first.push(step);
        first_on.insert(name.as_str(), (step, first));
    }
    let no_deps = (None, Vec::new());
    // Controller names by function: a handful, formatted once.
    let mut ctrl_names: HashMap<FunctionRef, String> = HashMap::default();

    // DPU by DPU (in name order), each DPU's volumes in name order, then its resumes.
    for (dpu_name, idxs) in &placement.by_dpu {
        let dpu = reports.get(dpu_name).copied();
        let (snap, first) = first_on.get(dpu_name).unwrap_or(&no_deps);
        let (snap, first) = (*snap, first.as_slice());
        // What this DPU gets, by cluster or function.
        let mut registered: HashMap<&str, Option<usize>> = HashMap::default();
        let mut subsystems: HashMap<FunctionRef, Option<usize>> = HashMap::default();
        let mut controllers: HashMap<FunctionRef, Option<usize>> = HashMap::default();
        let mut attaches: HashMap<FunctionRef, Vec<usize>> = HashMap::default();
        let mut resume_needed: BTreeSet<FunctionRef> = BTreeSet::new();
        for &i in idxs {
            let v = placement.volumes[i];
            let vname = v.name.as_str();
            let object = || format!("volume/{vname}");
            let cluster = observed.clusters.get(&v.cluster).and_then(Known::get);
            let (Some(_), Some(dpu_report)) = (cluster, dpu) else {
                b.block(
                    object(),
                    format!(
                        "waiting for {}: its state is unknown",
                        if cluster.is_none() {
                            format!("cluster/{}", v.cluster)
                        } else {
                            format!("dpu/{}", v.dpu)
                        }
                    ),
                );
                continue;
            };
            // The image.
            let ceph = || Target::Cluster(v.cluster.clone());
            let img = images
                .get(v.cluster.as_str())
                .and_then(|m| m.get(&(v.pool.as_str(), v.image.as_str())))
                .copied();
            let policy = v.deletion_policy.as_str();
            let retain_secs = v.trash_retention.as_secs();
            let create = || Action::CreateImage {
                pool: v.pool.to_string(),
                image: v.image.to_string(),
                size_bytes: v.size_bytes,
                volume: vname.into(),
                policy: policy.into(),
                retain_secs,
            };
            let image_step = match img.map(|i| (&i.state, i)) {
                None | Some((ImageState::Missing, _)) => {
                    Some(b.push(ceph(), create(), Risk::Safe, &[], Some(vname)))
                }
                Some((ImageState::Trashed { .. }, _)) => {
                    b.drift(object(), "rbd.state", "live".into(), "trashed".into());
                    Some(b.push(
                        ceph(),
                        Action::RestoreImage {
                            pool: v.pool.to_string(),
                            image: v.image.to_string(),
                        },
                        Risk::Safe,
                        &[],
                        Some(vname),
                    ))
                }
                Some((ImageState::Live, i)) => {
                    let owner = i.metadata.get(META_MANAGED_BY).map(String::as_str);
                    let owned_by = i.metadata.get(META_VOLUME).map(String::as_str);
                    if owner != Some(opts.owner.as_str()) || owned_by != Some(vname) {
                        b.block(
                            object(),
                            format!(
                                "image {}/{} belongs to {}/{}, not to this volume",
                                v.pool,
                                v.image,
                                owner.unwrap_or("-"),
                                owned_by.unwrap_or("-")
                            ),
                        );
                        continue;
                    }
                    let have_policy = i
                        .metadata
                        .get(META_POLICY)
                        .map(String::as_str)
                        .unwrap_or("Retain");
                    let have_retention =
                        i.metadata.get(META_RETENTION).and_then(|r| r.parse().ok());
                    if have_policy != policy || have_retention != Some(retain_secs) {
                        b.drift(
                            object(),
                            "deletionPolicy",
                            format!("{policy}/{retain_secs}s"),
                            format!("{have_policy}/{}s", have_retention.unwrap_or(0)),
                        );
                        // The create command is idempotent and rewrites the policy.
                        if i.size_bytes == v.size_bytes {
                            b.push(ceph(), create(), Risk::Safe, &[], Some(vname));
                        }
                    }
                    if i.size_bytes < v.size_bytes {
                        b.drift(
                            object(),
                            "size",
                            v.size_bytes.to_string(),
                            i.size_bytes.to_string(),
                        );
                        Some(b.push(
                            ceph(),
                            Action::GrowImage {
                                pool: v.pool.to_string(),
                                image: v.image.to_string(),
                                from_bytes: i.size_bytes,
                                to_bytes: v.size_bytes,
                                volume: vname.into(),
                            },
                            Risk::Safe,
                            &[],
                            Some(vname),
                        ))
                    } else if i.size_bytes > v.size_bytes {
                        b.drift(
                            object(),
                            "size",
                            v.size_bytes.to_string(),
                            i.size_bytes.to_string(),
                        );
                        b.block(
                        object(),
                        format!(
                            "shrinking from {} to {} bytes is refused: grow the manifest back or move the data",
                            i.size_bytes, v.size_bytes
                        ),
                    );
                        None
                    } else {
                        None
                    }
                }
            };

            // The SNAP chain on the DPU.
            let d = || Target::Dpu(v.dpu.clone());
            let empty = SnapInventory::default();
            let inv = match (snap, dpu_report.inventory.as_ref()) {
                (None, Some(inv)) => inv,
                // SNAP is being (re)installed: plan against an empty SNAP.
                _ => &empty,
            };
            let reg = *registered.entry(v.cluster.as_str()).or_insert_with(|| {
                let registered = inv
                    .clusters
                    .iter()
                    .any(|c| names::unprefixed(c) == Some(v.cluster.as_str()));
                (!registered).then(|| {
                    b.push(
                        d(),
                        Action::RegisterCluster {
                            name: names::cluster(&v.cluster),
                            cluster: v.cluster.clone(),
                        },
                        Risk::Safe,
                        first,
                        None,
                    )
                })
            });
            let is_bdev = |name: &str| names::unprefixed(name) == Some(vname);
            let bdev_step = match inv.bdevs.iter().find(|x| is_bdev(&x.name)) {
                Some(x)
                    if x.pool.as_deref() == Some(v.pool.as_str())
                        && x.image.as_deref() == Some(v.image.as_str()) =>
                {
                    // The host sees the bdev's size: a grown image is not grown for the host
                    // until the bdev follows (SPDK's update watch does; `bdev_rbd_resize` makes
                    // sure, in MiB).
                    let host_bytes = x.num_blocks * u64::from(x.block_size);
                    if host_bytes < v.size_bytes {
                        b.drift(
                            object(),
                            "bdev.size",
                            v.size_bytes.to_string(),
                            host_bytes.to_string(),
                        );
                        if v.size_bytes.is_multiple_of(1 << 20) {
                            b.push(
                                d(),
                                Action::ResizeBdev {
                                    name: x.name.clone(),
                                    new_size_mib: v.size_bytes >> 20,
                                },
                                Risk::HostVisible,
                                &[first, &[image_step]].concat(),
                                Some(vname),
                            );
                        } else {
                            b.block(
                                object(),
                                format!(
                                    "bdev {} shows the host {host_bytes} bytes; {} bytes is not a whole MiB, which SNAP's bdev_rbd_resize needs",
                                    x.name, v.size_bytes
                                ),
                            );
                        }
                    }
                    None
                }
                Some(x) => {
                    b.block(
                        object(),
                        format!(
                            "bdev {} on dpu/{} serves {}/{}",
                            x.name,
                            v.dpu,
                            x.pool.as_deref().unwrap_or("?"),
                            x.image.as_deref().unwrap_or("?")
                        ),
                    );
                    continue;
                }
                None => Some(b.push(
                    d(),
                    Action::CreateBdev {
                        name: names::bdev(vname),
                        cluster: names::cluster(&v.cluster),
                        pool: v.pool.to_string(),
                        image: v.image.to_string(),
                    },
                    Risk::Safe,
                    &[first, &[reg, image_step]].concat(),
                    Some(vname),
                )),
            };
            let nqn = &placement.nqn[i];
            let sub = *subsystems.entry(v.function).or_insert_with(|| {
                (!inv.subsystems.iter().any(|s| s.nqn == *nqn)).then(|| {
                    b.push(
                        d(),
                        Action::CreateSubsystem { nqn: nqn.clone() },
                        Risk::Safe,
                        first,
                        None,
                    )
                })
            });
            let nsid = placement.nsid[i];
            let have_ns = inv
                .subsystems
                .iter()
                .find(|s| s.nqn == *nqn)
                .and_then(|s| s.namespaces.iter().find(|n| n.nsid == nsid));
            let ns_step = match have_ns {
                Some(n) if is_bdev(&n.bdev) && n.uuid.eq_ignore_ascii_case(&v.uuid) => None,
                Some(n) => {
                    b.block(
                        object(),
                        format!(
                            "NSID {nsid} of {nqn} is taken by bdev {} (uuid {})",
                            n.bdev, n.uuid
                        ),
                    );
                    continue;
                }
                None => Some(b.push(
                    d(),
                    Action::CreateNamespace {
                        nqn: nqn.clone(),
                        nsid,
                        bdev: names::bdev(vname),
                        uuid: v.uuid.clone(),
                    },
                    Risk::Safe,
                    &[first, &[sub, bdev_step]].concat(),
                    Some(vname),
                )),
            };
            let ctrl = ctrl_names
                .entry(v.function)
                .or_insert_with(|| names::controller(v.function))
                .as_str();
            let f = inv.functions.iter().find(|f| f.function == v.function);
            if let Some(other) = f
                .and_then(|f| f.controller.as_ref())
                .filter(|c| c.as_str() != ctrl)
            {
                b.block(
                    object(),
                    format!(
                        "function {} of dpu/{} is bound to controller {other}, not unistor's",
                        v.function, v.dpu
                    ),
                );
                continue;
            }
            let have_ctrl = inv.controllers.iter().find(|c| c.name == ctrl);
            if let Some(c) = have_ctrl {
                if c.num_queues != v.queues {
                    b.drift(
                        object(),
                        "queues",
                        v.queues.to_string(),
                        c.num_queues.to_string(),
                    );
                }
            }
            let ctrl_step = *controllers.entry(v.function).or_insert_with(|| {
                have_ctrl.is_none().then(|| {
                    b.push(
                        d(),
                        Action::CreateController {
                            name: ctrl.into(),
                            nqn: nqn.clone(),
                            function: v.function,
                            queues: v.queues,
                        },
                        Risk::Safe,
                        &[first, &[sub]].concat(),
                        None,
                    )
                })
            });
            let attached = have_ctrl.is_some_and(|c| c.namespaces.contains(&nsid));
            if !attached {
                let a = b.push(
                    d(),
                    Action::Attach {
                        controller: ctrl.into(),
                        nsid,
                    },
                    Risk::Safe,
                    &[ctrl_step, ns_step],
                    Some(vname),
                );
                attaches.entry(v.function).or_default().push(a);
                resume_needed.insert(v.function);
            }
            if !have_ctrl.is_some_and(|c| c.state.eq_ignore_ascii_case("STARTED")) {
                resume_needed.insert(v.function);
            }
        }
        // Controllers resume after all their namespaces are attached.
        for key in resume_needed {
            let deps: Vec<Option<usize>> = attaches
                .get(&key)
                .into_iter()
                .flatten()
                .map(|a| Some(*a))
                .chain(std::iter::once(controllers.get(&key).copied().flatten()))
                .collect();
            b.push(
                Target::Dpu(dpu_name.to_string()),
                Action::Resume {
                    controller: names::controller(key),
                },
                Risk::Safe,
                &deps,
                None,
            );
        }
    }

    b.plan
}

/// Images of every known cluster by (pool, image): one lookup per volume, not one scan.
fn index_images(observed: &Observed) -> ImageIndex<'_> {
    observed
        .clusters
        .iter()
        .filter_map(|(name, k)| {
            let r: &CephReport = k.get()?;
            let m = r
                .images
                .iter()
                .map(|i| ((i.pool.as_str(), i.image.as_str()), i))
                .collect();
            Some((name.as_str(), m))
        })
        .collect()
}

type ImageIndex<'a> = BTreeMap<&'a str, HashMap<(&'a str, &'a str), &'a ImageStatus>>;

/// Removes what unistor owns and the manifests no longer want (or want elsewhere), in reverse
/// order. Returns the removal steps per DPU.
fn teardown(
    b: &mut Builder,
    observed: &Observed,
    opts: &Options,
    placement: &Placement<'_>,
    images: &ImageIndex<'_>,
) -> BTreeMap<String, Vec<usize>> {
    let mut removed_on: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut nqns_on: HashMap<&str, rustc_hash::FxHashSet<&str>> = HashMap::default();
    for (dpu, idxs) in &placement.by_dpu {
        nqns_on.insert(
            dpu,
            idxs.iter().map(|&i| placement.nqn[i].as_str()).collect(),
        );
    }

    // Per DPU: namespaces whose bdev is unistor's and no longer wanted.
    let mut detach_of_volume: HashMap<String, Vec<usize>> = HashMap::default();
    for (dpu_name, k) in &observed.dpus {
        let Some(DpuReport {
            inventory: Some(inv),
            ..
        }) = k.get()
        else {
            continue;
        };
        let d = Target::Dpu(dpu_name.clone());
        let first_step = b.plan.steps.len();
        let mut destroyed_ns: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut ns_removed: BTreeMap<String, usize> = BTreeMap::new();
        // Subsystems that keep a namespace (wanted, or not ours): they and their controllers stay.
        let mut kept: BTreeSet<&str> = BTreeSet::new();
        // A bdev unistor's name is ours only when its image says so: two deployments (owners)
        // may share a DPU, and neither may tear down the other's volumes.
        let ours = |bdev: &str| -> Result<bool, String> {
            let x = inv
                .bdevs
                .iter()
                .find(|x| x.name == bdev)
                .ok_or_else(|| "SNAP does not list it".to_string())?;
            let (Some(cluster), Some(pool), Some(image)) = (
                x.cluster.as_deref().and_then(names::unprefixed),
                x.pool.as_deref(),
                x.image.as_deref(),
            ) else {
                return Err("it names no unistor cluster, pool and image".into());
            };
            let index = images
                .get(cluster)
                .ok_or_else(|| format!("cluster {cluster} is not reporting"))?;
            let img = index
                .get(&(pool, image))
                .filter(|i| i.state == ImageState::Live)
                .ok_or_else(|| format!("its image {pool}/{image} is not live"))?;
            Ok(img.metadata.get(META_MANAGED_BY) == Some(&opts.owner))
        };
        for s in inv.subsystems.iter().filter(|s| names::owned(&s.nqn)) {
            for n in &s.namespaces {
                if !names::owned(&n.bdev)
                    || placement.wants(&n.bdev, dpu_name, Some((&s.nqn, n.nsid)))
                    || ours(&n.bdev) != Ok(true)
                {
                    kept.insert(&s.nqn);
                    continue;
                }
                let volume = n.bdev.trim_start_matches(names::PREFIX).to_string();
                let detach = n.controller.as_ref().map(|c| {
                    b.push(
                        d.clone(),
                        Action::Detach {
                            controller: c.clone(),
                            nsid: n.nsid,
                        },
                        Risk::HostVisible,
                        &[],
                        Some(&volume),
                    )
                });
                let destroy = b.push(
                    d.clone(),
                    Action::DestroyNamespace {
                        nqn: s.nqn.clone(),
                        nsid: n.nsid,
                    },
                    Risk::HostVisible,
                    &[detach],
                    Some(&volume),
                );
                destroyed_ns.entry(s.nqn.clone()).or_default().push(destroy);
                ns_removed.insert(n.bdev.clone(), destroy);
                detach_of_volume.entry(volume).or_default().push(destroy);
            }
        }
        // Controllers and subsystems left with nothing wanted.
        let none = rustc_hash::FxHashSet::default();
        let wanted_nqns = nqns_on.get(dpu_name.as_str()).unwrap_or(&none);
        for c in inv.controllers.iter().filter(|c| names::owned(&c.name)) {
            if wanted_nqns.contains(c.nqn.as_str()) || kept.contains(c.nqn.as_str()) {
                continue;
            }
            let deps: Vec<Option<usize>> = destroyed_ns
                .get(&c.nqn)
                .into_iter()
                .flatten()
                .map(|i| Some(*i))
                .collect();
            let step = b.push(
                d.clone(),
                Action::DestroyController {
                    name: c.name.clone(),
                },
                Risk::HostVisible,
                &deps,
                None,
            );
            destroyed_ns.entry(c.nqn.clone()).or_default().push(step);
        }
        for s in inv.subsystems.iter().filter(|s| names::owned(&s.nqn)) {
            if wanted_nqns.contains(s.nqn.as_str()) || kept.contains(s.nqn.as_str()) {
                continue;
            }
            let deps: Vec<Option<usize>> = destroyed_ns
                .get(&s.nqn)
                .into_iter()
                .flatten()
                .map(|i| Some(*i))
                .collect();
            b.push(
                d.clone(),
                Action::DestroySubsystem { nqn: s.nqn.clone() },
                Risk::Safe,
                &deps,
                None,
            );
        }
        for x in inv.bdevs.iter().filter(|x| names::owned(&x.name)) {
            if placement.wants(&x.name, dpu_name, None) {
                continue;
            }
            match ours(&x.name) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(why) => {
                    b.block(
                        format!("dpu/{dpu_name}"),
                        format!(
                            "leaving bdev {} in place: {why}, so its owner cannot be confirmed",
                            x.name
                        ),
                    );
                    continue;
                }
            }
            let dep = ns_removed.get(&x.name).copied();
            let volume = x.name.trim_start_matches(names::PREFIX).to_string();
            let step = b.push(
                d.clone(),
                Action::DeleteBdev {
                    name: x.name.clone(),
                },
                Risk::Safe,
                &[dep],
                Some(&volume),
            );
            detach_of_volume.entry(volume).or_default().push(step);
        }
        let steps: Vec<usize> = (first_step..b.plan.steps.len()).collect();
        if !steps.is_empty() {
            removed_on.insert(dpu_name.clone(), steps);
        }
    }
    // Images of volumes that are gone, by the policy written on them.
    for (cname, k) in &observed.clusters {
        let Some(report) = k.get() else { continue };
        for i in &report.images {
            if i.state != ImageState::Live || i.metadata.get(META_MANAGED_BY) != Some(&opts.owner) {
                continue;
            }
            let Some(volume) = i.metadata.get(META_VOLUME) else {
                continue;
            };
            if placement.by_name.contains_key(volume.as_str()) {
                continue;
            }
            let deps: Vec<Option<usize>> = detach_of_volume
                .get(volume)
                .into_iter()
                .flatten()
                .map(|s| Some(*s))
                .collect();
            let policy = i
                .metadata
                .get(META_POLICY)
                .map(String::as_str)
                .unwrap_or("Retain");
            let target = Target::Cluster(cname.clone());
            match policy {
                "Trash" => {
                    let retain_secs = i
                        .metadata
                        .get(META_RETENTION)
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(7 * 86400);
                    b.push(
                        target,
                        Action::TrashImage {
                            pool: i.pool.clone(),
                            image: i.image.clone(),
                            retain_secs,
                            volume: volume.clone(),
                        },
                        Risk::DataDestroying,
                        &deps,
                        Some(volume),
                    );
                }
                "Delete" => {
                    b.push(
                        target,
                        Action::DeleteImage {
                            pool: i.pool.clone(),
                            image: i.image.clone(),
                            volume: volume.clone(),
                        },
                        Risk::DataDestroying,
                        &deps,
                        Some(volume),
                    );
                }
                // Retain: the image stays, only the volume's SNAP objects go.
                _ => {}
            }
        }
    }
    removed_on
}

#[cfg(test)]
mod tests;
