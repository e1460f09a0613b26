//! Persistent sessions with every agent the manifests name. Each agent has a supervisor task:
//! connect, listen to the agent's events, and on a lost session reconnect with jittered,
//! capped exponential backoff. What an agent pushes that changes its state (drift: SNAP lost its
//! objects, an image resized behind our back...) triggers a reconcile.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::client::AgentClient;
use protocol::dpu::DpuReport;
use protocol::names::PeerName;
use protocol::{Event, EventEnvelope};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::state::{Level, Shared};
use crate::fleet::FleetError;
use crate::fleet::{Fleet, FleetOptions, Informer};
use crate::manifest::Desired;
use crate::plan::{Known, Target};

/// First reconnect delay; doubles per failure up to [`BACKOFF_MAX`], each with ±50 % jitter.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(15);

struct Slot {
    name: PeerName,
    address: String,
    client: Option<Arc<AgentClient>>,
    error: String,
    task: JoinHandle<()>,
}

/// Paces new connections, all agents together: each attempt takes the next free slot, slots
/// `1 / rate` apart. A daemon that restarts in front of a fleet dials it at this rate, not all
/// at once (and the agents' TLS handshakes, and the first reads, are spread the same way).
#[derive(Debug)]
pub struct ConnectGate {
    interval: Duration,
    next: Mutex<tokio::time::Instant>,
}

