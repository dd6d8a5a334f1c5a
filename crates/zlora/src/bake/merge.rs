//! `W' = W + Σ strength · scale · delta` for every adapted Linear, written as a diffusers
//! transformer folder (shards + index) or a ComfyUI single file (q/k/v fused, ComfyUI names).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use crate::fsutil::{write_atomic, write_safetensors_with, TensorSpec};
use crate::lora::{listing, LoraFile, LoraModule};
use crate::model::weights::{comfy_tensor_name, TransformerCheckpoint};
use crate::outdir::{self, OutputDir, Policy};
use crate::{Error, Result};

/// How the merged transformer is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeFormat {
    /// A diffusers `transformer/` folder: `diffusion_pytorch_model-0000i-of-0000n.safetensors`
    /// shards of at most `max_shard_bytes` with `diffusion_pytorch_model.safetensors.index.json`
    /// (one `diffusion_pytorch_model.safetensors` when everything fits), plus the source's
    /// `config.json`.
    Diffusers { max_shard_bytes: usize },
    /// One safetensors file in ComfyUI names (`attention.qkv`, `x_embedder`, ...), no prefix:
    /// what ComfyUI's diffusion-model loader reads.
    ComfyUi,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MergeReport {
    /// Tensors written.
    pub tensors: usize,
    /// Weights a LoRA changed.
    pub merged: usize,
    pub files: Vec<PathBuf>,
}

/// One output tensor: a canonical tensor, or q/k/v concatenated along rows.
struct Planned {
    spec: TensorSpec,
    sources: Vec<String>,
}

/// Merges `loras` (file, strength) into `checkpoint` and writes the result to `out` (a folder
/// for diffusers, a file for ComfyUI). Every module is checked against the checkpoint first;
/// any misfit is an error listing them all, before anything is written.
pub fn merge(
    checkpoint: &TransformerCheckpoint,
    loras: &[(&LoraFile, f64)],
    out: &Path,
    format: MergeFormat,
    overwrite: bool,
) -> Result<MergeReport> {
    let deltas = collect_deltas(checkpoint, loras)?;
    let plan = plan(checkpoint, format)?;
    let mut metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    // File names only: a shared checkpoint must not reveal the user's folders.
    let merged_from: Vec<String> = loras
        .iter()
        .map(|(f, s)| {
            let name = f.path.file_name().unwrap_or(f.path.as_os_str());
            format!("{}:{s}", name.to_string_lossy())
        })
        .collect();
    metadata.insert("zlora.merged_loras".into(), merged_from.join(", "));
    let produce = |p: &Planned| -> Result<Tensor> {
        let parts = p
            .sources
            .iter()
            .map(|name| merged_tensor(checkpoint, name, deltas.get(name)))
            .collect::<Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, 0)?)
    };
    let files = match format {
        MergeFormat::ComfyUi => {
            let specs: Vec<TensorSpec> = plan.iter().map(|p| p.spec.clone()).collect();
            write_safetensors_with(out, &specs, &metadata, overwrite, |i| produce(&plan[i]))?;
            vec![out.to_path_buf()]
        }
        MergeFormat::Diffusers { max_shard_bytes } => {
            let inputs = merge_inputs(checkpoint, loras);
            let policy = if overwrite {
                Policy::Overwrite
            } else {
                Policy::Keep
            };
            let claimed = OutputDir::claim(out, "lora merge", &inputs, policy)?;
            let dir = claimed.path();
            let old = shard_set(dir)?;
            let files = write_shards(
                checkpoint,
                &plan,
                dir,
                max_shard_bytes,
                &metadata,
                overwrite,
                produce,
            )?;
            remove_replaced(&old, &files)?;
            files
        }
    };
    Ok(MergeReport {
        tensors: plan.len(),
        merged: deltas.len(),
        files,
    })
}

type Deltas<'a> = BTreeMap<String, Vec<(&'a LoraModule, f64)>>;

