//! The session layer over real TCP and real mutual TLS: handshake, authentication, fencing,
//! malformed input, caps, deadlines and shutdown.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use protocol::client::{AgentClient, ClientError, ClientOptions};
use protocol::frame::Connection;
use protocol::lease::{Fence, LeaseTable};
use protocol::names::PeerName;
use protocol::server::{self, Handler, ServerConfig, ServerStats};
use protocol::tls::{self, PkiPaths, Role};
use protocol::{
    AgentKind, Command, ControllerHello, ControllerInstance, CreateImage, Empty, ErrorCode, Event,
    Message, Ownership, Reply, WireError, PROTOCOL_VERSION,
};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, oneshot};

const YEAR: Duration = Duration::from_secs(365 * 86400);
const AGENT: &str = "agent-1";

/// A handler that counts the commands that reach it; `ceph_report` sleeps `slow`.
struct Counting {
    calls: AtomicU64,
    slow: Duration,
    events: broadcast::Sender<Event>,
    /// While true, mutating commands wait once executing (their lease entered).
    hold: tokio::sync::watch::Sender<bool>,
}

#[async_trait::async_trait]
impl Handler for Counting {
    fn kind(&self) -> AgentKind {
        AgentKind::Ceph
    }
    fn capabilities(&self) -> Vec<String> {
        vec!["lease".into(), "test".into()]
    }
    async fn handle(&self, command: Command, fence: Fence) -> Result<Reply, WireError> {
        let _executing = fence.enter()?;
        self.calls.fetch_add(1, Ordering::SeqCst);
        if let Command::CephReport(_) = command {
            tokio::time::sleep(self.slow).await;
        }
        if command.is_mutating() {
            let mut hold = self.hold.subscribe();
            let _ = hold.wait_for(|h| !*h).await;
        }
        Ok(Reply::Done(Empty {}))
    }
    fn subscribe(&self) -> Option<broadcast::Receiver<Event>> {
        Some(self.events.subscribe())
    }
}

struct Pki {
    dir: tempfile::TempDir,
    rogue: tempfile::TempDir,
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        tls::init_ca(dir.path(), YEAR).unwrap();
        for (name, role) in [
            (AGENT, Role::Agent),
            ("agent-2", Role::Agent),
            ("ctl-a", Role::Controller),
            ("ctl-b", Role::Controller),
        ] {
            tls::issue(dir.path(), &peer(name), role, YEAR).unwrap();
        }
        let rogue = tempfile::tempdir().unwrap();
        tls::init_ca(rogue.path(), YEAR).unwrap();
        tls::issue(rogue.path(), &peer("ctl-a"), Role::Controller, YEAR).unwrap();
        Self { dir, rogue }
    }
    fn paths(&self, name: &str) -> PkiPaths {
        PkiPaths::in_dir(self.dir.path(), name)
    }
    fn client(&self, name: &str) -> Arc<rustls::ClientConfig> {
        tls::client_config(&self.paths(name)).unwrap()
    }
}

fn peer(name: &str) -> PeerName {
    PeerName::parse("name", name).unwrap()
}

