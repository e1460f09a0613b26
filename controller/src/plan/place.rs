//! Where a DPU's wanted volumes go, before anything is planned there: each one's subsystem and
//! NSID.

use std::ops::Range;

use protocol::dpu::{FunctionRef, SnapInventory};

use super::{fnv, names, HashMap};
use crate::manifest::{Desired, Volume};

/// Where one DPU's wanted volumes go: each one's subsystem and NSID, by its place in the DPU's
/// list. Made afresh for each DPU in the same allocations, and names kept in one string rather
/// than one allocation each: planning 80k volumes is bound by memory lookups.
#[derive(Default)]
pub(super) struct DpuPlacement<'a> {
    /// Every wanted volume of the fleet, in name order.
    volumes: &'a [&'a Volume],
    /// This DPU's (positions in `volumes`, in name order).
    wanted: &'a [usize],
    nsid: Vec<u32>,
    /// Each volume's subsystem, as a position in `nqns` (a DPU's volumes share a handful).
    nqn_of: Vec<u32>,
    nqns: Names,
    /// NSIDs taken per function (= per subsystem): a handful each, a list kept from DPU to DPU.
    taken: Vec<(FunctionRef, u32)>,
    /// Each function's subsystem, as a position in `nqns`.
    subsystems: Vec<(FunctionRef, u32)>,
}

impl<'a> DpuPlacement<'a> {
    /// How many volumes the DPU wants.
    pub(super) fn len(&self) -> usize {
        self.wanted.len()
    }

    /// The `k`-th wanted volume (name order).
    pub(super) fn volume(&self, k: usize) -> &'a Volume {
        self.volumes[self.wanted[k]]
    }

    /// The subsystem of the `k`-th wanted volume.
    pub(super) fn nqn(&self, k: usize) -> &str {
        self.nqns.get(self.nqn_of[k])
    }

    /// The NSID of the `k`-th wanted volume.
    pub(super) fn nsid(&self, k: usize) -> u32 {
        self.nsid[k]
    }

    /// Subsystem `nqn`, as a position among the wanted volumes' (none when no wanted volume
    /// is in it).
    pub(super) fn subsystem_of(&self, nqn: &str) -> Option<u32> {
        (0..self.nqns.len() as u32).find(|&q| self.nqns.get(q) == nqn)
    }

    /// Whether the namespace `nsid` of subsystem `q` (from [`DpuPlacement::subsystem_of`]) over
    /// unistor's bdev `bdev` is wanted: found by subsystem and NSID, then its name compared.
    pub(super) fn wants_namespace(&self, bdev: &str, q: Option<u32>, nsid: u32) -> bool {
        let (Some(q), Some(name)) = (q, names::unprefixed(bdev)) else {
            return false;
        };
        (0..self.len()).any(|k| {
            self.nqn_of[k] == q && self.nsid[k] == nsid && self.volume(k).name.as_str() == name
        })
    }

    /// The position of unistor's bdev `bdev` among the wanted volumes, if it is wanted here;
    /// position `hint` is tried first (SNAP lists bdevs in the order they were made, which is
    /// usually name order).
    pub(super) fn bdev_position(&self, bdev: &str, hint: usize) -> Option<usize> {
        let name = names::unprefixed(bdev)?;
        if hint < self.len() && self.volume(hint).name.as_str() == name {
            return Some(hint);
        }
        // A DPU's handful of volumes, searched in place: no lookup in a fleet-wide map.
        self.wanted
            .binary_search_by(|&i| self.volumes[i].name.as_str().cmp(name))
            .ok()
    }

    /// Places DPU `dpu`'s volumes `wanted` (positions in `volumes`, in name order) against its
    /// inventory `inv`: NSID pinned; else the NSID SNAP already gives its UUID; else derived from
    /// its name (probing upwards past taken NSIDs).
    pub(super) fn place(
        &mut self,
        dpu: &str,
        volumes: &'a [&'a Volume],
        wanted: &'a [usize],
        inv: Option<&SnapInventory>,
    ) {
        self.volumes = volumes;
        self.wanted = wanted;
        self.nsid.clear();
        self.nsid.resize(wanted.len(), 0);
        self.nqn_of.clear();
        self.nqn_of.resize(wanted.len(), 0);
        self.nqns.clear();
        self.taken.clear();
        self.subsystems.clear();
        for (k, &i) in wanted.iter().enumerate() {
            let v = volumes[i];
            if let Some(n) = v.nsid {
                self.taken.push((v.function, n));
                self.nsid[k] = n;
                self.nqn_of[k] = self.subsystem(dpu, v.function);
            }
        }
        for (k, &i) in wanted.iter().enumerate() {
            let v = volumes[i];
            if v.nsid.is_some() {
                continue;
            }
            let q = self.subsystem(dpu, v.function);
            self.nqn_of[k] = q;
            let nqn = self.nqns.get(q);
            let taken = &self.taken;
            let used = |n: u32| taken.contains(&(v.function, n));
            let sub = inv.and_then(|inv| inv.subsystems.iter().find(|s| s.nqn == nqn));
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
            self.taken.push((v.function, n));
            self.nsid[k] = n;
        }
    }

    /// Function `f`'s subsystem on DPU `dpu`, as a position in `nqns`.
    fn subsystem(&mut self, dpu: &str, f: FunctionRef) -> u32 {
        if let Some(&(_, n)) = self.subsystems.iter().find(|(g, _)| *g == f) {
            return n;
        }
        let n = self.nqns.push(|s| names::push_nqn(s, dpu, f));
        self.subsystems.push((f, n));
        n
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

    fn len(&self) -> usize {
        self.ends.len()
    }

    fn clear(&mut self) {
        self.text.clear();
        self.ends.clear();
    }
}

/// Groups volume positions by their DPU: DPUs in name order, each DPU's volumes in the order
/// given (name order). A counting sort over each volume's DPU position: two allocations, not
/// one per DPU.
pub(super) fn group_by_dpu<'a>(
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
        assert_eq!(a.push(|s| s.push_str("three")), 2);
        assert_eq!([a.get(0), a.get(1), a.get(2)], ["one", "", "three"]);
        assert_eq!(a.len(), 3);
        a.clear();
        assert_eq!(a.push(|s| s.push_str("again")), 0);
        assert_eq!(a.get(0), "again");
    }
}
