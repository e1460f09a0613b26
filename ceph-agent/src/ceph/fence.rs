//! Fencing a DPU's SNAP off the cluster, for the controller's `unistor fence dpu/NAME`: the
//! DPU's own cephx identity loses its OSD caps (a SNAP that reconnects can read nothing), and
//! every client of that identity connected now is blocklisted (`ceph osd blocklist add`: the
//! OSDs refuse its I/O, its watches lapse). The fence is recorded in the cluster itself
//! (`ceph config-key`, `unistor/fence/<dpu>`), reported with the cluster, and undone by
//! [`Ceph::unfence`].
//!
//! Crash windows (the agent killed at any point): the record is written first, `fencing`, with
//! the caps it will restore; then the caps are revoked; then the clients blocklisted; then the
//! record says `fenced`. Dead before the record: nothing happened. After it: a `fencing` record,
//! which a controller does not count as a fence (volumes stay held) until the fence is run
//! again (it resumes from the record, keeping the caps recorded first) or undone. The unfence
//! restores the caps, removes the blocklist entries, and removes the record last: dead part
//! way, the record is still there and the unfence runs again.

use super::*;
use protocol::names::PeerName;
use protocol::{FenceRecord, FenceRequest, FenceState, UnfenceRequest, FENCE_REASON_MAX};

/// Where fences are recorded, one `ceph config-key` per DPU.
const PREFIX: &str = "unistor/fence/";

/// How long a blocklist entry lasts: until the unfence (Ceph wants an expiry; ten years).
const BLOCKLIST_SECS: &str = "315360000";

/// The caps a fenced identity keeps: it may still authenticate and read the maps, nothing else.
const FENCED_MON_CAPS: &str = "allow r";

fn key(dpu: &PeerName) -> String {
    format!("{PREFIX}{dpu}")
}

/// A reason as recorded: bounded, printable.
fn check_reason(reason: &str) -> Result<(), CephError> {
    if reason.chars().count() > FENCE_REASON_MAX || reason.chars().any(char::is_control) {
        return Err(CephError::Invalid {
            field: "reason",
            message: format!("at most {FENCE_REASON_MAX} printable characters"),
        });
    }
    Ok(())
}

