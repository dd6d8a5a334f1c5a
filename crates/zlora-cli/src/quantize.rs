//! `zlora quantize MODEL --to Q --out FILE.gguf`: the transformer as a GGUF that ComfyUI-GGUF
//! (and zlora's `--transformer`) loads.

use std::path::{Path, PathBuf};

use anyhow::Context;
use zlora::model::folder::ModelFolder;
use zlora::model::gguf::quantize_transformer;
use zlora::model::weights::TransformerCheckpoint;
use zlora::nn::Quantization;

use crate::progress::count_bar;

#[derive(clap::Args)]
pub struct Args {
    /// The model: a diffusers model folder, a Hugging Face repo id in the local cache, a
    /// transformer folder or a single checkpoint file (dense: f32, bf16 or f16).
    model: String,
    /// The blocks' Linear weights' format: q8_0, q6_k, q5_k or q4_k (the other tensors stay
    /// in a float type, as ComfyUI-GGUF's converter keeps them).
    #[arg(long)]
    to: Quantization,
    /// The GGUF file to write.
    #[arg(long)]
    out: PathBuf,
    /// Overwrite an existing file.
    #[arg(long)]
    force: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let checkpoint = open(&a.model)?;
    eprintln!(
        "quantizing {} to {} → {}",
        checkpoint.describe(),
        a.to,
        a.out.display()
    );
    let mut bar = None;
    quantize_transformer(&checkpoint, a.to, &a.out, a.force, &mut |done, total| {
        let b = bar.get_or_insert_with(|| count_bar(total as u64, "tensors".into()));
        b.set_position(done as u64);
    })
    .context("quantize failed")?;
    if let Some(b) = bar {
        b.finish();
    }
    println!("{}", zlora::error::shown(&a.out));
    Ok(())
}

/// A path as it is; anything else as a repo id of the local Hugging Face cache.
fn open(model: &str) -> anyhow::Result<TransformerCheckpoint> {
    let path = Path::new(model);
    let root = if path.exists() {
        path.to_path_buf()
    } else {
        ModelFolder::open(model)?.root().to_path_buf()
    };
    Ok(TransformerCheckpoint::open_path(&root)?)
}
