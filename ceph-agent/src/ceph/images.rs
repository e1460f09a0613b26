//! Mutations of images: create (one `rbd import` after the index entry), grow, trash,
//! restore, delete — each checking ownership, each idempotent.

use super::*;
use crate::library::Kind;

impl<R: Runner> Ceph<R> {
    /// Creates an owned image, or succeeds when the same image already exists.
    ///
    /// An image the view does not know costs the index entry (intent, owner, policy), then the
    /// image made with its ownership keys under a temporary name and renamed into place (see
    /// [`Self::make_temporary`]). One the view knows as live is read (it may have changed
    /// behind our back) and compared.
    pub async fn create_image(
        &self,
        spec: &ImageSpec,
        size: u64,
        features: &[String],
        owner: &Owner,
        policy: Option<&Policy>,
    ) -> Result<ImageStatus, CephError> {
        self.create_image_from(spec, size, features, owner, policy, None)
            .await
    }

    /// [`Self::create_image`], the image a copy-on-write clone of `source` (clone format 2: no
    /// protection of the snapshot) grown to `size` when that is larger than the snapshot; a
    /// size below the snapshot's is refused before anything is written. Made under the
    /// temporary name like any create (clone, the keys, the grow, then the rename): killed part
    /// way, a temporary image is left, removed by the next create of that name or the next load.
    /// An image that exists is judged as any create's (its source is not compared).
    #[tracing::instrument(skip_all, fields(image = %spec))]
    pub async fn create_image_from(
        &self,
        spec: &ImageSpec,
        size: u64,
        features: &[String],
        owner: &Owner,
        policy: Option<&Policy>,
        source: Option<&SnapSpec>,
    ) -> Result<ImageStatus, CephError> {
        check_size("size_bytes", size)?;
        let features = check_features(features)?;
        self.load().await?;
        let grow_clone_to = match source {
            Some(src) => {
                let from = self.snapshot_size(src).await?;
                if size < from {
                    return Err(CephError::Invalid {
                        field: "size_bytes",
                        message: format!(
                            "{size} bytes is smaller than snapshot {src} ({from} bytes): a clone cannot be smaller than its source"
                        ),
                    });
                }
                Some((src, (size > from).then_some(size)))
            }
            None => None,
        };
        let known = self.view().get(spec).cloned();
        let value = IndexValue::of(owner, policy, features.clone());
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
                match self
                    .import_then_rename(spec, size, &features, owner, grow_clone_to)
                    .await?
                {
                    true => {
                        let img = LiveImage {
                            size,
                            features: features.clone(),
                            metadata: BTreeMap::from([
                                (META_MANAGED_BY.to_string(), owner.managed_by.to_string()),
                                (META_VOLUME.to_string(), owner.volume.to_string()),
                            ]),
                            watchers: vec![],
                            parent: source.map(ToString::to_string),
                            // Its ancestors are walked when it is next read.
                            depth: None,
                            snapshots: vec![],
                        };
                        return Ok(self.record(spec, Self::live_status(spec, &img, Some(&value))));
                    }
                    // The name was taken after all: ours from a create whose answer was lost,
                    // or someone else's. Decided below by its own keys.
                    false => found = self.live(spec).await?,
                }
            }
            let Some(img) = found else {
                return Err(CephError::Conflict {
                    spec: spec.to_string(),
                    diff: "another client keeps creating and removing it".into(),
                });
            };
            // Ours only by its own keys: an image under its final name always carries them
            // (made under a temporary name, renamed once complete), so one without them is
            // someone else's, whatever the index says.
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
            // `operations` is librbd's own (a clone format 2 child has it), never asked for.
            let have: BTreeSet<&String> =
                img.features.iter().filter(|f| *f != "operations").collect();
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

