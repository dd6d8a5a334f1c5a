//! `zlora train`: the three modes of the workflow on one loop.
//!
//! dataset → preflight → cache (text encoder, VAE, then dropped) → transformer (+ frozen
//! training adapter) + trainable LoRA → steps (flow matching, the optimizer) → checkpoints, samples →
//! `lora.safetensors`.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::backprop::{add_grads, MicroBatch};
use super::config::{Mode, TrainConfig};
use super::ema::Ema;
use super::exchange::{mean_in_one_call, Alone, GradientExchange};
use super::host;
use super::log::{Log, StepLog};
use super::lora::{set_enabled, TrainableLora};
use super::objective::{gaussian_like, mask_weights, noise, skip_gaussians, SigmaSampler};
use super::optim::{clip_grad_norm, learning_rate, Optimizer};
use super::preservation::{loss_and_grads_with, ClassCaptions, Losses};
use super::resume;
use super::samples::Sampler;
use super::state::{self, RunState};
use crate::data::cache::{CacheOptions, CachedDataset, Stage};
use crate::data::dataset::{Dataset, DatasetConfig};
use crate::data::loader::{Batch, Loader, LoaderOptions, LoaderState};
use crate::lora::write::{save, Metadata};
use crate::lora::{Layout, LoraFile};
use crate::model::folder::ModelFolder;
use crate::model::text::PromptTokenizer;
use crate::model::ZImageTransformer;
use crate::outdir::{self, OutputDir, Policy};
use crate::sample::limits::ImageLimits;
use crate::{Error, Result};

/// The adapter name of the frozen training adapter on every Linear it touches.
pub const TRAINING_ADAPTER: &str = "training-adapter";

#[derive(Debug, Clone, Default)]
pub struct TrainOptions {
    pub resume: bool,
    pub force: bool,
    /// Keys whose change since the checkpoint a resume accepts ([`resume::SAFE_KEYS`]).
    pub allow_changes: Vec<String>,
    /// The config file the run was started from: the output folder must not hold it.
    pub config_file: Option<PathBuf>,
    /// Set (by a signal handler, another thread) to stop cleanly: the step in progress is
    /// finished and checkpointed, and `train` returns a stopped [`Outcome`].
    pub stop: Option<Arc<AtomicBool>>,
}

