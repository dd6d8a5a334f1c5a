//! The caption review sheet: one row per image, its thumbnail beside its file name and
//! caption (wrapped), drawn with the 8×8 bitmap font of `sample::canvas` into one PNG.

use std::path::PathBuf;

use crate::data::dataset::open_image;
use crate::sample::canvas::{Canvas, GLYPH};
use crate::sample::image::Rgb8;
use crate::{Error, Result};

const THUMB: u32 = 192;
const PAD: usize = 8;
/// Characters per caption line and lines per caption (longer captions end in "..").
const LINE_CHARS: usize = 56;
const MAX_LINES: usize = 14;

/// One row: an image and the text shown beside it (its caption, or why it has none).
pub struct SheetRow {
    pub image: PathBuf,
    pub name: String,
    pub text: String,
}

/// The sheet for `rows`; an image that cannot be decoded gets an empty grey cell.
pub fn review_sheet(rows: &[SheetRow]) -> Result<Rgb8> {
    if rows.is_empty() {
        return Err(Error::Invalid("no images for the review sheet".into()));
    }
    let wrapped: Vec<Vec<String>> = rows.iter().map(|r| wrap(&r.text)).collect();
    let heights: Vec<usize> = wrapped
        .iter()
        .map(|lines| (THUMB as usize).max((lines.len() + 1) * (GLYPH + 4)) + PAD)
        .collect();
    let text_x = THUMB as usize + 2 * PAD;
    let width = text_x + LINE_CHARS * GLYPH + PAD;
    let mut canvas = Canvas::new(width, heights.iter().sum::<usize>() + PAD);
    let mut y = PAD;
    for ((row, lines), h) in rows.iter().zip(&wrapped).zip(&heights) {
        match open_image(&row.image) {
            Ok(img) => canvas.blit(&thumbnail(&img.to_rgb8()), PAD, y),
            Err(_) => canvas.fill_rect(PAD, y, THUMB as usize, THUMB as usize, [200; 3]),
        }
        canvas.text(&row.name, text_x, y, width - text_x);
        for (i, line) in lines.iter().enumerate() {
            canvas.text(line, text_x, y + (i + 1) * (GLYPH + 4), width - text_x);
        }
        y += h;
        canvas.fill_rect(0, y - PAD / 2, width, 1, [180; 3]);
    }
    Ok(canvas.into_image())
}

fn thumbnail(img: &image::RgbImage) -> Rgb8 {
    let scale = f64::from(THUMB) / f64::from(img.width().max(img.height()));
    let w = ((f64::from(img.width()) * scale).round() as u32).clamp(1, THUMB);
    let h = ((f64::from(img.height()) * scale).round() as u32).clamp(1, THUMB);
    let small = image::imageops::thumbnail(img, w, h);
    Rgb8 {
        width: w as usize,
        height: h as usize,
        pixels: small.into_raw(),
    }
}

/// Greedy word wrap at `LINE_CHARS` (longer words are split), at most `MAX_LINES` lines.
fn wrap(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    let mut line = String::new();
    for word in text.split_whitespace() {
        let mut word: Vec<char> = word.chars().collect();
        while !word.is_empty() {
            let used = line.chars().count();
            let room = LINE_CHARS - used - usize::from(used > 0);
            if word.len() <= room {
                if used > 0 {
                    line.push(' ');
                }
                line.extend(word.drain(..));
            } else if used > 0 {
                lines.push(std::mem::take(&mut line));
            } else {
                lines.push(word.drain(..LINE_CHARS).collect());
            }
        }
    }
    if !line.is_empty() {
        lines.push(line);
    }
    if lines.len() > MAX_LINES {
        lines.truncate(MAX_LINES);
        let last = &mut lines[MAX_LINES - 1];
        *last = last
            .chars()
            .take(LINE_CHARS - 2)
            .chain("..".chars())
            .collect();
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapping_keeps_words_and_caps_lines() {
        let text = "word ".repeat(30);
        let lines = wrap(&text);
        assert!(lines.iter().all(|l| l.chars().count() <= LINE_CHARS));
        assert_eq!(lines.join(" ").split(' ').count(), 30);
        let long = "x".repeat(LINE_CHARS * 2 + 3);
        assert_eq!(wrap(&long).len(), 3);
        let huge = "word ".repeat(1000);
        let lines = wrap(&huge);
        assert_eq!(lines.len(), MAX_LINES);
        assert!(lines[MAX_LINES - 1].ends_with(".."));
    }
}
