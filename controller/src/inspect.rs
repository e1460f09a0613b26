//! `unistor inspect`: dial one agent, show its hello and its report.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use protocol::client::{AgentClient, ClientOptions};
use protocol::dpu::DpuReport;
use protocol::names::PeerName;
use protocol::tls::{self, PkiPaths};
use protocol::{AgentKind, CephReport, Command, Empty, ImageState, Reply};

use crate::Error;

/// `unistor inspect`
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The agent's name (its certificate must name it).
    #[arg(long)]
    pub agent: String,
    /// The agent's address, host:port.
    #[arg(long)]
    pub addr: String,
    /// PKI directory with ca.crt and the controller's certificate.
    #[arg(long)]
    pub pki_dir: PathBuf,
    /// The controller's certificate name in the PKI directory.
    #[arg(long, default_value = "controller")]
    pub controller: String,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
    /// Deadline for the report.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// After the report, stay connected and print the agent's events (one JSON per line) for
    /// this long.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub follow: Option<Duration>,
}

/// Output formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Output {
    /// For people.
    Text,
    /// The agent's hello and report as JSON.
    Json,
}

/// Runs `inspect`.
pub async fn run(a: InspectArgs) -> Result<(), Error> {
    let agent = PeerName::parse("--agent", &a.agent)?;
    let controller = PeerName::parse("--controller", &a.controller)?;
    let tls = tls::client_config(&PkiPaths::in_dir(&a.pki_dir, controller.as_str()))?;
    let options = ClientOptions {
        controller_name: controller.to_string(),
        request_timeout: a.timeout,
        ..ClientOptions::default()
    };
    let client = AgentClient::connect(&a.addr, &agent, tls, options).await?;
    let hello = client.hello().clone();
    let command = match hello.kind {
        AgentKind::Ceph => Command::CephReport(Empty {}),
        AgentKind::Dpu => Command::DpuReport(Empty {}),
    };
    let (ceph, dpu) = match client.request(command).await? {
        Reply::CephReport(r) => (Some(r), None),
        Reply::DpuReport(r) => (None, Some(r)),
        _ => (None, None),
    };
    let mut out = std::io::stdout().lock();
    match a.output {
        Output::Json => {
            let report = match (&ceph, &dpu) {
                (Some(c), _) => serde_json::to_value(c).expect("serializable"),
                (_, Some(d)) => serde_json::to_value(d).expect("serializable"),
                _ => serde_json::Value::Null,
            };
            let v = serde_json::json!({ "hello": hello, "report": report });
            writeln!(
                out,
                "{}",
                serde_json::to_string_pretty(&v).expect("serializable")
            )?;
        }
        Output::Text => {
            writeln!(
                out,
                "agent {} ({}) at {}, protocol v{}, capabilities: {}",
                hello.name,
                hello.kind,
                a.addr,
                hello.version,
                hello.capabilities.join(", ")
            )?;
            match &hello.lease {
                Some(l) => writeln!(
                    out,
                    "lease: held by {} (token {}, {} ms left)",
                    l.holder, l.token, l.remaining_ms
                )?,
                None => writeln!(out, "lease: free")?,
            }
            if let Some(r) = ceph {
                write_ceph(&mut out, &r)?;
            }
            if let Some(r) = dpu {
                write_dpu(&mut out, &r)?;
            }
        }
    }
    drop(out);
    if let Some(limit) = a.follow {
        if let Some(mut events) = client.take_events() {
            let until = tokio::time::sleep(limit);
            tokio::pin!(until);
            loop {
                tokio::select! {
                    _ = &mut until => break,
                    ev = events.recv() => match ev {
                        Some(ev) => {
                            let line = serde_json::to_string(&ev).expect("serializable");
                            writeln!(std::io::stdout().lock(), "{line}")?;
                        }
                        None => break,
                    },
                }
            }
        }
    }
    client.close().await;
    Ok(())
}