/// What the trainer reports while it works (the CLI draws bars and prints lines).
pub enum Event<'a> {
    Message(String),
    Cache {
        stage: Stage,
        done: usize,
        total: usize,
    },
    Step(&'a StepLog),
    Checkpoint(&'a Path),
    Samples(&'a Path),
}

pub struct Outcome {
    /// The final LoRA, or a stopped run's newest checkpoint's.
    pub lora: PathBuf,
    pub steps: u64,
    /// Stopped on request before `[train] steps`; resumable from its checkpoint.
    pub stopped: bool,
}

/// Trains on this process's device alone.
pub fn train(
    cfg: &TrainConfig,
    opts: &TrainOptions,
    events: &mut dyn FnMut(Event),
) -> Result<Outcome> {
    train_with(cfg, opts, &mut Alone, events)
}

/// Trains as one worker of a data-parallel group (docs/training.md, "Data parallel"): every
/// worker runs this with the same config, takes its share of each global batch, and the
/// exchange averages the step's gradients; rank 0 alone writes the output folder.
pub fn train_with(
    cfg: &TrainConfig,
    opts: &TrainOptions,
    exchange: &mut dyn GradientExchange,
    events: &mut dyn FnMut(Event),
) -> Result<Outcome> {
    let share = Share::new(cfg.train.batch_size, exchange)?;
    let device = crate::device::select()?;
    let writes = exchange.rank() == 0;
    let claimed = writes
        .then(|| prepare_output(cfg, opts, events))
        .transpose()?;
    let out = match &claimed {
        Some(claimed) => claimed.path().to_path_buf(),
        None => outdir::resolve(&cfg.train.output)?,
    };
    let out = out.as_path();
    let folder = ModelFolder::open(&cfg.model.path)?;
    folder.check_storage(cfg.model.storage())?;
    let mode = cfg.mode();
    describe_run(cfg, &folder, &device, events);

    // Checked from the checkpoint's header before any data is cached or weight loaded.
    let linears = folder.transformer_linear_shapes()?;
    cfg.lora
        .check_rank(linears.iter().map(|(p, s)| (p.as_str(), *s)))?;
    let data = rank_0_first(exchange, || prepare_data(cfg, &folder, &device, events))?;
    let sampler = writes
        .then(|| {
            Sampler::new(cfg, &folder, (&device, base_dtype(cfg)), &mut |w| {
                events(Event::Message(w.to_string()))
            })
        })
        .transpose()?;
    let (mut model, lora) = load_model(cfg, &folder, &device, events)?;

    let t = &cfg.train;
    let mut optimizer = Optimizer::new(&t.optimizer_config(), &lora.vars())?;
    let mut ema = t.ema.map(|d| Ema::new(d, &lora.vars())).transpose()?;
    let mut run = RunState {
        step: 0,
        loader: LoaderState::default(),
        loss_ema: None,
        config: None,
    };
    if opts.resume {
        run = load_newest_good(out, &lora, &mut optimizer, ema.as_mut(), events)?;
        agree_on_step(exchange, run.step, &device)?;
    }
    run.config = Some(toml::to_string(cfg).map_err(|e| Error::Invalid(e.to_string()))?);
    let mut log = writes
        .then(|| Log::open(out, run.step, &device, cfg.log.tensorboard))
        .transpose()?;
    let mut loader = Loader::for_cached(
        &data,
        LoaderOptions::new(&cfg.datasets, t.batch_size, t.seed),
        run.loader,
    )?;
    let writer = LoraWriter { cfg, mode };
    let ctx = StepContext::new(cfg, &lora, &data, &device, share);

    if let (Some(sampler), Some(log)) = (&sampler, log.as_mut()) {
        if run.step == 0 && cfg.sample.every > 0 {
            let from = (ema.as_ref().filter(|_| cfg.sample.ema), &lora);
            let grid = sample_now(sampler, &mut model, from, 0, out, events)?;
            log.samples(0, &grid)?;
        }
    }
    while run.step < t.steps {
        let started = Instant::now();
        let step = run.step + 1;
        let stop = opts.stop.as_deref();
        let done = optimizer_step(
            &ctx,
            &mut model,
            &mut optimizer,
            &mut loader,
            exchange,
            step,
            stop,
        )?;
        if let Some(ema) = ema.as_mut() {
            ema.update(&lora.vars())?;
        }
        let entry = advance(&mut run, step, &done, &loader, started, out)?;
        let entry = match log.as_mut() {
            Some(log) => log.append(entry)?,
            None => entry,
        };
        events(Event::Step(&entry));
        let stopping = step < t.steps && done.stop;
        if let (Some(sampler), Some(log)) = (&sampler, log.as_mut()) {
            if step.is_multiple_of(t.save_every) || step == t.steps || stopping {
                let dir = state::save(out, &run, &lora, &mut optimizer, ema.as_ref(), &|p| {
                    writer.write(&lora, step, p)
                })?;
                events(Event::Checkpoint(&dir));
            }
            if step.is_multiple_of(cfg.sample.every) {
                let from = (ema.as_ref().filter(|_| cfg.sample.ema), &lora);
                let grid = sample_now(sampler, &mut model, from, step, out, events)?;
                log.samples(step, &grid)?;
            }
        }
        if stopping {
            break;
        }
    }
    let stopped = run.step < t.steps;
    let lora_path = if stopped {
        state::checkpoint_dir(out, run.step).join("lora.safetensors")
    } else {
        out.join("lora.safetensors")
    };
    if writes && !stopped {
        writer.write(&lora, run.step, &lora_path)?;
        if let Some(ema) = &ema {
            let path = out.join(state::EMA_LORA);
            ema.swapped_in(&lora, || writer.write(&lora, run.step, &path))?;
        }
    }
    // Every worker returns once rank 0 has written what the outcome names.
    exchange.barrier()?;
    Ok(Outcome {
        lora: lora_path,
        steps: run.step,
        stopped,
    })
}

/// Moves `run` past the finished `step` and returns the step's log entry; a loss that is
/// not finite ends the run.
fn advance(
    run: &mut RunState,
    step: u64,
    done: &StepDone,
    loader: &Loader,
    started: Instant,
    out: &Path,
) -> Result<StepLog> {
    let loss = done.loss;
    if !loss.is_finite() {
        return Err(Error::Invalid(format!(
            "loss became {loss} at step {step}: training stopped; {}",
            kept_checkpoint(out)?
        )));
    }
    run.step = step;
    run.loader = loader.state();
    run.loss_ema = Some(
        run.loss_ema
            .map_or(loss as f64, |e| 0.9 * e + 0.1 * loss as f64),
    );
    Ok(StepLog {
        step,
        loss,
        preservation_loss: done.preservation_loss,
        loss_smoothed: run.loss_ema.unwrap_or(0.0),
        lr: done.lr,
        grad_norm: done.grad_norm,
        step_seconds: started.elapsed().as_secs_f64(),
        peak_memory_mib: None,
        gpu_memory_mib: None,
    })
}

/// The run's one-line description: mode, model, device and storage.
fn describe_run(
    cfg: &TrainConfig,
    folder: &ModelFolder,
    device: &Device,
    events: &mut dyn FnMut(Event),
) {
    let quantized = cfg
        .model
        .quantize
        .map(|q| format!(", blocks stored as {q}"));
    let swapped = cfg
        .model
        .blocks_on_device
        .map(|n| format!(", {n} main layers on the device (the others swapped in)"));
    let text = cfg
        .model
        .quantize_text_encoder
        .map(|q| format!(", text encoder stored as {q}"));
    events(Event::Message(format!(
        "mode {} on {} ({}{}{}{})",
        cfg.mode().name(),
        folder.root().display(),
        crate::device::describe(device, base_dtype(cfg)),
        quantized.unwrap_or_default(),
        swapped.unwrap_or_default(),
        text.unwrap_or_default()
    )));
}

/// The transformer with its frozen training adapter and the trainable LoRA attached (the
/// LoRA's initial values from the seed: the same on every worker).
fn load_model(
    cfg: &TrainConfig,
    folder: &ModelFolder,
    device: &Device,
    events: &mut dyn FnMut(Event),
) -> Result<(ZImageTransformer, TrainableLora)> {
    let mut model = folder.load_transformer(
        cfg.model.transformer.as_deref(),
        base_dtype(cfg),
        device,
        cfg.model.storage(),
    )?;
    attach_training_adapter(cfg, &mut model, events)?;
    let mut init_rng = ChaCha8Rng::seed_from_u64(cfg.train.seed);
    let lora = TrainableLora::new(&cfg.lora, &model, &mut init_rng)?;
    lora.attach(&mut model)?;
    events(Event::Message(format!(
        "training a rank-{} {} on {} modules ({} parameters)",
        cfg.lora.rank,
        cfg.lora.algorithm.name(),
        lora.modules.len(),
        lora.vars().iter().map(|v| v.elem_count()).sum::<usize>()
    )));
    Ok((model, lora))
}

/// Runs `work` on rank 0, then, after a barrier, on the others: the latent and caption cache
/// lives beside the dataset (or in its `cache_dir`), where rank 0 fills it and the others
/// then find every entry made.
fn rank_0_first<T>(
    exchange: &mut dyn GradientExchange,
    work: impl FnOnce() -> Result<T>,
) -> Result<T> {
    if exchange.rank() == 0 {
        let done = work()?;
        exchange.barrier()?;
        Ok(done)
    } else {
        exchange.barrier()?;
        work()
    }
}

/// Every worker resumed at the same step (a folder read differently on another machine
/// would have each train from its own point). The step goes through the exchange as
/// step / 4096 and step mod 4096, whole numbers exact in f32; where the workers' values
/// differ, their mean lies at least 1/N above the smallest, so that worker fails, and the
/// group with it.
fn agree_on_step(exchange: &mut dyn GradientExchange, step: u64, device: &Device) -> Result<()> {
    let workers = exchange.world_size();
    if workers == 1 {
        return Ok(());
    }
    let parts = [(step >> 12) as f32, (step & 0xfff) as f32];
    let mine = Tensor::new(&parts, device)?;
    let mean = mean_in_one_call(exchange, vec![mine])?;
    let mean = host::read(&mean[0])?;
    if parts
        .iter()
        .zip(&mean)
        .any(|(p, m)| (p - m).abs() > 0.25 / workers as f32)
    {
        return Err(Error::Invalid(format!(
            "--resume: worker {} resumed at step {step} but the others from another checkpoint: every worker must see the same output folder (a shared filesystem)",
            exchange.rank()
        )));
    }
    Ok(())
}

/// Claims the output folder (locked for this run): a new or empty folder, or with --force
/// one zlora made, or a run of zlora's that stopped before its first checkpoint (nothing
/// to lose: it starts over); with --resume one with a checkpoint whose config matches.
fn prepare_output(
    cfg: &TrainConfig,
    opts: &TrainOptions,
    events: &mut dyn FnMut(Event),
) -> Result<OutputDir> {
    let out = outdir::resolve(&cfg.train.output)?;
    let model = Path::new(&cfg.model.path);
    let mut inputs = Vec::new();
    for d in &cfg.datasets {
        inputs.push(("the dataset", d.path.as_path()));
        inputs.extend(d.masks.as_deref().map(|m| ("the masks", m)));
    }
    inputs.push(("the model", model));
    inputs.extend(opts.config_file.as_deref().map(|c| ("the config file", c)));
    inputs.extend(
        cfg.model
            .transformer
            .as_deref()
            .map(|t| ("the transformer", t)),
    );
    inputs.extend(
        cfg.model
            .training_adapter
            .as_deref()
            .map(|a| ("the training adapter", a)),
    );
    outdir::refuse_inputs(&out, &inputs)?;
    let policy = if opts.resume {
        Policy::Keep
    } else if opts.force || never_checkpointed(&out)? {
        Policy::Replace
    } else if outdir::has_files(&out)? {
        return Err(if outdir::is_zloras(&out) {
            Error::bad_file(
                &out,
                "output folder exists (use --resume to continue it or --force to start over)",
            )
        } else {
            outdir::not_zloras(&out)
        });
    } else {
        Policy::Keep
    };
    let claimed = OutputDir::claim(&out, "train", &inputs, policy)?;
    let partials = state::remove_partials(claimed.path())?;
    if claimed.cleaned + partials > 0 {
        events(Event::Message(format!(
            "removed {} temporary files and {partials} unfinished checkpoints left by a killed run",
            claimed.cleaned
        )));
    }
    if opts.resume {
        check_resumable(claimed.path(), cfg, opts, events)?;
    }
    Ok(claimed)
}

/// A training folder of zlora's with no checkpoint: a run that failed or was stopped early.
fn never_checkpointed(out: &Path) -> Result<bool> {
    Ok(outdir::made_by(out).as_deref() == Some("train") && state::complete(out)?.is_empty())
}

/// A resume needs a checkpoint, and the config it was made with must match (resume.rs).
fn check_resumable(
    out: &Path,
    cfg: &TrainConfig,
    opts: &TrainOptions,
    events: &mut dyn FnMut(Event),
) -> Result<()> {
    let Some(saved) = state::newest_state(out)? else {
        return Err(Error::bad_file(
            out,
            "--resume: no checkpoint in this output folder (the run stopped before its first one): run without --resume to start it over",
        ));
    };
    let Some(saved) = saved.config else {
        events(Event::Message(
            "the checkpoint predates saved configs: the config is not compared".into(),
        ));
        return Ok(());
    };
    for change in resume::check_changes(&saved, cfg, &opts.allow_changes)? {
        events(Event::Message(format!("changed on resume: {change}")));
    }
    Ok(())
}

/// Restores the newest checkpoint that reads; a damaged one is reported and the one
/// before it tried.
fn load_newest_good(
    out: &Path,
    lora: &TrainableLora,
    optimizer: &mut Optimizer,
    mut ema: Option<&mut Ema>,
    events: &mut dyn FnMut(Event),
) -> Result<RunState> {
    for (_, dir) in state::complete(out)?.into_iter().rev() {
        match state::load(&dir, lora, optimizer, ema.as_deref_mut()) {
            Ok(run) => {
                events(Event::Message(format!(
                    "resumed from {} (step {})",
                    dir.display(),
                    run.step
                )));
                return Ok(run);
            }
            Err(e) => events(Event::Message(format!(
                "checkpoint {} is damaged ({e}); falling back to the one before it",
                dir.display()
            ))),
        }
    }
    Err(Error::bad_file(
        state::checkpoints_dir(out),
        "--resume: no checkpoint could be read (each damaged one is listed above)",
    ))
}

/// Where the last good checkpoint is, or that there is none.
fn kept_checkpoint(out: &Path) -> Result<String> {
    Ok(match state::latest(out)? {
        Some((_, dir)) => format!("the last good checkpoint is kept in {}", dir.display()),
        None => "no checkpoint was written before it".into(),
    })
}

fn base_dtype(cfg: &TrainConfig) -> DType {
    if cfg.model.base_dtype == "f32" {
        DType::F32
    } else {
        DType::BF16
    }
}

fn prepare_data(
    cfg: &TrainConfig,
    folder: &ModelFolder,
    device: &Device,
    events: &mut dyn FnMut(Event),
) -> Result<CachedDataset> {
    let tokenizer = PromptTokenizer::from_file(&folder.root().join("tokenizer/tokenizer.json"))?;
    let vae_cfg = crate::model::vae::VaeConfig::from_file(&folder.root().join("vae/config.json"))?;
    let limits = ImageLimits::of_folder(folder, device)?;
    let mut datasets = Vec::with_capacity(cfg.datasets.len());
    for d in &cfg.datasets {
        let buckets = d.buckets(vae_cfg.spatial_factor())?;
        for b in &buckets {
            limits.check_buckets(b)?;
        }
        let (dataset, report) = Dataset::scan(d, &buckets, &tokenizer)?;
        events(Event::Message(report.to_string()));
        if report.is_fatal() {
            return Err(Error::bad_file(
                &d.path,
                "the dataset check found problems (listed above); nothing was trained",
            ));
        }
        datasets.push(dataset);
    }
    let opts = CacheOptions {
        // bf16 on a GPU (Qwen3-4B in f32 would take 16 GB), f32 on the CPU.
        dtype: crate::device::default_dtype(device),
        device: device.clone(),
        quantize_text_encoder: cfg.model.quantize_text_encoder,
        class: cfg.train.preservation.as_ref().map(|p| p.class.clone()),
    };
    let (data, stats) = CachedDataset::build(&datasets, folder, &opts, |stage, done, total| {
        events(Event::Cache { stage, done, total })
    })?;
    events(Event::Message(format!(
        "cache: {} captions and {} images encoded, {} and {} reused{}",
        stats.captions_encoded,
        stats.latents_encoded,
        stats.captions_reused,
        stats.latents_reused,
        if stats.masks_made + stats.masks_reused > 0 {
            format!(
                "; {} masks made, {} reused",
                stats.masks_made, stats.masks_reused
            )
        } else {
            String::new()
        }
    )));
    Ok(data)
}

/// Applies the training adapter frozen, as its own adapter on each Linear (not merged: the
/// base stays exact and the adapter can be switched off for samples).
fn attach_training_adapter(
    cfg: &TrainConfig,
    model: &mut ZImageTransformer,
    events: &mut dyn FnMut(Event),
) -> Result<()> {
    let Some(path) = &cfg.model.training_adapter else {
        return Ok(());
    };
    let file = LoraFile::read_for_dim(path, model.config().dim)?;
    let n = file.attach_named(TRAINING_ADAPTER, cfg.model.training_adapter_strength, model)?;
    events(Event::Message(format!(
        "training adapter {} applied at strength {} to {n} modules (frozen, not saved, off for samples)",
        path.display(),
        cfg.model.training_adapter_strength
    )));
    Ok(())
}

/// A stream of randomness for one micro-batch of one step, independent of everything before
/// it: a resumed run draws exactly what an uninterrupted one would.
fn step_rng(seed: u64, step: u64, micro: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(step.wrapping_mul(1024).wrapping_add(micro as u64));
    rng
}

/// What one optimizer step reports.
struct StepDone {
    loss: f32,
    preservation_loss: Option<f32>,
    grad_norm: f64,
    lr: f64,
    /// Some worker was asked to stop: every worker stops after this step.
    stop: bool,
}

/// This worker's part of every global batch: `per_worker` items from position
/// `rank · per_worker`.
#[derive(Debug, Clone, Copy)]
struct Share {
    rank: usize,
    workers: usize,
    per_worker: usize,
}

impl Share {
    fn new(batch_size: usize, exchange: &dyn GradientExchange) -> Result<Self> {
        let workers = exchange.world_size();
        if workers == 0 || !batch_size.is_multiple_of(workers) {
            return Err(Error::Invalid(format!(
                "[train] batch_size = {batch_size} is the global batch, split evenly among the {workers} workers: set it to a multiple of {workers}"
            )));
        }
        Ok(Self {
            rank: exchange.rank(),
            workers,
            per_worker: batch_size / workers,
        })
    }

    /// Its items of a global batch of `items` (an epoch's last batch may be short, leaving
    /// the last workers fewer items or none).
    fn range(&self, items: usize) -> Range<usize> {
        let start = (self.rank * self.per_worker).min(items);
        start..(start + self.per_worker).min(items)
    }

    /// What this worker's losses and gradients (means over its items) are multiplied by so
    /// that their mean over the workers is the mean over the global batch's items:
    /// workers · share / items (1 for a full batch).
    fn weight(&self, items: usize) -> f64 {
        (self.workers * self.range(items).len()) as f64 / items as f64
    }
}

/// What every micro-batch of the run shares.
struct StepContext<'a> {
    cfg: &'a TrainConfig,
    lora: &'a TrainableLora,
    data: &'a CachedDataset,
    device: &'a Device,
    share: Share,
    sigmas: SigmaSampler,
}

impl<'a> StepContext<'a> {
    fn new(
        cfg: &'a TrainConfig,
        lora: &'a TrainableLora,
        data: &'a CachedDataset,
        device: &'a Device,
        share: Share,
    ) -> Self {
        let t = &cfg.train;
        let sigmas = SigmaSampler {
            sampling: t.timestep_sampling,
            shift: t.timestep_shift,
            logit_mean: t.logit_mean,
            logit_std: t.logit_std,
        };
        Self {
            cfg,
            lora,
            data,
            device,
            share,
            sigmas,
        }
    }
}

/// One optimizer step: this worker's micro-batches, then ONE exchange of the gradients, the
/// loss sums and the stop flag, then clipping and the optimizer, the same on every worker.
fn optimizer_step(
    ctx: &StepContext,
    model: &mut ZImageTransformer,
    optimizer: &mut Optimizer,
    loader: &mut Loader,
    exchange: &mut dyn GradientExchange,
    step: u64,
    stop: Option<&AtomicBool>,
) -> Result<StepDone> {
    let t = &ctx.cfg.train;
    let local = accumulate(ctx, model, loader, step)?;
    // Read after this worker's forward and backward passes, the bulk of the step; its mean
    // over the workers is above 0 when any of them was asked to stop.
    let stop = stop.is_some_and(|s| s.load(Ordering::SeqCst));
    let stop = Tensor::new(f32::from(u8::from(stop)), ctx.device)?;
    // [loss sum, stop flag, preservation loss sum (with preservation)].
    let mut numbers = vec![local.loss, stop];
    numbers.extend(local.preservation);
    let mut exchanged = local.grads;
    exchanged.push(Tensor::stack(&numbers, 0)?);
    let mut grads = mean_in_one_call(exchange, exchanged)?;
    let numbers = grads
        .pop()
        .ok_or_else(|| Error::Invalid("the gradient exchange lost the step's losses".into()))?;
    let grad_norm = clip_grad_norm(&mut grads, t.max_grad_norm)?;
    let lr = learning_rate(
        t.learning_rate,
        t.lr_schedule,
        t.warmup_steps,
        step,
        t.steps,
    );
    optimizer.step(&ctx.lora.vars(), &grads, lr)?;
    // The step's one device→host read: its gradient norm, loss sums and stop flag together.
    let read = host::read(&Tensor::cat(&[grad_norm.reshape(1)?, numbers], 0)?)?;
    let n = t.gradient_accumulation as f32;
    let preservation_loss = t.preservation.as_ref().map(|_| read[3] / n);
    Ok(StepDone {
        // The loss the step minimised: the flow-matching loss plus the preservation term.
        loss: read[1] / n + preservation_loss.unwrap_or(0.0),
        preservation_loss,
        grad_norm: read[0] as f64,
        lr,
        stop: read[2] > 0.0,
    })
}

/// A worker's step before the exchange: its gradients averaged over the micro-batches, and
/// its loss sums (0-d, on the device), all weighted by its share of each global batch.
struct Accumulated {
    grads: Vec<Tensor>,
    loss: Tensor,
    /// With differential output preservation.
    preservation: Option<Tensor>,
}

fn accumulate(
    ctx: &StepContext,
    model: &mut ZImageTransformer,
    loader: &mut Loader,
    step: u64,
) -> Result<Accumulated> {
    let t = &ctx.cfg.train;
    let mut total: Option<Vec<Tensor>> = None;
    let mut loss_sum = Summed::default();
    let mut preservation_sum = Summed::default();
    for micro in 0..t.gradient_accumulation {
        let Some(losses) = micro_batch(ctx, model, loader, step, micro)? else {
            continue;
        };
        loss_sum.add(losses.main)?;
        if let Some(loss) = losses.preservation {
            preservation_sum.add(loss)?;
        }
        total = Some(match total {
            None => losses.grads,
            Some(acc) => add_grads(&acc, &losses.grads)?,
        });
    }
    let n = t.gradient_accumulation as f64;
    // A worker whose share of every global batch of the step was empty contributes zeros.
    let grads: candle_core::Result<Vec<Tensor>> = match total {
        Some(total) => total.into_iter().map(|g| g / n).collect(),
        None => ctx.lora.vars().iter().map(|v| v.zeros_like()).collect(),
    };
    Ok(Accumulated {
        grads: grads.map_err(Error::from)?,
        loss: loss_sum.or_zero(ctx.device)?,
        preservation: t
            .preservation
            .as_ref()
            .map(|_| preservation_sum.or_zero(ctx.device))
            .transpose()?,
    })
}

/// The losses and gradients of this worker's share of the next global batch, weighted by
/// [`Share::weight`]; None when its share is empty. The randomness is drawn as for the
/// whole batch (every σ, then the noise item after item) and this share's part taken, so
/// each item gets what it gets in a one-worker run.
fn micro_batch(
    ctx: &StepContext,
    model: &mut ZImageTransformer,
    loader: &mut Loader,
    step: u64,
    micro: usize,
) -> Result<Option<Losses>> {
    let t = &ctx.cfg.train;
    let plan = loader.next_plan();
    let items = plan.indices.len();
    let range = ctx.share.range(items);
    let mut rng = step_rng(t.seed, step, micro);
    let sigmas: Vec<f32> = (0..items).map(|_| ctx.sigmas.sample(&mut rng)).collect();
    if range.is_empty() {
        return Ok(None);
    }
    let batch = plan.share(range.clone()).load(ctx.data, ctx.device)?;
    let per_item = batch.latents.elem_count() / range.len();
    skip_gaussians(&mut rng, range.start * per_item);
    let eps = gaussian_like(&batch.latents, &mut rng)?;
    let sigmas = &sigmas[range];
    let noised = noise(&batch.latents, &eps, sigmas)?;
    let (weights, pixel_weights) = loss_weights(ctx.cfg, ctx.data, &batch, sigmas)?;
    let micro_batch = MicroBatch {
        x: &noised.x,
        t: &noised.t,
        captions: &batch.captions,
        target: &noised.target,
        weights: &weights,
        pixel_weights: pixel_weights.as_ref(),
    };
    let class_captions = match &t.preservation {
        Some(_) => class_features(&batch.indices, ctx.data, ctx.device)?,
        None => Vec::new(),
    };
    let class = t.preservation.as_ref().map(|p| ClassCaptions {
        captions: &class_captions,
        weight: p.weight,
    });
    let losses = loss_and_grads_with(
        model,
        ctx.lora,
        &micro_batch,
        class.as_ref(),
        t.gradient_checkpointing,
    )?;
    weighted(losses, ctx.share.weight(items)).map(Some)
}

/// The losses and gradients times `w` (untouched at 1: a full batch, or one worker).
fn weighted(losses: Losses, w: f64) -> Result<Losses> {
    if w == 1.0 {
        return Ok(losses);
    }
    Ok(Losses {
        main: (losses.main * w)?,
        preservation: losses.preservation.map(|p| p * w).transpose()?,
        grads: losses
            .grads
            .into_iter()
            .map(|g| g * w)
            .collect::<candle_core::Result<_>>()?,
    })
}

/// The items' class caption features. They are never dropped by caption dropout: the prior
/// is the class prompt's, whatever the main caption.
fn class_features(items: &[usize], data: &CachedDataset, device: &Device) -> Result<Vec<Tensor>> {
    items
        .iter()
        .map(|&i| data.class_caption(i, device))
        .collect()
}

/// A running sum of 0-d losses, left on the device.
#[derive(Default)]
struct Summed(Option<Tensor>);

impl Summed {
    fn add(&mut self, loss: Tensor) -> Result<()> {
        self.0 = Some(match self.0.take() {
            None => loss,
            Some(sum) => (sum + loss)?,
        });
        Ok(())
    }

    /// The sum, 0 when nothing was added (a worker with no items in the step).
    fn or_zero(self, device: &Device) -> Result<Tensor> {
        match self.0 {
            Some(sum) => Ok(sum),
            None => Ok(Tensor::zeros((), DType::F32, device)?),
        }
    }
}

/// The batch's loss weights: per item, the σ weighting times its dataset's `loss_weight`;
/// per pixel, its mask clamped to its dataset's `unmasked_weight` (None without masks).
fn loss_weights(
    cfg: &TrainConfig,
    data: &CachedDataset,
    batch: &Batch,
    sigmas: &[f32],
) -> Result<(Vec<f32>, Option<Tensor>)> {
    let sources: Vec<&DatasetConfig> = batch
        .indices
        .iter()
        .map(|&i| &cfg.datasets[data.items()[i].source])
        .collect();
    let weights = sigmas
        .iter()
        .zip(&sources)
        .map(|(&s, d)| cfg.train.loss_weighting.weight(s) * d.loss_weight as f32)
        .collect();
    let floors: Vec<f32> = sources.iter().map(|d| d.unmasked_weight as f32).collect();
    let pixel_weights = batch
        .masks
        .as_ref()
        .map(|m| mask_weights(m, &floors))
        .transpose()?;
    Ok((weights, pixel_weights))
}

fn sample_now(
    sampler: &Sampler,
    model: &mut ZImageTransformer,
    // The EMA to sample from with `[sample] ema`, and the LoRA it stands in for.
    (ema, lora): (Option<&Ema>, &TrainableLora),
    step: u64,
    out: &Path,
    events: &mut dyn FnMut(Event),
) -> Result<PathBuf> {
    set_enabled(model, TRAINING_ADAPTER, false);
    let render = || sampler.render(model, step, out);
    let result = match ema {
        Some(ema) => ema.swapped_in(lora, render),
        None => render(),
    };
    set_enabled(model, TRAINING_ADAPTER, true);
    let path = result?;
    events(Event::Samples(&path));
    Ok(path)
}

/// Writes the trained LoRA in the layout that loads everywhere, with its metadata.
struct LoraWriter<'a> {
    cfg: &'a TrainConfig,
    mode: Mode,
}

