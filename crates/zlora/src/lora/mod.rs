//! Reading Z-Image LoRA files into one canonical form and attaching them to a model; the
//! submodules write that form in any layout ([`write`]), describe files ([`inspect`],
//! [`identify()`]) and combine several ([`combine`]). docs/lora-files.md is the user's view.
//!
//! # Canonical form
//!
//! [`LoraFile::read`] turns any supported file into a [`LoraFile`] whose `modules` map a
//! diffusers module path (`layers.3.attention.to_q`, `noise_refiner.0.feed_forward.w2`,
//! `all_final_layer.2-1.linear`, ...) to a [`LoraModule`]: the adapter factors
//! ([`AdapterWeights`]: LoRA `down` A `[rank, in]` / `up` B `[out, rank]`, LyCORIS LoKr or
//! LoHa), f32 on the CPU, and `scale` = alpha / rank, so that the weight delta is
//! `weights.delta() · scale` whatever the producer. The header's `__metadata__` is kept
//! verbatim (informational only: nothing that changes the math is read from it except the
//! PEFT alpha below).
//!
//! # Layouts ([`Layout`])
//!
//! | layout | key example | alpha |
//! |---|---|---|
//! | ai-toolkit | `diffusion_model.layers.0.attention.to_q.lora_A.weight` | none ⇒ scale 1 |
//! | diffusers / PEFT | `transformer.layers.0.attention.to_q.lora_B.weight` | header `lora_adapter_metadata` JSON (`transformer.lora_alpha`, `transformer.r`, `alpha_pattern`, `rank_pattern`, `use_rslora`); none ⇒ alpha = rank |
//! | DiffSynth-Studio | `layers.0.attention.to_q.lora_A.default.weight` | none ⇒ scale 1 |
//! | kohya / musubi | `lora_unet_layers_0_attention_to_q.lora_down.weight` | 0-dim `.alpha` tensor |
//! | ComfyUI fused | `diffusion_model.layers.0.attention.qkv.lora_up.weight`, `lora_unet_layers_0_attention_out...` | optional `.alpha` |
//!
//! LyCORIS LoKr (`lokr_w1` or `lokr_w1_a/_b`, `lokr_w2` or `lokr_w2_a/_b`) and LoHa
//! (`hada_w1_a/_b`, `hada_w2_a/_b`) tensors are read under any of these prefixes.
//!
//! A `.alpha` tensor is honoured next to any layout (scale = alpha / rank with rank =
//! `down.shape[0]`, LoHa `hada_w1_b.shape[0]`, LoKr the rank of the decomposed factor; a LoKr
//! whose factors are both full has scale 1) and takes precedence over the header. Underscore names are resolved by
//! lookup against the enumerated Z-Image modules, not by replacing underscores. A fused
//! `attention.qkv` is split exactly: to_q / to_k / to_v each get the shared down matrix and
//! their third of the up rows (LoKr: of w1's rows; LoHa: of both products), with the fused
//! scale; `attention.out` becomes
//! `attention.to_out.0`.
//!
//! # Refusals
//!
//! Every refusal is an error naming the file: unreadable or forged safetensors headers, keys
//! that map to no Z-Image module (all listed), half pairs, rank mismatches, DoRA adapters,
//! text-encoder adapters, and LoRAs for other architectures ([`identify()`] names
//! them with the key that gave them away).

pub mod combine;
mod container;
pub mod identify;
pub mod inspect;
mod layout;
mod names;
mod peft;
pub mod write;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{IndexOp, Tensor};

use crate::nn::{Adapter, AdapterWeights, Factor, LinearTargets};
use crate::{Error, Result};
use container::Header;
use identify::{
    identify, text_encoder_keys, unsupported_algorithm, Architecture, Identification, ZIMAGE_DIM,
};
use layout::Group;
pub use layout::Layout;
use names::{Role, Target, QKV_PARTS};
use peft::PeftConfig;

/// One adapted Linear: `delta_W = weights.delta() · scale`.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// The factors, f32 on the CPU (LoRA down [rank, in] / up [out, rank], LoKr, LoHa).
    pub weights: AdapterWeights,
    /// alpha / rank as the producer's algorithm defines it (1 when the file carries no alpha).
    pub scale: f64,
    /// The file's key for this module without its suffix, e.g.
    /// `lora_unet_layers_0_attention_to_q` or, for a split qkv, `...attention.qkv`.
    pub source_key: String,
}

