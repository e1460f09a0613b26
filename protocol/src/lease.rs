//! Fencing: an agent grants its lease to one controller process at a time.
//!
//! A lease has a holder (the authenticated name in the controller's certificate and, beside it,
//! the controller process's [`ControllerInstance`]: two processes with one certificate are two
//! holders), an expiry on the agent's monotonic clock (so wall-clock jumps never expire or extend
//! it) and a fencing token. Every new grant gets a token one higher than any token this agent
//! ever issued; the highest token is persisted before the grant is answered, so tokens keep
//! growing across restarts.
//!
//! A mutating command is checked twice: when it is admitted (the current token of a live lease
//! held by the sender), and again when it starts executing ([`Fence::enter`], after any wait for
//! the agent's own locks), which also counts it as executing until its guard drops. No new
//! lease is granted while a command admitted under an older one still executes, so nothing
//! admitted under an old token writes after a newer token was handed out.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{ErrorCode, WireError};
use crate::message::{ControllerInstance, LeaseInfo, ShardClaim};

/// Shortest lease granted.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// Longest lease granted.
pub const MAX_TTL: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
struct Lease {
    holder: String,
    instance: Option<ControllerInstance>,
    token: u64,
    expires: Instant,
    /// The replica's shard claim it was granted under, if any.
    claim: Option<ShardClaim>,
}

impl Lease {
    fn held_by(&self, holder: &str, instance: Option<&ControllerInstance>) -> bool {
        self.holder == holder && self.instance.as_ref().map(|i| &i.id) == instance.map(|i| &i.id)
    }
}

/// The lease state of one agent.
#[derive(Debug)]
pub struct LeaseTable {
    current: Option<Lease>,
    last_token: u64,
    /// The highest token each shard has shown (claims below it are refused); persisted beside
    /// the token (`<store>.shards`) before a grant that raised it is answered.
    highest: std::collections::BTreeMap<String, u64>,
    store: Option<PathBuf>,
    /// Mutating commands executing now; all under `executing_under` (no grant while any runs).
    executing: u32,
    executing_under: Option<Lease>,
}

/// Errors loading or saving the token store.
#[derive(Debug, thiserror::Error)]
#[error("fencing token store {path}")]
pub struct StoreError {
    path: PathBuf,
    #[source]
    source: std::io::Error,
}

