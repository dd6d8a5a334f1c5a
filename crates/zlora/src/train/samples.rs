//! Samples during training: fixed prompts × fixed seeds at the mode's validation settings,
//! saved as one labelled grid per checkpoint (`samples/step-NNNNNN.png`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};

use super::config::{Mode, TrainConfig};
use crate::model::folder::ModelFolder;
use crate::model::vae::AutoencoderKL;
use crate::model::ZImageTransformer;
use crate::sample::generate::latent_size;
use crate::sample::image::{save_png, to_rgb8, Rgb8};
use crate::sample::pipeline::{
    denoise, encode_conditions, seeded_noise, Conditioning, DenoiseSettings,
};
use crate::sample::sheet::contact_sheet;
use crate::sample::Guidance;
use crate::Result;

pub struct Sampler {
    prompts: Vec<String>,
    seeds: Vec<u64>,
    conds: Vec<Conditioning>,
    settings: DenoiseSettings,
    latent_hw: (usize, usize),
    mode: Mode,
    folder: ModelFolder,
    vae: Option<AutoencoderKL>,
    device: Device,
}

impl Sampler {
    /// Encodes the sample prompts now (the text encoder is dropped right after).
    pub fn new(cfg: &TrainConfig, folder: &ModelFolder, device: &Device) -> Result<Self> {
        let mode = cfg.mode();
        let s = &cfg.sample;
        let (steps, guidance) = mode.sampling();
        let guidance = s.guidance.unwrap_or(guidance);
        let conds = if s.every > 0 {
            let negative = (guidance > 0.0).then_some(s.negative_prompt.as_str());
            encode_conditions(folder, &s.prompts, negative, DType::F32, device)?
        } else {
            Vec::new()
        };
        let vae_factor =
            crate::model::vae::VaeConfig::from_file(&folder.root().join("vae/config.json"))?
                .spatial_factor();
        let res = cfg.dataset.resolution as usize;
        let latent_hw = latent_size(s.height.unwrap_or(res), s.width.unwrap_or(res), vae_factor)?;
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
            vae: None,
            device: device.clone(),
        })
    }

    /// Renders the grid with the model as it is now; returns the PNG's path.
    pub fn render(&mut self, model: &ZImageTransformer, step: u64, out: &Path) -> Result<PathBuf> {
        if self.vae.is_none() {
            self.vae = Some(self.folder.load_vae(DType::F32, &self.device)?);
        }
        let mut rows = Vec::new();
        for cond in &self.conds {
            let mut row = Vec::new();
            for &seed in &self.seeds {
                row.push(self.one(model, cond, seed)?);
            }
            rows.push(row);
        }
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

    fn one(&self, model: &ZImageTransformer, cond: &Conditioning, seed: u64) -> Result<Rgb8> {
        let (h, w) = self.latent_hw;
        let start = seeded_noise(seed, &[1, 16, h, w], &self.device)?;
        let latents = denoise(model, cond, start, &self.settings, &mut |_, _| {})?;
        let vae = self
            .vae
            .as_ref()
            .ok_or_else(|| crate::Error::Invalid("VAE not loaded".into()))?;
        let image = vae.decode(&vae.from_transformer_space(&latents)?)?;
        to_rgb8(&image.get(0)?)
    }
}
