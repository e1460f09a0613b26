//! A stand-in for NVIDIA DOCA SNAP-4 on machines without a BlueField-3.
//!
//! It serves SNAP's JSON-RPC socket with the same stream rules, methods, key aliases, invariants,
//! errors and restart semantics as `shared/snap-reference.md` describes (sections 2-4 and the
//! checklist in section 6). State lives in memory and is lost on restart, as in SNAP; init files
//! can be replayed at start, as SNAP does with `SNAP_RPC_INIT_CONF`.
//!
//! Modules: [`server`] (socket and stream rules), [`state`] (objects, methods, invariants),
//! [`functions`] (the BlueField-3 function table), [`ceph`] (real-Ceph checks), [`init`] (init
//! files). Faults can be injected: per-method latency, an error rate, "RBD not compiled in",
//! and exit after N calls.

pub mod ceph;
pub mod functions;
pub mod host;
pub mod init;
pub mod nbd;
pub mod qos;
pub mod server;
pub mod state;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::net::UnixListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::state::{RpcError, State};

/// Injected faults.
#[derive(Debug, Clone, Default)]
pub struct Faults {
    /// Delay before answering, per method (`*` for every method).
    pub latency: BTreeMap<String, Duration>,
    /// Delay after a call took effect and before its answer, per method (`*` for every
    /// method): the window where a client killed has changed SNAP without knowing it.
    pub reply_latency: BTreeMap<String, Duration>,
    /// Probability (0..1) that a call fails with -5 before taking effect
    /// (never `spdk_get_version` or `rpc_get_methods`).
    pub error_rate: f64,
    /// Seed of the error-rate generator.
    pub seed: u64,
    /// Exit (as a crash) after this many calls.
    pub exit_after: Option<u64>,
}

/// Sleeps as long as `latencies` says for `method` (its own entry, else `*`), if at all.
async fn delay(latencies: &BTreeMap<String, Duration>, method: &str) {
    if let Some(d) = latencies.get(method).or_else(|| latencies.get("*")) {
        tokio::time::sleep(*d).await;
    }
}

/// How the emulator starts.
#[derive(Debug, Clone)]
pub struct Config {
    /// The socket path.
    pub socket: PathBuf,
    /// PFs, VFs per PF and device serial of the function table.
    pub pfs: u32,
    /// VFs per PF.
    pub vfs_per_pf: u32,
    /// Device serial used in VUIDs.
    pub serial: String,
    /// Whether SPDK was "built with" RBD.
    pub rbd: bool,
    /// Check clusters and images against a real Ceph cluster.
    pub real_ceph: Option<ceph::RealCeph>,
    /// Init files replayed at start.
    pub init_files: Vec<PathBuf>,
    /// Faults.
    pub faults: Faults,
    /// Image size assumed when no real cluster is consulted.
    pub default_image_size: u64,
    /// Start in SPDK's startup state (`--wait-for-rpc`): only `SPDK_RPC_STARTUP` methods are
    /// served until `framework_start_init`.
    pub wait_for_rpc: bool,
    /// Where the simulated host's devices are served ([`host`]); none when absent.
    pub host_dir: Option<PathBuf>,
}

impl Config {
    /// A BlueField-3 with 2 PFs and 4 VFs each, RBD built in, no faults, no init files: what the
    /// tests of SNAP clients start from.
    pub fn with_socket(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
            pfs: 2,
            vfs_per_pf: 4,
            serial: "MT2328XZ17DF".into(),
            rbd: true,
            real_ceph: None,
            init_files: vec![],
            faults: Faults::default(),
            default_image_size: 1 << 30,
            wait_for_rpc: false,
            host_dir: None,
        }
    }
}

/// Why `run` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Asked to stop.
    Stopped,
    /// `exit_after` calls were served: behave like a crash.
    Crashed,
}

