//! The blocks' backward pass, written by hand.
//!
//! Training runs each block's forward without an autograd graph (`Grad::ByHand`), keeping a
//! tape of the activations the backward needs, and then applies the chain rule stage by
//! stage below, in reverse. Compared with candle's autograd this keeps a dozen activations
//! per block instead of every intermediate of every composed op, and it never materialises
//! the zero-initialised gradient buffers candle adds each node's gradient into.
//!
//! Only the input's gradient and those of trainable adapters (LoRA factors that are `Var`s)
//! are computed: base weights and norm weights are frozen. The tests compare everything with
//! candle's autograd over the same forward (`Grad::Autograd`).

use candle_core::{DType, Result, Tensor, D};

use super::{times, Attention, FeedForward, TransformerBlock};
use crate::model::rope::Rotation;
use crate::nn::attention::attention_backward;
use crate::nn::swiglu::swiglu_backward;
use crate::nn::{Grads, Linear, RmsNorm};

/// Who computes the gradients of a forward pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grad {
    /// candle's autograd: every op records its graph.
    Autograd,
    /// [`TransformerBlock::backward`] (or no gradient at all: inference): the forward records
    /// no autograd graph, not even through trainable adapters, only its tape.
    ByHand,
}

impl Grad {
    pub(super) fn linear(self, linear: &Linear, x: &Tensor) -> Result<Tensor> {
        match self {
            Grad::Autograd => candle_core::Module::forward(linear, x),
            Grad::ByHand => linear.forward_untracked(x),
        }
    }
}

/// adaLN's scales (1 + s) and gates tanh(g), each (B, 1, dim), and their input c.
#[derive(Debug)]
pub(super) struct Modulation {
    c: Tensor,
    pub(super) scale_msa: Tensor,
    pub(super) gate_msa: Tensor,
    pub(super) scale_mlp: Tensor,
    pub(super) gate_mlp: Tensor,
}

impl Modulation {
    /// From the adaLN Linear's output m = W·c + b: scale_msa, gate_msa, scale_mlp, gate_mlp =
    /// chunk4(m).
    pub(super) fn new(m: Tensor, c: &Tensor) -> Result<Self> {
        let m = m.unsqueeze(1)?.chunk(4, D::Minus1)?;
        Ok(Self {
            c: c.clone(),
            scale_msa: (&m[0] + 1.0)?,
            gate_msa: m[1].tanh()?,
            scale_mlp: (&m[2] + 1.0)?,
            gate_mlp: m[3].tanh()?,
        })
    }

    /// ∂m from the gradients of the scales and gates (each (B, 1, dim), f32).
    fn backward(
        &self,
        [d_scale_msa, d_gate_msa, d_scale_mlp, d_gate_mlp]: [Tensor; 4],
    ) -> Result<Tensor> {
        let through_tanh = |d: Tensor, gate: &Tensor| -> Result<Tensor> {
            d * gate.to_dtype(DType::F32)?.sqr()?.affine(-1.0, 1.0)?
        };
        let parts = [
            d_scale_msa,
            through_tanh(d_gate_msa, &self.gate_msa)?,
            d_scale_mlp,
            through_tanh(d_gate_mlp, &self.gate_mlp)?,
        ];
        Tensor::cat(&parts, D::Minus1)?
            .squeeze(1)?
            .to_dtype(self.c.dtype())
    }
}

/// Σ over tokens of a ⊙ b, (B, S, dim) → (B, 1, dim) in f32.
fn token_sum(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    (a * b)?.to_dtype(DType::F32)?.sum_keepdim(1)
}

/// What one attention's backward needs: its input, the q/k projections before the qk-norm,
/// the rotated q and k and v (B, H, S, head_dim), the probabilities (f32) and key mask, and
/// the output before to_out (B, S, dim).
#[derive(Debug)]
pub struct AttentionTape {
    pub(super) x: Tensor,
    pub(super) q_proj: Tensor,
    pub(super) k_proj: Tensor,
    pub(super) q: Tensor,
    pub(super) k: Tensor,
    pub(super) v: Tensor,
    /// Kept when small enough (`nn::attention`), else recomputed.
    pub(super) probs: Option<Tensor>,
    pub(super) mask: Option<Tensor>,
    pub(super) out: Tensor,
}

/// The feed-forward's input and its w1 (u), w3 (g) and gated (z = SiLU(u) ⊙ g) activations.
#[derive(Debug)]
pub struct FeedForwardTape {
    pub(super) x: Tensor,
    pub(super) u: Tensor,
    pub(super) g: Tensor,
    pub(super) z: Tensor,
}

/// One block's saved activations: each norm's input and output, the sub-layers' tapes and
/// the modulation.
#[derive(Debug)]
pub struct BlockTape {
    pub(super) x: Tensor,
    pub(super) x_norm: Tensor,
    pub(super) attention: AttentionTape,
    pub(super) a: Tensor,
    pub(super) a_norm: Tensor,
    pub(super) x1: Tensor,
    pub(super) x1_norm: Tensor,
    pub(super) feed_forward: FeedForwardTape,
    pub(super) f: Tensor,
    pub(super) f_norm: Tensor,
    pub(super) modulation: Option<Modulation>,
}

