//! Checkpoint layouts → one canonical name space (the diffusers parameter names).
//!
//! A diffusers folder (optionally sharded with an index) is read as it is. A ComfyUI
//! single-file transformer (fused `attention.qkv`, `attention.out`, `q_norm`/`k_norm`,
//! `x_embedder`, `final_layer`, optional `model.diffusion_model.` prefix) is translated name
//! by name, the fused qkv split into row blocks, so the model code sees one layout only.
//! Files are memory-mapped; a tensor is read when the model asks for it.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::config::TransformerConfig;
use super::dit::{BaseStorage, ZImageTransformer};
use crate::{Error, Result};

/// Where one canonical tensor lives in the checkpoint.
#[derive(Debug, Clone)]
enum Source {
    Whole(String),
    /// Rows [start, start+len) of a fused tensor.
    Rows {
        key: String,
        start: usize,
        len: usize,
    },
}

/// The layout a transformer checkpoint was written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointLayout {
    Diffusers,
    ComfyUi,
}

/// An opened (memory-mapped) transformer checkpoint, addressed by canonical names.
pub struct TransformerCheckpoint {
    files: Vec<PathBuf>,
    tensors: MmapedSafetensors,
    /// Canonical name → source, with the canonical shape.
    map: HashMap<String, (Source, Vec<usize>)>,
    layout: CheckpointLayout,
}

/// Names a ComfyUI file may carry that the model does not use (a Lumina2 leftover).
const IGNORED_COMFY_KEYS: &[&str] = &["norm_final.weight"];

impl TransformerCheckpoint {
    /// Opens one or more safetensors files that together hold one transformer.
    pub fn open(files: Vec<PathBuf>) -> Result<Self> {
        let tensors = mmap(&files)?;
        let mut shapes = Vec::new();
        for (name, view) in tensors.tensors() {
            check_dtype(&files, &name, view.dtype())?;
            shapes.push((name, view.shape().to_vec()));
        }
        let layout = detect_layout(&shapes);
        let map = match layout {
            CheckpointLayout::Diffusers => shapes
                .into_iter()
                .map(|(name, shape)| (name.clone(), (Source::Whole(name), shape)))
                .collect(),
            CheckpointLayout::ComfyUi => comfy_to_canonical(shapes),
        };
        Ok(Self {
            files,
            tensors,
            map,
            layout,
        })
    }

    /// A transformer given as a model folder (its `transformer/`), a component folder (shards
    /// with an index, or one file) or a single safetensors file.
    pub fn open_path(path: &Path) -> Result<Self> {
        let files = if path.is_dir() {
            let component = path.join("transformer");
            component_files(if component.is_dir() { &component } else { path })?
        } else {
            vec![path.to_path_buf()]
        };
        Self::open(files)
    }

    pub fn layout(&self) -> CheckpointLayout {
        self.layout
    }

    /// The model width (in-features of the first block's to_q), if the checkpoint has it.
    pub fn width(&self) -> Option<usize> {
        let (_, shape) = self.map.get("layers.0.attention.to_q.weight")?;
        shape.get(1).copied()
    }

    /// The weight files.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The `config.json` next to the weight files, if there is one.
    pub fn config_file(&self) -> Option<PathBuf> {
        let config = self.files.first()?.parent()?.join("config.json");
        config.is_file().then_some(config)
    }

