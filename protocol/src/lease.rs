//! Fencing: an agent grants its lease to one controller at a time.
//!
//! A lease has a holder (the authenticated name in the controller's certificate), an expiry on the
//! agent's monotonic clock (so wall-clock jumps never expire or extend it) and a fencing token.
//! Every new grant gets a token one higher than any token this agent ever issued; the highest
//! token is persisted before the grant is answered, so tokens keep growing across restarts. A
//! mutating command must carry the current token of a live lease held by the sender.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{ErrorCode, WireError};
use crate::message::LeaseInfo;

/// Shortest lease granted.
pub const MIN_TTL: Duration = Duration::from_secs(1);
/// Longest lease granted.
pub const MAX_TTL: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
struct Lease {
    holder: String,
    token: u64,
    expires: Instant,
}

/// The lease state of one agent.
#[derive(Debug)]
pub struct LeaseTable {
    current: Option<Lease>,
    last_token: u64,
    store: Option<PathBuf>,
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
        Ok(Self {
            current: None,
            last_token,
            store: store.map(Path::to_path_buf),
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

    fn live(&self, now: Instant) -> Option<&Lease> {
        self.current.as_ref().filter(|l| l.expires > now)
    }

    fn info(lease: &Lease, now: Instant) -> LeaseInfo {
        LeaseInfo {
            holder: lease.holder.clone(),
            token: lease.token,
            remaining_ms: lease.expires.saturating_duration_since(now).as_millis() as u64,
        }
    }

    /// The lease in force, if any.
    pub fn current(&self, now: Instant) -> Option<LeaseInfo> {
        self.live(now).map(|l| Self::info(l, now))
    }

    /// Grants or renews the lease for `holder`. Renewal keeps the token; a new grant raises it.
    pub fn acquire(
        &mut self,
        holder: &str,
        ttl: Duration,
        now: Instant,
    ) -> Result<LeaseInfo, WireError> {
        let ttl = ttl.clamp(MIN_TTL, MAX_TTL);
        if let Some(lease) = self.live(now) {
            if lease.holder != holder {
                return Err(held_by_other(Self::info(lease, now)));
            }
            let renewed = Lease {
                expires: now + ttl,
                ..lease.clone()
            };
            let info = Self::info(&renewed, now);
            self.current = Some(renewed);
            return Ok(info);
        }
        let token = self.last_token + 1;
        self.persist(token).map_err(|e| {
            WireError::new(
                ErrorCode::Internal,
                format!("cannot grant lease: {}", crate::error::chain(&e)),
            )
        })?;
        self.last_token = token;
        let lease = Lease {
            holder: holder.to_string(),
            token,
            expires: now + ttl,
        };
        let info = Self::info(&lease, now);
        self.current = Some(lease);
        Ok(info)
    }

    /// Ends `holder`'s lease early. Releasing a lease one does not hold is an error.
    pub fn release(&mut self, holder: &str, now: Instant) -> Result<(), WireError> {
        match self.live(now) {
            Some(lease) if lease.holder == holder => {
                self.current = None;
                Ok(())
            }
            Some(lease) => Err(held_by_other(Self::info(lease, now))),
            None => Ok(()),
        }
    }

    /// Checks that `holder` may run a mutating command with fencing token `token`.
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
                    "fencing token {token} is stale: the current lease of {} has token {}, ending in {} ms",
                    info.holder, info.token, info.remaining_ms
                ),
            )
            .with_lease(info));
        }
        Ok(())
    }
}

fn held_by_other(info: LeaseInfo) -> WireError {
    WireError::new(
        ErrorCode::LeaseHeld,
        format!(
            "lease held by controller {:?} (token {}) for another {} ms",
            info.holder, info.token, info.remaining_ms
        ),
    )
    .with_lease(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(10);

    #[test]
    fn one_holder_at_a_time_and_tokens_only_grow() {
        let t0 = Instant::now();
        let mut t = LeaseTable::open(None).unwrap();
        let a = t.acquire("ctl-a", TTL, t0).unwrap();
        assert_eq!(a.token, 1);
        let e = t.acquire("ctl-b", TTL, t0).unwrap_err();
        assert_eq!(e.code, ErrorCode::LeaseHeld);
        assert!(e.message.contains("ctl-a"), "{}", e.message);
        assert_eq!(e.lease.as_ref().unwrap().remaining_ms, 10_000);
        // Renewal keeps the token.
        assert_eq!(t.acquire("ctl-a", TTL, t0 + TTL / 2).unwrap().token, 1);
        t.check("ctl-a", Some(1), t0 + TTL).unwrap();
        // After expiry another controller gets a higher token; the old one is stale/foreign.
        let later = t0 + TTL * 2;
        let b = t.acquire("ctl-b", TTL, later).unwrap();
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
            t.acquire("a", TTL, now).unwrap();
            t.release("a", now).unwrap();
            assert_eq!(t.acquire("a", TTL, now).unwrap().token, 2);
        }
        let mut t = LeaseTable::open(Some(&path)).unwrap();
        assert!(t.current(now).is_none(), "leases do not survive a restart");
        assert_eq!(t.acquire("b", TTL, now).unwrap().token, 3);
    }

    #[test]
    fn ttl_is_clamped() {
        let now = Instant::now();
        let mut t = LeaseTable::open(None).unwrap();
        let l = t.acquire("a", Duration::from_secs(100_000), now).unwrap();
        assert_eq!(l.remaining_ms, MAX_TTL.as_millis() as u64);
    }
}
