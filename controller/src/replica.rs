//! `unistor watch` as one of several replicas sharing a fleet (issue 24, `docs/scaling.md`).
//!
//! A thread of its own (librados calls block) keeps this replica's standing in RADOS
//! ([`crate::coord`]): it renews the membership every TTL/3, reads the members and the shard map
//! every tick, computes the owner of every shard from the sorted members
//! ([`crate::shards::assign`]: every replica computes the same), gives up the shards the
//! assignment gives a live replica, and takes the shards the assignment gives it whose holder
//! is gone from the members (its lease expired on the OSD), released, never held, or its own
//! previous process (same name). What it found is published as a [`Standing`].
//!
//! The daemon obeys it in three places:
//! - the plan keeps only the steps of held shards ([`Replica::scope`]; a step of another's
//!   shard, and what depends on it, is left to its holder: the next pass sees what it did);
//! - the executor asks before every step and every attempt ([`Authority::forbids`]): nothing
//!   runs once the standing is stale (self-fencing: TTL x 2/3 after the last renewal that
//!   succeeded, by this process's monotonic clock, before the OSD can expire the membership)
//!   or the step's shard is no longer held; leases are not renewed once stale;
//! - a dpu-agent's lease is taken with the DPU's claim (shard, token): an agent keeps the
//!   highest token of each shard and refuses lower ones.
//!
//! What is left if the process dies: its membership until the OSD expires it (TTL), the shard
//! records naming it (taken by the survivors then), agent leases until they lapse (TTL / 3,
//! shorter than the time before anyone can take a shard over).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use protocol::ShardClaim;

use crate::coord::{Coord, CoordError, Record, GONE_IMAGES};
use crate::execute::Authority;
use crate::manifest::Desired;
use crate::plan::{Plan, Step, Target};

/// Where the replicas coordinate, and as whom.
#[derive(Debug, Clone)]
pub struct ReplicaOptions {
    /// How to connect to the cluster holding the coordination objects.
    pub connect: ceph_lib::ConnectSpec,
    /// Its pool.
    pub pool: String,
    /// The deployment (`--owner`): replicas of one deployment share its objects.
    pub owner: String,
    /// This replica's name (unique among the replicas).
    pub name: String,
    /// Membership lease: a silent replica's shards are taken over after it.
    pub ttl: Duration,
}

impl ReplicaOptions {
    /// How long this replica may write after a renewal: two thirds of the lease.
    pub fn fresh_for(&self) -> Duration {
        self.ttl * 2 / 3
    }

    /// The agent leases a replica takes: a third of the membership lease, so that an agent
    /// lease taken before a replica's last renewal has lapsed before the OSD can expire it.
    pub fn agent_lease(&self) -> Duration {
        (self.ttl / 3).max(protocol::lease::MIN_TTL)
    }

    /// How often the map is read.
    fn tick(&self) -> Duration {
        (self.ttl / 15).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }
}

/// What the coordination thread last found.
#[derive(Debug, Clone, Default)]
pub struct Standing {
    /// The live replicas, sorted.
    pub members: Vec<String>,
    /// Every shard's holder, as the map says (`None`: released or never taken).
    pub holders: BTreeMap<String, Option<String>>,
    /// The shards this process holds, with their tokens.
    pub held: BTreeMap<String, u64>,
    /// Until when this replica may write (its last successful renewal + TTL x 2/3).
    pub fresh_until: Option<Instant>,
    /// When the last renewal succeeded.
    pub renewed: Option<Instant>,
    /// The last error talking to RADOS, if the last round failed.
    pub error: Option<String>,
    /// Shards taken over and given up since the start.
    pub taken: u64,
    /// Shards given up since the start.
    pub released: u64,
    /// librados operations the coordination has issued since this replica started.
    pub rados_ops: u64,
}

impl Standing {
    /// Whether this replica may write now.
    pub fn fresh(&self, now: Instant) -> bool {
        self.fresh_until.is_some_and(|t| now < t)
    }
}

/// A replica's shared state: what the daemon reads, what the thread writes.
#[derive(Debug)]
pub struct Replica {
    /// Its options.
    pub options: ReplicaOptions,
    standing: RwLock<Arc<Standing>>,
    /// The shards to share: every DPU of the manifests (set at each reload).
    dpus: Mutex<Arc<Vec<String>>>,
    stop: AtomicBool,
}

