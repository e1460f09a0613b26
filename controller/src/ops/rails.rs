//! The safety rails: which removals a plan may make, decided on what is observed (the images'
//! watchers looked up live, the hosts' own accounts of their devices).

use clap::Args;

use crate::fleet::Fleet;
use crate::manifest::Desired;
use protocol::Command;

use crate::plan::{self, Observed, Plan};

/// The safety rails: which removals a plan may make.
#[derive(Debug, Clone, Args)]
pub struct Rails {
    /// Allow deleting images of removed volumes whose policy is Delete.
    #[arg(long)]
    pub allow_delete: bool,
    /// Allow a manifest set without volumes to remove every volume.
    #[arg(long)]
    pub allow_empty: bool,
    /// Allow removing volumes whose images are in use (have watchers).
    #[arg(long)]
    pub allow_in_use: bool,
    /// Most volumes one apply (or one reconcile of the daemon) may remove.
    #[arg(long, default_value_t = 5)]
    pub max_removals: usize,
}

/// The safety rails: refuse plans that remove everything, more than the budget, volumes in use,
/// or delete images without the flag.
pub fn check_rails(
    p: &Plan,
    desired: &Desired,
    observed: &Observed,
    a: &Rails,
) -> Result<(), Refusal> {
    let mut problems = vec![];
    let removed = removed_volumes(p);
    if desired.volumes.is_empty() && !removed.is_empty() && !a.allow_empty {
        problems.push(format!(
            "the manifests name no volume, and the plan would remove all {} observed ones; if that is really wanted, pass --allow-empty",
            removed.len()
        ));
    }
    if removed.len() > a.max_removals {
        problems.push(format!(
            "the plan removes {} volumes ({}), more than the budget of {}; raise --max-removals to allow it",
            removed.len(),
            removed.iter().copied().collect::<Vec<_>>().join(", "),
            a.max_removals
        ));
    }
    if !a.allow_delete {
        for s in &p.steps {
            if let Some(Command::DeleteImage(d)) = s.action.sent() {
                problems.push(format!(
                    "volume {} has policy Delete: deleting image {}/{} needs --allow-delete",
                    d.owner.volume, d.pool, d.image
                ));
            }
        }
    }
    if !a.allow_in_use {
        problems.extend(used_by_hosts(p, observed, &removed));
        for r in observed.clusters.values().filter_map(|k| k.get()) {
            for i in &r.images {
                let Some(v) = i.metadata.get(plan::META_VOLUME) else {
                    continue;
                };
                if removed.contains(v.as_str()) && i.in_use() {
                    problems.push(format!(
                        "volume {v} is in use (image {}/{} has watchers {}); pass --allow-in-use to detach it anyway",
                        i.pool,
                        i.image,
                        i.watchers.as_deref().unwrap_or_default().join(", ")
                    ));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Refusal { problems })
    }
}

/// Why the rails refused a plan: every problem found, each naming the volume and the flag
/// that would allow it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused:\n{}", .problems.iter().map(|p| format!("  {p}")).collect::<Vec<_>>().join("\n"))]
pub struct Refusal {
    /// One sentence each.
    pub problems: Vec<String>,
}

/// The removals a host would notice, from the hosts' own accounts in the DPU reports: a
/// detach of a namespace the host holds open, and the destruction of a controller the host's
/// driver has enabled (every device on it goes). A detach of a device nobody opened is not
/// "in use": the host sees a namespace go, as it would a hot-unplug of an idle disk. Where a
/// platform cannot tell (`host_use` absent), only the images' watchers speak.
fn used_by_hosts(
    p: &Plan,
    observed: &Observed,
    removed: &std::collections::BTreeSet<&str>,
) -> Vec<String> {
    let mut problems = vec![];
    // Volumes detached from each controller, as the steps go (a controller's removal comes after
    // its detaches in a plan).
    let mut detached: std::collections::HashMap<(&str, &str), Vec<&str>> = Default::default();
    for s in &p.steps {
        let plan::Target::Dpu(dpu) = &s.target else {
            continue;
        };
        let Some(host) = observed
            .dpus
            .get(dpu)
            .and_then(|k| k.get())
            .and_then(|r| r.host_use.as_ref())
        else {
            continue;
        };
        match s.action.sent() {
            Some(Command::DetachNamespace(plan::Attachment {
                controller, nsid, ..
            })) => {
                if let Some(v) = s.volume.as_deref() {
                    detached.entry((dpu, controller)).or_default().push(v);
                }
                let Some(v) = s.volume.as_deref().filter(|v| removed.contains(v)) else {
                    continue;
                };
                if let Some(d) = host.device(controller, *nsid).filter(|d| d.open > 0) {
                    problems.push(format!(
                        "volume {v} is in use (the host of dpu {dpu} holds {} open: nsid {nsid} of {controller}, {} opener(s)); pass --allow-in-use to detach it anyway",
                        d.device, d.open
                    ));
                }
            }
            Some(Command::DestroyController(protocol::dpu::NameRef { name }))
                if host.controller(name).is_some_and(|c| c.enabled) =>
            {
                let on_it = match detached.get(&(dpu.as_str(), name.as_str())) {
                    Some(v) => v.join(", "),
                    None => "-".to_string(),
                };
                problems.push(format!(
                    "controller {name} on dpu {dpu} is enabled by the host's driver (volumes {on_it}); destroying it pulls the device from a running driver; pass --allow-in-use to do it anyway"
                ));
            }
            _ => {}
        }
    }
    problems
}

/// Volumes a plan removes.
fn removed_volumes(p: &Plan) -> std::collections::BTreeSet<&str> {
    p.steps
        .iter()
        .filter(|s| {
            matches!(
                s.action.sent(),
                Some(
                    Command::DestroyNamespace(_) | Command::TrashImage(_) | Command::DeleteImage(_)
                )
            )
        })
        .filter_map(|s| s.volume.as_deref())
        .collect()
}

/// `observed` with the watchers of the images of the volumes `p` removes looked up live (reports
/// do not carry watchers): what the in-use rail decides on. SNAP's own watch (the cluster's SNAP
/// identity, `client.<snapClient>`) is expected on an attached volume and the plan's teardown
/// closes it: it does not count. Anybody else's does, and so does a watcher whose entity could
/// not be told, or a lookup that fails: the safe side. Costs one request per cluster, and
/// nothing when nothing is removed or `--allow-in-use` is given.
pub async fn with_live_watchers<'a>(
    p: &Plan,
    desired: &Desired,
    observed: &'a Observed,
    fleet: &Fleet,
    rails: &Rails,
) -> std::borrow::Cow<'a, Observed> {
    let removed = removed_volumes(p);
    if removed.is_empty() || rails.allow_in_use {
        return std::borrow::Cow::Borrowed(observed);
    }
    let mut out = observed.clone();
    for (name, k) in out.clusters.iter_mut() {
        let crate::plan::Known::Known { report } = k else {
            continue;
        };
        let wanted: Vec<usize> = report
            .images
            .iter()
            .enumerate()
            .filter(|(_, i)| {
                i.metadata
                    .get(plan::META_VOLUME)
                    .is_some_and(|v| removed.contains(v.as_str()))
            })
            .map(|(n, _)| n)
            .collect();
        if wanted.is_empty() {
            continue;
        }
        // Copied only now: what the watchers are written into is this pass's alone.
        let report = std::sync::Arc::make_mut(report);
        let client = fleet.get(&plan::Target::Cluster(name.clone()));
        for chunk in wanted.chunks(64) {
            let refs = chunk
                .iter()
                .map(|n| protocol::ImageRef {
                    pool: report.images[*n].pool.clone(),
                    image: report.images[*n].image.clone(),
                })
                .collect();
            let answer = match &client {
                Ok(c) => c
                    .request(protocol::Command::ImageWatchers(protocol::ImageList {
                        images: refs,
                    }))
                    .await
                    .map_err(|e| protocol::error::chain(&e)),
                Err(e) => Err(e.to_string()),
            };
            let snap = desired.clusters.get(name.as_str());
            for n in chunk {
                let img = &mut report.images[*n];
                img.watchers = Some(match &answer {
                    Ok(protocol::Reply::Watchers(w)) => w
                        .images
                        .iter()
                        .find(|w| w.pool == img.pool && w.image == img.image)
                        .map(|w| others(w, snap))
                        .unwrap_or_default(),
                    Ok(_) => vec!["(unexpected reply to image_watchers)".into()],
                    Err(e) => vec![format!("(watchers could not be looked up: {e})")],
                });
            }
        }
    }
    std::borrow::Cow::Owned(out)
}

/// An image's watchers other than SNAP's own (`snap`: SNAP's entity on that cluster), each
/// shown with its entity when known.
pub(super) fn others(
    w: &protocol::ImageWatchers,
    snap: Option<&crate::manifest::Cluster>,
) -> Vec<String> {
    w.watchers
        .iter()
        .enumerate()
        .filter_map(|(i, addr)| match w.clients.get(i).map(String::as_str) {
            Some(c) if snap.is_some_and(|s| s.is_snap_entity(c)) => None,
            Some(c) if !c.is_empty() => Some(format!("{addr} ({c})")),
            _ => Some(addr.clone()),
        })
        .collect()
}
