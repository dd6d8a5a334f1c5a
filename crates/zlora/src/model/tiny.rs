//! A tiny random-weight Z-Image model in the diffusers folder layout, made by zlora itself so
//! that every command can run end to end without the 20 GB of real weights.
//!
//! The model code enumerates its own parameters: each component is built once over a backend
//! that creates a seeded random tensor for every name it is asked for, and those tensors are
//! saved. So the tiny model has exactly the names and shapes the loader expects.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde_json::json;

use super::text::{Qwen3TextEncoder, TextEncoderConfig};
use super::vae::{AutoencoderKL, VaeConfig};
use super::weights::OnDemand;
use super::{TransformerConfig, ZImageTransformer};
use crate::fsutil::{save_safetensors, write_atomic};
use crate::{Error, Result};

/// Sizes of the tiny model; the defaults give a model that renders 256×256 in seconds on a CPU.
/// [`TinySpec::real_width`] gives Z-Image's own widths with fewer layers.
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub dim: usize,
    pub layers: usize,
    pub heads: usize,
    /// Blocks of each refiner stack (noise and context).
    pub refiners: usize,
    pub text: TextSize,
    pub vae: VaeSize,
    /// Rope axes of the transformer; None splits the head width as the tiny models do.
    pub rope_axes: Option<[usize; 3]>,
    /// Dtype the weights are saved in (F32 or BF16; the released files are bf16).
    pub dtype: DType,
    pub seed: u64,
    /// Scheduler shift written to scheduler_config.json (3 like Turbo, 6 like Base).
    pub shift: f64,
}

/// Bounds of a tiny model: never wider or deeper than the released model (3840, 30 layers).
pub const MAX_TINY_DIM: usize = 3840;
pub const MAX_TINY_LAYERS: usize = 30;

/// The text encoder: a 32-wide Qwen3, or Qwen3-4B's width with `layers` layers (Z-Image
/// reads the second-to-last hidden state, so one fewer is loaded). Both use the byte-level
/// tokenizer's 259-token vocabulary.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum TextSize {
    Tiny,
    Qwen3_4b { layers: usize },
}

/// The VAE: a 3-stage one with spatial factor 4, or Z-Image's (factor 8, 16 channels).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum VaeSize {
    Tiny,
    ZImage,
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            dim: 64,
            layers: 2,
            heads: 2,
            refiners: 1,
            text: TextSize::Tiny,
            vae: VaeSize::Tiny,
            rope_axes: None,
            dtype: DType::F32,
            seed: 0,
            shift: 3.0,
        }
    }
}

impl TinySpec {
    /// Z-Image's transformer (dim 3840, 30 heads, FFN 10240, 2 + 2 refiner blocks, caption
    /// features 2560), Qwen3-4B's width with two layers and the real VAE, with `layers` main
    /// layers.
    pub fn real_width(layers: usize) -> Self {
        let real = TransformerConfig::z_image();
        Self {
            dim: real.dim,
            layers,
            heads: real.n_heads,
            refiners: real.n_refiner_layers,
            text: TextSize::Qwen3_4b { layers: 2 },
            vae: VaeSize::ZImage,
            rope_axes: real.axes_dims.as_slice().try_into().ok(),
            ..Self::default()
        }
    }

    fn check(&self) -> Result<()> {
        if !(1..=MAX_TINY_DIM).contains(&self.dim) || !(1..=MAX_TINY_LAYERS).contains(&self.layers)
        {
            return Err(Error::Invalid(format!(
                "tiny model: dim must be 1 to {MAX_TINY_DIM} and layers 1 to {MAX_TINY_LAYERS} (at \
                 most the released model's width and depth), got dim {} and {} layers",
                self.dim, self.layers
            )));
        }
        if self.heads == 0
            || !self.dim.is_multiple_of(self.heads)
            || !(self.dim / self.heads).is_multiple_of(8)
        {
            return Err(Error::Invalid(format!(
                "tiny model: dim {} must split into {} heads of a multiple of 8",
                self.dim, self.heads
            )));
        }
        if let TextSize::Qwen3_4b { layers: 0 } = self.text {
            return Err(Error::Invalid(
                "tiny model: the text encoder needs at least 1 layer".into(),
            ));
        }
        if ![DType::F32, DType::BF16].contains(&self.dtype) {
            return Err(Error::Invalid(format!(
                "tiny model: weights are saved as f32 or bf16, not {:?}",
                self.dtype
            )));
        }
        Ok(())
    }

