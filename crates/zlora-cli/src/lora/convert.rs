//! `zlora lora convert IN OUT --to LAYOUT`: the same effective deltas in another layout.

use std::path::PathBuf;

use anyhow::Context;
use zlora::lora::identify::ZIMAGE_DIM;
use zlora::lora::write::{save, Metadata};

use super::{Finite, Output};

#[derive(clap::Args)]
pub struct Args {
    /// The LoRA to convert (any layout zlora reads).
    input: PathBuf,
    /// Where to write it.
    output: PathBuf,
    #[command(flatten)]
    out: Output,
    #[command(flatten)]
    finite: Finite,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let file = a.finite.read(&a.input, ZIMAGE_DIM)?;
    let metadata = a.out.metadata(Metadata::carried_from(&file.metadata));
    let layout = a.out.layout.into();
    save(
        &a.output,
        &file.modules,
        layout,
        a.out.dtype.into(),
        &metadata,
        a.out.force,
    )
    .context("convert failed")?;
    println!(
        "{}: {} modules, {} → {layout}",
        a.output.display(),
        file.modules.len(),
        file.layout
    );
    Ok(())
}
