//! `zlora lora combine A:0.8 B:1.0 -o OUT [--max-rank R]`: several LoRAs as one file.

use std::path::PathBuf;

use anyhow::Context;
use zlora::lora::combine::{combine, ModuleReport};
use zlora::lora::identify::ZIMAGE_DIM;
use zlora::lora::write::{save, Metadata};
use zlora::lora::LoraFile;

use super::{Finite, Output};

#[derive(clap::Args)]
pub struct Args {
    /// LoRA files, each FILE[:STRENGTH] (strength 1 when omitted).
    #[arg(required = true, num_args = 1..)]
    inputs: Vec<String>,
    #[arg(short = 'o', long = "out")]
    output: PathBuf,
    /// Re-compress every module whose combined rank exceeds R by truncated SVD.
    #[arg(long)]
    max_rank: Option<usize>,
    #[command(flatten)]
    out: Output,
    #[command(flatten)]
    finite: Finite,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let read = a.finite.read_specs(&a.inputs, ZIMAGE_DIM)?;
    let inputs: Vec<(&LoraFile, f64)> = read.iter().map(|(f, s)| (f, *s)).collect();
    let files: Vec<&LoraFile> = read.iter().map(|(f, _)| f).collect();
    let (modules, reports) = combine(&inputs, a.max_rank).context("combine failed")?;
    let mut metadata = a.out.metadata(Metadata {
        trigger_words: trigger_words(&files),
        ..Metadata::default()
    });
    metadata
        .carried
        .insert("modelspec.merged_from".into(), a.inputs.join(", "));
    save(
        &a.output,
        &modules,
        a.out.layout.into(),
        a.out.dtype.into(),
        &metadata,
        a.out.force,
    )
    .context("combine failed")?;
    println!("{}: {}", a.output.display(), summary(&reports));
    Ok(())
}

/// The inputs' trigger words, each once, in order.
fn trigger_words(files: &[&LoraFile]) -> Vec<String> {
    let mut words: Vec<String> = Vec::new();
    for f in files {
        for w in Metadata::carried_from(&f.metadata).trigger_words {
            if !words.contains(&w) {
                words.push(w);
            }
        }
    }
    words
}

/// One line: how many modules were exact, how many re-compressed and with what error.
fn summary(reports: &[ModuleReport]) -> String {
    let mut lossy: Vec<&ModuleReport> = reports.iter().filter(|r| r.rank_out < r.rank_in).collect();
    let exact = reports.len() - lossy.len();
    let mut text = format!("{} modules, {exact} combined exactly", reports.len());
    if lossy.iter().any(|r| !r.rel_error.is_finite()) {
        text.push_str(", re-compression error not finite (the inputs hold NaN or inf)");
        return text;
    }
    lossy.sort_by(|x, y| x.rel_error.total_cmp(&y.rel_error));
    if let (Some(median), Some(worst)) = (lossy.get(lossy.len() / 2), lossy.last()) {
        text.push_str(&format!(
            ", {} re-compressed by SVD: relative error median {:.2e}, max {:.2e} ({}, rank {} → {})",
            lossy.len(),
            median.rel_error,
            worst.rel_error,
            worst.path,
            worst.rank_in,
            worst.rank_out
        ));
    }
    text
}
