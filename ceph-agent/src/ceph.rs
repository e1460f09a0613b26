//! What the agent does to the cluster, as `ceph`, `rbd` and `rados` command lines.
//!
//! Every function takes checked names ([`PoolName`], [`ImageName`]...), so nothing unchecked can
//! reach a command line. Positional arguments follow `--`. Idempotency is decided by looking at
//! the cluster (`rbd info`, `rbd trash ls`), not by parsing error text.
//!
//! Ownership: unistor writes `unistor.managed-by` and `unistor.volume` as image metadata and keeps
//! a per-pool index (omap keys of the RADOS object `unistor.index`) of the images it manages, so
//! that reports never list or open every image in a pool (`rbd ls -l` is never used). The index
//! entry is written before the image is created; an image that is in the index, carries no
//! metadata at all and has no watchers is one whose creation was interrupted, and is adopted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use protocol::names::{check_rbd_feature, CephClientId, NameError, PoolName, VolumeName};
use protocol::{
    Capacity, CephChanges, CephHealth, CephIdentity, CephReport, ErrorCode, ImageState,
    ImageStatus, ImageWatchers, MonitorInfo, PoolInfo, WireError,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::index::{KeyWrite, PoolIndex};
use crate::view::View;

pub use protocol::names::ImageName;

use crate::runner::{CliError, Invocation, Runner, Tool};

/// Image metadata keys (their one home is [`protocol::meta`]).
pub use protocol::meta::{
    MANAGED_BY as META_MANAGED_BY, POLICY as META_POLICY, RETENTION as META_RETENTION,
    VOLUME as META_VOLUME,
};

/// A deletion policy with its trash retention (the wire's type only admits the three
/// policies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    deletion: protocol::meta::DeletionPolicy,
    retention_secs: u64,
}

impl Policy {
    /// From the wire form.
    pub fn parse(p: &protocol::ImagePolicy) -> Self {
        Self {
            deletion: p.deletion,
            retention_secs: p.trash_retention_secs,
        }
    }
}
/// The RADOS object (in each pool) whose omap keys index the images unistor manages.
pub const INDEX_OBJECT: &str = "unistor.index";
/// Features of a new image when none are asked for: what SNAP's librbd needs and no more.
pub const DEFAULT_FEATURES: &[&str] = &["layering", "exclusive-lock"];
/// Image sizes are whole mebibytes.
pub const SIZE_UNIT: u64 = 1 << 20;

/// A checked `pool/image`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ImageSpec {
    /// The pool.
    pub pool: PoolName,
    /// The image.
    pub image: ImageName,
}

impl ImageSpec {
    /// Checks both names; errors name the field.
    pub fn parse(pool: &str, image: &str) -> Result<Self, NameError> {
        Ok(Self {
            pool: PoolName::parse("pool", pool)?,
            image: ImageName::parse("image", image)?,
        })
    }
}

impl std::fmt::Display for ImageSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.pool, self.image)
    }
}

/// A checked owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// `unistor.managed-by`.
    pub managed_by: VolumeName,
    /// `unistor.volume`.
    pub volume: VolumeName,
}

impl Owner {
    /// Checks both names.
    pub fn parse(o: &protocol::Ownership) -> Result<Self, NameError> {
        Ok(Self {
            managed_by: VolumeName::parse("owner.managed_by", &o.managed_by)?,
            volume: VolumeName::parse("owner.volume", &o.volume)?,
        })
    }
}

