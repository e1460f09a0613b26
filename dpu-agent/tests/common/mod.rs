//! Shared by the dpu-agent tests: an in-process SNAP emulator that can be restarted, and a
//! plain JSON-RPC probe that checks SNAP's state independently of the agent's own client.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use snap_emulator::{Config, Exit, Faults};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::oneshot;

pub fn emu_config(socket: &Path) -> Config {
    Config {
        socket: socket.to_path_buf(),
        pfs: 2,
        vfs_per_pf: 4,
        serial: "MT2328XZ17DF".into(),
        rbd: true,
        real_ceph: None,
        init_files: vec![],
        faults: Faults::default(),
        default_image_size: 1 << 30,
    }
}

/// An emulator running in this process.
pub struct Emu {
    pub socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Exit>>,
}

impl Emu {
    pub async fn start(socket: &Path) -> Self {
        Self::start_with(emu_config(socket)).await
    }

    pub async fn start_with(cfg: Config) -> Self {
        let socket = cfg.socket.clone();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            snap_emulator::run(cfg, async {
                let _ = stopped.await;
            })
            .await
            .unwrap()
        });
        for _ in 0..500 {
            if UnixStream::connect(&socket).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Self {
            socket,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
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
