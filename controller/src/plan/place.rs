//! Where every wanted volume goes, before anything is planned: its subsystem and NSID.

use protocol::dpu::{DpuReport, FunctionRef};

use super::{fnv, names, HashMap};
use crate::manifest::{Desired, Volume};

/// Where every wanted volume goes, resolved before planning: its subsystem and NSID, by the
/// volume's position in `desired.volumes` (name order), and the volumes of each DPU. Vectors
/// indexed by position instead of maps keyed by name: planning 80k volumes is bound by memory
/// lookups, and these are the hot ones.
pub(super) struct Placement<'a> {
    pub(super) volumes: Vec<&'a Volume>,
    pub(super) nqn: Vec<String>,
    pub(super) nsid: Vec<u32>,
    pub(super) by_name: HashMap<&'a str, usize>,
    /// DPU name -> its volumes (positions, in name order); sorted by DPU name.
    pub(super) by_dpu: Vec<(&'a str, Vec<usize>)>,
}

impl Placement<'_> {
    /// Whether unistor's bdev `bdev` is wanted on `dpu` (as `nqn`/`nsid` when given).
    pub(super) fn wants(&self, bdev: &str, dpu: &str, at: Option<(&str, u32)>) -> bool {
        names::unprefixed(bdev)
            .and_then(|v| self.by_name.get(v))
            .is_some_and(|&i| {
                self.volumes[i].dpu == dpu
                    && at.is_none_or(|(nqn, nsid)| self.nqn[i] == nqn && self.nsid[i] == nsid)
            })
    }
}

/// Resolves every volume's NSID: pinned; else the NSID SNAP already gives its UUID; else derived
/// from its name (probing upwards past taken NSIDs). Volumes are visited in name order.
pub(super) fn place<'a>(
    desired: &'a Desired,
    reports: &HashMap<&str, &DpuReport>,
) -> Placement<'a> {
    let volumes: Vec<&Volume> = desired.volumes.values().collect();
    let nqn: Vec<String> = volumes
        .iter()
        .map(|v| names::nqn(&v.dpu, v.function))
        .collect();
    let by_name = volumes
        .iter()
        .enumerate()
        .map(|(i, v)| (v.name.as_str(), i))
        .collect();
    let mut groups: HashMap<&str, Vec<usize>> = HashMap::default();
    for (i, v) in volumes.iter().enumerate() {
        groups.entry(v.dpu.as_str()).or_default().push(i);
    }
    let mut by_dpu: Vec<(&str, Vec<usize>)> = groups.into_iter().collect();
    by_dpu.sort_unstable_by(|a, b| a.0.cmp(b.0));

    let mut nsid = vec![0; volumes.len()];
    // NSIDs taken per function (= per subsystem) of one DPU: a handful each, so a list reused
    // from DPU to DPU rather than maps allocated per DPU.
    let mut taken: Vec<(FunctionRef, u32)> = vec![];
    for (dpu, idxs) in &by_dpu {
        let inv = reports.get(dpu).and_then(|r| r.inventory.as_ref());
        taken.clear();
        for &i in idxs {
            if let Some(n) = volumes[i].nsid {
                taken.push((volumes[i].function, n));
                nsid[i] = n;
            }
        }
        for &i in idxs.iter().filter(|&&i| volumes[i].nsid.is_none()) {
            let v = volumes[i];
            let used = |n: u32| taken.contains(&(v.function, n));
            let sub = inv.and_then(|inv| inv.subsystems.iter().find(|s| s.nqn == nqn[i]));
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
            nsid[i] = n;
        }
    }
    Placement {
        volumes,
        nqn,
        nsid,
        by_name,
        by_dpu,
    }
}