    /// Takes over an image that exists without an owner: refused while anyone has it open
    /// (a watcher) and when it carries another owner's keys; the index entry first (intent),
    /// then the ownership and policy keys. An image already this volume's is success.
    pub async fn adopt_image(
        &self,
        spec: &ImageSpec,
        owner: &Owner,
        policy: Option<&Policy>,
    ) -> Result<ImageStatus, CephError> {
        self.load().await?;
        self.mutation(spec, async {
            let img = self.live(spec).await?.ok_or_else(|| CephError::NotFound {
                spec: spec.to_string(),
                hint: " (there is nothing to adopt)".into(),
            })?;
            let claimed = img.metadata.contains_key(META_MANAGED_BY)
                || img.metadata.contains_key(META_VOLUME);
            if claimed {
                // Ours already (an adoption that completed), or someone else's: never taken.
                Self::check_owner(spec, &img, owner)?;
            } else {
                self.refuse_in_use(spec, &img).await?;
            }
            let value = IndexValue::of(owner, policy, img.features.clone());
            self.index_change(spec, Some(&value)).await?;
            if !claimed {
                tracing::info!(image = %spec, volume = %owner.volume, "Adopting an image on request.");
                self.set_metadata(spec, META_MANAGED_BY, owner.managed_by.as_str())
                    .await?;
                self.set_metadata(spec, META_VOLUME, owner.volume.as_str())
                    .await?;
            }
            let img = self.owned_live(spec, owner).await?;
            let idx = self.write_policy(spec, &img, &value, policy).await?;
            Ok(self.record(spec, Self::live_status(spec, &img, Some(&idx))))
        })
        .await
    }

    /// Images as the cluster has them now (whoever owns them): the view's status when it holds
    /// the image, else read (live with its metadata and watchers, or missing). The images not in
    /// the view are first looked for in their pool's listing (`rbd ls`, one command per pool):
    /// only those listed are read, so probing the images of a fleet about to be created costs a
    /// listing, not a command per image.
    pub async fn probe_images(&self, specs: &[ImageSpec]) -> Result<Vec<ImageStatus>, CephError> {
        self.load().await?;
        use std::collections::btree_map::Entry;
        let mut listed: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
        let mut out = vec![];
        for spec in specs {
            let known = self.view().get(spec).cloned();
            // Reported from the index alone: read from the image, whose keys decide.
            if let Some(known) = known.filter(|k| !k.unverified) {
                out.push(known);
                continue;
            }
            let names = match listed.entry(spec.pool.as_str()) {
                Entry::Occupied(e) => e.into_mut(),
                Entry::Vacant(e) => e.insert(self.ls_names(&spec.pool).await?),
            };
            let live = if names.contains(spec.image.as_str()) {
                self.live(spec).await?
            } else {
                None
            };
            out.push(match live {
                Some(img) => {
                    let idx = self.index_entry(spec).await?;
                    Self::live_status(spec, &img, idx.as_ref())
                }
                None => Self::gone_status(spec, &[]),
            });
        }
        Ok(out)
    }

