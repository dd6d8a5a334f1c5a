//! Rendering many variants of one model with one load: the prompts are encoded first and the
//! text encoder dropped, then the transformer is loaded once; variants differ only by which
//! named adapters are switched on and by the sampler settings; the VAE comes last, after the
//! transformer is dropped (the order of `generate`, for the same memory budget).

use candle_core::{DType, Device, Tensor};

use super::plan::{RenderSettings, StepsGuidance};
use crate::lora::LoraFile;
use crate::model::folder::ModelFolder;
use crate::model::ZImageTransformer;
use crate::sample::image::{to_rgb8, Rgb8};
use crate::sample::limits::ImageLimits;
use crate::sample::pipeline::{
    denoise, encode_conditions, seeded_noise, Conditioning, DenoiseSettings,
};
use crate::sample::Guidance;
use crate::train::lora::{detach, set_enabled};
use crate::Result;

/// Progress of a validation, for the caller to display.
pub enum Event<'a> {
    Stage(&'a str),
    /// One more image denoised out of `total` in this validation.
    Image {
        done: usize,
        total: usize,
    },
}

/// Counts denoised images across sessions for [`Event::Image`].
pub struct Progress<'a> {
    done: usize,
    total: usize,
    events: &'a mut dyn FnMut(Event),
}

impl<'a> Progress<'a> {
    /// A validation that will denoise `total` images.
    pub fn new(total: usize, events: &'a mut dyn FnMut(Event)) -> Self {
        Self {
            done: 0,
            total,
            events,
        }
    }

    pub fn stage(&mut self, msg: &str) {
        (self.events)(Event::Stage(msg));
    }

    fn image(&mut self) {
        self.done += 1;
        (self.events)(Event::Image {
            done: self.done,
            total: self.total,
        });
    }
}

/// One model loaded for rendering every (prompt, seed) under several adapter settings.
pub struct Session {
    folder: ModelFolder,
    model: ZImageTransformer,
    conds: Vec<Conditioning>,
    /// One starting noise per seed: every variant, on either model, starts from the same.
    noise: Vec<Tensor>,
    shift: f64,
    device: Device,
    dtype: DType,
}

impl Session {
    /// Encodes `prompts` (with the negative prompt when `cfg`), drops the text encoder and
    /// loads the transformer.
    pub fn open(
        model: &str,
        render: &RenderSettings,
        prompts: &[String],
        cfg: bool,
        progress: &mut Progress,
    ) -> Result<Self> {
        let device = crate::device::select()?;
        let dtype = render.dtype.dtype(&device);
        progress.stage(&format!(
            "{model}: {}",
            crate::device::describe(&device, dtype)
        ));
        let folder = ModelFolder::open(model)?;
        let (h, w) =
            ImageLimits::of_folder(&folder, &device)?.latent_size(render.height, render.width)?;
        let noise = render
            .seeds
            .iter()
            .map(|&s| seeded_noise(s, &[1, 16, h, w], &device))
            .collect::<candle_core::Result<Vec<_>>>()?;
        progress.stage(&format!("{model}: encoding {} prompts", prompts.len()));
        let negative = cfg.then_some(render.negative_prompt.as_str());
        let storage = (dtype, &device, render.quantize_text_encoder);
        let conds = encode_conditions(&folder, prompts, negative, storage, &mut |w| {
            progress.stage(w)
        })?;
        progress.stage(&format!("{model}: loading the transformer"));
        let model = folder.load_transformer(None, dtype, &device, render.storage())?;
        Ok(Self {
            shift: folder.scheduler_shift()?,
            folder,
            model,
            conds,
            noise,
            device,
            dtype,
        })
    }

    pub fn shift(&self) -> f64 {
        self.shift
    }

    pub fn dim(&self) -> usize {
        self.model.config().dim
    }

    /// Attaches a LoRA file under `name` (switched on); returns how many modules it touched.
    pub fn attach(&mut self, lora: &LoraFile, name: &str, strength: f64) -> Result<usize> {
        lora.attach_named(name, strength, &mut self.model)
    }

    pub fn set_enabled(&mut self, name: &str, on: bool) {
        set_enabled(&mut self.model, name, on);
    }

    pub fn detach(&mut self, name: &str) {
        detach(&mut self.model, name);
    }

    /// Final latents of every (prompt, seed), prompt-major, with the adapters as now set.
    pub fn denoise_all(
        &self,
        sampling: StepsGuidance,
        progress: &mut Progress,
    ) -> Result<Vec<Tensor>> {
        let settings = DenoiseSettings {
            steps: sampling.steps,
            shift: self.shift,
            guidance: Guidance {
                scale: sampling.guidance,
                ..Guidance::default()
            },
        };
        let mut out = Vec::new();
        for cond in &self.conds {
            for start in &self.noise {
                out.push(denoise(
                    &self.model,
                    cond,
                    start.clone(),
                    &settings,
                    &mut |_, _| {},
                )?);
                progress.image();
            }
        }
        Ok(out)
    }

    /// Drops the transformer, loads the VAE and decodes each group of latents.
    pub fn decode(self, groups: Vec<Vec<Tensor>>) -> Result<Vec<Vec<Rgb8>>> {
        let Session {
            folder,
            device,
            dtype,
            ..
        } = self;
        let vae = folder.load_vae(dtype, &device)?;
        groups
            .into_iter()
            .map(|latents| {
                latents
                    .iter()
                    .map(|z| to_rgb8(&vae.decode(&vae.from_transformer_space(z)?)?.get(0)?))
                    .collect()
            })
            .collect()
    }
}
