//! Scaled dot-product attention from composed ops, with the softmax in f32.

use candle_core::{DType, Result, Tensor, D};

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

/// softmax(q·kᵀ/√d + mask)·v for q, k, v of shape (B, H, S, D), composed so that it has a
/// backward (candle's fused softmax has none).
///
/// The softmax runs in f32. Two passes over the (S, S) scores are saved: 1/√d scales q (exact
/// when d is a power of 4), and the softmax's division by the row sums is applied to the
/// (S, D) output instead of the probabilities.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(D::Minus1)? as f64).sqrt();
    let scores = (q * scale)?
        .matmul(&k.contiguous()?.t()?)?
        .to_dtype(DType::F32)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    if !q.device().is_cpu() {
        // On a GPU the fused softmax kernel (with our backward) beats the composed passes.
        let probs = super::fused::softmax_last_dim(&scores)?;
        return probs.to_dtype(v.dtype())?.matmul(&v.contiguous()?);
    }
    let e = scores
        .broadcast_sub(&scores.max_keepdim(D::Minus1)?)?
        .exp()?;
    let out = e.to_dtype(v.dtype())?.matmul(&v.contiguous()?)?;
    out.to_dtype(DType::F32)?
        .broadcast_div(&e.sum_keepdim(D::Minus1)?)?
        .to_dtype(v.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn inputs() -> Result<[Var; 3]> {
        let dev = Device::Cpu;
        let t = || Var::randn(0f32, 1., (2, 3, 5, 8), &dev);
        Ok([t()?, t()?, t()?])
    }

    #[test]
    fn equals_softmax_then_matmul() -> Result<()> {
        let [q, k, v] = inputs()?;
        let mask = key_padding_mask(&[5, 3], 5, &Device::Cpu)?;
        let got = attention(&q, &k, &v, mask.as_ref())?;
        let scores = (q.matmul(&k.t()?)? / 8f64.sqrt())?.broadcast_add(mask.as_ref().unwrap())?;
        let want = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&v)?;
        let err = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-6, "{err}");
        Ok(())
    }

    #[test]
    fn has_a_gradient_for_q_k_and_v() -> Result<()> {
        let [q, k, v] = inputs()?;
        let grads = attention(&q, &k, &v, None)?.sqr()?.sum_all()?.backward()?;
        for x in [&q, &k, &v] {
            let g = grads.get(x).expect("a gradient");
            assert!(g.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        }
        Ok(())
    }
}
