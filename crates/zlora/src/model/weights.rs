//! Checkpoint layouts → one canonical name space (the diffusers parameter names).
//!
//! A diffusers folder (optionally sharded with an index) is read as it is. A ComfyUI
//! single-file transformer (fused `attention.qkv`, `attention.out`, `q_norm`/`k_norm`,
//! `x_embedder`, `final_layer`, optional `model.diffusion_model.` prefix) is translated name
//! by name, the fused qkv split into row blocks, so the model code sees one layout only.
//! Files are memory-mapped; a tensor is read when the model asks for it.
//!
//! Weights may come quantized: a GGUF file (ComfyUI-GGUF's layout, `model/gguf.rs`) or a
//! ComfyUI fp8 checkpoint (`float8_e4m3fn` weights with an optional per-tensor
//! `scale_weight`). A quantized Linear weight stays quantized ([`QuantWeight`], each fused
//! qkv third cut from the stored bytes); any other quantized tensor (a pad token) and every
//! float tensor load dense.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use candle_core::quantized::GgmlDType;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::config::TransformerConfig;
use super::dit::{BaseStorage, ZImageTransformer};
use super::gguf::{is_gguf, GgufFile};
use crate::nn::{FrozenWeight, LinearTargets, QuantWeight};
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

/// The container of a checkpoint's tensors.
enum Store {
    Safetensors(MmapedSafetensors),
    Gguf(GgufFile),
}

/// How a stored tensor is encoded.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Encoding {
    Float(DType),
    /// e4m3 codes, times the tensor's `scale_weight` (1 without one).
    Fp8,
    /// A quantized GGML type.
    Ggml(GgmlDType),
}

impl Encoding {
    fn name(self) -> String {
        match self {
            Self::Float(dt) => format!("{dt:?}").to_lowercase(),
            Self::Fp8 => "fp8 (e4m3)".into(),
            Self::Ggml(g) => format!("{g:?}").to_lowercase(),
        }
    }
}

/// An opened (memory-mapped) transformer checkpoint, addressed by canonical names.
pub struct TransformerCheckpoint {
    files: Vec<PathBuf>,
    tensors: Store,
    /// Canonical name → source, with the canonical shape.
    map: HashMap<String, (Source, Vec<usize>)>,
    layout: CheckpointLayout,
}

/// Names a ComfyUI file may carry that the model does not use (a Lumina2 leftover).
const IGNORED_COMFY_KEYS: &[&str] = &["norm_final.weight"];

/// ComfyUI's fp8 companions of a weight `X.weight`: `X.scale_weight` (the per-tensor scale of
/// its codes) and `X.scale_input` (the activations' scale for fp8 matmuls, which zlora does
/// not run: ComfyUI without fp8 matmul ignores it too), and the file's `scaled_fp8` marker.
const FP8_SCALE: &str = ".scale_weight";
const FP8_INPUT_SCALE: &str = ".scale_input";
const FP8_MARKER: &str = "scaled_fp8";

fn is_fp8_companion(name: &str) -> bool {
    name.ends_with(FP8_SCALE)
        || name.ends_with(FP8_INPUT_SCALE)
        || strip_comfy_prefix(name) == FP8_MARKER
}

