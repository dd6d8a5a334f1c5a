//! Samples during training: fixed prompts × fixed seeds at the mode's validation settings,
//! saved as one labelled grid per checkpoint (`samples/step-NNNNNN.png`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::config::{Mode, TrainConfig};
use crate::model::folder::ModelFolder;
use crate::model::ZImageTransformer;
use crate::sample::image::{save_png, to_rgb8, Rgb8};
use crate::sample::limits::ImageLimits;
use crate::sample::pipeline::{
    denoise, encode_conditions, seeded_noise, Conditioning, DenoiseSettings,
};
use crate::sample::sheet::contact_sheet;
use crate::sample::Guidance;
use crate::{Error, Result};

pub struct Sampler {
    prompts: Vec<String>,
    seeds: Vec<u64>,
    conds: Vec<Conditioning>,
    settings: DenoiseSettings,
    latent_hw: (usize, usize),
    mode: Mode,
    folder: ModelFolder,
    device: Device,
    dtype: DType,
}

impl Sampler {
    /// Encodes the sample prompts now in the transformer's compute `dtype` (the text encoder
    /// is dropped right after); prompts longer than it reads are reported to `warn`.
    pub fn new(
        cfg: &TrainConfig,
        folder: &ModelFolder,
        (device, dtype): (&Device, DType),
        warn: &mut dyn FnMut(&str),
    ) -> Result<Self> {
        let mode = cfg.mode();
        let s = &cfg.sample;
        let (steps, guidance) = mode.sampling();
        let guidance = s.guidance.unwrap_or(guidance);
        let conds = if s.every > 0 {
            let negative = (guidance > 0.0).then_some(s.negative_prompt.as_str());
            let storage = (dtype, device, cfg.model.quantize_text_encoder);
            encode_conditions(folder, &s.prompts, negative, storage, warn)?
        } else {
            Vec::new()
        };
        let res = cfg.resolution() as usize;
        let latent_hw = ImageLimits::of_folder(folder, device)?
            .latent_size(s.height.unwrap_or(res), s.width.unwrap_or(res))
            .map_err(|e| Error::Invalid(format!("[sample] size: {e}")))?;
        Ok(Self {
            prompts: s.prompts.clone(),
            seeds: s.seeds.clone(),
            conds,
            settings: DenoiseSettings {
                steps: s.steps.unwrap_or(steps),
                shift: folder.scheduler_shift()?,
                guidance: Guidance {
                    scale: guidance,
                    ..Guidance::default()
                },
            },
            latent_hw,
            mode,
            folder: folder.clone(),
            device: device.clone(),
            dtype,
        })
    }

    /// Renders the grid with the model as it is now, without an autograd graph even through
    /// the LoRA being trained; returns the PNG's path. All latents are denoised first, then
    /// the VAE is loaded for decoding and dropped again, so that it never sits beside the
    /// training's working set.
    pub fn render(&self, model: &ZImageTransformer, step: u64, out: &Path) -> Result<PathBuf> {
        let mut images = self.decode(&self.denoise_all(model)?)?.into_iter();
        let rows: Vec<Vec<Rgb8>> = self
            .conds
            .iter()
            .map(|_| images.by_ref().take(self.seeds.len()).collect())
            .collect();
        let s = &self.settings;
        let title = format!(
            "step {step} | {} | {} steps, guidance {}",
            self.mode.name(),
            s.steps,
            s.guidance.scale
        );
        let cols: Vec<String> = self.seeds.iter().map(|s| format!("seed {s}")).collect();
        let sheet = contact_sheet(&title, &self.prompts, &cols, &rows)?;
        let path = out.join("samples").join(format!("step-{step:06}.png"));
        save_png(&path, &sheet, &[("parameters", title)], true)?;
        Ok(path)
    }

    /// Final latents of every (prompt, seed), prompt-major.
    fn denoise_all(&self, model: &ZImageTransformer) -> Result<Vec<Tensor>> {
        let (h, w) = self.latent_hw;
        let channels = model.config().in_channels;
        let mut latents = Vec::new();
        for cond in &self.conds {
            for &seed in &self.seeds {
                let start = seeded_noise(seed, &[1, channels, h, w], &self.device)?;
                latents.push(denoise(model, cond, start, &self.settings, &mut |_, _| {})?);
            }
        }
        Ok(latents)
    }

    /// Loads the VAE, decodes, and drops it on return.
    fn decode(&self, latents: &[Tensor]) -> Result<Vec<Rgb8>> {
        let vae = self.folder.load_vae(self.dtype, &self.device)?;
        latents
            .iter()
            .map(|z| to_rgb8(&vae.decode(&vae.from_transformer_space(z)?)?.get(0)?))
            .collect()
    }
}
