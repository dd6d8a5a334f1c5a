//! A tiny random-weight Z-Image model in the diffusers folder layout, made by zlora itself so
//! that every command can run end to end without the 20 GB of real weights.
//!
//! The model code enumerates its own parameters: each component is built once over a backend
//! that creates a seeded random tensor for every name it is asked for, and those tensors are
//! saved. So the tiny model has exactly the names and shapes the loader expects.

use std::path::Path;

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
#[derive(Debug, Clone)]
pub struct TinySpec {
    pub dim: usize,
    pub layers: usize,
    pub heads: usize,
    pub seed: u64,
    /// Scheduler shift written to scheduler_config.json (3 like Turbo, 6 like Base).
    pub shift: f64,
}

/// Bounds of a tiny model: never wider or deeper than the released model (3840, 30 layers).
pub const MAX_TINY_DIM: usize = 3840;
pub const MAX_TINY_LAYERS: usize = 30;

impl TinySpec {
    fn check_size(&self) -> Result<()> {
        if (1..=MAX_TINY_DIM).contains(&self.dim) && (1..=MAX_TINY_LAYERS).contains(&self.layers) {
            return Ok(());
        }
        Err(Error::Invalid(format!(
            "tiny model: dim must be 1 to {MAX_TINY_DIM} and layers 1 to {MAX_TINY_LAYERS} (at \
             most the released model's width and depth), got dim {} and {} layers",
            self.dim, self.layers
        )))
    }
}

impl Default for TinySpec {
    fn default() -> Self {
        Self {
            dim: 64,
            layers: 2,
            heads: 2,
            seed: 0,
            shift: 3.0,
        }
    }
}

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

/// Builds one component over a backend of seeded random tensors and saves its weights.
fn save_random<F>(dir: &Path, file: &str, seed: u64, build: F) -> Result<()>
where
    F: FnOnce(VarBuilder) -> Result<()>,
{
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let random = move |name: &str, s: &Shape, dtype, dev: &Device| {
        let data: Vec<f32> = (0..s.elem_count())
            .map(|_| init_value(name, s, StandardNormal.sample(&mut rng)))
            .collect();
        Tensor::from_vec(data, s, dev)?.to_dtype(dtype)
    };
    let (backend, made) = OnDemand::new(random);
    build(VarBuilder::from_backend(
        Box::new(backend),
        DType::F32,
        Device::Cpu,
    ))?;
    let tensors = made.lock().map(|m| m.clone()).unwrap_or_default();
    save_safetensors(&dir.join(file), &tensors, None, true)
}

/// Writes the tiny model into `root` (which must not exist unless `overwrite`).
pub fn create(root: &Path, spec: &TinySpec, overwrite: bool) -> Result<()> {
    if root.exists() && !overwrite {
        return Err(Error::bad_file(
            root,
            "already exists (pass --force to replace it)",
        ));
    }
    spec.check_size()?;
    crate::sample::schedule::check_shift(spec.shift).map_err(Error::Invalid)?;
    if spec.heads == 0
        || !spec.dim.is_multiple_of(spec.heads)
        || !(spec.dim / spec.heads).is_multiple_of(8)
    {
        return Err(Error::Invalid(format!(
            "tiny model: dim {} must split into {} heads of a multiple of 8",
            spec.dim, spec.heads
        )));
    }
    let text_hidden = 32;
    write_tokenizer(&root.join("tokenizer"))?;
    write_json(&root.join("model_index.json"), &model_index())?;
    write_json(
        &root.join("scheduler/scheduler_config.json"),
        &json!({"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
                "shift": spec.shift, "use_dynamic_shifting": false}),
    )?;

    let head_dim = spec.dim / spec.heads;
    let quarter = head_dim / 4;
    let axes = [
        head_dim - 2 * (quarter / 2 * 2),
        quarter / 2 * 2,
        quarter / 2 * 2,
    ];
    let transformer = json!({
        "_class_name": "ZImageTransformer2DModel", "all_patch_size": [2], "all_f_patch_size": [1],
        "in_channels": 16, "dim": spec.dim, "n_layers": spec.layers, "n_refiner_layers": 1,
        "n_heads": spec.heads, "n_kv_heads": spec.heads, "norm_eps": 1e-5, "qk_norm": true,
        "cap_feat_dim": text_hidden, "rope_theta": 256.0, "t_scale": 1000.0,
        "axes_dims": axes, "axes_lens": [1536, 512, 512]});
    let dir = root.join("transformer");
    write_json(&dir.join("config.json"), &transformer)?;
    let cfg = TransformerConfig::from_file(&dir.join("config.json"))?;
    save_random(
        &dir,
        "diffusion_pytorch_model.safetensors",
        spec.seed,
        |vb| {
            ZImageTransformer::new(&cfg, vb)
                .map(|_| ())
                .map_err(Error::from)
        },
    )?;

    let text = json!({
        "architectures": ["Qwen3Model"], "model_type": "qwen3", "vocab_size": TINY_VOCAB,
        "hidden_size": text_hidden, "intermediate_size": 64, "num_hidden_layers": 3,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "rms_norm_eps": 1e-6,
        "rope_theta": 1e6, "max_position_embeddings": 1024, "tie_word_embeddings": true,
        "attention_bias": false, "hidden_act": "silu"});
    let dir = root.join("text_encoder");
    write_json(&dir.join("config.json"), &text)?;
    let cfg = TextEncoderConfig::from_file(&dir.join("config.json"))?;
    save_random(&dir, "model.safetensors", spec.seed + 1, |vb| {
        Qwen3TextEncoder::new(&cfg, vb).map(|_| ())
    })?;

    let vae = json!({
        "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 16,
        "block_out_channels": [32, 32, 64], "layers_per_block": 1, "norm_num_groups": 32,
        "act_fn": "silu", "mid_block_add_attention": true, "use_quant_conv": false,
        "use_post_quant_conv": false, "scaling_factor": 0.3611, "shift_factor": 0.1159,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]});
    let dir = root.join("vae");
    write_json(&dir.join("config.json"), &vae)?;
    let cfg = VaeConfig::from_file(&dir.join("config.json"))?;
    save_random(
        &dir,
        "diffusion_pytorch_model.safetensors",
        spec.seed + 2,
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
