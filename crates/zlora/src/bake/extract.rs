//! A LoRA from the difference of two checkpoints: for every Linear whose weight differs,
//! the truncated SVD of `W_tuned − W_base` ([`crate::linalg::randomized_svd`]), one module at
//! a time. The captured energy ‖ΔW_r‖²_F / ‖ΔW‖²_F is exact for the factors written (they
//! are an orthogonal projection of ΔW).

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use crate::linalg::{randomized_svd, seed_for};
use crate::lora::{listing, LoraModule};
use crate::model::weights::TransformerCheckpoint;
use crate::nn::AdapterWeights;
use crate::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ExtractOptions {
    /// Rank of every extracted module (at most min(out, in)).
    pub rank: usize,
    /// Extra sketch columns of the randomized SVD.
    pub oversample: usize,
    /// Power iterations of the randomized SVD (sharpen the range on slowly decaying spectra).
    pub power_iters: usize,
}

impl Default for ExtractOptions {
    fn default() -> Self {
        ExtractOptions {
            rank: 32,
            oversample: 10,
            power_iters: 2,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExtractedModule {
    pub path: String,
    pub rank: usize,
    /// Fraction of ‖ΔW‖²_F the rank-`rank` factors capture (1 = exact).
    pub energy: f64,
    /// ‖ΔW‖_F / ‖W_base‖_F: how much fine-tuning moved this weight.
    pub relative_change: f64,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExtractReport {
    pub modules: Vec<ExtractedModule>,
    /// Linears whose weights are identical in both checkpoints.
    pub unchanged: usize,
    /// Tensors that differ but no LoRA can carry (norms, biases, embeddings' pad tokens).
    pub not_representable: Vec<String>,
    /// Modules whose min(out, in) is below the requested rank: stored exactly at that
    /// full rank instead.
    pub clamped: Vec<String>,
}

/// Extracts every differing Linear of `tuned` relative to `base`; `progress(done, total)` is
/// called after each tensor. Both checkpoints must hold the same tensors with the same shapes.
pub fn extract(
    base: &TransformerCheckpoint,
    tuned: &TransformerCheckpoint,
    opts: ExtractOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(BTreeMap<String, LoraModule>, ExtractReport)> {
    if opts.rank == 0 {
        return Err(Error::Invalid("--rank must be at least 1".into()));
    }
    let shapes = base.shapes();
    check_same_tensors(base, tuned, &shapes)?;
    let mut modules = BTreeMap::new();
    let mut report = ExtractReport::default();
    progress(0, shapes.len());
    for (i, (name, shape)) in shapes.iter().enumerate() {
        let w_base = base.tensor(name)?.to_dtype(DType::F64)?;
        let diff = (tuned.tensor(name)?.to_dtype(DType::F64)? - &w_base)?;
        let energy = diff.sqr()?.sum_all()?.to_scalar::<f64>()?;
        let linear = name
            .strip_suffix(".weight")
            .filter(|p| shape.len() == 2 && crate::lora::is_linear(p));
        match (energy > 0.0, linear) {
            (false, Some(_)) => report.unchanged += 1,
            (false, None) => {}
            (true, None) => report.not_representable.push(name.clone()),
            (true, Some(path)) => {
                let base_energy = w_base.sqr()?.sum_all()?.to_scalar::<f64>()?;
                let relative_change = (energy / base_energy).sqrt();
                let (module, m) = extract_module(path, &diff, energy, opts)?;
                if m.rank < opts.rank {
                    report.clamped.push(path.to_string());
                }
                modules.insert(path.to_string(), module);
                report.modules.push(ExtractedModule {
                    relative_change,
                    ..m
                });
            }
        }
        progress(i + 1, shapes.len());
    }
    Ok((modules, report))
}

fn check_same_tensors(
    base: &TransformerCheckpoint,
    tuned: &TransformerCheckpoint,
    shapes: &BTreeMap<String, Vec<usize>>,
) -> Result<()> {
    let other = tuned.shapes();
    let mut problems: Vec<String> = shapes
        .iter()
        .filter_map(|(n, s)| match other.get(n) {
            None => Some(format!("{n} (only in the base)")),
            Some(t) if t != s => Some(format!("{n} (base {s:?}, tuned {t:?})")),
            Some(_) => None,
        })
        .collect();
    problems.extend(
        other
            .keys()
            .filter(|n| !shapes.contains_key(*n))
            .map(|n| format!("{n} (only in the tuned model)")),
    );
    if problems.is_empty() {
        return Ok(());
    }
    Err(Error::bad_file(
        tuned.describe(),
        format!(
            "does not hold the same tensors as {} ({}): {}",
            base.describe(),
            problems.len(),
            listing(problems)
        ),
    ))
}

/// The rank-r factors of one weight difference with their captured energy.
fn extract_module(
    path: &str,
    diff: &Tensor,
    energy: f64,
    opts: ExtractOptions,
) -> Result<(LoraModule, ExtractedModule)> {
    let (out, inp) = diff.dims2()?;
    let full = out.min(inp);
    let (weights, rank, kept) = if opts.rank >= full {
        (exact_factors(diff)?, full, energy)
    } else {
        let seed = seed_for(path);
        let svd = randomized_svd(diff, opts.rank, opts.oversample, opts.power_iters, seed)?;
        let (up, down) = svd.truncate(opts.rank);
        let weights = AdapterWeights::LowRank {
            down: down.to_tensor()?,
            up: up.to_tensor()?,
        };
        (weights, opts.rank, svd.energy_kept(opts.rank))
    };
    let module = LoraModule {
        weights,
        scale: 1.0,
        source_key: path.to_string(),
    };
    let report = ExtractedModule {
        path: path.to_string(),
        rank,
        energy: (kept / energy).min(1.0),
        relative_change: 0.0,
    };
    Ok((module, report))
}

/// A full-rank difference needs no SVD: the difference itself is one factor and the
/// identity the other (rank min(out, in), exact).
fn exact_factors(diff: &Tensor) -> Result<AdapterWeights> {
    let (out, inp) = diff.dims2()?;
    let d = diff.to_dtype(DType::F32)?;
    let eye = Tensor::eye(inp.min(out), DType::F32, d.device())?;
    let (down, up) = if inp <= out { (eye, d) } else { (d, eye) };
    Ok(AdapterWeights::LowRank { down, up })
}