    /// The rope axes: the configured ones, or the head width split into a remainder and two
    /// equal even parts.
    fn axes(&self) -> [usize; 3] {
        self.rope_axes.unwrap_or_else(|| {
            let head_dim = self.dim / self.heads;
            let part = head_dim / 4 / 2 * 2;
            [head_dim - 2 * part, part, part]
        })
    }

    /// The three components' configurations, as `create` writes them.
    pub fn configs(&self) -> Result<(TransformerConfig, TextEncoderConfig, VaeConfig)> {
        Ok((
            parsed(self.transformer_config())?,
            parsed(self.text_config())?,
            parsed(self.vae_config())?,
        ))
    }

    fn transformer_config(&self) -> serde_json::Value {
        json!({
            "_class_name": "ZImageTransformer2DModel", "all_patch_size": [2],
            "all_f_patch_size": [1], "in_channels": 16, "dim": self.dim,
            "n_layers": self.layers, "n_refiner_layers": self.refiners, "n_heads": self.heads,
            "n_kv_heads": self.heads, "norm_eps": 1e-5, "qk_norm": true,
            "cap_feat_dim": self.text_config()["hidden_size"], "rope_theta": 256.0,
            "t_scale": 1000.0, "axes_dims": self.axes(), "axes_lens": [1536, 512, 512]})
    }

    fn text_config(&self) -> serde_json::Value {
        let (hidden, ffn, layers, heads, kv_heads, head_dim) = match self.text {
            TextSize::Tiny => (TINY_TEXT_HIDDEN, 64, 3, 4, 2, 8),
            TextSize::Qwen3_4b { layers } => {
                let real = TextEncoderConfig::qwen3_4b();
                (
                    real.hidden_size,
                    real.intermediate_size,
                    layers,
                    real.num_attention_heads,
                    real.num_key_value_heads,
                    real.head_dim,
                )
            }
        };
        json!({
            "architectures": ["Qwen3Model"], "model_type": "qwen3", "vocab_size": TINY_VOCAB,
            "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
            "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 1024,
            "tie_word_embeddings": true, "attention_bias": false, "hidden_act": "silu"})
    }

    fn vae_config(&self) -> serde_json::Value {
        let (channels, layers_per_block) = match self.vae {
            VaeSize::Tiny => (vec![32, 32, 64], 1),
            VaeSize::ZImage => {
                let real = VaeConfig::z_image();
                (real.block_out_channels, real.layers_per_block)
            }
        };
        let blocks = channels.len();
        json!({
            "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
            "latent_channels": 16, "block_out_channels": channels,
            "layers_per_block": layers_per_block, "norm_num_groups": 32, "act_fn": "silu",
            "mid_block_add_attention": true, "use_quant_conv": false,
            "use_post_quant_conv": false, "scaling_factor": 0.3611, "shift_factor": 0.1159,
            "down_block_types": vec!["DownEncoderBlock2D"; blocks],
            "up_block_types": vec!["UpDecoderBlock2D"; blocks]})
    }
}

fn parsed<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> Result<T> {
    serde_json::from_value(value).map_err(|e| Error::Invalid(format!("tiny model config: {e}")))
}

/// Caption feature width of the tiny text encoder.
const TINY_TEXT_HIDDEN: usize = 32;

/// Weight bytes per file before a component is split into shards (the 30-layer real-width
/// transformer is 12.3 GB in bf16; a shard is generated and written at a time).
const SHARD_BYTES: usize = 1 << 30;

/// Norm weights near 1, biases and pad tokens small, matrices scaled by 1/√fan_in.
fn init_value(name: &str, shape: &Shape, z: f32) -> f32 {
    let dims = shape.dims();
    if name.contains("norm") && dims.len() == 1 {
        1.0 + 0.1 * z
    } else if name.ends_with("bias") || name.ends_with("pad_token") {
        0.05 * z
    } else {
        let fan_in: usize = dims.iter().skip(1).product::<usize>().max(1);
        z / (fan_in as f32).sqrt()
    }
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Error::Invalid(e.to_string()))?;
    write_atomic(path, text.as_bytes(), true)
}

