//! A JSON-RPC 2.0 client for SNAP's Unix socket.
//!
//! One connection, one request at a time (SPDK serves a connection's requests in order anyway).
//! Every request has an id and a deadline; after a timeout or an I/O error the connection is
//! dropped and the next call reconnects. Requests are refused before sending when they exceed
//! SPDK's limits (32 KiB, 1024 JSON values). Responses are one JSON object per line.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Mutex;
use tracing::debug;

/// SPDK's receive buffer: the largest request SNAP accepts.
pub const MAX_REQUEST_BYTES: usize = 32 * 1024;
/// SPDK's limit on JSON values per request.
pub const MAX_REQUEST_VALUES: usize = 1024;
/// The longest response line read (inventories of large configurations are big).
const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// Errors talking to SNAP; each names the method.
#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    /// The socket does not accept connections.
    #[error("SNAP is not answering on {path}")]
    Unavailable {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// No answer in time.
    #[error("SNAP {method} gave no answer within {after:?}")]
    Timeout {
        /// Method.
        method: String,
        /// Deadline.
        after: Duration,
    },
    /// SNAP answered with an error.
    #[error("SNAP {method} failed: {message} (code {code})")]
    Rpc {
        /// Method.
        method: String,
        /// JSON-RPC error code.
        code: i64,
        /// Message.
        message: String,
    },
    /// The connection broke.
    #[error("SNAP {method}: connection lost")]
    Io {
        /// Method.
        method: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An answer that is not a JSON-RPC response.
    #[error("SNAP {method}: unexpected answer: {detail}")]
    Protocol {
        /// Method.
        method: String,
        /// What was wrong.
        detail: String,
    },
    /// The request is over SPDK's limits; nothing was sent.
    #[error("SNAP {method}: request of {bytes} bytes and {values} JSON values exceeds SPDK's limits ({MAX_REQUEST_BYTES} bytes, {MAX_REQUEST_VALUES} values)")]
    TooLarge {
        /// Method.
        method: String,
        /// Size.
        bytes: usize,
        /// Values.
        values: usize,
    },
}

impl SnapError {
    /// The JSON-RPC code, when SNAP answered with an error.
    pub fn code(&self) -> Option<i64> {
        match self {
            SnapError::Rpc { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether SNAP could not be reached at all (as opposed to refusing).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            SnapError::Unavailable { .. } | SnapError::Io { .. } | SnapError::Timeout { .. }
        )
    }
}

struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// The client.
pub struct SnapClient {
    socket: PathBuf,
    timeout: Duration,
    conn: Mutex<Option<Conn>>,
    next_id: AtomicU64,
    connects: AtomicU64,
}

impl std::fmt::Debug for SnapClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapClient")
            .field("socket", &self.socket)
            .finish_non_exhaustive()
    }
}

/// JSON values as SPDK counts them against its 1,024 (`spdk_json_parse`, lib/json/json_parse.c):
/// one per scalar and per object member name, two per array or object (its begin and its end).
fn count_values(v: &Value) -> usize {
    match v {
        Value::Array(a) => 2 + a.iter().map(count_values).sum::<usize>(),
        Value::Object(o) => 2 + o.values().map(|x| 1 + count_values(x)).sum::<usize>(),
        _ => 1,
    }
}

