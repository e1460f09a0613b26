//! Manifests: YAML documents in a directory tree, loaded, checked and resolved into the desired
//! state. Every error names the file, the line and the field; all errors are collected, not just
//! the first. Hostile input (huge files, deep nesting, alias bombs) is refused within bounds.

pub mod types;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::dpu::{FirmwareSpec, FunctionRef, SnapSpec};
use protocol::names::{
    check_env, check_host_port, check_image_ref, check_image_tag, check_uuid, CephClientId,
    ImageName, NameError, PeerName, PoolName, VolumeName,
};

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
    /// Labels (for people and tools; the plan does not read them).
    #[serde(skip)]
    pub labels: BTreeMap<String, String>,
    /// Where it was defined (not part of what it means: moving a document to another file
    /// changes nothing, so it is not serialized).
    #[serde(skip)]
    pub source: Source,
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
pub fn parse_size(s: &str) -> Result<u64, String> {
    let units: [(&str, u64); 4] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
    ];
    let (num, mult) = units
        .iter()
        .find_map(|(u, m)| s.strip_suffix(u).map(|n| (n, *m)))
        .ok_or_else(|| {
            format!("{s:?} has no binary unit: write sizes like 512Mi, 100Gi or 2Ti (G, GB and bare numbers are ambiguous)")
        })?;
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a whole number followed by Ki, Mi, Gi or Ti"))?;
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))?;
    if bytes == 0 || !bytes.is_multiple_of(1 << 20) {
        return Err(format!("{s:?} is not a positive whole number of MiB"));
    }
    Ok(bytes)
}

/// The namespace UUID derived from the backing image: the same wherever and whenever the volume
/// is re-created.
pub fn derived_uuid(cluster: &str, pool: &str, image: &str) -> String {
    const NS: uuid::Uuid = uuid::Uuid::from_u128(0x8f7c_2c3e_5b4a_4d21_9e0f_6a1b_2c3d_4e5f);
    uuid::Uuid::new_v5(&NS, format!("{cluster}/{pool}/{image}").as_bytes())
        .hyphenated()
        .to_string()
}

/// Reads every `*.yaml` / `*.yml` file under `dir` (sorted, recursively) and resolves them.
pub fn load_dir(dir: &Path) -> Result<Desired, Vec<LoadError>> {
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
    let mut texts = vec![];
    for f in files {
        match std::fs::metadata(&f) {
            Ok(m) if m.len() > MAX_FILE_BYTES => errors.push(LoadError {
                file: f,
                line: 0,
                field: String::new(),
                message: format!(
                    "{} bytes; manifest files are at most {MAX_FILE_BYTES}",
                    m.len()
                ),
            }),
            Ok(_) => match std::fs::read_to_string(&f) {
                Ok(t) => texts.push((f, t)),
                Err(e) => errors.push(LoadError {
                    file: f,
                    line: 0,
                    field: String::new(),
                    message: format!("cannot read: {e}"),
                }),
            },
            Err(e) => errors.push(LoadError {
                file: f,
                line: 0,
                field: String::new(),
                message: format!("cannot read: {e}"),
            }),
        }
    }
    match load_texts(&texts) {
        Ok(d) if errors.is_empty() => Ok(d),
        Ok(_) => Err(errors),
        Err(mut e) => {
            errors.append(&mut e);
            Err(errors)
        }
    }
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>, errors: &mut Vec<LoadError>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            errors.push(LoadError {
                file: dir.to_path_buf(),
                line: 0,
                field: String::new(),
                message: format!("cannot read directory: {e}"),
            });
            return;
        }
    };
    for e in entries.flatten() {
        let p = e.path();
        let name = e.file_name();
        let name = name.to_string_lossy();
        // Editors' and git's leftovers are not manifests.
        if name.starts_with('.') || name.ends_with('~') {
            continue;
        }
        match e.file_type() {
            Ok(t) if t.is_dir() => collect(&p, out, errors),
            Ok(_) if name.ends_with(".yaml") || name.ends_with(".yml") => out.push(p),
            _ => {}
        }
        if out.len() > MAX_FILES {
            return;
        }
    }
}

/// One document's text and position.
struct Doc<'a> {
    file: &'a Path,
    first_line: usize,
    text: String,
}

