//! The watch daemon at fleet size (`--fleet`): the DPUs are one `fleet-sim` process. Reads the
//! daemon's counts (`?limit=0`) and single volumes (`?q=NAME`), never the whole list.

use std::time::{Duration, Instant};

use e2e::{reconciled, Daemon};
use serde_json::Value;

use super::{cpu, ms, peak_rss, BenchLab};

const LIMIT: Duration = Duration::from_secs(1800);

fn converged(s: &Value, n: usize) -> bool {
    let sum = &s["fleet"]["summary"];
    reconciled(s)
        && s["last_reconcile"]["result"] == "converged"
        && sum["volumes"] == n
        && sum["volumes_ok"] == n
}

impl BenchLab<'_> {
    fn fleet_command(&self, cmd: &str) -> String {
        let mut f = self.fleet.borrow_mut();
        f.as_mut().expect("fleet mode").command(cmd)
    }

    fn fleet_stats(&self) -> Value {
        let mut f = self.fleet.borrow_mut();
        f.as_mut().expect("fleet mode").stats()
    }

    /// Grows volume `i` to `mib` and times it to ok, read through a search for its name.
    fn edit(&self, d: &Daemon, i: usize, mib: u64) -> Duration {
        let name = &self.vols[i].0;
        let t = Instant::now();
        self.write_volumes(Some((i, &format!("{mib}Mi"))));
        d.wait_for_at(
            &format!("q={name}&limit=5"),
            LIMIT,
            "the edit to converge",
            |s| {
                reconciled(s)
                    && s["fleet"]["volumes"].as_array().is_some_and(|v| {
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
}

/// The daemon's count of liveness messages received (its metrics).
fn liveness(d: &Daemon) -> u64 {
    d.get("/metrics")
        .lines()
        .find_map(|l| l.strip_prefix("unistor_liveness_messages_received_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// The daemon at fleet size: converged, edits, steady state, a restart, a lost tenth.
pub(super) fn watch(lab: &BenchLab<'_>, edits: usize, floor: Duration) {
    let n = lab.vols.len();
    let mut d = lab.daemon();
    let t = Instant::now();
    d.wait_for_at("limit=0", LIMIT, "converged", |s| converged(s, n));
    println!(
        "  watch: daemon started -> {n} volumes seen converged: {}",
        ms(t.elapsed())
    );
    // The dashboard at this size, in headless chromium (process start to the DOM after the first
    // render; the page fetches the counts, the problems and one page of volumes).
    let t = Instant::now();
    let dom = e2e::browser_dom(&format!("{}/", d.url));
    let rendered = t.elapsed();
    assert!(
        dom.contains(r#"data-loaded="true""#),
        "the dashboard rendered"
    );
    assert!(dom.contains(&format!(">{n}<")), "the volume count shows");
    println!(
        "  dashboard with {n} volumes: rendered in headless chromium in {} (browser start included), {} KiB of DOM",
        ms(rendered),
        dom.len() / 1024
    );
    let times = lab.add_volume_edits(&mut d, edits);
    super::report_edits(&times, floor);
    // Steady state: nothing to do, heartbeats and reports only.
    let pid = d.child.id().to_string();
    let (c0, t0, l0) = (cpu(&pid).0, Instant::now(), liveness(&d));
    std::thread::sleep(Duration::from_secs(60));
    let secs = t0.elapsed().as_secs_f64();
    let share = (cpu(&pid).0 - c0) / secs;
    let received = (liveness(&d) - l0) as f64 / secs;
    let stats = lab.fleet_stats();
    let dpus = stats["dpus"].as_u64().unwrap_or(1).max(1);
    println!(
        "  steady state: {received:.1} liveness messages/s received by the daemon from {} agents (budget 50/s)",
        dpus + 1
    );
    println!(
        "  steady state: daemon CPU {:.1}% of a core over 60 s; peak RSS daemon {} MiB, fleet-sim {} MiB ({} KiB per DPU), ceph-agent {} MiB",
        share * 100.0,
        peak_rss(d.child.id()) / 1024,
        stats["peak_rss_kib"].as_u64().unwrap_or(0) / 1024,
        stats["peak_rss_kib"].as_u64().unwrap_or(0) / dpus,
        peak_rss(lab.procs.0[0].id()) / 1024,
    );
    restart(lab, &mut d, n);
    lose_a_tenth(lab, &d, n, dpus as usize);
}

/// The daemon killed and started again: until every session is back, until converged.
fn restart(lab: &BenchLab<'_>, d: &mut Daemon, n: usize) {
    let _ = d.child.kill();
    let _ = d.child.wait();
    lab.fleet_command("reset-peak");
    let t = Instant::now();
    *d = lab.daemon();
    let s = d.wait_for_at("limit=0", LIMIT, "every session back", |s| {
        s["agents_total"].as_u64() > Some(0) && s["agents_total"] == s["agents_connected"]
    });
    let sessions = t.elapsed();
    d.wait_for_at("limit=0", LIMIT, "converged", |s| converged(s, n));
    let stats = lab.fleet_stats();
    println!(
        "  daemon restart: {} sessions back after {}, converged after {}; peak {} connections/s seen by the agents; steps run after the restart: {}",
        s["agents_total"],
        ms(sessions),
        ms(t.elapsed()),
        stats["peak_accepts_per_sec"],
        d.steps_done()
    );
}

/// A tenth of the DPUs stop: an edit elsewhere converges; they return; nothing is replaced.
fn lose_a_tenth(lab: &BenchLab<'_>, d: &Daemon, n: usize, dpus: usize) {
    let lost = (dpus / 10).max(1);
    let per_dpu = n / dpus;
    lab.fleet_command(&format!("stop 0 {}", lost - 1));
    let t = Instant::now();
    d.wait_for_at("limit=0", LIMIT, "the lost DPUs' volumes unknown", |s| {
        s["fleet"]["summary"]["volumes_unknown"] == lost * per_dpu
    });
    let unknown = t.elapsed();
    // A volume on the last DPU, still up.
    let edit = lab.edit(d, n - 1, 512);
    let before = d.steps_done();
    let s = d.status_at("limit=0");
    let still = &s["fleet"]["summary"]["volumes_unknown"];
    lab.fleet_command(&format!("start 0 {}", lost - 1));
    let t = Instant::now();
    d.wait_for_at("limit=0", LIMIT, "converged", |s| converged(s, n));
    let back = t.elapsed();
    d.reconcile_now(LIMIT);
    println!(
        "  {lost} DPUs lost: their {} volumes unknown after {}; an edit elsewhere converged in {} ({still} still unknown); back and converged after {}; steps for their return: {}",
        lost * per_dpu,
        ms(unknown),
        ms(edit),
        ms(back),
        d.steps_done() - before
    );
}
