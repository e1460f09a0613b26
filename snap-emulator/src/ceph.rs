//! Real-Ceph mode, through librados and librbd as SNAP does (the `ceph-lib` crate):
//! `bdev_rbd_register_cluster` connects a cluster handle with the given credentials and keeps it
//! while the registration lasts (SPDK's `bdev_rbd_register_cluster` keeps its `rados_t` the same
//! way); `bdev_rbd_create` opens the image through that handle (or a handle of its own for inline
//! credentials) and takes its real size. Failures answer -1 "Operation not permitted", as SPDK
//! does.
//!
//! No process is started per call: a check costs a librbd open (a few round trips), not a CLI
//! process, so the lab's emulated DPUs no longer compete with the ceph-agent for the machine's
//! CPU the way they would not on real BlueField-3s (SNAP runs on the DPU's own cores).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tracing::warn;

use crate::state::{ClusterParams, RbdCreateParams, RpcError};
use ceph_lib::{ConnectSpec, LibError, OpenImage, Rados};

/// Real-Ceph mode: registered clusters' handles, and how long a call may block.
#[derive(Debug, Clone)]
pub struct RealCeph {
    /// Deadline of each connect and call (librados' own timeouts are set to it).
    pub timeout: Duration,
    clusters: Arc<Mutex<HashMap<String, Arc<Rados>>>>,
    /// Each rbd bdev's image, held open while the bdev exists (so Ceph lists SNAP's watcher).
    images: Arc<Mutex<HashMap<String, Arc<OpenImage>>>>,
    /// Connections shared with other emulators in this process, by how they connect.
    shared: Option<SharedConnections>,
}

/// Cluster connections shared by the emulators of one process (the fleet simulator): DPUs that
/// register the same cluster with the same credentials use one `rados_t`, as each real SNAP would
/// use its own. It closes when the last registration using it ends.
#[derive(Debug, Clone, Default)]
pub struct SharedConnections(Arc<Mutex<HashMap<String, std::sync::Weak<Rados>>>>);

impl RealCeph {
    /// Real-Ceph mode with `timeout` per call.
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            clusters: Arc::default(),
            images: Arc::default(),
            shared: None,
        }
    }

    /// Real-Ceph mode whose cluster registrations share `connections` with other emulators.
    pub fn sharing(timeout: Duration, connections: SharedConnections) -> Self {
        Self {
            shared: Some(connections),
            ..Self::new(timeout)
        }
    }
}

fn spec(
    user_id: Option<&str>,
    config: Option<&BTreeMap<String, String>>,
    config_file: Option<&str>,
    key_file: Option<&str>,
) -> Result<ConnectSpec, RpcError> {
    let mut options = vec![];
    for (k, v) in config.into_iter().flatten() {
        // librados' option names only (`mon_host`, `key`, ...).
        if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(RpcError::eperm());
        }
        options.push((k.clone(), v.clone()));
    }
    Ok(ConnectSpec {
        user_id: user_id.map(str::to_string),
        config_file: config_file.map(str::to_string),
        key_file: key_file.map(str::to_string),
        options,
    })
}

fn eperm(what: &str, e: LibError) -> RpcError {
    warn!(what, error = %e, "Ceph call failed.");
    RpcError::eperm()
}

