//! The caption review sheet: one row per image, its thumbnail beside its file name and
//! caption. As a PNG (the caption wrapped and cut at 14 lines, drawn with the 8×8 bitmap font
//! of `sample::canvas`: ASCII and Latin-1 only) or as one self-contained HTML page (the
//! thumbnails embedded as PNG `data:` URIs, the whole caption in any script, every text
//! escaped), chosen by the file's extension.

use std::path::{Path, PathBuf};

use crate::data::dataset::open_image;
use crate::html::{base64, escape};
use crate::sample::canvas::{Canvas, GLYPH};
use crate::sample::image::{encode_png, Rgb8};
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

/// How the sheet is written, from its file's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SheetFormat {
    Png,
    Html,
}

impl SheetFormat {
    pub fn of(path: &Path) -> Result<Self> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_lowercase);
        match ext.as_deref() {
            Some("png") => Ok(Self::Png),
            Some("html" | "htm") => Ok(Self::Html),
            _ => Err(Error::Invalid(format!(
                "--sheet {}: name a .png or .html file",
                crate::error::shown(path)
            ))),
        }
    }
}

/// Writes the sheet for `rows` to `path` (PNG or HTML by its extension), atomically; an
/// existing file is replaced only with `overwrite`.
pub fn write_review_sheet(path: &Path, rows: &[SheetRow], overwrite: bool) -> Result<()> {
    match SheetFormat::of(path)? {
        SheetFormat::Png => {
            crate::sample::image::save_png(path, &review_sheet(rows)?, &[], overwrite)
        }
        SheetFormat::Html => {
            crate::fsutil::write_atomic(path, review_page(rows)?.as_bytes(), overwrite)
        }
    }
}

/// The sheet as a PNG; an image that cannot be decoded gets an empty grey cell.
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

/// The sheet as one HTML page: a table of thumbnails (PNG `data:` URIs, no file beside the
/// page needed) and escaped names and captions; an image that cannot be decoded is said so.
pub fn review_page(rows: &[SheetRow]) -> Result<String> {
    if rows.is_empty() {
        return Err(Error::Invalid("no images for the review sheet".into()));
    }
    let mut body = String::new();
    for row in rows {
        let name = escape(&row.name);
        let picture = match open_image(&row.image) {
            Ok(img) => format!(
                "<img alt=\"{name}\" src=\"data:image/png;base64,{}\">",
                base64(&encode_png(&thumbnail(&img.to_rgb8()), &[])?)
            ),
            Err(_) => "<span class=\"missing\">cannot be read</span>".to_string(),
        };
        body.push_str(&format!(
            "<tr><td>{picture}</td><td><div class=\"name\">{name}</div><div class=\"caption\">{}</div></td></tr>\n",
            escape(&row.text)
        ));
    }
    Ok(format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>Caption review</title>\n\
         <style>{STYLE}</style>\n</head>\n<body>\n<h1>Caption review</h1>\n<table>\n{body}</table>\n</body>\n</html>\n"
    ))
}

const STYLE: &str = "body{font-family:sans-serif;margin:16px;color:#222;background:#fff}\
    table{border-collapse:collapse}td{border-bottom:1px solid #ccc;padding:8px;vertical-align:top}\
    td:first-child{width:192px;text-align:center}.name{font-weight:bold;margin-bottom:6px}\
    .caption{white-space:pre-wrap;max-width:60em}.missing{color:#888}";

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
    fn the_page_embeds_thumbnails_and_escapes_captions() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/caption/wide.png");
        let rows = [
            SheetRow {
                image: fixture,
                name: "a<b>.png".into(),
                text: "<script>alert(1)</script> cats & dogs".into(),
            },
            SheetRow {
                image: PathBuf::from("/nonexistent/gone.png"),
                name: "gone.png".into(),
                text: "[failed: unreadable]".into(),
            },
        ];
        let page = review_page(&rows).unwrap();
        assert!(
            !page.contains("<script") && !page.contains("a<b>"),
            "{page}"
        );
        assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt; cats &amp; dogs"));
        assert!(page.contains("a&lt;b&gt;.png") && page.contains("cannot be read"));
        // The one readable image, as a PNG of the thumbnail's size (192 on its long side).
        let start = page.find("data:image/png;base64,").unwrap() + 22;
        let end = start + page[start..].find('"').unwrap();
        assert_eq!(page.matches("data:image/png").count(), 1);
        let png = decode_base64(&page[start..end]);
        let img = image::load_from_memory(&png).unwrap();
        assert_eq!((img.width(), img.height()), (192, 115));
    }

    /// The inverse of `base64`, for the test only.
    fn decode_base64(text: &str) -> Vec<u8> {
        const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let values: Vec<u32> = text
            .bytes()
            .filter(|&c| c != b'=')
            .map(|c| ALPHABET.iter().position(|&a| a == c).unwrap() as u32)
            .collect();
        let mut out = Vec::new();
        for chunk in values.chunks(4) {
            let n = chunk
                .iter()
                .enumerate()
                .fold(0, |n, (i, v)| n | v << (18 - 6 * i));
            out.extend(n.to_be_bytes()[1..chunk.len()].iter().copied());
        }
        out
    }

    #[test]
    fn the_format_follows_the_extension() {
        assert_eq!(
            SheetFormat::of(Path::new("a/s.PNG")).unwrap(),
            SheetFormat::Png
        );
        assert_eq!(
            SheetFormat::of(Path::new("s.html")).unwrap(),
            SheetFormat::Html
        );
        let err = SheetFormat::of(Path::new("s.jpg")).unwrap_err().to_string();
        assert!(err.contains("name a .png or .html file"), "{err}");
    }

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
