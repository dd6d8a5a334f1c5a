//! Prodigy (Mishchenko & Defazio, "Prodigy: An Expeditiously Adaptive Parameter-Free
//! Learner"): Adam whose step size `d` is estimated from the run itself, as the `prodigyopt`
//! package (1.1) computes it, with its defaults (growth_rate unlimited, slice_p 1, decoupled
//! weight decay). Checked step by step against prodigyopt (tests/optim_reference.rs).
//!
//! `d` and the running numerator of its estimate are 0-d tensors on the device, so a step
//! reads nothing back; prodigyopt keeps them as Python floats (f64), zlora in f32.

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::optim::{device_of, named, zeros_like, AdamWConfig};
use crate::Result;

/// `[train.prodigy]`: the knobs the peers set, with prodigyopt's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProdigySettings {
    /// Scales the estimate of d; prodigyopt's advice for tuning (0.5–2 typical).
    pub d_coef: f64,
    /// The initial d estimate.
    pub d0: f64,
    /// Decay of the estimate's running sums (None: √beta2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub beta3: Option<f64>,
    /// Adam's bias correction folded into the step size.
    pub use_bias_correction: bool,
    /// Leaves the learning rate out of the estimate's denominator (for warmup).
    pub safeguard_warmup: bool,
}

impl Default for ProdigySettings {
    fn default() -> Self {
        Self {
            d_coef: 1.0,
            d0: 1e-6,
            beta3: None,
            use_bias_correction: false,
            safeguard_warmup: false,
        }
    }
}

/// Per parameter: its initial value p0, the estimate's sum s and Adam's moments (scaled by d,
/// as prodigyopt keeps them); globally d and the estimate's numerator.
pub struct Prodigy {
    adam: AdamWConfig,
    cfg: ProdigySettings,
    p0: Vec<Tensor>,
    s: Vec<Tensor>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    d: Tensor,
    numerator: Tensor,
}

impl Prodigy {
    pub fn new(adam: AdamWConfig, cfg: ProdigySettings, vars: &[&Var]) -> Result<Self> {
        let device = device_of(vars)?;
        // A deep copy: Var::set writes into the variable's storage, which a clone shares.
        let p0 = vars
            .iter()
            .map(|v| v.as_tensor().to_dtype(DType::F32)?.copy())
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            adam,
            cfg,
            p0,
            s: zeros_like(vars)?,
            m: zeros_like(vars)?,
            v: zeros_like(vars)?,
            d: Tensor::new(cfg.d0 as f32, &device)?,
            numerator: Tensor::new(0f32, &device)?,
        })
    }

    /// prodigyopt's step; `t` is the 1-based step. A zero rate (the last step of a decaying
    /// schedule) leaves everything as it is, as prodigyopt's does.
    pub fn step(&mut self, vars: &[&Var], grads: &[Tensor], lr: f64, t: u64) -> Result<()> {
        if lr == 0.0 {
            return Ok(());
        }
        let (a, c) = (self.adam, self.cfg);
        let beta3 = c.beta3.unwrap_or(a.beta2.sqrt());
        let bias = match c.use_bias_correction {
            true => (1.0 - a.beta2.powi(t as i32)).sqrt() / (1.0 - a.beta1.powi(t as i32)),
            false => 1.0,
        };
        let d = self.d.clone();
        let dlr = (&d * (lr * bias))?;
        let d_ratio = (&d / c.d0)?;
        let numerator_scale = (&d_ratio * &dlr)?;
        let s_scale = match c.safeguard_warmup {
            true => (&d_ratio * &d)?,
            false => (&d_ratio * &dlr)?,
        };
        let mut numerator = (&self.numerator * beta3)?;
        let mut s_sums = Vec::with_capacity(vars.len());
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let progress = (g * (&self.p0[i] - var.as_tensor())?)?.sum_all()?;
            numerator = (numerator + (progress * &numerator_scale)?)?;
            self.m[i] = ((&self.m[i] * a.beta1)? + g.broadcast_mul(&(&d * (1.0 - a.beta1))?)?)?;
            let d2 = ((&d * &d)? * (1.0 - a.beta2))?;
            self.v[i] = ((&self.v[i] * a.beta2)? + g.sqr()?.broadcast_mul(&d2)?)?;
            self.s[i] = ((&self.s[i] * beta3)? + g.broadcast_mul(&s_scale)?)?;
            s_sums.push(self.s[i].abs()?.sum_all()?);
        }
        let denominator = Tensor::stack(&s_sums, 0)?.sum_all()?;
        // Until some gradient is non-zero the denominator is 0: prodigyopt then skips the
        // step, here d stays and the update is multiplied by 0.
        let moved = denominator.gt(0f64)?;
        let d_hat = ((&numerator / &denominator)? * c.d_coef)?;
        let d_new = moved.where_cond(&d.maximum(&d_hat)?, &d)?;
        let rate = (moved.to_dtype(DType::F32)? * &dlr)?;
        let decay = (&rate * a.weight_decay)?;
        let eps = (&d_new * a.eps)?;
        for (i, var) in vars.iter().enumerate() {
            let p = var.as_tensor();
            let denom = self.v[i].sqrt()?.broadcast_add(&eps)?;
            let decayed = (p - p.broadcast_mul(&decay)?)?;
            let update = (&self.m[i] / denom)?.broadcast_mul(&rate)?;
            var.set(&(decayed - update)?)?;
        }
        self.numerator = moved.where_cond(&numerator, &self.numerator)?;
        self.d = d_new;
        Ok(())
    }

    pub(crate) fn slots(&mut self, names: &[String]) -> Vec<(String, &mut Tensor)> {
        let mut out = named(names, "p0", &mut self.p0);
        out.extend(named(names, "s", &mut self.s));
        out.extend(named(names, "exp_avg", &mut self.m));
        out.extend(named(names, "exp_avg_sq", &mut self.v));
        out.push(("prodigy.d".into(), &mut self.d));
        out.push(("prodigy.d_numerator".into(), &mut self.numerator));
        out
    }
}
