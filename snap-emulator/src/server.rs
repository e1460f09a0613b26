//! The JSON-RPC 2.0 socket, with SPDK's stream rules.
//!
//! - Requests are bare JSON objects back to back: no length prefix, no required delimiter; a
//!   request may be split across reads and several may arrive in one read.
//! - Each response is one JSON object followed by `\n`.
//! - A parse error is answered with -32700 and the connection is closed (a stream has no resync
//!   point); so is a request nested deeper than 64 or of more than 1,024 values (SPDK's limits).
//!   A batch (top-level array) or any other malformed request is -32600.
//! - A request without an id (or with `id: null`) gets no success response; errors are still sent.
//! - At most 64 connections (SPDK's limit); a request may not exceed 32 KiB (SPDK's receive
//!   buffer): a connection whose unparsed input reaches that size is closed.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tracing::{debug, info, warn};

use crate::state::RpcError;
use crate::Emulator;

/// SPDK's connection limit.
pub const MAX_CONNECTIONS: usize = 64;
/// SPDK's receive buffer: the largest request accepted.
pub const MAX_REQUEST: usize = 32 * 1024;
/// JSON values per request (SPDK v24.01 `SPDK_JSONRPC_MAX_VALUES`, lib/jsonrpc/jsonrpc_internal.h).
pub const MAX_VALUES: usize = 1024;
/// Containers nested at most (SPDK v24.01 `SPDK_JSON_MAX_NESTING_DEPTH`, lib/json/json_parse.c).
pub const MAX_NESTING: usize = 64;

/// Values as `spdk_json_parse` counts them: one per scalar and per object member name, two per
/// array or object (begin and end).
pub fn spdk_values(v: &Value) -> usize {
    match v {
        Value::Array(a) => 2 + a.iter().map(spdk_values).sum::<usize>(),
        Value::Object(o) => 2 + o.values().map(|x| 1 + spdk_values(x)).sum::<usize>(),
        _ => 1,
    }
}

/// Containers nested in `v` (a scalar: 0).
pub fn nesting(v: &Value) -> usize {
    match v {
        Value::Array(a) => 1 + a.iter().map(nesting).max().unwrap_or(0),
        Value::Object(o) => 1 + o.values().map(nesting).max().unwrap_or(0),
        _ => 0,
    }
}

/// Serves `listener` until `stop` turns true or the emulator decides to exit (`exit_after`).
pub async fn serve(listener: UnixListener, emu: Arc<Emulator>, mut stop: watch::Receiver<bool>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        // Cancel safety: `accept` and `changed` are cancel-safe.
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => { warn!(error = %e, "Accept failed."); continue; }
            },
            _ = stop.changed() => break,
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            warn!("Connection refused: {MAX_CONNECTIONS} connections open.");
            continue;
        };
        let emu = emu.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let _permit = permit;
            // Stopping closes every connection, as a process exit would.
            tokio::select! {
                _ = connection(stream, emu) => {}
                _ = stop.changed() => {}
            }
        });
    }
}

/// Removes a socket file left by a crashed instance; refuses to touch a live one.
pub fn clear_stale_socket(path: &Path) -> std::io::Result<()> {
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            format!("{} is served by a running process", path.display()),
        )),
        Err(_) if path.exists() => std::fs::remove_file(path),
        Err(_) => Ok(()),
    }
}

enum Next {
    /// A complete value and the bytes it used.
    Value(Value, usize),
    /// Need more input.
    Incomplete,
    /// Only whitespace is buffered.
    Empty,
    /// Not JSON.
    ParseError,
}

fn next_value(buf: &[u8]) -> Next {
    let mut stream = serde_json::Deserializer::from_slice(buf).into_iter::<Value>();
    match stream.next() {
        Some(Ok(v)) => Next::Value(v, stream.byte_offset()),
        Some(Err(e)) if e.is_eof() => Next::Incomplete,
        Some(Err(_)) => Next::ParseError,
        None => Next::Empty,
    }
}

static CONN_IDS: AtomicU64 = AtomicU64::new(1);

