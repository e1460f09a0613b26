//! The ledger: the SNAP configuration the agent was last told to converge to.
//!
//! Every command that takes effect in SNAP is recorded here (written atomically, `0600`: it holds
//! the cephx key SNAP needs), and the agent replays it into SNAP whenever SNAP has lost objects
//! (a SNAP restart), with the same NSIDs, UUIDs and queue counts, controllers created suspended
//! and resumed only after their namespaces are attached — with or without a controller connected.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use protocol::dpu::{
    BdevSpec, ControllerSpec, NamespaceSpec, QosLimits, RbdCluster, ReplayReport, SnapInventory,
    SubsystemSpec,
};
use serde::{Deserialize, Serialize};

use crate::snap::{has_namespace, Snap};

/// A controller and what was done to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerController {
    /// How it was created.
    pub spec: ControllerSpec,
    /// NSIDs attached to it.
    pub attached: BTreeSet<u32>,
    /// Whether it was resumed (last told to run).
    pub running: bool,
}

/// The desired SNAP configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// Rises with every change.
    pub generation: u64,
    /// Registered clusters by name.
    pub clusters: BTreeMap<String, RbdCluster>,
    /// Bdevs by name.
    pub bdevs: BTreeMap<String, BdevSpec>,
    /// Subsystems by NQN.
    pub subsystems: BTreeMap<String, SubsystemSpec>,
    /// Namespaces by `nqn/nsid`.
    pub namespaces: BTreeMap<String, NamespaceSpec>,
    /// Controllers by name.
    pub controllers: BTreeMap<String, LedgerController>,
    /// QoS limits by bdev (only bdevs with a limit): set again after the bdev on a replay.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub qos: BTreeMap<String, QosLimits>,
    /// The command being applied to SNAP, written before the call (see the module's docs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<Intent>,
}

/// What one command does to SNAP, as the ledger records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Intent {
    /// Register an rbd cluster.
    RegisterCluster(RbdCluster),
    /// Unregister one.
    UnregisterCluster {
        /// Its name.
        name: String,
    },
    /// Create a bdev.
    CreateBdev(BdevSpec),
    /// Delete one.
    DeleteBdev {
        /// Its name.
        name: String,
    },
    /// Create a subsystem.
    CreateSubsystem(SubsystemSpec),
    /// Destroy one.
    DestroySubsystem {
        /// Its NQN.
        nqn: String,
    },
    /// Create a namespace.
    CreateNamespace(NamespaceSpec),
    /// Destroy one.
    DestroyNamespace {
        /// Its subsystem.
        nqn: String,
        /// Its NSID.
        nsid: u32,
    },
    /// Create a controller.
    CreateController(ControllerSpec),
    /// Destroy one.
    DestroyController {
        /// Its name.
        name: String,
    },
    /// Attach (or detach) a namespace.
    Attach {
        /// The controller.
        controller: String,
        /// The NSID.
        nsid: u32,
        /// Attach (true) or detach (false).
        attached: bool,
    },
    /// Set a bdev's QoS limits.
    SetQos {
        /// The bdev.
        name: String,
        /// The limits (all none: lifted).
        limits: QosLimits,
    },
    /// Resume (or suspend) a controller.
    Run {
        /// The controller.
        controller: String,
        /// Resume (true) or suspend (false).
        running: bool,
    },
}

