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

    /// transformers' `Qwen3RMSNorm` rounding: normalise in f32 (the fused kernel with a unit
    /// weight), cast back to x's dtype, then scale by the weight in its dtype. In f32 it
    /// equals `forward`; in bf16 `forward` rounds once after scaling (CUDA) or rounds each
    /// row's RMS to bf16 and divides in bf16 (candle's CPU kernel).
    pub fn forward_cast_then_scale(&self, x: &Tensor) -> Result<Tensor> {
        let unit = Tensor::ones(self.weight.shape(), DType::F32, x.device())?;
        let normed = fused::rms_norm(&x.to_dtype(DType::F32)?, &unit, self.eps)?;
        normed.to_dtype(x.dtype())?.broadcast_mul(&self.weight)
    }

    /// The gradient of the input `x` for the output gradient `g` (the weight is frozen).
    pub fn input_grad(&self, x: &Tensor, g: &Tensor) -> Result<Tensor> {
        fused::rms_norm_input_grad(x, &self.weight, g, self.eps)
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn qwen3_rounding_equals_forward_in_f32() -> Result<()> {
        let x = (Tensor::arange(0f32, 48.0, &Device::Cpu)?.reshape((3, 16))? * 0.37)?.sin()?;
        let norm = RmsNorm::new(
            ((Tensor::arange(0f32, 16.0, &Device::Cpu)? * 0.1)? + 0.5)?,
            1e-6,
        );
        let got = norm.forward_cast_then_scale(&x)?.to_vec2::<f32>()?;
        assert_eq!(got, norm.forward(&x)?.to_vec2::<f32>()?);
        Ok(())
    }
}
