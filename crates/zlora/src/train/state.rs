//! Checkpoints that survive a kill at any moment: each is written into a hidden `.partial`
//! folder (every file fsynced) and renamed into place, so `checkpoints/step-NNNNNN/` either
//! exists complete or not at all. Randomness needs no saved state: every step's noise and
//! sigmas come from a stream keyed by (seed, step), and the data order from the loader
//! state saved here.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::ema::Ema;
use super::lora::TrainableLora;
use super::optim::Optimizer;
use crate::data::loader::LoaderState;
use crate::fsutil::{save_safetensors, write_atomic};
use crate::{Error, Result};

/// What besides tensors a resumed run needs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Optimizer steps completed.
    pub step: u64,
    pub loader: LoaderState,
    /// The smoothed loss shown in the progress bar.
    pub loss_ema: Option<f64>,
    /// The training config (TOML) the checkpoint was made with, which `--resume` compares
    /// (absent in checkpoints of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
}

pub fn checkpoints_dir(output: &Path) -> PathBuf {
    output.join("checkpoints")
}

pub fn checkpoint_dir(output: &Path, step: u64) -> PathBuf {
    checkpoints_dir(output).join(format!("step-{step:06}"))
}

/// The EMA's LoRA file beside the raw one (in the output folder and in each checkpoint).
pub const EMA_LORA: &str = "lora.ema.safetensors";

/// Writes a checkpoint; `write_lora` writes the user-facing LoRA file into the given path
/// (with an EMA, once more from the averages).
pub fn save(
    output: &Path,
    state: &RunState,
    lora: &TrainableLora,
    optimizer: &mut Optimizer,
    ema: Option<&Ema>,
    write_lora: &dyn Fn(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let dir = checkpoint_dir(output, state.step);
    let partial = checkpoints_dir(output).join(format!(".step-{:06}.partial", state.step));
    if partial.exists() {
        std::fs::remove_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;
    }
    std::fs::create_dir_all(&partial).map_err(|e| Error::io(&partial, e))?;

    let names = lora.var_names();
    let (mut tensors, _) = optimizer.state(&names);
    tensors.extend(lora.values());
    if let Some(ema) = ema {
        tensors.extend(ema.state(&names));
        ema.swapped_in(lora, || write_lora(&partial.join(EMA_LORA)))?;
    }
    save_safetensors(&partial.join("state.safetensors"), &tensors, None, false)?;
    let json = serde_json::to_string_pretty(state).map_err(|e| Error::Invalid(e.to_string()))?;
    write_atomic(&partial.join("state.json"), json.as_bytes(), false)?;
    write_lora(&partial.join("lora.safetensors"))?;

    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    }
    std::fs::rename(&partial, &dir).map_err(|e| Error::io(&dir, e))?;
    sync_dir(&checkpoints_dir(output));
    Ok(dir)
}

/// Removes the `.partial` folders of checkpoints a killed run did not finish; only for the
/// holder of the folder's lock (no other writer can be filling one). Returns how many.
pub fn remove_partials(output: &Path) -> Result<usize> {
    let dir = checkpoints_dir(output);
    if !dir.is_dir() {
        return Ok(0);
    }
    let mut removed = 0;
    for path in crate::fsutil::sorted_entries(&dir)? {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with(".step-") && name.ends_with(".partial") && path.is_dir() {
            std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Makes the rename durable; best effort where directories cannot be opened.
fn sync_dir(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = f.sync_all();
    }
}

/// Every complete checkpoint folder (`step-NNNNNN` with its state), sorted by step.
pub fn complete(output: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let dir = checkpoints_dir(output);
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut out: Vec<(u64, PathBuf)> = crate::fsutil::sorted_entries(&dir)?
        .into_iter()
        .filter_map(|path| {
            let name = path.file_name()?.to_str()?;
            let step = name.strip_prefix("step-")?.parse::<u64>().ok()?;
            path.join("state.json").is_file().then_some((step, path))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint, if any.
pub fn latest(output: &Path) -> Result<Option<(u64, PathBuf)>> {
    Ok(complete(output)?.pop())
}

/// The state of the newest checkpoint whose state.json reads (a damaged one is skipped, as
/// resuming skips it).
pub fn newest_state(output: &Path) -> Result<Option<RunState>> {
    for (_, dir) in complete(output)?.into_iter().rev() {
        if let Ok(state) = read_state(&dir) {
            return Ok(Some(state));
        }
    }
    Ok(None)
}

/// A checkpoint folder's state.json.
pub fn read_state(dir: &Path) -> Result<RunState> {
    let json_path = dir.join("state.json");
    let text = std::fs::read_to_string(&json_path).map_err(|e| Error::io(&json_path, e))?;
    serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(&json_path, format!("invalid checkpoint state: {e}")))
}

/// Restores LoRA values, optimizer state and the EMA from a checkpoint folder.
pub fn load(
    dir: &Path,
    lora: &TrainableLora,
    optimizer: &mut Optimizer,
    ema: Option<&mut Ema>,
) -> Result<RunState> {
    let state = read_state(dir)?;
    let tensor_path = dir.join("state.safetensors");
    let tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(&tensor_path, &Device::Cpu).map_err(|e| {
            Error::bad_file(&tensor_path, format!("unreadable checkpoint tensors: {e}"))
        })?;
    let tensors: BTreeMap<String, Tensor> = tensors.into_iter().collect();
    let fail = |e: Error| Error::bad_file(&tensor_path, e.to_string());
    lora.load_values(&tensors).map_err(fail)?;
    optimizer
        .load_state(&lora.var_names(), &tensors, state.step)
        .map_err(fail)?;
    if let Some(ema) = ema {
        ema.load_state(&lora.var_names(), &tensors).map_err(fail)?;
    }
    Ok(state)
}
