//! `zlora lora inspect FILE [--model DIR] [--json]`: what a LoRA file is and whether it
//! applies; the exit code is the verdict (zlora::lora::inspect documents the codes).

use std::path::PathBuf;
use std::process::ExitCode;

use zlora::lora::inspect::{inspect, ModelLinears, Report};
use zlora::lora::is_linear;
use zlora::model::weights::TransformerCheckpoint;

#[derive(clap::Args)]
pub struct Args {
    file: PathBuf,
    /// Also match the file against this model (model folder, transformer folder or file).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Longest metadata value printed in the text report (JSON has them whole).
const VALUE_CHARS: usize = 100;

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let model = a.model.as_deref().map(model_linears).transpose()?;
    let report = inspect(&a.file, model.as_ref());
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", text(&report));
    }
    if report.code != 0 {
        eprintln!("{}: {}", a.file.display(), report.reason);
    }
    Ok(ExitCode::from(report.code))
}

fn model_linears(path: &std::path::Path) -> anyhow::Result<ModelLinears> {
    let checkpoint = TransformerCheckpoint::open_path(path)?;
    let linears = checkpoint
        .shapes()
        .into_iter()
        .filter_map(|(name, shape)| {
            let module = name.strip_suffix(".weight")?;
            match shape.as_slice() {
                [o, i] if is_linear(module) => Some((module.to_string(), (*o, *i))),
                _ => None,
            }
        })
        .collect();
    Ok(ModelLinears {
        name: path.display().to_string(),
        width: checkpoint
            .width()
            .unwrap_or(zlora::lora::identify::ZIMAGE_DIM),
        linears,
    })
}

fn text(r: &Report) -> String {
    let mut out = Vec::new();
    let dtypes: Vec<String> = r.dtypes.iter().map(|(d, n)| format!("{n} {d}")).collect();
    out.push(match r.tensors {
        0 => format!("file: {} ({} bytes)", r.file, r.bytes),
        n => format!(
            "file: {} ({} bytes, {n} tensors: {})",
            r.file,
            r.bytes,
            dtypes.join(", ")
        ),
    });
    if let Some(layout) = &r.layout {
        out.push(format!("layout: {layout}"));
    }
    if !r.algorithms.is_empty() {
        let algos: Vec<String> = r
            .algorithms
            .iter()
            .map(|(a, n)| format!("{a} ({n} keys)"))
            .collect();
        out.push(format!("algorithm: {}", algos.join(", ")));
    }
    let evidence = match r.evidence.as_str() {
        "" => String::new(),
        e => format!(" (evidence: {e})"),
    };
    out.push(format!("architecture: {}{evidence}", r.architecture));
    if !r.modules.is_empty() {
        out.push(format!("targets: {} modules", r.modules.len()));
        for t in &r.targets {
            let blocks = match t.block_count {
                0 => String::new(),
                1 => format!(" {}", t.blocks),
                n => format!(" {} ({n} blocks)", t.blocks),
            };
            out.push(format!("  {}{blocks}: {}", t.stack, t.modules.join(", ")));
        }
        out.extend(ranks(r));
    }
    if !r.metadata.is_empty() {
        out.push(format!("metadata ({} entries):", r.metadata.len()));
        for (k, v) in &r.metadata {
            out.push(format!("  {k} = {}", shorten(v)));
        }
    }
    if let Some(m) = &r.model_match {
        out.push(format!(
            "model {}: {} modules apply, {} not in the model, {} shape mismatches",
            m.model,
            m.applies,
            m.not_in_model.len(),
            m.shape_mismatches.len()
        ));
        for x in m.not_in_model.iter().chain(&m.shape_mismatches) {
            out.push(format!("  {x}"));
        }
    }
    let status = if r.code == 0 { "OK" } else { "NOT APPLICABLE" };
    out.push(format!("verdict: {status} (exit {}): {}", r.code, r.reason));
    out.join("\n") + "\n"
}

/// "rank 4, alpha 8, scale 2 (all 28 modules)", or one line per group.
fn ranks(r: &Report) -> Vec<String> {
    let describe = |g: &zlora::lora::inspect::RankGroup| {
        let rank = g
            .rank
            .map_or("full factors".to_string(), |n| format!("rank {n}"));
        let alpha = g.alpha.map_or(String::new(), |a| format!(", alpha {a}"));
        format!("{} {rank}{alpha}, scale {}", g.algorithm, g.scale)
    };
    match r.ranks.as_slice() {
        [one] => vec![format!("{} (all {} modules)", describe(one), one.count)],
        many => many
            .iter()
            .map(|g| {
                let more = if g.count > g.examples.len() {
                    ", …"
                } else {
                    ""
                };
                format!(
                    "  {}: {} modules ({}{more})",
                    describe(g),
                    g.count,
                    g.examples.join(", ")
                )
            })
            .collect(),
    }
}

fn shorten(v: &str) -> String {
    let flat = v.replace(['\n', '\r'], " ");
    match flat.char_indices().nth(VALUE_CHARS) {
        Some((cut, _)) => format!("{}… ({} chars)", &flat[..cut], v.chars().count()),
        None => flat,
    }
}