/// The tensors `build` asks its VarBuilder for, in the order it asks (names and shapes only).
fn requested_tensors<F>(build: F) -> Result<Vec<(String, Shape)>>
where
    F: FnOnce(VarBuilder) -> Result<()>,
{
    let asked = Arc::new(Mutex::new(Vec::new()));
    let record = asked.clone();
    let (backend, _) = OnDemand::new(move |name: &str, s: &Shape, dtype, dev: &Device| {
        let poisoned = || candle_core::Error::Msg("tensor recorder poisoned".into());
        record
            .lock()
            .map_err(|_| poisoned())?
            .push((name.to_string(), s.clone()));
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    });
    build(VarBuilder::from_backend(
        Box::new(backend),
        DType::F32,
        Device::Cpu,
    ))?;
    let list = asked.lock().map(|l| l.clone()).unwrap_or_default();
    Ok(list)
}

/// Splits the tensors, in order, into runs of at most `SHARD_BYTES` (one tensor may exceed it).
fn shards(tensors: Vec<(String, Shape)>, bytes_per_value: usize) -> Vec<Vec<(String, Shape)>> {
    let (mut out, mut current, mut bytes) = (Vec::new(), Vec::new(), 0);
    for (name, shape) in tensors {
        let size = shape.elem_count() * bytes_per_value;
        if bytes + size > SHARD_BYTES && bytes > 0 {
            out.push(std::mem::take(&mut current));
            bytes = 0;
        }
        bytes += size;
        current.push((name, shape));
    }
    out.push(current);
    out
}

/// Builds one component over a recorder, then generates seeded random tensors in the order
/// the model asked for them and saves them in `dtype`: one `file`, or shards named after it
/// with a `.index.json` (diffusers' layout) when they exceed `SHARD_BYTES`.
fn save_random<F>(dir: &Path, file: &str, seed: u64, dtype: DType, build: F) -> Result<()>
where
    F: FnOnce(VarBuilder) -> Result<()>,
{
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let parts = shards(requested_tensors(build)?, dtype.size_in_bytes());
    let stem = file.trim_end_matches(".safetensors");
    let count = parts.len();
    let mut index = serde_json::Map::new();
    for (i, part) in parts.into_iter().enumerate() {
        let name = if count == 1 {
            file.to_string()
        } else {
            format!("{stem}-{:05}-of-{count:05}.safetensors", i + 1)
        };
        let mut tensors = BTreeMap::new();
        for (tensor, shape) in part {
            let data: Vec<f32> = (0..shape.elem_count())
                .map(|_| init_value(&tensor, &shape, StandardNormal.sample(&mut rng)))
                .collect();
            let t = Tensor::from_vec(data, &shape, &Device::Cpu)?.to_dtype(dtype)?;
            index.insert(tensor.clone(), json!(name));
            tensors.insert(tensor, t);
        }
        save_safetensors(&dir.join(&name), &tensors, None, true)?;
    }
    if count > 1 {
        let index = json!({"metadata": {}, "weight_map": index});
        write_json(&dir.join(format!("{file}.index.json")), &index)?;
    }
    Ok(())
}

/// Writes the tiny model into `root` (which must not exist unless `overwrite`).
pub fn create(root: &Path, spec: &TinySpec, overwrite: bool) -> Result<()> {
    if root.exists() && !overwrite {
        return Err(Error::bad_file(
            root,
            "already exists (pass --force to replace it)",
        ));
    }
    spec.check()?;
    crate::sample::schedule::check_shift(spec.shift).map_err(Error::Invalid)?;
    write_tokenizer(&root.join("tokenizer"))?;
    write_json(&root.join("model_index.json"), &model_index())?;
    write_json(
        &root.join("scheduler/scheduler_config.json"),
        &json!({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                "shift": spec.shift, "use_dynamic_shifting": false}),
    )?;

    let dir = root.join("transformer");
    write_json(&dir.join("config.json"), &spec.transformer_config())?;
    let cfg = TransformerConfig::from_file(&dir.join("config.json"))?;
    save_random(
        &dir,
        "diffusion_pytorch_model.safetensors",
        spec.seed,
        spec.dtype,
        |vb| {
            ZImageTransformer::new(&cfg, vb)
                .map(|_| ())
                .map_err(Error::from)
        },
    )?;

    let dir = root.join("text_encoder");
    write_json(&dir.join("config.json"), &spec.text_config())?;
    let cfg = TextEncoderConfig::from_file(&dir.join("config.json"))?;
    save_random(&dir, "model.safetensors", spec.seed + 1, spec.dtype, |vb| {
        Qwen3TextEncoder::new(&cfg, vb).map(|_| ())
    })?;

    let dir = root.join("vae");
    write_json(&dir.join("config.json"), &spec.vae_config())?;
    let cfg = VaeConfig::from_file(&dir.join("config.json"))?;
    save_random(
        &dir,
        "diffusion_pytorch_model.safetensors",
        spec.seed + 2,
        spec.dtype,
        |vb| AutoencoderKL::new(&cfg, vb).map(|_| ()),
    )
}

