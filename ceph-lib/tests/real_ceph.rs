//! `Pool` against the real one-node cluster (`UNISTOR_CEPH_*`, see `scripts/ceph-dev-cluster.sh`):
//! what each call leaves is read back with the CLI, the independent witness.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ceph_lib::{feature_bit, feature_names, ConnectSpec, Pool, Rados};
use e2e::{unique, Cluster};

fn connect(c: &Cluster) -> Arc<Rados> {
    let spec = ConnectSpec::with_files(&c.id, &c.conf, &c.keyring);
    Rados::connect(&spec, 30).unwrap()
}

fn pool(c: &Cluster) -> Pool {
    connect(c).pool(&c.pool).unwrap()
}

/// The monitors answer `status` and `df` as `ceph status` and `ceph df` print them.
#[test]
fn monitor_commands_answer_as_the_cli_does() {
    let c = Cluster::from_env();
    let rados = connect(&c);
    let mon = |prefix: &str| {
        let command = format!(r#"{{"prefix": "{prefix}", "format": "json"}}"#);
        json(&String::from_utf8(rados.mon_command(&command).unwrap()).unwrap())
    };
    let status = mon("status");
    let cli = json(&c.cli_ok("ceph", &["status", "--format", "json"]));
    assert_eq!(status["fsid"], cli["fsid"]);
    assert!(status["health"]["status"].is_string(), "{status}");
    let df = mon("df");
    assert!(df["stats"]["total_bytes"].as_u64().unwrap() > 0, "{df}");
    assert!(
        df["pools"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == c.pool.as_str()),
        "{df}"
    );
    // A command the monitors do not know: refused with its errno, not a panic.
    assert!(rados.mon_command(r#"{"prefix": "no such thing"}"#).is_err());
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap()
}

#[test]
fn create_keys_rename_list_read_as_the_cli_sees_them() {
    let c = Cluster::from_env();
    let p = pool(&c);
    let (tmp, name) = (unique("lib-tmp"), unique("lib"));
    let bits = ["layering", "exclusive-lock"]
        .iter()
        .map(|f| feature_bit(f).unwrap())
        .sum();
    p.create_image(&tmp, 64 << 20, bits).unwrap();
    // The name is taken now: EEXIST, as `rbd create` exits 17.
    let e = p.create_image(&tmp, 64 << 20, bits).unwrap_err();
    assert!(e.to_string().contains("errno 17"), "{e}");
    p.set_metadata(&tmp, &[("unistor.volume", "v"), ("empty", "")])
        .unwrap();
    p.rename_image(&tmp, &name).unwrap();
    assert!(p.rename_image(&tmp, &name).is_err(), "the source is gone");

    let info = json(&c.cli_ok(
        "rbd",
        &["info", "--format", "json", &format!("{}/{name}", c.pool)],
    ));
    assert_eq!(info["size"], 64u64 << 20);
    assert_eq!(info["features"], json(r#"["layering","exclusive-lock"]"#));
    let names = p.image_names().unwrap();
    assert!(names.contains(&name) && !names.contains(&tmp), "{names:?}");

    let facts = p.read_image(&name).unwrap().expect("the image is there");
    assert_eq!(facts.size, 64 << 20);
    assert_eq!(
        feature_names(facts.features),
        ["layering", "exclusive-lock"]
    );
    assert_eq!(facts.metadata["unistor.volume"], "v");
    assert_eq!(facts.metadata["empty"], "");
    assert_eq!(facts.metadata.len(), 2);
    assert_eq!(p.read_image(&unique("never-made")).unwrap(), None);
    c.cli_ok(
        "rbd",
        &["rm", "--no-progress", &format!("{}/{name}", c.pool)],
    );
}

#[test]
fn omap_keys_are_set_and_removed() {
    let c = Cluster::from_env();
    let p = pool(&c);
    let object = unique("lib-omap");
    p.omap_set(&object, "k", br#"{"volume":"v"}"#).unwrap();
    let got = c.cli_ok(
        "rados",
        &["--pool", &c.pool, "getomapval", &object, "k", "/dev/stdout"],
    );
    assert!(got.contains(r#"{"volume":"v"}"#), "{got}");
    p.omap_remove(&object, "k").unwrap();
    let keys = c.cli_ok("rados", &["--pool", &c.pool, "listomapkeys", &object]);
    assert!(keys.trim().is_empty(), "{keys}");
    // No such object: ENOENT, which the agent takes as "no key to remove".
    let e = p.omap_remove(&unique("lib-none"), "k").unwrap_err();
    assert!(e.to_string().contains("errno 2"), "{e}");
    c.cli_ok("rados", &["--pool", &c.pool, "rm", &object]);
}

/// The sweep reads images while unistor decides whether one is in use by its watchers: a read
/// must never show as one. Reads run back to back on one thread while `rbd status` looks.
#[test]
fn a_read_is_never_seen_as_a_watcher() {
    let c = Cluster::from_env();
    let p = Arc::new(pool(&c));
    let name = unique("lib-watch");
    p.create_image(&name, 16 << 20, feature_bit("layering").unwrap())
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let reader = {
        let (p, name, stop) = (p.clone(), name.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut reads = 0u32;
            while !stop.load(Ordering::SeqCst) {
                p.read_image(&name).unwrap().unwrap();
                reads += 1;
            }
            reads
        })
    };
    for _ in 0..10 {
        let status = json(&c.cli_ok(
            "rbd",
            &["status", "--format", "json", &format!("{}/{name}", c.pool)],
        ));
        assert_eq!(status["watchers"], json("[]"), "{status}");
    }
    stop.store(true, Ordering::SeqCst);
    assert!(reader.join().unwrap() > 0);
    c.cli_ok(
        "rbd",
        &["rm", "--no-progress", &format!("{}/{name}", c.pool)],
    );
}

/// A `cls_lock` lock is exclusive between clients, renewable by its holder, and expires on the
/// OSD: once its holder stops renewing, another client takes it, and the old holder's renewal
/// is refused from then on.
#[test]
fn an_exclusive_lock_expires_on_the_osd_when_not_renewed() {
    use std::time::Duration;
    let c = Cluster::from_env();
    let (a, b) = (pool(&c), pool(&c));
    let object = unique("lib-lock");
    let ttl = Duration::from_secs(2);
    a.lock_exclusive(&object, "leader", "a", ttl).unwrap();
    let e = b.lock_exclusive(&object, "leader", "b", ttl).unwrap_err();
    assert!(e.to_string().contains("errno 16"), "EBUSY: {e}");
    a.lock_exclusive(&object, "leader", "a", ttl).unwrap();
    // `a` stops renewing: `b` gets it once the OSD expires the lock.
    e2e::wait_until(Duration::from_secs(60), "the lock to expire", || {
        b.lock_exclusive(&object, "leader", "b", ttl).is_ok()
    });
    let e = a.lock_exclusive(&object, "leader", "a", ttl).unwrap_err();
    assert!(e.to_string().contains("errno 16"), "EBUSY: {e}");
    b.unlock(&object, "leader", "b").unwrap();
    assert!(
        b.unlock(&object, "leader", "b").is_err(),
        "not held any more"
    );
    c.cli_ok("rados", &["--pool", &c.pool, "rm", &object]);
}

/// A guarded write sets a key only from the value it expects, and of two writers starting
/// from the same value exactly one wins: what a fencing token's increment needs.
#[test]
fn compare_and_set_lets_exactly_one_writer_win() {
    let c = Cluster::from_env();
    let p = Arc::new(pool(&c));
    let object = unique("lib-cas");
    p.omap_set(&object, "token", b"1").unwrap();
    assert!(p
        .omap_compare_and_set(&object, "token", b"1", b"2")
        .unwrap());
    assert!(!p
        .omap_compare_and_set(&object, "token", b"1", b"3")
        .unwrap());
    assert_eq!(p.omap_values(&object, 100).unwrap()["token"], b"2");
    for round in 0..5 {
        let from = format!("r{round}");
        p.omap_set(&object, "token", from.as_bytes()).unwrap();
        let racers: Vec<_> = ["a", "b"]
            .into_iter()
            .map(|who| {
                let (p, object, from) = (p.clone(), object.clone(), from.clone());
                std::thread::spawn(move || {
                    let to = format!("{from}{who}");
                    p.omap_compare_and_set(&object, "token", from.as_bytes(), to.as_bytes())
                        .unwrap()
                })
            })
            .collect();
        let won: Vec<bool> = racers.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(
            won.iter().filter(|w| **w).count(),
            1,
            "round {round}: {won:?}"
        );
    }
    p.omap_set(&object, "other", b"").unwrap();
    let all = p.omap_values(&object, 100).unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all["other"], b"");
    assert!(
        p.omap_values(&object, 1).is_err(),
        "more keys than asked: an error"
    );
    assert!(p.omap_values(&unique("lib-none"), 10).is_err());
    c.cli_ok("rados", &["--pool", &c.pool, "rm", &object]);
}

/// A shared lock is a membership list: every holder is listed while it renews, and one that
/// stops is dropped by the OSD once its duration passes.
#[test]
fn a_shared_lock_lists_its_live_holders() {
    use std::time::Duration;
    let c = Cluster::from_env();
    let (a, b) = (pool(&c), pool(&c));
    let object = unique("lib-members");
    let ttl = Duration::from_secs(2);
    a.lock_shared(&object, "members", "replica-a", ttl).unwrap();
    b.lock_shared(&object, "members", "replica-b", Duration::from_secs(600))
        .unwrap();
    let mut held = a.lockers(&object, "members").unwrap();
    held.sort();
    assert_eq!(held, ["replica-a", "replica-b"]);
    // `a` falls silent: it leaves the list by itself.
    e2e::wait_until(Duration::from_secs(60), "replica-a to expire", || {
        b.lockers(&object, "members").unwrap() == ["replica-b"]
    });
    b.unlock(&object, "members", "replica-b").unwrap();
    assert!(b.lockers(&object, "members").unwrap().is_empty());
    assert!(a.lockers(&unique("lib-none"), "members").is_err());
    c.cli_ok("rados", &["--pool", &c.pool, "rm", &object]);
}
