//! Persistent sessions with every agent the manifests name. Each agent has a supervisor task:
//! connect, listen to the agent's events, and on a lost session reconnect with jittered,
//! capped exponential backoff. What an agent pushes that changes its state (drift: SNAP lost its
//! objects, an image resized behind our back...) triggers a reconcile.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use protocol::client::AgentClient;
use protocol::dpu::ReportChange;
use protocol::names::PeerName;
use protocol::{Event, EventEnvelope};
use tokio::task::JoinHandle;
use tracing::Instrument;

use super::state::{EventKind, Level, Shared};
use super::triggers::{Reason, Triggers};
use crate::fleet::FleetError;
use crate::fleet::{Fleet, FleetOptions, SharedInformer};
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
    informer: Arc<SharedInformer>,
    opts: FleetOptions,
    state: Arc<Shared>,
    trigger: Triggers,
}

impl Sessions {
    /// No sessions yet.
    pub fn new(
        opts: FleetOptions,
        connect_rate: f64,
        state: Arc<Shared>,
        trigger: Triggers,
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
            let span = tracing::info_span!("agent_session", agent = %t, address = %address);
            let task = tokio::spawn(
                Supervisor {
                    label: t.to_string(),
                    target: t.clone(),
                    name: name.clone(),
                    address: address.clone(),
                    opts: self.opts.clone(),
                    views: Views {
                        slots: self.slots.clone(),
                        informer: self.informer.clone(),
                        gate: self.gate.clone(),
                    },
                    state: self.state.clone(),
                    trigger: self.trigger.clone(),
                    seen: Seen::default(),
                }
                .run()
                .instrument(span),
            );
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

    /// What the agents reported, kept between reconciles (pushed reports go straight in).
    pub fn informer(&self) -> &SharedInformer {
        &self.informer
    }

    /// Re-read every agent at the next observation (the periodic resync).
    pub fn mark_all(&self) {
        let targets: Vec<Target> = lock(&self.slots).keys().cloned().collect();
        self.informer.mark(targets.iter());
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
    informer: Arc<SharedInformer>,
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

/// One agent's supervisor: its session, its events, its reconnects.
struct Supervisor {
    target: Target,
    label: String,
    name: PeerName,
    address: String,
    opts: FleetOptions,
    views: Views,
    state: Arc<Shared>,
    trigger: Triggers,
    /// What the last pushed report said of SNAP (drift is said once).
    seen: Seen,
}

impl Supervisor {
    /// Connects, serves the session, reconnects with backoff: for ever (the task is aborted when
    /// the manifests no longer name the agent).
    async fn run(mut self) {
        let mut failures: u32 = 0;
        loop {
            self.views.gate.pass().await;
            // Liveness paced for the fleet as it is now (a reconnect follows its growth).
            let mut client_opts = self.opts.client.clone();
            client_opts.liveness = Some(liveness_interval(lock(&self.views.slots).len()));
            match AgentClient::connect(
                &self.address,
                &self.name,
                self.opts.tls.clone(),
                client_opts,
            )
            .await
            {
                Ok(client) => {
                    failures = 0;
                    self.session(client).await;
                }
                Err(e) => {
                    self.unreachable(&protocol::error::chain(&e), failures == 0);
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

    /// A session, from its start to its loss.
    async fn session(&mut self, client: AgentClient) {
        let (label, address) = (&self.label, &self.address);
        let events = client.take_events();
        let client = Arc::new(client);
        // A new session reads the agent from scratch (it may have restarted).
        self.views.informer.lock().reset(&self.target);
        set_slot(&self.views.slots, &self.target, Some(client.clone()), "");
        self.state.agent(label, address, None);
        self.state.event(
            EventKind::Agent,
            Level::Info,
            format!("{label}: session up ({address})"),
        );
        self.trigger
            .send(Reason::AgentConnected(self.target.clone()));
        if let Some(mut events) = events {
            while let Some(EventEnvelope { event, .. }) = events.recv().await {
                self.on_event(event);
            }
        }
        drop(client);
        set_slot(&self.views.slots, &self.target, None, "session lost");
        self.views.informer.lock().reset(&self.target);
        let (label, address) = (&self.label, &self.address);
        self.state
            .agent(label, address, Some("session lost".into()));
        self.state.event(
            EventKind::Agent,
            Level::Warning,
            format!("{label}: session lost; reconnecting"),
        );
        self.trigger.send(Reason::AgentLost(self.target.clone()));
    }

    /// The agent cannot be reached; said when it starts (not at every retry).
    fn unreachable(&self, why: &str, first: bool) {
        set_slot(&self.views.slots, &self.target, None, why);
        if first {
            let (label, address) = (&self.label, &self.address);
            self.state.agent(label, address, Some(why.to_string()));
            self.state.event(
                EventKind::Agent,
                Level::Warning,
                format!("{label}: cannot connect to {address}: {why}"),
            );
        }
    }

    fn on_event(&mut self, event: Event) {
        let label = &self.label;
        match event {
            Event::SnapReplayed(r) => {
                self.state.event(
                    EventKind::Drift,
                    Level::Warning,
                    format!(
                        "{label}: SNAP lost its state; the agent restored {} object(s), {} failed",
                        r.restored.len(),
                        r.failed.len()
                    ),
                );
                self.trigger.send(Reason::SnapReplayed(self.target.clone()));
            }
            Event::ShuttingDown => {
                self.state.event(
                    EventKind::Agent,
                    Level::Warning,
                    format!("{label}: shutting down"),
                );
            }
            Event::CephChanged { generation } => {
                if let Target::Cluster(n) = &self.target {
                    if self.views.informer.lock().cluster_changed(n, generation) {
                        self.trigger.send(Reason::ClusterChanged {
                            cluster: n.clone(),
                            generation,
                        });
                    }
                }
            }
            Event::DpuReport(r) => self.on_report(r),
            Event::Heartbeat { .. } => {}
        }
    }

    /// A pushed DPU report: held, and a reconcile asked for when it changes what a plan
    /// decides on ([`protocol::dpu::DpuReport::change_from`]).
    fn on_report(&mut self, r: Box<protocol::dpu::DpuReport>) {
        // Objects gone from SNAP while it kept running: drift, said once.
        let restarted = r.snap.restarts != self.seen.restarts;
        if !r.missing.is_empty() && r.missing != self.seen.missing && !restarted {
            self.state.event(
                EventKind::Drift,
                Level::Warning,
                format!(
                    "{}: SNAP's objects changed out of band: {}",
                    self.label,
                    r.missing.join(", ")
                ),
            );
        }
        self.seen = Seen {
            restarts: r.snap.restarts,
            missing: r.missing.clone(),
        };
        let Target::Dpu(n) = &self.target else {
            return;
        };
        // Compared with what the daemon holds now — a report a pass read after its steps
        // included —, not with the last push: a drift that comes back after a heal pushes what
        // was pushed before the heal.
        let mut informer = self.views.informer.lock();
        let change = match informer.observed().dpus.get(n) {
            Some(Known::Known { report: held }) => r.change_from(held),
            // Unknown before (never read, or its read failed) and known now is a change too.
            _ => ReportChange::Decides,
        };
        let order = r.order;
        let taken = informer.set_dpu(n, r);
        drop(informer);
        if taken && change == ReportChange::Decides {
            self.trigger.send(Reason::DpuChanged {
                dpu: n.clone(),
                order,
            });
        }
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
