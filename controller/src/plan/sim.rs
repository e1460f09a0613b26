//! An in-memory model of the agents: applies plan steps to reports as the agents would, and
//! refuses what they would refuse. Used by the planner's tests and the planning benchmark, and
//! usable as a dry run.

use std::collections::BTreeMap;

use protocol::dpu::{
    BdevInfo, BdevResize, ControllerInfo, DpuReport, FunctionInfo, FunctionRef, HostFacts, NameRef,
    NamespaceInfo, NamespaceRef, NqnRef, SnapInventory, SnapState, SnapStatus, SubsystemInfo,
};
use protocol::{Capacity, CephHealth, CephReport, Command, ImageState, ImageStatus};

use super::*;

/// The agents' world, as reports.
#[derive(Debug, Clone, PartialEq)]
pub struct World {
    /// Clusters.
    pub clusters: BTreeMap<String, CephReport>,
    /// DPUs.
    pub dpus: BTreeMap<String, DpuReport>,
    /// Where each image was put in its cluster's list, by cluster (a hint: checked before use).
    at: BTreeMap<String, ImagesAt>,
}

/// One cluster's images by (pool, name), and the list's length when indexed.
#[derive(Debug, Default, Clone)]
struct ImagesAt {
    at: std::collections::HashMap<(String, String), usize>,
    len: usize,
}

/// A cache: two worlds are equal by what they hold, whatever each has indexed.
impl PartialEq for ImagesAt {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

fn empty_ceph() -> CephReport {
    CephReport {
        fsid: "f".into(),
        health: CephHealth {
            status: "HEALTH_OK".into(),
            checks: Default::default(),
        },
        monitors: vec![],
        capacity: Capacity {
            total_bytes: 1,
            used_bytes: 0,
            avail_bytes: 1,
        },
        pools: vec![],
        images: vec![],
        fences: vec![],
    }
}

/// A DPU report of nothing: SNAP not installed, no objects.
pub fn bare_dpu() -> DpuReport {
    DpuReport {
        platform: "simulation".into(),
        host: HostFacts::default(),
        bluefield: None,
        snap: SnapStatus {
            state: SnapState::NotInstalled,
            version: None,
            image: None,
            restarts: 0,
        },
        inventory: None,
        missing: vec![],
        ledger_generation: 0,
        last_replay: None,
        host_use: None,
        order: Default::default(),
    }
}

impl World {
    /// Every cluster and DPU of `d`, reachable and empty.
    pub fn empty(d: &Desired) -> Self {
        Self {
            clusters: d
                .clusters
                .keys()
                .map(|k| (k.clone(), empty_ceph()))
                .collect(),
            dpus: d.dpus.keys().map(|k| (k.clone(), bare_dpu())).collect(),
            at: Default::default(),
        }
    }

    /// The world as the planner sees it.
    pub fn observed(&self) -> Observed {
        fn known<T: Clone>(m: &BTreeMap<String, T>) -> BTreeMap<String, Known<T>> {
            m.iter()
                .map(|(k, v)| {
                    let report = std::sync::Arc::new(v.clone());
                    (k.clone(), Known::Known { report })
                })
                .collect()
        }
        Observed {
            clusters: known(&self.clusters),
            dpus: known(&self.dpus),
        }
    }

    /// A DPU's SNAP inventory.
    pub fn inv(&mut self, dpu: &str) -> &mut SnapInventory {
        self.dpus
            .get_mut(dpu)
            .unwrap()
            .inventory
            .as_mut()
            .expect("SNAP installed before it is used")
    }

    /// Applies a step as the agents would; panics on a step an agent would refuse. Images
    /// made or adopted must carry `owner`.
    pub fn apply(&mut self, step: &Step, owner: &str) {
        let cmd = match (&step.target, &step.action) {
            (Target::Dpu(d), Action::RegisterCluster { name, .. }) => {
                let inv = self.inv(d);
                assert!(!inv.clusters.contains(name));
                inv.clusters.push(name.clone());
                return;
            }
            (_, a) => a.command().expect("a command"),
        };
        match (&step.target, &cmd) {
            (Target::Dpu(d), Command::InstallSnap(spec)) => self.install_snap(d, spec),
            (Target::Dpu(d), c) => self.apply_snap(d, c),
            (Target::Cluster(c), cmd) => self.apply_ceph(c, cmd, owner),
        }
    }

