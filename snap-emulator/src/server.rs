//! The JSON-RPC 2.0 socket, with SPDK's stream rules.
//!
//! - Requests are bare JSON objects back to back: no length prefix, no required delimiter; a
//!   request may be split across reads and several may arrive in one read.
//! - Each response is one JSON object followed by `\n`.
//! - A parse error is answered with -32700 and the connection is closed (a stream has no resync
//!   point); so is a request nested deeper than 64 or of more than 1,024 values (SPDK's limits).
//!   A batch (top-level array) or any other malformed request is -32600.
//! - A request without an id (or with `id: null`) gets no success response; errors are still sent.
//! - At most 64 connections (SPDK's limit): more wait in the listen backlog, unanswered, until
//!   one closes (SPDK v24.01 lib/jsonrpc/jsonrpc_server_tcp.c: `spdk_jsonrpc_server_poll` accepts
//!   only while `free_conns` is not empty; `listen(…, 512)`). A request may not exceed 32 KiB
//!   (SPDK's receive buffer): a connection whose unparsed input reaches that size is closed.
//! - One RPC at a time, in the order read ([`crate::AppThread`]); responses go out as requests
//!   complete. A request read before its client went away still runs
//!   (`jsonrpc_server_free_conn_request` only tells outstanding requests their connection is
//!   gone; `jsonrpc_server_send_response` then drops the response).
//! - The envelope is decoded as `parse_single_request` (lib/jsonrpc/jsonrpc_server.c) does: an
//!   unknown or duplicate key, a bad `jsonrpc` or a missing method is -32600 with `id: null`
//!   (the id is taken only after those checks); a bad `params` after a good id echoes the id.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch, Semaphore};
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

/// Serves `listener` until `stop` turns true or the emulator decides to exit (`exit_after`).
pub async fn serve(listener: UnixListener, emu: Arc<Emulator>, mut stop: watch::Receiver<bool>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        // A connection slot first: past 64 the kernel keeps new clients in the backlog.
        // Cancel safety: `acquire_owned`, `accept` and `changed` are cancel-safe.
        let permit = tokio::select! {
            p = permits.clone().acquire_owned() => p.expect("never closed"),
            _ = stop.changed() => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => { warn!(error = %e, "Accept failed."); continue; }
            },
            _ = stop.changed() => break,
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

/// A request as read in one pass: its value, whether an object in its envelope or its params
/// named a member twice (`serde_json` keeps one of them silently; SPDK's decoders refuse the
/// object), and its size as SPDK measures it.
#[derive(Debug)]
pub struct Parsed {
    /// The value (for a duplicate key, its first occurrence, the one SPDK decodes).
    pub value: Value,
    /// The envelope object has a duplicate key.
    pub duplicate_in_envelope: bool,
    /// The `params` object has a duplicate key.
    pub duplicate_in_params: bool,
    /// Values as `spdk_json_parse` counts them: one per scalar and per object member name, two
    /// per array or object (begin and end).
    pub values: usize,
    /// Containers nested (a scalar: 0).
    pub nesting: usize,
}

impl<'de> Deserialize<'de> for Parsed {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut tally = Tally::default();
        let value = Checked {
            path: Place::Root,
            depth: 0,
            tally: &mut tally,
        }
        .deserialize(d)?;
        Ok(Self {
            value,
            duplicate_in_envelope: tally.dups.contains(&Place::Root),
            duplicate_in_params: tally.dups.contains(&Place::Params),
            values: tally.values,
            nesting: tally.nesting,
        })
    }
}

/// Where an object sits, as far as duplicate keys matter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    Root,
    Params,
    Deeper,
}

/// What one pass over a request finds besides its value.
#[derive(Default)]
struct Tally {
    /// Objects that name a member twice.
    dups: Vec<Place>,
    values: usize,
    nesting: usize,
}

/// Builds a `Value`, counting values and depth and recording duplicate keys as it goes.
struct Checked<'a> {
    path: Place,
    /// Containers around this value.
    depth: usize,
    tally: &'a mut Tally,
}

impl Checked<'_> {
    fn scalar<E>(self, v: Value) -> Result<Value, E> {
        self.tally.values += 1;
        Ok(v)
    }

    /// A container begins: two values (begin and end), one level deeper.
    fn container(&mut self) -> usize {
        self.tally.values += 2;
        self.tally.nesting = self.tally.nesting.max(self.depth + 1);
        self.depth + 1
    }
}