impl LeaseTable {
    /// A table whose highest token lives in `store` (created when missing); `None` keeps it in
    /// memory only (tests).
    pub fn open(store: Option<&Path>) -> Result<Self, StoreError> {
        let last_token = match store {
            Some(path) => match std::fs::read_to_string(path) {
                Ok(s) => s.trim().parse().map_err(|e| StoreError {
                    path: path.to_path_buf(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
                Err(source) => {
                    return Err(StoreError {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            },
            None => 0,
        };
        let highest = match store.map(Self::shards_path) {
            Some(path) => match std::fs::read(&path) {
                Ok(b) => serde_json::from_slice(&b).map_err(|e| StoreError {
                    path: path.clone(),
                    source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                })?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Default::default(),
                Err(source) => return Err(StoreError { path, source }),
            },
            None => Default::default(),
        };
        Ok(Self {
            current: None,
            last_token,
            highest,
            store: store.map(Path::to_path_buf),
            executing: 0,
            executing_under: None,
        })
    }

    fn persist(&self, token: u64) -> Result<(), StoreError> {
        let Some(path) = &self.store else {
            return Ok(());
        };
        agent_kit::fsutil::write_atomic(path, format!("{token}\n").as_bytes()).map_err(|source| {
            StoreError {
                path: path.clone(),
                source,
            }
        })
    }

    fn shards_path(store: &Path) -> PathBuf {
        let mut name = store.as_os_str().to_owned();
        name.push(".shards");
        PathBuf::from(name)
    }

    /// Records `claim` as its shard's highest token (persisted first when it raises it).
    fn raise(&mut self, claim: ShardClaim) -> Result<(), StoreError> {
        if self
            .highest
            .get(&claim.shard)
            .is_some_and(|h| *h >= claim.token)
        {
            return Ok(());
        }
        let mut next = self.highest.clone();
        next.insert(claim.shard.clone(), claim.token);
        if let Some(store) = &self.store {
            let path = Self::shards_path(store);
            let json = serde_json::to_vec(&next).expect("a map of names to numbers serializes");
            agent_kit::fsutil::write_atomic(&path, &json)
                .map_err(|source| StoreError { path, source })?;
        }
        self.highest = next;
        Ok(())
    }

    fn live(&self, now: Instant) -> Option<&Lease> {
        self.current.as_ref().filter(|l| l.expires > now)
    }

    fn info(lease: &Lease, now: Instant) -> LeaseInfo {
        LeaseInfo {
            holder: lease.holder.clone(),
            token: lease.token,
            remaining_ms: lease.expires.saturating_duration_since(now).as_millis() as u64,
            instance: lease.instance.clone(),
        }
    }

    /// The lease in force, if any.
    pub fn current(&self, now: Instant) -> Option<LeaseInfo> {
        self.live(now).map(|l| Self::info(l, now))
    }

    /// Mutating commands executing now.
    pub fn executing(&self) -> u32 {
        self.executing
    }

    /// Grants or renews the lease for `holder`'s process `instance`. Renewal (same holder, same
    /// instance, lease live) keeps the token; a new grant raises it, and waits for nothing: it
    /// is refused while a command admitted under an earlier lease still executes.
    pub fn acquire(
        &mut self,
        holder: &str,
        instance: Option<&ControllerInstance>,
        ttl: Duration,
        now: Instant,
    ) -> Result<LeaseInfo, WireError> {
        self.acquire_claimed(holder, instance, ttl, None, now)
    }

    /// [`LeaseTable::acquire`] for a controller replica's `claim` (issue 24): refused below the
    /// highest token its shard has shown; above the claim of the live lease of the same shard,
    /// it ends that lease at once (its holder's commands are refused from then on) and is
    /// granted once nothing that lease admitted still executes.
    pub fn acquire_claimed(
        &mut self,
        holder: &str,
        instance: Option<&ControllerInstance>,
        ttl: Duration,
        claim: Option<ShardClaim>,
        now: Instant,
    ) -> Result<LeaseInfo, WireError> {
        let ttl = ttl.clamp(MIN_TTL, MAX_TTL);
        if let Some(c) = &claim {
            if let Some(h) = self.highest.get(&c.shard).filter(|h| c.token < **h) {
                return Err(WireError::new(
                    ErrorCode::StaleToken,
                    format!(
                        "shard {} token {} is stale: this agent has seen token {h} for it",
                        c.shard, c.token
                    ),
                ));
            }
        }
        if let Some(lease) = self.live(now) {
            if lease.held_by(holder, instance) {
                let renewed = Lease {
                    expires: now + ttl,
                    claim: claim.clone().or_else(|| lease.claim.clone()),
                    ..lease.clone()
                };
                if let Some(c) = claim {
                    self.raise(c).map_err(store_failed)?;
                }
                let info = Self::info(&renewed, now);
                self.current = Some(renewed);
                return Ok(info);
            }
            let newer = match (&claim, &lease.claim) {
                (Some(c), Some(l)) => c.shard == l.shard && c.token > l.token,
                _ => false,
            };
            if !newer {
                return Err(held_by_other(Self::info(lease, now)));
            }
            // A newer holder of the same shard: the old lease ends now.
            self.current = None;
        }
        if let Some(c) = &claim {
            self.raise(c.clone()).map_err(store_failed)?;
        }
        if self.executing > 0 {
            let old = self
                .executing_under
                .as_ref()
                .expect("executing under a lease");
            let mut info = Self::info(old, now);
            info.remaining_ms = 0;
            return Err(WireError::new(
                ErrorCode::LeaseHeld,
                format!(
                    "the lease of controller {:?}{} (token {}) has ended but {} command(s) it started are still executing: no new lease until they end (each has a deadline)",
                    old.holder,
                    describe(old.instance.as_ref()),
                    old.token,
                    self.executing
                ),
            )
            .with_lease(info));
        }
        let token = self.last_token + 1;
        self.persist(token).map_err(store_failed)?;
        self.last_token = token;
        let lease = Lease {
            holder: holder.to_string(),
            instance: instance.cloned(),
            token,
            expires: now + ttl,
            claim,
        };
        let info = Self::info(&lease, now);
        self.current = Some(lease);
        Ok(info)
    }

    /// Ends `holder`'s lease early. Releasing a lease one does not hold is an error. Commands
    /// it started and still executing keep any new grant off until they end.
    pub fn release(
        &mut self,
        holder: &str,
        instance: Option<&ControllerInstance>,
        now: Instant,
    ) -> Result<(), WireError> {
        match self.live(now) {
            Some(lease) if lease.held_by(holder, instance) => {
                self.current = None;
                Ok(())
            }
            Some(lease) => Err(held_by_other(Self::info(lease, now))),
            None => Ok(()),
        }
    }

    /// Ends the lease granted with `token`, if it is still the one in force (the session that
    /// took it closed). Whether it ended one.
    pub fn release_token(&mut self, token: u64) -> bool {
        if self.current.as_ref().is_some_and(|l| l.token == token) {
            self.current = None;
            return true;
        }
        false
    }

    /// [`LeaseTable::check`], then a replica's per-command `claim` (issue 24): refused below the
    /// highest token its shard has shown, recorded as that highest otherwise (persisted first).
    /// The ceph-agent serves every shard under one unclaimed lease; this is how it still refuses
    /// a stale replica's image write once the shard's new holder has written.
    pub fn check_claimed(
        &mut self,
        holder: &str,
        token: Option<u64>,
        claim: Option<&ShardClaim>,
        now: Instant,
    ) -> Result<(), WireError> {
        self.check(holder, token, now)?;
        let Some(c) = claim else {
            return Ok(());
        };
        if let Some(h) = self.highest.get(&c.shard).filter(|h| c.token < **h) {
            return Err(WireError::new(
                ErrorCode::StaleToken,
                format!(
                    "shard {} token {} is stale: this agent has seen token {h} for it (another replica holds the shard now)",
                    c.shard, c.token
                ),
            ));
        }
        self.raise(c.clone()).map_err(store_failed)
    }

    /// Checks that `holder` may run a mutating command with fencing token `token`. Tokens are
    /// unique to a grant, and a grant to one instance: the token names the process.
    pub fn check(&self, holder: &str, token: Option<u64>, now: Instant) -> Result<(), WireError> {
        let Some(token) = token else {
            return Err(WireError::new(
                ErrorCode::NoLease,
                "mutating command without a fencing token: acquire the lease first",
            ));
        };
        let Some(lease) = self.live(now) else {
            return Err(WireError::new(
                ErrorCode::NoLease,
                format!(
                    "no lease in force (fencing token {token} given, last issued {}): acquire the lease first",
                    self.last_token
                ),
            ));
        };
        let info = Self::info(lease, now);
        if lease.holder != holder {
            return Err(held_by_other(info));
        }
        if lease.token != token {
            return Err(WireError::new(
                ErrorCode::StaleToken,
                format!(
                    "fencing token {token} is stale: the current lease of {:?}{} has token {}, ending in {} ms",
                    info.holder,
                    describe(info.instance.as_ref()),
                    info.token,
                    info.remaining_ms
                ),
            )
            .with_lease(info));
        }
        Ok(())
    }

    /// [`LeaseTable::check`], then counts the command as executing until [`LeaseTable::exit`].
    fn enter(&mut self, holder: &str, token: u64, now: Instant) -> Result<(), WireError> {
        self.check(holder, Some(token), now)?;
        if self.executing == 0 {
            self.executing_under = self.current.clone();
        }
        self.executing += 1;
        Ok(())
    }

    fn exit(&mut self) {
        self.executing = self.executing.saturating_sub(1);
        if self.executing == 0 {
            self.executing_under = None;
        }
    }
}

fn store_failed(e: StoreError) -> WireError {
    WireError::new(
        ErrorCode::Internal,
        format!("cannot grant lease: {}", crate::error::chain(&e)),
    )
}

fn describe(instance: Option<&ControllerInstance>) -> String {
    instance.map(|i| format!(", {i}")).unwrap_or_default()
}

fn held_by_other(info: LeaseInfo) -> WireError {
    WireError::new(
        ErrorCode::LeaseHeld,
        format!(
            "lease held by controller {:?}{} (token {}) for another {} ms: wait for it (`unistor apply --lease-wait 2m`), suspend that controller's daemon (`unistor suspend`) or stop it",
            info.holder,
            describe(info.instance.as_ref()),
            info.token,
            info.remaining_ms
        ),
    )
    .with_lease(info)
}

/// Shared lease state of an agent (the server's, handed to each admitted command).
pub type SharedLeases = Arc<Mutex<LeaseTable>>;

/// How one command was admitted: for a mutating command, the lease (holder and token) it was
/// admitted under, to be checked again when it starts executing.
#[derive(Debug)]
pub struct Fence {
    admitted: Option<(SharedLeases, String, u64)>,
}

impl Fence {
    /// No lease to check: reads, and an agent's own work (tests, replays it decides itself).
    pub fn none() -> Self {
        Self { admitted: None }
    }

    /// A mutating command admitted under `holder`'s lease with `token`.
    pub fn admitted(leases: SharedLeases, holder: String, token: u64) -> Self {
        Self {
            admitted: Some((leases, holder, token)),
        }
    }

    /// Checks the lease again, now, and counts the command as executing until the guard drops.
    /// A handler calls it after waiting for its own locks and before its first side effect, and
    /// holds the guard until its last; no new lease is granted meanwhile.
    pub fn enter(&self) -> Result<Executing, WireError> {
        let Some((leases, holder, token)) = &self.admitted else {
            return Ok(Executing { leases: None });
        };
        leases
            .lock()
            .expect("lease lock")
            .enter(holder, *token, Instant::now())?;
        Ok(Executing {
            leases: Some(leases.clone()),
        })
    }
}

/// A command executing under a lease (see [`Fence::enter`]).
#[derive(Debug)]
#[must_use = "the command counts as executing only while the guard lives"]
pub struct Executing {
    leases: Option<SharedLeases>,
}

impl Drop for Executing {
    fn drop(&mut self) {
        if let Some(l) = &self.leases {
            l.lock().expect("lease lock").exit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    #[test]
    fn one_holder_at_a_time_and_tokens_only_grow() {
        let t0 = Instant::now();
        let mut t = LeaseTable::open(None).unwrap();
        let a = t.acquire("ctl-a", None, TTL, t0).unwrap();
        assert_eq!(a.token, 1);
        let e = t.acquire("ctl-b", None, TTL, t0).unwrap_err();
        assert_eq!(e.code, ErrorCode::LeaseHeld);
        assert!(e.message.contains("ctl-a"), "{}", e.message);
        assert_eq!(e.lease.as_ref().unwrap().remaining_ms, 10_000);
        // Renewal keeps the token.
        assert_eq!(
            t.acquire("ctl-a", None, TTL, t0 + TTL / 2).unwrap().token,
            1
        );
        t.check("ctl-a", Some(1), t0 + TTL).unwrap();
        // After expiry another controller gets a higher token; the old one is stale/foreign.
        let later = t0 + TTL * 2;
        let b = t.acquire("ctl-b", None, TTL, later).unwrap();
        assert_eq!(b.token, 2);
        assert_eq!(
            t.check("ctl-a", Some(1), later).unwrap_err().code,
            ErrorCode::LeaseHeld
        );
        assert_eq!(
            t.check("ctl-b", Some(1), later).unwrap_err().code,
            ErrorCode::StaleToken
        );
        assert_eq!(
            t.check("ctl-b", None, later).unwrap_err().code,
            ErrorCode::NoLease
        );
        t.check("ctl-b", Some(2), later).unwrap();
    }

    #[test]
    fn tokens_survive_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fence");
        let now = Instant::now();
        {
            let mut t = LeaseTable::open(Some(&path)).unwrap();
            t.acquire("a", None, TTL, now).unwrap();
            t.release("a", None, now).unwrap();
            assert_eq!(t.acquire("a", None, TTL, now).unwrap().token, 2);
        }
        let mut t = LeaseTable::open(Some(&path)).unwrap();
        assert!(t.current(now).is_none(), "leases do not survive a restart");
        assert_eq!(t.acquire("b", None, TTL, now).unwrap().token, 3);
    }

    #[test]
    fn ttl_is_clamped() {
        let now = Instant::now();
        let mut t = LeaseTable::open(None).unwrap();
        let l = t
            .acquire("a", None, Duration::from_secs(100_000), now)
            .unwrap();
        assert_eq!(l.remaining_ms, MAX_TTL.as_millis() as u64);
    }

    fn instance(cmd: &str) -> ControllerInstance {
        ControllerInstance::new("mgmt-1".into(), cmd.into())
    }

    #[test]
    fn one_certificate_two_processes_two_holders() {
        let t0 = Instant::now();
        let mut t = LeaseTable::open(None).unwrap();
        let (daemon, ci) = (instance("unistor watch m/"), instance("unistor apply m/"));
        let a = t.acquire("controller", Some(&daemon), TTL, t0).unwrap();
        // The same certificate from another process is another holder, named in the refusal.
        let e = t.acquire("controller", Some(&ci), TTL, t0).unwrap_err();
        assert_eq!(e.code, ErrorCode::LeaseHeld);
        for part in [
            "unistor watch m/",
            "mgmt-1",
            "--lease-wait",
            &daemon.pid.to_string(),
        ] {
            assert!(e.message.contains(part), "{part}: {}", e.message);
        }
        assert_eq!(e.lease.as_ref().unwrap().instance.as_ref(), Some(&daemon));
        // Nor may it release it, nor may an older controller without an instance renew it.
        assert!(t.release("controller", Some(&ci), t0).is_err());
        assert!(t.acquire("controller", None, TTL, t0).is_err());
        // The holder renews with the same token.
        assert_eq!(
            t.acquire("controller", Some(&daemon), TTL, t0)
                .unwrap()
                .token,
            a.token
        );
        t.release("controller", Some(&daemon), t0).unwrap();
        assert_eq!(
            t.acquire("controller", Some(&ci), TTL, t0).unwrap().token,
            a.token + 1
        );
    }

    #[test]
    fn no_new_grant_while_a_command_of_the_old_one_executes() {
        let t0 = Instant::now();
        let leases: SharedLeases = Arc::new(Mutex::new(LeaseTable::open(None).unwrap()));
        let (one, two) = (instance("one"), instance("two"));
        let old = leases
            .lock()
            .unwrap()
            .acquire("controller", Some(&one), MIN_TTL, t0)
            .unwrap();
        // Admitted, then executing; a second one admitted but still waiting for a lock.
        let running = Fence::admitted(leases.clone(), "controller".into(), old.token);
        let waiting = Fence::admitted(leases.clone(), "controller".into(), old.token);
        let guard = running.enter().unwrap();
        assert_eq!(leases.lock().unwrap().executing(), 1);
        // The lease ends (expiry or release): the other process is still kept off.
        leases
            .lock()
            .unwrap()
            .release("controller", Some(&one), t0)
            .unwrap();
        let e = leases
            .lock()
            .unwrap()
            .acquire("controller", Some(&two), TTL, t0)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::LeaseHeld);
        assert!(e.message.contains("still executing"), "{}", e.message);
        drop(guard);
        let new = leases
            .lock()
            .unwrap()
            .acquire("controller", Some(&two), TTL, t0)
            .unwrap();
        assert!(new.token > old.token);
        // The command that waited for its lock is refused when it starts: its token is old.
        let e = waiting.enter().unwrap_err();
        assert_eq!(e.code, ErrorCode::StaleToken);
        assert_eq!(leases.lock().unwrap().executing(), 0);
        // Unfenced work (reads, the agent's own) always enters.
        drop(Fence::none().enter().unwrap());
    }

    #[test]
    fn a_lease_that_lapsed_while_waiting_refuses_the_command_at_its_start() {
        let t0 = Instant::now();
        let leases: SharedLeases = Arc::new(Mutex::new(LeaseTable::open(None).unwrap()));
        let l = leases
            .lock()
            .unwrap()
            .acquire("controller", None, MIN_TTL, t0)
            .unwrap();
        let fence = Fence::admitted(leases.clone(), "controller".into(), l.token);
        // Admitted now, starts after the lease ended (real clock: MIN_TTL is 1 s).
        leases.lock().unwrap().current = None;
        assert_eq!(fence.enter().unwrap_err().code, ErrorCode::NoLease);
    }

    fn claim(shard: u32, token: u64) -> Option<ShardClaim> {
        Some(ShardClaim {
            shard: format!("dpu-{shard}"),
            token,
        })
    }

    /// Replicas (issue 24): a higher claim of the same shard ends the lower one's lease at
    /// once, and its commands are refused from then on; a lower claim is refused, also after a
    /// restart; other shards and unclaimed leases are left alone.
    #[test]
    fn the_highest_claim_of_a_shard_wins_and_a_lower_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fence");
        let now = Instant::now();
        let (a, b) = (instance("a"), instance("b"));
        let mut t = LeaseTable::open(Some(&path)).unwrap();
        let old = t
            .acquire_claimed("ctl", Some(&a), TTL, claim(3, 5), now)
            .unwrap();
        // Same shard, same token, another replica: the lease is held.
        let e = t
            .acquire_claimed("ctl", Some(&b), TTL, claim(3, 5), now)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::LeaseHeld);
        // Another shard does not pre-empt it either (a DPU is in one shard at a time).
        let e = t
            .acquire_claimed("ctl", Some(&b), TTL, claim(4, 9), now)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::LeaseHeld);
        // A higher token of shard 3: granted at once, the old lease is over.
        let new = t
            .acquire_claimed("ctl", Some(&b), TTL, claim(3, 6), now)
            .unwrap();
        assert!(new.token > old.token);
        let e = t.check("ctl", Some(old.token), now).unwrap_err();
        assert_eq!(e.code, ErrorCode::StaleToken);
        t.check("ctl", Some(new.token), now).unwrap();
        // The old replica cannot come back with its token, not even once the new lease ends.
        t.release("ctl", Some(&b), now).unwrap();
        let e = t
            .acquire_claimed("ctl", Some(&a), TTL, claim(3, 5), now)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::StaleToken);
        assert!(e.message.contains("token 6"), "{}", e.message);
        // A restart keeps what each shard has shown.
        drop(t);
        let mut t = LeaseTable::open(Some(&path)).unwrap();
        let e = t
            .acquire_claimed("ctl", Some(&a), TTL, claim(3, 5), now)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::StaleToken);
        t.acquire_claimed("ctl", Some(&a), TTL, claim(3, 7), now)
            .unwrap();
        // An unclaimed request (a lone `unistor apply`) waits like any other holder.
        let e = t.acquire("ctl", Some(&b), TTL, now).unwrap_err();
        assert_eq!(e.code, ErrorCode::LeaseHeld);
        // And an unclaimed lease is not pre-empted by a claim.
        t.release("ctl", Some(&a), now).unwrap();
        t.acquire("ctl", Some(&b), TTL, now).unwrap();
        let e = t
            .acquire_claimed("ctl", Some(&a), TTL, claim(3, 8), now)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::LeaseHeld);
    }

