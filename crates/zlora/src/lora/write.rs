//! Writing canonical LoRA modules in each producer's layout.
//!
//! | [`Layout`] | keys | alpha |
//! |---|---|---|
//! | [`Layout::AiToolkit`] (default) | `diffusion_model.<module>.lora_A/B.weight` | folded into B, none stored |
//! | [`Layout::DiffusersPeft`] | `transformer.<module>.lora_A/B.weight` | folded into B; header `lora_adapter_metadata` with `lora_alpha` = `r` per module |
//! | [`Layout::DiffSynth`] | `<module>.lora_A/B.default.weight` | folded into B |
//! | [`Layout::Kohya`] (musubi) | `lora_unet_<module with . → _>.lora_down/up.weight` | `.alpha` = scale · rank (f32), factors as they are |
//! | [`Layout::ComfyFused`] | `diffusion_model.<ComfyUI module>.lora_down/up.weight`, q/k/v fused | folded into B |
//!
//! The default is the layout that loads without warnings in ComfyUI, diffusers,
//! stable-diffusion.cpp, DiffSynth and ai-toolkit (reference §7): ai-toolkit drops any `.alpha`
//! of a LoRA, so alpha is folded into B and none is written.
//!
//! Fusing q/k/v for ComfyUI is exact: A = [A_q; A_k; A_v], B = blockdiag(s_q·B_q, s_k·B_k,
//! s_v·B_v), rank = the sum of the parts' ranks (3r), a missing part gives zero rows.
//!
//! LoKr and LoHa keep LyCORIS tensor names (`lokr_w1`, `hada_w1_a`, ...) under the layout's
//! prefix, their scale folded into w1 and `.alpha` = rank so that every loader's scale is 1
//! (1 for a LoKr with two full factors, whose scale is 1 anyway). diffusers cannot
//! load them, so [`Layout::DiffusersPeft`] refuses them; ComfyUI applies them per q/k/v
//! slice, so [`Layout::ComfyFused`] leaves a block unfused when one of its q/k/v is not LoRA.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::names::{comfy_name, fused_qkv, qkv_part, Role};
use super::{Layout, LoraModule};
use crate::nn::{AdapterWeights, Factor};
use crate::{Error, Result};

/// Informational header entries of a written file (nothing here changes the math).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metadata {
    /// e.g. `Tongyi-MAI/Z-Image-Turbo`; written as `modelspec.base_model`.
    pub base_model: Option<String>,
    /// Written comma-separated as `modelspec.trigger_phrase`.
    pub trigger_words: Vec<String>,
    /// `modelspec.title`.
    pub title: Option<String>,
    /// Other entries kept from a source file (see [`Metadata::carried_from`]).
    pub carried: BTreeMap<String, String>,
}

/// Header keys that must not be copied to a converted file: they describe the old tensors
/// (hashes of the payload, the PEFT config diffusers would apply to the new ones).
const NOT_CARRIED: [&str; 4] = [
    "lora_adapter_metadata",
    "sshs_model_hash",
    "sshs_legacy_hash",
    "format",
];