struct Agent {
    addr: String,
    stats: Arc<ServerStats>,
    handler: Arc<Counting>,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

async fn start(pki: &Pki, tune: impl FnOnce(&mut ServerConfig), slow: Duration) -> Agent {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let mut config = ServerConfig::new(AGENT);
    config.handshake_timeout = Duration::from_millis(300);
    tune(&mut config);
    let stats = Arc::new(ServerStats::default());
    let handler = Arc::new(Counting {
        calls: AtomicU64::new(0),
        slow,
        events: broadcast::channel(16).0,
        hold: tokio::sync::watch::channel(false).0,
    });
    let (stop, stopped) = oneshot::channel();
    let done = tokio::spawn(server::run(
        listener,
        tls::server_config(&pki.paths(AGENT)).unwrap(),
        handler.clone(),
        LeaseTable::open(None).unwrap(),
        config,
        stats.clone(),
        async {
            let _ = stopped.await;
        },
    ));
    Agent {
        addr,
        stats,
        handler,
        stop: Some(stop),
        done,
    }
}

async fn connect(pki: &Pki, agent: &Agent, controller: &str) -> Result<AgentClient, ClientError> {
    connect_as(pki, agent, controller, ControllerInstance::this_process()).await
}

/// A client of controller `controller` as the process `instance`.
async fn connect_as(
    pki: &Pki,
    agent: &Agent,
    controller: &str,
    instance: ControllerInstance,
) -> Result<AgentClient, ClientError> {
    let opts = ClientOptions {
        request_timeout: Duration::from_secs(10),
        instance,
        ..ClientOptions::default()
    };
    AgentClient::connect(&agent.addr, &peer(AGENT), pki.client(controller), opts).await
}

fn create() -> Command {
    Command::CreateImage(Box::new(CreateImage {
        pool: "rbd".into(),
        image: "vol1".into(),
        size_bytes: 1 << 30,
        features: vec![],
        owner: Ownership {
            managed_by: "unistor".into(),
            volume: "vol1".into(),
        },
        policy: None,
        clone_from: None,
    }))
}

fn code(r: Result<Reply, ClientError>) -> ErrorCode {
    r.unwrap_err().wire().expect("an error from the agent").code
}

/// A TLS connection as controller `ctl-a` that has sent its hello and read the agent's.
async fn raw_session(
    pki: &Pki,
    agent: &Agent,
) -> Connection<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(&agent.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(pki.client("ctl-a"))
        .connect(ServerName::try_from(AGENT).unwrap(), tcp)
        .await
        .unwrap();
    let mut conn = Connection::new(tls);
    let hello = Message::ControllerHello(ControllerHello {
        version: PROTOCOL_VERSION,
        name: "raw".into(),
        heartbeat_ms: None,
    });
    conn.write_frame(&hello.to_bytes()).await.unwrap();
    let first = conn.read_frame().await.unwrap().unwrap();
    assert!(matches!(
        Message::from_bytes(&first).unwrap(),
        Message::AgentHello(_)
    ));
    conn
}

/// Reads until a message other than an event arrives.
async fn next_non_event<S>(conn: &mut Connection<S>) -> Option<Message>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(10), conn.read_frame())
            .await
            .expect("answer in time")
            .ok()??;
        match Message::from_bytes(&frame).unwrap() {
            Message::Event(_) => continue,
            other => return Some(other),
        }
    }
}

#[tokio::test]
async fn hello_names_both_sides() {
    let pki = Pki::new();
    let agent = start(&pki, |_| {}, Duration::ZERO).await;
    let c = connect(&pki, &agent, "ctl-a").await.unwrap();
    let hello = c.hello();
    assert_eq!(hello.name, AGENT);
    assert_eq!(hello.kind, AgentKind::Ceph);
    assert_eq!(
        hello.peer, "ctl-a",
        "the agent identifies us by certificate"
    );
    assert_eq!(hello.version, PROTOCOL_VERSION);
    assert!(c.request(Command::CephReport(Empty {})).await.is_ok());
}

/// Replicas (issue 24) over the wire: a lease claimed for a shard with a higher RADOS token
/// ends the lower claim's lease at once, whichever certificate holds it, and the lower
/// replica's commands and claims are refused from then on.
#[tokio::test]
async fn a_higher_shard_claim_fences_the_lower_replica() {
    let pki = Pki::new();
    let agent = start(&pki, |_| {}, Duration::ZERO).await;
    let a = connect(&pki, &agent, "ctl-a").await.unwrap();
    let b = connect(&pki, &agent, "ctl-b").await.unwrap();
    let claim = |token: u64| protocol::ShardClaim {
        shard: "dpu-7".into(),
        token,
    };
    let ttl = Duration::from_secs(30);
    let old = a.acquire_claimed_lease(ttl, claim(4)).await.unwrap().token;
    a.request(create()).await.unwrap();
    let err = b.acquire_claimed_lease(ttl, claim(4)).await.unwrap_err();
    assert_eq!(err.wire().unwrap().code, ErrorCode::LeaseHeld);
    let new = b.acquire_claimed_lease(ttl, claim(5)).await.unwrap().token;
    assert!(new > old);
    assert_eq!(code(a.request(create()).await), ErrorCode::LeaseHeld);
    let err = a.acquire_claimed_lease(ttl, claim(4)).await.unwrap_err();
    assert_eq!(err.wire().unwrap().code, ErrorCode::StaleToken);
    b.request(create()).await.unwrap();
    assert_eq!(agent.handler.calls.load(Ordering::SeqCst), 2);
}

