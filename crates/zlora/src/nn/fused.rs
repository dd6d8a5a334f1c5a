//! Fast paths with a backward: candle's fused kernels (RMSNorm, softmax, interleaved RoPE —
//! on the CPU, CUDA and Metal) compute the forward pass, and a hand-written backward supplies
//! the gradient those kernels lack (candle builds them without one, so gradients would
//! silently stop there).
//!
//! The trick: the fused result is computed first without a graph, then attached to its inputs
//! by a custom op whose forward hands back (a copy of) that result and whose backward is the
//! analytic derivative, written with composed ops. When no input needs a gradient (inference)
//! the fused result is returned as it is.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D,
};

/// A result computed elsewhere, returned as the op's output.
struct Precomputed<B> {
    name: &'static str,
    value: Tensor,
    backward: B,
}

impl<B> Precomputed<B> {
    fn new(name: &'static str, value: Tensor, backward: B) -> Result<Self> {
        let (_, layout) = value.storage_and_layout();
        let fresh = layout.is_contiguous() && layout.start_offset() == 0;
        let value = if fresh { value.clone() } else { value.copy()? };
        Ok(Self {
            name,
            value,
            backward,
        })
    }

    fn storage(&self) -> Result<Storage> {
        let (storage, layout) = self.value.storage_and_layout();
        storage.try_clone(layout)
    }

    fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        match self.storage()? {
            Storage::Cpu(s) => Ok((s, self.value.shape().clone())),
            _ => candle_core::bail!("{}: result and input are on different devices", self.name),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        match self.storage()? {
            Storage::Cuda(s) => Ok((s, self.value.shape().clone())),
            _ => candle_core::bail!("{}: result and input are on different devices", self.name),
        }
    }

    #[cfg(feature = "metal")]
    fn metal(&self) -> Result<(candle_core::MetalStorage, Shape)> {
        match self.storage()? {
            Storage::Metal(s) => Ok((s, self.value.shape().clone())),
            _ => candle_core::bail!("{}: result and input are on different devices", self.name),
        }
    }
}

type Backward1 = Box<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;
type Backward2 = Box<dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<(Tensor, Tensor)> + Send + Sync>;

/// Generates the device forwards ("return the precomputed value") of a custom op impl.
macro_rules! precomputed_forwards {
    ($($arg:ident: $ty:ident),*) => {
        fn name(&self) -> &'static str {
            self.name
        }
        fn cpu_fwd(&self, $($arg: &CpuStorage, $ty: &Layout),*) -> Result<(CpuStorage, Shape)> {
            let _ = ($($arg, $ty),*);
            self.cpu()
        }
        #[cfg(feature = "cuda")]
        fn cuda_fwd(&self, $($arg: &candle_core::CudaStorage, $ty: &Layout),*) -> Result<(candle_core::CudaStorage, Shape)> {
            let _ = ($($arg, $ty),*);
            self.cuda()
        }
        #[cfg(feature = "metal")]
        fn metal_fwd(&self, $($arg: &candle_core::MetalStorage, $ty: &Layout),*) -> Result<(candle_core::MetalStorage, Shape)> {
            let _ = ($($arg, $ty),*);
            self.metal()
        }
    };
}

/// One differentiable input; the backward maps (input, output grad) to the input's grad.
impl CustomOp1 for Precomputed<Backward1> {
    precomputed_forwards!(s1: l1);
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        (self.backward)(arg, grad).map(Some)
    }
}

/// Two differentiable inputs (x and a weight).
impl CustomOp2 for Precomputed<Backward2> {
    precomputed_forwards!(s1: l1, s2: l2);
    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (ga, gb) = (self.backward)(a, b, grad)?;
        Ok((Some(ga), Some(gb)))
    }
}

/// x and two constants (RoPE's cos and sin): only x gets a gradient.
impl CustomOp3 for Precomputed<Backward1> {
    precomputed_forwards!(s1: l1, s2: l2, s3: l3);
    fn bwd(
        &self,
        a: &Tensor,
        _b: &Tensor,
        _c: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.backward)(a, grad)?), None, None))
    }
}

/// RMSNorm over the last dimension, y = x · r · w with r = 1/√(mean(x²) + eps); statistics in
/// f32 (the fused kernels accumulate in f32 for every dtype).
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = w.to_dtype(x.dtype())?;
    let value = match super::cpu::rms_norm(&x, &w, eps)? {
        Some(value) => value,
        None => candle_nn::ops::rms_norm(&x, &w, eps as f32)?,
    };
    if !x.track_op() && !w.track_op() {
        return Ok(value);
    }
    let backward: Backward2 = Box::new(move |x, w, g| rms_norm_backward(x, w, g, eps));
    x.apply_op2(&w, Precomputed::new("zlora-rms-norm", value, backward)?)
}

