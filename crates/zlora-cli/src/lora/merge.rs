//! `zlora lora merge --model DIR LORA[:S]... -o OUT`: LoRAs baked into the transformer.

use std::path::PathBuf;

use anyhow::Context;
use zlora::bake::{merge, MergeFormat};
use zlora::lora::identify::ZIMAGE_DIM;
use zlora::lora::LoraFile;
use zlora::model::weights::TransformerCheckpoint;

#[derive(Clone, Copy, clap::ValueEnum)]
enum FormatArg {
    /// A diffusers transformer folder: shards + index json + config.json.
    Diffusers,
    /// One ComfyUI diffusion-model file (fused qkv, ComfyUI names).
    Comfyui,
}

#[derive(clap::Args)]
pub struct Args {
    /// The model: a diffusers model folder, a transformer folder or a single checkpoint file.
    #[arg(long)]
    model: PathBuf,
    /// LoRA files, each FILE[:STRENGTH] (strength 1 when omitted).
    #[arg(required = true, num_args = 1..)]
    loras: Vec<String>,
    /// Output folder (diffusers) or file (comfyui).
    #[arg(short = 'o', long = "out")]
    output: PathBuf,
    #[arg(long, value_enum, default_value = "diffusers")]
    format: FormatArg,
    /// Largest diffusers shard in bytes.
    #[arg(long, default_value_t = 5_000_000_000)]
    max_shard_size: usize,
    /// Overwrite existing output files (diffusers: in a folder zlora made; the shards of the
    /// earlier merge are removed).
    #[arg(long)]
    force: bool,
    #[command(flatten)]
    finite: super::Finite,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let checkpoint = TransformerCheckpoint::open_path(&a.model)?;
    let dim = checkpoint.width().unwrap_or(ZIMAGE_DIM);
    let read = a.finite.read_specs(&a.loras, dim)?;
    let loras: Vec<(&LoraFile, f64)> = read.iter().map(|(f, s)| (f, *s)).collect();
    let format = match a.format {
        FormatArg::Diffusers => MergeFormat::Diffusers {
            max_shard_bytes: a.max_shard_size,
        },
        FormatArg::Comfyui => MergeFormat::ComfyUi,
    };
    let report = merge(&checkpoint, &loras, &a.output, format, a.force).context("merge failed")?;
    println!(
        "{}: {} of {} tensors changed by {} LoRA(s), {} file(s)",
        a.output.display(),
        report.merged,
        report.tensors,
        loras.len(),
        report.files.len()
    );
    Ok(())
}