impl RealCeph {
    async fn blocking<T: Send + 'static>(
        &self,
        what: &'static str,
        f: impl FnOnce(u64) -> Result<T, LibError> + Send + 'static,
    ) -> Result<T, RpcError> {
        let secs = self.timeout.as_secs().max(1);
        match tokio::task::spawn_blocking(move || f(secs)).await {
            Ok(r) => r.map_err(|e| eperm(what, e)),
            Err(_) => Err(RpcError::eperm()),
        }
    }

    /// Connects with the cluster's credentials and keeps the handle under its name.
    pub async fn register_cluster(&self, p: &ClusterParams) -> Result<(), RpcError> {
        let s = spec(
            p.user_id.as_deref(),
            p.config_param.as_ref(),
            p.config_file.as_deref(),
            p.key_file.as_deref(),
        )?;
        let handle = match &self.shared {
            Some(shared) => self.connect_shared(shared, s).await?,
            None => {
                self.blocking("connect", move |secs| Rados::connect(&s, secs))
                    .await?
            }
        };
        self.clusters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(p.name.clone(), handle);
        Ok(())
    }

    /// A connection made the way `s` says: the one another emulator holds, or a new one.
    async fn connect_shared(
        &self,
        shared: &SharedConnections,
        s: ConnectSpec,
    ) -> Result<Arc<Rados>, RpcError> {
        let key = format!("{s:?}");
        let live = shared
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .and_then(std::sync::Weak::upgrade);
        if let Some(h) = live {
            return Ok(h);
        }
        let handle = self
            .blocking("connect", move |secs| Rados::connect(&s, secs))
            .await?;
        let mut map = shared.0.lock().unwrap_or_else(|e| e.into_inner());
        map.retain(|_, w| w.strong_count() > 0);
        // Two emulators may have connected at once: keep the first, drop ours.
        match map.get(&key).and_then(std::sync::Weak::upgrade) {
            Some(first) => Ok(first),
            None => {
                map.insert(key, Arc::downgrade(&handle));
                Ok(handle)
            }
        }
    }

    /// Drops a cluster's handle (after its registration ended, or failed to start).
    pub fn forget_cluster(&self, name: &str) {
        self.clusters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    }

    /// The connected handle of registered cluster `name` (-1, as SPDK answers, when none).
    fn registered(&self, name: &str) -> Result<Arc<Rados>, RpcError> {
        self.clusters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(RpcError::eperm)
    }

    /// Opens the image a bdev is about to serve, as SPDK's `bdev_rbd_init_context` does (through
    /// the named registration, or a connection of its own for inline credentials): read-write,
    /// with an update watch. Returns it and its size; [`RealCeph::hold`] keeps it open.
    pub async fn open_image(&self, p: &RbdCreateParams) -> Result<(OpenImage, u64), RpcError> {
        let registered = match &p.cluster_name {
            Some(c) => Some(self.registered(c)?),
            None => None,
        };
        let inline = match registered {
            Some(_) => None,
            None => Some(spec(p.user_id.as_deref(), p.config.as_ref(), None, None)?),
        };
        let (pool, image) = (p.pool_name.clone(), p.rbd_name.clone());
        self.blocking("open image", move |secs| {
            let handle = match (registered, inline) {
                (Some(h), _) => h,
                (None, Some(s)) => Rados::connect(&s, secs)?,
                (None, None) => unreachable!("one of the two is set above"),
            };
            let img = handle.open_image(&pool, &image)?;
            let size = img.size()?;
            Ok((img, size))
        })
        .await
    }

    /// Bdev `bdev`'s open image (the host's reads and writes go through it).
    pub fn image(&self, bdev: &str) -> Option<Arc<OpenImage>> {
        self.images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(bdev)
            .cloned()
    }

    /// Keeps `img` open for bdev `bdev` until [`RealCeph::release`].
    pub fn hold(&self, bdev: &str, img: OpenImage) {
        self.images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(bdev.to_string(), Arc::new(img));
    }

    /// Closes bdev `bdev`'s image (its watch goes with it).
    pub async fn release(&self, bdev: &str) {
        let img = self
            .images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(bdev);
        if let Some(img) = img {
            // Closing flushes and talks to the cluster: not on the async threads.
            let _ = tokio::task::spawn_blocking(move || drop(img)).await;
        }
    }

    /// The images librbd said changed since last asked, with their sizes now: what SPDK's
    /// update callback hands to `spdk_bdev_notify_blockcnt_change`.
    pub async fn changed_sizes(&self) -> Vec<(String, u64)> {
        let changed: Vec<(String, Arc<OpenImage>)> = self
            .images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, i)| i.take_changed())
            .map(|(n, i)| (n.clone(), i.clone()))
            .collect();
        if changed.is_empty() {
            return vec![];
        }
        tokio::task::spawn_blocking(move || {
            changed
                .into_iter()
                .filter_map(|(n, i)| Some((n, i.size().ok()?)))
                .collect()
        })
        .await
        .unwrap_or_default()
    }

    /// Grows bdev `bdev`'s image to `bytes` through the handle the bdev holds (`rbd_resize`, as
    /// SPDK's `bdev_rbd_resize` does), or through the named cluster's handle when it holds none;
    /// an image already that large is left alone.
    pub async fn resize_image(
        &self,
        bdev: &str,
        cluster: &str,
        pool: &str,
        image: &str,
        bytes: u64,
    ) -> Result<(), RpcError> {
        let held = self
            .images
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(bdev)
            .cloned();
        if let Some(img) = held {
            return self
                .blocking("resize image", move |_| img.grow(bytes))
                .await;
        }
        let handle = self.registered(cluster)?;
        let (pool, image) = (pool.to_string(), image.to_string());
        self.blocking("resize image", move |_| {
            handle.open_image(&pool, &image)?.grow(bytes)
        })
        .await
    }
}
