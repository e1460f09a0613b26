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

mod cluster;
mod fence;
mod images;
mod json;
mod pool_index;
mod reads;
mod sweep;

use json::*;

pub use protocol::names::ImageName;

use crate::runner::{CliError, Invocation, Runner, Tool};

/// Image metadata keys (their one home is [`protocol::meta`]).
pub use protocol::meta::{
    MANAGED_BY as META_MANAGED_BY, POLICY as META_POLICY, RETENTION as META_RETENTION,
    SNAPSHOTS as META_SNAPSHOTS, VOLUME as META_VOLUME,
};

/// A deletion policy with its trash retention (the wire's type only admits the three
/// policies).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    deletion: protocol::meta::DeletionPolicy,
    retention_secs: u64,
}

impl Policy {
    /// From the wire form; a retention past [`protocol::limits::MAX_RETENTION_SECS`] is
    /// invalid.
    pub fn parse(p: &protocol::ImagePolicy) -> Result<Self, CephError> {
        check_retention("policy.trash_retention_secs", p.trash_retention_secs)?;
        Ok(Self {
            deletion: p.deletion,
            retention_secs: p.trash_retention_secs,
        })
    }

    /// [`Policy::parse`] of a command's optional policy.
    pub fn parse_opt(p: Option<&protocol::ImagePolicy>) -> Result<Option<Self>, CephError> {
        p.map(Self::parse).transpose()
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

/// A checked `pool/image@snapshot`: what a clone is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapSpec {
    /// The image.
    pub image: ImageSpec,
    /// The snapshot.
    pub snapshot: protocol::names::SnapName,
}

impl SnapSpec {
    /// Checks the three names; errors name the field.
    pub fn parse(s: &protocol::SnapshotRef) -> Result<Self, NameError> {
        Ok(Self {
            image: ImageSpec {
                pool: PoolName::parse("clone_from.pool", &s.pool)?,
                image: ImageName::parse("clone_from.image", &s.image)?,
            },
            snapshot: protocol::names::SnapName::parse("clone_from.snapshot", &s.snapshot)?,
        })
    }
}

impl SnapSpec {
    /// The snapshot a snapshot command names; errors name the field.
    pub fn of_op(s: &protocol::SnapshotOp) -> Result<Self, NameError> {
        Ok(Self {
            image: ImageSpec::parse(&s.pool, &s.image)?,
            snapshot: protocol::names::SnapName::parse("snapshot", &s.snapshot)?,
        })
    }
}

impl std::fmt::Display for SnapSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.image, self.snapshot)
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
    /// The snapshot has clones: removing it is refused.
    #[error("snapshot {spec} has {} clone(s), so it is kept: {}", clones.len(), clones.join(", "))]
    HasClones {
        /// `pool/image@snapshot`.
        spec: String,
        /// The clones, `pool/image`.
        clones: Vec<String>,
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
            CephError::InUse { .. } | CephError::HasClones { .. } => {
                WireError::new(ErrorCode::InUse, message)
            }
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
    protocol::limits::check_volume_bytes(bytes)
        .map_err(|message| CephError::Invalid { field, message })
}

/// Checks a trash retention (`field` names it in the error).
pub fn check_retention(field: &'static str, secs: u64) -> Result<(), CephError> {
    protocol::limits::check_retention_secs(secs)
        .map_err(|message| CephError::Invalid { field, message })
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

/// A watcher's address without a messenger prefix (`v1:`, `v2:`, `any:`).
fn bare_addr(a: &str) -> &str {
    a.split_once(':')
        .filter(|(p, _)| matches!(*p, "v1" | "v2" | "any"))
        .map_or(a, |(_, rest)| rest)
}

/// A live image as read from the cluster.
#[derive(Debug, Clone)]
struct LiveImage {
    size: u64,
    features: Vec<String>,
    metadata: BTreeMap<String, String>,
    watchers: Vec<String>,
    /// The snapshot it is a clone of, `pool/image@snapshot`.
    parent: Option<String>,
    /// Its snapshots: id and name.
    snapshots: Vec<(u64, String)>,
    /// Clone generations above it (1: a clone of an image that is no clone); None: not a
    /// clone, or not known.
    depth: Option<u32>,
}

/// The deepest clone chain followed when an image is read.
const MAX_DEPTH: u32 = 16;

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
    /// The entry of an image `owner` manages under `policy`, made with `features`.
    pub fn of(owner: &Owner, policy: Option<&Policy>, features: Vec<String>) -> Self {
        Self {
            managed_by: Some(owner.managed_by.to_string()),
            volume: owner.volume.to_string(),
            policy: policy.map(|p| p.deletion.as_str().to_string()),
            retention_secs: policy.map(|p| p.retention_secs),
            features,
        }
    }

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
    /// The start-up load removes a temporary image an interrupted create left only when it is
    /// older than this (a younger one may be a create in flight, of another agent process on
    /// the cluster or one overlapping this one's start; the next create of its name removes
    /// it). Zero: removed whatever its age.
    pub leftover_age: Duration,
}