impl LoraWriter<'_> {
    fn write(&self, lora: &TrainableLora, step: u64, path: &Path) -> Result<()> {
        let cfg = self.shared_config();
        let training = json!({
            "mode": self.mode.name(),
            "base_model": cfg.model.path,
            "variant": cfg.model.variant,
            "trigger": cfg.triggers().first(),
            "steps": step,
        });
        let config = toml::to_string(&cfg).map_err(|e| Error::Invalid(e.to_string()))?;
        let metadata = Metadata {
            base_model: Some(cfg.model.path.clone()),
            trigger_words: cfg.triggers(),
            title: None,
            carried: [
                ("zlora.training".to_string(), training.to_string()),
                ("zlora.config".to_string(), config),
            ]
            .into_iter()
            .collect(),
        };
        save(
            path,
            &lora.to_modules()?,
            Layout::AiToolkit,
            DType::F32,
            &metadata,
            true,
        )
    }

    /// The config as the file tells it: local paths cut to their last names unless
    /// `[output] embed_paths` (a repo id that is no local path stays as it is).
    fn shared_config(&self) -> TrainConfig {
        let mut cfg = self.cfg.clone();
        if cfg.output.embed_paths {
            return cfg;
        }
        let model = Path::new(&cfg.model.path);
        if model.is_absolute() || model.exists() {
            cfg.model.path = last_name(model).display().to_string();
        }
        cfg.model.training_adapter = cfg.model.training_adapter.as_deref().map(last_name);
        for d in &mut cfg.datasets {
            d.path = last_name(&d.path);
            d.cache_dir = d.cache_dir.as_deref().map(last_name);
            d.masks = d.masks.as_deref().map(last_name);
        }
        cfg.train.output = last_name(&cfg.train.output);
        cfg
    }
}

/// A path's last component (the path itself when it has none, like `/` or `..`).
fn last_name(p: &Path) -> PathBuf {
    p.file_name().map_or_else(|| p.to_path_buf(), PathBuf::from)
}
