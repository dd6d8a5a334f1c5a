//! Image measurements behind the verdicts (formulas, thresholds and limits in
//! docs/validation.md): sharpness as the variance of the Laplacian of the luma, structural
//! similarity (SSIM, Wang et al. 2004), and the checks built on them.

use serde::{Deserialize, Serialize};

use crate::sample::image::Rgb8;
use crate::{Error, Result};

/// A variant is blurred when its sharpness falls below this share of its reference's.
pub const BLUR_RATIO: f64 = 0.7;
/// A LoRA whose effect (1 − SSIM against no LoRA) stays below this changes nothing visible.
pub const NOT_LEARNING_EFFECT: f64 = 0.02;
/// Overfitting needs at least this effect ...
pub const OVERFIT_EFFECT: f64 = 0.2;
/// ... and the LoRA's images keeping less than this share of the reference's diversity.
pub const COLLAPSE_RATIO: f64 = 0.5;

/// BT.601 luma in 0..255, row-major.
fn luma(img: &Rgb8) -> Vec<f64> {
    img.pixels
        .chunks_exact(3)
        .map(|p| 0.299 * p[0] as f64 + 0.587 * p[1] as f64 + 0.114 * p[2] as f64)
        .collect()
}

/// Variance of the 4-neighbour Laplacian of the luma over the interior pixels (OpenCV's
/// `Laplacian(gray).var()` on 0..255 values); 0 for images under 3×3.
pub fn sharpness(img: &Rgb8) -> f64 {
    let (w, h) = (img.width, img.height);
    if w < 3 || h < 3 {
        return 0.0;
    }
    let y = luma(img);
    let lap: Vec<f64> = (1..h - 1)
        .flat_map(|r| (1..w - 1).map(move |c| (r, c)))
        .map(|(r, c)| {
            let i = r * w + c;
            y[i - 1] + y[i + 1] + y[i - w] + y[i + w] - 4.0 * y[i]
        })
        .collect();
    variance(&lap)
}

fn variance(v: &[f64]) -> f64 {
    let n = v.len() as f64;
    let mean = v.iter().sum::<f64>() / n;
    v.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / n
}

/// Gaussian window of SSIM: σ = 1.5, radius 5 (11 taps), smaller for images under 11 pixels.
fn window(radius: usize) -> Vec<f64> {
    let taps: Vec<f64> = (0..=2 * radius)
        .map(|i| {
            let d = i as f64 - radius as f64;
            (-d * d / (2.0 * 1.5 * 1.5)).exp()
        })
        .collect();
    let sum: f64 = taps.iter().sum();
    taps.into_iter().map(|t| t / sum).collect()
}

/// A luma plane with its size.
struct Plane {
    w: usize,
    h: usize,
    v: Vec<f64>,
}

impl Plane {
    /// Separable filtering over the "valid" region (the window inside the image).
    fn filter(&self, taps: &[f64]) -> Plane {
        let k = taps.len();
        let (w, h) = (self.w + 1 - k, self.h + 1 - k);
        let rows: Vec<f64> = (0..self.h)
            .flat_map(|r| (0..w).map(move |c| (r, c)))
            .map(|(r, c)| (0..k).map(|t| taps[t] * self.v[r * self.w + c + t]).sum())
            .collect();
        let v = (0..h)
            .flat_map(|r| (0..w).map(move |c| (r, c)))
            .map(|(r, c)| (0..k).map(|t| taps[t] * rows[(r + t) * w + c]).sum())
            .collect();
        Plane { w, h, v }
    }

    fn map(&self, other: &Plane, f: impl Fn(f64, f64) -> f64) -> Plane {
        let v = self
            .v
            .iter()
            .zip(&other.v)
            .map(|(&a, &b)| f(a, b))
            .collect();
        Plane {
            w: self.w,
            h: self.h,
            v,
        }
    }
}

/// Mean SSIM of the lumas of two images of the same size (1 = identical).
pub fn ssim(a: &Rgb8, b: &Rgb8) -> Result<f64> {
    if (a.width, a.height) != (b.width, b.height) {
        return Err(Error::Invalid(format!(
            "SSIM needs images of one size, got {}×{} and {}×{}",
            a.width, a.height, b.width, b.height
        )));
    }
    let radius = 5.min((a.width.min(a.height).max(1) - 1) / 2);
    let taps = window(radius);
    let plane = |img: &Rgb8| Plane {
        w: img.width,
        h: img.height,
        v: luma(img),
    };
    let (x, y) = (plane(a), plane(b));
    let (mx, my) = (x.filter(&taps), y.filter(&taps));
    let xx = x.map(&x, |p, q| p * q).filter(&taps);
    let yy = y.map(&y, |p, q| p * q).filter(&taps);
    let xy = x.map(&y, |p, q| p * q).filter(&taps);
    let (c1, c2) = ((0.01f64 * 255.0).powi(2), (0.03f64 * 255.0).powi(2));
    let n = mx.v.len();
    let total: f64 = (0..n)
        .map(|i| {
            let (ux, uy) = (mx.v[i], my.v[i]);
            let (sx, sy, sxy) = (xx.v[i] - ux * ux, yy.v[i] - uy * uy, xy.v[i] - ux * uy);
            ((2.0 * ux * uy + c1) * (2.0 * sxy + c2)) / ((ux * ux + uy * uy + c1) * (sx + sy + c2))
        })
        .sum();
    Ok(total / n as f64)
}

