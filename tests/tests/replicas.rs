//! Controller replicas (issue 24) end to end, on the real cluster: two `unistor watch`
//! processes with one certificate share a lab's DPUs through RADOS (membership lease, shard map
//! with tokens), every replica shows the whole fleet and who owns each DPU, a killed replica's
//! DPUs are taken over once its membership expires on the OSD, an edit made meanwhile
//! converges, and a replica that comes back takes its share again without touching a volume;
//! a replica paused past its lease writes nothing of its old pass once resumed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use e2e::lab::{namespaces, Lab};
use e2e::{unique, Cluster, Daemon};
use serde_json::Value;

const CONVERGE: Duration = Duration::from_secs(120);

/// The replica owning each DPU, as a replica's status says.
fn owners(s: &Value) -> BTreeMap<String, String> {
    s["fleet"]["dpus"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .filter_map(|d| {
            Some((
                d["name"].as_str()?.to_string(),
                d["replica"].as_str()?.to_string(),
            ))
        })
        .collect()
}

fn members(s: &Value) -> Vec<String> {
    s["replicas"]["members"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .filter_map(|m| m.as_str().map(String::from))
        .collect()
}

/// Every shard owned by a live replica, all of `want` live, each owning something.
fn shared_by(s: &Value, want: &[&str]) -> bool {
    let owned = &s["replicas"]["owned"];
    members(s) == want
        && s["replicas"]["unowned"]
            .as_array()
            .is_some_and(|u| u.is_empty())
        && want.iter().all(|r| owned[*r].as_u64().unwrap_or(0) > 0)
}

/// The metric `name{outcome="..."}` of a daemon.
fn steps(d: &Daemon, outcome: &str) -> u64 {
    let line = format!("unistor_steps_total{{outcome=\"{outcome}\"}}");
    d.get("/metrics")
        .lines()
        .find(|l| l.starts_with(&line))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn replicas_share_the_fleet_and_a_survivor_takes_over_a_killed_one() {
    let c = Cluster::from_env();
    let lab = Lab::start(&c, 4, &[]);
    let names: Vec<String> = (0..5).map(|i| unique(&format!("rep{i}"))).collect();
    let spec = |n: usize| -> Vec<(&str, usize, &str, &str)> {
        (0..n)
            .map(|i| (names[i].as_str(), i % 4, "64Mi", "Retain"))
            .collect()
    };
    lab.write(&c, &spec(4));
    let ttl = "6s";
    let mut replicas = vec![
        lab.replica(&c, "ctl-a", ttl, &[]),
        lab.replica(&c, "ctl-b", ttl, &[]),
    ];
    let both = ["ctl-a", "ctl-b"];
    for r in &replicas {
        r.wait_for(CONVERGE, "both replicas sharing every shard", |s| {
            shared_by(s, &both)
        });
    }
    let s0 = replicas[0].wait_converged(CONVERGE, 4);
    let s1 = replicas[1].wait_converged(CONVERGE, 4);
    // One fleet on every screen: both show every DPU with the same owner.
    let map = owners(&s0);
    assert_eq!(map.len(), 4, "{map:?}");
    assert_eq!(owners(&s1), map);
    // Nothing twice: each DPU has its one namespace, each volume its image.
    for (i, name) in names.iter().enumerate().take(4) {
        assert_eq!(namespaces(&lab.socket(i)).len(), 1, "dpu {i}");
        assert!(c.rbd_info(&c.pool, name).is_some());
    }
    // And in the metrics: every shard owned, this replica may write.
    for r in &replicas {
        let m = r.get("/metrics");
        for line in [
            "unistor_replica_unowned_shards 0",
            "unistor_replica_may_write 1",
        ] {
            assert!(m.lines().any(|l| l == line), "{line} in:\n{m}");
        }
        assert_eq!(
            m.lines()
                .filter(|l| l.starts_with("unistor_replica_shards{"))
                .count(),
            2,
            "{m}"
        );
        let ops: u64 = m
            .lines()
            .find_map(|l| l.strip_prefix("unistor_replica_rados_operations_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        assert!(
            ops > 0,
            "the coordination's RADOS operations are counted:\n{m}"
        );
    }
    // `unistor status` through either replica, and the dashboard: every DPU with its owner.
    let (m, pki) = (
        lab.manifests().display().to_string(),
        lab.pki().display().to_string(),
    );
    for r in &replicas {
        let o = e2e::unistor(&["status", &m, "--pki-dir", &pki, "--daemon", &r.url]);
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success(),
            "{text}{}",
            String::from_utf8_lossy(&o.stderr)
        );
        assert!(text.contains("Replicas: 2 live: ctl-a"), "{text}");
        for (dpu, owner) in &map {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(owner.as_str()) && l.contains(&format!(" {dpu} "))),
                "{dpu} owned by {owner} in:\n{text}"
            );
        }
    }
    let dom = e2e::browser_dom(&replicas[1].url);
    for (dpu, owner) in &map {
        assert!(
            dom.contains(&format!(
                r#"data-dpu="{dpu}" data-health="ok" data-replica="{owner}""#
            )),
            "{dpu} owned by {owner} on the dashboard:\n{dom}"
        );
    }
    assert!(dom.contains(r#"data-count="replicas""#), "{dom}");

    let done: Vec<u64> = replicas.iter().map(|r| steps(r, "done")).collect();
    println!(
        "from empty: steps done by ctl-a {}, ctl-b {}",
        done[0], done[1]
    );
    assert!(
        done.iter().all(|d| *d > 0),
        "both replicas worked: {done:?}"
    );

    // Kill the owner of DPU 0 and add a volume there meanwhile.
    let victim_name = map["dpu-0"].clone();
    let victim = both.iter().position(|r| *r == victim_name).unwrap();
    let survivor = 1 - victim;
    let killed = Instant::now();
    replicas[victim].child.kill().unwrap();
    replicas[victim].child.wait().unwrap();
    lab.write(&c, &spec(5));
    let s = replicas[survivor].wait_for(CONVERGE, "the survivor to own DPU 0", |s| {
        members(s) == [both[survivor]]
            && owners(s).get("dpu-0").map(String::as_str) == Some(both[survivor])
    });
    let took = killed.elapsed();
    assert!(shared_by(&s, &[both[survivor]]), "every shard owned");
    let s = replicas[survivor].wait_converged(CONVERGE, 5);
    println!(
        "failover: {} owned DPU 0 {} ms after {} was killed (lease {ttl}); the edit made meanwhile converged {} ms after the kill",
        both[survivor],
        took.as_millis(),
        both[victim],
        killed.elapsed().as_millis()
    );
    assert!(
        s["replicas"]["taken"].as_u64().unwrap() > 0,
        "{}",
        s["replicas"]
    );
    assert_eq!(namespaces(&lab.socket(0)).len(), 2);
    for i in 1..4 {
        assert_eq!(namespaces(&lab.socket(i)).len(), 1, "dpu {i}");
    }
    assert!(c.rbd_info(&c.pool, &names[4]).is_some());

    // The killed replica comes back: it takes its share again, and no volume is touched.
    let before = steps(&replicas[survivor], "done");
    replicas[victim] = lab.replica(&c, both[victim], ttl, &[]);
    for r in &replicas {
        r.wait_for(CONVERGE, "both replicas sharing again", |s| {
            shared_by(s, &both)
        });
    }
    let s = replicas[victim].wait_converged(CONVERGE, 5);
    let back = owners(&s);
    assert_eq!(
        owners(&replicas[survivor].status()),
        back,
        "one map on both screens"
    );
    println!(
        "rejoin: {} DPUs moved back to {} (of 4; about N / R expected)",
        back.values().filter(|r| *r == both[victim]).count(),
        both[victim],
    );
    replicas[survivor].reconcile_now(CONVERGE);
    replicas[victim].reconcile_now(CONVERGE);
    assert_eq!(
        steps(&replicas[victim], "done"),
        0,
        "the returning replica touched nothing"
    );
    assert_eq!(
        steps(&replicas[survivor], "done"),
        before,
        "nor did the survivor"
    );
    assert_eq!(namespaces(&lab.socket(0)).len(), 2);

    // Removed gracefully (SIGTERM): it gives its shards up and leaves at once; the survivor
    // takes them without waiting out a lease, and touches nothing either.
    let leaving = back.values().filter(|r| *r == both[victim]).count();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(replicas[victim].child.id()).unwrap()),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let left = Instant::now();
    let s = replicas[survivor].wait_for(CONVERGE, "the survivor to own every DPU", |s| {
        members(s) == [both[survivor]] && shared_by(s, &[both[survivor]])
    });
    println!(
        "removal: {leaving} DPU(s) moved to {} {} ms after {} was stopped",
        both[survivor],
        left.elapsed().as_millis(),
        both[victim]
    );
    assert!(owners(&s).values().all(|r| r == both[survivor]));
    replicas[survivor].reconcile_now(CONVERGE);
    assert_eq!(
        steps(&replicas[survivor], "done"),
        before,
        "the survivor touched nothing of what it took"
    );
}
/// Newest-last step events of a daemon's status.
fn events(s: &Value) -> Vec<String> {
    s["events"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .filter_map(|e| e["message"].as_str().map(String::from))
        .collect()
}

/// Sends `sig` to a daemon's process.
fn signal(d: &Daemon, sig: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(d.child.id()).unwrap());
    nix::sys::signal::kill(pid, sig).unwrap();
}

/// Sends SIGCONT when dropped: a failing test leaves no stopped process behind.
struct Resume<'d>(&'d Daemon);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT);
    }
}

