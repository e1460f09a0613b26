//! The agent side of a session: accept, authenticate, fence, dispatch, push events, shut down.
//!
//! Tasks and channels:
//! - the accept loop (`run`) admits every TCP connection into the handshake budget, which
//!   unauthenticated peers alone use: bounded in all and per peer address, and when either
//!   bound is reached the oldest handshake (of that address, or of all) is dropped for the
//!   newcomer. Silent connections therefore cannot lock a controller out: its handshake takes
//!   milliseconds, theirs wait until evicted or the deadline;
//! - each connection task does the TLS handshake within the handshake deadline; an
//!   authenticated peer then takes a session permit (global, and per peer address: a budget of
//!   its own, which unauthenticated peers never touch), exchanges hellos, and loops over: frames from the controller, responses from request tasks
//!   (bounded `mpsc`), events from the agent (`broadcast`) and the shutdown signal (`watch`);
//! - each request runs in its own task (at most `max_in_flight` per connection); lease commands
//!   and fencing checks are done by the connection task itself, before dispatch.
//!
//! Shutdown: when the shutdown future completes the accept loop stops, every connection stops
//! reading requests, finishes those in flight, sends `shutting_down` and closes; `run` returns
//! once all connections are closed or the grace period has passed.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{timeout, Instant};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::error::{ErrorCode, WireError};
use crate::frame::{Connection, FrameError};
use crate::lease::{Fence, LeaseTable, SharedLeases};
use crate::message::{
    silence_limit, AgentHello, AgentKind, Command, Empty, Event, EventEnvelope, Message, Outcome,
    Reply, Request, Response, HEARTBEAT_BOUNDS, PROTOCOL_VERSION,
};

/// What an agent does with commands. Only routing and fencing live in the server.
#[async_trait::async_trait]
pub trait Handler: Send + Sync + 'static {
    /// The agent's kind.
    fn kind(&self) -> AgentKind;
    /// Command families served (sent in the hello).
    fn capabilities(&self) -> Vec<String>;
    /// Runs one command. Lease commands never reach the handler; mutating commands reach it only
    /// with a valid fencing token, and must call [`Fence::enter`] after waiting for the
    /// handler's own locks and before their first side effect, holding its guard until their
    /// last (reads get [`Fence::none`]).
    async fn handle(&self, command: Command, fence: Fence) -> Result<Reply, WireError>;
    /// Events to push to every connected controller.
    fn subscribe(&self) -> Option<broadcast::Receiver<Event>> {
        None
    }
}

/// Limits and timers of the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The agent's name (as in its certificate).
    pub name: String,
    /// Time allowed for the TLS handshake plus the hello.
    pub handshake_timeout: Duration,
    /// A connection that sends nothing (not even a ping) for this long is closed.
    pub idle_timeout: Duration,
    /// Authenticated sessions open at once, all peers together.
    pub max_connections: usize,
    /// Authenticated sessions open at once from one peer address.
    pub max_connections_per_peer: usize,
    /// Connections not yet authenticated (in their TLS handshake), all peers together; a new
    /// one past it evicts the oldest.
    pub max_handshakes: usize,
    /// Connections not yet authenticated from one peer address; a new one past it evicts that
    /// address's oldest.
    pub max_handshakes_per_peer: usize,
    /// Requests running at once on one connection; more are answered `busy`.
    pub max_in_flight: usize,
    /// How long shutdown waits for requests in flight.
    pub shutdown_grace: Duration,
    /// Interval of heartbeat events.
    pub heartbeat_interval: Duration,
}

impl ServerConfig {
    /// Defaults from `docs/protocol.md`.
    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            handshake_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            max_connections: 256,
            max_connections_per_peer: 100,
            max_handshakes: 64,
            max_handshakes_per_peer: 8,
            max_in_flight: 32,
            shutdown_grace: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
        }
    }
}