/// 1 − mean SSIM of image pairs at the same (prompt, seed): 0 when the LoRA changes nothing.
pub fn effect(with: &[Rgb8], without: &[Rgb8]) -> Result<f64> {
    paired(with, without)?;
    let sum = with
        .iter()
        .zip(without)
        .map(|(a, b)| ssim(a, b))
        .sum::<Result<f64>>()?;
    Ok(1.0 - sum / with.len() as f64)
}

/// Mean SSIM over all pairs of distinct images of one variant (seeds and prompts mixed): near
/// 1 when every prompt and seed gives the same picture. None for fewer than two images.
pub fn similarity(images: &[Rgb8]) -> Result<Option<f64>> {
    let mut sum = 0.0;
    let mut pairs = 0usize;
    for (i, a) in images.iter().enumerate() {
        for b in &images[i + 1..] {
            sum += ssim(a, b)?;
            pairs += 1;
        }
    }
    Ok((pairs > 0).then(|| sum / pairs as f64))
}

/// Median over (prompt, seed) of sharpness(a) / sharpness(b): how sharp `a` is against its
/// reference `b`, robust to one odd image.
pub fn sharpness_ratio(a: &[f64], b: &[f64]) -> Result<f64> {
    if a.len() != b.len() || a.is_empty() {
        return Err(Error::Invalid(format!(
            "sharpness ratio of {} against {} images",
            a.len(),
            b.len()
        )));
    }
    // The epsilon keeps two flat images at ratio 1 instead of 0/0.
    let mut ratios: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x + 1e-9) / (y + 1e-9))
        .collect();
    ratios.sort_by(f64::total_cmp);
    let m = ratios.len() / 2;
    Ok(if ratios.len() % 2 == 1 {
        ratios[m]
    } else {
        (ratios[m - 1] + ratios[m]) / 2.0
    })
}

fn paired(a: &[Rgb8], b: &[Rgb8]) -> Result<()> {
    if a.len() != b.len() || a.is_empty() {
        return Err(Error::Invalid(format!(
            "comparing {} images with {}: the variants must have the same prompts and seeds",
            a.len(),
            b.len()
        )));
    }
    Ok(())
}

/// What a LoRA does to a model's pictures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EffectVerdict {
    NotLearning,
    Learning,
    Overfit,
}

impl EffectVerdict {
    pub fn label(self) -> &'static str {
        match self {
            EffectVerdict::NotLearning => "not learning",
            EffectVerdict::Learning => "learning",
            EffectVerdict::Overfit => "overfit",
        }
    }
}

/// The LoRA's effect on one model and the diversity of its images against the reference's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EffectCheck {
    /// 1 − mean SSIM(with LoRA, without) at the same prompt and seed.
    pub effect: f64,
    /// Mean pairwise SSIM of the LoRA's images and of the reference's.
    pub similarity_lora: Option<f64>,
    pub similarity_reference: Option<f64>,
    /// (1 − similarity_lora) / (1 − similarity_reference): the diversity kept.
    pub diversity_ratio: Option<f64>,
    pub verdict: EffectVerdict,
}