/// A replica SIGSTOPped part way through a pass, for longer than its membership lease: the
/// survivor takes its DPU with a higher token and converges the edit; once resumed, the paused
/// replica writes nothing of its old pass (its steps are refused or skipped: self-fenced, shard
/// no longer held, lease taken by the higher token), and the replicas share the fleet again with
/// every object once.
#[test]
fn a_replica_paused_past_its_lease_writes_nothing_of_its_old_pass() {
    use nix::sys::signal::Signal;
    let c = Cluster::from_env();
    let lab = Lab::start(&c, 2, &["--emulator-arg=--latency=*=300ms"]);
    let names: Vec<String> = (0..5).map(|i| unique(&format!("pause{i}"))).collect();
    let spec = |n: usize| -> Vec<(&str, usize, &str, &str)> {
        (0..n)
            .map(|i| (names[i].as_str(), usize::from(i == 1), "64Mi", "Retain"))
            .collect()
    };
    lab.write(&c, &spec(2));
    let both = ["ctl-a", "ctl-b"];
    let replicas = [
        lab.replica(&c, "ctl-a", "6s", &[]),
        lab.replica(&c, "ctl-b", "6s", &[]),
    ];
    for r in &replicas {
        r.wait_for(CONVERGE, "both replicas sharing every shard", |s| {
            shared_by(s, &both)
        });
    }
    let s = replicas[0].wait_converged(CONVERGE, 2);
    let owner = owners(&s)["dpu-0"].clone();
    let p = both.iter().position(|r| *r == owner).unwrap();
    let (paused, survivor) = (&replicas[p], &replicas[1 - p]);

    // Three more volumes on dpu-0 (each SNAP call takes 300 ms): pause its owner once it has
    // done the first of their SNAP steps.
    lab.write(&c, &spec(5));
    paused.wait_for(CONVERGE, "the owner's pass to be under way", |s| {
        events(s)
            .iter()
            .any(|e| e.starts_with("done: + dpu/dpu-0") && names[2..].iter().any(|n| e.contains(n)))
    });
    signal(paused, Signal::SIGSTOP);
    let resume = Resume(paused);
    let stopped = Instant::now();
    survivor.wait_for(CONVERGE, "the survivor to own dpu-0", |s| {
        owners(s).get("dpu-0").map(String::as_str) == Some(both[1 - p])
    });
    let took = stopped.elapsed();
    let s = survivor.wait_converged(CONVERGE, 5);
    println!(
        "pause: {} owned dpu-0 {} ms after {owner} was stopped, the edit converged at {} ms",
        both[1 - p],
        took.as_millis(),
        stopped.elapsed().as_millis()
    );
    assert!(s["replicas"]["taken"].as_u64().unwrap() > 0);
    drop(resume);
    // Resumed: its old pass ends without a write, then it takes its share again.
    let s = paused.wait_for(CONVERGE, "the resumed replica to stop its old pass", |s| {
        events(s).iter().any(|e| {
            e.starts_with("skipped: ")
                && (e.contains("self-fenced") || e.contains("no longer held"))
                || e.starts_with("failed") && e.contains("lease")
        })
    });
    let stale: Vec<String> = events(&s)
        .into_iter()
        .filter(|e| e.starts_with("skipped: ") || e.starts_with("failed"))
        .collect();
    println!("the resumed replica's old pass: {stale:#?}");
    for r in &replicas {
        r.wait_for(CONVERGE, "both replicas sharing again", |s| {
            shared_by(s, &both)
        });
    }
    paused.wait_converged(CONVERGE, 5);
    survivor.wait_converged(CONVERGE, 5);
    // Every object once: four namespaces on dpu-0 with distinct NSIDs, one on dpu-1.
    let ns = namespaces(&lab.socket(0));
    assert_eq!(ns.len(), 4, "{ns:?}");
    let mut nsids: Vec<u64> = ns.iter().map(|n| n.1).collect();
    nsids.dedup();
    assert_eq!(nsids.len(), 4, "{ns:?}");
    assert_eq!(namespaces(&lab.socket(1)).len(), 1);
    // Nothing happened out of band: no replica saw another's writes as drift (a report read
    // half way through a command said SNAP had lost the object it was creating).
    for r in &replicas {
        let s = r.status();
        let drift: Vec<&Value> = s["events"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
            .iter()
            .filter(|e| e["kind"] == "drift")
            .collect();
        assert!(drift.is_empty(), "{drift:#?}");
    }
}

/// A replica cut off from Ceph (every daemon of its cluster SIGSTOPped: its RADOS traffic gets
/// no answer) while its DPUs stay reachable: it stops writing once its renewal deadline passes
/// (TTL x 2/3 after its last renewal, before the OSD could expire its membership), so a
/// namespace destroyed out of band meanwhile is not repaired: the step is skipped as
/// self-fenced. Once Ceph answers again it renews and repairs it.
#[test]
fn a_replica_cut_off_from_ceph_stops_writing_before_its_lease_can_expire() {
    let pc = e2e::PrivateCluster::up();
    let c = &pc.cluster;
    let lab = Lab::start(c, 1, &[]);
    let v = unique("cut");
    lab.write(c, &[(&v, 0, "64Mi", "Retain")]);
    let r = lab.replica(c, "ctl-a", "6s", &[]);
    r.wait_converged(CONVERGE, 1);
    let before = namespaces(&lab.socket(0));
    assert_eq!(before.len(), 1, "{before:?}");

    let frozen = pc.freeze();
    let cut = Instant::now();
    r.wait_for(CONVERGE, "the replica to fence itself", |s| {
        s["replicas"]["fresh"] == false
    });
    let fenced = cut.elapsed();
    // SNAP-only drift (nothing of it needs Ceph): a healing controller would repair it at once.
    let (nqn, nsid) = e2e::lab::destroy_first_namespace(&lab.socket(0));
    assert_eq!(nsid, before[0].1);
    let s = r.wait_for(CONVERGE, "the repair to be refused", |s| {
        events(s)
            .iter()
            .any(|e| e.starts_with("skipped: ") && e.contains("self-fenced") && e.contains(&nqn))
    });
    let refused: Vec<String> = events(&s)
        .into_iter()
        .filter(|e| e.contains("self-fenced"))
        .collect();
    assert!(
        namespaces(&lab.socket(0)).is_empty(),
        "nothing written while cut off: {refused:#?}"
    );
    assert_eq!(s["replicas"]["fresh"], false, "{}", s["replicas"]);
    println!(
        "cut off: fenced {} ms after Ceph stopped answering (deadline: 4 s after the last renewal, which is at most 2 s old; lease 6 s); refused: {refused:#?}",
        fenced.as_millis()
    );

    drop(frozen);
    r.wait_for(CONVERGE, "the replica to renew", |s| {
        s["replicas"]["fresh"] == true
    });
    r.wait_converged(CONVERGE, 1);
    assert_eq!(
        namespaces(&lab.socket(0)),
        before,
        "repaired, same NSID and UUID"
    );
}

/// `unistor apply` from CI beside a replica (the same manifests, the same certificate): while
/// the replica's pass holds a DPU's lease, an apply that does not wait is refused there with
/// the replica named; one that waits (`--lease-wait`) takes the leases in turn and ends
/// converged; every object exists once.
#[test]
fn unistor_apply_beside_a_replica_waits_for_its_leases_or_names_it() {
    let c = Cluster::from_env();
    let lab = Lab::start(&c, 1, &["--emulator-arg=--latency=*=300ms"]);
    let names: Vec<String> = (0..4).map(|i| unique(&format!("ci{i}"))).collect();
    let spec = |n: usize| -> Vec<(&str, usize, &str, &str)> {
        (0..n)
            .map(|i| (names[i].as_str(), 0, "64Mi", "Retain"))
            .collect()
    };
    lab.write(&c, &spec(1));
    let r = lab.replica(&c, "ctl-a", "6s", &[]);
    r.wait_converged(CONVERGE, 1);
    let (m, pki) = (
        lab.manifests().display().to_string(),
        lab.pki().display().to_string(),
    );
    let apply = |extra: &[&str]| {
        let mut args = vec![
            "apply",
            m.as_str(),
            "--pki-dir",
            pki.as_str(),
            "--owner",
            lab.owner.as_str(),
            "--auto-approve",
        ];
        args.extend_from_slice(extra);
        let o = e2e::unistor(&args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        (o.status.code(), text)
    };

    // Three volumes more: the replica's pass holds dpu-0's lease for their SNAP steps (300 ms
    // each); CI's apply of the same commit meanwhile, not waiting, is refused there.
    lab.write(&c, &spec(4));
    r.wait_for(CONVERGE, "the replica's pass on dpu-0", |s| {
        events(s)
            .iter()
            .any(|e| e.starts_with("done: + dpu/dpu-0") && names[1..].iter().any(|n| e.contains(n)))
    });
    let (code, text) = apply(&[]);
    println!("apply beside a replica's pass (exit {code:?}):\n{text}");
    assert_ne!(code, Some(0), "{text}");
    assert!(text.contains("lease held by controller"), "{text}");
    assert!(
        text.contains("(replica ctl-a)"),
        "the replica named: {text}"
    );

    // Waiting, it gets the leases once the replica's pass ends, and finds the work done or
    // finishes it.
    let (code, text) = apply(&["--lease-wait", "2m"]);
    assert_eq!(code, Some(0), "{text}");
    r.wait_converged(CONVERGE, 4);
    let ns = namespaces(&lab.socket(0));
    assert_eq!(ns.len(), 4, "{ns:?}");
    let mut nsids: Vec<u64> = ns.iter().map(|n| n.1).collect();
    nsids.sort_unstable();
    nsids.dedup();
    assert_eq!(nsids.len(), 4, "{ns:?}");
}