/// Counters, for tests and metrics.
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Connections accepted past the caps.
    pub accepted: AtomicU64,
    /// Authenticated sessions refused because a session cap was reached.
    pub rejected_over_cap: AtomicU64,
    /// Unauthenticated connections dropped for a newer one (the handshake budget was full).
    pub evicted_handshakes: AtomicU64,
    /// TLS handshakes that failed (no or bad certificate...).
    pub tls_failures: AtomicU64,
    /// Peers dropped for not finishing the handshake in time.
    pub handshake_timeouts: AtomicU64,
    /// Frames refused for their announced size.
    pub oversized_frames: AtomicU64,
    /// Frames that were not a valid message.
    pub malformed_frames: AtomicU64,
    /// Mutating commands refused by fencing.
    pub fenced: AtomicU64,
    /// Requests answered.
    pub requests: AtomicU64,
}

/// Shared state of one running server.
struct Shared<H> {
    handler: Arc<H>,
    config: ServerConfig,
    leases: SharedLeases,
    stats: Arc<ServerStats>,
    per_peer: Mutex<HashMap<IpAddr, usize>>,
    handshakes: Mutex<Handshakes>,
    sessions: Arc<Semaphore>,
    /// Refusals and drops of unauthenticated peers, logged at most once a second.
    refusals: Throttled,
    started: Instant,
}

/// The connections in their handshake, oldest first (ids rise), each with the means to drop it.
#[derive(Default)]
struct Handshakes {
    next: u64,
    open: std::collections::BTreeMap<u64, (IpAddr, tokio::sync::oneshot::Sender<()>)>,
}

