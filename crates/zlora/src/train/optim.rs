//! The optimizers (AdamW, 8-bit AdamW, Prodigy, Adafactor) with inspectable, savable state
//! (candle-nn's keeps its moments private), global-norm gradient clipping and learning-rate
//! schedules. All state stays on the device (f32, or u8 codes with f32 scales for 8-bit
//! AdamW): a step reads nothing back (train/host.rs counts).

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

pub use super::adafactor::{Adafactor, AdafactorSettings};
pub use super::adamw8bit::AdamW8bit;
pub use super::prodigy::{Prodigy, ProdigySettings};
use crate::{Error, Result};

/// `[train] optimizer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
pub enum OptimizerKind {
    #[default]
    #[serde(rename = "adamw")]
    AdamW,
    #[serde(rename = "adamw8bit")]
    AdamW8bit,
    #[serde(rename = "prodigy")]
    Prodigy,
    #[serde(rename = "adafactor")]
    Adafactor,
}

impl OptimizerKind {
    pub fn name(self) -> &'static str {
        match self {
            OptimizerKind::AdamW => "adamw",
            OptimizerKind::AdamW8bit => "adamw8bit",
            OptimizerKind::Prodigy => "prodigy",
            OptimizerKind::Adafactor => "adafactor",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// torch's AdamW defaults except weight decay, which LoRA trainers keep small.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Everything that chooses and tunes the optimizer: `[train]` betas, eps and weight_decay
/// (Prodigy shares them with AdamW) and each optimizer's own table. The default is the
/// default config's: AdamW.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct OptimizerConfig {
    pub kind: OptimizerKind,
    pub adam: AdamWConfig,
    pub prodigy: ProdigySettings,
    pub adafactor: AdafactorSettings,
}

/// First and second moments per parameter.
pub struct AdamW {
    cfg: AdamWConfig,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
}

/// The parameters' device (an optimizer's own scalars and maps live there).
pub(crate) fn device_of(vars: &[&Var]) -> Result<candle_core::Device> {
    vars.first()
        .map(|v| v.device().clone())
        .ok_or_else(|| Error::Invalid("the optimizer has no parameters to train".into()))
}

/// f32 zeros shaped like each parameter, on its device.
pub(crate) fn zeros_like(vars: &[&Var]) -> Result<Vec<Tensor>> {
    Ok(vars
        .iter()
        .map(|v| Tensor::zeros(v.shape(), DType::F32, v.device()))
        .collect::<candle_core::Result<_>>()?)
}

impl AdamW {
    pub fn new(cfg: AdamWConfig, vars: &[&Var]) -> Result<Self> {
        Ok(Self {
            cfg,
            m: zeros_like(vars)?,
            v: zeros_like(vars)?,
        })
    }

