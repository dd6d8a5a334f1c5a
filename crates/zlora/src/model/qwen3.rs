//! The Qwen3 decoder layer, as transformers' `Qwen3DecoderLayer`: pre-norm attention with a
//! per-head RMSNorm on queries and keys before RoPE, grouped-query attention, and a SwiGLU
//! MLP. Z-Image's text encoder (`model::text`) and Qwen3-VL's text decoder (`caption::text`)
//! both run it; they differ only in how they build the rotary tables and the mask, and the
//! captioner keeps a [`KvCache`] per layer. Module names are the checkpoint's
//! (`self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`, ...).

use candle_core::{Device, Module, Tensor};
use candle_nn::VarBuilder;

use crate::nn::attention::masked_attention;
use crate::nn::{Linear, Quantization, RmsNorm};
use crate::Result;

/// The sizes a decoder layer is built from, as both models' configs give them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LayerDims {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub attention_bias: bool,
}

impl LayerDims {
    /// (out, in) of the layer's seven projections, in checkpoint order (q, k, v, o, gate, up,
    /// down).
    pub fn projection_shapes(&self) -> [(usize, usize); 7] {
        let (h, i) = (self.hidden_size, self.intermediate_size);
        let q = self.num_attention_heads * self.head_dim;
        let kv = self.num_key_value_heads * self.head_dim;
        [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]
    }
}

/// RoPE's inverse frequencies θ^(−2i/head_dim), i < head_dim/2, in f32 as transformers
/// computes them (the exponent and the power in f32).
pub fn inverse_frequencies(head_dim: usize, theta: f64) -> Vec<f32> {
    let theta = theta as f32;
    (0..head_dim)
        .step_by(2)
        .map(|i| 1.0 / theta.powf(i as f32 / head_dim as f32))
        .collect()
}

/// Rotary tables in the half-split layout, in f32, broadcasting against (B, heads, L,
/// head_dim): (L, head_dim) for plain RoPE, (B, 1, L, head_dim) for M-RoPE.
pub struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    /// The tables of `angles`, whose last dimension is head_dim/2 (one angle per frequency):
    /// element i and element i + head_dim/2 turn by the same angle.
    pub fn from_angles(angles: &Tensor) -> Result<Self> {
        let angles = Tensor::cat(&[angles, angles], candle_core::D::Minus1)?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }

    /// x: (B, heads, L, head_dim), rotated in f32 and cast back.
    pub(crate) fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(crate::nn::rotary::rotate_half_split(
            x, &self.cos, &self.sin,
        )?)
    }
}

/// Additive f32 mask (B, 1, L, cached + L): new token i of sequence b sees the positions up
/// to itself, except b's left padding (`pads[b]` positions), which it never sees; a padding
/// position sees only itself (a row with no key at all would give NaN).
pub fn causal_mask(pads: &[usize], cached: usize, len: usize, device: &Device) -> Result<Tensor> {
    let keys = cached + len;
    let mask: Vec<f32> = pads
        .iter()
        .flat_map(|&pad| {
            (0..len).flat_map(move |i| {
                let query = cached + i;
                (0..keys).map(move |j| {
                    let seen = j <= query && (j >= pad || j == query);
                    if seen {
                        0.0
                    } else {
                        f32::NEG_INFINITY
                    }
                })
            })
        })
        .collect();
    Ok(Tensor::from_vec(mask, (pads.len(), 1, len, keys), device)?)
}

/// One layer's keys and values of the positions seen so far, (B, kv_heads, S, head_dim):
/// what generation carries from one step to the next.
#[derive(Default)]
pub struct KvCache(Option<(Tensor, Tensor)>);

impl KvCache {
    /// How many positions it holds.
    pub fn positions(&self) -> usize {
        self.0.as_ref().map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    /// The cached keys and values followed by the new ones, which it keeps.
    fn extend(&mut self, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let kv = match self.0.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v.contiguous()?),
        };
        self.0 = Some(kv.clone());
        Ok(kv)
    }
}

/// Grouped-query attention: each key/value head serves `n_rep` consecutive query heads.
fn repeat_kv(x: Tensor, n_rep: usize) -> Result<Tensor> {
    if n_rep == 1 {
        return Ok(x);
    }
    let (b, kv_heads, len, dim) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .expand((b, kv_heads, n_rep, len, dim))?
        .reshape((b, kv_heads * n_rep, len, dim))?)
}

struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn new(dims: &LayerDims, q: Option<Quantization>, vb: VarBuilder) -> Result<Self> {
        let (hidden, hd) = (dims.hidden_size, dims.head_dim);
        let (heads, kv_heads) = (dims.num_attention_heads, dims.num_key_value_heads);
        let proj = |shape, name| Linear::load(shape, dims.attention_bias, q, &vb.pp(name));
        let norm = |name| RmsNorm::load(vb.pp(name), hd, dims.rms_norm_eps);
        Ok(Self {
            q_proj: proj((hidden, heads * hd), "q_proj")?,
            k_proj: proj((hidden, kv_heads * hd), "k_proj")?,
            v_proj: proj((hidden, kv_heads * hd), "v_proj")?,
            o_proj: proj((heads * hd, hidden), "o_proj")?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            heads,
            kv_heads,
            head_dim: hd,
        })
    }

    /// (B, L, heads·head_dim) → (B, heads, L, head_dim).
    fn split_heads(&self, x: Tensor, heads: usize) -> Result<Tensor> {
        let (b, len, _) = x.dims3()?;
        Ok(x.reshape((b, len, heads, self.head_dim))?.transpose(1, 2)?)
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &Rotary,
        mask: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let (b, len, _) = x.dims3()?;
        let q = self.split_heads(self.q_proj.forward(x)?, self.heads)?;
        let k = self.split_heads(self.k_proj.forward(x)?, self.kv_heads)?;
        let v = self.split_heads(self.v_proj.forward(x)?, self.kv_heads)?;
        // The q/k norms act per head, before RoPE.
        let q = rope.apply(&self.q_norm.forward_cast_then_scale(&q)?)?;
        let k = rope.apply(&self.k_norm.forward_cast_then_scale(&k)?)?;
        let (k, v) = match cache {
            Some(cache) => cache.extend(k, v)?,
            None => (k, v),
        };
        let n_rep = self.heads / self.kv_heads;
        let k = repeat_kv(k, n_rep)?.contiguous()?;
        let v = repeat_kv(v, n_rep)?.contiguous()?;
        let out = masked_attention(&q, &k, &v, mask)?.transpose(1, 2)?;
        let out = out.reshape((b, len, self.heads * self.head_dim))?;
        Ok(self.o_proj.forward(&out)?)
    }
}

/// SwiGLU: down(silu(gate(x)) · up(x)).
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn new(dims: &LayerDims, q: Option<Quantization>, vb: VarBuilder) -> Result<Self> {
        let (hidden, inter) = (dims.hidden_size, dims.intermediate_size);
        let proj = |shape, name| Linear::load(shape, false, q, &vb.pp(name));
        Ok(Self {
            gate_proj: proj((hidden, inter), "gate_proj")?,
            up_proj: proj((hidden, inter), "up_proj")?,
            down_proj: proj((inter, hidden), "down_proj")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let gate = self.gate_proj.forward(x)?.silu()?;
        let up = self.up_proj.forward(x)?;
        Ok(self.down_proj.forward(&(gate * up)?)?)
    }
}

pub struct DecoderLayer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    /// The layer at `vb` (`...layers.N`), its projections stored as `quantize` says; the norms
    /// stay in the VarBuilder's dtype.
    pub fn new(dims: &LayerDims, quantize: Option<Quantization>, vb: VarBuilder) -> Result<Self> {
        let norm = |name| RmsNorm::load(vb.pp(name), dims.hidden_size, dims.rms_norm_eps);
        Ok(Self {
            input_layernorm: norm("input_layernorm")?,
            self_attn: Attention::new(dims, quantize, vb.pp("self_attn"))?,
            post_attention_layernorm: norm("post_attention_layernorm")?,
            mlp: Mlp::new(dims, quantize, vb.pp("mlp"))?,
        })
    }

    /// x: (B, L, hidden) → (B, L, hidden). With a cache, the keys and values of earlier
    /// positions take part and `mask` covers them (see [`causal_mask`]).
    pub fn forward(
        &self,
        x: &Tensor,
        rope: &Rotary,
        mask: &Tensor,
        cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let h = self.input_layernorm.forward_cast_then_scale(x)?;
        let x = (x + self.self_attn.forward(&h, rope, mask, cache)?)?;
        let h = self.post_attention_layernorm.forward_cast_then_scale(&x)?;
        Ok((&x + self.mlp.forward(&h)?)?)
    }

    /// The seven projections, in [`LayerDims::projection_shapes`]'s order.
    pub fn projections(&self) -> [&Linear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [
            &a.q_proj,
            &a.k_proj,
            &a.v_proj,
            &a.o_proj,
            &m.gate_proj,
            &m.up_proj,
            &m.down_proj,
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_is_never_a_key_and_sees_only_itself() {
        let mask = causal_mask(&[0, 2], 1, 3, &Device::Cpu).unwrap();
        let seen: Vec<Vec<Vec<bool>>> = mask
            .squeeze(1)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap()
            .into_iter()
            .map(|q| {
                q.into_iter()
                    .map(|r| r.into_iter().map(|v| v == 0.0).collect())
                    .collect()
            })
            .collect();
        let (t, f) = (true, false);
        // Unpadded: causal over the cached position and the three new ones.
        assert_eq!(
            seen[0],
            [[t, t, f, f], [t, t, t, f], [t, t, t, t]].map(Vec::from)
        );
        // Two padding positions (keys 0 and 1): query 1 is padding and sees only itself.
        assert_eq!(
            seen[1],
            [[f, t, f, f], [f, f, t, f], [f, f, t, t]].map(Vec::from)
        );
    }
}