/// Splits a file into documents at `---` lines, keeping each document's first line.
fn split_documents<'a>(file: &'a Path, text: &str) -> Vec<Doc<'a>> {
    let mut docs = vec![];
    let mut cur = String::new();
    let mut first = 1;
    for (i, line) in text.lines().enumerate() {
        if line == "---" || line.starts_with("--- ") || line.starts_with("---\t") {
            if !cur.trim().is_empty() {
                docs.push(Doc {
                    file,
                    first_line: first,
                    text: std::mem::take(&mut cur),
                });
            }
            cur.clear();
            first = i + 2;
            continue;
        }
        if line == "..." {
            continue;
        }
        cur.push_str(line);
        cur.push('\n');
    }
    if !cur.trim().is_empty() {
        docs.push(Doc {
            file,
            first_line: first,
            text: cur,
        });
    }
    docs
}

/// Collections nested deeper than this are refused before deserializing.
const MAX_DEPTH: usize = 32;

/// Looks, with a YAML parser's events (`yaml-rust2`), for what a manifest never needs and a
/// hostile document uses: anchors (`&a`) and aliases (`*a`) — alias expansion is how "billion
/// laughs" documents blow up — and collections nested deeper than [`MAX_DEPTH`], flow or block.
/// Events, not text: `note: storage & compute` is a plain scalar, `"*1Gi"` a quoted one. Stops at
/// the first finding (the parser does not recurse and never expands an alias), so hostile input
/// costs one pass at most. Returns the 1-based line and the reason (a syntax error too).
fn prescan(text: &str) -> Option<(usize, String)> {
    use yaml_rust2::parser::{Event, Parser};
    const ANCHORS: &str = "YAML anchors and aliases are not allowed in manifests";
    let mut parser = Parser::new_from_str(text);
    let mut depth = 0usize;
    loop {
        let (event, mark) = match parser.next_token() {
            Ok(t) => t,
            // The scanner's own nesting limit (it counts flow levels in a byte).
            Err(e) if e.info().contains("recursion limit") => {
                return Some((
                    e.marker().line(),
                    format!("nested deeper than {MAX_DEPTH} levels"),
                ))
            }
            // Not YAML: said here, with the parser's reason, rather than handing a document
            // that defeats one parser to another.
            Err(e) => return Some((e.marker().line(), format!("not valid YAML: {}", e.info()))),
        };
        match event {
            Event::StreamEnd => return None,
            Event::Alias(_) => return Some((mark.line(), ANCHORS.into())),
            Event::Scalar(_, _, anchor, _) if anchor > 0 => {
                return Some((mark.line(), ANCHORS.into()))
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                if anchor > 0 {
                    return Some((mark.line(), ANCHORS.into()));
                }
                depth += 1;
                if depth > MAX_DEPTH {
                    return Some((
                        mark.line(),
                        format!("nested deeper than {MAX_DEPTH} levels"),
                    ));
                }
            }
            Event::SequenceEnd | Event::MappingEnd => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
}

/// Finds the line of `path` (keys from the document's root) in `text`; 0-based.
fn locate(text: &str, path: &[&str]) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut start = 0;
    let mut parent: isize = -1;
    let mut found = None;
    for key in path {
        let mut hit = None;
        for (i, l) in lines.iter().enumerate().skip(start) {
            let t = l.trim_start();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let indent = (l.len() - t.len()) as isize;
            if found.is_some() && indent <= parent {
                break;
            }
            let t = t.strip_prefix("- ").unwrap_or(t);
            if t.starts_with(&format!("{key}:")) {
                hit = Some((i, indent));
                break;
            }
        }
        match hit {
            Some((i, indent)) => {
                found = Some(i);
                start = i + 1;
                parent = indent;
            }
            None => break,
        }
    }
    found
}

struct Ctx<'a> {
    errors: Vec<LoadError>,
    docs: &'a [(Doc<'a>, Document)],
}

impl Ctx<'_> {
    fn err(&mut self, doc: usize, path: &str, message: impl Into<String>) {
        let d = &self.docs[doc].0;
        let keys: Vec<&str> = path.split('.').filter(|k| !k.is_empty()).collect();
        let line = d.first_line + locate(&d.text, &keys).unwrap_or(0);
        self.errors.push(LoadError {
            file: d.file.to_path_buf(),
            line,
            field: path.to_string(),
            message: message.into(),
        });
    }

    fn name_err(&mut self, doc: usize, path: &str, e: NameError) {
        self.err(doc, path, format!("{}: {}", e.shown, e.reason));
    }

    fn source(&self, doc: usize) -> Source {
        let d = &self.docs[doc].0;
        Source {
            file: d.file.to_path_buf(),
            line: d.first_line,
        }
    }
}

