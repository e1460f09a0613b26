//! Reading images and pools: `rbd info` and metadata (one read-only librbd open when the
//! runner has the library), watchers, the trash, the start-up load of every indexed image, and
//! the statuses reported from them.

use super::*;
use crate::library::Kind;

impl<R: Runner> Ceph<R> {
    /// `rbd info`; `None` when the image does not exist (exit code ENOENT).
    pub(super) async fn info(&self, spec: &ImageSpec) -> Result<Option<RbdInfo>, CephError> {
        let inv = image_args(rbd().args(["info", "--format", "json"]), spec);
        match self.json(inv).await {
            Ok(info) => Ok(Some(info)),
            Err(e) if gone(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub(super) async fn metadata(
        &self,
        spec: &ImageSpec,
    ) -> Result<BTreeMap<String, String>, CephError> {
        let inv = image_args(rbd().args(["image-meta", "list", "--format", "json"]), spec);
        self.metadata_of(inv).await
    }

    /// Runs `rbd image-meta list --format json` as `inv` names it and reads its answer.
    pub(super) async fn metadata_of(
        &self,
        inv: Invocation,
    ) -> Result<BTreeMap<String, String>, CephError> {
        let command = inv.display();
        let out = self.run(inv).await?;
        // `rbd image-meta list` prints nothing at all for an image without metadata.
        if out.stdout.iter().all(u8::is_ascii_whitespace) {
            return Ok(BTreeMap::new());
        }
        serde_json::from_slice(&out.stdout).map_err(|source| CephError::Parse { command, source })
    }

    pub(super) async fn watchers(&self, spec: &ImageSpec) -> Result<Vec<String>, CephError> {
        let inv = image_args(rbd().args(["status", "--format", "json"]), spec);
        let status: RbdStatus = self.json(inv).await?;
        Ok(status.watchers.into_iter().map(|w| w.address).collect())
    }

    /// Whether temporary image `tmp` is older than `leftover_age` by its creation time
    /// (read through librbd; through the CLI it is never judged old: left to the next create).
    async fn old_temporary(&self, pool: &PoolName, tmp: &str) -> bool {
        let age = self.options.leftover_age;
        if age.is_zero() {
            return true;
        }
        let name = tmp.to_string();
        let what = format!("librbd creation time of {pool}/{tmp}");
        let Some(Ok(Some(at))) = self
            .library(pool, what, Kind::ShortRead, move |p| p.created_at(&name))
            .await
        else {
            return false;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        now - at >= age.as_secs() as i64
    }

    /// Size, features, metadata, parent, its clone depth and snapshots (no watchers); `None`
    /// when the image is not live.
    pub(super) async fn read(&self, spec: &ImageSpec) -> Result<Option<LiveImage>, CephError> {
        let (name, what) = (spec.image.to_string(), format!("librbd read {spec}"));
        let depths = self.depths.clone();
        if let Some(read) = self
            .library(&spec.pool, what, Kind::ShortRead, move |p| {
                let facts = p.read_image(&name)?;
                // A clone's depth: its ancestors opened at their snapshots, once per parent
                // snapshot (an ancestor this identity cannot read leaves it unknown, not the
                // read failed).
                let depth = facts
                    .as_ref()
                    .and_then(|f| f.parent.as_deref())
                    .and_then(|parent| {
                        let known = depths
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .get(parent)
                            .copied();
                        known.unwrap_or_else(|| {
                            let d = p.clone_depth(parent, MAX_DEPTH).ok().flatten();
                            // Unknown (an ancestor unreadable now) is asked again next time.
                            if d.is_some() {
                                let mut m = depths.lock().unwrap_or_else(|e| e.into_inner());
                                if m.len() >= 10_000 {
                                    m.clear();
                                }
                                m.insert(parent.to_string(), d);
                            }
                            d
                        })
                    });
                Ok(facts.map(|f| (f, depth)))
            })
            .await
        {
            return Ok(read?.map(|(f, depth)| LiveImage {
                depth,
                size: f.size,
                features: ceph_lib::feature_names(f.features)
                    .into_iter()
                    .map(String::from)
                    .collect(),
                metadata: f.metadata,
                watchers: vec![],
                parent: f.parent,
                snapshots: f.snapshots,
            }));
        }
        let Some(info) = self.info(spec).await? else {
            return Ok(None);
        };
        // The image can vanish between the commands (removed by someone else): that is "not
        // there", not a failure.
        let metadata = match self.metadata(spec).await {
            Err(e) if gone(&e) => return Ok(None),
            other => other?,
        };
        let snapshots = if info.snapshot_count == 0 {
            vec![]
        } else {
            let inv = image_args(rbd().args(["snap", "ls", "--format", "json"]), spec);
            match self.json::<Vec<json::RbdSnap>>(inv).await {
                Err(e) if gone(&e) => return Ok(None),
                other => other?.into_iter().map(|s| (s.id, s.name)).collect(),
            }
        };
        Ok(Some(LiveImage {
            // Not walked through the CLI (a process per ancestor): unknown.
            depth: None,
            size: info.size,
            features: info.features,
            metadata,
            watchers: vec![],
            parent: info.parent.as_ref().map(json::RbdParent::spec),
            snapshots,
        }))
    }

    /// As [`Ceph::read`], and the watchers too (for decisions that depend on them).
    pub(super) async fn live(&self, spec: &ImageSpec) -> Result<Option<LiveImage>, CephError> {
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

    /// `rbd trash ls --long` of a pool (it opens every trashed image: see [`Ceph::listing`]).
    pub(super) async fn trash(&self, pool: &PoolName) -> Result<Vec<TrashEntry>, CephError> {
        self.listing(&["trash", "ls", "--long", "--format", "json", "--"], pool)
            .await
    }

    /// The names of a pool's images (`rbd ls`: the pool's directory, no image opened).
    pub(super) async fn ls_names(&self, pool: &PoolName) -> Result<BTreeSet<String>, CephError> {
        let what = format!("librbd list {pool}");
        if let Some(names) = self
            .library(pool, what, Kind::Long, |p| p.image_names())
            .await
        {
            return Ok(names?.into_iter().collect());
        }
        let inv = rbd()
            .args(["ls", "--format", "json", "--"])
            .arg(pool.as_str());
        self.json(inv).await
    }

    /// `rbd ls --long` of a pool (it opens every image: see [`Ceph::listing`]).
    pub(super) async fn ls_long(&self, pool: &PoolName) -> Result<Vec<LsEntry>, CephError> {
        self.listing(&["ls", "--long", "--format", "json", "--"], pool)
            .await
    }

    /// An `rbd` listing of `pool` that opens every image it lists: an image removed between its
    /// listing and its opening (someone else's removal or purge, not a state) fails the whole
    /// command with ENOENT, so that race is retried a few times before it counts as a failure.
    async fn listing<T: serde::de::DeserializeOwned>(
        &self,
        args: &[&str],
        pool: &PoolName,
    ) -> Result<T, CephError> {
        let mut attempt = 0;
        loop {
            let inv = rbd().args(args.iter().copied()).arg(pool.as_str());
            match self.json(inv).await {
                Err(e) if gone(&e) && attempt < 4 => {
                    attempt += 1;
                    tracing::debug!(pool = %pool, attempt, command = args[0], "An image went while rbd listed it; again.");
                }
                other => return other,
            }
        }
    }

    pub(super) async fn set_metadata(
        &self,
        spec: &ImageSpec,
        key: &str,
        value: &str,
    ) -> Result<(), CephError> {
        let inv = image_args(rbd().args(["image-meta", "set"]), spec).args([key, value]);
        self.run(inv).await?;
        Ok(())
    }

    /// Removes `key` from an image's metadata; a missing key is success.
    pub(super) async fn remove_metadata(
        &self,
        spec: &ImageSpec,
        key: &str,
    ) -> Result<(), CephError> {
        let inv = image_args(rbd().args(["image-meta", "remove"]), spec).arg(key);
        match self.run(inv).await {
            Err(e) if e.code() == Some(libc_enoent()) => Ok(()),
            other => other.map(drop).map_err(Into::into),
        }
    }

    /// A live image's status; the policy comes from the image's own metadata (older agents wrote
    /// it there) or else the index entry.
    pub(super) fn live_status(
        spec: &ImageSpec,
        img: &LiveImage,
        idx: Option<&IndexValue>,
    ) -> ImageStatus {
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
            metadata: metadata.into(),
            unverified: false,
            parent: img.parent.clone(),
            clone_depth: img.depth,
            snapshots: img
                .snapshots
                .iter()
                .map(|(id, name)| protocol::SnapshotInfo {
                    id: *id,
                    name: name.clone(),
                })
                .collect(),
        }
    }

    /// The status of an image that is not live: in the trash, or missing.
    pub(super) fn gone_status(spec: &ImageSpec, trash: &[TrashEntry]) -> ImageStatus {
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
    pub(super) fn check_owner(
        spec: &ImageSpec,
        img: &LiveImage,
        owner: &Owner,
    ) -> Result<(), CephError> {
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
                    // What creates cut short left: temporary images, never exposed nor
                    // written, removed when the index names their intended owner.
                    for e in ls.iter().filter(|e| e.image.starts_with(TEMPORARY_PREFIX)) {
                        let intended = index.get(&e.image[TEMPORARY_PREFIX.len()..]);
                        let owner = intended.and_then(|i| {
                            Owner::parse(&protocol::Ownership {
                                managed_by: i.managed_by.clone()?,
                                volume: i.volume.clone(),
                            })
                            .ok()
                        });
                        // One that cannot be removed now (another agent process is
                        // removing it, or creating it again) is harmless: never exposed, and
                        // the next create of that name removes it. It does not fail the load.
                        let Some(owner) = owner else { continue };
                        // One made in the last minutes may be a create in flight (another agent
                        // process on this cluster, or one overlapping this one's start): left to
                        // the next create of that name, which removes it.
                        if !self.old_temporary(&pool, &e.image).await {
                            continue;
                        }
                        if let Err(err) = self.remove_leftover(&pool, &e.image, &owner).await {
                            tracing::warn!(
                                pool = %pool,
                                image = %e.image,
                                error = %protocol::error::chain(&err),
                                "A leftover of an interrupted create stays for now."
                            );
                        }
                    }
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
                                metadata: idx.metadata().into(),
                                unverified: true,
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
}
