//! The simulated host: what the server a BlueField-3 sits in sees of SNAP's controllers.
//!
//! Each namespace attached to a started (not admin-only) controller is a block device of the
//! host, served as NBD on a Unix socket `<host-dir>/<controller>-n<nsid>.nbd` ([`crate::nbd`]).
//! A device appears when its controller is resumed with the namespace attached and goes (open
//! connections closed, as a hot-removed namespace fails the host's I/O) when it is detached, its
//! controller suspended or destroyed, or its bdev deleted.
//!
//! `<host-dir>/host.json` is the host's own account, as `nvme list` plus `lsof` would give it:
//! per controller whether the host's driver has it enabled (in simulation: while any of its
//! devices is open) and, per device, its NSID, UUID, size and how many openers it has. It is
//! rewritten whenever that changes. It is the host's view, not SNAP's: SNAP's RPCs do not say
//! whether the host uses a device, so nothing of this reaches the JSON-RPC socket.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};

use serde_json::json;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::nbd::{self, Export};

/// A namespace the host sees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exposure {
    /// The controller's name.
    pub ctrl: String,
    /// NSID.
    pub nsid: u32,
    /// The namespace's bdev.
    pub bdev: String,
    /// The namespace's UUID.
    pub uuid: String,
    /// Bytes, as the bdev says now.
    pub size: u64,
}

/// Where the host's devices get their blocks.
pub trait Devices: Send + Sync {
    /// Bdev `bdev`'s size and blocks now; `None` once it is gone.
    fn export(&self, bdev: &str) -> Option<Export>;
}

struct Endpoint {
    exp: Exposure,
    path: PathBuf,
    open: Arc<AtomicU32>,
    /// Dropped (or sent) to take the device away.
    _stop: watch::Sender<bool>,
}

/// The host's devices.
pub struct Host {
    dir: PathBuf,
    devices: Weak<dyn Devices>,
    endpoints: Mutex<BTreeMap<(String, u32), Endpoint>>,
    last_report: Mutex<Vec<u8>>,
}

/// A controller name usable in a socket file name.
fn plain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.')
}

