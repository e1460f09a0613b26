//! Removal: what unistor owns and the manifests no longer want (or want elsewhere), in reverse
//! order of creation — namespaces (detached first), then controllers and subsystems left with
//! nothing wanted, then bdevs, then images by the policy written on them.

use std::collections::{BTreeMap, BTreeSet};

use protocol::dpu::{NameRef, NamespaceRef, NqnRef, SnapInventory};
use protocol::meta::DeletionPolicy;
use protocol::{Command, DeleteImage, ImageState, ImageStatus, Ownership, TrashImage};

use super::place::DpuPlacement;
use super::{after, names, Action, Attachment, Builder, HashMap, Observed, Options, Risk, Target};
use crate::manifest::Volume;

/// Why the owner of a bdev cannot be confirmed (it then stays, and the plan says why).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unconfirmed {
    /// SNAP does not list it.
    #[error("SNAP does not list it")]
    NotListed,
    /// No unistor cluster, pool and image.
    #[error("it names no unistor cluster, pool and image")]
    NoImage,
    /// The cluster's agent does not report.
    #[error("cluster {0} is not reporting")]
    ClusterSilent(String),
    /// The image is not live.
    #[error("its image {0} is not live")]
    NotLive(String),
}

/// Images of every known cluster, found by (pool, image).
pub(super) type ImageIndex<'a> = BTreeMap<&'a str, ClusterImages<'a>>;

/// A cluster's images, found by (pool, image): a table of positions in the report, small
/// enough to stay in the cache while 80k volumes look their image up (the keys are the
/// report's own).
pub(super) struct ClusterImages<'a> {
    pub(super) images: &'a [ImageStatus],
    by_key: hashbrown::HashTable<u32>,
    /// The live clones of each snapshot (`pool/image@snapshot`), by position.
    clones: std::collections::HashMap<&'a str, Vec<u32>>,
}

impl<'a> ClusterImages<'a> {
    /// Indexes `images`; of images with the same key, the last is found.
    pub(super) fn new(images: &'a [ImageStatus]) -> Self {
        let mut by_key = hashbrown::HashTable::with_capacity(images.len());
        let mut clones: std::collections::HashMap<&'a str, Vec<u32>> = Default::default();
        for (at, i) in images.iter().enumerate() {
            if let (Some(p), ImageState::Live) = (i.parent.as_deref(), &i.state) {
                clones.entry(p).or_default().push(at as u32);
            }
        }
        let hash = |at: &u32| key_hash(&images[*at as usize].pool, &images[*at as usize].image);
        for (at, i) in images.iter().enumerate() {
            let same = |p: &u32| {
                let o = &images[*p as usize];
                o.pool == i.pool && o.image == i.image
            };
            match by_key.entry(key_hash(&i.pool, &i.image), same, hash) {
                hashbrown::hash_table::Entry::Occupied(mut e) => *e.get_mut() = at as u32,
                hashbrown::hash_table::Entry::Vacant(e) => {
                    e.insert(at as u32);
                }
            }
        }
        Self {
            images,
            by_key,
            clones,
        }
    }

    /// The live images cloned from snapshot `pool/image@snapshot`: their volume's name, or
    /// `pool/image` for one that names none.
    pub(super) fn clones_of(&self, snapshot: &str) -> Vec<String> {
        self.clones.get(snapshot).map_or_else(Vec::new, |at| {
            at.iter()
                .map(|&a| {
                    let i = &self.images[a as usize];
                    i.metadata
                        .volume()
                        .map_or_else(|| i.key(), |v| format!("volume {v}"))
                })
                .collect()
        })
    }

    /// Image `pool/image`, with its position in the report.
    pub(super) fn find(&self, pool: &str, image: &str) -> Option<(u32, &'a ImageStatus)> {
        let images = self.images;
        let &at = self.by_key.find(key_hash(pool, image), |p| {
            let i = &images[*p as usize];
            i.pool == pool && i.image == image
        })?;
        Some((at, &images[at as usize]))
    }
}

fn key_hash(pool: &str, image: &str) -> u64 {
    use std::hash::BuildHasher;
    rustc_hash::FxBuildHasher.hash_one((pool, image))
}

/// Steps that remove a volume's SNAP objects, by volume: its image waits for them.
pub(super) type ByVolume = HashMap<String, Vec<usize>>;

/// Whose a unistor-named bdev is: ours only when its image says so. Two deployments (owners)
/// may share a DPU, and neither may tear down the other's volumes.
pub(super) struct Owner<'a> {
    pub(super) inv: &'a SnapInventory,
    pub(super) images: &'a ImageIndex<'a>,
    pub(super) owner: &'a str,
}