impl SnapClient {
    /// A client for `socket` with `timeout` per request.
    pub fn new(socket: impl Into<PathBuf>, timeout: Duration) -> Self {
        Self {
            socket: socket.into(),
            timeout,
            conn: Mutex::new(None),
            next_id: AtomicU64::new(1),
            connects: AtomicU64::new(0),
        }
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// How many connections were opened so far.
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    /// Calls method `M` of the table (`methods.rs`) with `m` as its parameters, and reads its
    /// reply as `M::Reply`.
    pub async fn invoke<M: super::methods::Method>(&self, m: &M) -> Result<M::Reply, SnapError> {
        let params = if M::NO_PARAMS {
            None
        } else {
            Some(serde_json::to_value(m).map_err(|e| SnapError::Protocol {
                method: M::NAME.into(),
                detail: format!("parameters: {e}"),
            })?)
        };
        let v = self.call(M::NAME, params).await?;
        serde_json::from_value(v).map_err(|e| SnapError::Protocol {
            method: M::NAME.into(),
            detail: e.to_string(),
        })
    }

    /// Calls `method`; `params` `None` sends no params.
    ///
    /// A connection that broke while idle (SNAP restarted) is noticed on use: the call is then
    /// made once more on a fresh connection. Every operation the agent sends is idempotent or
    /// checked by listing, so a repeat is harmless.
    pub async fn call(&self, method: &str, params: Option<Value>) -> Result<Value, SnapError> {
        match self.call_once(method, params.clone()).await {
            (Err(SnapError::Io { .. }) | Err(SnapError::Protocol { .. }), true) => {
                debug!(
                    method,
                    "Connection to SNAP was stale; retrying on a new one."
                );
                self.call_once(method, params).await.0
            }
            (result, _) => result,
        }
    }

    /// One attempt; also says whether it went over a connection opened earlier.
    async fn call_once(
        &self,
        method: &str,
        params: Option<Value>,
    ) -> (Result<Value, SnapError>, bool) {
        let mut reused = false;
        let result = self.attempt(method, params, &mut reused).await;
        (result, reused)
    }

    async fn attempt(
        &self,
        method: &str,
        params: Option<Value>,
        reused: &mut bool,
    ) -> Result<Value, SnapError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let mut req = json!({"jsonrpc": "2.0", "id": id, "method": method});
        if let Some(p) = params {
            req["params"] = p;
        }
        let bytes = serde_json::to_vec(&req).expect("serializable");
        let values = count_values(&req);
        if bytes.len() > MAX_REQUEST_BYTES || values > MAX_REQUEST_VALUES {
            return Err(SnapError::TooLarge {
                method: method.into(),
                bytes: bytes.len(),
                values,
            });
        }
        let mut guard = self.conn.lock().await;
        *reused = guard.is_some();
        if guard.is_none() {
            let stream = tokio::time::timeout(self.timeout, UnixStream::connect(&self.socket))
                .await
                .unwrap_or_else(|_| {
                    Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connect timed out",
                    ))
                })
                .map_err(|source| SnapError::Unavailable {
                    path: self.socket.clone(),
                    source,
                })?;
            self.connects.fetch_add(1, Ordering::Relaxed);
            *guard = Some(Conn {
                stream,
                buf: Vec::new(),
            });
        }
        let conn = guard.as_mut().expect("connected above");
        let exchange = async {
            conn.stream.write_all(&bytes).await?;
            loop {
                let line = read_line(conn).await?;
                let v: Value = serde_json::from_slice(&line).map_err(|e| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
                })?;
                // An answer to an earlier request that timed out: skip it.
                if v.get("id") == Some(&json!(id)) || v.get("id") == Some(&Value::Null) {
                    return Ok::<Value, std::io::Error>(v);
                }
                debug!(method, stale = %v, "Skipping a stale response.");
            }
        };
        let resp = match tokio::time::timeout(self.timeout, exchange).await {
            Ok(Ok(v)) => v,
            Ok(Err(source)) => {
                *guard = None;
                return Err(if source.kind() == std::io::ErrorKind::InvalidData {
                    SnapError::Protocol {
                        method: method.into(),
                        detail: source.to_string(),
                    }
                } else {
                    SnapError::Io {
                        method: method.into(),
                        source,
                    }
                });
            }
            Err(_) => {
                *guard = None;
                return Err(SnapError::Timeout {
                    method: method.into(),
                    after: self.timeout,
                });
            }
        };
        if let Some(err) = resp.get("error") {
            // A null-id error (parse error) closes the connection on SNAP's side.
            if resp.get("id") == Some(&Value::Null) {
                *guard = None;
            }
            return Err(SnapError::Rpc {
                method: method.into(),
                code: err.get("code").and_then(Value::as_i64).unwrap_or(0),
                message: err
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            });
        }
        resp.get("result")
            .cloned()
            .ok_or_else(|| SnapError::Protocol {
                method: method.into(),
                detail: format!("neither result nor error in {resp}"),
            })
    }
}

async fn read_line(conn: &mut Conn) -> std::io::Result<Vec<u8>> {
    loop {
        if let Some(pos) = conn.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = conn.buf.drain(..=pos).collect();
            return Ok(line);
        }
        if conn.buf.len() > MAX_RESPONSE_BYTES {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "response line too long",
            ));
        }
        let mut chunk = [0u8; 8192];
        let n = conn.stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        conn.buf.extend_from_slice(&chunk[..n]);
    }
}
