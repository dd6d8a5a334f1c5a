//! A Z-Image model in the diffusers folder layout (model_index.json, transformer/,
//! text_encoder/, tokenizer/, vae/, scheduler/), found by path or by Hugging Face repo id in
//! the local HF cache.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::dit::BaseStorage;
use super::text::{PromptEncoder, PromptTokenizer, Qwen3TextEncoder, TextEncoderConfig};
use super::vae::{AutoencoderKL, VaeConfig};
use super::weights::{component_files, holds_fp8, plain_var_builder, TransformerCheckpoint};
use super::{TransformerConfig, ZImageTransformer};
use crate::nn::Quantization;
use crate::{Error, Result};

/// The Hugging Face hub cache: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub.
pub(crate) fn hf_cache() -> hf_hub::Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(dir) => hf_hub::Cache::new(dir.into()),
        None => hf_hub::Cache::from_env(),
    }
}

#[derive(Debug, Clone)]
pub struct ModelFolder {
    root: PathBuf,
}

impl ModelFolder {
    /// `spec` is a folder, or a repo id such as `Tongyi-MAI/Z-Image-Turbo` already in the
    /// local Hugging Face cache (HF_HOME / HF_HUB_CACHE honoured; nothing is downloaded).
    pub fn open(spec: &str) -> Result<Self> {
        let path = PathBuf::from(spec);
        if path.is_dir() {
            return Self::from_dir(path);
        }
        let cache = hf_cache();
        if let Some(index) = cache.model(spec.to_string()).get("model_index.json") {
            if let Some(root) = index.parent() {
                return Self::from_dir(root.to_path_buf());
            }
        }
        Err(Error::bad_file(
            &path,
            format!(
                "not a model folder, and no repo of that id in the Hugging Face cache at {}",
                cache.path().display()
            ),
        ))
    }

    fn from_dir(root: PathBuf) -> Result<Self> {
        if !root.join("transformer").is_dir() {
            return Err(Error::bad_file(
                &root,
                "not a diffusers Z-Image folder: no transformer/ inside",
            ));
        }
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn transformer_config(&self) -> Result<TransformerConfig> {
        TransformerConfig::from_file(&self.root.join("transformer/config.json"))
    }

    /// The transformer's 2-D weights as (module path, (out, in)), from the checkpoint headers
    /// alone (nothing is loaded).
    pub fn transformer_linear_shapes(&self) -> Result<Vec<(String, (usize, usize))>> {
        let checkpoint =
            TransformerCheckpoint::open(component_files(&self.root.join("transformer"))?)?;
        Ok(checkpoint
            .shapes()
            .into_iter()
            .filter_map(
                |(name, shape)| match (name.strip_suffix(".weight"), &shape[..]) {
                    (Some(path), &[out, inp]) => Some((path.to_string(), (out, inp))),
                    _ => None,
                },
            )
            .collect())
    }

    /// Refuses a storage (quantization, blocks on device) that this folder's transformer or
    /// text encoder cannot take, before anything is loaded.
    pub fn check_storage(&self, storage: BaseStorage) -> Result<()> {
        if let Some(q) = storage.quantize_text_encoder {
            let path = self.root.join("text_encoder/config.json");
            let cfg = TextEncoderConfig::from_file(&path)?;
            cfg.check_quantization(q).map_err(Error::Invalid)?;
        }
        if storage.quantize.is_none() && storage.blocks_on_device.is_none() {
            return Ok(());
        }
        storage.check(&self.transformer_config()?)
    }

    /// The transformer from this folder, or from a single-file checkpoint (ComfyUI or
    /// diffusers names) that replaces it; its base held as `storage` says.
    pub fn load_transformer(
        &self,
        single_file: Option<&Path>,
        dtype: DType,
        device: &Device,
        storage: BaseStorage,
    ) -> Result<ZImageTransformer> {
        let files = match single_file {
            Some(f) => vec![f.to_path_buf()],
            None => component_files(&self.root.join("transformer"))?,
        };
        let checkpoint = TransformerCheckpoint::open(files)?;
        let cfg = match self.transformer_config() {
            Ok(cfg) => cfg,
            Err(_) if single_file.is_some() => checkpoint.infer_config()?,
            Err(e) => return Err(e),
        };
        checkpoint.load_stored(&cfg, dtype, device, storage)
    }

    /// The tokenizer and text encoder; with `quantize`, the encoder's decoder layers stored
    /// quantized. An fp8 text encoder file is refused then: requantizing its weights would
    /// only add error to the 8 bits it already has.
    pub fn load_prompt_encoder(
        &self,
        dtype: DType,
        device: &Device,
        quantize: Option<Quantization>,
    ) -> Result<PromptEncoder> {
        let tokenizer = PromptTokenizer::from_file(&self.root.join("tokenizer/tokenizer.json"))?;
        let dir = self.root.join("text_encoder");
        let cfg = TextEncoderConfig::from_file(&dir.join("config.json"))?;
        let files = component_files(&dir)?;
        if let Some(q) = quantize {
            if holds_fp8(&files)? {
                return Err(Error::bad_file(
                    &dir,
                    format!(
                        "holds fp8 weights already: leave quantize_text_encoder \
                         (--quantize-text-encoder) unset rather than {q}, or use a bf16 text encoder"
                    ),
                ));
            }
        }
        let vb = plain_var_builder(&files, dtype, device)?;
        let encoder =
            Qwen3TextEncoder::new_stored(&cfg, vb, quantize).map_err(|e| e.in_file(&dir))?;
        Ok(PromptEncoder::new(tokenizer, encoder))
    }

    pub fn load_vae(&self, dtype: DType, device: &Device) -> Result<AutoencoderKL> {
        let dir = self.root.join("vae");
        let cfg = VaeConfig::from_file(&dir.join("config.json"))?;
        let vb = plain_var_builder(&component_files(&dir)?, dtype, device)?;
        AutoencoderKL::new(&cfg, vb).map_err(|e| e.in_file(&dir))
    }

    /// The static shift in scheduler/scheduler_config.json (3 for Turbo, 6 for Base).
    pub fn scheduler_shift(&self) -> Result<f64> {
        let path = self.root.join("scheduler/scheduler_config.json");
        let text = crate::fsutil::read_text(&path)?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&path, format!("invalid JSON: {e}")))?;
        if value.get("use_dynamic_shifting").and_then(|v| v.as_bool()) == Some(true) {
            return Err(Error::bad_file(
                &path,
                "dynamic shifting is not used by Z-Image and is not supported",
            ));
        }
        let shift = value
            .get("shift")
            .and_then(|v| v.as_f64())
            .ok_or_else(|| Error::bad_file(&path, "no numeric \"shift\""))?;
        crate::sample::schedule::check_shift(shift).map_err(|msg| Error::bad_file(&path, msg))?;
        Ok(shift)
    }
}