    /// A higher claim ends the lower one's lease even while a command it admitted still
    /// executes: nothing new is admitted under the old token, and the new lease is granted
    /// only once that command ends.
    #[test]
    fn a_higher_claim_waits_for_the_old_holders_running_command() {
        let t0 = Instant::now();
        let leases: SharedLeases = Arc::new(Mutex::new(LeaseTable::open(None).unwrap()));
        let (a, b) = (instance("a"), instance("b"));
        let old = leases
            .lock()
            .unwrap()
            .acquire_claimed("ctl", Some(&a), TTL, claim(0, 1), t0)
            .unwrap();
        let running = Fence::admitted(leases.clone(), "ctl".into(), old.token);
        let waiting = Fence::admitted(leases.clone(), "ctl".into(), old.token);
        let guard = running.enter().unwrap();
        let e = leases
            .lock()
            .unwrap()
            .acquire_claimed("ctl", Some(&b), TTL, claim(0, 2), t0)
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::LeaseHeld);
        assert!(e.message.contains("still executing"), "{}", e.message);
        // The old lease is over all the same: the admitted-but-waiting command is refused.
        assert!(waiting.enter().is_err());
        drop(guard);
        leases
            .lock()
            .unwrap()
            .acquire_claimed("ctl", Some(&b), TTL, claim(0, 2), t0)
            .unwrap();
    }
}