    /// A canonical tensor in its stored dtype, on the CPU.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let first = &self.files[0];
        let dtype = self.dtype(name)?;
        self.get_unchecked(name, dtype, &Device::Cpu)
            .map_err(|e| Error::bad_file(first, e.to_string()))
    }

    /// The stored dtype of a canonical tensor.
    pub fn dtype(&self, name: &str) -> Result<DType> {
        let key = match self.map.get(name) {
            Some((Source::Whole(key) | Source::Rows { key, .. }, _)) => key,
            None => {
                return Err(Error::bad_file(
                    &self.files[0],
                    format!("missing tensor {name}"),
                ))
            }
        };
        let view = self
            .tensors
            .get(key)
            .map_err(|e| Error::bad_file(&self.files[0], format!("{key}: {e}")))?;
        match view.dtype() {
            safetensors::Dtype::F32 => Ok(DType::F32),
            safetensors::Dtype::BF16 => Ok(DType::BF16),
            safetensors::Dtype::F16 => Ok(DType::F16),
            other => Err(Error::bad_file(
                &self.files[0],
                format!("{key} is {other:?}"),
            )),
        }
    }

    /// A description of the files for messages.
    pub fn describe(&self) -> String {
        match self.files.as_slice() {
            [one] => one.display().to_string(),
            many => format!(
                "{} ({} shards)",
                many[0].parent().unwrap_or(Path::new("")).display(),
                many.len()
            ),
        }
    }

    /// The canonical (name, shape) pairs present.
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.map
            .iter()
            .map(|(k, (_, s))| (k.clone(), s.clone()))
            .collect()
    }

    /// Guesses the configuration of a single file without a config.json, assuming the
    /// released model's RoPE layout when the head size is the released one (128).
    pub fn infer_config(&self) -> Result<TransformerConfig> {
        let shape = |name: &str| -> Result<Vec<usize>> {
            self.map
                .get(name)
                .map(|(_, s)| s.clone())
                .ok_or_else(|| Error::bad_file(&self.files[0], format!("missing tensor {name}")))
        };
        let count = |stack: &str| {
            (0..)
                .take_while(|i| {
                    self.map
                        .contains_key(&format!("{stack}.{i}.attention.to_q.weight"))
                })
                .count()
        };
        let dim = shape("all_x_embedder.2-1.weight")?[0];
        let head_dim = shape("layers.0.attention.norm_q.weight")?[0];
        let mut cfg = TransformerConfig::z_image();
        if head_dim != cfg.head_dim() {
            return Err(Error::bad_file(
                &self.files[0],
                format!("head size {head_dim} differs from Z-Image's 128: pass a model folder with transformer/config.json"),
            ));
        }
        cfg.dim = dim;
        cfg.n_heads = dim / head_dim;
        cfg.n_kv_heads = Some(cfg.n_heads);
        cfg.n_layers = count("layers");
        cfg.n_refiner_layers = count("noise_refiner");
        cfg.cap_feat_dim = shape("cap_embedder.1.weight")?[1];
        Ok(cfg)
    }

    /// Checks every tensor the model needs against the checkpoint; one error lists all that
    /// are missing, have the wrong shape, or are not part of the model.
    pub fn check(&self, cfg: &TransformerConfig) -> Result<()> {
        let expected = expected_tensors(cfg)?;
        let present = self.shapes();
        let mut problems = Vec::new();
        for (name, shape) in &expected {
            match present.get(name) {
                None => problems.push(format!("missing {name} {shape:?}")),
                Some(s) if s != shape => {
                    problems.push(format!("{name}: shape {s:?}, expected {shape:?}"))
                }
                Some(_) => {}
            }
        }
        for name in present.keys().filter(|n| !expected.contains_key(*n)) {
            problems.push(format!("unexpected tensor {name}"));
        }
        if problems.is_empty() {
            return Ok(());
        }
        let total = problems.len();
        problems.truncate(40);
        let more = if total > 40 {
            format!("\n  … and {} more", total - 40)
        } else {
            String::new()
        };
        Err(Error::bad_file(
            &self.files[0],
            format!(
                "{total} tensor problem(s) against the transformer config (dim {}, {} layers):\n  {}{more}",
                cfg.dim,
                cfg.n_layers,
                problems.join("\n  ")
            ),
        ))
    }

    /// Checks the checkpoint, then builds the transformer in `dtype` on `device`.
    pub fn load(
        self,
        cfg: &TransformerConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<ZImageTransformer> {
        self.load_stored(cfg, dtype, device, BaseStorage::default())
    }

    /// [`TransformerCheckpoint::load`] with the base held as `storage` says (quantized,
    /// swapped).
    pub fn load_stored(
        self,
        cfg: &TransformerConfig,
        dtype: DType,
        device: &Device,
        storage: BaseStorage,
    ) -> Result<ZImageTransformer> {
        self.check(cfg)?;
        storage.check(cfg)?;
        let first = self.files[0].clone();
        let vb = VarBuilder::from_backend(Box::new(self), dtype, device.clone());
        ZImageTransformer::load(cfg, vb, storage).map_err(|e| Error::bad_file(first, e.to_string()))
    }

    /// Rows [start, start+len) of a stored tensor, read from the file's bytes on their own:
    /// a narrowed view of the loaded tensor would keep the whole fused qkv alive for each of
    /// q, k and v (three copies of it, ≈6 GB for the full model in bf16).
    fn rows(
        &self,
        key: &str,
        start: usize,
        len: usize,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let view = self.tensors.get(key)?;
        let dtype: DType = view.dtype().try_into()?;
        let mut shape = view.shape().to_vec();
        let row_bytes = shape[1..].iter().product::<usize>() * dtype.size_in_bytes();
        shape[0] = len;
        let bytes = &view.data()[start * row_bytes..(start + len) * row_bytes];
        Tensor::from_raw_buffer(bytes, dtype, &shape, dev)
    }
}