impl Owner<'_> {
    /// Whether bdev `bdev` is this deployment's; why that cannot be told, when it cannot.
    fn ours(&self, bdev: &str) -> Result<bool, Unconfirmed> {
        let x = self
            .inv
            .bdevs
            .iter()
            .find(|x| x.name == bdev)
            .ok_or(Unconfirmed::NotListed)?;
        let (Some(cluster), Some(pool), Some(image)) = (
            x.cluster.as_deref().and_then(names::unprefixed),
            x.pool.as_deref(),
            x.image.as_deref(),
        ) else {
            return Err(Unconfirmed::NoImage);
        };
        let index = self
            .images
            .get(cluster)
            .ok_or_else(|| Unconfirmed::ClusterSilent(cluster.to_string()))?;
        let (_, img) = index
            .find(pool, image)
            .filter(|(_, i)| i.state == ImageState::Live)
            .ok_or_else(|| Unconfirmed::NotLive(format!("{pool}/{image}")))?;
        Ok(img.metadata.managed_by() == Some(self.owner))
    }
}

/// One DPU's removals.
pub(super) struct DpuTeardown<'a, 'p> {
    pub(super) name: &'a str,
    pub(super) inv: &'a SnapInventory,
    pub(super) owner: Owner<'a>,
    /// Where the manifests want this DPU's volumes.
    pub(super) placed: &'p DpuPlacement<'a>,
}

/// What the namespace removals left behind for the next phases.
#[derive(Default)]
struct Namespaces<'a> {
    /// Subsystems that keep a namespace (wanted, or not ours): they and their controllers stay.
    kept: BTreeSet<&'a str>,
    /// Removal steps by subsystem (what its controller's and its own removal wait for).
    by_nqn: BTreeMap<String, Vec<usize>>,
    /// The namespace removal of each bdev.
    of_bdev: BTreeMap<String, usize>,
}

impl<'a> DpuTeardown<'a, '_> {
    /// Made only for a step (a converged DPU allocates nothing for it).
    fn target(&self) -> Target {
        Target::Dpu(self.name.to_string())
    }

    pub(super) fn plan(&self, b: &mut Builder, of_volume: &mut ByVolume) {
        let mut ns = self.namespaces(b, of_volume);
        self.controllers_and_subsystems(b, &mut ns);
        self.bdevs(b, &ns, of_volume);
    }

    /// Namespaces whose bdev is unistor's, this deployment's and no longer wanted (there):
    /// detached, then destroyed.
    fn namespaces(&self, b: &mut Builder, of_volume: &mut ByVolume) -> Namespaces<'a> {
        let mut out = Namespaces::default();
        for s in self.inv.subsystems.iter().filter(|s| names::owned(&s.nqn)) {
            let mut keeps = false;
            let f = self.placed.function_of(&s.nqn);
            for n in &s.namespaces {
                if !names::owned(&n.bdev)
                    || self.placed.wants_namespace(&n.bdev, f, n.nsid)
                    || self.owner.ours(&n.bdev) != Ok(true)
                {
                    keeps = true;
                    continue;
                }
                let volume = n.bdev.trim_start_matches(names::PREFIX).to_string();
                let detach = n.controller.as_ref().map(|c| {
                    b.push(
                        self.target(),
                        Action::Send(Command::DetachNamespace(Attachment {
                            controller: c.clone(),
                            nsid: n.nsid,
                            force: false,
                        })),
                        Risk::HostVisible,
                        &[],
                        Some(&volume),
                    )
                });
                let destroy = b.push(
                    self.target(),
                    Action::Send(Command::DestroyNamespace(NamespaceRef {
                        nqn: s.nqn.clone(),
                        nsid: n.nsid,
                    })),
                    Risk::HostVisible,
                    &[detach],
                    Some(&volume),
                );
                out.by_nqn.entry(s.nqn.clone()).or_default().push(destroy);
                out.of_bdev.insert(n.bdev.clone(), destroy);
                of_volume.entry(volume).or_default().push(destroy);
            }
            if keeps {
                out.kept.insert(&s.nqn);
            }
        }
        out
    }

    /// Whether unistor's subsystem `nqn` goes: nothing kept in it, nothing wanted.
    fn goes(&self, nqn: &str, ns: &Namespaces<'_>) -> bool {
        !ns.kept.contains(nqn) && self.placed.function_of(nqn).is_none()
    }

    /// Controllers, then subsystems, left with nothing wanted.
    fn controllers_and_subsystems(&self, b: &mut Builder, ns: &mut Namespaces<'_>) {
        for c in self
            .inv
            .controllers
            .iter()
            .filter(|c| names::owned(&c.name))
        {
            if !self.goes(&c.nqn, ns) {
                continue;
            }
            let deps = after(ns.by_nqn.get(&c.nqn));
            let step = b.push(
                self.target(),
                Action::Send(Command::DestroyController(NameRef {
                    name: c.name.clone(),
                })),
                Risk::HostVisible,
                &deps,
                None,
            );
            ns.by_nqn.entry(c.nqn.clone()).or_default().push(step);
        }
        for s in self.inv.subsystems.iter().filter(|s| names::owned(&s.nqn)) {
            if !self.goes(&s.nqn, ns) {
                continue;
            }
            let deps = after(ns.by_nqn.get(&s.nqn));
            b.push(
                self.target(),
                Action::Send(Command::DestroySubsystem(NqnRef { nqn: s.nqn.clone() })),
                Risk::Safe,
                &deps,
                None,
            );
        }
    }

    /// Bdevs of this deployment no longer wanted here, after their namespace; a bdev whose
    /// owner cannot be confirmed stays, and says why.
    fn bdevs(&self, b: &mut Builder, ns: &Namespaces<'_>, of_volume: &mut ByVolume) {
        // Where the next wanted bdev is looked for first.
        let mut next = 0;
        for x in self.inv.bdevs.iter().filter(|x| names::owned(&x.name)) {
            if let Some(k) = self.placed.bdev_position(&x.name, next) {
                next = k + 1;
                continue;
            }
            match self.owner.ours(&x.name) {
                Ok(true) => {}
                Ok(false) => continue,
                Err(why) => {
                    b.block(
                        format!("dpu/{}", self.name),
                        format!(
                            "leaving bdev {} in place: {why}, so its owner cannot be confirmed",
                            x.name
                        ),
                    );
                    continue;
                }
            }
            let dep = ns.of_bdev.get(&x.name).copied();
            let volume = x.name.trim_start_matches(names::PREFIX).to_string();
            let step = b.push(
                self.target(),
                Action::Send(Command::DeleteBdev(NameRef {
                    name: x.name.clone(),
                })),
                Risk::Safe,
                &[dep],
                Some(&volume),
            );
            of_volume.entry(volume).or_default().push(step);
        }
    }
}

