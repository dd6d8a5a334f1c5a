//! `zlora train`: the three modes of the workflow on one loop.
//!
//! dataset → preflight → cache (text encoder, VAE, then dropped) → transformer (+ frozen
//! training adapter) + trainable LoRA → steps (flow matching, the optimizer) → checkpoints, samples →
//! `lora.safetensors`.

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
use super::host;
use super::log::{Log, StepLog};
use super::lora::{set_enabled, TrainableLora};
use super::objective::{gaussian_like, mask_weights, noise, SigmaSampler};
use super::optim::{clip_grad_norm, learning_rate, Optimizer};
use super::preservation::{loss_and_grads_with, ClassCaptions};
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

/// PLACEHOLDER of branch `nccl`, so that the CLI's multi-GPU paths compile: branch `dp`'s
/// data-parallel `train_with` replaces it at merge. Until then only a world of one trains.
pub fn train_with(
    cfg: &TrainConfig,
    opts: &TrainOptions,
    exchange: &mut dyn super::exchange::GradientExchange,
    events: &mut dyn FnMut(Event),
) -> Result<Outcome> {
    if exchange.world_size() > 1 {
        return Err(Error::Invalid(
            "this build's trainer has no data-parallel training yet (branch dp)".into(),
        ));
    }
    train(cfg, opts, events)
}

pub fn train(
    cfg: &TrainConfig,
    opts: &TrainOptions,
    events: &mut dyn FnMut(Event),
) -> Result<Outcome> {
    let device = crate::device::select()?;
    let claimed = prepare_output(cfg, opts, events)?;
    let out = claimed.path();
    let folder = ModelFolder::open(&cfg.model.path)?;
    folder.check_storage(cfg.model.storage())?;
    let mode = cfg.mode();
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
        mode.name(),
        folder.root().display(),
        crate::device::describe(&device, base_dtype(cfg)),
        quantized.unwrap_or_default(),
        swapped.unwrap_or_default(),
        text.unwrap_or_default()
    )));

    // Checked from the checkpoint's header before any data is cached or weight loaded.
    let linears = folder.transformer_linear_shapes()?;
    cfg.lora
        .check_rank(linears.iter().map(|(p, s)| (p.as_str(), *s)))?;
    let data = prepare_data(cfg, &folder, &device, events)?;
    let sampler = Sampler::new(cfg, &folder, (&device, base_dtype(cfg)), &mut |w| {
        events(Event::Message(w.to_string()))
    })?;

    let mut model = folder.load_transformer(
        cfg.model.transformer.as_deref(),
        base_dtype(cfg),
        &device,
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
    }
    run.config = Some(toml::to_string(cfg).map_err(|e| Error::Invalid(e.to_string()))?);
    let mut log = Log::open(out, run.step, &device, cfg.log.tensorboard)?;
    let mut loader = Loader::for_cached(
        &data,
        LoaderOptions::new(&cfg.datasets, t.batch_size, t.seed),
        run.loader,
    )?;
    let writer = LoraWriter { cfg, mode };

    if run.step == 0 && cfg.sample.every > 0 {
        let from = (ema.as_ref().filter(|_| cfg.sample.ema), &lora);
        let grid = sample_now(&sampler, &mut model, from, 0, out, events)?;
        log.samples(0, &grid)?;
    }
    while run.step < t.steps {
        let started = Instant::now();
        let step = run.step + 1;
        let done = optimizer_step(
            cfg,
            &mut model,
            &lora,
            &mut optimizer,
            &mut loader,
            &data,
            step,
            &device,
        )?;
        if let Some(ema) = ema.as_mut() {
            ema.update(&lora.vars())?;
        }
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
        let entry = log.append(StepLog {
            step,
            loss,
            preservation_loss: done.preservation_loss,
            loss_smoothed: run.loss_ema.unwrap_or(0.0),
            lr: done.lr,
            grad_norm: done.grad_norm,
            step_seconds: started.elapsed().as_secs_f64(),
            peak_memory_mib: None,
            gpu_memory_mib: None,
        })?;
        events(Event::Step(&entry));
        let stopping =
            step < t.steps && opts.stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
        if step.is_multiple_of(t.save_every) || step == t.steps || stopping {
            let dir = state::save(out, &run, &lora, &mut optimizer, ema.as_ref(), &|p| {
                writer.write(&lora, step, p)
            })?;
            events(Event::Checkpoint(&dir));
        }
        if step.is_multiple_of(cfg.sample.every) {
            let from = (ema.as_ref().filter(|_| cfg.sample.ema), &lora);
            let grid = sample_now(&sampler, &mut model, from, step, out, events)?;
            log.samples(step, &grid)?;
        }
        if stopping {
            return Ok(Outcome {
                lora: state::checkpoint_dir(out, step).join("lora.safetensors"),
                steps: step,
                stopped: true,
            });
        }
    }
    let final_path = out.join("lora.safetensors");
    writer.write(&lora, run.step, &final_path)?;
    if let Some(ema) = &ema {
        let path = out.join(state::EMA_LORA);
        ema.swapped_in(&lora, || writer.write(&lora, run.step, &path))?;
    }
    Ok(Outcome {
        lora: final_path,
        steps: run.step,
        stopped: false,
    })
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
}

