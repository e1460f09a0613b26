//! Controller replicas at fleet size (`--replicas R`, issue 24): R `unistor watch` replicas
//! coordinating through RADOS (pool `unistor-ctl` of the benchmark's cluster) share the converged
//! fleet. Measured: the time until they share it, each replica's CPU and RSS in steady state, the
//! RADOS operations the coordination costs (counted by the replicas, and as Ceph's pool
//! statistics see them), then five kills of the replica owning a DPU with an edit of that DPU
//! made at once: failover time (the kill to a survivor owning the DPU), the edit converged
//! during the failover, an edit after the killed replica rejoined, and steps run twice (each
//! edit's steps counted in every replica's log, every incarnation, against the same edit made
//! with every replica up).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use e2e::{reconciled, Daemon};
use serde_json::Value;

use super::{cpu, ms, peak_rss, BenchLab};

const LIMIT: Duration = Duration::from_secs(1800);

/// The coordination pool.
const POOL: &str = "unistor-ctl";

/// Kills timed.
const KILLS: usize = 5;

/// One replica process and the logs of all its incarnations.
struct Replica {
    name: String,
    d: Daemon,
    logs: Vec<PathBuf>,
}

impl BenchLab<'_> {
    /// Replica `name` (its `k`th incarnation), lease `ttl`.
    fn replica(&self, name: &str, ttl: &str, k: usize) -> (Daemon, PathBuf) {
        let log = self.dir.path().join(format!("{name}-{k}.log"));
        let (conf, keyring) = (
            self.c.conf.display().to_string(),
            self.c.keyring.display().to_string(),
        );
        let d = Daemon::start(
            &[
                &self.manifests(),
                "--pki-dir",
                &self.pki(),
                "--owner",
                &self.owner,
                "--state-dir",
                &self.dir.path().join(name).display().to_string(),
                "--resync",
                "1h",
                "--debounce",
                &format!("{}ms", super::DEBOUNCE.as_millis()),
                "--replicas-in",
                POOL,
                "--replica-name",
                name,
                "--replica-ttl",
                ttl,
                "--rados-conf",
                &conf,
                "--rados-id",
                &self.c.id,
                "--rados-keyring",
                &keyring,
            ],
            &log,
        );
        (d, log)
    }
}

/// The `shards` (DPUs and `@gone-images`) shared by `r` live replicas, none over its bound of
/// ceil(1.25 shards / r), and every one of the `n` volumes ok, as `s` says.
fn shared(s: &Value, r: usize, shards: usize, n: usize) -> bool {
    let rep = &s["replicas"];
    let sum = &s["fleet"]["summary"];
    let bound = (shards * 5).div_ceil(4 * r) as u64;
    let owned: Vec<u64> = rep["owned"]
        .as_object()
        .map(|o| o.values().filter_map(Value::as_u64).collect())
        .unwrap_or_default();
    reconciled(s)
        && rep["members"].as_array().is_some_and(|m| m.len() == r)
        && rep["unowned"].as_array().is_some_and(Vec::is_empty)
        && owned.len() == r
        && owned.iter().all(|o| *o <= bound)
        && sum["volumes"] == n
        && sum["volumes_ok"] == n
}

/// The replica owning DPU `dpu`, as `d` sees it.
fn owner_of(d: &Daemon, dpu: &str) -> Option<String> {
    let s = d.status_at(&format!("dpu={dpu}&limit=5"));
    s["fleet"]["dpus"]
        .as_array()?
        .iter()
        .find(|x| x["name"] == dpu)?["replica"]
        .as_str()
        .map(String::from)
}

/// A counter of a replica's metrics.
fn counter(d: &Daemon, name: &str) -> u64 {
    d.get("/metrics")
        .lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Steps done for `volume` in every log of every replica.
fn steps_for(replicas: &[Replica], volume: &str) -> usize {
    replicas
        .iter()
        .flat_map(|r| &r.logs)
        .map(|log| {
            std::fs::read_to_string(log)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(" done: ") && l.contains(volume))
                .count()
        })
        .sum()
}

