//! GGUF transformer files in the layout ComfyUI-GGUF (city96) uses for Z-Image: architecture
//! `lumina2` (ComfyUI's model class for Z-Image), ComfyUI tensor names without the
//! `model.diffusion_model.` prefix (the prefix and diffusers names are read too), q/k/v fused
//! into `attention.qkv.weight`, and each tensor in its own GGML type.
//!
//! GGUF lists a tensor's dimensions innermost first; candle's reader reverses them, so shapes
//! here are in torch order, (out, in) for a weight. Quantization blocks run along the input
//! dimension and never straddle rows, so rows [a, b) of a quantized weight are bytes
//! [a·row_bytes, b·row_bytes) of its data: the fused qkv splits into q, k and v exactly,
//! without dequantizing.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

use super::dit::{ZImageTransformer, BLOCK_LINEARS, STACKS};
use super::weights::{comfy_tensor_name, TransformerCheckpoint};
use crate::nn::Quantization;
use crate::{Error, Result};

/// `general.architecture` of a Z-Image GGUF (ComfyUI-GGUF's `ModelLumina2.arch`).
pub const ARCHITECTURE: &str = "lumina2";
/// GGUF's default (and zlora's) alignment of the tensor data.
const ALIGNMENT: usize = 32;
/// ggml's quantization format version, as llama.cpp and the `gguf` package write it.
const QUANTIZATION_VERSION: u32 = 2;

/// Whether `path` is a regular file starting with GGUF's magic bytes (only regular files are
/// opened: opening a FIFO would wait for a writer).
pub fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
        && std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok()
        && &magic == b"GGUF"
}

/// One tensor of a GGUF file.
#[derive(Debug, Clone)]
pub struct GgufTensor {
    pub dtype: GgmlDType,
    /// Torch order (outermost first).
    pub shape: Vec<usize>,
    start: usize,
    len: usize,
}

impl GgufTensor {
    /// Bytes of one row (the last dimension).
    fn row_bytes(&self) -> usize {
        let inner = self.shape.last().copied().unwrap_or(1);
        inner / self.dtype.block_size() * self.dtype.type_size()
    }
}

/// A memory-mapped GGUF file whose every tensor lies inside it.
pub struct GgufFile {
    mmap: memmap2::Mmap,
    tensors: BTreeMap<String, GgufTensor>,
}

impl GgufFile {
    /// Opens a Z-Image GGUF: its architecture must be `lumina2` (or absent, as in files
    /// written by stable-diffusion.cpp, which ComfyUI-GGUF detects by tensor names).
    pub fn open(path: &Path) -> Result<Self> {
        crate::fsutil::check_regular(path, u64::MAX)?;
        let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: read-only mapping; like every mmap user we rely on the file not being
        // truncated by another process while we run.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let content = Content::read(&mut std::io::Cursor::new(&mmap[..]))
            .map_err(|e| Error::bad_file(path, unreadable(e)))?;
        check_metadata(path, &content)?;
        let mut tensors = BTreeMap::new();
        for (name, info) in &content.tensor_infos {
            let tensor = locate(path, name, info, content.tensor_data_offset, mmap.len())?;
            tensors.insert(name.clone(), tensor);
        }
        Ok(Self { mmap, tensors })
    }

    pub fn tensors(&self) -> &BTreeMap<String, GgufTensor> {
        &self.tensors
    }

    /// The named tensor's info.
    pub fn info(&self, name: &str) -> candle_core::Result<&GgufTensor> {
        self.tensors
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("missing tensor {name}")))
    }

    /// Rows [start, start+len) of a tensor (all of it for `None`) as a QTensor of the file's
    /// type on `dev`; the raw bytes are copied to an aligned buffer first (GGUF aligns tensors
    /// to `general.alignment`, which may be smaller than a block's).
    pub fn qtensor(
        &self,
        name: &str,
        rows: Option<(usize, usize)>,
        dev: &Device,
    ) -> candle_core::Result<QTensor> {
        let t = self.info(name)?;
        let mut shape = t.shape.clone();
        let (from, len) = match rows {
            None => (t.start, t.len),
            Some((first, count)) if first + count <= shape[0] => {
                shape[0] = count;
                (t.start + first * t.row_bytes(), count * t.row_bytes())
            }
            Some((first, count)) => {
                candle_core::bail!("{name}: rows {first}..{} of {}", first + count, shape[0])
            }
        };
        let bytes = &self.mmap[from..from + len];
        let mut aligned = vec![0u64; bytes.len().div_ceil(8)];
        // SAFETY: `aligned` holds at least bytes.len() bytes; the regions do not overlap.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), aligned.as_mut_ptr().cast(), bytes.len())
        };
        // SAFETY: the same buffer viewed as its first bytes.len() bytes.
        let aligned = unsafe { std::slice::from_raw_parts(aligned.as_ptr().cast(), bytes.len()) };
        qtensor_from_ggml(t.dtype, aligned, shape, dev)
    }
}

