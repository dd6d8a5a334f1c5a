//! `zlora plan`: before renting a GPU, what a training configuration needs — peak memory by
//! phase, whether it fits each GPU and what to change when it does not, FLOPs, time and cost
//! per GPU, the download set and the storage it occupies. Every figure is an estimate; its
//! basis is written next to it in docs/plan.md.

#[cfg(test)]
mod calibration;
pub mod dims;
pub mod flops;
pub mod gpus;
pub mod memory;
pub mod scaling;

use serde::Serialize;

use crate::data::buckets::Buckets;
use crate::data::dataset::Resolution;
use crate::hub::known;
use crate::model::config::SEQ_MULTI_OF;
use crate::nn::Quantization;
use crate::train::config::{Mode, TrainConfig};
use crate::Result;
use dims::{ModelDims, Source};
use flops::{Flops, Tokens};
use gpus::{Gpu, GpuTable};
use memory::{Phase, Profile, Run, SampleShape, Workload, GIB, MIB};
use scaling::{DataParallel, Scaling};

/// Z-Image's longest caption (its `max_sequence_length`), the worst case a plan assumes.
pub const MAX_CAPTION_TOKENS: usize = crate::model::text::DEFAULT_MAX_TOKENS;

/// A row width every format divides (the k-quants' block): a quantized weight's bytes per
/// value.
const QUANT_ROW: usize = 256;

#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// GPU names to estimate for (empty: the whole table).
    pub gpus: Vec<String>,
    pub table: GpuTable,
    /// Caption tokens per item, template included (before padding to 32).
    pub caption_tokens: usize,
    /// Download bandwidth in MB/s (10^6 bytes).
    pub bandwidth_mb_s: f64,
    /// Days the model is kept on a rented volume.
    pub storage_days: f64,
}

/// Everything `zlora plan` reports; the first three fields are the `--json` contract.
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub flops_per_step: f64,
    /// What must still be downloaded, GB (10^9 bytes).
    pub download_gb: f64,
    pub gpus: Vec<GpuEstimate>,
    pub model: String,
    pub mode: &'static str,
    pub workload: Workload,
    pub flops: Flops,
    /// zlora's GPU memory by phase (on CUDA).
    pub memory: Vec<Phase>,
    pub peak_memory_gib: f64,
    pub peak_phase: &'static str,
    /// What a PyTorch-class trainer (fused attention) would need, for comparison.
    pub pytorch_reference: Reference,
    /// zlora on this CPU: peak resident memory by phase.
    pub cpu: CpuEstimate,
    pub sampling: Option<SamplingCost>,
    pub downloads: Downloads,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GpuEstimate {
    pub name: String,
    pub label: String,
    pub memory_gib: f64,
    /// 10^9 bytes, as the contract names it; `peak_memory_gib` is the same in GiB.
    pub peak_memory_gb: f64,
    pub peak_memory_gib: f64,
    pub fits: bool,
    pub sustained_tflops: f64,
    /// Compute plus, under block swap, copying the swapped blocks in (not overlapped).
    pub seconds_per_step: f64,
    /// The part of a step that copies swapped blocks in over the host link.
    pub swap_seconds_per_step: f64,
    /// Training steps plus the samples taken during training.
    pub total_hours: f64,
    pub usd_per_hour: f64,
    pub cost_usd: f64,
    /// Hours the download takes at the plan's bandwidth, billed at this GPU's price when the
    /// model is fetched on the rented machine.
    pub download_hours: f64,
    /// When it does not fit: changes that make it fit, or the best combination.
    pub changes: Vec<Change>,
    /// Per base storage (bf16, fp8, int8, q8_0, q4_k): the least block swap that fits.
    pub fit: Vec<Fit>,
    /// With several GPUs: time and cost on 1, 2, 4, ... of them, and where more stop paying
    /// off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scaling: Option<Scaling>,
}

impl Fit {
    /// The `[model]` settings of this row, with the swap's time cost.
    fn setting(&self) -> String {
        let base = match self.base.as_str() {
            "bf16" => "base_dtype = \"bf16\"".to_string(),
            q => format!("quantize = \"{q}\", base_dtype = \"bf16\""),
        };
        let base = match self.quantize_text_encoder {
            Some(q) => format!("{base}, quantize_text_encoder = \"{q}\""),
            None => base,
        };
        match self.blocks_on_device {
            Some(n) => format!(
                "{base}, blocks_on_device = {n} ({} blocks swapped, +{:.2} s/step)",
                self.swapped_blocks, self.swap_seconds_per_step
            ),
            None => base,
        }
    }
}

