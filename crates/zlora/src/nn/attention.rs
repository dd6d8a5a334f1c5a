//! Scaled dot-product attention with the softmax in f32, and its backward.

use candle_core::{DType, Result, Tensor, D};

use super::fused::{softmax_backward, softmax_last_dim};

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

/// The attention probabilities P = softmax(q·kᵀ/√d + mask) (f32) and the output P·v, for q,
/// k, v of shape (B, H, S, D). The softmax is candle's fused kernel with our backward.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    if let Some(fused) = super::cpu::attention(q, k, v, mask)? {
        return Ok(fused);
    }
    let scores = (q * scale(q)?)?
        .matmul(&k.contiguous()?.t()?)?
        .to_dtype(DType::F32)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    let probs = softmax_last_dim(&scores)?;
    let out = probs.to_dtype(v.dtype())?.matmul(&v.contiguous()?)?;
    Ok((out, probs))
}

fn scale(q: &Tensor) -> Result<f64> {
    Ok(1.0 / (q.dim(D::Minus1)? as f64).sqrt())
}

/// The gradients of q, k and v for the output gradient `d_out`, from the saved inputs and
/// probabilities: dv = Pᵀ·dO, dS = P ⊙ (dP − Σ dP⊙P) with dP = dO·vᵀ, dq = dS·k/√d and
/// dk = dSᵀ·q/√d.
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    d_out: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    if let Some(fused) = super::cpu::attention_backward(q, k, v, probs, d_out)? {
        return Ok(fused);
    }
    let dtype = v.dtype();
    let d_out = d_out.contiguous()?;
    let dv = probs.to_dtype(dtype)?.t()?.matmul(&d_out)?;
    let dp = d_out.matmul(&v.t()?)?.to_dtype(DType::F32)?;
    let ds = (softmax_backward(probs, &dp)? * scale(q)?)?.to_dtype(dtype)?;
    let dq = ds.matmul(k)?;
    let dk = ds.t()?.matmul(q)?;
    Ok((dq, dk, dv))
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
        let (got, _) = attention(&q, &k, &v, mask.as_ref())?;
        let scores = (q.matmul(&k.t()?)? / 8f64.sqrt())?.broadcast_add(mask.as_ref().unwrap())?;
        let e = scores
            .broadcast_sub(&scores.max_keepdim(D::Minus1)?)?
            .exp()?;
        let want = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?.matmul(&v)?;
        let err = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-6, "{err}");
        Ok(())
    }

    #[test]
    fn the_backward_equals_autograd() -> Result<()> {
        let [q, k, v] = inputs()?;
        let mask = key_padding_mask(&[5, 3], 5, &Device::Cpu)?;
        let (out, probs) = attention(&q, &k, &v, mask.as_ref())?;
        let probe = Tensor::randn(0f32, 1., out.shape(), &Device::Cpu)?;
        let grads = (out * &probe)?.sum_all()?.backward()?;
        let by_hand = attention_backward(&q, &k, &v, &probs.detach(), &probe)?;
        for (x, g) in [&q, &k, &v]
            .into_iter()
            .zip([by_hand.0, by_hand.1, by_hand.2])
        {
            let want = grads.get(x).expect("a gradient");
            assert!(want.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
            let err = (want - g)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-5, "{err}");
        }
        Ok(())
    }
}