#[allow(clippy::too_many_arguments)]
fn optimizer_step(
    cfg: &TrainConfig,
    model: &mut ZImageTransformer,
    lora: &TrainableLora,
    optimizer: &mut Optimizer,
    loader: &mut Loader,
    data: &CachedDataset,
    step: u64,
    device: &Device,
) -> Result<StepDone> {
    let t = &cfg.train;
    let sampler = SigmaSampler {
        sampling: t.timestep_sampling,
        shift: t.timestep_shift,
        logit_mean: t.logit_mean,
        logit_std: t.logit_std,
    };
    let mut total: Option<Vec<Tensor>> = None;
    let mut loss_sum = Summed::default();
    let mut preservation_sum = Summed::default();
    for micro in 0..t.gradient_accumulation {
        let batch = loader.next_batch(data, device)?;
        let mut rng = step_rng(t.seed, step, micro);
        let sigmas: Vec<f32> = (0..batch.indices.len())
            .map(|_| sampler.sample(&mut rng))
            .collect();
        let eps = gaussian_like(&batch.latents, &mut rng)?;
        let noised = noise(&batch.latents, &eps, &sigmas)?;
        let (weights, pixel_weights) = loss_weights(cfg, data, &batch, &sigmas)?;
        let micro_batch = MicroBatch {
            x: &noised.x,
            t: &noised.t,
            captions: &batch.captions,
            target: &noised.target,
            weights: &weights,
            pixel_weights: pixel_weights.as_ref(),
        };
        let class_captions = match &t.preservation {
            Some(_) => class_features(&batch.indices, data, device)?,
            None => Vec::new(),
        };
        let class = t.preservation.as_ref().map(|p| ClassCaptions {
            captions: &class_captions,
            weight: p.weight,
        });
        let losses = loss_and_grads_with(
            model,
            lora,
            &micro_batch,
            class.as_ref(),
            t.gradient_checkpointing,
        )?;
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
    let mut grads: Vec<Tensor> = total
        .unwrap_or_default()
        .into_iter()
        .map(|g| g / n)
        .collect::<candle_core::Result<_>>()?;
    let grad_norm = clip_grad_norm(&mut grads, t.max_grad_norm)?;
    let lr = learning_rate(
        t.learning_rate,
        t.lr_schedule,
        t.warmup_steps,
        step,
        t.steps,
    );
    optimizer.step(&lora.vars(), &grads, lr)?;
    // The step's one device→host read: its loss sums and gradient norm together.
    let sum = loss_sum
        .0
        .ok_or_else(|| Error::Invalid("gradient_accumulation is 0".into()))?;
    let mut read = vec![sum, grad_norm];
    read.extend(preservation_sum.0.clone());
    let read = host::read(&Tensor::stack(&read, 0)?)?;
    let n = t.gradient_accumulation as f32;
    let preservation_loss = preservation_sum.0.map(|_| read[2] / n);
    Ok(StepDone {
        // The loss the step minimised: the flow-matching loss plus the preservation term.
        loss: read[0] / n + preservation_loss.unwrap_or(0.0),
        preservation_loss,
        grad_norm: read[1] as f64,
        lr,
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
