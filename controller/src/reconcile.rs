//! One reconcile: observe, plan, rails, execute, observe again, until the plan is settled
//! (converged, held back, waiting on agents), refused by a rail, stopped by a lost lease, stuck
//! or out of passes. This is the only place a pass runs: `unistor apply` drives it and prints
//! its progress and verdict (`ops/apply.rs`); `unistor watch` drives it, records the outcome and
//! schedules the next reconcile from it (`watch/mod.rs`). Both get the same [`Verdict`] for the
//! same plan.
//!
//! What is left when the process dies: before a pass's execution, nothing was written; during
//! it, what the executor's steps say (each step is idempotent and the next reconcile plans from
//! what the agents report); after it, nothing of this module's (it keeps no state of its own).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use crate::execute::{self, ExecOptions, ExecReport};
use crate::fleet::{Fleet, SharedInformer};
use crate::manifest::Desired;
use crate::ops::{check_rails, plan_probed, with_live_watchers, OpsError, Rails, Refusal};
use crate::plan::{Blocked, Drift, Observed, Options, Plan, Step, Target};

/// Which agents are read again after a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reread {
    /// Those the pass commanded (the daemon: the others push what changes).
    Commanded,
    /// Every agent (`apply`: it held no lease on the others, and hears nothing from them).
    All,
}

/// What a reconcile works from.
pub struct Inputs<'a> {
    /// The manifests.
    pub desired: &'a Desired,
    /// The agents' sessions.
    pub fleet: &'a Arc<Fleet>,
    /// What the agents reported, kept between reconciles.
    pub informer: &'a SharedInformer,
    /// Planning options.
    pub opts: &'a Options,
    /// Execution options.
    pub exec: &'a ExecOptions,
    /// The safety rails.
    pub rails: &'a Rails,
    /// Passes at most.
    pub passes: usize,
    /// False: report drift, change nothing.
    pub heal: bool,
    /// Which agents to read again after a pass.
    pub reread: Reread,
    /// Deadline of each agent's report.
    pub report_timeout: Duration,
}

/// Which plan a driver is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Made {
    /// The plan pass `n` (from 1) is about to execute, or that ends the reconcile.
    Pass(usize),
    /// The plan made after the last pass ran (out of passes, or a pass made no progress).
    AfterPasses,
}

/// What a driver does at each point of a reconcile. Every method has a default that does
/// nothing, so a test drives a reconcile with `()`.
pub trait Driver: Sync {
    /// Shapes a plan before it is judged (the daemon drops suspended objects' steps); returns
    /// it and how many steps were held back that way.
    fn shape(&self, p: Plan) -> (Plan, usize) {
        (p, 0)
    }
    /// A plan was made; an error ends the reconcile (a stale saved plan).
    fn planned(&self, _made: Made, _observed: &Observed, _p: &Plan) -> Result<(), OpsError> {
        Ok(())
    }
    /// The rails passed and pass `pass` is about to run `p`; an error ends the reconcile
    /// (confirmation refused).
    fn approve(&self, _pass: usize, _p: &Plan) -> Result<(), OpsError> {
        Ok(())
    }
    /// A step ended.
    fn step(&self, _s: &Step, _o: &execute::Outcome) {}
    /// Pass `pass` finished executing.
    fn executed(&self, _pass: usize, _report: &ExecReport) {}
    /// What the agents report was read (again).
    fn observed(&self, _o: &Observed) {}
}

impl Driver for () {}

