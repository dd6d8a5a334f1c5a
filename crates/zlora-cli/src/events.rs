//! `--events json`: a training's, validation's, captioning's, experiment's, sweep's or
//! fetch's progress as one JSON object per line on stdout, for scripts and for `zlora serve`,
//! which runs jobs as child processes and reads this
//! stream (docs/serve.md lists the events).

use std::io::Write;

use serde_json::{json, Value};
use zlora::hub::fetch;
use zlora::train::trainer::{Event, Outcome};
use zlora::validate::render;

/// The `--events` formats (one so far).
#[derive(Clone, Copy, clap::ValueEnum)]
pub enum EventFormat {
    Json,
}

/// Writes each event as a line and flushes it, so that a reader sees it as it happens.
pub fn emit(event: Value) {
    let mut out = std::io::stdout().lock();
    // A reader that went away (a closed pipe) must not stop the training: its checkpoints
    // and log are on disk either way.
    let _ = writeln!(out, "{event}").and_then(|()| out.flush());
}

/// The training callback's events as JSON lines.
pub struct TrainEvents {
    steps: u64,
    step: u64,
}

impl TrainEvents {
    pub fn new(steps: u64) -> Self {
        Self { steps, step: 0 }
    }

    pub fn show(&mut self, event: Event) {
        emit(match event {
            Event::Message(text) => json!({"event": "message", "text": text}),
            Event::Cache { stage, done, total } => json!({
                "event": "cache",
                "stage": format!("{stage:?}").to_lowercase(),
                "done": done,
                "total": total,
            }),
            Event::Step(log) => {
                self.step = log.step;
                let rate = (log.step_seconds > 0.0).then(|| 1.0 / log.step_seconds);
                json!({
                    "event": "step",
                    "step": log.step,
                    "steps": self.steps,
                    "loss": log.loss,
                    "loss_smoothed": log.loss_smoothed,
                    "lr": log.lr,
                    "rate": rate,
                })
            }
            Event::Checkpoint(dir) => json!({
                "event": "checkpoint",
                "step": self.step,
                "path": dir,
            }),
            Event::Samples(png) => json!({"event": "samples", "step": self.step, "path": png}),
        });
    }
}

/// The last event of a run that returned: `done`, or `stopped` (resumable from `lora`'s
/// checkpoint).
pub fn finished(outcome: &Outcome) {
    let kind = if outcome.stopped { "stopped" } else { "done" };
    emit(json!({"event": kind, "step": outcome.steps, "lora": outcome.lora}));
}

/// The last event of a run that failed: the error as the CLI prints it.
pub fn failed(error: &anyhow::Error) {
    emit(json!({"event": "failed", "error": format!("{error:#}")}));
}

/// A validation's events: its stages and each image rendered.
pub fn validation(event: render::Event) {
    match event {
        render::Event::Stage(text) => emit(json!({"event": "stage", "text": text})),
        render::Event::Image { done, total } => images(done, total),
    }
}

/// `done` of `total` images finished (rendered by a validation, captioned by `zlora caption`).
pub fn images(done: usize, total: usize) {
    emit(json!({"event": "image", "done": done, "total": total}));
}

/// The last event of a command that succeeded: `done` with what it wrote.
pub fn done(fields: Value) {
    let mut event = json!({"event": "done"});
    if let (Some(e), Value::Object(f)) = (event.as_object_mut(), fields) {
        e.extend(f);
    }
    emit(event);
}

/// A fetch's events: `listed` (the bytes still missing), `download` (bytes of them done so
/// far, of all of them, and the rate since the listing), messages.
#[derive(Default)]
pub struct FetchEvents {
    total: u64,
    /// Bytes of the files finished in this run, and of those, the ones this run moved (a
    /// file may continue an earlier run's partial one).
    finished: u64,
    moved: u64,
    /// The file in progress: its size, and the bytes it had at its start.
    current: (u64, u64),
    listed: Option<std::time::Instant>,
}

impl FetchEvents {
    pub fn show(&mut self, event: fetch::Event) {
        let message = |text: String| json!({"event": "message", "text": text});
        emit(match event {
            fetch::Event::Listed {
                repo,
                commit,
                files,
                missing_bytes,
            } => {
                self.total = missing_bytes;
                self.listed = Some(std::time::Instant::now());
                json!({"event": "listed", "repo": repo, "commit": commit, "files": files, "bytes": missing_bytes})
            }
            fetch::Event::Start { size, from, .. } => {
                self.current = (size, from);
                return;
            }
            fetch::Event::Progress { path, done } => {
                let seconds = self.listed.map_or(0.0, |t| t.elapsed().as_secs_f64());
                let moved = self.moved + done.saturating_sub(self.current.1);
                json!({
                    "event": "download",
                    "path": path,
                    "done": self.finished + done,
                    "total": self.total,
                    "rate": (seconds > 0.0).then(|| moved as f64 / seconds),
                })
            }
            fetch::Event::Retry {
                path,
                attempt,
                error,
            } => message(format!("{path}: {error}; continuing (attempt {attempt})")),
            fetch::Event::Done {
                path,
                downloaded: false,
            } => message(format!("{path}: already in the cache")),
            fetch::Event::Done { .. } => {
                let (size, from) = std::mem::take(&mut self.current);
                self.finished += size;
                self.moved += size - from;
                return;
            }
        });
    }
}
