//! The loss chart of a job page: inline SVG drawn on the server from the run's log.jsonl.

use std::path::Path;

use maud::{html, Markup};

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 220.0;
/// Room for the axis labels.
const PAD: f64 = 40.0;

/// (step, loss, smoothed loss) of each line of a run's log.jsonl that reads.
pub fn losses(run: &Path) -> Vec<(f64, f64, f64)> {
    let text = std::fs::read_to_string(run.join("log.jsonl")).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| {
            Some((
                v["step"].as_f64()?,
                v["loss"].as_f64()?,
                v["loss_smoothed"].as_f64()?,
            ))
        })
        .filter(|(_, l, s)| l.is_finite() && s.is_finite())
        .collect()
}

/// The loss (thin) and its moving average (thick) against step; nothing before two steps.
pub fn loss_chart(points: &[(f64, f64, f64)]) -> Markup {
    if points.len() < 2 {
        return html! { p.muted { "The loss chart appears after two steps." } };
    }
    let (first, last) = (points[0].0, points[points.len() - 1].0);
    let lo = points
        .iter()
        .map(|p| p.1.min(p.2))
        .fold(f64::INFINITY, f64::min);
    let hi = points
        .iter()
        .map(|p| p.1.max(p.2))
        .fold(f64::NEG_INFINITY, f64::max);
    let span = |a: f64, b: f64| if b > a { b - a } else { 1.0 };
    let x = |step: f64| PAD + (step - first) / span(first, last) * (WIDTH - 2.0 * PAD);
    let y = |loss: f64| HEIGHT - PAD - (loss - lo) / span(lo, hi) * (HEIGHT - 2.0 * PAD);
    let line = |pick: fn(&(f64, f64, f64)) -> f64| {
        points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.0), y(pick(p))))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let view = format!("0 0 {WIDTH} {HEIGHT}");
    html! {
        svg.chart viewBox=(view) role="img" aria-label="training loss against step" {
            line x1=(PAD) y1=(HEIGHT - PAD) x2=(WIDTH - PAD) y2=(HEIGHT - PAD) stroke="#888" {}
            line x1=(PAD) y1=(PAD) x2=(PAD) y2=(HEIGHT - PAD) stroke="#888" {}
            polyline.loss points=(line(|p| p.1)) fill="none" stroke="#9bb7e0" stroke-width="1" {}
            polyline.smoothed points=(line(|p| p.2)) fill="none" stroke="#1f4e9c" stroke-width="2" {}
            text x=(PAD - 4.0) y=(PAD + 4.0) text-anchor="end" font-size="11" { (format!("{hi:.3}")) }
            text x=(PAD - 4.0) y=(HEIGHT - PAD) text-anchor="end" font-size="11" { (format!("{lo:.3}")) }
            text x=(PAD) y=(HEIGHT - PAD + 16.0) font-size="11" { "step " (first) }
            text x=(WIDTH - PAD) y=(HEIGHT - PAD + 16.0) text-anchor="end" font-size="11" { "step " (last) }
        }
    }
}
