//! `unistor apply`: the plan (or a saved one, if still fresh), the rails, confirmation, then
//! passes of execute-observe-plan until converged.

use std::io::IsTerminal;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::rails::{check_rails, with_live_watchers, Rails};
use super::{connect, fingerprint, load, run_options, Common, OpsError, SavedPlan};
use crate::execute::{self, Outcome};
use crate::plan::{self, Plan, Risk};
use crate::render;

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
    /// How long to wait for an agent's lease held by another controller (e.g. the watch
    /// daemon between two passes) before its steps are given up; 0 refuses at once.
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub lease_wait: std::time::Duration,
    /// How long each agent's lease lasts unless renewed (every third of it). A controller
    /// paused longer than this loses it: its plan then stops on that agent.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    pub lease_ttl: std::time::Duration,
    /// One line per step as it ends (the default when the output is not a terminal; on a
    /// terminal a progress bar shows steps done, rate and ETA, and failures as they happen).
    #[arg(long, short)]
    pub verbose: bool,
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

/// `unistor apply`: exit 0 when converged, 1 otherwise (error, refusal, steps that failed, an
/// agent not observed, or anything held back).
pub async fn apply_cmd(a: ApplyArgs) -> Result<ExitCode, OpsError> {
    let desired = load(&a.common.dir)?;
    let fleet = connect(&a.common, &desired).await?;
    let (opts, mut exec) = run_options(&a.common, &a.rails);
    exec.lease_wait = a.lease_wait;
    exec.lease_ttl = a.lease_ttl;
    // Observed once; each pass then re-reads only the agents it commanded.
    let mut informer = crate::fleet::Informer::default();
    informer.refresh(&fleet, a.common.report_timeout).await;
    let mut observed = informer.observed().clone();
    let p = super::plan_probed(&desired, &mut observed, &fleet, &opts).await;
    if let Some(path) = &a.plan {
        still_fresh(path, &desired, &observed, &p)?;
    }
    print!("{}", render::human(&p));
    if p.is_empty() {
        return Ok(not_observed(&p)
            .or_else(|| held_back(&p))
            .unwrap_or(ExitCode::SUCCESS));
    }
    let checked = with_live_watchers(&p, &desired, &observed, &fleet, &a.rails).await;
    check_rails(&p, &desired, &checked, &a.rails)?;
    if !a.auto_approve && a.plan.is_none() {
        confirm(&p)?;
    }
    let run = Run {
        a: &a,
        desired: &desired,
        fleet: &fleet,
        opts: &opts,
        exec: &exec,
        progress: Progress::new(a.verbose || !std::io::stdout().is_terminal()),
    };
    run.passes(p, informer).await
}

/// Refuses a saved plan that is not what planning now gives, or that was made from another
/// world (its fingerprint).
fn still_fresh(
    path: &std::path::Path,
    desired: &crate::manifest::Desired,
    observed: &crate::plan::Observed,
    p: &Plan,
) -> Result<(), OpsError> {
    let bytes = std::fs::read(path).map_err(|source| OpsError::File {
        path: path.to_path_buf(),
        source,
    })?;
    let saved: SavedPlan = serde_json::from_slice(&bytes).map_err(|e| OpsError::Stale {
        path: path.to_path_buf(),
        why: format!("not a saved plan ({e})"),
    })?;
    if saved.fingerprint != fingerprint(desired, observed) || saved.plan != *p {
        return Err(OpsError::Stale {
            path: path.to_path_buf(),
            why: "the manifests or the observed state changed since it was made".into(),
        });
    }
    Ok(())
}

/// An empty plan made while some agents could not be observed is no "converged": it says so
/// and exits 1.
fn not_observed(p: &Plan) -> Option<ExitCode> {
    if p.unknown.is_empty() {
        return None;
    }
    println!(
        "Not converged: {} agent(s) could not be observed.",
        p.unknown.len()
    );
    Some(ExitCode::FAILURE)
}

/// How steps are shown as they end: one line each, or a progress bar (steps, rate, ETA) that
/// prints only failures.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    failures: std::sync::atomic::AtomicUsize,
}