    /// Makes the index entry (and any policy keys an older agent left on the image) say
    /// `policy`; returns the entry in force.
    pub(super) async fn write_policy(
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
    /// Makes the image and its ownership keys under a temporary name (`.unistor-new.<name>`:
    /// no manifest can name it, image names start with a letter or digit; see
    /// [`Self::make_temporary`]), then renames it into place: the final name never exists
    /// without the keys. False when the final name is
    /// taken (the temporary image is removed then).
    ///
    /// Killed before the temporary image is made: the index entry alone (the next create
    /// makes the image). While it is made: a partial or keyless temporary image, removed by the
    /// next create of that image or by the agent's start-up load. Between it and the rename: a
    /// complete temporary image, likewise. After the rename: the image, with its keys.
    async fn import_then_rename(
        &self,
        spec: &ImageSpec,
        size: u64,
        features: &[String],
        owner: &Owner,
        clone: Option<(&SnapSpec, Option<u64>)>,
    ) -> Result<bool, CephError> {
        let tmp = temporary_name(spec.image.as_str());
        let make = || async {
            match clone {
                Some((src, grow_to)) => {
                    self.clone_temporary(spec, &tmp, src, grow_to, features, owner)
                        .await
                }
                None => self.make_temporary(spec, &tmp, size, features, owner).await,
            }
        };
        match make().await {
            Ok(()) => {}
            // A leftover of an earlier create cut short: removed, then made again.
            Err(e) if e.code() == Some(libc_eexist()) => {
                self.remove_leftover(&spec.pool, &tmp, owner).await?;
                make().await?;
            }
            Err(e) => return Err(e.into()),
        }
        match self
            .rename_image(&spec.pool, &tmp, spec.image.as_str())
            .await
        {
            Ok(()) => Ok(true),
            Err(e) if e.code() == Some(libc_eexist()) => {
                self.remove_leftover(&spec.pool, &tmp, owner).await?;
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Makes image `tmp` with the ownership keys: through librbd, a create then the keys (killed
    /// between the two: a temporary image without keys, which [`Self::remove_leftover`] takes
    /// as an interrupted create's); through the CLI, one `rbd import` of an empty
    /// export-format-2 stream that carries them. EEXIST when `tmp` exists.
    #[tracing::instrument(skip_all)]
    async fn make_temporary(
        &self,
        spec: &ImageSpec,
        tmp: &str,
        size: u64,
        features: &[String],
        owner: &Owner,
    ) -> Result<(), CliError> {
        let keys = [
            (META_MANAGED_BY, owner.managed_by.as_str()),
            (META_VOLUME, owner.volume.as_str()),
        ];
        let bits: Option<u64> = features.iter().map(|f| ceph_lib::feature_bit(f)).sum();
        if let Some(bits) = bits {
            let name = tmp.to_string();
            let owned = keys.map(|(k, v)| (k, v.to_string()));
            let what = format!("librbd create {}/{tmp} with its keys", spec.pool);
            let made = self
                .library(&spec.pool, what, Kind::Long, move |p| {
                    p.create_image(&name, size, bits)?;
                    p.set_metadata(&name, &owned.each_ref().map(|(k, v)| (*k, v.as_str())))
                })
                .await;
            if let Some(made) = made {
                return made;
            }
        }
        let stream = crate::import_stream::empty_image(size, keys);
        let import = rbd()
            .args(["import", "--export-format", "2", "--no-progress"])
            .args(["--image-feature", &features.join(",")])
            .args(["--dest-pool", spec.pool.as_str(), "--", "-"])
            .arg(tmp)
            .stdin(stream);
        self.run(import).await.map(drop)
    }

    /// Copies a clone's parent data into it (`rbd flatten`): it no longer depends on its
    /// snapshot. An owned image that is not a clone (never was, or already flattened) is
    /// success as it is. Killed part way: librbd's flatten is resumable, the image is still a
    /// clone until it completes, and the next flatten finishes it.
    #[tracing::instrument(skip_all, fields(image = %spec))]
    pub async fn flatten_image(
        &self,
        spec: &ImageSpec,
        owner: &Owner,
    ) -> Result<ImageStatus, CephError> {
        self.load().await?;
        self.mutation(spec, async {
            let img = self.owned_live(spec, owner).await?;
            if img.parent.is_some() {
                tracing::info!(image = %spec, parent = ?img.parent, "Flattening a clone.");
                let inv = image_args(rbd().args(["flatten", "--no-progress"]), spec);
                match self.run(inv).await {
                    Ok(_) => {}
                    // Flattened meanwhile (another client): nothing left to copy.
                    Err(e) if e.code() == Some(22) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            self.reread(spec).await
        })
        .await
    }

    /// Takes snapshot `snap` of an owned image; an existing snapshot of that name is success.
    /// A declared (not scheduled) name is first added to the image's `unistor.snapshots` key,
    /// then the snapshot is taken. Killed between: the key names a snapshot that does not exist
    /// (harmless: the next create takes it, a removal of a missing one only drops the name).
    /// Crash-consistent: the snapshot holds every write the cluster acknowledged before it and
    /// none after, as a power cut would leave the disk (librbd orders it behind in-flight I/O).
    #[tracing::instrument(skip_all, fields(snapshot = %snap))]
    pub async fn create_snapshot(
        &self,
        snap: &SnapSpec,
        owner: &Owner,
    ) -> Result<ImageStatus, CephError> {
        let spec = &snap.image;
        self.load().await?;
        self.mutation(spec, async {
            let img = self.owned_live(spec, owner).await?;
            if img
                .snapshots
                .iter()
                .any(|(_, n)| n == snap.snapshot.as_str())
            {
                return self.reread(spec).await;
            }
            let name = snap.snapshot.as_str();
            let listed = recorded(&img);
            if protocol::meta::scheduled_at(name).is_none() && !listed.contains(&name) {
                let with: Vec<&str> = listed.iter().copied().chain([name]).collect();
                self.record_snapshots(spec, &with).await?;
            }
            tracing::info!(snapshot = %snap, "Taking a snapshot.");
            // Taken meanwhile (another client, or our own call whose answer was lost): done.
            self.snap_call(snap, SnapCall::Create).await?;
            self.reread(spec).await
        })
        .await
    }

    /// Removes snapshot `snap` of an owned image, then drops its name from the image's
    /// `unistor.snapshots` key; a missing snapshot is success. Refused while the snapshot has
    /// clones (with clone format 2 librbd would move it to its trash and keep it for them:
    /// unistor says so instead, naming them). Killed after the removal and before the key is
    /// rewritten: the key names a missing snapshot, dropped by the next removal.
    #[tracing::instrument(skip_all, fields(snapshot = %snap))]
    pub async fn remove_snapshot(
        &self,
        snap: &SnapSpec,
        owner: &Owner,
    ) -> Result<ImageStatus, CephError> {
        let spec = &snap.image;
        self.load().await?;
        self.mutation(spec, async {
            let img = self.owned_live(spec, owner).await?;
            let name = snap.snapshot.as_str();
            if img.snapshots.iter().any(|(_, n)| n == name) {
                let clones = self.snapshot_children(snap).await?;
                if !clones.is_empty() {
                    return Err(CephError::HasClones {
                        spec: snap.to_string(),
                        clones,
                    });
                }
                tracing::info!(snapshot = %snap, "Removing a snapshot.");
                self.snap_call(snap, SnapCall::Remove).await?;
            }
            let listed = recorded(&img);
            if listed.contains(&name) {
                let rest: Vec<&str> = listed.into_iter().filter(|n| *n != name).collect();
                self.record_snapshots(spec, &rest).await?;
            }
            self.reread(spec).await
        })
        .await
    }

    /// Writes `names` as the image's `unistor.snapshots` key (removed when empty: `rbd
    /// image-meta set` refuses an empty value).
    async fn record_snapshots(&self, spec: &ImageSpec, names: &[&str]) -> Result<(), CephError> {
        if names.is_empty() {
            self.remove_metadata(spec, META_SNAPSHOTS).await
        } else {
            self.set_metadata(spec, META_SNAPSHOTS, &names.join(","))
                .await
        }
    }

    /// Takes or removes `snap` through librbd in process, else the CLI; the state already
    /// reached (EEXIST for a take, ENOENT for a removal) is success.
    async fn snap_call(&self, snap: &SnapSpec, call: SnapCall) -> Result<(), CephError> {
        let (image, s) = (snap.image.image.to_string(), snap.snapshot.to_string());
        let (verb, done_errno) = match call {
            SnapCall::Create => ("create", libc_eexist()),
            SnapCall::Remove => ("rm", libc_enoent()),
        };
        let what = format!("librbd snap {verb} {snap}");
        let done = match self
            .library(&snap.image.pool, what, Kind::Long, move |p| match call {
                SnapCall::Create => p.create_snapshot(&image, &s),
                SnapCall::Remove => p.remove_snapshot(&image, &s),
            })
            .await
        {
            Some(done) => done,
            None => {
                let inv = snap_args(rbd().args(["snap", verb, "--no-progress"]), snap);
                self.run(inv).await.map(drop)
            }
        };
        match done {
            Err(e) if e.code() != Some(done_errno) => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// The clones of `snap`, `pool/image` (those in the RBD trash marked so); empty when the
    /// snapshot is gone.
    async fn snapshot_children(&self, snap: &SnapSpec) -> Result<Vec<String>, CephError> {
        let (image, s) = (snap.image.image.to_string(), snap.snapshot.to_string());
        let what = format!("librbd children {snap}");
        if let Some(found) = self
            .library(&snap.image.pool, what, Kind::ShortRead, move |p| {
                p.snapshot_children(&image, &s)
            })
            .await
        {
            return Ok(found?.unwrap_or_default());
        }
        let inv = snap_args(rbd().args(["children", "--all", "--format", "json"]), snap);
        match self.json::<Vec<json::RbdChild>>(inv).await {
            Err(e) if gone(&e) => Ok(vec![]),
            Err(e) => Err(e),
            Ok(list) => Ok(list
                .into_iter()
                .map(|c| {
                    let name = format!("{}/{}", c.pool, c.image);
                    if c.trash {
                        format!("{name} (trashed)")
                    } else {
                        name
                    }
                })
                .collect()),
        }
    }

    /// Makes image `tmp` a clone of `src` (format 2) with the ownership keys, grown to
    /// `grow_to`: through librbd in process when `src` is in the same pool (a clone, the keys,
    /// a resize), else through the CLI (`rbd clone`, each key, `rbd resize`). Killed between
    /// them: a temporary image without all its keys (or not yet grown), which
    /// [`Self::remove_leftover`] removes. EEXIST when `tmp` exists.
    #[tracing::instrument(skip_all)]
    async fn clone_temporary(
        &self,
        spec: &ImageSpec,
        tmp: &str,
        src: &SnapSpec,
        grow_to: Option<u64>,
        features: &[String],
        owner: &Owner,
    ) -> Result<(), CliError> {
        let bits: Option<u64> = features.iter().map(|f| ceph_lib::feature_bit(f)).sum();
        if let Some(bits) = bits.filter(|_| src.image.pool == spec.pool) {
            // In process: the clone, its keys, its grow (killed between them: a temporary
            // image without its keys or its size, removed as an interrupted create's).
            let (parent, snap, child) = (
                src.image.image.to_string(),
                src.snapshot.to_string(),
                tmp.to_string(),
            );
            let owned = [
                (META_MANAGED_BY, owner.managed_by.to_string()),
                (META_VOLUME, owner.volume.to_string()),
            ];
            let what = format!("librbd clone {src} {}/{tmp} with its keys", spec.pool);
            let made = self
                .library(&spec.pool, what, Kind::Long, move |p| {
                    p.clone_image(&parent, &snap, &child, bits)?;
                    p.set_metadata(&child, &owned.each_ref().map(|(k, v)| (*k, v.as_str())))?;
                    if let Some(size) = grow_to {
                        p.resize_image(&child, size)?;
                    }
                    Ok(())
                })
                .await;
            if let Some(made) = made {
                return made;
            }
        }
        let clone = rbd()
            .args(["clone", "--rbd-default-clone-format", "2"])
            .args(["--image-feature", &features.join(",")])
            .args(["--pool", src.image.pool.as_str()])
            .args(["--image", src.image.image.as_str()])
            .args(["--snap", src.snapshot.as_str()])
            .args(["--dest-pool", spec.pool.as_str(), "--dest"])
            .arg(tmp);
        self.run(clone).await?;
        for (k, v) in [
            (META_MANAGED_BY, owner.managed_by.as_str()),
            (META_VOLUME, owner.volume.as_str()),
        ] {
            let set = rbd()
                .args(["image-meta", "set", "--pool", spec.pool.as_str(), "--"])
                .arg(tmp)
                .args([k, v]);
            self.run(set).await?;
        }
        if let Some(size) = grow_to {
            let resize = rbd()
                .args(["resize", "--no-progress", "--size"])
                .arg(format!("{size}B"))
                .args(["--pool", spec.pool.as_str(), "--"])
                .arg(tmp);
            self.run(resize).await?;
        }
        Ok(())
    }

    /// The size of snapshot `src` (what a clone of it starts as); not found: said so.
    async fn snapshot_size(&self, src: &SnapSpec) -> Result<u64, CephError> {
        let not_found = || CephError::NotFound {
            spec: src.to_string(),
            hint: " (the volume's source snapshot: make it with `rbd snap create`)".into(),
        };
        let (image, snap) = (src.image.image.to_string(), src.snapshot.to_string());
        let what = format!("librbd size of {src}");
        if let Some(read) = self
            .library(&src.image.pool, what, Kind::ShortRead, move |p| {
                p.snapshot_size(&image, &snap)
            })
            .await
        {
            return read?.ok_or_else(not_found);
        }
        let inv = rbd()
            .args([
                "info",
                "--format",
                "json",
                "--pool",
                src.image.pool.as_str(),
            ])
            .args(["--snap", src.snapshot.as_str(), "--"])
            .arg(src.image.image.as_str());
        match self.json::<json::RbdInfo>(inv).await {
            Ok(info) => Ok(info.size),
            Err(e) if gone(&e) => Err(not_found()),
            Err(e) => Err(e),
        }
    }

    /// Renames image `from` of `pool` to `to` (EEXIST when `to` is taken).
    #[tracing::instrument(skip_all)]
    async fn rename_image(&self, pool: &PoolName, from: &str, to: &str) -> Result<(), CliError> {
        let (f, t) = (from.to_string(), to.to_string());
        let what = format!("librbd rename {pool}/{from} {to}");
        if let Some(done) = self
            .library(pool, what, Kind::Long, move |p| p.rename_image(&f, &t))
            .await
        {
            return done;
        }
        let rename = rbd()
            .args(["rename", "--pool", pool.as_str(), "--"])
            .arg(from)
            .arg(to);
        self.run(rename).await.map(drop)
    }

    /// Removes the temporary image `tmp` of an interrupted create, when it is there and not
    /// another deployment's (it carries this owner's keys, or none: cut short before them). A
    /// temporary image is never exposed nor written: it holds no data.
    pub(super) async fn remove_leftover(
        &self,
        pool: &PoolName,
        tmp: &str,
        owner: &Owner,
    ) -> Result<(), CephError> {
        let meta = rbd()
            .args([
                "image-meta",
                "list",
                "--format",
                "json",
                "--pool",
                pool.as_str(),
                "--",
            ])
            .arg(tmp);
        let keys = match self.metadata_of(meta).await {
            Ok(keys) => keys,
            Err(e) if gone(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        if keys
            .get(META_MANAGED_BY)
            .is_some_and(|m| m != owner.managed_by.as_str())
        {
            return Ok(());
        }
        tracing::warn!(pool = %pool, image = tmp, "Removing what an interrupted create left.");
        let rm = rbd()
            .args(["rm", "--no-progress", "--pool", pool.as_str(), "--"])
            .arg(tmp);
        match self.run(rm).await {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(libc_enoent()) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub(super) async fn owned_live(
        &self,
        spec: &ImageSpec,
        owner: &Owner,
    ) -> Result<LiveImage, CephError> {
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
        check_retention("retain_secs", retain_secs)?;
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
    pub(super) async fn refuse_in_use(
        &self,
        spec: &ImageSpec,
        img: &LiveImage,
    ) -> Result<(), CephError> {
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
}

/// A snapshot operation of [`Ceph::snap_call`].
#[derive(Debug, Clone, Copy)]
enum SnapCall {
    Create,
    Remove,
}

/// The snapshots unistor took of `img` (its `unistor.snapshots` key).
fn recorded(img: &LiveImage) -> Vec<&str> {
    protocol::meta::snapshot_list(img.metadata.get(META_SNAPSHOTS).map(String::as_str)).collect()
}