impl LoraModule {
    /// (out_features, in_features) of the Linear this module adapts; an error if the factors
    /// do not compose (the fields are public).
    pub fn shape(&self) -> Result<(usize, usize)> {
        Ok(self.weights.shape()?)
    }

    /// The dense weight delta `weights.delta() · scale`, f32 [out, in].
    pub fn delta(&self) -> Result<Tensor> {
        Ok((self.weights.delta()? * self.scale)?)
    }
}

/// A LoRA file in canonical form (see the module documentation).
#[derive(Debug, Clone)]
pub struct LoraFile {
    pub path: PathBuf,
    pub layout: Layout,
    /// The safetensors `__metadata__` map.
    pub metadata: BTreeMap<String, String>,
    /// Keyed by diffusers module path.
    pub modules: BTreeMap<String, LoraModule>,
}

/// A file's safetensors header alone: what [`identify::identify`] needs to name a file that
/// [`LoraFile::read`] refuses (a foreign architecture, LoKr), with no tensor decoded.
#[derive(Debug, Clone)]
pub struct LoraHeader {
    pub metadata: BTreeMap<String, String>,
    /// Key → shape, as validated against the data region.
    pub shapes: BTreeMap<String, Vec<usize>>,
    /// Key → stored dtype (F32, F16 or BF16; the reader refuses any other).
    pub dtypes: BTreeMap<String, candle_core::DType>,
}

impl LoraHeader {
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = crate::fsutil::read_regular(path)?;
        Self::from_bytes(path, &bytes)
    }

    /// The header of the safetensors image `bytes` (`path` names it in errors).
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self> {
        let header = container::parse(path, bytes)?;
        Ok(LoraHeader {
            shapes: header.shapes(),
            dtypes: header
                .entries
                .iter()
                .map(|(k, e)| (k.clone(), e.dtype))
                .collect(),
            metadata: header.metadata,
        })
    }
}

/// Whether `path` (a diffusers module path) is a Linear a LoRA can adapt.
pub fn is_linear(path: &str) -> bool {
    names::resolve(path, '.').is_some_and(|r| !r.comfy)
}

/// At most this many items are spelled out in one error message.
const LISTED: usize = 20;

/// Sorted, comma-separated, capped at [`LISTED`] items with a count of the rest.
pub(crate) fn listing(mut items: Vec<String>) -> String {
    items.sort();
    let rest = items.len().saturating_sub(LISTED);
    items.truncate(LISTED);
    let mut text = items.join(", ");
    if rest > 0 {
        text.push_str(&format!(" and {rest} more"));
    }
    text
}

/// True when every element of `t` is finite (no NaN, no ±inf).
pub fn all_finite(t: &Tensor) -> Result<bool> {
    Ok(nonfinite_count(t)? == 0)
}

/// How many elements of `t` are NaN or ±inf.
pub fn nonfinite_count(t: &Tensor) -> Result<usize> {
    let values = t
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(values.iter().filter(|v| !v.is_finite()).count())
}

impl LoraFile {
    /// The modules holding NaN or inf (in a factor or in alpha / scale), with how many
    /// non-finite values each has; empty for a sound file.
    pub fn nonfinite(&self) -> Result<BTreeMap<String, usize>> {
        let mut found = BTreeMap::new();
        for (path, module) in &self.modules {
            let mut n = usize::from(!module.scale.is_finite());
            for t in module.weights.tensors() {
                n += nonfinite_count(t)?;
            }
            if n > 0 {
                found.insert(path.clone(), n);
            }
        }
        Ok(found)
    }

    /// An error naming how many NaN / inf values the file holds and where; Ok for a sound
    /// file. Commands that apply or rewrite LoRAs call this unless told `--allow-nonfinite`.
    pub fn check_finite(&self) -> Result<()> {
        let found = self.nonfinite()?;
        if found.is_empty() {
            return Ok(());
        }
        Err(Error::lora(&self.path, nonfinite_message(&found)))
    }
}

