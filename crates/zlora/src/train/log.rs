//! The per-step JSONL log: one JSON object per optimizer step.

use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepLog {
    pub step: u64,
    pub loss: f32,
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
}

impl StepLog {
    /// Opens the log of a run that has completed `resumed_step` steps: lines of later steps
    /// (written before a crash, then undone by resuming) are dropped.
    pub fn open(path: &Path, resumed_step: u64, device: &Device) -> Result<Log> {
        if path.exists() {
            let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
            let kept: String = text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<StepLog>(l).is_ok_and(|e| e.step <= resumed_step)
                })
                .map(|l| format!("{l}\n"))
                .collect();
            write_atomic(path, kept.as_bytes(), true)?;
        }
        Ok(Log {
            path: path.to_path_buf(),
            device: device.clone(),
        })
    }
}

impl Log {
    pub fn append(
        &self,
        step: u64,
        loss: f32,
        loss_smoothed: f64,
        lr: f64,
        grad_norm: f64,
        step_seconds: f64,
    ) -> Result<StepLog> {
        let entry = StepLog {
            step,
            loss,
            loss_smoothed,
            lr,
            grad_norm,
            step_seconds,
            peak_memory_mib: peak_rss_mib(),
            gpu_memory_mib: crate::device::gpu_memory_in_use_mib(&self.device),
        };
        let line = serde_json::to_string(&entry).map_err(|e| Error::Invalid(e.to_string()))?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .map_err(|e| Error::io(&self.path, e))?;
        writeln!(f, "{line}").map_err(|e| Error::io(&self.path, e))?;
        Ok(entry)
    }
}

/// VmHWM from /proc/self/status (Linux); None elsewhere.
pub fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}
