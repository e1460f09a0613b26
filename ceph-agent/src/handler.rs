//! Routing: wire commands in, checked arguments to [`Ceph`], typed replies out.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use protocol::lease::Fence;
use protocol::names::{CephClientId, PoolName};
use protocol::server::Handler;
use protocol::{AgentKind, Command, ErrorCode, Event, Reply, WireError};
use tokio::sync::{broadcast, Mutex, Semaphore};
use tracing::{debug, warn};

use crate::ceph::{Ceph, ImageSpec, Owner};
use crate::runner::Runner;

/// Mutations of different images that run at once (each is several CLI processes).
pub const MAX_CONCURRENT_MUTATIONS: usize = 16;

/// Images per page of `ceph_changes` at most: a page stays well inside one 1 MiB frame.
pub const MAX_PAGE: usize = 1000;

/// Images whose watchers one `image_watchers` request may ask for.
pub const MAX_WATCHER_LOOKUPS: usize = 64;

/// What a mutation is serialized on: its image, or the cephx identity it issues.
fn lock_key(c: &Command) -> String {
    match c {
        Command::CreateImage(c) => image_key(&c.pool, &c.image),
        Command::AdoptImage(c) => image_key(&c.pool, &c.image),
        Command::GrowImage(c) => image_key(&c.pool, &c.image),
        Command::FlattenImage(c) => image_key(&c.pool, &c.image),
        Command::CreateSnapshot(c) | Command::RemoveSnapshot(c) => image_key(&c.pool, &c.image),
        Command::TrashImage(c) => image_key(&c.pool, &c.image),
        Command::RestoreImage(c) => image_key(&c.pool, &c.image),
        Command::DeleteImage(c) => image_key(&c.pool, &c.image),
        Command::IssueSnapIdentity(c) => format!("identity:{}", c.client_id),
        // An identity is issued, fenced and unfenced one at a time: a registration never
        // gives a fenced identity its caps back half way through its fence.
        Command::FenceClient(c) => format!("identity:{}", c.client_id),
        Command::UnfenceClient(c) => format!("identity:{}", c.client_id),
        other => format!("other:{}", other.name()),
    }
}

/// The images of a lookup, checked: at most [`MAX_WATCHER_LOOKUPS`] (each costs commands now),
/// every name allowed.
fn image_specs(l: &protocol::ImageList) -> Result<Vec<ImageSpec>, WireError> {
    if l.images.len() > MAX_WATCHER_LOOKUPS {
        return Err(WireError::new(
            ErrorCode::InvalidArgument,
            format!(
                "{} images asked for, at most {MAX_WATCHER_LOOKUPS} per request",
                l.images.len()
            ),
        )
        .with_field("images"));
    }
    l.images
        .iter()
        .map(|i| ImageSpec::parse(&i.pool, &i.image))
        .collect::<Result<Vec<_>, _>>()
        .map_err(WireError::from)
}

/// The lock of one image: its mutations and its watcher lookups share it.
fn image_key(pool: &str, image: &str) -> String {
    format!("image:{pool}/{image}")
}

/// Command families this agent serves.
pub const CAPABILITIES: &[&str] = &["lease", "ceph.report", "ceph.image", "ceph.identity"];

/// The ceph-agent's command handler.
pub struct CephHandler<R> {
    ceph: Ceph<R>,
    /// One mutation at a time per image (or per cephx identity): two commands never race on
    /// an image, while different images are worked on concurrently (at most
    /// [`MAX_CONCURRENT_MUTATIONS`] at once). Reports run beside them; a report's brief image
    /// opens can look like watchers to a mutation, which is why `in_use` is confirmed before it
    /// is returned (see `Ceph::refuse_in_use`).
    locks: std::sync::Mutex<HashMap<String, Arc<Mutex<()>>>>,
    mutations: Semaphore,
    events: broadcast::Sender<Event>,
}

impl<R: Runner> CephHandler<R> {
    /// A handler over `ceph`.
    pub fn new(ceph: Ceph<R>) -> Self {
        Self {
            ceph,
            locks: std::sync::Mutex::default(),
            mutations: Semaphore::new(MAX_CONCURRENT_MUTATIONS),
            events: broadcast::channel(16).0,
        }
    }

    /// The cluster operations.
    pub fn ceph(&self) -> &Ceph<R> {
        &self.ceph
    }

