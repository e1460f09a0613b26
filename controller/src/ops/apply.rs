//! `unistor apply`: the plan (or a saved one, if still fresh), the rails, confirmation, then
//! passes of execute-observe-plan until converged.

use std::io::IsTerminal;
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use super::rails::Rails;
use super::{connect, fingerprint, load, run_options, Common, OpsError, SavedPlan};
use crate::execute::{self, Outcome};
use crate::plan::{self, Observed, Plan, Risk};
use crate::reconcile::{self, reconcile, Driver, Inputs, Made, Reread, Verdict};
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
/// agent not observed, or anything held back). The passes are [`crate::reconcile`]'s; this
/// prints them and maps their verdict to the exit code.
pub async fn apply_cmd(a: ApplyArgs) -> Result<ExitCode, OpsError> {
    let desired = load(&a.common.dir)?;
    let fleet = connect(&a.common, &desired).await?;
    let (opts, mut exec) = run_options(&a.common, &a.rails);
    exec.verify_exposures = true;
    exec.lease_wait = a.lease_wait;
    exec.lease_ttl = a.lease_ttl;
    let informer = crate::fleet::SharedInformer::default();
    let inputs = Inputs {
        desired: &desired,
        fleet: &fleet,
        informer: &informer,
        opts: &opts,
        exec: &exec,
        rails: &a.rails,
        passes: a.passes,
        heal: true,
        // Between passes every agent is read again, not only those a pass commanded: while
        // this process held no lease on the others, another controller may have written there,
        // and one image is never exposed by two DPUs on a stale view.
        reread: Reread::All,
        report_timeout: a.common.report_timeout,
    };
    let printer = Printer {
        a: &a,
        desired: &desired,
        progress: Progress::new(a.verbose || !std::io::stdout().is_terminal()),
    };
    let out = reconcile(&inputs, &printer).await?;
    exit_code(&out, a.passes)
}

/// What `apply` prints as a reconcile goes.
struct Printer<'a> {
    a: &'a ApplyArgs,
    desired: &'a crate::manifest::Desired,
    progress: Progress,
}

impl Driver for Printer<'_> {
    fn planned(&self, made: Made, observed: &Observed, p: &Plan) -> Result<(), OpsError> {
        if made == Made::Pass(1) {
            if let Some(path) = &self.a.plan {
                still_fresh(path, self.desired, observed, p)?;
            }
            print!("{}", render::human(p));
        }
        Ok(())
    }

    fn approve(&self, pass: usize, p: &Plan) -> Result<(), OpsError> {
        // Later passes only finish what this apply set out to do (the rails are checked again
        // on each: new removals need a new plan).
        if pass == 1 && !self.a.auto_approve && self.a.plan.is_none() {
            confirm(p)?;
        }
        println!("Pass {pass}: {} step(s)", p.steps.len());
        self.progress.start(p.steps.len());
        Ok(())
    }

    fn step(&self, s: &plan::Step, o: &Outcome) {
        self.progress.step(s, o);
    }

    fn executed(&self, _pass: usize, _report: &execute::ExecReport) {
        self.progress.finish();
    }
}

/// The exit code of a reconcile's outcome, with what it leaves said: 0 only when converged.
pub fn exit_code(out: &reconcile::Outcome, passes: usize) -> Result<ExitCode, OpsError> {
    let ran = out.passes > 0;
    let done = out.steps_done;
    match &out.verdict {
        Verdict::Converged => {
            if ran {
                println!("Converged: {done} step(s) done.");
            }
            return Ok(ExitCode::SUCCESS);
        }
        Verdict::Waiting { agents } => {
            if ran {
                print!("{}", render::human(&out.plan));
            }
            println!(
                "Not converged: {} agent(s) could not be observed.",
                agents.len()
            );
        }
        Verdict::HeldBack { blocked, .. } => {
            if ran {
                println!("{done} step(s) done.");
                print!("{}", render::human(&out.plan));
            }
            println!(
                "Not converged: {} object(s) held back (listed above).",
                blocked.len()
            );
        }
        Verdict::Refused(r) => return Err(OpsError::Refused(r.clone())),
        Verdict::LeaseLost { targets } => {
            let lost: Vec<String> = targets.iter().map(ToString::to_string).collect();
            println!(
                "Stopped: the lease on {} was lost during pass {} (this process was paused, or cut off, longer than --lease-ttl); another controller may have written since this plan was made, so nothing more is done here: run apply again.",
                lost.join(", "),
                out.passes
            );
        }
        Verdict::Stale { why } => println!(
            "Stopped before any step: the plan was made on an older view than the one read under its leases ({why}); run apply again."
        ),
        Verdict::Remaining { steps, stuck_at } => {
            match stuck_at {
                Some(pass) => println!("No progress in pass {pass}; {steps} step(s) remain:"),
                None => println!("Not converged after {passes} passes:"),
            }
            print!("{}", render::human(&out.plan));
        }
        Verdict::Drift { .. } => println!("Not converged: {}", out.verdict),
    }
    Ok(ExitCode::FAILURE)
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
    #[derive(serde::Deserialize)]
    struct Format {
        version: u32,
    }
    let stale = |why: String| OpsError::Stale {
        path: path.to_path_buf(),
        why,
    };
    let format: Format =
        serde_json::from_slice(&bytes).map_err(|e| stale(format!("not a saved plan ({e})")))?;
    if format.version != super::SAVED_PLAN_VERSION {
        return Err(stale(format!(
            "saved in format {}, this unistor reads {}",
            format.version,
            super::SAVED_PLAN_VERSION
        )));
    }
    let saved: SavedPlan =
        serde_json::from_slice(&bytes).map_err(|e| stale(format!("not a saved plan ({e})")))?;
    if saved.fingerprint != fingerprint(desired, observed) || saved.plan != *p {
        return Err(stale(
            "the manifests or the observed state changed since it was made".into(),
        ));
    }
    Ok(())
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
