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
    /// Each volume's subsystem, as a position in `nqns` (a DPU's volumes share a handful).
    nqn_of: Vec<u32>,
    nqns: Vec<String>,
    pub(super) nsid: Vec<u32>,
    pub(super) by_name: HashMap<&'a str, usize>,
    /// DPU name -> its volumes (positions, in name order); sorted by DPU name.
    pub(super) by_dpu: Vec<(&'a str, Vec<usize>)>,
}

impl Placement<'_> {
    /// The subsystem of the volume at position `i`.
    pub(super) fn nqn(&self, i: usize) -> &str {
        &self.nqns[self.nqn_of[i] as usize]
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

/// What placing one DPU's volumes decided: per volume (position, NSID, subsystem as a
/// position in `nqns`).
#[derive(Default)]
struct Placed {
    volumes: Vec<(usize, u32, u32)>,
    nqns: Vec<String>,
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
    let by_dpu = || {
        let mut groups: HashMap<&str, Vec<usize>> = HashMap::default();
        for (i, v) in volumes.iter().enumerate() {
            groups.entry(v.dpu.as_str()).or_default().push(i);
        }
        let mut by_dpu: Vec<(&str, Vec<usize>)> = groups.into_iter().collect();
        by_dpu.sort_unstable_by(|a, b| a.0.cmp(b.0));
        by_dpu
    };
    let (by_name, by_dpu) = if threads > 1 {
        rayon::join(by_name, by_dpu)
    } else {
        (by_name(), by_dpu())
    };

    let chunks = super::par_chunks(&by_dpu, threads, |dpus| {
        let mut out = Placed::default();
        // NSIDs taken per function (= per subsystem) of one DPU: a handful each, so a list
        // reused from DPU to DPU rather than maps allocated per DPU.
        let mut taken: Vec<(FunctionRef, u32)> = vec![];
        let mut subsystems: Vec<(FunctionRef, u32)> = vec![];
        for (dpu, idxs) in dpus {
            let inv = reports.get(dpu).and_then(|r| r.inventory.as_ref());
            taken.clear();
            subsystems.clear();
            let mut nqn_of = |f: FunctionRef, out: &mut Placed| -> u32 {
                if let Some(&(_, n)) = subsystems.iter().find(|(g, _)| *g == f) {
                    return n;
                }
                let n = out.nqns.len() as u32;
                out.nqns.push(names::nqn(dpu, f));
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
                let nqn = &out.nqns[q as usize];
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
    let mut nqns = vec![];
    for chunk in chunks {
        let offset = nqns.len() as u32;
        for (i, n, q) in chunk.volumes {
            nsid[i] = n;
            nqn_of[i] = offset + q;
        }
        nqns.extend(chunk.nqns);
    }
    Placement {
        volumes,
        nqn_of,
        nqns,
        nsid,
        by_name,
        by_dpu,
    }
}
