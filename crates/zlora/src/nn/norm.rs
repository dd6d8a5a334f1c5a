//! Normalisations as composed ops (candle's fused `rms_norm`/`layer_norm` have no backward).
//! Statistics are always computed in f32, whatever the activation dtype: bf16 reductions
//! accumulate in bf16 on the CPU and are badly wrong over a few thousand elements.

use candle_core::{DType, Result, Tensor, D};

/// RMSNorm over the last dimension: x / sqrt(mean(x²) + eps) · weight. On a GPU candle's
/// fused kernel computes it (with our backward, see `nn::fused`).
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return super::fused::rms_norm(x, weight, eps);
    }
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let inv_rms = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let w = weight.to_dtype(DType::F32)?;
    x.broadcast_mul(&inv_rms)?
        .broadcast_mul(&w)?
        .to_dtype(dtype)
}

/// LayerNorm over the last dimension without affine parameters.
pub fn layer_norm_no_affine(x: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let inv_std = (centered.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    centered.broadcast_mul(&inv_std)?.to_dtype(dtype)
}

/// A learned RMSNorm weight with its epsilon.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub fn new(weight: Tensor, eps: f64) -> Self {
        Self { weight, eps }
    }

    pub fn load(vb: candle_nn::VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(Self::new(vb.get(size, "weight")?, eps))
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        rms_norm(x, &self.weight, self.eps)
    }
}
