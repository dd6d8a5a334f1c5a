//! Aspect-ratio buckets: a fixed set of training sizes of about `resolution²` pixels, each side
//! a multiple of `step`, so images of any shape train without padding or heavy cropping, and
//! one batch holds images of one size.
//!
//! `step` is what the latent grid needs: the VAE divides each side by its spatial factor and the
//! transformer patchifies by 2, so a pixel side must be a multiple of 2·factor (16 for Z-Image).

use image::imageops::{self, FilterType};
use image::{DynamicImage, Rgb32FImage};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The transformer's patch size: latent sides must be even.
const PATCH: u32 = 2;

/// The filter used to bring a crop to its bucket size. Lanczos3 keeps the most detail when
/// downscaling large photos, which is most of what a training set needs.
pub const RESIZE_FILTER: FilterType = FilterType::Lanczos3;

/// One training size in pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Bucket {
    pub width: u32,
    pub height: u32,
}

impl std::fmt::Display for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}×{}", self.width, self.height)
    }
}

/// The buckets around one target resolution.
#[derive(Debug, Clone)]
pub struct Buckets {
    resolution: u32,
    step: u32,
    all: Vec<Bucket>,
}

impl Buckets {
    /// Short sides run over every multiple of `step` from resolution/2 to resolution; each
    /// long side is the largest multiple of `step` that keeps the area at or under
    /// resolution², in both orientations (aspect ratios 1:4 to 4:1). So no bucket costs more
    /// memory than the square one, and the area lost to rounding is under step / resolution
    /// (1.6 % at 1024 px, step 16).
    pub fn new(resolution: u32, step: u32) -> Result<Self> {
        if step == 0 || !resolution.is_multiple_of(step) || resolution < 2 * step {
            return Err(Error::Invalid(format!(
                "dataset resolution {resolution} must be a multiple of {step} and at least {}",
                2 * step
            )));
        }
        let area = u64::from(resolution) * u64::from(resolution);
        let first = (resolution / 2).div_ceil(step) * step;
        let mut all: Vec<Bucket> = (first..=resolution)
            .step_by(step as usize)
            .flat_map(|short| {
                let long = (area / u64::from(short)) as u32 / step * step;
                [
                    Bucket {
                        width: long,
                        height: short,
                    },
                    Bucket {
                        width: short,
                        height: long,
                    },
                ]
            })
            .collect();
        all.sort();
        all.dedup();
        Ok(Self {
            resolution,
            step,
            all,
        })
    }

    /// The buckets for a model whose VAE shrinks each side by `vae_factor`.
    pub fn for_vae(resolution: u32, vae_factor: usize) -> Result<Self> {
        let factor = u32::try_from(vae_factor)
            .map_err(|_| Error::Invalid(format!("VAE spatial factor {vae_factor} is too large")))?;
        Self::new(resolution, PATCH * factor)
    }

    pub fn resolution(&self) -> u32 {
        self.resolution
    }

    pub fn step(&self) -> u32 {
        self.step
    }

    /// Every bucket, narrowest first.
    pub fn all(&self) -> &[Bucket] {
        &self.all
    }

    /// The bucket whose aspect ratio is closest to `width`×`height`, measured as the distance
    /// of log ratios so that 2:1 and 1:2 are equally far from 1:1. Ties (within rounding) go
    /// to the bucket nearer to square, so a shape and its transpose get transposed buckets.
    pub fn assign(&self, width: u32, height: u32) -> Bucket {
        let target = log_aspect(width, height);
        let key = |b: &Bucket| {
            let aspect = log_aspect(b.width, b.height);
            ((aspect - target).abs(), aspect.abs())
        };
        let square = Bucket {
            width: self.resolution,
            height: self.resolution,
        };
        self.all
            .iter()
            .copied()
            .min_by(|a, b| {
                let ((da, sa), (db, sb)) = (key(a), key(b));
                if (da - db).abs() < 1e-9 {
                    sa.total_cmp(&sb)
                } else {
                    da.total_cmp(&db)
                }
            })
            .unwrap_or(square)
    }
}

fn log_aspect(width: u32, height: u32) -> f64 {
    (f64::from(width.max(1)) / f64::from(height.max(1))).ln()
}

/// Center-crops `image` to the bucket's aspect ratio and resizes the crop to the bucket size,
/// in f32 RGB in [0, 1]. Transparent pixels are composited over white, so the colour a PNG
/// happens to store under alpha 0 never reaches the model.
pub fn crop_resize(image: &DynamicImage, bucket: Bucket) -> Rgb32FImage {
    // Cropping before the f32 conversion keeps a large photo's copy small.
    let crop = center_crop(image, bucket);
    imageops::resize(
        &over_white(&crop),
        bucket.width,
        bucket.height,
        RESIZE_FILTER,
    )
}

/// The part of `image` a bucket keeps: the side that is too long for the bucket's aspect
/// ratio is cut equally on both ends, the other kept whole.
fn center_crop(image: &DynamicImage, bucket: Bucket) -> DynamicImage {
    let (w, h) = (image.width(), image.height());
    let bucket_wide =
        u64::from(bucket.width) * u64::from(h) >= u64::from(bucket.height) * u64::from(w);
    let (cw, ch) = if bucket_wide {
        let ch = (u64::from(w) * u64::from(bucket.height) / u64::from(bucket.width)) as u32;
        (w, ch.clamp(1, h))
    } else {
        let cw = (u64::from(h) * u64::from(bucket.width) / u64::from(bucket.height)) as u32;
        (cw.clamp(1, w), h)
    };
    image.crop_imm((w - cw) / 2, (h - ch) / 2, cw, ch)
}

