//! Peak memory of a training run, phase by phase: caption encoding, image encoding, loading,
//! training and sampling run one after the other (docs/training.md), so the peak is the
//! largest phase, not their sum.
//!
//! Each phase is a list of named items. The items and their formulas are the same for every
//! [`Profile`]; a profile says what the code that runs the step keeps: zlora's candle graph on
//! the CPU (counted from the model code, checked against measured RSS: docs/benchmarks.md) or a
//! PyTorch-class CUDA trainer (saved tensors of the diffusers block with fused attention; no
//! GPU run has checked it yet). docs/plan.md derives every coefficient.

use serde::Serialize;

use super::dims::{LowRank, ModelDims};
use crate::nn::attention::MAX_CHUNK_SCORES;
use crate::nn::Quantization;
use crate::train::optim::{OptimizerConfig, OptimizerKind};

/// One micro-batch and what else the run does.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Workload {
    pub batch: usize,
    /// Image tokens per item: the largest bucket's, padded to a multiple of 32.
    pub image_tokens: usize,
    /// Caption tokens per item, padded to a multiple of 32.
    pub caption_tokens: usize,
    /// Pixels of the largest bucket, which the VAE encodes.
    pub image_pixels: usize,
    pub checkpointing: bool,
    pub accumulation: usize,
    /// Bytes per frozen transformer weight: 4 (f32), 2 (bf16), about 1 (an 8-bit base) or
    /// less (a k-quant base).
    pub base_bytes: f64,
    /// Bytes per activation value: the compute dtype's, 4 (f32) or 2 (bf16).
    pub compute_bytes: f64,
    /// Block swap: main layers kept on the device (None: all of them).
    pub blocks_on_device: Option<usize>,
    /// How the text encoder's decoder-layer projections are stored (None: `encoder_bytes`).
    pub quantize_text_encoder: Option<Quantization>,
    pub sample: Option<SampleShape>,
    /// Decides the size of the optimizer's state.
    pub optimizer: OptimizerConfig,
    /// `[train] ema`: one more f32 copy of the LoRA.
    pub ema: bool,
    /// `[train] preservation`: a prior prediction and a second pass's gradients per
    /// micro-batch.
    pub preservation: bool,
}

/// One denoising forward of the samples taken during training.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SampleShape {
    pub pixels: usize,
    pub image_tokens: usize,
    /// 2 when classifier-free guidance runs the negative prompt alongside.
    pub batch: usize,
}

/// Bytes one block keeps per token for its backward, per unit of the width named.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Keeps {
    /// × dim.
    pub per_dim: f64,
    /// × FFN width.
    pub per_ffn: f64,
    /// × rank of each low-rank module (LoRA or adapter).
    pub lowrank_rank: f64,
    /// × heads · tokens², the attention probabilities and their intermediates.
    pub scores: f64,
}

/// What the code that runs the step keeps, beyond the shared formulas.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    pub name: &'static str,
    /// Activation bytes: None = the frozen weights' dtype (zlora computes in it).
    pub activation_bytes: Option<f64>,
    pub keeps: fn(f64) -> Keeps,
    /// The backward's own working set: the gradients alive at once, as a share of one
    /// block's per-token activations (its tape without the attention scores), plus bytes per
    /// attention score of one chunk of heads (the composed softmax backward's score-sized
    /// intermediates).
    pub backward_tokens: f64,
    pub backward_scores: f64,
    /// With f32 activations the attention runs nn::cpu's kernel, whose backward holds one
    /// head's f32 score gradient per thread instead of a chunk of heads' intermediates.
    pub f32_attention_kernel: bool,
    /// Threads that run the kernel's heads side by side (rayon's pool).
    pub kernel_threads: usize,
    /// Bytes per weight of the text encoder and VAE while caching, and of the sampling VAE.
    pub encoder_bytes: f64,
    /// Bytes per weight of the frozen training adapter (zlora loads adapters as f32).
    pub adapter_bytes: f64,
    /// Weight files stay mapped (resident) while they are copied in.
    pub maps_files: bool,
    /// Block swap moves swapped blocks' weights off this memory (a GPU's); on the CPU host
    /// and device are one memory, and the fetched copies only add to it.
    pub swaps_to_host: bool,
    /// Tensors of the VAE's widest stage alive at once at full resolution.
    pub vae_tensors: f64,
    /// Bytes per score of the VAE mid-block attention (0 for fused attention).
    pub vae_score_bytes: f64,
    /// Fixed cost: the CUDA context, or the process's own RSS.
    pub overhead_what: &'static str,
    pub overhead_bytes: f64,
    /// Allocator slack, as a share of everything else.
    pub slack: f64,
}