/// Per-command claims (issue 24): an agent serving every shard under one unclaimed lease (the
/// ceph-agent) refuses a command whose shard token is below the highest it has seen for that
/// shard, whichever replica sends it and whatever lease it holds; other shards are untouched.
#[tokio::test]
async fn a_command_claim_below_its_shards_highest_token_is_refused() {
    let pki = Pki::new();
    let agent = start(&pki, |_| {}, Duration::ZERO).await;
    let a = connect(&pki, &agent, "ctl-a").await.unwrap();
    let b = connect(&pki, &agent, "ctl-b").await.unwrap();
    let claim = |shard: &str, token: u64| {
        Some(protocol::ShardClaim {
            shard: shard.into(),
            token,
        })
    };
    let within = Duration::from_secs(5);
    let ttl = Duration::from_secs(30);
    a.acquire_lease(ttl).await.unwrap();
    a.request_claimed(create(), claim("dpu-1", 4), within)
        .await
        .unwrap();
    // The shard's new holder writes with token 5 (under the same lease here: the lease is not
    // what fences it).
    b.acquire_lease(ttl).await.unwrap_err();
    a.release_lease().await.unwrap();
    b.acquire_lease(ttl).await.unwrap();
    b.request_claimed(create(), claim("dpu-1", 5), within)
        .await
        .unwrap();
    b.release_lease().await.unwrap();
    // The old holder, back with a fresh lease, is refused for that shard only.
    a.acquire_lease(ttl).await.unwrap();
    let err = a
        .request_claimed(create(), claim("dpu-1", 4), within)
        .await
        .unwrap_err();
    let wire = err.wire().unwrap();
    assert_eq!(wire.code, ErrorCode::StaleToken);
    assert!(wire.message.contains("seen token 5"), "{}", wire.message);
    a.request_claimed(create(), claim("dpu-2", 1), within)
        .await
        .unwrap();
    a.request_claimed(create(), claim("dpu-1", 5), within)
        .await
        .unwrap();
    assert_eq!(agent.handler.calls.load(Ordering::SeqCst), 4);
    assert_eq!(agent.stats.fenced.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn fencing_refuses_no_lease_other_holder_and_stale_tokens() {
    let pki = Pki::new();
    let agent = start(&pki, |_| {}, Duration::ZERO).await;
    let a = connect(&pki, &agent, "ctl-a").await.unwrap();
    let b = connect(&pki, &agent, "ctl-b").await.unwrap();

    assert_eq!(code(a.request(create()).await), ErrorCode::NoLease);
    let lease = a.acquire_lease(Duration::from_secs(30)).await.unwrap();
    assert_eq!((lease.holder.as_str(), lease.token), ("ctl-a", 1));
    a.request(create()).await.unwrap();

    // Another controller can neither take the lease nor use a's token.
    let err = b.acquire_lease(Duration::from_secs(30)).await.unwrap_err();
    let wire = err.wire().unwrap();
    assert_eq!(wire.code, ErrorCode::LeaseHeld);
    assert!(wire.message.contains("ctl-a"), "{}", wire.message);
    let held = wire.lease.as_ref().unwrap();
    assert_eq!(held.holder, "ctl-a");
    assert!(held.remaining_ms > 20_000 && held.remaining_ms <= 30_000);
    assert_eq!(
        code(b.request_with_fence(create(), Some(1)).await),
        ErrorCode::LeaseHeld
    );

    // a gives the lease up and takes it again: token 2; token 1 is now stale.
    a.release_lease().await.unwrap();
    assert_eq!(
        a.acquire_lease(Duration::from_secs(30))
            .await
            .unwrap()
            .token,
        2
    );
    let err = a.request_with_fence(create(), Some(1)).await.unwrap_err();
    let wire = err.wire().unwrap();
    assert_eq!(wire.code, ErrorCode::StaleToken);
    assert!(wire.message.contains("token 2"), "{}", wire.message);
    a.request(create()).await.unwrap();

    assert_eq!(agent.handler.calls.load(Ordering::SeqCst), 2);
    assert_eq!(agent.stats.fenced.load(Ordering::SeqCst), 3);
}

/// Renew-only: the live lease of that token is extended; a lease that changed hands (or
/// lapsed) is not, and nothing new is granted — the renewing session's token stays the old one,
/// so a command of its stale plan is refused.
#[tokio::test]
async fn a_renewal_extends_its_own_lease_and_never_grants_a_new_one() {
    let pki = Pki::new();
    let agent = start(&pki, |_| {}, Duration::ZERO).await;
    let a = connect(&pki, &agent, "ctl-a").await.unwrap();
    let b = connect(&pki, &agent, "ctl-b").await.unwrap();
    let first = a.acquire_lease(Duration::from_secs(30)).await.unwrap();
    let renewed = a
        .renew_lease(Duration::from_secs(30), first.token)
        .await
        .unwrap();
    assert_eq!(renewed.token, first.token);
    // Another controller holds it after a's ended: a's renewal is refused, nothing granted.
    a.release_lease().await.unwrap();
    b.acquire_lease(Duration::from_secs(30)).await.unwrap();
    let refused = |r: Result<protocol::LeaseInfo, ClientError>| {
        r.unwrap_err().wire().expect("an error from the agent").code
    };
    assert_eq!(
        refused(a.renew_lease(Duration::from_secs(30), first.token).await),
        ErrorCode::LeaseHeld
    );
    b.release_lease().await.unwrap();
    // Free now: still no grant for a renewal of an old token.
    assert_eq!(
        refused(a.renew_lease(Duration::from_secs(30), first.token).await),
        ErrorCode::NoLease
    );
    assert_eq!(code(a.request(create()).await), ErrorCode::NoLease);
    assert_eq!(agent.handler.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn one_certificate_in_two_processes_is_two_holders_and_a_new_one_waits_for_the_old_commands()
{
    let pki = Pki::new();
    let agent = start(&pki, |_| {}, Duration::ZERO).await;
    let daemon = ControllerInstance::new("mgmt-1".into(), "unistor watch manifests".into());
    let ci = ControllerInstance::new("ci-runner".into(), "unistor apply manifests".into());
    let d = Arc::new(
        connect_as(&pki, &agent, "ctl-a", daemon.clone())
            .await
            .unwrap(),
    );
    let c = connect_as(&pki, &agent, "ctl-a", ci.clone()).await.unwrap();

    let lease = d.acquire_lease(Duration::from_secs(30)).await.unwrap();
    assert_eq!(lease.instance.as_ref(), Some(&daemon));
    // The CI's apply, same certificate, is refused and told who holds it and what to do.
    let err = c.acquire_lease(Duration::from_secs(30)).await.unwrap_err();
    let wire = err.wire().unwrap();
    assert_eq!(wire.code, ErrorCode::LeaseHeld);
    for part in ["unistor watch manifests", "mgmt-1", "--lease-wait"] {
        assert!(wire.message.contains(part), "{part}: {}", wire.message);
    }
    assert_eq!(code(c.request(create()).await), ErrorCode::NoLease);
    // Nor can it end the daemon's lease.
    assert!(c.release_lease().await.is_err());
    assert_eq!(
        d.acquire_lease(Duration::from_secs(30))
            .await
            .unwrap()
            .token,
        lease.token,
        "the daemon still renews its own"
    );

    // A command of the daemon executing: its lease ends, and still nobody else gets one.
    agent.handler.hold.send_replace(true);
    let running = tokio::spawn({
        let d = d.clone();
        async move { d.request(create()).await }
    });
    let calls = || agent.handler.calls.load(Ordering::SeqCst);
    while calls() == 0 {
        tokio::task::yield_now().await;
    }
    d.release_lease().await.unwrap();
    let err = c.acquire_lease(Duration::from_secs(30)).await.unwrap_err();
    assert!(
        err.wire().unwrap().message.contains("still executing"),
        "{err:?}"
    );
    agent.handler.hold.send_replace(false);
    running.await.unwrap().unwrap();
    let next = c.acquire_lease(Duration::from_secs(30)).await.unwrap();
    assert_eq!(next.token, lease.token + 1);
    c.request(create()).await.unwrap();

    // The apply's process dies (its connection closes): its lease ends with its session, and
    // the daemon does not wait out the 30 s.
    c.close().await;
    let mut again = d.acquire_lease(Duration::from_secs(30)).await;
    while again.is_err() {
        tokio::task::yield_now().await;
        again = d.acquire_lease(Duration::from_secs(30)).await;
    }
    assert_eq!(again.unwrap().token, next.token + 1);
}

#[tokio::test]
async fn malformed_json_is_answered_and_the_session_survives() {
    let pki = Pki::new();
    let agent = start(&pki, |_| {}, Duration::ZERO).await;
    let mut conn = raw_session(&pki, &agent).await;

    conn.write_frame(b"{not json").await.unwrap();
    match next_non_event(&mut conn).await {
        Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::Malformed),
        other => panic!("expected a malformed error, got {other:?}"),
    }
    // A request with an unknown field is answered on its own id.
    conn.write_frame(br#"{"type":"request","id":41,"command":{"op":"ceph_report","extra":1}}"#)
        .await
        .unwrap();
    match next_non_event(&mut conn).await {
        Some(Message::Response(r)) => {
            assert_eq!(r.id, 41);
            match r.outcome {
                protocol::Outcome::Error(e) => {
                    assert_eq!(e.code, ErrorCode::Malformed);
                    assert!(e.message.contains("extra"), "{}", e.message);
                }
                other => panic!("{other:?}"),
            }
        }
        other => panic!("expected a response, got {other:?}"),
    }
    // Deeply nested JSON is refused by serde_json's recursion limit, without a crash.
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    conn.write_frame(deep.as_bytes()).await.unwrap();
    assert!(matches!(
        next_non_event(&mut conn).await,
        Some(Message::Error(_))
    ));
    conn.write_frame(&Message::Ping { nonce: 9 }.to_bytes())
        .await
        .unwrap();
    assert_eq!(
        next_non_event(&mut conn).await,
        Some(Message::Pong { nonce: 9 })
    );
    assert_eq!(agent.stats.malformed_frames.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn oversized_announcement_is_refused_and_the_connection_closed() {
    let pki = Pki::new();
    let agent = start(&pki, |_| {}, Duration::ZERO).await;
    let mut conn = raw_session(&pki, &agent).await;
    let tls = conn.get_mut();
    tls.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    match next_non_event(&mut conn).await {
        Some(Message::Error(e)) => assert_eq!(e.code, ErrorCode::FrameTooLarge),
        other => panic!("expected frame_too_large, got {other:?}"),
    }
    assert_eq!(next_non_event(&mut conn).await, None, "then closed");
    assert_eq!(agent.stats.oversized_frames.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn silent_peers_are_dropped_at_the_handshake_deadline() {
    let pki = Pki::new();
    let agent = start(&pki, |_| {}, Duration::ZERO).await;

    // Never starts TLS.
    let mut tcp = TcpStream::connect(&agent.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("the agent closes the connection")
        .unwrap_or(0);
    assert_eq!(n, 0);

    // Finishes TLS but never sends its hello.
    let tcp = TcpStream::connect(&agent.addr).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(pki.client("ctl-a"))
        .connect(ServerName::try_from(AGENT).unwrap(), tcp)
        .await
        .unwrap();
    let n = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut buf))
        .await
        .expect("the agent closes the connection")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert_eq!(agent.stats.handshake_timeouts.load(Ordering::SeqCst), 2);
}

/// Expects the agent to refuse: the TLS handshake fails, or the session dies before a hello.
async fn assert_refused(pki_client: Arc<rustls::ClientConfig>, agent: &Agent) {
    let tcp = TcpStream::connect(&agent.addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(pki_client)
        .connect(ServerName::try_from(AGENT).unwrap(), tcp)
        .await;
    let Ok(tls) = tls else { return };
    let mut conn = Connection::new(tls);
    let hello = Message::ControllerHello(ControllerHello {
        version: PROTOCOL_VERSION,
        name: "x".into(),
        heartbeat_ms: None,
    });
    let _ = conn.write_frame(&hello.to_bytes()).await;
    let got = tokio::time::timeout(Duration::from_secs(10), conn.read_frame())
        .await
        .expect("refused in time");
    assert!(
        !matches!(got, Ok(Some(_))),
        "the agent answered a peer it must refuse"
    );
}

#[tokio::test]
async fn peers_without_a_valid_certificate_are_refused() {
    let pki = Pki::new();
    let agent = start(&pki, |_| {}, Duration::ZERO).await;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    let ca = std::fs::read(pki.dir.path().join("ca.crt")).unwrap();
    use rustls_pki_types::pem::PemObject;
    for c in rustls_pki_types::CertificateDer::pem_slice_iter(&ca) {
        roots.add(c.unwrap()).unwrap();
    }
    // 1. No client certificate at all.
    let no_cert = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    assert_refused(Arc::new(no_cert), &agent).await;

    // 2. A certificate for the right name from another CA (trusting the real CA for the server).
    let rogue = PkiPaths {
        ca_cert: pki.dir.path().join("ca.crt"),
        ..PkiPaths::in_dir(pki.rogue.path(), "ctl-a")
    };
    assert_refused(tls::client_config(&rogue).unwrap(), &agent).await;

    // 3. Another agent's certificate (serverAuth only) used as a client.
    let agent2 = PkiPaths::in_dir(pki.dir.path(), "agent-2");
    assert_refused(tls::client_config(&agent2).unwrap(), &agent).await;

    assert_eq!(agent.stats.tls_failures.load(Ordering::SeqCst), 3);
    assert_eq!(agent.handler.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn controller_refuses_an_agent_that_is_not_the_one_it_dialled() {
    let pki = Pki::new();
    let agent = start(&pki, |_| {}, Duration::ZERO).await;
    let err = AgentClient::connect(
        &agent.addr,
        &peer("agent-2"),
        pki.client("ctl-a"),
        ClientOptions::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, ClientError::Tls { .. }), "{err:?}");
    let chain = protocol::error::chain(&err);
    assert!(chain.contains("agent-2"), "{chain}");
}

#[tokio::test]
async fn version_mismatch_and_requests_before_hello_are_refused() {
    let pki = Pki::new();
    let agent = start(&pki, |_| {}, Duration::ZERO).await;
    for (first, want) in [
        (
            Message::ControllerHello(ControllerHello {
                version: 99,
                name: "future".into(),
                heartbeat_ms: None,
            }),
            ErrorCode::UnsupportedVersion,
        ),
        (Message::Ping { nonce: 1 }, ErrorCode::ProtocolViolation),
    ] {
        let tcp = TcpStream::connect(&agent.addr).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(pki.client("ctl-a"))
            .connect(ServerName::try_from(AGENT).unwrap(), tcp)
            .await
            .unwrap();
        let mut conn = Connection::new(tls);
        conn.write_frame(&first.to_bytes()).await.unwrap();
        match next_non_event(&mut conn).await {
            Some(Message::Error(e)) => assert_eq!(e.code, want),
            other => panic!("expected {want:?}, got {other:?}"),
        }
        assert_eq!(next_non_event(&mut conn).await, None);
    }
}

#[tokio::test]
async fn per_peer_connection_cap() {
    let pki = Pki::new();
    let agent = start(&pki, |c| c.max_connections_per_peer = 2, Duration::ZERO).await;
    let _one = connect(&pki, &agent, "ctl-a").await.unwrap();
    let _two = connect(&pki, &agent, "ctl-a").await.unwrap();
    assert!(connect(&pki, &agent, "ctl-a").await.is_err());
    assert_eq!(agent.stats.rejected_over_cap.load(Ordering::SeqCst), 1);
    drop(_one);
    // The slot comes back once the first connection is gone.
    let mut ok = false;
    for _ in 0..50 {
        if connect(&pki, &agent, "ctl-a").await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "a freed slot is reusable");
}

#[tokio::test]
async fn shutdown_drains_requests_in_flight_then_says_goodbye() {
    let pki = Pki::new();
    let mut agent = start(&pki, |_| {}, Duration::from_millis(500)).await;
    let c = Arc::new(connect(&pki, &agent, "ctl-a").await.unwrap());
    let mut events = c.take_events().unwrap();
    let slow = {
        let c = c.clone();
        tokio::spawn(async move { c.request(Command::CephReport(Empty {})).await })
    };
    // Let the request reach the agent, then stop it.
    while agent.handler.calls.load(Ordering::SeqCst) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    agent.stop.take().unwrap().send(()).unwrap();
    assert!(
        slow.await.unwrap().is_ok(),
        "the request in flight is answered"
    );
    let mut saw_goodbye = false;
    while let Ok(Some(ev)) = tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
        if ev.event == Event::ShuttingDown {
            saw_goodbye = true;
        }
    }
    assert!(saw_goodbye);
    tokio::time::timeout(Duration::from_secs(10), agent.done)
        .await
        .expect("server finished")
        .unwrap();
    assert!(
        TcpStream::connect(&agent.addr).await.is_err(),
        "no longer listening"
    );
}

#[tokio::test]
async fn heartbeats_are_pushed() {
    let pki = Pki::new();
    let agent = start(
        &pki,
        |c| c.heartbeat_interval = Duration::from_millis(50),
        Duration::ZERO,
    )
    .await;
    let c = connect(&pki, &agent, "ctl-a").await.unwrap();
    let mut events = c.take_events().unwrap();
    let mut seqs = vec![];
    while seqs.len() < 3 {
        let ev = tokio::time::timeout(Duration::from_secs(10), events.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(matches!(ev.event, Event::Heartbeat { .. }));
        seqs.push(ev.seq);
    }
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");
}

/// A controller that asks for a liveness interval pings at it and the agent pushes no
/// heartbeats: one message a interval per agent reaches the controller (its pong), and the
/// agent keeps a session quiet for longer than its own idle timeout.
#[tokio::test]
async fn a_controller_paced_session_carries_only_its_pings() {
    let pki = Pki::new();
    let agent = start(
        &pki,
        |c| {
            c.heartbeat_interval = Duration::from_millis(50);
            c.idle_timeout = Duration::from_millis(300);
        },
        Duration::ZERO,
    )
    .await;
    let opts = ClientOptions {
        liveness: Some(Duration::from_secs(1)),
        ..ClientOptions::default()
    };
    let c = AgentClient::connect(&agent.addr, &peer(AGENT), pki.client("ctl-a"), opts)
        .await
        .unwrap();
    let mut events = c.take_events().unwrap();
    let pongs = protocol::client::liveness_received();
    // Two of its pings answered: two seconds, past the agent's 300 ms idle timeout.
    while protocol::client::liveness_received() < pongs + 2 {
        tokio::select! {
            ev = events.recv() => panic!("no heartbeat on a paced session: {ev:?}"),
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    c.request(Command::CephReport(Empty {})).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_gets_in_during_a_flood_of_silent_connections_from_several_addresses() {
    let pki = Pki::new();
    // The production deadline: silent peers hold their connection as long as they may.
    let agent = start(
        &pki,
        |c| c.handshake_timeout = Duration::from_secs(5),
        Duration::ZERO,
    )
    .await;
    let target: std::net::SocketAddr = agent.addr.parse().unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flood = vec![];
    // Three addresses, a hundred connections each, every one reopened as soon as it drops.
    for ip in ["127.0.0.2", "127.0.0.3", "127.0.0.4"] {
        for _ in 0..100 {
            let stop = stop.clone();
            flood.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let sock = tokio::net::TcpSocket::new_v4().unwrap();
                    sock.bind(format!("{ip}:0").parse().unwrap()).unwrap();
                    let Ok(mut tcp) = sock.connect(target).await else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    // Silent until the agent lets go.
                    let mut buf = [0u8; 64];
                    while let Ok(n) = tcp.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                    }
                }
            }));
        }
    }
    let started = tokio::time::Instant::now();
    while agent.stats.accepted.load(Ordering::SeqCst) < 300 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the flood started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Thirty-three controller sessions, one after another, while the flood goes on: all get in.
    for i in 0..33 {
        let c = connect(&pki, &agent, "ctl-a")
            .await
            .unwrap_or_else(|e| panic!("session {i} kept out by the flood: {e}"));
        drop(c);
    }
    assert!(
        agent.stats.evicted_handshakes.load(Ordering::SeqCst) > 0,
        "the flood filled the handshake budget"
    );
    stop.store(true, Ordering::SeqCst);
    for f in flood {
        f.abort();
    }
}
