//! An execution that lasts several lease TTLs finishes with every step done: the executor
//! renews its leases while it runs (and takes them again if they lapse). Against an in-process
//! agent speaking the real protocol over mutual TLS, with the real lease table.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use controller::execute::{execute, ExecOptions, Outcome};
use controller::fleet::Fleet;
use controller::plan::{Action, Observed, Plan, Risk, Step, Target};
use protocol::client::{AgentClient, ClientOptions};
use protocol::lease::{Fence, LeaseTable};
use protocol::names::PeerName;
use protocol::server::{self, Handler, ServerConfig, ServerStats};
use protocol::tls::{self, PkiPaths, Role};
use protocol::{AgentKind, Command, Empty, Event, Reply, WireError};
use tokio::net::TcpListener;
use tokio::sync::broadcast;

const YEAR: Duration = Duration::from_secs(365 * 86400);

/// A DPU agent whose every mutation takes `slow`.
struct Slow {
    slow: Duration,
    done: AtomicU64,
    events: broadcast::Sender<Event>,
}

#[async_trait::async_trait]
impl Handler for Slow {
    fn kind(&self) -> AgentKind {
        AgentKind::Dpu
    }
    fn capabilities(&self) -> Vec<String> {
        vec!["lease".into()]
    }
    async fn handle(&self, command: Command, fence: Fence) -> Result<Reply, WireError> {
        if command.is_mutating() {
            let _executing = fence.enter()?;
            tokio::time::sleep(self.slow).await;
            self.done.fetch_add(1, Ordering::SeqCst);
        }
        Ok(Reply::Done(Empty {}))
    }
    fn subscribe(&self) -> Option<broadcast::Receiver<Event>> {
        Some(self.events.subscribe())
    }
}

fn peer(n: &str) -> PeerName {
    PeerName::parse("name", n).unwrap()
}

#[tokio::test]
async fn an_execution_longer_than_the_lease_ttl_finishes_with_every_step_done() {
    let pki = tempfile::tempdir().unwrap();
    tls::init_ca(pki.path(), YEAR).unwrap();
    tls::issue(pki.path(), &peer("dpu-1"), Role::Agent, YEAR).unwrap();
    tls::issue(pki.path(), &peer("ctl"), Role::Controller, YEAR).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let handler = Arc::new(Slow {
        slow: Duration::from_millis(300),
        done: AtomicU64::new(0),
        events: broadcast::channel(4).0,
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(server::run(
        listener,
        tls::server_config(&PkiPaths::in_dir(pki.path(), "dpu-1")).unwrap(),
        handler.clone(),
        LeaseTable::open(None).unwrap(),
        ServerConfig::new("dpu-1"),
        Arc::new(ServerStats::default()),
        async {
            let _ = stopped.await;
        },
    ));
    let client = AgentClient::connect(
        &addr,
        &peer("dpu-1"),
        tls::client_config(&PkiPaths::in_dir(pki.path(), "ctl")).unwrap(),
        ClientOptions::default(),
    )
    .await
    .unwrap();
    let target = Target::Dpu("dpu-1".into());
    let fleet = Arc::new(Fleet {
        agents: [(target.clone(), Ok(Arc::new(client)))]
            .into_iter()
            .collect(),
    });
    // Twelve steps one after the other, 300 ms each: 3.6 s, more than three 1 s lease TTLs.
    let steps: Vec<Step> = (0..12)
        .map(|id| Step {
            id,
            target: target.clone(),
            action: Action::Send(protocol::Command::ResumeController(
                protocol::dpu::NameRef {
                    name: format!("ctrl{id}"),
                },
            )),
            risk: Risk::Safe,
            depends_on: if id == 0 { vec![] } else { vec![id - 1] }.into(),
            volume: None,
        })
        .collect();
    let plan = Plan {
        steps,
        ..Plan::default()
    };
    let opts = ExecOptions {
        lease_ttl: Duration::from_secs(1),
        // No retries: a step that met a lapsed lease would fail for good.
        attempts: 1,
        ..ExecOptions::default()
    };
    let report = execute(
        &plan,
        &Default::default(),
        &Observed::default(),
        &fleet,
        &opts,
        &|_, _| {},
    )
    .await;
    let problems: Vec<(&usize, &Outcome)> = report
        .outcomes
        .iter()
        .filter(|(_, o)| **o != Outcome::Done)
        .collect();
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(report.done(), 12);
    assert_eq!(handler.done.load(Ordering::SeqCst), 12);
    let _ = stop.send(());
    let _ = server.await;
}
