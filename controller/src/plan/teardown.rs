//! Removal: what unistor owns and the manifests no longer want (or want elsewhere), in reverse
//! order of creation — namespaces (detached first), then controllers and subsystems left with
//! nothing wanted, then bdevs, then images by the policy written on them.

use std::collections::{BTreeMap, BTreeSet};

use protocol::dpu::{DpuReport, SnapInventory};
use protocol::meta::DeletionPolicy;
use protocol::{ImageState, ImageStatus};

use super::place::Placement;
use super::{
    after, names, Action, Attachment, Builder, HashMap, Observed, Options, Risk, Target,
    META_MANAGED_BY, META_POLICY, META_RETENTION, META_VOLUME,
};

/// Images of every known cluster by (pool, image).
pub(super) type ImageIndex<'a> = BTreeMap<&'a str, HashMap<(&'a str, &'a str), &'a ImageStatus>>;

/// Steps that remove a volume's SNAP objects, by volume: its image waits for them.
type ByVolume = HashMap<String, Vec<usize>>;

/// Plans every removal. Returns the removal steps per DPU (what is created there waits for
/// them: a moved volume's bdev or function is freed before it is used again).
pub(super) fn teardown(
    b: &mut Builder,
    observed: &Observed,
    opts: &Options,
    placement: &Placement<'_>,
    images: &ImageIndex<'_>,
    halted: &BTreeMap<&str, String>,
) -> BTreeMap<String, Vec<usize>> {
    // Both in name order: each DPU's wanted volumes found by walking along, not by a search.
    let mut wanted = placement.by_dpu.iter().peekable();
    let mut dpus: Vec<(&str, &SnapInventory, &[usize])> = vec![];
    for (dpu_name, k) in &observed.dpus {
        while wanted.next_if(|(d, _)| *d < dpu_name.as_str()).is_some() {}
        let here: &[usize] = match wanted.peek() {
            Some((d, range)) if *d == dpu_name.as_str() => placement.members(range),
            _ => &[],
        };
        if let Some(DpuReport {
            inventory: Some(inv),
            ..
        }) = k.get()
        {
            dpus.push((dpu_name, inv, here));
        }
    }
    // DPUs are independent here: planned on all threads, merged in DPU order.
    let base = b.next_id();
    let fragments = super::par_chunks(&dpus, opts.threads, |dpus| {
        let mut frag = Builder::at(base);
        let mut of_volume = ByVolume::default();
        let mut ranges = vec![];
        for &(name, inv, wanted) in dpus {
            let first = frag.next_id();
            let dpu = DpuTeardown {
                name,
                inv,
                owner: Owner {
                    inv,
                    images,
                    owner: &opts.owner,
                },
                placement,
                wanted,
            };
            dpu.plan(&mut frag, &mut of_volume);
            if frag.next_id() > first {
                ranges.push((name, first..frag.next_id()));
            }
        }
        (frag, of_volume, ranges)
    });
    let mut removed_on: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    let mut of_volume = ByVolume::default();
    for (frag, volumes, ranges) in fragments {
        let shift = b.absorb(frag);
        for (volume, steps) in volumes {
            of_volume
                .entry(volume)
                .or_default()
                .extend(steps.into_iter().map(|s| s + shift));
        }
        for (name, steps) in ranges {
            let steps = (steps.start + shift)..(steps.end + shift);
            removed_on.insert(name.to_string(), steps.collect());
        }
    }
    images_of_gone_volumes(b, observed, opts, placement, &of_volume, halted);
    removed_on
}

/// Whose a unistor-named bdev is: ours only when its image says so. Two deployments (owners)
/// may share a DPU, and neither may tear down the other's volumes.
struct Owner<'a> {
    inv: &'a SnapInventory,
    images: &'a ImageIndex<'a>,
    owner: &'a str,
}

impl Owner<'_> {
    /// Whether bdev `bdev` is this deployment's; why that cannot be told, when it cannot.
    fn ours(&self, bdev: &str) -> Result<bool, String> {
        let x = self
            .inv
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
        let index = self
            .images
            .get(cluster)
            .ok_or_else(|| format!("cluster {cluster} is not reporting"))?;
        let img = index
            .get(&(pool, image))
            .filter(|i| i.state == ImageState::Live)
            .ok_or_else(|| format!("its image {pool}/{image} is not live"))?;
        Ok(img.metadata.get(META_MANAGED_BY).map(String::as_str) == Some(self.owner))
    }
}

/// One DPU's removals.
struct DpuTeardown<'a> {
    name: &'a str,
    inv: &'a SnapInventory,
    owner: Owner<'a>,
    placement: &'a Placement<'a>,
    /// The volumes the manifests want on this DPU (positions in the placement).
    wanted: &'a [usize],
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

