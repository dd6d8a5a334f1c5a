//! `zlora tiny-model`: writes a tiny random-weight model for demos and tests.

use std::path::PathBuf;

use candle_core::DType;
use zlora::model::tiny::{create, TextSize, TinySpec, VaeSize};

#[derive(clap::Args)]
pub struct Args {
    /// Folder to create (diffusers layout).
    #[arg(long)]
    out: PathBuf,
    /// Transformer width.
    #[arg(long, default_value_t = 64, conflicts_with = "real_width")]
    dim: usize,
    /// Main transformer layers.
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Attention heads (dim / heads must be a multiple of 8).
    #[arg(long, default_value_t = 2, conflicts_with = "real_width")]
    heads: usize,
    /// Blocks of each refiner (noise and context).
    #[arg(long, default_value_t = 1, conflicts_with = "real_width")]
    refiners: usize,
    /// Z-Image's VAE (16 channels, factor 8) instead of the 3-stage tiny one (factor 4).
    #[arg(long)]
    real_vae: bool,
    /// Z-Image's widths with --layers main layers: dim 3840, 30 heads, FFN 10240, 2 + 2
    /// refiner blocks, caption features 2560 from a 2-layer text encoder of Qwen3-4B's width,
    /// and the real VAE.
    #[arg(long)]
    real_width: bool,
    /// Save the weights in bf16 (as the released files are) instead of f32.
    #[arg(long)]
    bf16: bool,
    /// Seed of the random weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Scheduler shift written into the model (3 like Turbo, 6 like Base).
    #[arg(long, default_value_t = 3.0)]
    shift: f64,
    /// Replace the folder if it exists.
    #[arg(long)]
    force: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let shape = if a.real_width {
        TinySpec::real_width(a.layers)
    } else {
        TinySpec {
            dim: a.dim,
            layers: a.layers,
            heads: a.heads,
            refiners: a.refiners,
            text: TextSize::Tiny,
            vae: if a.real_vae {
                VaeSize::ZImage
            } else {
                VaeSize::Tiny
            },
            ..TinySpec::default()
        }
    };
    let spec = TinySpec {
        dtype: if a.bf16 { DType::BF16 } else { DType::F32 },
        seed: a.seed,
        shift: a.shift,
        ..shape
    };
    create(&a.out, &spec, a.force)?;
    eprintln!(
        "wrote a random-weight Z-Image model (dim {}, {} layers) to {}",
        spec.dim,
        spec.layers,
        a.out.display()
    );
    Ok(())
}

/// `zlora tiny-dataset`: writes a synthetic dataset for the demo.
#[derive(clap::Args)]
pub struct DatasetArgs {
    /// Folder to create.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = 8)]
    count: usize,
    /// Side of the square images in pixels.
    #[arg(long, default_value_t = 96)]
    size: u32,
    #[arg(long)]
    force: bool,
}

pub fn run_dataset(a: DatasetArgs) -> anyhow::Result<()> {
    zlora::data::synthetic::create(&a.out, a.count, a.size, a.force)?;
    eprintln!("wrote {} captioned images to {}", a.count, a.out.display());
    Ok(())
}
