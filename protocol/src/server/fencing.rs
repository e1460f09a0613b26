//! Leases and fencing on the agent's side: lease commands answered by the session itself, a
//! mutating command admitted only under the live lease of its sender with its current token
//! (checked again when it starts executing: `Fence::enter`), and a session's lease ended with
//! the session.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tracing::{info, warn};

use super::session::Session;
use super::Handler;
use crate::error::WireError;
use crate::lease::{Fence, LeaseTable};
use crate::message::{Command, Empty, Reply, Request};
use std::sync::atomic::Ordering;

/// A lease lives as long as the session that took it (as an ephemeral node does): a controller
/// that dies closes its connections and its lease ends with them, so the next controller does
/// not wait out the TTL. A partition keeps the connection half open; the TTL ends that one.
/// Commands of the lease still executing keep any new grant off until they end.
impl<H, S> Drop for Session<H, S> {
    fn drop(&mut self) {
        if let Some(token) = self.leased {
            let mut leases = self.shared.leases.lock().unwrap_or_else(|e| e.into_inner());
            if leases.release_token(token) {
                info!(controller = %self.peer, token, "Session closed; its lease ends with it.");
            }
        }
    }
}

impl<H: Handler, S: AsyncRead + AsyncWrite + Unpin> Session<H, S> {
    /// The answer to a lease command, or the refusal of a mutating command not admitted under
    /// this peer's live lease; None for a command to dispatch.
    pub(super) fn leases_and_fencing(&mut self, req: &Request) -> Option<Result<Reply, WireError>> {
        let now = Instant::now();
        match &req.command {
            Command::AcquireLease(a) => {
                let result = match a.instance.as_ref().map(|i| i.check()) {
                    Some(Err(e)) => Err(e),
                    _ => {
                        let mut leases = self.leases();
                        let ttl = Duration::from_millis(a.ttl_ms);
                        match a.renew {
                            // Renew only: the live lease of this token, or nothing.
                            Some(token) => {
                                leases.check(&self.peer, Some(token), now).and_then(|()| {
                                    leases.acquire_claimed(
                                        &self.peer,
                                        a.instance.as_ref(),
                                        ttl,
                                        a.claim.clone(),
                                        now,
                                    )
                                })
                            }
                            None => leases.acquire_claimed(
                                &self.peer,
                                a.instance.as_ref(),
                                ttl,
                                a.claim.clone(),
                                now,
                            ),
                        }
                        .map(Reply::Lease)
                    }
                };
                if let Ok(Reply::Lease(l)) = &result {
                    self.leased = Some(l.token);
                }
                Some(result)
            }
            Command::ReleaseLease(r) => Some(
                self.leases()
                    .release(&self.peer, r.instance.as_ref(), now)
                    .map(|()| Reply::Done(Empty {})),
            ),
            cmd if cmd.is_mutating() => {
                match self
                    .leases()
                    .check_claimed(&self.peer, req.fence, req.claim.as_ref(), now)
                {
                    Ok(()) => None,
                    Err(e) => {
                        self.shared.stats.fenced.fetch_add(1, Ordering::Relaxed);
                        warn!(controller = %self.peer, command = cmd.name(), code = ?e.code, "Fenced off a mutating command.");
                        Some(Err(e))
                    }
                }
            }
            _ => None,
        }
    }

    /// The fence a dispatched command carries: its lease token, for a mutating command.
    pub(super) fn fence_of(&self, req: &Request) -> Fence {
        match req.fence {
            Some(token) if req.command.is_mutating() => {
                Fence::admitted(self.shared.leases.clone(), self.peer.clone(), token)
            }
            _ => Fence::none(),
        }
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, LeaseTable> {
        self.shared.leases.lock().expect("lease lock")
    }
}