impl Profile {
    /// zlora on the CPU with `threads` worker threads: the blocks' tapes
    /// (model/dit/backward.rs). Fitted to measured runs (`measured_memory.csv`,
    /// docs/benchmarks.md): the share of a block the backward's gradients take and the
    /// process baseline. No allocator slack: glibc reuses the freed buffers of one step in the
    /// next, and what the measured peaks left over for slack fitted to zero.
    pub fn cpu(threads: usize) -> Self {
        Self {
            name: "cpu",
            activation_bytes: None,
            keeps: tape_keeps,
            backward_tokens: 1.5,
            backward_scores: 20.0,
            f32_attention_kernel: true,
            kernel_threads: threads,
            encoder_bytes: 4.0,
            adapter_bytes: 4.0,
            maps_files: true,
            swaps_to_host: false,
            // A resnet block's input (kept for the skip), its normalised copy, the padded
            // input of the banded 3×3 convolution, the bands and their concatenation.
            vae_tensors: 5.0,
            // The f32 scores and probabilities of one chunk of query rows.
            vae_score_bytes: 8.0,
            overhead_what: "process baseline (binary, libraries, allocator)",
            overhead_bytes: 16.0 * MIB,
            slack: 0.0,
        }
    }

    /// zlora on a CUDA GPU: the same tapes; above one chunk of scores the probabilities are
    /// not kept but recomputed per chunk of heads, whose f32 intermediates (scores, P and its
    /// cast, dP, dP ⊙ P, dS) are the backward's working set. No GPU run has checked it: the CUDA context and allocator slack are estimates from
    /// the GPU table.
    pub fn cuda(context_bytes: f64, slack: f64) -> Self {
        Self {
            name: "cuda",
            f32_attention_kernel: false,
            // The cache encodes in the device's default dtype.
            encoder_bytes: 2.0,
            maps_files: false,
            swaps_to_host: true,
            overhead_what: "CUDA context and workspaces",
            overhead_bytes: context_bytes,
            slack,
            // The CPU kernel never runs here.
            ..Self::cpu(1)
        }
    }

    /// A PyTorch-class trainer (ai-toolkit, musubi, SimpleTuner) for comparison: bf16
    /// activations, fused (flash) attention, no gradients for frozen tensors, bf16 encoders.
    pub fn torch(context_bytes: f64, slack: f64) -> Self {
        Self {
            name: "pytorch",
            activation_bytes: Some(2.0),
            keeps: torch_keeps,
            backward_tokens: 0.5,
            backward_scores: 0.0,
            f32_attention_kernel: false,
            encoder_bytes: 2.0,
            vae_tensors: 4.0,
            vae_score_bytes: 0.0,
            ..Self::cuda(context_bytes, slack)
        }
    }
}

pub const MIB: f64 = 1024.0 * 1024.0;
pub const GIB: f64 = 1024.0 * MIB;

/// What a block's tape keeps (model/dit/backward.rs): the inputs and outputs of the four
/// norms (8 × dim), the attention's input, q and k before the qk-norm, the rotated q and k, v
/// and the output before to_out (7 × dim), the feed-forward's input (dim) and its w1, w3 and
/// gated activations (3 × FFN width), and the f32 attention probabilities. The LoRAs keep
/// nothing: their rank-wide products are recomputed in the backward.
fn tape_keeps(a: f64) -> Keeps {
    Keeps {
        per_dim: 16.0 * a,
        per_ffn: 3.0 * a,
        lowrank_rank: 0.0,
        scores: 4.0,
    }
}

/// What PyTorch autograd saves for the diffusers block (docs/plan.md): per RMSNorm its f32
/// input copy and the bf16 input (6 bytes), the rope's f32 complex q and k, fused attention's
/// q, k, v and output, the Linears' inputs, the SwiGLU's four FFN-wide tensors, and each
/// low-rank module's rank-wide intermediate. No score matrix; modulation vectors need no
/// gradient, so their products save nothing large.
fn torch_keeps(a: f64) -> Keeps {
    Keeps {
        per_dim: 6.0 * (4.0 + a) + 2.0 * 4.0 + 4.0 * a + 2.0 * a,
        per_ffn: 4.0 * a,
        lowrank_rank: a,
        scores: 0.0,
    }
}

/// One named amount of memory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Item {
    pub what: String,
    pub bytes: f64,
}

/// Memory that is live at the same time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Phase {
    pub name: &'static str,
    pub items: Vec<Item>,
}

impl Phase {
    fn new(name: &'static str) -> Self {
        Self {
            name,
            items: Vec::new(),
        }
    }

    pub fn total(&self) -> f64 {
        self.items.iter().map(|i| i.bytes).sum()
    }

    /// Adds the profile's fixed overhead and allocator slack.
    fn finish(mut self, profile: &Profile) -> Self {
        if profile.slack > 0.0 {
            let slack = self.total() * profile.slack;
            self.push("allocator slack", slack);
        }
        self.push(profile.overhead_what, profile.overhead_bytes);
        self
    }