    fn install_snap(&mut self, d: &str, spec: &protocol::dpu::SnapSpec) {
        let r = self.dpus.get_mut(d).unwrap();
        r.snap.state = SnapState::Running;
        r.snap.image = Some(format!("{}:{}", spec.image, spec.tag));
        let mut functions = vec![];
        for pf in 0..spec.firmware.nvme_pfs {
            for vf in std::iter::once(None).chain((0..spec.firmware.nvme_vfs).map(Some)) {
                functions.push(FunctionInfo {
                    function: FunctionRef { pf, vf },
                    pci_bdf: format!("{pf}:{vf:?}"),
                    vhca_id: 0,
                    vuid: String::new(),
                    controller: None,
                });
            }
        }
        r.inventory = Some(SnapInventory {
            functions,
            ..Default::default()
        });
    }

    /// A ceph-agent's command.
    fn apply_ceph(&mut self, c: &str, cmd: &Command, owner: &str) {
        let keys = |o: &protocol::Ownership, p: &Option<protocol::ImagePolicy>| {
            assert_eq!(o.managed_by, owner, "images carry this deployment's owner");
            let p = p.as_ref().expect("a policy is always written");
            [
                (META_MANAGED_BY.to_string(), o.managed_by.clone()),
                (META_VOLUME.to_string(), o.volume.clone()),
                (META_POLICY.to_string(), p.deletion.to_string()),
                (
                    META_RETENTION.to_string(),
                    p.trash_retention_secs.to_string(),
                ),
            ]
        };
        match cmd {
            Command::CreateImage(x) => {
                let meta = keys(&x.owner, &x.policy);
                if let Some(i) = self.find(c, &x.pool, &x.image) {
                    assert_eq!(
                        i.size_bytes, x.size_bytes,
                        "an existing image only gets its policy"
                    );
                    for (k, v) in meta.into_iter().skip(2) {
                        i.metadata.insert(k, v);
                    }
                    return;
                }
                let r = self.clusters.get_mut(c).unwrap();
                let index = self.at.entry(c.to_string()).or_default();
                if index.len == r.images.len() {
                    index
                        .at
                        .insert((x.pool.clone(), x.image.clone()), r.images.len());
                    index.len += 1;
                }
                r.images.push(ImageStatus {
                    pool: x.pool.clone(),
                    image: x.image.clone(),
                    state: ImageState::Live,
                    size_bytes: x.size_bytes,
                    features: vec![],
                    watchers: None,
                    metadata: meta.into(),
                    unverified: false,
                    parent: x.clone_from.as_ref().map(ToString::to_string),
                    clone_depth: x.clone_from.as_ref().map(|_| 1),
                    snapshots: vec![],
                });
            }
            Command::AdoptImage(x) => {
                let meta = keys(&x.owner, &x.policy);
                let i = self.image(c, &x.pool, &x.image);
                assert!(
                    !i.metadata.contains_key(META_MANAGED_BY),
                    "only an unowned image is adopted"
                );
                assert!(i.watchers.is_none(), "never an image in use");
                i.metadata = meta.into();
            }
            Command::GrowImage(x) => {
                let i = self.image(c, &x.pool, &x.image);
                assert!(x.size_bytes > i.size_bytes, "never shrink");
                i.size_bytes = x.size_bytes;
            }
            Command::RestoreImage(x) => {
                self.image(c, &x.pool, &x.image).state = ImageState::Live;
            }
            Command::FlattenImage(x) => {
                let i = self.image(c, &x.pool, &x.image);
                assert!(i.parent.is_some(), "only a clone is flattened");
                i.parent = None;
            }
            Command::CreateSnapshot(x) => {
                let i = self.image(c, &x.pool, &x.image);
                if i.snapshots.iter().any(|s| s.name == x.snapshot) {
                    return;
                }
                let id = i.snapshots.iter().map(|s| s.id + 1).max().unwrap_or(1);
                i.snapshots.push(protocol::SnapshotInfo {
                    id,
                    name: x.snapshot.clone(),
                });
                if protocol::meta::scheduled_at(&x.snapshot).is_none() {
                    let key = protocol::meta::SNAPSHOTS.to_string();
                    let mut list: Vec<String> =
                        protocol::meta::snapshot_list(i.metadata.get(&key).map(String::as_str))
                            .map(String::from)
                            .collect();
                    if !list.contains(&x.snapshot) {
                        list.push(x.snapshot.clone());
                    }
                    i.metadata.insert(key, list.join(","));
                }
            }
            Command::RemoveSnapshot(x) => {
                let spec = format!("{}/{}@{}", x.pool, x.image, x.snapshot);
                let r = &self.clusters[c];
                assert!(
                    !r.images
                        .iter()
                        .any(|i| i.parent.as_deref() == Some(spec.as_str())),
                    "a snapshot with clones is never removed: {spec}"
                );
                let i = self.image(c, &x.pool, &x.image);
                i.snapshots.retain(|s| s.name != x.snapshot);
                let key = protocol::meta::SNAPSHOTS.to_string();
                let list: Vec<String> =
                    protocol::meta::snapshot_list(i.metadata.get(&key).map(String::as_str))
                        .filter(|n| *n != x.snapshot)
                        .map(String::from)
                        .collect();
                i.metadata.insert(key, list.join(","));
            }
            Command::TrashImage(x) => {
                self.image(c, &x.pool, &x.image).state = ImageState::Trashed {
                    trash_id: "1".into(),
                    trash_status: String::new(),
                };
            }
            Command::DeleteImage(x) => {
                let r = self.clusters.get_mut(c).unwrap();
                r.images
                    .retain(|i| !(i.pool == x.pool && i.image == x.image));
            }
            other => panic!("not a ceph-agent command: {other:?}"),
        }
    }

