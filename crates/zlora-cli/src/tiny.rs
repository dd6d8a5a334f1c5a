//! `zlora tiny-model`: writes a tiny random-weight model for demos and tests.

use std::path::PathBuf;

use zlora::model::tiny::{create, TinySpec};

#[derive(clap::Args)]
pub struct Args {
    /// Folder to create (diffusers layout).
    #[arg(long)]
    out: PathBuf,
    /// Transformer width.
    #[arg(long, default_value_t = 64)]
    dim: usize,
    /// Main transformer layers.
    #[arg(long, default_value_t = 2)]
    layers: usize,
    /// Attention heads (dim / heads must be a multiple of 8).
    #[arg(long, default_value_t = 2)]
    heads: usize,
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
    let spec = TinySpec {
        dim: a.dim,
        layers: a.layers,
        heads: a.heads,
        seed: a.seed,
        shift: a.shift,
    };
    create(&a.out, &spec, a.force)?;
    eprintln!(
        "wrote a tiny Z-Image model (dim {}, {} layers) to {}",
        a.dim,
        a.layers,
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
