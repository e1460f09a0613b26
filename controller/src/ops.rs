//! `unistor plan` and `unistor apply`: observe, plan, check the safety rails, execute, re-plan.

use std::io::IsTerminal;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, ValueEnum};
use protocol::client::ClientOptions;
use protocol::names::PeerName;
use protocol::tls::{self, PkiPaths};
use serde::{Deserialize, Serialize};

use crate::execute::{self, ExecOptions, Outcome};
use crate::fleet::{Fleet, FleetOptions};
use crate::manifest::{self, Desired};
use crate::plan::{self, Action, Observed, Options, Plan, Risk};
use crate::render;

/// What every fleet command needs.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// The manifest directory.
    pub dir: PathBuf,
    /// PKI directory with ca.crt and the controller's certificate.
    #[arg(long, default_value = "pki")]
    pub pki_dir: PathBuf,
    /// The controller's certificate name in the PKI directory.
    #[arg(long, default_value = "controller")]
    pub controller: String,
    /// Value of `unistor.managed-by`: which images this deployment owns.
    #[arg(long, default_value = "unistor")]
    pub owner: String,
    /// Deadline of each agent's report.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub report_timeout: Duration,
}

/// Output formats.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Format {
    /// For people.
    Text,
    /// The plan as JSON.
    Json,
}

/// `unistor plan`
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// Manifests and agents.
    #[command(flatten)]
    pub common: Common,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Format,
    /// Save the plan (with a fingerprint of what was observed) for `unistor apply --plan FILE`.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// `unistor apply`
#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// Manifests and agents.
    #[command(flatten)]
    pub common: Common,
    /// Apply exactly this saved plan; refused if what is observed changed since it was made.
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// Do not ask for confirmation (for CI).
    #[arg(long)]
    pub auto_approve: bool,
    /// What removals are allowed.
    #[command(flatten)]
    pub rails: Rails,
    /// Passes of observe-plan-execute before giving up.
    #[arg(long, default_value_t = 5)]
    pub passes: usize,
    /// One line per step as it ends (the default when the output is not a terminal; on a
    /// terminal a progress bar shows steps done, rate and ETA, and failures as they happen).
    #[arg(long, short)]
    pub verbose: bool,
}

/// The safety rails: which removals a plan may make.
#[derive(Debug, Clone, Args)]
pub struct Rails {
    /// Allow deleting images of removed volumes whose policy is Delete.
    #[arg(long)]
    pub allow_delete: bool,
    /// Allow a manifest set without volumes to remove every volume.
    #[arg(long)]
    pub allow_empty: bool,
    /// Allow removing volumes whose images are in use (have watchers).
    #[arg(long)]
    pub allow_in_use: bool,
    /// Most volumes one apply (or one reconcile of the daemon) may remove.
    #[arg(long, default_value_t = 5)]
    pub max_removals: usize,
}

/// `unistor status`
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// Manifests and agents.
    #[command(flatten)]
    pub common: Common,
    /// Output format.
    #[arg(long, value_enum, default_value = "text")]
    pub output: Format,
    /// The watch daemon to read from when it runs for the same manifest directory.
    #[arg(long, env = "UNISTOR_DAEMON", default_value = "http://127.0.0.1:7480")]
    pub daemon: String,
    /// Ask the agents directly, even when a daemon runs.
    #[arg(long)]
    pub direct: bool,
}

/// `unistor suspend|resume`
#[derive(Debug, Args)]
pub struct SuspendArgs {
    /// `volume/NAME` or `dpu/NAME`.
    pub object: String,
    /// The watch daemon.
    #[arg(long, env = "UNISTOR_DAEMON", default_value = "http://127.0.0.1:7480")]
    pub daemon: String,
}

