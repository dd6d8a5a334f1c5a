//! `zlora train CONFIG [--resume] [--force] [--steps N] [--output DIR]`.

use std::path::PathBuf;

use anyhow::Context;
use indicatif::ProgressBar;
use zlora::train::config::TrainConfig;
use zlora::train::trainer::{train, Event, TrainOptions};

use crate::progress::{count_bar, steps_bar};

#[derive(clap::Args)]
pub struct Args {
    /// The training configuration (TOML; see docs/training.md and examples/).
    config: PathBuf,
    /// Continue from the newest checkpoint in the output folder.
    #[arg(long)]
    resume: bool,
    /// Start over in an existing output folder (deletes it).
    #[arg(long, conflicts_with = "resume")]
    force: bool,
    /// Override [train] steps.
    #[arg(long)]
    steps: Option<u64>,
    /// Override [train] output.
    #[arg(long)]
    output: Option<PathBuf>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut cfg = TrainConfig::from_file(&a.config)?;
    if let Some(steps) = a.steps {
        anyhow::ensure!(steps > 0, "--steps must be at least 1");
        cfg.train.steps = steps;
    }
    if let Some(out) = a.output {
        cfg.train.output = out;
    }
    let opts = TrainOptions {
        resume: a.resume,
        force: a.force,
    };
    let total = cfg.train.steps;
    let mut bar: Option<ProgressBar> = None;
    let mut cache_bar: Option<ProgressBar> = None;
    let outcome = train(&cfg, &opts, &mut |event| match event {
        Event::Message(m) => eprintln!("{m}"),
        Event::Cache { stage, done, total } => {
            let b = cache_bar
                .get_or_insert_with(|| count_bar(total as u64, format!("caching {stage:?}")));
            if done == 1 {
                *b = count_bar(total as u64, format!("caching {stage:?}"));
            }
            b.set_position(done as u64);
        }
        Event::Step(log) => {
            let b = bar.get_or_insert_with(|| steps_bar(total, "training".into()));
            if b.position() == 0 {
                b.set_position(log.step - 1);
                b.reset_eta();
            }
            b.set_position(log.step);
            b.set_message(format!("loss {:.4}", log.loss_smoothed));
        }
        Event::Checkpoint(dir) => eprintln!("checkpoint {}", dir.display()),
        Event::Samples(png) => eprintln!("samples {}", png.display()),
    })
    .context("training failed")?;
    if let Some(b) = bar {
        b.finish();
    }
    println!("{}", outcome.lora.display());
    Ok(())
}
