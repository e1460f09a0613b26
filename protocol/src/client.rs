//! The controller side of a session: dial an agent by name, verify it, send commands.
//!
//! One background task owns the connection. Callers send requests through a bounded `mpsc`; the
//! task writes them, matches responses to callers by id (`oneshot`), answers pings, sends its own
//! pings every `ping_interval`, and forwards events to a bounded channel that the owner of the
//! client may take. When the connection dies, every pending request fails with `Closed`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{timeout, Instant};
use tokio_rustls::TlsConnector;
use tracing::{debug, warn};

use crate::error::WireError;
use crate::frame::{Connection, FrameError};
use crate::message::{
    AcquireLease, AgentHello, Command, ControllerHello, ControllerInstance, EventEnvelope,
    LeaseInfo, Message, Outcome, ReleaseLease, Reply, Request, PROTOCOL_VERSION,
};
use crate::names::PeerName;

/// Errors talking to one agent. Each names the agent and, where there is one, the command.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TCP connect failed.
    #[error("cannot connect to agent {agent} at {addr}")]
    Connect {
        /// Agent name.
        agent: String,
        /// Address dialled.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// TLS failed: untrusted certificate, or a certificate for another name.
    #[error("TLS with agent {agent} at {addr} failed")]
    Tls {
        /// Agent name.
        agent: String,
        /// Address dialled.
        addr: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The hello exchange failed.
    #[error("handshake with agent {agent} failed: {reason}")]
    Handshake {
        /// Agent name.
        agent: String,
        /// What went wrong.
        reason: String,
    },
    /// No answer within the deadline.
    #[error("agent {agent}: {command} got no answer within {after:?}")]
    Timeout {
        /// Agent name.
        agent: String,
        /// Command name.
        command: &'static str,
        /// The deadline.
        after: Duration,
    },
    /// The connection is gone.
    #[error("agent {agent}: connection closed")]
    Closed {
        /// Agent name.
        agent: String,
    },
    /// The agent refused or failed the command.
    #[error("agent {agent} refused {command}")]
    Remote {
        /// Agent name.
        agent: String,
        /// Command name.
        command: &'static str,
        /// The agent's error.
        #[source]
        error: Box<WireError>,
    },
}

impl ClientError {
    /// The agent's error, when the agent answered with one.
    pub fn wire(&self) -> Option<&WireError> {
        match self {
            ClientError::Remote { error, .. } => Some(error),
            _ => None,
        }
    }
}

/// Liveness messages (heartbeat events and pongs) every client of this process received: what
/// keeping a fleet's sessions alive costs the controller (the daemon's metrics show it).
static LIVENESS_RECEIVED: AtomicU64 = AtomicU64::new(0);

/// How many liveness messages (heartbeats, pongs) this process's clients received so far.
pub fn liveness_received() -> u64 {
    LIVENESS_RECEIVED.load(Ordering::Relaxed)
}

/// Timers of a client.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Name the controller gives in its hello (its identity is its certificate).
    pub controller_name: String,
    /// TCP connect plus TLS plus hello.
    pub connect_timeout: Duration,
    /// Default deadline of one request.
    pub request_timeout: Duration,
    /// Interval of keepalive pings.
    pub ping_interval: Duration,
    /// The connection is considered dead when nothing arrives for this long.
    pub dead_after: Duration,
    /// The controller process, named in its leases (one per process by default).
    pub instance: ControllerInstance,
    /// When set, the liveness interval asked of the agent (see
    /// [`ControllerHello::heartbeat_ms`]): the client pings this often and declares the agent
    /// dead after [`crate::message::silence_limit`] of it, instead of `ping_interval` and
    /// `dead_after`; the agent sends no heartbeats of its own.
    pub liveness: Option<Duration>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            controller_name: "unistor".into(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(120),
            ping_interval: Duration::from_secs(15),
            dead_after: Duration::from_secs(45),
            instance: ControllerInstance::this_process(),
            liveness: None,
        }
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Outcome>>>>;

/// A live session with one agent.
pub struct AgentClient {
    agent: String,
    hello: AgentHello,
    outgoing: mpsc::Sender<Message>,
    pending: Pending,
    next_id: AtomicU64,
    fence: Mutex<Option<u64>>,
    events: Mutex<Option<mpsc::Receiver<EventEnvelope>>>,
    options: ClientOptions,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("agent", &self.agent)
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    /// Dials `addr`, requires a certificate naming `agent` from the CA, and exchanges hellos.
    pub async fn connect(
        addr: &str,
        agent: &PeerName,
        tls: Arc<rustls::ClientConfig>,
        options: ClientOptions,
    ) -> Result<Self, ClientError> {
        let name = agent.to_string();
        let deadline = options.connect_timeout;
        let fut = async {
            let tcp = TcpStream::connect(addr)
                .await
                .map_err(|source| ClientError::Connect {
                    agent: name.clone(),
                    addr: addr.to_string(),
                    source,
                })?;
            let _ = tcp.set_nodelay(true);
            let server_name =
                ServerName::try_from(name.clone()).map_err(|e| ClientError::Handshake {
                    agent: name.clone(),
                    reason: format!("invalid server name: {e}"),
                })?;
            let stream = TlsConnector::from(tls)
                .connect(server_name, tcp)
                .await
                .map_err(|source| ClientError::Tls {
                    agent: name.clone(),
                    addr: addr.to_string(),
                    source,
                })?;
            let mut conn = Connection::new(stream);
            let hello = Message::ControllerHello(ControllerHello {
                version: PROTOCOL_VERSION,
                name: options.controller_name.clone(),
                heartbeat_ms: options.liveness.map(|d| d.as_millis() as u64),
            });
            let handshake = |reason: String| ClientError::Handshake {
                agent: name.clone(),
                reason,
            };
            conn.write_frame(&hello.to_bytes())
                .await
                .map_err(|e| handshake(crate::error::chain(&e)))?;
            let frame = conn
                .read_frame()
                .await
                .map_err(|e| handshake(crate::error::chain(&e)))?
                .ok_or_else(|| handshake("connection closed during the hello".into()))?;
            match Message::from_bytes(&frame) {
                Ok(Message::AgentHello(h)) if h.name == name => Ok((conn, h)),
                Ok(Message::AgentHello(h)) => Err(handshake(format!(
                    "agent introduced itself as {:?}",
                    h.name
                ))),
                Ok(Message::Error(e)) => Err(handshake(format!("{:?}: {}", e.code, e.message))),
                Ok(_) => Err(handshake("unexpected first message".into())),
                Err(e) => Err(handshake(format!("invalid hello: {e}"))),
            }
        };
        let (conn, hello) =
            timeout(deadline, fut)
                .await
                .map_err(|_| ClientError::Handshake {
                    agent: name.clone(),
                    reason: format!("no hello within {deadline:?}"),
                })??;
        let (out_tx, out_rx) = mpsc::channel(64);
        let (ev_tx, ev_rx) = mpsc::channel(256);
        let pending: Pending = Arc::default();
        let task = tokio::spawn(connection_task(
            conn,
            name.clone(),
            out_rx,
            ev_tx,
            pending.clone(),
            options.clone(),
        ));
        Ok(Self {
            agent: name,
            hello,
            outgoing: out_tx,
            pending,
            next_id: AtomicU64::new(1),
            fence: Mutex::new(None),
            events: Mutex::new(Some(ev_rx)),
            options,
            task,
        })
    }

    /// The agent's hello.
    pub fn hello(&self) -> &AgentHello {
        &self.hello
    }

    /// The agent's name.
    pub fn agent(&self) -> &str {
        &self.agent
    }

    /// Takes the stream of events (once).
    pub fn take_events(&self) -> Option<mpsc::Receiver<EventEnvelope>> {
        self.events.lock().expect("events lock").take()
    }

    /// Closes the session cleanly (TLS close_notify) and waits for the connection task.
    pub async fn close(self) {
        let Self { outgoing, task, .. } = self;
        drop(outgoing);
        let _ = task.await;
    }

    /// Takes or renews the agent's lease; later mutating commands carry its token.
    pub async fn acquire_lease(&self, ttl: Duration) -> Result<LeaseInfo, ClientError> {
        self.lease_request(ttl, None, None).await
    }

    /// [`AgentClient::acquire_lease`] as a controller replica holding `claim` (its shard and
    /// that shard's RADOS token): refused below the shard's highest token, and pre-empting a
    /// lower claim's lease (see `protocol::lease`).
    pub async fn acquire_claimed_lease(
        &self,
        ttl: Duration,
        claim: crate::message::ShardClaim,
    ) -> Result<LeaseInfo, ClientError> {
        self.lease_request(ttl, None, Some(claim)).await
    }

    /// Extends the lease granted with `token`, and only that one: an error (`no_lease`,
    /// `stale_token`, `lease_held`) when it lapsed or changed hands; nothing new is granted.
    pub async fn renew_lease(&self, ttl: Duration, token: u64) -> Result<LeaseInfo, ClientError> {
        self.lease_request(ttl, Some(token), None).await
    }

    async fn lease_request(
        &self,
        ttl: Duration,
        renew: Option<u64>,
        claim: Option<crate::message::ShardClaim>,
    ) -> Result<LeaseInfo, ClientError> {
        let reply = self
            .request_with_fence(
                Command::AcquireLease(AcquireLease {
                    ttl_ms: ttl.as_millis() as u64,
                    instance: Some(self.options.instance.clone()),
                    renew,
                    claim,
                }),
                None,
            )
            .await?;
        match reply {
            Reply::Lease(l) => {
                *self.fence.lock().expect("fence lock") = Some(l.token);
                Ok(l)
            }
            other => Err(self.unexpected("acquire_lease", &other)),
        }
    }

    /// Gives the lease up.
    pub async fn release_lease(&self) -> Result<(), ClientError> {
        self.request_with_fence(
            Command::ReleaseLease(ReleaseLease {
                instance: Some(self.options.instance.clone()),
            }),
            None,
        )
        .await?;
        *self.fence.lock().expect("fence lock") = None;
        Ok(())
    }

    /// Sends a command, with the current fencing token when it mutates.
    pub async fn request(&self, command: Command) -> Result<Reply, ClientError> {
        let fence = if command.is_mutating() {
            *self.fence.lock().expect("fence lock")
        } else {
            None
        };
        self.request_with_fence(command, fence).await
    }

    /// As [`AgentClient::request`], with a deadline of its own instead of the client's default.
    pub async fn request_within(
        &self,
        command: Command,
        deadline: Duration,
    ) -> Result<Reply, ClientError> {
        let fence = if command.is_mutating() {
            *self.fence.lock().expect("fence lock")
        } else {
            None
        };
        self.send(command, fence, None, deadline).await
    }

    /// As [`AgentClient::request_within`], carrying a replica's shard claim (see
    /// [`crate::message::Request::claim`]).
    pub async fn request_claimed(
        &self,
        command: Command,
        claim: Option<crate::message::ShardClaim>,
        deadline: Duration,
    ) -> Result<Reply, ClientError> {
        let fence = if command.is_mutating() {
            *self.fence.lock().expect("fence lock")
        } else {
            None
        };
        self.send(command, fence, claim, deadline).await
    }

    /// Sends a command with an explicit fencing token (or none).
    pub async fn request_with_fence(
        &self,
        command: Command,
        fence: Option<u64>,
    ) -> Result<Reply, ClientError> {
        self.send(command, fence, None, self.options.request_timeout)
            .await
    }

    async fn send(
        &self,
        command: Command,
        fence: Option<u64>,
        claim: Option<crate::message::ShardClaim>,
        after: Duration,
    ) -> Result<Reply, ClientError> {
        let name = command.name();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().expect("pending lock").insert(id, tx);
        let msg = Message::Request(Request {
            id,
            fence,
            claim,
            command,
        });
        let closed = || ClientError::Closed {
            agent: self.agent.clone(),
        };
        if self.outgoing.send(msg).await.is_err() {
            self.pending.lock().expect("pending lock").remove(&id);
            return Err(closed());
        }
        let outcome = match timeout(after, rx).await {
            Ok(Ok(o)) => o,
            Ok(Err(_)) => return Err(closed()),
            Err(_) => {
                self.pending.lock().expect("pending lock").remove(&id);
                return Err(ClientError::Timeout {
                    agent: self.agent.clone(),
                    command: name,
                    after,
                });
            }
        };
        match outcome {
            Outcome::Ok(reply) => Ok(reply),
            Outcome::Error(error) => Err(ClientError::Remote {
                agent: self.agent.clone(),
                command: name,
                error: Box::new(error),
            }),
        }
    }

    fn unexpected(&self, command: &'static str, reply: &Reply) -> ClientError {
        ClientError::Handshake {
            agent: self.agent.clone(),
            reason: format!("unexpected reply to {command}: {reply:?}"),
        }
    }
}

async fn connection_task<S>(
    mut conn: Connection<S>,
    agent: String,
    mut outgoing: mpsc::Receiver<Message>,
    events: mpsc::Sender<EventEnvelope>,
    pending: Pending,
    options: ClientOptions,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (ping_every, dead_after) = match options.liveness {
        Some(every) => (every, crate::message::silence_limit(every)),
        None => (options.ping_interval, options.dead_after),
    };
    let mut ping = tokio::time::interval(ping_every);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut nonce = 0u64;
    let mut last_heard = Instant::now();
    let reason: String = loop {
        // Cancel safety: `read_frame` buffers partial input; `recv` and `tick` are cancel-safe.
        tokio::select! {
            frame = conn.read_frame() => {
                last_heard = Instant::now();
                match frame {
                    Ok(Some(bytes)) => match Message::from_bytes(&bytes) {
                        Ok(Message::Response(r)) => {
                            let waiter = pending.lock().expect("pending lock").remove(&r.id);
                            if let Some(w) = waiter {
                                let _ = w.send(r.outcome);
                            }
                        }
                        Ok(Message::Event(ev)) => {
                            if matches!(ev.event, crate::message::Event::Heartbeat { .. }) {
                                LIVENESS_RECEIVED.fetch_add(1, Ordering::Relaxed);
                            }
                            if events.try_send(ev).is_err() {
                                debug!(agent = %agent, "Event dropped: nobody is reading, or the reader lags.");
                            }
                        }
                        Ok(Message::Ping { nonce }) => {
                            if write(&mut conn, &Message::Pong { nonce }).await.is_err() {
                                break "write failed".into();
                            }
                        }
                        Ok(Message::Pong { .. }) => {
                            LIVENESS_RECEIVED.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Message::Error(e)) => {
                            warn!(agent = %agent, code = ?e.code, error = %e.message, "Agent reported a connection error.");
                        }
                        Ok(_) => warn!(agent = %agent, "Unexpected message from the agent."),
                        Err(e) => warn!(agent = %agent, error = %e, "Undecodable message from the agent."),
                    },
                    Ok(None) => break "agent closed the connection".into(),
                    Err(e) => break crate::error::chain(&e),
                }
            }
            msg = outgoing.recv() => match msg {
                Some(m) => {
                    if let Err(e) = write(&mut conn, &m).await {
                        break crate::error::chain(&e);
                    }
                }
                None => break "client dropped".into(),
            },
            _ = ping.tick() => {
                if last_heard.elapsed() > dead_after {
                    break format!("agent silent for {dead_after:?}");
                }
                nonce += 1;
                if let Err(e) = write(&mut conn, &Message::Ping { nonce }).await {
                    break crate::error::chain(&e);
                }
            }
        }
    };
    debug!(agent = %agent, reason, "Connection to agent ended.");
    // Dropping the senders fails every waiter with `Closed`.
    pending.lock().expect("pending lock").clear();
    let _ = conn.shutdown().await;
}

async fn write<S>(conn: &mut Connection<S>, msg: &Message) -> Result<(), FrameError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    conn.write_frame(&msg.to_bytes()).await
}
