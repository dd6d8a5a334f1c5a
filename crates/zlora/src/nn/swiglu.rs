//! The SwiGLU gate of the feed-forward, z = SiLU(u) ⊙ g, and its backward.

use candle_core::{Result, Tensor};

use super::cpu;

pub fn swiglu(u: &Tensor, g: &Tensor) -> Result<Tensor> {
    match cpu::swiglu(u, g)? {
        Some(z) => Ok(z),
        None => u.silu()? * g,
    }
}

/// ∂g = dz ⊙ SiLU(u), ∂u = dz ⊙ g ⊙ σ(u)·(1 + u·(1 − σ(u))).
pub fn swiglu_backward(u: &Tensor, g: &Tensor, dz: &Tensor) -> Result<(Tensor, Tensor)> {
    if let Some(grads) = cpu::swiglu_backward(u, g, dz)? {
        return Ok(grads);
    }
    let sig = candle_nn::ops::sigmoid(u)?;
    let u_sig = (u * &sig)?;
    let dg = (dz * &u_sig)?;
    let d_silu = (&sig * ((u - u_sig)? + 1.0)?)?;
    let du = ((dz * g)? * d_silu)?;
    Ok((du, dg))
}
