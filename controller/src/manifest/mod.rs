//! Manifests: YAML documents in a directory tree, loaded, checked and resolved into the desired
//! state. Every error names the file, the line and the field; all errors are collected, not just
//! the first. Hostile input (huge files, deep nesting, alias bombs) is refused within bounds.

mod files;
mod resolve;
pub mod types;
mod yaml;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::dpu::{FunctionRef, SnapSpec};
use protocol::names::{CephClientId, ImageName, PeerName, PoolName, VolumeName};

use files::collect;
use resolve::{resolve, Ctx};
use yaml::{parse_document, prescan, split_documents, Doc};

pub use types::*;

/// Largest manifest file read.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;
/// Most documents in one manifest set.
pub const MAX_DOCUMENTS: usize = 100_000;
/// Most files in one manifest set.
pub const MAX_FILES: usize = 10_000;

/// One problem in the manifests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line (0 when the whole file is at fault).
    pub line: usize,
    /// The field, as a path (`spec.rbd.pool`), or empty.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}", self.line)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Where a document came from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Source {
    /// File.
    pub file: PathBuf,
    /// First line of the document.
    pub line: usize,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// A resolved Ceph cluster.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Cluster {
    /// Name.
    pub name: String,
    /// Agent name.
    pub agent: PeerName,
    /// Agent address.
    pub address: String,
    /// Monitors for SNAP (empty: take the agent's report).
    pub monitors: Vec<String>,
    /// Pools.
    pub pools: Vec<PoolName>,
    /// SNAP's cephx id.
    pub snap_client: CephClientId,
    /// Where it was defined (not part of what it means: moving a document to another file
    /// changes nothing, so it is not serialized).
    #[serde(skip)]
    pub source: Source,
}

impl Cluster {
    /// The cephx id SNAP uses on `dpu`: one per DPU (`<snapIdentity.clientId>.<dpu>`), so a
    /// fence (`unistor fence dpu/NAME`) cuts that DPU alone off the cluster.
    pub fn snap_client_of(&self, dpu: &str) -> Result<CephClientId, protocol::names::NameError> {
        CephClientId::parse(
            "spec.snapIdentity.clientId (with the DPU's name)",
            &format!("{}.{dpu}", self.snap_client),
        )
    }

    /// Whether `entity` (`client.X`) is SNAP's, on any DPU (or the shared identity of
    /// registrations made before identities were per DPU).
    pub fn is_snap_entity(&self, entity: &str) -> bool {
        entity
            .strip_prefix("client.")
            .and_then(|id| id.strip_prefix(self.snap_client.as_str()))
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'))
    }
}

/// A resolved DPU.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Dpu {
    /// Name.
    pub name: String,
    /// Agent name.
    pub agent: PeerName,
    /// Agent address.
    pub address: String,
    /// Host.
    pub host: String,
    /// SNAP deployment.
    pub snap: SnapSpec,
    /// Where it was defined (not part of what it means: moving a document to another file
    /// changes nothing, so it is not serialized).
    #[serde(skip)]
    pub source: Source,
}

/// A resolved volume.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Volume {
    /// Name.
    pub name: VolumeName,
    /// Host.
    pub host: String,
    /// The DPU serving it.
    pub dpu: String,
    /// Size in bytes.
    pub size_bytes: u64,
    /// Cluster name.
    pub cluster: String,
    /// Pool.
    pub pool: PoolName,
    /// Image.
    pub image: ImageName,
    /// Function.
    pub function: FunctionRef,
    /// Pinned NSID (else derived by the planner).
    pub nsid: Option<u32>,
    /// Namespace UUID (pinned or derived from the image).
    pub uuid: String,
    /// Controller queues.
    pub queues: u32,
    /// Deletion policy.
    pub deletion_policy: DeletionPolicy,
    /// Trash retention.
    pub trash_retention: Duration,
    /// Take over the image when it exists without an owner (`rbd.adopt`).
    pub adopt: bool,
    /// The snapshot a new image is cloned from (`source.snapshot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_from: Option<CloneSource>,
    /// QoS limits SNAP applies to the volume's bdev (`qos`; none: no limit).
    #[serde(default, skip_serializing_if = "protocol::dpu::QosLimits::is_none")]
    pub qos: protocol::dpu::QosLimits,
    /// The snapshots unistor takes and keeps of the image (`snapshots`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<VolumeSnapshots>,
    /// Labels (for people and tools; the plan does not read them).
    #[serde(skip)]
    pub labels: BTreeMap<String, String>,
    /// Where it was defined (not part of what it means: moving a document to another file
    /// changes nothing, so it is not serialized).
    #[serde(skip)]
    pub source: Source,
}