/// "N NaN/inf values in K modules: …".
pub fn nonfinite_message(found: &BTreeMap<String, usize>) -> String {
    let total: usize = found.values().sum();
    let modules = found.iter().map(|(p, n)| format!("{p} ({n})")).collect();
    format!(
        "{total} NaN/inf values in {} modules: {} (pass --allow-nonfinite to use it anyway)",
        found.len(),
        listing(modules)
    )
}

impl LoraFile {
    /// Reads a LoRA for the released Z-Image models (width [`ZIMAGE_DIM`]).
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        Self::read_for_dim(path, ZIMAGE_DIM)
    }

    /// Reads a LoRA for a Z-Image model of width `dim` (used to tell Lumina2 files apart).
    pub fn read_for_dim(path: impl AsRef<Path>, dim: usize) -> Result<Self> {
        let path = path.as_ref();
        let bytes = crate::fsutil::read_regular(path)?;
        Self::from_bytes(path, &bytes, dim)
    }

    /// Reads the safetensors image `bytes`; `path` only names the file in errors and becomes
    /// [`Self::path`]. Never panics, whatever the bytes (this is the fuzzing entry point).
    pub fn from_bytes(path: &Path, bytes: &[u8], dim: usize) -> Result<Self> {
        let header = container::parse(path, bytes)?;
        let shapes = header.shapes();
        let refuse = |msg: String| Error::lora(path, msg);
        let id = identify(&shapes, &header.metadata, dim);
        if let Some(r) = refusal(&shapes, &header.metadata, &id) {
            return Err(refuse(r.message().to_string()));
        }
        let peft = PeftConfig::from_metadata(&header.metadata).map_err(refuse)?;
        let (layout, groups) = layout::plan(&shapes).map_err(refuse)?;
        let source = Source {
            path,
            bytes,
            header: &header,
            peft,
        };
        let mut modules = BTreeMap::new();
        for group in &groups {
            modules.extend(source.modules(group)?);
        }
        Ok(LoraFile {
            path: path.to_path_buf(),
            layout,
            metadata: header.metadata,
            modules,
        })
    }

    /// The adapter name: the file name without extension.
    pub fn name(&self) -> String {
        self.path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Pushes one enabled adapter (named [`Self::name`]) per module onto `model`'s Linears,
    /// placed on the model's device and compute dtype, and returns how many. All modules are checked first; if any is missing from the model
    /// or has another shape, the error lists them all and nothing is attached.
    pub fn attach(&self, strength: f64, model: &mut impl LinearTargets) -> Result<usize> {
        self.attach_named(&self.name(), strength, model)
    }

    /// [`Self::attach`] under another adapter name (e.g. the frozen training adapter, which
    /// the trainer switches off by name for samples).
    pub fn attach_named(
        &self,
        name: &str,
        strength: f64,
        model: &mut impl LinearTargets,
    ) -> Result<usize> {
        if !strength.is_finite() {
            return Err(Error::Invalid(format!(
                "LoRA strength {strength} is not finite"
            )));
        }
        let misfits: Vec<String> = self
            .modules
            .iter()
            .filter_map(|(path, m)| misfit(path, m, model.linear_mut(path).map(|l| l.shape())))
            .collect();
        if !misfits.is_empty() {
            let n = misfits.len();
            let msg = format!(
                "modules that do not fit the model ({n}), nothing attached: {}",
                listing(misfits)
            );
            return Err(Error::lora(&self.path, msg));
        }
        // The one place where a file's tensors (read on the CPU, in f32) enter a model.
        let (device, dtype) = model.placement();
        for (path, m) in &self.modules {
            let adapter = Adapter {
                name: name.to_string(),
                weights: m.weights.placed(&device, dtype)?,
                scale: m.scale,
                strength,
                enabled: true,
            };
            // Both branches are unreachable after the check above, which asked this very
            // Linear for its shape; they stay errors rather than panics.
            let linear = model.linear_mut(path).ok_or_else(|| {
                Error::lora(&self.path, format!("{path} vanished from the model"))
            })?;
            linear
                .push_adapter(adapter)
                .map_err(|e| Error::lora(&self.path, format!("{path}: {e}")))?;
        }
        Ok(self.modules.len())
    }
}

