//! The per-step JSONL log (one JSON object per optimizer step) and, with `[log] tensorboard`,
//! the same numbers and the sample grids as TensorBoard events (tensorboard.rs).

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::tensorboard::{self, EventWriter};
use crate::fsutil::write_atomic;
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    pub step: u64,
    /// The loss the step minimised: the flow-matching loss plus the weighted preservation
    /// loss when differential output preservation is on.
    pub loss: f32,
    /// Differential output preservation's share of `loss` (its weight applied).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preservation_loss: Option<f32>,
    /// Exponential moving average of the loss (factor 0.9), what the progress bar shows.
    pub loss_smoothed: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub step_seconds: f64,
    /// Peak resident memory of the process so far (MiB).
    pub peak_memory_mib: Option<f64>,
    /// Memory in use on the GPU after the step (MiB; CUDA runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu_memory_mib: Option<f64>,
}

pub struct Log {
    path: PathBuf,
    device: Device,
    tensorboard: Option<EventWriter>,
}

impl Log {
    /// Opens the logs of the run in `out` that has completed `resumed_step` steps: lines and
    /// events of later steps (written before a crash, then undone by resuming) are dropped.
    /// With `tensorboard`, events go to `out/tensorboard/` too.
    pub fn open(out: &Path, resumed_step: u64, device: &Device, tensorboard: bool) -> Result<Self> {
        let path = out.join("log.jsonl");
        if path.exists() {
            let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
            let kept: String = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<StepLog>(l).is_ok_and(|e| e.step <= resumed_step)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            write_atomic(&path, kept.as_bytes(), true)?;
        }
        let events = out.join(tensorboard::DIR);
        tensorboard::drop_after(&events, resumed_step)?;
        let tensorboard = tensorboard
            .then(|| EventWriter::open(&events))
            .transpose()?;
        Ok(Log {
            path,
            device: device.clone(),
            tensorboard,
        })
    }

    /// Appends a step's entry with the memory in use now filled in; every number of it is a
    /// TensorBoard scalar of the same name.
    pub fn append(&mut self, mut entry: StepLog) -> Result<StepLog> {
        entry.peak_memory_mib = peak_rss_mib();
        entry.gpu_memory_mib = crate::device::gpu_memory_in_use_mib(&self.device);
        let bad = |e: serde_json::Error| Error::Invalid(e.to_string());
        let line = serde_json::to_string(&entry).map_err(bad)?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io(&self.path, e))?;
        writeln!(f, "{line}").map_err(|e| Error::io(&self.path, e))?;
        let json = serde_json::to_value(&entry).map_err(bad)?;
        if let (Some(tb), serde_json::Value::Object(fields)) = (&mut self.tensorboard, &json) {
            let scalars: Vec<(&str, f64)> = fields
                .iter()
                .filter(|(k, _)| k.as_str() != "step")
                .filter_map(|(k, v)| Some((k.as_str(), v.as_f64()?)))
                .collect();
            tb.scalars(entry.step, &scalars)?;
        }
        Ok(entry)
    }

    /// The sample grid of `step` (a PNG file) as a TensorBoard image, with `[log] tensorboard`.
    pub fn samples(&mut self, step: u64, png: &Path) -> Result<()> {
        let Some(tb) = &mut self.tensorboard else {
            return Ok(());
        };
        let size = image::image_dimensions(png)
            .map_err(|e| Error::bad_file(png, format!("cannot read the sample grid: {e}")))?;
        let bytes = std::fs::read(png).map_err(|e| Error::io(png, e))?;
        tb.image(step, "samples", bytes, size)
    }
}

/// VmHWM from /proc/self/status (Linux); None elsewhere.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