impl EffectCheck {
    /// `with` and `without` in the same (prompt, seed) order.
    pub fn measure(with: &[Rgb8], without: &[Rgb8]) -> Result<Self> {
        let effect = effect(with, without)?;
        let similarity_lora = similarity(with)?;
        let similarity_reference = similarity(without)?;
        let diversity_ratio = match (similarity_lora, similarity_reference) {
            (Some(l), Some(r)) if 1.0 - r > 1e-9 => Some((1.0 - l) / (1.0 - r)),
            _ => None,
        };
        let collapsed = diversity_ratio.is_some_and(|d| d < COLLAPSE_RATIO);
        let verdict = if effect < NOT_LEARNING_EFFECT {
            EffectVerdict::NotLearning
        } else if effect >= OVERFIT_EFFECT && collapsed {
            EffectVerdict::Overfit
        } else {
            EffectVerdict::Learning
        };
        Ok(Self {
            effect,
            similarity_lora,
            similarity_reference,
            diversity_ratio,
            verdict,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A smooth random texture (blobs of a few pixels) like a picture's detail.
    pub(crate) fn texture(seed: u64, size: usize) -> Rgb8 {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let coarse: Vec<[u8; 3]> = (0..(size / 2) * (size / 2))
            .map(|_| [rng.random(), rng.random(), rng.random()])
            .collect();
        let pixels = (0..size * size)
            .flat_map(|i| coarse[(i / size / 2) * (size / 2) + (i % size) / 2])
            .collect();
        Rgb8 {
            width: size,
            height: size,
            pixels,
        }
    }

    /// A 3×3 binomial blur applied `times` times (σ ≈ 0.7 px per pass).
    pub(crate) fn blur(img: &Rgb8, times: usize) -> Rgb8 {
        let mut out = img.clone();
        let (w, h) = (img.width, img.height);
        for _ in 0..times {
            let src = out.clone();
            for y in 0..h {
                for x in 0..w {
                    for c in 0..3 {
                        let mut acc = 0u32;
                        for (dy, wy) in [(-1i64, 1u32), (0, 2), (1, 1)] {
                            for (dx, wx) in [(-1i64, 1u32), (0, 2), (1, 1)] {
                                let yy = (y as i64 + dy).clamp(0, h as i64 - 1) as usize;
                                let xx = (x as i64 + dx).clamp(0, w as i64 - 1) as usize;
                                acc += wy * wx * src.pixels[(yy * w + xx) * 3 + c] as u32;
                            }
                        }
                        out.pixels[(y * w + x) * 3 + c] = ((acc + 8) / 16) as u8;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn sharpness_of_a_flat_image_is_zero_and_of_an_impulse_is_known() {
        let mut img = Rgb8 {
            width: 5,
            height: 5,
            pixels: vec![100; 75],
        };
        assert_eq!(sharpness(&img), 0.0);
        // One bright pixel in the centre: Laplacian −4·d there and d at its 4 neighbours, 0
        // at the other 4 interior pixels, so the variance is (16 + 4)·d²/9 − 0.
        img.pixels[12 * 3..12 * 3 + 3].copy_from_slice(&[110, 110, 110]);
        let d: f64 = 10.0;
        let expected = (16.0 + 4.0) * d * d / 9.0;
        assert!((sharpness(&img) - expected).abs() < 1e-6 * expected);
    }

    #[test]
    fn ssim_is_one_for_identical_images_and_drops_with_noise() -> Result<()> {
        let a = texture(1, 48);
        assert!((ssim(&a, &a)? - 1.0).abs() < 1e-12);
        let b = texture(2, 48);
        assert!(ssim(&a, &b)? < 0.2, "unrelated textures are dissimilar");
        assert!(ssim(&a, &blur(&a, 1))? > ssim(&a, &b)?);
        assert!(ssim(&a, &texture(1, 32)).is_err());
        Ok(())
    }

    #[test]
    fn blur_lowers_the_sharpness_ratio_below_the_threshold() -> Result<()> {
        let sharp: Vec<f64> = (0..4).map(|s| sharpness(&texture(s, 64))).collect();
        let blurred: Vec<f64> = (0..4)
            .map(|s| sharpness(&blur(&texture(s, 64), 1)))
            .collect();
        let r = sharpness_ratio(&blurred, &sharp)?;
        assert!(r < BLUR_RATIO, "one blur pass: ratio {r}");
        assert!((sharpness_ratio(&sharp, &sharp)? - 1.0).abs() < 1e-12);
        Ok(())
    }

    #[test]
    fn identical_pictures_mean_not_learning() -> Result<()> {
        let reference: Vec<Rgb8> = (0..4).map(|s| texture(s, 32)).collect();
        let check = EffectCheck::measure(&reference, &reference)?;
        assert_eq!(check.effect, 0.0);
        assert_eq!(check.verdict, EffectVerdict::NotLearning);
        Ok(())
    }

    #[test]
    fn one_picture_for_every_prompt_and_seed_is_overfit() -> Result<()> {
        let reference: Vec<Rgb8> = (0..6).map(|s| texture(s, 32)).collect();
        let collapsed = vec![texture(99, 32); 6];
        let check = EffectCheck::measure(&collapsed, &reference)?;
        assert_eq!(check.verdict, EffectVerdict::Overfit, "{check:?}");
        assert!(check.diversity_ratio.is_some_and(|d| d < 1e-9));
        // Different pictures with the same strong effect keep their diversity: learning.
        let changed: Vec<Rgb8> = (10..16).map(|s| texture(s, 32)).collect();
        let check = EffectCheck::measure(&changed, &reference)?;
        assert_eq!(check.verdict, EffectVerdict::Learning, "{check:?}");
        Ok(())
    }
}
