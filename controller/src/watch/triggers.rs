//! Why the daemon reconciles: typed reasons on a bounded queue, coalesced by the queue.
//!
//! Senders never wait: a full queue sets an overflow flag instead, and the next batch then
//! carries [`Reason::Overflow`] (every agent read again), so no trigger is ever lost, and a
//! storm of them costs a bounded amount of memory. The reconciler takes everything queued at
//! once ([`Queue::next`]): what arrives while a reconcile runs is the next one's batch — no
//! fixed sleep decides how long to wait.
//!
//! A reason that the last reconcile already answered is dropped ([`Answered`]): an agent's
//! report pushed while a pass ran, which the pass then read again anyway (the echo of its own
//! steps), does not cost another reconcile.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use protocol::dpu::ReportOrder;
use tokio::sync::mpsc;

use crate::plan::{Known, Observed, Target};

/// How many reasons wait at most before the queue overflows into one full re-read.
pub const CAPACITY: usize = 4096;

/// Why a reconcile runs.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// A valid new set of manifests was loaded.
    ManifestsChanged {
        /// Its generation.
        generation: u64,
    },
    /// A session with an agent started (it is read from scratch).
    AgentConnected(Target),
    /// A session with an agent ended (its objects become Unknown).
    AgentLost(Target),
    /// A cluster's agent said its view moved to this generation.
    ClusterChanged {
        /// The cluster.
        cluster: String,
        /// The agent's view generation.
        generation: u64,
    },
    /// A DPU pushed a report that changes what a plan decides on.
    DpuChanged {
        /// The DPU.
        dpu: String,
        /// That report's number.
        order: ReportOrder,
    },
    /// A DPU's SNAP lost its state and the agent replayed its ledger.
    SnapReplayed(Target),
    /// Asked for over the API: every agent read again first.
    Requested,
    /// An object was suspended or resumed over the API.
    Suspension {
        /// `volume/NAME` or `dpu/NAME`.
        object: String,
        /// Suspended (true) or resumed.
        on: bool,
    },
    /// The periodic resync: manifests and every agent read again.
    Resync,
    /// The retry of an unfinished reconcile.
    Retry,
    /// The queue overflowed: every agent read again.
    Overflow,
    /// This replica's shards changed (taken over or given up).
    Shards,
    /// A volume's snapshot schedule is due.
    Schedule,
}

impl Reason {
    /// Whether the reconcile it triggers reads every agent again first.
    pub fn rereads_all(&self) -> bool {
        matches!(
            self,
            Reason::Requested | Reason::Resync | Reason::Overflow | Reason::Shards
        )
    }

    /// The kind, as a metrics label and in a span.
    pub fn kind(&self) -> &'static str {
        match self {
            Reason::ManifestsChanged { .. } => "manifests",
            Reason::AgentConnected(_) => "agent_connected",
            Reason::AgentLost(_) => "agent_lost",
            Reason::ClusterChanged { .. } => "cluster_changed",
            Reason::DpuChanged { .. } => "dpu_changed",
            Reason::SnapReplayed(_) => "snap_replayed",
            Reason::Requested => "requested",
            Reason::Suspension { .. } => "suspension",
            Reason::Resync => "resync",
            Reason::Retry => "retry",
            Reason::Overflow => "overflow",
            Reason::Shards => "shards",
            Reason::Schedule => "schedule",
        }
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::ManifestsChanged { generation } => {
                write!(f, "manifests changed (generation {generation})")
            }
            Reason::AgentConnected(t) => write!(f, "{t} connected"),
            Reason::AgentLost(t) => write!(f, "{t} disconnected"),
            Reason::ClusterChanged { cluster, .. } => write!(f, "cluster/{cluster}: state changed"),
            Reason::DpuChanged { dpu, .. } => write!(f, "dpu/{dpu}: state changed"),
            Reason::SnapReplayed(t) => write!(f, "{t}: SNAP replayed"),
            Reason::Requested => f.write_str("requested over the API"),
            Reason::Suspension { object, on } => {
                write!(f, "{object} {}", if *on { "suspended" } else { "resumed" })
            }
            Reason::Resync => f.write_str("periodic resync"),
            Reason::Retry => f.write_str("retry of an unfinished reconcile"),
            Reason::Overflow => f.write_str("trigger queue overflowed"),
            Reason::Shards => f.write_str("this replica's shards changed"),
            Reason::Schedule => f.write_str("a snapshot schedule is due"),
        }
    }
}

/// The sending side; cheap to clone.
#[derive(Debug, Clone)]
pub struct Triggers {
    tx: mpsc::Sender<Reason>,
    overflowed: Arc<AtomicBool>,
}

/// The receiving side: the reconciler's.
#[derive(Debug)]
pub struct Queue {
    rx: mpsc::Receiver<Reason>,
    overflowed: Arc<AtomicBool>,
}

/// A queue of at most `capacity` reasons.
pub fn queue(capacity: usize) -> (Triggers, Queue) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let overflowed = Arc::new(AtomicBool::new(false));
    (
        Triggers {
            tx,
            overflowed: overflowed.clone(),
        },
        Queue { rx, overflowed },
    )
}

