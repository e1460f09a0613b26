//! Where a DPU's wanted volumes go, before anything is planned there: each one's subsystem and
//! NSID.

use std::ops::Range;

use protocol::dpu::{FunctionRef, SnapInventory};

use super::{fnv, names, HashMap};
use crate::manifest::{Desired, Volume};

/// Where one DPU's wanted volumes go: each one's subsystem (its function's) and NSID, by its
/// place in the DPU's list. Made afresh for each DPU in the same allocations; NQNs are never
/// formatted to be compared (only for a step or a message): planning 80k volumes is bound by
/// memory, and a converged plan allocates nothing per volume.
#[derive(Default)]
pub(super) struct DpuPlacement<'a> {
    dpu: &'a str,
    /// Every wanted volume of the fleet, in name order.
    volumes: &'a [&'a Volume],
    /// This DPU's (positions in `volumes`, in name order).
    wanted: &'a [usize],
    nsid: Vec<u32>,
    /// NSIDs taken per function (= per subsystem): a handful each, a list kept from DPU to DPU.
    taken: Vec<(FunctionRef, u32)>,
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

    /// The NSID of the `k`-th wanted volume.
    pub(super) fn nsid(&self, k: usize) -> u32 {
        self.nsid[k]
    }

    /// The function whose subsystem `nqn` is, when a wanted volume is on it.
    pub(super) fn function_of(&self, nqn: &str) -> Option<FunctionRef> {
        (0..self.len())
            .map(|k| self.volume(k).function)
            .find(|&f| names::is_nqn(nqn, self.dpu, f))
    }

    /// Whether the namespace `nsid` of function `f`'s subsystem (from
    /// [`DpuPlacement::function_of`]) over unistor's bdev `bdev` is wanted: found by function
    /// and NSID, then its name compared.
    pub(super) fn wants_namespace(&self, bdev: &str, f: Option<FunctionRef>, nsid: u32) -> bool {
        let (Some(f), Some(name)) = (f, names::unprefixed(bdev)) else {
            return false;
        };
        (0..self.len()).any(|k| {
            let v = self.volume(k);
            v.function == f && self.nsid[k] == nsid && v.name.as_str() == name
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
        dpu: &'a str,
        volumes: &'a [&'a Volume],
        wanted: &'a [usize],
        inv: Option<&SnapInventory>,
    ) {
        self.dpu = dpu;
        self.volumes = volumes;
        self.wanted = wanted;
        self.nsid.clear();
        self.nsid.resize(wanted.len(), 0);
        self.taken.clear();
        for (k, &i) in wanted.iter().enumerate() {
            if let Some(n) = volumes[i].nsid {
                self.taken.push((volumes[i].function, n));
                self.nsid[k] = n;
            }
        }
        for (k, &i) in wanted.iter().enumerate() {
            let v = volumes[i];
            if v.nsid.is_some() {
                continue;
            }
            let taken = &self.taken;
            let used = |n: u32| taken.contains(&(v.function, n));
            let sub = inv.and_then(|inv| {
                inv.subsystems
                    .iter()
                    .find(|s| names::is_nqn(&s.nqn, dpu, v.function))
            });
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
}