impl SimpleBackend for TransformerCheckpoint {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!("{name}: shape {:?}, expected {:?}", t.dims(), s.dims());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some((source, _)) = self.map.get(name) else {
            candle_core::bail!("missing tensor {name}");
        };
        let t = match source {
            Source::Whole(key) => self.tensors.load(key, dev)?,
            Source::Rows { key, start, len } => self.rows(key, *start, *len, dev)?,
        };
        t.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }
}

fn mmap(files: &[PathBuf]) -> Result<MmapedSafetensors> {
    for f in files {
        crate::fsutil::check_regular(f, u64::MAX)?;
    }
    // SAFETY: the files are opened read-only; like every mmap user we rely on them not being
    // truncated by another process while we run.
    unsafe { MmapedSafetensors::multi(files) }
        .map_err(|e| Error::bad_file(&files[0], format!("not a readable safetensors file: {e}")))
}

fn check_dtype(files: &[PathBuf], name: &str, dtype: safetensors::Dtype) -> Result<()> {
    use safetensors::Dtype::*;
    match dtype {
        F32 | F16 | BF16 => Ok(()),
        other => Err(Error::bad_file(
            &files[0],
            format!("tensor {name} is stored as {other:?}; only f32, bf16 and f16 are supported"),
        )),
    }
}

fn detect_layout(shapes: &[(String, Vec<usize>)]) -> CheckpointLayout {
    let comfy = shapes.iter().any(|(n, _)| {
        n.ends_with("attention.qkv.weight") || strip_comfy_prefix(n).starts_with("x_embedder.")
    });
    if comfy {
        CheckpointLayout::ComfyUi
    } else {
        CheckpointLayout::Diffusers
    }
}

fn strip_comfy_prefix(name: &str) -> &str {
    name.strip_prefix("model.diffusion_model.")
        .or_else(|| name.strip_prefix("diffusion_model."))
        .unwrap_or(name)
}

/// Translates ComfyUI names to diffusers names (reference §1.3).
fn comfy_to_canonical(shapes: Vec<(String, Vec<usize>)>) -> HashMap<String, (Source, Vec<usize>)> {
    let mut map = HashMap::new();
    for (key, shape) in shapes {
        let name = strip_comfy_prefix(&key);
        if IGNORED_COMFY_KEYS.contains(&name) {
            continue;
        }
        // A fused qkv without rows (0-d) stays whole, for check() to report its shape.
        let fused = name.strip_suffix("attention.qkv.weight");
        if let (Some(block), Some(rows)) = (fused, shape.first()) {
            let third = rows / 3;
            for (i, part) in ["to_q", "to_k", "to_v"].iter().enumerate() {
                let source = Source::Rows {
                    key: key.clone(),
                    start: i * third,
                    len: third,
                };
                let mut part_shape = shape.clone();
                part_shape[0] = third;
                map.insert(
                    format!("{block}attention.{part}.weight"),
                    (source, part_shape),
                );
            }
            continue;
        }
        let canonical = if let Some(rest) = name.strip_prefix("x_embedder.") {
            format!("all_x_embedder.2-1.{rest}")
        } else if let Some(rest) = name.strip_prefix("final_layer.") {
            format!("all_final_layer.2-1.{rest}")
        } else {
            name.replace("attention.out.", "attention.to_out.0.")
                .replace("attention.q_norm.", "attention.norm_q.")
                .replace("attention.k_norm.", "attention.norm_k.")
        };
        map.insert(canonical, (Source::Whole(key), shape));
    }
    map
}

/// The ComfyUI single-file name of a canonical tensor (reference §1.3), with the row block it
/// fills when it is one of q/k/v fused into `attention.qkv.weight`.
pub fn comfy_tensor_name(canonical: &str) -> (String, Option<usize>) {
    for (i, part) in ["to_q", "to_k", "to_v"].iter().enumerate() {
        if let Some(block) = canonical.strip_suffix(&format!("attention.{part}.weight")) {
            return (format!("{block}attention.qkv.weight"), Some(i));
        }
    }
    let global = |prefix: &str, comfy: &str| {
        let rest = canonical.strip_prefix(prefix)?;
        // Skip the patch key segment (`2-1`).
        let (_, tail) = rest.split_once('.')?;
        Some(format!("{comfy}.{tail}"))
    };
    let name = global("all_x_embedder.", "x_embedder")
        .or_else(|| global("all_final_layer.", "final_layer"))
        .unwrap_or_else(|| {
            canonical
                .replace("attention.to_out.0.", "attention.out.")
                .replace("attention.norm_q.", "attention.q_norm.")
                .replace("attention.norm_k.", "attention.k_norm.")
        });
    (name, None)
}

