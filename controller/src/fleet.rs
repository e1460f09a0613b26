//! The agents of a manifest set: connect to all of them concurrently, each with its own deadline,
//! and gather what they report. An agent that cannot be reached is Unknown, never empty.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use protocol::client::{AgentClient, ClientOptions};
use protocol::names::PeerName;
use protocol::{Command, Empty, Reply};
use tokio::task::JoinSet;

use crate::manifest::Desired;
use crate::plan::{Known, Observed, Target};

/// Connected agents, by target; the error text for those that could not be reached.
pub struct Fleet {
    /// Sessions.
    pub agents: BTreeMap<Target, Result<Arc<AgentClient>, String>>,
}

/// How the fleet is reached.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// TLS client configuration (the controller's certificate).
    pub tls: Arc<rustls::ClientConfig>,
    /// Client timers.
    pub client: ClientOptions,
    /// Deadline of one agent's report.
    pub report_timeout: Duration,
}

impl Fleet {
    /// Connects to every agent the manifests name, concurrently.
    pub async fn connect(desired: &Desired, opts: &FleetOptions) -> Self {
        let mut targets: Vec<(Target, PeerName, String)> = vec![];
        for c in desired.clusters.values() {
            targets.push((
                Target::Cluster(c.name.clone()),
                c.agent.clone(),
                c.address.clone(),
            ));
        }
        for d in desired.dpus.values() {
            targets.push((
                Target::Dpu(d.name.clone()),
                d.agent.clone(),
                d.address.clone(),
            ));
        }
        let mut set = JoinSet::new();
        for (target, name, addr) in targets {
            let tls = opts.tls.clone();
            let client = opts.client.clone();
            set.spawn(async move {
                let r = AgentClient::connect(&addr, &name, tls, client)
                    .await
                    .map(Arc::new)
                    .map_err(|e| protocol::error::chain(&e));
                (target, r)
            });
        }
        let mut agents = BTreeMap::new();
        while let Some(Ok((t, r))) = set.join_next().await {
            agents.insert(t, r);
        }
        Self { agents }
    }

    /// The session with `target`, or why there is none.
    pub fn get(&self, target: &Target) -> Result<Arc<AgentClient>, String> {
        match self.agents.get(target) {
            Some(Ok(c)) => Ok(c.clone()),
            Some(Err(e)) => Err(e.clone()),
            None => Err("not in the manifests".into()),
        }
    }

    /// Asks every connected agent for its report, concurrently, each within `timeout`.
    pub async fn observe(&self, timeout: Duration) -> Observed {
        let mut set = JoinSet::new();
        for (t, c) in &self.agents {
            let t = t.clone();
            let c = c.clone();
            set.spawn(async move {
                let c = match c {
                    Ok(c) => c,
                    Err(e) => return (t, Err(e)),
                };
                let cmd = match t {
                    Target::Cluster(_) => Command::CephReport(Empty {}),
                    Target::Dpu(_) => Command::DpuReport(Empty {}),
                };
                let r = match tokio::time::timeout(timeout, c.request(cmd)).await {
                    Ok(Ok(r)) => Ok(r),
                    Ok(Err(e)) => Err(protocol::error::chain(&e)),
                    Err(_) => Err(format!("no report within {timeout:?}")),
                };
                (t, r)
            });
        }
        let mut o = Observed::default();
        while let Some(Ok((t, r))) = set.join_next().await {
            match (t, r) {
                (Target::Cluster(n), Ok(Reply::CephReport(r))) => {
                    o.clusters.insert(n, Known::Known { report: r });
                }
                (Target::Dpu(n), Ok(Reply::DpuReport(r))) => {
                    o.dpus.insert(n, Known::Known { report: r });
                }
                (Target::Cluster(n), r) => {
                    o.clusters.insert(n, Known::Unknown { reason: reason(r) });
                }
                (Target::Dpu(n), r) => {
                    o.dpus.insert(n, Known::Unknown { reason: reason(r) });
                }
            }
        }
        o
    }

    /// Closes every session cleanly.
    pub async fn close(self) {
        for (_, c) in self.agents {
            if let Ok(c) = c {
                if let Ok(c) = Arc::try_unwrap(c) {
                    c.close().await;
                }
            }
        }
    }
}

fn reason(r: Result<Reply, String>) -> String {
    match r {
        Ok(other) => format!("unexpected reply {other:?}"),
        Err(e) => e,
    }
}
