//! Labelled contact sheets: a grid of equally sized images with a caption above each column
//! and at the left of each row, drawn with an 8×8 bitmap font (no font files needed).

use super::canvas::{Canvas, GLYPH};
use super::image::Rgb8;
use crate::{Error, Result};

const PAD: usize = 6;
/// Longer labels are cut (with "..") so one long prompt cannot make the sheet huge.
const MAX_LABEL_CHARS: usize = 40;

/// `cells[row][col]` under `col_labels`, beside `row_labels`, with a title line on top.
pub fn contact_sheet(
    title: &str,
    row_labels: &[String],
    col_labels: &[String],
    cells: &[Vec<Rgb8>],
) -> Result<Rgb8> {
    let first = cells
        .first()
        .and_then(|r| r.first())
        .ok_or_else(|| Error::Invalid("empty contact sheet".into()))?;
    let (w, h) = (first.width, first.height);
    if cells.len() != row_labels.len() || cells.iter().any(|r| r.len() != col_labels.len()) {
        return Err(Error::Invalid(
            "contact sheet labels do not match the grid".into(),
        ));
    }
    if cells
        .iter()
        .flatten()
        .any(|c| c.width != w || c.height != h)
    {
        return Err(Error::Invalid("contact sheet images differ in size".into()));
    }
    let chars = |labels: &[String]| labels.iter().map(|l| l.chars().count()).max().unwrap_or(0);
    let label_w = chars(row_labels).min(MAX_LABEL_CHARS) * GLYPH + 2 * PAD;
    // Columns are as wide as their images or their labels (plus one space), whichever is
    // wider, so that neighbouring labels never run together.
    let col_w = w.max((chars(col_labels).min(MAX_LABEL_CHARS) + 1) * GLYPH);
    let head = 2 * (GLYPH + PAD) + PAD;
    let grid_w = label_w + col_labels.len() * (col_w + PAD) + PAD;
    let width = grid_w.max(title.chars().count().min(2 * MAX_LABEL_CHARS) * GLYPH + 2 * PAD);
    let height = head + row_labels.len() * (h + PAD) + PAD;
    let mut c = Canvas::new(width, height);
    c.text(title, PAD, PAD, width - 2 * PAD);
    for (j, label) in col_labels.iter().enumerate() {
        c.text(
            label,
            label_w + j * (col_w + PAD),
            head - GLYPH - PAD,
            col_w,
        );
    }
    for (i, (label, row)) in row_labels.iter().zip(cells).enumerate() {
        let y = head + i * (h + PAD);
        c.text(
            label,
            PAD,
            (y + h / 2).saturating_sub(GLYPH / 2),
            label_w - PAD,
        );
        for (j, img) in row.iter().enumerate() {
            c.blit(img, label_w + j * (col_w + PAD), y);
        }
    }
    Ok(c.into_image())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(w: usize, h: usize, v: u8) -> Rgb8 {
        Rgb8 {
            width: w,
            height: h,
            pixels: vec![v; w * h * 3],
        }
    }

    #[test]
    fn sheet_places_cells_and_draws_labels() -> Result<()> {
        let cells = vec![vec![solid(20, 10, 10), solid(20, 10, 200)]];
        let sheet = contact_sheet(
            "title",
            &["row".into()],
            &["a".into(), "seed 2".into()],
            &cells,
        )?;
        let label_w = 3 * GLYPH + 2 * PAD;
        let col_w = 7 * GLYPH; // "seed 2" and a space are wider than the 20-pixel images
        let head = 2 * (GLYPH + PAD) + PAD;
        let px = |x: usize, y: usize| sheet.pixels[(y * sheet.width + x) * 3];
        assert_eq!(px(label_w + 1, head + 1), 10);
        assert_eq!(px(label_w + col_w + PAD + 1, head + 1), 200);
        assert_eq!(sheet.width, label_w + 2 * (col_w + PAD) + PAD);
        let title_ink = (0..GLYPH).any(|y| (0..5 * GLYPH).any(|x| px(PAD + x, PAD + y) == 0));
        assert!(title_ink, "the title is drawn");
        Ok(())
    }

    #[test]
    fn mismatched_grids_are_errors() {
        let cells = vec![vec![solid(4, 4, 0)]];
        assert!(contact_sheet("t", &["a".into(), "b".into()], &["c".into()], &cells).is_err());
    }
}