impl Intent {
    /// Records the command as done.
    pub fn record(&self, l: &mut Ledger) {
        match self {
            Intent::RegisterCluster(c) => {
                l.clusters.insert(c.name.clone(), c.clone());
            }
            Intent::UnregisterCluster { name } => {
                l.clusters.remove(name);
            }
            Intent::CreateBdev(b) => {
                l.bdevs.insert(b.name.clone(), b.clone());
            }
            Intent::DeleteBdev { name } => {
                l.bdevs.remove(name);
                l.qos.remove(name);
            }
            Intent::SetQos { name, limits } => {
                if limits.is_none() {
                    l.qos.remove(name);
                } else {
                    l.qos.insert(name.clone(), *limits);
                }
            }
            Intent::CreateSubsystem(s) => {
                l.subsystems.insert(s.nqn.clone(), s.clone());
            }
            Intent::DestroySubsystem { nqn } => {
                l.subsystems.remove(nqn);
            }
            Intent::CreateNamespace(n) => {
                l.namespaces.insert(ns_key(&n.nqn, n.nsid), n.clone());
            }
            Intent::DestroyNamespace { nqn, nsid } => {
                l.namespaces.remove(&ns_key(nqn, *nsid));
            }
            Intent::CreateController(c) => {
                l.controllers
                    .entry(c.name.clone())
                    .or_insert_with(|| LedgerController {
                        spec: c.clone(),
                        attached: Default::default(),
                        running: false,
                    });
            }
            Intent::DestroyController { name } => {
                l.controllers.remove(name);
            }
            Intent::Attach {
                controller,
                nsid,
                attached,
            } => {
                if let Some(c) = l.controllers.get_mut(controller) {
                    if *attached {
                        c.attached.insert(*nsid);
                    } else {
                        c.attached.remove(nsid);
                    }
                }
            }
            Intent::Run {
                controller,
                running,
            } => {
                if let Some(c) = l.controllers.get_mut(controller) {
                    c.running = *running;
                }
            }
        }
    }

    /// Whether SNAP's inventory shows the command's effect (an object of that name present,
    /// or absent for a removal; an attachment or a run state as asked).
    pub fn in_effect(&self, inv: &SnapInventory) -> bool {
        let ctrl = |name: &str| inv.controllers.iter().find(|c| c.name == name);
        match self {
            Intent::RegisterCluster(c) => inv.clusters.contains(&c.name),
            Intent::UnregisterCluster { name } => !inv.clusters.contains(name),
            Intent::CreateBdev(b) => inv.bdevs.iter().any(|x| x.name == b.name),
            Intent::DeleteBdev { name } => !inv.bdevs.iter().any(|x| &x.name == name),
            Intent::SetQos { name, limits } => inv
                .bdevs
                .iter()
                .any(|x| &x.name == name && x.qos == *limits),
            Intent::CreateSubsystem(s) => inv.subsystems.iter().any(|x| x.nqn == s.nqn),
            Intent::DestroySubsystem { nqn } => !inv.subsystems.iter().any(|x| &x.nqn == nqn),
            Intent::CreateNamespace(n) => has_namespace(inv, &n.nqn, n.nsid),
            Intent::DestroyNamespace { nqn, nsid } => !has_namespace(inv, nqn, *nsid),
            Intent::CreateController(c) => ctrl(&c.name).is_some(),
            Intent::DestroyController { name } => ctrl(name).is_none(),
            Intent::Attach {
                controller,
                nsid,
                attached,
            } => ctrl(controller).is_some_and(|c| c.namespaces.contains(nsid)) == *attached,
            Intent::Run {
                controller,
                running,
            } => {
                ctrl(controller).is_some_and(|c| c.state.eq_ignore_ascii_case("STARTED"))
                    == *running
            }
        }
    }
}

/// How a pending intent was settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolution {
    /// SNAP shows it done: recorded.
    Done,
    /// SNAP lost its state: recorded, for the replay to make it so.
    Replayed,
    /// SNAP shows it not done: dropped.
    NotDone,
}

/// Settles `ledger`'s pending intent against SNAP's inventory `inv` (see the module's docs).
pub fn resolve(ledger: &Ledger, inv: &SnapInventory) -> Option<Resolution> {
    let intent = ledger.pending.as_ref()?;
    Some(if intent.in_effect(inv) {
        Resolution::Done
    } else if emptied(ledger, inv) {
        Resolution::Replayed
    } else {
        Resolution::NotDone
    })
}

impl Ledger {
    /// Whether both say SNAP was told the same (the generation and any pending intent aside).
    fn same_told(&self, other: &Ledger) -> bool {
        self.clusters == other.clusters
            && self.bdevs == other.bdevs
            && self.subsystems == other.subsystems
            && self.namespaces == other.namespaces
            && self.controllers == other.controllers
    }
}

/// The key of a namespace in [`Ledger::namespaces`].
pub fn ns_key(nqn: &str, nsid: u32) -> String {
    format!("{nqn}/{nsid}")
}

