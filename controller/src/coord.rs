//! Membership, shard ownership and fencing tokens in RADOS, for controller replicas (issue 24,
//! `docs/scaling.md`, "Where leases live: RADOS").
//!
//! - **The lease is membership.** The replicas are the live holders of a shared `cls_lock` on
//!   `unistor.<owner>.members`, each with its name as cookie and a TTL; a replica renews it every
//!   TTL/3, and one that stops (crash, pause, cut off from Ceph) is dropped when its TTL passes,
//!   decided by the OSD's clock: one clock for every lease, no replica judging another's time.
//!   One renewal per replica, whatever the number of DPUs it owns.
//! - **The map is an omap.** `unistor.<owner>.shards` holds one key per shard (`shard.<name>`: a
//!   DPU, or [`GONE_IMAGES`]) whose value is the shard's fencing token and its holder
//!   (`"7 ctl-b"`; `"7"` once released). A shard changes hands only by a compare-and-set on the
//!   OSD from the value the taker read, and every take raises the token by one: two replicas
//!   racing for a shard cannot both win, and agents that keep the highest token of each shard
//!   refuse the loser.
//! - **Who may take what** is the caller's rule (`replica.rs`): a shard the assignment gives it
//!   whose holder is gone from the members, released, or never held.
//!
//! Blocking (librados calls): the daemon runs these on a thread of their own.
//!
//! What is left if a replica dies:
//! - before it joins: nothing.
//! - after joining, before any take: its membership, until the TTL passes.
//! - after a take: the record naming it, with the raised token; takeable by others as soon as
//!   its membership expires. Agents see the raised token only once it is used, and the next
//!   taker raises it again.
//! - during a take: the compare-and-set is one OSD operation; it happened or it did not.
//!
//! A replica paused before a compare-and-set and resumed after another replica took the shard:
//! its compare-and-set starts from the value it read, which the other replica changed, so it
//! fails, and the paused replica holds nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use ceph_lib::{LibError, Pool};

/// The shared lock whose live holders are the deployment's replicas.
const MEMBERS: &str = "unistor-members";

/// The shard of the images whose volumes are gone from every manifest: one replica cleans
/// them up.
pub const GONE_IMAGES: &str = "@gone-images";

/// Shards one map holds at most (DPUs of the deployment, and [`GONE_IMAGES`]).
const MAX_SHARDS: u64 = 1 << 20;

/// The prefix of a shard's key in the map.
const KEY: &str = "shard.";

/// Errors of the coordination layer.
#[derive(Debug, thiserror::Error)]
pub enum CoordError {
    /// A librados call failed.
    #[error("{object}: {source}")]
    Rados {
        /// The members or map object.
        object: String,
        /// The call's error.
        #[source]
        source: LibError,
    },
    /// A shard's record is not `<token>` or `<token> <holder>`.
    #[error("{object}: shard {shard:?} holds {value:?}, not `<token> [holder]`")]
    BadRecord {
        /// The map object.
        object: String,
        /// The shard.
        shard: String,
        /// What its key holds.
        value: String,
    },
}

/// A shard's entry in the map.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    /// The shard's fencing token: raised by one at every take, never lowered.
    pub token: u64,
    /// The replica holding it; `None` once released (or never taken).
    pub holder: Option<String>,
}

impl Record {
    /// How the record is stored: `"<token> <holder>"`, `"<token>"`; the never-taken record is
    /// the absent key (which a compare-and-set compares as empty).
    fn spell(&self) -> String {
        match (&self.holder, self.token) {
            (None, 0) => String::new(),
            (None, t) => t.to_string(),
            (Some(h), t) => format!("{t} {h}"),
        }
    }

    fn parse(value: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(value).ok()?;
        if text.is_empty() {
            return Some(Self::default());
        }
        let (token, holder) = match text.split_once(' ') {
            Some((t, h)) if !h.is_empty() && !h.contains(' ') => (t, Some(h.to_string())),
            Some(_) => return None,
            None => (text, None),
        };
        Some(Self {
            token: token.parse().ok()?,
            holder,
        })
    }
}

/// One replica's handle on the deployment's coordination objects in `pool`.
#[derive(Debug)]
pub struct Coord<'a> {
    pool: &'a Pool,
    owner: &'a str,
    replica: &'a str,
    ttl: Duration,
    /// librados operations issued (what the coordination costs the cluster).
    ops: std::cell::Cell<u64>,
}

/// ENOENT: no such object (nobody ever wrote it), or a lock not held.
const ENOENT: i32 = 2;

/// The error of a librados call on `object`.
fn failed(object: String) -> impl Fn(LibError) -> CoordError {
    move |source| CoordError::Rados {
        object: object.clone(),
        source,
    }
}

impl<'a> Coord<'a> {
    /// Replica `replica` of deployment `owner`, with membership of `ttl`.
    pub fn new(pool: &'a Pool, owner: &'a str, replica: &'a str, ttl: Duration) -> Self {
        Self {
            pool,
            owner,
            replica,
            ttl,
            ops: std::cell::Cell::new(0),
        }
    }