impl<R: Runner> Ceph<R> {
    /// Every fence recorded in the cluster (records that do not parse are skipped, logged).
    pub async fn fences(&self) -> Result<Vec<FenceRecord>, CephError> {
        let all: BTreeMap<String, String> = self
            .json(Invocation::new(Tool::Ceph).args([
                "config-key",
                "dump",
                PREFIX,
                "--format",
                "json",
            ]))
            .await?;
        Ok(all
            .into_iter()
            .filter(|(k, _)| k.starts_with(PREFIX))
            .filter_map(|(k, v)| match serde_json::from_str::<FenceRecord>(&v) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(key = %k, error = %e, "A fence record does not parse; ignored.");
                    None
                }
            })
            .collect())
    }

    /// The fence recorded for `dpu`, if any.
    async fn fence_of(&self, dpu: &PeerName) -> Result<Option<FenceRecord>, CephError> {
        Ok(self
            .fences()
            .await?
            .into_iter()
            .find(|r| r.dpu == dpu.as_str()))
    }

    /// The fence of an identity, if one is recorded (a fenced identity is never re-issued).
    pub(super) async fn fence_of_identity(
        &self,
        id: &CephClientId,
    ) -> Result<Option<FenceRecord>, CephError> {
        Ok(self
            .fences()
            .await?
            .into_iter()
            .find(|r| r.client_id == id.as_str()))
    }

    async fn write_fence(&self, dpu: &PeerName, r: &FenceRecord) -> Result<(), CephError> {
        let value = serde_json::to_vec(r).expect("a record serializes");
        // The value on stdin: the reason is the operator's text, never an argument.
        self.run(
            Invocation::new(Tool::Ceph)
                .args(["config-key", "set"])
                .arg(key(dpu))
                .args(["-i", "-"])
                .stdin(value),
        )
        .await?;
        self.cluster_changed().await;
        Ok(())
    }

    /// The cluster part of the report is read again, and controllers told.
    async fn cluster_changed(&self) {
        *self.cluster.lock().await = None;
        self.with_view(|v| v.bump());
    }

    /// Fences `req.dpu`'s SNAP (see the module's docs). Runs again after an interruption, and
    /// on a DPU already fenced blocklists whatever of its identity connected since.
    pub async fn fence(&self, req: &FenceRequest) -> Result<FenceRecord, CephError> {
        let dpu = PeerName::parse("dpu", &req.dpu)?;
        let id = CephClientId::parse("client_id", &req.client_id)?;
        check_reason(&req.reason)?;
        check_reason(&req.by)?;
        if self.protected_ids.contains(id.as_str()) {
            return Err(CephError::Invalid {
                field: "client_id",
                message: format!("client.{id} is reserved (admin or the agent's own identity)"),
            });
        }
        let entity = format!("client.{id}");
        let mut record = match self.fence_of(&dpu).await? {
            Some(r) if r.client_id != id.as_str() => {
                return Err(CephError::Invalid {
                    field: "client_id",
                    message: format!(
                        "dpu/{dpu} is recorded fenced as client.{}, not {entity}",
                        r.client_id
                    ),
                })
            }
            Some(r) => r,
            None => {
                let found: Vec<CephIdentity> = self
                    .json(
                        Invocation::new(Tool::Ceph)
                            .args(["auth", "get"])
                            .arg(&entity)
                            .args(["--format", "json"]),
                    )
                    .await
                    .map_err(|e| match e {
                        CephError::Cli(c) if c.code() == Some(libc_enoent()) => {
                            CephError::NotFound {
                                spec: entity.clone(),
                                hint: " (the DPU's SNAP identity was never issued)".into(),
                            }
                        }
                        e => e,
                    })?;
                let caps = found.into_iter().next().map(|i| i.caps).unwrap_or_default();
                let r = FenceRecord {
                    dpu: dpu.to_string(),
                    client_id: id.to_string(),
                    state: FenceState::Fencing,
                    at_unix_ms: protocol::clock::unix_ms(),
                    by: req.by.clone(),
                    reason: req.reason.clone(),
                    caps_before: caps,
                    blocklisted: vec![],
                };
                self.write_fence(&dpu, &r).await?;
                r
            }
        };
        // No more OSD access for a client that authenticates from now on.
        self.run(
            Invocation::new(Tool::Ceph)
                .args(["auth", "caps"])
                .arg(&entity)
                .args(["mon", FENCED_MON_CAPS]),
        )
        .await?;
        // And none for those connected now.
        let mut addrs: Vec<String> = self
            .client_entities()
            .await?
            .into_iter()
            .filter(|(_, e)| *e == entity)
            .map(|(a, _)| a)
            .collect();
        addrs.sort();
        for a in &addrs {
            self.run(
                Invocation::new(Tool::Ceph)
                    .args(["osd", "blocklist", "add"])
                    .arg(a)
                    .arg(BLOCKLIST_SECS),
            )
            .await?;
            if !record.blocklisted.contains(a) {
                record.blocklisted.push(a.clone());
            }
        }
        record.state = FenceState::Fenced;
        self.write_fence(&dpu, &record).await?;
        tracing::warn!(dpu = %dpu, entity = %entity, blocklisted = ?record.blocklisted, "DPU fenced off the cluster.");
        Ok(record)
    }

    /// Undoes the fence of `req.dpu`: the caps it had, the blocklist entries removed, then the
    /// record. Nothing recorded: nothing to do.
    pub async fn unfence(&self, req: &UnfenceRequest) -> Result<(), CephError> {
        let dpu = PeerName::parse("dpu", &req.dpu)?;
        let id = CephClientId::parse("client_id", &req.client_id)?;
        let Some(record) = self.fence_of(&dpu).await? else {
            return Ok(());
        };
        if record.client_id != id.as_str() {
            return Err(CephError::Invalid {
                field: "client_id",
                message: format!(
                    "dpu/{dpu} is recorded fenced as client.{}, not client.{id}",
                    record.client_id
                ),
            });
        }
        let entity = format!("client.{id}");
        if !record.caps_before.is_empty() {
            let mut caps = Invocation::new(Tool::Ceph)
                .args(["auth", "caps"])
                .arg(&entity);
            for (service, cap) in &record.caps_before {
                // Recorded from `ceph auth get`; checked before they reach the command line.
                if !matches!(service.as_str(), "mon" | "osd" | "mgr" | "mds") {
                    return Err(CephError::Invalid {
                        field: "caps_before",
                        message: format!("unexpected service {service:?} in the record"),
                    });
                }
                caps = caps.arg(service).arg(cap);
            }
            self.run(caps).await?;
        }
        for a in &record.blocklisted {
            match self
                .run(
                    Invocation::new(Tool::Ceph)
                        .args(["osd", "blocklist", "rm"])
                        .arg(a),
                )
                .await
            {
                Ok(_) => {}
                // Expired or removed by hand already.
                Err(e) if e.code() == Some(libc_enoent()) => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.run(
            Invocation::new(Tool::Ceph)
                .args(["config-key", "rm"])
                .arg(key(&dpu)),
        )
        .await?;
        self.cluster_changed().await;
        tracing::warn!(dpu = %dpu, entity = %entity, "DPU unfenced.");
        Ok(())
    }
}