fn http_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// `unistor suspend|resume KIND/NAME`: asks the daemon.
pub fn suspend_cmd(a: SuspendArgs, on: bool) -> Result<ExitCode, OpsError> {
    let Some((kind, name)) = a.object.split_once('/') else {
        return Err(OpsError::Daemon {
            daemon: a.daemon,
            why: format!("{:?}: expected volume/NAME or dpu/NAME", a.object),
        });
    };
    let url = format!(
        "{}/api/v1/{}/{kind}/{name}",
        a.daemon.trim_end_matches('/'),
        if on { "suspend" } else { "resume" }
    );
    let daemon_err = |why: String| OpsError::Daemon {
        daemon: a.daemon.clone(),
        why,
    };
    let mut resp = http_agent()
        .post(&url)
        .send_empty()
        .map_err(|e| daemon_err(e.to_string()))?;
    let body: serde_json::Value = resp
        .body_mut()
        .read_json()
        .map_err(|e| daemon_err(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(daemon_err(
            body["error"].as_str().unwrap_or("request refused").into(),
        ));
    }
    println!(
        "{kind}/{name}: {}{}",
        body["state"].as_str().unwrap_or("?"),
        if body["changed"].as_bool() == Some(false) {
            " (already)"
        } else {
            ""
        }
    );
    Ok(ExitCode::SUCCESS)
}

/// The daemon's view, when a daemon answers at `url` for the manifest directory `dir`.
fn from_daemon(url: &str, dir: &std::path::Path) -> Option<crate::watch::state::DaemonView> {
    let mut resp = http_agent()
        .get(&format!("{}/api/v1/status", url.trim_end_matches('/')))
        .call()
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let view: crate::watch::state::DaemonView = resp.body_mut().read_json().ok()?;
    let same = dir.canonicalize().ok()? == view.manifests.dir;
    same.then_some(view)
}

/// `unistor status`: exit 0 when every volume is ok, 1 otherwise. Read from the watch daemon
/// when one runs for the same manifests (it holds sessions with every agent), else from the
/// agents.
pub async fn status_cmd(a: StatusArgs) -> Result<ExitCode, OpsError> {
    let daemon = if a.direct {
        None
    } else {
        let (url, dir) = (a.daemon.clone(), a.common.dir.clone());
        tokio::task::spawn_blocking(move || from_daemon(&url, &dir))
            .await
            .ok()
            .flatten()
    };
    let status = match daemon {
        Some(view) => {
            if matches!(a.output, Format::Text) {
                println!(
                    "From the watch daemon at {} (last reconcile: {}).\n",
                    a.daemon,
                    view.last_reconcile
                        .as_ref()
                        .map(|r| format!("{} at {}", r.result, r.at))
                        .unwrap_or_else(|| "none yet".into())
                );
            }
            view.fleet
        }
        None => {
            let desired = load(&a.common.dir)?;
            let fleet = connect(&a.common, &desired).await?;
            let observed = fleet.observe(a.common.report_timeout).await;
            crate::status::FleetStatus::new(&desired, &observed)
        }
    };
    match a.output {
        Format::Text => print!("{}", status.render()),
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&status).expect("serializable")
        ),
    }
    Ok(if status.all_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A saved plan.
#[derive(Debug, Serialize, Deserialize)]
struct SavedPlan {
    version: u32,
    fingerprint: String,
    plan: Plan,
}

/// Errors of fleet commands (shown as one line, exit 1).
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Manifests are invalid.
    #[error("{count} problem(s) in the manifests:\n{list}")]
    Manifests {
        /// How many.
        count: usize,
        /// One per line.
        list: String,
    },
    /// TLS material.
    #[error("cannot load the controller's certificate")]
    Tls(#[from] protocol::tls::TlsError),
    /// A name.
    #[error("invalid argument")]
    Name(#[from] protocol::names::NameError),
    /// The safety rails refused the plan.
    #[error("refused:\n{0}")]
    Refused(String),
    /// The saved plan is stale.
    #[error("the saved plan {path} is stale: {why}; run `unistor plan` again")]
    Stale {
        /// The file.
        path: PathBuf,
        /// What changed.
        why: String,
    },
    /// A file.
    #[error("{path}")]
    File {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// Not confirmed.
    #[error("apply cancelled")]
    Cancelled,
    /// The watch daemon refused or could not be reached.
    #[error("watch daemon at {daemon}: {why}")]
    Daemon {
        /// Its URL.
        daemon: String,
        /// What went wrong.
        why: String,
    },
}

fn load(dir: &std::path::Path) -> Result<Desired, OpsError> {
    manifest::load_dir(dir).map_err(|errors| OpsError::Manifests {
        count: errors.len(),
        list: errors
            .iter()
            .map(|e| format!("  {e}"))
            .collect::<Vec<_>>()
            .join("\n"),
    })
}

/// How the agents of `c` are reached: the controller's certificate and client timers.
pub fn fleet_options(c: &Common) -> Result<FleetOptions, OpsError> {
    let me = PeerName::parse("--controller", &c.controller)?;
    let tls = tls::client_config(&PkiPaths::in_dir(&c.pki_dir, me.as_str()))?;
    Ok(FleetOptions {
        tls,
        client: ClientOptions {
            controller_name: me.to_string(),
            ..ClientOptions::default()
        },
        report_timeout: c.report_timeout,
    })
}

async fn connect(c: &Common, desired: &Desired) -> Result<Arc<Fleet>, OpsError> {
    Ok(Arc::new(Fleet::connect(desired, &fleet_options(c)?).await))
}

/// A fingerprint of what the plan was made from: the desired state as it serializes (what it
/// means, not where it was written: no file, line or label) and the observed objects (not the
/// fast-moving host counters). Canonical: struct fields in declaration order, maps sorted.
pub fn fingerprint(desired: &Desired, observed: &Observed) -> String {
    let mut stable = serde_json::Map::new();
    for (n, k) in &observed.clusters {
        let v = match k.get() {
            Some(r) => {
                serde_json::json!({"images": r.images, "pools": r.pools.iter().map(|p| (&p.name, p.rbd_enabled)).collect::<Vec<_>>()})
            }
            None => serde_json::json!("unknown"),
        };
        stable.insert(format!("cluster/{n}"), v);
    }
    for (n, k) in &observed.dpus {
        let v = match k.get() {
            Some(r) => {
                serde_json::json!({"snap": [&r.snap.state, &r.snap.image], "inventory": r.inventory})
            }
            None => serde_json::json!("unknown"),
        };
        stable.insert(format!("dpu/{n}"), v);
    }
    stable.insert(
        "desired".into(),
        serde_json::to_value(desired).expect("the desired state serializes"),
    );
    let text = serde_json::Value::Object(stable).to_string();
    format!("{:016x}", plan::fnv(&text))
}

/// `unistor plan`: exit 0 when nothing is to do, 2 when changes are pending, 1 on error.
pub async fn plan_cmd(a: PlanArgs) -> Result<ExitCode, OpsError> {
    let desired = load(&a.common.dir)?;
    let fleet = connect(&a.common, &desired).await?;
    let observed = fleet.observe(a.common.report_timeout).await;
    let p = plan::plan(
        &desired,
        &observed,
        &Options {
            owner: a.common.owner.clone(),
        },
    );
    if let Some(path) = &a.out {
        let saved = SavedPlan {
            version: 1,
            fingerprint: fingerprint(&desired, &observed),
            plan: p.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&saved).expect("serializable");
        agent_kit_write(path, &bytes)?;
    }
    match a.output {
        Format::Text => print!("{}", render::human(&p)),
        Format::Json => println!(
            "{}",
            serde_json::to_string_pretty(&p).expect("serializable")
        ),
    }
    if let Ok(f) = Arc::try_unwrap(fleet) {
        f.close().await;
    }
    // "No changes" is only said of a fleet that was seen whole.
    if !p.unknown.is_empty() {
        eprintln!(
            "unistor: {} agent(s) could not be observed; nothing of theirs was planned:\n  {}",
            p.unknown.len(),
            p.unknown.join("\n  ")
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(if p.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

fn agent_kit_write(path: &std::path::Path, bytes: &[u8]) -> Result<(), OpsError> {
    std::fs::write(path, bytes).map_err(|source| OpsError::File {
        path: path.to_path_buf(),
        source,
    })
}

/// The safety rails: refuse plans that remove everything, more than the budget, volumes in use,
/// or delete images without the flag.
pub fn check_rails(
    p: &Plan,
    desired: &Desired,
    observed: &Observed,
    a: &Rails,
) -> Result<(), OpsError> {
    let mut problems = vec![];
    let removed = removed_volumes(p);
    if desired.volumes.is_empty() && !removed.is_empty() && !a.allow_empty {
        problems.push(format!(
            "the manifests name no volume, and the plan would remove all {} observed ones; if that is really wanted, pass --allow-empty",
            removed.len()
        ));
    }
    if removed.len() > a.max_removals {
        problems.push(format!(
            "the plan removes {} volumes ({}), more than the budget of {}; raise --max-removals to allow it",
            removed.len(),
            removed.iter().copied().collect::<Vec<_>>().join(", "),
            a.max_removals
        ));
    }
    if !a.allow_delete {
        for s in &p.steps {
            if let Action::DeleteImage {
                pool,
                image,
                volume,
            } = &s.action
            {
                problems.push(format!(
                    "volume {volume} has policy Delete: deleting image {pool}/{image} needs --allow-delete"
                ));
            }
        }
    }
    if !a.allow_in_use {
        problems.extend(used_by_hosts(p, observed, &removed));
        for r in observed.clusters.values().filter_map(|k| k.get()) {
            for i in &r.images {
                let Some(v) = i.metadata.get(plan::META_VOLUME) else {
                    continue;
                };
                if removed.contains(v.as_str()) && i.in_use() {
                    problems.push(format!(
                        "volume {v} is in use (image {}/{} has watchers {}); pass --allow-in-use to detach it anyway",
                        i.pool,
                        i.image,
                        i.watchers.as_deref().unwrap_or_default().join(", ")
                    ));
                }
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(OpsError::Refused(
            problems
                .iter()
                .map(|p| format!("  {p}"))
                .collect::<Vec<_>>()
                .join("\n"),
        ))
    }
}

/// The removals a host would notice, from the hosts' own accounts in the DPU reports: a
/// detach of a namespace the host holds open, and the destruction of a controller the host's
/// driver has enabled (every device on it goes). A detach of a device nobody opened is not
/// "in use": the host sees a namespace go, as it would a hot-unplug of an idle disk. Where a
/// platform cannot tell (`host_use` absent), only the images' watchers speak.
fn used_by_hosts(
    p: &Plan,
    observed: &Observed,
    removed: &std::collections::BTreeSet<&str>,
) -> Vec<String> {
    let mut problems = vec![];
    for s in &p.steps {
        let plan::Target::Dpu(dpu) = &s.target else {
            continue;
        };
        let Some(host) = observed
            .dpus
            .get(dpu)
            .and_then(|k| k.get())
            .and_then(|r| r.host_use.as_ref())
        else {
            continue;
        };
        match &s.action {
            Action::Detach(plan::Attachment { controller, nsid }) => {
                let Some(v) = s.volume.as_deref().filter(|v| removed.contains(v)) else {
                    continue;
                };
                if let Some(d) = host.device(controller, *nsid).filter(|d| d.open > 0) {
                    problems.push(format!(
                        "volume {v} is in use (the host of dpu {dpu} holds {} open: nsid {nsid} of {controller}, {} opener(s)); pass --allow-in-use to detach it anyway",
                        d.device, d.open
                    ));
                }
            }
            Action::DestroyController { name }
                if host.controller(name).is_some_and(|c| c.enabled) =>
            {
                let detached = |x: &&plan::Step| {
                    x.target == s.target
                        && matches!(&x.action, Action::Detach(a) if &a.controller == name)
                };
                let on_it: Vec<&str> = p
                    .steps
                    .iter()
                    .filter(detached)
                    .filter_map(|x| x.volume.as_deref())
                    .collect();
                let on_it = if on_it.is_empty() {
                    "-".to_string()
                } else {
                    on_it.join(", ")
                };
                problems.push(format!(
                    "controller {name} on dpu {dpu} is enabled by the host's driver (volumes {on_it}); destroying it pulls the device from a running driver; pass --allow-in-use to do it anyway"
                ));
            }
            _ => {}
        }
    }
    problems
}

/// Volumes a plan removes.
fn removed_volumes(p: &Plan) -> std::collections::BTreeSet<&str> {
    p.steps
        .iter()
        .filter(|s| {
            matches!(
                s.action,
                Action::DestroyNamespace { .. }
                    | Action::TrashImage { .. }
                    | Action::DeleteImage { .. }
            )
        })
        .filter_map(|s| s.volume.as_deref())
        .collect()
}

/// `observed` with the watchers of the images of the volumes `p` removes looked up live (reports
/// do not carry watchers): what the in-use rail decides on. SNAP's own watch (the cluster's SNAP
/// identity, `client.<snapClient>`) is expected on an attached volume and the plan's teardown
/// closes it: it does not count. Anybody else's does, and so does a watcher whose entity could
/// not be told, or a lookup that fails: the safe side. Costs one request per cluster, and
/// nothing when nothing is removed or `--allow-in-use` is given.
pub async fn with_live_watchers<'a>(
    p: &Plan,
    desired: &Desired,
    observed: &'a Observed,
    fleet: &Fleet,
    rails: &Rails,
) -> std::borrow::Cow<'a, Observed> {
    let removed = removed_volumes(p);
    if removed.is_empty() || rails.allow_in_use {
        return std::borrow::Cow::Borrowed(observed);
    }
    let mut out = observed.clone();
    for (name, k) in out.clusters.iter_mut() {
        let crate::plan::Known::Known { report } = k else {
            continue;
        };
        let wanted: Vec<usize> = report
            .images
            .iter()
            .enumerate()
            .filter(|(_, i)| {
                i.metadata
                    .get(plan::META_VOLUME)
                    .is_some_and(|v| removed.contains(v.as_str()))
            })
            .map(|(n, _)| n)
            .collect();
        if wanted.is_empty() {
            continue;
        }
        let client = fleet.get(&plan::Target::Cluster(name.clone()));
        for chunk in wanted.chunks(64) {
            let refs = chunk
                .iter()
                .map(|n| protocol::ImageRef {
                    pool: report.images[*n].pool.clone(),
                    image: report.images[*n].image.clone(),
                })
                .collect();
            let answer = match &client {
                Ok(c) => c
                    .request(protocol::Command::ImageWatchers(protocol::ImageList {
                        images: refs,
                    }))
                    .await
                    .map_err(|e| protocol::error::chain(&e)),
                Err(e) => Err(e.to_string()),
            };
            let snap = desired
                .clusters
                .get(name.as_str())
                .map(|c| format!("client.{}", c.snap_client));
            for n in chunk {
                let img = &mut report.images[*n];
                img.watchers = Some(match &answer {
                    Ok(protocol::Reply::Watchers(w)) => w
                        .images
                        .iter()
                        .find(|w| w.pool == img.pool && w.image == img.image)
                        .map(|w| others(w, snap.as_deref()))
                        .unwrap_or_default(),
                    Ok(_) => vec!["(unexpected reply to image_watchers)".into()],
                    Err(e) => vec![format!("(watchers could not be looked up: {e})")],
                });
            }
        }
    }
    std::borrow::Cow::Owned(out)
}

/// An image's watchers other than SNAP's own (`snap`: SNAP's entity on that cluster), each
/// shown with its entity when known.
fn others(w: &protocol::ImageWatchers, snap: Option<&str>) -> Vec<String> {
    w.watchers
        .iter()
        .enumerate()
        .filter_map(|(i, addr)| match w.clients.get(i).map(String::as_str) {
            Some(c) if Some(c) == snap => None,
            Some(c) if !c.is_empty() => Some(format!("{addr} ({c})")),
            _ => Some(addr.clone()),
        })
        .collect()
}

fn confirm(p: &Plan) -> Result<(), OpsError> {
    let risky = p.steps.iter().filter(|s| s.risk != Risk::Safe).count();
    print!(
        "Apply {} step(s) ({risky} not safe)? Type 'yes' to go on: ",
        p.steps.len()
    );
    let _ = std::io::stdout().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    if line.trim() == "yes" {
        Ok(())
    } else {
        Err(OpsError::Cancelled)
    }
}

/// What planning and executing need from the command line: the owner, and whether deletes may
/// run.
pub fn run_options(c: &Common, rails: &Rails) -> (Options, ExecOptions) {
    let opts = Options {
        owner: c.owner.clone(),
    };
    let exec = ExecOptions {
        owner: c.owner.clone(),
        allow_delete: rails.allow_delete,
        ..ExecOptions::default()
    };
    (opts, exec)
}

/// `unistor apply`: exit 0 when converged, 1 otherwise (error, refusal, or steps that failed).
pub async fn apply_cmd(a: ApplyArgs) -> Result<ExitCode, OpsError> {
    let desired = load(&a.common.dir)?;
    let fleet = connect(&a.common, &desired).await?;
    let (opts, exec) = run_options(&a.common, &a.rails);
    // Observed once; each pass then re-reads only the agents it commanded.
    let mut informer = crate::fleet::Informer::default();
    informer.refresh(&fleet, a.common.report_timeout).await;
    let mut observed = informer.observed().clone();
    let mut p = plan::plan(&desired, &observed, &opts);
    if let Some(path) = &a.plan {
        let bytes = std::fs::read(path).map_err(|source| OpsError::File {
            path: path.clone(),
            source,
        })?;
        let saved: SavedPlan = serde_json::from_slice(&bytes).map_err(|e| OpsError::Stale {
            path: path.clone(),
            why: format!("not a saved plan ({e})"),
        })?;
        let now = fingerprint(&desired, &observed);
        if saved.fingerprint != now || saved.plan != p {
            return Err(OpsError::Stale {
                path: path.clone(),
                why: "the manifests or the observed state changed since it was made".into(),
            });
        }
    }
    print!("{}", render::human(&p));
    if p.is_empty() {
        if !p.unknown.is_empty() {
            println!(
                "Not converged: {} agent(s) could not be observed.",
                p.unknown.len()
            );
            return Ok(ExitCode::FAILURE);
        }
        return Ok(ExitCode::SUCCESS);
    }
    let checked = with_live_watchers(&p, &desired, &observed, &fleet, &a.rails).await;
    check_rails(&p, &desired, &checked, &a.rails)?;
    if !a.auto_approve && a.plan.is_none() {
        confirm(&p)?;
    }
    let lines = a.verbose || !std::io::stdout().is_terminal();
    let bar = (!lines).then(|| {
        indicatif::ProgressBar::new(0).with_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} steps  {per_sec}  ETA {eta}  {msg}",
            )
            .expect("a valid template"),
        )
    });
    let failures = std::sync::atomic::AtomicUsize::new(0);
    let progress = |s: &plan::Step, o: &Outcome| {
        let mark = match o {
            Outcome::Done => "done".to_string(),
            Outcome::Failed { error, transient } => {
                format!(
                    "FAILED{}: {error}",
                    if *transient { " (will retry)" } else { "" }
                )
            }
            Outcome::Skipped { reason } => format!("skipped: {reason}"),
        };
        let line = format!("  [{}] {} ... {mark}", s.id, render::step_line(s));
        match &bar {
            Some(bar) => {
                if *o != Outcome::Done {
                    let n = failures.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                    bar.set_message(format!("{n} failed or skipped"));
                    bar.println(line);
                }
                bar.inc(1);
            }
            None => println!("{line}"),
        }
    };
    for pass in 1..=a.passes {
        println!("Pass {pass}: {} step(s)", p.steps.len());
        if let Some(bar) = &bar {
            bar.reset();
            bar.set_length(p.steps.len() as u64);
        }
        let report = execute::execute(&p, &desired, &observed, &fleet, &exec, &progress).await;
        if let Some(bar) = &bar {
            bar.finish_and_clear();
        }
        for s in &p.steps {
            informer.mark(s.target.clone());
        }
        informer.refresh(&fleet, a.common.report_timeout).await;
        observed = informer.observed().clone();
        let next = plan::plan(&desired, &observed, &opts);
        if next.is_empty() && !next.unknown.is_empty() {
            print!("{}", render::human(&next));
            println!(
                "Not converged: {} agent(s) could not be observed.",
                next.unknown.len()
            );
            return Ok(ExitCode::FAILURE);
        }
        if next.is_empty() {
            println!(
                "Converged: {} step(s) done{}.",
                report.done(),
                if next.blocked.is_empty() {
                    ""
                } else {
                    " (some objects held back)"
                }
            );
            if !next.blocked.is_empty() || !next.unknown.is_empty() {
                print!("{}", render::human(&next));
            }
            return Ok(ExitCode::SUCCESS);
        }
        if report.done() == 0 {
            println!(
                "No progress in pass {pass}; {} step(s) remain:",
                next.steps.len()
            );
            print!("{}", render::human(&next));
            return Ok(ExitCode::FAILURE);
        }
        // Later passes only finish what this apply set out to do; new removals need a new plan.
        let checked = with_live_watchers(&next, &desired, &observed, &fleet, &a.rails).await;
        check_rails(&next, &desired, &checked, &a.rails)?;
        p = next;
    }
    println!("Not converged after {} passes:", a.passes);
    print!("{}", render::human(&p));
    Ok(ExitCode::FAILURE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::sim::World;

    fn args() -> Rails {
        Rails {
            allow_delete: false,
            allow_empty: false,
            allow_in_use: false,
            max_removals: 5,
        }
    }

    #[test]
    fn snaps_own_watch_is_not_in_use_but_anybody_elses_is() {
        let w = protocol::ImageWatchers {
            pool: "rbd".into(),
            image: "a".into(),
            watchers: vec![
                "10.0.0.5:0/1".into(),
                "10.0.0.9:0/2".into(),
                "10.0.0.7:0/3".into(),
            ],
            clients: vec!["client.snap".into(), "client.admin".into(), String::new()],
        };
        assert_eq!(
            others(&w, Some("client.snap")),
            ["10.0.0.9:0/2 (client.admin)", "10.0.0.7:0/3"],
            "SNAP's own is expected; a known stranger and an unknown one are not"
        );
        // Without a known SNAP identity (or entities), every watcher counts.
        assert_eq!(others(&w, None).len(), 3);
        let bare = protocol::ImageWatchers {
            clients: vec![],
            ..w
        };
        assert_eq!(others(&bare, Some("client.snap")).len(), 3);
    }

    fn converged() -> (Desired, World) {
        let d = manifest::load_dir(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples"),
        )
        .unwrap();
        let mut w = World::empty(&d);
        w.converge(&d, 5);
        (d, w)
    }

    #[test]
    fn the_empty_manifest_guard() {
        let (d, w) = converged();
        let empty = Desired {
            volumes: Default::default(),
            ..d
        };
        let p = plan::plan(&empty, &w.observed(), &Options::default());
        let e = check_rails(&p, &empty, &w.observed(), &args())
            .unwrap_err()
            .to_string();
        assert!(e.contains("--allow-empty"), "{e}");
        let a = Rails {
            allow_empty: true,
            allow_delete: true,
            ..args()
        };
        check_rails(&p, &empty, &w.observed(), &a).unwrap();
    }

    #[test]
    fn the_deletion_budget() {
        let (d, w) = converged();
        let mut fewer = d.clone();
        fewer.volumes.retain(|k, _| k == "db-data");
        let p = plan::plan(&fewer, &w.observed(), &Options::default());
        let a = Rails {
            max_removals: 2,
            allow_delete: true,
            ..args()
        };
        let e = check_rails(&p, &fewer, &w.observed(), &a)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("removes 3 volumes") && e.contains("--max-removals"),
            "{e}"
        );
        check_rails(
            &p,
            &fewer,
            &w.observed(),
            &Rails {
                max_removals: 3,
                ..a
            },
        )
        .unwrap();
    }

    #[test]
    fn deletes_need_the_flag_and_volumes_in_use_stay() {
        let (d, mut w) = converged();
        let mut fewer = d.clone();
        fewer.volumes.remove("scratch-b");
        let p = plan::plan(&fewer, &w.observed(), &Options::default());
        let e = check_rails(&p, &fewer, &w.observed(), &args())
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs --allow-delete"), "{e}");
        let mut fewer = d.clone();
        fewer.volumes.remove("db-data");
        let img = w
            .clusters
            .get_mut("ceph-lab")
            .unwrap()
            .images
            .iter_mut()
            .find(|i| i.image == "db-data")
            .unwrap();
        img.watchers = Some(vec!["10.0.0.5:0/1234".into()]);
        let p = plan::plan(&fewer, &w.observed(), &Options::default());
        let e = check_rails(&p, &fewer, &w.observed(), &args())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("db-data is in use") && e.contains("--allow-in-use"),
            "{e}"
        );
    }

    #[test]
    fn a_device_the_host_holds_open_or_a_controller_it_enabled_is_in_use() {
        use protocol::dpu::{HostController, HostDevice, HostUse};
        let (d, mut w) = converged();
        let device = |nsid, open| HostDevice {
            nsid,
            uuid: String::new(),
            size_bytes: 0,
            device: format!("/host/unistor-pf0-n{nsid}.nbd"),
            open,
        };
        w.dpus.get_mut("dpu-a").unwrap().host_use = Some(HostUse {
            controllers: vec![HostController {
                name: "unistor-pf0".into(),
                enabled: true,
                namespaces: vec![device(1, 1), device(2, 0)],
            }],
        });
        let without = |w: &World, names: &[&str]| {
            let mut fewer = d.clone();
            for n in names {
                fewer.volumes.remove(*n);
            }
            let p = plan::plan(&fewer, &w.observed(), &Options::default());
            (fewer, p)
        };
        // An idle device on a controller that stays: the host only sees it go.
        let (fewer, p) = without(&w, &["db-wal"]);
        check_rails(&p, &fewer, &w.observed(), &args()).unwrap();
        // The device the host holds open.
        let (fewer, p) = without(&w, &["db-data"]);
        let e = check_rails(&p, &fewer, &w.observed(), &args())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("volume db-data is in use (the host of dpu dpu-a holds /host/unistor-pf0-n1.nbd open"),
            "{e}"
        );
        let mut anyway = args();
        anyway.allow_in_use = true;
        check_rails(&p, &fewer, &w.observed(), &anyway).unwrap();
        // Both: the controller goes too, from under the host's driver.
        let (fewer, p) = without(&w, &["db-data", "db-wal"]);
        let e = check_rails(&p, &fewer, &w.observed(), &args())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("controller unistor-pf0 on dpu dpu-a is enabled by the host's driver (volumes db-data, db-wal)"),
            "{e}"
        );
        // A platform that cannot tell: only the images' watchers speak.
        w.dpus.get_mut("dpu-a").unwrap().host_use = None;
        let (fewer, p) = without(&w, &["db-data", "db-wal"]);
        check_rails(&p, &fewer, &w.observed(), &args()).unwrap();
    }

    #[test]
    fn fingerprints_move_with_the_world_not_with_host_counters() {
        let (d, mut w) = converged();
        let before = fingerprint(&d, &w.observed());
        w.dpus.get_mut("dpu-a").unwrap().host.load = [9.0, 9.0, 9.0];
        assert_eq!(fingerprint(&d, &w.observed()), before);
        w.clusters.get_mut("ceph-lab").unwrap().images[0].size_bytes += 1 << 20;
        assert_ne!(fingerprint(&d, &w.observed()), before);
    }

    #[test]
    fn a_document_moved_to_another_file_leaves_a_saved_plan_fresh() {
        let (d, w) = converged();
        let before = fingerprint(&d, &w.observed());
        let mut moved = d.clone();
        for v in moved.volumes.values_mut() {
            v.source.file = "elsewhere/all-volumes.yaml".into();
            v.source.line += 40;
            v.labels.insert("team".into(), "storage".into());
        }
        moved.dpus.get_mut("dpu-a").unwrap().source.line = 999;
        assert_eq!(fingerprint(&moved, &w.observed()), before);
        let mut grown = d.clone();
        grown.volumes.get_mut("db-data").unwrap().size_bytes += 1 << 30;
        assert_ne!(
            fingerprint(&grown, &w.observed()),
            before,
            "what it means counts"
        );
        let mut retargeted = d.clone();
        retargeted
            .volumes
            .get_mut("db-data")
            .unwrap()
            .deletion_policy = crate::manifest::DeletionPolicy::Delete;
        assert_ne!(fingerprint(&retargeted, &w.observed()), before);
    }
}