/// Errors starting the emulator.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The function table is impossible.
    #[error("invalid function table")]
    Table(#[from] functions::TableError),
    /// The socket could not be bound.
    #[error("cannot listen on {path}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The host's directory could not be prepared.
    #[error("cannot serve host devices in {path}")]
    HostDir {
        /// The directory.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An init file could not be read.
    #[error("cannot read init file {path}")]
    Init {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// SPDK's app thread: every RPC runs on it, one at a time, in the order requests were read
/// (lib/jsonrpc/jsonrpc_server_tcp.c `spdk_jsonrpc_server_poll` calls each handler from the one
/// poller). A handler that completes later (a `bdev_get_bdevs` waiting for its bdev,
/// `framework_wait_init`) gives the thread back while it waits.
pub type AppThread = tokio::sync::OwnedMutexGuard<()>;

/// The running emulator.
pub struct Emulator {
    app: Arc<tokio::sync::Mutex<()>>,
    state: Mutex<State>,
    faults: Faults,
    real_ceph: Option<ceph::RealCeph>,
    calls: AtomicU64,
    rng: Mutex<u64>,
    exit: AtomicBool,
    exit_tx: watch::Sender<bool>,
    host_dir: Option<PathBuf>,
    /// The simulated host (set by [`run`] when a host directory is configured).
    host: std::sync::OnceLock<Arc<host::Host>>,
    /// Bdevs' blocks when no real cluster backs them.
    mem_disks: Mutex<std::collections::HashMap<String, Arc<nbd::MemDisk>>>,
    /// Each exposed bdev's QoS limiter, kept to the limits `bdev_set_qos_limit` set.
    limiters: Mutex<std::collections::HashMap<String, Arc<qos::Qos>>>,
}

impl host::Devices for Emulator {
    fn export(&self, bdev: &str) -> Option<nbd::Export> {
        let size = self.state.lock().expect("state lock").bdev_bytes(bdev)?;
        let backend = match &self.real_ceph {
            Some(real) => nbd::Backend::Rbd(real.image(bdev)?),
            None => nbd::Backend::Memory(
                self.mem_disks
                    .lock()
                    .expect("disks lock")
                    .entry(bdev.to_string())
                    .or_default()
                    .clone(),
            ),
        };
        let limits = self.state.lock().expect("state lock").qos_of(bdev)?;
        let qos = self
            .limiters
            .lock()
            .expect("limiters lock")
            .entry(bdev.to_string())
            .or_default()
            .clone();
        qos.set(limits);
        Some(nbd::Export { size, backend, qos })
    }
}

impl Emulator {
    /// A fresh emulator (empty state) for `config`.
    pub fn new(config: &Config) -> Result<Arc<Self>, StartError> {
        let table = functions::bluefield3(config.pfs, config.vfs_per_pf, &config.serial)?;
        let mut state = State::new(table, config.rbd, config.faults.seed ^ 0x5eed_cafe);
        state.default_image_size = config.default_image_size;
        state.runtime = !config.wait_for_rpc;
        Ok(Arc::new(Self {
            app: Arc::new(tokio::sync::Mutex::new(())),
            state: Mutex::new(state),
            faults: config.faults.clone(),
            real_ceph: config.real_ceph.clone(),
            calls: AtomicU64::new(0),
            rng: Mutex::new(config.faults.seed.max(1)),
            exit: AtomicBool::new(false),
            exit_tx: watch::channel(false).0,
            host_dir: config.host_dir.clone(),
            host: std::sync::OnceLock::new(),
            mem_disks: Mutex::default(),
            limiters: Mutex::default(),
        }))
    }

    /// Whether `exit_after` has been reached.
    pub fn should_exit(&self) -> bool {
        self.exit.load(Ordering::SeqCst)
    }

    fn roll(&self) -> f64 {
        let mut x = self.rng.lock().expect("rng lock");
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        (*x >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Takes SPDK's app thread; requests are given it in the order they ask (tokio's mutex is
    /// fair), which is the order they were read.
    pub async fn app_thread(&self) -> AppThread {
        self.app.clone().lock_owned().await
    }

    /// Handles one decoded request on the app thread; `None` means no response is sent.
    pub async fn handle_request(&self, v: server::Parsed, app: AppThread) -> Option<Value> {
        let req = match server::validate(v) {
            Ok(r) => r,
            Err((id, e)) => return Some(server::error_response(id, e)),
        };
        let result = self.call_on(&req.method, &req.params, app).await;
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if self.faults.exit_after.is_some_and(|limit| n >= limit) {
            warn!(calls = n, "exit_after reached: exiting as a crash.");
            self.exit.store(true, Ordering::SeqCst);
            let _ = self.exit_tx.send(true);
        }
        match (result, req.id) {
            (Ok(_), None) => None,
            (Ok(r), Some(id)) => Some(json!({"jsonrpc": "2.0", "id": id, "result": r})),
            (Err(e), id) => Some(server::error_response(id.unwrap_or(Value::Null), e)),
        }
    }

    /// Runs one method with faults and real-Ceph checks applied, on the app thread.
    pub async fn call(&self, method: &str, params: &Value) -> Result<Value, RpcError> {
        let app = self.app_thread().await;
        self.call_on(method, params, app).await
    }

    async fn call_on(
        &self,
        method: &str,
        params: &Value,
        app: AppThread,
    ) -> Result<Value, RpcError> {
        let r = self.dispatch(method, params, app).await;
        if r.is_ok() {
            self.after(method, params);
        }
        delay(&self.faults.reply_latency, method).await;
        r
    }

    /// After a call took effect: the host's devices follow SNAP's objects.
    fn after(&self, method: &str, params: &Value) {
        // A deleted bdev's blocks (memory mode) go with it; a namespace over it is hot-removed.
        if let ("bdev_rbd_delete", Some(name)) =
            (method, params.get("name").and_then(Value::as_str))
        {
            self.mem_disks.lock().expect("disks lock").remove(name);
            self.limiters.lock().expect("limiters lock").remove(name);
        }
        // Limits changed: the host's I/O is paced by them from its next request.
        if method == "bdev_set_qos_limit" {
            let state = self.state.lock().expect("state lock");
            for (bdev, q) in self.limiters.lock().expect("limiters lock").iter() {
                if let Some(l) = state.qos_of(bdev) {
                    q.set(l);
                }
            }
        }
        // Listings change nothing the host sees (`bdev_get_bdevs` can: a grown image's size).
        let read_only = method.ends_with("_list")
            || matches!(
                method,
                "spdk_get_version"
                    | "rpc_get_methods"
                    | "bdev_rbd_get_clusters_info"
                    | "framework_wait_init"
            );
        if let (false, Some(h)) = (read_only, self.host.get()) {
            let want = self.state.lock().expect("state lock").exposures();
            h.sync(want);
        }
    }

    async fn dispatch(
        &self,
        method: &str,
        params: &Value,
        app: AppThread,
    ) -> Result<Value, RpcError> {
        self.state.lock().expect("state lock").allowed_now(method)?;
        delay(&self.faults.latency, method).await;
        if !matches!(method, "spdk_get_version" | "rpc_get_methods")
            && self.faults.error_rate > 0.0
            && self.roll() < self.faults.error_rate
        {
            return Err(RpcError::eio());
        }
        match (method, &self.real_ceph) {
            ("bdev_rbd_register_cluster", Some(real)) => {
                let p = State::parse_register(params)?;
                if self
                    .state
                    .lock()
                    .expect("state lock")
                    .cluster(&p.name)
                    .is_some()
                {
                    return Err(RpcError::eperm());
                }
                real.register_cluster(&p).await?;
                let name = p.name.clone();
                let r = self.state.lock().expect("state lock").register_cluster(p);
                if r.is_err() {
                    real.forget_cluster(&name);
                }
                r
            }
            ("bdev_rbd_unregister_cluster", Some(real)) => {
                let r = self.state.lock().expect("state lock").call(method, params);
                if let (Ok(_), Some(name)) = (&r, params.get("name").and_then(Value::as_str)) {
                    real.forget_cluster(name);
                }
                r
            }
            ("bdev_rbd_resize", Some(real)) => {
                // SPDK resizes the image through the bdev's librbd handle, then the bdev.
                let (pool, image, cluster, bytes) = self
                    .state
                    .lock()
                    .expect("state lock")
                    .resize_target(params)?;
                let name = params.get("name").and_then(Value::as_str).unwrap_or("");
                if let Some(c) = cluster {
                    real.resize_image(name, &c, &pool, &image, bytes).await?;
                }
                self.state.lock().expect("state lock").call(method, params)
            }
            ("bdev_rbd_create", Some(real)) => {
                let p = State::parse_rbd_create(params)?;
                if let Some(c) = &p.cluster_name {
                    if self.state.lock().expect("state lock").cluster(c).is_none() {
                        return Err(RpcError::eperm());
                    }
                }
                // Opened as SPDK opens it, and held while the bdev exists.
                let (img, size) = real.open_image(&p).await?;
                let r = self
                    .state
                    .lock()
                    .expect("state lock")
                    .create_rbd_bdev(p, size);
                if let Ok(Value::String(name)) = &r {
                    real.hold(name, img);
                }
                r
            }
            ("bdev_rbd_delete", Some(real)) => {
                let r = self.state.lock().expect("state lock").call(method, params);
                if let (Ok(_), Some(name)) = (&r, params.get("name").and_then(Value::as_str)) {
                    real.release(name).await;
                }
                r
            }
            ("framework_wait_init", _) => self.wait_runtime(app).await,
            ("bdev_get_bdevs", real) => {
                // A grown image shows in its bdev once librbd's update watch said so.
                if let Some(real) = real {
                    for (name, bytes) in real.changed_sizes().await {
                        self.state
                            .lock()
                            .expect("state lock")
                            .follow_image_size(&name, bytes);
                    }
                }
                self.get_bdevs_waiting(params, app).await
            }
            _ => self.state.lock().expect("state lock").call(method, params),
        }
    }

    /// `bdev_get_bdevs`: a named bdev that does not exist yet is waited for up to `timeout` ms,
    /// as SPDK v24.01's `rpc_bdev_get_bdevs` does (lib/bdev/bdev_rpc.c: `spdk_bdev_open_async`
    /// with `timeout_ms`), then -19. Other calls go on meanwhile: the app thread is given back.
    async fn get_bdevs_waiting(&self, params: &Value, app: AppThread) -> Result<Value, RpcError> {
        let mut app = Some(app);
        let timeout = params
            .get("timeout")
            .and_then(Value::as_u64)
            .filter(|_| params.get("name").is_some_and(Value::is_string))
            .unwrap_or(0);
        let deadline = tokio::time::Instant::now() + Duration::from_millis(timeout);
        loop {
            let r = self
                .state
                .lock()
                .expect("state lock")
                .call("bdev_get_bdevs", params);
            match r {
                Err(e) if e.code == -19 && tokio::time::Instant::now() < deadline => {
                    drop(app.take());
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                other => return other,
            }
        }
    }

    /// `framework_wait_init`: true at once at runtime; in the startup state it answers once
    /// `framework_start_init` is done (lib/event/app.c `rpc_framework_wait_init` polls for it),
    /// without holding the app thread meanwhile.
    async fn wait_runtime(&self, app: AppThread) -> Result<Value, RpcError> {
        drop(app);
        while !self.state.lock().expect("state lock").runtime {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(json!(true))
    }

    /// Replays init files (one `method --key value` command per line).
    pub async fn replay(&self, files: &[PathBuf]) -> Result<(), StartError> {
        for path in files {
            let text = std::fs::read_to_string(path).map_err(|source| StartError::Init {
                path: path.clone(),
                source,
            })?;
            for (lineno, line) in text.lines().enumerate() {
                let Some((method, params)) = init::parse_line(line) else {
                    continue;
                };
                match self.call(&method, &params).await {
                    Ok(_) => {
                        info!(file = %path.display(), line = lineno + 1, method, "Init command applied.")
                    }
                    Err(e) => {
                        warn!(file = %path.display(), line = lineno + 1, method, code = e.code, error = %e.message, "Init command failed.")
                    }
                }
            }
        }
        Ok(())
    }

    /// Completes when `exit_after` is reached.
    pub async fn crashed(&self) {
        let mut rx = self.exit_tx.subscribe();
        while !*rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Binds the socket, replays init files and serves until `shutdown` or a simulated crash.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Exit, StartError> {
    let emu = Emulator::new(&config)?;
    let bind_err = |source| StartError::Bind {
        path: config.socket.clone(),
        source,
    };
    server::clear_stale_socket(&config.socket).map_err(bind_err)?;
    let listener = UnixListener::bind(&config.socket).map_err(bind_err)?;
    if let Some(dir) = &emu.host_dir {
        let devices: std::sync::Weak<dyn host::Devices> = Arc::downgrade(&emu) as _;
        let h = host::Host::new(dir, devices).map_err(|source| StartError::HostDir {
            path: dir.clone(),
            source,
        })?;
        let _ = emu.host.set(h);
    }
    emu.replay(&config.init_files).await?;
    server::announce(
        &config.socket,
        (config.pfs * (1 + config.vfs_per_pf)) as usize,
    );
    let (stop_tx, stop_rx) = watch::channel(false);
    let serving = tokio::spawn(server::serve(listener, emu.clone(), stop_rx));
    let exit = tokio::select! {
        _ = shutdown => Exit::Stopped,
        _ = emu.crashed() => Exit::Crashed,
    };
    let _ = stop_tx.send(true);
    let _ = serving.await;
    if exit == Exit::Stopped {
        let _ = std::fs::remove_file(&config.socket);
        // SNAP stopping takes the host's devices away.
        if let Some(h) = emu.host.get() {
            h.shutdown();
        }
    }
    Ok(exit)
}

/// An emulator running inside the calling process, for tests of SNAP clients.
pub struct InProcess {
    socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Exit>>,
}

impl InProcess {
    /// Starts one with `config` and waits until its socket accepts connections.
    pub async fn start(config: Config) -> Self {
        let socket = config.socket.clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            run(config, async {
                let _ = stopped.await;
            })
            .await
            .expect("emulator starts")
        });
        for _ in 0..500 {
            if tokio::net::UnixStream::connect(&socket).await.is_ok() {
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

    /// Its socket.
    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    /// Whether it has ended (a simulated crash, or stopped).
    pub fn finished(&self) -> bool {
        self.task.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Stops it (as a process exit would: connections close, state is gone).
    pub async fn stop(&mut self) -> Option<Exit> {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        self.wait().await
    }

    /// Waits until it ends (a simulated crash, or after `stop`).
    pub async fn wait(&mut self) -> Option<Exit> {
        match self.task.take() {
            Some(t) => t.await.ok(),
            None => None,
        }
    }
}