impl TransformerBlock {
    /// The gradient of the block's input for the gradient of its output (when `input_grad`:
    /// the first block a backward pass reaches last needs none); trainable adapters add
    /// theirs to `grads`. The forward was
    /// x1 = x + gate_msa ⊙ norm2(attention(norm1(x) ⊙ scale_msa)),
    /// out = x1 + gate_mlp ⊙ ffn_norm2(feed_forward(ffn_norm1(x1) ⊙ scale_mlp)).
    pub fn backward(
        &self,
        tape: &BlockTape,
        rot: &Rotation,
        grad: &Tensor,
        grads: &mut Grads,
        input_grad: bool,
    ) -> Result<Option<Tensor>> {
        let train_modulation = self
            .ada_ln_modulation
            .as_ref()
            .is_some_and(Linear::has_trainable);
        let m = tape.modulation.as_ref();
        let d_f = norm_grad(&self.ffn_norm2, &tape.f, grad, m.map(|m| &m.gate_mlp))?;
        let d_ffn_in = self
            .feed_forward
            .backward(&tape.feed_forward, &d_f, grads)?;
        let d_x1 = (grad
            + norm_grad(
                &self.ffn_norm1,
                &tape.x1,
                &d_ffn_in,
                m.map(|m| &m.scale_mlp),
            )?)?;
        let d_a = norm_grad(
            &self.attention_norm2,
            &tape.a,
            &d_x1,
            m.map(|m| &m.gate_msa),
        )?;
        let d_attention_in = self.attention.backward(
            &tape.attention,
            rot,
            &d_a,
            grads,
            input_grad || train_modulation,
        )?;
        if let (Some(ada), Some(m), Some(d_in)) =
            (&self.ada_ln_modulation, m, d_attention_in.as_ref())
        {
            if train_modulation {
                let d_m = m.backward([
                    token_sum(d_in, &tape.x_norm)?,
                    token_sum(&d_x1, &tape.a_norm)?,
                    token_sum(&d_ffn_in, &tape.x1_norm)?,
                    token_sum(grad, &tape.f_norm)?,
                ])?;
                ada.param_grads(&m.c, &d_m, grads)?;
            }
        }
        match d_attention_in {
            Some(d_in) if input_grad => {
                let scale = m.map(|m| &m.scale_msa);
                let d_norm = norm_grad(&self.attention_norm1, &tape.x, &d_in, scale)?;
                Ok(Some((d_x1 + d_norm)?))
            }
            _ => Ok(None),
        }
    }
}

/// The gradient of x through norm(x) ⊙ s (a modulation's scale or gate, or 1), from the
/// gradient of the product.
fn norm_grad(norm: &RmsNorm, x: &Tensor, grad: &Tensor, scale: Option<&Tensor>) -> Result<Tensor> {
    norm.input_grad(x, &times(grad, scale)?)
}

impl Attention {
    /// The gradient of the attention's input for the gradient of its output (B, S, dim),
    /// when `input_grad`.
    fn backward(
        &self,
        tape: &AttentionTape,
        rot: &Rotation,
        grad: &Tensor,
        grads: &mut Grads,
        input_grad: bool,
    ) -> Result<Option<Tensor>> {
        let (b, s, dim) = grad.dims3()?;
        let d_out = self
            .to_out
            .backward(&tape.out, grad, grads)?
            .reshape((b, s, self.n_heads, dim / self.n_heads))?
            .transpose(1, 2)?;
        let (dq, dk, dv) = attention_backward(
            &tape.q,
            &tape.k,
            &tape.v,
            tape.probs.as_ref(),
            tape.mask.as_ref(),
            &d_out,
        )?;
        // Back through the rotation and the qk-norm to the projection's output.
        let d_proj = |d: &Tensor, proj: &Tensor, norm: &Option<RmsNorm>| -> Result<Tensor> {
            let d = rot.rotate_heads_backward(d)?;
            let d = match norm {
                Some(n) => n.input_grad(proj, &d)?,
                None => d,
            };
            d.reshape((b, s, dim))
        };
        let dq = d_proj(&dq, &tape.q_proj, &self.norm_q)?;
        let dk = d_proj(&dk, &tape.k_proj, &self.norm_k)?;
        let dv = dv.transpose(1, 2)?.reshape((b, s, dim))?;
        if !input_grad {
            for (linear, d) in [(&self.to_q, dq), (&self.to_k, dk), (&self.to_v, dv)] {
                linear.param_grads(&tape.x, &d, grads)?;
            }
            return Ok(None);
        }
        let dx_q = self.to_q.backward(&tape.x, &dq, grads)?;
        let dx_k = self.to_k.backward(&tape.x, &dk, grads)?;
        let dx_v = self.to_v.backward(&tape.x, &dv, grads)?;
        Ok(Some(((dx_q + dx_k)? + dx_v)?))
    }
}

impl FeedForward {
    fn backward(&self, tape: &FeedForwardTape, grad: &Tensor, grads: &mut Grads) -> Result<Tensor> {
        let dz = self.w2.backward(&tape.z, grad, grads)?;
        let (du, dg) = swiglu_backward(&tape.u, &tape.g, &dz)?;
        self.w1.backward(&tape.x, &du, grads)? + self.w3.backward(&tape.x, &dg, grads)?
    }
}
