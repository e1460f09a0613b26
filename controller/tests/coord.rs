//! Shard leases and tokens against the real one-node cluster (`UNISTOR_CEPH_*`).

use std::time::Duration;

use ceph_lib::{ConnectSpec, Pool, Rados};
use controller::coord::{Shards, Taken};
use e2e::{unique, wait_until, Cluster};

fn pool(c: &Cluster) -> Pool {
    let spec = ConnectSpec::with_files(&c.id, &c.conf, &c.keyring);
    Rados::connect(&spec, 30).unwrap().pool(&c.pool).unwrap()
}

/// One holder per shard; a replica that stops renewing loses the shard to another once the
/// OSD expires its lock, the new holder's token is higher, and the old one's renewal fails.
#[test]
fn a_shard_has_one_holder_and_changes_hands_with_a_higher_token() {
    let c = Cluster::from_env();
    let (pa, pb) = (pool(&c), pool(&c));
    let owner = unique("coord");
    let ttl = Duration::from_secs(2);
    let (a, b) = (
        Shards::new(&pa, &owner, "replica-a", ttl),
        Shards::new(&pb, &owner, "replica-b", ttl),
    );
    assert_eq!(a.token(0).unwrap(), 0, "never taken");
    let Taken::Held { token: first } = a.take(0).unwrap() else {
        panic!("a free shard is taken")
    };
    assert_eq!(first, 1);
    assert_eq!(b.take(0).unwrap(), Taken::Busy);
    assert!(a.renew(0).unwrap());
    assert!(!b.renew(0).unwrap());
    // Another shard is independent.
    assert_eq!(b.take(1).unwrap(), Taken::Held { token: 1 });

    // `a` stops renewing: `b` takes shard 0 once the OSD expired `a`'s lock.
    let mut second = None;
    wait_until(
        Duration::from_secs(60),
        "shard 0 to change hands",
        || match b.take(0).unwrap() {
            Taken::Held { token } => {
                second = Some(token);
                true
            }
            Taken::Busy => false,
        },
    );
    assert_eq!(second, Some(first + 1));
    assert_eq!(a.token(0).unwrap(), first + 1);
    assert!(!a.renew(0).unwrap(), "the old holder has lost it");

    // Given up, it is free at once, and the token goes on rising.
    b.release(0).unwrap();
    b.release(0).unwrap();
    assert_eq!(a.take(0).unwrap(), Taken::Held { token: first + 2 });
    for k in 0..2 {
        c.cli_ok("rados", &["--pool", &c.pool, "rm", &a.object(k)]);
    }
}

/// The replicas are the live holders of the membership lock: both listed while they renew, a
/// silent one dropped by the OSD, and every replica computes the same owners from the list.
#[test]
fn members_are_the_replicas_that_keep_renewing() {
    let c = Cluster::from_env();
    let (pa, pb) = (pool(&c), pool(&c));
    let owner = unique("members");
    let a = Shards::new(&pa, &owner, "replica-a", Duration::from_secs(2));
    let b = Shards::new(&pb, &owner, "replica-b", Duration::from_secs(600));
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
    c.cli_ok("rados", &["--pool", &c.pool, "rm", &b.members_object()]);
}