impl ConnectGate {
    /// At most `rate` connection attempts per second (at least one a minute).
    pub fn new(rate: f64) -> Self {
        let interval = Duration::from_secs_f64(1.0 / rate.clamp(1.0 / 60.0, 1e6));
        Self {
            interval,
            next: Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Waits for this attempt's slot.
    pub async fn pass(&self) {
        let at = {
            let mut next = lock(&self.next);
            let at = (*next).max(tokio::time::Instant::now());
            *next = at + self.interval;
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

/// The sessions, by target, and what the agents said over them.
pub struct Sessions {
    gate: Arc<ConnectGate>,
    slots: Arc<Mutex<BTreeMap<Target, Slot>>>,
    informer: Arc<Mutex<Informer>>,
    opts: FleetOptions,
    state: Arc<Shared>,
    trigger: mpsc::UnboundedSender<String>,
}

impl Sessions {
    /// No sessions yet.
    pub fn new(
        opts: FleetOptions,
        connect_rate: f64,
        state: Arc<Shared>,
        trigger: mpsc::UnboundedSender<String>,
    ) -> Self {
        Self {
            gate: Arc::new(ConnectGate::new(connect_rate)),
            slots: Arc::default(),
            informer: Arc::default(),
            opts,
            state,
            trigger,
        }
    }

    /// Starts sessions with agents the manifests now name, and ends those they no longer do.
    pub fn update(&self, desired: &Desired) {
        let mut want: BTreeMap<Target, (PeerName, String)> = BTreeMap::new();
        for c in desired.clusters.values() {
            want.insert(
                Target::Cluster(c.name.clone()),
                (c.agent.clone(), c.address.clone()),
            );
        }
        for d in desired.dpus.values() {
            want.insert(
                Target::Dpu(d.name.clone()),
                (d.agent.clone(), d.address.clone()),
            );
        }
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots.retain(|t, s| {
            let keep = want
                .get(t)
                .is_some_and(|(n, a)| *n == s.name && *a == s.address);
            if !keep {
                s.task.abort();
                self.state.forget_agent(&t.to_string());
            }
            keep
        });
        for (t, (name, address)) in want {
            if slots.contains_key(&t) {
                continue;
            }
            // Listed from now on (the counts of agents connected are of all the named ones).
            self.state
                .agent(&t.to_string(), &address, Some("connecting".into()));
            let task = tokio::spawn(supervise(
                t.clone(),
                name.clone(),
                address.clone(),
                self.opts.clone(),
                Views {
                    slots: self.slots.clone(),
                    informer: self.informer.clone(),
                    gate: self.gate.clone(),
                },
                self.state.clone(),
                self.trigger.clone(),
            ));
            slots.insert(
                t,
                Slot {
                    name,
                    address,
                    client: None,
                    error: "connecting".into(),
                    task,
                },
            );
        }
    }

    /// What the agents report, brought up to date: only the agents marked stale (new sessions,
    /// agents that said they changed, agents a pass commanded) are read.
    pub async fn observe(&self, fleet: &Fleet, timeout: Duration) -> crate::plan::Observed {
        let jobs = lock(&self.informer).jobs(fleet);
        let results = crate::fleet::run_jobs(jobs, timeout).await;
        let mut informer = lock(&self.informer);
        informer.apply(results);
        informer.observed().clone()
    }

    /// Re-read these agents at the next [`Sessions::observe`] (a pass commanded them).
    pub fn mark<'a>(&self, targets: impl IntoIterator<Item = &'a Target>) {
        let mut informer = lock(&self.informer);
        for t in targets {
            informer.mark(t.clone());
        }
    }

    /// Re-read every agent at the next [`Sessions::observe`] (the periodic resync).
    pub fn mark_all(&self) {
        let targets: Vec<Target> = lock(&self.slots).keys().cloned().collect();
        self.mark(targets.iter());
    }

    /// The sessions as they are now, for one reconcile.
    pub fn snapshot(&self) -> Fleet {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        Fleet {
            agents: slots
                .iter()
                .map(|(t, s)| {
                    let session = s.client.clone().ok_or_else(|| FleetError::Unreachable {
                        target: t.clone(),
                        reason: s.error.clone(),
                    });
                    (t.clone(), session)
                })
                .collect(),
        }
    }
}

impl Drop for Sessions {
    fn drop(&mut self) {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        for s in slots.values() {
            s.task.abort();
        }
    }
}

/// What a supervisor task writes: its slot, and what its agent says.
struct Views {
    slots: Arc<Mutex<BTreeMap<Target, Slot>>>,
    informer: Arc<Mutex<Informer>>,
    gate: Arc<ConnectGate>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn set_slot(
    slots: &Mutex<BTreeMap<Target, Slot>>,
    t: &Target,
    client: Option<Arc<AgentClient>>,
    error: &str,
) {
    let mut g = slots.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = g.get_mut(t) {
        s.client = client;
        s.error = error.into();
    }
}

/// What in a pushed report counts as a change worth a reconcile: the objects, not the counters;
/// of the host's use, whether each device is in use (a removal held back for it may go on; the
/// status shows it), not how many openers it has.
fn stable(r: &DpuReport) -> serde_json::Value {
    let in_use: Option<Vec<_>> = r.host_use.as_ref().map(|h| {
        h.controllers
            .iter()
            .map(|c| {
                let open: Vec<_> = c.namespaces.iter().map(|n| (n.nsid, n.open > 0)).collect();
                (&c.name, c.enabled, open)
            })
            .collect()
    });
    serde_json::json!({
        "snap": [&r.snap.state, &r.snap.image, r.snap.restarts],
        "inventory": r.inventory, "missing": r.missing, "host_use": in_use,
    })
}

/// What a DPU's last pushed report said of SNAP: a change of `missing` without a restart is
/// drift.
#[derive(Default)]
struct Seen {
    restarts: u64,
    missing: Vec<String>,
}

/// Liveness messages (pongs) the daemon is willing to receive per second, whatever the fleet.
pub const LIVENESS_PER_SEC: usize = 50;

/// The liveness interval for a fleet of `agents`: at least 5 s, and long enough that the
/// whole fleet answers at most [`LIVENESS_PER_SEC`] pings a second (1,000 agents: 20 s, so a
/// silent agent is declared gone after 65 s; a dead one closes its connection at once).
pub fn liveness_interval(agents: usize) -> Duration {
    Duration::from_secs(5).max(Duration::from_millis(
        (agents as u64 * 1000).div_ceil(LIVENESS_PER_SEC as u64),
    ))
}

async fn supervise(
    target: Target,
    name: PeerName,
    address: String,
    opts: FleetOptions,
    views: Views,
    state: Arc<Shared>,
    trigger: mpsc::UnboundedSender<String>,
) {
    let Views {
        slots,
        informer,
        gate,
    } = views;
    let label = target.to_string();
    let mut failures: u32 = 0;
    let mut seen = Seen::default();
    loop {
        gate.pass().await;
        // Liveness paced for the fleet as it is now (a reconnect follows its growth).
        let mut client_opts = opts.client.clone();
        client_opts.liveness = Some(liveness_interval(lock(&slots).len()));
        match AgentClient::connect(&address, &name, opts.tls.clone(), client_opts).await {
            Ok(client) => {
                failures = 0;
                let events = client.take_events();
                let client = Arc::new(client);
                // A new session reads the agent from scratch (it may have restarted).
                lock(&informer).reset(&target);
                set_slot(&slots, &target, Some(client.clone()), "");
                state.agent(&label, &address, None);
                state.event(
                    "agent",
                    Level::Info,
                    format!("{label}: session up ({address})"),
                );
                let _ = trigger.send(format!("{label} connected"));
                if let Some(mut events) = events {
                    while let Some(EventEnvelope { event, .. }) = events.recv().await {
                        match &event {
                            Event::SnapReplayed(r) => {
                                state.event("drift", Level::Warning,
                                    format!(
                                        "{label}: SNAP lost its state; the agent restored {} object(s), {} failed",
                                        r.restored.len(),
                                        r.failed.len()
                                    ),
                                );
                                let _ = trigger.send(format!("{label}: SNAP replayed"));
                            }
                            Event::ShuttingDown => {
                                state.event(
                                    "agent",
                                    Level::Warning,
                                    format!("{label}: shutting down"),
                                );
                            }
                            Event::CephChanged { generation } => {
                                if let Target::Cluster(n) = &target {
                                    if lock(&informer).cluster_changed(n, *generation) {
                                        let _ = trigger.send(format!("{label}: state changed"));
                                    }
                                }
                            }
                            Event::DpuReport(r) => {
                                // Objects gone from SNAP while it kept running: drift, said once.
                                let restarted = r.snap.restarts != seen.restarts;
                                if !r.missing.is_empty() && r.missing != seen.missing && !restarted
                                {
                                    state.event(
                                        "drift",
                                        Level::Warning,
                                        format!(
                                            "{label}: SNAP's objects changed out of band: {}",
                                            r.missing.join(", ")
                                        ),
                                    );
                                }
                                seen = Seen {
                                    restarts: r.snap.restarts,
                                    missing: r.missing.clone(),
                                };
                                // Compared with what the daemon holds now — a report a pass
                                // read after its steps included —, not with the last push: a
                                // drift that comes back after a heal pushes what was pushed
                                // before the heal.
                                if let Target::Dpu(n) = &target {
                                    let mut informer = lock(&informer);
                                    let held = informer
                                        .observed()
                                        .dpus
                                        .get(n)
                                        .and_then(Known::get)
                                        .map(stable);
                                    let taken = informer.set_dpu(n, r.clone());
                                    drop(informer);
                                    // Unknown before (never read, or its read failed) and
                                    // known now is a change too.
                                    if taken && held.is_none_or(|h| h != stable(r)) {
                                        let _ = trigger.send(format!("{label}: state changed"));
                                    }
                                }
                            }
                            Event::Heartbeat { .. } => {}
                        }
                    }
                }
                drop(client);
                set_slot(&slots, &target, None, "session lost");
                lock(&informer).reset(&target);
                state.agent(&label, &address, Some("session lost".into()));
                state.event(
                    "agent",
                    Level::Warning,
                    format!("{label}: session lost; reconnecting"),
                );
                let _ = trigger.send(format!("{label} disconnected"));
            }
            Err(e) => {
                let why = protocol::error::chain(&e);
                set_slot(&slots, &target, None, &why);
                if failures == 0 {
                    state.agent(&label, &address, Some(why.clone()));
                    state.event(
                        "agent",
                        Level::Warning,
                        format!("{label}: cannot connect to {address}: {why}"),
                    );
                }
                failures = failures.saturating_add(1);
            }
        }
        let base = BACKOFF_MIN
            .saturating_mul(1 << failures.min(6))
            .min(BACKOFF_MAX);
        let jitter = 0.5 + fastrand::f64();
        tokio::time::sleep(base.mul_f64(jitter)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_liveness_interval_keeps_the_fleet_under_its_budget() {
        assert_eq!(liveness_interval(3), Duration::from_secs(5));
        assert_eq!(liveness_interval(1000), Duration::from_secs(20));
        for n in [1usize, 10, 250, 251, 1000, 4321, 10_000] {
            let ms = liveness_interval(n).as_millis() as usize;
            assert!(
                n * 1000 <= LIVENESS_PER_SEC * ms,
                "{n} agents every {ms} ms"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_gate_spreads_a_storm_of_attempts_at_its_rate() {
        let gate = Arc::new(ConnectGate::new(100.0));
        let start = tokio::time::Instant::now();
        let mut tasks = vec![];
        for _ in 0..50 {
            let g = gate.clone();
            tasks.push(tokio::spawn(async move {
                g.pass().await;
                tokio::time::Instant::now()
            }));
        }
        let mut at = vec![];
        for t in tasks {
            at.push(t.await.unwrap() - start);
        }
        at.sort();
        assert_eq!(at[0], Duration::ZERO, "the first goes at once");
        // 50 attempts at 100/s: the last one 490 ms after the first, each 10 ms apart.
        assert_eq!(at[49], Duration::from_millis(490));
        assert!(at
            .windows(2)
            .all(|w| w[1] - w[0] == Duration::from_millis(10)));
    }
}