/// Errors reading or writing the ledger file.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// I/O.
    #[error("ledger {path}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not a ledger. It is left as it is (never overwritten with an empty one).
    #[error("ledger {path} is corrupt; move it aside to start empty")]
    Corrupt {
        /// File.
        path: PathBuf,
        /// Cause.
        #[source]
        source: serde_json::Error,
    },
}

/// The ledger and its file.
#[derive(Debug)]
pub struct LedgerStore {
    path: PathBuf,
    ledger: Ledger,
}

impl LedgerStore {
    /// Loads `path`, or starts empty when it does not exist.
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let ledger = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| LedgerError::Corrupt {
                path: path.to_path_buf(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ledger::default(),
            Err(source) => {
                return Err(LedgerError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Ok(Self {
            path: path.to_path_buf(),
            ledger,
        })
    }

    /// The ledger.
    pub fn get(&self) -> &Ledger {
        &self.ledger
    }

    /// Applies `change` and persists it (temp file in the same directory, then rename). A change
    /// that leaves the ledger as it was writes nothing.
    pub fn update(&mut self, change: impl FnOnce(&mut Ledger)) -> Result<(), LedgerError> {
        let mut next = self.ledger.clone();
        change(&mut next);
        next.generation = self.ledger.generation;
        if next == self.ledger {
            return Ok(());
        }
        // The generation counts changes of what SNAP was told; an intent written ahead or
        // dropped is not one.
        if !next.same_told(&self.ledger) {
            next.generation += 1;
        }
        let bytes = serde_json::to_vec_pretty(&next).expect("serializable");
        agent_kit::fsutil::write_atomic(&self.path, &bytes).map_err(|source| LedgerError::Io {
            path: self.path.clone(),
            source,
        })?;
        self.ledger = next;
        Ok(())
    }

    /// Writes `intent` ahead of its SNAP call.
    pub fn begin(&mut self, intent: Intent) -> Result<(), LedgerError> {
        self.update(|l| l.pending = Some(intent))
    }

    /// Settles the pending intent: recorded when `done`, dropped otherwise.
    pub fn settle(&mut self, done: bool) -> Result<(), LedgerError> {
        self.update(|l| {
            if let Some(i) = l.pending.take() {
                if done {
                    i.record(l);
                }
            }
        })
    }
}

/// Ledger objects that SNAP does not have (or has in another state), as readable names.
pub fn missing(ledger: &Ledger, inv: &SnapInventory) -> Vec<String> {
    let mut out = vec![];
    for name in ledger.clusters.keys() {
        if !inv.clusters.contains(name) {
            out.push(format!("rbd cluster {name}"));
        }
    }
    for name in ledger.bdevs.keys() {
        if !inv.bdevs.iter().any(|b| &b.name == name) {
            out.push(format!("bdev {name}"));
        }
    }
    for nqn in ledger.subsystems.keys() {
        if !inv.subsystems.iter().any(|s| &s.nqn == nqn) {
            out.push(format!("subsystem {nqn}"));
        }
    }
    for (name, q) in &ledger.qos {
        if inv.bdevs.iter().any(|b| &b.name == name && b.qos != *q) {
            out.push(format!("qos of bdev {name}"));
        }
    }
    for n in ledger.namespaces.values() {
        if !has_namespace(inv, &n.nqn, n.nsid) {
            out.push(format!("namespace {}/{}", n.nqn, n.nsid));
        }
    }
    for (name, c) in &ledger.controllers {
        match inv.controllers.iter().find(|x| &x.name == name) {
            None => out.push(format!("controller {name}")),
            Some(have) => {
                for nsid in &c.attached {
                    if !have.namespaces.contains(nsid) {
                        out.push(format!("attachment {name}/{nsid}"));
                    }
                }
                if c.running && !have.state.eq_ignore_ascii_case("STARTED") {
                    out.push(format!("running controller {name}"));
                }
            }
        }
    }
    out
}

/// Whether SNAP holds none of the objects the ledger says it was told about (and it was told
/// some): it restarted, or was reset, and lost its in-memory state.
pub fn emptied(ledger: &Ledger, inv: &SnapInventory) -> bool {
    let told = !ledger.clusters.is_empty()
        || !ledger.bdevs.is_empty()
        || !ledger.subsystems.is_empty()
        || !ledger.controllers.is_empty();
    told && !ledger.clusters.keys().any(|n| inv.clusters.contains(n))
        && !ledger
            .bdevs
            .keys()
            .any(|n| inv.bdevs.iter().any(|b| &b.name == n))
        && !ledger
            .subsystems
            .keys()
            .any(|q| inv.subsystems.iter().any(|s| &s.nqn == q))
        && !ledger
            .controllers
            .keys()
            .any(|c| inv.controllers.iter().any(|x| &x.name == c))
}

/// Re-creates in SNAP everything in the ledger, in dependency order: clusters, bdevs, subsystems,
/// namespaces (same NSID and UUID), controllers (suspended, same queues), attachments, and only
/// then resumes the controllers that were running. One failure does not stop the rest, except
/// that a controller is not resumed unless all its namespaces are attached.
pub async fn replay(snap: &Snap, ledger: &Ledger, reason: String) -> ReplayReport {
    let mut restored = vec![];
    let mut failed = vec![];
    let mut record = |what: String, r: Result<crate::snap::Done, crate::snap::OpError>| match r {
        Ok(crate::snap::Done::Changed) => restored.push(what),
        Ok(crate::snap::Done::Unchanged) => {}
        Err(e) => failed.push(format!("{what}: {}", protocol::error::chain(&e))),
    };
    for c in ledger.clusters.values() {
        record(
            format!("rbd cluster {}", c.name),
            snap.register_cluster(c).await,
        );
    }
    for b in ledger.bdevs.values() {
        record(format!("bdev {}", b.name), snap.create_bdev(b).await);
    }
    for (name, q) in &ledger.qos {
        record(format!("qos of bdev {name}"), snap.set_qos(name, *q).await);
    }
    for s in ledger.subsystems.values() {
        record(
            format!("subsystem {}", s.nqn),
            snap.create_subsystem(s).await,
        );
    }
    for n in ledger.namespaces.values() {
        record(
            format!("namespace {}/{}", n.nqn, n.nsid),
            snap.create_namespace(n).await,
        );
    }
    for (name, c) in &ledger.controllers {
        record(
            format!("controller {name}"),
            snap.create_controller(&c.spec).await,
        );
    }
    for (name, c) in &ledger.controllers {
        let mut all_attached = true;
        for nsid in &c.attached {
            let r = snap.attach(name, *nsid).await;
            all_attached &= r.is_ok();
            record(format!("attachment {name}/{nsid}"), r);
        }
        if c.running && all_attached {
            record(
                format!("running controller {name}"),
                snap.set_running(name, true).await,
            );
        }
    }
    ReplayReport {
        at_unix_ms: protocol::clock::unix_ms(),
        reason,
        restored,
        failed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn updates_persist_and_unchanged_updates_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.json");
        let mut s = LedgerStore::open(&path).unwrap();
        s.update(|l| {
            l.subsystems.insert(
                "nqn.x:0".into(),
                SubsystemSpec {
                    nqn: "nqn.x:0".into(),
                    serial: "S".into(),
                    model: "M".into(),
                    max_namespaces: 8,
                },
            );
        })
        .unwrap();
        assert_eq!(s.get().generation, 1);
        s.update(|_| {}).unwrap();
        assert_eq!(s.get().generation, 1);
        let again = LedgerStore::open(&path).unwrap();
        assert_eq!(again.get(), s.get());
        std::fs::write(&path, b"{not json").unwrap();
        assert!(matches!(
            LedgerStore::open(&path),
            Err(LedgerError::Corrupt { .. })
        ));
    }

    fn subsystem(nqn: &str) -> SubsystemSpec {
        SubsystemSpec {
            nqn: nqn.into(),
            serial: "S".into(),
            model: "M".into(),
            max_namespaces: 8,
        }
    }

    fn inventory(nqns: &[&str]) -> SnapInventory {
        SnapInventory {
            functions: vec![],
            subsystems: nqns
                .iter()
                .map(|n| protocol::dpu::SubsystemInfo {
                    nqn: n.to_string(),
                    serial: "S".into(),
                    model: "M".into(),
                    namespaces: vec![],
                })
                .collect(),
            controllers: vec![],
            bdevs: vec![],
            clusters: vec![],
        }
    }

    /// Every outcome of a command whose answer never came, for a create and a removal.
    #[test]
    fn a_pending_intent_is_settled_by_what_snap_shows() {
        let mut told = Ledger::default();
        Intent::CreateSubsystem(subsystem("nqn.x:old")).record(&mut told);
        let with = |i: Intent| Ledger {
            pending: Some(i),
            ..told.clone()
        };
        let create = with(Intent::CreateSubsystem(subsystem("nqn.x:new")));
        let remove = with(Intent::DestroySubsystem {
            nqn: "nqn.x:old".into(),
        });
        let r = |l: &Ledger, inv: &[&str]| resolve(l, &inventory(inv)).unwrap();
        // SNAP did it.
        assert_eq!(r(&create, &["nqn.x:old", "nqn.x:new"]), Resolution::Done);
        assert_eq!(r(&remove, &[]), Resolution::Done);
        // SNAP never got it (it still holds what it was told before).
        assert_eq!(r(&create, &["nqn.x:old"]), Resolution::NotDone);
        assert_eq!(r(&remove, &["nqn.x:old"]), Resolution::NotDone);
        // SNAP restarted and lost everything: the create is kept for the replay.
        assert_eq!(r(&create, &[]), Resolution::Replayed);
        assert_eq!(resolve(&told, &inventory(&[])), None);

        // Settling writes it (or not), clears it, and only a recorded change is a generation.
        let dir = tempfile::tempdir().unwrap();
        let mut s = LedgerStore::open(&dir.path().join("l.json")).unwrap();
        s.update(|l| *l = told.clone()).unwrap();
        let g = s.get().generation;
        s.begin(Intent::CreateSubsystem(subsystem("nqn.x:new")))
            .unwrap();
        assert_eq!(s.get().generation, g, "an intent is not a change");
        let reopened = LedgerStore::open(&dir.path().join("l.json")).unwrap();
        assert!(reopened.get().pending.is_some(), "written ahead, on disk");
        s.settle(false).unwrap();
        assert_eq!(
            (s.get().pending.is_none(), s.get().subsystems.len()),
            (true, 1)
        );
        s.begin(Intent::CreateSubsystem(subsystem("nqn.x:new")))
            .unwrap();
        s.settle(true).unwrap();
        assert_eq!((s.get().subsystems.len(), s.get().generation), (2, g + 1));
    }

    /// QoS limits are kept per bdev (lifted ones dropped), shown missing while SNAP's differ,
    /// in effect once SNAP shows them, and go with their bdev.
    #[test]
    fn qos_limits_are_kept_with_their_bdev_and_missing_while_snap_differs() {
        let q = QosLimits {
            rw_ios_per_sec: 2000,
            ..Default::default()
        };
        let mut l = Ledger::default();
        let bdev = BdevSpec {
            name: "b".into(),
            cluster: "c".into(),
            pool: "rbd".into(),
            image: "i".into(),
            block_size: 512,
        };
        Intent::CreateBdev(bdev).record(&mut l);
        let set = Intent::SetQos {
            name: "b".into(),
            limits: q,
        };
        set.record(&mut l);
        assert_eq!(l.qos.get("b"), Some(&q));
        let mut inv = SnapInventory::default();
        inv.bdevs.push(protocol::dpu::BdevInfo {
            name: "b".into(),
            pool: Some("rbd".into()),
            image: Some("i".into()),
            cluster: Some("c".into()),
            block_size: 512,
            num_blocks: 8,
            qos: QosLimits::default(),
        });
        inv.clusters.push("c".into());
        assert!(!set.in_effect(&inv));
        assert_eq!(missing(&l, &inv), ["qos of bdev b"]);
        inv.bdevs[0].qos = q;
        assert!(set.in_effect(&inv));
        assert!(missing(&l, &inv).is_empty());
        Intent::SetQos {
            name: "b".into(),
            limits: QosLimits::default(),
        }
        .record(&mut l);
        assert!(l.qos.is_empty(), "lifted: nothing to replay");
        set.record(&mut l);
        Intent::DeleteBdev { name: "b".into() }.record(&mut l);
        assert!(l.qos.is_empty(), "gone with its bdev");
    }
}