async fn connection(mut stream: UnixStream, emu: Arc<Emulator>) {
    let conn = CONN_IDS.fetch_add(1, Ordering::Relaxed);
    debug!(conn, "Client connected.");
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        // Drain every complete request already buffered.
        loop {
            match next_value(&buf) {
                // SPDK v24.01 `jsonrpc_parse_request` (lib/jsonrpc/jsonrpc_server.c): a value
                // `spdk_json_parse` refuses (nested deeper than 64) or one of more than 1,024
                // values is a parse error, and the connection is closed.
                Next::Value(v, _) if spdk_values(&v) > MAX_VALUES || nesting(&v) > MAX_NESTING => {
                    let _ =
                        write_line(&mut stream, &error_response(Value::Null, parse_error())).await;
                    debug!(conn, "Too many values or too deep; closing.");
                    return;
                }
                Next::Value(v, used) => {
                    buf.drain(..used);
                    if let Some(out) = emu.handle_request(v).await {
                        if write_line(&mut stream, &out).await.is_err() {
                            return;
                        }
                    }
                    if emu.should_exit() {
                        return;
                    }
                }
                Next::Incomplete => break,
                Next::Empty => {
                    buf.clear();
                    break;
                }
                Next::ParseError => {
                    let _ =
                        write_line(&mut stream, &error_response(Value::Null, parse_error())).await;
                    debug!(conn, "Parse error; closing.");
                    return;
                }
            }
        }
        if buf.len() >= MAX_REQUEST {
            warn!(
                conn,
                size = buf.len(),
                "Request exceeds the receive buffer; closing."
            );
            return;
        }
        let n = match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                debug!(conn, "Client disconnected.");
                return;
            }
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
    }
}

async fn write_line(stream: &mut UnixStream, v: &Value) -> std::io::Result<()> {
    let mut bytes = serde_json::to_vec(v).expect("serializable");
    bytes.push(b'\n');
    stream.write_all(&bytes).await
}

fn parse_error() -> RpcError {
    RpcError::new(-32700, "Parse error")
}

fn invalid_request() -> RpcError {
    RpcError::new(-32600, "Invalid request")
}

/// A response object with an error.
pub fn error_response(id: Value, e: RpcError) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": e.code, "message": e.message}})
}

/// A checked request.
#[derive(Debug)]
pub struct Request {
    /// The id; `None` when absent or null (no success response).
    pub id: Option<Value>,
    /// The method.
    pub method: String,
    /// The params (`Null` when absent).
    pub params: Value,
}

/// Checks the JSON-RPC envelope. On failure returns the id to answer with.
pub fn validate(v: Value) -> Result<Request, (Value, RpcError)> {
    let obj: Map<String, Value> = match v {
        Value::Object(o) => o,
        // A batch, or anything that is not an object.
        _ => return Err((Value::Null, invalid_request())),
    };
    let id = obj.get("id").cloned();
    let id_ok = matches!(
        id,
        None | Some(Value::Null) | Some(Value::String(_)) | Some(Value::Number(_))
    );
    let echo = if id_ok {
        id.clone().unwrap_or(Value::Null)
    } else {
        Value::Null
    };
    let bad = |e| Err((echo.clone(), e));
    if !id_ok {
        return bad(invalid_request());
    }
    if obj
        .keys()
        .any(|k| !matches!(k.as_str(), "jsonrpc" | "method" | "params" | "id"))
    {
        return bad(invalid_request());
    }
    if let Some(j) = obj.get("jsonrpc") {
        if j != "2.0" {
            return bad(invalid_request());
        }
    }
    let Some(Value::String(method)) = obj.get("method") else {
        return bad(invalid_request());
    };
    let params = obj.get("params").cloned().unwrap_or(Value::Null);
    if !matches!(params, Value::Null | Value::Object(_) | Value::Array(_)) {
        return bad(invalid_request());
    }
    Ok(Request {
        id: id.filter(|i| !i.is_null()),
        method: method.clone(),
        params,
    })
}

/// Logs the emulator's start.
pub fn announce(path: &Path, functions: usize) {
    info!(socket = %path.display(), functions, "SNAP emulator listening.");
}
