//! A volume's declared snapshots (`spec.snapshots`): each named one taken once; the schedule's
//! (`auto-<seconds>`) taken when the newest is `every` old and pruned to the newest `keep`;
//! names dropped from the manifest (and the schedule's, when the schedule goes) removed under
//! the `Delete` policy, kept under `Retain`. A snapshot that has live clones is never removed:
//! the plan says which volumes hold it.
//!
//! Which snapshots are unistor's: the names its image's `unistor.snapshots` key lists (written
//! by the ceph-agent before it takes one) and the schedule's names; nothing else on an image is
//! ever removed.
//!
//! Clocks: a scheduled snapshot's name is the planning controller's wall clock (`Options::now`).
//! The newest is judged by the cluster's snapshot id, not by its name, so a clock that jumps
//! back cannot hide it: a newest name more than `every` in the future counts as due (one extra
//! snapshot per jump), and `keep` counts snapshots, whatever their names say.

use protocol::meta::{scheduled_at, snapshot_list, SCHEDULED_PREFIX, SNAPSHOTS};
use protocol::{Command, ImageStatus, SnapshotOp};

use super::create::{object, Context};
use super::{Action, Builder, Risk, Target};
use crate::manifest::Volume;

/// The snapshot steps of volume `v`, whose image is `img` (None: made by step `after` in this
/// plan, so it has none yet). Steps wait for `after`.
pub(super) fn plan(
    b: &mut Builder,
    cx: &Context<'_>,
    v: &Volume,
    img: Option<&ImageStatus>,
    after: Option<usize>,
) {
    let Some(want) = v.snapshots.as_ref() else {
        return;
    };
    let have: &[protocol::SnapshotInfo] = img.map_or(&[], |i| &i.snapshots);
    let exists = |n: &str| have.iter().any(|s| s.name == n);
    let listed: Vec<&str> = img.map_or_else(Vec::new, |i| {
        snapshot_list(i.metadata.get(SNAPSHOTS).map(String::as_str)).collect()
    });
    for n in &want.names {
        if exists(n.as_str()) {
            continue;
        }
        if listed.contains(&n.as_str()) {
            // Taken once (its name is on the image) and gone since: removed by hand.
            b.drift(
                object(v),
                "snapshots",
                format!("{n} present"),
                "missing (removed outside unistor)".into(),
            );
        }
        op(b, cx, v, n.as_str(), true, &[after]);
    }
    // Named snapshots no longer declared.
    if want.delete {
        for n in listed {
            if exists(n) && !want.names.iter().any(|w| w.as_str() == n) {
                remove(b, cx, v, n, &[after]);
            }
        }
    }
    let mut scheduled: Vec<&protocol::SnapshotInfo> = have
        .iter()
        .filter(|s| scheduled_at(&s.name).is_some())
        .collect();
    scheduled.sort_by_key(|s| std::cmp::Reverse(s.id));
    let Some((every, keep)) = want.schedule else {
        if want.delete {
            for s in scheduled {
                remove(b, cx, v, &s.name, &[after]);
            }
        }
        return;
    };
    let Some(now) = cx.opts.now else {
        return;
    };
    let newest = scheduled.first().and_then(|s| scheduled_at(&s.name));
    let due = newest.is_none_or(|t| now >= t.saturating_add(every) || t > now + every);
    let name = format!("{SCHEDULED_PREFIX}{now}");
    let mut first = None;
    let mut count = 0;
    if due && !exists(&name) {
        first = Some(op(b, cx, v, &name, true, &[after]));
        count = 1;
    }
    for s in scheduled {
        count += 1;
        if count > keep as usize {
            // After the new one is taken: never fewer than `keep` because a take failed.
            remove(b, cx, v, &s.name, &[after, first]);
        }
    }
}

/// When volume `v`'s schedule is next due by the wall clock `now` (seconds), from its image
/// `img`: what the daemon waits for between passes. None: no schedule.
pub fn next_due(v: &Volume, img: Option<&ImageStatus>, now: u64) -> Option<u64> {
    let (every, _) = v.snapshots.as_ref()?.schedule?;
    let newest = img?
        .snapshots
        .iter()
        .filter_map(|s| Some((s.id, scheduled_at(&s.name)?)))
        .max_by_key(|(id, _)| *id)
        .map(|(_, t)| t);
    Some(match newest {
        Some(t) if t <= now + every => t + every,
        _ => now,
    })
}

/// A snapshot command for volume `v`'s image: a take (`create`) or a removal.
fn op(
    b: &mut Builder,
    cx: &Context<'_>,
    v: &Volume,
    name: &str,
    create: bool,
    deps: &[Option<usize>],
) -> usize {
    let x = SnapshotOp {
        pool: v.pool.to_string(),
        image: v.image.to_string(),
        snapshot: name.to_string(),
        owner: protocol::Ownership {
            managed_by: cx.opts.owner.clone(),
            volume: v.name.to_string(),
        },
    };
    let (command, risk) = if create {
        (Command::CreateSnapshot(x), Risk::Safe)
    } else {
        (Command::RemoveSnapshot(x), Risk::DataDestroying)
    };
    b.push(
        Target::Cluster(v.cluster.clone()),
        Action::Send(command),
        risk,
        deps,
        Some(v.name.as_str()),
    )
}

/// Removes snapshot `name` of volume `v`'s image, unless live clones hold it: then the plan
/// says which.
fn remove(b: &mut Builder, cx: &Context<'_>, v: &Volume, name: &str, deps: &[Option<usize>]) {
    let spec = format!("{}/{}@{name}", v.pool, v.image);
    let clones = cx
        .images
        .get(v.cluster.as_str())
        .map_or_else(Vec::new, |c| c.clones_of(&spec));
    if !clones.is_empty() {
        b.block(
            object(v),
            format!(
                "snapshot {spec} is not removed: {} clone(s) depend on it ({}); flatten or remove them first",
                clones.len(),
                clones.join(", ")
            ),
        );
        return;
    }
    op(b, cx, v, name, false, deps);
}
