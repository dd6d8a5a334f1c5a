//! The Qwen-VL image processor (transformers' `Qwen2VLImageProcessorPil`, which Qwen3-VL
//! uses): smart resize to multiples of patch × merge within [min_pixels, max_pixels], PIL's
//! bicubic resampling (8-bit, two passes, fixed-point weights: reproduced bit for bit, since
//! any other bicubic changes the pixels), rescale and normalize, and the patch layout of
//! `pixel_values`: one row per patch, in merge-block order, each row (channel, temporal,
//! patch row, patch column) with the single frame repeated over the temporal axis.

use image::{DynamicImage, RgbImage};

use super::config::ProcessorConfig;
use crate::{Error, Result};

/// The processor's output for one image.
#[derive(Debug, Clone, PartialEq)]
pub struct PixelPatches {
    /// Row-major (patches, patch_dim).
    pub values: Vec<f32>,
    pub patch_dim: usize,
    /// (temporal, height, width) in patches.
    pub grid: [usize; 3],
}

impl PixelPatches {
    pub fn patches(&self) -> usize {
        self.grid.iter().product()
    }
}

/// The processor's `convert_to_rgb`: transparency composited onto white (Pillow's 8-bit
/// `alpha_composite`), then the alpha dropped; images without alpha convert as they are.
pub fn rgb_on_white(img: &DynamicImage) -> RgbImage {
    if !img.color().has_alpha() {
        return img.to_rgb8();
    }
    let rgba = img.to_rgba8();
    RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        image::Rgb([r, g, b].map(|c| over_white(c, a)))
    })
}

/// One channel of Pillow's alpha_composite over an opaque white pixel (7-bit fixed point,
/// its rounded division by 255).
fn over_white(c: u8, a: u8) -> u8 {
    const BITS: u32 = 7;
    if a == 0 {
        return 255;
    }
    let (c, a) = (u32::from(c), u32::from(a));
    let coef1 = a << BITS;
    let coef2 = (255 << BITS) - coef1;
    let t = c * coef1 + 255 * coef2 + (0x80 << BITS);
    ((((t >> 8) + t) >> 8) >> BITS) as u8
}

/// transformers' `smart_resize`: the (height, width) an image is resized to. Python's
/// `round` rounds halves to even, so `round_ties_even` here.
pub fn smart_resize(height: usize, width: usize, cfg: &ProcessorConfig) -> Result<(usize, usize)> {
    let (h, w) = (height as f64, width as f64);
    if height == 0 || width == 0 || h.max(w) / h.min(w) > 200.0 {
        return Err(Error::Invalid(format!(
            "a {width}×{height} image: the aspect ratio must be below 200"
        )));
    }
    let factor = cfg.factor() as f64;
    let mut h_bar = (h / factor).round_ties_even() * factor;
    let mut w_bar = (w / factor).round_ties_even() * factor;
    if h_bar * w_bar > cfg.max_pixels as f64 {
        let beta = (h * w / cfg.max_pixels as f64).sqrt();
        h_bar = factor.max((h / beta / factor).floor() * factor);
        w_bar = factor.max((w / beta / factor).floor() * factor);
    } else if h_bar * w_bar < cfg.min_pixels as f64 {
        let beta = (cfg.min_pixels as f64 / (h * w)).sqrt();
        h_bar = (h * beta / factor).ceil() * factor;
        w_bar = (w * beta / factor).ceil() * factor;
    }
    Ok((h_bar as usize, w_bar as usize))
}

/// Resize, rescale, normalize and patchify one RGB image.
pub fn pixel_patches(img: &RgbImage, cfg: &ProcessorConfig) -> Result<PixelPatches> {
    let (height, width) = smart_resize(img.height() as usize, img.width() as usize, cfg)?;
    let resized = resize_bicubic(img, width as u32, height as u32);
    let plane = normalized_planes(&resized, cfg);
    Ok(patchify(&plane, height, width, cfg))
}

/// (channel, y, x) f32 planes: f32(u8 · rescale in f64), then (x − mean) / std in f32, as
/// numpy does it.
fn normalized_planes(img: &RgbImage, cfg: &ProcessorConfig) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut out = vec![0f32; 3 * w * h];
    for (x, y, px) in img.enumerate_pixels() {
        for c in 0..3 {
            let v = (f64::from(px[c]) * cfg.rescale_factor) as f32;
            out[c * w * h + y as usize * w + x as usize] = (v - cfg.mean[c]) / cfg.std[c];
        }
    }
    out
}

fn patchify(plane: &[f32], height: usize, width: usize, cfg: &ProcessorConfig) -> PixelPatches {
    let (p, m, t) = (cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size);
    let (gh, gw) = (height / p, width / p);
    let patch_dim = 3 * t * p * p;
    let mut values = Vec::with_capacity(gh * gw * patch_dim);
    for (row, col) in merge_block_order(gh, gw, m) {
        for c in 0..3 {
            for _ in 0..t {
                for py in 0..p {
                    let start = c * height * width + (row * p + py) * width + col * p;
                    values.extend_from_slice(&plane[start..start + p]);
                }
            }
        }
    }
    PixelPatches {
        values,
        patch_dim,
        grid: [1, gh, gw],
    }
}