    fn push(&mut self, what: impl Into<String>, bytes: f64) {
        if bytes > 0.0 {
            self.items.push(Item {
                what: what.into(),
                bytes,
            });
        }
    }
}

/// The model and adapters a run holds.
#[derive(Debug, Clone, Copy)]
pub struct Run<'a> {
    pub dims: &'a ModelDims,
    pub lora: &'a [LowRank],
    pub adapter: &'a [LowRank],
}

/// Every phase of the run, in order; the peak is the largest.
pub fn estimate(run: &Run, work: &Workload, profile: &Profile) -> Vec<Phase> {
    let mut phases = vec![
        caption_phase(run.dims, work, profile),
        image_phase(run.dims, work, profile),
    ];
    if profile.maps_files {
        phases.push(loading_phase(run, work, profile));
    }
    phases.push(training_phase(run, work, profile));
    if work.sample.is_some() {
        phases.push(sampling_phase(run, work, profile));
    }
    phases.into_iter().map(|p| p.finish(profile)).collect()
}

/// What `zlora generate` holds, phase by phase (sample/generate.rs): the text encoder,
/// dropped after the prompt; the transformer (its kept blocks and, under swap, the blocks in
/// flight) with one block's forward tensors, dropped before decoding; the VAE decode. `work`
/// is one denoising forward: its batch (2 with guidance), image and caption tokens, pixels.
pub fn generation(run: &Run, work: &Workload, profile: &Profile) -> Vec<Phase> {
    let mut denoise = Phase::new("denoising");
    weights_item(&mut denoise, run, work, profile, true);
    denoise.push(
        "one block's forward tensors",
        FORWARD_SHARE * Activations::new(run, work, profile).largest_block(),
    );
    let mut decode = Phase::new("VAE decode");
    decode.push(
        "VAE weights",
        run.dims.vae_params as f64 * profile.encoder_bytes,
    );
    decode.push(
        "one image's decode at full resolution",
        vae_transient(run.dims, work.image_pixels, profile),
    );
    let mut prompt = caption_phase(run.dims, work, profile);
    prompt.name = "prompt encoding";
    [prompt, denoise, decode]
        .into_iter()
        .map(|p| p.finish(profile))
        .collect()
}

/// Without a graph a block holds a fraction of what training keeps: its current tensors.
const FORWARD_SHARE: f64 = 0.25;

/// The largest phase.
pub fn peak(phases: &[Phase]) -> Option<&Phase> {
    phases.iter().max_by(|a, b| a.total().total_cmp(&b.total()))
}

/// The profile's, or the compute dtype's (`base_dtype`, also for a quantized base).
fn activation_bytes(work: &Workload, profile: &Profile) -> f64 {
    profile.activation_bytes.unwrap_or(work.compute_bytes)
}

/// The text encoder encodes one caption at a time, without gradients: its weights plus one
/// layer's transient tensors.
fn caption_phase(dims: &ModelDims, work: &Workload, profile: &Profile) -> Phase {
    let e = profile.encoder_bytes;
    let t = &dims.text;
    let l = work.caption_tokens as f64;
    let transient = l * (8.0 * t.hidden_size as f64 + 3.0 * t.intermediate_size as f64) * e
        + 3.0 * t.num_attention_heads as f64 * l * l * 4.0;
    let mut phase = Phase::new("caption encoding (cache)");
    text_weights_item(&mut phase, dims, work.quantize_text_encoder, e);
    if profile.maps_files {
        phase.push(
            "text encoder files, mapped while loading",
            dims.text_file_bytes as f64,
        );
    }
    phase.push("one caption's activations", transient);
    phase
}

/// The text encoder's weights in `e` bytes each, or with its projections stored as `quantize`
/// (model/text.rs): the embedding and norms stay in `e`, and while it loads one projection at
/// a time is dense, beside the f32 copy that quantizing it makes.
fn text_weights_item(phase: &mut Phase, dims: &ModelDims, quantize: Option<Quantization>, e: f64) {
    let Some(q) = quantize else {
        phase.push(
            format!("text encoder weights ({})", dtype_name(e)),
            dims.text_params as f64 * e,
        );
        return;
    };
    let shapes = dims.text.projection_shapes();
    let stored: usize = shapes.iter().map(|&(out, inp)| q.bytes(out, inp)).sum();
    let dense: usize = shapes.iter().map(|(out, inp)| out * inp).sum();
    let largest = shapes.iter().map(|(out, inp)| out * inp).max().unwrap_or(0);
    phase.push(format!("text encoder projections ({q})"), stored as f64);
    phase.push(
        format!("text encoder embedding and norms ({})", dtype_name(e)),
        (dims.text_params as usize - dense) as f64 * e,
    );
    phase.push(
        "one projection being quantized (dense and f32)",
        largest as f64 * (e + 4.0),
    );
}

