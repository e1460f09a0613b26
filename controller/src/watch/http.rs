//! The daemon's HTTP surface: the dashboard (`/`), the JSON API (`/api/v1/...`), Prometheus
//! metrics (`/metrics`) and a liveness probe (`/healthz`). It binds to loopback by default; the
//! mutating endpoints (reconcile, suspend, resume) only queue work for the reconciler, which
//! applies the same rails as `unistor apply`.
//!
//! Loopback alone does not keep a browser on the same host out, so every request is checked
//! ([`guard`]): its `Host` must be one of this daemon's names (a page of `evil.example` whose
//! name was rebound to 127.0.0.1 still says `Host: evil.example`), and a state-changing request
//! must carry a JSON content type (a cross-site form or `text/plain` POST cannot, without a CORS
//! preflight that is never answered) and, when a browser sends one, this daemon's `Origin`.
//! Connections are bounded in number, in how long their headers may take, and in lifetime.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::triggers::{Reason, Triggers};
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use protocol::names::{PeerName, VolumeName};

use super::state::{EventKind, Level, Shared};
use crate::status::Selection;

#[derive(Clone)]
struct App {
    state: Arc<Shared>,
    trigger: Triggers,
}

/// The `Host` values the API answers to.
#[derive(Debug, Clone)]
pub struct AllowedHosts(Arc<BTreeSet<String>>);

impl AllowedHosts {
    /// The loopback names and the listen address at `listen`'s port, and `extra` (`host`, or
    /// `host:port`).
    pub fn new(listen: SocketAddr, extra: &[String]) -> Self {
        let port = listen.port();
        let mut hosts: BTreeSet<String> = ["127.0.0.1", "localhost", "[::1]"]
            .iter()
            .map(|h| format!("{h}:{port}"))
            .collect();
        if !listen.ip().is_unspecified() {
            hosts.insert(listen.to_string());
        }
        for h in extra {
            let h = h.to_ascii_lowercase();
            let has_port = h
                .rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
                && !h.ends_with(']');
            hosts.insert(if has_port { h } else { format!("{h}:{port}") });
        }
        Self(Arc::new(hosts))
    }

    fn allows(&self, host: &str) -> bool {
        self.0.contains(&host.to_ascii_lowercase())
    }
}

/// What bounds the HTTP server.
#[derive(Debug, Clone)]
pub struct Limits {
    /// The `Host` values answered.
    pub allowed: AllowedHosts,
    /// How long a client has to send a request's headers.
    pub header_timeout: Duration,
}

/// Connections served at once; more wait in the kernel's backlog.
const MAX_CONNECTIONS: usize = 512;
/// After this, a connection is asked to close once its request in flight is answered (a
/// dashboard's keep-alive connection is simply opened again).
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// How long an answer in flight may still take once a connection is asked to close.
const CLOSE_GRACE: Duration = Duration::from_secs(10);

/// The routes, behind [`guard`].
pub fn router(state: Arc<Shared>, trigger: Triggers, allowed: AllowedHosts) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status))
        .route("/api/v1/reconcile", post(reconcile))
        .route("/api/v1/suspend/{kind}/{name}", post(suspend))
        .route("/api/v1/resume/{kind}/{name}", post(resume))
        .layer(axum::middleware::from_fn_with_state(allowed, guard))
        .with_state(App { state, trigger })
}

/// Refuses requests for another `Host`, and state-changing requests that are not JSON or come
/// from another origin (see the module's documentation).
async fn guard(State(allowed): State<AllowedHosts>, req: Request, next: Next) -> Response {
    // A liveness probe names the pod's address as it sees it, and learns nothing but "ok".
    if req.uri().path() == "/healthz" {
        return next.run(req).await;
    }
    let h = req.headers();
    let host = h.get(header::HOST).and_then(|v| v.to_str().ok());
    if !host.is_some_and(|host| allowed.allows(host)) {
        return error(
            StatusCode::MISDIRECTED_REQUEST,
            format!(
                "Host {:?} is not one of this daemon's names (add it with --allow-host)",
                host.unwrap_or("")
            ),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        if let Some(origin) = h.get(header::ORIGIN) {
            let same = origin
                .to_str()
                .ok()
                .and_then(|o| o.strip_prefix("http://"))
                .is_some_and(|o| allowed.allows(o));
            if !same {
                return error(
                    StatusCode::FORBIDDEN,
                    format!("a request from origin {origin:?} may not change anything here"),
                );
            }
        }
        let json = h
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| {
                t.split(';')
                    .next()
                    .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
            });
        if !json {
            return error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "state-changing requests carry Content-Type: application/json".into(),
            );
        }
    }
    next.run(req).await
}

