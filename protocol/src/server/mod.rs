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
//! Files: `handshake.rs` (the handshake budget, TLS, session permits, hellos: a
//! [`handshake::Handshake`]), `session.rs` (the session loop and dispatch), `fencing.rs` (lease
//! commands, the fencing check before dispatch, a lease ended with its session); here the
//! accept loop and what they share.
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
use tokio::sync::{broadcast, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::{timeout, Instant};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn, Instrument};

mod fencing;
mod handshake;
mod session;

use handshake::{handshake, Handshake, HandshakeSlot, Handshakes, Throttled};
use session::Session;

use crate::error::{ErrorCode, WireError};
use crate::frame::{Connection, FrameError};
use crate::lease::{Fence, LeaseTable, SharedLeases};
use crate::message::{AgentKind, Command, Event, Message, Outcome, Reply};

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

async fn serve_connection<H: Handler>(
    shared: Arc<Shared<H>>,
    acceptor: TlsAcceptor,
    stream: TcpStream,
    addr: SocketAddr,
    stop: watch::Receiver<bool>,
    slot: HandshakeSlot<H>,
    evicted: tokio::sync::oneshot::Receiver<()>,
) {
    let (conn, peer, _permits, liveness) =
        match handshake(&shared, acceptor, stream, addr, slot, evicted).await {
            Handshake::Ready {
                conn,
                peer,
                permits,
                liveness,
            } => (*conn, peer, permits, liveness),
            Handshake::Evicted => {
                debug!(peer = %addr, "Dropped in its handshake for a newer connection.");
                return;
            }
            Handshake::Refused | Handshake::TimedOut => return,
        };
    info!(peer = %addr, controller = %peer, "Controller connected.");
    let span = tracing::info_span!("session", controller = %peer, peer = %addr);
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
    .instrument(span)
    .await;
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

fn into_outcome(r: Result<Reply, WireError>) -> Outcome {
    match r {
        Ok(reply) => Outcome::Ok(reply),
        Err(e) => Outcome::Error(e),
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
