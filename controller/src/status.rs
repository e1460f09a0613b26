//! `unistor status`: clusters, DPUs with their hosts, and each volume's chain
//! (image -> bdev -> namespace -> controller -> running) with the first broken link.

use std::fmt::Write;

use protocol::dpu::SnapInventory;
use protocol::ImageState;
use serde::Serialize;

use crate::manifest::{Desired, Volume};
use crate::plan::{names, Observed};

/// One volume's health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VolumeHealth {
    /// Volume.
    pub volume: String,
    /// Host.
    pub host: String,
    /// `ok`, `degraded` or `unknown`.
    pub state: &'static str,
    /// The first link of the chain that is not there, when degraded; why, when unknown.
    pub detail: String,
    /// Size the image has (0 when unknown).
    pub size_bytes: u64,
}

/// Walks one volume's chain.
pub fn volume_health(v: &Volume, observed: &Observed, nsid: Option<u32>) -> VolumeHealth {
    let mut h = VolumeHealth {
        volume: v.name.to_string(),
        host: v.host.clone(),
        state: "unknown",
        detail: String::new(),
        size_bytes: 0,
    };
    let Some(cluster) = observed.clusters.get(&v.cluster).and_then(|k| k.get()) else {
        h.detail = format!("cluster {} not reporting", v.cluster);
        return h;
    };
    let Some(dpu) = observed.dpus.get(&v.dpu).and_then(|k| k.get()) else {
        h.detail = format!("dpu {} not reporting", v.dpu);
        return h;
    };
    h.state = "degraded";
    let img = cluster
        .images
        .iter()
        .find(|i| i.pool == v.pool.as_str() && i.image == v.image.as_str());
    match img {
        Some(i) if i.state == ImageState::Live => h.size_bytes = i.size_bytes,
        Some(_) => {
            h.detail = format!("image {}/{} is in the trash", v.pool, v.image);
            return h;
        }
        None => {
            h.detail = format!("image {}/{} missing", v.pool, v.image);
            return h;
        }
    }
    let empty = SnapInventory::default();
    let inv = dpu.inventory.as_ref().unwrap_or(&empty);
    if dpu.inventory.is_none() {
        h.detail = format!("SNAP on {} is {:?}", v.dpu, dpu.snap.state);
        return h;
    }
    let bdev = names::bdev(v.name.as_str());
    if !inv.bdevs.iter().any(|b| b.name == bdev) {
        h.detail = format!("bdev {bdev} missing on {}", v.dpu);
        return h;
    }
    let nqn = names::nqn(&v.dpu, v.function);
    let ns = inv.subsystems.iter().find(|s| s.nqn == nqn).and_then(|s| {
        s.namespaces
            .iter()
            .find(|n| n.bdev == bdev && nsid.is_none_or(|x| x == n.nsid))
    });
    let Some(ns) = ns else {
        h.detail = format!("namespace for {bdev} missing in {nqn}");
        return h;
    };
    let ctrl = names::controller(v.function);
    let Some(c) = inv.controllers.iter().find(|c| c.name == ctrl) else {
        h.detail = format!("controller {ctrl} missing on {}", v.dpu);
        return h;
    };
    if !c.namespaces.contains(&ns.nsid) {
        h.detail = format!("nsid {} not attached to {ctrl}", ns.nsid);
        return h;
    }
    if !c.state.eq_ignore_ascii_case("STARTED") {
        h.detail = format!("controller {ctrl} is {}", c.state);
        return h;
    }
    h.state = "ok";
    h.detail = format!("{} nsid {} on {}", v.function, ns.nsid, v.dpu);
    h
}

/// The status tables.
pub fn render(desired: &Desired, observed: &Observed) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<12} {:<12} {:>8}",
        "CLUSTER", "AGENT", "HEALTH", "IMAGES"
    );
    for c in desired.clusters.values() {
        let (health, images) = match observed.clusters.get(&c.name).and_then(|k| k.get()) {
            Some(r) => (r.health.status.clone(), r.images.len().to_string()),
            None => ("UNKNOWN".into(), "-".into()),
        };
        let _ = writeln!(
            out,
            "{:<16} {:<12} {:<12} {:>8}",
            c.name, c.agent, health, images
        );
    }
    let _ = writeln!(
        out,
        "\n{:<12} {:<12} {:<14} {:<34} {:>8} {:>8}",
        "DPU", "HOST", "SNAP", "VERSION", "RESTARTS", "MISSING"
    );
    for d in desired.dpus.values() {
        match observed.dpus.get(&d.name).and_then(|k| k.get()) {
            Some(r) => {
                let _ = writeln!(
                    out,
                    "{:<12} {:<12} {:<14} {:<34} {:>8} {:>8}",
                    d.name,
                    d.host,
                    format!("{:?}", r.snap.state),
                    r.snap
                        .image
                        .as_deref()
                        .and_then(|i| i.rsplit(':').next())
                        .unwrap_or("-"),
                    r.snap.restarts,
                    r.missing.len()
                );
            }
            None => {
                let _ = writeln!(out, "{:<12} {:<12} {:<14}", d.name, d.host, "UNKNOWN");
            }
        }
    }
    let _ = writeln!(
        out,
        "\n{:<20} {:<10} {:>10} {:<9} DETAIL",
        "VOLUME", "HOST", "SIZE", "STATE"
    );
    for v in desired.volumes.values() {
        let h = volume_health(v, observed, v.nsid);
        let size = if h.size_bytes > 0 {
            format!("{}Mi", h.size_bytes >> 20)
        } else {
            "-".into()
        };
        let _ = writeln!(
            out,
            "{:<20} {:<10} {:>10} {:<9} {}",
            h.volume, h.host, size, h.state, h.detail
        );
    }
    out
}
