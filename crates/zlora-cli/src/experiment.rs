//! `zlora experiment PLAN.toml [--force] [--events json]`. SIGTERM or SIGINT stops it
//! cleanly: a training finishes its step and writes a checkpoint, a validation in progress
//! finishes first; it exits with [`STOPPED`] and a rerun continues.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use serde_json::json;
use zlora::validate::experiment::{experiment, Event, ExperimentOutcome, ExperimentPlan};

use crate::events::{self, EventFormat, TrainEvents};
use crate::train::{stop_on_signals, TrainDisplay, STOPPED};
use crate::validate::show;

#[derive(clap::Args)]
pub struct Args {
    /// The experiment plan (TOML; see docs/validation.md).
    plan: PathBuf,
    /// Delete the output folder and start over (otherwise finished parts are kept); only a
    /// folder zlora made.
    #[arg(long)]
    force: bool,
    /// Print progress as JSON lines on stdout (training, step, validating, image, then
    /// done, stopped or failed) instead of bars; docs/serve.md lists the events.
    #[arg(long, value_enum)]
    events: Option<EventFormat>,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let json = a.events.is_some();
    let result = run_experiment(a);
    if let (true, Err(e)) = (json, &result) {
        events::failed(e);
    }
    result
}

fn run_experiment(a: Args) -> anyhow::Result<ExitCode> {
    let plan = ExperimentPlan::from_file(&a.plan)?;
    let text = std::fs::read_to_string(&a.plan)
        .with_context(|| format!("{}: cannot read", a.plan.display()))?;
    let stop = Some(stop_on_signals()?);
    let outcome = match a.events {
        Some(EventFormat::Json) => {
            let mut sink = JsonProgress::default();
            let outcome = experiment(&plan, &text, a.force, stop, &mut |e| sink.show(e))
                .context("experiment failed")?;
            sink.finish(outcome.as_ref());
            outcome
        }
        None => {
            let mut display = Display::default();
            let outcome = experiment(&plan, &text, a.force, stop, &mut |e| display.show(e))
                .context("experiment failed")?;
            display.finish();
            if let Some(o) = &outcome {
                print_results(o);
            }
            outcome
        }
    };
    if outcome.is_none() {
        eprintln!("stopped; run the same command again to continue");
        return Ok(ExitCode::from(STOPPED));
    }
    Ok(ExitCode::SUCCESS)
}

/// Bars on stderr: one training display per way, one bar per validation.
#[derive(Default)]
struct Display {
    bar: Option<indicatif::ProgressBar>,
    training: Option<TrainDisplay>,
}

impl Display {
    fn show(&mut self, e: Event) {
        match e {
            Event::Message(m) => eprintln!("{m}"),
            Event::Training { way, steps } => {
                eprintln!("{}: training", way.name());
                if let Some(done) = self.training.replace(TrainDisplay::new(steps)) {
                    done.finish();
                }
            }
            Event::Train(e) => {
                if let Some(t) = self.training.as_mut() {
                    t.show(e);
                }
            }
            Event::Validating { way } => eprintln!("{}: validating", way.name()),
            Event::Validate(e) => show(e, &mut self.bar),
        }
    }

    fn finish(self) {
        if let Some(t) = self.training {
            t.finish();
        }
        if let Some(b) = self.bar {
            b.finish();
        }
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

/// JSON lines on stdout: `training` and `validating` name the way and phase, the training's
/// and validation's own events follow each.
#[derive(Default)]
struct JsonProgress {
    training: Option<TrainEvents>,
}

impl JsonProgress {
    fn show(&mut self, e: Event) {
        match e {
            Event::Message(text) => events::emit(json!({"event": "message", "text": text})),
            Event::Training { way, steps } => {
                self.training = Some(TrainEvents::new(steps));
                events::emit(json!({"event": "training", "way": way.name(), "steps": steps}));
            }
            Event::Train(e) => {
                if let Some(t) = self.training.as_mut() {
                    t.show(e);
                }
            }
            Event::Validating { way } => {
                events::emit(json!({"event": "validating", "way": way.name()}));
            }
            Event::Validate(e) => events::validation(e),
        }
    }

    /// `done` with the report and each way's verdicts, or `stopped`.
    fn finish(self, outcome: Option<&ExperimentOutcome>) {
        let Some(o) = outcome else {
            events::emit(json!({"event": "stopped"}));
            return;
        };
        let results: Vec<_> = o
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
            .collect();
        events::done(json!({"report": o.report, "results": results}));
    }
}
