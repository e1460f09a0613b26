//! The cluster: status, capacity, monitors and pools (kept by map epoch), watchers with their
//! entities, and SNAP's cephx identity.

use super::*;

impl<R: Runner> Ceph<R> {
    /// Pools with the rbd application whose names unistor accepts.
    /// The set of rbd pools as the cluster part of a report last read it, when younger than
    /// [`ViewOptions::pool_refresh`] (it follows the OSD map's epoch); else read now.
    pub(super) async fn rbd_pools(&self) -> Result<Vec<PoolName>, CephError> {
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
    pub(super) async fn read_rbd_pools(&self) -> Result<BTreeSet<String>, CephError> {
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

    /// The cluster's status, monitors, capacity and pools, re-read when older than `max_age`:
    /// `ceph status` and `ceph df` each time; `ceph mon dump` and `ceph osd pool ls detail` only
    /// when the status shows a new monitor or OSD map epoch (two commands in a steady state, four
    /// the first time). Health changes raise the view's generation.
    pub(super) async fn cluster(&self, max_age: Duration) -> Result<CephReport, CephError> {
        let mut cached = self.cluster.lock().await;
        if let Some(c) = cached.as_ref() {
            if c.at.elapsed() < max_age {
                return Ok(c.report.clone());
            }
        }
        let ceph = |args: &[&str]| Invocation::new(Tool::Ceph).args(args.iter().copied());
        let (status, df) = tokio::try_join!(
            self.mon_json::<CephStatusJson>("status"),
            self.mon_json::<DfJson>("df"),
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
        // Fences follow the OSD map too: a fence blocklists, and this agent's own fences and
        // unfences drop the cache.
        let fences = async {
            match old.filter(|c| osdmap_epoch != 0 && c.osdmap_epoch == osdmap_epoch) {
                Some(c) => Ok(c.report.fences.clone()),
                None => self.fences().await,
            }
        };
        let (monitors, rbd_pools, fences) = tokio::try_join!(mons, pools, fences)?;
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
            fences,
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
                r.fences.clone(),
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

    /// The cluster's health, read again when older than `max_age`.
    pub async fn health(&self, max_age: Duration) -> Result<protocol::CephHealth, CephError> {
        Ok(self.cluster(max_age).await?.health)
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
    pub(super) async fn client_entities(&self) -> Result<HashMap<String, String>, CephError> {
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
        if let Some(f) = self.fence_of_identity(id).await? {
            return Err(CephError::Invalid {
                field: "client_id",
                message: format!(
                    "client.{id} is fenced (dpu/{}: {}): `unistor unfence dpu/{}` first",
                    f.dpu, f.reason, f.dpu
                ),
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
        // The same commands as monitor commands when the library is connected (no process
        // each: a fleet's first apply issues one identity per DPU), else the CLI.
        let cmd = |prefix: &str| {
            serde_json::json!({
                "prefix": prefix,
                "entity": entity,
                "caps": ["mon", "profile rbd", "osd", osd_caps],
                "format": "json",
            })
        };
        let created: Result<Vec<CephIdentity>, CephError> = self
            .mon_call(
                cmd("auth get-or-create"),
                caps(&["auth", "get-or-create"]).args(["--format", "json"]),
            )
            .await;
        let found = match created {
            Ok(v) => v,
            // EINVAL: the entity exists with other caps. Set ours, then read it back.
            Err(CephError::Cli(e)) if e.code() == Some(22) => {
                self.mon_do(cmd("auth caps"), caps(&["auth", "caps"]))
                    .await?;
                self.mon_call(
                    serde_json::json!({"prefix": "auth get", "entity": entity, "format": "json"}),
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
