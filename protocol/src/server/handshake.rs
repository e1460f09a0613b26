//! Before a session: the handshake budget that unauthenticated peers alone use (bounded in
//! all and per peer address; when either bound is reached the oldest handshake, of that
//! address or of all, is dropped for the newcomer), the TLS handshake, the session permits
//! (a budget apart, which unauthenticated peers never touch) and the hellos, all within the
//! handshake deadline. Its result is a [`Handshake`].

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, warn};

use super::{connection_error, send, Handler, Shared};
use crate::error::{ErrorCode, WireError};
use crate::frame::{Connection, FrameError};
use crate::message::{AgentHello, Message, HEARTBEAT_BOUNDS, PROTOCOL_VERSION};

/// The connections in their handshake, oldest first (ids rise), each with the means to drop it.
#[derive(Default)]
pub(super) struct Handshakes {
    next: u64,
    open: std::collections::BTreeMap<u64, (IpAddr, tokio::sync::oneshot::Sender<()>)>,
}

impl Handshakes {
    /// Admits a connection from `ip`, first evicting the oldest of `ip` (past `per_peer`) or of
    /// all (past `all`); returns its id, the signal that it was evicted, and how many were.
    pub(super) fn admit(
        &mut self,
        ip: IpAddr,
        all: usize,
        per_peer: usize,
    ) -> (u64, tokio::sync::oneshot::Receiver<()>, u64) {
        let mut evicted = 0;
        let of_peer: Vec<u64> = self
            .open
            .iter()
            .filter(|(_, (i, _))| *i == ip)
            .map(|(id, _)| *id)
            .collect();
        if of_peer.len() >= per_peer.max(1) {
            // Dropping the sender tells the connection task.
            self.open.remove(&of_peer[0]);
            evicted += 1;
        }
        while self.open.len() >= all.max(1) {
            self.open.pop_first();
            evicted += 1;
        }
        let id = self.next;
        self.next += 1;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.open.insert(id, (ip, tx));
        (id, rx, evicted)
    }
}

/// A warning that may come thousands of times a second (a flood of bad peers), logged at most
/// once a second with the count of those not logged.
#[derive(Default)]
pub(super) struct Throttled {
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttled {
    /// Logs `what` now, unless something was logged less than a second ago; whether it was.
    pub(super) fn warn(&self, peer: SocketAddr, what: &str) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if s.0
            .is_some_and(|at| now.duration_since(at) < Duration::from_secs(1))
        {
            s.1 += 1;
            return false;
        }
        let suppressed = std::mem::take(&mut s.1);
        s.0 = Some(now);
        drop(s);
        warn!(peer = %peer, suppressed, "{what}");
        true
    }
}

/// Removes a connection from the handshake budget when its handshake ends, however it ends.
pub(super) struct HandshakeSlot<H: Handler> {
    pub(super) shared: Arc<Shared<H>>,
    pub(super) id: u64,
}

impl<H: Handler> Drop for HandshakeSlot<H> {
    fn drop(&mut self) {
        let mut h = self
            .shared
            .handshakes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        h.open.remove(&self.id);
    }
}

/// Releases a per-peer slot when the connection ends.
struct PeerSlot<H: Handler> {
    shared: Arc<Shared<H>>,
    ip: IpAddr,
}

