//! The transformer's configuration, read from diffusers' `transformer/config.json`.

use std::path::Path;

use serde::Deserialize;

use crate::{Error, Result};

/// Sequence lengths (caption and image tokens) are padded to a multiple of this.
pub const SEQ_MULTI_OF: usize = 32;
/// The adaLN conditioning width is min(dim, this).
pub const ADALN_EMBED_DIM: usize = 256;
/// Hidden width of the timestep MLP.
pub const T_EMBED_MID: usize = 1024;
/// Width of the sinusoidal timestep features.
pub const T_FREQ_DIM: usize = 256;

#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct TransformerConfig {
    #[serde(default = "default_patch")]
    pub all_patch_size: Vec<usize>,
    #[serde(default = "default_f_patch")]
    pub all_f_patch_size: Vec<usize>,
    #[serde(default = "default_in_channels")]
    pub in_channels: usize,
    pub dim: usize,
    pub n_layers: usize,
    pub n_refiner_layers: usize,
    pub n_heads: usize,
    #[serde(default)]
    pub n_kv_heads: Option<usize>,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    #[serde(default = "default_true")]
    pub qk_norm: bool,
    pub cap_feat_dim: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_t_scale")]
    pub t_scale: f64,
    pub axes_dims: Vec<usize>,
    pub axes_lens: Vec<usize>,
}

fn default_patch() -> Vec<usize> {
    vec![2]
}
fn default_f_patch() -> Vec<usize> {
    vec![1]
}
fn default_in_channels() -> usize {
    16
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_true() -> bool {
    true
}
fn default_rope_theta() -> f64 {
    256.0
}
fn default_t_scale() -> f64 {
    1000.0
}

impl TransformerConfig {
    /// The released Turbo / Base / De-Turbo transformer (identical architecture).
    pub fn z_image() -> Self {
        Self {
            all_patch_size: vec![2],
            all_f_patch_size: vec![1],
            in_channels: 16,
            dim: 3840,
            n_layers: 30,
            n_refiner_layers: 2,
            n_heads: 30,
            n_kv_heads: Some(30),
            norm_eps: 1e-5,
            qk_norm: true,
            cap_feat_dim: 2560,
            rope_theta: 256.0,
            t_scale: 1000.0,
            axes_dims: vec![32, 48, 48],
            axes_lens: vec![1536, 512, 512],
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::fsutil::read_text(path)?;
        let cfg: Self = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(path, format!("not a Z-Image transformer config: {e}")))?;
        cfg.validate().map_err(|msg| Error::bad_file(path, msg))?;
        Ok(cfg)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.patch_size() != 2 || self.f_patch_size() != 1 {
            return Err(
                "only patch size 2 and frame patch size 1 (text-to-image) are supported".into(),
            );
        }
        if self.n_heads == 0 || !self.dim.is_multiple_of(self.n_heads) {
            return Err(format!(
                "dim {} is not divisible by n_heads {}",
                self.dim, self.n_heads
            ));
        }
        if self.axes_dims.len() != 3 || self.axes_lens.len() != 3 {
            return Err("axes_dims and axes_lens must have three entries".into());
        }
        if self.axes_dims.iter().sum::<usize>() != self.head_dim() {
            return Err(format!(
                "axes_dims {:?} must sum to head_dim {}",
                self.axes_dims,
                self.head_dim()
            ));
        }
        if self.axes_dims.iter().any(|d| d % 2 != 0) {
            return Err("every axes_dims entry must be even".into());
        }
        Ok(())
    }

    pub fn patch_size(&self) -> usize {
        self.all_patch_size.first().copied().unwrap_or(2)
    }

    pub fn f_patch_size(&self) -> usize {
        self.all_f_patch_size.first().copied().unwrap_or(1)
    }

    /// The module-name key of the patch embedder and final layer, e.g. "2-1".
    pub fn patch_key(&self) -> String {
        format!("{}-{}", self.patch_size(), self.f_patch_size())
    }

    pub fn head_dim(&self) -> usize {
        self.dim / self.n_heads
    }

    /// FFN width as Python computes it: int(dim / 3 * 8) (85 for dim 32, not 80).
    pub fn ffn_dim(&self) -> usize {
        (self.dim as f64 / 3.0 * 8.0) as usize
    }

    pub fn adaln_dim(&self) -> usize {
        self.dim.min(ADALN_EMBED_DIM)
    }

    /// Features of one patch token: p·p·pf·C.
    pub fn patch_dim(&self) -> usize {
        self.patch_size() * self.patch_size() * self.f_patch_size() * self.in_channels
    }
}