/// An RBD snapshot a volume's image is cloned from, names checked.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CloneSource {
    /// Pool (one of the volume's cluster's pools).
    pub pool: PoolName,
    /// The image.
    pub image: ImageName,
    /// The snapshot.
    pub snapshot: protocol::names::SnapName,
    /// Flattened once made.
    pub flatten: bool,
    /// Flattened once deeper than this many clone generations (`source.maxDepth`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_depth: Option<u32>,
    /// The volume whose declared snapshot it is (`source.volumeSnapshot`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<VolumeName>,
}

/// A volume's declared snapshots, checked.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VolumeSnapshots {
    /// Named snapshots (none starts with the schedule's prefix).
    pub names: Vec<protocol::names::SnapName>,
    /// A snapshot every this many seconds, the newest `keep` kept.
    pub schedule: Option<(u64, u32)>,
    /// Dropped names (and scheduled snapshots when the schedule goes) are removed.
    pub delete: bool,
}

impl std::fmt::Display for CloneSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}@{}", self.pool, self.image, self.snapshot)
    }
}

/// The desired state, resolved and checked.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Desired {
    /// Clusters by name.
    pub clusters: BTreeMap<String, Cluster>,
    /// DPUs by name.
    pub dpus: BTreeMap<String, Dpu>,
    /// Volumes by name.
    pub volumes: BTreeMap<String, Volume>,
}

/// Parses a binary size (`512Mi`, `100Gi`, `2Ti`) into bytes; whole MiB only.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let units: [(&str, u64); 4] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
    ];
    let size = || s.to_string();
    let (num, mult) = units
        .iter()
        .find_map(|(u, m)| s.strip_suffix(u).map(|n| (n, *m)))
        .ok_or_else(|| SizeError::NoUnit(size()))?;
    let n: u64 = num.parse().map_err(|_| SizeError::NotANumber(size()))?;
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| SizeError::TooLarge(size()))?;
    if bytes == 0 || !bytes.is_multiple_of(1 << 20) {
        return Err(SizeError::NotWholeMib(size()));
    }
    protocol::limits::check_volume_bytes(bytes).map_err(|why| SizeError::OutOfBounds {
        size: size(),
        why: why.to_string(),
    })?;
    Ok(bytes)
}

/// Why a size is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// No binary unit.
    #[error("{0:?} has no binary unit: write sizes like 512Mi, 100Gi or 2Ti (G, GB and bare numbers are ambiguous)")]
    NoUnit(String),
    /// Not a whole number before the unit.
    #[error("{0:?} is not a whole number followed by Ki, Mi, Gi or Ti")]
    NotANumber(String),
    /// Past 64 bits.
    #[error("{0:?} is too large")]
    TooLarge(String),
    /// Zero, or not a whole number of MiB.
    #[error("{0:?} is not a positive whole number of MiB")]
    NotWholeMib(String),
    /// Outside the bounds of a volume.
    #[error("{size:?}: {why}")]
    OutOfBounds {
        /// As written.
        size: String,
        /// Which bound.
        why: String,
    },
}

/// The namespace UUID derived from the backing image: the same wherever and whenever the volume
/// is re-created.
pub fn derived_uuid(cluster: &str, pool: &str, image: &str) -> String {
    const NS: uuid::Uuid = uuid::Uuid::from_u128(0x8f7c_2c3e_5b4a_4d21_9e0f_6a1b_2c3d_4e5f);
    uuid::Uuid::new_v5(&NS, format!("{cluster}/{pool}/{image}").as_bytes())
        .hyphenated()
        .to_string()
}

/// Documents parsed by the last load, by file and first line, with their text: what the watch
/// daemon keeps between reloads, so that a reload parses only the documents whose text changed
/// (at 1,000 volumes, parsing is most of a reload's time; resolving is done whole every time).
/// Holds the last load's documents only.
#[derive(Debug, Default)]
pub struct ParseCache {
    docs: HashMap<(PathBuf, usize), (String, Result<Document, LoadError>)>,
}

