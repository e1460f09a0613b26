//! The planner: a pure function of (desired, observed) to a plan. No I/O, no clock, no
//! randomness: the same inputs give the same plan, byte for byte.
//!
//! Per volume the chain is: SNAP installed -> rbd image -> cluster registered in SNAP -> bdev ->
//! subsystem -> namespace -> controller (created suspended) -> namespace attached -> controller
//! resumed. Teardown runs in reverse. Existing matching objects are adopted, never duplicated.
//! Only objects unistor owns are ever removed: images carrying `unistor.managed-by`, SNAP objects
//! named by unistor's convention (see [`names`]).

mod create;
pub mod model;
mod place;
pub mod sim;
mod teardown;

use std::collections::BTreeMap;

/// Fast, deterministic hashing for the planner's internal lookups (keys are our own names).
type HashMap<K, V> = rustc_hash::FxHashMap<K, V>;

use protocol::dpu::{DpuReport, FunctionRef, SnapState};
use protocol::CephReport;

use crate::manifest::Desired;
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
        let mut s = String::new();
        push_nqn(&mut s, dpu, f);
        s
    }
    /// [`nqn`] appended to `out` (no allocation of its own).
    pub fn push_nqn(out: &mut String, dpu: &str, f: FunctionRef) {
        use std::fmt::Write;
        out.push_str(NQN_PREFIX);
        out.extend(dpu.chars().map(|c| c.to_ascii_lowercase()));
        // Writing to a String cannot fail.
        let _ = write!(out, ":{f}");
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

/// The values unistor gives every SNAP object it creates, in one place: each is in the plan
/// (`plan --output json` shows it) and is what the dpu-agent is sent.
pub mod snap_values {
    /// Block size of every bdev (4 KiB: what NVMe hosts and RBD objects align to).
    pub const BLOCK_SIZE: u32 = 4096;
    /// Model number of every subsystem.
    pub const MODEL: &str = "unistor volume";
    /// Namespaces a subsystem may hold (SNAP's `nn`/`mnan`).
    pub const MAX_NAMESPACES: u32 = 1024;
    /// Maximum data transfer size of every controller, as a power of two of 4 KiB pages (7 =
    /// 512 KiB).
    pub const MDTS: u32 = 7;

    /// A 20-character NVMe serial derived from the NQN.
    pub fn serial(nqn: &str) -> String {
        let h = super::fnv(nqn);
        format!("UNISTOR{:013X}", h & 0x000F_FFFF_FFFF_FFFF)
    }
}

/// Knobs of a plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Value of `unistor.managed-by` on images this deployment owns.
    pub owner: String,
    /// Which cluster health halts the steps that write to the cluster.
    pub health_gate: HealthGate,
    /// Threads the per-DPU phases may use (1: all on the caller's). The plan is the same,
    /// byte for byte, whatever the number.
    pub threads: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            owner: "unistor".into(),
            health_gate: HealthGate::standard(),
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// Which health of a Ceph cluster halts every step that writes to it (images created, grown,
/// restored, trashed, deleted, their policy rewritten). Steps that need no write to it go on:
/// SNAP objects over images that are already right, other clusters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthGate {
    /// `HEALTH_ERR` halts.
    pub on_error: bool,
    /// Each of these health checks halts, whatever the overall status.
    pub checks: Vec<String>,
}

impl HealthGate {
    /// `HEALTH_ERR`, a full OSD or pool, or inactive placement groups.
    pub fn standard() -> Self {
        Self {
            on_error: true,
            checks: ["OSD_FULL", "POOL_FULL", "PG_AVAILABILITY"]
                .map(String::from)
                .to_vec(),
        }
    }

    /// Nothing halts.
    pub fn off() -> Self {
        Self {
            on_error: false,
            checks: vec![],
        }
    }

    /// `standard`, `off`, or a comma-separated list of `HEALTH_ERR` and check names
    /// (`HEALTH_ERR,OSD_FULL,OSD_NEARFULL`).
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "standard" => return Ok(Self::standard()),
            "off" => return Ok(Self::off()),
            _ => {}
        }
        let mut gate = Self::off();
        for item in s.split(',').map(str::trim) {
            let valid = !item.is_empty()
                && item
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
            if !valid {
                return Err(format!(
                    "{item:?} is not a health check name: use standard, off, or names like HEALTH_ERR,OSD_FULL"
                ));
            }
            if item == "HEALTH_ERR" {
                gate.on_error = true;
            } else {
                gate.checks.push(item.to_string());
            }
        }
        Ok(gate)
    }

    /// Why `report`'s cluster is closed to writes, when it is.
    pub fn halts(&self, report: &CephReport) -> Option<String> {
        self.halts_health(&report.health)
    }

    /// Why a cluster of health `h` is closed to writes, when it is.
    pub fn halts_health(&self, h: &protocol::CephHealth) -> Option<String> {
        let failing: Vec<String> = self
            .checks
            .iter()
            .filter_map(|c| h.checks.get(c).map(|summary| format!("{c}: {summary}")))
            .collect();
        if !failing.is_empty() {
            return Some(failing.join("; "));
        }
        (self.on_error && h.status == "HEALTH_ERR").then(|| {
            let checks: Vec<String> = h.checks.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            format!("HEALTH_ERR ({})", checks.join("; "))
        })
    }
}