/// A loss mask on the latent grid of `bucket`: (height/factor)·(width/factor) weights in
/// [0, 1], row-major. The mask is read as luminance (any PNG mode; alpha is ignored), cropped
/// like its image, resized to the bucket with a triangle filter (which, unlike Lanczos, never
/// overshoots [0, 1]) and then averaged over each factor×factor cell: a latent pixel weighs
/// as much as the share of its image pixels the mask covers.
pub fn mask_grid(mask: &DynamicImage, bucket: Bucket, factor: u32) -> Vec<f32> {
    let luma = center_crop(mask, bucket).to_luma32f();
    let full = imageops::resize(&luma, bucket.width, bucket.height, FilterType::Triangle);
    let (gw, gh) = (bucket.width / factor, bucket.height / factor);
    let cell = (factor * factor) as f32;
    (0..gh)
        .flat_map(|gy| (0..gw).map(move |gx| (gx, gy)))
        .map(|(gx, gy)| {
            let sum: f32 = (0..factor * factor)
                .map(|k| {
                    full.get_pixel(gx * factor + k % factor, gy * factor + k / factor)
                        .0[0]
                })
                .sum();
            (sum / cell).clamp(0.0, 1.0)
        })
        .collect()
}

fn over_white(image: &DynamicImage) -> Rgb32FImage {
    if !image.color().has_alpha() {
        return image.to_rgb32f();
    }
    let rgba = image.to_rgba32f();
    Rgb32FImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        image::Rgb([r * a + 1.0 - a, g * a + 1.0 - a, b * a + 1.0 - a])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets() -> Buckets {
        Buckets::new(1024, 16).expect("valid")
    }

    #[test]
    fn sides_are_multiples_of_the_step_and_area_stays_at_target() {
        let b = buckets();
        assert_eq!(b.all().len(), 65);
        let target = 1024u64 * 1024;
        for bucket in b.all() {
            assert_eq!(bucket.width % 16, 0, "{bucket}");
            assert_eq!(bucket.height % 16, 0, "{bucket}");
            let area = u64::from(bucket.width) * u64::from(bucket.height);
            assert!(area <= target, "{bucket} is over the target area");
            assert!(
                area as f64 >= target as f64 * (1.0 - 16.0 / 1024.0),
                "{bucket}"
            );
            let (long, short) = (
                bucket.width.max(bucket.height),
                bucket.width.min(bucket.height),
            );
            assert!(short >= 512 && long <= 2048, "{bucket}");
        }
    }

    #[test]
    fn square_and_wide_images_get_matching_buckets() {
        let b = buckets();
        let square = b.assign(3000, 3000);
        assert_eq!((square.width, square.height), (1024, 1024));
        let wide = b.assign(2000, 1000);
        let ratio = f64::from(wide.width) / f64::from(wide.height);
        assert!((ratio - 2.0).abs() < 0.05, "{wide}");
        assert_eq!(
            b.assign(3000, 2000),
            Bucket {
                width: 1248,
                height: 832
            }
        );
        let tall = b.assign(1000, 2000);
        assert_eq!((tall.width, tall.height), (wide.height, wide.width));
    }

    #[test]
    fn extreme_shapes_get_the_extreme_bucket() {
        let b = buckets();
        assert_eq!(
            b.assign(10_000, 100),
            Bucket {
                width: 2048,
                height: 512
            }
        );
        assert_eq!(
            b.assign(100, 10_000),
            Bucket {
                width: 512,
                height: 2048
            }
        );
    }

    #[test]
    fn resolution_must_fit_the_step() {
        assert!(Buckets::new(1000, 16).is_err());
        assert!(Buckets::new(16, 16).is_err());
        assert!(Buckets::new(64, 8).is_ok());
        assert_eq!(Buckets::for_vae(1024, 8).map(|b| b.step()).ok(), Some(16));
    }

    #[test]
    fn crop_keeps_the_center() {
        // 300×100 image: black left and right thirds, white centre square.
        let img = image::RgbImage::from_fn(300, 100, |x, _| {
            let v = if (100..200).contains(&x) { 255 } else { 0 };
            image::Rgb([v, v, v])
        });
        let out = crop_resize(
            &DynamicImage::ImageRgb8(img),
            Bucket {
                width: 8,
                height: 8,
            },
        );
        assert_eq!(out.dimensions(), (8, 8));
        assert!(out
            .pixels()
            .all(|p| p.0.iter().all(|&c| (c - 1.0).abs() < 1e-3)));
    }

    #[test]
    fn transparency_becomes_white() {
        let img = image::RgbaImage::from_pixel(16, 16, image::Rgba([0, 0, 0, 0]));
        let out = crop_resize(
            &DynamicImage::ImageRgba8(img),
            Bucket {
                width: 8,
                height: 8,
            },
        );
        assert!(out
            .pixels()
            .all(|p| p.0.iter().all(|&c| (c - 1.0).abs() < 1e-3)));
    }
}
