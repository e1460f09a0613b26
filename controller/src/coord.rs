//! Membership, shard leases and fencing tokens in RADOS, for controller replicas (issue 24,
//! `docs/scaling.md`, "Where leases live: RADOS"). The replicas are the live holders of a shared
//! lock on `unistor.<owner>.members` (a silent replica drops out when its TTL passes, on the
//! OSD). One object per shard,
//! `unistor.<owner>.shard.<k>`: its exclusive `cls_lock` lock is the replica's lease (expiry
//! decided on the OSD, by one clock), and its omap key `token` is the shard's fencing token,
//! raised by whoever takes the lock with a guarded write (compare-and-set on the OSD).
//!
//! Blocking (librados calls): the daemon runs these on a blocking thread.
//!
//! What is left if a replica dies:
//! - before the lock is taken: nothing.
//! - after the lock, before the token is raised: a lock that expires after its TTL, the token
//!   unchanged; the next taker raises it.
//! - after the token is raised: the lock, until it expires; agents see the raised token only
//!   once the replica uses it, and a later taker raises it again.
//!
//! A replica paused between taking the lock and raising the token, and resumed after another
//! replica took the shard: its compare-and-set starts from the token it read, which the other
//! replica has raised since, so it fails, and the paused replica holds nothing.

use std::time::Duration;

use ceph_lib::{LibError, Pool};

/// The lock's name on every shard object.
const LOCK: &str = "unistor-shard";

/// The shared lock whose live holders are the deployment's replicas.
const MEMBERS: &str = "unistor-members";

/// Errors of the coordination layer.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// A librados call failed.
    #[error("{object}: {source}")]
    Rados {
        /// The shard or members object.
        object: String,
        /// The call's error.
        #[source]
        source: LibError,
    },
    /// The token key holds something that is not a number.
    #[error("shard {shard}: token {value:?} is not a number")]
    BadToken {
        /// The shard object.
        shard: String,
        /// What the key holds.
        value: String,
    },
}

/// What taking a shard gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Held, with the shard's new token (higher than any before it).
    Held {
        /// The fencing token to send with this shard's commands.
        token: u64,
    },
    /// Another replica holds it.
    Busy,
}

/// One replica's view of the shard objects in `pool`.
#[derive(Debug)]
pub struct Shards<'a> {
    pool: &'a Pool,
    owner: &'a str,
    replica: &'a str,
    ttl: Duration,
}

/// EBUSY: the lock is another's.
const EBUSY: i32 = 16;
/// ENOENT: no such object (nobody ever wrote it), or a lock not held.
const ENOENT: i32 = 2;

/// The error of a librados call on `object`.
fn failed(object: String) -> impl Fn(LibError) -> CoordError {
    move |source| CoordError::Rados {
        object: object.clone(),
        source,
    }
}

impl<'a> Shards<'a> {
    /// Replica `replica` of deployment `owner`, with leases of `ttl`.
    pub fn new(pool: &'a Pool, owner: &'a str, replica: &'a str, ttl: Duration) -> Self {
        Self {
            pool,
            owner,
            replica,
            ttl,
        }
    }

    /// The object of shard `k`.
    pub fn object(&self, k: u32) -> String {
        format!("unistor.{}.shard.{k}", self.owner)
    }

    /// The object whose shared lock lists the replicas.
    pub fn members_object(&self) -> String {
        format!("unistor.{}.members", self.owner)
    }

    /// Joins the replicas, or renews this one's membership: a replica that stops renewing
    /// leaves the list when its TTL passes, decided on the OSD.
    pub fn join(&self) -> Result<(), CoordError> {
        self.pool
            .lock_shared(&self.members_object(), MEMBERS, self.replica, self.ttl)
            .map_err(failed(self.members_object()))
    }

    /// Leaves the replicas at once (nothing when not a member).
    pub fn leave(&self) -> Result<(), CoordError> {
        match self
            .pool
            .unlock(&self.members_object(), MEMBERS, self.replica)
        {
            Ok(()) | Err(LibError::Call { errno: ENOENT, .. }) => Ok(()),
            Err(e) => Err(failed(self.members_object())(e)),
        }
    }

    /// The live replicas, sorted: what every replica feeds [`crate::shards::assign`] with, so
    /// that all compute the same owners.
    pub fn members(&self) -> Result<Vec<String>, CoordError> {
        match self.pool.lockers(&self.members_object(), MEMBERS) {
            Ok(mut m) => {
                m.sort();
                Ok(m)
            }
            Err(LibError::Call { errno: ENOENT, .. }) => Ok(vec![]),
            Err(e) => Err(failed(self.members_object())(e)),
        }
    }

    /// Takes shard `k`: its lock, then its token raised by one. `Busy` while another replica
    /// holds the lock, or when another replica raised the token between this one's lock and
    /// its raise (then this one gave the lock back).
    pub fn take(&self, k: u32) -> Result<Taken, CoordError> {
        let object = self.object(k);
        match self
            .pool
            .lock_exclusive(&object, LOCK, self.replica, self.ttl)
        {
            Ok(()) => {}
            Err(LibError::Call { errno: EBUSY, .. }) => return Ok(Taken::Busy),
            Err(e) => return Err(failed(self.object(k))(e)),
        }
        let now = self.token(k)?;
        let (from, to) = (Self::spell(now), Self::spell(now + 1));
        let raised = self
            .pool
            .omap_compare_and_set(&object, "token", from.as_bytes(), to.as_bytes())
            .map_err(failed(self.object(k)))?;
        if raised {
            Ok(Taken::Held { token: now + 1 })
        } else {
            // Someone raised it meanwhile: they hold the shard, whatever this lock says.
            let _ = self.pool.unlock(&object, LOCK, self.replica);
            Ok(Taken::Busy)
        }
    }

    /// Renews shard `k`'s lease: false when it is no longer this replica's (expired and taken).
    pub fn renew(&self, k: u32) -> Result<bool, CoordError> {
        match self
            .pool
            .lock_exclusive(&self.object(k), LOCK, self.replica, self.ttl)
        {
            Ok(()) => Ok(true),
            Err(LibError::Call { errno: EBUSY, .. }) => Ok(false),
            Err(e) => Err(failed(self.object(k))(e)),
        }
    }

    /// Gives shard `k` up (nothing when it is not held).
    pub fn release(&self, k: u32) -> Result<(), CoordError> {
        match self.pool.unlock(&self.object(k), LOCK, self.replica) {
            Ok(()) | Err(LibError::Call { errno: ENOENT, .. }) => Ok(()),
            Err(e) => Err(failed(self.object(k))(e)),
        }
    }

    /// Shard `k`'s token now (0 before anyone took it).
    pub fn token(&self, k: u32) -> Result<u64, CoordError> {
        let values = match self.pool.omap_values(&self.object(k), 64) {
            Ok(v) => v,
            // No object: nobody ever took the shard.
            Err(LibError::Call { errno: ENOENT, .. }) => return Ok(0),
            Err(e) => return Err(failed(self.object(k))(e)),
        };
        match values.get("token") {
            None => Ok(0),
            Some(v) if v.is_empty() => Ok(0),
            Some(v) => {
                let text = String::from_utf8_lossy(v);
                text.parse().map_err(|_| CoordError::BadToken {
                    shard: self.object(k),
                    value: text.into_owned(),
                })
            }
        }
    }

    /// How a token is written: decimal; 0 is the absent key (an absent key compares as empty).
    fn spell(token: u64) -> String {
        match token {
            0 => String::new(),
            t => t.to_string(),
        }
    }
}