impl TransformerCheckpoint {
    /// Opens one or more safetensors files that together hold one transformer, or one GGUF
    /// file.
    pub fn open(files: Vec<PathBuf>) -> Result<Self> {
        let (tensors, shapes) = match files.as_slice() {
            [one] if is_gguf(one) => open_gguf(one)?,
            _ => open_safetensors(&files)?,
        };
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

    /// The transformer's configuration: the `config.json` next to the weights, else guessed
    /// from the tensor shapes (a single file).
    pub fn config(&self) -> Result<TransformerConfig> {
        match self.config_file() {
            Some(file) => TransformerConfig::from_file(&file),
            None => self.infer_config(),
        }
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
        self.dense(name, dtype, &Device::Cpu)
            .map_err(|e| Error::bad_file(first, e.to_string()))
    }

    /// The stored dtype of a canonical tensor; an error for a quantized one (what reads
    /// this, merge and extract, rewrite dense checkpoints).
    pub fn dtype(&self, name: &str) -> Result<DType> {
        let bad = |msg: String| Error::bad_file(&self.files[0], msg);
        let (source, _) = self
            .map
            .get(name)
            .ok_or_else(|| bad(format!("missing tensor {name}")))?;
        match self
            .encoding(source.key())
            .map_err(|e| bad(e.to_string()))?
        {
            Encoding::Float(dtype) => Ok(dtype),
            quantized => Err(bad(format!(
                "{name} is stored as {}: this needs a dense (f32, bf16 or f16) checkpoint",
                quantized.name()
            ))),
        }
    }

    /// Whether any Linear weight is stored quantized (a GGUF or an fp8 checkpoint).
    pub fn is_quantized(&self) -> bool {
        self.map.keys().any(|name| self.quantized_linear(name))
    }

    /// Whether `name` is a Linear's weight (every 2-D `.weight` of the model is one) stored
    /// quantized: it loads as a [`QuantWeight`].
    fn quantized_linear(&self, name: &str) -> bool {
        let Some((source, shape)) = self.map.get(name) else {
            return false;
        };
        name.ends_with(".weight")
            && shape.len() == 2
            && !matches!(self.encoding(source.key()), Ok(Encoding::Float(_)))
    }

    fn encoding(&self, key: &str) -> candle_core::Result<Encoding> {
        Ok(match &self.tensors {
            Store::Safetensors(st) => match st.get(key)?.dtype() {
                safetensors::Dtype::F8_E4M3 => Encoding::Fp8,
                other => Encoding::Float(other.try_into()?),
            },
            Store::Gguf(g) => match g.info(key)?.dtype {
                GgmlDType::F32 => Encoding::Float(DType::F32),
                GgmlDType::F16 => Encoding::Float(DType::F16),
                GgmlDType::BF16 => Encoding::Float(DType::BF16),
                other => Encoding::Ggml(other),
            },
        })
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
    /// swapped). A checkpoint stored quantized keeps each weight in its file's format:
    /// `storage.quantize` is then refused (requantizing a quantized weight only adds error,
    /// and ComfyUI-GGUF never does).
    pub fn load_stored(
        self,
        cfg: &TransformerConfig,
        dtype: DType,
        device: &Device,
        storage: BaseStorage,
    ) -> Result<ZImageTransformer> {
        self.check(cfg)?;
        if let Some(q) = storage.quantize {
            if self.is_quantized() {
                return Err(Error::bad_file(
                    &self.files[0],
                    format!(
                        "is stored quantized already (each weight in its file's format): drop \
                         the quantization {q}, or quantize a dense checkpoint instead"
                    ),
                ));
            }
        }
        storage.check(cfg)?;
        let first = self.files[0].clone();
        let bad = |e: candle_core::Error| Error::bad_file(&first, e.to_string());
        let vb = VarBuilder::from_backend(Box::new(Reader(&self)), dtype, device.clone());
        let mut model = ZImageTransformer::load(cfg, vb, storage).map_err(bad)?;
        self.attach_quantized(&mut model, device).map_err(bad)?;
        Ok(model)
    }

    /// Gives every Linear whose weight is stored quantized that weight (the model was built
    /// with a zero-stride stand-in for it); one that is not a Linear's weight is an error.
    fn attach_quantized(
        &self,
        model: &mut ZImageTransformer,
        device: &Device,
    ) -> candle_core::Result<()> {
        let mut attached = std::collections::HashSet::new();
        for (path, _) in model.linear_shapes() {
            let name = format!("{path}.weight");
            if !self.quantized_linear(&name) {
                continue;
            }
            let weight = self.quantized(&name, device)?;
            if let Some(linear) = model.linear_mut(&path) {
                linear
                    .set_weight(FrozenWeight::Quantized(weight))
                    .map_err(|e| candle_core::Error::Msg(format!("{name}: {e}")))?;
                attached.insert(name);
            }
        }
        match self
            .map
            .keys()
            .find(|n| self.quantized_linear(n) && !attached.contains(*n))
        {
            Some(name) => candle_core::bail!(
                "{name} is stored quantized but the model reads it as a dense tensor"
            ),
            None => Ok(()),
        }
    }

    /// A canonical Linear weight stored quantized, kept so on `dev`: GGUF blocks as a
    /// QTensor, fp8 codes with their per-tensor scale repeated per row.
    fn quantized(&self, name: &str, dev: &Device) -> candle_core::Result<QuantWeight> {
        let Some((source, shape)) = self.map.get(name) else {
            candle_core::bail!("missing tensor {name}");
        };
        match (&self.tensors, self.encoding(source.key())?) {
            (Store::Gguf(g), Encoding::Ggml(_)) => Ok(QuantWeight::Ggml(std::sync::Arc::new(
                g.qtensor(source.key(), source.rows(), dev)?,
            ))),
            (Store::Safetensors(st), Encoding::Fp8) => {
                let codes = stored(st, source, dev)?;
                let scale = fp8_scale(st, source.key())?;
                let scale = Tensor::full(scale, (shape[0], 1), dev)?;
                Ok(QuantWeight::Fp8 { codes, scale })
            }
            (_, other) => candle_core::bail!("{name} is {}, not quantized", other.name()),
        }
    }

    /// A canonical tensor dense in `dtype`, whatever its encoding: GGUF tensors decode on
    /// the CPU (the float ones exactly), fp8 codes are scaled in f32.
    fn dense(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let Some((source, _)) = self.map.get(name) else {
            candle_core::bail!("missing tensor {name}");
        };
        let t = match (&self.tensors, self.encoding(source.key())?) {
            (Store::Gguf(g), _) => g
                .qtensor(source.key(), source.rows(), &Device::Cpu)?
                .dequantize(&Device::Cpu)?
                .to_device(dev)?,
            (Store::Safetensors(st), Encoding::Fp8) => {
                upcast_fp8(st, source.key(), stored(st, source, dev)?)?
            }
            (Store::Safetensors(st), _) => stored(st, source, dev)?,
        };
        t.to_dtype(dtype)
    }
}

/// The checkpoint as the model's VarBuilder backend: dense tensors in the requested dtype,
/// and for each quantized Linear weight a zero-stride stand-in of its shape that
/// [`TransformerCheckpoint::attach_quantized`] replaces, so no quantized weight is ever
/// dequantized whole.
struct Reader<'a>(&'a TransformerCheckpoint);

impl SimpleBackend for Reader<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        shape_checked(name, s, self.get_unchecked(name, dtype, dev)?)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.0.map.get(name) {
            Some((_, shape)) if self.0.quantized_linear(name) => {
                Tensor::zeros((), dtype, dev)?.broadcast_as(shape.as_slice())
            }
            _ => self.0.dense(name, dtype, dev),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.map.contains_key(name)
    }
}