impl Metadata {
    /// The informational entries of a source file's header, with its base model, trigger
    /// words and title picked up from the `modelspec.*` entries zlora writes.
    pub fn carried_from(header: &BTreeMap<String, String>) -> Self {
        let get = |k: &str| header.get(k).filter(|v| !v.is_empty()).cloned();
        Metadata {
            base_model: get("modelspec.base_model"),
            trigger_words: get("modelspec.trigger_phrase")
                .map(|t| t.split(',').map(|w| w.trim().to_string()).collect())
                .unwrap_or_default(),
            title: get("modelspec.title"),
            carried: header
                .iter()
                .filter(|(k, _)| !NOT_CARRIED.contains(&k.as_str()))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    fn header(&self) -> HashMap<String, String> {
        let mut h: HashMap<String, String> = self.carried.clone().into_iter().collect();
        let software = serde_json::json!({"name": "zlora", "version": env!("CARGO_PKG_VERSION")});
        let fixed = [
            ("format", "pt".to_string()),
            ("modelspec.sai_model_spec", "1.0.0".into()),
            ("modelspec.architecture", "Z-Image/lora".into()),
            (
                "modelspec.implementation",
                "https://github.com/Tongyi-MAI/Z-Image".into(),
            ),
            ("ss_base_model_version", "z_image".into()),
            ("software", software.to_string()),
        ];
        h.extend(fixed.into_iter().map(|(k, v)| (k.to_string(), v)));
        let optional = [
            ("modelspec.base_model", self.base_model.clone()),
            ("modelspec.title", self.title.clone()),
            (
                "modelspec.trigger_phrase",
                (!self.trigger_words.is_empty()).then(|| self.trigger_words.join(", ")),
            ),
        ];
        for (k, v) in optional {
            match v {
                Some(v) => h.insert(k.to_string(), v),
                None => h.remove(k),
            };
        }
        h
    }
}

/// Writes `modules` (canonical form) to `path` in `layout`, matrices in `dtype` (alpha is
/// always f32), atomically; an existing file is an error unless `overwrite`.
pub fn save(
    path: &Path,
    modules: &BTreeMap<String, LoraModule>,
    layout: Layout,
    dtype: DType,
    metadata: &Metadata,
    overwrite: bool,
) -> Result<()> {
    if modules.is_empty() {
        return Err(Error::lora(path, "no modules to write"));
    }
    let tensors = tensors(modules, layout, dtype).map_err(|e| Error::lora(path, e.to_string()))?;
    let mut header = metadata.header();
    if layout == Layout::DiffusersPeft {
        header.insert("lora_adapter_metadata".into(), peft_config(modules)?);
    }
    crate::fsutil::save_safetensors(path, &tensors, Some(header), overwrite)
}

/// The tensors `save` writes, by key.
pub fn tensors(
    modules: &BTreeMap<String, LoraModule>,
    layout: Layout,
    dtype: DType,
) -> Result<BTreeMap<String, Tensor>> {
    for (path, m) in modules {
        m.shape()
            .map_err(|e| Error::Invalid(format!("{path}: {e}")))?;
    }
    let mut out = BTreeMap::new();
    let fused = match layout {
        Layout::ComfyFused => fusable_blocks(modules),
        _ => BTreeMap::new(),
    };
    for (block, parts) in &fused {
        let stem = format!("diffusion_model.{}", fused_qkv(block));
        let (down, up) = fuse_qkv(parts)?;
        lora_tensors(&mut out, &stem, layout, (&down, &up), None, dtype)?;
    }
    for (path, m) in modules {
        let in_fused = qkv_part(path).is_some_and(|(block, _)| fused.contains_key(block));
        if !in_fused {
            module_tensors(&mut out, path, m, layout, dtype)?;
        }
    }
    Ok(out)
}

/// The key of module `path` without suffix in `layout` (unfused spelling).
fn stem(path: &str, layout: Layout) -> String {
    match layout {
        Layout::AiToolkit => format!("diffusion_model.{path}"),
        Layout::DiffusersPeft => format!("transformer.{path}"),
        Layout::DiffSynth => path.to_string(),
        Layout::Kohya => format!("lora_unet_{}", path.replace('.', "_")),
        // q/k/v left unfused keep their diffusers names, which ComfyUI maps to qkv slices.
        Layout::ComfyFused if qkv_part(path).is_some() => format!("diffusion_model.{path}"),
        Layout::ComfyFused => format!("diffusion_model.{}", comfy_name(path)),
    }
}

fn module_tensors(
    out: &mut BTreeMap<String, Tensor>,
    path: &str,
    m: &LoraModule,
    layout: Layout,
    dtype: DType,
) -> Result<()> {
    let stem = stem(path, layout);
    match &m.weights {
        AdapterWeights::LowRank { down, up } => {
            lora_tensors(out, &stem, layout, (down, up), Some(m.scale), dtype)
        }
        AdapterWeights::Kronecker { .. } | AdapterWeights::Hadamard { .. }
            if layout == Layout::DiffusersPeft =>
        {
            Err(Error::Invalid(format!(
                "{path} is a {} adapter, which diffusers cannot load; write it in another layout",
                m.weights.kind()
            )))
        }
        AdapterWeights::Kronecker { w1, w2 } => {
            lycoris_tensors(out, &stem, [w1, w2], LOKR_ROLES, m, dtype)
        }
        AdapterWeights::Hadamard { w1, w2 } => {
            lycoris_tensors(out, &stem, [w1, w2], LOHA_ROLES, m, dtype)
        }
    }
}

/// LyCORIS tensor roles (full, a, b) of w1 and w2; LoHa factors are always products.
type FactorRoles = [(Option<Role>, Role, Role); 2];
const LOKR_ROLES: FactorRoles = [
    (Some(Role::LokrW1), Role::LokrW1A, Role::LokrW1B),
    (Some(Role::LokrW2), Role::LokrW2A, Role::LokrW2B),
];
const LOHA_ROLES: FactorRoles = [
    (None, Role::HadaW1A, Role::HadaW1B),
    (None, Role::HadaW2A, Role::HadaW2B),
];

/// A LoKr or LoHa module: scale folded into w1, alpha such that every loader's scale is 1.
fn lycoris_tensors(
    out: &mut BTreeMap<String, Tensor>,
    stem: &str,
    [w1, w2]: [&Factor; 2],
    roles: FactorRoles,
    m: &LoraModule,
    dtype: DType,
) -> Result<()> {
    lycoris_factor(out, stem, &w1.scaled(m.scale)?, roles[0], dtype)?;
    lycoris_factor(out, stem, w2, roles[1], dtype)?;
    unit_alpha(out, stem, &m.weights)
}

/// A LoRA pair; `scale` is folded into B, except for kohya where it becomes `.alpha`.
/// `None`: the scale is already in the factors (a fused qkv).
fn lora_tensors(
    out: &mut BTreeMap<String, Tensor>,
    stem: &str,
    layout: Layout,
    (down, up): (&Tensor, &Tensor),
    scale: Option<f64>,
    dtype: DType,
) -> Result<()> {
    let (a, b) = match layout {
        Layout::AiToolkit | Layout::DiffusersPeft => (".lora_A.weight", ".lora_B.weight"),
        Layout::DiffSynth => (".lora_A.default.weight", ".lora_B.default.weight"),
        Layout::Kohya | Layout::ComfyFused => (".lora_down.weight", ".lora_up.weight"),
    };
    let up = match (layout, scale) {
        (Layout::Kohya, Some(s)) => {
            let rank = down.dims().first().copied().unwrap_or(1);
            out.insert(format!("{stem}.alpha"), alpha_tensor(s * rank as f64)?);
            up.clone()
        }
        (_, Some(s)) => (up * s)?,
        (_, None) => up.clone(),
    };
    out.insert(format!("{stem}{a}"), down.to_dtype(dtype)?);
    out.insert(format!("{stem}{b}"), up.to_dtype(dtype)?);
    Ok(())
}

/// A LyCORIS factor under the roles (full, a, b); LoHa has no full form.
fn lycoris_factor(
    out: &mut BTreeMap<String, Tensor>,
    stem: &str,
    factor: &Factor,
    (full, a_role, b_role): (Option<Role>, Role, Role),
    dtype: DType,
) -> Result<()> {
    match (factor, full) {
        (Factor::Full(m), Some(role)) => {
            out.insert(format!("{stem}.{}", role.name()), m.to_dtype(dtype)?);
        }
        (Factor::Product(a, b), _) => {
            out.insert(format!("{stem}.{}", a_role.name()), a.to_dtype(dtype)?);
            out.insert(format!("{stem}.{}", b_role.name()), b.to_dtype(dtype)?);
        }
        (Factor::Full(_), None) => {
            return Err(Error::Invalid(format!(
                "{stem}: a LoHa factor must be a product a · b"
            )))
        }
    }
    Ok(())
}

/// `.alpha` = the rank LyCORIS divides by, so the written scale is 1; 1 for a LoKr with two
/// full factors, whose scale is 1 whatever alpha says but whose `.alpha` LyCORIS' own loader
/// requires (it reads such a module as rank 1).
fn unit_alpha(out: &mut BTreeMap<String, Tensor>, stem: &str, w: &AdapterWeights) -> Result<()> {
    let rank = w.alpha_rank().unwrap_or(1);
    out.insert(format!("{stem}.alpha"), alpha_tensor(rank as f64)?);
    Ok(())
}

fn alpha_tensor(alpha: f64) -> Result<Tensor> {
    Ok(Tensor::new(alpha as f32, &Device::Cpu)?)
}

/// Blocks whose q/k/v modules are all LoRA (at least one present): block → [q, k, v].
fn fusable_blocks(
    modules: &BTreeMap<String, LoraModule>,
) -> BTreeMap<String, [Option<&LoraModule>; 3]> {
    let mut blocks: BTreeMap<String, [Option<&LoraModule>; 3]> = BTreeMap::new();
    for (path, m) in modules {
        if let Some((block, i)) = qkv_part(path) {
            blocks.entry(block.to_string()).or_default()[i] = Some(m);
        }
    }
    blocks.retain(|_, parts| {
        parts
            .iter()
            .flatten()
            .all(|m| matches!(m.weights, AdapterWeights::LowRank { .. }))
    });
    blocks
}

/// A = [A_q; A_k; A_v], B = blockdiag(s_q·B_q, s_k·B_k, s_v·B_v); zero rows for a missing
/// part.
fn fuse_qkv(parts: &[Option<&LoraModule>; 3]) -> Result<(Tensor, Tensor)> {
    let lora: Vec<(&Tensor, Tensor)> = parts
        .iter()
        .flatten()
        .map(|m| match &m.weights {
            AdapterWeights::LowRank { down, up } => Ok((down, (up * m.scale)?)),
            _ => Err(Error::Invalid("only LoRA modules are fused".into())),
        })
        .collect::<Result<_>>()?;
    let (rows, _) = lora
        .first()
        .ok_or_else(|| Error::Invalid("no q/k/v module to fuse".into()))?
        .1
        .dims2()?;
    let total_rank = lora
        .iter()
        .map(|(d, _)| Ok(d.dims2()?.0))
        .sum::<Result<usize>>()?;
    let down = Tensor::cat(&lora.iter().map(|(d, _)| *d).collect::<Vec<_>>(), 0)?;
    let mut ups = lora.iter().map(|(_, u)| u);
    let mut offset = 0;
    let mut blocks = Vec::new();
    for part in parts {
        let mut block = Tensor::zeros((rows, total_rank), DType::F32, &Device::Cpu)?;
        // `ups` holds the present parts only, in order: advance it for those alone.
        if let Some(up) = part.and_then(|_| ups.next()) {
            let r = up.dims2()?.1;
            block = block.slice_assign(&[0..rows, offset..offset + r], up)?;
            offset += r;
        }
        blocks.push(block);
    }
    Ok((down, Tensor::cat(&blocks, 0)?))
}

/// The PEFT `LoraConfig` diffusers needs to apply exactly the written (alpha-folded) tensors:
/// `lora_alpha` = `r` for every module, per-module patterns where ranks differ.
fn peft_config(modules: &BTreeMap<String, LoraModule>) -> Result<String> {
    let ranks: BTreeMap<&String, usize> = modules
        .iter()
        .map(|(p, m)| (p, m.weights.alpha_rank().unwrap_or(1)))
        .collect();
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for r in ranks.values() {
        *counts.entry(*r).or_insert(0) += 1;
    }
    let common = counts
        .iter()
        .max_by_key(|(r, n)| (**n, std::cmp::Reverse(**r)))
        .map(|(r, _)| *r)
        .unwrap_or(1);
    let pattern: serde_json::Map<String, serde_json::Value> = ranks
        .iter()
        .filter(|(_, r)| **r != common)
        .map(|(p, r)| (p.to_string(), (*r).into()))
        .collect();
    let targets: Vec<&String> = modules.keys().collect();
    let config = serde_json::json!({
        "transformer.r": common,
        "transformer.lora_alpha": common,
        "transformer.rank_pattern": pattern,
        "transformer.alpha_pattern": pattern,
        "transformer.target_modules": targets,
        "transformer.use_dora": false,
        "transformer.use_rslora": false,
    });
    serde_json::to_string_pretty(&config)
        .map_err(|e| Error::Invalid(format!("cannot encode the PEFT config: {e}")))
}
