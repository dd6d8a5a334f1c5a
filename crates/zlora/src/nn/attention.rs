//! Scaled dot-product attention from composed ops, with the softmax in f32.

use candle_core::{DType, Result, Tensor, D};

/// Softmax over the last dimension in f32 (composed, so it has a backward).
pub fn softmax_f32(x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?)?;
    let e = shifted.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Key mask for batches whose items have different lengths: 0 for valid keys, −∞ for batch
/// padding, shaped (B, 1, 1, S) to broadcast over heads and queries. `None` when every item
/// fills the sequence (the reference passes no mask then).
pub fn key_padding_mask(
    lens: &[usize],
    seq: usize,
    device: &candle_core::Device,
) -> Result<Option<Tensor>> {
    if lens.iter().all(|&l| l == seq) {
        return Ok(None);
    }
    let data: Vec<f32> = lens
        .iter()
        .flat_map(|&l| (0..seq).map(move |j| if j < l { 0.0 } else { f32::NEG_INFINITY }))
        .collect();
    Tensor::from_vec(data, (lens.len(), 1, 1, seq), device).map(Some)
}

/// softmax(q·kᵀ/√d + mask)·v for q, k, v of shape (B, H, S, D).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?.to_dtype(DType::F32)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    let probs = softmax_f32(&scores)?.to_dtype(v.dtype())?;
    probs.matmul(&v.contiguous()?)
}