/// `t` when it has the shape the model asks `name` for.
fn shape_checked(name: &str, expected: Shape, t: Tensor) -> candle_core::Result<Tensor> {
    if t.shape() != &expected {
        candle_core::bail!(
            "{name}: shape {:?}, expected {:?}",
            t.dims(),
            expected.dims()
        );
    }
    Ok(t)
}

impl Source {
    fn key(&self) -> &str {
        match self {
            Self::Whole(key) | Self::Rows { key, .. } => key,
        }
    }

    fn rows(&self) -> Option<(usize, usize)> {
        match self {
            Self::Whole(_) => None,
            Self::Rows { start, len, .. } => Some((*start, *len)),
        }
    }
}

/// The `scale_weight` of an fp8 tensor (1 without one, as ComfyUI reads it).
fn fp8_scale(st: &MmapedSafetensors, key: &str) -> candle_core::Result<f32> {
    let scale_key = format!("{}{FP8_SCALE}", key.strip_suffix(".weight").unwrap_or(key));
    if st.get(&scale_key).is_err() {
        return Ok(1.0);
    }
    let scale = st.load(&scale_key, &Device::Cpu)?.to_dtype(DType::F32)?;
    match scale.flatten_all()?.to_vec1::<f32>()?.as_slice() {
        [s] => Ok(*s),
        _ => candle_core::bail!(
            "{scale_key}: shape {:?}, expected one per-tensor scale",
            scale.dims()
        ),
    }
}