/// Clusters closed to writes by the health gate, with the reason.
fn halted<'a>(observed: &'a Observed, gate: &HealthGate) -> BTreeMap<&'a str, String> {
    observed
        .clusters
        .iter()
        .filter_map(|(name, k)| {
            let why = gate.halts(k.get()?)?;
            Some((
                name.as_str(),
                format!("cluster {name} is closed to writes by the health gate: {why}"),
            ))
        })
        .collect()
}

/// Metadata keys unistor reads on images (their one home is [`protocol::meta`]).
pub use protocol::meta::{
    MANAGED_BY as META_MANAGED_BY, POLICY as META_POLICY, RETENTION as META_RETENTION,
    VOLUME as META_VOLUME,
};

/// Steps, drift and holds being written. A builder may be a fragment of the plan, made on its
/// own thread for part of the fleet: its step ids start at `base` (the plan's length when the
/// phase began) and [`Builder::absorb`] renumbers them in place, so a plan made on many threads
/// is the plan made on one, byte for byte.
#[derive(Default)]
struct Builder {
    base: usize,
    plan: Plan,
}

impl Builder {
    /// The id the next step gets.
    fn next_id(&self) -> usize {
        self.base + self.plan.steps.len()
    }

    /// An empty fragment whose first step will be `base` (the plan's [`Builder::next_id`] when
    /// the phase began).
    fn at(base: usize) -> Builder {
        Builder {
            base,
            plan: Plan::default(),
        }
    }

    /// Appends a fragment made by [`Builder::at`] while this builder was unchanged or
    /// only grew by other fragments; returns how far its step ids moved.
    fn absorb(&mut self, frag: Builder) -> usize {
        let shift = self.next_id() - frag.base;
        for mut s in frag.plan.steps {
            s.id += shift;
            // Ids below the fragment's base are steps of earlier phases: they stay.
            for d in &mut s.depends_on {
                if *d >= frag.base {
                    *d += shift;
                }
            }
            self.plan.steps.push(s);
        }
        self.plan.drift.extend(frag.plan.drift);
        self.plan.blocked.extend(frag.plan.blocked);
        shift
    }