/// The DPU report as text.
pub fn write_dpu(out: &mut impl Write, r: &DpuReport) -> std::io::Result<()> {
    let h = &r.host;
    writeln!(
        out,
        "host {} ({}): {} CPUs {}, memory {} of {} available, hugepages {}/{} free, load {:.2}",
        h.hostname,
        r.platform,
        h.cpus,
        h.cpu_model,
        human_bytes(h.mem_available_bytes),
        human_bytes(h.mem_total_bytes),
        h.hugepages_free,
        h.hugepages_total,
        h.load[0]
    )?;
    if let Some(bf) = &r.bluefield {
        writeln!(
            out,
            "bluefield: firmware {} psid {} temperature {} release {}",
            bf.firmware_version.as_deref().unwrap_or("?"),
            bf.psid.as_deref().unwrap_or("?"),
            bf.temperature_c
                .map(|t| format!("{t}C"))
                .unwrap_or("?".into()),
            bf.release.as_deref().unwrap_or("?")
        )?;
    }
    writeln!(
        out,
        "snap: {:?}, version {}, image {}, restarts {}, ledger generation {}",
        r.snap.state,
        r.snap.version.as_deref().unwrap_or("-"),
        r.snap.image.as_deref().unwrap_or("-"),
        r.snap.restarts,
        r.ledger_generation
    )?;
    if let Some(inv) = &r.inventory {
        writeln!(
            out,
            "inventory: {} functions, {} subsystems, {} controllers, {} bdevs, clusters [{}]",
            inv.functions.len(),
            inv.subsystems.len(),
            inv.controllers.len(),
            inv.bdevs.len(),
            inv.clusters.join(", ")
        )?;
        for c in &inv.controllers {
            writeln!(
                out,
                "  controller {} on {} ({}) namespaces {:?}",
                c.name,
                c.function.map(|f| f.to_string()).unwrap_or("?".into()),
                c.state,
                c.namespaces
            )?;
        }
    }
    if !r.missing.is_empty() {
        writeln!(out, "missing from SNAP: {}", r.missing.join(", "))?;
    }
    if let Some(rep) = &r.last_replay {
        writeln!(
            out,
            "last replay: {} restored, {} failed ({})",
            rep.restored.len(),
            rep.failed.len(),
            rep.reason
        )?;
    }
    Ok(())
}

/// Bytes in binary units, as operators write sizes: `512 MiB`, `1.5 GiB`.
fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The Ceph report as text.
pub fn write_ceph(out: &mut impl Write, r: &CephReport) -> std::io::Result<()> {
    writeln!(out, "cluster {}  {}", r.fsid, r.health.status)?;
    for (check, summary) in &r.health.checks {
        writeln!(out, "  {check}: {summary}")?;
    }
    for m in &r.monitors {
        writeln!(out, "mon.{}  {}", m.name, m.addrs.join(" "))?;
    }
    writeln!(
        out,
        "capacity: {} total, {} used, {} available",
        human_bytes(r.capacity.total_bytes),
        human_bytes(r.capacity.used_bytes),
        human_bytes(r.capacity.avail_bytes)
    )?;
    writeln!(
        out,
        "{:<24} {:>4} {:>5} {:>12} {:>12}",
        "POOL", "ID", "RBD", "STORED", "MAX AVAIL"
    )?;
    for p in &r.pools {
        writeln!(
            out,
            "{:<24} {:>4} {:>5} {:>12} {:>12}",
            p.name,
            p.id,
            if p.rbd_enabled { "yes" } else { "no" },
            human_bytes(p.stored_bytes),
            human_bytes(p.max_avail_bytes)
        )?;
    }
    writeln!(
        out,
        "{:<40} {:<8} {:>10} {:<7} VOLUME",
        "IMAGE", "STATE", "SIZE", "IN USE"
    )?;
    for i in &r.images {
        let state = match &i.state {
            ImageState::Live => "live",
            ImageState::Trashed { .. } => "trashed",
            ImageState::Missing => "missing",
        };
        writeln!(
            out,
            "{:<40} {:<8} {:>10} {:<7} {}",
            format!("{}/{}", i.pool, i.image),
            state,
            human_bytes(i.size_bytes),
            if i.in_use() { "yes" } else { "no" },
            i.metadata
                .get("unistor.volume")
                .map(String::as_str)
                .unwrap_or("-")
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_read_like_manifests() {
        assert_eq!(super::human_bytes(0), "0 B");
        assert_eq!(super::human_bytes(64 << 20), "64 MiB");
        assert_eq!(super::human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(super::human_bytes(100 << 30), "100 GiB");
    }
}