/// Weight name → the modules (with strengths) that change it, after checking every module
/// against the checkpoint's shapes.
fn collect_deltas<'a>(
    checkpoint: &TransformerCheckpoint,
    loras: &[(&'a LoraFile, f64)],
) -> Result<Deltas<'a>> {
    let shapes = checkpoint.shapes();
    let mut deltas: Deltas = BTreeMap::new();
    for (file, strength) in loras {
        let mut misfits = Vec::new();
        for (path, m) in &file.modules {
            let weight = format!("{path}.weight");
            let lora = m.shape()?;
            match shapes.get(&weight).map(Vec::as_slice) {
                Some([o, i]) if (*o, *i) == lora => {
                    deltas.entry(weight).or_default().push((m, *strength))
                }
                Some(s) => misfits.push(format!("{path} (LoRA {lora:?}, model {s:?})")),
                None => misfits.push(format!("{path} (not in the model)")),
            }
        }
        if !misfits.is_empty() {
            let msg = format!(
                "modules that do not fit {} ({}): {}",
                checkpoint.describe(),
                misfits.len(),
                listing(misfits)
            );
            return Err(Error::lora(&file.path, msg));
        }
    }
    Ok(deltas)
}

/// The weight plus its deltas, computed in f32 and stored back in the weight's dtype.
fn merged_tensor(
    checkpoint: &TransformerCheckpoint,
    name: &str,
    deltas: Option<&Vec<(&LoraModule, f64)>>,
) -> Result<Tensor> {
    let w = checkpoint.tensor(name)?;
    let Some(deltas) = deltas else {
        return Ok(w);
    };
    let mut sum = w.to_dtype(DType::F32)?;
    for (m, strength) in deltas {
        sum = (sum + (m.delta()? * *strength)?)?;
    }
    let merged = sum.to_dtype(w.dtype())?;
    check_overflow(name, &w, &merged, deltas)?;
    Ok(merged)
}

/// A merged weight that is not finite although the weight and every delta are: the
/// strengths pushed it past what its dtype holds. (Non-finite inputs were refused or
/// explicitly allowed by the caller, so they pass.)
fn check_overflow(
    name: &str,
    w: &Tensor,
    merged: &Tensor,
    deltas: &[(&LoraModule, f64)],
) -> Result<()> {
    use crate::lora::all_finite;
    if all_finite(merged)? || !all_finite(w)? {
        return Ok(());
    }
    for (m, _) in deltas {
        if !all_finite(&m.delta()?)? {
            return Ok(());
        }
    }
    let strengths: Vec<String> = deltas.iter().map(|(_, s)| format!("{s:?}")).collect();
    Err(Error::Invalid(format!(
        "merging into {name} at strength {} overflows {:?} (the result holds inf or NaN); \
         use strengths whose result stays finite; no weight file was written",
        strengths.join(", "),
        w.dtype()
    )))
}

/// Output tensors in name order: canonical names for diffusers, ComfyUI names (q/k/v fused)
/// for ComfyUI.
fn plan(checkpoint: &TransformerCheckpoint, format: MergeFormat) -> Result<Vec<Planned>> {
    let mut out: BTreeMap<String, Planned> = BTreeMap::new();
    for (name, shape) in checkpoint.shapes() {
        let dtype = checkpoint.dtype(&name)?;
        let (out_name, part) = match format {
            MergeFormat::ComfyUi => comfy_tensor_name(&name),
            MergeFormat::Diffusers { .. } => (name.clone(), None),
        };
        let slots = if part.is_some() { 3 } else { 1 };
        let entry = out.entry(out_name.clone()).or_insert_with(|| Planned {
            spec: TensorSpec {
                name: out_name,
                dtype,
                shape: shape.clone(),
            },
            sources: vec![String::new(); slots],
        });
        // q, k, v fill the fused tensor's row blocks in that order.
        if let (Some(rows), Some(part_rows)) = (entry.spec.shape.first_mut(), shape.first()) {
            *rows = part_rows * slots;
        }
        entry.sources[part.unwrap_or(0)] = name;
    }
    // A ComfyUI file needs all three of q/k/v for every fused qkv.
    let incomplete: Vec<String> = out
        .values()
        .filter(|p| p.sources.iter().any(String::is_empty))
        .map(|p| p.spec.name.clone())
        .collect();
    if !incomplete.is_empty() {
        return Err(Error::bad_file(
            checkpoint.describe(),
            format!("q/k/v incomplete for {}", listing(incomplete)),
        ));
    }
    Ok(out.into_values().collect())
}

const SHARD_STEM: &str = "diffusion_pytorch_model";

