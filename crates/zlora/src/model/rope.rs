//! Z-Image's 3-axis rotary position embedding (reference §2.5).
//!
//! Each token has a position (p0, p1, p2): caption tokens (k+1, 0, 0); image tokens
//! (caption padded length + 1, h, w); image pad tokens (0, 0, 0). Axis a with d_a dims gets
//! d_a/2 frequencies ω = θ^(−2i/d_a); the angles are formed in f64 and rounded to f32 as the
//! reference does, and the rotation pairs interleaved elements (2i, 2i+1) in f32.

use candle_core::{DType, Device, Result, Tensor};

/// One token's position on the three axes.
pub type Position = [usize; 3];

#[derive(Debug, Clone)]
pub struct RopeEmbedder {
    theta: f64,
    axes_dims: Vec<usize>,
    axes_lens: Vec<usize>,
}

/// cos and sin of every token's angles, each (S, head_dim/2), f32.
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
        let half: usize = self.axes_dims.iter().sum::<usize>() / 2;
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
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
        let shape = (positions.len(), half);
        Ok(Rotation {
            cos: Tensor::from_vec(cos, shape, device)?,
            sin: Tensor::from_vec(sin, shape, device)?,
        })
    }
}

impl Rotation {
    /// Stacks per-item rotations (each (S, half)) into (B, S, half).
    pub fn stack(items: &[Rotation]) -> Result<Rotation> {
        let cos: Vec<Tensor> = items.iter().map(|r| r.cos.clone()).collect();
        let sin: Vec<Tensor> = items.iter().map(|r| r.sin.clone()).collect();
        Ok(Rotation {
            cos: Tensor::stack(&cos, 0)?,
            sin: Tensor::stack(&sin, 0)?,
        })
    }

    /// Rotates x of shape (B, S, H, D) with cos/sin of shape (B, S, D/2).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let (b, s, h, d) = x.dims4()?;
        let dtype = x.dtype();
        let pairs = x.to_dtype(DType::F32)?.reshape((b, s, h, d / 2, 2))?;
        let x0 = pairs.narrow(4, 0, 1)?.squeeze(4)?;
        let x1 = pairs.narrow(4, 1, 1)?.squeeze(4)?;
        let cos = self.cos.unsqueeze(2)?;
        let sin = self.sin.unsqueeze(2)?;
        let out0 = (x0.broadcast_mul(&cos)? - x1.broadcast_mul(&sin)?)?;
        let out1 = (x0.broadcast_mul(&sin)? + x1.broadcast_mul(&cos)?)?;
        Tensor::stack(&[out0, out1], 4)?
            .reshape((b, s, h, d))?
            .to_dtype(dtype)
    }
}