impl<'de> DeserializeSeed<'de> for Checked<'_> {
    type Value = Value;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Checked<'_> {
    type Value = Value;
    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        self.scalar(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        self.scalar(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        self.scalar(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        self.scalar(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        self.scalar(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        self.scalar(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        self.scalar(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<Value, A::Error> {
        let depth = self.container();
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(Checked {
            path: Place::Deeper,
            depth,
            tally: &mut *self.tally,
        })? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Value, A::Error> {
        let depth = self.container();
        let mut out = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            self.tally.values += 1;
            let path = match (self.path, key.as_str()) {
                (Place::Root, "params") => Place::Params,
                _ => Place::Deeper,
            };
            let v = map.next_value_seed(Checked {
                path,
                depth,
                tally: &mut *self.tally,
            })?;
            if out.contains_key(&key) {
                self.tally.dups.push(self.path);
            } else {
                out.insert(key, v);
            }
        }
        Ok(Value::Object(out))
    }
}

/// What the front of a connection's receive buffer holds.
pub enum Next {
    /// A complete value and the bytes it used.
    Value(Parsed, usize),
    /// Need more input.
    Incomplete,
    /// Only whitespace is buffered.
    Empty,
    /// Not JSON.
    ParseError,
}

/// Reads the first value at the front of `buf` (requests arrive back to back, no framing).
pub fn next_value(buf: &[u8]) -> Next {
    let mut stream = serde_json::Deserializer::from_slice(buf).into_iter::<Parsed>();
    match stream.next() {
        Some(Ok(p)) => Next::Value(p, stream.byte_offset()),
        Some(Err(e)) if e.is_eof() => Next::Incomplete,
        Some(Err(_)) => Next::ParseError,
        None => Next::Empty,
    }
}

static CONN_IDS: AtomicU64 = AtomicU64::new(1);

async fn connection(stream: UnixStream, emu: Arc<Emulator>) {
    let conn = CONN_IDS.fetch_add(1, Ordering::Relaxed);
    debug!(conn, "Client connected.");
    let (mut rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::unbounded_channel::<Value>();
    let writer = tokio::spawn(write_responses(wr, rx));
    let mut running = tokio::task::JoinSet::new();
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    // Why the connection ends: `Some(answer)` for a request it cannot parse.
    let last: Option<Value> = 'read: loop {
        // Hand every complete request already buffered to the app thread, in order.
        loop {
            match next_value(&buf) {
                // SPDK v24.01 `jsonrpc_parse_request` (lib/jsonrpc/jsonrpc_server.c): a value
                // `spdk_json_parse` refuses (nested deeper than 64) or one of more than 1,024
                // values is a parse error, and the connection is closed.
                Next::Value(p, _) if p.values > MAX_VALUES || p.nesting > MAX_NESTING => {
                    debug!(conn, "Too many values or too deep; closing.");
                    break 'read Some(error_response(Value::Null, parse_error()));
                }
                Next::Value(p, used) => {
                    buf.drain(..used);
                    let app = emu.app_thread().await;
                    let (emu, tx) = (emu.clone(), tx.clone());
                    running.spawn(async move {
                        if let Some(out) = emu.handle_request(p, app).await {
                            let _ = tx.send(out);
                        }
                    });
                }
                Next::Incomplete => break,
                Next::Empty => {
                    buf.clear();
                    break;
                }
                Next::ParseError => {
                    debug!(conn, "Parse error; closing.");
                    break 'read Some(error_response(Value::Null, parse_error()));
                }
            }
        }
        if emu.should_exit() {
            break None;
        }
        if buf.len() >= MAX_REQUEST {
            warn!(
                conn,
                size = buf.len(),
                "Request exceeds the receive buffer; closing."
            );
            break None;
        }
        match rd.read(&mut chunk).await {
            Ok(0) | Err(_) => {
                debug!(conn, "Client disconnected.");
                // Requests already read still run to the end; their answers go nowhere.
                running.detach_all();
                return;
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    // Closing: the requests read before are answered first.
    while running.join_next().await.is_some() {}
    if let Some(v) = last {
        let _ = tx.send(v);
    }
    drop(tx);
    let _ = writer.await;
}

/// Writes response lines as requests complete; once the peer is gone, keeps draining (requests
/// still finish) without writing. Ends when every sender is gone.
async fn write_responses(
    mut wr: tokio::net::unix::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<Value>,
) {
    let mut open = true;
    while let Some(v) = rx.recv().await {
        if open {
            open = write_line(&mut wr, &v).await.is_ok();
        }
    }
}

async fn write_line(
    stream: &mut tokio::net::unix::OwnedWriteHalf,
    v: &Value,
) -> std::io::Result<()> {
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

/// Checks the JSON-RPC envelope as SPDK v24.01's `parse_single_request` does. On failure
/// returns the id to answer with: `null` unless the id had been taken (only a bad `params`
/// comes after that).
pub fn validate(p: Parsed) -> Result<Request, (Value, RpcError)> {
    let refused = Err((Value::Null, invalid_request()));
    let obj: Map<String, Value> = match p.value {
        Value::Object(o) => o,
        // A batch, or anything that is not an object.
        _ => return refused,
    };
    // `spdk_json_decode_object` over the four envelope keys: unknown or duplicate keys fail.
    if p.duplicate_in_envelope
        || obj
            .keys()
            .any(|k| !matches!(k.as_str(), "jsonrpc" | "method" | "params" | "id"))
    {
        return refused;
    }
    if obj.get("jsonrpc").is_some_and(|j| j != "2.0") {
        return refused;
    }
    let Some(Value::String(method)) = obj.get("method") else {
        return refused;
    };
    let id = match obj.get("id") {
        None | Some(Value::Null) => None,
        Some(i @ (Value::String(_) | Value::Number(_))) => Some(i.clone()),
        Some(_) => return refused,
    };
    let mut params = obj.get("params").cloned().unwrap_or(Value::Null);
    if !matches!(params, Value::Null | Value::Object(_) | Value::Array(_)) {
        return Err((id.unwrap_or(Value::Null), invalid_request()));
    }
    if p.duplicate_in_params {
        if let Value::Object(o) = &mut params {
            o.insert(crate::state::DUPLICATE_KEY.into(), Value::Bool(true));
        }
    }
    Ok(Request {
        id,
        method: method.clone(),
        params,
    })
}

/// Logs the emulator's start.
pub fn announce(path: &Path, functions: usize) {
    info!(socket = %path.display(), functions, "SNAP emulator listening.");
}
