//! Reading Z-Image LoRA files into one canonical form and attaching them to a model.
//!
//! # Canonical form
//!
//! [`LoraFile::read`] turns any supported file into a [`LoraFile`] whose `modules` map a
//! diffusers module path (`layers.3.attention.to_q`, `noise_refiner.0.feed_forward.w2`,
//! `all_final_layer.2-1.linear`, ...) to a [`LoraModule`]: `down` (A, `[rank, in]`), `up`
//! (B, `[out, rank]`), both f32 on the CPU, and `scale` = alpha / rank, so that the weight
//! delta is `up · down · scale` whatever the producer. The header's `__metadata__` is kept
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
//! A `.alpha` tensor is honoured next to any layout (scale = alpha / rank with rank =
//! `down.shape[0]`) and takes precedence over the header. Underscore names are resolved by
//! lookup against the enumerated Z-Image modules, not by replacing underscores. A fused
//! `attention.qkv` is split exactly: to_q / to_k / to_v each get the shared down matrix and
//! their third of the up rows, with the fused scale; `attention.out` becomes
//! `attention.to_out.0`.
//!
//! # Refusals
//!
//! Every refusal is an error naming the file: unreadable or forged safetensors headers, keys
//! that map to no Z-Image module (all listed), half pairs, rank mismatches, LoKr / LoHa / DoRA
//! adapters, text-encoder adapters, and LoRAs for other architectures ([`identify()`] names
//! them with the key that gave them away).

mod container;
pub mod identify;
mod layout;
mod names;
mod peft;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{IndexOp, Tensor};

use crate::nn::{Adapter, LinearTargets};
use crate::{Error, Result};
use container::Header;
use identify::{identify, text_encoder_keys, unsupported_algorithm, Architecture, ZIMAGE_DIM};
use layout::Group;
pub use layout::Layout;
use names::{Target, QKV_PARTS};
use peft::PeftConfig;

/// One adapted Linear: `delta_W = up · down · scale`.
#[derive(Debug, Clone)]
pub struct LoraModule {
    /// A: [rank, in_features], f32.
    pub down: Tensor,
    /// B: [out_features, rank], f32.
    pub up: Tensor,
    /// alpha / rank (1 when the file carries no alpha).
    pub scale: f64,
    /// The file's key for this module without its suffix, e.g.
    /// `lora_unet_layers_0_attention_to_q` or, for a split qkv, `...attention.qkv`.
    pub source_key: String,
}

impl LoraModule {
    /// (out_features, in_features) of the Linear this module adapts; an error if `down` and
    /// `up` are not 2-D matrices of the same rank (the fields are public).
    pub fn shape(&self) -> Result<(usize, usize)> {
        let (r_down, inp) = self.down.dims2()?;
        let (out, r_up) = self.up.dims2()?;
        if r_down != r_up {
            return Err(Error::Invalid(format!(
                "LoRA down [{r_down}, {inp}] and up [{out}, {r_up}] differ in rank"
            )));
        }
        Ok((out, inp))
    }

    /// The dense weight delta `up · down · scale`, [out, in].
    pub fn delta(&self) -> Result<Tensor> {
        Ok((self.up.matmul(&self.down)? * self.scale)?)
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
}

impl LoraHeader {
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let header = container::parse(path, &bytes)?;
        Ok(LoraHeader {
            shapes: header.shapes(),
            metadata: header.metadata,
        })
    }
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

impl LoraFile {
    /// Reads a LoRA for the released Z-Image models (width [`ZIMAGE_DIM`]).
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        Self::read_for_dim(path, ZIMAGE_DIM)
    }

