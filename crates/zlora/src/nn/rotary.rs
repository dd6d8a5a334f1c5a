//! Rotary position embedding in the half-split layout (transformers' `rotate_half`, as Qwen3
//! and Qwen3-VL use it), shared by the text encoder and the captioner.

use candle_core::{DType, Result, Tensor, D};

/// x·cos + rotate_half(x)·sin, computed in f32 and cast back to x's dtype: element i and
/// element i + d/2 of the last dimension turn by the same angle. `cos` and `sin` broadcast
/// against x.
pub fn rotate_half_split(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let xf = x.to_dtype(DType::F32)?;
    let half = xf.dim(D::Minus1)? / 2;
    let x1 = xf.narrow(D::Minus1, 0, half)?;
    let x2 = xf.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    (xf.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?)?.to_dtype(x.dtype())
}
