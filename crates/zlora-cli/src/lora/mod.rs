//! `zlora lora ...`: inspect, convert, combine, merge and extract LoRA files. One file per
//! subcommand; this one holds the argument types they share.

mod combine;
mod convert;
mod extract;
mod inspect;
mod merge;

use std::process::ExitCode;

use candle_core::DType;
use zlora::lora::write::Metadata;
use zlora::lora::{Layout, LoraFile};
use zlora::sample::generate::LoraSpec;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Describe a LoRA file; exit 0 only if it applies cleanly to Z-Image (1 unreadable,
    /// 2 not a Z-Image transformer LoRA, 3 unsupported algorithm, 4 keys or shapes that do not
    /// fit, 5 NaN or inf values).
    Inspect(inspect::Args),
    /// Rewrite a LoRA in another layout, exactly (alpha folded or stored as the target expects).
    Convert(convert::Args),
    /// Combine LoRAs at their strengths into one file (exact rank concatenation; --max-rank
    /// re-compresses by SVD and reports the error).
    Combine(combine::Args),
    /// Bake LoRAs into the transformer weights (diffusers shards or a ComfyUI single file).
    Merge(merge::Args),
    /// Extract a LoRA from the difference of two checkpoints by truncated SVD.
    Extract(extract::Args),
}

pub fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Inspect(a) => inspect::run(a),
        Command::Convert(a) => convert::run(a).map(|()| ExitCode::SUCCESS),
        Command::Combine(a) => combine::run(a).map(|()| ExitCode::SUCCESS),
        Command::Merge(a) => merge::run(a).map(|()| ExitCode::SUCCESS),
        Command::Extract(a) => extract::run(a).map(|()| ExitCode::SUCCESS),
    }
}

/// The layouts zlora writes.
#[derive(Clone, Copy, clap::ValueEnum)]
enum LayoutArg {
    /// `diffusion_model.<module>.lora_A/B.weight`, alpha folded: loads everywhere.
    Default,
    /// ComfyUI names with q/k/v fused into attention.qkv (`lora_down/up`).
    Comfyui,
    /// diffusers / PEFT: `transformer.<module>.lora_A/B.weight` + `lora_adapter_metadata`.
    Diffusers,
    /// musubi-tuner / kohya: `lora_unet_<module>.lora_down/up.weight` + `.alpha`.
    Musubi,
    /// DiffSynth-Studio: `<module>.lora_A/B.default.weight`.
    Diffsynth,
}

impl From<LayoutArg> for Layout {
    fn from(a: LayoutArg) -> Self {
        match a {
            LayoutArg::Default => Layout::AiToolkit,
            LayoutArg::Comfyui => Layout::ComfyFused,
            LayoutArg::Diffusers => Layout::DiffusersPeft,
            LayoutArg::Musubi => Layout::Kohya,
            LayoutArg::Diffsynth => Layout::DiffSynth,
        }
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum DtypeArg {
    F32,
    Bf16,
    F16,
}

impl From<DtypeArg> for DType {
    fn from(a: DtypeArg) -> Self {
        match a {
            DtypeArg::F32 => DType::F32,
            DtypeArg::Bf16 => DType::BF16,
            DtypeArg::F16 => DType::F16,
        }
    }
}

/// Options every LoRA-writing subcommand takes.
#[derive(clap::Args)]
struct Output {
    /// Layout of the written file.
    #[arg(long = "to", value_enum, default_value = "default")]
    layout: LayoutArg,
    /// Tensor dtype of the written file (alpha stays f32).
    #[arg(long, value_enum, default_value = "f32")]
    dtype: DtypeArg,
    /// Base model recorded in the header (modelspec.base_model), e.g. Tongyi-MAI/Z-Image-Turbo.
    #[arg(long)]
    base_model: Option<String>,
    /// Trigger word recorded in the header (modelspec.trigger_phrase); repeatable.
    #[arg(long = "trigger")]
    triggers: Vec<String>,
    /// Overwrite an existing output file.
    #[arg(long)]
    force: bool,
}

impl Output {
    /// `base` (a source file's informational header, or empty) with this command's
    /// base model and trigger words on top.
    fn metadata(&self, mut base: Metadata) -> Metadata {
        if self.base_model.is_some() {
            base.base_model = self.base_model.clone();
        }
        if !self.triggers.is_empty() {
            base.trigger_words = self.triggers.clone();
        }
        base
    }
}

/// The `--allow-nonfinite` switch of every command that reads LoRAs to apply or rewrite.
#[derive(clap::Args)]
struct Finite {
    /// Use LoRA files that hold NaN or inf values (refused otherwise).
    #[arg(long)]
    allow_nonfinite: bool,
}

impl Finite {
    /// Reads one LoRA for a model of width `dim`, refusing NaN / inf unless allowed.
    fn read(&self, path: &std::path::Path, dim: usize) -> zlora::Result<LoraFile> {
        let file = LoraFile::read_for_dim(path, dim)?;
        if !self.allow_nonfinite {
            file.check_finite()?;
        }
        Ok(file)
    }

    /// FILE[:STRENGTH] arguments: every strength and file checked before any is read.
    fn read_specs(&self, args: &[String], dim: usize) -> zlora::Result<Vec<(LoraFile, f64)>> {
        let specs: Vec<LoraSpec> = args.iter().map(|s| LoraSpec::parse(s)).collect();
        for spec in &specs {
            spec.check()?;
        }
        specs
            .iter()
            .map(|s| Ok((self.read(&s.path, dim)?, s.strength)))
            .collect()
    }
}
