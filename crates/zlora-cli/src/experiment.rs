//! `zlora experiment PLAN.toml [--force]`, and the display of arms' progress that `sweep`
//! shares.

use std::path::PathBuf;

use anyhow::Context;
use indicatif::ProgressBar;
use serde_json::json;
use zlora::validate::arms::Event;
use zlora::validate::experiment::{experiment, ExperimentPlan};

use crate::events::{self, TrainEvents};
use crate::train::TrainDisplay;
use crate::validate::show;

#[derive(clap::Args)]
pub struct Args {
    /// The experiment plan (TOML; see docs/validation.md).
    plan: PathBuf,
    /// Delete the output folder and start over (otherwise finished parts are kept); only a
    /// folder zlora made.
    #[arg(long)]
    force: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let plan = ExperimentPlan::from_file(&a.plan)?;
    let text = std::fs::read_to_string(&a.plan)
        .with_context(|| format!("{}: cannot read", a.plan.display()))?;
    let mut progress = ArmProgress::new(false);
    let outcome = experiment(&plan, &text, a.force, &mut |e| progress.show(e))
        .context("experiment failed")?;
    progress.finish();
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
    Ok(())
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
