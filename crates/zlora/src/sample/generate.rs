//! `zlora generate`: prompt → caption features → denoise (with LoRAs) → VAE → PNG.
//!
//! Memory order follows the 24 GB budget: the text encoder is loaded, used and dropped before
//! the transformer is loaded; the VAE comes last.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::guidance::Guidance;
use super::image::{save_png, to_rgb8};
use super::limits::ImageLimits;
use super::pipeline::{denoise, encode_conditions, seeded_noise, Conditioning, DenoiseSettings};
use crate::fsutil::save_safetensors;
use crate::lora::LoraFile;
use crate::model::folder::ModelFolder;
use crate::model::{BaseStorage, ZImageTransformer};
use crate::{Error, Result};

/// Sampler defaults of the two distilled/undistilled variants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// Distilled Turbo: 8 steps, no CFG.
    Turbo,
    /// Undistilled Base: 50 steps, CFG 4 (classic scale 5).
    Base,
}

impl Preset {
    pub fn steps(self) -> usize {
        match self {
            Preset::Turbo => 8,
            Preset::Base => 50,
        }
    }

    pub fn guidance(self) -> f64 {
        match self {
            Preset::Turbo => 0.0,
            Preset::Base => 4.0,
        }
    }
}

/// A LoRA file with the strength to apply it at.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub strength: f64,
}

impl LoraSpec {
    /// A finite strength and a regular file, before any model is loaded.
    pub fn check(&self) -> Result<()> {
        if !self.strength.is_finite() {
            return Err(Error::Invalid(format!(
                "the strength of LoRA {} is {}; any finite number is accepted",
                crate::error::shown(&self.path),
                self.strength
            )));
        }
        let checked = crate::fsutil::check_regular(&self.path, u64::MAX);
        match checked {
            Err(Error::Io { cause, .. })
                if cause.kind() == std::io::ErrorKind::NotFound
                    && self.path.to_string_lossy().contains(':') =>
            {
                Err(Error::bad_file(
                    &self.path,
                    "no such LoRA file (FILE:STRENGTH needs a number after the last colon)",
                ))
            }
            other => other.map(|_| ()),
        }
    }