/// How a reconcile ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Everything as the manifests say.
    Converged,
    /// Nothing left that may run, but objects are held back: by the planner (a closed health
    /// gate, a silent DPU, an image not owned...) or suspended.
    HeldBack {
        /// What the planner held back, and why.
        blocked: Vec<Blocked>,
        /// Steps of suspended objects.
        suspended: usize,
    },
    /// Nothing left that may run on what can be seen; these agents were not observed.
    Waiting {
        /// The agents, with why.
        agents: Vec<String>,
    },
    /// The safety rails refused the plan.
    Refused(Refusal),
    /// Report-only: these steps would run.
    Drift {
        /// Steps that would run.
        steps: usize,
        /// The differences found.
        drift: Vec<Drift>,
    },
    /// A lease was lost during a pass: what was planned is stale (another controller may have
    /// written since). Every agent is read again before the next plan.
    LeaseLost {
        /// The agents.
        targets: Vec<Target>,
    },
    /// Nothing ran: once its leases were taken, the plan was found made on an older view
    /// (another DPU exposes an image it would open). Every agent is read again first.
    Stale {
        /// What was found.
        why: String,
    },
    /// Steps remain: a pass made no progress, or the passes ran out.
    Remaining {
        /// Steps of the last plan.
        steps: usize,
        /// The pass that made no progress, when one did not.
        stuck_at: Option<usize>,
    },
}

/// What to do after a reconcile, decided by its verdict alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Nothing until something changes (a trigger, or the periodic resync).
    WaitForChange,
    /// Try again after a backoff: work is left that another pass may do.
    Retry,
}

impl Verdict {
    /// Whether everything is as the manifests say.
    pub fn converged(&self) -> bool {
        *self == Verdict::Converged
    }

    /// What to do next. Work left (steps that failed, a lost lease, objects held back for a
    /// reason that may pass: health, a silent DPU) is retried; a refusal, report-only drift and
    /// unobserved agents wait for a change (an edit, a flag, a session coming back).
    pub fn next(&self) -> Next {
        match self {
            Verdict::Converged
            | Verdict::Waiting { .. }
            | Verdict::Refused(_)
            | Verdict::Drift { .. } => Next::WaitForChange,
            Verdict::HeldBack { blocked, .. } if blocked.is_empty() => Next::WaitForChange,
            Verdict::HeldBack { .. }
            | Verdict::LeaseLost { .. }
            | Verdict::Stale { .. }
            | Verdict::Remaining { .. } => Next::Retry,
        }
    }
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Converged => f.write_str("converged"),
            Verdict::HeldBack { blocked, suspended } => {
                write!(f, "{} object(s) held back", blocked.len())?;
                if *suspended > 0 {
                    write!(f, ", {suspended} step(s) of suspended objects")?;
                }
                Ok(())
            }
            Verdict::Waiting { agents } => write!(f, "not observed: {}", agents.join("; ")),
            Verdict::Refused(r) => write!(f, "{r}"),
            Verdict::Drift { steps, drift } => write!(
                f,
                "report-only: {steps} step(s) would run, {} drift item(s)",
                drift.len()
            ),
            Verdict::LeaseLost { targets } => write!(
                f,
                "lease lost on {} during the pass: stopped, to be re-planned on fresh reports",
                targets
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Verdict::Stale { why } => write!(f, "stale plan, nothing run: {why}"),
            Verdict::Remaining {
                steps,
                stuck_at: Some(pass),
            } => write!(f, "no progress in pass {pass}; {steps} step(s) remain"),
            Verdict::Remaining {
                steps,
                stuck_at: None,
            } => write!(f, "{steps} step(s) remain"),
        }
    }
}

/// A reconcile's end: its verdict, the last plan it made, and what it did.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// How it ended.
    pub verdict: Verdict,
    /// The last plan made (what is left).
    pub plan: Plan,
    /// Passes executed.
    pub passes: usize,
    /// Steps done, all passes together.
    pub steps_done: usize,
    /// Steps failed or skipped, all passes together.
    pub steps_failed: usize,
}

/// The verdict on a plan with nothing left to run, if it has none: agents not observed first,
/// then what is held back, then converged.
pub fn settled(p: &Plan, suspended: usize) -> Option<Verdict> {
    if !p.is_empty() {
        return None;
    }
    Some(if !p.unknown.is_empty() {
        Verdict::Waiting {
            agents: p.unknown.clone(),
        }
    } else if !p.blocked.is_empty() || suspended > 0 {
        Verdict::HeldBack {
            blocked: p.blocked.clone(),
            suspended,
        }
    } else {
        Verdict::Converged
    })
}

