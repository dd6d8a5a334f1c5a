//! A line chart of metrics against training step, drawn on the canvas with the bitmap font
//! (no font files or plotting library needed).

use crate::sample::canvas::{text_width, Canvas, GLYPH};
use crate::sample::image::Rgb8;
use crate::{Error, Result};

const WIDTH: usize = 880;
const HEIGHT: usize = 560;
const LEFT: usize = 96;
const RIGHT: usize = 24;
const TOP: usize = 48;
/// Room under the plot for the tick labels, the axis name and the legend.
const BOTTOM: usize = 120;
const AXIS: [u8; 3] = [60, 60, 60];
const GRID: [u8; 3] = [225, 225, 225];
const MARK: [u8; 3] = [150, 150, 150];

pub struct Series {
    pub name: String,
    pub color: [u8; 3],
    /// (x, y), in x order.
    pub points: Vec<(f64, f64)>,
}

/// The data → pixel mapping of the plot area.
struct Frame {
    x: (f64, f64),
    y_max: f64,
}

impl Frame {
    fn px(&self, x: f64) -> f64 {
        let w = (WIDTH - LEFT - RIGHT) as f64;
        LEFT as f64 + (x - self.x.0) / (self.x.1 - self.x.0) * w
    }

    fn py(&self, y: f64) -> f64 {
        let h = (HEIGHT - TOP - BOTTOM) as f64;
        (TOP as f64 + h) - y.clamp(0.0, self.y_max) / self.y_max * h
    }
}

/// Draws `series` against x from 0 on the y axis, with a vertical marker line at
/// `marker` (x, label) when given.
pub fn line_chart(
    title: &str,
    x_name: &str,
    series: &[Series],
    marker: Option<(f64, &str)>,
) -> Result<Rgb8> {
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    let (Some(lo), Some(hi)) = (
        xs.iter().copied().reduce(f64::min),
        xs.iter().copied().reduce(f64::max),
    ) else {
        return Err(Error::Invalid("a chart needs at least one point".into()));
    };
    let y_top = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|y| y.is_finite())
        .fold(1.0f64, f64::max);
    let frame = Frame {
        x: if hi > lo {
            (lo, hi)
        } else {
            (lo - 1.0, hi + 1.0)
        },
        // Headroom for the marker's label, rounded up to a quarter for short tick labels.
        y_max: (y_top * 1.15 * 4.0).ceil() / 4.0,
    };
    let mut c = Canvas::new(WIDTH, HEIGHT);
    c.text(title, LEFT, (TOP - GLYPH) / 2, WIDTH - LEFT - RIGHT);
    axes(&mut c, &frame, &xs);
    c.text(
        x_name,
        (WIDTH - text_width(x_name)) / 2,
        HEIGHT - BOTTOM + GLYPH + 12,
        WIDTH,
    );
    if let Some((x, label)) = marker {
        let px = frame.px(x);
        let (top, bottom) = (TOP as f64, frame.py(0.0));
        // Dashed: 6 pixels on, 4 off.
        let mut y = top;
        while y < bottom {
            c.line((px, y), (px, (y + 6.0).min(bottom)), 2, MARK);
            y += 10.0;
        }
        let lx = (px as usize + 6).min(WIDTH.saturating_sub(text_width(label) + RIGHT));
        c.fill_rect(lx - 2, TOP + 2, text_width(label) + 4, GLYPH + 4, [255; 3]);
        c.text(label, lx, TOP + 4, WIDTH - lx);
    }
    for s in series {
        let pts: Vec<(f64, f64)> = s
            .points
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(x, y)| (frame.px(x), frame.py(y)))
            .collect();
        for w in pts.windows(2) {
            c.line(w[0], w[1], 3, s.color);
        }
        for &(x, y) in &pts {
            c.fill_rect(
                (x as usize).saturating_sub(4),
                (y as usize).saturating_sub(4),
                9,
                9,
                s.color,
            );
        }
    }
    legend(&mut c, series);
    Ok(c.into_image())
}

/// Axes, horizontal grid lines with y labels, and x tick labels (at most 8).
fn axes(c: &mut Canvas, f: &Frame, xs: &[f64]) {
    let (left, right) = (LEFT as f64, (WIDTH - RIGHT) as f64);
    for i in 0..=4 {
        let y = f.y_max * i as f64 / 4.0;
        let py = f.py(y);
        c.line((left, py), (right, py), 1, if i == 0 { AXIS } else { GRID });
        let label = format!("{y:.2}");
        c.text(
            &label,
            LEFT - text_width(&label) - 8,
            py as usize - GLYPH / 2,
            LEFT,
        );
    }
    c.line((left, TOP as f64), (left, f.py(0.0)), 1, AXIS);
    let mut ticks: Vec<f64> = xs.to_vec();
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    let every = ticks.len().div_ceil(8).max(1);
    for x in ticks.iter().step_by(every) {
        let label = format!("{x}");
        let px = f.px(*x);
        c.line((px, f.py(0.0)), (px, f.py(0.0) + 6.0), 1, AXIS);
        let lx = (px as usize)
            .saturating_sub(text_width(&label) / 2)
            .min(WIDTH - text_width(&label));
        c.text(&label, lx, HEIGHT - BOTTOM + 8, WIDTH - lx);
    }
}

/// Colour swatches with the series' names along the bottom.
fn legend(c: &mut Canvas, series: &[Series]) {
    let y = HEIGHT - 2 * GLYPH - 8;
    let mut x = LEFT;
    for s in series {
        c.fill_rect(x, y + 2, GLYPH - 4, GLYPH - 4, s.color);
        c.text(&s.name, x + GLYPH + 4, y, WIDTH - x);
        x += GLYPH + 4 + text_width(&s.name) + 24;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(img: &Rgb8, color: [u8; 3]) -> usize {
        img.pixels.chunks_exact(3).filter(|p| *p == color).count()
    }

    #[test]
    fn lines_marker_and_legend_are_drawn() -> Result<()> {
        let red = [200, 30, 30];
        let blue = [30, 30, 200];
        let series = [
            Series {
                name: "effect".into(),
                color: red,
                points: vec![(10.0, 0.1), (20.0, 0.4), (30.0, 0.6)],
            },
            Series {
                name: "sharpness".into(),
                color: blue,
                points: vec![(10.0, 1.0), (20.0, 0.9), (30.0, f64::NAN)],
            },
        ];
        let img = line_chart("metrics", "step", &series, Some((20.0, "best: step 20")))?;
        assert_eq!((img.width, img.height), (WIDTH, HEIGHT));
        assert!(count(&img, red) > 400, "the red line is drawn");
        assert!(count(&img, blue) > 200, "the blue line is drawn");
        assert!(count(&img, MARK) > 100, "the marker is drawn");
        // The point (20, 0.4) is on the red line.
        let f = Frame {
            x: (10.0, 30.0),
            y_max: 1.25,
        };
        let (x, y) = (f.px(20.0) as usize, f.py(0.4) as usize);
        assert_eq!(
            &img.pixels[(y * WIDTH + x) * 3..(y * WIDTH + x) * 3 + 3],
            &red
        );
        assert!(line_chart("empty", "step", &[], None).is_err());
        Ok(())
    }
}
