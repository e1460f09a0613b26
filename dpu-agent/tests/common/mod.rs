//! Shared by the dpu-agent tests: an in-process SNAP emulator that can be restarted, and a
//! plain JSON-RPC probe that checks SNAP's state independently of the agent's own client.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use snap_emulator::{Config, InProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

pub fn emu_config(socket: &Path) -> Config {
    Config::with_socket(socket)
}

/// An emulator running in this process, restartable at the same socket.
pub struct Emu {
    pub socket: PathBuf,
    inner: InProcess,
}

impl Emu {
    pub async fn start(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
            inner: InProcess::start(emu_config(socket)).await,
        }
    }

    /// An emulator that also plays the host, its devices in `host_dir`.
    pub async fn start_with_host(socket: &Path, host_dir: &Path) -> Self {
        let mut config = emu_config(socket);
        config.host_dir = Some(host_dir.to_path_buf());
        Self {
            socket: socket.to_path_buf(),
            inner: InProcess::start(config).await,
        }
    }

    pub async fn stop(&mut self) {
        self.inner.stop().await;
    }

    /// A SNAP restart: everything in memory is lost.
    pub async fn restart(&mut self) {
        self.stop().await;
        *self = Self::start(&self.socket.clone()).await;
    }
}

/// Calls SNAP directly (not through the agent).
pub async fn probe(socket: &Path, method: &str, params: Value) -> Value {
    let mut s = UnixStream::connect(socket).await.expect("SNAP socket");
    let mut req = json!({"jsonrpc": "2.0", "id": 1, "method": method});
    if !params.is_null() {
        req["params"] = params;
    }
    s.write_all(&serde_json::to_vec(&req).unwrap())
        .await
        .unwrap();
    let mut buf = vec![];
    let mut chunk = [0u8; 4096];
    while !buf.contains(&b'\n') {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "SNAP closed the connection");
        buf.extend_from_slice(&chunk[..n]);
    }
    let v: Value = serde_json::from_slice(&buf).unwrap();
    assert!(v.get("error").is_none(), "{method}: {v}");
    v["result"].clone()
}
