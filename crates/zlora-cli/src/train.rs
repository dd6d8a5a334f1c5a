//! `zlora train CONFIG [--resume [--allow-changes KEY...]] [--force] [--steps N] [--output DIR]
//! [--events json] [--gpus LIST]`. SIGTERM or SIGINT stops it cleanly: the step in progress is
//! finished and checkpointed, and it exits with [`STOPPED`].
//!
//! Several GPUs (docs/multi-gpu.md): `--gpus 0,1,2,3` starts one process per GPU
//! (`launch.rs`), and a process started by a launcher (torchrun, srun, or `--gpus`: its
//! variables say WORLD_SIZE > 1) joins that world through NCCL and trains its share of each
//! batch.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use indicatif::ProgressBar;
use zlora::train::config::TrainConfig;
use zlora::train::exchange::rendezvous::World;
use zlora::train::exchange::{Alone, GradientExchange};
use zlora::train::trainer::{train_with, Event, TrainOptions};

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
    /// Train on these CUDA GPUs of this machine, one process each, e.g. 0,1,2,3
    /// (docs/multi-gpu.md); [train] batch_size is the batch of all of them together. One GPU:
    /// a plain run on it.
    #[arg(long, value_name = "LIST", value_parser = parse_gpus)]
    gpus: Option<Gpus>,
}

/// The GPU numbers of `--gpus`: distinct, in the order given (the first is rank 0).
#[derive(Debug, Clone)]
pub struct Gpus(Vec<usize>);

fn parse_gpus(list: &str) -> Result<Gpus, String> {
    let mut gpus = Vec::new();
    for item in list.split(',') {
        let gpu = item.trim().parse::<usize>().map_err(|_| {
            format!(
                "'{item}' is not a GPU number: expected numbers separated by commas, e.g. 0,1,2,3"
            )
        })?;
        if gpus.contains(&gpu) {
            return Err(format!(
                "GPU {gpu} is listed twice: each GPU runs one process"
            ));
        }
        gpus.push(gpu);
    }
    Ok(Gpus(gpus))
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let json = a.events.is_some();
    let result = run_in_world(a);
    if let (true, Err(e)) = (json, &result) {
        events::failed(e);
    }
    result
}

/// A plain run, the launcher of `--gpus`, or one rank of a launcher's world.
fn run_in_world(mut a: Args) -> anyhow::Result<ExitCode> {
    let world = World::from_env(&|name| std::env::var(name).ok())?.filter(|w| w.world_size > 1);
    match (a.gpus.take(), world) {
        (Some(_), Some(w)) => anyhow::bail!(
            "--gpus starts one process per GPU, but this one already is rank {} of {} \
             (WORLD_SIZE/RANK or SLURM_NTASKS/SLURM_PROCID are set by a launcher): leave out --gpus",
            w.rank,
            w.world_size
        ),
        (Some(Gpus(gpus)), None) if gpus.len() == 1 => {
            // Read by the trainer's device selection; set while only this thread runs.
            std::env::set_var(zlora::device::ENV, format!("cuda:{}", gpus[0]));
            run_training(prepare(a)?, &mut Alone)
        }
        (Some(Gpus(gpus)), None) => {
            if !cfg!(feature = "nccl") {
                let list: Vec<String> = gpus.iter().map(usize::to_string).collect();
                return Err(no_nccl(&format!("--gpus {}", list.join(","))));
            }
            crate::launch::launch(&gpus)
        }
        (None, Some(w)) => join(prepare(a)?, &w),
        (None, None) => run_training(prepare(a)?, &mut Alone),
    }
}

/// Training on several GPUs needs NCCL, which only a build with the `nccl` feature has.
fn no_nccl(what: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{what}: training on several GPUs needs a zlora built with the `nccl` feature \
         (scripts/cuda-build.sh builds one; docs/multi-gpu.md)"
    )
}

/// One rank of a launcher's world: rendezvous with the others, open NCCL on this rank's GPU,
/// train its share of each batch.
#[cfg(feature = "nccl")]
fn join(run: Run, world: &World) -> anyhow::Result<ExitCode> {
    use zlora::train::exchange::nccl::{unique_id, Nccl};
    use zlora::train::exchange::rendezvous::DEFAULT_TIMEOUT;
    if std::env::var_os(zlora::device::ENV).is_none() {
        let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
        let gpu = world.gpu(visible.as_deref());
        // Read by the trainer's device selection; set while only this thread runs.
        std::env::set_var(zlora::device::ENV, format!("cuda:{gpu}"));
    }
    let device = zlora::device::select()?;
    let id = world
        .share_id(unique_id, DEFAULT_TIMEOUT)
        .context("the ranks did not meet")?;
    let mut nccl = Nccl::join(&device, world, &id)?;
    run_training(run, &mut nccl)
}

#[cfg(not(feature = "nccl"))]
fn join(_: Run, world: &World) -> anyhow::Result<ExitCode> {
    Err(no_nccl(&format!(
        "rank {} of a world of {} (the launcher's WORLD_SIZE or SLURM_NTASKS)",
        world.rank, world.world_size
    )))
}

/// What one run trains with: the config and the command line's options.
struct Run {
    cfg: TrainConfig,
    opts: TrainOptions,
    events: Option<EventFormat>,
}

/// The config read and the command line applied, before any rank waits for the others, so
/// that a mistake in them is reported at once.
fn prepare(a: Args) -> anyhow::Result<Run> {
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
    Ok(Run {
        cfg,
        opts,
        events: a.events,
    })
}

fn run_training(run: Run, exchange: &mut dyn GradientExchange) -> anyhow::Result<ExitCode> {
    let Run { cfg, opts, events } = run;
    let outcome = match events {
        Some(EventFormat::Json) => {
            let mut sink = TrainEvents::new(cfg.train.steps);
            let outcome = train_with(&cfg, &opts, exchange, &mut |event| sink.show(event))
                .context("training failed")?;
            events::finished(&outcome);
            outcome
        }
        None => {
            let mut display = TrainDisplay::new(cfg.train.steps);
            let outcome = train_with(&cfg, &opts, exchange, &mut |event| display.show(event))
                .context("training failed")?;
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