/// Errors of cluster operations, each naming the object.
#[derive(Debug, thiserror::Error)]
pub enum CephError {
    /// A name failed its allow-list.
    #[error(transparent)]
    Name(#[from] NameError),
    /// Some other argument is invalid.
    #[error("invalid {field}: {message}")]
    Invalid {
        /// The field.
        field: &'static str,
        /// Why.
        message: String,
    },
    /// The image does not exist.
    #[error("image {spec} not found{hint}")]
    NotFound {
        /// `pool/image`.
        spec: String,
        /// Extra advice.
        hint: String,
    },
    /// An owned image of that name exists with another spec.
    #[error("image {spec} already exists with a different spec: {diff}")]
    Conflict {
        /// `pool/image`.
        spec: String,
        /// The differences.
        diff: String,
    },
    /// The image exists but is not unistor's (or not this volume's).
    #[error("image {spec} is not owned by unistor volume {volume}: {why}")]
    NotOwned {
        /// `pool/image`.
        spec: String,
        /// The volume that asked.
        volume: String,
        /// What the metadata says.
        why: String,
    },
    /// The image has watchers.
    #[error("image {spec} is in use by {} watcher(s): {}", watchers.len(), watchers.join(", "))]
    InUse {
        /// `pool/image`.
        spec: String,
        /// Watcher addresses.
        watchers: Vec<String>,
    },
    /// The request would shrink the image.
    #[error("refusing to shrink image {spec} from {current} to {requested} bytes")]
    Shrink {
        /// `pool/image`.
        spec: String,
        /// Current size.
        current: u64,
        /// Requested size.
        requested: u64,
    },
    /// A CLI command failed.
    #[error("cluster command failed")]
    Cli(#[from] CliError),
    /// A CLI command printed something unexpected.
    #[error("cannot parse the output of `{command}`")]
    Parse {
        /// The command line.
        command: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

impl CephError {
    /// The error as it crosses the wire.
    pub fn to_wire(&self) -> WireError {
        let message = protocol::error::chain(self);
        match self {
            CephError::Name(e) => WireError::from(e.clone()),
            CephError::Invalid { field, .. } => {
                WireError::new(ErrorCode::InvalidArgument, message).with_field(*field)
            }
            CephError::NotFound { .. } => WireError::new(ErrorCode::NotFound, message),
            CephError::Conflict { .. } => WireError::new(ErrorCode::Conflict, message),
            CephError::NotOwned { .. } => WireError::new(ErrorCode::NotOwned, message),
            CephError::InUse { .. } => WireError::new(ErrorCode::InUse, message),
            CephError::Shrink { .. } => {
                WireError::new(ErrorCode::ShrinkRefused, message).with_field("size_bytes")
            }
            CephError::Cli(CliError::Timeout { .. }) => WireError::new(ErrorCode::Timeout, message),
            CephError::Cli(_) | CephError::Parse { .. } => {
                WireError::new(ErrorCode::CommandFailed, message)
            }
        }
    }
}

/// Checks a size: positive whole mebibytes.
pub fn check_size(field: &'static str, bytes: u64) -> Result<(), CephError> {
    if bytes == 0 || !bytes.is_multiple_of(SIZE_UNIT) {
        return Err(CephError::Invalid {
            field,
            message: format!("{bytes} bytes is not a positive whole number of MiB"),
        });
    }
    Ok(())
}

/// Checks requested features (names, dependencies) and returns them sorted, or the defaults.
pub fn check_features(features: &[String]) -> Result<Vec<String>, CephError> {
    if features.is_empty() {
        return Ok(DEFAULT_FEATURES.iter().map(|s| s.to_string()).collect());
    }
    let mut set = BTreeSet::new();
    for f in features {
        check_rbd_feature("features", f)?;
        set.insert(f.clone());
    }
    for (needs, feature) in [
        ("exclusive-lock", "object-map"),
        ("object-map", "fast-diff"),
    ] {
        if set.contains(feature) && !set.contains(needs) {
            return Err(CephError::Invalid {
                field: "features",
                message: format!("{feature} requires {needs}"),
            });
        }
    }
    Ok(set.into_iter().collect())
}

#[derive(Debug, Deserialize)]
struct RbdInfo {
    size: u64,
    #[serde(default)]
    features: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct RbdStatus {
    #[serde(default)]
    watchers: Vec<RbdWatcher>,
}

#[derive(Debug, Deserialize)]
struct RbdWatcher {
    address: String,
}

/// One session in `ceph tell mon.X sessions`.
#[derive(Debug, Deserialize)]
struct MonSessionJson {
    #[serde(default)]
    entity_name: String,
    addrs: SessionAddrsJson,
}

#[derive(Debug, Deserialize)]
struct SessionAddrsJson {
    #[serde(default)]
    addrvec: Vec<SessionAddrJson>,
}

#[derive(Debug, Deserialize)]
struct SessionAddrJson {
    addr: String,
    #[serde(default)]
    nonce: u64,
}

/// A watcher's address without a messenger prefix (`v1:`, `v2:`, `any:`).
fn bare_addr(a: &str) -> &str {
    a.split_once(':')
        .filter(|(p, _)| matches!(*p, "v1" | "v2" | "any"))
        .map_or(a, |(_, rest)| rest)
}

#[derive(Debug, Clone, Deserialize)]
struct TrashEntry {
    id: String,
    name: String,
    #[serde(default)]
    status: String,
}

/// One entry of `rbd ls --long`.
#[derive(Debug, Deserialize)]
struct LsEntry {
    image: String,
    size: u64,
}

/// A live image as read from the cluster.
#[derive(Debug, Clone)]
struct LiveImage {
    size: u64,
    features: Vec<String>,
    metadata: BTreeMap<String, String>,
    watchers: Vec<String>,
}

/// The value of an image's key in its pool's `unistor.index`: who owns it and what removing it
/// does. Written (before the image exists) by the create that makes it; read back with one call
/// per pool. Older agents wrote the bare volume name; such entries are read image by image.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexValue {
    /// `unistor.managed-by`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub managed_by: Option<String>,
    /// `unistor.volume`.
    pub volume: String,
    /// `unistor.deletion-policy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// `unistor.trash-retention-secs`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_secs: Option<u64>,
    /// The features the image was created with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
}

impl IndexValue {
    /// Parses a stored value: JSON, or an older agent's bare volume name.
    pub fn parse(bytes: &[u8]) -> Self {
        let text = String::from_utf8_lossy(bytes);
        if text.starts_with('{') {
            if let Ok(v) = serde_json::from_str(&text) {
                return v;
            }
        }
        Self {
            volume: text.into_owned(),
            ..Self::default()
        }
    }

    /// Whether it says everything a report needs (else the image itself must be read).
    pub fn complete(&self) -> bool {
        self.managed_by.is_some() && !self.features.is_empty()
    }

    /// The `unistor.*` metadata it stands for.
    fn metadata(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        if let Some(o) = &self.managed_by {
            m.insert(META_MANAGED_BY.to_string(), o.clone());
        }
        if !self.volume.is_empty() {
            m.insert(META_VOLUME.to_string(), self.volume.clone());
        }
        if let Some(p) = &self.policy {
            m.insert(META_POLICY.to_string(), p.clone());
        }
        if let Some(r) = self.retention_secs {
            m.insert(META_RETENTION.to_string(), r.to_string());
        }
        m
    }
}

/// Parses `rados listomapvals` output (keys, each followed by a hexdump of its value).
/// Keys here are image names (no newlines); values are read from the hexdump's hex columns.
pub fn parse_omap_dump(text: &str) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let mut out = BTreeMap::new();
    let mut lines = text.lines().peekable();
    while let Some(key) = lines.next() {
        if key.is_empty() {
            continue;
        }
        let header = lines
            .next()
            .ok_or_else(|| format!("key {key:?} has no value"))?;
        let len: usize = header
            .strip_prefix("value (")
            .and_then(|r| r.split_once(" bytes)"))
            .and_then(|(n, _)| n.parse().ok())
            .ok_or_else(|| format!("unexpected line {header:?} after key {key:?}"))?;
        let mut value = Vec::with_capacity(len);
        while let Some(line) = lines.peek() {
            if line.is_empty() {
                break;
            }
            let line = lines.next().unwrap_or_default();
            let mut tokens = line.split_whitespace();
            let _offset = tokens.next();
            for t in tokens {
                if t.starts_with('|') {
                    break;
                }
                let b = u8::from_str_radix(t, 16)
                    .map_err(|_| format!("bad hex {t:?} in the value of {key:?}"))?;
                value.push(b);
            }
        }
        if value.len() != len {
            return Err(format!(
                "the value of {key:?} has {} bytes, the dump said {len}",
                value.len()
            ));
        }
        out.insert(key.to_string(), value);
    }
    Ok(out)
}

/// Image reads of the sweep at once.
pub const SWEEP_PARALLEL: usize = 4;
/// The agent counts as busy with its own mutations while one runs and this long after.
pub const SWEEP_QUIET: Duration = Duration::from_secs(2);
/// For this long into a busy spell the sweep reads nothing: an apply gets the CPU (each sweep
/// read is two CLI processes), and what the agent mutates it knows anyway.
pub const SWEEP_BUSY_GRACE: Duration = Duration::from_secs(60);
/// After [`SWEEP_BUSY_GRACE`], while still busy, the sweep reads one image per this many ticks:
/// a steady stream of mutations can slow the sweep down, never stop it.
pub const SWEEP_BUSY_SLOWDOWN: u32 = 10;

/// Tuning of the agent's view and its sweep.
#[derive(Debug, Clone)]
pub struct ViewOptions {
    /// Images the sweep re-reads per second (two commands each).
    pub sweep_rate: f64,
    /// An image checked (or mutated by us) more recently than this is not re-read yet.
    pub sweep_min_age: Duration,
    /// The per-pool listings (index and trash) are re-read at least this often.
    pub pool_refresh: Duration,
    /// A report re-reads the cluster's status when it is older than this.
    pub status_max_age: Duration,
}

impl Default for ViewOptions {
    fn default() -> Self {
        Self {
            sweep_rate: 10.0,
            sweep_min_age: Duration::from_secs(30),
            pool_refresh: Duration::from_secs(30),
            status_max_age: Duration::from_secs(5),
        }
    }
}

/// The cluster, through its CLI.
#[derive(Debug)]
pub struct Ceph<R> {
    runner: R,
    /// cephx ids that must never be (re)issued: `admin` and the agent's own.
    protected_ids: BTreeSet<String>,
    /// Images examined at once while loading.
    load_concurrency: usize,
    /// What the agent knows of its images.
    view: Mutex<View>,
    /// The cluster's status, monitors, capacity and pools, as last read.
    cluster: tokio::sync::Mutex<Option<ClusterCache>>,
    /// Set once the view was loaded.
    loaded: tokio::sync::OnceCell<()>,
    /// The view's generation, for whoever pushes change notifications.
    generation: watch::Sender<u64>,
    /// CLI commands run, for the benchmark and tests.
    calls: AtomicU64,
    /// Mutations in flight (the sweep slows down meanwhile).
    mutating: AtomicUsize,
    /// When the last mutation ended.
    last_mutation: Mutex<Option<Instant>>,
    /// Each pool's index in memory, and the lock its flushes take (see [`crate::index`]).
    indexes: Mutex<HashMap<String, Arc<IndexCell>>>,
    /// Makes the batch keys this process opens unique.
    batch_prefix: String,
    options: ViewOptions,
}

/// One pool's index: `None` until read; changes are written by group-committed flushes.
#[derive(Debug, Default)]
struct IndexCell {
    state: Mutex<Option<PoolIndex>>,
    /// Held by the flush in progress (and while the index is first read).
    flush: tokio::sync::Mutex<()>,
}

impl IndexCell {
    fn is_read(&self) -> bool {
        self.state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    fn with<T>(&self, f: impl FnOnce(&mut PoolIndex) -> T) -> T {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(g.get_or_insert_with(PoolIndex::default))
    }
}

fn rbd() -> Invocation {
    Invocation::new(Tool::Rbd)
}

/// `--pool P --format json -- IMAGE` style tail for rbd image commands.
fn image_args(inv: Invocation, spec: &ImageSpec) -> Invocation {
    inv.arg("--pool")
        .arg(spec.pool.as_str())
        .arg("--")
        .arg(spec.image.as_str())
}

/// A pool's index entries whose names pass the allow-list (others were not written by unistor).
fn index_entries<'a>(
    pool: &'a PoolName,
    index: &'a BTreeMap<String, IndexValue>,
) -> impl Iterator<Item = (ImageSpec, &'a IndexValue)> + 'a {
    index.iter().filter_map(move |(name, idx)| {
        let image = ImageName::parse("image", name).ok()?;
        Some((
            ImageSpec {
                pool: pool.clone(),
                image,
            },
            idx,
        ))
    })
}

fn gone(e: &CephError) -> bool {
    matches!(e, CephError::Cli(c) if c.code() == Some(libc_enoent()))
}

impl<R: Runner> Ceph<R> {
    /// Operates the cluster through `runner`; `own_id` is the agent's cephx id.
    pub fn new(runner: R, own_id: Option<&str>) -> Self {
        Self::with_options(runner, own_id, ViewOptions::default())
    }

    /// As [`Ceph::new`], with the view's tuning.
    pub fn with_options(runner: R, own_id: Option<&str>, options: ViewOptions) -> Self {
        let mut protected_ids = BTreeSet::from(["admin".to_string()]);
        protected_ids.extend(own_id.map(str::to_string));
        Self {
            runner,
            protected_ids,
            load_concurrency: 8,
            view: Mutex::default(),
            cluster: tokio::sync::Mutex::default(),
            loaded: tokio::sync::OnceCell::new(),
            generation: watch::channel(0).0,
            calls: AtomicU64::new(0),
            mutating: AtomicUsize::new(0),
            last_mutation: Mutex::new(None),
            indexes: Mutex::default(),
            batch_prefix: format!(
                "{:x}",
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis())
            ),
            options,
        }
    }

    /// The runner (tests inspect fakes through it).
    pub fn runner(&self) -> &R {
        &self.runner
    }

    /// CLI commands run so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// The view's generation, as it changes.
    pub fn subscribe_generation(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn view(&self) -> std::sync::MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Updates the view; tells subscribers when a report changed.
    fn with_view<T>(&self, f: impl FnOnce(&mut View) -> T) -> T {
        let mut v = self.view();
        let before = v.generation();
        let out = f(&mut v);
        let after = v.generation();
        drop(v);
        if after != before {
            self.generation.send_replace(after);
        }
        out
    }

    async fn run(&self, inv: Invocation) -> Result<crate::runner::Output, CliError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        self.runner.run(inv).await
    }

    async fn json<T: DeserializeOwned>(&self, inv: Invocation) -> Result<T, CephError> {
        let command = inv.display();
        let out = self.run(inv).await?;
        serde_json::from_slice(&out.stdout).map_err(|source| CephError::Parse { command, source })
    }

    /// `rbd info`; `None` when the image does not exist (exit code ENOENT).
    async fn info(&self, spec: &ImageSpec) -> Result<Option<RbdInfo>, CephError> {
        let inv = image_args(rbd().args(["info", "--format", "json"]), spec);
        match self.json(inv).await {
            Ok(info) => Ok(Some(info)),
            Err(e) if gone(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn metadata(&self, spec: &ImageSpec) -> Result<BTreeMap<String, String>, CephError> {
        let inv = image_args(rbd().args(["image-meta", "list", "--format", "json"]), spec);
        let command = inv.display();
        let out = self.run(inv).await?;
        // `rbd image-meta list` prints nothing at all for an image without metadata.
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(BTreeMap::new());
        }
        serde_json::from_slice(&out.stdout).map_err(|source| CephError::Parse { command, source })
    }

    async fn watchers(&self, spec: &ImageSpec) -> Result<Vec<String>, CephError> {
        let inv = image_args(rbd().args(["status", "--format", "json"]), spec);
        let status: RbdStatus = self.json(inv).await?;
        Ok(status.watchers.into_iter().map(|w| w.address).collect())
    }

    /// Size, features and metadata (no watchers); `None` when the image is not live.
    async fn read(&self, spec: &ImageSpec) -> Result<Option<LiveImage>, CephError> {
        let Some(info) = self.info(spec).await? else {
            return Ok(None);
        };
        // The image can vanish between the commands (removed by someone else): that is "not
        // there", not a failure.
        let metadata = match self.metadata(spec).await {
            Err(e) if gone(&e) => return Ok(None),
            other => other?,
        };
        Ok(Some(LiveImage {
            size: info.size,
            features: info.features,
            metadata,
            watchers: vec![],
        }))
    }

    /// As [`Ceph::read`], and the watchers too (for decisions that depend on them).
    async fn live(&self, spec: &ImageSpec) -> Result<Option<LiveImage>, CephError> {
        let Some(mut img) = self.read(spec).await? else {
            return Ok(None);
        };
        // After the metadata, not beside it: `rbd image-meta list` may open the image read-write
        // for a moment, and a concurrent `rbd status` would report our own process as a watcher.
        img.watchers = match self.watchers(spec).await {
            Err(e) if gone(&e) => return Ok(None),
            other => other?,
        };
        Ok(Some(img))
    }

    async fn trash(&self, pool: &PoolName) -> Result<Vec<TrashEntry>, CephError> {
        let inv = rbd()
            .args(["trash", "ls", "--long", "--format", "json", "--"])
            .arg(pool.as_str());
        self.json(inv).await
    }

    /// Reads a pool's unistor index, one command.
    async fn read_index(&self, pool: &PoolName) -> Result<PoolIndex, CephError> {
        let inv = Invocation::new(Tool::Rados).args([
            "--pool",
            pool.as_str(),
            "listomapvals",
            "--",
            INDEX_OBJECT,
        ]);
        let command = inv.display();
        let listing = match self.run(inv).await {
            Ok(out) => {
                let text = String::from_utf8_lossy(&out.stdout);
                parse_omap_dump(&text).map_err(|e| CephError::Parse {
                    command,
                    source: serde::de::Error::custom(e),
                })?
            }
            // `rados` exits 1 for every failure; the index object not existing yet is the one
            // failure that means "empty", and only stderr tells it apart.
            Err(CliError::Failed { stderr, .. })
                if stderr.contains("(2) No such file or directory") =>
            {
                BTreeMap::new()
            }
            Err(e) => return Err(e.into()),
        };
        Ok(PoolIndex::from_listing(listing, &self.batch_prefix))
    }

    fn index_cell(&self, pool: &PoolName) -> Arc<IndexCell> {
        self.indexes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(pool.to_string())
            .or_default()
            .clone()
    }

    /// A pool's index cell, read from the cluster the first time.
    async fn index_of(&self, pool: &PoolName) -> Result<Arc<IndexCell>, CephError> {
        let cell = self.index_cell(pool);
        if !cell.is_read() {
            let _flush = cell.flush.lock().await;
            if !cell.is_read() {
                let ix = self.read_index(pool).await?;
                *cell.state.lock().unwrap_or_else(|e| e.into_inner()) = Some(ix);
            }
        }
        Ok(cell)
    }

    /// An image's index entry, as the agent holds it.
    async fn index_entry(&self, spec: &ImageSpec) -> Result<Option<IndexValue>, CephError> {
        let cell = self.index_of(&spec.pool).await?;
        Ok(cell.with(|ix| ix.get(spec.image.as_str()).cloned()))
    }

    /// Sets (`Some`) or removes (`None`) an image's index entry and returns once it is written.
    /// Concurrent changes are group-committed: whoever takes the flush lock writes every key
    /// changed so far, and the others find their change already written.
    async fn index_change(
        &self,
        spec: &ImageSpec,
        value: Option<&IndexValue>,
    ) -> Result<(), CephError> {
        let cell = self.index_of(&spec.pool).await?;
        let version = cell.with(|ix| match value {
            Some(v) => ix.set(spec.image.as_str(), v.clone()),
            None => ix.remove(spec.image.as_str()),
        });
        let _flush = cell.flush.lock().await;
        let (reached, writes) = cell.with(|ix| {
            if ix.durable(version) {
                (version, vec![])
            } else {
                ix.take_dirty()
            }
        });
        if writes.is_empty() {
            return Ok(());
        }
        let written = futures::future::try_join_all(
            writes.iter().map(|w| self.write_index_key(&spec.pool, w)),
        )
        .await;
        match written {
            Ok(_) => {
                cell.with(|ix| ix.flushed(reached));
                Ok(())
            }
            Err(e) => {
                cell.with(|ix| ix.flush_failed(&writes));
                Err(e)
            }
        }
    }

    async fn write_index_key(&self, pool: &PoolName, w: &KeyWrite) -> Result<(), CephError> {
        let base = Invocation::new(Tool::Rados).args(["--pool", pool.as_str()]);
        let inv = match &w.value {
            Some(v) => base
                .args(["setomapval", "--", INDEX_OBJECT, w.key.as_str()])
                .arg(v),
            None => base.args(["rmomapkey", "--", INDEX_OBJECT, w.key.as_str()]),
        };
        match self.run(inv).await {
            Ok(_) => Ok(()),
            Err(CliError::Failed { stderr, .. })
                if w.value.is_none() && stderr.contains("(2) No such file or directory") =>
            {
                Ok(())
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn set_metadata(
        &self,
        spec: &ImageSpec,
        key: &str,
        value: &str,
    ) -> Result<(), CephError> {
        let inv = image_args(rbd().args(["image-meta", "set"]), spec).args([key, value]);
        self.run(inv).await?;
        Ok(())
    }

    /// A live image's status; the policy comes from the image's own metadata (older agents wrote
    /// it there) or else the index entry.
    fn live_status(spec: &ImageSpec, img: &LiveImage, idx: Option<&IndexValue>) -> ImageStatus {
        let mut metadata = unistor_metadata(img.metadata.clone());
        if let Some(idx) = idx {
            for (k, v) in idx.metadata() {
                if k == META_POLICY || k == META_RETENTION {
                    metadata.entry(k).or_insert(v);
                }
            }
        }
        ImageStatus {
            pool: spec.pool.to_string(),
            image: spec.image.to_string(),
            state: ImageState::Live,
            size_bytes: img.size,
            features: img.features.clone(),
            watchers: if img.watchers.is_empty() {
                None
            } else {
                Some(img.watchers.clone())
            },
            metadata,
        }
    }

    /// The status of an image that is not live: in the trash, or missing.
    fn gone_status(spec: &ImageSpec, trash: &[TrashEntry]) -> ImageStatus {
        let state = match trash.iter().find(|t| t.name == spec.image.as_str()) {
            Some(t) => ImageState::Trashed {
                trash_id: t.id.clone(),
                trash_status: t.status.clone(),
            },
            None => ImageState::Missing,
        };
        ImageStatus {
            state,
            ..crate::view::unread(spec, BTreeMap::new())
        }
    }

    /// Requires `img` to carry `owner`'s metadata.
    fn check_owner(spec: &ImageSpec, img: &LiveImage, owner: &Owner) -> Result<(), CephError> {
        let not_owned = |why: String| CephError::NotOwned {
            spec: spec.to_string(),
            volume: owner.volume.to_string(),
            why,
        };
        match (
            img.metadata.get(META_MANAGED_BY),
            img.metadata.get(META_VOLUME),
        ) {
            (None, _) => Err(not_owned(format!(
                "it has no {META_MANAGED_BY} metadata (not created by unistor)"
            ))),
            (Some(m), _) if m != owner.managed_by.as_str() => Err(not_owned(format!(
                "{META_MANAGED_BY} is {m:?}, not {:?}",
                owner.managed_by.as_str()
            ))),
            (_, Some(v)) if v == owner.volume.as_str() => Ok(()),
            (_, v) => Err(not_owned(format!(
                "{META_VOLUME} is {:?}",
                v.map(String::as_str).unwrap_or("")
            ))),
        }
    }

    /// Pools with the rbd application whose names unistor accepts.
    /// The set of rbd pools as the cluster part of a report last read it, when younger than
    /// [`ViewOptions::pool_refresh`] (it follows the OSD map's epoch); else read now.
    async fn rbd_pools(&self) -> Result<Vec<PoolName>, CephError> {
        let cached = self
            .cluster
            .lock()
            .await
            .as_ref()
            .filter(|c| c.at.elapsed() < self.options.pool_refresh)
            .map(|c| c.rbd_pools.clone());
        let names = match cached {
            Some(names) => names,
            None => self.read_rbd_pools().await?,
        };
        // Pools created outside unistor may have names unistor would refuse; skip those.
        Ok(names
            .iter()
            .filter_map(|n| PoolName::parse("pool", n).ok())
            .collect())
    }

    /// Pools with the rbd application (`ceph osd pool ls detail`).
    async fn read_rbd_pools(&self) -> Result<BTreeSet<String>, CephError> {
        let pools: Vec<PoolDetailJson> = self
            .json(
                Invocation::new(Tool::Ceph)
                    .args(["osd", "pool", "ls", "detail", "--format", "json"]),
            )
            .await?;
        Ok(pools
            .into_iter()
            .filter(|p| p.application_metadata.contains_key("rbd"))
            .map(|p| p.pool_name)
            .collect())
    }

    /// `rbd ls --long` of a pool. It opens every image it lists, so an image removed between its
    /// listing and its opening fails the whole command with ENOENT: that race (someone else's
    /// removal, not a state) is retried a few times before it counts as a failure.
    async fn ls_long(&self, pool: &PoolName) -> Result<Vec<LsEntry>, CephError> {
        let mut attempt = 0;
        loop {
            let inv = rbd()
                .args(["ls", "--long", "--format", "json", "--"])
                .arg(pool.as_str());
            match self.json(inv).await {
                Err(e) if gone(&e) && attempt < 4 => {
                    attempt += 1;
                    tracing::debug!(pool = %pool, attempt, "An image went while rbd ls --long listed it; again.");
                }
                other => return other,
            }
        }
    }

    /// Reads every pool's index and trash, and the sizes of its live images (`rbd ls --long`,
    /// one command per pool), into the view; entries written by older agents (without owner and
    /// features) are read image by image. Runs once; later calls wait for the first.
    pub async fn load(&self) -> Result<(), CephError> {
        self.loaded
            .get_or_try_init(|| async {
                let started = Instant::now();
                for pool in self.rbd_pools().await? {
                    let ix = self.read_index(&pool).await?;
                    let index = ix.entries();
                    *self
                        .index_cell(&pool)
                        .state
                        .lock()
                        .unwrap_or_else(|e| e.into_inner()) = Some(ix);
                    if index.is_empty() {
                        continue;
                    }
                    let trash = self.trash(&pool).await?;
                    let ls = self.ls_long(&pool).await?;
                    let sizes: BTreeMap<&str, u64> =
                        ls.iter().map(|e| (e.image.as_str(), e.size)).collect();
                    let mut legacy = vec![];
                    for (spec, idx) in index_entries(&pool, &index) {
                        let status = match sizes.get(spec.image.as_str()) {
                            Some(_) if !idx.complete() => {
                                legacy.push(spec);
                                continue;
                            }
                            Some(size) => ImageStatus {
                                state: ImageState::Live,
                                size_bytes: *size,
                                features: idx.features.clone(),
                                metadata: idx.metadata(),
                                ..crate::view::unread(&spec, BTreeMap::new())
                            },
                            None => Self::gone_status(&spec, &trash),
                        };
                        // Known from listings only: the sweep reads each image itself later.
                        self.with_view(|v| v.add_unchecked(&spec, status));
                    }
                    let found: Vec<(ImageSpec, Result<Option<LiveImage>, CephError>)> =
                        stream::iter(legacy)
                            .map(|spec| async move {
                                let r = self.read(&spec).await;
                                (spec, r)
                            })
                            .buffered(self.load_concurrency)
                            .collect()
                            .await;
                    let now = Instant::now();
                    for (spec, r) in found {
                        let status = match r? {
                            Some(img) => {
                                Self::live_status(&spec, &img, index.get(spec.image.as_str()))
                            }
                            None => Self::gone_status(&spec, &trash),
                        };
                        self.with_view(|v| v.set(&spec, status, now));
                    }
                }
                // A loaded view is at generation 1 at least, even empty: 0 means "nothing read
                // yet" to a controller, which could otherwise never ask for changes since it.
                self.with_view(|v| {
                    if v.generation() == 0 {
                        v.bump();
                    }
                });
                tracing::info!(
                    images = self.view().len(),
                    commands = self.calls(),
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "Loaded the images unistor manages."
                );
                Ok::<(), CephError>(())
            })
            .await?;
        Ok(())
    }

    /// The cluster's status, monitors, capacity and pools, re-read when older than `max_age`:
    /// `ceph status` and `ceph df` each time; `ceph mon dump` and `ceph osd pool ls detail` only
    /// when the status shows a new monitor or OSD map epoch (two commands in a steady state, four
    /// the first time). Health changes raise the view's generation.
    async fn cluster(&self, max_age: Duration) -> Result<CephReport, CephError> {
        let mut cached = self.cluster.lock().await;
        if let Some(c) = cached.as_ref() {
            if c.at.elapsed() < max_age {
                return Ok(c.report.clone());
            }
        }
        let ceph = |args: &[&str]| Invocation::new(Tool::Ceph).args(args.iter().copied());
        let (status, df) = tokio::try_join!(
            self.json::<CephStatusJson>(ceph(&["status", "--format", "json"])),
            self.json::<DfJson>(ceph(&["df", "--format", "json"])),
        )?;
        let old = cached.as_ref();
        let (monmap_epoch, osdmap_epoch) = (status.monmap.epoch, status.osdmap.epoch);
        let mons = async {
            match old.filter(|c| monmap_epoch != 0 && c.monmap_epoch == monmap_epoch) {
                Some(c) => Ok(c.report.monitors.clone()),
                None => self
                    .json::<MonDumpJson>(ceph(&["mon", "dump", "--format", "json"]))
                    .await
                    .map(|m| m.monitors()),
            }
        };
        let pools = async {
            match old.filter(|c| osdmap_epoch != 0 && c.osdmap_epoch == osdmap_epoch) {
                Some(c) => Ok(c.rbd_pools.clone()),
                None => self.read_rbd_pools().await,
            }
        };
        let (monitors, rbd_pools) = tokio::try_join!(mons, pools)?;
        let report = CephReport {
            fsid: status.fsid,
            health: CephHealth {
                status: status.health.status,
                checks: status
                    .health
                    .checks
                    .into_iter()
                    .map(|(k, v)| (k, v.summary.message))
                    .collect(),
            },
            monitors,
            capacity: Capacity {
                total_bytes: df.stats.total_bytes,
                used_bytes: df.stats.total_used_raw_bytes,
                avail_bytes: df.stats.total_avail_bytes,
            },
            pools: df
                .pools
                .iter()
                .map(|p| PoolInfo {
                    name: p.name.clone(),
                    id: p.id,
                    rbd_enabled: rbd_pools.contains(p.name.as_str()),
                    stored_bytes: p.stats.stored,
                    max_avail_bytes: p.stats.max_avail,
                })
                .collect(),
            images: vec![],
        };
        // What a controller reacts to: health, monitors, the pool set; not the byte counters.
        let shape = |r: &CephReport| {
            (
                r.health.clone(),
                r.monitors.clone(),
                r.pools
                    .iter()
                    .map(|p| (p.name.clone(), p.rbd_enabled))
                    .collect::<Vec<_>>(),
            )
        };
        if cached
            .as_ref()
            .is_some_and(|old| shape(&old.report) != shape(&report))
        {
            self.with_view(|v| v.bump());
        }
        *cached = Some(ClusterCache {
            at: Instant::now(),
            report: report.clone(),
            monmap_epoch,
            osdmap_epoch,
            rbd_pools,
        });
        Ok(report)
    }

    /// The whole report: the cluster (read now) and every image unistor manages, from the view.
    /// Two to four commands (see [`Ceph::cluster`]), whatever the number of images.
    pub async fn report(&self) -> Result<CephReport, CephError> {
        self.load().await?;
        let mut r = self.cluster(Duration::ZERO).await?;
        r.images = self.view().all();
        Ok(r)
    }

    /// What changed since generation `since`, one page (see [`View::changes`]); the cluster part
    /// is at most [`ViewOptions::status_max_age`] old.
    pub async fn changes(
        &self,
        since: u64,
        after: Option<&str>,
        limit: usize,
    ) -> Result<CephChanges, CephError> {
        self.load().await?;
        let cluster = self.cluster(self.options.status_max_age).await?;
        let c = self.view().changes(since, after, limit);
        Ok(CephChanges {
            generation: c.generation,
            full: c.full,
            more: c.more,
            cluster,
            images: c.images,
            removed: c.removed,
        })
    }

    /// Re-reads the cluster's status when it is due (the report loop calls this).
    pub async fn refresh_cluster(&self, max_age: Duration) -> Result<(), CephError> {
        self.cluster(max_age).await.map(|_| ())
    }

    /// Watchers of `specs`, looked up now.
    pub async fn image_watchers(
        &self,
        specs: &[ImageSpec],
    ) -> Result<Vec<ImageWatchers>, CephError> {
        let mut out = vec![];
        for spec in specs {
            let watchers = match self.watchers(spec).await {
                Err(e) if gone(&e) => vec![],
                other => other?,
            };
            out.push(ImageWatchers {
                pool: spec.pool.to_string(),
                image: spec.image.to_string(),
                watchers,
                clients: vec![],
            });
        }
        // Who each watcher is: SNAP's own watch on an attached volume is expected, anybody
        // else's means the image is in use. The monitors' sessions name each client's entity.
        if out.iter().any(|w| !w.watchers.is_empty()) {
            match self.client_entities().await {
                Ok(entities) => {
                    for w in &mut out {
                        w.clients = w
                            .watchers
                            .iter()
                            .map(|a| entities.get(bare_addr(a)).cloned().unwrap_or_default())
                            .collect();
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %protocol::error::chain(&e), "Cannot tell who the watchers are.");
                }
            }
        }
        Ok(out)
    }

    /// Client address (`ip:port/nonce`) to cephx entity, from every monitor's sessions
    /// (`ceph tell mon.<name> sessions`, one command per monitor).
    async fn client_entities(&self) -> Result<HashMap<String, String>, CephError> {
        let mons = self.cluster(self.options.status_max_age).await?.monitors;
        let reads = mons.iter().map(|m| {
            self.json::<Vec<MonSessionJson>>(Invocation::new(Tool::Ceph).args([
                "tell".to_string(),
                format!("mon.{}", m.name),
                "sessions".into(),
                "--format".into(),
                "json".into(),
            ]))
        });
        let mut out = HashMap::new();
        for sessions in futures::future::join_all(reads).await {
            for s in sessions? {
                if s.entity_name.is_empty() {
                    continue;
                }
                for a in s.addrs.addrvec {
                    out.insert(format!("{}/{}", a.addr, a.nonce), s.entity_name.clone());
                }
            }
        }
        Ok(out)
    }

    /// Runs `f` as a mutation of `spec`: sweeps reading the image meanwhile are dropped.
    async fn mutation<T>(
        &self,
        spec: &ImageSpec,
        f: impl std::future::Future<Output = Result<T, CephError>>,
    ) -> Result<T, CephError> {
        /// Ends the mutation however its future ends (completed, failed or dropped).
        struct Running<'a, R> {
            ceph: &'a Ceph<R>,
            spec: &'a ImageSpec,
        }
        impl<R> Drop for Running<'_, R> {
            fn drop(&mut self) {
                self.ceph.mutating.fetch_sub(1, Ordering::Relaxed);
                *self
                    .ceph
                    .last_mutation
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
                self.ceph
                    .view
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .end(self.spec);
            }
        }
        self.view().begin(spec);
        self.mutating.fetch_add(1, Ordering::Relaxed);
        let _running = Running { ceph: self, spec };
        f.await
    }

    /// The deletion policy the view holds for a live image (from its index entry, or keys an
    /// older agent left on the image).
    fn known_policy(&self, spec: &ImageSpec) -> Option<IndexValue> {
        let v = self.view();
        let m = &v.get(spec)?.metadata;
        Some(IndexValue {
            policy: m.get(META_POLICY).cloned(),
            retention_secs: m.get(META_RETENTION).and_then(|r| r.parse().ok()),
            ..IndexValue::default()
        })
    }

    /// Records what a mutation left and returns it.
    fn record(&self, spec: &ImageSpec, status: ImageStatus) -> ImageStatus {
        self.with_view(|v| v.set(spec, status.clone(), Instant::now()));
        status
    }

    /// Re-reads one image and records it (after mutations whose result is not known otherwise).
    async fn reread(&self, spec: &ImageSpec) -> Result<ImageStatus, CephError> {
        let status = match self.read(spec).await? {
            Some(img) => {
                let idx = self.index_entry(spec).await?;
                Self::live_status(spec, &img, idx.as_ref())
            }
            None => Self::gone_status(spec, &self.trash(&spec.pool).await?),
        };
        Ok(self.record(spec, status))
    }

    /// Creates an owned image, or succeeds when the same image already exists.
    ///
    /// An image the view does not know costs two commands: the index entry (intent, owner,
    /// policy), then `rbd import` of an empty stream that carries the ownership keys. One the view knows as
    /// live is read (it may have changed behind our back) and compared.
    pub async fn create_image(
        &self,
        spec: &ImageSpec,
        size: u64,
        features: &[String],
        owner: &Owner,
        policy: Option<&Policy>,
    ) -> Result<ImageStatus, CephError> {
        check_size("size_bytes", size)?;
        let features = check_features(features)?;
        self.load().await?;
        let known = self.view().get(spec).cloned();
        let value = IndexValue {
            managed_by: Some(owner.managed_by.to_string()),
            volume: owner.volume.to_string(),
            policy: policy.map(|p| p.deletion.as_str().to_string()),
            retention_secs: policy.map(|p| p.retention_secs),
            features: features.clone(),
        };
        self.mutation(spec, async {
            // An image the view knows as live is looked at first; if it is gone after all
            // (trashed or removed behind our back), it is created anew like any other.
            let mut found = None;
            if known.as_ref().is_some_and(|k| k.state == ImageState::Live) {
                found = self.live(spec).await?;
            }
            if found.is_none() {
                // Intent first: the index entry makes an interrupted create recognisable.
                self.index_change(spec, Some(&value)).await?;
                // One process makes the image and its ownership keys: `rbd import` of an
                // empty export-format-2 stream (see `import_stream`).
                let stream = crate::import_stream::empty_image(
                    size,
                    [
                        (META_MANAGED_BY, owner.managed_by.as_str()),
                        (META_VOLUME, owner.volume.as_str()),
                    ],
                );
                let inv = rbd()
                    .args(["import", "--export-format", "2", "--no-progress"])
                    .args(["--image-feature", &features.join(",")])
                    .args(["--dest-pool", spec.pool.as_str(), "--", "-"])
                    .arg(spec.image.as_str())
                    .stdin(stream);
                match self.run(inv).await {
                    Ok(_) => {
                        let img = LiveImage {
                            size,
                            features: features.clone(),
                            metadata: BTreeMap::from([
                                (META_MANAGED_BY.to_string(), owner.managed_by.to_string()),
                                (META_VOLUME.to_string(), owner.volume.to_string()),
                            ]),
                            watchers: vec![],
                        };
                        return Ok(self.record(spec, Self::live_status(spec, &img, Some(&value))));
                    }
                    Err(e) if e.code() == Some(libc_eexist()) => {
                        // It existed after all: ours from an interrupted create, or someone
                        // else's. Decide below by looking at it.
                        found = self.live(spec).await?;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            let Some(img) = found else {
                return Err(CephError::Conflict {
                    spec: spec.to_string(),
                    diff: "another client keeps creating and removing it".into(),
                });
            };
            // Ours only if the index named it before this create wrote its entry.
            let img = if known.is_some() {
                self.adopt_interrupted(spec, img, owner).await?
            } else {
                img
            };
            if let Err(e) = Self::check_owner(spec, &img, owner) {
                if known.is_none() {
                    // The entry this create wrote does not make a stranger's image ours.
                    self.index_change(spec, None).await?;
                }
                return Err(e);
            }
            let mut diff = vec![];
            if img.size != size {
                diff.push(format!("size is {} bytes, wanted {size}", img.size));
            }
            let have: BTreeSet<&String> = img.features.iter().collect();
            let want: BTreeSet<&String> = features.iter().collect();
            if have != want {
                diff.push(format!(
                    "features are {:?}, wanted {:?}",
                    img.features, features
                ));
            }
            if !diff.is_empty() {
                return Err(CephError::Conflict {
                    spec: spec.to_string(),
                    diff: diff.join("; "),
                });
            }
            let idx = self.write_policy(spec, &img, &value, policy).await?;
            Ok(self.record(spec, Self::live_status(spec, &img, Some(&idx))))
        })
        .await
    }

    /// Makes the index entry (and any policy keys an older agent left on the image) say
    /// `policy`; returns the entry in force.
    async fn write_policy(
        &self,
        spec: &ImageSpec,
        img: &LiveImage,
        want: &IndexValue,
        policy: Option<&Policy>,
    ) -> Result<IndexValue, CephError> {
        let have = self.index_entry(spec).await?.unwrap_or_default();
        let Some(p) = policy else { return Ok(have) };
        if have != *want {
            self.index_change(spec, Some(want)).await?;
        }
        let retention = p.retention_secs.to_string();
        for (k, v) in [
            (META_POLICY, p.deletion.as_str()),
            (META_RETENTION, retention.as_str()),
        ] {
            if img.metadata.get(k).is_some_and(|old| old != v) {
                self.set_metadata(spec, k, v).await?;
            }
        }
        Ok(want.clone())
    }

    /// Completes a create that was interrupted between `rbd create` and the metadata. Only for
    /// images the index named before this create (the caller checks).
    async fn adopt_interrupted(
        &self,
        spec: &ImageSpec,
        img: LiveImage,
        owner: &Owner,
    ) -> Result<LiveImage, CephError> {
        if !img.metadata.is_empty() || !img.watchers.is_empty() {
            return Ok(img);
        }
        tracing::warn!(image = %spec, volume = %owner.volume, "Adopting an image whose creation was interrupted.");
        self.set_metadata(spec, META_MANAGED_BY, owner.managed_by.as_str())
            .await?;
        self.set_metadata(spec, META_VOLUME, owner.volume.as_str())
            .await?;
        Ok(self.live(spec).await?.unwrap_or(img))
    }

    async fn owned_live(&self, spec: &ImageSpec, owner: &Owner) -> Result<LiveImage, CephError> {
        let img = self.live(spec).await?.ok_or_else(|| CephError::NotFound {
            spec: spec.to_string(),
            hint: String::new(),
        })?;
        Self::check_owner(spec, &img, owner)?;
        Ok(img)
    }

    /// Grows an owned image; equal size is a no-op; smaller is refused.
    pub async fn grow_image(
        &self,
        spec: &ImageSpec,
        size: u64,
        owner: &Owner,
    ) -> Result<ImageStatus, CephError> {
        check_size("size_bytes", size)?;
        self.load().await?;
        self.mutation(spec, async {
            let mut img = self.owned_live(spec, owner).await?;
            if size < img.size {
                return Err(CephError::Shrink {
                    spec: spec.to_string(),
                    current: img.size,
                    requested: size,
                });
            }
            if size > img.size {
                // No --allow-shrink: rbd itself refuses to shrink too.
                let inv = image_args(
                    rbd()
                        .args(["resize", "--no-progress", "--size"])
                        .arg(format!("{size}B")),
                    spec,
                );
                self.run(inv).await?;
                img.size = size;
            }
            let idx = self.known_policy(spec);
            Ok(self.record(spec, Self::live_status(spec, &img, idx.as_ref())))
        })
        .await
    }

    /// Moves an owned, unused image to the trash, protected for `retain_secs`.
    pub async fn trash_image(
        &self,
        spec: &ImageSpec,
        retain_secs: u64,
        owner: &Owner,
    ) -> Result<ImageStatus, CephError> {
        self.load().await?;
        self.mutation(spec, async {
            match self.live(spec).await? {
                Some(img) => {
                    Self::check_owner(spec, &img, owner)?;
                    self.refuse_in_use(spec, &img).await?;
                    let inv = image_args(
                        rbd()
                            .args(["trash", "mv", "--expires-at"])
                            .arg(format!("{retain_secs} seconds")),
                        spec,
                    );
                    self.run(inv).await?;
                }
                None => {
                    // Already trashed (by us, as the index says) is success; anything else is not.
                    let trash = self.trash(&spec.pool).await?;
                    let ours = self.index_entry(spec).await?.is_some();
                    if !(ours && trash.iter().any(|t| t.name == spec.image.as_str())) {
                        return Err(CephError::NotFound {
                            spec: spec.to_string(),
                            hint: String::new(),
                        });
                    }
                }
            }
            let trash = self.trash(&spec.pool).await?;
            Ok(self.record(spec, Self::gone_status(spec, &trash)))
        })
        .await
    }

    /// Restores an image unistor manages from the trash. A live owned image is success.
    pub async fn restore_image(&self, spec: &ImageSpec) -> Result<ImageStatus, CephError> {
        self.load().await?;
        self.mutation(spec, async {
            if self.index_entry(spec).await?.is_none() {
                return Err(CephError::NotOwned {
                    spec: spec.to_string(),
                    volume: String::new(),
                    why: format!("it is not in the pool's {INDEX_OBJECT}"),
                });
            }
            if self.info(spec).await?.is_some() {
                return self.reread(spec).await;
            }
            let trash = self.trash(&spec.pool).await?;
            let entries: Vec<&TrashEntry> = trash
                .iter()
                .filter(|t| t.name == spec.image.as_str())
                .collect();
            let entry = match entries.as_slice() {
                [] => {
                    return Err(CephError::NotFound {
                        spec: spec.to_string(),
                        hint: " (neither live nor in the trash)".into(),
                    })
                }
                [one] => *one,
                many => {
                    return Err(CephError::Conflict {
                        spec: spec.to_string(),
                        diff: format!("{} trash entries carry this name", many.len()),
                    })
                }
            };
            protocol::names::check_trash_id("trash_id", &entry.id)?;
            let inv = rbd()
                .args(["trash", "restore", "--pool", spec.pool.as_str(), "--"])
                .arg(&entry.id);
            self.run(inv).await?;
            self.reread(spec).await
        })
        .await
    }

    /// Deletes an owned image that has no watchers. Already gone is success.
    pub async fn delete_image(&self, spec: &ImageSpec, owner: &Owner) -> Result<(), CephError> {
        self.load().await?;
        self.mutation(spec, async {
            match self.live(spec).await? {
                Some(img) => {
                    Self::check_owner(spec, &img, owner)?;
                    self.refuse_in_use(spec, &img).await?;
                    let inv = image_args(rbd().args(["rm", "--no-progress"]), spec);
                    self.run(inv).await?;
                }
                None => {
                    let trash = self.trash(&spec.pool).await?;
                    if trash.iter().any(|t| t.name == spec.image.as_str()) {
                        return Err(CephError::NotFound {
                            spec: spec.to_string(),
                            hint: " live: it is in the trash; restore it first or let it expire"
                                .into(),
                        });
                    }
                }
            }
            self.index_change(spec, None).await?;
            self.with_view(|v| v.remove(spec));
            Ok(())
        })
        .await
    }

    /// Refuses when the image has watchers. A watcher seen once is looked at twice more: any `rbd`
    /// command that opens an image shows up as a watcher for a few milliseconds, while a real user
    /// (SNAP's librbd, a mapped device) keeps its watch. Refusing is always the safe side.
    async fn refuse_in_use(&self, spec: &ImageSpec, img: &LiveImage) -> Result<(), CephError> {
        let mut watchers = img.watchers.clone();
        for _ in 0..2 {
            if watchers.is_empty() {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
            watchers = self.watchers(spec).await?;
        }
        if watchers.is_empty() {
            return Ok(());
        }
        Err(CephError::InUse {
            spec: spec.to_string(),
            watchers,
        })
    }

    /// One visit of the sweep: re-reads the image least recently checked (if one is due),
    /// records what it finds unless a mutation ran meanwhile. Returns whether a report changed,
    /// `None` when nothing was due.
    pub async fn sweep_one(&self) -> Result<Option<bool>, CephError> {
        let older_than = Instant::now()
            .checked_sub(self.options.sweep_min_age)
            .unwrap_or_else(Instant::now);
        let Some((spec, ticket)) = self.view().next_to_sweep(older_than) else {
            return Ok(None);
        };
        let status = match self.read(&spec).await? {
            Some(img) => {
                // The policy of entries without it on the image comes from the index: as the
                // view knows it, or read when the view knew the image only as trashed or missing
                // (restored behind our back), whose status carries no policy.
                let was_live = self
                    .view()
                    .get(&spec)
                    .is_some_and(|s| s.state == ImageState::Live);
                let idx = if was_live {
                    self.known_policy(&spec)
                } else {
                    self.index_entry(&spec).await?
                };
                Self::live_status(&spec, &img, idx.as_ref())
            }
            None => Self::gone_status(&spec, &self.trash(&spec.pool).await?),
        };
        let changed = self.with_view(|v| v.apply_sweep(&spec, ticket, status));
        if changed {
            tracing::info!(image = %spec, "The sweep found an image changed behind unistor's back.");
        }
        Ok(Some(changed))
    }

    /// Re-reads the per-pool listings (index and trash, two commands per pool): images added to
    /// or removed from an index elsewhere, and trash entries that came or went.
    pub async fn refresh_pools(&self) -> Result<(), CephError> {
        for pool in self.rbd_pools().await? {
            // Read under the flush lock, so that no index write is half-way meanwhile; the
            // agent's own changes not written yet win over the listing.
            let cell = self.index_cell(&pool);
            let index = {
                let _flush = cell.flush.lock().await;
                let fresh = self.read_index(&pool).await?;
                let mut st = cell.state.lock().unwrap_or_else(|e| e.into_inner());
                if !st.as_ref().is_some_and(PoolIndex::has_dirty) {
                    *st = Some(fresh);
                }
                st.as_ref().map(PoolIndex::entries).unwrap_or_default()
            };
            let known: Vec<ImageSpec> = self.view().in_pool(pool.as_str()).cloned().collect();
            if index.is_empty() && known.is_empty() {
                continue;
            }
            let trash = self.trash(&pool).await?;
            self.with_view(|v| {
                for spec in &known {
                    if !index.contains_key(spec.image.as_str()) {
                        v.remove(spec);
                    }
                }
                for (spec, idx) in index_entries(&pool, &index) {
                    match v.get(&spec).map(|s| s.state.clone()) {
                        None => {
                            v.add_unchecked(&spec, crate::view::unread(&spec, idx.metadata()));
                        }
                        // Trashed or restored behind our back: the trash listing says so now.
                        Some(state) => {
                            let in_trash = trash.iter().any(|t| t.name == spec.image.as_str());
                            let said_trashed = matches!(state, ImageState::Trashed { .. });
                            if in_trash != said_trashed || state == ImageState::Missing {
                                v.mark_unchecked(&spec);
                            }
                        }
                    }
                }
            });
        }
        Ok(())
    }

    /// Whether the agent's own mutations are running or ran within [`SWEEP_QUIET`].
    fn busy(&self) -> bool {
        self.mutating.load(Ordering::Relaxed) > 0
            || self
                .last_mutation
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some_and(|t| t.elapsed() < SWEEP_QUIET)
    }

    /// The sweep, forever: pool listings every [`ViewOptions::pool_refresh`], and one image
    /// every `1 / sweep_rate` seconds (up to [`SWEEP_PARALLEL`] reads at once, so that slow
    /// commands do not lower the rate). While the agent is [busy](Self::busy) with its own
    /// mutations, image reads pause for [`SWEEP_BUSY_GRACE`], then go on
    /// [`SWEEP_BUSY_SLOWDOWN`] times slower: the agent's own work
    /// comes first, and what it mutates it knows. It never holds a lock that reports or
    /// mutations wait for.
    pub async fn sweep_loop(&self) {
        while let Err(e) = self.load().await {
            tracing::warn!(error = %protocol::error::chain(&e), "Loading the images failed; retrying.");
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
        let pools = async {
            loop {
                tokio::time::sleep(self.options.pool_refresh).await;
                if let Err(e) = self.refresh_pools().await {
                    tracing::warn!(error = %protocol::error::chain(&e), "Sweep: pool listings failed.");
                }
            }
        };
        let images = async {
            let pause = Duration::from_secs_f64(1.0 / self.options.sweep_rate.max(0.01));
            let mut tick = tokio::time::interval(pause);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut reads = futures::stream::FuturesUnordered::new();
            let mut held_back = 0;
            let mut busy_since: Option<Instant> = None;
            loop {
                tokio::select! {
                    _ = tick.tick() => {
                        let busy = self.busy();
                        busy_since = if busy { busy_since.or(Some(Instant::now())) } else { None };
                        if busy_since.is_some_and(|t| t.elapsed() < SWEEP_BUSY_GRACE) {
                            continue;
                        }
                        if busy && held_back + 1 < SWEEP_BUSY_SLOWDOWN {
                            held_back += 1;
                            continue;
                        }
                        held_back = 0;
                        if reads.len() < SWEEP_PARALLEL {
                            reads.push(self.sweep_one());
                        }
                    }
                    Some(r) = reads.next(), if !reads.is_empty() => {
                        if let Err(e) = r {
                            tracing::warn!(error = %protocol::error::chain(&e), "Sweep: reading an image failed.");
                        }
                    }
                }
            }
        };
        tokio::join!(pools, images);
    }

    /// Creates or updates `client.<id>` with `profile rbd` on `pools` only, and returns its key.
    pub async fn issue_identity(
        &self,
        id: &CephClientId,
        pools: &[PoolName],
    ) -> Result<CephIdentity, CephError> {
        if self.protected_ids.contains(id.as_str()) {
            return Err(CephError::Invalid {
                field: "client_id",
                message: format!("client.{id} is reserved (admin or the agent's own identity)"),
            });
        }
        if pools.is_empty() {
            return Err(CephError::Invalid {
                field: "pools",
                message: "at least one pool is needed".into(),
            });
        }
        let pools: BTreeSet<&str> = pools.iter().map(PoolName::as_str).collect();
        let osd_caps = pools
            .iter()
            .map(|p| format!("profile rbd pool={p}"))
            .collect::<Vec<_>>()
            .join(", ");
        let entity = format!("client.{id}");
        let caps = |verb: &[&str]| {
            Invocation::new(Tool::Ceph)
                .args(verb.iter().copied())
                .arg(&entity)
                .args(["mon", "profile rbd", "osd"])
                .arg(&osd_caps)
        };
        let created: Result<Vec<CephIdentity>, CephError> = self
            .json(caps(&["auth", "get-or-create"]).args(["--format", "json"]))
            .await;
        let found = match created {
            Ok(v) => v,
            // EINVAL: the entity exists with other caps. Set ours, then read it back.
            Err(CephError::Cli(e)) if e.code() == Some(22) => {
                self.run(caps(&["auth", "caps"])).await?;
                self.json(
                    Invocation::new(Tool::Ceph)
                        .args(["auth", "get"])
                        .arg(&entity)
                        .args(["--format", "json"]),
                )
                .await?
            }
            Err(e) => return Err(e),
        };
        found.into_iter().next().ok_or_else(|| CephError::NotFound {
            spec: entity,
            hint: " after creating it".into(),
        })
    }
}

fn unistor_metadata(all: BTreeMap<String, String>) -> BTreeMap<String, String> {
    all.into_iter()
        .filter(|(k, _)| k.starts_with("unistor."))
        .collect()
}

/// ENOENT: Ceph tools exit with the errno of the failure.
const fn libc_enoent() -> i32 {
    2
}

/// EEXIST.
const fn libc_eexist() -> i32 {
    17
}

#[derive(Debug, Deserialize)]
struct CephStatusJson {
    fsid: String,
    health: HealthJson,
    #[serde(default)]
    monmap: EpochJson,
    #[serde(default)]
    osdmap: EpochJson,
}

/// A map's epoch in `ceph status` (0 when absent: then the map is always re-read).
#[derive(Debug, Default, Deserialize)]
struct EpochJson {
    #[serde(default)]
    epoch: u64,
}

/// The cluster part of the last report, and the map epochs it was read at.
#[derive(Debug)]
struct ClusterCache {
    at: Instant,
    report: CephReport,
    monmap_epoch: u64,
    osdmap_epoch: u64,
    /// Pools with the rbd application.
    rbd_pools: BTreeSet<String>,
}

#[derive(Debug, Deserialize)]
struct HealthJson {
    status: String,
    #[serde(default)]
    checks: BTreeMap<String, CheckJson>,
}

#[derive(Debug, Deserialize)]
struct CheckJson {
    summary: SummaryJson,
}

#[derive(Debug, Deserialize)]
struct SummaryJson {
    message: String,
}

#[derive(Debug, Deserialize)]
struct MonDumpJson {
    mons: Vec<MonJson>,
}

impl MonDumpJson {
    fn monitors(self) -> Vec<MonitorInfo> {
        self.mons
            .into_iter()
            .map(|m| MonitorInfo {
                name: m.name,
                addrs: m
                    .public_addrs
                    .addrvec
                    .into_iter()
                    .map(|a| format!("{}:{}", a.kind, a.addr))
                    .collect(),
            })
            .collect()
    }
}

#[derive(Debug, Deserialize)]
struct MonJson {
    name: String,
    public_addrs: AddrVecJson,
}

#[derive(Debug, Deserialize)]
struct AddrVecJson {
    addrvec: Vec<AddrJson>,
}

#[derive(Debug, Deserialize)]
struct AddrJson {
    #[serde(rename = "type")]
    kind: String,
    addr: String,
}

#[derive(Debug, Deserialize)]
struct DfJson {
    stats: DfStatsJson,
    pools: Vec<DfPoolJson>,
}

#[derive(Debug, Deserialize)]
struct DfStatsJson {
    total_bytes: u64,
    total_avail_bytes: u64,
    total_used_raw_bytes: u64,
}

#[derive(Debug, Deserialize)]
struct DfPoolJson {
    name: String,
    id: u64,
    stats: DfPoolStatsJson,
}

#[derive(Debug, Deserialize)]
struct DfPoolStatsJson {
    stored: u64,
    max_avail: u64,
}

#[derive(Debug, Deserialize)]
struct PoolDetailJson {
    pool_name: String,
    #[serde(default)]
    application_metadata: BTreeMap<String, serde_json::Value>,
}