/// The VAE encodes one image at a time, without gradients.
fn image_phase(dims: &ModelDims, work: &Workload, profile: &Profile) -> Phase {
    let mut phase = Phase::new("image encoding (cache)");
    phase.push(
        format!("VAE weights ({})", dtype_name(profile.encoder_bytes)),
        dims.vae_params as f64 * profile.encoder_bytes,
    );
    if profile.maps_files {
        phase.push("VAE file, mapped while loading", dims.vae_file_bytes as f64);
    }
    phase.push(
        "one image's activations at full resolution",
        vae_transient(dims, work.image_pixels, profile),
    );
    phase
}

/// The larger of the VAE's two peaks: the widest stage at full resolution with a few tensors
/// of its width alive, and the mid-block attention over every latent position (its scores
/// computed in chunks of at most `MAX_SCORES`).
fn vae_transient(dims: &ModelDims, pixels: usize, profile: &Profile) -> f64 {
    let channels = dims.vae.block_out_channels.first().copied().unwrap_or(0) as f64;
    let convolutions = profile.vae_tensors * channels * pixels as f64 * profile.encoder_bytes;
    let factor = dims.vae_factor() as f64;
    let positions = pixels as f64 / (factor * factor);
    let scores = (positions * positions).min(crate::model::vae::MAX_SCORES as f64);
    let attention = if dims.vae.mid_block_add_attention {
        profile.vae_score_bytes * scores
    } else {
        0.0
    };
    convolutions.max(attention)
}

/// The transformer's weights; under block swap, those that stay on the device and the
/// swapped blocks in flight (`in_flight`: while blocks run, not while loading).
fn weights_item(phase: &mut Phase, run: &Run, work: &Workload, profile: &Profile, in_flight: bool) {
    let what = format!("transformer weights ({})", dtype_name(work.base_bytes));
    let all = run.dims.transformer_params as f64 * work.base_bytes;
    let swapped = swapped_blocks(run, work);
    if swapped == 0 {
        phase.push(what, all);
        return;
    }
    let block = block_weight_bytes(run, work);
    if profile.swaps_to_host {
        let kept = work.blocks_on_device.unwrap_or(0);
        phase.push(
            format!(
                "{what}, {kept} of {} main layers kept",
                run.dims.transformer.n_layers
            ),
            all - swapped as f64 * block,
        );
    } else {
        phase.push(what, all);
    }
    if in_flight {
        phase.push(
            "swapped blocks in flight (the running one and the next)",
            swapped.min(2) as f64 * block,
        );
    }
}

/// Main layers whose weights block swap keeps off the device.
pub fn swapped_blocks(run: &Run, work: &Workload) -> usize {
    let layers = run.dims.transformer.n_layers;
    work.blocks_on_device
        .map_or(0, |n| layers.saturating_sub(n))
}

/// The frozen Linear weights of one main layer, what a swap copies (biases and norms stay).
pub fn block_weight_bytes(run: &Run, work: &Workload) -> f64 {
    let params: u64 = run
        .dims
        .linears
        .iter()
        .filter(|l| l.stack() == Some("layers") && l.path.split('.').nth(1) == Some("0"))
        .map(|l| l.params())
        .sum();
    params as f64 * work.base_bytes
}

fn adapter_item(phase: &mut Phase, run: &Run, profile: &Profile) {
    phase.push(
        "training adapter (frozen)",
        params(run.adapter) * profile.adapter_bytes,
    );
}

/// The transformer's files are mapped while their tensors are copied in (CPU only).
fn loading_phase(run: &Run, work: &Workload, profile: &Profile) -> Phase {
    let mut phase = Phase::new("loading");
    weights_item(&mut phase, run, work, profile, false);
    phase.push(
        "transformer files, mapped while loading",
        run.dims.transformer_file_bytes as f64,
    );
    adapter_item(&mut phase, run, profile);
    phase
}

fn training_phase(run: &Run, work: &Workload, profile: &Profile) -> Phase {
    let mut phase = Phase::new("training");
    weights_item(&mut phase, run, work, profile, true);
    adapter_item(&mut phase, run, profile);
    let copies = if work.accumulation > 1 { 3.0 } else { 2.0 };
    phase.push(
        "LoRA: f32 weights, gradients",
        params(run.lora) * 4.0 * copies,
    );
    optimizer_item(&mut phase, run, work);
    ema_item(&mut phase, run, work);
    preservation_items(&mut phase, run, work);
    let acts = Activations::new(run, work, profile);
    if work.checkpointing {
        phase.push("block inputs kept for recomputation", acts.saved_inputs());
        phase.push("one block's tape (recomputed)", acts.largest_block());
    } else {
        phase.push("every trained block's tape", acts.all_blocks());
    }
    phase.push("backward working set", acts.backward_working_set());
    phase
}

