//! A jumped wall clock (the agent's, through its seam: `UNISTOR_CLOCK_SKEW_FILE`, read at every
//! look). Leases run on the monotonic clock and certificates are valid from an hour before they
//! were issued: an agent 5 minutes ahead or behind keeps its controller's lease (same token) and
//! accepts new sessions; 2 hours behind (past the documented margin), it refuses the controller's
//! certificate as not yet valid.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use e2e::{dpu_agent_command, issue_pki, show, spawn_announced, Procs, ANY_PORT};
use protocol::client::{AgentClient, ClientOptions};
use protocol::names::PeerName;
use protocol::tls::{self, PkiPaths};

const AGENT: &str = "dpu-clock";

fn inspect(pki: &Path, addr: &str) -> Output {
    e2e::inspect(AGENT, addr, pki)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_agents_clock_jumped_keeps_leases_and_sessions_within_the_margin() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    issue_pki(&pki, &[AGENT]);
    let skew = dir.path().join("skew");
    std::fs::write(&skew, "0").unwrap();
    let mut procs = Procs::default();
    let mut cmd = dpu_agent_command(AGENT, ANY_PORT, &pki, &dir.path().join("state"), &[]);
    cmd.env("UNISTOR_CLOCK_SKEW_FILE", &skew);
    let (child, addr) = spawn_announced(&mut cmd, "listening on ");
    procs.0.push(child);

    let tls = tls::client_config(&PkiPaths::in_dir(&pki, "controller")).unwrap();
    let client = AgentClient::connect(
        &addr,
        &PeerName::parse("agent", AGENT).unwrap(),
        tls,
        ClientOptions::default(),
    )
    .await
    .unwrap();
    let token = client
        .acquire_lease(Duration::from_secs(30))
        .await
        .unwrap()
        .token;
    for secs in ["300", "-300"] {
        std::fs::write(&skew, secs).unwrap();
        let o = inspect(&pki, &addr);
        assert!(o.status.success(), "clock {secs} s: {}", show(&o));
        let renewed = client.acquire_lease(Duration::from_secs(30)).await.unwrap();
        assert_eq!(
            renewed.token, token,
            "clock {secs} s: the same lease, renewed"
        );
        assert!(renewed.remaining_ms > 25_000, "{renewed:?}");
    }
    // Two hours behind: the controller's certificate is not valid yet for the agent.
    std::fs::write(&skew, "-7200").unwrap();
    let o = inspect(&pki, &addr);
    assert!(!o.status.success(), "{}", show(&o));
    // Back: sessions again, and the lease never changed hands.
    std::fs::write(&skew, "0").unwrap();
    let o = inspect(&pki, &addr);
    assert!(o.status.success(), "{}", show(&o));
    assert_eq!(
        client
            .acquire_lease(Duration::from_secs(30))
            .await
            .unwrap()
            .token,
        token
    );
}