/// Why module `m` at `path` cannot go onto a Linear of shape `linear` (None: absent).
///
/// The check asks the model's `linear_mut` rather than `linear_shapes` because that is the
/// Linear `push_adapter` will validate against, so a check that passes cannot be followed by
/// a failed push halfway through.
fn misfit(path: &str, m: &LoraModule, linear: Option<(usize, usize)>) -> Option<String> {
    let lora = match m.shape() {
        Ok(s) => s,
        Err(e) => return Some(format!("{path} ({e})")),
    };
    match linear {
        None => Some(format!("{path} (not in the model)")),
        Some(s) if s != lora => Some(format!(
            "{path} (LoRA [{}, {}], model [{}, {}])",
            lora.0, lora.1, s.0, s.1
        )),
        Some(_) => None,
    }
}

/// Why a file cannot be applied, as far as its header alone tells.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Refusal {
    /// Another model family, a text-encoder LoRA, or no tensors at all.
    NotZImage(String),
    /// An algorithm zlora cannot apply (DoRA).
    Unsupported(String),
    /// Transformer adapters mixed with content zlora cannot apply.
    Content(String),
}

impl Refusal {
    pub(crate) fn message(&self) -> &str {
        match self {
            Refusal::NotZImage(m) | Refusal::Unsupported(m) | Refusal::Content(m) => m,
        }
    }
}

/// Refuses files that are not plain Z-Image transformer LoRAs, before any data is decoded.
pub(crate) fn refusal(
    shapes: &BTreeMap<String, Vec<usize>>,
    metadata: &BTreeMap<String, String>,
    id: &Identification,
) -> Option<Refusal> {
    if shapes.is_empty() {
        return Some(Refusal::NotZImage("contains no tensors".into()));
    }
    if !matches!(
        id.architecture,
        Architecture::ZImage | Architecture::Unknown
    ) {
        return Some(Refusal::NotZImage(format!(
            "this is a {} LoRA, not a Z-Image LoRA (evidence: {})",
            id.architecture, id.evidence
        )));
    }
    let te: Vec<String> = text_encoder_keys(shapes.keys())
        .into_iter()
        .map(String::from)
        .collect();
    if !te.is_empty() {
        let all = te.len() == shapes.len();
        let msg = format!(
            "{}; only Z-Image transformer LoRAs are supported (text-encoder keys ({}): {})",
            if all {
                "is a text-encoder LoRA"
            } else {
                "mixes text-encoder and transformer adapters"
            },
            te.len(),
            listing(te)
        );
        return Some(if all {
            Refusal::NotZImage(msg)
        } else {
            Refusal::Content(msg)
        });
    }
    if let Some((algorithm, keys)) = unsupported_algorithm(shapes.keys()) {
        let keys = keys.into_iter().map(String::from).collect();
        return Some(Refusal::Unsupported(format!(
            "{algorithm} adapters are not supported yet: {}",
            listing(keys)
        )));
    }
    peft::declares_dora(metadata).then(|| {
        Refusal::Unsupported(
            "DoRA (weight-decomposed LoRA) adapters are not supported yet (header \
             lora_adapter_metadata has use_dora = true)"
                .into(),
        )
    })
}

/// The decoded file while its modules are built.
struct Source<'a> {
    path: &'a Path,
    bytes: &'a [u8],
    header: &'a Header,
    peft: Option<PeftConfig>,
}

