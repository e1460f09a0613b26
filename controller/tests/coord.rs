//! Membership and the shard map against the real one-node cluster (`UNISTOR_CEPH_*`).

use std::time::Duration;

use ceph_lib::{ConnectSpec, Pool, Rados};
use controller::coord::{Coord, Record};
use e2e::{unique, wait_until, Cluster};

fn pool(c: &Cluster) -> Pool {
    let spec = ConnectSpec::with_files(&c.id, &c.conf, &c.keyring);
    Rados::connect(&spec, 30).unwrap().pool(&c.pool).unwrap()
}

/// A shard changes hands only by a compare-and-set from the record the taker read: two
/// replicas racing cannot both win, every take raises the token, a release keeps it, and a
/// replica whose record was taken cannot release or re-take it from its stale view.
#[test]
fn a_shard_changes_hands_only_from_what_the_taker_read() {
    let c = Cluster::from_env();
    let (pa, pb) = (pool(&c), pool(&c));
    let owner = unique("coord");
    let ttl = Duration::from_secs(30);
    let (a, b) = (
        Coord::new(&pa, &owner, "replica-a", ttl),
        Coord::new(&pb, &owner, "replica-b", ttl),
    );
    assert!(
        a.records().unwrap().is_empty(),
        "nothing before anyone joined"
    );
    a.join().unwrap();
    b.join().unwrap();
    assert_eq!(a.take("dpu-0", None).unwrap(), Some(1));
    // `b` read "never taken" too: its compare-and-set fails, `a` keeps it.
    assert_eq!(b.take("dpu-0", None).unwrap(), None);
    let seen = b.records().unwrap()["dpu-0"].clone();
    assert_eq!(
        seen,
        Record {
            token: 1,
            holder: Some("replica-a".into())
        }
    );
    // Another shard is independent.
    assert_eq!(b.take("dpu-1", None).unwrap(), Some(1));
    // `b` takes dpu-0 from the record it read (the caller's rule says when: `a` gone).
    assert_eq!(b.take("dpu-0", Some(&seen)).unwrap(), Some(2));
    // `a`'s view is stale: it can neither release nor take back from it.
    assert!(!a.release("dpu-0", 1).unwrap());
    assert_eq!(a.take("dpu-0", Some(&seen)).unwrap(), None);
    // Released, the record keeps its token and names nobody; the next take goes on rising.
    assert!(b.release("dpu-0", 2).unwrap());
    let free = a.records().unwrap()["dpu-0"].clone();
    assert_eq!(
        free,
        Record {
            token: 2,
            holder: None
        }
    );
    assert_eq!(a.take("dpu-0", Some(&free)).unwrap(), Some(3));
    assert_eq!(
        a.records().unwrap().keys().collect::<Vec<_>>(),
        ["dpu-0", "dpu-1"]
    );
    for o in [a.map_object(), a.members_object()] {
        c.cli_ok("rados", &["--pool", &c.pool, "rm", &o]);
    }
}

/// The replicas are the live holders of the membership lock: both listed while they renew, a
/// silent one dropped by the OSD, and every replica computes the same owners from the list.
#[test]
fn members_are_the_replicas_that_keep_renewing() {
    let c = Cluster::from_env();
    let (pa, pb) = (pool(&c), pool(&c));
    let owner = unique("members");
    let a = Coord::new(&pa, &owner, "replica-a", Duration::from_secs(2));
    let b = Coord::new(&pb, &owner, "replica-b", Duration::from_secs(600));
    assert!(a.members().unwrap().is_empty(), "nobody yet");
    a.join().unwrap();
    b.join().unwrap();
    a.join().unwrap();
    assert_eq!(b.members().unwrap(), ["replica-a", "replica-b"]);
    let dpus: Vec<String> = (0..100).map(|i| format!("dpu-{i}")).collect();
    let dpus: Vec<&str> = dpus.iter().map(String::as_str).collect();
    let (ma, mb) = (a.members().unwrap(), b.members().unwrap());
    let seen_by_a =
        controller::shards::assign(&dpus, &ma.iter().map(String::as_str).collect::<Vec<_>>());
    let seen_by_b =
        controller::shards::assign(&dpus, &mb.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(seen_by_a, seen_by_b);
    // `a` falls silent.
    wait_until(Duration::from_secs(60), "replica-a to drop out", || {
        b.members().unwrap() == ["replica-b"]
    });
    b.leave().unwrap();
    b.leave().unwrap();
    assert!(b.members().unwrap().is_empty());
    for o in [b.map_object(), b.members_object()] {
        c.cli_ok("rados", &["--pool", &c.pool, "rm", &o]);
    }
}