    /// librados operations this handle has issued.
    pub fn ops(&self) -> u64 {
        self.ops.get()
    }

    fn op(&self) {
        self.ops.set(self.ops.get() + 1);
    }

    /// The object whose shared lock lists the replicas.
    pub fn members_object(&self) -> String {
        format!("unistor.{}.members", self.owner)
    }

    /// The object whose omap is the shard map.
    pub fn map_object(&self) -> String {
        format!("unistor.{}.shards", self.owner)
    }

    /// Joins the replicas, or renews this one's membership (the lease): a replica that stops
    /// renewing leaves the list when its TTL passes, decided on the OSD. Also makes sure the map
    /// object exists (a compare-and-set needs it).
    pub fn join(&self) -> Result<(), CoordError> {
        self.ops.set(self.ops.get() + 2);
        self.pool
            .lock_shared(&self.members_object(), MEMBERS, self.replica, self.ttl)
            .map_err(failed(self.members_object()))?;
        self.pool
            .omap_set(&self.map_object(), "format", b"1")
            .map_err(failed(self.map_object()))
    }

    /// Renews this replica's membership only (the map object exists once joined).
    pub fn renew(&self) -> Result<(), CoordError> {
        self.op();
        self.pool
            .lock_shared(&self.members_object(), MEMBERS, self.replica, self.ttl)
            .map_err(failed(self.members_object()))
    }

    /// Leaves the replicas at once (nothing when not a member).
    pub fn leave(&self) -> Result<(), CoordError> {
        self.op();
        match self
            .pool
            .unlock(&self.members_object(), MEMBERS, self.replica)
        {
            Ok(()) | Err(LibError::Call { errno: ENOENT, .. }) => Ok(()),
            Err(e) => Err(failed(self.members_object())(e)),
        }
    }

    /// The live replicas, sorted, each once: what every replica feeds
    /// [`crate::shards::assign`] with, so that all compute the same owners.
    pub fn members(&self) -> Result<Vec<String>, CoordError> {
        self.op();
        match self.pool.lockers(&self.members_object(), MEMBERS) {
            Ok(mut m) => {
                m.sort();
                m.dedup();
                Ok(m)
            }
            Err(LibError::Call { errno: ENOENT, .. }) => Ok(vec![]),
            Err(e) => Err(failed(self.members_object())(e)),
        }
    }

    /// Every shard's record (a shard never taken is absent).
    pub fn records(&self) -> Result<BTreeMap<String, Record>, CoordError> {
        let object = self.map_object();
        self.op();
        let values = match self.pool.omap_values(&object, MAX_SHARDS) {
            Ok(v) => v,
            Err(LibError::Call { errno: ENOENT, .. }) => return Ok(BTreeMap::new()),
            Err(e) => return Err(failed(object)(e)),
        };
        let mut out = BTreeMap::new();
        for (key, value) in values {
            let Some(shard) = key.strip_prefix(KEY) else {
                continue;
            };
            let record = Record::parse(&value).ok_or_else(|| CoordError::BadRecord {
                object: object.clone(),
                shard: shard.to_string(),
                value: String::from_utf8_lossy(&value).into_owned(),
            })?;
            out.insert(shard.to_string(), record);
        }
        Ok(out)
    }

    /// Takes `shard` from what it held when read (`seen`; `None`: never taken): the record
    /// becomes this replica's with the token raised by one. The new token, or `None` when the
    /// record changed since it was read (another replica took or released it: read again).
    pub fn take(&self, shard: &str, seen: Option<&Record>) -> Result<Option<u64>, CoordError> {
        let seen = seen.cloned().unwrap_or_default();
        let next = Record {
            token: seen.token + 1,
            holder: Some(self.replica.to_string()),
        };
        self.swap(shard, &seen, &next)
            .map(|done| done.then_some(next.token))
    }

    /// Gives `shard` up, if this replica still holds it with `token`: the record keeps the
    /// token and names no holder. Whether it was given up (false: it is not this replica's).
    pub fn release(&self, shard: &str, token: u64) -> Result<bool, CoordError> {
        let held = Record {
            token,
            holder: Some(self.replica.to_string()),
        };
        self.swap(
            shard,
            &held,
            &Record {
                token,
                holder: None,
            },
        )
    }

    fn swap(&self, shard: &str, from: &Record, to: &Record) -> Result<bool, CoordError> {
        let object = self.map_object();
        self.op();
        self.pool
            .omap_compare_and_set(
                &object,
                &format!("{KEY}{shard}"),
                from.spell().as_bytes(),
                to.spell().as_bytes(),
            )
            .map_err(failed(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_ones_are_refused() {
        for r in [
            Record::default(),
            Record {
                token: 7,
                holder: None,
            },
            Record {
                token: 7,
                holder: Some("ctl-b".into()),
            },
        ] {
            assert_eq!(Record::parse(r.spell().as_bytes()), Some(r));
        }
        for bad in ["x", "7 ", "7 a b", " 7", "-1 a"] {
            assert_eq!(Record::parse(bad.as_bytes()), None, "{bad:?}");
        }
    }
}
