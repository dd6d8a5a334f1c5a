//! A small RGB canvas for the pictures zlora draws itself (contact sheets, metric charts):
//! rectangles, lines, pasted images and text in an 8×8 bitmap font (no font files needed).

use font8x8::UnicodeFonts;

use super::image::Rgb8;

/// Glyphs are drawn at this many pixels per font pixel.
const SCALE: usize = 2;
/// The width and height of one drawn character.
pub const GLYPH: usize = 8 * SCALE;
const BACKGROUND: [u8; 3] = [255; 3];
const INK: [u8; 3] = [0; 3];

pub struct Canvas {
    img: Rgb8,
}

impl Canvas {
    /// A white canvas.
    pub fn new(width: usize, height: usize) -> Self {
        Self {
            img: Rgb8 {
                width,
                height,
                pixels: BACKGROUND.repeat(width * height),
            },
        }
    }

    pub fn into_image(self) -> Rgb8 {
        self.img
    }

    /// Sets one pixel; points outside the canvas are ignored (shapes may be clipped).
    fn put(&mut self, x: usize, y: usize, color: [u8; 3]) {
        if x < self.img.width && y < self.img.height {
            let i = (y * self.img.width + x) * 3;
            self.img.pixels[i..i + 3].copy_from_slice(&color);
        }
    }

    pub fn fill_rect(&mut self, x0: usize, y0: usize, w: usize, h: usize, color: [u8; 3]) {
        for y in y0..y0 + h {
            for x in x0..x0 + w {
                self.put(x, y, color);
            }
        }
    }

    /// A line `thickness` pixels wide from (x0, y0) to (x1, y1), stepping along the longer axis.
    pub fn line(&mut self, from: (f64, f64), to: (f64, f64), thickness: usize, color: [u8; 3]) {
        let (dx, dy) = (to.0 - from.0, to.1 - from.1);
        let n = dx.abs().max(dy.abs()).ceil().max(1.0) as usize;
        let half = thickness as f64 / 2.0;
        for i in 0..=n {
            let t = i as f64 / n as f64;
            let (x, y) = (from.0 + t * dx - half, from.1 + t * dy - half);
            if x >= 0.0 && y >= 0.0 {
                self.fill_rect(
                    x.round() as usize,
                    y.round() as usize,
                    thickness,
                    thickness,
                    color,
                );
            }
        }
    }

    pub fn blit(&mut self, src: &Rgb8, x0: usize, y0: usize) {
        for y in 0..src.height.min(self.img.height.saturating_sub(y0)) {
            let from = y * src.width * 3;
            let to = ((y0 + y) * self.img.width + x0) * 3;
            let n = src.width.min(self.img.width.saturating_sub(x0)) * 3;
            self.img.pixels[to..to + n].copy_from_slice(&src.pixels[from..from + n]);
        }
    }

    /// Draws `text` in black from (x0, y0), cut to `max_width` pixels (with "..").
    pub fn text(&mut self, text: &str, x0: usize, y0: usize, max_width: usize) {
        let fits = max_width / GLYPH;
        let mut chars: Vec<char> = text.chars().collect();
        if chars.len() > fits && fits >= 2 {
            chars.truncate(fits - 2);
            chars.extend(['.', '.']);
        }
        for (i, ch) in chars.into_iter().take(fits).enumerate() {
            let glyph = font8x8::BASIC_FONTS
                .get(ch)
                .or_else(|| font8x8::LATIN_FONTS.get(ch))
                .unwrap_or([0; 8]);
            self.glyph(&glyph, x0 + i * GLYPH, y0);
        }
    }

    fn glyph(&mut self, rows: &[u8; 8], x0: usize, y0: usize) {
        for (gy, bits) in rows.iter().enumerate() {
            for gx in (0..8).filter(|gx| bits & (1 << gx) != 0) {
                self.fill_rect(x0 + gx * SCALE, y0 + gy * SCALE, SCALE, SCALE, INK);
            }
        }
    }
}

/// The pixel width `text` takes when drawn.
pub fn text_width(text: &str) -> usize {
    text.chars().count() * GLYPH
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_and_rectangles_are_clipped_to_the_canvas() {
        let mut c = Canvas::new(10, 10);
        c.fill_rect(8, 8, 5, 5, [1, 2, 3]);
        c.line((0.0, 0.0), (20.0, 20.0), 1, [9, 9, 9]);
        let img = c.into_image();
        let px = |x: usize, y: usize| &img.pixels[(y * 10 + x) * 3..(y * 10 + x) * 3 + 3];
        assert_eq!(px(9, 8), &[1, 2, 3]);
        assert_eq!(px(5, 5), &[9, 9, 9]);
        assert_eq!(px(5, 4), &[255, 255, 255]);
    }
}
