//! Qwen3-VL's `config.json` and `preprocessor_config.json`, in both the transformers 4.57
//! spelling of the published checkpoints (`rope_theta` + `rope_scaling`, `min_pixels`) and
//! the transformers 5 one (`rope_parameters`, `size.shortest_edge`).

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// The rotary settings of the text decoder: θ and the interleaved M-RoPE sections (T, H, W
/// frequency counts, summing to head_dim / 2).
#[derive(Debug, Clone, PartialEq, Deserialize)]
struct RawRope {
    rope_theta: Option<f64>,
    #[serde(default)]
    mrope_section: Vec<usize>,
    mrope_interleaved: Option<bool>,
}

#[derive(Debug, Clone, Deserialize)]
struct RawText {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: usize,
    head_dim: usize,
    rms_norm_eps: f64,
    hidden_act: String,
    #[serde(default)]
    attention_bias: bool,
    rope_theta: Option<f64>,
    rope_parameters: Option<RawRope>,
    rope_scaling: Option<RawRope>,
    tie_word_embeddings: Option<bool>,
}

fn three() -> usize {
    3
}

fn vision_theta() -> f64 {
    10_000.0
}

/// The vision tower's hyper-parameters (transformers' `Qwen3VLVisionConfig`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VisionConfig {
    pub depth: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_heads: usize,
    pub patch_size: usize,
    pub spatial_merge_size: usize,
    pub temporal_patch_size: usize,
    pub out_hidden_size: usize,
    pub num_position_embeddings: usize,
    #[serde(default)]
    pub deepstack_visual_indexes: Vec<usize>,
    pub hidden_act: String,
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(skip, default = "vision_theta")]
    pub rope_theta: f64,
}

impl VisionConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Values per patch row of `pixel_values`: channels × temporal × patch × patch.
    pub fn patch_dim(&self) -> usize {
        self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size
    }

    /// Side of the learned square position grid.
    pub fn grid_side(&self) -> usize {
        (self.num_position_embeddings as f64).sqrt().round() as usize
    }
}

/// The text decoder's hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub attention_bias: bool,
    pub rope_theta: f64,
    /// Frequencies per axis (T, H, W); H and W take every third frequency from 1 and 2.
    pub mrope_section: [usize; 3],
}

/// A whole Qwen3-VL `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct VlmConfig {
    pub text: TextConfig,
    pub vision: VisionConfig,
    pub image_token_id: u32,
    pub vision_start_token_id: u32,
    pub vision_end_token_id: u32,
    pub tie_word_embeddings: bool,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    text_config: RawText,
    vision_config: serde_json::Value,
    image_token_id: u32,
    vision_start_token_id: u32,
    vision_end_token_id: u32,
    tie_word_embeddings: Option<bool>,
}

impl VlmConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::fsutil::read_text(path)?;
        Self::parse(&text).map_err(|msg| Error::bad_file(path, msg))
    }

    fn parse(text: &str) -> std::result::Result<Self, String> {
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| format!("not a Qwen3-VL config.json: {e}"))?;
        if raw.model_type.as_deref() != Some("qwen3_vl") {
            return Err(format!(
                "model_type is {:?}, zlora caption runs Qwen3-VL (\"qwen3_vl\") models",
                raw.model_type.unwrap_or_default()
            ));
        }
        let vision = vision_config(raw.vision_config)?;
        let text = text_config(&raw.text_config)?;
        let tie = raw
            .tie_word_embeddings
            .or(raw.text_config.tie_word_embeddings)
            .unwrap_or(false);
        Ok(Self {
            text,
            vision,
            image_token_id: raw.image_token_id,
            vision_start_token_id: raw.vision_start_token_id,
            vision_end_token_id: raw.vision_end_token_id,
            tie_word_embeddings: tie,
        })
    }
}

