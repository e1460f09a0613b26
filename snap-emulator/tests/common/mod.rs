//! Shared by the emulator's socket-level tests: an in-process emulator and a raw client.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};
use snap_emulator::{Config, Exit, InProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

pub const NQN: &str = "nqn.2022-10.io.nvda.nvme:0";
pub const UUID1: &str = "76210ea4-7920-40a0-a07b-8992a7443c76";

pub fn config(socket: &Path) -> Config {
    Config::with_socket(socket)
}

pub struct Emu {
    pub _dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub inner: InProcess,
}

impl Emu {
    pub async fn start(tune: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("spdk.sock");
        Self::start_at(dir, socket, tune).await
    }

    pub async fn start_at(
        dir: tempfile::TempDir,
        socket: PathBuf,
        tune: impl FnOnce(&mut Config),
    ) -> Self {
        let mut cfg = config(&socket);
        tune(&mut cfg);
        Self {
            _dir: dir,
            socket,
            inner: InProcess::start(cfg).await,
        }
    }

    pub async fn client(&self) -> Client {
        Client {
            s: UnixStream::connect(&self.socket).await.unwrap(),
            buf: vec![],
            id: 0,
        }
    }

    /// Stops it as a restart would; returns the directory for a restart at the same socket.
    pub async fn stop(mut self) -> (tempfile::TempDir, PathBuf) {
        assert_eq!(self.inner.stop().await, Some(Exit::Stopped));
        (self._dir, self.socket)
    }
}

pub struct Client {
    pub s: UnixStream,
    pub buf: Vec<u8>,
    pub id: u64,
}

impl Client {
    pub async fn raw(&mut self, bytes: &[u8]) {
        self.s.write_all(bytes).await.unwrap();
    }

    /// Writes `bytes` in pieces cut at `cuts`, pausing so that each piece is a separate read.
    pub async fn raw_split(&mut self, bytes: &[u8], cuts: &[usize]) {
        let mut start = 0;
        for &c in cuts.iter().chain(std::iter::once(&bytes.len())) {
            self.s.write_all(&bytes[start..c]).await.unwrap();
            self.s.flush().await.unwrap();
            tokio::time::sleep(Duration::from_millis(15)).await;
            start = c;
        }
    }

    /// The next response line, or `None` at EOF.
    pub async fn line(&mut self) -> Option<String> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                return Some(String::from_utf8(line).unwrap());
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(10), self.s.read(&mut chunk))
                .await
                .expect("an answer or EOF in time")
                .unwrap_or(0);
            if n == 0 {
                assert!(self.buf.is_empty(), "partial line at EOF: {:?}", self.buf);
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub async fn response(&mut self) -> Value {
        let line = self.line().await.expect("a response");
        assert!(line.ends_with('\n') && line.matches('\n').count() == 1);
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["jsonrpc"], "2.0", "{v}");
        v
    }

    pub async fn call_raw(&mut self, method: &str, params: Value) -> Value {
        self.id += 1;
        let mut req = json!({"jsonrpc": "2.0", "id": self.id, "method": method});
        if !params.is_null() {
            req["params"] = params;
        }
        self.raw(&serde_json::to_vec(&req).unwrap()).await;
        let resp = self.response().await;
        assert_eq!(resp["id"], self.id, "{resp}");
        resp
    }

    pub async fn ok(&mut self, method: &str, params: Value) -> Value {
        let r = self.call_raw(method, params.clone()).await;
        assert!(
            r.get("error").is_none(),
            "{method} {params} failed: {}",
            r["error"]
        );
        r["result"].clone()
    }

    pub async fn err(&mut self, method: &str, params: Value) -> i64 {
        let r = self.call_raw(method, params.clone()).await;
        assert!(
            r.get("result").is_none(),
            "{method} {params} succeeded: {r}"
        );
        r["error"]["code"].as_i64().unwrap()
    }
}

/// Builds the create path of the reference (4.1) for one namespace on PF 0.
pub async fn create_path(c: &mut Client) {
    c.ok(
        "bdev_rbd_register_cluster",
        json!({"name": "ceph1", "user_id": "snap", "config_param": {"mon_host": "127.0.0.1:6789", "key": "AQD=="}}),
    )
    .await;
    let name = c
        .ok(
            "bdev_rbd_create",
            json!({"name": "rbd-vol1", "pool_name": "rbd", "rbd_name": "vol1", "block_size": 4096, "cluster_name": "ceph1", "uuid": UUID1}),
        )
        .await;
    assert_eq!(name, "rbd-vol1");
    assert_eq!(
        c.ok(
            "nvme_subsystem_create",
            json!({"nqn": NQN, "serial_number": "SN0001", "model_number": "unistor", "nn": 1024, "mnan": 1024})
        )
        .await,
        json!(true)
    );
    c.ok(
        "nvme_namespace_create",
        json!({"nqn": NQN, "nsid": 1, "bdev_name": "rbd-vol1", "uuid": UUID1, "bdev_type": "spdk"}),
    )
    .await;
    let ctrl = c
        .ok(
            "nvme_controller_create",
            json!({"nqn": NQN, "pf_id": 0, "num_queues": 8, "mdts": 7, "suspended": true}),
        )
        .await;
    assert_eq!(ctrl, json!({"ctrl_id": "NVMeCtrl1"}));
    c.ok(
        "nvme_controller_attach_ns",
        json!({"ctrl_id": "NVMeCtrl1", "nsid": 1}),
    )
    .await;
    c.ok("nvme_controller_resume", json!({"ctrl_id": "NVMeCtrl1"}))
        .await;
}