/// fp8 codes of `key` (or its rows) as f32 values: codes × scale_weight, ComfyUI's product.
fn upcast_fp8(st: &MmapedSafetensors, key: &str, codes: Tensor) -> candle_core::Result<Tensor> {
    codes.to_dtype(DType::F32)? * fp8_scale(st, key)? as f64
}

/// A safetensors tensor (or its rows) as stored, on `dev`.
fn stored(st: &MmapedSafetensors, source: &Source, dev: &Device) -> candle_core::Result<Tensor> {
    match source {
        Source::Whole(key) => st.load(key, dev),
        Source::Rows { key, start, len } => rows(st, key, *start, *len, dev),
    }
}

/// Rows [start, start+len) of a stored tensor, read from the file's bytes on their own:
/// a narrowed view of the loaded tensor would keep the whole fused qkv alive for each of
/// q, k and v (three copies of it, ≈6 GB for the full model in bf16).
fn rows(
    st: &MmapedSafetensors,
    key: &str,
    start: usize,
    len: usize,
    dev: &Device,
) -> candle_core::Result<Tensor> {
    let view = st.get(key)?;
    let dtype: DType = view.dtype().try_into()?;
    let mut shape = view.shape().to_vec();
    let row_bytes = shape[1..].iter().product::<usize>() * dtype.size_in_bytes();
    shape[0] = len;
    let bytes = &view.data()[start * row_bytes..(start + len) * row_bytes];
    Tensor::from_raw_buffer(bytes, dtype, &shape, dev)
}

/// A container's tensor names and (torch-order) shapes.
type StoredShapes = Vec<(String, Vec<usize>)>;

/// Names and torch-order shapes of a GGUF's tensors.
fn open_gguf(path: &Path) -> Result<(Store, StoredShapes)> {
    let file = GgufFile::open(path)?;
    let shapes = file
        .tensors()
        .iter()
        .map(|(name, t)| (name.clone(), t.shape.clone()))
        .collect();
    Ok((Store::Gguf(file), shapes))
}

/// Names and shapes of safetensors files' tensors, without ComfyUI's fp8 companions.
fn open_safetensors(files: &[PathBuf]) -> Result<(Store, StoredShapes)> {
    let tensors = mmap(files)?;
    let mut shapes = Vec::new();
    for (name, view) in tensors.tensors() {
        check_dtype(files, &name, view.dtype())?;
        if !is_fp8_companion(&name) {
            shapes.push((name, view.shape().to_vec()));
        }
    }
    Ok((Store::Safetensors(tensors), shapes))
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
        F32 | F16 | BF16 | F8_E4M3 => Ok(()),
        other => Err(Error::bad_file(
            &files[0],
            format!(
                "tensor {name} is stored as {other:?}; only f32, bf16, f16 and fp8 e4m3 \
                 (ComfyUI's float8_e4m3fn) are supported"
            ),
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
        Box::new(Upcast(tensors)),
        dtype,
        device.clone(),
    ))
}

/// Whether the safetensors files hold a tensor stored in fp8 (a ComfyUI fp8 text encoder).
pub fn holds_fp8(files: &[PathBuf]) -> Result<bool> {
    Ok(mmap(files)?
        .tensors()
        .iter()
        .any(|(_, view)| view.dtype() == safetensors::Dtype::F8_E4M3))
}

