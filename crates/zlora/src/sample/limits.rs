//! What image sizes a model and this machine can take, checked before anything is allocated.
//!
//! Two bounds, each named in its error:
//! - the model's RoPE tables: an image token at patch row i, column j needs rows i and j of
//!   the `axes_lens[1]` / `axes_lens[2]` tables, so a side is at most
//!   axes_lens × patch size × VAE factor pixels (8192 for Z-Image: 512 × 2 × 8);
//! - memory, on the CPU device: a lower bound of what one image needs (one head's f32 attention
//!   scores over the image tokens, one f32 activation of the VAE's full-resolution layer),
//!   against the memory the system reports available. The bound is deliberately low, so a
//!   size it refuses cannot fit; a size it accepts may still not (GPU memory is not queried).

use candle_core::Device;

use crate::data::buckets::Buckets;
use crate::model::config::{TransformerConfig, SEQ_MULTI_OF};
use crate::model::folder::ModelFolder;
use crate::model::vae::VaeConfig;
use crate::{Error, Result};

/// The size limits of one model folder.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageLimits {
    /// Pixels per latent cell (the VAE's spatial factor).
    factor: usize,
    /// Pixels per image token side: patch size × factor.
    token: usize,
    /// RoPE table lengths of the height and width axes.
    rows: usize,
    cols: usize,
    /// Channels of the VAE's full-resolution layer.
    full_res_channels: usize,
    /// Whether the work runs in host memory (the CPU device), so the memory bound applies.
    on_host: bool,
}

impl ImageLimits {
    pub fn new(transformer: &TransformerConfig, vae: &VaeConfig, device: &Device) -> Self {
        let factor = vae.spatial_factor();
        Self {
            factor,
            token: transformer.patch_size() * factor,
            rows: transformer.axes_lens[1],
            cols: transformer.axes_lens[2],
            full_res_channels: vae.block_out_channels[0],
            on_host: device.is_cpu(),
        }
    }

    /// Reads both configs of a model folder (no weights) for work on `device`.
    pub fn of_folder(folder: &ModelFolder, device: &Device) -> Result<Self> {
        let vae = VaeConfig::from_file(&folder.root().join("vae/config.json"))?;
        Ok(Self::new(&folder.transformer_config()?, &vae, device))
    }

    /// The largest (height, width) in pixels the RoPE tables cover.
    pub fn max_size(&self) -> (usize, usize) {
        (self.rows * self.token, self.cols * self.token)
    }

    /// Image size → latent size, after every check: multiples of the token size, within the
    /// RoPE tables, and not beyond the available memory.
    pub fn latent_size(&self, height: usize, width: usize) -> Result<(usize, usize)> {
        let m = self.token;
        if height == 0 || width == 0 || !height.is_multiple_of(m) || !width.is_multiple_of(m) {
            return Err(Error::Invalid(format!(
                "width and height must be positive multiples of {m} for this model, got {width}×{height}"
            )));
        }
        let (max_h, max_w) = self.max_size();
        if height > max_h || width > max_w {
            return Err(Error::Invalid(format!(
                "{width}×{height} is larger than this model's limit of {max_w}×{max_h} (its RoPE \
                 position tables cover {}×{} image tokens of {m}×{m} pixels)",
                self.cols, self.rows
            )));
        }
        if self.on_host {
            check_memory(self.min_bytes(height, width), width, height)?;
        }
        Ok((height / self.factor, width / self.factor))
    }

    /// Every training bucket of `buckets` passes [`Self::latent_size`]; the error names the
    /// resolution and the bucket.
    pub fn check_buckets(&self, buckets: &Buckets) -> Result<()> {
        for b in buckets.all() {
            self.latent_size(b.height as usize, b.width as usize)
                .map_err(|e| {
                    Error::Invalid(format!(
                        "[dataset] resolution {} makes a {b} bucket: {e}",
                        buckets.resolution()
                    ))
                })?;
        }
        Ok(())
    }

    /// A lower bound of the bytes one image of this size needs (see the module documentation).
    pub fn min_bytes(&self, height: usize, width: usize) -> u64 {
        let tokens = ((height / self.token) * (width / self.token)).next_multiple_of(SEQ_MULTI_OF);
        let scores = (tokens as u64).pow(2) * 4;
        let decoder = (self.full_res_channels * height * width) as u64 * 4;
        scores.max(decoder)
    }
}

/// Refuses a size whose lower-bound memory exceeds what the system has available.
fn check_memory(needed: u64, width: usize, height: usize) -> Result<()> {
    match available_memory() {
        Some(available) if needed > available => Err(Error::Invalid(format!(
            "{width}×{height} needs at least {} of memory (one head's attention scores or one \
             full-resolution VAE activation), {} is available",
            gib(needed),
            gib(available)
        ))),
        _ => Ok(()),
    }
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

/// MemAvailable from /proc/meminfo (Linux), in bytes; None where the system does not say.
pub fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zimage() -> ImageLimits {
        ImageLimits::new(
            &TransformerConfig::z_image(),
            &VaeConfig::z_image(),
            &Device::Cpu,
        )
    }

    #[test]
    fn the_rope_tables_bound_zimage_at_8192_pixels() {
        let limits = zimage();
        assert_eq!(limits.max_size(), (8192, 8192));
        let e = limits.latent_size(8208, 1024).unwrap_err().to_string();
        assert!(
            e.contains("limit of 8192×8192") && e.contains("512×512 image tokens"),
            "{e}"
        );
        assert!(
            limits.latent_size(1000, 1024).is_err(),
            "not a multiple of 16"
        );
        assert!(limits.latent_size(0, 1024).is_err());
    }

    #[test]
    fn the_memory_bound_is_the_larger_of_scores_and_decoder() {
        let limits = zimage();
        // 1024²: 4096 tokens → 64 MiB of scores; the decoder's 128 channels → 512 MiB.
        assert_eq!(limits.min_bytes(1024, 1024), 128 * 1024 * 1024 * 4);
        // 8192²: 262144 tokens → 256 GiB of scores, more than any CPU machine here.
        assert_eq!(limits.min_bytes(8192, 8192), 262_144u64.pow(2) * 4);
        let available = available_memory().expect("Linux reports MemAvailable");
        assert!(limits.min_bytes(8192, 8192) > available);
        let e = limits.latent_size(8192, 8192).unwrap_err().to_string();
        assert!(e.contains("needs at least 256.0 GiB"), "{e}");
        // Off the host (a GPU) host memory says nothing: only the RoPE bound applies.
        let gpu = ImageLimits {
            on_host: false,
            ..limits
        };
        assert_eq!(gpu.latent_size(8192, 8192).ok(), Some((1024, 1024)));
    }
}