impl<H: Handler> Drop for PeerSlot<H> {
    fn drop(&mut self) {
        let mut map = self.shared.per_peer.lock().expect("per_peer lock");
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// A session's permits: one of all sessions, one of its peer address's.
pub(super) struct SessionPermits<H: Handler> {
    _all: tokio::sync::OwnedSemaphorePermit,
    _peer: PeerSlot<H>,
}

/// Takes a session permit for an authenticated peer at `addr`, if the session budget allows.
fn session_permits<H: Handler>(
    shared: &Arc<Shared<H>>,
    addr: SocketAddr,
) -> Option<SessionPermits<H>> {
    let all = shared.sessions.clone().try_acquire_owned().ok()?;
    let mut map = shared.per_peer.lock().expect("per_peer lock");
    let n = map.entry(addr.ip()).or_insert(0);
    if *n >= shared.config.max_connections_per_peer {
        return None;
    }
    *n += 1;
    Some(SessionPermits {
        _all: all,
        _peer: PeerSlot {
            shared: shared.clone(),
            ip: addr.ip(),
        },
    })
}

/// How a connection's handshake ended.
pub(super) enum Handshake<H: Handler> {
    /// Authenticated, within the session budget, hellos exchanged: a session starts.
    Ready {
        /// The connection (boxed: the TLS state is most of the enum).
        conn: Box<Connection<TlsStream<TcpStream>>>,
        /// The controller's certificate name.
        peer: String,
        /// Its places in the session budget, held for the session's life.
        permits: SessionPermits<H>,
        /// The liveness interval the controller asked for.
        liveness: Option<Duration>,
    },
    /// Closed, or refused (TLS, certificate, session cap, hello); logged where it happened.
    Refused,
    /// Dropped for a newer connection: the handshake budget was full.
    Evicted,
    /// Not done within the deadline.
    TimedOut,
}

/// Runs a connection's handshake within the deadline; its place in the handshake budget
/// (`slot`) is given up as soon as the peer is authenticated.
pub(super) async fn handshake<H: Handler>(
    shared: &Arc<Shared<H>>,
    acceptor: TlsAcceptor,
    stream: TcpStream,
    addr: SocketAddr,
    slot: HandshakeSlot<H>,
    evicted: tokio::sync::oneshot::Receiver<()>,
) -> Handshake<H> {
    let steps = async {
        let tls = tokio::select! {
            r = acceptor.accept(stream) => r,
            // Evicted for a newer connection (the sender is dropped).
            _ = evicted => return Handshake::Evicted,
        };
        let tls = match tls {
            Ok(tls) => tls,
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                // A port probe or a peer that gave up: nothing was offered, nothing refused.
                debug!(peer = %addr, "Closed before the TLS handshake.");
                return Handshake::Refused;
            }
            Err(e) => {
                shared.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                shared
                    .refusals
                    .warn(addr, &format!("TLS handshake refused: {e}"));
                return Handshake::Refused;
            }
        };
        // Authenticated: out of the handshake budget, into the sessions'.
        drop(slot);
        let peer = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(crate::tls::peer_name);
        let Some(peer) = peer else {
            shared.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
            shared
                .refusals
                .warn(addr, "Client certificate names nobody.");
            return Handshake::Refused;
        };
        let mut conn = Connection::new(tls);
        let Some(permits) = session_permits(shared, addr) else {
            shared
                .stats
                .rejected_over_cap
                .fetch_add(1, Ordering::Relaxed);
            warn!(peer = %addr, controller = %peer, "Session refused: the session cap is reached.");
            let e = WireError::new(ErrorCode::Busy, "too many sessions open; try again later");
            let _ = send(&mut conn, &Message::Error(e)).await;
            return Handshake::Refused;
        };
        match hello(shared, &mut conn, &peer).await {
            Ok(liveness) => Handshake::Ready {
                conn: Box::new(conn),
                peer,
                permits,
                liveness,
            },
            Err(reason) => {
                warn!(peer = %addr, controller = %peer, reason, "Handshake failed.");
                Handshake::Refused
            }
        }
    };
    match timeout(shared.config.handshake_timeout, steps).await {
        Ok(h) => h,
        Err(_) => {
            shared
                .stats
                .handshake_timeouts
                .fetch_add(1, Ordering::Relaxed);
            shared
                .refusals
                .warn(addr, "Dropped peer: no handshake within the deadline.");
            Handshake::TimedOut
        }
    }
}

/// Reads the controller's hello and answers with the agent's; the liveness interval the
/// controller asked for, clamped to [`HEARTBEAT_BOUNDS`].
async fn hello<H: Handler, S: AsyncRead + AsyncWrite + Unpin>(
    shared: &Shared<H>,
    conn: &mut Connection<S>,
    peer: &str,
) -> Result<Option<Duration>, &'static str> {
    let frame = match conn.read_frame().await {
        Ok(Some(f)) => f,
        Ok(None) => return Err("closed before hello"),
        Err(e) => {
            if let FrameError::TooLarge { .. } = e {
                shared
                    .stats
                    .oversized_frames
                    .fetch_add(1, Ordering::Relaxed);
            }
            let _ = send(conn, &connection_error(&e)).await;
            return Err("bad frame before hello");
        }
    };
    let hello = match Message::from_bytes(&frame) {
        Ok(Message::ControllerHello(h)) => h,
        Ok(_) => {
            let e = WireError::new(
                ErrorCode::ProtocolViolation,
                "the first message must be controller_hello",
            );
            let _ = send(conn, &Message::Error(e)).await;
            return Err("first message was not a hello");
        }
        Err(e) => {
            shared
                .stats
                .malformed_frames
                .fetch_add(1, Ordering::Relaxed);
            let e = WireError::new(ErrorCode::Malformed, format!("invalid hello: {e}"));
            let _ = send(conn, &Message::Error(e)).await;
            return Err("malformed hello");
        }
    };
    if hello.version != PROTOCOL_VERSION {
        let e = WireError::new(
            ErrorCode::UnsupportedVersion,
            format!(
                "agent speaks protocol version {PROTOCOL_VERSION}, controller sent {}",
                hello.version
            ),
        );
        let _ = send(conn, &Message::Error(e)).await;
        return Err("version mismatch");
    }
    let reply = Message::AgentHello(AgentHello {
        version: PROTOCOL_VERSION,
        kind: shared.handler.kind(),
        name: shared.config.name.clone(),
        capabilities: shared.handler.capabilities(),
        peer: peer.to_string(),
        lease: shared
            .leases
            .lock()
            .expect("lease lock")
            .current(Instant::now()),
    });
    send(conn, &reply).await.map_err(|_| "cannot send hello")?;
    Ok(hello
        .heartbeat_ms
        .map(|ms| Duration::from_millis(ms).clamp(HEARTBEAT_BOUNDS.0, HEARTBEAT_BOUNDS.1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_flood_of_refusals_is_logged_once_a_second() {
        let t = Throttled::default();
        let peer: SocketAddr = "127.0.0.2:5".parse().unwrap();
        let logged = (0..10_000).filter(|_| t.warn(peer, "refused")).count();
        assert_eq!(logged, 1);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(
            t.warn(peer, "refused"),
            "a second later, the next is logged"
        );
    }

    #[test]
    fn the_handshake_budget_evicts_the_oldest_of_the_address_then_of_all() {
        let mut h = Handshakes::default();
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let mut signals = vec![];
        for _ in 0..3 {
            let (_, rx, evicted) = h.admit(a, 5, 3);
            assert_eq!(evicted, 0);
            signals.push(rx);
        }
        // A fourth from `a`: its oldest goes (its sender dropped), the others stay.
        let (_, _rx, evicted) = h.admit(a, 5, 3);
        assert_eq!(evicted, 1);
        assert!(signals[0]
            .try_recv()
            .is_err_and(|e| e == tokio::sync::oneshot::error::TryRecvError::Closed));
        assert!(signals[1]
            .try_recv()
            .is_err_and(|e| e == tokio::sync::oneshot::error::TryRecvError::Empty));
        // Another address fills the budget: the oldest of all goes, whoever's it is.
        let (idb, _rxb, evicted) = h.admit(b, 5, 3);
        assert_eq!(evicted, 0);
        let (_, _rxb2, evicted) = h.admit(b, 5, 3);
        assert_eq!((evicted, h.open.len()), (0, 5));
        let (_, _rxb3, evicted) = h.admit(b, 5, 3);
        assert_eq!(evicted, 1);
        assert_eq!(h.open.len(), 5);
        assert!(h.open.contains_key(&idb));
        assert!(signals[1]
            .try_recv()
            .is_err_and(|e| e == tokio::sync::oneshot::error::TryRecvError::Closed));
    }
}
