//! `zlora experiment PLAN.toml [--force]`.

use std::path::PathBuf;

use anyhow::Context;
use zlora::validate::experiment::{experiment, Event, ExperimentPlan};

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
    let mut bar = None;
    let mut training: Option<TrainDisplay> = None;
    let outcome = experiment(&plan, &text, a.force, &mut |e| match e {
        Event::Message(m) => eprintln!("{m}"),
        Event::Training { way, steps } => {
            eprintln!("{}: training", way.name());
            if let Some(done) = training.replace(TrainDisplay::new(steps)) {
                done.finish();
            }
        }
        Event::Train(e) => {
            if let Some(t) = training.as_mut() {
                t.show(e);
            }
        }
        Event::Validate(e) => show(e, &mut bar),
    })
    .context("experiment failed")?;
    if let Some(t) = training {
        t.finish();
    }
    if let Some(b) = bar {
        b.finish();
    }
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