    /// The lock of `key` (an image or an identity), made when first wanted.
    fn lock_for(&self, key: &str) -> Arc<Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(key.to_string())
            .or_default()
            .clone()
    }

    /// Done with `lock`: it is forgotten when nobody else holds or waits for it.
    fn release_lock(&self, key: &str, lock: Arc<Mutex<()>>) {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        if Arc::strong_count(&lock) == 2 {
            locks.remove(key);
        }
    }

    async fn dispatch(&self, command: Command, fence: &Fence) -> Result<Reply, WireError> {
        let wire = |e: crate::ceph::CephError| e.to_wire();
        match command {
            Command::CephReport(_) => Ok(Reply::CephReport(Box::new(
                self.ceph.report().await.map_err(wire)?,
            ))),
            Command::CephChanges(q) => {
                let limit = (q.limit as usize).clamp(1, MAX_PAGE);
                Ok(Reply::CephChanges(Box::new(
                    self.ceph
                        .changes(q.since, q.after.as_deref(), limit)
                        .await
                        .map_err(wire)?,
                )))
            }
            Command::CephHealth(_) => Ok(Reply::Health(
                self.ceph
                    .health(Duration::from_secs(1))
                    .await
                    .map_err(wire)?,
            )),
            Command::ProbeImages(l) => {
                let specs = image_specs(&l)?;
                Ok(Reply::Images(protocol::ImageStatusList {
                    images: self.ceph.probe_images(&specs).await.map_err(wire)?,
                }))
            }
            Command::ImageWatchers(l) => {
                let specs = image_specs(&l)?;
                // A mutation of one of these images in flight here opens it with `rbd`, which
                // shows as a watcher (another controller's trash of the same volume looked "in
                // use"): the lookup waits for them and holds them off meanwhile.
                let mut keys: Vec<String> = specs
                    .iter()
                    .map(|s| image_key(s.pool.as_str(), s.image.as_str()))
                    .collect();
                keys.sort();
                keys.dedup();
                let locks: Vec<_> = keys.iter().map(|k| self.lock_for(k)).collect();
                let mut held = vec![];
                for l in &locks {
                    held.push(l.clone().lock_owned().await);
                }
                let result = self.ceph.image_watchers(&specs).await.map_err(wire);
                drop(held);
                for (k, l) in keys.iter().zip(locks) {
                    self.release_lock(k, l);
                }
                Ok(Reply::Watchers(protocol::WatcherList { images: result? }))
            }
            c @ (Command::CreateImage(_)
            | Command::AdoptImage(_)
            | Command::GrowImage(_)
            | Command::FlattenImage(_)
            | Command::CreateSnapshot(_)
            | Command::RemoveSnapshot(_)
            | Command::TrashImage(_)
            | Command::RestoreImage(_)
            | Command::DeleteImage(_)
            | Command::IssueSnapIdentity(_)
            | Command::FenceClient(_)
            | Command::UnfenceClient(_)) => {
                let key = lock_key(&c);
                let lock = self.lock_for(&key);
                let result = {
                    let _one = lock.lock().await;
                    match self.mutations.acquire().await {
                        // The lease again, now that the command starts: it may have waited
                        // for this image behind another controller's command.
                        Ok(_slot) => match fence.enter() {
                            Ok(_executing) => self.mutate(c).await.map_err(wire),
                            Err(e) => Err(e),
                        },
                        Err(_) => Err(WireError::new(
                            ErrorCode::Internal,
                            "shutting down".to_string(),
                        )),
                    }
                };
                self.release_lock(&key, lock);
                result
            }
            other => Err(WireError::new(
                ErrorCode::UnsupportedCommand,
                format!("the ceph agent does not serve {}", other.name()),
            )),
        }
    }

    async fn mutate(&self, command: Command) -> Result<Reply, crate::ceph::CephError> {
        Ok(match command {
            Command::CreateImage(c) => {
                let spec = ImageSpec::parse(&c.pool, &c.image)?;
                let owner = Owner::parse(&c.owner)?;
                let policy = crate::ceph::Policy::parse_opt(c.policy.as_ref())?;
                let source = c
                    .clone_from
                    .as_ref()
                    .map(crate::ceph::SnapSpec::parse)
                    .transpose()?;
                Reply::Image(Box::new(
                    self.ceph
                        .create_image_from(
                            &spec,
                            c.size_bytes,
                            &c.features,
                            &owner,
                            policy.as_ref(),
                            source.as_ref(),
                        )
                        .await?,
                ))
            }
            Command::AdoptImage(c) => {
                let spec = ImageSpec::parse(&c.pool, &c.image)?;
                let owner = Owner::parse(&c.owner)?;
                let policy = crate::ceph::Policy::parse_opt(c.policy.as_ref())?;
                Reply::Image(Box::new(
                    self.ceph
                        .adopt_image(&spec, &owner, policy.as_ref())
                        .await?,
                ))
            }
            Command::GrowImage(c) => {
                let spec = ImageSpec::parse(&c.pool, &c.image)?;
                let owner = Owner::parse(&c.owner)?;
                Reply::Image(Box::new(
                    self.ceph.grow_image(&spec, c.size_bytes, &owner).await?,
                ))
            }
            Command::FlattenImage(c) => {
                let spec = ImageSpec::parse(&c.pool, &c.image)?;
                let owner = Owner::parse(&c.owner)?;
                Reply::Image(Box::new(self.ceph.flatten_image(&spec, &owner).await?))
            }
            Command::CreateSnapshot(c) => {
                let snap = crate::ceph::SnapSpec::of_op(&c)?;
                let owner = Owner::parse(&c.owner)?;
                Reply::Image(Box::new(self.ceph.create_snapshot(&snap, &owner).await?))
            }
            Command::RemoveSnapshot(c) => {
                let snap = crate::ceph::SnapSpec::of_op(&c)?;
                let owner = Owner::parse(&c.owner)?;
                Reply::Image(Box::new(self.ceph.remove_snapshot(&snap, &owner).await?))
            }
            Command::TrashImage(c) => {
                let spec = ImageSpec::parse(&c.pool, &c.image)?;
                let owner = Owner::parse(&c.owner)?;
                Reply::Image(Box::new(
                    self.ceph.trash_image(&spec, c.retain_secs, &owner).await?,
                ))
            }
            Command::RestoreImage(c) => {
                let spec = ImageSpec::parse(&c.pool, &c.image)?;
                Reply::Image(Box::new(self.ceph.restore_image(&spec).await?))
            }
            Command::DeleteImage(c) => {
                let spec = ImageSpec::parse(&c.pool, &c.image)?;
                let owner = Owner::parse(&c.owner)?;
                self.ceph.delete_image(&spec, &owner).await?;
                Reply::Done(protocol::Empty {})
            }
            Command::IssueSnapIdentity(c) => {
                let id = CephClientId::parse("client_id", &c.client_id)?;
                let pools = c
                    .pools
                    .iter()
                    .enumerate()
                    .map(|(i, p)| PoolName::parse(&format!("pools[{i}]"), p))
                    .collect::<Result<Vec<_>, _>>()?;
                Reply::Identity(self.ceph.issue_identity(&id, &pools).await?)
            }
            Command::FenceClient(c) => Reply::Fence(self.ceph.fence(&c).await?),
            Command::UnfenceClient(c) => {
                self.ceph.unfence(&c).await?;
                Reply::Done(protocol::Empty {})
            }
            other => {
                return Err(crate::ceph::CephError::Invalid {
                    field: "op",
                    message: format!("{} is not a ceph mutation", other.name()),
                })
            }
        })
    }

    /// Re-reads the cluster's status every `interval`, and tells connected controllers whenever
    /// the view's generation moves (at most every 100 ms: a burst of mutations is one nudge).
    pub async fn report_loop(self: Arc<Self>, interval: Duration) {
        let status = {
            let me = self.clone();
            async move {
                let mut tick = tokio::time::interval(interval);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    if let Err(e) = me.ceph.refresh_cluster(interval / 2).await {
                        warn!(error = %protocol::error::chain(&e), "Reading the cluster's status failed.");
                    }
                }
            }
        };
        let nudges = {
            let me = self.clone();
            async move {
                let mut generation = me.ceph.subscribe_generation();
                while generation.changed().await.is_ok() {
                    let g = *generation.borrow_and_update();
                    debug!(generation = g, "The view changed.");
                    let _ = me.events.send(Event::CephChanged { generation: g });
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let sweep = self.ceph.sweep_loop();
        tokio::join!(status, nudges, sweep);
    }
}

#[async_trait::async_trait]
impl<R: Runner> Handler for CephHandler<R> {
    fn kind(&self) -> AgentKind {
        AgentKind::Ceph
    }

    fn capabilities(&self) -> Vec<String> {
        CAPABILITIES.iter().map(|s| s.to_string()).collect()
    }

    async fn handle(&self, command: Command, fence: Fence) -> Result<Reply, WireError> {
        self.dispatch(command, &fence).await
    }

    fn subscribe(&self) -> Option<broadcast::Receiver<Event>> {
        Some(self.events.subscribe())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use protocol::{
        CreateImage, DeleteImage, GrowImage, ImageRef, IssueSnapIdentity, Ownership, TrashImage,
    };

    use super::*;
    use crate::runner::{CliError, Invocation, Output};

    /// Records every invocation and fails them all: nothing here should get that far.
    #[derive(Default)]
    struct Recording(StdMutex<Vec<Invocation>>);

    #[async_trait::async_trait]
    impl Runner for Recording {
        async fn run(&self, inv: Invocation) -> Result<Output, CliError> {
            self.0.lock().unwrap().push(inv.clone());
            Err(CliError::Failed {
                command: inv.display(),
                code: 1,
                stderr: "fake".into(),
            })
        }
    }

    const HOSTILE: &[&str] = &[
        "a;rm -rf /",
        "$(reboot)",
        "--help",
        "../x",
        "",
        "ｉｍｇ-é",
        "a b",
        "`id`",
    ];

    fn owner(volume: &str) -> Ownership {
        Ownership {
            managed_by: "unistor".into(),
            volume: volume.into(),
        }
    }

    /// Every command, with `bad` put into one field; the field's name is returned alongside.
    fn commands_with(bad: &str) -> Vec<(&'static str, Command)> {
        vec![
            (
                "pool",
                Command::CreateImage(Box::new(CreateImage {
                    pool: bad.into(),
                    image: "img".into(),
                    size_bytes: 1 << 30,
                    features: vec![],
                    owner: owner("v"),
                    policy: None,
                    clone_from: None,
                })),
            ),
            (
                "image",
                Command::CreateImage(Box::new(CreateImage {
                    pool: "rbd".into(),
                    image: bad.into(),
                    size_bytes: 1 << 30,
                    features: vec![],
                    owner: owner("v"),
                    policy: None,
                    clone_from: None,
                })),
            ),
            (
                "owner.volume",
                Command::CreateImage(Box::new(CreateImage {
                    pool: "rbd".into(),
                    image: "img".into(),
                    size_bytes: 1 << 30,
                    features: vec![],
                    owner: owner(bad),
                    policy: None,
                    clone_from: None,
                })),
            ),
            (
                "clone_from.snapshot",
                Command::CreateImage(Box::new(CreateImage {
                    pool: "rbd".into(),
                    image: "img".into(),
                    size_bytes: 1 << 30,
                    features: vec![],
                    owner: owner("v"),
                    policy: None,
                    clone_from: Some(protocol::SnapshotRef {
                        pool: "rbd".into(),
                        image: "golden".into(),
                        snapshot: bad.into(),
                    }),
                })),
            ),
            (
                "clone_from.image",
                Command::CreateImage(Box::new(CreateImage {
                    pool: "rbd".into(),
                    image: "img".into(),
                    size_bytes: 1 << 30,
                    features: vec![],
                    owner: owner("v"),
                    policy: None,
                    clone_from: Some(protocol::SnapshotRef {
                        pool: "rbd".into(),
                        image: bad.into(),
                        snapshot: "v1".into(),
                    }),
                })),
            ),
            (
                "features",
                Command::CreateImage(Box::new(CreateImage {
                    pool: "rbd".into(),
                    image: "img".into(),
                    size_bytes: 1 << 30,
                    features: vec![bad.into()],
                    owner: owner("v"),
                    policy: None,
                    clone_from: None,
                })),
            ),
            (
                "image",
                Command::GrowImage(GrowImage {
                    pool: "rbd".into(),
                    image: bad.into(),
                    size_bytes: 1 << 30,
                    owner: owner("v"),
                }),
            ),
            (
                "pool",
                Command::TrashImage(TrashImage {
                    pool: bad.into(),
                    image: "img".into(),
                    retain_secs: 60,
                    owner: owner("v"),
                }),
            ),
            (
                "image",
                Command::RestoreImage(ImageRef {
                    pool: "rbd".into(),
                    image: bad.into(),
                }),
            ),
            (
                "owner.managed_by",
                Command::DeleteImage(DeleteImage {
                    pool: "rbd".into(),
                    image: "img".into(),
                    owner: Ownership {
                        managed_by: bad.into(),
                        volume: "v".into(),
                    },
                }),
            ),
            (
                "client_id",
                Command::IssueSnapIdentity(IssueSnapIdentity {
                    client_id: bad.into(),
                    pools: vec!["rbd".into()],
                }),
            ),
            (
                "pools[1]",
                Command::IssueSnapIdentity(IssueSnapIdentity {
                    client_id: "snap".into(),
                    pools: vec!["rbd".into(), bad.into()],
                }),
            ),
        ]
    }

    #[tokio::test]
    async fn hostile_names_are_refused_before_any_process_is_spawned() {
        let handler = CephHandler::new(Ceph::new(Recording::default(), None));
        let long = "a".repeat(300);
        let mut cases: Vec<&str> = HOSTILE.to_vec();
        cases.push(&long);
        for bad in cases {
            for (field, command) in commands_with(bad) {
                let name = command.name();
                let e = handler.handle(command, Fence::none()).await.unwrap_err();
                assert_eq!(
                    e.field.as_deref(),
                    Some(field),
                    "{name} with {bad:?}: {e:?}"
                );
                assert!(
                    matches!(e.code, ErrorCode::InvalidName | ErrorCode::InvalidArgument),
                    "{e:?}"
                );
                assert!(
                    e.message.contains(field),
                    "message names the field: {}",
                    e.message
                );
            }
        }
        assert!(
            handler.ceph().runner().0.lock().unwrap().is_empty(),
            "a process was spawned for refused input"
        );
    }

    #[tokio::test]
    async fn bad_sizes_and_reserved_identities_are_refused_before_any_process_is_spawned() {
        let handler = CephHandler::new(Ceph::new(Recording::default(), Some("unistor-agent")));
        for size in [0, 1, (1 << 20) + 512] {
            let e = handler
                .handle(
                    Command::CreateImage(Box::new(CreateImage {
                        pool: "rbd".into(),
                        image: "img".into(),
                        size_bytes: size,
                        features: vec![],
                        owner: owner("v"),
                        policy: None,
                        clone_from: None,
                    })),
                    Fence::none(),
                )
                .await
                .unwrap_err();
            assert_eq!(e.field.as_deref(), Some("size_bytes"));
        }
        for id in ["admin", "unistor-agent"] {
            let e = handler
                .handle(
                    Command::IssueSnapIdentity(IssueSnapIdentity {
                        client_id: id.into(),
                        pools: vec!["rbd".into()],
                    }),
                    Fence::none(),
                )
                .await
                .unwrap_err();
            assert_eq!(e.field.as_deref(), Some("client_id"), "{e:?}");
        }
        let e = handler
            .handle(
                Command::CreateImage(Box::new(CreateImage {
                    pool: "rbd".into(),
                    image: "img".into(),
                    size_bytes: 1 << 30,
                    features: vec!["fast-diff".into()],
                    owner: owner("v"),
                    policy: None,
                    clone_from: None,
                })),
                Fence::none(),
            )
            .await
            .unwrap_err();
        assert!(e.message.contains("requires"), "{}", e.message);
        assert!(handler.ceph().runner().0.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn out_of_range_sizes_and_retentions_are_invalid_arguments_with_nothing_written() {
        let handler = CephHandler::new(Ceph::new(Recording::default(), None));
        let huge = u64::MAX - (1 << 20) + 1;
        let policy = |secs| {
            Some(protocol::ImagePolicy {
                deletion: protocol::meta::DeletionPolicy::Trash,
                trash_retention_secs: secs,
            })
        };
        let cases = [
            (
                "size_bytes",
                Command::CreateImage(Box::new(CreateImage {
                    pool: "rbd".into(),
                    image: "img".into(),
                    size_bytes: huge,
                    features: vec![],
                    owner: owner("v"),
                    policy: None,
                    clone_from: None,
                })),
            ),
            (
                "size_bytes",
                Command::GrowImage(GrowImage {
                    pool: "rbd".into(),
                    image: "img".into(),
                    size_bytes: protocol::limits::MAX_VOLUME_BYTES + (1 << 20),
                    owner: owner("v"),
                }),
            ),
            (
                "retain_secs",
                Command::TrashImage(TrashImage {
                    pool: "rbd".into(),
                    image: "img".into(),
                    retain_secs: u64::MAX,
                    owner: owner("v"),
                }),
            ),
            (
                "policy.trash_retention_secs",
                Command::CreateImage(Box::new(CreateImage {
                    pool: "rbd".into(),
                    image: "img".into(),
                    size_bytes: 1 << 30,
                    features: vec![],
                    owner: owner("v"),
                    policy: policy(u64::MAX),
                    clone_from: None,
                })),
            ),
        ];
        for (field, command) in cases {
            let name = command.name();
            let e = handler.handle(command, Fence::none()).await.unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidArgument, "{name}: {e:?}");
            assert!(!e.code.is_transient(), "{name}: {e:?}");
            assert_eq!(e.field.as_deref(), Some(field), "{name}: {e:?}");
        }
        // Not one command ran: no index entry, no rbd, no date arithmetic.
        assert!(handler.ceph().runner().0.lock().unwrap().is_empty());
    }
}

#[cfg(test)]
mod report_cost {
    use std::fmt::Write as _;

    use super::*;
    use crate::runner::{CliError, Invocation, Output};

    /// A one-pool cluster of `n` managed images, answered from canned CLI output.
    struct Canned {
        n: usize,
    }

    fn out(s: String) -> Output {
        Output {
            code: 0,
            stdout: s.into_bytes(),
            stderr: String::new(),
        }
    }

    #[async_trait::async_trait]
    impl Runner for Canned {
        async fn run(&self, inv: Invocation) -> Result<Output, CliError> {
            let line = inv.display();
            let reply = if line.starts_with("ceph status") {
                r#"{"fsid":"f","health":{"status":"HEALTH_OK","checks":{}},"monmap":{"epoch":1},"osdmap":{"epoch":7}}"#.to_string()
            } else if line.starts_with("ceph mon dump") {
                r#"{"mons":[{"name":"a","public_addrs":{"addrvec":[{"type":"v1","addr":"127.0.0.1:6789"}]}}]}"#.to_string()
            } else if line.starts_with("ceph df") {
                r#"{"stats":{"total_bytes":1,"total_avail_bytes":1,"total_used_raw_bytes":0},"pools":[{"name":"rbd","id":1,"stats":{"stored":0,"max_avail":1}}]}"#.to_string()
            } else if line.starts_with("ceph osd pool ls detail") {
                r#"[{"pool_name":"rbd","application_metadata":{"rbd":{}}}]"#.to_string()
            } else if line.starts_with("ceph config-key dump unistor/fence/") {
                "{}".to_string()
            } else if line.contains("listomapvals") {
                let mut s = String::new();
                for i in 0..self.n {
                    let v = format!(
                        r#"{{"managed_by":"unistor","volume":"v{i}","features":["layering"]}}"#
                    );
                    let _ = writeln!(s, "img{i}\nvalue ({} bytes) :", v.len());
                    for (row, chunk) in v.as_bytes().chunks(16).enumerate() {
                        let hex: Vec<String> = chunk.iter().map(|b| format!("{b:02x}")).collect();
                        let _ = writeln!(s, "{:08x}  {}  |x|", row * 16, hex.join(" "));
                    }
                    let _ = writeln!(s, "{:08x}\n", v.len());
                }
                s
            } else if line.starts_with("rbd trash ls") {
                "[]".to_string()
            } else if line.starts_with("rbd ls") {
                let items: Vec<String> = (0..self.n)
                    .map(|i| format!(r#"{{"image":"img{i}","size":67108864}}"#))
                    .collect();
                format!("[{}]", items.join(","))
            } else {
                panic!("a report ran {line}");
            }
            .to_string();
            Ok(out(reply))
        }
    }

    /// [`Canned`], except that the first listing starting with `listing` (`rbd ls`, `rbd trash
    /// ls`) fails as it does when an image is removed (or purged) while it lists it.
    struct RaceOnce {
        inner: Canned,
        listing: &'static str,
        raced: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl Runner for RaceOnce {
        async fn run(&self, inv: Invocation) -> Result<Output, CliError> {
            let line = inv.display();
            if line.starts_with(self.listing)
                && !self.raced.swap(true, std::sync::atomic::Ordering::SeqCst)
            {
                return Err(CliError::Failed {
                    command: line,
                    code: 2,
                    stderr: "rbd: error opening x: (2) No such file or directory".into(),
                });
            }
            self.inner.run(inv).await
        }
    }

    /// [`Canned`] with no image in the view, and a pool whose listing holds one image, `here`
    /// (1 MiB, no metadata, no watchers); records every command it runs.
    struct OneOutside {
        inner: Canned,
        ran: std::sync::Mutex<Vec<String>>,
    }

    #[async_trait::async_trait]
    impl Runner for OneOutside {
        async fn run(&self, inv: Invocation) -> Result<Output, CliError> {
            let line = inv.display();
            self.ran.lock().unwrap().push(line.clone());
            let here = line.ends_with("-- here");
            let reply = if line.starts_with("rbd ls --format json") {
                r#"["here"]"#
            } else if line.starts_with("rbd info") && here {
                r#"{"size":1048576,"features":["layering"]}"#
            } else if line.starts_with("rbd image-meta list") && here {
                ""
            } else if line.starts_with("rbd status") && here {
                r#"{"watchers":[]}"#
            } else if line.starts_with("rbd info") {
                panic!("{line}: an image the pool does not list was read");
            } else {
                return self.inner.run(inv).await;
            };
            Ok(out(reply.to_string()))
        }
    }

    #[tokio::test]
    async fn probing_images_reads_only_those_the_pool_lists() {
        let ceph = Ceph::new(
            OneOutside {
                inner: Canned { n: 0 },
                ran: Default::default(),
            },
            None,
        );
        let specs: Vec<ImageSpec> = ["gone-1", "here", "gone-2"]
            .iter()
            .map(|i| ImageSpec::parse("rbd", i).unwrap())
            .collect();
        let st = ceph.probe_images(&specs).await.unwrap();
        let states: Vec<(&str, bool)> = st
            .iter()
            .map(|i| (i.image.as_str(), i.state == protocol::ImageState::Live))
            .collect();
        assert_eq!(
            states,
            [("gone-1", false), ("here", true), ("gone-2", false)]
        );
        assert_eq!(st[1].size_bytes, 1 << 20);
        let ran = ceph.runner().ran.lock().unwrap().clone();
        let count = |prefix: &str| ran.iter().filter(|l| l.starts_with(prefix)).count();
        assert_eq!(
            count("rbd ls --format json"),
            1,
            "one listing per pool: {ran:?}"
        );
        assert_eq!(count("rbd info"), 1, "{ran:?}");
    }

    /// Answers `rbd status` with no watchers; anything else is not expected.
    struct NoWatchers;

    #[async_trait::async_trait]
    impl Runner for NoWatchers {
        async fn run(&self, inv: Invocation) -> Result<Output, CliError> {
            let line = inv.display();
            assert!(line.starts_with("rbd status"), "ran {line}");
            Ok(out(r#"{"watchers":[]}"#.into()))
        }
    }

    /// A mutation of an image in flight here (its lock held) opens the image with `rbd`, which
    /// shows as a watcher: a watcher lookup of that image waits for it, one of another image
    /// does not.
    #[tokio::test(start_paused = true)]
    async fn a_watcher_lookup_waits_for_a_mutation_of_the_same_image() {
        let h = Arc::new(CephHandler::new(Ceph::new(NoWatchers, None)));
        let lookup = |image: &str| {
            Command::ImageWatchers(protocol::ImageList {
                images: vec![protocol::ImageRef {
                    pool: "rbd".into(),
                    image: image.into(),
                }],
            })
        };
        let mutation = h.lock_for("image:rbd/busy");
        let in_flight = mutation.clone().lock_owned().await;
        // Another image: answered at once.
        h.dispatch(lookup("idle"), &Fence::none()).await.unwrap();
        // The busy one: not before the mutation ends (paused time runs out the hour first).
        let waiting = tokio::time::timeout(
            std::time::Duration::from_secs(3600),
            h.dispatch(lookup("busy"), &Fence::none()),
        )
        .await;
        assert!(waiting.is_err(), "answered while the image's mutation ran");
        let pending = tokio::spawn({
            let h = h.clone();
            async move { h.dispatch(lookup("busy"), &Fence::none()).await }
        });
        drop(in_flight);
        assert!(matches!(pending.await.unwrap(), Ok(Reply::Watchers(_))));
        h.release_lock("image:rbd/busy", mutation);
        assert!(
            h.locks.lock().unwrap().is_empty(),
            "locks nobody holds are forgotten"
        );
    }

    #[tokio::test]
    async fn an_image_removed_while_listed_does_not_fail_the_load() {
        for listing in ["rbd ls", "rbd trash ls"] {
            let ceph = Ceph::new(
                RaceOnce {
                    inner: Canned { n: 3 },
                    listing,
                    raced: Default::default(),
                },
                None,
            );
            let r = ceph.report().await.unwrap();
            assert_eq!(r.images.len(), 3);
            assert!(
                ceph.runner()
                    .raced
                    .load(std::sync::atomic::Ordering::SeqCst),
                "the race happened in {listing}"
            );
        }
    }

    /// [`Canned`] with a leftover of an interrupted create of `img0` in the listing, whose
    /// removal fails as it does while another process removes it (ESTALE).
    struct StaleLeftover {
        inner: Canned,
        tried: std::sync::atomic::AtomicBool,
    }

    #[async_trait::async_trait]
    impl Runner for StaleLeftover {
        async fn run(&self, inv: Invocation) -> Result<Output, CliError> {
            let line = inv.display();
            if line.starts_with("rbd ls") {
                let mut items: Vec<String> = (0..self.inner.n)
                    .map(|i| format!(r#"{{"image":"img{i}","size":67108864}}"#))
                    .collect();
                items.push(r#"{"image":".unistor-new.img0","size":1048576}"#.into());
                return Ok(out(format!("[{}]", items.join(","))));
            }
            if line.starts_with("rbd image-meta list") && line.ends_with(".unistor-new.img0") {
                return Ok(out("{}".into()));
            }
            if line.starts_with("rbd rm") && line.ends_with(".unistor-new.img0") {
                self.tried.store(true, std::sync::atomic::Ordering::SeqCst);
                return Err(CliError::Failed {
                    command: line,
                    code: 116,
                    stderr: "rbd: delete error: (116) Stale file handle".into(),
                });
            }
            self.inner.run(inv).await
        }
    }

    #[tokio::test]
    async fn a_leftover_that_cannot_be_removed_now_does_not_fail_the_load() {
        // Any age is old enough here (a canned runner has no librbd to tell the age).
        let ceph = Ceph::with_options(
            StaleLeftover {
                inner: Canned { n: 3 },
                tried: Default::default(),
            },
            None,
            crate::ceph::ViewOptions {
                leftover_age: Duration::ZERO,
                ..Default::default()
            },
        );
        let r = ceph.report().await.unwrap();
        assert_eq!(r.images.len(), 3, "{:?}", r.images);
        assert!(
            ceph.runner()
                .tried
                .load(std::sync::atomic::Ordering::SeqCst),
            "the leftover's removal was tried"
        );
    }

    #[tokio::test]
    async fn an_empty_view_still_has_a_generation_to_ask_changes_since() {
        let ceph = Ceph::new(Canned { n: 0 }, None);
        let first = ceph.changes(0, None, MAX_PAGE).await.unwrap();
        assert!(first.full && first.images.is_empty());
        assert!(first.generation >= 1, "{first:?}");
        let next = ceph
            .changes(first.generation, None, MAX_PAGE)
            .await
            .unwrap();
        assert!(
            !next.full,
            "a controller that read everything gets deltas: {next:?}"
        );
    }

    #[tokio::test]
    async fn a_report_costs_at_most_five_commands_at_a_thousand_images() {
        let ceph = Ceph::new(Canned { n: 1000 }, None);
        ceph.load().await.unwrap();
        let loaded = ceph.calls();
        // Start-up: the pool list, then the index, the trash and `rbd ls --long` of the pool.
        assert_eq!(loaded, 4);
        let r = ceph.report().await.unwrap();
        assert_eq!(r.images.len(), 1000);
        assert!(r
            .images
            .iter()
            .all(|i| i.size_bytes == 64 << 20 && i.metadata["unistor.managed-by"] == "unistor"));
        assert_eq!(
            ceph.calls() - loaded,
            5,
            "the first report is five ceph commands (the fences recorded, the fifth)"
        );
        // Later ones re-read the monitor and OSD maps only when their epochs move.
        let r = ceph.report().await.unwrap();
        assert_eq!(r.monitors.len(), 1);
        assert_eq!(r.pools.iter().filter(|p| p.rbd_enabled).count(), 1);
        assert_eq!(
            ceph.calls() - loaded,
            7,
            "a later report is two ceph commands"
        );
        let c = ceph.changes(0, None, MAX_PAGE).await.unwrap();
        assert_eq!(c.images.len(), 1000);
        assert!(ceph.calls() - loaded <= 9);
    }
}
