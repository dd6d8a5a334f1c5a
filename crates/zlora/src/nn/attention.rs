//! Scaled dot-product attention with the scores and the softmax in f32, and its backward.
//!
//! Precision, whatever the compute dtype: q and k are widened to f32 before q·kᵀ, so the
//! scores are never rounded to bf16/f16 (a bf16 score of magnitude 10 is off by up to 0.03,
//! which moves its probability by 3 %), and the softmax runs on f32 scores; PyTorch's SDPA
//! kernels keep the scores in f32 the same way. The probabilities then go back to the compute
//! dtype for P·v, as flash attention and SDPA's math path do: that rounding is relative (at
//! most 2⁻⁸ of each probability) and averages out over the keys. The backward mirrors it:
//! dP = dO·vᵀ in f32 (its row sums Σ dP⊙P cancel against dP), dS in the compute dtype for dq
//! and dk. docs/gpu.md has the measured effect and the cost on a GPU.

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

/// The most attention scores the composed path materialises at once: heads are processed in
/// chunks below it, which bounds the f32 score-sized intermediates (a 1024 px image has
/// about 19 M scores per head).
pub const MAX_CHUNK_SCORES: usize = 1 << 26;

/// Chunks of heads, (first, count), each within `budget` scores (at least one head).
fn head_chunks(q: &Tensor, k: &Tensor, budget: usize) -> Result<Vec<(usize, usize)>> {
    let (b, h, s, _) = q.dims4()?;
    let per_head = b * s * k.dim(2)?;
    let size = (budget / per_head.max(1)).clamp(1, h.max(1));
    Ok((0..h).step_by(size).map(|i| (i, size.min(h - i))).collect())
}

fn heads(t: &Tensor, (first, count): (usize, usize)) -> Result<Tensor> {
    t.narrow(1, first, count)
}

/// The output P·v and, when it is kept, P = softmax(q·kᵀ/√d + mask) (f32), for q, k, v of
/// shape (B, H, S, D). P is kept when it fits in one chunk (`MAX_CHUNK_SCORES`; always by
/// the CPU kernel); otherwise the backward recomputes it chunk by chunk, as flash attention
/// does. The softmax is candle's fused kernel with our backward.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Result<(Tensor, Option<Tensor>)> {
    if let Some((out, probs)) = super::cpu::attention(q, k, v, mask)? {
        return Ok((out, Some(probs)));
    }
    composed(q, k, v, mask, MAX_CHUNK_SCORES)
}

fn composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    budget: usize,
) -> Result<(Tensor, Option<Tensor>)> {
    let chunks = head_chunks(q, k, budget)?;
    if let [_] = chunks[..] {
        let (out, probs) = attend(q, k, v, mask)?;
        return Ok((out, Some(probs)));
    }
    let outs = chunks
        .into_iter()
        .map(|c| Ok(attend(&heads(q, c)?, &heads(k, c)?, &heads(v, c)?, mask)?.0))
        .collect::<Result<Vec<_>>>()?;
    Ok((Tensor::cat(&outs, 1)?, None))
}

/// softmax(q·kᵀ/√d + mask)·v for any additive f32 mask that broadcasts to (B, H, S, S), such
/// as a causal one: the composed ops on every device, the probabilities not kept.
pub fn masked_attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: &Tensor) -> Result<Tensor> {
    Ok(attend(q, k, v, Some(mask))?.0)
}

/// P·v and P for one chunk of heads.
fn attend(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<(Tensor, Tensor)> {
    let probs = probabilities(q, k, mask)?;
    let out = probs.to_dtype(v.dtype())?.matmul(&v.contiguous()?)?;
    Ok((out, probs))
}

/// softmax(q·kᵀ/√d + mask), all in f32 (q and k widened first).
fn probabilities(q: &Tensor, k: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let (q, k) = (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?);
    let scores = (&q * scale(&q)?)?.matmul(&k.contiguous()?.t()?)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    softmax_last_dim(&scores)
}

fn scale(q: &Tensor) -> Result<f64> {
    Ok(1.0 / (q.dim(D::Minus1)? as f64).sqrt())
}

/// The gradients of q, k and v for the output gradient `d_out`, from the saved inputs and
/// the probabilities (kept, or recomputed per chunk of heads): dv = Pᵀ·dO,
/// dS = P ⊙ (dP − Σ dP⊙P) with dP = dO·vᵀ, dq = dS·k/√d and dk = dSᵀ·q/√d.
pub fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: Option<&Tensor>,
    mask: Option<&Tensor>,
    d_out: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    if let Some(p) = probs {
        if let Some(fused) = super::cpu::attention_backward(q, k, v, p, d_out)? {
            return Ok(fused);
        }
        return chunk_backward(q, k, v, p, d_out);
    }
    recomputing_backward(q, k, v, mask, d_out, MAX_CHUNK_SCORES)
}

