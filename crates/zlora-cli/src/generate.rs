//! `zlora generate`: the fixed command-line contract of the inference issue.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::DType;
use indicatif::ProgressBar;
use zlora::model::BaseStorage;
use zlora::nn::Quantization;
use zlora::sample::generate::{generate, Event, GenerateRequest, LoraSpec, Preset};
use zlora::sample::Guidance;

use crate::progress::steps_bar;

#[derive(Clone, Copy, clap::ValueEnum)]
enum PresetArg {
    /// 8 steps, guidance 0 (distilled Turbo).
    Turbo,
    /// 50 steps, guidance 4 (= classic CFG 5; undistilled Base).
    Base,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DtypeArg {
    F32,
    Bf16,
}

#[derive(clap::Args)]
pub struct Args {
    /// Model folder (diffusers layout) or a Hugging Face repo id in the local HF cache.
    #[arg(long)]
    model: String,
    /// A single-file transformer checkpoint (ComfyUI or diffusers names) replacing the folder's.
    #[arg(long)]
    transformer: Option<PathBuf>,
    #[arg(long)]
    prompt: String,
    /// Used when guidance > 0.
    #[arg(long, default_value = "")]
    negative_prompt: String,
    #[arg(long, default_value_t = 1024)]
    width: usize,
    #[arg(long, default_value_t = 1024)]
    height: usize,
    /// Step count and guidance defaults.
    #[arg(long, value_enum, default_value = "turbo")]
    preset: PresetArg,
    #[arg(long)]
    steps: Option<usize>,
    /// g in pos + g·(pos − neg); 0 = no CFG. Classic-CFG tools' scale is ours + 1.
    #[arg(long)]
    guidance: Option<f64>,
    /// Scheduler shift (default: the model's scheduler_config.json).
    #[arg(long)]
    shift: Option<f64>,
    /// Drop guidance on steps whose model time 1 − σ exceeds this (1 = never).
    #[arg(long, default_value_t = 1.0)]
    cfg_truncation: f64,
    /// Cap ‖guided‖ at K·‖positive‖ (0 = off).
    #[arg(long, default_value_t = 0.0)]
    cfg_normalization: f64,
    /// One image per seed.
    #[arg(long)]
    seed: Vec<u64>,
    /// Initial noise: safetensors with an f32 tensor `latents` of shape (1,16,h,w).
    #[arg(long, conflicts_with = "seed")]
    latents: Option<PathBuf>,
    /// A LoRA file, optionally with a strength: FILE[:STRENGTH]; repeatable.
    #[arg(long)]
    lora: Vec<String>,
    /// Write the final latents (before VAE decoding) as safetensors tensor `latents`.
    #[arg(long)]
    save_latents: Option<PathBuf>,
    /// Compute dtype (default: bf16 on a GPU, f32 on the CPU).
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// Store the transformer blocks' weights quantized: fp8, int8, q8_0, q6_k, q5_k or q4_k
    /// (default: the compute dtype).
    #[arg(long)]
    quantize: Option<Quantization>,
    /// Store the text encoder's decoder layers quantized while the prompt is encoded: fp8,
    /// int8, q8_0, q6_k, q5_k or q4_k (default: the compute dtype).
    #[arg(long, value_name = "Q")]
    quantize_text_encoder: Option<Quantization>,
    /// Block swap: keep only the first N main transformer layers on the device and copy the
    /// others' weights in from host memory as each runs (slower; default: all on the device).
    #[arg(long, value_name = "N")]
    blocks_on_device: Option<usize>,
    #[arg(long)]
    out: PathBuf,
    /// Overwrite existing output files.
    #[arg(long)]
    force: bool,
    /// Apply LoRA files that hold NaN or inf values (refused otherwise).
    #[arg(long)]
    allow_nonfinite: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let preset = match a.preset {
        PresetArg::Turbo => Preset::Turbo,
        PresetArg::Base => Preset::Base,
    };
    let req = GenerateRequest {
        model: a.model,
        transformer_file: a.transformer,
        prompt: a.prompt,
        negative_prompt: a.negative_prompt,
        width: a.width,
        height: a.height,
        steps: a.steps.unwrap_or(preset.steps()),
        shift: a.shift,
        guidance: Guidance {
            scale: a.guidance.unwrap_or(preset.guidance()),
            truncation: a.cfg_truncation,
            normalization: a.cfg_normalization,
        },
        seeds: a.seed,
        latents: a.latents,
        loras: a.lora.iter().map(|s| LoraSpec::parse(s)).collect(),
        save_latents: a.save_latents,
        dtype: a.dtype.map(|d| match d {
            DtypeArg::F32 => DType::F32,
            DtypeArg::Bf16 => DType::BF16,
        }),
        storage: BaseStorage {
            quantize: a.quantize,
            blocks_on_device: a.blocks_on_device,
            quantize_text_encoder: a.quantize_text_encoder,
        },
        out: a.out,
        overwrite: a.force,
        allow_nonfinite: a.allow_nonfinite,
    };
    let mut bar = None;
    let images = generate(&req, &mut |event| show(event, &mut bar)).context("generate failed")?;
    for img in images {
        println!("{}", zlora::error::shown(&img.png));
    }
    Ok(())
}

/// Stage lines on stderr and a bar over each image's steps.
pub fn show(event: Event, bar: &mut Option<ProgressBar>) {
    match event {
        Event::Stage(msg) => eprintln!("{msg}"),
        Event::Step {
            image,
            images,
            step,
            steps,
        } => {
            if step == 1 {
                *bar = Some(steps_bar(
                    steps as u64,
                    format!("image {}/{images}", image + 1),
                ));
            }
            if let Some(b) = bar {
                b.set_position(step as u64);
                if step == steps {
                    b.finish();
                }
            }
        }
    }
}
