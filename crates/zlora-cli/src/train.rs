//! `zlora train CONFIG [--resume [--allow-changes KEY...]] [--force] [--steps N] [--output DIR]`.

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
    /// With --resume: accept these config changes since the checkpoint (steps, save_every,
    /// gradient_checkpointing, sample or sample.KEY, output); changes to what training
    /// computes are always refused.
    #[arg(long, requires = "resume", num_args = 1..)]
    allow_changes: Vec<String>,
    /// Start over in an existing output folder zlora made (deletes it).
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
    let mut allow_changes = a.allow_changes;
    if let Some(steps) = a.steps {
        anyhow::ensure!(steps > 0, "--steps must be at least 1");
        cfg.train.steps = steps;
        // Asked for on the command line: a resumed run may go on to it.
        allow_changes.push("train.steps".into());
    }
    if let Some(out) = a.output {
        cfg.train.output = out;
    }
    let opts = TrainOptions {
        resume: a.resume,
        force: a.force,
        allow_changes,
        config_file: Some(a.config),
    };
    let mut display = TrainDisplay::new(cfg.train.steps);
    let outcome =
        train(&cfg, &opts, &mut |event| display.show(event)).context("training failed")?;
    display.finish();
    println!("{}", outcome.lora.display());
    Ok(())
}

/// A training run on stderr: a bar per cache stage, a step bar with the smoothed loss, and
/// lines for messages, checkpoints and samples.
pub struct TrainDisplay {
    total: u64,
    bar: Option<ProgressBar>,
    cache_bar: Option<ProgressBar>,
}

impl TrainDisplay {
    pub fn new(total: u64) -> Self {
        Self {
            total,
            bar: None,
            cache_bar: None,
        }
    }

    pub fn show(&mut self, event: Event) {
        match event {
            Event::Message(m) => eprintln!("{m}"),
            Event::Cache { stage, done, total } => {
                let label = || format!("caching {stage:?}");
                let b = self
                    .cache_bar
                    .get_or_insert_with(|| count_bar(total as u64, label()));
                if done == 1 {
                    *b = count_bar(total as u64, label());
                }
                b.set_position(done as u64);
            }
            Event::Step(log) => {
                let total = self.total;
                let b = self
                    .bar
                    .get_or_insert_with(|| steps_bar(total, "training".into()));
                if b.position() == 0 {
                    b.set_position(log.step - 1);
                    b.reset_eta();
                }
                b.set_position(log.step);
                b.set_message(format!("loss {:.4}", log.loss_smoothed));
            }
            Event::Checkpoint(dir) => eprintln!("checkpoint {}", dir.display()),
            Event::Samples(png) => eprintln!("samples {}", png.display()),
        }
    }

    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish();
        }
    }
}