/// 1/√(mean(x²) + eps) per row of an f32 x.
fn inverse_rms(x: &Tensor, eps: f64) -> Result<Tensor> {
    (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()
}

/// RMSNorm's input gradient, ∂/∂x = r·(u − x·r²·mean(u·x)) with u = g·w, in x's dtype.
pub fn rms_norm_input_grad(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Result<Tensor> {
    if let Some(gx) = super::cpu::rms_norm_input_grad(x, w, g, eps)? {
        return Ok(gx);
    }
    let x32 = x.to_dtype(DType::F32)?;
    let r = inverse_rms(&x32, eps)?;
    let u = g
        .to_dtype(DType::F32)?
        .broadcast_mul(&w.to_dtype(DType::F32)?)?;
    let mean_ux = (&u * &x32)?.mean_keepdim(D::Minus1)?;
    (u - x32.broadcast_mul(&(r.sqr()? * mean_ux)?)?)?
        .broadcast_mul(&r)?
        .to_dtype(x.dtype())
}

/// Both gradients: the input's and ∂/∂w = Σ_rows g·x·r.
fn rms_norm_backward(x: &Tensor, w: &Tensor, g: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
    let gx = rms_norm_input_grad(x, w, g, eps)?;
    let x32 = x.to_dtype(DType::F32)?;
    let rows = g.elem_count() / w.elem_count();
    let gw = (g.to_dtype(DType::F32)? * x32.broadcast_mul(&inverse_rms(&x32, eps)?)?)?
        .reshape((rows, w.elem_count()))?
        .sum(0)?
        .reshape(w.shape())?;
    Ok((gx, gw.to_dtype(w.dtype())?))
}

/// Softmax over the last dimension (call it on f32 scores: bf16 kernels sum in bf16).
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let value = candle_nn::ops::softmax_last_dim(&x)?;
    if !x.track_op() {
        return Ok(value);
    }
    let y = value.clone();
    let backward: Backward1 = Box::new(move |_x, g| softmax_backward(&y, g));
    x.apply_op1(Precomputed::new("zlora-softmax", value, backward)?)
}

/// The softmax's input gradient from its output y: y ⊙ (g − Σ g⊙y).
pub fn softmax_backward(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    let gy = (g * y)?;
    y * g.broadcast_sub(&gy.sum_keepdim(D::Minus1)?)?
}

/// Interleaved RoPE (pairs (2i, 2i+1)) of x (B, H, S, D) by cos/sin (B, S, D/2) in f32.
pub fn rope_interleaved(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let (cos, sin) = (cos.contiguous()?, sin.contiguous()?);
    let value = candle_nn::rotary_emb::rope_i(&x, &cos, &sin)?;
    if !x.track_op() {
        return Ok(value);
    }
    let (c, s) = (cos.clone(), sin.clone());
    let backward: Backward1 = Box::new(move |_x, g| rope_interleaved_backward(g, &c, &s));
    x.apply_op3(&cos, &sin, Precomputed::new("zlora-rope", value, backward)?)
}

/// RoPE's input gradient: a rotation's transpose is the rotation by −θ.
pub fn rope_interleaved_backward(g: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    candle_nn::rotary_emb::rope_i(&g.contiguous()?, cos, &sin.neg()?)
}

/// x · w for a frozen w: only x gets a gradient (g · wᵀ). candle's matmul backward also
/// computes the gradient of the weight, an extra matmul as large as the forward one, which a
/// frozen base weight never needs.
pub fn frozen_matmul(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let value = super::cpu::matmul(&x.detach(), w)?;
    let w = w.clone();
    frozen_product(x, value, Box::new(move |_x, g| g.broadcast_matmul(&w.t()?)))
}

/// x · Wᵀ for a quantized frozen W (whose kernels have no backward): the input gradient
/// g · W dequantizes this one weight.
pub fn quantized_matmul(x: &Tensor, w: &super::quant::QuantWeight) -> Result<Tensor> {
    let value = w.forward(&x.detach())?;
    let w = w.clone();
    frozen_product(
        x,
        value,
        Box::new(move |_x, g| g.broadcast_matmul(&w.dequantize(g.dtype())?)),
    )
}

/// A frozen product's `value`, attached to `x` with `input_grad` as its backward when x
/// records a graph.
fn frozen_product(x: &Tensor, value: Tensor, input_grad: Backward1) -> Result<Tensor> {
    if !x.track_op() {
        return Ok(value);
    }
    x.apply_op1(Precomputed::new("zlora-frozen-matmul", value, input_grad)?)
}

#[cfg(test)]
mod tests {
    //! Each fast path against the composed ops it replaces: same values, same gradients.
    use super::*;
    use candle_core::{Device, Var};

    /// RMSNorm from elementary ops.
    fn composed_rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        x.broadcast_mul(&inverse_rms(x, eps)?)?.broadcast_mul(w)
    }

    fn randn(shape: &[usize], seed: u64) -> Result<Tensor> {
        let mut rng = <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(seed);
        crate::train::objective::gaussian_like(
            &Tensor::zeros(shape, DType::F32, &Device::Cpu)?,
            &mut rng,
        )
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.max_all()?.to_scalar::<f32>()
    }

    /// Value and gradients (w.r.t. every var) of Σ f(vars)·probe.
    fn value_and_grads(
        f: impl Fn(&[Tensor]) -> Result<Tensor>,
        vars: &[Var],
        probe: &Tensor,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let inputs: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let y = f(&inputs)?;
        let grads = (&y * probe)?.sum_all()?.backward()?;
        let g = vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned().expect("gradient"))
            .collect();
        Ok((y, g))
    }

    fn check(
        fast: impl Fn(&[Tensor]) -> Result<Tensor>,
        slow: impl Fn(&[Tensor]) -> Result<Tensor>,
        vars: &[Var],
        out_shape: &[usize],
    ) -> Result<()> {
        let probe = randn(out_shape, 99)?;
        let (yf, gf) = value_and_grads(fast, vars, &probe)?;
        let (ys, gs) = value_and_grads(slow, vars, &probe)?;
        assert!(
            max_diff(&yf, &ys)? < 1e-5,
            "values differ by {}",
            max_diff(&yf, &ys)?
        );
        for (a, b) in gf.iter().zip(&gs) {
            let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
            assert!(
                max_diff(a, b)? / scale < 1e-5,
                "gradients differ by {}",
                max_diff(a, b)?
            );
        }
        Ok(())
    }

    #[test]
    fn frozen_matmul_matches_matmul_and_its_input_gradient() -> Result<()> {
        let x = Var::from_tensor(&randn(&[2, 5, 16], 6)?)?;
        let w = randn(&[12, 16], 7)?.t()?;
        check(
            |t| frozen_matmul(&t[0], &w),
            |t| t[0].broadcast_matmul(&w),
            &[x],
            &[2, 5, 12],
        )
    }

    #[test]
    fn rms_norm_matches_the_composed_op_and_its_gradients() -> Result<()> {
        let x = Var::from_tensor(&randn(&[2, 5, 16], 1)?)?;
        let w = Var::from_tensor(&(randn(&[16], 2)? + 1.0)?)?;
        check(
            |t| rms_norm(&t[0], &t[1], 1e-5),
            |t| composed_rms_norm(&t[0], &t[1], 1e-5),
            &[x, w],
            &[2, 5, 16],
        )
    }

    #[test]
    fn softmax_matches_the_composed_op_and_its_gradient() -> Result<()> {
        let x = Var::from_tensor(&(randn(&[2, 3, 7, 7], 3)? * 3.0)?)?;
        let composed = |t: &[Tensor]| {
            let e = t[0].broadcast_sub(&t[0].max_keepdim(D::Minus1)?)?.exp()?;
            e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
        };
        check(|t| softmax_last_dim(&t[0]), composed, &[x], &[2, 3, 7, 7])
    }

    #[test]
    fn rope_matches_the_composed_rotation_and_its_gradient() -> Result<()> {
        let x = Var::from_tensor(&randn(&[2, 3, 5, 8], 4)?)?;
        let angles = randn(&[2, 5, 4], 5)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        // (x₀, x₁) → (x₀·cos − x₁·sin, x₁·cos + x₀·sin) on the pairs of the last dimension.
        let composed = |t: &[Tensor]| {
            let pairs = t[0].reshape((2, 3, 5, 4, 2))?;
            let (x0, x1) = (pairs.narrow(4, 0, 1)?, pairs.narrow(4, 1, 1)?);
            let c = cos.unsqueeze(1)?.unsqueeze(4)?;
            let s = sin.unsqueeze(1)?.unsqueeze(4)?;
            let y0 = (x0.broadcast_mul(&c)? - x1.broadcast_mul(&s)?)?;
            let y1 = (x1.broadcast_mul(&c)? + x0.broadcast_mul(&s)?)?;
            Tensor::cat(&[y0, y1], 4)?.reshape((2, 3, 5, 8))
        };
        check(
            |t| rope_interleaved(&t[0], &cos, &sin),
            composed,
            &[x],
            &[2, 3, 5, 8],
        )
    }
}
