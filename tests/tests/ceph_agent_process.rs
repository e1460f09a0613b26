//! The real binaries end to end: `unistor pki` issues certificates, `ceph-agent` runs against the
//! real cluster, `unistor inspect` and a controller session talk to it over mutual TLS.

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::Duration;

use e2e::{unique, wait_until, Cluster};
use protocol::client::{AgentClient, ClientOptions};
use protocol::names::PeerName;
use protocol::tls::{self, PkiPaths};
use protocol::{
    ChangesQuery, Command as Cmd, CreateImage, DeleteImage, ErrorCode, Event, Ownership, Reply,
};

const AGENT: &str = "ceph-e2e";

use e2e::unistor;

fn issue_pki(dir: &Path) {
    let d = dir.to_str().unwrap();
    e2e::issue_pki(dir, &[AGENT]);
    let out = unistor(&[
        "pki",
        "issue",
        "--dir",
        d,
        "--name",
        "controller-b",
        "--role",
        "controller",
    ]);
    assert!(out.status.success(), "{out:?}");
    // A second init must not overwrite the CA.
    let out = unistor(&["pki", "init", "--dir", d]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite"));
}

struct AgentProcess {
    child: Child,
    addr: String,
}

impl AgentProcess {
    fn start(c: &Cluster, pki: &Path, state: &Path) -> Self {
        let (child, addr) = e2e::spawn_announced(
            e2e::ceph_agent_command(c, AGENT, e2e::ANY_PORT, pki, state)
                .args(["--report-interval", "500ms"])
                .stderr(Stdio::inherit()),
            "listening on ",
        );
        Self { child, addr }
    }

    /// SIGTERM, then the exit status.
    fn terminate(mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let mut status = None;
        wait_until(Duration::from_secs(30), "ceph-agent to exit", || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status.unwrap()
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn session(pki: &Path, addr: &str, controller: &str) -> AgentClient {
    let tls = tls::client_config(&PkiPaths::in_dir(pki, controller)).unwrap();
    AgentClient::connect(
        addr,
        &PeerName::parse("agent", AGENT).unwrap(),
        tls,
        ClientOptions::default(),
    )
    .await
    .unwrap()
}

/// `unistor inspect` prints the agent's report (its fsid is the cluster's); dialled under the
/// wrong name, the agent is refused by the controller.
fn inspect_reads_the_report_and_checks_the_name(c: &Cluster, pki: &Path, addr: &str) {
    // `unistor inspect` prints the report; its fsid is the cluster's.
    let out = e2e::inspect(AGENT, addr, pki);
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v["report"]["fsid"].as_str().unwrap(),
        c.cli_ok("ceph", &["fsid"]).trim()
    );
    assert_eq!(v["hello"]["peer"], "controller");
    // Dialled under the wrong name, the agent is refused by the controller.
    let out = unistor(&[
        "inspect",
        "--agent",
        "ceph-other",
        "--addr",
        addr,
        "--pki-dir",
        pki.to_str().unwrap(),
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("ceph-other"));
}

#[tokio::test(flavor = "multi_thread")]
async fn ceph_agent_serves_an_authenticated_fenced_controller() {
    let c = Cluster::from_env();
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let state = dir.path().join("state");
    issue_pki(&pki);
    let agent = AgentProcess::start(&c, &pki, &state);

    inspect_reads_the_report_and_checks_the_name(&c, &pki, &agent.addr);

    // A fenced create through a controller session, checked with the real rbd CLI.
    let a = session(&pki, &agent.addr, "controller").await;
    let mut events = a.take_events().unwrap();
    let lease = a.acquire_lease(Duration::from_secs(30)).await.unwrap();
    let image = unique("e2e");
    let changes_since = |since: u64| {
        let a = &a;
        async move {
            match a
                .request(Cmd::CephChanges(ChangesQuery {
                    since,
                    after: None,
                    limit: 1000,
                }))
                .await
                .unwrap()
            {
                Reply::CephChanges(c) => c,
                other => panic!("not a changes reply: {other:?}"),
            }
        }
    };
    let before = changes_since(0).await.generation;
    let owner = Ownership {
        managed_by: "unistor".into(),
        volume: image.clone(),
    };
    let reply = a
        .request(Cmd::CreateImage(Box::new(CreateImage {
            pool: c.pool.clone(),
            image: image.clone(),
            size_bytes: 256 << 20,
            features: vec![],
            owner: owner.clone(),
            policy: None,
            clone_from: None,
        })))
        .await
        .unwrap();
    assert!(matches!(reply, Reply::Image(ref s) if s.size_bytes == 256 << 20));
    assert_eq!(
        c.rbd_info(&c.pool, &image).unwrap()["size"].as_u64(),
        Some(256 << 20)
    );

    // The agent says its view moved, and the changes since then show the new image.
    let generation = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(ev) = events.recv().await {
            if let Event::CephChanged { generation } = ev.event {
                if generation > before {
                    return Some(generation);
                }
            }
        }
        None
    })
    .await
    .expect("a change notification within a minute")
    .expect("events end with the session");
    let changes = changes_since(before).await;
    assert!(changes.generation >= generation);
    assert!(!changes.full, "{changes:?}");
    assert!(
        changes.images.iter().any(|i| i.image == image),
        "{changes:?}"
    );

    // Another controller is fenced off while the lease is held.
    let b = session(&pki, &agent.addr, "controller-b").await;
    let err = b
        .request_with_fence(
            Cmd::DeleteImage(DeleteImage {
                pool: c.pool.clone(),
                image: image.clone(),
                owner: owner.clone(),
            }),
            Some(lease.token),
        )
        .await
        .unwrap_err();
    let wire = err.wire().unwrap();
    assert_eq!(wire.code, ErrorCode::LeaseHeld);
    assert!(wire.message.contains("controller"), "{}", wire.message);
    assert!(c.rbd_info(&c.pool, &image).is_some(), "not deleted");

    a.request(Cmd::DeleteImage(DeleteImage {
        pool: c.pool.clone(),
        image: image.clone(),
        owner,
    }))
    .await
    .unwrap();
    assert!(c.rbd_info(&c.pool, &image).is_none());
    drop((a, b));

    // SIGTERM drains and exits 0; the fencing token survives the restart.
    let status = agent.terminate();
    assert!(status.success(), "{status:?}");
    let agent = AgentProcess::start(&c, &pki, &state);
    let a = session(&pki, &agent.addr, "controller").await;
    let again = a.acquire_lease(Duration::from_secs(30)).await.unwrap();
    assert!(again.token > lease.token, "{again:?} after {lease:?}");
    assert!(agent.terminate().success());
}
