//! The denoising loop: FlowMatch Euler over the shifted sigma grid with optional CFG
//! (reference §5). Latents stay f32; the model output is negated (it predicts x0 − ε while the
//! scheduler integrates dx/dσ = ε − x0).

use candle_core::{DType, Device, Result, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use super::guidance::Guidance;
use super::schedule::{model_time, sigmas};
use crate::model::folder::ModelFolder;
use crate::model::ZImageTransformer;
use crate::nn::Quantization;

/// Caption features of one prompt and, when CFG may run, of its negative prompt.
#[derive(Debug, Clone)]
pub struct Conditioning {
    pub positive: Tensor,
    pub negative: Option<Tensor>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DenoiseSettings {
    pub steps: usize,
    pub shift: f64,
    pub guidance: Guidance,
}

/// Encodes `prompts` with the folder's text encoder (its decoder layers stored as `quantize`
/// says), which is dropped on return (before any transformer is loaded), and pairs each with the `negative` prompt's features when CFG may
/// run (the negative is encoded once and shared). A prompt longer than the encoder reads is
/// reported to `warn`.
pub fn encode_conditions(
    folder: &ModelFolder,
    prompts: &[String],
    negative: Option<&str>,
    (dtype, device, quantize): (DType, &Device, Option<Quantization>),
    warn: &mut dyn FnMut(&str),
) -> crate::Result<Vec<Conditioning>> {
    let encoder = folder.load_prompt_encoder(dtype, device, quantize)?;
    for prompt in prompts.iter().map(String::as_str).chain(negative) {
        if let Some(warning) = encoder.tokenizer().cut_warning(prompt)? {
            warn(&warning);
        }
    }
    let refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let positives = encoder.encode(&refs)?;
    let negative = match negative {
        Some(n) => encoder.encode(&[n])?.into_iter().next(),
        None => None,
    };
    Ok(positives
        .into_iter()
        .map(|positive| Conditioning {
            positive,
            negative: negative.clone(),
        })
        .collect())
}

/// Standard normal noise of `shape` from a seeded ChaCha8 stream (f32, row-major). The same
/// seed gives the same noise on every machine; it cannot match torch's generator (pass
/// `--latents` for that).
pub fn seeded_noise(seed: u64, shape: &[usize], device: &Device) -> Result<Tensor> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    Tensor::from_vec(data, shape, device)
}

/// Runs the sampler from `latents` (1, C, h, w) and returns the final latents (f32).
/// `progress(done, total)` is called after every step.
pub fn denoise(
    model: &ZImageTransformer,
    cond: &Conditioning,
    latents: Tensor,
    settings: &DenoiseSettings,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Tensor> {
    let grid = sigmas(settings.steps, settings.shift as f32);
    let mut x = latents.to_dtype(DType::F32)?;
    for i in 0..settings.steps {
        let t = model_time(grid[i]);
        let pred = predict(model, cond, &x, t, &settings.guidance)?;
        let dt = (grid[i + 1] - grid[i]) as f64;
        x = (x - (pred * dt)?)?;
        progress(i + 1, settings.steps);
    }
    Ok(x)
}

/// The (guided) raw model prediction of x0 − ε at model time t.
fn predict(
    model: &ZImageTransformer,
    cond: &Conditioning,
    x: &Tensor,
    t: f32,
    guidance: &Guidance,
) -> Result<Tensor> {
    let scale = guidance.scale_at(t);
    let device = x.device();
    match &cond.negative {
        Some(neg) if scale > 0.0 => {
            let batch = Tensor::cat(&[x, x], 0)?;
            let ts = Tensor::new(&[t, t], device)?;
            let out = model.forward(&batch, &ts, &[cond.positive.clone(), neg.clone()])?;
            guidance.combine(&out.narrow(0, 0, 1)?, &out.narrow(0, 1, 1)?, scale)
        }
        _ => model.forward(
            x,
            &Tensor::new(&[t], device)?,
            std::slice::from_ref(&cond.positive),
        ),
    }
}