/// The (row, column) of each patch in the order the vision tower reads them: m×m merge
/// blocks in raster order, raster order inside each block.
pub fn merge_block_order(gh: usize, gw: usize, m: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..gh / m).flat_map(move |br| {
        (0..gw / m).flat_map(move |bc| {
            (0..m).flat_map(move |ir| (0..m).map(move |ic| (br * m + ir, bc * m + ic)))
        })
    })
}

/// Pillow's fixed-point precision for 8-bit resampling.
const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// One output pixel's source window along an axis and its fixed-point weights.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for a whole axis.
fn axis_taps(in_size: usize, out_size: usize) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = (((center + support + 0.5) as i64) as usize).min(in_size);
            let raw: Vec<f64> = (xmin..xmax)
                .map(|x| bicubic((x as f64 - center + 0.5) / filterscale))
                .collect();
            let total: f64 = raw.iter().sum();
            let weights = raw
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    let scaled = w * f64::from(1u32 << PRECISION_BITS);
                    (if scaled < 0.0 {
                        scaled - 0.5
                    } else {
                        scaled + 0.5
                    }) as i32
                })
                .collect();
            Taps {
                start: xmin,
                weights,
            }
        })
        .collect()
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One output value: the rounded fixed-point sum over `taps` of `sample(index)`.
fn tap_sum(taps: &Taps, sample: impl Fn(usize) -> u8) -> u8 {
    let mut acc: i64 = 1 << (PRECISION_BITS - 1);
    for (i, &w) in taps.weights.iter().enumerate() {
        acc += i64::from(sample(taps.start + i)) * i64::from(w);
    }
    clip8(acc)
}

/// PIL's `Image.resize(size, BICUBIC)` on an RGB image: horizontal pass over the rows the
/// vertical pass will read, rounded to 8 bits, then the vertical pass. A pass whose size
/// does not change is skipped, as in Pillow.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (in_w, in_h) = (img.width() as usize, img.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    if (in_w, in_h) == (out_w, out_h) {
        return img.clone();
    }
    let vert = axis_taps(in_h, out_h);
    let first_row = vert.first().map_or(0, |t| t.start);
    let last_row = vert.last().map_or(in_h, |t| t.start + t.weights.len());
    let horizontal = if out_w != in_w {
        let horiz = axis_taps(in_w, out_w);
        RgbImage::from_fn(width, (last_row - first_row) as u32, |x, y| {
            let taps = &horiz[x as usize];
            let row = first_row as u32 + y;
            image::Rgb(std::array::from_fn(|c| {
                tap_sum(taps, |sx| img.get_pixel(sx as u32, row)[c])
            }))
        })
    } else {
        image::imageops::crop_imm(
            img,
            0,
            first_row as u32,
            width,
            (last_row - first_row) as u32,
        )
        .to_image()
    };
    if out_h == in_h {
        return horizontal;
    }
    RgbImage::from_fn(width, height, |x, y| {
        let taps = &vert[y as usize];
        image::Rgb(std::array::from_fn(|c| {
            tap_sum(taps, |sy| {
                horizontal.get_pixel(x, (sy - first_row) as u32)[c]
            })
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(min: usize, max: usize) -> ProcessorConfig {
        ProcessorConfig {
            min_pixels: min,
            max_pixels: max,
            patch_size: 16,
            merge_size: 2,
            temporal_patch_size: 2,
            mean: [0.5; 3],
            std: [0.5; 3],
            rescale_factor: 1.0 / 255.0,
        }
    }

    #[test]
    fn smart_resize_matches_the_reference_branches() {
        // Values from transformers' smart_resize (factor 32).
        let c = cfg(4096, 16384);
        assert_eq!(smart_resize(120, 200, &c).unwrap(), (96, 160));
        assert_eq!(smart_resize(90, 40, &c).unwrap(), (96, 64));
        // 48 / 32 = 1.5 rounds to 2 and 80 / 32 = 2.5 rounds to 2 (half to even).
        assert_eq!(smart_resize(48, 80, &c).unwrap(), (64, 64));
        assert!(smart_resize(1, 300, &c).is_err());
    }

    #[test]
    fn transparency_goes_onto_white_as_pillow_does() {
        // (r, g, b, a) → Pillow's alpha_composite on white, then convert("RGB").
        let cases = [
            ([0, 0, 255, 0], [255, 255, 255]),
            ([0, 0, 255, 128], [127, 127, 255]),
            ([100, 50, 155, 77], [208, 193, 225]),
            ([200, 100, 55, 254], [200, 101, 56]),
            ([255, 127, 0, 1], [255, 254, 254]),
            ([13, 6, 242, 200], [65, 60, 245]),
        ];
        for (rgba, rgb) in cases {
            let img =
                DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(1, 1, image::Rgba(rgba)));
            assert_eq!(rgb_on_white(&img).get_pixel(0, 0).0, rgb, "{rgba:?}");
        }
    }

    #[test]
    fn patch_rows_follow_merge_blocks() {
        let order: Vec<_> = merge_block_order(2, 4, 2).collect();
        assert_eq!(order[..5], [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2)]);
    }
}
