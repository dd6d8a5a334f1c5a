//! Flow matching in Z-Image's convention (training-practice §1): x_σ = (1−σ)·x0 + σ·ε, the
//! model is fed t = 1 − σ and its raw output is regressed onto x0 − ε.

use candle_core::{DType, Result, Tensor, D};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};

use crate::sample::schedule::shift_sigma;

/// How training sigmas are drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSampling {
    /// σ = shift(sigmoid(mean + std·N(0,1))): most samples mid-schedule, pushed towards noise
    /// by the shift (SimpleTuner's and musubi's recipe).
    LogitNormal,
    /// σ ~ U(0, 1), no shift.
    Uniform,
    /// σ = shift(U(0, 1)).
    Shift,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LossWeighting {
    None,
    /// exp(−2(σ − ½)²), normalised to mean 1 over σ ∈ [0, 1] (DiffSynth's bell).
    Bell,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SigmaSampler {
    pub sampling: TimestepSampling,
    pub shift: f64,
    pub logit_mean: f64,
    pub logit_std: f64,
}

impl SigmaSampler {
    pub fn sample(&self, rng: &mut ChaCha8Rng) -> f32 {
        let shift = self.shift as f32;
        match self.sampling {
            TimestepSampling::LogitNormal => {
                let z: f64 = StandardNormal.sample(rng);
                let s = 1.0 / (1.0 + (-(self.logit_mean + self.logit_std * z)).exp());
                shift_sigma(s as f32, shift)
            }
            TimestepSampling::Uniform => rng.random::<f32>(),
            TimestepSampling::Shift => shift_sigma(rng.random::<f32>(), shift),
        }
    }
}

impl LossWeighting {
    pub fn weight(self, sigma: f32) -> f32 {
        match self {
            LossWeighting::None => 1.0,
            // ∫₀¹ exp(−2(s − ½)²) ds ≈ 0.855 62.
            LossWeighting::Bell => (-2.0 * (sigma - 0.5).powi(2)).exp() / 0.855_62,
        }
    }
}

/// One noised batch.
#[derive(Debug, Clone)]
pub struct Noised {
    /// x_σ, (B, C, h, w) f32.
    pub x: Tensor,
    /// The model time t = 1 − σ per item, (B,) f32.
    pub t: Tensor,
    /// x0 − ε.
    pub target: Tensor,
    pub sigmas: Vec<f32>,
}

/// Noises clean latents x0 with ε at the given sigmas (one per item).
pub fn noise(x0: &Tensor, eps: &Tensor, sigmas: &[f32]) -> Result<Noised> {
    let b = x0.dim(0)?;
    let device = x0.device();
    let s = Tensor::from_vec(sigmas.to_vec(), (b, 1, 1, 1), device)?;
    let one_minus = (1.0 - &s)?;
    let x = (x0.broadcast_mul(&one_minus)? + eps.broadcast_mul(&s)?)?;
    let t: Vec<f32> = sigmas.iter().map(|s| 1.0 - s).collect();
    Ok(Noised {
        x,
        t: Tensor::new(t, device)?,
        target: (x0 - eps)?,
        sigmas: sigmas.to_vec(),
    })
}

/// Mean squared error per item (f32), weighted per item, averaged over the batch. With
/// `pixel_weights` (B, 1, h, w), each latent pixel's squared error (every channel) is
/// multiplied by its weight before the mean over all pixels, as OneTrainer and ai-toolkit do:
/// a pixel of weight 0 contributes nothing, and the loss is not renormalised by the masked
/// area (so a small mask trains with a proportionally smaller step).
pub fn loss(
    out: &Tensor,
    target: &Tensor,
    weights: &[f32],
    pixel_weights: Option<&Tensor>,
) -> Result<Tensor> {
    let b = out.dim(0)?;
    let err = (out.to_dtype(DType::F32)? - target)?.sqr()?;
    let err = match pixel_weights {
        Some(w) => err.broadcast_mul(w)?,
        None => err,
    };
    let per_item = err.flatten_from(1)?.mean(D::Minus1)?;
    let w = Tensor::from_vec(weights.to_vec(), b, out.device())?;
    (per_item * w)?.mean_all()
}

/// A batch's per-pixel loss weights from its masks (B, 1, h, w) and each item's weight where
/// the mask is black: max(mask, floor), OneTrainer's clamp of the mask to
/// [`unmasked_weight`, 1].
pub fn mask_weights(masks: &Tensor, floors: &[f32]) -> Result<Tensor> {
    let b = masks.dim(0)?;
    let floor = Tensor::from_vec(floors.to_vec(), (b, 1, 1, 1), masks.device())?;
    masks.broadcast_maximum(&floor)
}

/// Standard normal noise shaped like `like`, from the trainer's stream.
pub fn gaussian_like(like: &Tensor, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    let data: Vec<f32> = (0..like.elem_count())
        .map(|_| StandardNormal.sample(rng))
        .collect();
    Tensor::from_vec(data, like.shape(), like.device())
}

/// Advances the stream past `n` of [`gaussian_like`]'s values (draws of a variable number
/// of words each, so they are drawn, not skipped by seeking): a data-parallel worker's noise
/// then starts where its share of the global batch starts.
pub fn skip_gaussians(rng: &mut ChaCha8Rng, n: usize) {
    for _ in 0..n {
        let _: f32 = StandardNormal.sample(rng);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::SeedableRng;

    #[test]
    fn noising_interpolates_and_targets_x0_minus_eps() -> Result<()> {
        let dev = Device::Cpu;
        let x0 = Tensor::new(&[[[[2.0f32]]], [[[4.0]]]], &dev)?;
        let eps = Tensor::new(&[[[[1.0f32]]], [[[0.0]]]], &dev)?;
        let n = noise(&x0, &eps, &[0.25, 1.0])?;
        assert_eq!(n.x.flatten_all()?.to_vec1::<f32>()?, vec![1.75, 0.0]);
        assert_eq!(n.target.flatten_all()?.to_vec1::<f32>()?, vec![1.0, 4.0]);
        assert_eq!(n.t.to_vec1::<f32>()?, vec![0.75, 0.0]);
        Ok(())
    }

    #[test]
    fn sigmas_stay_in_range_and_shift_pushes_towards_noise() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let draw = |sampling, shift, rng: &mut ChaCha8Rng| {
            let s = SigmaSampler {
                sampling,
                shift,
                logit_mean: 0.0,
                logit_std: 1.0,
            };
            (0..4000).map(|_| s.sample(rng)).collect::<Vec<f32>>()
        };
        let mean = |v: &[f32]| v.iter().sum::<f32>() / v.len() as f32;
        let plain = draw(TimestepSampling::LogitNormal, 1.0, &mut rng);
        let shifted = draw(TimestepSampling::LogitNormal, 3.0, &mut rng);
        let uniform = draw(TimestepSampling::Uniform, 3.0, &mut rng);
        assert!(shifted
            .iter()
            .chain(&plain)
            .chain(&uniform)
            .all(|s| (0.0..=1.0).contains(s)));
        assert!((mean(&plain) - 0.5).abs() < 0.02);
        assert!(mean(&shifted) > 0.65, "{}", mean(&shifted));
        assert!((mean(&uniform) - 0.5).abs() < 0.02);
    }

    #[test]
    fn pixel_weights_scale_each_pixels_error_and_floors_lift_black() -> Result<()> {
        let dev = Device::Cpu;
        // One item, one channel, 1×2 latent: errors 1 and 3 (squared 1 and 9).
        let out = Tensor::new(&[[[[1.0f32, 3.0]]]], &dev)?;
        let target = Tensor::zeros((1, 1, 1, 2), DType::F32, &dev)?;
        let masks = Tensor::new(&[[[[1.0f32, 0.0]]]], &dev)?;
        let plain = loss(&out, &target, &[1.0], None)?.to_scalar::<f32>()?;
        assert_eq!(plain, 5.0);
        let w = mask_weights(&masks, &[0.0])?;
        assert_eq!(
            loss(&out, &target, &[1.0], Some(&w))?.to_scalar::<f32>()?,
            0.5
        );
        let w = mask_weights(&masks, &[0.25])?;
        assert_eq!(w.flatten_all()?.to_vec1::<f32>()?, vec![1.0, 0.25]);
        assert_eq!(
            loss(&out, &target, &[2.0], Some(&w))?.to_scalar::<f32>()?,
            2.0 * (1.0 + 0.25 * 9.0) / 2.0
        );
        let grey = Tensor::new(&[[[[0.1f32, 0.5]]], [[[0.1, 0.5]]]], &dev)?;
        let w = mask_weights(&grey, &[0.25, 0.0])?;
        assert_eq!(
            w.flatten_all()?.to_vec1::<f32>()?,
            vec![0.25, 0.5, 0.1, 0.5]
        );
        Ok(())
    }

    #[test]
    fn skipped_gaussians_are_the_ones_gaussian_like_would_have_drawn() -> Result<()> {
        let whole = gaussian_like(
            &Tensor::zeros((3, 2), DType::F32, &Device::Cpu)?,
            &mut rng(),
        )?;
        let mut skipped = rng();
        skip_gaussians(&mut skipped, 4);
        let tail = gaussian_like(&Tensor::zeros(2, DType::F32, &Device::Cpu)?, &mut skipped)?;
        assert_eq!(
            whole.flatten_all()?.narrow(0, 4, 2)?.to_vec1::<f32>()?,
            tail.to_vec1::<f32>()?
        );
        Ok(())
    }

    fn rng() -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(3)
    }

    #[test]
    fn bell_weights_average_to_one() {
        let n = 10000;
        let avg: f32 = (0..n)
            .map(|i| LossWeighting::Bell.weight((i as f32 + 0.5) / n as f32))
            .sum::<f32>()
            / n as f32;
        assert!((avg - 1.0).abs() < 1e-3, "{avg}");
    }
}