    fn push(
        &mut self,
        target: Target,
        action: Action,
        risk: Risk,
        deps: &[Option<usize>],
        volume: Option<&str>,
    ) -> usize {
        let id = self.next_id();
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

/// Runs `f` over `items` in contiguous chunks, on up to `threads` threads, and returns each
/// chunk's result in item order (so what is merged from them does not depend on `threads`).
fn par_chunks<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&[T]) -> R + Sync + Send,
) -> Vec<R> {
    use rayon::prelude::*;
    // Below this many items a chunk costs more to hand over than it saves.
    const MIN_CHUNK: usize = 64;
    // A few chunks per thread: DPUs differ in work, the threads pick up what is left.
    let chunks = (threads * 4).min(items.len() / MIN_CHUNK);
    if threads <= 1 || chunks <= 1 {
        return vec![f(items)];
    }
    items
        .par_chunks(items.len().div_ceil(chunks))
        .map(f)
        .collect()
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

/// Steps `ids` as dependencies (none when absent): what a step waits for when it waits for a
/// group of others (a DPU's removals, a subsystem's, a controller's attachments).
fn after(ids: Option<&Vec<usize>>) -> Vec<Option<usize>> {
    ids.into_iter().flatten().map(|s| Some(*s)).collect()
}

/// Computes the plan, phase by phase: what is unknown; where each volume goes; removals; SNAP on
/// every DPU; then each DPU's volume chains (see [`create`] and [`teardown`]).
pub fn plan(desired: &Desired, observed: &Observed, opts: &Options) -> Plan {
    let mut b = Builder::default();
    b.plan.unknown = unknown(desired, observed);
    // Reports by DPU, looked up once per DPU (hashing beats comparing long shared prefixes).
    let reports: HashMap<&str, &DpuReport> = observed
        .dpus
        .iter()
        .filter_map(|(n, k)| Some((n.as_str(), k.get()?)))
        .collect();
    let place = || place::place(desired, &reports, opts.threads);
    let (placement, images) = if opts.threads > 1 {
        rayon::join(place, || index_images(observed))
    } else {
        (place(), index_images(observed))
    };
    let halted = halted(observed, &opts.health_gate);
    // Removals first: what is created on a DPU waits for what is removed there.
    let removed_on = teardown::teardown(&mut b, observed, opts, &placement, &images, &halted);
    let first_on = install_snap(&mut b, desired, &reports, &removed_on);
    let cx = create::Context {
        observed,
        opts,
        placement: &placement,
        images: &images,
        halted: &halted,
    };
    let no_deps = (None, Vec::new());
    // DPU by DPU (in name order), each DPU's volumes in name order, then its resumes; DPUs
    // are independent here, so they are planned on all threads and merged in order.
    let base = b.next_id();
    let fragments = par_chunks(&placement.by_dpu, opts.threads, |dpus| {
        let mut frag = Builder::at(base);
        // Controller names by function: a handful, formatted once.
        let mut ctrl_names: HashMap<FunctionRef, String> = HashMap::default();
        for (dpu, range) in dpus {
            let (snap, first) = first_on.get(dpu).unwrap_or(&no_deps);
            create::DpuChain::new(dpu, reports.get(dpu).copied(), *snap, first).plan(
                &mut frag,
                &cx,
                placement.members(range),
                &mut ctrl_names,
            );
        }
        frag
    });
    for frag in fragments {
        b.absorb(frag);
    }
    b.plan
}

/// Agents whose state is unknown (unreachable, or not observed at all): nothing of theirs is
/// touched, and the plan says so.
fn unknown(desired: &Desired, observed: &Observed) -> Vec<String> {
    let mut out = vec![];
    for (name, k) in &observed.clusters {
        if let Known::Unknown { reason } = k {
            out.push(format!("cluster/{name}: {reason}"));
        }
    }
    for (name, k) in &observed.dpus {
        if let Known::Unknown { reason } = k {
            out.push(format!("dpu/{name}: {reason}"));
        }
    }
    for name in desired.clusters.keys() {
        if !observed.clusters.contains_key(name) {
            out.push(format!("cluster/{name}: not observed"));
        }
    }
    // Both in name order: one walk, not a search per DPU.
    let mut seen = observed.dpus.keys().peekable();
    for name in desired.dpus.keys() {
        while seen.next_if(|n| *n < name).is_some() {}
        if seen.peek() != Some(&name) {
            out.push(format!("dpu/{name}: not observed"));
        }
    }
    out
}

/// SNAP on every reporting DPU, installed when it is not the wanted version or not running.
/// Returns, per DPU, the install step (if any) and what every later step there waits for: the
/// DPU's removals, then SNAP.
fn install_snap<'a>(
    b: &mut Builder,
    desired: &'a Desired,
    reports: &HashMap<&str, &DpuReport>,
    removed_on: &BTreeMap<String, Vec<usize>>,
) -> HashMap<&'a str, (Option<usize>, Vec<Option<usize>>)> {
    let mut first_on = HashMap::default();
    for (name, dpu) in &desired.dpus {
        let Some(report) = reports.get(name.as_str()) else {
            continue;
        };
        let mut first = after(removed_on.get(name));
        // `image:tag`, compared without formatting it for every DPU.
        let have = report.snap.image.as_deref();
        let same = have
            .and_then(|h| h.strip_prefix(dpu.snap.image.as_str()))
            .and_then(|t| t.strip_prefix(':'))
            == Some(dpu.snap.tag.as_str());
        let running = report.snap.state == SnapState::Running;
        let step = (!same || !running).then(|| {
            if let Some(h) = have {
                b.drift(
                    format!("dpu/{name}"),
                    "snap.version",
                    format!("{}:{}", dpu.snap.image, dpu.snap.tag),
                    h.to_string(),
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
            b.push(
                Target::Dpu(name.clone()),
                Action::InstallSnap {
                    spec: Box::new(dpu.snap.clone()),
                },
                risk,
                &first,
                None,
            )
        });
        first.push(step);
        first_on.insert(name.as_str(), (step, first));
    }
    first_on
}

/// Images of every known cluster by (pool, image): one lookup per volume, not one scan.
fn index_images(observed: &Observed) -> teardown::ImageIndex<'_> {
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

#[cfg(test)]
mod tests;