    /// Image `image` (of any pool) of cluster `c`, to change behind the planner's back.
    #[cfg(test)]
    pub fn image_named(&mut self, c: &str, image: &str) -> &mut ImageStatus {
        self.clusters
            .get_mut(c)
            .expect("cluster exists")
            .images
            .iter_mut()
            .find(|i| i.image == image)
            .expect("image exists")
    }

    fn image(&mut self, c: &str, pool: &str, image: &str) -> &mut ImageStatus {
        self.find(c, pool, image).expect("image exists")
    }

    /// Image `pool/image` of cluster `c`, by where it was put; a cluster's index is rebuilt when
    /// its list changed behind it (images added or removed through the public fields).
    fn find(&mut self, c: &str, pool: &str, image: &str) -> Option<&mut ImageStatus> {
        let images = &mut self.clusters.get_mut(c)?.images;
        let index = self.at.entry(c.to_string()).or_default();
        let key = (pool.to_string(), image.to_string());
        let hit = |index: &ImagesAt| {
            index.at.get(&key).copied().filter(|&n| {
                images
                    .get(n)
                    .is_some_and(|i| i.pool == pool && i.image == image)
            })
        };
        let fresh = index.len == images.len();
        let mut n = fresh.then(|| hit(index)).flatten();
        // Absent from a fresh index: not there (unless a position moved: then rebuild).
        if n.is_none() && (!fresh || index.at.contains_key(&key)) {
            index.at = images
                .iter()
                .enumerate()
                .map(|(n, i)| ((i.pool.clone(), i.image.clone()), n))
                .collect();
            index.len = images.len();
            n = hit(index);
        }
        n.and_then(|n| images.get_mut(n))
    }

    fn apply_snap(&mut self, d: &str, a: &Command) {
        // A bdev opens its image at the image's size.
        let image_bytes = match a {
            Command::CreateBdev(BdevSpec {
                cluster,
                pool,
                image,
                ..
            }) => {
                // One image is never open on two DPUs.
                for (other, r) in &self.dpus {
                    let open = r.inventory.iter().flat_map(|i| &i.bdevs).any(|b| {
                        b.cluster.as_deref() == Some(cluster.as_str())
                            && b.pool.as_deref() == Some(pool.as_str())
                            && b.image.as_deref() == Some(image.as_str())
                    });
                    assert!(
                        !open || other == d,
                        "{pool}/{image} opened on dpu/{d} while dpu/{other} has it open"
                    );
                }
                let c = super::names::unprefixed(cluster).expect("a unistor cluster name");
                self.image(c, pool, image).size_bytes
            }
            _ => 0,
        };
        let inv = self.inv(d);
        if !apply_storage(inv, a, image_bytes) && !apply_controllers(inv, a) {
            panic!("not a SNAP action: {a:?}");
        }
    }