/// Serves until the task is aborted: HTTP/1.1, each connection with a deadline for its
/// headers and a bounded lifetime, at most [`MAX_CONNECTIONS`] at once.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<Shared>,
    trigger: Triggers,
    limits: Limits,
) {
    let app = router(state, trigger, limits.allowed);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let slot = match slots.clone().acquire_owned().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // Out of descriptors, most likely: give the open ones a moment to close.
                tracing::warn!(error = %e, "Cannot accept an HTTP connection.");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let service = hyper_util::service::TowerToHyperService::new(app.clone());
        let header_timeout = limits.header_timeout;
        tokio::spawn(async move {
            let _slot = slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(header_timeout)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = tokio::time::sleep(CONNECTION_LIFETIME) => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
        });
    }
}

async fn dashboard() -> Html<&'static str> {
    Html(include_str!("dashboard.html"))
}

async fn metrics(State(app): State<App>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.state.encode_metrics(),
    )
        .into_response()
}

/// `GET /api/v1/status?state=&host=&dpu=&label=&q=&offset=&limit=`: the counts of the whole
/// fleet, and a page of the volumes and DPUs the filters choose (see [`Selection`]).
async fn status(State(app): State<App>, Query(sel): Query<Selection>) -> Response {
    Json(app.state.view_of(&sel)).into_response()
}

/// Queues a reconcile. The answer says which one will have run when it is done: the last
/// reconcile's `seq` reaching `done_at_seq` means one that started after this request ended.
async fn reconcile(State(app): State<App>) -> Response {
    let done_at_seq = app.state.started() + 1;
    app.trigger.send(Reason::Requested);
    (
        StatusCode::ACCEPTED,
        Json(serde_json::json!({ "queued": true, "done_at_seq": done_at_seq })),
    )
        .into_response()
}

fn error(code: StatusCode, message: String) -> Response {
    (code, Json(serde_json::json!({ "error": message }))).into_response()
}

fn set(app: &App, kind: &str, name: &str, on: bool) -> Response {
    // Names go through the same allow-lists as everywhere else.
    let valid = match kind {
        "volume" => VolumeName::parse("volume", name).map(|_| ()),
        "dpu" => PeerName::parse("dpu", name).map(|_| ()),
        _ => {
            return error(
                StatusCode::NOT_FOUND,
                format!("unknown kind {kind:?}: use volume or dpu"),
            )
        }
    };
    if let Err(e) = valid {
        return error(StatusCode::BAD_REQUEST, protocol::error::chain(&e));
    }
    let verb = if on { "suspended" } else { "resumed" };
    match app.state.set_suspended(kind, name, on) {
        Ok(changed) => {
            if changed {
                app.state.event(
                    EventKind::Suspend,
                    Level::Info,
                    format!("{kind}/{name} {verb}"),
                );
                app.trigger.send(Reason::Suspension {
                    object: format!("{kind}/{name}"),
                    on,
                });
            }
            Json(serde_json::json!({ "kind": kind, "name": name, "state": verb, "changed": changed }))
                .into_response()
        }
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot persist the suspension: {e}"),
        ),
    }
}

async fn suspend(State(app): State<App>, Path((kind, name)): Path<(String, String)>) -> Response {
    set(&app, &kind, &name, true)
}

async fn resume(State(app): State<App>, Path((kind, name)): Path<(String, String)>) -> Response {
    set(&app, &kind, &name, false)
}