impl Host {
    /// The host of `dir`: stale device sockets of an earlier run are removed and the account
    /// says "no devices".
    pub fn new(dir: &Path, devices: Weak<dyn Devices>) -> std::io::Result<Arc<Self>> {
        std::fs::create_dir_all(dir)?;
        for e in std::fs::read_dir(dir)?.flatten() {
            if e.path().extension().is_some_and(|x| x == "nbd") {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let me = Arc::new(Self {
            dir: dir.to_path_buf(),
            devices,
            endpoints: Mutex::new(BTreeMap::new()),
            last_report: Mutex::new(vec![]),
        });
        me.report();
        Ok(me)
    }

    /// The socket of controller `ctrl`'s namespace `nsid`.
    pub fn device_path(&self, ctrl: &str, nsid: u32) -> PathBuf {
        self.dir.join(format!("{ctrl}-n{nsid}.nbd"))
    }

    /// Makes the host's devices exactly `want`.
    pub fn sync(self: &Arc<Self>, want: Vec<Exposure>) {
        let mut changed = false;
        {
            let mut eps = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
            let want: BTreeMap<(String, u32), Exposure> = want
                .into_iter()
                .filter(|x| plain(&x.ctrl))
                .map(|x| ((x.ctrl.clone(), x.nsid), x))
                .collect();
            eps.retain(|k, ep| {
                let keep = want
                    .get(k)
                    .is_some_and(|w| w.bdev == ep.exp.bdev && w.uuid == ep.exp.uuid);
                if !keep {
                    info!(device = %ep.path.display(), "Host device removed.");
                    let _ = std::fs::remove_file(&ep.path);
                    changed = true;
                }
                keep
            });
            for (k, w) in want {
                match eps.get_mut(&k) {
                    Some(ep) => {
                        if ep.exp.size != w.size {
                            ep.exp.size = w.size;
                            changed = true;
                        }
                    }
                    None => match self.listen(&w) {
                        Ok(ep) => {
                            info!(device = %ep.path.display(), nsid = w.nsid, "Host device added.");
                            eps.insert(k, ep);
                            changed = true;
                        }
                        Err(e) => {
                            warn!(error = %e, ctrl = %w.ctrl, nsid = w.nsid, "Cannot serve a host device.")
                        }
                    },
                }
            }
        }
        if changed {
            self.report();
        }
    }

    /// Takes every device away (SNAP stopping): sockets removed, the account emptied.
    pub fn shutdown(self: &Arc<Self>) {
        self.sync(vec![]);
    }

    fn listen(self: &Arc<Self>, exp: &Exposure) -> std::io::Result<Endpoint> {
        let path = self.device_path(&exp.ctrl, exp.nsid);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)?;
        let (stop, stopped) = watch::channel(false);
        let open = Arc::new(AtomicU32::new(0));
        tokio::spawn(accept_loop(
            listener,
            Arc::downgrade(self),
            exp.bdev.clone(),
            open.clone(),
            stopped,
        ));
        Ok(Endpoint {
            exp: exp.clone(),
            path,
            open,
            _stop: stop,
        })
    }

    /// Rewrites `host.json` when what it says changed.
    fn report(&self) {
        let text = {
            let eps = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
            let mut ctrls: BTreeMap<&str, Vec<serde_json::Value>> = BTreeMap::new();
            let mut enabled: BTreeMap<&str, bool> = BTreeMap::new();
            for ep in eps.values() {
                let open = ep.open.load(Ordering::SeqCst);
                *enabled.entry(&ep.exp.ctrl).or_default() |= open > 0;
                ctrls.entry(&ep.exp.ctrl).or_default().push(json!({
                    "nsid": ep.exp.nsid,
                    "uuid": ep.exp.uuid,
                    "size_bytes": ep.exp.size,
                    "device": ep.path,
                    "open": open,
                }));
            }
            let controllers: Vec<_> = ctrls
                .into_iter()
                .map(|(name, namespaces)| {
                    json!({"name": name, "enabled": enabled[name], "namespaces": namespaces})
                })
                .collect();
            serde_json::to_vec_pretty(&json!({ "controllers": controllers })).expect("json")
        };
        let mut last = self.last_report.lock().unwrap_or_else(|e| e.into_inner());
        if *last == text {
            return;
        }
        let path = self.dir.join("host.json");
        let tmp = self.dir.join(".host.json.tmp");
        match std::fs::write(&tmp, &text).and_then(|_| std::fs::rename(&tmp, &path)) {
            Ok(()) => *last = text,
            Err(e) => warn!(error = %e, "Cannot write the host's account."),
        }
    }
}

async fn accept_loop(
    listener: UnixListener,
    host: Weak<Host>,
    bdev: String,
    open: Arc<AtomicU32>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        // Cancel safety: `accept` and `changed` are cancel-safe.
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => { warn!(error = %e, "Host device accept failed."); continue; }
            },
            _ = stopped.changed() => return,
        };
        let (host, bdev, open, mut stopped) =
            (host.clone(), bdev.clone(), open.clone(), stopped.clone());
        tokio::spawn(async move {
            let Some(devices) = host.upgrade().and_then(|h| h.devices.upgrade()) else {
                return;
            };
            let counted = std::sync::atomic::AtomicBool::new(false);
            let opened = || {
                counted.store(true, Ordering::SeqCst);
                open.fetch_add(1, Ordering::SeqCst);
                if let Some(h) = host.upgrade() {
                    h.report();
                }
            };
            // The device going away ends the connection, as a hot-removed namespace fails
            // the host's I/O.
            let r = tokio::select! {
                r = nbd::serve(stream, || devices.export(&bdev), opened) => Some(r),
                _ = stopped.changed() => None,
            };
            debug!(?r, bdev, "Host device connection ended.");
            if counted.load(Ordering::SeqCst) {
                open.fetch_sub(1, Ordering::SeqCst);
                if let Some(h) = host.upgrade() {
                    h.report();
                }
            }
        });
    }
}