impl<'a> DpuTeardown<'a> {
    /// Made only for a step (a converged DPU allocates nothing for it).
    fn target(&self) -> Target {
        Target::Dpu(self.name.to_string())
    }

    fn plan(&self, b: &mut Builder, of_volume: &mut ByVolume) {
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
            for n in &s.namespaces {
                if !names::owned(&n.bdev)
                    || self
                        .placement
                        .wants(&n.bdev, self.wanted, Some((&s.nqn, n.nsid)))
                    || self.owner.ours(&n.bdev) != Ok(true)
                {
                    keeps = true;
                    continue;
                }
                let volume = n.bdev.trim_start_matches(names::PREFIX).to_string();
                let detach = n.controller.as_ref().map(|c| {
                    b.push(
                        self.target(),
                        Action::Detach(Attachment {
                            controller: c.clone(),
                            nsid: n.nsid,
                            force: false,
                        }),
                        Risk::HostVisible,
                        &[],
                        Some(&volume),
                    )
                });
                let destroy = b.push(
                    self.target(),
                    Action::DestroyNamespace {
                        nqn: s.nqn.clone(),
                        nsid: n.nsid,
                    },
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
        !ns.kept.contains(nqn) && !self.wanted.iter().any(|&i| self.placement.nqn(i) == nqn)
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
                Action::DestroyController {
                    name: c.name.clone(),
                },
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
                Action::DestroySubsystem { nqn: s.nqn.clone() },
                Risk::Safe,
                &deps,
                None,
            );
        }
    }

    /// Bdevs of this deployment no longer wanted here, after their namespace; a bdev whose
    /// owner cannot be confirmed stays, and says why.
    fn bdevs(&self, b: &mut Builder, ns: &Namespaces<'_>, of_volume: &mut ByVolume) {
        for x in self.inv.bdevs.iter().filter(|x| names::owned(&x.name)) {
            if self.placement.wants(&x.name, self.wanted, None) {
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
                Action::DeleteBdev {
                    name: x.name.clone(),
                },
                Risk::Safe,
                &[dep],
                Some(&volume),
            );
            of_volume.entry(volume).or_default().push(step);
        }
    }
}

/// Images of this deployment's volumes that are gone, by the policy written on them, after the
/// volume's SNAP objects.
fn images_of_gone_volumes(
    b: &mut Builder,
    observed: &Observed,
    opts: &Options,
    placement: &Placement<'_>,
    of_volume: &ByVolume,
    halted: &BTreeMap<&str, String>,
) {
    for (cname, k) in &observed.clusters {
        let Some(report) = k.get() else { continue };
        let closed = halted.get(cname.as_str());
        // Images are independent here: looked at on all threads, merged in image order.
        let base = b.next_id();
        let fragments = super::par_chunks(&report.images, opts.threads, |images| {
            let mut frag = Builder::at(base);
            for i in images {
                gone_image(&mut frag, cname, i, opts, placement, of_volume, closed);
            }
            frag
        });
        for frag in fragments {
            b.absorb(frag);
        }
    }
}

/// [`images_of_gone_volumes`] for image `i` of cluster `cname` (`closed`: why the health gate
/// closed it to writes, if it did).
fn gone_image(
    b: &mut Builder,
    cname: &str,
    i: &ImageStatus,
    opts: &Options,
    placement: &Placement<'_>,
    of_volume: &ByVolume,
    closed: Option<&String>,
) {
    if i.state != ImageState::Live || i.metadata.get(META_MANAGED_BY) != Some(&opts.owner) {
        return;
    }
    let Some(volume) = i.metadata.get(META_VOLUME) else {
        return;
    };
    if placement.by_name.contains_key(volume.as_str()) {
        return;
    }
    let deps = after(of_volume.get(volume));
    let target = Target::Cluster(cname.to_string());
    // Absent means Retain; an unknown name is never taken for one: the image stays, and the
    // plan says why.
    let policy = match i.metadata.get(META_POLICY).map(|p| p.parse()) {
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
    let action = match policy {
        DeletionPolicy::Trash => Action::TrashImage {
            pool: i.pool.clone(),
            image: i.image.clone(),
            retain_secs: i
                .metadata
                .get(META_RETENTION)
                .and_then(|s| s.parse().ok())
                .unwrap_or(7 * 86400),
            volume: volume.clone(),
        },
        DeletionPolicy::Delete => Action::DeleteImage {
            pool: i.pool.clone(),
            image: i.image.clone(),
            volume: volume.clone(),
        },
        // The image stays; only the volume's SNAP objects go.
        DeletionPolicy::Retain => return,
    };
    if let Some(why) = closed {
        b.block(format!("volume/{volume}"), why.clone());
        return;
    }
    b.push(target, action, Risk::DataDestroying, &deps, Some(volume));
}