/// Parses and resolves manifest texts (`(file, content)` pairs).
pub fn load_texts(texts: &[(PathBuf, String)]) -> Result<Desired, Vec<LoadError>> {
    let mut errors = vec![];
    let mut docs: Vec<(Doc<'_>, Document)> = vec![];
    let mut count = 0;
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
            if let Some((line, why)) = prescan(&doc.text) {
                errors.push(LoadError {
                    file: file.clone(),
                    line: doc.first_line + line - 1,
                    field: String::new(),
                    message: why,
                });
                continue;
            }
            match parse_document(&doc) {
                Ok(d) => docs.push((doc, d)),
                Err(e) => errors.push(e),
            }
        }
    }
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

/// Parses one document: YAML first (syntax errors carry their line), then the typed kind through
/// `serde_path_to_error`, so that type errors name the field, whose line is then looked up.
fn parse_document(doc: &Doc<'_>) -> Result<Document, LoadError> {
    let fail = |line: usize, field: String, message: String| LoadError {
        file: doc.file.to_path_buf(),
        line,
        field,
        message,
    };
    let value: serde_yaml::Value = serde_yaml::from_str(&doc.text).map_err(|e| {
        let line = e
            .location()
            .map(|l| doc.first_line + l.line() - 1)
            .unwrap_or(doc.first_line);
        let msg = e.to_string();
        let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        fail(line, String::new(), msg)
    })?;
    let kind = value
        .get("kind")
        .and_then(serde_yaml::Value::as_str)
        .map(str::to_string);
    let at = |path: &str, extra: Option<&str>| {
        let mut keys: Vec<&str> = path
            .split('.')
            .filter(|k| !k.is_empty() && *k != "?")
            .collect();
        keys.extend(extra);
        doc.first_line + locate(&doc.text, &keys).unwrap_or(0)
    };
    fn typed<S: serde::de::DeserializeOwned>(
        v: serde_yaml::Value,
    ) -> Result<Object<S>, serde_path_to_error::Error<serde_yaml::Error>> {
        let mut mapping = v;
        if let Some(m) = mapping.as_mapping_mut() {
            m.remove("kind");
        }
        serde_path_to_error::deserialize(mapping)
    }
    let result = match kind.as_deref() {
        Some("CephCluster") => typed(value).map(Document::CephCluster),
        Some("Dpu") => typed(value).map(Document::Dpu),
        Some("Volume") => typed(value).map(Document::Volume),
        Some(other) => {
            return Err(fail(
                at("kind", None),
                "kind".into(),
                format!("unknown kind {other:?}: expected CephCluster, Dpu or Volume"),
            ))
        }
        None => {
            return Err(fail(
                doc.first_line,
                "kind".into(),
                "missing: every document needs a kind (CephCluster, Dpu or Volume)".into(),
            ))
        }
    };
    result.map_err(|e| {
        let path = e.path().to_string();
        let msg = e.inner().to_string();
        let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
        // For an unknown field, point at the field itself.
        let unknown = msg
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next());
        let field = match unknown {
            Some(u) if path == "." || path.is_empty() => u.to_string(),
            // Some paths already end at the unknown key.
            Some(u) if path == u || path.ends_with(&format!(".{u}")) => path.clone(),
            Some(u) => format!("{path}.{u}"),
            None => path.clone(),
        };
        fail(at(&path, unknown), field, msg)
    })
}

fn check_meta<S>(ctx: &mut Ctx<'_>, i: usize, o: &Object<S>) -> bool {
    let mut ok = true;
    if o.api_version != API_VERSION {
        ctx.err(
            i,
            "apiVersion",
            format!("{:?} is not {API_VERSION:?}", o.api_version),
        );
        ok = false;
    }
    if let Err(e) = VolumeName::parse("metadata.name", &o.metadata.name) {
        ctx.name_err(i, "metadata.name", e);
        ok = false;
    }
    ok
}