/// Why candle could not read a GGUF header, without candle's backtrace; an unknown type
/// (the IQ formats, say) names those zlora reads.
fn unreadable(e: candle_core::Error) -> String {
    let e = match e {
        candle_core::Error::WithBacktrace { inner, .. } => *inner,
        e => e,
    };
    let hint = if e.to_string().contains("unknown dtype") {
        ": zlora reads F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q2_K to Q8_K tensors; \
         use a file quantized to one of these"
    } else {
        ""
    };
    format!("not a readable GGUF file: {e}{hint}")
}

/// Refuses another architecture and ComfyUI-GGUF's reshaped tensors (written for SD1/SDXL
/// convolutions only, never for Z-Image).
fn check_metadata(path: &Path, content: &Content) -> Result<()> {
    match content.metadata.get("general.architecture") {
        None => {}
        Some(Value::String(arch)) if arch == ARCHITECTURE => {}
        Some(Value::String(arch)) => {
            return Err(Error::bad_file(
                path,
                format!(
                    "a GGUF of architecture '{arch}', not Z-Image (ComfyUI-GGUF names Z-Image \
                     '{ARCHITECTURE}'): pass a Z-Image transformer"
                ),
            ))
        }
        Some(other) => {
            return Err(Error::bad_file(
                path,
                format!("general.architecture is {other:?}, not a string"),
            ))
        }
    }
    if let Some(key) = content
        .metadata
        .keys()
        .find(|k| k.starts_with("comfy.gguf.orig_shape."))
    {
        return Err(Error::bad_file(
            path,
            format!("{key}: reshaped tensors are not a Z-Image layout"),
        ));
    }
    Ok(())
}

/// A tensor's byte range, checked against the file's length and its type's block size.
fn locate(
    path: &Path,
    name: &str,
    info: &candle_core::quantized::gguf_file::TensorInfo,
    data_offset: u64,
    file_len: usize,
) -> Result<GgufTensor> {
    let shape = info.shape.dims().to_vec();
    let dtype = info.ggml_dtype;
    let inner = shape.last().copied().unwrap_or(1);
    if inner % dtype.block_size() != 0 {
        return Err(Error::bad_file(
            path,
            format!(
                "tensor {name} {shape:?}: rows of {inner} values do not fill {dtype:?} blocks of {}",
                dtype.block_size()
            ),
        ));
    }
    let elems: usize = shape.iter().product();
    let len = elems / dtype.block_size() * dtype.type_size();
    let start = data_offset.saturating_add(info.offset);
    let end = start.saturating_add(len as u64);
    if end > file_len as u64 {
        return Err(Error::bad_file(
            path,
            format!(
                "truncated: tensor {name} needs bytes up to {end} but the file has {file_len} \
                 (download it again)"
            ),
        ));
    }
    Ok(GgufTensor {
        dtype,
        shape,
        start: start as usize,
        len,
    })
}

/// A tensor to write: its name, torch-order shape and GGML type.
#[derive(Debug, Clone)]
pub struct GgufSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
}

impl GgufSpec {
    fn bytes(&self) -> usize {
        self.shape.iter().product::<usize>() / self.dtype.block_size() * self.dtype.type_size()
    }
}

