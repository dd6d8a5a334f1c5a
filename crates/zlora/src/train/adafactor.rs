//! Adafactor (Shazeer & Stern, 2018) as transformers' `Adafactor` computes it with the
//! settings the peers use for LoRA: a given learning rate (relative_step, scale_parameter and
//! warmup_init off; kohya's recipes and ai-toolkit pass these). A matrix keeps its second
//! moment factored into row and column means; a first moment only when beta1 is set.
//! Checked step by step against transformers (tests/optim_reference.rs).

use candle_core::{Tensor, Var, D};
use serde::{Deserialize, Serialize};

use super::optim::{named, zeros_like};
use crate::Result;

/// `[train.adafactor]`, with transformers' defaults.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdafactorSettings {
    /// First-moment decay; None keeps no first moment (transformers' default).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta1: Option<f64>,
    /// The second moment's decay at step t is 1 − t^decay_rate.
    pub decay_rate: f64,
    /// The update's RMS is capped at this.
    pub clip_threshold: f64,
    /// Added to the squared gradient (transformers' eps[0]; eps[1] only scales relative steps).
    pub eps: f64,
}

impl Default for AdafactorSettings {
    fn default() -> Self {
        Self {
            beta1: None,
            decay_rate: -0.8,
            clip_threshold: 1.0,
            eps: 1e-30,
        }
    }
}

/// The second moment of one parameter.
enum Second {
    /// Means over the last axis (rows) and over the one before it (columns).
    Factored { row: Tensor, col: Tensor },
    /// A vector keeps it whole.
    Full(Tensor),
}

impl Second {
    fn new(var: &Var) -> Result<Self> {
        let dims = var.dims();
        let zeros = |d: Vec<usize>| Tensor::zeros(d, candle_core::DType::F32, var.device());
        Ok(match dims.len() {
            0 | 1 => Second::Full(zeros(dims.to_vec())?),
            n => {
                let mut col = dims[..n - 2].to_vec();
                col.push(dims[n - 1]);
                Second::Factored {
                    row: zeros(dims[..n - 1].to_vec())?,
                    col: zeros(col)?,
                }
            }
        })
    }

    /// Folds in this step's squared gradient (+ eps) with weight 1 − beta2t; returns the
    /// gradient divided by the root of the (approximated) second moment.
    fn update(&mut self, g: &Tensor, eps: f64, beta2t: f64) -> Result<Tensor> {
        let sq = (g.sqr()? + eps)?;
        let mix = |old: &Tensor, new: Tensor| (old * beta2t)? + (new * (1.0 - beta2t))?;
        Ok(match self {
            Second::Factored { row, col } => {
                *row = mix(row, sq.mean(D::Minus1)?)?;
                *col = mix(col, sq.mean(D::Minus2)?)?;
                let r = row
                    .broadcast_div(&row.mean_keepdim(D::Minus1)?)?
                    .sqrt()?
                    .recip()?
                    .unsqueeze(D::Minus1)?;
                let c = col.unsqueeze(D::Minus2)?.sqrt()?.recip()?;
                (r.broadcast_mul(&c)? * g)?
            }
            Second::Full(v) => {
                *v = mix(v, sq)?;
                (v.sqrt()?.recip()? * g)?
            }
        })
    }
}

pub struct Adafactor {
    cfg: AdafactorSettings,
    weight_decay: f64,
    second: Vec<Second>,
    /// Empty without beta1.
    m: Vec<Tensor>,
}

impl Adafactor {
    pub fn new(cfg: AdafactorSettings, weight_decay: f64, vars: &[&Var]) -> Result<Self> {
        Ok(Self {
            cfg,
            weight_decay,
            second: vars.iter().map(|v| Second::new(v)).collect::<Result<_>>()?,
            m: match cfg.beta1 {
                Some(_) => zeros_like(vars)?,
                None => Vec::new(),
            },
        })
    }

    /// transformers' step; `t` is the 1-based step.
    pub fn step(&mut self, vars: &[&Var], grads: &[Tensor], lr: f64, t: u64) -> Result<()> {
        let c = self.cfg;
        let beta2t = 1.0 - (t as f64).powf(c.decay_rate);
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let raw = self.second[i].update(g, c.eps, beta2t)?;
            let rms = (raw.sqr()?.sum_all()?.sqrt()? / (raw.elem_count() as f64).sqrt())?;
            let excess = (rms / c.clip_threshold)?.maximum(1f64)?;
            let mut update = (raw.broadcast_div(&excess)? * lr)?;
            if let Some(beta1) = c.beta1 {
                self.m[i] = ((&self.m[i] * beta1)? + (update * (1.0 - beta1))?)?;
                update = self.m[i].clone();
            }
            let p = var.as_tensor();
            let decayed = (p - (p * (self.weight_decay * lr))?)?;
            var.set(&(decayed - update)?)?;
        }
        Ok(())
    }

    pub(crate) fn slots(&mut self, names: &[String]) -> Vec<(String, &mut Tensor)> {
        let mut out = named(names, "exp_avg", &mut self.m);
        for (n, second) in names.iter().zip(self.second.iter_mut()) {
            match second {
                Second::Factored { row, col } => {
                    out.push((format!("{n}.exp_avg_sq_row"), row));
                    out.push((format!("{n}.exp_avg_sq_col"), col));
                }
                Second::Full(v) => out.push((format!("{n}.exp_avg_sq"), v)),
            }
        }
        out
    }
}