/// One base storage on one GPU: the fewest swapped blocks that fit, and what it costs.
#[derive(Debug, Clone, Serialize)]
pub struct Fit {
    /// "bf16" or the quantization's name; computed in bf16.
    pub base: String,
    /// `[model] blocks_on_device` for that (None: no swap needed).
    pub blocks_on_device: Option<usize>,
    /// `[model] quantize_text_encoder`: the configuration's, or int8 when the text encoder
    /// in the compute dtype alone does not fit.
    pub quantize_text_encoder: Option<Quantization>,
    pub swapped_blocks: usize,
    pub peak_memory_gib: f64,
    /// False when even every main layer swapped does not fit.
    pub fits: bool,
    pub swap_seconds_per_step: f64,
    pub seconds_per_step: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Change {
    pub change: String,
    pub peak_memory_gib: f64,
    pub fits: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Reference {
    pub peak_memory_gib: f64,
    pub peak_phase: &'static str,
}

#[derive(Debug, Clone, Serialize)]
pub struct CpuEstimate {
    pub peak_rss_mib: f64,
    pub peak_phase: &'static str,
    pub phases: Vec<Phase>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SamplingCost {
    /// Sample grids during the run (one at step 0, then every `[sample] every` steps).
    pub grids: u64,
    /// Transformer forwards per grid (images × steps × 2 with guidance).
    pub forwards_per_grid: u64,
    pub flops: f64,
    /// Passes over the blocks (a swapped block is copied in once per pass).
    pub block_passes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Downloads {
    pub parts: Vec<DownloadPart>,
    /// All parts, present or not, GB.
    pub total_gb: f64,
    /// The parts not on this machine, GB.
    pub download_gb: f64,
    pub bandwidth_mb_s: f64,
    pub transfer_hours: f64,
    pub storage_days: f64,
    pub storage_usd: f64,
    pub storage_source: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct DownloadPart {
    pub what: String,
    pub repo: String,
    pub bytes: u64,
    pub basis: String,
    /// Already on this machine.
    pub present: bool,
}

/// The plan for `cfg` on one GPU.
pub fn plan(cfg: &TrainConfig, opts: &PlanOptions) -> Result<Plan> {
    plan_on(cfg, opts, &DataParallel::ONE)
}

/// The plan for `cfg`, with data-parallel training on `parallel`'s GPUs.
pub fn plan_on(cfg: &TrainConfig, opts: &PlanOptions, parallel: &DataParallel) -> Result<Plan> {
    let dims = ModelDims::for_config(cfg)?;
    let lora = dims.lora(&cfg.lora);
    let adapter = match &cfg.model.training_adapter {
        Some(path) => dims.adapter(path)?,
        None => Vec::new(),
    };
    let run = Run {
        dims: &dims,
        lora: &lora,
        adapter: &adapter,
    };
    let work = workload(cfg, &dims, opts.caption_tokens)?;
    let flops = flops::step(&run, &work);
    let defaults = &opts.table.defaults;
    let (context_bytes, slack) = (defaults.cuda_context_gib * GIB, defaults.allocator_slack);
    let gpu_profile = Profile::cuda(context_bytes, slack);
    let memory = memory::estimate(&run, &work, &gpu_profile);
    let (peak_phase, peak) = peak_of(&memory);
    let (reference_phase, reference_peak) = peak_of(&memory::estimate(
        &run,
        &work,
        &Profile::torch(context_bytes, slack),
    ));
    let cpu_profile = Profile::cpu(rayon::current_num_threads());
    let cpu_phases = memory::estimate(&run, &work, &cpu_profile);
    let (cpu_phase, cpu_peak) = peak_of(&cpu_phases);
    let sampling = sampling_cost(cfg, &run, &work);
    let downloads = downloads(cfg, &dims, opts)?;
    let mut per_gpu = Context {
        cfg,
        run: &run,
        opts,
        profile: &gpu_profile,
        flops: &flops,
        sampling: sampling.as_ref(),
        download_hours: downloads.transfer_hours,
        storages: Vec::new(),
    };
    per_gpu.storages = per_gpu.storage_peaks()?;
    let gpus = opts
        .table
        .select(&opts.gpus)?
        .iter()
        .map(|g| per_gpu.estimate(g, peak, parallel))
        .collect::<Result<_>>()?;
    Ok(Plan {
        flops_per_step: flops.per_step,
        download_gb: downloads.download_gb,
        gpus,
        model: describe(&dims, cfg),
        mode: cfg.mode().name(),
        notes: notes(&dims, &work),
        workload: work,
        flops,
        memory,
        peak_memory_gib: peak / GIB,
        peak_phase,
        pytorch_reference: Reference {
            peak_memory_gib: reference_peak / GIB,
            peak_phase: reference_phase,
        },
        cpu: CpuEstimate {
            peak_rss_mib: cpu_peak / MIB,
            peak_phase: cpu_phase,
            phases: cpu_phases,
        },
        sampling,
        downloads,
    })
}

fn peak_of(phases: &[Phase]) -> (&'static str, f64) {
    memory::peak(phases).map_or(("none", 0.0), |p| (p.name, p.total()))
}

fn round_up(n: usize) -> usize {
    n.div_ceil(SEQ_MULTI_OF) * SEQ_MULTI_OF
}

/// Image tokens of a `height`×`width` image: one per 2×2 latent patch, padded to 32.
fn image_tokens(height: usize, width: usize, vae_factor: usize) -> usize {
    let side = 2 * vae_factor;
    round_up((height / side) * (width / side))
}

/// The micro-batch of `cfg`: the bucket with the most tokens at the largest configured
/// resolution (with several, the peak is the largest one's; the others cost less).
pub fn workload(cfg: &TrainConfig, dims: &ModelDims, caption_tokens: usize) -> Result<Workload> {
    let factor = dims.vae_factor();
    let buckets = Buckets::for_vae(cfg.resolution(), factor)?;
    let largest = buckets
        .all()
        .iter()
        .max_by_key(|b| image_tokens(b.height as usize, b.width as usize, factor))
        .copied();
    let (h, w) = largest.map_or((0, 0), |b| (b.height as usize, b.width as usize));
    let t = &cfg.train;
    let compute_bytes = if cfg.model.base_dtype == "f32" {
        4.0
    } else {
        2.0
    };
    Ok(Workload {
        batch: t.batch_size,
        image_tokens: image_tokens(h, w, factor),
        caption_tokens: round_up(caption_tokens.max(1)),
        image_pixels: h * w,
        checkpointing: t.gradient_checkpointing,
        accumulation: t.gradient_accumulation,
        base_bytes: base_bytes(cfg.model.quantize, compute_bytes),
        compute_bytes,
        blocks_on_device: cfg.model.blocks_on_device,
        quantize_text_encoder: cfg.model.quantize_text_encoder,
        sample: sample_shape(cfg, factor),
        optimizer: t.optimizer_config(),
        ema: t.ema.is_some(),
        preservation: t.preservation.is_some(),
    })
}

/// One `zlora generate` image: its size, caption tokens, guidance and base storage.
#[derive(Debug, Clone, Copy)]
pub struct GenerationShape {
    pub width: usize,
    pub height: usize,
    pub caption_tokens: usize,
    pub guidance: bool,
    pub quantize: Option<Quantization>,
    pub blocks_on_device: Option<usize>,
    pub quantize_text_encoder: Option<Quantization>,
}

/// GPU memory of `zlora generate` by phase, in bf16 on CUDA with the table's context and
/// slack.
pub fn generation(dims: &ModelDims, shape: GenerationShape, table: &GpuTable) -> Vec<Phase> {
    let d = &table.defaults;
    let profile = Profile::cuda(d.cuda_context_gib * GIB, d.allocator_slack);
    let compute_bytes = 2.0;
    let work = Workload {
        batch: if shape.guidance { 2 } else { 1 },
        image_tokens: image_tokens(shape.height, shape.width, dims.vae_factor()),
        caption_tokens: round_up(shape.caption_tokens.max(1)),
        image_pixels: shape.height * shape.width,
        checkpointing: false,
        accumulation: 1,
        base_bytes: base_bytes(shape.quantize, compute_bytes),
        compute_bytes,
        blocks_on_device: shape.blocks_on_device,
        quantize_text_encoder: shape.quantize_text_encoder,
        sample: None,
        optimizer: Default::default(),
        ema: false,
        preservation: false,
    };
    let run = Run {
        dims,
        lora: &[],
        adapter: &[],
    };
    memory::generation(&run, &work, &profile)
}

/// Bytes per frozen weight: a quantized block weight's stored bytes per value (the blocks
/// hold all but a fraction of a percent of the weights), or the compute dtype's.
fn base_bytes(quantize: Option<Quantization>, compute_bytes: f64) -> f64 {
    match quantize {
        Some(q) => q.bytes(1, QUANT_ROW) as f64 / QUANT_ROW as f64,
        None => compute_bytes,
    }
}

fn sample_shape(cfg: &TrainConfig, factor: usize) -> Option<SampleShape> {
    let s = &cfg.sample;
    if s.every == 0 {
        return None;
    }
    let res = cfg.resolution() as usize;
    let (h, w) = (s.height.unwrap_or(res), s.width.unwrap_or(res));
    Some(SampleShape {
        pixels: h * w,
        image_tokens: image_tokens(h, w, factor),
        batch: if guidance(cfg) > 0.0 { 2 } else { 1 },
    })
}

fn guidance(cfg: &TrainConfig) -> f64 {
    cfg.sample.guidance.unwrap_or(cfg.mode().sampling().1)
}

/// The transformer forwards of the sample grids taken during training.
fn sampling_cost(cfg: &TrainConfig, run: &Run, work: &Workload) -> Option<SamplingCost> {
    let sample = work.sample?;
    let s = &cfg.sample;
    let grids = cfg.train.steps / s.every + 1;
    let steps = s.steps.unwrap_or(cfg.mode().sampling().0) as u64;
    let images = (s.prompts.len() * s.seeds.len()) as u64;
    let tokens = Tokens {
        batch: sample.batch,
        image: sample.image_tokens,
        caption: work.caption_tokens,
    };
    let forward = flops::forward(run, tokens, |_| true);
    Some(SamplingCost {
        grids,
        forwards_per_grid: images * steps * sample.batch as u64,
        flops: (grids * images * steps) as f64 * forward,
        // Guidance's two halves run as one batch: one pass over the blocks per step.
        block_passes: grids * images * steps,
    })
}

/// Bytes block swap copies in per training step: every swapped block once in each
/// micro-batch's forward and once in its backward (model/dit/swap.rs).
fn swap_bytes_per_step(run: &Run, work: &Workload) -> f64 {
    let passes = 2.0 * work.accumulation as f64;
    memory::swapped_blocks(run, work) as f64 * memory::block_weight_bytes(run, work) * passes
}

/// The base storages the fit table tries, cheapest in quality first; all computed in bf16.
const FIT_BASES: [Option<Quantization>; 5] = [
    None,
    Some(Quantization::Fp8),
    Some(Quantization::Int8),
    Some(Quantization::Q8_0),
    Some(Quantization::Q4K),
];

/// What the fit table stores the text encoder as when the configuration's storage of it
/// does not fit: 8 bits, which takes any width.
const FIT_TEXT_ENCODER: Quantization = Quantization::Int8;

/// One base storage with its GPU peak for every number of swapped blocks (index = swapped),
/// with the configuration's text encoder storage and, when that is dense, with
/// [`FIT_TEXT_ENCODER`].
struct StoragePeaks {
    base: Option<Quantization>,
    peaks: Vec<f64>,
    text_quantized_peaks: Option<Vec<f64>>,
    /// Bytes one swapped block copies per step.
    block_bytes_per_step: f64,
}

/// A run's time on one GPU, seconds: per training step its compute, block swap's copies and
/// the gradient exchange (none are overlapped); once per run the samples.
#[derive(Debug, Clone, Copy)]
struct RunTime {
    compute: f64,
    swap: f64,
    all_reduce: f64,
    sampling: f64,
}

impl RunTime {
    fn per_step(&self) -> f64 {
        self.compute + self.swap + self.all_reduce
    }

    fn hours(&self, steps: u64) -> f64 {
        (self.per_step() * steps as f64 + self.sampling) / 3600.0
    }
}

/// What one GPU estimate needs besides the GPU.
struct Context<'a> {
    cfg: &'a TrainConfig,
    run: &'a Run<'a>,
    opts: &'a PlanOptions,
    profile: &'a Profile,
    flops: &'a Flops,
    sampling: Option<&'a SamplingCost>,
    download_hours: f64,
    /// The fit table's peaks, the same for every GPU.
    storages: Vec<StoragePeaks>,
}

impl Context<'_> {
    fn estimate(&self, gpu: &Gpu, peak: f64, parallel: &DataParallel) -> Result<GpuEstimate> {
        let work = workload(self.cfg, self.run.dims, self.opts.caption_tokens)?;
        let time = self.time(gpu, &work, self.flops.per_step);
        let hours = time.hours(self.cfg.train.steps);
        let capacity = gpu.memory_gib * GIB;
        let fits = peak <= capacity;
        let fit = self.fit(capacity, time.compute, self.opts.table.host_link(gpu));
        Ok(GpuEstimate {
            name: gpu.name.clone(),
            label: gpu.label.clone(),
            memory_gib: gpu.memory_gib,
            peak_memory_gb: peak / 1e9,
            peak_memory_gib: peak / GIB,
            fits,
            sustained_tflops: self.opts.table.sustained(gpu) / 1e12,
            seconds_per_step: time.per_step(),
            swap_seconds_per_step: time.swap,
            total_hours: hours,
            usd_per_hour: gpu.usd_per_hour,
            cost_usd: hours * gpu.usd_per_hour,
            download_hours: self.download_hours,
            changes: if fits {
                Vec::new()
            } else {
                self.changes(capacity, &fit)?
            },
            fit,
            scaling: self.scaling(gpu, parallel)?,
        })
    }

    /// One `gpu`'s time for the run with micro-batches `work` and `flops_per_step`.
    fn time(&self, gpu: &Gpu, work: &Workload, flops_per_step: f64) -> RunTime {
        let sustained = self.opts.table.sustained(gpu);
        let link = self.opts.table.host_link(gpu);
        let sampling_swap = self.sampling.map_or(0.0, |s| {
            let per_pass = memory::swapped_blocks(self.run, work) as f64
                * memory::block_weight_bytes(self.run, work);
            s.block_passes as f64 * per_pass / link
        });
        RunTime {
            compute: flops_per_step / sustained,
            swap: swap_bytes_per_step(self.run, work) / link,
            all_reduce: 0.0,
            sampling: self.sampling.map_or(0.0, |s| s.flops / sustained) + sampling_swap,
        }
    }

    /// The configuration computed in bf16 with its base stored as `base`, `swapped` main
    /// layers swapped and the text encoder stored as `text` (None: the configuration's).
    fn with_storage(
        &self,
        base: Option<Quantization>,
        swapped: usize,
        text: Option<Quantization>,
    ) -> TrainConfig {
        let mut cfg = self.cfg.clone();
        cfg.model.base_dtype = "bf16".into();
        cfg.model.quantize = base;
        let layers = self.run.dims.transformer.n_layers;
        cfg.model.blocks_on_device = (swapped > 0).then(|| layers - swapped);
        cfg.model.quantize_text_encoder = text.or(cfg.model.quantize_text_encoder);
        cfg
    }

    /// One storage's peaks for 0..=L swapped blocks.
    fn peaks(&self, base: Option<Quantization>, text: Option<Quantization>) -> Result<Vec<f64>> {
        (0..=self.run.dims.transformer.n_layers)
            .map(|swapped| self.peak_of_config(&self.with_storage(base, swapped, text)))
            .collect()
    }

    /// Every fit-table storage's peaks.
    fn storage_peaks(&self) -> Result<Vec<StoragePeaks>> {
        let dense_text = self.cfg.model.quantize_text_encoder.is_none();
        FIT_BASES
            .iter()
            .map(|&base| {
                let work = workload(
                    &self.with_storage(base, 1, None),
                    self.run.dims,
                    self.opts.caption_tokens,
                )?;
                Ok(StoragePeaks {
                    base,
                    peaks: self.peaks(base, None)?,
                    text_quantized_peaks: if dense_text {
                        Some(self.peaks(base, Some(FIT_TEXT_ENCODER))?)
                    } else {
                        None
                    },
                    block_bytes_per_step: swap_bytes_per_step(self.run, &work),
                })
            })
            .collect()
    }

    /// The least swap that fits `capacity`, per storage, with its step time on a GPU that
    /// computes a step in `compute_seconds` and copies `link` bytes per second. The text
    /// encoder is stored quantized only when the configuration's storage of it fits with no
    /// number of swapped blocks (it runs in its own phase, which swap does not touch); a row
    /// that fits neither way reports the lower, quantized, peak.
    fn fit(&self, capacity: f64, compute_seconds: f64, link: f64) -> Vec<Fit> {
        let layers = self.run.dims.transformer.n_layers;
        let least = |peaks: &[f64]| peaks.iter().position(|&p| p <= capacity);
        self.storages
            .iter()
            .map(|s| {
                let configured = self.cfg.model.quantize_text_encoder;
                let (peaks, text, found) = match (least(&s.peaks), &s.text_quantized_peaks) {
                    (None, Some(q)) => (q, Some(FIT_TEXT_ENCODER), least(q)),
                    (found, _) => (&s.peaks, configured, found),
                };
                let swapped = found.unwrap_or(layers);
                let swap_seconds = swapped as f64 * s.block_bytes_per_step / link;
                Fit {
                    base: s.base.map_or("bf16".into(), |q| q.to_string()),
                    blocks_on_device: (swapped > 0).then(|| layers - swapped),
                    quantize_text_encoder: text,
                    swapped_blocks: swapped,
                    peak_memory_gib: peaks[swapped] / GIB,
                    fits: found.is_some(),
                    swap_seconds_per_step: swap_seconds,
                    seconds_per_step: compute_seconds + swap_seconds,
                }
            })
            .collect()
    }

    /// Single changes that make the run fit in `capacity` bytes; when none does, the fit
    /// table's storages that fit (a lighter base, block swap); when none does either, the
    /// changes applied one after another until it fits (or all of them).
    fn changes(&self, capacity: f64, fit: &[Fit]) -> Result<Vec<Change>> {
        let candidates = candidates(self.cfg);
        let mut fitting = Vec::new();
        for c in &candidates {
            let peak = self.peak_with(&[c])?;
            if peak <= capacity {
                fitting.push(change(c.label.clone(), peak, capacity));
            }
        }
        if !fitting.is_empty() {
            return Ok(fitting);
        }
        let stored: Vec<Change> = fit
            .iter()
            .filter(|f| f.fits)
            .map(|f| change(f.setting(), f.peak_memory_gib * GIB, capacity))
            .collect();
        if !stored.is_empty() {
            return Ok(stored);
        }
        let mut applied: Vec<&Candidate> = Vec::new();
        let mut peak = f64::INFINITY;
        for c in &candidates {
            // A smaller resolution replaces a larger one rather than adding to it.
            applied.retain(|a| a.key != c.key);
            applied.push(c);
            peak = self.peak_with(&applied)?;
            if peak <= capacity {
                break;
            }
        }
        let label = applied
            .iter()
            .map(|c| c.label.as_str())
            .collect::<Vec<_>>()
            .join(" + ");
        Ok(vec![change(label, peak, capacity)])
    }

    /// The GPU peak with `changes` applied to the configuration.
    fn peak_with(&self, changes: &[&Candidate]) -> Result<f64> {
        let mut cfg = self.cfg.clone();
        for c in changes {
            (c.apply)(&mut cfg);
        }
        self.peak_of_config(&cfg)
    }

    fn peak_of_config(&self, cfg: &TrainConfig) -> Result<f64> {
        let work = workload(cfg, self.run.dims, self.opts.caption_tokens)?;
        let lora = self.run.dims.lora(&cfg.lora);
        let run = Run {
            lora: &lora,
            ..*self.run
        };
        Ok(peak_of(&memory::estimate(&run, &work, self.profile)).1)
    }
}

fn change(label: String, peak: f64, capacity: f64) -> Change {
    Change {
        change: label,
        peak_memory_gib: peak / GIB,
        fits: peak <= capacity,
    }
}

/// One way to lower memory.
struct Candidate {
    /// What it changes: candidates with the same key are alternatives.
    key: &'static str,
    label: String,
    apply: Box<dyn Fn(&mut TrainConfig)>,
}

/// The changes worth trying, cheapest in quality first.
fn candidates(cfg: &TrainConfig) -> Vec<Candidate> {
    let mut out = Vec::new();
    let t = &cfg.train;
    if !t.gradient_checkpointing {
        out.push(candidate(
            "checkpointing",
            "gradient_checkpointing = true",
            |c| c.train.gradient_checkpointing = true,
        ));
    }
    if t.batch_size > 1 {
        let (b, acc) = (t.batch_size, t.gradient_accumulation);
        out.push(candidate(
            "batch",
            &format!("batch_size = 1, gradient_accumulation = {}", b * acc),
            move |c| {
                c.train.batch_size = 1;
                c.train.gradient_accumulation = b * acc;
            },
        ));
    }
    if cfg.model.quantize_text_encoder.is_none() {
        let label = format!("quantize_text_encoder = \"{FIT_TEXT_ENCODER}\"");
        out.push(candidate("text_encoder", &label, |c| {
            c.model.quantize_text_encoder = Some(FIT_TEXT_ENCODER)
        }));
    }
    if cfg.model.base_dtype == "f32" {
        out.push(candidate("dtype", "base_dtype = \"bf16\"", |c| {
            c.model.base_dtype = "bf16".into()
        }));
    }
    for res in [768, 512] {
        if cfg.resolution() > res {
            out.push(candidate(
                "resolution",
                &format!("resolution = {res}"),
                move |c| {
                    for d in &mut c.datasets {
                        d.resolution = Resolution::One(res);
                    }
                },
            ));
        }
    }
    if cfg.model.quantize.is_none() {
        out.push(Candidate {
            key: "dtype",
            label: "an 8-bit base computed in bf16: quantize = \"int8\" (or \"q8_0\"), \
                    base_dtype = \"bf16\""
                .into(),
            apply: Box::new(|c| {
                c.model.base_dtype = "bf16".into();
                c.model.quantize = Some(crate::nn::Quantization::Int8);
            }),
        });
    }
    out
}

fn candidate(
    key: &'static str,
    label: &str,
    apply: impl Fn(&mut TrainConfig) + 'static,
) -> Candidate {
    Candidate {
        key,
        label: label.to_string(),
        apply: Box::new(apply),
    }
}

/// The files training needs, with sizes, and which are already here.
fn downloads(cfg: &TrainConfig, dims: &ModelDims, opts: &PlanOptions) -> Result<Downloads> {
    let mut parts: Vec<DownloadPart> = match &dims.source {
        Source::Local { root, bytes } => vec![DownloadPart {
            what: "model (transformer, text encoder, VAE)".into(),
            repo: root.display().to_string(),
            bytes: *bytes,
            basis: "the local folder's weight files".into(),
            present: true,
        }],
        Source::BuiltIn => known::variant_parts(cfg.model.variant)
            .into_iter()
            .map(part)
            .collect(),
    };
    if let Some(path) = &cfg.model.training_adapter {
        parts.push(match std::fs::metadata(path) {
            Ok(meta) => DownloadPart {
                what: "training adapter".into(),
                repo: path.display().to_string(),
                bytes: meta.len(),
                basis: "the local file".into(),
                present: true,
            },
            Err(_) => part(known::adapter_part()),
        });
    }
    if cfg.mode() == Mode::TurboDirect {
        parts.push(part(known::distill_patch_part()));
    }
    let total: u64 = parts.iter().map(|p| p.bytes).sum();
    let missing: u64 = parts.iter().filter(|p| !p.present).map(|p| p.bytes).sum();
    let storage = &opts.table.storage;
    Ok(Downloads {
        total_gb: total as f64 / 1e9,
        download_gb: missing as f64 / 1e9,
        bandwidth_mb_s: opts.bandwidth_mb_s,
        transfer_hours: missing as f64 / (opts.bandwidth_mb_s * 1e6) / 3600.0,
        storage_days: opts.storage_days,
        storage_usd: total as f64 / 1e9 * storage.usd_per_gb_month * opts.storage_days / 30.0,
        storage_source: storage.source.clone(),
        parts,
    })
}

/// A part to download, present when the local Hugging Face cache already holds it.
fn part(p: known::Part) -> DownloadPart {
    let cached = p.file.and_then(|f| known::cached(p.repo, f));
    DownloadPart {
        what: p.what.into(),
        repo: p.repo.into(),
        bytes: p.bytes,
        basis: match &cached {
            Some(path) => format!("in the Hugging Face cache: {}", path.display()),
            None => p.basis.into(),
        },
        present: cached.is_some(),
    }
}

fn describe(dims: &ModelDims, cfg: &TrainConfig) -> String {
    let t = &dims.transformer;
    let origin = match &dims.source {
        Source::Local { root, .. } => format!("local folder {}", root.display()),
        Source::BuiltIn => format!(
            "built-in Z-Image ({:?}; {} is not on this machine)",
            cfg.model.variant, cfg.model.path
        ),
    };
    format!(
        "{origin}: dim {}, {} refiner + {} main blocks, {:.3} B transformer parameters",
        t.dim,
        t.n_refiner_layers * 2,
        t.n_layers,
        dims.transformer_params as f64 / 1e9
    )
}

fn notes(dims: &ModelDims, work: &Workload) -> Vec<String> {
    let encoders = (dims.text_params + dims.vae_params) as f64 * 2.0 / GIB;
    vec![
        format!(
            "Image tokens are the largest bucket's at the configured resolution ({} per item); \
             caption tokens are {} per item (--caption-tokens, default Z-Image's maximum of \
             512, the worst case), padded to a multiple of 32.",
            work.image_tokens, work.caption_tokens
        ),
        format!(
            "zlora always caches: the text encoder and VAE run before the transformer is \
             loaded and are dropped, so they never share memory with training (together \
             they would add {encoders:.1} GiB in bf16)."
        ),
        "GPU memory is zlora's own CUDA path counted from its code (each block's tape for \
         the hand-written backward; attention probabilities recomputed in chunks of heads \
         once a block has more than 2^26 scores), with the working set measured on the CPU; \
         no GPU run has checked it yet. The CPU figure is the same model checked against \
         measured runs (docs/benchmarks.md). The PyTorch-class reference (flash attention) \
         is what ai-toolkit-like trainers need."
            .into(),
        "Seconds per step = FLOPs per step / (peak × efficiency) from the GPU table: an \
         estimate; small steps use a GPU less well than large ones."
            .into(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// examples/turbo-adapter.toml: Turbo + training adapter, rank 16, 1024 px, batch 1,
    /// checkpointing, samples every 250 steps; the model is not on disk (built-in dims).
    fn turbo_adapter() -> TrainConfig {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples/turbo-adapter.toml");
        TrainConfig::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn options(gpus: &[&str]) -> PlanOptions {
        PlanOptions {
            gpus: gpus.iter().map(|g| g.to_string()).collect(),
            table: GpuTable::built_in().unwrap(),
            caption_tokens: MAX_CAPTION_TOKENS,
            bandwidth_mb_s: 100.0,
            storage_days: 0.0,
        }
    }

    fn with(cfg: &TrainConfig, q: Option<Quantization>, on_device: Option<usize>) -> TrainConfig {
        let mut cfg = cfg.clone();
        cfg.model.base_dtype = "bf16".into();
        cfg.model.quantize = q;
        cfg.model.blocks_on_device = on_device;
        cfg
    }

    fn gpu(cfg: &TrainConfig, name: &str) -> GpuEstimate {
        plan(cfg, &options(&[name])).unwrap().gpus.remove(0)
    }

    /// Each row of a 12 GB card's fit table is the plan of that configuration: the same
    /// peak and swap time, it fits, and one block fewer swapped does not; a swapped block
    /// costs its weights' bytes twice per step (forward and backward) over the host link.
    #[test]
    fn the_fit_table_gives_each_base_the_least_swap_that_fits() {
        let cfg = turbo_adapter();
        let layers = 30;
        let rows = gpu(&cfg, "4070").fit;
        let names: Vec<&str> = rows.iter().map(|r| r.base.as_str()).collect();
        assert_eq!(names, ["bf16", "fp8", "int8", "q8_0", "q4_k"]);
        for row in &rows {
            let q = row.base.parse::<Quantization>().ok();
            assert!(row.fits, "{row:?}");
            // A 12 GB card holds the bf16 text encoder.
            assert_eq!(row.quantize_text_encoder, None);
            let planned = gpu(&with(&cfg, q, row.blocks_on_device), "4070");
            assert!(planned.fits, "{row:?}");
            assert!((planned.peak_memory_gib - row.peak_memory_gib).abs() < 1e-9);
            assert!((planned.swap_seconds_per_step - row.swap_seconds_per_step).abs() < 1e-9);
            if row.swapped_blocks > 0 {
                let one_fewer = layers - row.swapped_blocks + 1;
                assert!(
                    !gpu(&with(&cfg, q, Some(one_fewer)), "4070").fits,
                    "{row:?}"
                );
                let dims = ModelDims::for_config(&cfg).unwrap();
                let block: u64 = dims
                    .linears
                    .iter()
                    .filter(|l| l.path.starts_with("layers.0."))
                    .map(|l| l.params())
                    .sum();
                let bytes = 2.0 * row.swapped_blocks as f64 * block as f64 * base_bytes(q, 2.0);
                let expected = bytes / 16e9;
                assert!(
                    (row.swap_seconds_per_step - expected).abs() < 1e-9 * expected,
                    "{row:?}: {expected}"
                );
            }
        }
        // A 4-bit base fits without swapping; bf16 needs most blocks swapped.
        assert_eq!(rows[4].swapped_blocks, 0);
        assert!(rows[0].swapped_blocks > rows[2].swapped_blocks);
    }

    /// Issue 12's targets by the plan's count (docs/plan.md, "Low-VRAM targets").
    #[test]
    fn low_vram_targets_by_the_plans_count() {
        let cfg = turbo_adapter();
        for name in ["4070", "4060ti-8"] {
            for row in gpu(&cfg, name).fit {
                eprintln!("{name}: {row:?}");
            }
        }
        // 12 GB, 8-bit base: not without swap, with a third of the blocks swapped.
        let int8 = Some(Quantization::Int8);
        let resident = gpu(&with(&cfg, int8, None), "4070");
        eprintln!("int8, no swap: {:.2} GiB", resident.peak_memory_gib);
        assert!(!resident.fits);
        let row = &gpu(&cfg, "4070").fit[2];
        assert!(row.fits && row.swapped_blocks <= 10, "{row:?}");

        // 8 GB, q4_k + swap: with the bf16 text encoder, every block swapped still leaves
        // the caption encoding phase above 8 GiB; with its projections in int8 the run fits.
        let q4 = with(&cfg, Some(Quantization::Q4K), Some(0));
        let phases = |cfg: &TrainConfig| {
            let p = plan(cfg, &options(&["4060ti-8"])).unwrap();
            for phase in &p.memory {
                let te = cfg.model.quantize_text_encoder;
                let gib = phase.total() / GIB;
                eprintln!(
                    "q4_k, all swapped, text encoder {te:?}: {} {gib:.2} GiB",
                    phase.name
                );
            }
            p
        };
        let p = phases(&q4);
        assert!(!p.gpus[0].fits);
        assert_eq!(p.peak_phase, "caption encoding (cache)");
        let training = p.memory.iter().find(|ph| ph.name == "training").unwrap();
        assert!(training.total() < 8.0 * GIB);
        let mut q4_te = q4.clone();
        q4_te.model.quantize_text_encoder = Some(Quantization::Int8);
        let p = phases(&q4_te);
        assert!(p.gpus[0].fits);
        assert_eq!(p.peak_phase, "training");
        let caption = p
            .memory
            .iter()
            .find(|ph| ph.name.starts_with("caption"))
            .unwrap();
        assert!(caption.total() < 6.0 * GIB, "{caption:?}");
        // The fit table finds it: q4_k with the text encoder in int8 and the least swap that
        // fits, which is that configuration's plan; the bf16 text encoder fits no row.
        let fit = gpu(&cfg, "4060ti-8").fit;
        let row = &fit[4];
        assert!(
            row.fits && row.quantize_text_encoder == Some(Quantization::Int8),
            "{row:?}"
        );
        let mut planned = with(&cfg, Some(Quantization::Q4K), row.blocks_on_device);
        planned.model.quantize_text_encoder = row.quantize_text_encoder;
        let planned = gpu(&planned, "4060ti-8");
        assert!(planned.fits && (planned.peak_memory_gib - row.peak_memory_gib).abs() < 1e-9);
        assert!(fit
            .iter()
            .all(|r| !r.fits || r.quantize_text_encoder.is_some()));
        // The advice for the configuration as written names the text encoder's storage.
        let advice = gpu(&with(&cfg, Some(Quantization::Q4K), Some(0)), "4060ti-8").changes;
        eprintln!("advice: {advice:?}");
        assert!(
            advice
                .iter()
                .any(|c| c.fits && c.change == "quantize_text_encoder = \"int8\""),
            "{advice:?}"
        );

        // 8 GB, Turbo generation at 1024 px on q8_0: the same text encoder decides.
        let dims = ModelDims::built_in(crate::train::config::Variant::Turbo).unwrap();
        let table = GpuTable::built_in().unwrap();
        for text in [None, Some(Quantization::Int8), Some(Quantization::Q8_0)] {
            for on_device in [None, Some(0)] {
                let shape = GenerationShape {
                    width: 1024,
                    height: 1024,
                    caption_tokens: MAX_CAPTION_TOKENS,
                    guidance: false,
                    quantize: Some(Quantization::Q8_0),
                    blocks_on_device: on_device,
                    quantize_text_encoder: text,
                };
                let phases = generation(&dims, shape, &table);
                for phase in &phases {
                    eprintln!(
                        "generate q8_0, blocks on device {on_device:?}, text encoder {text:?}: \
                         {} {:.2} GiB",
                        phase.name,
                        phase.total() / GIB
                    );
                }
                let peak = peak_of(&phases);
                let fits = peak.1 <= 8.0 * GIB;
                assert_eq!(fits, text.is_some(), "{text:?} {on_device:?}: {peak:?}");
                if !fits {
                    assert_eq!(peak.0, "prompt encoding");
                }
            }
        }
    }
}
