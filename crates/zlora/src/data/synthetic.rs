//! A small synthetic dataset (a red disc on plain backgrounds, with captions) so the demo and
//! the tests can train without any real images.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::fsutil::write_atomic;
use crate::{Error, Result};

const BACKGROUNDS: [(&str, [u8; 3]); 6] = [
    ("blue", [40, 70, 200]),
    ("green", [40, 160, 70]),
    ("yellow", [230, 210, 60]),
    ("grey", [128, 128, 128]),
    ("purple", [120, 50, 160]),
    ("white", [245, 245, 245]),
];

/// The largest synthetic image side and image count.
pub const MAX_SIZE: u32 = 4096;
pub const MAX_COUNT: usize = 10_000;

/// Writes `count` PNG images of `size`² pixels with same-name `.txt` captions into `dir`.
pub fn create(dir: &Path, count: usize, size: u32, overwrite: bool) -> Result<()> {
    if !(16..=MAX_SIZE).contains(&size) || !(1..=MAX_COUNT).contains(&count) {
        return Err(Error::Invalid(format!(
            "tiny dataset: size must be 16 to {MAX_SIZE} px (the tiny models' RoPE tables cover \
             4096 px) and count 1 to {MAX_COUNT}, got size {size} and count {count}"
        )));
    }
    if dir.exists() && !overwrite {
        return Err(Error::bad_file(
            dir,
            "already exists (pass --force to replace it)",
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    for i in 0..count {
        let (name, color) = BACKGROUNDS[i % BACKGROUNDS.len()];
        let img = disc(size, color, i);
        let mut png = Vec::new();
        img.write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .map_err(|e| Error::Invalid(format!("PNG encoding failed: {e}")))?;
        write_atomic(&dir.join(format!("{i:03}.png")), &png, true)?;
        let caption = format!("a red circle on a {name} background");
        write_atomic(&dir.join(format!("{i:03}.txt")), caption.as_bytes(), true)?;
    }
    Ok(())
}

/// A red disc whose position moves with `i`, on a plain background.
fn disc(size: u32, background: [u8; 3], i: usize) -> RgbImage {
    let s = size as f32;
    let cx = s * (0.35 + 0.3 * ((i % 3) as f32 / 2.0));
    let cy = s * (0.35 + 0.3 * (((i / 3) % 3) as f32 / 2.0));
    let r = s * 0.22;
    RgbImage::from_fn(size, size, |x, y| {
        let (dx, dy) = (x as f32 - cx, y as f32 - cy);
        if dx * dx + dy * dy <= r * r {
            Rgb([220, 30, 30])
        } else {
            Rgb(background)
        }
    })
}
