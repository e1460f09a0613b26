//! The daemon's HTTP surface: the dashboard (`/`), the JSON API (`/api/v1/...`), Prometheus
//! metrics (`/metrics`) and a liveness probe (`/healthz`). It binds to loopback by default; the
//! mutating endpoints (reconcile, suspend, resume) only queue work for the reconciler, which
//! applies the same rails as `unistor apply`.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use protocol::names::{PeerName, VolumeName};
use tokio::sync::mpsc;

use super::state::{Level, Shared};
use crate::status::Selection;

#[derive(Clone)]
struct App {
    state: Arc<Shared>,
    trigger: mpsc::UnboundedSender<String>,
}

/// The routes.
pub fn router(state: Arc<Shared>, trigger: mpsc::UnboundedSender<String>) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/api/v1/status", get(status))
        .route("/api/v1/reconcile", post(reconcile))
        .route("/api/v1/suspend/{kind}/{name}", post(suspend))
        .route("/api/v1/resume/{kind}/{name}", post(resume))
        .with_state(App { state, trigger })
}

/// Serves until the task is aborted.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<Shared>,
    trigger: mpsc::UnboundedSender<String>,
) {
    if let Err(e) = axum::serve(listener, router(state, trigger)).await {
        tracing::error!(error = %e, "HTTP server stopped");
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
        app.state.metrics.encode(),
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
    let _ = app.trigger.send("requested over the API".into());
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
                app.state
                    .event("suspend", Level::Info, format!("{kind}/{name} {verb}"));
                let _ = app.trigger.send(format!("{kind}/{name} {verb}"));
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
