//! `zlora experiment PLAN.toml [--force] [--events json]`, and the display of arms' progress
//! that `sweep` shares. Run in this process, SIGTERM or SIGINT stops an experiment cleanly: a
//! training finishes its step and writes a checkpoint, a validation in progress finishes
//! first; it exits with [`STOPPED`] and a rerun continues. `--gpus`, `--arm`, `--arm-index`
//! and `--emit slurm` place the three arms as `sweep` does ([`crate::arm_set`]).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use indicatif::ProgressBar;
use serde_json::json;
use zlora::validate::arms::Event;
use zlora::validate::experiment::{experiment, ExperimentOutcome, ExperimentPlan};

use crate::arm_set::{self, Placed, Placement};
use crate::events::{self, TrainEvents};
use crate::train::{stop_on_signals, TrainDisplay};
use crate::validate::show;

#[derive(clap::Args)]
pub struct Args {
    /// The experiment plan (TOML; see docs/validation.md).
    plan: PathBuf,
    #[command(flatten)]
    placement: Placement,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let json = a.placement.events.is_some();
    let result = run_experiment(a);
    if let (true, Err(e)) = (json, &result) {
        events::failed(e);
    }
    result
}

fn run_experiment(a: Args) -> anyhow::Result<ExitCode> {
    let (plan, placed) = a.placement.placed(|| ExperimentPlan::from_file(&a.plan))?;
    let json = a.placement.events.is_some();
    match placed {
        Placed::InProcess => run_in_process(&plan, a.placement.force, json),
        Placed::Slurm => {
            arm_set::emit_slurm(&plan, a.placement.force, json)?;
            Ok(ExitCode::SUCCESS)
        }
        Placed::One(i) => arm_set::run_one(&plan, i, json, show_results),
        Placed::Devices(devices) => {
            match arm_set::run_all(&a.plan, &plan, &devices, a.placement.force, json)? {
                Some(outcome) => show_results(&outcome, json),
                None => return Ok(arm_set::stopped(json)),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// The three arms in turn in this process, stopped cleanly by SIGTERM or SIGINT.
fn run_in_process(plan: &ExperimentPlan, force: bool, json: bool) -> anyhow::Result<ExitCode> {
    let stop = Some(stop_on_signals()?);
    let mut progress = ArmProgress::new(json);
    let outcome =
        experiment(plan, force, stop, &mut |e| progress.show(e)).context("experiment failed")?;
    progress.finish();
    Ok(match outcome {
        Some(o) => {
            show_results(&o, json);
            ExitCode::SUCCESS
        }
        None => arm_set::stopped(json),
    })
}

/// The `done` event with each way's verdicts, or a line per way and the report's path.
fn show_results(outcome: &ExperimentOutcome, json: bool) {
    match json {
        true => events::done(json!({"report": outcome.report, "results": results_json(outcome)})),
        false => print_results(outcome),
    }
}

fn print_results(outcome: &ExperimentOutcome) {
    for (way, record) in &outcome.results {
        let v = &record.verdicts;
        println!(
            "{}: Base {} ({:.3}), Turbo {} ({:.3}), {}",
            way.name(),
            v.base.verdict.label(),
            v.base.effect,
            v.turbo.verdict.label(),
            v.turbo.effect,
            if v.blur.blurred {
                "blurred at 8 steps"
            } else {
                "sharp at 8 steps"
            }
        );
    }
    println!("{}", outcome.report.display());
}

/// Each way's verdicts, as the `done` event gives them.
fn results_json(outcome: &ExperimentOutcome) -> Vec<serde_json::Value> {
    outcome
        .results
        .iter()
        .map(|(way, record)| {
            let v = &record.verdicts;
            json!({
                "way": way.name(),
                "base": {"verdict": v.base.verdict.label(), "effect": v.base.effect},
                "turbo": {"verdict": v.turbo.verdict.label(), "effect": v.turbo.effect},
                "blurred": v.blur.blurred,
            })
        })
        .collect()
}

/// The arms' progress: messages and bars on stderr, or `--events json` lines on stdout.
pub struct ArmProgress {
    json: bool,
    bar: Option<ProgressBar>,
    training: Option<TrainDisplay>,
    train_events: Option<TrainEvents>,
}

impl ArmProgress {
    pub fn new(json: bool) -> Self {
        Self {
            json,
            bar: None,
            training: None,
            train_events: None,
        }
    }

    pub fn show(&mut self, e: Event) {
        match (e, self.json) {
            (Event::Message(m), false) => eprintln!("{m}"),
            (Event::Message(m), true) => events::emit(json!({"event": "message", "text": m})),
            (Event::Training { arm, steps }, false) => {
                eprintln!("{arm}: training");
                if let Some(done) = self.training.replace(TrainDisplay::new(steps)) {
                    done.finish();
                }
            }
            (Event::Training { arm, steps }, true) => {
                events::emit(json!({"event": "training", "arm": arm, "steps": steps}));
                self.train_events = Some(TrainEvents::new(steps));
            }
            (Event::Train(e), false) => {
                if let Some(t) = self.training.as_mut() {
                    t.show(e);
                }
            }
            (Event::Train(e), true) => {
                if let Some(t) = self.train_events.as_mut() {
                    t.show(e);
                }
            }
            (Event::Validating { arm }, false) => eprintln!("{arm}: validating"),
            (Event::Validating { arm }, true) => {
                events::emit(json!({"event": "validating", "arm": arm}));
            }
            (Event::Validate(e), false) => show(e, &mut self.bar),
            (Event::Validate(e), true) => events::validation(e),
        }
    }

    pub fn finish(self) {
        if let Some(t) = self.training {
            t.finish();
        }
        if let Some(b) = self.bar {
            b.finish();
        }
    }
}
