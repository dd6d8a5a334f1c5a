//! The Z-Image text encoder: Qwen3 run up to its second-to-last decoder layer, plus the chat
//! template and tokenizer that turn a prompt into the ids it reads.
//!
//! Z-Image conditions on `hidden_states[-2]` of transformers' `Qwen3Model`, which is the raw
//! output of decoder layer `num_hidden_layers - 2` (the final layer and the final norm are not
//! used), so only the first `num_hidden_layers - 1` layers are loaded and run. Module names
//! follow the Hugging Face checkpoint (`embed_tokens`, `layers.N.self_attn.q_proj`, ...), with
//! or without the `model.` prefix that `Qwen3ForCausalLM` checkpoints carry. The decoder layer
//! is `model::qwen3`'s, which the captioner's text decoder runs too.
//!
//! Precision: weights may be bf16 or f32; RMSNorm, RoPE tables, attention scores and softmax
//! are computed in f32 (`nn::attention`). The decoder layers' projections may instead be stored
//! quantized (`quantize_text_encoder`), each quantized as soon as it is read, so at most one
//! projection is ever dense in memory; the embedding and the norms stay in the compute dtype.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;
use tokenizers::Tokenizer;

use super::qwen3::{causal_mask, inverse_frequencies, DecoderLayer, LayerDims, Rotary};
use crate::nn::Quantization;
use crate::{Error, Result};

/// Z-Image's `max_sequence_length`: prompts are cut to this many tokens, template included.
pub const DEFAULT_MAX_TOKENS: usize = 512;

/// The Qwen3 chat template with one user turn and the generation prompt (no system prompt, no
/// think block), exactly as the reference pipelines produce it.
pub fn chat_prompt(prompt: &str) -> String {
    format!("<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n")
}

/// The Qwen3 hyper-parameters, read from the text encoder's `config.json` (unknown keys are
/// ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "RawTextEncoderConfig")]
pub struct TextEncoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub attention_bias: bool,
}

/// `config.json` as transformers writes it. Version 5 moved `rope_theta` into
/// `rope_parameters`, so both places are accepted.
#[derive(Deserialize)]
struct RawTextEncoderConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_parameters: Option<RopeParameters>,
    rope_scaling: Option<RopeParameters>,
    #[serde(default = "default_max_positions")]
    max_position_embeddings: usize,
    #[serde(default)]
    attention_bias: bool,
}

#[derive(Deserialize)]
struct RopeParameters {
    rope_theta: Option<f64>,
    #[serde(alias = "type")]
    rope_type: Option<String>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> usize {
    32768
}

impl TryFrom<RawTextEncoderConfig> for TextEncoderConfig {
    type Error = String;