impl Triggers {
    /// Queues `reason`; never waits. A full queue records the overflow instead (the next batch
    /// reads every agent again); a closed one (the daemon is stopping) drops it.
    pub fn send(&self, reason: Reason) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(reason) {
            self.overflowed.store(true, Ordering::Release);
        }
    }
}

impl Queue {
    /// Waits for a reason, then takes every other one queued: one batch, each reason once.
    /// None when every sender is gone.
    pub async fn next(&mut self) -> Option<BTreeSet<Reason>> {
        let first = self.rx.recv().await?;
        let mut batch = BTreeSet::from([first]);
        self.drain_into(&mut batch);
        Some(batch)
    }

    /// Adds whatever is queued now to `batch` (without waiting).
    pub fn drain_into(&mut self, batch: &mut BTreeSet<Reason>) {
        while let Ok(r) = self.rx.try_recv() {
            batch.insert(r);
        }
        if self.overflowed.swap(false, Ordering::AcqRel) {
            batch.insert(Reason::Overflow);
        }
    }
}

/// What the last reconcile planned on: the number of each DPU's report, and each cluster's
/// view generation. A change no newer than these was already answered.
#[derive(Debug, Default)]
pub struct Answered {
    dpus: BTreeMap<String, ReportOrder>,
    clusters: BTreeMap<String, u64>,
}

impl Answered {
    /// Remembers what `observed` holds (the state the last plan of a reconcile was made on) and
    /// the clusters' generations.
    pub fn record(&mut self, observed: &Observed, clusters: BTreeMap<String, u64>) {
        self.dpus = observed
            .dpus
            .iter()
            .filter_map(|(n, k)| match k {
                Known::Known { report } => Some((n.clone(), report.order)),
                Known::Unknown { .. } => None,
            })
            .collect();
        self.clusters = clusters;
    }

    /// Whether the last reconcile already planned on `reason`'s news: a DPU report no newer
    /// than the one it read (same agent process), a cluster generation it had read.
    pub fn covers(&self, reason: &Reason) -> bool {
        match reason {
            Reason::DpuChanged { dpu, order } => self.dpus.get(dpu).is_some_and(|held| {
                order.instance != 0 && order.instance == held.instance && order.seq <= held.seq
            }),
            Reason::ClusterChanged {
                cluster,
                generation,
            } => self.clusters.get(cluster).is_some_and(|g| g >= generation),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::dpu::DpuReport;

    fn report(instance: u64, seq: u64) -> DpuReport {
        DpuReport {
            order: ReportOrder { instance, seq },
            ..crate::plan::sim::bare_dpu()
        }
    }

    #[tokio::test]
    async fn a_batch_takes_everything_queued_once_and_an_overflow_loses_nothing() {
        let (tx, mut q) = queue(4);
        let dpu = Target::Dpu("d".into());
        for _ in 0..3 {
            tx.send(Reason::AgentConnected(dpu.clone()));
        }
        tx.send(Reason::Requested);
        let batch = q.next().await.unwrap();
        assert_eq!(
            batch,
            BTreeSet::from([Reason::AgentConnected(dpu.clone()), Reason::Requested])
        );
        // Ten reasons into a queue of four: the rest become one Overflow (a full re-read).
        for g in 0..10 {
            tx.send(Reason::ManifestsChanged { generation: g });
        }
        let batch = q.next().await.unwrap();
        assert_eq!(batch.len(), 5, "{batch:?}");
        assert!(batch.contains(&Reason::Overflow));
        assert!(batch.iter().any(Reason::rereads_all));
        drop(tx);
        assert_eq!(q.next().await, None);
    }

    #[test]
    fn a_change_the_last_reconcile_read_is_answered_and_a_newer_one_is_not() {
        let mut observed = Observed::default();
        observed.dpus.insert(
            "d".into(),
            Known::Known {
                report: Arc::new(report(7, 10)),
            },
        );
        let mut a = Answered::default();
        a.record(&observed, BTreeMap::from([("c".to_string(), 5)]));
        let dpu = |instance, seq| Reason::DpuChanged {
            dpu: "d".into(),
            order: ReportOrder { instance, seq },
        };
        assert!(a.covers(&dpu(7, 9)), "pushed before the pass's own read");
        assert!(a.covers(&dpu(7, 10)));
        assert!(!a.covers(&dpu(7, 11)), "newer than what was planned on");
        assert!(!a.covers(&dpu(8, 1)), "another agent process");
        assert!(!a.covers(&dpu(0, 0)), "not numbered");
        let other = Reason::DpuChanged {
            dpu: "e".into(),
            order: ReportOrder {
                instance: 7,
                seq: 1,
            },
        };
        assert!(!a.covers(&other), "a DPU it did not read");
        let cluster = |generation| Reason::ClusterChanged {
            cluster: "c".into(),
            generation,
        };
        assert!(a.covers(&cluster(5)));
        assert!(!a.covers(&cluster(6)));
        assert!(!a.covers(&Reason::Requested));
        assert!(!a.covers(&Reason::AgentConnected(Target::Dpu("d".into()))));
    }
}