/// Training state stays; the VAE is loaded (kept after the first grid), and one denoising
/// forward or the VAE decode runs, whichever is larger.
fn sampling_phase(run: &Run, work: &Workload, profile: &Profile) -> Phase {
    let mut phase = Phase::new("sampling");
    let Some(sample) = work.sample else {
        return phase;
    };
    weights_item(&mut phase, run, work, profile, true);
    adapter_item(&mut phase, run, profile);
    phase.push("LoRA: f32 weights, gradients", params(run.lora) * 8.0);
    optimizer_item(&mut phase, run, work);
    ema_item(&mut phase, run, work);
    phase.push(
        "VAE weights",
        run.dims.vae_params as f64 * profile.encoder_bytes,
    );
    let inference = Workload {
        batch: sample.batch,
        image_tokens: sample.image_tokens,
        ..work.clone()
    };
    let forward = FORWARD_SHARE * Activations::new(run, &inference, profile).largest_block();
    let decode = vae_transient(run.dims, sample.pixels, profile);
    phase.push("denoising forward or VAE decode", forward.max(decode));
    phase
}

/// The optimizer's state (train/optim.rs and its neighbours): AdamW two f32 moments per
/// parameter; 8-bit AdamW one byte per moment and an f32 scale per block of 256, f32 moments
/// for factors under 4096 elements; Prodigy four f32 tensors (p0, s and the two moments);
/// Adafactor, per factor tensor, a row and a column mean of the squared gradient (rows +
/// cols: out + rank for a LoRA's up factor, rank + in for its down one) and a first moment
/// only with beta1.
fn optimizer_item(phase: &mut Phase, run: &Run, work: &Workload) {
    let o = &work.optimizer;
    let p = params(run.lora);
    let (what, bytes) = match o.kind {
        OptimizerKind::AdamW => ("2 f32 moments", 8.0 * p),
        OptimizerKind::AdamW8bit => ("2 block-quantized moments", adamw8bit_bytes(run.lora)),
        OptimizerKind::Prodigy => ("p0, s, 2 moments (f32)", 16.0 * p),
        OptimizerKind::Adafactor => {
            let factored: f64 = run
                .lora
                .iter()
                .flat_map(|m| &m.tensors)
                .map(|(rows, cols)| (rows + cols) as f64)
                .sum();
            match o.adafactor.beta1 {
                Some(_) => (
                    "factored second moment, first moment (f32)",
                    4.0 * (factored + p),
                ),
                None => ("factored second moment (f32)", 4.0 * factored),
            }
        }
    };
    phase.push(format!("optimizer state: {} {what}", o.kind.name()), bytes);
}

fn ema_item(phase: &mut Phase, run: &Run, work: &Workload) {
    if work.ema {
        phase.push("EMA of the LoRA (f32)", params(run.lora) * 4.0);
    }
}

/// Differential output preservation (train/preservation.rs) runs its pass after the main
/// one, through the same blocks with the same tokens (a class caption is about as long as
/// the caption it replaces): its activations take the main pass's place, but the main pass's
/// gradients stay beside its own, and the prior prediction (f32 latents) beside both.
fn preservation_items(phase: &mut Phase, run: &Run, work: &Workload) {
    if !work.preservation {
        return;
    }
    let factor = run.dims.vae_factor() as f64;
    let latents = work.image_pixels as f64 / (factor * factor);
    let channels = run.dims.vae.latent_channels as f64;
    phase.push(
        "preservation: prior prediction (f32)",
        work.batch as f64 * channels * latents * 4.0,
    );
    phase.push(
        "preservation: its LoRA gradients beside the main pass's (f32)",
        params(run.lora) * 4.0,
    );
}

/// Both moments of each factor of each module as train/adamw8bit.rs stores them.
fn adamw8bit_bytes(modules: &[LowRank]) -> f64 {
    use crate::train::adamw8bit::{BLOCK, MIN_8BIT_SIZE};
    let factor = |n: usize| match n < MIN_8BIT_SIZE {
        true => 8.0 * n as f64,
        false => 2.0 * (n + 4 * n.div_ceil(BLOCK)) as f64,
    };
    modules
        .iter()
        .flat_map(|m| &m.tensors)
        .map(|(rows, cols)| factor(rows * cols))
        .sum()
}

fn params(modules: &[LowRank]) -> f64 {
    modules.iter().map(|m| m.params as f64).sum()
}

fn dtype_name(bytes: f64) -> &'static str {
    match bytes as u32 {
        4 => "f32",
        2 => "bf16",
        1 => "8-bit",
        0 => "4- to 6-bit",
        _ => "mixed",
    }
}

/// The activation side of one training step.
struct Activations<'a> {
    run: &'a Run<'a>,
    work: &'a Workload,
    profile: &'a Profile,
    a: f64,
    keeps: Keeps,
}

