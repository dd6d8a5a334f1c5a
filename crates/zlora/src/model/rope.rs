//! Z-Image's 3-axis rotary position embedding (reference §2.5).
//!
//! Each token has a position (p0, p1, p2): caption tokens (k+1, 0, 0); image tokens
//! (caption padded length + 1, h, w); image pad tokens (0, 0, 0). Axis a with d_a dims gets
//! d_a/2 frequencies ω = θ^(−2i/d_a); the angles are formed in f64 and rounded to f32 as the
//! reference does, and the rotation pairs interleaved elements (2i, 2i+1) in f32:
//! (x₀, x₁) → (x₀·cos − x₁·sin, x₁·cos + x₀·sin) — candle's fused interleaved RoPE, with the
//! backward of `nn::fused`.

use candle_core::{DType, Device, Result, Tensor};

/// One token's position on the three axes.
pub type Position = [usize; 3];

#[derive(Debug, Clone)]
pub struct RopeEmbedder {
    theta: f64,
    axes_dims: Vec<usize>,
    axes_lens: Vec<usize>,
}

/// Every token's rotation: cos θ and sin θ per pair of elements, each (S, head_dim / 2) (or
/// (B, S, head_dim / 2) for a batch), f32.
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
        let pairs: usize = self.axes_dims.iter().sum::<usize>() / 2;
        let mut cos = Vec::with_capacity(positions.len() * pairs);
        let mut sin = Vec::with_capacity(positions.len() * pairs);
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
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let shape = (positions.len(), pairs);
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

    /// Rotates x of shape (B, S, H, D) and returns it heads first, (B, H, S, D), in x's
    /// dtype (the rotation itself runs in f32, candle's fused kernel with our backward).
    pub fn rotate_heads(&self, x: &Tensor) -> Result<Tensor> {
        let heads_first = x.to_dtype(DType::F32)?.transpose(1, 2)?;
        crate::nn::fused::rope_interleaved(&heads_first, &self.cos, &self.sin)?.to_dtype(x.dtype())
    }

    /// The gradient of `rotate_heads`' input for the gradient g (B, H, S, D) of its output.
    pub fn rotate_heads_backward(&self, g: &Tensor) -> Result<Tensor> {
        let g32 = g.to_dtype(DType::F32)?;
        crate::nn::fused::rope_interleaved_backward(&g32, &self.cos, &self.sin)?
            .to_dtype(g.dtype())?
            .transpose(1, 2)
    }
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
        let got = rot.rotate_heads(&x)?;
        assert_eq!(got.dims(), &[1, 3, 2, 8]);
        let (xs, ys) = (
            x.flatten_all()?.to_vec1::<f32>()?,
            got.transpose(1, 2)?.flatten_all()?.to_vec1::<f32>()?,
        );
        let (cos, sin) = (
            rot.cos.flatten_all()?.to_vec1::<f32>()?,
            rot.sin.flatten_all()?,
        );
        let sin = sin.to_vec1::<f32>()?;
        for (i, pair) in xs.chunks(2).enumerate() {
            // Pair i belongs to token i / 12 (3 heads of 4 pairs) and is pair i % 4 of a head.
            let r = (i / 12) * 4 + i % 4;
            let (c, s) = (cos[r], sin[r]);
            let tol = 1e-6 * (1.0 + pair[0].abs() + pair[1].abs());
            assert!((ys[2 * i] - (pair[0] * c - pair[1] * s)).abs() < tol);
            assert!((ys[2 * i + 1] - (pair[1] * c + pair[0] * s)).abs() < tol);
        }
        // The hand-written backward equals autograd's.
        let probe = Tensor::randn(0f32, 1., got.shape(), &dev)?;
        let grads = (&got * &probe)?.sum_all()?.backward()?;
        let by_hand = rot.rotate_heads_backward(&probe)?;
        let diff = (grads.get(&x).expect("a gradient") - by_hand)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }
}
