//! Progress bars on stderr (steps, rate, ETA).

use indicatif::{ProgressBar, ProgressStyle};

fn bar(total: u64, label: String, unit: &str) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let template = format!("{{msg}} [{{bar:30}}] {{pos}}/{{len}} {unit}  {{per_sec}}  ETA {{eta}}");
    let style = ProgressStyle::with_template(&template)
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(label);
    bar
}

pub fn steps_bar(total: u64, label: String) -> ProgressBar {
    bar(total, label, "steps")
}

pub fn count_bar(total: u64, label: String) -> ProgressBar {
    bar(total, label, "items")
}

/// A bar counting images, with images/s.
pub fn images_bar(total: u64, label: String) -> ProgressBar {
    bar(total, label, "images")
}

/// A bar counting bytes (downloads).
pub fn bytes_bar(total: u64, label: String) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let style = ProgressStyle::with_template(
        "{msg} [{bar:30}] {bytes}/{total_bytes}  {bytes_per_sec}  ETA {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(label);
    bar
}
