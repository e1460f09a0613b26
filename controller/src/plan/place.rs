//! Where every wanted volume goes, before anything is planned: its subsystem and NSID.

use std::ops::Range;

use protocol::dpu::{DpuReport, FunctionRef};

use super::{fnv, names, HashMap};
use crate::manifest::{Desired, Volume};

/// Where every wanted volume goes, resolved before planning: its subsystem and NSID, by the
/// volume's position in `desired.volumes` (name order), and the volumes of each DPU. Vectors
/// indexed by position instead of maps keyed by name, and names kept in one string rather
/// than one allocation each: planning 80k volumes is bound by memory lookups, and these are the
/// hot ones.
pub(super) struct Placement<'a> {
    pub(super) volumes: Vec<&'a Volume>,
    /// Each volume's subsystem, as a position in `nqns` (a DPU's volumes share a handful).
    nqn_of: Vec<u32>,
    nqns: Names,
    pub(super) nsid: Vec<u32>,
    pub(super) by_name: HashMap<&'a str, usize>,
    /// DPUs with wanted volumes, sorted by name, each with its volumes: a range of `members`.
    pub(super) by_dpu: Vec<(&'a str, Range<usize>)>,
    /// Volume positions grouped by DPU, each group in name order.
    members: Vec<usize>,
}

impl Placement<'_> {
    /// The subsystem of the volume at position `i`.
    pub(super) fn nqn(&self, i: usize) -> &str {
        self.nqns.get(self.nqn_of[i])
    }

    /// The volumes (positions, in name order) of a DPU's range in [`Placement::by_dpu`].
    pub(super) fn members(&self, r: &Range<usize>) -> &[usize] {
        &self.members[r.clone()]
    }

    /// Whether unistor's bdev `bdev` is wanted on a DPU whose wanted volumes are `wanted`
    /// (positions, in name order), as `nqn`/`nsid` when given.
    pub(super) fn wants(&self, bdev: &str, wanted: &[usize], at: Option<(&str, u32)>) -> bool {
        let Some(name) = names::unprefixed(bdev) else {
            return false;
        };
        // A DPU's handful of volumes, searched in place: no lookup in a fleet-wide map.
        wanted
            .binary_search_by(|&i| self.volumes[i].name.as_str().cmp(name))
            .is_ok_and(|k| {
                let i = wanted[k];
                at.is_none_or(|(nqn, nsid)| self.nsid[i] == nsid && self.nqn(i) == nqn)
            })
    }
}

/// Strings one after the other in one allocation, each found by its position.
#[derive(Default)]
struct Names {
    text: String,
    /// Where each string ends in `text`.
    ends: Vec<u32>,
}

impl Names {
    fn get(&self, at: u32) -> &str {
        let at = at as usize;
        let start = at.checked_sub(1).map_or(0, |p| self.ends[p] as usize);
        &self.text[start..self.ends[at] as usize]
    }

    /// Adds the string `write` appends; returns its position.
    fn push(&mut self, write: impl FnOnce(&mut String)) -> u32 {
        write(&mut self.text);
        self.ends.push(self.text.len() as u32);
        (self.ends.len() - 1) as u32
    }

    /// Appends `other`; returns the position its first string now has.
    fn extend(&mut self, other: Names) -> u32 {
        let (shift, first) = (self.text.len() as u32, self.ends.len() as u32);
        self.text.push_str(&other.text);
        self.ends.extend(other.ends.into_iter().map(|e| e + shift));
        first
    }
}

