//! Plans for people: a diff with `+` (create), `~` (change), `-` (remove) and risk classes.

use std::fmt::Write;

use protocol::Command;

use crate::plan::{Action, Plan, Risk, Step};

/// The sign of a step in the diff: `+` what is made, `-` what goes, `~` what changes; read
/// from the command's name (`create_*`, `attach_*`, `install_*`, `register_*` make;
/// `destroy_*`, `delete_*`, `detach_*`, `trash_*` remove).
pub fn sign(a: &Action) -> char {
    let op = a.op();
    let starts = |prefixes: &[&str]| prefixes.iter().any(|p| op.starts_with(p));
    if starts(&["create_", "attach_", "install_", "register_"]) {
        '+'
    } else if starts(&["destroy_", "delete_", "detach_", "trash_"]) {
        '-'
    } else {
        '~'
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
        Action::RegisterCluster { name, cluster } => {
            format!("register Ceph cluster {cluster} as {name}")
        }
        Action::GrowImage { from_bytes, grow } => format!(
            "grow image {}/{} {} -> {}",
            grow.pool,
            grow.image,
            gib(*from_bytes),
            gib(grow.size_bytes)
        ),
        Action::Send(c) => describe_command(c),
    }
}

/// One line describing a command a step sends.
fn describe_command(c: &Command) -> String {
    let policy = |p: &Option<protocol::ImagePolicy>| {
        p.as_ref()
            .map_or_else(|| "Retain".to_string(), |p| p.deletion.to_string())
    };
    match c {
        Command::InstallSnap(spec) => format!("install SNAP {}:{}", spec.image, spec.tag),
        Command::CreateImage(x) => match &x.clone_from {
            Some(src) => format!(
                "clone image {}/{} {} from snapshot {src} (policy {})",
                x.pool,
                x.image,
                gib(x.size_bytes),
                policy(&x.policy)
            ),
            None => format!(
                "create image {}/{} {} (policy {})",
                x.pool,
                x.image,
                gib(x.size_bytes),
                policy(&x.policy)
            ),
        },
        Command::AdoptImage(x) => format!(
            "adopt image {}/{} as volume {} (policy {})",
            x.pool,
            x.image,
            x.owner.volume,
            policy(&x.policy)
        ),
        Command::RestoreImage(x) => format!("restore image {}/{} from the trash", x.pool, x.image),
        Command::FlattenImage(x) => format!(
            "flatten image {}/{} (copy its snapshot's data in; it no longer depends on it)",
            x.pool, x.image
        ),
        Command::CreateSnapshot(x) => {
            format!("snapshot image {}/{}@{}", x.pool, x.image, x.snapshot)
        }
        Command::RemoveSnapshot(x) => format!(
            "remove snapshot {}/{}@{} (it has no clones)",
            x.pool, x.image, x.snapshot
        ),
        Command::TrashImage(x) => format!(
            "move image {}/{} to the trash (kept {})",
            x.pool,
            x.image,
            humantime::format_duration(std::time::Duration::from_secs(x.retain_secs))
        ),
        Command::DeleteImage(x) => format!("DELETE image {}/{}", x.pool, x.image),
        Command::CreateBdev(b) => format!("create bdev {} on {}/{}", b.name, b.pool, b.image),
        Command::DeleteBdev(x) => format!("delete bdev {}", x.name),
        Command::ResizeBdev(x) => format!(
            "grow bdev {} to {} MiB (the host sees the new size)",
            x.name, x.new_size_mib
        ),
        Command::SetBdevQos(x) => format!(
            "set QoS of bdev {} to {} (live: the host keeps its device)",
            x.name, x.limits
        ),
        Command::CreateSubsystem(s) => format!("create subsystem {}", s.nqn),
        Command::DestroySubsystem(x) => format!("destroy subsystem {}", x.nqn),
        Command::CreateNamespace(n) => {
            format!("create namespace {} nsid {} uuid {}", n.nqn, n.nsid, n.uuid)
        }
        Command::DestroyNamespace(x) => format!("destroy namespace {} nsid {}", x.nqn, x.nsid),
        Command::CreateController(c) => format!(
            "create controller {} on {} ({} queues, suspended)",
            c.name, c.function, c.num_queues
        ),
        Command::DestroyController(x) => format!("destroy controller {}", x.name),
        Command::AttachNamespace(a) => format!("attach nsid {} to {}", a.nsid, a.controller),
        Command::DetachNamespace(a) => format!("detach nsid {} from {}", a.nsid, a.controller),
        Command::ResumeController(x) => format!("resume controller {}", x.name),
        other => other.name().replace('_', " "),
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