impl<'a> Activations<'a> {
    fn new(run: &'a Run<'a>, work: &'a Workload, profile: &'a Profile) -> Self {
        let a = activation_bytes(work, profile);
        Self {
            run,
            work,
            profile,
            a,
            keeps: (profile.keeps)(a),
        }
    }

    /// Tokens per item that a stack's blocks see.
    fn tokens(&self, stack: &str) -> f64 {
        let w = self.work;
        (match stack {
            "noise_refiner" => w.image_tokens,
            "context_refiner" => w.caption_tokens,
            _ => w.image_tokens + w.caption_tokens,
        }) as f64
    }

    fn blocks(&self, stack: &str) -> f64 {
        let cfg = &self.run.dims.transformer;
        (if stack == "layers" {
            cfg.n_layers
        } else {
            cfg.n_refiner_layers
        }) as f64
    }

    /// Stacks in the backward pass: the main layers (downstream of every LoRA) and the
    /// refiners that carry one.
    fn tracked(&self) -> Vec<&'static str> {
        super::dims::STACKS
            .into_iter()
            .filter(|s| *s == "layers" || self.run.lora.iter().any(|m| m.stack() == Some(s)))
            .collect()
    }

    /// What one block of `stack` keeps while its graph is alive.
    fn block(&self, stack: &str) -> f64 {
        let kept = self.cpu_kernel() || self.scores(stack) <= MAX_CHUNK_SCORES as f64;
        self.block_tokens(stack)
            + if kept {
                self.keeps.scores * self.scores(stack)
            } else {
                0.0
            }
    }

    /// What one block of `stack` keeps per token, for all its tokens (no scores).
    fn block_tokens(&self, stack: &str) -> f64 {
        let cfg = &self.run.dims.transformer;
        let k = &self.keeps;
        let (dim, ffn) = (cfg.dim as f64, cfg.ffn_dim() as f64);
        // adaLN's low-rank modules see one conditioning vector per item, not every token.
        let per_token = k.per_dim * dim
            + k.per_ffn * ffn
            + first_block(self.run.lora, stack)
                .chain(first_block(self.run.adapter, stack))
                .filter(|m| !m.module().starts_with("adaLN"))
                .map(|m| k.lowrank_rank * m.rank())
                .sum::<f64>();
        self.work.batch as f64 * self.tokens(stack) * per_token
    }

    /// Whether the attention runs nn::cpu's kernel (which always keeps the probabilities).
    fn cpu_kernel(&self) -> bool {
        self.profile.f32_attention_kernel && self.a == 4.0
    }

    /// Attention scores of one block: batch · heads · tokens².
    fn scores(&self, stack: &str) -> f64 {
        self.run.dims.transformer.n_heads as f64 * self.head_scores(stack)
    }

    fn head_scores(&self, stack: &str) -> f64 {
        let t = self.tokens(stack);
        self.work.batch as f64 * t * t
    }

    /// The scores of one chunk of heads on the composed path (`nn::attention`).
    fn chunk_scores(&self, stack: &str) -> f64 {
        let per_head = self.head_scores(stack);
        let heads = (MAX_CHUNK_SCORES as f64 / per_head)
            .floor()
            .clamp(1.0, self.run.dims.transformer.n_heads as f64);
        heads * per_head
    }

    fn backward_working_set(&self) -> f64 {
        self.tracked()
            .into_iter()
            .map(|s| {
                let scores = if self.cpu_kernel() {
                    // Each thread's f32 score gradient of one head of one item (nn::cpu).
                    let per_head = self.tokens(s) * self.tokens(s);
                    let threads =
                        (self.profile.kernel_threads as f64).min(self.scores(s) / per_head);
                    threads * 4.0 * per_head
                } else {
                    self.profile.backward_scores * self.chunk_scores(s)
                };
                self.profile.backward_tokens * self.block_tokens(s) + scores
            })
            .fold(0.0, f64::max)
    }

    fn largest_block(&self) -> f64 {
        self.tracked()
            .into_iter()
            .map(|s| self.block(s))
            .fold(0.0, f64::max)
    }

    fn all_blocks(&self) -> f64 {
        self.tracked()
            .into_iter()
            .map(|s| self.blocks(s) * self.block(s))
            .sum()
    }

    /// Every block's input (all stacks run forward) and the three stack outputs.
    fn saved_inputs(&self) -> f64 {
        let dim = self.run.dims.transformer.dim as f64;
        let per_item: f64 = super::dims::STACKS
            .into_iter()
            .map(|s| self.blocks(s) * self.tokens(s))
            .sum::<f64>()
            + 3.0 * self.tokens("layers");
        per_item * dim * self.a * self.work.batch as f64
    }
}