    /// Reads a LoRA for a Z-Image model of width `dim` (used to tell Lumina2 files apart).
    pub fn read_for_dim(path: impl AsRef<Path>, dim: usize) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let header = container::parse(path, &bytes)?;
        let shapes = header.shapes();
        let refuse = |msg: String| Error::lora(path, msg);
        check_content(&shapes, &header.metadata, dim).map_err(refuse)?;
        let peft = PeftConfig::from_metadata(&header.metadata).map_err(refuse)?;
        let (layout, groups) = layout::plan(&shapes).map_err(refuse)?;
        let source = Source {
            path,
            bytes: &bytes,
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

    /// Pushes one enabled adapter (named [`Self::name`]) per module onto `model`'s Linears
    /// and returns how many. All modules are checked first; if any is missing from the model
    /// or has another shape, the error lists them all and nothing is attached.
    pub fn attach(&self, strength: f64, model: &mut impl LinearTargets) -> Result<usize> {
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
        let name = self.name();
        for (path, m) in &self.modules {
            let adapter = Adapter {
                name: name.clone(),
                down: m.down.clone(),
                up: m.up.clone(),
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

/// Refuses files that are not plain Z-Image transformer LoRAs, before any data is decoded.
fn check_content(
    shapes: &BTreeMap<String, Vec<usize>>,
    metadata: &BTreeMap<String, String>,
    dim: usize,
) -> std::result::Result<(), String> {
    if shapes.is_empty() {
        return Err("contains no tensors".into());
    }
    let id = identify(shapes, metadata, dim);
    if !matches!(
        id.architecture,
        Architecture::ZImage | Architecture::Unknown
    ) {
        return Err(format!(
            "this is a {} LoRA, not a Z-Image LoRA (evidence: {})",
            id.architecture, id.evidence
        ));
    }
    if let Some((algorithm, keys)) = unsupported_algorithm(shapes.keys()) {
        let keys = keys.into_iter().map(String::from).collect();
        return Err(format!(
            "{algorithm} adapters are not supported yet: {}",
            listing(keys)
        ));
    }
    let te: Vec<String> = text_encoder_keys(shapes.keys())
        .into_iter()
        .map(String::from)
        .collect();
    if !te.is_empty() {
        let what = if te.len() == shapes.len() {
            "is a text-encoder LoRA"
        } else {
            "mixes text-encoder and transformer adapters"
        };
        return Err(format!(
            "{what}; only Z-Image transformer LoRAs are supported (text-encoder keys ({}): {})",
            te.len(),
            listing(te)
        ));
    }
    Ok(())
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

    /// The canonical module(s) of one group: one, or three for a fused qkv.
    fn modules(&self, g: &Group) -> Result<Vec<(String, LoraModule)>> {
        let down = self.tensor(&g.down)?;
        let up = self.tensor(&g.up)?;
        let (rank, _) = down.dims2()?;
        let scale = self.scale(g, rank)?;
        let module = |down: Tensor, up: Tensor| LoraModule {
            down,
            up,
            scale,
            source_key: g.stem.clone(),
        };
        match &g.target {
            Target::Module(path) => Ok(vec![(path.clone(), module(down, up))]),
            Target::FusedQkv(block) => {
                let (rows, _) = up.dims2()?;
                let third = rows / 3;
                QKV_PARTS
                    .iter()
                    .enumerate()
                    .map(|(i, part)| {
                        let up_i = up.i((i * third..(i + 1) * third, ..))?;
                        Ok((format!("{block}.{part}"), module(down.clone(), up_i)))
                    })
                    .collect()
            }
        }
    }

    /// `.alpha` tensor first, then the PEFT header, else 1.
    fn scale(&self, g: &Group, rank: usize) -> Result<f64> {
        if let Some(key) = &g.alpha {
            let alpha = self.tensor(key)?.flatten_all()?.i(0)?.to_scalar::<f32>()?;
            if !alpha.is_finite() {
                return Err(Error::lora(
                    self.path,
                    format!("{key} = {alpha} is not finite"),
                ));
            }
            return Ok(f64::from(alpha) / rank as f64);
        }
        match &self.peft {
            Some(config) => config
                .scale(&g.target.path(), rank)
                .map_err(|e| Error::lora(self.path, e)),
            None => Ok(1.0),
        }
    }
}
