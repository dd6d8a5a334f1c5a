//! Qwen3-VL's text decoder, as transformers' `Qwen3VLTextModel` + `lm_head`: Qwen3 layers
//! (q/k RMSNorm per head, grouped-query attention, SwiGLU) with interleaved M-RoPE (every
//! position has a (T, H, W) triple; frequency j follows H when j ≡ 1 mod 3 and W when
//! j ≡ 2 mod 3 within their sections, T otherwise), DeepStack features added to the image
//! positions after each of the first layers, and a key/value cache for generation.
//!
//! A batch holds several prompts left-padded to one length, as transformers' `generate` pads
//! them for decoder-only models: a padding position is masked out as a key for every query,
//! and attends only to itself (a row with no key at all would give NaN).

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};

use super::config::TextConfig;
use super::linear;
use crate::model::text::repeat_kv;
use crate::nn::attention::masked_attention;
use crate::nn::norm::RmsNorm;
use crate::nn::{Linear, Quantization};
use crate::Result;

/// Rotary tables for a run of positions: (B, 1, L, head_dim) cos and sin in f32.
pub struct MRope {
    cos: Tensor,
    sin: Tensor,
}

impl MRope {
    /// `positions[b][axis][l]`: the (T, H, W) position of token l of sequence b (all of one
    /// length).
    pub fn new(cfg: &TextConfig, positions: &[[Vec<i64>; 3]], device: &Device) -> Result<Self> {
        let dim = cfg.head_dim;
        let theta = cfg.rope_theta as f32;
        let inv_freq: Vec<f32> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / theta.powf(i as f32 / dim as f32))
            .collect();
        let axis = |j: usize| -> usize {
            let [_, h, w] = cfg.mrope_section;
            match j % 3 {
                1 if j < 3 * h => 1,
                2 if j < 3 * w => 2,
                _ => 0,
            }
        };
        let len = positions.first().map_or(0, |p| p[0].len());
        let angles: Vec<f32> = positions
            .iter()
            .flat_map(|seq| {
                let inv_freq = &inv_freq;
                (0..len).flat_map(move |l| {
                    let half = inv_freq
                        .iter()
                        .enumerate()
                        .map(move |(j, f)| seq[axis(j)][l] as f32 * f);
                    half.clone().chain(half)
                })
            })
            .collect();
        let angles = Tensor::from_vec(angles, (positions.len(), 1, len, dim), device)?;
        Ok(Self {
            cos: angles.cos()?,
            sin: angles.sin()?,
        })
    }

    /// x: (B, heads, L, head_dim), rotated in f32 and cast back.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(crate::nn::rotary::rotate_half_split(
            x, &self.cos, &self.sin,
        )?)
    }
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
    /// Keys and values of the positions seen so far, (B, kv_heads, S, head_dim).
    cache: Option<(Tensor, Tensor)>,
}

impl Attention {
    fn new(cfg: &TextConfig, vb: VarBuilder, q: Option<Quantization>) -> Result<Self> {
        let (d, hd, bias) = (cfg.hidden_size, cfg.head_dim, cfg.attention_bias);
        let (heads, kv_heads) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        Ok(Self {
            q_proj: linear(d, heads * hd, bias, vb.pp("q_proj"), q)?,
            k_proj: linear(d, kv_heads * hd, bias, vb.pp("k_proj"), q)?,
            v_proj: linear(d, kv_heads * hd, bias, vb.pp("v_proj"), q)?,
            o_proj: linear(heads * hd, d, bias, vb.pp("o_proj"), q)?,
            q_norm: RmsNorm::load(vb.pp("q_norm"), hd, cfg.rms_norm_eps)?,
            k_norm: RmsNorm::load(vb.pp("k_norm"), hd, cfg.rms_norm_eps)?,
            heads,
            kv_heads,
            head_dim: hd,
            cache: None,
        })
    }

    fn split(&self, x: Tensor, heads: usize) -> Result<Tensor> {
        let (b, len, _) = x.dims3()?;
        Ok(x.reshape((b, len, heads, self.head_dim))?.transpose(1, 2)?)
    }

    fn forward(&mut self, x: &Tensor, rope: &MRope, mask: &Tensor) -> Result<Tensor> {
        let (b, len, _) = x.dims3()?;
        let q = self.split(self.q_proj.forward(x)?, self.heads)?;
        let k = self.split(self.k_proj.forward(x)?, self.kv_heads)?;
        let v = self.split(self.v_proj.forward(x)?, self.kv_heads)?;
        let q = rope.apply(&self.q_norm.forward(&q.contiguous()?)?)?;
        let k = rope.apply(&self.k_norm.forward(&k.contiguous()?)?)?;
        let (k, v) = match self.cache.take() {
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
            None => (k, v.contiguous()?),
        };
        self.cache = Some((k.clone(), v.clone()));
        let n_rep = self.heads / self.kv_heads;
        let k = repeat_kv(k, n_rep)?.contiguous()?;
        let v = repeat_kv(v, n_rep)?.contiguous()?;
        let out = masked_attention(&q, &k, &v, mask)?;
        let out = out
            .transpose(1, 2)?
            .reshape((b, len, self.heads * self.head_dim))?;
        Ok(self.o_proj.forward(&out)?)
    }
}