fn recomputing_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    d_out: &Tensor,
    budget: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (mut dq, mut dk, mut dv) = (Vec::new(), Vec::new(), Vec::new());
    for c in head_chunks(q, k, budget)? {
        let (qc, kc) = (heads(q, c)?, heads(k, c)?);
        let p = probabilities(&qc, &kc, mask)?;
        let grads = chunk_backward(&qc, &kc, &heads(v, c)?, &p, &heads(d_out, c)?)?;
        dq.push(grads.0);
        dk.push(grads.1);
        dv.push(grads.2);
    }
    Ok((
        Tensor::cat(&dq, 1)?,
        Tensor::cat(&dk, 1)?,
        Tensor::cat(&dv, 1)?,
    ))
}

fn chunk_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    probs: &Tensor,
    d_out: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dtype = v.dtype();
    let d_out = d_out.contiguous()?;
    let dv = probs.to_dtype(dtype)?.t()?.matmul(&d_out)?;
    let v32 = v.to_dtype(DType::F32)?.contiguous()?;
    let dp = d_out.to_dtype(DType::F32)?.matmul(&v32.t()?)?;
    let ds = (softmax_backward(probs, &dp)? * scale(q)?)?.to_dtype(dtype)?;
    let dq = ds.matmul(&k.contiguous()?)?;
    let dk = ds.t()?.matmul(&q.contiguous()?)?;
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
        let (got, probs) = attention(&q, &k, &v, mask.as_ref())?;
        assert!(probs.is_some(), "small enough to keep");
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
        let probs = probs.expect("kept").detach();
        // With the kept probabilities, and recomputed (the path of large inputs).
        for kept in [Some(&probs), None] {
            let by_hand = attention_backward(&q, &k, &v, kept, mask.as_ref(), &probe)?;
            for (x, g) in [&q, &k, &v]
                .into_iter()
                .zip([by_hand.0, by_hand.1, by_hand.2])
            {
                let want = grads.get(x).expect("a gradient");
                assert!(want.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
                let err = (want - g)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(err < 1e-5, "{err}");
            }
        }
        Ok(())
    }

    #[test]
    fn bf16_scores_and_softmax_are_f32() -> Result<()> {
        // Scores up to about 15: rounded to bf16 they would be off by up to 0.03 and their
        // probabilities by up to 3 %.
        let dev = Device::Cpu;
        let t = |s: f64| (Tensor::randn(0f32, 1., (2, 3, 5, 8), &dev)? * s)?.to_dtype(DType::BF16);
        let (q, k, v) = (t(5.0)?, t(1.0)?, t(1.0)?);
        let (out, probs) = attention(&q, &k, &v, None)?;
        assert_eq!(
            (out.dtype(), probs.as_ref().map(|p| p.dtype())),
            (DType::BF16, Some(DType::F32))
        );
        let (q, k) = (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?);
        let want = softmax_last_dim(&(q.matmul(&k.t()?)? / 8f64.sqrt())?)?;
        let err = (probs.expect("kept") - want)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(err < 1e-6, "{err}");
        Ok(())
    }

    #[test]
    fn heads_are_chunked_under_the_score_budget() -> Result<()> {
        let q = Tensor::zeros((1, 30, 4352, 2), DType::F32, &Device::Cpu)?;
        let chunks = head_chunks(&q, &q, MAX_CHUNK_SCORES)?;
        assert_eq!(chunks.len(), 10);
        assert!(chunks
            .iter()
            .all(|&(_, n)| n * 4352 * 4352 <= MAX_CHUNK_SCORES));
        assert_eq!(chunks.iter().map(|c| c.1).sum::<usize>(), 30);
        Ok(())
    }

    #[test]
    fn chunks_of_one_head_give_the_same_output_and_gradients() -> Result<()> {
        let [q, k, v] = inputs()?;
        let mask = key_padding_mask(&[5, 3], 5, &Device::Cpu)?;
        let (whole, probs) = composed(&q, &k, &v, mask.as_ref(), 1 << 20)?;
        let (chunked, none) = composed(&q, &k, &v, mask.as_ref(), 1)?;
        assert!(none.is_none());
        let err = (whole - chunked)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(err < 1e-6, "{err}");
        let g = Tensor::randn(0f32, 1., (2, 3, 5, 8), &Device::Cpu)?;
        let kept = chunk_backward(&q, &k, &v, &probs.expect("kept"), &g)?;
        let recomputed = recomputing_backward(&q, &k, &v, mask.as_ref(), &g, 1)?;
        for (a, b) in [
            (kept.0, recomputed.0),
            (kept.1, recomputed.1),
            (kept.2, recomputed.2),
        ] {
            let err = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(err < 1e-5, "{err}");
        }
        Ok(())
    }
}