/// Runs one reconcile (see the module's documentation).
pub async fn reconcile(i: &Inputs<'_>, d: &dyn Driver) -> Result<Outcome, OpsError> {
    let mut observed = i.informer.observe(i.fleet, i.report_timeout).await;
    d.observed(&observed);
    let mut out = Outcome {
        verdict: Verdict::Converged,
        plan: Plan::default(),
        passes: 0,
        steps_done: 0,
        steps_failed: 0,
    };
    let mut stuck_at = None;
    for pass in 1..=i.passes.max(1) {
        let (p, suspended) = make_plan(i, d, &mut observed).await;
        d.planned(Made::Pass(pass), &observed, &p)?;
        if let Some(v) = settled(&p, suspended) {
            return Ok(out.end(v, p));
        }
        if !i.heal {
            let v = Verdict::Drift {
                steps: p.steps.len(),
                drift: p.drift.clone(),
            };
            return Ok(out.end(v, p));
        }
        let checked = with_live_watchers(&p, i.desired, &observed, i.fleet, i.rails).await;
        if let Err(r) = check_rails(&p, i.desired, &checked, i.rails) {
            return Ok(out.end(Verdict::Refused(r), p));
        }
        d.approve(pass, &p)?;
        let span = tracing::info_span!("pass", pass, steps = p.steps.len());
        let report = execute::execute(&p, i.desired, &observed, i.fleet, i.exec, &|s, o| {
            d.step(s, o)
        })
        .instrument(span)
        .await;
        d.executed(pass, &report);
        out.passes = pass;
        out.steps_done += report.done();
        out.steps_failed += report.problems();
        if let Some(why) = &report.stale {
            i.informer.mark(i.fleet.agents.keys());
            return Ok(out.end(Verdict::Stale { why: why.clone() }, p));
        }
        if !report.lost_leases.is_empty() {
            i.informer.mark(i.fleet.agents.keys());
            let v = Verdict::LeaseLost {
                targets: report.lost_leases.clone(),
            };
            return Ok(out.end(v, p));
        }
        match i.reread {
            Reread::All => i.informer.mark(i.fleet.agents.keys()),
            Reread::Commanded => {
                let commanded: BTreeSet<Target> =
                    p.steps.iter().flat_map(execute::commanded).collect();
                i.informer.mark(&commanded);
            }
        }
        observed = i.informer.observe(i.fleet, i.report_timeout).await;
        d.observed(&observed);
        if report.done() == 0 {
            stuck_at = Some(pass);
            break;
        }
    }
    let (p, suspended) = make_plan(i, d, &mut observed).await;
    d.planned(Made::AfterPasses, &observed, &p)?;
    let v = settled(&p, suspended).unwrap_or(Verdict::Remaining {
        steps: p.steps.len(),
        stuck_at,
    });
    Ok(out.end(v, p))
}

/// Plans (asking the clusters about the images it would create) and shapes the plan.
async fn make_plan(i: &Inputs<'_>, d: &dyn Driver, observed: &mut Observed) -> (Plan, usize) {
    let p = plan_probed(i.desired, observed, i.fleet, i.opts)
        .instrument(tracing::debug_span!("plan"))
        .await;
    d.shape(p)
}

