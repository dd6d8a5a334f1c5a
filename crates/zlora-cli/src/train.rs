//! `zlora train CONFIG [--resume [--allow-changes KEY...]] [--force] [--steps N] [--output DIR]
//! [--events json]`. SIGTERM or SIGINT stops it cleanly: the step in progress is finished and
//! checkpointed, and it exits with [`STOPPED`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use indicatif::ProgressBar;
use zlora::train::config::TrainConfig;
use zlora::train::trainer::{train, Event, TrainOptions};

use crate::events::{self, EventFormat, TrainEvents};
use crate::progress::{count_bar, steps_bar};

/// The exit status of a run stopped by a signal after its checkpoint (128 + SIGINT, as a
/// shell reports an interrupted command): a script must not take it for a finished run.
pub const STOPPED: u8 = 130;

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
    /// Print progress as JSON lines on stdout (step, checkpoint, samples, done/stopped/failed)
    /// instead of bars; docs/serve.md lists the events.
    #[arg(long, value_enum)]
    events: Option<EventFormat>,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let json = a.events.is_some();
    let result = run_training(a);
    if let (true, Err(e)) = (json, &result) {
        events::failed(e);
    }
    result
}

fn run_training(a: Args) -> anyhow::Result<ExitCode> {
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
        stop: Some(stop_on_signals()?),
    };
    let outcome = match a.events {
        Some(EventFormat::Json) => {
            let mut sink = TrainEvents::new(cfg.train.steps);
            let outcome =
                train(&cfg, &opts, &mut |event| sink.show(event)).context("training failed")?;
            events::finished(&outcome);
            outcome
        }
        None => {
            let mut display = TrainDisplay::new(cfg.train.steps);
            let outcome =
                train(&cfg, &opts, &mut |event| display.show(event)).context("training failed")?;
            display.finish();
            println!("{}", outcome.lora.display());
            outcome
        }
    };
    if outcome.stopped {
        eprintln!(
            "stopped at step {}; its checkpoint's LoRA is {} (continue with --resume)",
            outcome.steps,
            outcome.lora.display()
        );
        return Ok(ExitCode::from(STOPPED));
    }
    Ok(ExitCode::SUCCESS)
}

/// SIGTERM and SIGINT set the trainer's stop flag. A second SIGINT (Ctrl-C twice) exits at
/// once; SIGTERM may come more than once (a parent-death signal is sent again at each
/// reparenting) and only ever stops cleanly.
pub fn stop_on_signals() -> anyhow::Result<Arc<AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let stop = Arc::new(AtomicBool::new(false));
    let installed = || "cannot install the stop signal handlers";
    // Registered first, so that it sees the flag before this signal sets it.
    signal_hook::flag::register_conditional_shutdown(SIGINT, i32::from(STOPPED), stop.clone())
        .context(installed())?;
    for signal in [SIGINT, SIGTERM] {
        signal_hook::flag::register(signal, stop.clone()).context(installed())?;
    }
    Ok(stop)
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
