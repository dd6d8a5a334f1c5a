//! Decoded images → PNG files that carry their generation parameters.

use std::path::Path;

use candle_core::{DType, Tensor};

use crate::fsutil::write_atomic;
use crate::{Error, Result};

/// An 8-bit RGB image.
#[derive(Debug, Clone, PartialEq)]
pub struct Rgb8 {
    pub width: usize,
    pub height: usize,
    pub pixels: Vec<u8>,
}

/// A VAE output (3, H, W) in about [−1, 1] → pixels rounded like diffusers:
/// round(clamp(x/2 + 0.5, 0, 1) · 255), ties to even as numpy rounds.
pub fn to_rgb8(image: &Tensor) -> Result<Rgb8> {
    let (c, height, width) = image.dims3()?;
    if c != 3 {
        return Err(Error::Invalid(format!(
            "expected a 3-channel image, got {c} channels"
        )));
    }
    let hwc = image
        .to_dtype(DType::F32)?
        .permute((1, 2, 0))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let pixels = hwc
        .iter()
        .map(|&x| ((x / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round_ties_even() as u8)
        .collect();
    Ok(Rgb8 {
        width,
        height,
        pixels,
    })
}

/// Encodes a PNG with text chunks (keyword, text), e.g. ("parameters", JSON).
pub fn encode_png(img: &Rgb8, text: &[(&str, String)]) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let to_err = |e: png::EncodingError| Error::Invalid(format!("PNG encoding failed: {e}"));
    {
        let mut enc = png::Encoder::new(&mut bytes, img.width as u32, img.height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        for (key, value) in text {
            enc.add_itxt_chunk(key.to_string(), value.clone())
                .map_err(to_err)?;
        }
        let mut writer = enc.write_header().map_err(to_err)?;
        writer.write_image_data(&img.pixels).map_err(to_err)?;
        writer.finish().map_err(to_err)?;
    }
    Ok(bytes)
}

pub fn save_png(path: &Path, img: &Rgb8, text: &[(&str, String)], overwrite: bool) -> Result<()> {
    write_atomic(path, &encode_png(img, text)?, overwrite)
}

/// Reads a PNG back: its pixels (RGB) and text chunks. Used by tests and the validator.
pub fn read_png(path: &Path) -> Result<(Rgb8, Vec<(String, String)>)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let bad = |e: png::DecodingError| Error::bad_file(path, format!("not a readable PNG: {e}"));
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .map_err(bad)?;
    let mut buf = vec![0; reader.output_buffer_size().unwrap_or(0)];
    let info = reader.next_frame(&mut buf).map_err(bad)?;
    if info.color_type != png::ColorType::Rgb || info.bit_depth != png::BitDepth::Eight {
        return Err(Error::bad_file(path, "expected an 8-bit RGB PNG"));
    }
    buf.truncate(info.buffer_size());
    let meta = reader.info();
    let mut text: Vec<(String, String)> = meta
        .uncompressed_latin1_text
        .iter()
        .map(|t| (t.keyword.clone(), t.text.clone()))
        .collect();
    for t in &meta.utf8_text {
        text.push((t.keyword.clone(), t.get_text().map_err(bad)?));
    }
    let img = Rgb8 {
        width: info.width as usize,
        height: info.height as usize,
        pixels: buf,
    };
    Ok((img, text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn pixels_round_like_diffusers() -> Result<()> {
        // Channels (R: −1, 1), (G: 0, 2), (B: −3, 0.5): 0 → 127.5 → 128 (ties to even),
        // out-of-range values clamp, 0.5 → 191.25 → 191; pixels interleave as RGB.
        let t = Tensor::from_vec(
            vec![-1f32, 1.0, 0.0, 2.0, -3.0, 0.5],
            (3, 1, 2),
            &Device::Cpu,
        )?;
        let img = to_rgb8(&t)?;
        assert_eq!(img.pixels, vec![0, 128, 0, 255, 255, 191]);
        Ok(())
    }

    #[test]
    fn png_round_trip_keeps_pixels_and_text() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::io("tmp", e))?;
        let path = dir.path().join("x.png");
        let img = Rgb8 {
            width: 2,
            height: 1,
            pixels: vec![1, 2, 3, 4, 5, 6],
        };
        save_png(
            &path,
            &img,
            &[("parameters", "{\"seed\": 7, \"prompt\": \"Füchse\"}".into())],
            false,
        )?;
        let (back, text) = read_png(&path)?;
        assert_eq!(back, img);
        assert_eq!(
            text,
            vec![(
                "parameters".to_string(),
                "{\"seed\": 7, \"prompt\": \"Füchse\"}".to_string()
            )]
        );
        Ok(())
    }
}
