//! Z-Image's 3-axis rotary position embedding (reference §2.5).
//!
//! Each token has a position (p0, p1, p2): caption tokens (k+1, 0, 0); image tokens
//! (caption padded length + 1, h, w); image pad tokens (0, 0, 0). Axis a with d_a dims gets
//! d_a/2 frequencies ω = θ^(−2i/d_a); the angles are formed in f64 and rounded to f32 as the
//! reference does, and the rotation pairs interleaved elements (2i, 2i+1) in f32:
//! (x₀, x₁) → (x₀·cos − x₁·sin, x₁·cos + x₀·sin), computed as x·C + swap(x)·S with
//! C = (cos, cos) and S = (−sin, sin) per pair and swap(x) = (x₁, x₀) per pair.

use candle_core::{DType, Device, Result, Tensor, D};

/// One token's position on the three axes.
pub type Position = [usize; 3];

#[derive(Debug, Clone)]
pub struct RopeEmbedder {
    theta: f64,
    axes_dims: Vec<usize>,
    axes_lens: Vec<usize>,
}

/// Every token's rotation, each (S, head_dim), f32: `cos` holds (cos, cos) and `sin` holds
/// (−sin, sin) for each pair of elements.
#[derive(Debug, Clone)]
pub struct Rotation {
    pub cos: Tensor,
    pub sin: Tensor,
}

impl RopeEmbedder {
    pub fn new(theta: f64, axes_dims: &[usize], axes_lens: &[usize]) -> Self {
        Self {
            theta,
            axes_dims: axes_dims.to_vec(),
            axes_lens: axes_lens.to_vec(),
        }
    }

    /// The largest position each axis accepts (the reference's table sizes).
    pub fn axes_lens(&self) -> &[usize] {
        &self.axes_lens
    }

    pub fn rotation(&self, positions: &[Position], device: &Device) -> Result<Rotation> {
        let dim: usize = self.axes_dims.iter().sum();
        let mut cos = Vec::with_capacity(positions.len() * dim);
        let mut sin = Vec::with_capacity(positions.len() * dim);
        for pos in positions {
            for (axis, &d) in self.axes_dims.iter().enumerate() {
                if pos[axis] >= self.axes_lens[axis] {
                    candle_core::bail!(
                        "position {} on rope axis {axis} exceeds the table size {} (image or caption too large)",
                        pos[axis],
                        self.axes_lens[axis]
                    );
                }
                for i in 0..d / 2 {
                    let omega = 1.0 / self.theta.powf((2 * i) as f64 / d as f64);
                    let angle = (pos[axis] as f64 * omega) as f32;
                    cos.extend([angle.cos(); 2]);
                    sin.extend([-angle.sin(), angle.sin()]);
                }
            }
        }
        let shape = (positions.len(), dim);
        Ok(Rotation {
            cos: Tensor::from_vec(cos, shape, device)?,
            sin: Tensor::from_vec(sin, shape, device)?,
        })
    }
}

impl Rotation {
    /// Stacks per-item rotations (each (S, D)) into (B, S, D).
    pub fn stack(items: &[Rotation]) -> Result<Rotation> {
        let cos: Vec<Tensor> = items.iter().map(|r| r.cos.clone()).collect();
        let sin: Vec<Tensor> = items.iter().map(|r| r.sin.clone()).collect();
        Ok(Rotation {
            cos: Tensor::stack(&cos, 0)?,
            sin: Tensor::stack(&sin, 0)?,
        })
    }

    /// cos θ and sin θ once per pair, (B, S, D/2): the form candle's fused RoPE takes.
    pub fn half_angles(&self) -> Result<(Tensor, Tensor)> {
        let half = |t: &Tensor, at: usize| -> Result<Tensor> {
            let d = t.dim(D::Minus1)?;
            let mut shape = t.dims()[..t.rank() - 1].to_vec();
            shape.extend([d / 2, 2]);
            t.reshape(shape)?
                .narrow(D::Minus1, at, 1)?
                .squeeze(D::Minus1)?
                .contiguous()
        };
        Ok((half(&self.cos, 0)?, half(&self.sin, 1)?))
    }

    /// Rotates x of shape (B, S, H, D) with cos/sin of shape (B, S, D). On a GPU candle's
    /// fused kernel does it (with our backward); on the CPU the composed form below.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        if !x.device().is_cpu() {
            let (cos, sin) = self.half_angles()?;
            let heads_first = x.to_dtype(DType::F32)?.transpose(1, 2)?;
            let out = crate::nn::fused::rope_interleaved(&heads_first, &cos, &sin)?;
            return out.transpose(1, 2)?.to_dtype(x.dtype());
        }
        let (b, s, h, d) = x.dims4()?;
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?;
        // A permutation matrix moves each element exactly (candle's gather is much slower).
        let swapped = x
            .reshape((b * s * h, d))?
            .matmul(&pair_swap(d, x.device())?)?
            .reshape((b, s, h, d))?;
        let cos = self.cos.unsqueeze(2)?;
        let sin = self.sin.unsqueeze(2)?;
        (x.broadcast_mul(&cos)? + swapped.broadcast_mul(&sin)?)?.to_dtype(dtype)
    }
}

/// The (D, D) permutation matrix that swaps the elements of each pair: x·P = (x₁, x₀, x₃, …).
fn pair_swap(d: usize, device: &Device) -> Result<Tensor> {
    let p: Vec<f32> = (0..d * d)
        .map(|k| if k / d == (k % d) ^ 1 { 1.0 } else { 0.0 })
        .collect();
    Tensor::from_vec(p, (d, d), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn rotates_each_pair_and_has_a_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let rope = RopeEmbedder::new(256.0, &[2, 2, 4], &[16, 16, 16]);
        let rot = Rotation::stack(&[rope.rotation(&[[1, 2, 3], [4, 0, 5]], &dev)?])?;
        let x = Var::randn(0f32, 1., (1, 2, 3, 8), &dev)?;
        let got = rot.apply(&x)?;
        let (xs, ys) = (
            x.flatten_all()?.to_vec1::<f32>()?,
            got.flatten_all()?.to_vec1::<f32>()?,
        );
        let (cos, sin) = (
            rot.cos.flatten_all()?.to_vec1::<f32>()?,
            rot.sin.flatten_all()?,
        );
        let sin = sin.to_vec1::<f32>()?;
        for (i, pair) in xs.chunks(2).enumerate() {
            // Pair i belongs to token i / 12 (3 heads of 4 pairs) and is pair i % 4 of a head.
            let r = (i / 12) * 8 + (i % 4) * 2;
            let (c, s) = (cos[r], sin[r + 1]);
            assert_eq!(ys[2 * i], pair[0] * c - pair[1] * s);
            assert_eq!(ys[2 * i + 1], pair[1] * c + pair[0] * s);
        }
        let grads = got.sum_all()?.backward()?;
        assert!(grads.get(&x).is_some());
        Ok(())
    }
}