    /// `FILE` or `FILE:STRENGTH` (a suffix that is not a number stays part of the path).
    pub fn parse(s: &str) -> Self {
        if let Some((path, strength)) = s.rsplit_once(':') {
            if let Ok(strength) = strength.parse::<f64>() {
                return Self {
                    path: path.into(),
                    strength,
                };
            }
        }
        Self {
            path: s.into(),
            strength: 1.0,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub model: String,
    /// A single-file transformer (ComfyUI or diffusers names) replacing the folder's.
    pub transformer_file: Option<PathBuf>,
    pub prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub shift: Option<f64>,
    pub guidance: Guidance,
    pub seeds: Vec<u64>,
    pub latents: Option<PathBuf>,
    pub loras: Vec<LoraSpec>,
    pub save_latents: Option<PathBuf>,
    /// Compute dtype; None = bf16 on a GPU, f32 on the CPU.
    pub dtype: Option<DType>,
    /// How the transformer's frozen base is held: its blocks quantized or not, every main
    /// layer on the device or only the first N (block swap).
    pub storage: BaseStorage,
    pub out: PathBuf,
    pub overwrite: bool,
    /// Apply LoRA files holding NaN or inf values (refused otherwise).
    pub allow_nonfinite: bool,
}

/// What one seed produced.
#[derive(Debug, Clone)]
pub struct Generated {
    pub seed: Option<u64>,
    pub png: PathBuf,
    pub latents: Tensor,
}

/// Progress events for the caller to display.
pub enum Event<'a> {
    Stage(&'a str),
    Step {
        image: usize,
        images: usize,
        step: usize,
        steps: usize,
    },
}

pub fn generate(req: &GenerateRequest, events: &mut dyn FnMut(Event)) -> Result<Vec<Generated>> {
    req.check()?;
    let device = crate::device::select()?;
    let dtype = req
        .dtype
        .unwrap_or_else(|| crate::device::default_dtype(&device));
    events(Event::Stage(&crate::device::describe(&device, dtype)));
    let folder = ModelFolder::open(&req.model)?;
    if req.transformer_file.is_none() {
        // A single-file transformer is checked when it loads.
        folder.check_storage(req.storage)?;
    }
    let (h, w) = ImageLimits::of_folder(&folder, &device)?.latent_size(req.height, req.width)?;
    let seeds = image_seeds(req);
    check_outputs(req, &seeds)?;
    let starts = initial_latents(req, &seeds, h, w, &device)?;

    let encoding = match req.storage.quantize_text_encoder {
        Some(q) => format!("encoding the prompt, the text encoder stored as {q}"),
        None => "encoding the prompt".to_string(),
    };
    events(Event::Stage(&encoding));
    let cond = encode_prompt(&folder, req, (dtype, &device), events)?;

    events(Event::Stage(&loading(req.storage)));
    let model = load_transformer(&folder, req, dtype, &device, events)?;
    let settings = DenoiseSettings {
        steps: req.steps,
        shift: match req.shift {
            Some(s) => s,
            None => folder.scheduler_shift()?,
        },
        guidance: req.guidance,
    };
    let mut finals = Vec::new();
    let images = starts.len();
    for (image, (seed, start)) in starts.into_iter().enumerate() {
        let mut step = |step, steps| {
            events(Event::Step {
                image,
                images,
                step,
                steps,
            })
        };
        let latents = denoise(&model, &cond, start, &settings, &mut step)?;
        if !crate::lora::all_finite(&latents)? {
            return Err(Error::Invalid(format!(
                "the latents of image {} came out NaN or inf (a LoRA strength, shift or \
                 guidance beyond what the model takes); no image was written",
                image + 1
            )));
        }
        finals.push((seed, latents));
    }
    drop(model);

    events(Event::Stage("decoding"));
    let vae = folder.load_vae(dtype, &device)?;
    let mut out = Vec::new();
    for (seed, latents) in finals {
        let raw = vae.from_transformer_space(&latents)?;
        let rgb = to_rgb8(&vae.decode(&raw)?.get(0)?)?;
        let png = output_path(&req.out, seed, images);
        save_png(
            &png,
            &rgb,
            &[("parameters", parameters(req, &settings, seed, dtype))],
            req.overwrite,
        )?;
        if let Some(path) = &req.save_latents {
            let path = output_path(path, seed, images);
            let tensors = [("latents".to_string(), latents.clone())]
                .into_iter()
                .collect();
            save_safetensors(&path, &tensors, None, req.overwrite)?;
        }
        out.push(Generated { seed, png, latents });
    }
    Ok(out)
}

impl GenerateRequest {
    /// Every check that needs no model: numbers in range, distinct seeds, a PNG output name,
    /// input files that exist and are regular files. Runs before anything is loaded.
    pub fn check(&self) -> Result<()> {
        let invalid = |msg: String| Err(Error::Invalid(msg));
        super::schedule::check_steps(self.steps).map_err(Error::Invalid)?;
        if let Some(shift) = self.shift {
            super::schedule::check_shift(shift).map_err(Error::Invalid)?;
        }
        self.guidance.check().map_err(Error::Invalid)?;
        if let Some(seed) = duplicate(&self.seeds) {
            return invalid(format!(
                "seed {seed} is given twice (each seed makes one image, FILE_s{seed}.png)"
            ));
        }
        let png = self.out.extension().and_then(|e| e.to_str());
        if !png.is_some_and(|e| e.eq_ignore_ascii_case("png")) {
            return Err(Error::bad_file(
                &self.out,
                "the output must be a .png file (zlora writes PNG, with its parameters inside)",
            ));
        }
        for spec in &self.loras {
            spec.check()?;
        }
        let inputs = self.transformer_file.iter().chain(&self.latents);
        for path in inputs {
            crate::fsutil::check_regular(path, u64::MAX)?;
        }
        Ok(())
    }
}

/// The first value that occurs twice.
pub fn duplicate(seeds: &[u64]) -> Option<u64> {
    let mut seen = std::collections::BTreeSet::new();
    seeds.iter().copied().find(|s| !seen.insert(*s))
}

/// One entry per image: its seed, or None for the single image of `--latents`.
fn image_seeds(req: &GenerateRequest) -> Vec<Option<u64>> {
    if req.latents.is_some() {
        vec![None]
    } else if req.seeds.is_empty() {
        vec![Some(0)]
    } else {
        req.seeds.iter().map(|&s| Some(s)).collect()
    }
}

/// The starting noise per image: the `--latents` file, or seeded noise.
fn initial_latents(
    req: &GenerateRequest,
    seeds: &[Option<u64>],
    h: usize,
    w: usize,
    device: &Device,
) -> Result<Vec<(Option<u64>, Tensor)>> {
    let shape = [1, 16, h, w];
    seeds
        .iter()
        .map(|&seed| match (seed, &req.latents) {
            (Some(s), _) => Ok((seed, seeded_noise(s, &shape, device)?)),
            (None, Some(path)) => Ok((None, read_latents(path, &shape, device)?)),
            (None, None) => Err(Error::Invalid("no seed and no --latents".into())),
        })
        .collect()
}

fn read_latents(path: &Path, shape: &[usize], device: &Device) -> Result<Tensor> {
    let bytes = crate::fsutil::read_regular(path)?;
    let mut tensors = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| Error::bad_file(path, format!("not a readable safetensors file: {e}")))?;
    let t = tensors
        .remove("latents")
        .ok_or_else(|| Error::bad_file(path, "no tensor named \"latents\""))?;
    if t.dims() != shape {
        return Err(Error::bad_file(
            path,
            format!("latents have shape {:?}, expected {shape:?}", t.dims()),
        ));
    }
    let t = t.to_dtype(DType::F32)?;
    if !crate::lora::all_finite(&t)? {
        return Err(Error::bad_file(path, "the latents hold NaN or inf values"));
    }
    Ok(t)
}

/// Fails before any work when an output cannot be written, or exists and `--force` was not
/// given.
fn check_outputs(req: &GenerateRequest, seeds: &[Option<u64>]) -> Result<()> {
    for &seed in seeds {
        for base in std::iter::once(&req.out).chain(req.save_latents.as_ref()) {
            let p = output_path(base, seed, seeds.len());
            crate::fsutil::check_writable(&p)?;
            if !req.overwrite && p.exists() {
                return Err(Error::bad_file(
                    &p,
                    "already exists (pass --force to overwrite it)",
                ));
            }
        }
    }
    Ok(())
}

/// The prompt's features (and the negative prompt's when CFG runs), through the one
/// encoding path every command uses.
fn encode_prompt(
    folder: &ModelFolder,
    req: &GenerateRequest,
    (dtype, device): (DType, &Device),
    events: &mut dyn FnMut(Event),
) -> Result<Conditioning> {
    let negative = (req.guidance.scale > 0.0).then_some(req.negative_prompt.as_str());
    let prompts = std::slice::from_ref(&req.prompt);
    let mut warn = |w: &str| events(Event::Stage(w));
    let storage = (dtype, device, req.storage.quantize_text_encoder);
    encode_conditions(folder, prompts, negative, storage, &mut warn)?
        .pop()
        .ok_or_else(|| Error::Invalid("prompt encoding returned nothing".into()))
}

/// The loading stage's line: how the base is held.
fn loading(storage: BaseStorage) -> String {
    let mut msg = String::from("loading the transformer");
    if let Some(q) = storage.quantize {
        msg += &format!(", its blocks stored as {q}");
    }
    if let Some(n) = storage.blocks_on_device {
        msg += &format!(", {n} main layers kept on the device (the others swapped in)");
    }
    msg
}

fn load_transformer(
    folder: &ModelFolder,
    req: &GenerateRequest,
    dtype: DType,
    device: &Device,
    events: &mut dyn FnMut(Event),
) -> Result<ZImageTransformer> {
    let mut model =
        folder.load_transformer(req.transformer_file.as_deref(), dtype, device, req.storage)?;
    for spec in &req.loras {
        let file = LoraFile::read_for_dim(&spec.path, model.config().dim)?;
        if !req.allow_nonfinite {
            file.check_finite()?;
        }
        let n = file.attach(spec.strength, &mut model)?;
        let msg = format!(
            "LoRA {} at strength {}: {n} modules",
            crate::error::shown(&spec.path),
            spec.strength
        );
        events(Event::Stage(&msg));
    }
    Ok(model)
}

/// FILE.png for one image; FILE_s{seed}.png when several seeds share one --out.
fn output_path(base: &Path, seed: Option<u64>, images: usize) -> PathBuf {
    match seed {
        Some(s) if images > 1 => {
            let stem = base.file_stem().and_then(|s| s.to_str()).unwrap_or("image");
            let ext = base.extension().and_then(|s| s.to_str()).unwrap_or("png");
            base.with_file_name(format!("{stem}_s{s}.{ext}"))
        }
        _ => base.to_path_buf(),
    }
}

/// The generation parameters stored in the PNG (JSON in an iTXt chunk named "parameters").
fn parameters(
    req: &GenerateRequest,
    settings: &DenoiseSettings,
    seed: Option<u64>,
    dtype: DType,
) -> String {
    let loras: Vec<_> = req
        .loras
        .iter()
        .map(|l| json!({"file": l.path.display().to_string(), "strength": l.strength}))
        .collect();
    json!({
        "software": "zlora",
        "model": req.model,
        "transformer_file": req.transformer_file.as_ref().map(|p| p.display().to_string()),
        "quantize": req.storage.quantize.map(|q| q.to_string()),
        "quantize_text_encoder": req.storage.quantize_text_encoder.map(|q| q.to_string()),
        "prompt": req.prompt,
        "negative_prompt": if settings.guidance.scale > 0.0 { Some(&req.negative_prompt) } else { None },
        "width": req.width, "height": req.height,
        "seed": seed,
        "latents_file": req.latents.as_ref().map(|p| p.display().to_string()),
        "steps": settings.steps,
        "guidance": settings.guidance.scale,
        "cfg_truncation": settings.guidance.truncation,
        "cfg_normalization": settings.guidance.normalization,
        "shift": settings.shift,
        "loras": loras,
        "dtype": format!("{dtype:?}").to_lowercase(),
    })
    .to_string()
}
