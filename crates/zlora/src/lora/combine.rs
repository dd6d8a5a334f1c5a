//! Several LoRAs at their strengths as one file.
//!
//! LoRA modules combine exactly by rank concatenation: Σ sᵢ·Bᵢ·Aᵢ = [s₁B₁ … sₙBₙ] · [A₁; …; Aₙ]
//! (scales and strengths folded into B, rank = Σ rᵢ). With a rank cap, a module whose
//! concatenated rank exceeds it is re-compressed by the truncated SVD of that product
//! ([`crate::linalg::svd_of_product`], never forming the [out, in] matrix) and the relative
//! Frobenius error of the truncation is reported. A module that only one file adapts keeps
//! its algorithm (LoKr, LoHa) when no cap applies; LoKr or LoHa meeting other adapters on the
//! same module can only be combined through its dense delta and a randomized SVD, so that
//! needs the cap.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use super::{LoraFile, LoraModule};
use crate::linalg::{randomized_svd, seed_for, svd_of_product, Mat, Svd};
use crate::nn::AdapterWeights;
use crate::{Error, Result};

/// Sketch oversampling and power iterations of the randomized SVD for dense deltas.
const OVERSAMPLE: usize = 10;
const POWER_ITERS: usize = 2;

/// What happened to one module.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleReport {
    pub path: String,
    /// Rank of the exact combination (Σ rᵢ; for a dense delta, min(out, in)).
    pub rank_in: usize,
    /// Rank written.
    pub rank_out: usize,
    /// ‖ΔW − ΔW_written‖_F / ‖ΔW‖_F: 0 when exact.
    pub rel_error: f64,
}

/// Combines `inputs` (file, strength) module by module; `max_rank` caps every module's rank.
pub fn combine(
    inputs: &[(&LoraFile, f64)],
    max_rank: Option<usize>,
) -> Result<(BTreeMap<String, LoraModule>, Vec<ModuleReport>)> {
    if max_rank == Some(0) {
        return Err(Error::Invalid("--max-rank must be at least 1".into()));
    }
    let mut by_path: BTreeMap<&str, Vec<(&LoraFile, &LoraModule, f64)>> = BTreeMap::new();
    for (file, strength) in inputs {
        for (path, m) in &file.modules {
            by_path.entry(path).or_default().push((file, m, *strength));
        }
    }
    let mut modules = BTreeMap::new();
    let mut reports = Vec::new();
    for (path, parts) in by_path {
        let (module, report) = combine_module(path, &parts, max_rank)?;
        check_overflow(path, &parts, &module)?;
        modules.insert(path.to_string(), module);
        reports.push(report);
    }
    Ok((modules, reports))
}

/// A combined module that is not finite although its parts are: the strengths overflow f32.
/// (Non-finite inputs were refused or explicitly allowed by the caller, so they pass.)
fn check_overflow(
    path: &str,
    parts: &[(&LoraFile, &LoraModule, f64)],
    module: &LoraModule,
) -> Result<()> {
    let finite = |m: &LoraModule| -> Result<bool> {
        let mut ok = m.scale.is_finite();
        for t in m.weights.tensors() {
            ok &= super::all_finite(t)?;
        }
        Ok(ok)
    };
    if finite(module)? {
        return Ok(());
    }
    for (_, m, _) in parts {
        if !finite(m)? {
            return Ok(());
        }
    }
    let strengths: Vec<String> = parts.iter().map(|(_, _, s)| format!("{s:?}")).collect();
    Err(Error::Invalid(format!(
        "combining {path} at strength {} overflows f32 (the result holds inf or NaN); use \
         strengths whose result stays finite",
        strengths.join(", ")
    )))
}

