//! `zlora lora extract --base A --tuned B --rank R -o OUT`: the difference of two
//! checkpoints as a LoRA, with the energy each module captures.

use std::path::PathBuf;

use anyhow::Context;
use zlora::bake::{extract, ExtractOptions, ExtractReport};
use zlora::lora::write::{save, Metadata};
use zlora::model::weights::TransformerCheckpoint;

use super::Output;
use crate::progress::steps_bar;

#[derive(clap::Args)]
pub struct Args {
    /// The base model: a diffusers model folder, a transformer folder or a checkpoint file.
    #[arg(long)]
    base: PathBuf,
    /// The fine-tuned (or distilled) model, in any of the same forms.
    #[arg(long)]
    tuned: PathBuf,
    /// Rank of every extracted module (modules narrower than this are stored exactly, at
    /// min(out, in), with a warning).
    #[arg(long)]
    rank: usize,
    #[arg(short = 'o', long = "out")]
    output: PathBuf,
    /// Extra columns of the randomized SVD sketch.
    #[arg(long, default_value_t = ExtractOptions::default().oversample)]
    oversample: usize,
    /// Power iterations of the randomized SVD.
    #[arg(long, default_value_t = ExtractOptions::default().power_iters)]
    power_iters: usize,
    #[command(flatten)]
    out: Output,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let base = TransformerCheckpoint::open_path(&a.base)?;
    let tuned = TransformerCheckpoint::open_path(&a.tuned)?;
    let opts = ExtractOptions {
        rank: a.rank,
        oversample: a.oversample,
        power_iters: a.power_iters,
    };
    let bar = steps_bar(0, "tensors".into());
    let mut progress = |done: usize, total: usize| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    };
    let (modules, report) =
        extract(&base, &tuned, opts, &mut progress).context("extract failed")?;
    bar.finish_and_clear();
    if !report.clamped.is_empty() {
        eprintln!(
            "warning: --rank {} is above min(out, in) of {} modules; they are stored exactly at \
             their full rank",
            a.rank,
            report.clamped.len()
        );
    }
    anyhow::ensure!(
        !modules.is_empty(),
        "the two checkpoints have no differing Linear weight"
    );
    save(
        &a.output,
        &modules,
        a.out.layout.into(),
        a.out.dtype.into(),
        &a.out.metadata(Metadata::default()),
        a.out.force,
    )
    .context("extract failed")?;
    print_report(&report);
    println!(
        "{}: {} modules at rank ≤ {}",
        a.output.display(),
        modules.len(),
        a.rank
    );
    Ok(())
}

fn print_report(r: &ExtractReport) {
    for m in &r.modules {
        println!(
            "{:<48} rank {:>4}  energy {:>8.4}%  change {:.3e}",
            m.path,
            m.rank,
            100.0 * m.energy,
            m.relative_change
        );
    }
    if let Some(worst) = r
        .modules
        .iter()
        .min_by(|x, y| x.energy.total_cmp(&y.energy))
    {
        let total: f64 = r.modules.iter().map(|m| m.energy).sum();
        println!(
            "captured energy: mean {:.4}%, lowest {:.4}% ({}); {} Linear(s) unchanged",
            100.0 * total / r.modules.len() as f64,
            100.0 * worst.energy,
            worst.path,
            r.unchanged
        );
    }
    if !r.not_representable.is_empty() {
        println!(
            "not representable in a LoRA (they differ but are not Linear weights): {}",
            r.not_representable.join(", ")
        );
    }
}
