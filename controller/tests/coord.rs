//! Shard leases and tokens against the real one-node cluster (`UNISTOR_CEPH_*`).

use std::time::Duration;

use ceph_lib::{ConnectSpec, Pool, Rados};
use controller::coord::{Shards, Taken};
use e2e::{unique, wait_until, Cluster};

fn pool(c: &Cluster) -> Pool {
    let spec = ConnectSpec {
        user_id: Some(c.id.clone()),
        config_file: Some(c.conf.to_string_lossy().into_owned()),
        key_file: Some(c.keyring.to_string_lossy().into_owned()),
        options: vec![],
    };
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
