//! Which controller replica owns which DPU (issue 24, `docs/scaling.md`, "Shards by DPU"):
//! consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam, "Consistent Hashing
//! with Bounded Loads", 2016). Each replica has [`POINTS`] points on a 64-bit ring; each DPU, in
//! the order of its own hash, goes to the first replica clockwise from its hash that holds fewer
//! than `ceil(1.25 x N / R)` DPUs. So no replica holds more than that, and a replica joining or
//! leaving moves about `N / R` DPUs rather than reshuffling them all.
//!
//! Pure: a function of the two name lists, the same on every replica that reads the same
//! membership (the shard map in RADOS records the result with its epoch; this only computes it).

use std::collections::BTreeMap;

/// Points per replica on the ring: enough that each replica's share of the ring is within a few
/// per cent of `1 / R`.
pub const POINTS: u32 = 128;

/// The load bound's factor: no replica owns more than `ceil(LOAD_FACTOR x N / R)` DPUs.
pub const LOAD_FACTOR: f64 = 1.25;

/// A stable 64-bit hash of `parts` (FNV-1a, then the SplitMix64 finalizer for spread): the
/// same on every machine and every release, unlike `std`'s randomized hasher.
fn hash(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for b in *part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        // A separator, so that ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// The most DPUs one replica may own: `ceil(LOAD_FACTOR x dpus / replicas)`.
pub fn capacity(dpus: usize, replicas: usize) -> usize {
    if replicas == 0 {
        return 0;
    }
    (LOAD_FACTOR * dpus as f64 / replicas as f64).ceil() as usize
}

/// The owner of every DPU among `replicas` (empty when there is no replica). Duplicate names
/// count once.
pub fn assign<'a>(dpus: &[&'a str], replicas: &[&'a str]) -> BTreeMap<&'a str, &'a str> {
    let mut replicas: Vec<&str> = replicas.to_vec();
    replicas.sort_unstable();
    replicas.dedup();
    let mut dpus: Vec<&str> = dpus.to_vec();
    dpus.sort_unstable();
    dpus.dedup();
    let mut out = BTreeMap::new();
    if replicas.is_empty() {
        return out;
    }
    let mut ring: Vec<(u64, usize)> = replicas
        .iter()
        .enumerate()
        .flat_map(|(i, r)| {
            (0..POINTS).map(move |p| (hash(&[b"replica", r.as_bytes(), &p.to_le_bytes()]), i))
        })
        .collect();
    ring.sort_unstable();
    let cap = capacity(dpus.len(), replicas.len());
    let mut load = vec![0usize; replicas.len()];
    let mut order: Vec<(u64, &str)> = dpus
        .iter()
        .map(|d| (hash(&[b"dpu", d.as_bytes()]), *d))
        .collect();
    order.sort_unstable();
    for (h, dpu) in order {
        let start = ring.partition_point(|(p, _)| *p < h);
        // The total capacity is at least N, so some replica has room: the walk ends.
        let owner = (0..ring.len())
            .map(|k| ring[(start + k) % ring.len()].1)
            .find(|&i| load[i] < cap)
            .expect("capacity covers every DPU");
        load[owner] += 1;
        out.insert(dpu, replicas[owner]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(prefix: &str, n: usize) -> Vec<String> {
        (0..n).map(|i| format!("{prefix}-{i}")).collect()
    }

    fn refs(v: &[String]) -> Vec<&str> {
        v.iter().map(String::as_str).collect()
    }

    fn moved(a: &BTreeMap<&str, &str>, b: &BTreeMap<&str, &str>) -> usize {
        a.iter().filter(|(d, r)| b.get(*d) != Some(*r)).count()
    }

    #[test]
    fn every_dpu_has_one_owner_and_no_replica_is_over_its_bound() {
        for n in [0, 1, 2, 7, 100, 1000, 2500] {
            for r in 1..=7 {
                let (d, rs) = (names("dpu", n), names("ctl", r));
                let a = assign(&refs(&d), &refs(&rs));
                assert_eq!(a.len(), n, "n={n} r={r}");
                let mut load: BTreeMap<&str, usize> = BTreeMap::new();
                for owner in a.values() {
                    assert!(rs.iter().any(|x| x == owner));
                    *load.entry(owner).or_default() += 1;
                }
                let cap = capacity(n, r);
                assert!(
                    load.values().all(|l| *l <= cap),
                    "n={n} r={r} {load:?} cap {cap}"
                );
            }
        }
        assert!(assign(&["dpu-0"], &[]).is_empty());
    }

    /// Every replica computes the same map from the same membership, whatever order it lists
    /// the names in.
    #[test]
    fn the_map_depends_on_the_names_only() {
        let (d, rs) = (names("dpu", 500), names("ctl", 3));
        let a = assign(&refs(&d), &refs(&rs));
        let mut d2 = refs(&d);
        d2.reverse();
        let mut r2 = refs(&rs);
        r2.rotate_left(1);
        assert_eq!(assign(&d2, &r2), a);
    }

    /// A replica joining takes about N / (R + 1) DPUs; one leaving gives up its own and few
    /// more. Modulo hashing would move about N x R / (R + 1).
    #[test]
    fn a_replica_joining_or_leaving_moves_about_n_over_r() {
        let d = names("dpu", 1000);
        for r in 2..=6 {
            let rs = names("ctl", r + 1);
            let before = assign(&refs(&d), &refs(&rs[..r]));
            let after = assign(&refs(&d), &refs(&rs));
            let share = 1000 / (r + 1);
            let joined = moved(&before, &after);
            assert!(
                joined <= 2 * share,
                "r={r}: a join moved {joined}, share {share}"
            );
            let owned_by_new = after.values().filter(|o| **o == rs[r]).count();
            assert!(
                owned_by_new >= share / 2,
                "r={r}: the new one owns {owned_by_new}"
            );
            // And back: the one that leaves gives up what it had, plus a bounded cascade.
            let left = moved(&after, &before);
            assert!(
                left <= 2 * share,
                "r={r}: a leave moved {left}, share {share}"
            );
        }
    }
}