impl Source<'_> {
    fn tensor(&self, key: &str) -> Result<Tensor> {
        let entry = self.header.entries.get(key).ok_or_else(|| {
            Error::lora(self.path, format!("tensor {key} vanished from the header"))
        })?;
        container::tensor(self.path, self.bytes, key, entry)
    }

    fn matrix(&self, g: &Group, role: Role) -> Result<Tensor> {
        let key = g.key(role).ok_or_else(|| {
            Error::lora(self.path, format!("{}: no {} tensor", g.stem, role.name()))
        })?;
        self.tensor(key)
    }

    /// A LoKr factor: the full matrix when the file has it, else the product of its halves.
    fn factor(&self, g: &Group, full: Role, a: Role, b: Role) -> Result<Factor> {
        Ok(match g.key(full) {
            Some(_) => Factor::Full(self.matrix(g, full)?),
            None => Factor::Product(self.matrix(g, a)?, self.matrix(g, b)?),
        })
    }

    /// The adapter factors of one group (`plan` checked that its roles form one set).
    fn weights(&self, g: &Group) -> Result<AdapterWeights> {
        Ok(if g.key(Role::Down).is_some() {
            AdapterWeights::LowRank {
                down: self.matrix(g, Role::Down)?,
                up: self.matrix(g, Role::Up)?,
            }
        } else if g.key(Role::HadaW1A).is_some() {
            AdapterWeights::Hadamard {
                w1: Factor::Product(
                    self.matrix(g, Role::HadaW1A)?,
                    self.matrix(g, Role::HadaW1B)?,
                ),
                w2: Factor::Product(
                    self.matrix(g, Role::HadaW2A)?,
                    self.matrix(g, Role::HadaW2B)?,
                ),
            }
        } else {
            AdapterWeights::Kronecker {
                w1: self.factor(g, Role::LokrW1, Role::LokrW1A, Role::LokrW1B)?,
                w2: self.factor(g, Role::LokrW2, Role::LokrW2A, Role::LokrW2B)?,
            }
        })
    }

    /// The canonical module(s) of one group: one, or three for a fused qkv.
    fn modules(&self, g: &Group) -> Result<Vec<(String, LoraModule)>> {
        let weights = self.weights(g)?;
        let scale = self.scale(g, &weights)?;
        let module = |weights: AdapterWeights| LoraModule {
            weights,
            scale,
            source_key: g.stem.clone(),
        };
        match &g.target {
            Target::Module(path) => Ok(vec![(path.clone(), module(weights))]),
            Target::FusedQkv(block) => {
                let parts = weights
                    .split_rows(QKV_PARTS.len())
                    .map_err(|e| Error::lora(self.path, format!("{}: {e}", g.stem)))?;
                let mut out = Vec::new();
                for (part, w) in QKV_PARTS.iter().zip(parts) {
                    if let Some(w) = prune_zero_rank(w)? {
                        out.push((format!("{block}.{part}"), module(w)));
                    }
                }
                Ok(out)
            }
        }
    }

    /// `.alpha` tensor over the algorithm's rank (see [`AdapterWeights::alpha_rank`]), then
    /// the PEFT header (LoRA only), else 1.
    fn scale(&self, g: &Group, weights: &AdapterWeights) -> Result<f64> {
        let rank = weights.alpha_rank();
        if let Some(key) = g.key(Role::Alpha) {
            let alpha = self.tensor(key)?.flatten_all()?.i(0)?.to_scalar::<f32>()?;
            if !alpha.is_finite() {
                return Err(Error::lora(
                    self.path,
                    format!("{key} = {alpha} is not finite"),
                ));
            }
            // A LoKr with two full factors has scale 1 whatever its alpha (LyCORIS, ComfyUI).
            return Ok(rank.map_or(1.0, |r| f64::from(alpha) / r as f64));
        }
        match (&self.peft, weights, rank) {
            (Some(config), AdapterWeights::LowRank { .. }, Some(rank)) => config
                .scale(&g.target.path(), rank)
                .map_err(|e| Error::lora(self.path, e)),
            _ => Ok(1.0),
        }
    }
}

/// Drops the rank components of a LoRA whose up column is all zero, which changes nothing in
/// its delta: the block-diagonal fused qkv ComfyUI and musubi write splits back into parts of
/// their own rank, and a part that is all zero disappears (`None`).
fn prune_zero_rank(w: AdapterWeights) -> Result<Option<AdapterWeights>> {
    let AdapterWeights::LowRank { down, up } = &w else {
        return Ok(Some(w));
    };
    let norms = up.abs()?.sum(0)?.to_vec1::<f32>()?;
    let keep: Vec<u32> = (0..norms.len() as u32)
        .filter(|&i| norms[i as usize] != 0.0)
        .collect();
    if keep.len() == norms.len() {
        return Ok(Some(w));
    }
    if keep.is_empty() {
        return Ok(None);
    }
    let idx = Tensor::new(keep.as_slice(), down.device())?;
    Ok(Some(AdapterWeights::LowRank {
        down: down.index_select(&idx, 0)?,
        up: up.index_select(&idx, 1)?,
    }))
}
