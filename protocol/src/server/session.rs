//! One authenticated session: frames from the controller, responses from request tasks
//! (bounded `mpsc`), events from the agent (`broadcast`), heartbeats and the shutdown signal
//! (`watch`), in one loop. Each request runs in its own task (at most `max_in_flight`); lease
//! commands and fencing (`fencing.rs`) are decided by the loop itself, before dispatch.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::{timeout, Instant};
use tracing::{debug, info, warn};

use super::{connection_error, into_outcome, request_id, send, type_name, Handler, Shared};
use crate::error::{ErrorCode, WireError};
use crate::frame::{Connection, FrameError};
use crate::message::{silence_limit, Event, EventEnvelope, Message, Outcome, Request, Response};

/// One authenticated connection.
pub(super) struct Session<H, S> {
    pub(super) shared: Arc<Shared<H>>,
    pub(super) conn: Connection<S>,
    pub(super) peer: String,
    pub(super) addr: SocketAddr,
    pub(super) event_seq: u64,
    /// The token of the lease this session took, if any: released when the session ends.
    pub(super) leased: Option<u64>,
    /// The controller's liveness interval, when it asked for one (it pings; no heartbeats).
    pub(super) liveness: Option<Duration>,
}

impl<H: Handler, S: AsyncRead + AsyncWrite + Unpin> Session<H, S> {
    pub(super) async fn run(mut self, mut stop: watch::Receiver<bool>) {
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
        let immediate = self.leases_and_fencing(&req);
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
        let fence = self.fence_of(&req);
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