/// A backend that invents every tensor a model asks for (by name and shape) and keeps it, so
/// the model code itself enumerates its parameters: for the expected-tensor list and for the
/// tiny random model.
pub(crate) struct OnDemand<F> {
    make: Mutex<F>,
    made: Arc<Mutex<BTreeMap<String, Tensor>>>,
}

impl<F: FnMut(&str, &Shape, DType, &Device) -> candle_core::Result<Tensor> + Send> OnDemand<F> {
    /// The backend and a handle on what it will have made.
    pub(crate) fn new(make: F) -> (Self, Arc<Mutex<BTreeMap<String, Tensor>>>) {
        let made = Arc::new(Mutex::new(BTreeMap::new()));
        (
            Self {
                make: Mutex::new(make),
                made: made.clone(),
            },
            made,
        )
    }
}

impl<F: FnMut(&str, &Shape, DType, &Device) -> candle_core::Result<Tensor> + Send> SimpleBackend
    for OnDemand<F>
{
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let poisoned = || candle_core::Error::Msg("tensor maker poisoned".into());
        let mut made = self.made.lock().map_err(|_| poisoned())?;
        if let Some(t) = made.get(name) {
            return Ok(t.clone());
        }
        let t = (self.make.lock().map_err(|_| poisoned())?)(name, &s, dtype, dev)?;
        made.insert(name.to_string(), t.clone());
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("{name}: shape needed")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Every tensor (canonical name → shape) the transformer with this config reads.
pub fn expected_tensors(cfg: &TransformerConfig) -> Result<BTreeMap<String, Vec<usize>>> {
    recorded_tensors(|vb| {
        ZImageTransformer::new(cfg, vb)
            .map(|_| ())
            .map_err(Error::from)
    })
}

/// Every tensor (name → shape) that `build` asks its VarBuilder for, without allocating the
/// weights (zero-stride zeros): a model's parameter list comes from its own construction code.
pub fn recorded_tensors<F>(build: F) -> Result<BTreeMap<String, Vec<usize>>>
where
    F: FnOnce(VarBuilder) -> Result<()>,
{
    let (backend, made) = OnDemand::new(|_: &str, s: &Shape, dtype, dev: &Device| {
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    });
    build(VarBuilder::from_backend(
        Box::new(backend),
        DType::F32,
        Device::Cpu,
    ))?;
    let made = made.lock().map(|m| m.clone()).unwrap_or_default();
    Ok(made
        .into_iter()
        .map(|(k, t)| (k, t.dims().to_vec()))
        .collect())
}

/// The weight files of one diffusers component folder: the shards named by
/// `*.safetensors.index.json`, or the single `*.safetensors` file.
pub fn component_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut singles = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| Error::io(dir, e))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".safetensors.index.json") {
            return index_shards(&path);
        }
        if name.ends_with(".safetensors") {
            singles.push(path);
        }
    }
    match singles.len() {
        1 => Ok(singles),
        0 => Err(Error::bad_file(
            dir,
            "no .safetensors weights in this folder",
        )),
        _ => Err(Error::bad_file(
            dir,
            "several .safetensors files but no index.json naming the shards",
        )),
    }
}

fn index_shards(index: &Path) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let text = crate::fsutil::read_text(index)?;
    let parsed: Index = serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(index, format!("invalid shard index: {e}")))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = parsed.weight_map.values().map(|f| dir.join(f)).collect();
    files.sort();
    files.dedup();
    for f in &files {
        if !f.is_file() {
            return Err(Error::bad_file(
                index,
                format!("names shard {} which does not exist", f.display()),
            ));
        }
    }
    Ok(files)
}

/// Opens safetensors weights as a VarBuilder without any name translation (text encoder, VAE).
pub fn plain_var_builder(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    let tensors = mmap(files)?;
    Ok(VarBuilder::from_backend(
        Box::new(tensors),
        dtype,
        device.clone(),
    ))
}