/// The shard a step belongs to: its DPU's; a cluster step's volume's DPU (the image of a volume
/// is written by the holder of the DPU it sits on); the images of volumes gone from every
/// manifest are [`GONE_IMAGES`]'.
pub fn shard_of<'a>(desired: &'a Desired, step: &'a Step) -> &'a str {
    match &step.target {
        Target::Dpu(d) => d,
        Target::Cluster(_) => step
            .volume
            .as_deref()
            .and_then(|v| desired.volumes.get(v))
            .map_or(GONE_IMAGES, |v| v.dpu.as_str()),
    }
}

impl Replica {
    /// A replica that holds nothing yet.
    pub fn new(options: ReplicaOptions) -> Arc<Self> {
        Arc::new(Self {
            options,
            standing: RwLock::default(),
            dpus: Mutex::default(),
            stop: AtomicBool::new(false),
        })
    }

    /// This replica's name.
    pub fn name(&self) -> &str {
        &self.options.name
    }

    /// What the coordination thread last found.
    pub fn standing(&self) -> Arc<Standing> {
        self.standing
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The DPUs of the manifests, to be shared among the replicas.
    pub fn set_dpus(&self, desired: &Desired) {
        let dpus: Vec<String> = desired.dpus.keys().cloned().collect();
        *self.dpus.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(dpus);
    }

    /// Keeps only the steps of the shards this replica holds, and what depends on none of the
    /// others (the rest is other replicas' work, not held back).
    pub fn scope(&self, desired: &Desired, mut p: Plan) -> Plan {
        let standing = self.standing();
        let mut dropped: BTreeSet<usize> = BTreeSet::new();
        for step in &p.steps {
            if !standing.held.contains_key(shard_of(desired, step))
                || step.depends_on.iter().any(|d| dropped.contains(d))
            {
                dropped.insert(step.id);
            }
        }
        p.steps.retain(|s| !dropped.contains(&s.id));
        p
    }

    /// Asks the coordination thread to give everything up and leave.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn publish(&self, s: Standing) {
        *self.standing.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(s);
    }

    /// Runs the coordination thread until [`Replica::stop`]; `changed` is called when the held
    /// shards change (a reconcile is due). On stop it gives its shards up and leaves, so the
    /// others take them over at once instead of after the TTL.
    pub fn spawn(
        self: &Arc<Self>,
        changed: impl Fn(&str) + Send + 'static,
    ) -> std::thread::JoinHandle<()> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("replica".into())
            .spawn(move || me.run(changed))
            .expect("spawn the replica thread")
    }

    fn run(&self, changed: impl Fn(&str)) {
        let o = &self.options;
        let mut state = Standing::default();
        let mut pool = None;
        let mut last_renew: Option<Instant> = None;
        while !self.stop.load(Ordering::SeqCst) {
            let started = Instant::now();
            if pool.is_none() {
                match ceph_lib::Rados::connect(&o.connect, o.ttl.as_secs().max(1) / 3 + 1)
                    .and_then(|r| r.pool(&o.pool))
                {
                    Ok(p) => pool = Some(p),
                    Err(e) => state.error = Some(format!("connecting to RADOS: {e}")),
                }
            }
            if let Some(p) = &pool {
                let coord = Coord::new(p, &o.owner, &o.name, o.ttl);
                let before = state.held.clone();
                match self.round(&coord, &mut state, &mut last_renew, started) {
                    Ok(()) => state.error = None,
                    Err(e) => {
                        tracing::warn!(error = %protocol::error::chain(&e), "Replica: a RADOS round failed.");
                        state.error = Some(protocol::error::chain(&e));
                    }
                }
                state.rados_ops += coord.ops();
                // Published before the reconcile it asks for reads it.
                self.publish(state.clone());
                if state.held != before {
                    changed(&format!(
                        "holds {} shard(s) now (was {})",
                        state.held.len(),
                        before.len()
                    ));
                }
            } else {
                self.publish(state.clone());
            }
            let next = started + o.tick();
            while !self.stop.load(Ordering::SeqCst) && Instant::now() < next {
                std::thread::sleep(
                    next.saturating_duration_since(Instant::now())
                        .min(Duration::from_millis(50)),
                );
            }
        }
        // Stopping: nothing more is written (the daemon stopped first), the shards go back and
        // the membership ends, so the others take over now.
        state.fresh_until = None;
        self.publish(state.clone());
        if let Some(p) = &pool {
            let coord = Coord::new(p, &o.owner, &o.name, o.ttl);
            for (shard, token) in &state.held {
                let _ = coord.release(shard, *token);
            }
            let _ = coord.leave();
        }
    }

    /// One round: renew when due, read members and map, give up and take shards, publish.
    fn round(
        &self,
        coord: &Coord<'_>,
        state: &mut Standing,
        last_renew: &mut Option<Instant>,
        started: Instant,
    ) -> Result<(), CoordError> {
        let o = &self.options;
        let due = last_renew.is_none_or(|t| started.duration_since(t) >= o.ttl / 3);
        if due {
            match last_renew {
                None => coord.join()?,
                Some(_) => coord.renew()?,
            }
            *last_renew = Some(started);
        }
        let members = coord.members()?;
        let records = coord.records()?;
        // What this process holds: the records naming it with the token it took them with.
        state.held.retain(|shard, token| {
            records
                .get(shard)
                .is_some_and(|r| r.token == *token && r.holder.as_deref() == Some(&o.name))
        });
        let dpus = self.dpus.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let mut shards: Vec<&str> = dpus.iter().map(String::as_str).collect();
        shards.push(GONE_IMAGES);
        let names: Vec<&str> = members.iter().map(String::as_str).collect();
        let owners = crate::shards::assign(&shards, &names);
        // Give up what the assignment gives another live replica, or nobody (a DPU gone from
        // the manifests).
        let give_up: Vec<(String, u64)> = state
            .held
            .iter()
            .filter(|(s, _)| owners.get(s.as_str()).is_none_or(|r| *r != o.name))
            .map(|(s, t)| (s.clone(), *t))
            .collect();
        for (shard, token) in give_up {
            coord.release(&shard, token)?;
            state.held.remove(&shard);
            state.released += 1;
        }
        let mut holders: BTreeMap<String, Option<String>> = records
            .iter()
            .map(|(s, r)| (s.clone(), r.holder.clone()))
            .collect();
        // Take what the assignment gives this replica and nobody live holds.
        if members.contains(&o.name) {
            for (shard, owner) in &owners {
                if *owner != o.name || state.held.contains_key(*shard) {
                    continue;
                }
                let seen: Option<&Record> = records.get(*shard);
                let free = seen
                    .and_then(|r| r.holder.as_deref())
                    .is_none_or(|h| h == o.name || !members.iter().any(|m| m == h));
                if !free {
                    continue;
                }
                if let Some(token) = coord.take(shard, seen)? {
                    state.held.insert(shard.to_string(), token);
                    holders.insert(shard.to_string(), Some(o.name.clone()));
                    state.taken += 1;
                }
            }
        }
        state.members = members;
        state.holders = holders;
        // Fresh only when the renewal this freshness counts from succeeded, and the map read
        // after it decided what is held.
        state.renewed = *last_renew;
        state.fresh_until = last_renew.map(|t| t + o.fresh_for());
        Ok(())
    }
}