    /// One decoupled-weight-decay Adam update with bias correction (torch.optim.AdamW);
    /// `t` is the 1-based step.
    pub fn step(&mut self, vars: &[&Var], grads: &[Tensor], lr: f64, t: u64) -> Result<()> {
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let (m, v) = adam_update(&self.cfg, var, g, &self.m[i], &self.v[i], lr, t)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    fn slots(&mut self, names: &[String]) -> Vec<(String, &mut Tensor)> {
        let mut out = named(names, "exp_avg", &mut self.m);
        out.extend(named(names, "exp_avg_sq", &mut self.v));
        out
    }
}

/// torch.optim.AdamW's update of one parameter from its moments `m`, `v`; returns the new
/// moments.
pub(crate) fn adam_update(
    c: &AdamWConfig,
    var: &Var,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    lr: f64,
    t: u64,
) -> Result<(Tensor, Tensor)> {
    let bc1 = 1.0 - c.beta1.powi(t as i32);
    let bc2 = 1.0 - c.beta2.powi(t as i32);
    let m = ((m * c.beta1)? + (g * (1.0 - c.beta1))?)?;
    let v = ((v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
    let denom = ((&v / bc2)?.sqrt()? + c.eps)?;
    let update = ((&m / bc1)? / denom)?;
    let decayed = (var.as_tensor() * (1.0 - lr * c.weight_decay))?;
    var.set(&(decayed - (update * lr)?)?)?;
    Ok((m, v))
}

/// `NAME.suffix` for each parameter's tensor of one kind of state.
pub(crate) fn named<'a>(
    names: &[String],
    suffix: &str,
    tensors: &'a mut [Tensor],
) -> Vec<(String, &'a mut Tensor)> {
    names
        .iter()
        .zip(tensors.iter_mut())
        .map(|(n, t)| (format!("{n}.{suffix}"), t))
        .collect()
}

enum Rule {
    AdamW(AdamW),
    AdamW8bit(AdamW8bit),
    Prodigy(Prodigy),
    Adafactor(Adafactor),
}

/// The configured optimizer and the number of steps it has taken.
pub struct Optimizer {
    rule: Rule,
    step: u64,
}

impl Optimizer {
    pub fn new(cfg: &OptimizerConfig, vars: &[&Var]) -> Result<Self> {
        let rule = match cfg.kind {
            OptimizerKind::AdamW => Rule::AdamW(AdamW::new(cfg.adam, vars)?),
            OptimizerKind::AdamW8bit => Rule::AdamW8bit(AdamW8bit::new(cfg.adam, vars)?),
            OptimizerKind::Prodigy => Rule::Prodigy(Prodigy::new(cfg.adam, cfg.prodigy, vars)?),
            OptimizerKind::Adafactor => {
                Rule::Adafactor(Adafactor::new(cfg.adafactor, cfg.adam.weight_decay, vars)?)
            }
        };
        Ok(Self { rule, step: 0 })
    }

    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// One update of `vars` by their (clipped) gradients at the schedule's rate `lr`.
    pub fn step(&mut self, vars: &[&Var], grads: &[Tensor], lr: f64) -> Result<()> {
        self.step += 1;
        match &mut self.rule {
            Rule::AdamW(o) => o.step(vars, grads, lr, self.step),
            Rule::AdamW8bit(o) => o.step(vars, grads, lr, self.step),
            Rule::Prodigy(o) => o.step(vars, grads, lr, self.step),
            Rule::Adafactor(o) => o.step(vars, grads, lr, self.step),
        }
    }

    /// Every state tensor under its checkpoint name.
    fn slots(&mut self, names: &[String]) -> Vec<(String, &mut Tensor)> {
        match &mut self.rule {
            Rule::AdamW(o) => o.slots(names),
            Rule::AdamW8bit(o) => o.slots(names),
            Rule::Prodigy(o) => o.slots(names),
            Rule::Adafactor(o) => o.slots(names),
        }
    }

    /// The state by name (parameter name + what it is), plus the step, for a checkpoint.
    pub fn state(&mut self, names: &[String]) -> (BTreeMap<String, Tensor>, u64) {
        let out = self
            .slots(names)
            .into_iter()
            .map(|(n, t)| (n, t.clone()))
            .collect();
        (out, self.step)
    }

    /// Restores every state tensor from a checkpoint; each must be there with its shape.
    pub fn load_state(
        &mut self,
        names: &[String],
        tensors: &BTreeMap<String, Tensor>,
        step: u64,
    ) -> Result<()> {
        for (name, slot) in self.slots(names) {
            let saved = tensors
                .get(&name)
                .ok_or_else(|| Error::Invalid(format!("optimizer state lacks {name}")))?;
            if saved.dims() != slot.dims() || saved.dtype() != slot.dtype() {
                return Err(Error::Invalid(format!(
                    "optimizer state {name} is {:?} {:?}, expected {:?} {:?}",
                    saved.dtype(),
                    saved.dims(),
                    slot.dtype(),
                    slot.dims()
                )));
            }
            *slot = saved.to_device(slot.device())?;
        }
        self.step = step;
        Ok(())
    }
}

/// Scales the gradients so their global L2 norm is at most `max_norm` (0 = no clipping);
/// returns the norm before clipping, a 0-d tensor. The gradients are f32 (as the LoRA).
///
/// Everything stays on the device: the norm is one reduction over the gradients' sums of
/// squares, and the clip factor (torch's max_norm / (norm + 1e-6), where the norm exceeds
/// max_norm, else 1) multiplies the gradients as a tensor, so nothing is read back per tensor.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<Tensor> {
    let Some(device) = grads.first().map(|g| g.device().clone()) else {
        return Err(Error::Invalid("no gradients to clip".into()));
    };
    let squares = grads
        .iter()
        .map(|g| g.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let norm = Tensor::stack(&squares, 0)?.sum_all()?.sqrt()?;
    if max_norm > 0.0 {
        let clipped = (Tensor::new(max_norm as f32, &device)? / (&norm + 1e-6)?)?;
        let factor = norm
            .gt(max_norm)?
            .where_cond(&clipped, &Tensor::new(1f32, &device)?)?;
        for g in grads.iter_mut() {
            *g = g.broadcast_mul(&factor)?;
        }
    }
    Ok(norm)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    Constant,
    Linear,
    Cosine,
}

/// The learning rate at `step` (1-based): linear warmup from 0, then the schedule's decay
/// towards 0 at `total`.
pub fn learning_rate(base: f64, schedule: LrSchedule, warmup: u64, step: u64, total: u64) -> f64 {
    if warmup > 0 && step <= warmup {
        return base * step as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup.min(step)) as f64 / span).clamp(0.0, 1.0);
    match schedule {
        LrSchedule::Constant => base,
        LrSchedule::Linear => base * (1.0 - progress),
        LrSchedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// One AdamW step computed by hand (torch's formula) for a single parameter.
    #[test]
    fn adamw_matches_the_formula() -> Result<()> {
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(&[1.0f32, -2.0], &dev)?)?;
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let cfg = OptimizerConfig {
            kind: OptimizerKind::AdamW,
            adam: cfg,
            prodigy: ProdigySettings::default(),
            adafactor: AdafactorSettings::default(),
        };
        let mut opt = Optimizer::new(&cfg, &[&var])?;
        let g = Tensor::new(&[0.5f32, 0.25], &dev)?;
        opt.step(&[&var], &[g], 0.01)?;
        // m̂ = g, v̂ = g², update = g/|g| = ±1 ⇒ p ← p(1 − lr·wd) − lr·sign(g)
        let got = var.as_tensor().to_vec1::<f32>()?;
        assert!(
            (got[0] - (1.0 * (1.0 - 0.001) - 0.01)).abs() < 1e-6,
            "{got:?}"
        );
        assert!(
            (got[1] - (-2.0 * (1.0 - 0.001) - 0.01)).abs() < 1e-6,
            "{got:?}"
        );
        assert_eq!(opt.step_count(), 1);
        Ok(())
    }

    /// Every optimizer, saved after 3 steps (through a safetensors file, as a checkpoint)
    /// and restored into a fresh one, takes 3 more steps to the very bits of the one that
    /// went on. The factors are large enough for 8-bit AdamW to quantize (u8 codes).
    #[test]
    fn every_optimizer_resumes_bit_for_bit() -> Result<()> {
        let dev = Device::Cpu;
        let kinds = [
            OptimizerKind::AdamW,
            OptimizerKind::AdamW8bit,
            OptimizerKind::Prodigy,
            OptimizerKind::Adafactor,
        ];
        let shapes = [vec![16, 320], vec![320, 16], vec![7]];
        let names: Vec<String> = ["down", "up", "bias"].map(String::from).to_vec();
        for kind in kinds {
            let mut cfg = OptimizerConfig {
                kind,
                ..OptimizerConfig::default()
            };
            cfg.adafactor.beta1 = Some(0.9);
            let init: Vec<Tensor> = shapes
                .iter()
                .map(|s| Tensor::randn(0f32, 0.1, s.as_slice(), &dev))
                .collect::<candle_core::Result<_>>()?;
            let grads: Vec<Vec<Tensor>> = (0..6)
                .map(|_| {
                    shapes
                        .iter()
                        .map(|s| Tensor::randn(0f32, 1e-2, s.as_slice(), &dev))
                        .collect()
                })
                .collect::<candle_core::Result<_>>()?;
            let fresh = || -> Result<Vec<Var>> {
                Ok(init
                    .iter()
                    .map(|t| Var::from_tensor(&t.copy()?))
                    .collect::<candle_core::Result<_>>()?)
            };
            let (a, b) = (fresh()?, fresh()?);
            let (ra, rb): (Vec<&Var>, Vec<&Var>) = (a.iter().collect(), b.iter().collect());
            let mut straight = Optimizer::new(&cfg, &ra)?;
            let mut first = Optimizer::new(&cfg, &rb)?;
            for g in &grads[..3] {
                straight.step(&ra, g, 1e-3)?;
                first.step(&rb, g, 1e-3)?;
            }
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("state.safetensors");
            let (state, step) = first.state(&names);
            crate::fsutil::save_safetensors(&path, &state, None, false)?;
            let loaded = candle_core::safetensors::load(&path, &dev)?
                .into_iter()
                .collect();
            let mut resumed = Optimizer::new(&cfg, &rb)?;
            resumed.load_state(&names, &loaded, step)?;
            for g in &grads[3..] {
                straight.step(&ra, g, 1e-3)?;
                resumed.step(&rb, g, 1e-3)?;
            }
            for (x, y) in a.iter().zip(&b) {
                let diff = (x.as_tensor() - y.as_tensor())?.abs()?.max_all()?;
                assert_eq!(diff.to_scalar::<f32>()?, 0.0, "{kind:?}");
            }
            let dtypes: Vec<DType> = state.values().map(Tensor::dtype).collect();
            assert_eq!(
                dtypes.contains(&DType::U8),
                kind == OptimizerKind::AdamW8bit
            );
        }
        Ok(())
    }

    #[test]
    fn clipping_caps_the_global_norm() -> Result<()> {
        let dev = Device::Cpu;
        let mut g = vec![Tensor::new(&[3.0f32], &dev)?, Tensor::new(&[4.0f32], &dev)?];
        let norm = clip_grad_norm(&mut g, 1.0)?.to_scalar::<f32>()?;
        assert!((norm - 5.0).abs() < 1e-6);
        let a = g[0].to_vec1::<f32>()?[0];
        let b = g[1].to_vec1::<f32>()?[0];
        assert!(((a * a + b * b).sqrt() - 1.0).abs() < 1e-5);
        Ok(())
    }

    /// The on-device clipping against the host formula it replaced (each tensor's f32 sum of
    /// squares read back and accumulated in f64, the factor applied only above the limit):
    /// the same norm and gradients up to the rounding of an f32 sum of n terms, and the very
    /// same bits where nothing is clipped.
    #[test]
    fn clipping_on_the_device_equals_the_host_formula() -> Result<()> {
        let dev = Device::Cpu;
        let grads = (1..=64)
            .map(|i| Tensor::randn(0f32, 1e-2, (i % 7 + 1, 3 * i), &dev))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mut sq = 0f64;
        for g in &grads {
            sq += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
        let host_norm = sq.sqrt();
        let bound = (grads.len() + 2) as f64 * f32::EPSILON as f64;
        for max_norm in [0.0, 0.5 * host_norm, 2.0 * host_norm] {
            let mut clipped = grads.clone();
            let norm = clip_grad_norm(&mut clipped, max_norm)?.to_scalar::<f32>()? as f64;
            assert!(
                (norm - host_norm).abs() <= bound * host_norm,
                "{norm} vs {host_norm}"
            );
            let factor = match max_norm > 0.0 && host_norm > max_norm {
                true => max_norm / (host_norm + 1e-6),
                false => 1.0,
            };
            for (got, g) in clipped.iter().zip(&grads) {
                let want = (g * factor)?;
                let err = (got - &want)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
                let scale = want.abs()?.max_all()?.to_scalar::<f32>()? as f64;
                match factor == 1.0 {
                    true => assert_eq!(err, 0.0, "unclipped gradients changed"),
                    false => assert!(err <= bound * scale, "{err} > {bound} × {scale}"),
                }
            }
        }
        Ok(())
    }

    #[test]
    fn schedules_warm_up_then_decay() {
        assert_eq!(learning_rate(1.0, LrSchedule::Constant, 10, 5, 100), 0.5);
        assert_eq!(learning_rate(1.0, LrSchedule::Constant, 10, 50, 100), 1.0);
        assert!((learning_rate(1.0, LrSchedule::Linear, 0, 50, 100) - 0.5).abs() < 1e-12);
        assert!((learning_rate(1.0, LrSchedule::Cosine, 0, 100, 100)).abs() < 1e-12);
        assert!((learning_rate(1.0, LrSchedule::Cosine, 0, 50, 100) - 0.5).abs() < 1e-12);
    }
}