fn vision_config(value: serde_json::Value) -> std::result::Result<VisionConfig, String> {
    let theta = value
        .pointer("/rope_parameters/rope_theta")
        .and_then(serde_json::Value::as_f64);
    let mut cfg: VisionConfig =
        serde_json::from_value(value).map_err(|e| format!("vision_config: {e}"))?;
    cfg.rope_theta = theta.unwrap_or(cfg.rope_theta);
    let side = cfg.grid_side();
    let ok = cfg.num_heads > 0
        && cfg.hidden_size.is_multiple_of(cfg.num_heads)
        && cfg.head_dim().is_multiple_of(4)
        && side * side == cfg.num_position_embeddings
        && cfg.spatial_merge_size > 0
        && cfg.patch_size > 0
        && cfg.temporal_patch_size > 0
        && cfg.deepstack_visual_indexes.iter().all(|&i| i < cfg.depth);
    if !ok {
        return Err(
            "vision_config: inconsistent sizes (heads, position grid, deepstack layers)".into(),
        );
    }
    if cfg.hidden_act != "gelu_pytorch_tanh" {
        return Err(format!(
            "vision_config.hidden_act {:?} is not Qwen3-VL's gelu_pytorch_tanh",
            cfg.hidden_act
        ));
    }
    Ok(cfg)
}

fn text_config(raw: &RawText) -> std::result::Result<TextConfig, String> {
    let rope = raw
        .rope_parameters
        .clone()
        .or_else(|| raw.rope_scaling.clone())
        .ok_or("text_config has neither rope_parameters nor rope_scaling (the M-RoPE sections)")?;
    let theta = rope
        .rope_theta
        .or(raw.rope_theta)
        .ok_or("text_config has no rope_theta")?;
    let section: [usize; 3] = rope.mrope_section.as_slice().try_into().map_err(|_| {
        format!(
            "text_config mrope_section {:?} must list 3 axes",
            rope.mrope_section
        )
    })?;
    if section.iter().sum::<usize>() != raw.head_dim / 2 || rope.mrope_interleaved == Some(false) {
        return Err(format!(
            "text_config mrope_section {section:?} must be interleaved and sum to head_dim / 2 = {}",
            raw.head_dim / 2
        ));
    }
    if raw.hidden_act != "silu" {
        return Err(format!(
            "text_config.hidden_act {:?} is not silu",
            raw.hidden_act
        ));
    }
    if raw.num_key_value_heads == 0
        || !raw
            .num_attention_heads
            .is_multiple_of(raw.num_key_value_heads)
    {
        return Err("text_config: attention heads must be a multiple of key/value heads".into());
    }
    Ok(TextConfig {
        vocab_size: raw.vocab_size,
        hidden_size: raw.hidden_size,
        intermediate_size: raw.intermediate_size,
        num_hidden_layers: raw.num_hidden_layers,
        num_attention_heads: raw.num_attention_heads,
        num_key_value_heads: raw.num_key_value_heads,
        head_dim: raw.head_dim,
        rms_norm_eps: raw.rms_norm_eps,
        attention_bias: raw.attention_bias,
        rope_theta: theta,
        mrope_section: section,
    })
}

/// The image processor's settings (`preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessorConfig {
    pub min_pixels: usize,
    pub max_pixels: usize,
    pub patch_size: usize,
    pub merge_size: usize,
    pub temporal_patch_size: usize,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    pub rescale_factor: f64,
}

#[derive(Deserialize)]
struct RawSize {
    shortest_edge: Option<usize>,
    longest_edge: Option<usize>,
}

#[derive(Deserialize)]
struct RawProcessor {
    size: Option<RawSize>,
    min_pixels: Option<usize>,
    max_pixels: Option<usize>,
    patch_size: usize,
    merge_size: usize,
    temporal_patch_size: usize,
    image_mean: [f32; 3],
    image_std: [f32; 3],
    rescale_factor: Option<f64>,
    resample: Option<u32>,
}

/// PIL's code for bicubic resampling, the only one zlora reproduces.
const PIL_BICUBIC: u32 = 3;