fn resolve(ctx: &mut Ctx<'_>) -> Desired {
    let mut d = Desired::default();
    let mut seen: BTreeMap<(&str, String), usize> = BTreeMap::new();
    let docs = ctx.docs;
    // Names are unique per kind.
    for (i, (_, doc)) in docs.iter().enumerate() {
        let (kind, name) = match doc {
            Document::CephCluster(o) => ("CephCluster", &o.metadata.name),
            Document::Dpu(o) => ("Dpu", &o.metadata.name),
            Document::Volume(o) => ("Volume", &o.metadata.name),
        };
        if let Some(first) = seen.insert((kind, name.clone()), i) {
            let at = ctx.source(first);
            ctx.err(
                i,
                "metadata.name",
                format!("{kind} {name:?} is defined twice (also at {at})"),
            );
        }
    }
    for (i, (_, doc)) in docs.iter().enumerate() {
        match doc {
            Document::CephCluster(o) => {
                if let Some(c) = resolve_cluster(ctx, i, o) {
                    d.clusters.entry(c.name.clone()).or_insert(c);
                }
            }
            Document::Dpu(o) => {
                if let Some(x) = resolve_dpu(ctx, i, o) {
                    d.dpus.entry(x.name.clone()).or_insert(x);
                }
            }
            Document::Volume(_) => {}
        }
    }
    // One DPU per host.
    let mut hosts: BTreeMap<String, String> = BTreeMap::new();
    for (i, (_, doc)) in docs.iter().enumerate() {
        if let Document::Dpu(o) = doc {
            if let Some(other) = hosts.insert(o.spec.host.clone(), o.metadata.name.clone()) {
                if other != o.metadata.name {
                    ctx.err(
                        i,
                        "spec.host",
                        format!(
                            "host {:?} already has DPU {other:?}; volumes name hosts, so a host has one DPU",
                            o.spec.host
                        ),
                    );
                }
            }
        }
    }
    let mut queues: BTreeMap<(String, FunctionRef), (u32, String, usize)> = BTreeMap::new();
    let mut images: BTreeMap<(String, String, String), (String, usize)> = BTreeMap::new();
    let mut slots: BTreeMap<(String, FunctionRef, u32), (String, usize)> = BTreeMap::new();
    for (i, (_, doc)) in docs.iter().enumerate() {
        let Document::Volume(o) = doc else { continue };
        let Some(v) = resolve_volume(ctx, i, o, &d, &hosts) else {
            continue;
        };
        let img = (v.cluster.clone(), v.pool.to_string(), v.image.to_string());
        if let Some((other, at)) = images.get(&img) {
            let at = ctx.source(*at);
            ctx.err(
                i,
                "spec.rbd",
                format!(
                    "image {}/{}/{} is already used by volume {other:?} ({at})",
                    img.0, img.1, img.2
                ),
            );
            continue;
        }
        images.insert(img, (v.name.to_string(), i));
        // Volumes on one function share its controller, and so its queue count.
        let key = (v.dpu.clone(), v.function);
        if let Some((q, other, at)) = queues.get(&key) {
            if *q != v.queues {
                let at = ctx.source(*at);
                ctx.err(
                    i,
                    "spec.queues",
                    format!(
                        "{} queues, but volume {other:?} ({at}) on the same function ({} of DPU {}) has {q}: they share one controller",
                        v.queues, v.function, v.dpu
                    ),
                );
                continue;
            }
        } else {
            queues.insert(key, (v.queues, v.name.to_string(), i));
        }
        if let Some(nsid) = v.nsid {
            let slot = (v.dpu.clone(), v.function, nsid);
            if let Some((other, at)) = slots.get(&slot) {
                let at = ctx.source(*at);
                ctx.err(
                    i,
                    "spec.nvme.nsid",
                    format!(
                        "DPU {} function {} NSID {nsid} is already volume {other:?} ({at})",
                        v.dpu, v.function
                    ),
                );
                continue;
            }
            slots.insert(slot, (v.name.to_string(), i));
        }
        d.volumes.entry(v.name.to_string()).or_insert(v);
    }
    d
}

fn resolve_agent(ctx: &mut Ctx<'_>, i: usize, a: &AgentRef) -> Option<PeerName> {
    let name = PeerName::parse("spec.agent.name", &a.name)
        .map_err(|e| ctx.name_err(i, "spec.agent.name", e))
        .ok();
    if let Err(e) = check_host_port("spec.agent.address", &a.address) {
        ctx.name_err(i, "spec.agent.address", e);
        return None;
    }
    name
}