/// Writes a GGUF (version 3) atomically, one tensor at a time: `tensor(i)` is called for
/// `specs[i]` only when its bytes are due and must match the spec. Metadata values are
/// strings or u32s, all a Z-Image GGUF carries.
pub fn write_gguf(
    path: &Path,
    metadata: &[(&str, MetaValue)],
    specs: &[GgufSpec],
    overwrite: bool,
    mut tensor: impl FnMut(usize) -> Result<QTensor>,
) -> Result<()> {
    crate::fsutil::write_atomic_with(path, overwrite, |w| {
        let io = |e| Error::io(path, e);
        let header = gguf_header(metadata, specs).map_err(|e| Error::bad_file(path, e))?;
        w.write_all(&header).map_err(io)?;
        for (i, spec) in specs.iter().enumerate() {
            let q = tensor(i)?;
            if q.dtype() != spec.dtype || q.shape().dims() != spec.shape.as_slice() {
                return Err(Error::bad_file(
                    path,
                    format!(
                        "tensor {} came out as {:?} {:?}, planned {:?} {:?}",
                        spec.name,
                        q.dtype(),
                        q.shape().dims(),
                        spec.dtype,
                        spec.shape
                    ),
                ));
            }
            let data = q.data().map_err(Error::from)?;
            w.write_all(&data).map_err(io)?;
            w.write_all(&vec![0u8; padding(data.len())]).map_err(io)?;
        }
        Ok(())
    })
}

/// A metadata value zlora writes.
#[derive(Debug, Clone)]
pub enum MetaValue {
    String(String),
    U32(u32),
}

fn padding(len: usize) -> usize {
    len.next_multiple_of(ALIGNMENT) - len
}

/// Magic, counts, metadata and tensor infos (dimensions innermost first, offsets relative to
/// the aligned start of the data), padded to the alignment.
fn gguf_header(
    metadata: &[(&str, MetaValue)],
    specs: &[GgufSpec],
) -> std::result::Result<Vec<u8>, String> {
    fn string(out: &mut Vec<u8>, s: &str) {
        out.extend((s.len() as u64).to_le_bytes());
        out.extend(s.as_bytes());
    }
    let mut out = b"GGUF".to_vec();
    out.extend(3u32.to_le_bytes());
    out.extend((specs.len() as u64).to_le_bytes());
    out.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        string(&mut out, key);
        match value {
            MetaValue::String(s) => {
                out.extend(8u32.to_le_bytes());
                string(&mut out, s);
            }
            MetaValue::U32(v) => {
                out.extend(4u32.to_le_bytes());
                out.extend(v.to_le_bytes());
            }
        }
    }
    let mut offset = 0usize;
    for spec in specs {
        string(&mut out, &spec.name);
        out.extend((spec.shape.len() as u32).to_le_bytes());
        for d in spec.shape.iter().rev() {
            out.extend((*d as u64).to_le_bytes());
        }
        let id = ggml_type_id(spec.dtype)
            .ok_or_else(|| format!("tensor {}: zlora writes no {:?}", spec.name, spec.dtype))?;
        out.extend(id.to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offset += spec.bytes() + padding(spec.bytes());
    }
    out.resize(out.len() + padding(out.len()), 0);
    Ok(out)
}

/// GGML's type ids (ggml.h) of the types zlora writes.
fn ggml_type_id(dtype: GgmlDType) -> Option<u32> {
    Some(match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::BF16 => 30,
        _ => return None,
    })
}

/// The standard metadata of a Z-Image GGUF, as ComfyUI-GGUF's converter and llama.cpp's
/// quantizer write it.
pub fn zimage_metadata(file_type: u32) -> Vec<(&'static str, MetaValue)> {
    vec![
        (
            "general.architecture",
            MetaValue::String(ARCHITECTURE.into()),
        ),
        (
            "general.quantization_version",
            MetaValue::U32(QUANTIZATION_VERSION),
        ),
        ("general.file_type", MetaValue::U32(file_type)),
    ]
}

/// llama.cpp's `general.file_type` of a file whose quantized tensors are all of one type (the
/// `_S` variants for the k-quants: the `_M` ones mix types).
fn file_type(g: GgmlDType) -> u32 {
    match g {
        GgmlDType::Q8_0 => 7,
        GgmlDType::Q4K => 14,
        GgmlDType::Q5K => 16,
        // Q6K, the one other type a `Quantization` has.
        _ => 18,
    }
}

/// One tensor of a Z-Image GGUF: its ComfyUI name and the canonical tensors whose rows it
/// holds, in order (q, k and v for a fused qkv; one otherwise).
struct Planned {
    spec: GgufSpec,
    parts: Vec<String>,
}