impl ProcessorConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::fsutil::read_text(path)?;
        Self::parse(&text).map_err(|msg| Error::bad_file(path, msg))
    }

    fn parse(text: &str) -> std::result::Result<Self, String> {
        let raw: RawProcessor = serde_json::from_str(text)
            .map_err(|e| format!("not a Qwen-VL preprocessor_config.json: {e}"))?;
        let size = raw.size.as_ref();
        let min = size.and_then(|s| s.shortest_edge).or(raw.min_pixels);
        let max = size.and_then(|s| s.longest_edge).or(raw.max_pixels);
        let (Some(min_pixels), Some(max_pixels)) = (min, max) else {
            return Err("no pixel range: size.shortest_edge/longest_edge or min/max_pixels".into());
        };
        if raw.resample.is_some_and(|r| r != PIL_BICUBIC) {
            return Err(format!("resample {:?} is not bicubic (3)", raw.resample));
        }
        let cfg = Self {
            min_pixels,
            max_pixels,
            patch_size: raw.patch_size,
            merge_size: raw.merge_size,
            temporal_patch_size: raw.temporal_patch_size,
            mean: raw.image_mean,
            std: raw.image_std,
            rescale_factor: raw.rescale_factor.unwrap_or(1.0 / 255.0),
        };
        if cfg.factor() == 0 || min_pixels > max_pixels || cfg.temporal_patch_size == 0 {
            return Err("inconsistent sizes (patch, merge, min/max pixels)".into());
        }
        Ok(cfg)
    }

    /// Resized sides are multiples of this: patch × merge.
    pub fn factor(&self) -> usize {
        self.patch_size * self.merge_size
    }

    /// The processor must cut images into the patches the vision tower embeds.
    pub fn check_against(&self, vision: &VisionConfig) -> std::result::Result<(), String> {
        let same = self.patch_size == vision.patch_size
            && self.merge_size == vision.spatial_merge_size
            && self.temporal_patch_size == vision.temporal_patch_size;
        if same {
            Ok(())
        } else {
            Err("patch, merge or temporal size differ from config.json's vision_config".into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PUBLISHED: &str = r#"{
      "model_type": "qwen3_vl", "image_token_id": 151655, "vision_start_token_id": 151652,
      "vision_end_token_id": 151653, "tie_word_embeddings": true,
      "text_config": {"vocab_size": 151936, "hidden_size": 2560, "intermediate_size": 9728,
        "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "rms_norm_eps": 1e-6, "hidden_act": "silu", "rope_theta": 5000000,
        "rope_scaling": {"mrope_interleaved": true, "mrope_section": [24, 20, 20], "rope_type": "default"}},
      "vision_config": {"depth": 24, "hidden_size": 1024, "intermediate_size": 4096,
        "num_heads": 16, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
        "out_hidden_size": 2560, "num_position_embeddings": 2304,
        "deepstack_visual_indexes": [5, 11, 17], "hidden_act": "gelu_pytorch_tanh"}
    }"#;

    #[test]
    fn reads_the_published_4b_spelling() {
        let cfg = VlmConfig::parse(PUBLISHED).unwrap();
        assert_eq!(cfg.text.mrope_section, [24, 20, 20]);
        assert_eq!(cfg.text.rope_theta, 5e6);
        assert_eq!(cfg.vision.rope_theta, 10_000.0);
        assert_eq!(cfg.vision.grid_side(), 48);
        assert!(cfg.tie_word_embeddings);
        let other = PUBLISHED.replace("qwen3_vl\"", "qwen2_5_vl\"");
        assert!(VlmConfig::parse(&other).unwrap_err().contains("Qwen3-VL"));
        let uneven = PUBLISHED.replace("[24, 20, 20]", "[24, 20, 16]");
        assert!(VlmConfig::parse(&uneven)
            .unwrap_err()
            .contains("head_dim / 2"));
    }

    #[test]
    fn processor_reads_both_pixel_spellings() {
        let new = r#"{"size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16,
            "merge_size": 2, "temporal_patch_size": 2, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5]}"#;
        let old = r#"{"min_pixels": 65536, "max_pixels": 16777216, "patch_size": 16,
            "merge_size": 2, "temporal_patch_size": 2, "image_mean": [0.5, 0.5, 0.5],
            "image_std": [0.5, 0.5, 0.5], "resample": 3}"#;
        let (a, b) = (
            ProcessorConfig::parse(new).unwrap(),
            ProcessorConfig::parse(old).unwrap(),
        );
        assert_eq!(a, b);
        assert_eq!(a.factor(), 32);
        assert!(
            ProcessorConfig::parse(&old.replace("\"resample\": 3", "\"resample\": 2")).is_err()
        );
    }
}