impl Default for ViewOptions {
    fn default() -> Self {
        Self {
            sweep_rate: 10.0,
            sweep_min_age: Duration::from_secs(30),
            pool_refresh: Duration::from_secs(30),
            status_max_age: Duration::from_secs(5),
            leftover_age: LEFTOVER_AGE,
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
    /// Commands run and library calls made, for the benchmark and tests.
    calls: AtomicU64,
    /// Of those, the calls made through librados/librbd in process.
    library_calls: AtomicU64,
    /// Clone depths by parent snapshot (`pool/image@snapshot`): walked once per snapshot, not
    /// at every read of every clone (each ancestor is an image open). A depth can only fall
    /// later (an ancestor deep-flattened), so a remembered one errs toward flattening early.
    depths: Arc<std::sync::Mutex<std::collections::HashMap<String, Option<u32>>>>,
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

/// `inv` naming snapshot `snap` with `--pool`, `--image` and `--snap` (no spec to parse).
fn snap_args(inv: Invocation, snap: &SnapSpec) -> Invocation {
    inv.args(["--pool", snap.image.pool.as_str()])
        .args(["--image", snap.image.image.as_str()])
        .args(["--snap", snap.snapshot.as_str()])
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
            library_calls: AtomicU64::new(0),
            depths: Arc::default(),
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

    /// Commands run and library calls made so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Calls made through librados/librbd in process so far (counted in [`Self::calls`] too).
    pub fn library_calls(&self) -> u64 {
        self.library_calls.load(Ordering::Relaxed)
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

    /// `f` on `pool` through the runner's in-process library ([`crate::library`]); `None`
    /// when there is none (or it cannot connect): the caller runs the command instead.
    async fn library<T: Send + 'static>(
        &self,
        pool: &PoolName,
        what: String,
        kind: crate::library::Kind,
        f: impl FnOnce(&ceph_lib::Pool) -> Result<T, ceph_lib::LibError> + Send + 'static,
    ) -> Option<Result<T, CliError>> {
        let lib = self.runner.library()?;
        let done = lib.call(pool.as_str(), what, kind, f).await;
        self.counted(done)
    }

    /// Counts a call the library made (`Some`), in [`Self::calls`] and [`Self::library_calls`].
    fn counted<T>(&self, done: Option<T>) -> Option<T> {
        if done.is_some() {
            self.calls.fetch_add(1, Ordering::Relaxed);
            self.library_calls.fetch_add(1, Ordering::Relaxed);
        }
        done
    }

    /// A monitor's JSON answer to `ceph <prefix> --format json` (a command without arguments):
    /// through the library's connection when there is one, else the command line.
    async fn mon_json<T: DeserializeOwned>(&self, prefix: &str) -> Result<T, CephError> {
        let command = serde_json::json!({ "prefix": prefix, "format": "json" });
        let inv = Invocation::new(Tool::Ceph).args([prefix, "--format", "json"]);
        self.mon_call(command, inv).await
    }

    /// Monitor command `command` (JSON, as `ceph` sends it) through the library's connection
    /// when there is one, else `inv` on the command line; its JSON answer.
    async fn mon_call<T: DeserializeOwned>(
        &self,
        command: serde_json::Value,
        inv: Invocation,
    ) -> Result<T, CephError> {
        let out = self.mon_run(command, inv).await?;
        serde_json::from_slice(&out.1).map_err(|source| CephError::Parse {
            command: out.0,
            source,
        })
    }

    /// [`Self::mon_call`] for a command whose answer is not read.
    async fn mon_do(&self, command: serde_json::Value, inv: Invocation) -> Result<(), CephError> {
        self.mon_run(command, inv).await.map(drop)
    }

    /// What ran (for errors) and its output.
    async fn mon_run(
        &self,
        command: serde_json::Value,
        inv: Invocation,
    ) -> Result<(String, Vec<u8>), CephError> {
        if let Some(lib) = self.runner.library() {
            let what = format!("librados mon_command {command}");
            if let Some(out) =
                self.counted(lib.mon_command(what.clone(), command.to_string()).await)
            {
                return Ok((what, out?));
            }
        }
        let shown = inv.display();
        let out = self.run(inv).await?;
        Ok((shown, out.stdout))
    }

    async fn json<T: DeserializeOwned>(&self, inv: Invocation) -> Result<T, CephError> {
        let command = inv.display();
        let out = self.run(inv).await?;
        serde_json::from_slice(&out.stdout).map_err(|source| CephError::Parse { command, source })
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

/// Where an image is made before it is renamed into place (see `Ceph::create_image`).
pub(crate) const TEMPORARY_PREFIX: &str = ".unistor-new.";

/// A temporary image younger than this may belong to a create still in flight (any command's
/// deadline is shorter): the start-up load leaves it alone.
pub(crate) const LEFTOVER_AGE: std::time::Duration = std::time::Duration::from_secs(15 * 60);

/// The temporary name of image `image` while it is made.
pub(crate) fn temporary_name(image: &str) -> String {
    format!("{TEMPORARY_PREFIX}{image}")
}

/// EEXIST.
const fn libc_eexist() -> i32 {
    17
}