fn resolve_cluster(ctx: &mut Ctx<'_>, i: usize, o: &Object<CephClusterSpec>) -> Option<Cluster> {
    let ok = check_meta(ctx, i, o);
    let agent = resolve_agent(ctx, i, &o.spec.agent);
    let mut pools = vec![];
    if o.spec.pools.is_empty() {
        ctx.err(i, "spec.pools", "at least one pool is needed");
    }
    for (n, p) in o.spec.pools.iter().enumerate() {
        match PoolName::parse(&format!("spec.pools[{n}]"), p) {
            Ok(p) => pools.push(p),
            Err(e) => ctx.name_err(i, "spec.pools", e),
        }
    }
    for m in &o.spec.monitors {
        if let Err(e) = check_host_port("spec.monitors", m) {
            ctx.name_err(i, "spec.monitors", e);
        }
    }
    let client = CephClientId::parse(
        "spec.snapIdentity.clientId",
        &o.spec.snap_identity.client_id,
    )
    .map_err(|e| ctx.name_err(i, "spec.snapIdentity.clientId", e))
    .ok();
    if o.spec.snap_identity.client_id == "admin" {
        ctx.err(
            i,
            "spec.snapIdentity.clientId",
            "SNAP must not use client.admin: name a least-privilege identity",
        );
        return None;
    }
    Some(Cluster {
        name: o.metadata.name.clone(),
        agent: agent?,
        address: o.spec.agent.address.clone(),
        monitors: o.spec.monitors.clone(),
        pools: if ok && pools.len() == o.spec.pools.len() {
            pools
        } else {
            return None;
        },
        snap_client: client?,
        source: ctx.source(i),
    })
}

fn resolve_dpu(ctx: &mut Ctx<'_>, i: usize, o: &Object<DpuSpec>) -> Option<Dpu> {
    let before = ctx.errors.len();
    check_meta(ctx, i, o);
    let agent = resolve_agent(ctx, i, &o.spec.agent);
    if let Err(e) = VolumeName::parse("spec.host", &o.spec.host) {
        ctx.name_err(i, "spec.host", e);
    }
    let s = &o.spec.snap;
    if let Err(e) = check_image_ref("spec.snap.image", &s.image) {
        ctx.name_err(i, "spec.snap.image", e);
    }
    if let Err(e) = check_image_tag("spec.snap.version", &s.version) {
        ctx.name_err(i, "spec.snap.version", e);
    }
    for (k, v) in &s.env {
        if let Err(e) = check_env("spec.snap.env", k, v) {
            ctx.name_err(i, "spec.snap.env", e);
        }
    }
    let hugepages = match parse_size(&s.hugepages) {
        Ok(b) => b >> 20,
        Err(e) => {
            ctx.err(i, "spec.snap.hugepages", e);
            0
        }
    };
    let f = &s.functions;
    use protocol::dpu::{BLUEFIELD3_MAX_VFS, BLUEFIELD3_PFS};
    if !BLUEFIELD3_PFS.contains(&f.pfs) {
        ctx.err(
            i,
            "spec.snap.functions.pfs",
            format!(
                "{} PFs; a BlueField-3 offers {}-{} static NVMe PFs",
                f.pfs,
                BLUEFIELD3_PFS.start(),
                BLUEFIELD3_PFS.end()
            ),
        );
    }
    if f.vfs_per_pf > BLUEFIELD3_MAX_VFS {
        ctx.err(
            i,
            "spec.snap.functions.vfsPerPf",
            format!(
                "{} VFs per PF; a BlueField-3 offers at most {BLUEFIELD3_MAX_VFS}",
                f.vfs_per_pf
            ),
        );
    }
    if ctx.errors.len() > before {
        return None;
    }
    Some(Dpu {
        name: o.metadata.name.clone(),
        agent: agent?,
        address: o.spec.agent.address.clone(),
        host: o.spec.host.clone(),
        snap: SnapSpec {
            image: s.image.clone(),
            tag: s.version.clone(),
            env: s.env.clone(),
            hugepages_mib: hugepages,
            cpu: "8".into(),
            memory: "2Gi".into(),
            firmware: FirmwareSpec {
                nvme_pfs: f.pfs,
                nvme_vfs: f.vfs_per_pf,
            },
        },
        source: ctx.source(i),
    })
}

