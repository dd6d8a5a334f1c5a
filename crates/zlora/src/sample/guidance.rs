//! Classifier-free guidance in Z-Image's convention (reference §5):
//! pred = pos + g·(pos − neg), on whenever g > 0. So g = 0 is "no CFG" and our g equals a
//! classic-CFG tool's scale minus one (ai-toolkit's 4 = our 3).

use candle_core::{Result, Tensor};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Guidance {
    /// g in pos + g·(pos − neg).
    pub scale: f64,
    /// Guidance is dropped (pos only) on steps whose model time 1 − σ exceeds this; values
    /// above 1 never truncate.
    pub truncation: f64,
    /// When > 0: if ‖pred‖ > k·‖pos‖ (per item, over the whole latent) pred is rescaled to
    /// k·‖pos‖. 0 switches it off.
    pub normalization: f64,
}

impl Default for Guidance {
    fn default() -> Self {
        Self {
            scale: 0.0,
            truncation: 1.0,
            normalization: 0.0,
        }
    }
}

impl Guidance {
    /// Finite numbers, and a normalisation that is off (0) or positive.
    pub fn check(&self) -> std::result::Result<(), String> {
        let named = [
            ("guidance", self.scale),
            ("cfg_truncation", self.truncation),
            ("cfg_normalization", self.normalization),
        ];
        if let Some((name, v)) = named.iter().find(|(_, v)| !v.is_finite()) {
            return Err(format!("{name} must be a finite number, got {v}"));
        }
        if self.normalization < 0.0 {
            return Err(format!(
                "cfg_normalization must be 0 (off) or positive, got {}",
                self.normalization
            ));
        }
        Ok(())
    }

    /// The guidance scale for a step with this model time (t = 1 − σ); 0 means one pass.
    pub fn scale_at(&self, model_time: f32) -> f64 {
        if self.scale > 0.0 && self.truncation <= 1.0 && model_time as f64 > self.truncation {
            0.0
        } else {
            self.scale
        }
    }

    /// Combines positive and negative predictions (B, C, H, W), f32.
    pub fn combine(&self, pos: &Tensor, neg: &Tensor, scale: f64) -> Result<Tensor> {
        let pred = (pos + ((pos - neg)? * scale)?)?;
        if self.normalization <= 0.0 {
            return Ok(pred);
        }
        let items = (0..pos.dim(0)?)
            .map(|i| self.normalize(&pos.get(i)?, &pred.get(i)?))
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&items, 0)
    }

    fn normalize(&self, pos: &Tensor, pred: &Tensor) -> Result<Tensor> {
        let norm = |t: &Tensor| -> Result<f32> { t.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>() };
        let max_norm = norm(pos)? as f64 * self.normalization;
        let pred_norm = norm(pred)? as f64;
        if pred_norm > max_norm {
            pred * (max_norm / pred_norm)
        } else {
            Ok(pred.clone())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn truncation_drops_guidance_late_in_the_run() {
        let g = Guidance {
            scale: 4.0,
            truncation: 0.8,
            normalization: 0.0,
        };
        assert_eq!(g.scale_at(0.5), 4.0);
        assert_eq!(g.scale_at(0.9), 0.0);
        let never = Guidance {
            truncation: 1.5,
            ..g
        };
        assert_eq!(never.scale_at(0.99), 4.0);
    }

    #[test]
    fn normalization_caps_the_norm_per_item() -> Result<()> {
        let dev = Device::Cpu;
        let pos = Tensor::new(&[[3f32, 4.0], [1.0, 0.0]], &dev)?;
        let neg = Tensor::zeros((2, 2), candle_core::DType::F32, &dev)?;
        let g = Guidance {
            scale: 1.0,
            truncation: 1.0,
            normalization: 1.5,
        };
        let out = g.combine(&pos, &neg, 1.0)?.to_vec2::<f32>()?;
        // pred = 2·pos: item norms 10 and 2 are capped to 7.5 and 1.5.
        assert!((out[0][0] - 4.5).abs() < 1e-5 && (out[0][1] - 6.0).abs() < 1e-5);
        assert!((out[1][0] - 1.5).abs() < 1e-5);
        Ok(())
    }
}