impl Authority for Replica {
    fn claim(&self, target: &Target) -> Result<Option<ShardClaim>, String> {
        let Target::Dpu(d) = target else {
            // The ceph-agent serves every shard: its lease is taken unclaimed, one replica at a
            // time; each step is checked against its shard before it runs.
            return Ok(None);
        };
        let s = self.standing();
        if !s.fresh(Instant::now()) {
            return Err(format!(
                "self-fenced: replica {} has no fresh membership in RADOS",
                self.options.name
            ));
        }
        match s.held.get(d) {
            Some(token) => Ok(Some(ShardClaim {
                shard: d.clone(),
                token: *token,
            })),
            None => Err(format!(
                "shard {d} is not held by replica {}",
                self.options.name
            )),
        }
    }

    fn forbids(&self, desired: &Desired, step: &Step) -> Option<String> {
        let s = self.standing();
        let now = Instant::now();
        if !s.fresh(now) {
            return Some(format!(
                "self-fenced: replica {} has not renewed its membership in RADOS for {} (lease {}): it stops writing before the lease can expire",
                self.options.name,
                s.renewed.map_or("ever".into(), |t| humantime::format_duration(
                    Duration::from_millis(now.duration_since(t).as_millis() as u64)
                )
                .to_string()),
                humantime::format_duration(self.options.ttl),
            ));
        }
        let shard = shard_of(desired, step);
        if !s.held.contains_key(shard) {
            let holder = s.holders.get(shard).cloned().flatten();
            return Some(format!(
                "shard {shard} is no longer held by replica {} ({})",
                self.options.name,
                holder.map_or("no holder now".into(), |h| format!("held by {h}"))
            ));
        }
        None
    }

    fn command_claim(&self, desired: &Desired, step: &Step) -> Option<ShardClaim> {
        let shard = shard_of(desired, step);
        let token = *self.standing().held.get(shard)?;
        Some(ShardClaim {
            shard: shard.to_string(),
            token,
        })
    }

    fn fresh(&self) -> bool {
        self.standing().fresh(Instant::now())
    }
}