impl Handshakes {
    /// Admits a connection from `ip`, first evicting the oldest of `ip` (past `per_peer`) or of
    /// all (past `all`); returns its id, the signal that it was evicted, and how many were.
    fn admit(
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
struct Throttled {
    state: Mutex<(Option<Instant>, u64)>,
}

impl Throttled {
    /// Logs `what` now, unless something was logged less than a second ago; whether it was.
    fn warn(&self, peer: SocketAddr, what: &str) -> bool {
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
struct HandshakeSlot<H: Handler> {
    shared: Arc<Shared<H>>,
    id: u64,
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

/// Errors before an agent serves: its TLS material, its state directory, its address.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// TLS material could not be loaded.
    #[error("cannot load TLS material")]
    Tls(#[from] crate::tls::TlsError),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The state directory or the fencing-token store is unusable.
    #[error("cannot use state directory {path}")]
    State {
        /// The directory.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What every agent needs before it serves.
pub struct Prepared {
    /// The bound listener.
    pub listener: TcpListener,
    /// The address it is bound to (the port the system chose, for `--listen HOST:0`).
    pub local: SocketAddr,
    /// TLS configuration.
    pub tls: Arc<rustls::ServerConfig>,
    /// The lease table, its fencing token kept in the state directory.
    pub leases: LeaseTable,
}

/// Loads TLS material, opens the fencing-token store in `state_dir` (created if missing) and
/// binds `addr`: everything that can fail before an agent serves.
pub async fn prepare(
    addr: SocketAddr,
    pki: &crate::tls::PkiPaths,
    state_dir: &std::path::Path,
) -> Result<Prepared, StartError> {
    let tls = crate::tls::server_config(pki)?;
    let state_err = |source: Box<dyn std::error::Error + Send + Sync>| StartError::State {
        path: state_dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(state_dir).map_err(|e| state_err(e.into()))?;
    let leases = LeaseTable::open(Some(&state_dir.join("fencing-token")))
        .map_err(|e| state_err(e.into()))?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| StartError::Bind { addr, source })?;
    Ok(Prepared {
        listener,
        local,
        tls,
        leases,
    })
}

/// Says where an agent listens, as the first line on stdout (`NAME: listening on HOST:PORT`):
/// with `--listen HOST:0` the system picks the port, and whoever started the agent reads it
/// here instead of guessing a free one beforehand.
pub fn announce(name: &str, local: SocketAddr) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{name}: listening on {local}");
    let _ = out.flush();
}

/// Serves `listener` until `shutdown` completes, then drains.
pub async fn run<H: Handler>(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handler: Arc<H>,
    leases: LeaseTable,
    config: ServerConfig,
    stats: Arc<ServerStats>,
    shutdown: impl Future<Output = ()>,
) {
    let shared = Arc::new(Shared {
        handler,
        leases: Arc::new(Mutex::new(leases)),
        stats,
        per_peer: Mutex::new(HashMap::new()),
        handshakes: Mutex::new(Handshakes::default()),
        sessions: Arc::new(Semaphore::new(config.max_connections)),
        refusals: Throttled::default(),
        started: Instant::now(),
        config,
    });
    let acceptor = TlsAcceptor::from(tls);
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut conns = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        // Cancel safety: `accept` is cancel-safe; the shutdown future is polled by reference.
        let (stream, addr) = tokio::select! {
            _ = &mut shutdown => break,
            res = listener.accept() => match res {
                Ok(x) => x,
                Err(e) => {
                    warn!(error = %e, "Accept failed.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let (id, evicted_rx, evicted) = shared
            .handshakes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(
                addr.ip(),
                shared.config.max_handshakes,
                shared.config.max_handshakes_per_peer,
            );
        if evicted > 0 {
            shared
                .stats
                .evicted_handshakes
                .fetch_add(evicted, Ordering::Relaxed);
            shared.refusals.warn(
                addr,
                "Handshake budget full: the oldest unauthenticated connection dropped for a new one.",
            );
        }
        shared.stats.accepted.fetch_add(1, Ordering::Relaxed);
        set_keepalive(&stream);
        let slot = HandshakeSlot {
            shared: shared.clone(),
            id,
        };
        let shared = shared.clone();
        let acceptor = acceptor.clone();
        let stop = stop_rx.clone();
        conns.spawn(async move {
            serve_connection(shared, acceptor, stream, addr, stop, slot, evicted_rx).await;
        });
    }
    info!(
        connections = conns.len(),
        "Shutting down: draining connections."
    );
    let _ = stop_tx.send(true);
    drop(listener);
    let grace = shared.config.shutdown_grace + Duration::from_secs(1);
    if timeout(grace, async { while conns.join_next().await.is_some() {} })
        .await
        .is_err()
    {
        warn!("Grace period over: closing the remaining connections.");
        conns.shutdown().await;
    }
}

fn set_keepalive(stream: &TcpStream) {
    let _ = stream.set_nodelay(true);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10));
    if let Err(e) = socket2::SockRef::from(stream).set_tcp_keepalive(&ka) {
        debug!(error = %e, "Cannot set TCP keepalive.");
    }
}

/// A session's permits: one of all sessions, one of its peer address's.
struct SessionPermits<H: Handler> {
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

async fn serve_connection<H: Handler>(
    shared: Arc<Shared<H>>,
    acceptor: TlsAcceptor,
    stream: TcpStream,
    addr: SocketAddr,
    stop: watch::Receiver<bool>,
    slot: HandshakeSlot<H>,
    evicted: tokio::sync::oneshot::Receiver<()>,
) {
    let deadline = shared.config.handshake_timeout;
    let tls_handshake = async {
        tokio::select! {
            r = acceptor.accept(stream) => Some(r),
            // Evicted for a newer connection (the sender is dropped).
            _ = evicted => None,
        }
    };
    let handshake = async {
        let tls = match tls_handshake.await {
            None => return Err(()),
            Some(Ok(tls)) => tls,
            Some(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                // A port probe or a peer that gave up: nothing was offered, nothing refused.
                debug!(peer = %addr, "Closed before the TLS handshake.");
                return Ok(None);
            }
            Some(Err(e)) => {
                shared.stats.tls_failures.fetch_add(1, Ordering::Relaxed);
                shared
                    .refusals
                    .warn(addr, &format!("TLS handshake refused: {e}"));
                return Ok(None);
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
            return Ok(None);
        };
        let mut conn = Connection::new(tls);
        let Some(permits) = session_permits(&shared, addr) else {
            shared
                .stats
                .rejected_over_cap
                .fetch_add(1, Ordering::Relaxed);
            warn!(peer = %addr, controller = %peer, "Session refused: the session cap is reached.");
            let e = WireError::new(ErrorCode::Busy, "too many sessions open; try again later");
            let _ = send(&mut conn, &Message::Error(e)).await;
            return Ok(None);
        };
        match hello(&shared, &mut conn, &peer).await {
            Ok(liveness) => Ok(Some((conn, peer, permits, liveness))),
            Err(reason) => {
                warn!(peer = %addr, controller = %peer, reason, "Handshake failed.");
                Ok(None)
            }
        }
    };
    let (conn, peer, _permits, liveness) = match timeout(deadline, handshake).await {
        Ok(Ok(Some(x))) => x,
        Ok(Ok(None)) => return,
        Ok(Err(())) => {
            debug!(peer = %addr, "Dropped in its handshake for a newer connection.");
            return;
        }
        Err(_) => {
            shared
                .stats
                .handshake_timeouts
                .fetch_add(1, Ordering::Relaxed);
            shared
                .refusals
                .warn(addr, "Dropped peer: no handshake within the deadline.");
            return;
        }
    };
    info!(peer = %addr, controller = %peer, "Controller connected.");
    Session {
        shared,
        conn,
        peer,
        addr,
        event_seq: 0,
        leased: None,
        liveness,
    }
    .run(stop)
    .await;
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

async fn send<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Connection<S>,
    msg: &Message,
) -> Result<(), FrameError> {
    conn.write_frame(&msg.to_bytes()).await
}

fn connection_error(e: &FrameError) -> Message {
    let code = match e {
        FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
        _ => ErrorCode::Malformed,
    };
    Message::Error(WireError::new(code, e.to_string()))
}

/// One authenticated connection.
struct Session<H, S> {
    shared: Arc<Shared<H>>,
    conn: Connection<S>,
    peer: String,
    addr: SocketAddr,
    event_seq: u64,
    /// The token of the lease this session took, if any: released when the session ends.
    leased: Option<u64>,
    /// The controller's liveness interval, when it asked for one (it pings; no heartbeats).
    liveness: Option<Duration>,
}

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
    async fn run(mut self, mut stop: watch::Receiver<bool>) {
        let cfg = self.shared.config.clone();
        let (done_tx, mut done_rx) = mpsc::channel::<Response>(cfg.max_in_flight);
        let mut tasks = JoinSet::new();
        let mut events = self.shared.handler.subscribe();
        // A controller that pings at its own interval needs no heartbeats: its pongs are.
        let (mut heartbeat, idle_timeout) = match self.liveness {
            Some(every) => (None, cfg.idle_timeout.max(silence_limit(every))),
            None => {
                let mut beat = tokio::time::interval(cfg.heartbeat_interval);
                beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                (Some(beat), cfg.idle_timeout)
            }
        };
        let mut last_heard = Instant::now();
        loop {
            let idle_deadline = last_heard + idle_timeout;
            // Cancel safety: `read_frame` keeps partial input in its buffer; `recv` on mpsc,
            // broadcast and watch channels is cancel-safe; `interval.tick` is cancel-safe.
            tokio::select! {
                frame = self.conn.read_frame() => {
                    last_heard = Instant::now();
                    match frame {
                        Ok(Some(bytes)) => {
                            if let Err(e) = self.on_frame(&bytes, &mut tasks, &done_tx).await {
                                debug!(peer = %self.addr, error = %e, "Write failed; closing.");
                                return;
                            }
                        }
                        Ok(None) => {
                            info!(peer = %self.addr, controller = %self.peer, "Controller disconnected.");
                            break;
                        }
                        Err(FrameError::Io(e)) => {
                            info!(peer = %self.addr, controller = %self.peer, error = %e, "Controller connection lost.");
                            break;
                        }
                        Err(e) => {
                            if let FrameError::TooLarge { .. } = e {
                                self.shared.stats.oversized_frames.fetch_add(1, Ordering::Relaxed);
                            }
                            warn!(peer = %self.addr, error = %e, "Bad frame; closing the connection.");
                            let _ = send(&mut self.conn, &connection_error(&e)).await;
                            break;
                        }
                    }
                }
                Some(resp) = done_rx.recv() => {
                    if send(&mut self.conn, &Message::Response(resp)).await.is_err() {
                        return;
                    }
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
                ev = recv_event(&mut events) => {
                    match ev {
                        Some(event) => if self.push(event).await.is_err() { return },
                        None => events = None,
                    }
                }
                _ = async {
                    match heartbeat.as_mut() {
                        Some(beat) => beat.tick().await,
                        None => std::future::pending().await,
                    }
                } => {
                    let uptime_ms = self.shared.started.elapsed().as_millis() as u64;
                    if self.push(Event::Heartbeat { uptime_ms }).await.is_err() {
                        return;
                    }
                }
                _ = tokio::time::sleep_until(idle_deadline) => {
                    warn!(peer = %self.addr, idle = ?idle_timeout, "Controller silent; closing.");
                    break;
                }
                _ = stop.changed() => {
                    self.drain(tasks, done_rx, done_tx).await;
                    return;
                }
            }
        }
        let _ = self.conn.shutdown().await;
    }

    /// Shutdown: finish requests in flight, answer them, say goodbye, close.
    async fn drain(
        mut self,
        mut tasks: JoinSet<()>,
        mut done_rx: mpsc::Receiver<Response>,
        done_tx: mpsc::Sender<Response>,
    ) {
        drop(done_tx);
        let grace = self.shared.config.shutdown_grace;
        let finish = async { while tasks.join_next().await.is_some() {} };
        if timeout(grace, finish).await.is_err() {
            tasks.abort_all();
        }
        while let Ok(resp) = done_rx.try_recv() {
            if send(&mut self.conn, &Message::Response(resp))
                .await
                .is_err()
            {
                return;
            }
        }
        let _ = self.push(Event::ShuttingDown).await;
        let _ = self.conn.shutdown().await;
    }

    async fn push(&mut self, event: Event) -> Result<(), FrameError> {
        self.event_seq += 1;
        let msg = Message::Event(EventEnvelope {
            seq: self.event_seq,
            event,
        });
        send(&mut self.conn, &msg).await
    }

    async fn on_frame(
        &mut self,
        bytes: &[u8],
        tasks: &mut JoinSet<()>,
        done: &mpsc::Sender<Response>,
    ) -> Result<(), FrameError> {
        let msg = match Message::from_bytes(bytes) {
            Ok(m) => m,
            Err(e) => {
                self.shared
                    .stats
                    .malformed_frames
                    .fetch_add(1, Ordering::Relaxed);
                let err = WireError::new(ErrorCode::Malformed, format!("invalid message: {e}"));
                // Answer on the request's id when one can be read, so the caller is not left
                // waiting; otherwise as a connection-level error.
                let reply = match request_id(bytes) {
                    Some(id) => Message::Response(Response {
                        id,
                        outcome: Outcome::Error(err),
                    }),
                    None => Message::Error(err),
                };
                return send(&mut self.conn, &reply).await;
            }
        };
        match msg {
            Message::Ping { nonce } => send(&mut self.conn, &Message::Pong { nonce }).await,
            Message::Pong { .. } => Ok(()),
            Message::Request(req) => self.on_request(req, tasks, done).await,
            other => {
                let e = WireError::new(
                    ErrorCode::ProtocolViolation,
                    format!(
                        "unexpected {} message from the controller",
                        type_name(&other)
                    ),
                );
                send(&mut self.conn, &Message::Error(e)).await
            }
        }
    }

    async fn on_request(
        &mut self,
        req: Request,
        tasks: &mut JoinSet<()>,
        done: &mpsc::Sender<Response>,
    ) -> Result<(), FrameError> {
        self.shared.stats.requests.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let immediate = match &req.command {
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
                                    leases.acquire(&self.peer, a.instance.as_ref(), ttl, now)
                                })
                            }
                            None => leases.acquire(&self.peer, a.instance.as_ref(), ttl, now),
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
            cmd if cmd.is_mutating() => match self.leases().check(&self.peer, req.fence, now) {
                Ok(()) => None,
                Err(e) => {
                    self.shared.stats.fenced.fetch_add(1, Ordering::Relaxed);
                    warn!(controller = %self.peer, command = cmd.name(), code = ?e.code, "Fenced off a mutating command.");
                    Some(Err(e))
                }
            },
            _ => None,
        };
        if let Some(result) = immediate {
            let resp = Response {
                id: req.id,
                outcome: into_outcome(result),
            };
            return send(&mut self.conn, &Message::Response(resp)).await;
        }
        if tasks.len() >= self.shared.config.max_in_flight {
            let e = WireError::new(
                ErrorCode::Busy,
                format!(
                    "{} requests already in flight on this connection",
                    tasks.len()
                ),
            );
            let resp = Response {
                id: req.id,
                outcome: Outcome::Error(e),
            };
            return send(&mut self.conn, &Message::Response(resp)).await;
        }
        let handler = self.shared.handler.clone();
        let done = done.clone();
        let peer = self.peer.clone();
        let fence = match req.fence {
            Some(token) if req.command.is_mutating() => {
                Fence::admitted(self.shared.leases.clone(), peer.clone(), token)
            }
            _ => Fence::none(),
        };
        tasks.spawn(async move {
            let name = req.command.name();
            let result = handler.handle(req.command, fence).await;
            if let Err(e) = &result {
                info!(controller = %peer, command = name, code = ?e.code, error = %e.message, "Command failed.");
            } else {
                debug!(controller = %peer, command = name, "Command done.");
            }
            let _ = done
                .send(Response {
                    id: req.id,
                    outcome: into_outcome(result),
                })
                .await;
        });
        Ok(())
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, LeaseTable> {
        self.shared.leases.lock().expect("lease lock")
    }
}

fn into_outcome(r: Result<Reply, WireError>) -> Outcome {
    match r {
        Ok(reply) => Outcome::Ok(reply),
        Err(e) => Outcome::Error(e),
    }
}

async fn recv_event(rx: &mut Option<broadcast::Receiver<Event>>) -> Option<Event> {
    let Some(r) = rx else {
        return std::future::pending().await;
    };
    loop {
        match r.recv().await {
            Ok(ev) => return Some(ev),
            Err(broadcast::error::RecvError::Lagged(n)) => {
                warn!(skipped = n, "Event consumer lagged; older events dropped.");
            }
            Err(broadcast::error::RecvError::Closed) => return None,
        }
    }
}

/// Reads `"id"` from a request that failed to parse, if it is there.
fn request_id(bytes: &[u8]) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    if v.get("type")?.as_str()? != "request" {
        return None;
    }
    v.get("id")?.as_u64()
}

fn type_name(m: &Message) -> &'static str {
    match m {
        Message::ControllerHello(_) => "controller_hello",
        Message::AgentHello(_) => "agent_hello",
        Message::Request(_) => "request",
        Message::Response(_) => "response",
        Message::Event(_) => "event",
        Message::Ping { .. } => "ping",
        Message::Pong { .. } => "pong",
        Message::Error(_) => "error",
    }
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
