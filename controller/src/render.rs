//! Plans for people: a diff with `+` (create), `~` (change), `-` (remove) and risk classes.

use std::fmt::Write;

use crate::plan::{Action, Plan, Risk, Step};

/// The sign of a step in the diff.
pub fn sign(a: &Action) -> char {
    match a {
        Action::InstallSnap { .. }
        | Action::CreateImage { .. }
        | Action::RegisterCluster { .. }
        | Action::CreateBdev(_)
        | Action::CreateSubsystem(_)
        | Action::CreateNamespace(_)
        | Action::CreateController(_)
        | Action::Attach(_) => '+',
        Action::GrowImage { .. }
        | Action::AdoptImage { .. }
        | Action::ResizeBdev { .. }
        | Action::RestoreImage { .. }
        | Action::Resume { .. } => '~',
        Action::TrashImage { .. }
        | Action::DeleteImage { .. }
        | Action::DeleteBdev { .. }
        | Action::DestroySubsystem { .. }
        | Action::DestroyNamespace { .. }
        | Action::DestroyController { .. }
        | Action::Detach(_) => '-',
    }
}

fn gib(b: u64) -> String {
    if b.is_multiple_of(1 << 30) {
        format!("{}Gi", b >> 30)
    } else {
        format!("{}Mi", b >> 20)
    }
}

/// One line describing an action.
pub fn describe(a: &Action) -> String {
    match a {
        Action::InstallSnap { spec } => format!("install SNAP {}:{}", spec.image, spec.tag),
        Action::CreateImage {
            pool,
            image,
            size_bytes,
            policy,
            ..
        } => format!(
            "create image {pool}/{image} {} (policy {policy})",
            gib(*size_bytes)
        ),
        Action::AdoptImage {
            pool,
            image,
            volume,
            policy,
            ..
        } => format!("adopt image {pool}/{image} as volume {volume} (policy {policy})"),
        Action::GrowImage {
            pool,
            image,
            from_bytes,
            to_bytes,
            ..
        } => format!(
            "grow image {pool}/{image} {} -> {}",
            gib(*from_bytes),
            gib(*to_bytes)
        ),
        Action::RestoreImage { pool, image } => {
            format!("restore image {pool}/{image} from the trash")
        }
        Action::TrashImage {
            pool,
            image,
            retain_secs,
            ..
        } => format!(
            "move image {pool}/{image} to the trash (kept {})",
            humantime::format_duration(std::time::Duration::from_secs(*retain_secs))
        ),
        Action::DeleteImage { pool, image, .. } => format!("DELETE image {pool}/{image}"),
        Action::RegisterCluster { name, cluster } => {
            format!("register Ceph cluster {cluster} as {name}")
        }
        Action::CreateBdev(b) => format!("create bdev {} on {}/{}", b.name, b.pool, b.image),
        Action::DeleteBdev { name } => format!("delete bdev {name}"),
        Action::ResizeBdev { name, new_size_mib } => {
            format!("grow bdev {name} to {new_size_mib} MiB (the host sees the new size)")
        }
        Action::CreateSubsystem(s) => format!("create subsystem {}", s.nqn),
        Action::DestroySubsystem { nqn } => format!("destroy subsystem {nqn}"),
        Action::CreateNamespace(n) => {
            format!("create namespace {} nsid {} uuid {}", n.nqn, n.nsid, n.uuid)
        }
        Action::DestroyNamespace { nqn, nsid } => format!("destroy namespace {nqn} nsid {nsid}"),
        Action::CreateController(c) => format!(
            "create controller {} on {} ({} queues, suspended)",
            c.name, c.function, c.num_queues
        ),
        Action::DestroyController { name } => format!("destroy controller {name}"),
        Action::Attach(a) => format!("attach nsid {} to {}", a.nsid, a.controller),
        Action::Detach(a) => format!("detach nsid {} from {}", a.nsid, a.controller),
        Action::Resume { controller } => format!("resume controller {controller}"),
    }
}

/// One step as a diff line.
pub fn step_line(s: &Step) -> String {
    let volume = s
        .volume
        .as_ref()
        .map(|v| format!(" (volume {v})"))
        .unwrap_or_default();
    format!(
        "{} {} {}{volume} [{}]",
        sign(&s.action),
        s.target,
        describe(&s.action),
        s.risk
    )
}

/// The whole plan as text.
pub fn human(p: &Plan) -> String {
    let mut out = String::new();
    let count = |c: char| p.steps.iter().filter(|s| sign(&s.action) == c).count();
    let risk = |r: Risk| p.steps.iter().filter(|s| s.risk == r).count();
    // What is held back leads: it is what needs a person.
    if !p.blocked.is_empty() {
        let _ = writeln!(out, "Held back ({}):", p.blocked.len());
        for b in &p.blocked {
            let _ = writeln!(out, "  ! {}: {}", b.object, b.reason);
        }
    }
    if p.steps.is_empty() && p.blocked.is_empty() && p.unknown.is_empty() {
        out.push_str("No changes: the fleet matches the manifests.\n");
    } else if p.steps.is_empty() {
        out.push_str("No steps to run, but the fleet does not match the manifests.\n");
    } else {
        let _ = writeln!(
            out,
            "Plan: {} to add, {} to change, {} to remove ({} safe, {} host-visible, {} data-destroying).",
            count('+'),
            count('~'),
            count('-'),
            risk(Risk::Safe),
            risk(Risk::HostVisible),
            risk(Risk::DataDestroying)
        );
        for s in &p.steps {
            let _ = writeln!(out, "  {}", step_line(s));
        }
    }
    if !p.drift.is_empty() {
        out.push_str("Drift:\n");
        for d in &p.drift {
            let _ = writeln!(
                out,
                "  ~ {} {}: desired {}, observed {}",
                d.object, d.field, d.desired, d.observed
            );
        }
    }
    if !p.unknown.is_empty() {
        out.push_str("Unknown (nothing of theirs is touched):\n");
        for u in &p.unknown {
            let _ = writeln!(out, "  ? {u}");
        }
    }
    out
}