impl Outcome {
    fn end(mut self, verdict: Verdict, plan: Plan) -> Self {
        self.verdict = verdict;
        self.plan = plan;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::Blocked;
    use crate::watch::state::ReconcileResult;

    fn blocked() -> Vec<Blocked> {
        vec![Blocked {
            object: "volume/v".into(),
            reason: "cluster/c: HEALTH_ERR".into(),
        }]
    }

    /// One verdict of each kind.
    fn every_verdict() -> Vec<Verdict> {
        vec![
            Verdict::Converged,
            Verdict::HeldBack {
                blocked: blocked(),
                suspended: 0,
            },
            Verdict::HeldBack {
                blocked: vec![],
                suspended: 3,
            },
            Verdict::Waiting {
                agents: vec!["dpu/d: connection refused".into()],
            },
            Verdict::Refused(Refusal {
                problems: vec!["too many removals".into()],
            }),
            Verdict::Drift {
                steps: 2,
                drift: vec![],
            },
            Verdict::LeaseLost {
                targets: vec![Target::Dpu("d".into())],
            },
            Verdict::Stale {
                why: "dpu/e exposes rbd/v now".into(),
            },
            Verdict::Remaining {
                steps: 4,
                stuck_at: Some(1),
            },
            Verdict::Remaining {
                steps: 4,
                stuck_at: None,
            },
        ]
    }

    #[test]
    fn apply_and_watch_read_every_verdict_the_same_way() {
        for v in every_verdict() {
            let out = Outcome {
                verdict: v.clone(),
                plan: Plan::default(),
                passes: 1,
                steps_done: 0,
                steps_failed: 0,
            };
            let exit = crate::ops::exit_code(&out, 5);
            let applied_ok = matches!(exit, Ok(c) if c == std::process::ExitCode::SUCCESS);
            let recorded = crate::watch::result_of(&v);
            assert_eq!(
                applied_ok,
                recorded == ReconcileResult::Converged,
                "{v:?}: apply {exit:?}, watch {recorded}"
            );
            assert_eq!(applied_ok, v.converged(), "{v:?}");
            // Only the refusal is an error for apply; the daemon records it as refused.
            assert_eq!(exit.is_err(), recorded == ReconcileResult::Refused, "{v:?}");
            // Work that another pass may do is retried by the daemon; the rest waits.
            let retried = v.next() == Next::Retry;
            assert_eq!(
                retried,
                matches!(
                    v,
                    Verdict::LeaseLost { .. }
                        | Verdict::Stale { .. }
                        | Verdict::Remaining { .. }
                        | Verdict::HeldBack { .. }
                ) && !matches!(&v, Verdict::HeldBack { blocked, .. } if blocked.is_empty()),
                "{v:?}"
            );
            assert!(!v.to_string().is_empty());
        }
    }

    #[test]
    fn a_plan_of_held_back_objects_only_is_held_back_not_converged() {
        let p = Plan {
            blocked: blocked(),
            ..Plan::default()
        };
        let v = settled(&p, 0).expect("nothing to run");
        assert!(matches!(&v, Verdict::HeldBack { blocked, .. } if blocked.len() == 1));
        assert_ne!(crate::watch::result_of(&v), ReconcileResult::Converged);
        // Suspended steps alone are held back too.
        let v = settled(&Plan::default(), 2).expect("nothing to run");
        assert_eq!(
            v,
            Verdict::HeldBack {
                blocked: vec![],
                suspended: 2
            }
        );
        // Agents not observed come first: nothing can be called settled without them.
        let p = Plan {
            blocked: blocked(),
            unknown: vec!["dpu/d".into()],
            ..Plan::default()
        };
        assert!(matches!(settled(&p, 0), Some(Verdict::Waiting { .. })));
        assert_eq!(settled(&Plan::default(), 0), Some(Verdict::Converged));
        let mut p = Plan::default();
        p.steps.push(crate::plan::Step {
            id: 0,
            target: Target::Dpu("d".into()),
            action: crate::plan::Action::Send(protocol::Command::ResumeController(
                protocol::dpu::NameRef { name: "c".into() },
            )),
            risk: crate::plan::Risk::Safe,
            depends_on: Default::default(),
            volume: None,
        });
        assert_eq!(settled(&p, 0), None, "steps to run");
    }
}