fn model_index() -> serde_json::Value {
    json!({"_class_name": "ZImagePipeline", "_diffusers_version": "0.42.1",
           "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
           "text_encoder": ["transformers", "Qwen3Model"],
           "tokenizer": ["transformers", "Qwen2Tokenizer"],
           "transformer": ["diffusers", "ZImageTransformer2DModel"],
           "vae": ["diffusers", "AutoencoderKL"]})
}

/// 256 byte tokens plus the three Qwen special tokens.
const TINY_VOCAB: usize = 259;

/// A byte-level BPE tokenizer without merges: every UTF-8 byte is one token, and the chat
/// template's special tokens are single ids, as in the real Qwen3 tokenizer.
fn write_tokenizer(dir: &Path) -> Result<()> {
    use tokenizers::models::bpe::BPE;
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, Tokenizer};

    let fail = |e: tokenizers::Error| Error::Invalid(format!("tiny tokenizer: {e}"));
    let mut alphabet: Vec<String> = ByteLevel::alphabet()
        .into_iter()
        .map(String::from)
        .collect();
    alphabet.sort();
    let vocab: tokenizers::models::bpe::Vocab = alphabet
        .into_iter()
        .enumerate()
        .map(|(i, c)| (c, i as u32))
        .collect();
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, vec![])
        .build()
        .map_err(fail)?;
    let mut tok = Tokenizer::new(bpe);
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, false)));
    tok.with_decoder(Some(ByteLevel::default()));
    let special =
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"].map(|s| AddedToken::from(s, true));
    tok.add_special_tokens(special).map_err(fail)?;
    let text = tok.to_string(true).map_err(fail)?;
    write_atomic(&dir.join("tokenizer.json"), text.as_bytes(), true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::expected_tensors;

    #[test]
    fn thirty_real_width_layers_are_the_released_transformer() {
        let (transformer, text, vae) = TinySpec::real_width(30).configs().unwrap();
        let params: usize = expected_tensors(&transformer)
            .unwrap()
            .values()
            .map(|s| s.iter().product::<usize>())
            .sum();
        assert_eq!(params as u64, crate::hub::known::TRANSFORMER_PARAMS);
        assert_eq!(transformer.ffn_dim(), 10240);
        assert_eq!(transformer.axes_dims, [32, 48, 48]);
        let qwen = TextEncoderConfig::qwen3_4b();
        assert_eq!(
            (
                text.hidden_size,
                text.intermediate_size,
                text.num_hidden_layers
            ),
            (qwen.hidden_size, qwen.intermediate_size, 2)
        );
        assert_eq!(
            (
                text.num_attention_heads,
                text.num_key_value_heads,
                text.head_dim
            ),
            (32, 8, 128)
        );
        assert_eq!(
            vae.block_out_channels,
            VaeConfig::z_image().block_out_channels
        );
        assert_eq!(vae.spatial_factor(), 8);
    }

    #[test]
    fn shards_keep_the_order_and_close_before_the_limit() {
        let half = Shape::from(SHARD_BYTES / 8);
        let named = |n: usize| (0..n).map(|i| (format!("t{i}"), half.clone())).collect();
        // Half a shard of f32 each: two fit in one file.
        let parts = shards(named(5), 4);
        let names: Vec<Vec<&str>> = parts
            .iter()
            .map(|p| p.iter().map(|(n, _)| n.as_str()).collect())
            .collect();
        assert_eq!(names, [vec!["t0", "t1"], vec!["t2", "t3"], vec!["t4"]]);
        // One tensor larger than a shard still gets a file of its own.
        assert_eq!(shards(named(1), 16).len(), 1);
        assert_eq!(shards(named(2), 16).len(), 2);
    }

    #[test]
    fn a_bad_shape_or_dtype_is_refused() {
        let bad = [
            TinySpec {
                heads: 3,
                ..TinySpec::default()
            },
            TinySpec {
                dtype: DType::F16,
                ..TinySpec::default()
            },
            TinySpec {
                text: TextSize::Qwen3_4b { layers: 0 },
                ..TinySpec::default()
            },
        ];
        let dir = tempfile::tempdir().unwrap();
        for (i, spec) in bad.iter().enumerate() {
            let err = create(&dir.path().join(i.to_string()), spec, false).unwrap_err();
            assert!(err.to_string().contains("tiny model"), "{err}");
        }
    }
}
