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

use std::collections::{BTreeMap, BTreeSet};

use futures::stream::{self, StreamExt};
use protocol::names::{check_rbd_feature, CephClientId, NameError, PoolName, VolumeName};
use protocol::{
    Capacity, CephHealth, CephIdentity, CephReport, ErrorCode, ImageState, ImageStatus,
    MonitorInfo, PoolInfo, WireError,
};
use serde::de::DeserializeOwned;
use serde::Deserialize;

pub use protocol::names::ImageName;

use crate::runner::{CliError, Invocation, Runner, Tool};

/// Image metadata key naming the owning unistor deployment.
pub const META_MANAGED_BY: &str = "unistor.managed-by";
/// Image metadata key naming the volume the image backs.
pub const META_VOLUME: &str = "unistor.volume";
/// Image metadata key holding the deletion policy.
pub const META_POLICY: &str = "unistor.deletion-policy";
/// Image metadata key holding the trash retention in seconds.
pub const META_RETENTION: &str = "unistor.trash-retention-secs";

/// A checked deletion policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    deletion: &'static str,
    retention: String,
}

impl Policy {
    /// Checks the wire form.
    pub fn parse(p: &protocol::ImagePolicy) -> Result<Self, CephError> {
        let deletion = match p.deletion.as_str() {
            "Retain" => "Retain",
            "Trash" => "Trash",
            "Delete" => "Delete",
            _ => {
                return Err(CephError::Invalid {
                    field: "policy.deletion",
                    message: format!("{:?} is not Retain, Trash or Delete", p.deletion),
                })
            }
        };
        Ok(Self {
            deletion,
            retention: p.trash_retention_secs.to_string(),
        })
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

#[derive(Debug, Clone, Deserialize)]
struct TrashEntry {
    id: String,
    name: String,
    #[serde(default)]
    status: String,
}

/// A live image as read from the cluster.
#[derive(Debug, Clone)]
struct LiveImage {
    size: u64,
    features: Vec<String>,
    metadata: BTreeMap<String, String>,
    watchers: Vec<String>,
}

/// The cluster, through its CLI.
#[derive(Debug)]
pub struct Ceph<R> {
    runner: R,
    /// cephx ids that must never be (re)issued: `admin` and the agent's own.
    protected_ids: BTreeSet<String>,
    /// Images examined at once while reporting.
    report_concurrency: usize,
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

impl<R: Runner> Ceph<R> {
    /// Operates the cluster through `runner`; `own_id` is the agent's cephx id.
    pub fn new(runner: R, own_id: Option<&str>) -> Self {
        let mut protected_ids = BTreeSet::from(["admin".to_string()]);
        protected_ids.extend(own_id.map(str::to_string));
        Self {
            runner,
            protected_ids,
            report_concurrency: 8,
        }
    }

    /// The runner (tests inspect fakes through it).
    pub fn runner(&self) -> &R {
        &self.runner
    }

    async fn json<T: DeserializeOwned>(&self, inv: Invocation) -> Result<T, CephError> {
        let command = inv.display();
        let out = self.runner.run(inv).await?;
        serde_json::from_slice(&out.stdout).map_err(|source| CephError::Parse { command, source })
    }

    /// `rbd info`; `None` when the image does not exist (exit code ENOENT).
    async fn info(&self, spec: &ImageSpec) -> Result<Option<RbdInfo>, CephError> {
        let inv = image_args(rbd().args(["info", "--format", "json"]), spec);
        match self.json(inv).await {
            Ok(info) => Ok(Some(info)),
            Err(CephError::Cli(e)) if e.code() == Some(libc_enoent()) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn metadata(&self, spec: &ImageSpec) -> Result<BTreeMap<String, String>, CephError> {
        let inv = image_args(rbd().args(["image-meta", "list", "--format", "json"]), spec);
        let command = inv.display();
        let out = self.runner.run(inv).await?;
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

    async fn live(&self, spec: &ImageSpec) -> Result<Option<LiveImage>, CephError> {
        let Some(info) = self.info(spec).await? else {
            return Ok(None);
        };
        // One after the other: `rbd image-meta list` may open the image read-write for a moment,
        // and a concurrent `rbd status` would report our own process as a watcher.
        // The image can vanish between the commands (removed by someone else): that is "not
        // there", not a failed report.
        let gone =
            |e: &CephError| matches!(e, CephError::Cli(c) if c.code() == Some(libc_enoent()));
        let metadata = match self.metadata(spec).await {
            Err(e) if gone(&e) => return Ok(None),
            other => other?,
        };
        let watchers = match self.watchers(spec).await {
            Err(e) if gone(&e) => return Ok(None),
            other => other?,
        };
        Ok(Some(LiveImage {
            size: info.size,
            features: info.features,
            metadata,
            watchers,
        }))
    }

    async fn trash(&self, pool: &PoolName) -> Result<Vec<TrashEntry>, CephError> {
        let inv = rbd()
            .args(["trash", "ls", "--long", "--format", "json", "--"])
            .arg(pool.as_str());
        self.json(inv).await
    }

    /// Image names in a pool's unistor index.
    async fn index(&self, pool: &PoolName) -> Result<BTreeSet<String>, CephError> {
        let inv = Invocation::new(Tool::Rados).args([
            "--pool",
            pool.as_str(),
            "listomapkeys",
            "--",
            INDEX_OBJECT,
        ]);
        match self.runner.run(inv).await {
            Ok(out) => Ok(String::from_utf8_lossy(&out.stdout)
                .lines()
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect()),
            // `rados` exits 1 for every failure; the index object not existing yet is the one
            // failure that means "empty", and only stderr tells it apart.
            Err(CliError::Failed { stderr, .. })
                if stderr.contains("(2) No such file or directory") =>
            {
                Ok(BTreeSet::new())
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn index_add(&self, spec: &ImageSpec, owner: &Owner) -> Result<(), CephError> {
        let inv = Invocation::new(Tool::Rados).args([
            "--pool",
            spec.pool.as_str(),
            "setomapval",
            "--",
            INDEX_OBJECT,
            spec.image.as_str(),
            owner.volume.as_str(),
        ]);
        self.runner.run(inv).await?;
        Ok(())
    }

    async fn index_remove(&self, spec: &ImageSpec) -> Result<(), CephError> {
        let inv = Invocation::new(Tool::Rados).args([
            "--pool",
            spec.pool.as_str(),
            "rmomapkey",
            "--",
            INDEX_OBJECT,
            spec.image.as_str(),
        ]);
        match self.runner.run(inv).await {
            Ok(_) => Ok(()),
            Err(CliError::Failed { stderr, .. })
                if stderr.contains("(2) No such file or directory") =>
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
        self.runner.run(inv).await?;
        Ok(())
    }

    fn status_of(spec: &ImageSpec, img: LiveImage) -> ImageStatus {
        ImageStatus {
            pool: spec.pool.to_string(),
            image: spec.image.to_string(),
            state: ImageState::Live,
            size_bytes: img.size,
            features: img.features,
            watchers: img.watchers,
            metadata: unistor_metadata(img.metadata),
        }
    }

    /// The state of one image unistor manages (live, trashed or missing).
    async fn image_status(
        &self,
        spec: &ImageSpec,
        trash: &[TrashEntry],
    ) -> Result<ImageStatus, CephError> {
        if let Some(img) = self.live(spec).await? {
            return Ok(Self::status_of(spec, img));
        }
        let state = match trash.iter().find(|t| t.name == spec.image.as_str()) {
            Some(t) => ImageState::Trashed {
                trash_id: t.id.clone(),
                trash_status: t.status.clone(),
            },
            None => ImageState::Missing,
        };
        Ok(ImageStatus {
            pool: spec.pool.to_string(),
            image: spec.image.to_string(),
            state,
            size_bytes: 0,
            features: vec![],
            watchers: vec![],
            metadata: BTreeMap::new(),
        })
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

    /// The whole report: status, monitors, capacity, pools and the images unistor manages.
    pub async fn report(&self) -> Result<CephReport, CephError> {
        let ceph = |args: &[&str]| Invocation::new(Tool::Ceph).args(args.iter().copied());
        let (status, mons, df, pools) = tokio::try_join!(
            self.json::<CephStatusJson>(ceph(&["status", "--format", "json"])),
            self.json::<MonDumpJson>(ceph(&["mon", "dump", "--format", "json"])),
            self.json::<DfJson>(ceph(&["df", "--format", "json"])),
            self.json::<Vec<PoolDetailJson>>(ceph(&[
                "osd", "pool", "ls", "detail", "--format", "json"
            ])),
        )?;
        let rbd_pools: BTreeSet<&str> = pools
            .iter()
            .filter(|p| p.application_metadata.contains_key("rbd"))
            .map(|p| p.pool_name.as_str())
            .collect();
        let pool_infos: Vec<PoolInfo> = df
            .pools
            .iter()
            .map(|p| PoolInfo {
                name: p.name.clone(),
                id: p.id,
                rbd_enabled: rbd_pools.contains(p.name.as_str()),
                stored_bytes: p.stats.stored,
                max_avail_bytes: p.stats.max_avail,
            })
            .collect();

        let mut images = Vec::new();
        for pool in &rbd_pools {
            // Pools created outside unistor may have names unistor would refuse; skip those.
            let Ok(pool) = PoolName::parse("pool", pool) else {
                continue;
            };
            let index = self.index(&pool).await?;
            if index.is_empty() {
                continue;
            }
            let trash = self.trash(&pool).await?;
            let specs: Vec<ImageSpec> = index
                .iter()
                .filter_map(|name| ImageName::parse("image", name).ok())
                .map(|image| ImageSpec {
                    pool: pool.clone(),
                    image,
                })
                .collect();
            let trash = &trash;
            let found: Vec<Result<ImageStatus, CephError>> = stream::iter(specs)
                .map(|spec| async move { self.image_status(&spec, trash).await })
                .buffered(self.report_concurrency)
                .collect()
                .await;
            for r in found {
                images.push(r?);
            }
        }

        Ok(CephReport {
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
            monitors: mons
                .mons
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
                .collect(),
            capacity: Capacity {
                total_bytes: df.stats.total_bytes,
                used_bytes: df.stats.total_used_raw_bytes,
                avail_bytes: df.stats.total_avail_bytes,
            },
            pools: pool_infos,
            images,
        })
    }

    /// Creates an owned image, or succeeds when the same image already exists.
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
        // Two rounds: if a racing creator wins between our look and our create, look again.
        for _ in 0..2 {
            if let Some(img) = self.live(spec).await? {
                let img = self.adopt_interrupted(spec, img, owner).await?;
                Self::check_owner(spec, &img, owner)?;
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
                if self.write_policy(spec, &img.metadata, policy).await? {
                    if let Some(img) = self.live(spec).await? {
                        return Ok(Self::status_of(spec, img));
                    }
                }
                return Ok(Self::status_of(spec, img));
            }
            // Intent first: the index entry makes an interrupted create recognisable.
            self.index_add(spec, owner).await?;
            let inv = image_args(
                rbd()
                    .args(["create", "--size"])
                    .arg(format!("{size}B"))
                    .args(["--image-feature", &features.join(",")]),
                spec,
            );
            match self.runner.run(inv).await {
                Ok(_) => {}
                Err(e) if e.code() == Some(libc_eexist()) => continue,
                Err(e) => return Err(e.into()),
            }
            self.set_metadata(spec, META_MANAGED_BY, owner.managed_by.as_str())
                .await?;
            self.set_metadata(spec, META_VOLUME, owner.volume.as_str())
                .await?;
            self.write_policy(spec, &BTreeMap::new(), policy).await?;
            return match self.live(spec).await? {
                Some(img) => Ok(Self::status_of(spec, img)),
                None => Err(CephError::NotFound {
                    spec: spec.to_string(),
                    hint: " right after creating it".into(),
                }),
            };
        }
        Err(CephError::Conflict {
            spec: spec.to_string(),
            diff: "another client keeps creating and removing it".into(),
        })
    }

    /// Writes the policy metadata where it differs; true when something was written.
    async fn write_policy(
        &self,
        spec: &ImageSpec,
        have: &BTreeMap<String, String>,
        policy: Option<&Policy>,
    ) -> Result<bool, CephError> {
        let Some(p) = policy else { return Ok(false) };
        let mut wrote = false;
        for (k, v) in [
            (META_POLICY, p.deletion),
            (META_RETENTION, p.retention.as_str()),
        ] {
            if have.get(k).map(String::as_str) != Some(v) {
                self.set_metadata(spec, k, v).await?;
                wrote = true;
            }
        }
        Ok(wrote)
    }

    /// Completes a create that was interrupted between `rbd create` and the metadata.
    async fn adopt_interrupted(
        &self,
        spec: &ImageSpec,
        img: LiveImage,
        owner: &Owner,
    ) -> Result<LiveImage, CephError> {
        if !img.metadata.is_empty() || !img.watchers.is_empty() {
            return Ok(img);
        }
        if !self.index(&spec.pool).await?.contains(spec.image.as_str()) {
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
        let img = self.owned_live(spec, owner).await?;
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
            self.runner.run(inv).await?;
        }
        self.status_after(spec).await
    }

    async fn status_after(&self, spec: &ImageSpec) -> Result<ImageStatus, CephError> {
        let trash = self.trash(&spec.pool).await?;
        self.image_status(spec, &trash).await
    }

    /// Moves an owned, unused image to the trash, protected for `retain_secs`.
    pub async fn trash_image(
        &self,
        spec: &ImageSpec,
        retain_secs: u64,
        owner: &Owner,
    ) -> Result<ImageStatus, CephError> {
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
                self.runner.run(inv).await?;
            }
            None => {
                // Already trashed (by us, as the index says) is success; anything else is not.
                let trash = self.trash(&spec.pool).await?;
                let ours = self.index(&spec.pool).await?.contains(spec.image.as_str());
                if !(ours && trash.iter().any(|t| t.name == spec.image.as_str())) {
                    return Err(CephError::NotFound {
                        spec: spec.to_string(),
                        hint: String::new(),
                    });
                }
            }
        }
        self.status_after(spec).await
    }

    /// Restores an image unistor manages from the trash. A live owned image is success.
    pub async fn restore_image(&self, spec: &ImageSpec) -> Result<ImageStatus, CephError> {
        if !self.index(&spec.pool).await?.contains(spec.image.as_str()) {
            return Err(CephError::NotOwned {
                spec: spec.to_string(),
                volume: String::new(),
                why: format!("it is not in the pool's {INDEX_OBJECT}"),
            });
        }
        if self.info(spec).await?.is_some() {
            return self.status_after(spec).await;
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
        self.runner.run(inv).await?;
        self.status_after(spec).await
    }

    /// Deletes an owned image that has no watchers. Already gone is success.
    pub async fn delete_image(&self, spec: &ImageSpec, owner: &Owner) -> Result<(), CephError> {
        match self.live(spec).await? {
            Some(img) => {
                Self::check_owner(spec, &img, owner)?;
                self.refuse_in_use(spec, &img).await?;
                let inv = image_args(rbd().args(["rm", "--no-progress"]), spec);
                self.runner.run(inv).await?;
            }
            None => {
                let trash = self.trash(&spec.pool).await?;
                if trash.iter().any(|t| t.name == spec.image.as_str()) {
                    return Err(CephError::NotFound {
                        spec: spec.to_string(),
                        hint: " live: it is in the trash; restore it first or let it expire".into(),
                    });
                }
            }
        }
        self.index_remove(spec).await
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
                self.runner.run(caps(&["auth", "caps"])).await?;
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