    /// Plans and applies until the plan is empty, each plan's steps in a random order that only
    /// respects `depends_on` (seeded; the executor runs independent steps at once, in any
    /// order): a dependency edge the planner forgot makes some order apply a step before what
    /// it needs, which [`World::apply`] refuses. Returns the passes it took.
    pub fn converge_shuffled(&mut self, d: &Desired, rounds: usize, seed: u64) -> usize {
        let opts = Options::default();
        let mut rng = seed | 1;
        for round in 0..rounds {
            let p = plan(d, &self.observed(), &opts);
            if p.is_empty() {
                return round;
            }
            for i in random_topological_order(&p.steps, &mut rng) {
                self.apply(&p.steps[i], &opts.owner);
            }
        }
        panic!("did not converge in {rounds} rounds");
    }

    /// Plans and applies until the plan is empty; returns the passes it took.
    pub fn converge(&mut self, d: &Desired, rounds: usize) -> usize {
        let opts = Options::default();
        for round in 0..rounds {
            let p = plan(d, &self.observed(), &opts);
            assert!(p
                .steps
                .iter()
                .all(|s| s.depends_on.iter().all(|d| *d < s.id)));
            if p.is_empty() {
                return round;
            }
            for s in &p.steps {
                self.apply(s, &opts.owner);
            }
        }
        panic!("did not converge in {rounds} rounds");
    }
}

fn controller_mut<'a>(inv: &'a mut SnapInventory, name: &str) -> &'a mut ControllerInfo {
    inv.controllers
        .iter_mut()
        .find(|c| c.name == name)
        .expect("controller exists")
}

fn namespace_mut<'a>(inv: &'a mut SnapInventory, nqn: &str, nsid: u32) -> &'a mut NamespaceInfo {
    inv.subsystems
        .iter_mut()
        .find(|s| s.nqn == nqn)
        .expect("subsystem exists")
        .namespaces
        .iter_mut()
        .find(|n| n.nsid == nsid)
        .expect("namespace first")
}

/// Clusters, bdevs, subsystems and namespaces, as SNAP applies them (with its checks); false
/// for another action.
fn apply_storage(inv: &mut SnapInventory, a: &Command, image_bytes: u64) -> bool {
    match a {
        Command::CreateBdev(BdevSpec {
            name,
            cluster,
            pool,
            image,
            block_size,
        }) => {
            assert!(inv.clusters.contains(cluster), "cluster registered first");
            assert!(!inv.bdevs.iter().any(|b| &b.name == name));
            inv.bdevs.push(BdevInfo {
                name: name.clone(),
                pool: Some(pool.clone()),
                image: Some(image.clone()),
                cluster: Some(cluster.clone()),
                block_size: *block_size,
                num_blocks: image_bytes / u64::from(*block_size),
                qos: Default::default(),
            });
        }
        Command::SetBdevQos(q) => {
            let b = inv
                .bdevs
                .iter_mut()
                .find(|b| b.name == q.name)
                .expect("bdev exists");
            assert_ne!(b.qos, q.limits, "only a change is sent");
            q.limits.check().expect("limits SPDK keeps as given");
            b.qos = q.limits;
        }
        Command::ResizeBdev(BdevResize { name, new_size_mib }) => {
            let b = inv
                .bdevs
                .iter_mut()
                .find(|b| &b.name == name)
                .expect("bdev exists");
            let want = new_size_mib << 20;
            assert!(
                want > b.num_blocks * u64::from(b.block_size),
                "never shrink"
            );
            b.num_blocks = want / u64::from(b.block_size);
        }
        Command::DeleteBdev(NameRef { name }) => {
            assert!(!inv
                .subsystems
                .iter()
                .any(|s| s.namespaces.iter().any(|n| &n.bdev == name)));
            inv.bdevs.retain(|b| &b.name != name);
        }
        Command::CreateSubsystem(SubsystemSpec { nqn, .. }) => {
            assert!(!inv.subsystems.iter().any(|s| &s.nqn == nqn));
            inv.subsystems.push(SubsystemInfo {
                nqn: nqn.clone(),
                serial: String::new(),
                model: String::new(),
                namespaces: vec![],
            });
        }
        Command::DestroySubsystem(NqnRef { nqn }) => {
            let s = inv.subsystems.iter().find(|s| &s.nqn == nqn).unwrap();
            assert!(s.namespaces.is_empty());
            assert!(!inv.controllers.iter().any(|c| &c.nqn == nqn));
            inv.subsystems.retain(|s| &s.nqn != nqn);
        }
        Command::CreateNamespace(NamespaceSpec {
            nqn,
            nsid,
            bdev,
            uuid,
        }) => {
            assert!(inv.bdevs.iter().any(|b| &b.name == bdev), "bdev first");
            assert!(
                !inv.subsystems
                    .iter()
                    .any(|s| s.namespaces.iter().any(|n| &n.bdev == bdev)),
                "a bdev backs one namespace"
            );
            let s = inv
                .subsystems
                .iter_mut()
                .find(|s| &s.nqn == nqn)
                .expect("subsystem first");
            assert!(!s.namespaces.iter().any(|n| n.nsid == *nsid), "NSID unique");
            s.namespaces.push(NamespaceInfo {
                nsid: *nsid,
                bdev: bdev.clone(),
                uuid: uuid.clone(),
                controller: None,
            });
        }
        Command::DestroyNamespace(NamespaceRef { nqn, nsid }) => {
            let s = inv.subsystems.iter_mut().find(|s| &s.nqn == nqn).unwrap();
            assert!(
                s.namespaces
                    .iter()
                    .any(|n| n.nsid == *nsid && n.controller.is_none()),
                "detached first"
            );
            s.namespaces.retain(|n| n.nsid != *nsid);
        }
        _ => return false,
    }
    true
}