/// Writes `checkpoint` as a GGUF in ComfyUI-GGUF's Z-Image layout, every block Linear's
/// weight (the weights `--quantize` stores quantized) as `q` and every other tensor in a float
/// type as ComfyUI-GGUF's converter keeps it: F32 for 1-D and small (≤ 1024 values) tensors,
/// else the stored f32, bf16 or f16. One tensor is in memory at a time; `progress(done,
/// total)` after each.
pub fn quantize_transformer(
    checkpoint: &TransformerCheckpoint,
    q: Quantization,
    out: &Path,
    overwrite: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<()> {
    let Some(g) = q.ggml() else {
        return Err(Error::Invalid(format!(
            "{q} has no GGUF type: use q8_0, q6_k, q5_k or q4_k"
        )));
    };
    crate::fsutil::check_new(out, overwrite)?;
    crate::fsutil::check_writable(out)?;
    if checkpoint.is_quantized() {
        return Err(Error::bad_file(
            &checkpoint.files()[0],
            "is stored quantized already: quantize a dense (f32, bf16 or f16) checkpoint",
        ));
    }
    let cfg = checkpoint.config()?;
    checkpoint.check(&cfg)?;
    ZImageTransformer::check_quantization(&cfg, q).map_err(Error::Invalid)?;
    let plan = plan(checkpoint, g)?;
    let specs: Vec<GgufSpec> = plan.iter().map(|p| p.spec.clone()).collect();
    let metadata = zimage_metadata(file_type(g));
    write_gguf(out, &metadata, &specs, overwrite, |i| {
        let parts = plan[i]
            .parts
            .iter()
            .map(|name| checkpoint.tensor(name))
            .collect::<Result<Vec<_>>>()?;
        let t = Tensor::cat(&parts, 0).map_err(Error::from)?;
        // F32, F16 and BF16 "quantize" to their own bytes.
        let encoded = QTensor::quantize(&t, plan[i].spec.dtype)?;
        progress(i + 1, plan.len());
        Ok(encoded)
    })
}

/// The file's tensors, sorted by name, with their types.
fn plan(checkpoint: &TransformerCheckpoint, g: GgmlDType) -> Result<Vec<Planned>> {
    let mut grouped: BTreeMap<String, Vec<(usize, String)>> = BTreeMap::new();
    for name in checkpoint.shapes().keys() {
        let (comfy, third) = comfy_tensor_name(name);
        grouped
            .entry(comfy)
            .or_default()
            .push((third.unwrap_or(0), name.clone()));
    }
    let shapes = checkpoint.shapes();
    grouped
        .into_iter()
        .map(|(comfy, mut parts)| {
            parts.sort();
            let parts: Vec<String> = parts.into_iter().map(|(_, n)| n).collect();
            let mut shape = shapes[&parts[0]].clone();
            shape[0] *= parts.len();
            let dtype = if is_block_linear_weight(&parts[0]) {
                g
            } else {
                float_type(&shape, checkpoint.dtype(&parts[0])?)
            };
            Ok(Planned {
                spec: GgufSpec {
                    name: comfy,
                    shape,
                    dtype,
                },
                parts,
            })
        })
        .collect()
}

/// ComfyUI-GGUF's converter: F32 for 1-D and tiny tensors, else the stored float type.
fn float_type(shape: &[usize], stored: DType) -> GgmlDType {
    const SMALL: usize = 1024;
    if shape.len() == 1 || shape.iter().product::<usize>() <= SMALL {
        return GgmlDType::F32;
    }
    match stored {
        DType::BF16 => GgmlDType::BF16,
        DType::F16 => GgmlDType::F16,
        _ => GgmlDType::F32,
    }
}

/// Whether a canonical name is the weight of a block Linear (`layers.3.attention.to_q.weight`).
fn is_block_linear_weight(name: &str) -> bool {
    let mut segments = name.splitn(3, '.');
    let (Some(stack), Some(index), Some(rest)) =
        (segments.next(), segments.next(), segments.next())
    else {
        return false;
    };
    STACKS.contains(&stack)
        && index.parse::<usize>().is_ok()
        && rest
            .strip_suffix(".weight")
            .is_some_and(|linear| BLOCK_LINEARS.contains(&linear))
}
