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
use crate::model::qwen3::{
    causal_mask, inverse_frequencies, DecoderLayer, KvCache, LayerDims, Rotary,
};
use crate::nn::{Quantization, RmsNorm};
use crate::Result;

/// The interleaved M-RoPE tables of a run of positions, (B, 1, L, head_dim).
/// `positions[b][axis][l]`: the (T, H, W) position of token l of sequence b (all of one
/// length).
fn mrope(cfg: &TextConfig, positions: &[[Vec<i64>; 3]], device: &Device) -> Result<Rotary> {
    let inv_freq = inverse_frequencies(cfg.head_dim, cfg.rope_theta);
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
                let angle = move |(j, f): (usize, &f32)| seq[axis(j)][l] as f32 * f;
                inv_freq.iter().enumerate().map(angle)
            })
        })
        .collect();
    let angles = Tensor::from_vec(angles, (positions.len(), 1, len, inv_freq.len()), device)?;
    Rotary::from_angles(&angles)
}

fn layer_dims(cfg: &TextConfig) -> LayerDims {
    LayerDims {
        hidden_size: cfg.hidden_size,
        intermediate_size: cfg.intermediate_size,
        num_attention_heads: cfg.num_attention_heads,
        num_key_value_heads: cfg.num_key_value_heads,
        head_dim: cfg.head_dim,
        rms_norm_eps: cfg.rms_norm_eps,
        attention_bias: cfg.attention_bias,
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
    layers: Vec<DecoderLayer>,
    caches: Vec<KvCache>,
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
        let dims = layer_dims(cfg);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::new(&dims, q, lm.pp(format!("layers.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            embed_tokens,
            layers,
            caches: (0..cfg.num_hidden_layers)
                .map(|_| KvCache::default())
                .collect(),
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
        self.caches.fill_with(KvCache::default);
    }

    /// How many positions the key/value cache holds.
    pub fn cached(&self) -> usize {
        self.caches.first().map_or(0, KvCache::positions)
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
        let rope = mrope(&self.cfg, positions, device)?;
        let mask = causal_mask(pads, self.cached(), len, device)?;
        let layers = self.layers.iter().zip(&mut self.caches);
        for (i, (layer, cache)) in layers.enumerate() {
            x = layer.forward(&x, &rope, &mask, Some(cache))?;
            if let Some(feature) = image
                .as_ref()
                .and_then(|im| Some((im, im.deepstack.get(i)?)))
            {
                x = add_deepstack(&x, feature.0.deepstack_rows, feature.1)?;
            }
        }
        let last = x.narrow(1, len - 1, 1)?.squeeze(1)?;
        let logits = self
            .lm_head
            .forward(&self.norm.forward_cast_then_scale(&last)?)?;
        Ok(logits.to_dtype(DType::F32)?)
    }
}

/// x + DeepStack rows at the image positions (zero elsewhere, which leaves text exact).
fn add_deepstack(x: &Tensor, rows: &Tensor, feature: &Tensor) -> Result<Tensor> {
    let zero = Tensor::zeros((1, feature.dim(1)?), feature.dtype(), feature.device())?;
    let table = Tensor::cat(&[&zero, feature], 0)?;
    Ok((x + table.index_select(rows, 0)?.reshape(x.shape())?)?)
}