/// Controllers and attachments, as SNAP applies them (with its checks); false for another
/// action.
fn apply_controllers(inv: &mut SnapInventory, a: &Command) -> bool {
    match a {
        Command::CreateController(ControllerSpec {
            name,
            nqn,
            function,
            num_queues,
            mdts,
        }) => {
            let f = inv
                .functions
                .iter_mut()
                .find(|f| f.function == *function)
                .expect("function exists");
            assert!(f.controller.is_none(), "one controller per function");
            f.controller = Some(name.clone());
            inv.controllers.push(ControllerInfo {
                name: name.clone(),
                nqn: nqn.clone(),
                function: Some(*function),
                num_queues: *num_queues,
                mdts: *mdts,
                state: "SUSPENDED".into(),
                namespaces: vec![],
            });
        }
        Command::DestroyController(NameRef { name }) => {
            let c = inv.controllers.iter().find(|c| &c.name == name).unwrap();
            assert!(c.namespaces.is_empty(), "namespaces detached first");
            for f in &mut inv.functions {
                if f.controller.as_ref() == Some(name) {
                    f.controller = None;
                }
            }
            inv.controllers.retain(|c| &c.name != name);
        }
        Command::AttachNamespace(Attachment {
            controller, nsid, ..
        }) => {
            let c = controller_mut(inv, controller);
            assert!(!c.namespaces.contains(nsid));
            c.namespaces.push(*nsid);
            let nqn = c.nqn.clone();
            let n = namespace_mut(inv, &nqn, *nsid);
            assert!(n.controller.is_none(), "one controller per namespace");
            n.controller = Some(controller.clone());
        }
        Command::DetachNamespace(Attachment {
            controller, nsid, ..
        }) => {
            let c = controller_mut(inv, controller);
            c.namespaces.retain(|n| n != nsid);
            let nqn = c.nqn.clone();
            namespace_mut(inv, &nqn, *nsid).controller = None;
        }
        Command::ResumeController(NameRef { name: controller }) => {
            let c = controller_mut(inv, controller);
            c.state = "STARTED".into();
        }

        _ => return false,
    }
    true
}

/// `examples/` of this repository, loaded (what the tests plan against).
#[cfg(test)]
pub fn examples() -> Desired {
    crate::manifest::load_dir(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples"))
        .expect("the examples load")
}

/// `examples/`, and a world converged to them.
#[cfg(test)]
pub fn converged_examples() -> (Desired, World) {
    let d = examples();
    let mut w = World::empty(&d);
    w.converge(&d, 5);
    (d, w)
}

/// Positions of `steps` in an order that runs each step after everything it depends on, chosen
/// at random among the steps ready at each point (xorshift over `rng`).
pub fn random_topological_order(steps: &[Step], rng: &mut u64) -> Vec<usize> {
    let at: std::collections::HashMap<usize, usize> =
        steps.iter().enumerate().map(|(i, s)| (s.id, i)).collect();
    let mut done = vec![false; steps.len()];
    let mut order = Vec::with_capacity(steps.len());
    while order.len() < steps.len() {
        let ready: Vec<usize> = (0..steps.len())
            .filter(|&i| !done[i] && steps[i].depends_on.iter().all(|d| done[at[d]]))
            .collect();
        assert!(!ready.is_empty(), "a dependency cycle");
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        let pick = ready[(*rng % ready.len() as u64) as usize];
        done[pick] = true;
        order.push(pick);
    }
    order
}
