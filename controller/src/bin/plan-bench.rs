//! Planning benchmark: time and peak memory of `plan()` for N DPUs with M volumes each, from
//! empty and when already converged. Prints one line per case; `--dpus` and `--volumes` change
//! the size (default 10,000 × 8), `--threads` the planner's threads (default: the cores), `--runs`
//! how many converged plans the median is of (11). Run it with
//! `cargo run --release --bin plan-bench`.

use std::alloc::System;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use controller::manifest::{self, Cluster, DeletionPolicy, Desired, Dpu, Source, Volume};
use controller::plan::{self, sim::World, Options};
use protocol::dpu::{FirmwareSpec, FunctionRef, SnapSpec};
use protocol::names::{CephClientId, ImageName, PeerName, PoolName, VolumeName};

use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

/// Counts the heap: what the inputs hold, what a plan allocates.
#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes live on the heap now.
fn live_heap() -> usize {
    let s = GLOBAL.stats();
    // A realloc counts its growth as allocated and its shrinking as deallocated.
    s.bytes_allocated.saturating_sub(s.bytes_deallocated)
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Resets the peak RSS to the current RSS (Linux `clear_refs` 5), so that a phase's peak is
/// measured on its own; false when the kernel refuses.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn fleet(dpus: usize, per: usize) -> Desired {
    let source = Source {
        file: PathBuf::from("bench.yaml"),
        line: 1,
    };
    let mut d = Desired::default();
    d.clusters.insert(
        "ceph".into(),
        Cluster {
            name: "ceph".into(),
            agent: PeerName::parse("n", "ceph-1").unwrap(),
            address: "127.0.0.1:7400".into(),
            monitors: vec![],
            pools: vec![PoolName::parse("p", "rbd").unwrap()],
            snap_client: CephClientId::parse("c", "snap").unwrap(),
            source: source.clone(),
        },
    );
    for i in 0..dpus {
        let name = format!("dpu-{i:05}");
        d.dpus.insert(
            name.clone(),
            Dpu {
                name: name.clone(),
                agent: PeerName::parse("n", &name).unwrap(),
                address: "127.0.0.1:7401".into(),
                host: format!("host-{i:05}"),
                snap: SnapSpec {
                    image: "nvcr.io/nvidia/doca/doca_snap".into(),
                    tag: "4.5.0".into(),
                    env: BTreeMap::new(),
                    hugepages_mib: 4096,
                    cpu: "8".into(),
                    memory: "2Gi".into(),
                    firmware: FirmwareSpec {
                        nvme_pfs: 1,
                        nvme_vfs: 8,
                    },
                },
                source: source.clone(),
            },
        );
        for j in 0..per {
            let vname = format!("vol-{i:05}-{j}");
            let image = ImageName::parse("i", &vname).unwrap();
            d.volumes.insert(
                vname.clone(),
                Volume {
                    name: VolumeName::parse("v", &vname).unwrap(),
                    host: format!("host-{i:05}"),
                    dpu: name.clone(),
                    size_bytes: 100 << 30,
                    cluster: "ceph".into(),
                    pool: PoolName::parse("p", "rbd").unwrap(),
                    uuid: manifest::derived_uuid("ceph", "rbd", image.as_str()),
                    image,
                    // Half pinned on the PF, half derived on VFs.
                    function: if j % 2 == 0 {
                        FunctionRef { pf: 0, vf: None }
                    } else {
                        FunctionRef {
                            pf: 0,
                            vf: Some(j as u32 % 8),
                        }
                    },
                    nsid: (j % 2 == 0).then_some(j as u32 + 1),
                    queues: 8,
                    deletion_policy: DeletionPolicy::Retain,
                    trash_retention: Duration::from_secs(86400),
                    adopt: false,
                    clone_from: None,
                    qos: Default::default(),
                    snapshots: None,
                    labels: BTreeMap::new(),
                    source: source.clone(),
                },
            );
        }
    }
    d
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1)?.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let dpus = arg("--dpus", 10_000);
    let per = arg("--volumes", 8);
    let d = fleet(dpus, per);
    let desired_heap = live_heap();
    let mut world = World::empty(&d);
    let mut opts = Options::default();
    // `--threads N`: how many threads the planner may use (default: the machine's cores).
    opts.threads = arg("--threads", opts.threads);
    let observed = world.observed();
    let base = peak_rss_kib();
    let t = Instant::now();
    let p = plan::plan(&d, &observed, &opts);
    let from_empty = t.elapsed();
    let steps = p.steps.len();
    drop(observed);
    println!(
        "plan from empty: {dpus} DPUs x {per} volumes: {steps} steps in {:.1} ms; peak RSS {} MiB (inputs built: {} MiB)",
        from_empty.as_secs_f64() * 1e3,
        peak_rss_kib() / 1024,
        base / 1024
    );
    for s in &p.steps {
        world.apply(s, &opts.owner);
    }
    drop(p);
    let h0 = live_heap();
    let clusters = world.clusters.clone();
    let h1 = live_heap();
    drop(clusters);
    let h1b = live_heap();
    let reports = world.dpus.clone();
    let h2 = live_heap();
    drop(reports);
    println!(
        "observed when converged: the cluster's {} images {:.0} MiB, {dpus} DPU reports {:.0} MiB",
        dpus * per,
        mib(h1 - h0),
        mib(h2 - h1b)
    );
    let before_observed = live_heap();
    let observed = world.observed();
    let observed_heap = live_heap() - before_observed;
    drop(world);
    let reset = reset_peak_rss();
    let base = peak_rss_kib();
    // `--repeat N` plans the converged state N more times (for profiling).
    for _ in 0..arg("--repeat", 0) {
        std::hint::black_box(plan::plan(&d, &observed, &opts));
    }
    let inputs = live_heap();
    let region = Region::new(GLOBAL);
    let t = Instant::now();
    let p = plan::plan(&d, &observed, &opts);
    let first = t.elapsed();
    let during = region.change();
    // The machine is noisy: the median of `--runs` (11 by default, the first included).
    let mut runs = vec![first];
    for _ in 1..arg("--runs", 11).max(1) {
        let t = Instant::now();
        std::hint::black_box(plan::plan(&d, &observed, &opts));
        runs.push(t.elapsed());
    }
    runs.sort();
    let converged = runs[runs.len() / 2];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    assert!(p.is_empty(), "converged state plans nothing");
    println!(
        "plan when converged: heap of the inputs: desired {:.0} MiB, observed {:.0} MiB (the process holds {:.0} MiB); the plan allocated {:.0} MiB in {} allocations",
        mib(desired_heap),
        mib(observed_heap),
        mib(inputs),
        mib(during.bytes_allocated),
        during.allocations,
    );
    println!(
        "plan when converged: {} steps in {:.1} ms (median of {}; fastest {:.1}, slowest {:.1}); peak RSS {} MiB (before planning: {} MiB{})",
        p.steps.len(),
        ms(converged),
        runs.len(),
        ms(runs[0]),
        ms(runs[runs.len() - 1]),
        peak_rss_kib() / 1024,
        base / 1024,
        if reset {
            ""
        } else {
            "; peak not reset, includes the runs before"
        }
    );
}