/// The coordination pool's client operations per second, as Ceph's statistics say.
fn pool_ops(lab: &BenchLab<'_>) -> String {
    let (code, out, _) = lab
        .c
        .cli("ceph", &["osd", "pool", "stats", POOL, "--format", "json"]);
    if code != 0 {
        return "unavailable".into();
    }
    let v: Value = serde_json::from_str(&out).unwrap_or(Value::Null);
    let io = &v[0]["client_io_rate"];
    let ops = |k: &str| io[k].as_f64().unwrap_or(0.0);
    format!(
        "{:.1} op/s ({:.1} read, {:.1} write)",
        ops("read_op_per_sec") + ops("write_op_per_sec"),
        ops("read_op_per_sec"),
        ops("write_op_per_sec")
    )
}

/// Grows volume `i` to `mib` and times it to ok as `d` sees it.
fn edit(lab: &BenchLab<'_>, d: &Daemon, i: usize, mib: u64) -> Duration {
    let name = &lab.vols[i].0;
    let t = Instant::now();
    lab.write_volumes(Some((i, &format!("{mib}Mi"))));
    d.wait_for_at(
        &format!("q={name}&limit=5"),
        LIMIT,
        "the edit to converge",
        |s| {
            s["fleet"]["volumes"].as_array().is_some_and(|v| {
                v.iter().any(|v| {
                    v["volume"] == name.as_str()
                        && v["size_bytes"] == mib << 20
                        && v["state"] == "ok"
                })
            })
        },
    );
    t.elapsed()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// The replicas at fleet size (see the module's documentation).
pub(super) fn run(lab: &BenchLab<'_>, r: usize, ttl: &str) {
    let n = lab.vols.len();
    let dpus = lab.vols.last().map_or(1, |(_, h)| h + 1);
    let per_dpu = n / dpus;
    lab.c.cli_ok("ceph", &["osd", "pool", "create", POOL, "8"]);
    lab.c.cli_ok(
        "ceph",
        &["osd", "pool", "application", "enable", POOL, "unistor"],
    );
    let t = Instant::now();
    let mut replicas: Vec<Replica> = (1..=r)
        .map(|i| {
            let name = format!("ctl-{i}");
            let (d, log) = lab.replica(&name, ttl, 0);
            Replica {
                name,
                d,
                logs: vec![log],
            }
        })
        .collect();
    for x in &replicas {
        x.d.wait_for_at("limit=0", LIMIT, "the replicas sharing the fleet", |s| {
            shared(s, r, dpus + 1, n)
        });
    }
    let started_steps: u64 = replicas.iter().map(|x| x.d.steps_done()).sum();
    let owned = replicas[0].d.status_at("limit=0")["replicas"]["owned"].clone();
    println!(
        "  replicas: {r} started on the converged fleet -> sharing it, every volume seen ok: {} (lease {ttl}); shards owned {owned}; steps run: {started_steps}",
        ms(t.elapsed())
    );

    // Steady state.
    let window = Duration::from_secs(30);
    let pids: Vec<String> = replicas
        .iter()
        .map(|x| x.d.child.id().to_string())
        .collect();
    let cpu0: Vec<f64> = pids.iter().map(|p| cpu(p).0).collect();
    let ops0: u64 = replicas
        .iter()
        .map(|x| counter(&x.d, "unistor_replica_rados_operations_total"))
        .sum();
    let t0 = Instant::now();
    std::thread::sleep(window);
    let secs = t0.elapsed().as_secs_f64();
    let ops1: u64 = replicas
        .iter()
        .map(|x| counter(&x.d, "unistor_replica_rados_operations_total"))
        .sum();
    let each: Vec<String> = replicas
        .iter()
        .zip(&pids)
        .zip(&cpu0)
        .map(|((x, p), c0)| {
            format!(
                "{} CPU {:.1}% RSS {} MiB",
                x.name,
                (cpu(p).0 - c0) / secs * 100.0,
                peak_rss(x.d.child.id()) / 1024
            )
        })
        .collect();
    println!(
        "  replicas steady state over {:.0} s: {}",
        secs,
        each.join(", ")
    );
    println!(
        "  replicas' RADOS cost: {:.1} operations/s counted by the {r} replicas ({:.2} per replica); Ceph's pool statistics: {}",
        (ops1 - ops0) as f64 / secs,
        (ops1 - ops0) as f64 / secs / r as f64,
        pool_ops(lab)
    );

    // The same edit with every replica up: the steps one edit takes.
    let first = 0;
    let base = edit(lab, &replicas[0].d, first, 128);
    let expected = steps_for(&replicas, &lab.vols[first].0);
    println!(
        "  edit with every replica up -> converged: {} ({expected} step(s))",
        ms(base)
    );

    let (mut failovers, mut during, mut after, mut twice) = (vec![], vec![], vec![], 0usize);
    for k in 0..KILLS {
        let dpu_index = (k * dpus / KILLS + 1).min(dpus - 1);
        let vol = dpu_index * per_dpu;
        let dpu_name = format!("dpu-{dpu_index}");
        let name = lab.vols[vol].0.clone();
        let before = steps_for(&replicas, &name);
        // Sizes only grow: each kill's edits are larger than any before.
        let (mib_during, mib_after) = (256 * (k as u64 + 1), 256 * (k as u64 + 1) + 128);
        let owner = owner_of(&replicas[0].d, &dpu_name).expect("an owner");
        let victim = replicas.iter().position(|x| x.name == owner).unwrap();
        let watcher = (victim + 1) % r;
        let killed = Instant::now();
        let _ = replicas[victim].d.child.kill();
        let _ = replicas[victim].d.child.wait();
        // The edit made during the outage, on the killed replica's DPU.
        lab.write_volumes(Some((vol, &format!("{mib_during}Mi"))));
        let d = &replicas[watcher].d;
        d.wait_for_at(
            &format!("dpu={dpu_name}&limit=5"),
            LIMIT,
            "a survivor to own the DPU",
            |s| {
                s["fleet"]["dpus"].as_array().is_some_and(|v| {
                    v.iter().any(|x| {
                        x["name"] == dpu_name.as_str()
                            && x["replica"].as_str().is_some_and(|o| o != owner)
                    })
                })
            },
        );
        let took = killed.elapsed();
        d.wait_for_at(
            &format!("q={name}&limit=5"),
            LIMIT,
            "the edit made during the failover",
            |s| {
                s["fleet"]["volumes"].as_array().is_some_and(|v| {
                    v.iter().any(|v| {
                        v["volume"] == name.as_str()
                            && v["size_bytes"] == mib_during << 20
                            && v["state"] == "ok"
                    })
                })
            },
        );
        let converged = killed.elapsed();
        // Back: a new incarnation, until the replicas share the fleet again.
        let (nd, log) = lab.replica(&owner, ttl, k + 1);
        replicas[victim].d = nd;
        replicas[victim].logs.push(log);
        for x in &replicas {
            x.d.wait_for_at("limit=0", LIMIT, "the replicas sharing again", |s| {
                shared(s, r, dpus + 1, n)
            });
        }
        let owner_now = owner_of(&replicas[0].d, &dpu_name).unwrap_or_default();
        let e = edit(lab, &replicas[(victim + 1) % r].d, vol, mib_after);
        let done = steps_for(&replicas, &name) - before;
        // Two edits of this volume since: each should take `expected` steps.
        twice += done.saturating_sub(2 * expected);
        println!(
            "    kill {}: {owner} (owner of {dpu_name}) killed: a survivor owned it after {}, the edit made meanwhile converged after {}; rejoined, the DPU is {owner_now}'s; an edit after: {}; steps for the two edits: {done}",
            k + 1,
            ms(took),
            ms(converged),
            ms(e)
        );
        failovers.push(took);
        during.push(converged);
        after.push(e);
    }
    println!(
        "  failover (median of {KILLS} kills, lease {ttl}): {}; edit during a failover -> converged: median {}; edit after: median {}; steps run twice: {twice}",
        ms(median(failovers)),
        ms(median(during)),
        ms(median(after))
    );
}