impl Progress {
    fn new(lines: bool) -> Self {
        let bar = (!lines).then(|| {
            indicatif::ProgressBar::new(0).with_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} steps  {per_sec}  ETA {eta}  {msg}",
                )
                .expect("a valid template"),
            )
        });
        Self {
            bar,
            failures: Default::default(),
        }
    }

    fn start(&self, steps: usize) {
        if let Some(bar) = &self.bar {
            bar.reset();
            bar.set_length(steps as u64);
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    fn step(&self, s: &plan::Step, o: &Outcome) {
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
        match &self.bar {
            Some(bar) => {
                if *o != Outcome::Done {
                    let n = self
                        .failures
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                        + 1;
                    bar.set_message(format!("{n} failed or skipped"));
                    bar.println(line);
                }
                bar.inc(1);
            }
            None => println!("{line}"),
        }
    }
}

/// One apply's passes.
struct Run<'a> {
    a: &'a ApplyArgs,
    desired: &'a crate::manifest::Desired,
    fleet: &'a std::sync::Arc<crate::fleet::Fleet>,
    opts: &'a crate::plan::Options,
    exec: &'a crate::execute::ExecOptions,
    progress: Progress,
}

impl Run<'_> {
    /// Executes `p`, re-observes what it commanded and re-plans, until the plan is empty, a pass
    /// makes no progress, or `--passes` are spent.
    async fn passes(
        &self,
        mut p: Plan,
        mut informer: crate::fleet::Informer,
    ) -> Result<ExitCode, OpsError> {
        let a = self.a;
        for pass in 1..=a.passes {
            println!("Pass {pass}: {} step(s)", p.steps.len());
            self.progress.start(p.steps.len());
            let observed = informer.observed().clone();
            let report = execute::execute(
                &p,
                self.desired,
                &observed,
                self.fleet,
                self.exec,
                &|s: &plan::Step, o: &Outcome| self.progress.step(s, o),
            )
            .await;
            self.progress.finish();
            if !report.lost_leases.is_empty() {
                let lost: Vec<String> = report.lost_leases.iter().map(|t| t.to_string()).collect();
                println!(
                    "Stopped: the lease on {} was lost during pass {pass} (this process was paused, or cut off, longer than --lease-ttl); another controller may have written since this plan was made, so nothing more is done here: run apply again.",
                    lost.join(", ")
                );
                return Ok(ExitCode::FAILURE);
            }
            // Every agent read again, not only those this pass commanded: while this process
            // held no lease on the others (between passes too), another controller may have
            // written there, and one image is never exposed by two DPUs on a stale view.
            for t in self.fleet.agents.keys() {
                informer.mark(t.clone());
            }
            informer.refresh(self.fleet, a.common.report_timeout).await;
            let mut observed = informer.observed().clone();
            let next = super::plan_probed(self.desired, &mut observed, self.fleet, self.opts).await;
            if next.is_empty() {
                return Ok(converged(&next, report.done()));
            }
            if report.done() == 0 {
                println!(
                    "No progress in pass {pass}; {} step(s) remain:",
                    next.steps.len()
                );
                print!("{}", render::human(&next));
                return Ok(ExitCode::FAILURE);
            }
            // Later passes only finish what this apply set out to do; new removals need a new
            // plan.
            let checked =
                with_live_watchers(&next, self.desired, &observed, self.fleet, &a.rails).await;
            check_rails(&next, self.desired, &checked, &a.rails)?;
            p = next;
        }
        println!("Not converged after {} passes:", a.passes);
        print!("{}", render::human(&p));
        Ok(ExitCode::FAILURE)
    }
}

/// The end of an apply whose plan came out empty: converged, unless agents went unobserved.
fn converged(next: &Plan, done: usize) -> ExitCode {
    if !next.unknown.is_empty() {
        print!("{}", render::human(next));
        return not_observed(next).unwrap_or(ExitCode::FAILURE);
    }
    if !next.blocked.is_empty() {
        println!("{done} step(s) done.");
        print!("{}", render::human(next));
        return held_back(next).unwrap_or(ExitCode::FAILURE);
    }
    println!("Converged: {done} step(s) done.");
    ExitCode::SUCCESS
}

/// A plan with objects held back is not converged, whatever ran: it says so and exits 1.
fn held_back(p: &Plan) -> Option<ExitCode> {
    if p.blocked.is_empty() {
        return None;
    }
    println!(
        "Not converged: {} object(s) held back (listed above).",
        p.blocked.len()
    );
    Some(ExitCode::FAILURE)
}
