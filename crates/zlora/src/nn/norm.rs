//! Normalisations. RMSNorm runs candle's fused kernel with the backward of `nn::fused`;
//! LayerNorm is composed. Statistics are always computed in f32, whatever the activation
//! dtype: bf16 reductions accumulate in bf16 on the CPU and are badly wrong over a few
//! thousand elements.

use candle_core::{DType, Result, Tensor, D};

use super::fused;

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
        fused::rms_norm(x, &self.weight, self.eps)
    }

    /// transformers' `Qwen3RMSNorm` rounding: normalise in f32, cast back to x's dtype, then
    /// scale by the weight in its dtype. In f32 that is `forward`; in bf16 it differs, since
    /// candle's CPU kernel rounds each row's RMS to bf16 and divides in bf16. No backward
    /// (the Qwen3 text models are frozen).
    pub fn forward_cast_then_scale(&self, x: &Tensor) -> Result<Tensor> {
        if x.dtype() == DType::F32 {
            return self.forward(x);
        }
        let xf = x.to_dtype(DType::F32)?;
        let inv_rms = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let normed = xf.broadcast_mul(&inv_rms)?.to_dtype(x.dtype())?;
        normed.broadcast_mul(&self.weight)
    }

    /// The gradient of the input `x` for the output gradient `g` (the weight is frozen).
    pub fn input_grad(&self, x: &Tensor, g: &Tensor) -> Result<Tensor> {
        fused::rms_norm_input_grad(x, &self.weight, g, self.eps)
    }
}