impl ParseCache {
    /// How many documents it holds.
    pub fn len(&self) -> usize {
        self.docs.len()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.docs.is_empty()
    }
}

/// Reads every `*.yaml` / `*.yml` file under `dir` (sorted, recursively) and resolves them.
pub fn load_dir(dir: &Path) -> Result<Desired, Vec<LoadError>> {
    load_dir_with(dir, &mut ParseCache::default())
}

/// [`load_dir`], parsing again only the documents `cache` does not hold as they are now.
pub fn load_dir_with(dir: &Path, cache: &mut ParseCache) -> Result<Desired, Vec<LoadError>> {
    let mut files = vec![];
    let mut errors = vec![];
    collect(dir, &mut files, &mut errors);
    files.sort();
    if files.len() > MAX_FILES {
        return Err(vec![LoadError {
            file: dir.to_path_buf(),
            line: 0,
            field: String::new(),
            message: format!(
                "{} manifest files; at most {MAX_FILES} are read",
                files.len()
            ),
        }]);
    }
    let root = match dir.canonicalize() {
        Ok(r) => r,
        Err(e) => {
            return Err(vec![LoadError {
                file: dir.to_path_buf(),
                line: 0,
                field: String::new(),
                message: format!("cannot read directory: {e}"),
            }])
        }
    };
    let mut texts = vec![];
    for f in files {
        match files::read_bounded(&root, &f) {
            Ok(t) => texts.push((f, t)),
            Err(message) => errors.push(LoadError {
                file: f,
                line: 0,
                field: String::new(),
                message: message.to_string(),
            }),
        }
    }
    match load_texts_with(&texts, cache) {
        Ok(d) if errors.is_empty() => Ok(d),
        Ok(_) => Err(errors),
        Err(mut e) => {
            errors.append(&mut e);
            Err(errors)
        }
    }
}

/// Parses and resolves manifest texts (`(file, content)` pairs).
pub fn load_texts(texts: &[(PathBuf, String)]) -> Result<Desired, Vec<LoadError>> {
    load_texts_with(texts, &mut ParseCache::default())
}

/// [`load_texts`], through `cache` (left holding these texts' documents).
pub fn load_texts_with(
    texts: &[(PathBuf, String)],
    cache: &mut ParseCache,
) -> Result<Desired, Vec<LoadError>> {
    let mut errors = vec![];
    let mut docs: Vec<(Doc<'_>, Document)> = vec![];
    let mut count = 0;
    let mut fresh = HashMap::default();
    for (file, text) in texts {
        for doc in split_documents(file, text) {
            count += 1;
            if count > MAX_DOCUMENTS {
                errors.push(LoadError {
                    file: file.clone(),
                    line: doc.first_line,
                    field: String::new(),
                    message: format!("more than {MAX_DOCUMENTS} documents"),
                });
                return Err(errors);
            }
            let key = (file.clone(), doc.first_line);
            let (text, parsed) = match cache.docs.remove(&key) {
                Some((seen, parsed)) if seen == doc.text => (seen, parsed),
                _ => (doc.text.clone(), check_and_parse(&doc)),
            };
            fresh.insert(key, (text, parsed.clone()));
            match parsed {
                Ok(d) => docs.push((doc, d)),
                Err(e) => errors.push(e),
            }
        }
    }
    cache.docs = fresh;
    let mut ctx = Ctx {
        errors,
        docs: &docs,
    };
    let desired = resolve(&mut ctx);
    if ctx.errors.is_empty() {
        Ok(desired)
    } else {
        Err(ctx.errors)
    }
}

/// One document's checks before YAML (see `prescan`), then its parse.
fn check_and_parse(doc: &Doc<'_>) -> Result<Document, LoadError> {
    if let Some((line, why)) = prescan(&doc.text) {
        return Err(LoadError {
            file: doc.file.to_path_buf(),
            line: doc.first_line + line - 1,
            field: String::new(),
            message: why,
        });
    }
    parse_document(doc)
}

/// The JSON Schema of a manifest document, for editors.
pub fn schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(Document)).expect("serializable")
}

#[cfg(test)]
mod tests;