fn resolve_volume(
    ctx: &mut Ctx<'_>,
    i: usize,
    o: &Object<VolumeSpec>,
    d: &Desired,
    hosts: &BTreeMap<String, String>,
) -> Option<Volume> {
    let before = ctx.errors.len();
    check_meta(ctx, i, o);
    let s = &o.spec;
    let dpu = match hosts.get(&s.host) {
        Some(dpu) => d.dpus.get(dpu),
        None => {
            ctx.err(
                i,
                "spec.host",
                format!("host {:?} has no DPU: no Dpu manifest names it", s.host),
            );
            None
        }
    };
    let size = parse_size(&s.size)
        .map_err(|e| ctx.err(i, "spec.size", e))
        .ok();
    let cluster = match d.clusters.get(&s.rbd.cluster) {
        Some(c) => Some(c),
        None => {
            ctx.err(
                i,
                "spec.rbd.cluster",
                format!("no CephCluster named {:?}", s.rbd.cluster),
            );
            None
        }
    };
    let pool = PoolName::parse("spec.rbd.pool", &s.rbd.pool)
        .map_err(|e| ctx.name_err(i, "spec.rbd.pool", e))
        .ok();
    if let (Some(c), Some(p)) = (cluster, &pool) {
        if !c.pools.contains(p) {
            ctx.err(
                i,
                "spec.rbd.pool",
                format!("pool {p:?} is not one of cluster {:?}'s pools", c.name),
            );
        }
    }
    let image_name = s
        .rbd
        .image
        .clone()
        .unwrap_or_else(|| o.metadata.name.clone());
    let image = ImageName::parse("spec.rbd.image", &image_name)
        .map_err(|e| ctx.name_err(i, "spec.rbd.image", e))
        .ok();
    let function = FunctionRef {
        pf: s.nvme.pf,
        vf: s.nvme.vf,
    };
    check_nvme(ctx, i, &s.nvme, dpu);
    if !(1..=32).contains(&s.queues) {
        ctx.err(i, "spec.queues", format!("{} queues; 1-32", s.queues));
    }
    let retention = humantime::parse_duration(&s.trash_retention)
        .map_err(|e| {
            ctx.err(
                i,
                "spec.trashRetention",
                format!("{:?}: {e}", s.trash_retention),
            )
        })
        .ok();
    if ctx.errors.len() > before {
        return None;
    }
    let (dpu, size, cluster, pool, image, retention) =
        (dpu?, size?, cluster?, pool?, image?, retention?);
    Some(Volume {
        name: VolumeName::parse("metadata.name", &o.metadata.name).ok()?,
        host: s.host.clone(),
        dpu: dpu.name.clone(),
        size_bytes: size,
        uuid: s
            .nvme
            .uuid
            .clone()
            .unwrap_or_else(|| derived_uuid(&cluster.name, pool.as_str(), image.as_str())),
        cluster: cluster.name.clone(),
        pool,
        image,
        function,
        nsid: s.nvme.nsid,
        queues: s.queues,
        deletion_policy: s.deletion_policy,
        trash_retention: retention,
        labels: o.metadata.labels.clone(),
        source: ctx.source(i),
    })
}

/// A volume's NVMe placement against its DPU: the PF and VF exist, the NSID and UUID are valid.
fn check_nvme(ctx: &mut Ctx<'_>, i: usize, nvme: &types::NvmePlacement, dpu: Option<&Dpu>) {
    if let Some(dpu) = dpu {
        let fw = &dpu.snap.firmware;
        if nvme.pf >= fw.nvme_pfs {
            ctx.err(
                i,
                "spec.nvme.pf",
                format!(
                    "PF {} but DPU {} exposes {} PF(s)",
                    nvme.pf, dpu.name, fw.nvme_pfs
                ),
            );
        }
        if let Some(vf) = nvme.vf {
            if vf >= fw.nvme_vfs {
                ctx.err(
                    i,
                    "spec.nvme.vf",
                    format!(
                        "VF {vf} but DPU {} exposes {} VF(s) per PF",
                        dpu.name, fw.nvme_vfs
                    ),
                );
            }
        }
    }
    if let Some(n) = nvme.nsid {
        if !(1..=1024).contains(&n) {
            ctx.err(i, "spec.nvme.nsid", format!("NSID {n} is not 1-1024"));
        }
    }
    if let Some(u) = &nvme.uuid {
        if let Err(e) = check_uuid("spec.nvme.uuid", u) {
            ctx.name_err(i, "spec.nvme.uuid", e);
        }
    }
}

/// The JSON Schema of a manifest document, for editors.
pub fn schema() -> serde_json::Value {
    serde_json::to_value(schemars::schema_for!(Document)).expect("serializable")
}

#[cfg(test)]
mod tests;
