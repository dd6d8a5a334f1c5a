//! `zlora train`: the three modes of the workflow on one loop.
//!
//! dataset → preflight → cache (text encoder, VAE, then dropped) → transformer (+ frozen
//! training adapter) + trainable LoRA → steps (flow matching, the optimizer) → checkpoints, samples →
//! `lora.safetensors`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::backprop::{loss_and_grads, MicroBatch};
use super::config::{Mode, TrainConfig};
use super::ema::Ema;
use super::host;
use super::log::StepLog;
use super::lora::{set_enabled, TrainableLora};
use super::objective::{gaussian_like, noise, SigmaSampler};
use super::optim::{clip_grad_norm, learning_rate, Optimizer};
use super::resume;
use super::samples::Sampler;
use super::state::{self, RunState};
use crate::data::buckets::Buckets;
use crate::data::cache::{CacheOptions, CachedDataset, Stage};
use crate::data::dataset::Dataset;
use crate::data::loader::{Loader, LoaderOptions, LoaderState};
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
    pub lora: PathBuf,
    pub steps: u64,
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
    folder.check_quantization(cfg.model.quantize)?;
    let mode = cfg.mode();
    let quantized = cfg
        .model
        .quantize
        .map(|q| format!(", blocks stored as {q}"));
    events(Event::Message(format!(
        "mode {} on {} ({}{})",
        mode.name(),
        folder.root().display(),
        crate::device::describe(&device, base_dtype(cfg)),
        quantized.unwrap_or_default()
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
        cfg.model.quantize,
    )?;
    attach_training_adapter(cfg, &mut model, events)?;
    let mut init_rng = ChaCha8Rng::seed_from_u64(cfg.train.seed);
    let lora = TrainableLora::new(&cfg.lora, &model, &mut init_rng)?;
    lora.attach(&mut model)?;
    events(Event::Message(format!(
        "training a rank-{} LoRA on {} modules ({} parameters)",
        cfg.lora.rank,
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
    let log = StepLog::open(&out.join("log.jsonl"), run.step, &device)?;
    let mut loader = Loader::for_cached(
        &data,
        LoaderOptions::new(&cfg.dataset, t.batch_size, t.seed),
        run.loader,
    )?;
    let writer = LoraWriter { cfg, mode };

    if run.step == 0 && cfg.sample.every > 0 {
        let from = (ema.as_ref().filter(|_| cfg.sample.ema), &lora);
        sample_now(&sampler, &mut model, from, 0, out, events)?;
    }
    while run.step < t.steps {
        let started = Instant::now();
        let step = run.step + 1;
        let (loss, grad_norm, lr) = optimizer_step(
            cfg,
            &model,
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
        let entry = log.append(
            step,
            loss,
            run.loss_ema.unwrap_or(0.0),
            lr,
            grad_norm,
            started.elapsed().as_secs_f64(),
        )?;
        events(Event::Step(&entry));
        if step.is_multiple_of(t.save_every) || step == t.steps {
            let dir = state::save(out, &run, &lora, &mut optimizer, ema.as_ref(), &|p| {
                writer.write(&lora, step, p)
            })?;
            events(Event::Checkpoint(&dir));
        }
        if step.is_multiple_of(cfg.sample.every) {
            let from = (ema.as_ref().filter(|_| cfg.sample.ema), &lora);
            sample_now(&sampler, &mut model, from, step, out, events)?;
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
    let mut inputs = vec![
        ("the dataset", cfg.dataset.path.as_path()),
        ("the model", model),
    ];
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
    let buckets = Buckets::for_vae(cfg.dataset.resolution, vae_cfg.spatial_factor())?;
    ImageLimits::of_folder(folder, device)?.check_buckets(&buckets)?;
    let (dataset, report) = Dataset::scan(&cfg.dataset, &buckets, &tokenizer)?;
    events(Event::Message(report.to_string()));
    if report.is_fatal() {
        return Err(Error::bad_file(
            &cfg.dataset.path,
            "the dataset check found problems (listed above); nothing was trained",
        ));
    }
    let opts = CacheOptions {
        dir: cfg.dataset.cache_dir(),
        // bf16 on a GPU (Qwen3-4B in f32 would take 16 GB), f32 on the CPU.
        dtype: crate::device::default_dtype(device),
        device: device.clone(),
    };
    let (data, stats) = CachedDataset::build(&dataset, folder, &opts, |stage, done, total| {
        events(Event::Cache { stage, done, total })
    })?;
    events(Event::Message(format!(
        "cache: {} captions and {} images encoded, {} and {} reused",
        stats.captions_encoded, stats.latents_encoded, stats.captions_reused, stats.latents_reused
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

#[allow(clippy::too_many_arguments)]
fn optimizer_step(
    cfg: &TrainConfig,
    model: &ZImageTransformer,
    lora: &TrainableLora,
    optimizer: &mut Optimizer,
    loader: &mut Loader,
    data: &CachedDataset,
    step: u64,
    device: &Device,
) -> Result<(f32, f64, f64)> {
    let t = &cfg.train;
    let sampler = SigmaSampler {
        sampling: t.timestep_sampling,
        shift: t.timestep_shift,
        logit_mean: t.logit_mean,
        logit_std: t.logit_std,
    };
    let mut total: Option<Vec<Tensor>> = None;
    let mut loss_sum: Option<Tensor> = None;
    for micro in 0..t.gradient_accumulation {
        let batch = loader.next_batch(data, device)?;
        let mut rng = step_rng(t.seed, step, micro);
        let sigmas: Vec<f32> = (0..batch.indices.len())
            .map(|_| sampler.sample(&mut rng))
            .collect();
        let eps = gaussian_like(&batch.latents, &mut rng)?;
        let noised = noise(&batch.latents, &eps, &sigmas)?;
        let weights: Vec<f32> = sigmas.iter().map(|&s| t.loss_weighting.weight(s)).collect();
        let micro_batch = MicroBatch {
            x: &noised.x,
            t: &noised.t,
            captions: &batch.captions,
            target: &noised.target,
            weights: &weights,
        };
        let (loss, grads) = loss_and_grads(model, lora, &micro_batch, t.gradient_checkpointing)?;
        loss_sum = Some(match loss_sum {
            None => loss,
            Some(sum) => (sum + loss)?,
        });
        total = Some(match total {
            None => grads,
            Some(acc) => acc
                .iter()
                .zip(&grads)
                .map(|(a, g)| a + g)
                .collect::<candle_core::Result<_>>()?,
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
    // The step's one device→host read: its loss sum and gradient norm together.
    let sum = loss_sum.ok_or_else(|| Error::Invalid("gradient_accumulation is 0".into()))?;
    let read = host::read(&Tensor::stack(&[sum, grad_norm], 0)?)?;
    let loss = read[0] / t.gradient_accumulation as f32;
    Ok((loss, read[1] as f64, lr))
}

fn sample_now(
    sampler: &Sampler,
    model: &mut ZImageTransformer,
    // The EMA to sample from with `[sample] ema`, and the LoRA it stands in for.
    (ema, lora): (Option<&Ema>, &TrainableLora),
    step: u64,
    out: &Path,
    events: &mut dyn FnMut(Event),
) -> Result<()> {
    set_enabled(model, TRAINING_ADAPTER, false);
    let render = || sampler.render(model, step, out);
    let result = match ema {
        Some(ema) => ema.swapped_in(lora, render),
        None => render(),
    };
    set_enabled(model, TRAINING_ADAPTER, true);
    let path = result?;
    events(Event::Samples(&path));
    Ok(())
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
            "trigger": cfg.dataset.trigger,
            "steps": step,
        });
        let config = toml::to_string(&cfg).map_err(|e| Error::Invalid(e.to_string()))?;
        let metadata = Metadata {
            base_model: Some(cfg.model.path.clone()),
            trigger_words: cfg.dataset.trigger.iter().cloned().collect(),
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
        cfg.dataset.path = last_name(&cfg.dataset.path);
        cfg.dataset.cache_dir = cfg.dataset.cache_dir.as_deref().map(last_name);
        cfg.train.output = last_name(&cfg.train.output);
        cfg
    }
}

/// A path's last component (the path itself when it has none, like `/` or `..`).
fn last_name(p: &Path) -> PathBuf {
    p.file_name().map_or_else(|| p.to_path_buf(), PathBuf::from)
}
