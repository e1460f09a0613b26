//! The per-pool index (omap of `unistor.index`): read, held in memory, changed with group
//! commits under the pool's flush lock.

use super::*;
use crate::library::Kind;

impl<R: Runner> Ceph<R> {
    /// Reads a pool's unistor index, one command.
    pub(super) async fn read_index(&self, pool: &PoolName) -> Result<PoolIndex, CephError> {
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

    pub(super) fn index_cell(&self, pool: &PoolName) -> Arc<IndexCell> {
        self.indexes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(pool.to_string())
            .or_default()
            .clone()
    }

    /// A pool's index cell, read from the cluster the first time.
    pub(super) async fn index_of(&self, pool: &PoolName) -> Result<Arc<IndexCell>, CephError> {
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
    pub(super) async fn index_entry(
        &self,
        spec: &ImageSpec,
    ) -> Result<Option<IndexValue>, CephError> {
        let cell = self.index_of(&spec.pool).await?;
        Ok(cell.with(|ix| ix.get(spec.image.as_str()).cloned()))
    }

    /// Sets (`Some`) or removes (`None`) an image's index entry and returns once it is written.
    /// Concurrent changes are group-committed: whoever takes the flush lock writes every key
    /// changed so far, and the others find their change already written.
    #[tracing::instrument(skip_all)]
    pub(super) async fn index_change(
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

    pub(super) async fn write_index_key(
        &self,
        pool: &PoolName,
        w: &KeyWrite,
    ) -> Result<(), CephError> {
        let key = w.key.clone();
        let done = match &w.value {
            Some(v) => {
                let v = v.clone();
                let what = format!("librados setomapval {pool}/{INDEX_OBJECT} {key}");
                self.library(pool, what, Kind::Long, move |p| {
                    p.omap_set(INDEX_OBJECT, &key, v.as_bytes())
                })
                .await
            }
            None => {
                let what = format!("librados rmomapkey {pool}/{INDEX_OBJECT} {key}");
                self.library(pool, what, Kind::Long, move |p| {
                    p.omap_remove(INDEX_OBJECT, &key)
                })
                .await
            }
        };
        match done {
            Some(Ok(())) => return Ok(()),
            // No index object: no key to remove.
            Some(Err(e)) if w.value.is_none() && e.code() == Some(libc_enoent()) => return Ok(()),
            Some(Err(e)) => return Err(e.into()),
            None => {}
        }
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
}
