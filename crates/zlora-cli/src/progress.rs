//! Progress bars on stderr (steps, rate, ETA).

use indicatif::{ProgressBar, ProgressStyle};

pub fn steps_bar(total: u64, label: String) -> ProgressBar {
    let bar = ProgressBar::new(total);
    let style =
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps  {per_sec}  ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
    bar.set_style(style);
    bar.set_message(label);
    bar
}