/// The modules of a stack's first block (every block of a stack has the same ones).
fn first_block<'m>(modules: &'m [LowRank], stack: &'m str) -> impl Iterator<Item = &'m LowRank> {
    modules
        .iter()
        .filter(move |m| m.stack() == Some(stack) && m.path.split('.').nth(1) == Some("0"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::dims::ModelDims;
    use crate::train::config::Variant;
    use crate::train::lora::LoraConfig;

    /// One 1024 px item, AdamW, nothing optional.
    fn test_workload() -> Workload {
        Workload {
            batch: 1,
            image_tokens: 4096,
            caption_tokens: 256,
            image_pixels: 1024 * 1024,
            checkpointing: true,
            accumulation: 1,
            base_bytes: 2.0,
            compute_bytes: 2.0,
            blocks_on_device: None,
            quantize_text_encoder: None,
            sample: None,
            optimizer: OptimizerConfig::default(),
            ema: false,
            preservation: false,
        }
    }

    /// The training phase of a rank-16 LoRA on Turbo at 1024 px.
    fn training(
        profile: &Profile,
        checkpointing: bool,
        base_bytes: f64,
        optimizer: OptimizerConfig,
        ema: bool,
    ) -> Phase {
        training_with(profile, checkpointing, base_bytes, optimizer, ema, false)
    }

    fn training_with(
        profile: &Profile,
        checkpointing: bool,
        base_bytes: f64,
        optimizer: OptimizerConfig,
        ema: bool,
        preservation: bool,
    ) -> Phase {
        let dims = ModelDims::built_in(Variant::Turbo).unwrap();
        let cfg: LoraConfig = toml::from_str("rank = 16\nalpha = 16").unwrap();
        let lora = dims.lora(&cfg);
        let run = Run {
            dims: &dims,
            lora: &lora,
            adapter: &[],
        };
        let work = Workload {
            checkpointing,
            base_bytes,
            compute_bytes: base_bytes.max(2.0),
            blocks_on_device: None,
            sample: None,
            optimizer,
            ema,
            preservation,
            ..test_workload()
        };
        let phases = estimate(&run, &work, profile);
        phases.into_iter().find(|p| p.name == "training").unwrap()
    }

    fn training_peak(profile: &Profile, checkpointing: bool, base_bytes: f64) -> f64 {
        training(
            profile,
            checkpointing,
            base_bytes,
            OptimizerConfig::default(),
            false,
        )
        .total()
    }

    /// Each optimizer's state against its tensors: AdamW 2 and Prodigy 4 f32 copies of the
    /// LoRA; Adafactor a row and a column per factor (out + in + 2·rank per module) and one
    /// copy more with beta1; 8-bit AdamW 2 bytes per parameter and the blocks' scales.
    #[test]
    fn the_optimizer_state_is_counted_per_optimizer() {
        let state = |kind: OptimizerKind, beta1: Option<f64>| {
            let mut o = OptimizerConfig {
                kind,
                ..OptimizerConfig::default()
            };
            o.adafactor.beta1 = beta1;
            let phase = training(&Profile::cpu(2), true, 2.0, o, false);
            let item = phase
                .items
                .iter()
                .find(|i| i.what.starts_with("optimizer state"));
            item.unwrap().bytes
        };
        let dims = ModelDims::built_in(Variant::Turbo).unwrap();
        let lora = dims.lora(&toml::from_str("rank = 16\nalpha = 16").unwrap());
        let p: f64 = lora.iter().map(|m| m.params as f64).sum();
        let factored: f64 = lora.iter().map(|m| (m.out + m.inp + 32) as f64).sum();
        assert_eq!(state(OptimizerKind::AdamW, None), 8.0 * p);
        assert_eq!(state(OptimizerKind::Prodigy, None), 16.0 * p);
        assert_eq!(state(OptimizerKind::Adafactor, None), 4.0 * factored);
        assert_eq!(
            state(OptimizerKind::Adafactor, Some(0.9)),
            4.0 * (factored + p)
        );
        // An EMA adds one f32 copy of the LoRA.
        let with = training(
            &Profile::cpu(2),
            true,
            2.0,
            OptimizerConfig::default(),
            true,
        );
        let ema = with.items.iter().find(|i| i.what.starts_with("EMA"));
        assert_eq!(ema.unwrap().bytes, 4.0 * p);
        // The factored moment is about 1/(2·rank) of AdamW's.
        assert!(state(OptimizerKind::Adafactor, None) < 8.0 * p / 30.0);
    }

    /// The optimizer state counted for each optimizer is the bytes of the state tensors it
    /// keeps (what a checkpoint saves), for factors on both sides of 8-bit AdamW's 4096-value
    /// threshold; only Prodigy's few scalar tensors are left out of the count.
    #[test]
    fn the_counted_optimizer_state_is_what_each_optimizer_holds() -> crate::Result<()> {
        use crate::train::lora::{Algorithm, FactorShape};
        use candle_core::{DType, Device, Tensor, Var};
        // (out, in, rank): 64·4 + 4·64 values, below 4096; 512·16 + 16·384, above.
        let shapes = [(64, 64, 4), (512, 384, 16)];
        let modules: Vec<LowRank> = shapes
            .iter()
            .enumerate()
            .map(|(i, &(out, inp, rank))| {
                let path = format!("layers.{i}.attention.to_q");
                let lora = [FactorShape::Product(out, rank, inp)];
                LowRank::new(path, (out, inp), Algorithm::Lora, &lora)
            })
            .collect();
        let vars: Vec<Var> = shapes
            .iter()
            .flat_map(|&(out, inp, rank)| [(rank, inp), (out, rank)])
            .map(|shape| Var::ones(shape, DType::F32, &Device::Cpu))
            .collect::<candle_core::Result<_>>()?;
        let refs: Vec<&Var> = vars.iter().collect();
        let grads: Vec<Tensor> = vars
            .iter()
            .map(|v| v.as_tensor().affine(0.5, 0.0))
            .collect::<candle_core::Result<_>>()?;
        let names: Vec<String> = (0..vars.len()).map(|i| format!("v{i}")).collect();
        let dims = ModelDims::built_in(Variant::Turbo)?;
        let run = Run {
            dims: &dims,
            lora: &modules,
            adapter: &[],
        };
        let kinds = [
            OptimizerKind::AdamW,
            OptimizerKind::AdamW8bit,
            OptimizerKind::Prodigy,
            OptimizerKind::Adafactor,
        ];
        for (kind, beta1) in kinds
            .into_iter()
            .map(|k| (k, None))
            .chain([(OptimizerKind::Adafactor, Some(0.9))])
        {
            let mut cfg = OptimizerConfig {
                kind,
                ..OptimizerConfig::default()
            };
            cfg.adafactor.beta1 = beta1;
            let mut optimizer = crate::train::optim::Optimizer::new(&cfg, &refs)?;
            optimizer.step(&refs, &grads, 1e-3)?;
            let (state, _) = optimizer.state(&names);
            let held: usize = state
                .values()
                .filter(|t| t.elem_count() > 1)
                .map(|t| t.elem_count() * t.dtype().size_in_bytes())
                .sum();
            let work = Workload {
                optimizer: cfg,
                ..test_workload()
            };
            let mut phase = Phase::new("training");
            optimizer_item(&mut phase, &run, &work);
            assert_eq!(
                phase.items[0].bytes,
                held as f64,
                "{} beta1 {beta1:?}",
                kind.name()
            );
        }
        Ok(())
    }

    /// Preservation adds the prior prediction (1 × 16 × 128 × 128 f32 latents at 1024 px)
    /// and one more f32 copy of the LoRA (its gradients), nothing else.
    #[test]
    fn preservation_adds_its_prior_and_a_second_set_of_gradients() {
        let run = |preservation| {
            let o = OptimizerConfig::default();
            training_with(&Profile::cpu(2), true, 2.0, o, false, preservation)
        };
        let (with, without) = (run(true), run(false));
        let dims = ModelDims::built_in(Variant::Turbo).unwrap();
        let lora = dims.lora(&toml::from_str("rank = 16\nalpha = 16").unwrap());
        let p: f64 = lora.iter().map(|m| m.params as f64).sum();
        let extra: Vec<_> = with
            .items
            .iter()
            .filter(|i| !without.items.contains(i))
            .collect();
        assert_eq!(extra.len(), 2, "{extra:?}");
        assert_eq!(extra[0].bytes, 16.0 * 128.0 * 128.0 * 4.0);
        assert_eq!(extra[1].bytes, 4.0 * p);
        assert_eq!(
            with.total() - without.total(),
            extra[0].bytes + extra[1].bytes
        );
    }

    #[test]
    fn the_profiles_order_as_their_code_does() {
        let cuda = Profile::cuda(0.8 * GIB, 0.1);
        let torch = Profile::torch(0.8 * GIB, 0.1);
        for p in [Profile::cpu(2), cuda, torch] {
            assert!(
                training_peak(&p, true, 2.0) < training_peak(&p, false, 2.0),
                "{}",
                p.name
            );
            assert!(
                training_peak(&p, true, 2.0) < training_peak(&p, true, 4.0),
                "{}",
                p.name
            );
        }
        // bf16 weights (11.5 GiB) plus a few GiB of activations fit a 24 GB card, for the
        // flash-attention reference and for zlora's tapes with chunked attention alike.
        for p in [&torch, &cuda] {
            let peak = training_peak(p, true, 2.0) / GIB;
            assert!((13.0..22.0).contains(&peak), "{}: {peak}", p.name);
        }
    }
}