    fn try_from(raw: RawTextEncoderConfig) -> std::result::Result<Self, String> {
        // Only plain RoPE is implemented; a scaled variant would silently change the output.
        for params in [&raw.rope_parameters, &raw.rope_scaling]
            .into_iter()
            .flatten()
        {
            if let Some(kind) = params.rope_type.as_deref().filter(|k| *k != "default") {
                return Err(format!(
                    "rope type {kind:?} is not supported (only \"default\")"
                ));
            }
        }
        let nested_theta = raw.rope_parameters.as_ref().and_then(|p| p.rope_theta);
        let heads = raw.num_attention_heads;
        let cfg = Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: heads,
            num_key_value_heads: raw.num_key_value_heads.unwrap_or(heads),
            head_dim: raw
                .head_dim
                .or_else(|| raw.hidden_size.checked_div(heads))
                .unwrap_or(0),
            rms_norm_eps: raw.rms_norm_eps,
            // transformers' Qwen3Config default.
            rope_theta: raw.rope_theta.or(nested_theta).unwrap_or(10_000.0),
            max_position_embeddings: raw.max_position_embeddings,
            attention_bias: raw.attention_bias,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

impl TextEncoderConfig {
    /// Qwen3-4B as shipped in Z-Image's `text_encoder/config.json`.
    pub fn qwen3_4b() -> Self {
        Self {
            vocab_size: 151_936,
            hidden_size: 2560,
            intermediate_size: 9728,
            num_hidden_layers: 36,
            num_attention_heads: 32,
            num_key_value_heads: 8,
            head_dim: 128,
            rms_norm_eps: 1e-6,
            rope_theta: 1_000_000.0,
            max_position_embeddings: 40960,
            attention_bias: false,
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::fsutil::read_text(path)?;
        serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(path, format!("not a Qwen3 text encoder config: {e}")))
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.num_hidden_layers == 0 {
            return Err("num_hidden_layers must be at least 1".into());
        }
        let (heads, kv_heads) = (self.num_attention_heads, self.num_key_value_heads);
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 {
            return Err(format!(
                "num_attention_heads {heads} must be a positive multiple of num_key_value_heads {kv_heads}"
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(format!(
                "head_dim {} must be even and positive",
                self.head_dim
            ));
        }
        Ok(())
    }

    /// Decoder layers that contribute to `hidden_states[-2]`: all but the last.
    pub fn layers_used(&self) -> usize {
        self.num_hidden_layers - 1
    }

    /// The sizes of one decoder layer.
    pub fn layer_dims(&self) -> LayerDims {
        LayerDims {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_attention_heads: self.num_attention_heads,
            num_key_value_heads: self.num_key_value_heads,
            head_dim: self.head_dim,
            rms_norm_eps: self.rms_norm_eps,
            attention_bias: self.attention_bias,
        }
    }

    /// (out, in) of every projection of the decoder layers loaded: the weights
    /// `quantize_text_encoder` stores quantized.
    pub fn projection_shapes(&self) -> Vec<(usize, usize)> {
        self.layer_dims()
            .projection_shapes()
            .repeat(self.layers_used())
    }

    /// Why `q` cannot store this encoder's projections (their input widths), if it cannot.
    pub fn check_quantization(&self, q: Quantization) -> std::result::Result<(), String> {
        let widths = [
            ("hidden", self.hidden_size),
            ("attention", self.num_attention_heads * self.head_dim),
            ("intermediate", self.intermediate_size),
        ];
        let bad: Vec<String> = widths
            .iter()
            .filter(|(_, w)| w % q.row_multiple() != 0)
            .map(|(n, w)| format!("{n} {w}"))
            .collect();
        if bad.is_empty() {
            return Ok(());
        }
        Err(format!(
            "text encoder quantization {q} (quantize_text_encoder, --quantize-text-encoder) \
             stores rows in blocks of {} values, but this text encoder's projections take \
             widths {}: use a format whose block divides them (int8 and fp8 take any width, \
             q8_0 multiples of 32)",
            q.row_multiple(),
            bad.join(", ")
        ))
    }
}

/// Plain RoPE for positions 0..len: (len, head_dim) tables in f32.
fn rope_tables(len: usize, head_dim: usize, theta: f64, device: &Device) -> Result<Rotary> {
    let inv_freq = inverse_frequencies(head_dim, theta);
    let angles: Vec<f32> = (0..len)
        .flat_map(|l| inv_freq.iter().map(move |f| l as f32 * f))
        .collect();
    Rotary::from_angles(&Tensor::from_vec(angles, (len, inv_freq.len()), device)?)
}

/// Qwen3 truncated to the layers Z-Image reads.
pub struct Qwen3TextEncoder {
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    cfg: TextEncoderConfig,
}

impl Qwen3TextEncoder {
    /// Loads the embedding and the first `num_hidden_layers - 1` decoder layers. `vb` is the
    /// checkpoint root; a `model.` prefix (Qwen3ForCausalLM checkpoints) is detected.
    pub fn new(cfg: &TextEncoderConfig, vb: VarBuilder) -> Result<Self> {
        Self::new_stored(cfg, vb, None)
    }

    /// As [`Self::new`], with the decoder layers' projections stored as `quantize` says.
    pub fn new_stored(
        cfg: &TextEncoderConfig,
        vb: VarBuilder,
        quantize: Option<Quantization>,
    ) -> Result<Self> {
        cfg.validate().map_err(Error::Invalid)?;
        if let Some(q) = quantize {
            cfg.check_quantization(q).map_err(Error::Invalid)?;
        }
        let vb = if vb.contains_tensor("model.embed_tokens.weight") {
            vb.pp("model")
        } else {
            vb
        };
        let embed_tokens =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("embed_tokens"))?;
        let dims = cfg.layer_dims();
        let layers = (0..cfg.layers_used())
            .map(|i| DecoderLayer::new(&dims, quantize, vb.pp(format!("layers.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            embed_tokens,
            layers,
            cfg: cfg.clone(),
        })
    }

    pub fn config(&self) -> &TextEncoderConfig {
        &self.cfg
    }

    /// Bytes the decoder layers' projection weights take as stored (what quantizing shrinks).
    pub fn projection_bytes(&self) -> usize {
        self.layers
            .iter()
            .flat_map(DecoderLayer::projections)
            .map(|p| p.weight().bytes())
            .sum()
    }

    /// ids: (B, L) u32 → `hidden_states[-2]`, (B, L, hidden) in the weight dtype.
    ///
    /// Attention is causal and positions start at 0 for every row, so a right-padded batch gives
    /// each prompt's valid tokens exactly what an unpadded run gives them.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, len) = ids.dims2()?;
        if len > self.cfg.max_position_embeddings {
            return Err(Error::Invalid(format!(
                "{len} tokens exceed the text encoder's {} positions",
                self.cfg.max_position_embeddings
            )));
        }
        let device = ids.device();
        let rope = rope_tables(len, self.cfg.head_dim, self.cfg.rope_theta, device)?;
        // No padding on the left (the batch is right-padded) and nothing cached.
        let mask = causal_mask(&[0], 0, len, device)?;
        let mut x = self.embed_tokens.forward(ids)?;
        for layer in &self.layers {
            x = layer.forward(&x, &rope, &mask, None)?;
        }
        Ok(x)
    }
}

/// Turns a prompt into the token ids the text encoder reads: chat template, tokenizer,
/// truncation.
pub struct PromptTokenizer {
    tokenizer: Tokenizer,
    max_tokens: usize,
}

impl PromptTokenizer {
    /// Reads a Hugging Face `tokenizer.json` (Z-Image: `tokenizer/tokenizer.json`).
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = crate::fsutil::read_regular(path)?;
        let mut tokenizer = Tokenizer::from_bytes(&bytes)
            .map_err(|e| Error::bad_file(path, format!("not a tokenizer.json: {e}")))?;
        // Truncation is ours to do (after templating); padding never reaches the model.
        tokenizer
            .with_truncation(None)
            .map_err(|e| Error::bad_file(path, e.to_string()))?;
        tokenizer.with_padding(None);
        Ok(Self {
            tokenizer,
            max_tokens: DEFAULT_MAX_TOKENS,
        })
    }

    /// Keep at most `max_tokens` ids per prompt (template included); the tail is cut.
    pub fn with_max_tokens(mut self, max_tokens: usize) -> Result<Self> {
        if max_tokens == 0 {
            return Err(Error::Invalid("max tokens must be at least 1".into()));
        }
        self.max_tokens = max_tokens;
        Ok(self)
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// The ids of `chat_prompt(prompt)`. Special tokens come only from the template text
    /// (Qwen adds no BOS), so the tokenizer's post-processor is not applied.
    pub fn ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut ids = self.all_ids(prompt)?;
        ids.truncate(self.max_tokens);
        Ok(ids)
    }

    /// Whether the templated prompt reaches the limit, so that its end would be cut (the
    /// preflight check of captions).
    pub fn reaches_limit(&self, prompt: &str) -> Result<bool> {
        Ok(self.all_ids(prompt)?.len() >= self.max_tokens)
    }

    /// A warning naming the limit when `prompt` is longer than the encoder reads; None when
    /// it fits.
    pub fn cut_warning(&self, prompt: &str) -> Result<Option<String>> {
        let tokens = self.all_ids(prompt)?.len();
        let max = self.max_tokens;
        Ok((tokens > max).then(|| {
            format!(
                "warning: the prompt is {tokens} tokens with the chat template; the text \
                 encoder reads the first {max}, the rest is ignored"
            )
        }))
    }

    fn all_ids(&self, prompt: &str) -> Result<Vec<u32>> {
        let encoding = self
            .tokenizer
            .encode(chat_prompt(prompt), false)
            .map_err(|e| Error::Invalid(format!("cannot tokenize prompt: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }
}

/// Prompts in, Z-Image caption features out.
pub struct PromptEncoder {
    tokenizer: PromptTokenizer,
    encoder: Qwen3TextEncoder,
}

impl PromptEncoder {
    pub fn new(tokenizer: PromptTokenizer, encoder: Qwen3TextEncoder) -> Self {
        Self { tokenizer, encoder }
    }

    pub fn tokenizer(&self) -> &PromptTokenizer {
        &self.tokenizer
    }

    pub fn encoder(&self) -> &Qwen3TextEncoder {
        &self.encoder
    }

    /// One (L_i, hidden) f32 tensor per prompt, holding only its valid tokens. The prompts run
    /// as one right-padded batch; callers bound the batch size by how many prompts they pass.
    pub fn encode(&self, prompts: &[&str]) -> Result<Vec<Tensor>> {
        let ids = prompts
            .iter()
            .map(|p| self.tokenizer.ids(p))
            .collect::<Result<Vec<_>>>()?;
        let Some(len) = ids.iter().map(Vec::len).max() else {
            return Ok(Vec::new());
        };
        let batch = self.padded_batch(&ids, len)?;
        let hidden = self.encoder.forward(&batch)?.to_dtype(DType::F32)?;
        ids.iter()
            .enumerate()
            .map(|(i, row)| Ok(hidden.get(i)?.narrow(0, 0, row.len())?))
            .collect()
    }

    /// (B, len) ids, right-padded with id 0 (pad rows are computed and dropped).
    fn padded_batch(&self, ids: &[Vec<u32>], len: usize) -> Result<Tensor> {
        let vocab = self.encoder.config().vocab_size;
        let mut flat = Vec::with_capacity(ids.len() * len);
        for row in ids {
            if let Some(bad) = row.iter().find(|&&id| id as usize >= vocab) {
                return Err(Error::Invalid(format!(
                    "token id {bad} is outside the text encoder's vocabulary of {vocab}; \
                     tokenizer and text encoder do not match"
                )));
            }
            flat.extend_from_slice(row);
            flat.resize(flat.len() + len - row.len(), 0);
        }
        let device = self.encoder.embed_tokens.embeddings().device();
        Ok(Tensor::from_vec(flat, (ids.len(), len), device)?)
    }
}