/// Groups volume positions by their DPU: DPUs in name order, each DPU's volumes in the order
/// given (name order). A counting sort over each volume's DPU position: two allocations, not
/// one per DPU.
fn group_by_dpu<'a>(
    desired: &'a Desired,
    volumes: &[&'a Volume],
) -> (Vec<(&'a str, Range<usize>)>, Vec<usize>) {
    // DPU name -> group: the manifests' DPUs (in name order), then any other a volume names.
    let mut dpus: Vec<&str> = desired.dpus.keys().map(String::as_str).collect();
    let mut group_of: HashMap<&str, u32> = dpus
        .iter()
        .enumerate()
        .map(|(g, n)| (*n, g as u32))
        .collect();
    let known = dpus.len();
    let mut group: Vec<u32> = volumes
        .iter()
        .map(|v| {
            *group_of.entry(v.dpu.as_str()).or_insert_with(|| {
                dpus.push(v.dpu.as_str());
                (dpus.len() - 1) as u32
            })
        })
        .collect();
    if dpus.len() > known {
        // DPUs named only by volumes: every group renumbered into name order.
        let mut order: Vec<u32> = (0..dpus.len() as u32).collect();
        order.sort_unstable_by_key(|&g| dpus[g as usize]);
        let mut rank = vec![0u32; dpus.len()];
        for (r, &g) in order.iter().enumerate() {
            rank[g as usize] = r as u32;
        }
        for g in &mut group {
            *g = rank[*g as usize];
        }
        dpus = order.iter().map(|&g| dpus[g as usize]).collect();
    }
    let mut start = vec![0usize; dpus.len() + 1];
    for &g in &group {
        start[g as usize + 1] += 1;
    }
    for k in 1..start.len() {
        start[k] += start[k - 1];
    }
    let mut next = start.clone();
    let mut members = vec![0; volumes.len()];
    for (i, &g) in group.iter().enumerate() {
        members[next[g as usize]] = i;
        next[g as usize] += 1;
    }
    let by_dpu = dpus
        .iter()
        .enumerate()
        .filter(|&(g, _)| start[g + 1] > start[g])
        .map(|(g, n)| (*n, start[g]..start[g + 1]))
        .collect();
    (by_dpu, members)
}

/// What placing one DPU's volumes decided: per volume (position, NSID, subsystem as a
/// position in `nqns`).
#[derive(Default)]
struct Placed {
    volumes: Vec<(usize, u32, u32)>,
    nqns: Names,
}

/// Resolves every volume's NSID: pinned; else the NSID SNAP already gives its UUID; else derived
/// from its name (probing upwards past taken NSIDs). Volumes are visited in name order, DPUs
/// (independent here) on up to `threads` threads.
pub(super) fn place<'a>(
    desired: &'a Desired,
    reports: &HashMap<&str, &DpuReport>,
    threads: usize,
) -> Placement<'a> {
    let volumes: Vec<&Volume> = desired.volumes.values().collect();
    // Two walks over every volume, independent: one on each of two threads when allowed.
    let by_name = || {
        volumes
            .iter()
            .enumerate()
            .map(|(i, v)| (v.name.as_str(), i))
            .collect()
    };
    let (by_name, (by_dpu, members)) = if threads > 1 {
        rayon::join(by_name, || group_by_dpu(desired, &volumes))
    } else {
        (by_name(), group_by_dpu(desired, &volumes))
    };

    let chunks = super::par_chunks(&by_dpu, threads, |dpus| {
        let mut out = Placed::default();
        // NSIDs taken per function (= per subsystem) of one DPU: a handful each, so a list
        // reused from DPU to DPU rather than maps allocated per DPU.
        let mut taken: Vec<(FunctionRef, u32)> = vec![];
        let mut subsystems: Vec<(FunctionRef, u32)> = vec![];
        for (dpu, range) in dpus {
            let idxs = &members[range.clone()];
            let inv = reports.get(dpu).and_then(|r| r.inventory.as_ref());
            taken.clear();
            subsystems.clear();
            let mut nqn_of = |f: FunctionRef, out: &mut Placed| -> u32 {
                if let Some(&(_, n)) = subsystems.iter().find(|(g, _)| *g == f) {
                    return n;
                }
                let n = out.nqns.push(|s| names::push_nqn(s, dpu, f));
                subsystems.push((f, n));
                n
            };
            for &i in idxs {
                if let Some(n) = volumes[i].nsid {
                    taken.push((volumes[i].function, n));
                    let q = nqn_of(volumes[i].function, &mut out);
                    out.volumes.push((i, n, q));
                }
            }
            for &i in idxs.iter().filter(|&&i| volumes[i].nsid.is_none()) {
                let v = volumes[i];
                let q = nqn_of(v.function, &mut out);
                let nqn = out.nqns.get(q);
                let used = |n: u32| taken.contains(&(v.function, n));
                let sub = inv.and_then(|inv| inv.subsystems.iter().find(|s| s.nqn == *nqn));
                let existing = sub.and_then(|s| {
                    s.namespaces
                        .iter()
                        .find(|n| n.uuid.eq_ignore_ascii_case(&v.uuid))
                        .map(|n| n.nsid)
                });
                let n = match existing.filter(|n| !used(*n)) {
                    Some(n) => n,
                    None => {
                        let foreign =
                            |n: u32| sub.is_some_and(|s| s.namespaces.iter().any(|x| x.nsid == n));
                        let start = (fnv(v.name.as_str()) % 1024) as u32;
                        (0..1024)
                            .map(|k| (start + k) % 1024 + 1)
                            .find(|n| !used(*n) && !foreign(*n))
                            .unwrap_or(1)
                    }
                };
                taken.push((v.function, n));
                out.volumes.push((i, n, q));
            }
        }
        out
    });
    let mut nsid = vec![0; volumes.len()];
    let mut nqn_of = vec![0; volumes.len()];
    let mut nqns = Names::default();
    for chunk in chunks {
        let offset = nqns.extend(chunk.nqns);
        for (i, n, q) in chunk.volumes {
            nsid[i] = n;
            nqn_of[i] = offset + q;
        }
    }
    Placement {
        volumes,
        nqn_of,
        nqns,
        nsid,
        by_name,
        by_dpu,
        members,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volumes_are_grouped_by_dpu_in_name_order_including_dpus_only_volumes_name() {
        let mut d = crate::plan::sim::examples();
        let template = d.volumes.values().next().unwrap().clone();
        let listed: Vec<String> = d.dpus.keys().cloned().collect();
        // Volumes on DPUs the manifests list and on two they do not, before and after them.
        d.volumes.clear();
        for (k, dpu) in [
            "zz-unlisted",
            listed[0].as_str(),
            "aa-unlisted",
            listed[0].as_str(),
        ]
        .into_iter()
        .enumerate()
        {
            let mut v = template.clone();
            let name = format!("vol-{k}");
            v.name = protocol::names::VolumeName::parse("v", &name).unwrap();
            v.dpu = dpu.to_string();
            d.volumes.insert(name, v);
        }
        let volumes: Vec<&Volume> = d.volumes.values().collect();
        let (by_dpu, members) = group_by_dpu(&d, &volumes);
        let groups: Vec<(&str, Vec<&str>)> = by_dpu
            .iter()
            .map(|(dpu, r)| {
                let names = members[r.clone()]
                    .iter()
                    .map(|&i| volumes[i].name.as_str())
                    .collect();
                (*dpu, names)
            })
            .collect();
        let mut want = vec![
            ("aa-unlisted", vec!["vol-2"]),
            (listed[0].as_str(), vec!["vol-1", "vol-3"]),
            ("zz-unlisted", vec!["vol-0"]),
        ];
        want.sort();
        // Listed DPUs without volumes have no group.
        assert_eq!(groups, want);
    }

    #[test]
    fn names_are_found_by_position_after_being_appended() {
        let mut a = Names::default();
        assert_eq!(a.push(|s| s.push_str("one")), 0);
        assert_eq!(a.push(|s| s.push_str("")), 1);
        let mut b = Names::default();
        b.push(|s| s.push_str("three"));
        assert_eq!(a.extend(b), 2);
        assert_eq!([a.get(0), a.get(1), a.get(2)], ["one", "", "three"]);
    }
}
