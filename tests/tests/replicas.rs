//! Controller replicas (issue 24) end to end, on the real cluster: two `unistor watch`
//! processes with one certificate share a lab's DPUs through RADOS (membership lease, shard map
//! with tokens), every replica shows the whole fleet and who owns each DPU, a killed replica's
//! DPUs are taken over once its membership expires on the OSD, an edit made meanwhile
//! converges, and a replica that comes back takes its share again without touching a volume.

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
    }
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
}