fn combine_module(
    path: &str,
    parts: &[(&LoraFile, &LoraModule, f64)],
    max_rank: Option<usize>,
) -> Result<(LoraModule, ModuleReport)> {
    let source_key = path.to_string();
    let all_lora = parts
        .iter()
        .all(|(_, m, _)| matches!(m.weights, AdapterWeights::LowRank { .. }));
    if all_lora {
        return concatenate(path, parts, max_rank);
    }
    match (parts, max_rank) {
        ([(_, m, s)], None) => {
            let rank = m.weights.alpha_rank().unwrap_or(0);
            let module = LoraModule {
                weights: m.weights.clone(),
                scale: m.scale * s,
                source_key,
            };
            Ok((module, exact_report(path, rank)))
        }
        (_, Some(cap)) => dense(path, parts, cap),
        (_, None) => {
            let files: Vec<String> = parts.iter().map(|(f, _, _)| f.name()).collect();
            Err(Error::Invalid(format!(
                "{path}: LoKr/LoHa adapters from {} cannot be combined exactly with other \
                 adapters; pass --max-rank to re-compress this module as a LoRA",
                files.join(", ")
            )))
        }
    }
}

fn exact_report(path: &str, rank: usize) -> ModuleReport {
    ModuleReport {
        path: path.to_string(),
        rank_in: rank,
        rank_out: rank,
        rel_error: 0.0,
    }
}

/// Rank concatenation, then an SVD truncation when it exceeds the cap.
fn concatenate(
    path: &str,
    parts: &[(&LoraFile, &LoraModule, f64)],
    max_rank: Option<usize>,
) -> Result<(LoraModule, ModuleReport)> {
    let mut downs = Vec::new();
    let mut ups = Vec::new();
    for (_, m, strength) in parts {
        if let AdapterWeights::LowRank { down, up } = &m.weights {
            downs.push(down.clone());
            ups.push((up * (m.scale * strength))?);
        }
    }
    let (down, up) = (Tensor::cat(&downs, 0)?, Tensor::cat(&ups, 1)?);
    let rank = down.dims2()?.0;
    let module = |down, up| LoraModule {
        weights: AdapterWeights::LowRank { down, up },
        scale: 1.0,
        source_key: path.to_string(),
    };
    match max_rank {
        Some(cap) if rank > cap => {
            let svd = svd_of_product(&Mat::from_tensor(&up)?, &Mat::from_tensor(&down)?);
            let (report, (u, d)) = truncated(path, rank, &svd, svd.energy(), cap)?;
            Ok((module(d, u), report))
        }
        _ => Ok((module(down, up), exact_report(path, rank))),
    }
}

/// The summed dense delta of mixed algorithms, compressed to `cap` by randomized SVD.
fn dense(
    path: &str,
    parts: &[(&LoraFile, &LoraModule, f64)],
    cap: usize,
) -> Result<(LoraModule, ModuleReport)> {
    let mut sum: Option<Tensor> = None;
    for (_, m, strength) in parts {
        let d = (m.delta()? * *strength)?;
        sum = Some(match sum {
            Some(s) => (s + d)?,
            None => d,
        });
    }
    let sum = sum.ok_or_else(|| Error::Invalid(format!("{path}: nothing to combine")))?;
    let (out, inp) = sum.dims2()?;
    let total = sum
        .to_dtype(DType::F64)?
        .sqr()?
        .sum_all()?
        .to_scalar::<f64>()?;
    let svd = randomized_svd(&sum, cap, OVERSAMPLE, POWER_ITERS, seed_for(path))?;
    let (report, (u, d)) = truncated(path, out.min(inp), &svd, total, cap)?;
    let module = LoraModule {
        weights: AdapterWeights::LowRank { down: d, up: u },
        scale: 1.0,
        source_key: path.to_string(),
    };
    Ok((module, report))
}

/// The rank-`cap` factors (up, down) of `svd` and the report; `total` = ‖ΔW‖²_F.
fn truncated(
    path: &str,
    rank_in: usize,
    svd: &Svd,
    total: f64,
    cap: usize,
) -> Result<(ModuleReport, (Tensor, Tensor))> {
    let kept = cap.min(svd.s.len());
    let (up, down) = svd.truncate(kept);
    let lost = (total - svd.energy_kept(kept)).max(0.0);
    let rel_error = if total > 0.0 {
        (lost / total).sqrt()
    } else {
        0.0
    };
    let report = ModuleReport {
        path: path.to_string(),
        rank_in,
        rank_out: kept,
        rel_error,
    };
    Ok((report, (up.to_tensor()?, down.to_tensor()?)))
}