/// Images of this deployment's volumes that are gone, by the policy written on them, after the
/// volume's SNAP objects. `volumes`: the wanted ones, in name order; `claimed`: images of each
/// cluster (by position) already found to be a wanted volume's own.
pub(super) fn images_of_gone_volumes(
    b: &mut Builder,
    observed: &Observed,
    opts: &Options,
    volumes: &[&Volume],
    of_volume: &ByVolume,
    claimed: &BTreeMap<&str, Vec<bool>>,
    halted: &BTreeMap<&str, String>,
) {
    for (cname, k) in &observed.clusters {
        let Some(report) = k.get() else { continue };
        let closed = halted.get(cname.as_str());
        let claimed = claimed.get(cname.as_str()).map_or(&[][..], Vec::as_slice);
        // An image's volume is wanted: known at once for an image a wanted volume claimed
        // (without reading the image), else looked for among the wanted names.
        let wanted = |volume: &str| {
            volumes
                .binary_search_by(|v| v.name.as_str().cmp(volume))
                .is_ok()
        };
        // Images are independent here: looked at on all threads, merged in image order.
        let base = b.next_id();
        let fragments = super::par_ranges(report.images.len(), opts.threads, |range| {
            let mut frag = Builder::at(base);
            for at in range {
                if claimed.get(at).copied().unwrap_or(false) {
                    continue;
                }
                let i = &report.images[at];
                gone_image(&mut frag, cname, i, opts, wanted, of_volume, closed);
            }
            frag
        });
        for frag in fragments {
            b.absorb(frag);
        }
    }
}

/// [`images_of_gone_volumes`] for image `i` of cluster `cname` (`wanted`: whether a volume
/// name is wanted; `closed`: why the health gate closed the cluster to writes, if it did).
fn gone_image(
    b: &mut Builder,
    cname: &str,
    i: &ImageStatus,
    opts: &Options,
    wanted: impl Fn(&str) -> bool,
    of_volume: &ByVolume,
    closed: Option<&String>,
) {
    if i.state != ImageState::Live || i.metadata.managed_by() != Some(opts.owner.as_str()) {
        return;
    }
    let Some(volume) = i.metadata.volume() else {
        return;
    };
    if wanted(volume) {
        return;
    }
    let deps = after(of_volume.get(volume));
    let target = Target::Cluster(cname.to_string());
    // Absent means Retain; an unknown name is never taken for one: the image stays, and the
    // plan says why.
    let policy = match i.metadata.policy().map(|p| p.parse()) {
        None => DeletionPolicy::Retain,
        Some(Ok(p)) => p,
        Some(Err(why)) => {
            b.block(
                format!("volume/{volume}"),
                format!(
                    "image {}/{} carries deletion policy {why}: left alone",
                    i.pool, i.image
                ),
            );
            return;
        }
    };
    let owner = Ownership {
        managed_by: opts.owner.clone(),
        volume: volume.to_string(),
    };
    let command = match policy {
        DeletionPolicy::Trash => Command::TrashImage(TrashImage {
            pool: i.pool.clone(),
            image: i.image.clone(),
            retain_secs: i.metadata.retention_secs().unwrap_or(7 * 86400),
            owner,
        }),
        DeletionPolicy::Delete => Command::DeleteImage(DeleteImage {
            pool: i.pool.clone(),
            image: i.image.clone(),
            owner,
        }),
        // The image stays; only the volume's SNAP objects go.
        DeletionPolicy::Retain => return,
    };
    if let Some(why) = closed {
        b.block(format!("volume/{volume}"), why.clone());
        return;
    }
    b.push(
        target,
        Action::Send(command),
        Risk::DataDestroying,
        &deps,
        Some(volume),
    );
}