struct Layer {
    input_layernorm: RmsNorm,
    self_attn: Attention,
    post_attention_layernorm: RmsNorm,
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Layer {
    fn new(cfg: &TextConfig, vb: VarBuilder, q: Option<Quantization>) -> Result<Self> {
        let (d, inter, eps) = (cfg.hidden_size, cfg.intermediate_size, cfg.rms_norm_eps);
        Ok(Self {
            input_layernorm: RmsNorm::load(vb.pp("input_layernorm"), d, eps)?,
            self_attn: Attention::new(cfg, vb.pp("self_attn"), q)?,
            post_attention_layernorm: RmsNorm::load(vb.pp("post_attention_layernorm"), d, eps)?,
            gate_proj: linear(d, inter, false, vb.pp("mlp.gate_proj"), q)?,
            up_proj: linear(d, inter, false, vb.pp("mlp.up_proj"), q)?,
            down_proj: linear(inter, d, false, vb.pp("mlp.down_proj"), q)?,
        })
    }

    fn forward(&mut self, x: &Tensor, rope: &MRope, mask: &Tensor) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let x = (x + self.self_attn.forward(&h, rope, mask)?)?;
        let h = self.post_attention_layernorm.forward(&x)?;
        let gate = self.gate_proj.forward(&h)?.silu()?;
        let h = self
            .down_proj
            .forward(&(gate * self.up_proj.forward(&h)?)?)?;
        Ok((x + h)?)
    }
}

/// What the prompts' image positions receive: the rows that replace the placeholder
/// embeddings, and the DeepStack rows added after the first layers. Positions are counted
/// over the batch, sequence after sequence (B × L).
pub struct ImageInputs<'a> {
    /// Index into `[token embeddings (B × L rows); image rows]` for each position.
    pub rows: &'a Tensor,
    /// Index into `[a zero row; DeepStack rows]` for each position.
    pub deepstack_rows: &'a Tensor,
    pub embeds: &'a Tensor,
    pub deepstack: &'a [Tensor],
}

pub struct TextModel {
    embed_tokens: Embedding,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: candle_nn::Linear,
    cfg: TextConfig,
}

impl TextModel {
    /// `vb` at the checkpoint root (`model.language_model.*`, `lm_head.weight`). The layers'
    /// Linears are stored as `q` when given; the embeddings and lm_head stay dense (often one
    /// tied tensor).
    pub fn new(
        cfg: &TextConfig,
        tie_word_embeddings: bool,
        vb: VarBuilder,
        q: Option<Quantization>,
    ) -> Result<Self> {
        let lm = vb.pp("model.language_model");
        let embed_tokens =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, lm.pp("embed_tokens"))?;
        let lm_head = if tie_word_embeddings {
            candle_nn::Linear::new(embed_tokens.embeddings().clone(), None)
        } else {
            candle_nn::linear_no_bias(cfg.hidden_size, cfg.vocab_size, vb.pp("lm_head"))?
        };
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(cfg, lm.pp(format!("layers.{i}")), q))
            .collect::<Result<_>>()?;
        Ok(Self {
            embed_tokens,
            layers,
            norm: RmsNorm::load(lm.pp("norm"), cfg.hidden_size, cfg.rms_norm_eps)?,
            lm_head,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    /// Forgets the cached keys and values: the next call starts a new prompt.
    pub fn clear_cache(&mut self) {
        for layer in &mut self.layers {
            layer.self_attn.cache = None;
        }
    }

    /// How many positions the key/value cache holds.
    pub fn cached(&self) -> usize {
        let cache = self.layers.first().and_then(|l| l.self_attn.cache.as_ref());
        cache.map_or(0, |(k, _)| k.dim(2).unwrap_or(0))
    }

    /// ids: (B, L) u32 after the cached positions, `pads[b]` the left padding of sequence b;
    /// returns the last position's logits (B, vocab) in f32.
    pub fn forward(
        &mut self,
        ids: &Tensor,
        positions: &[[Vec<i64>; 3]],
        pads: &[usize],
        image: Option<ImageInputs>,
    ) -> Result<Tensor> {
        let (batch, len) = ids.dims2()?;
        let device = ids.device();
        let mut x = self.embed_tokens.forward(ids)?;
        if let Some(image) = &image {
            let d = x.dim(2)?;
            let rows = Tensor::cat(&[&x.reshape((batch * len, d))?, image.embeds], 0)?;
            x = rows.index_select(image.rows, 0)?.reshape((batch, len, d))?;
        }
        let rope = MRope::new(&self.cfg, positions, device)?;
        let mask = padded_causal_mask(pads, self.cached(), len, device)?;
        for (i, layer) in self.layers.iter_mut().enumerate() {
            x = layer.forward(&x, &rope, &mask)?;
            if let Some(feature) = image
                .as_ref()
                .and_then(|im| Some((im, im.deepstack.get(i)?)))
            {
                x = add_deepstack(&x, feature.0.deepstack_rows, feature.1)?;
            }
        }
        let last = x.narrow(1, len - 1, 1)?.squeeze(1)?;
        let logits = self.lm_head.forward(&self.norm.forward(&last)?)?;
        Ok(logits.to_dtype(DType::F32)?)
    }
}

/// Additive f32 mask (B, 1, L, cached + L): new token i of sequence b sees the positions up
/// to itself, except b's left padding (`pads[b]` positions), which it never sees; a padding
/// position sees only itself.
fn padded_causal_mask(
    pads: &[usize],
    cached: usize,
    len: usize,
    device: &Device,
) -> Result<Tensor> {
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

/// x + DeepStack rows at the image positions (zero elsewhere, which leaves text exact).
fn add_deepstack(x: &Tensor, rows: &Tensor, feature: &Tensor) -> Result<Tensor> {
    let zero = Tensor::zeros((1, feature.dim(1)?), feature.dtype(), feature.device())?;
    let table = Tensor::cat(&[&zero, feature], 0)?;
    Ok((x + table.index_select(rows, 0)?.reshape(x.shape())?)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_is_never_a_key_and_sees_only_itself() {
        let mask = padded_causal_mask(&[0, 2], 1, 3, &Device::Cpu).unwrap();
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