/// What the merged folder must not be or contain.
fn merge_inputs<'a>(
    checkpoint: &'a TransformerCheckpoint,
    loras: &[(&'a LoraFile, f64)],
) -> Vec<outdir::Protected<'a>> {
    let model = checkpoint
        .files()
        .iter()
        .map(|f| ("the model", f.as_path()));
    let adapters = loras.iter().map(|(f, _)| ("a LoRA", f.path.as_path()));
    model.chain(adapters).collect()
}

/// The weight files of an earlier merge in `dir`: the one file, or the index and the shards
/// it names.
fn shard_set(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(format!("{SHARD_STEM}.safetensors"));
    let index = dir.join(format!("{SHARD_STEM}.safetensors.index.json"));
    let mut files: Vec<PathBuf> = [&single, &index]
        .into_iter()
        .filter(|p| p.is_file())
        .cloned()
        .collect();
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&index, format!("unreadable shard index: {e}")))?;
        let shards = json["weight_map"].as_object().into_iter().flatten();
        // Only plain file names in this folder: an index must not point the removal elsewhere.
        let names = shards.filter_map(|(_, v)| v.as_str()).filter(|n| {
            Path::new(n).file_name() == Some(std::ffi::OsStr::new(n)) && n.starts_with(SHARD_STEM)
        });
        files.extend(names.map(|n| dir.join(n)));
    }
    files.sort();
    files.dedup();
    Ok(files)
}

/// Removes the files of the earlier merge that the new one did not rewrite (another shard
/// size leaves other names), once the new set is complete.
fn remove_replaced(old: &[PathBuf], new: &[PathBuf]) -> Result<()> {
    for path in old.iter().filter(|p| !new.contains(p) && p.is_file()) {
        std::fs::remove_file(path).map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}

/// Writes the plan as diffusers shards with an index (or one file), plus config.json.
fn write_shards(
    checkpoint: &TransformerCheckpoint,
    plan: &[Planned],
    dir: &Path,
    max_shard_bytes: usize,
    metadata: &BTreeMap<String, String>,
    overwrite: bool,
    produce: impl Fn(&Planned) -> Result<Tensor>,
) -> Result<Vec<PathBuf>> {
    let shards = shard(plan, max_shard_bytes);
    let n = shards.len();
    let name = |i: usize| match n {
        1 => format!("{SHARD_STEM}.safetensors"),
        _ => format!("{SHARD_STEM}-{:05}-of-{n:05}.safetensors", i + 1),
    };
    let mut files = Vec::new();
    let mut weight_map = BTreeMap::new();
    for (i, members) in shards.iter().enumerate() {
        let path = dir.join(name(i));
        let specs: Vec<TensorSpec> = members.iter().map(|p| p.spec.clone()).collect();
        write_safetensors_with(&path, &specs, metadata, overwrite, |j| produce(members[j]))?;
        for p in members {
            weight_map.insert(p.spec.name.clone(), name(i));
        }
        files.push(path);
    }
    if n > 1 {
        let total: usize = plan.iter().map(|p| bytes(&p.spec)).sum();
        let index =
            serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join(format!("{SHARD_STEM}.safetensors.index.json"));
        let text = serde_json::to_string_pretty(&index)
            .map_err(|e| Error::bad_file(&path, e.to_string()))?;
        write_atomic(&path, text.as_bytes(), overwrite)?;
        files.push(path);
    }
    if let Some(config) = checkpoint.config_file() {
        let text = std::fs::read(&config).map_err(|e| Error::io(&config, e))?;
        let path = dir.join("config.json");
        write_atomic(&path, &text, overwrite)?;
        files.push(path);
    }
    Ok(files)
}

fn bytes(spec: &TensorSpec) -> usize {
    spec.shape.iter().product::<usize>() * spec.dtype.size_in_bytes()
}

/// Consecutive groups of at most `max` bytes (a tensor larger than `max` gets its own).
fn shard(plan: &[Planned], max: usize) -> Vec<Vec<&Planned>> {
    let mut shards: Vec<Vec<&Planned>> = Vec::new();
    let mut size = 0;
    for p in plan {
        let b = bytes(&p.spec);
        match shards.last_mut() {
            Some(current) if size + b <= max => current.push(p),
            _ => {
                shards.push(vec![p]);
                size = 0;
            }
        }
        size += b;
    }
    shards
}
