//! The sweep: images re-read in least-recently-checked order at a bounded rate, and pool
//! listings refreshed, so that changes made behind unistor's back show.

use super::*;

impl<R: Runner> Ceph<R> {
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
    pub(super) fn busy(&self) -> bool {
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
}