/// Safetensors read dense: an fp8 (e4m3) tensor, as in ComfyUI's fp8 text encoders, is
/// upcast on its own with its `scale_weight` (`quantize_text_encoder` is refused with such a
/// file: requantizing its 8-bit weights would only add error).
struct Upcast(MmapedSafetensors);

impl SimpleBackend for Upcast {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        shape_checked(name, s, self.get_unchecked(name, dtype, dev)?)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.0.load(name, dev)?;
        match t.dtype() {
            DType::F8E4M3 => upcast_fp8(&self.0, name, t)?.to_dtype(dtype),
            _ => t.to_dtype(dtype),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.get(name).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(path: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures")
            .join(path)
    }

    /// Loads `file` over the fixture model's config and checks every Linear's weight against
    /// the fixture's bf16 source, with `dequantized`'s tensors in place of the ones the file
    /// stores lossily: exactly equal, whatever the encoding. Returns how many Linears hold a
    /// quantized weight, by kind.
    fn linears_match(file: &str, dequantized: &str) -> (usize, usize) {
        let cfg =
            TransformerConfig::from_file(&fixture("tiny/model/transformer/config.json")).unwrap();
        let source =
            TransformerCheckpoint::open(vec![fixture("tiny/comfy_transformer.safetensors")])
                .unwrap();
        let overlay = TransformerCheckpoint::open(vec![fixture(dequantized)]).unwrap();
        let mut model = TransformerCheckpoint::open(vec![fixture(file)])
            .unwrap()
            .load(&cfg, DType::F32, &Device::Cpu)
            .unwrap();
        let (mut ggml, mut fp8) = (0, 0);
        for (path, _) in model.linear_shapes() {
            let name = format!("{path}.weight");
            let expected = match overlay.shapes().contains_key(&name) {
                true => overlay.tensor(&name).unwrap(),
                false => source.tensor(&name).unwrap(),
            };
            let weight = model.linear_mut(&path).unwrap().weight().clone();
            let actual = match &weight {
                FrozenWeight::Dense(w) => w.clone(),
                FrozenWeight::Quantized(q) => {
                    match q {
                        QuantWeight::Ggml(_) => ggml += 1,
                        QuantWeight::Fp8 { .. } => fp8 += 1,
                        QuantWeight::Int8 { .. } => panic!("{name}: int8"),
                    }
                    q.dequantize(DType::F32).unwrap()
                }
                FrozenWeight::Host { .. } => panic!("{name}: no block swap here"),
            };
            let diff = (actual - expected.to_dtype(DType::F32).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert_eq!(diff, 0.0, "{name} differs from the reference by {diff}");
        }
        (ggml, fp8)
    }

    /// The `gguf` package's Q8_0 and Q4_0 weights stay quantized (q, k and v cut from the
    /// fused qkv's bytes) and dequantize to exactly what that package dequantizes; F16 and
    /// BF16 tensors load dense, exactly.
    #[test]
    fn a_gguf_keeps_its_quantized_weights_and_they_dequantize_as_the_gguf_package_does() {
        let (ggml, fp8) = linears_match(
            "quantized/comfy_gguf.gguf",
            "quantized/comfy_gguf_dequantized.safetensors",
        );
        // layers.0 and layers.1: q, k, v, out, w1, w3, adaLN (w2 is F16).
        assert_eq!((ggml, fp8), (14, 0));
    }

    /// ComfyUI's fp8 weights stay fp8, and dequantize to codes × scale_weight (× 1 without
    /// one), the f32 product ComfyUI computes.
    #[test]
    fn a_comfyui_fp8_checkpoint_keeps_its_fp8_weights_with_their_scales() {
        let (ggml, fp8) = linears_match(
            "quantized/comfy_fp8.safetensors",
            "quantized/comfy_fp8_dequantized.safetensors",
        );
        // Every block Linear: 8 in the noise refiner, 7 in the context refiner, 8 per layer.
        assert_eq!((ggml, fp8), (0, 31));
    }
}
