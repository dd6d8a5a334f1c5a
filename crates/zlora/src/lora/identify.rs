//! What a LoRA file is for, from its key names and shapes alone (no tensor data).
//!
//! Prefixes are shared between families (`diffusion_model.` and `lora_unet_` are used by
//! Z-Image, FLUX, Lumina2, Wan, Qwen-Image), so [`identify`] classifies by module path pattern
//! and, where names coincide (Lumina-Image 2.0 uses exactly ComfyUI's Z-Image names), by the
//! width of the down matrices. Header metadata (`ss_base_model_version`,
//! `modelspec.architecture`) is only a fallback: converters copy it around.
//! [`unsupported_algorithm`] and [`text_encoder_keys`] find content zlora cannot apply.

use std::collections::BTreeMap;
use std::fmt;

use super::names::{self, Role, Target};

/// A model family a LoRA file can target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    ZImage,
    Lumina2,
    Sd1,
    Sd2,
    Sdxl,
    Flux1,
    Sd3,
    QwenImage,
    Wan,
    HunyuanVideo,
    /// No key or metadata matched any known family.
    Unknown,
}

impl fmt::Display for Architecture {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Architecture::ZImage => "Z-Image",
            Architecture::Lumina2 => "Lumina-Image 2.0",
            Architecture::Sd1 => "Stable Diffusion 1.x",
            Architecture::Sd2 => "Stable Diffusion 2.x",
            Architecture::Sdxl => "SDXL",
            Architecture::Flux1 => "FLUX.1",
            Architecture::Sd3 => "SD3",
            Architecture::QwenImage => "Qwen-Image",
            Architecture::Wan => "Wan",
            Architecture::HunyuanVideo => "HunyuanVideo",
            Architecture::Unknown => "unknown",
        })
    }
}

/// The verdict with what decided it: a key (plus the shape fact when shapes decided) or a
/// metadata entry. Empty evidence only for [`Architecture::Unknown`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identification {
    pub architecture: Architecture,
    pub evidence: String,
}

/// The Z-Image transformer width; [`identify`] takes it as a parameter so a smaller test model
/// (or a future variant) can be checked with its own width.
pub const ZIMAGE_DIM: usize = 3840;

/// Lumina-Image 2.0's width and fused qkv rows (24 query heads + 2 × 8 kv heads of 96).
const LUMINA2_DIM: usize = 2304;
const LUMINA2_QKV_ROWS: usize = 3840;

/// Prefixes stripped before pattern matching, so `lora_unet_double_blocks_0` and
/// `diffusion_model.double_blocks.0` look alike.
const FAMILY_PREFIXES: [&str; 11] = [
    "base_model.model.",
    "model.diffusion_model.",
    "diffusion_model.",
    "transformer.",
    "unet.",
    "lora_unet_",
    "lora_te1_",
    "lora_te2_",
    "lora_te3_",
    "lora_te_",
    "lycoris_",
];

/// One key as the rules see it.
struct KeyView<'a> {
    key: &'a str,
    /// Key without family prefix, `.` replaced by `_`.
    norm: String,
    /// Key without family prefix, as written.
    raw: &'a str,
    role: Option<Role>,
    shape: &'a [usize],
}

impl KeyView<'_> {
    /// in_features of a down (A) matrix.
    fn in_dim(&self) -> Option<usize> {
        match (self.role, self.shape) {
            (Some(Role::Down | Role::HadaW1B | Role::HadaW2B), [_, i]) => Some(*i),
            _ => None,
        }
    }

    fn rows(&self) -> Option<usize> {
        match (self.role, self.shape) {
            (Some(Role::Up | Role::HadaW1A | Role::HadaW2A), [o, _]) => Some(*o),
            _ => None,
        }
    }

    fn starts(&self, prefixes: &[&str]) -> bool {
        prefixes.iter().any(|p| self.norm.starts_with(p))
    }

    fn contains(&self, parts: &[&str]) -> bool {
        parts.iter().any(|p| self.norm.contains(p))
    }
}

struct Probe<'a> {
    keys: Vec<KeyView<'a>>,
    metadata: &'a BTreeMap<String, String>,
    dim: usize,
}

impl Probe<'_> {
    fn find(&self, pred: impl Fn(&KeyView) -> bool) -> Option<&KeyView<'_>> {
        self.keys.iter().find(|k| pred(k))
    }
}

type Rule = fn(&Probe) -> Option<Identification>;

/// Most specific first: Lumina2 before Z-Image because it shares Z-Image's names.
const RULES: [Rule; 8] = [
    unet,
    qwen_image,
    hunyuan_video,
    flux_or_sd3,
    wan,
    lumina2,
    zimage,
    metadata_only,
];

/// Names the family of a LoRA given its key → shape map and header metadata; `dim` is the
/// width of the Z-Image model it is meant for ([`ZIMAGE_DIM`] for the released models).
pub fn identify(
    shapes: &BTreeMap<String, Vec<usize>>,
    metadata: &BTreeMap<String, String>,
    dim: usize,
) -> Identification {
    let keys = shapes.iter().map(|(k, s)| view(k, s)).collect();
    let probe = Probe {
        keys,
        metadata,
        dim,
    };
    RULES
        .iter()
        .find_map(|rule| rule(&probe))
        .unwrap_or(Identification {
            architecture: Architecture::Unknown,
            evidence: String::new(),
        })
}

fn view<'a>(key: &'a str, shape: &'a [usize]) -> KeyView<'a> {
    let raw = FAMILY_PREFIXES
        .iter()
        .find_map(|p| key.strip_prefix(p))
        .unwrap_or(key);
    KeyView {
        key,
        norm: raw.replace('.', "_"),
        raw,
        role: names::split_suffix(key).map(|(_, r)| r),
        shape,
    }
}

fn by_key(architecture: Architecture, k: &KeyView) -> Identification {
    Identification {
        architecture,
        evidence: k.key.to_string(),
    }
}

fn by_shape(architecture: Architecture, k: &KeyView, fact: String) -> Identification {
    Identification {
        architecture,
        evidence: format!("{} {fact}", k.key),
    }
}

/// UNet LoRAs. kohya's SGM names (`input_blocks`) exist only for SDXL; diffusers names are
/// told apart by the cross-attention key width (text embedding 768 / 1024 / 2048).
fn unet(p: &Probe) -> Option<Identification> {
    if let Some(k) = p.find(|k| k.starts(&["input_blocks_", "output_blocks_", "middle_block_"])) {
        return Some(by_key(Architecture::Sdxl, k));
    }
    let k = p.find(|k| k.starts(&["down_blocks_", "up_blocks_", "mid_block_"]))?;
    let cross = p.keys.iter().find_map(|k| {
        let d = k.in_dim().filter(|_| k.contains(&["attn2_to_k"]))?;
        Some((k, d))
    });
    if let Some((c, d)) = cross {
        let arch = match d {
            1024 => Architecture::Sd2,
            2048 => Architecture::Sdxl,
            _ => Architecture::Sd1,
        };
        return Some(by_shape(arch, c, format!("has cross-attention in-dim {d}")));
    }
    let te2 = p.find(|k| k.key.starts_with("lora_te2_") || k.key.starts_with("text_encoder_2"));
    let v2 = p.metadata.get("ss_v2").is_some_and(|v| v == "True");
    Some(match (te2, v2) {
        (Some(t), _) => by_key(Architecture::Sdxl, t),
        (None, true) => by_key(Architecture::Sd2, k),
        (None, false) => by_key(Architecture::Sd1, k),
    })
}

fn qwen_image(p: &Probe) -> Option<Identification> {
    let k = p.find(|k| {
        k.starts(&["transformer_blocks_"])
            && k.contains(&["_img_mlp_", "_txt_mlp_", "_img_mod_", "_txt_mod_"])
    })?;
    Some(by_key(Architecture::QwenImage, k))
}

/// HunyuanVideo shares FLUX's block names; only its own module names (diffusion-pipe's
/// `img_attn_qkv`, `img_mlp.fc1`, the token refiner) or metadata tell them apart.
fn hunyuan_video(p: &Probe) -> Option<Identification> {
    let k = p.find(|k| {
        (k.starts(&["double_blocks_", "single_blocks_"])
            && (k.raw.contains(".img_attn_qkv") || k.raw.contains(".txt_attn_qkv")))
            || k.contains(&["_img_mlp_fc", "_txt_mlp_fc", "individual_token_refiner"])
    });
    if let Some(k) = k {
        return Some(by_key(Architecture::HunyuanVideo, k));
    }
    let double = p.find(|k| k.starts(&["double_blocks_", "single_blocks_"]))?;
    let meta =
        metadata_family(p.metadata).filter(|m| m.architecture == Architecture::HunyuanVideo)?;
    Some(Identification {
        architecture: Architecture::HunyuanVideo,
        evidence: format!("{} with {}", double.key, meta.evidence),
    })
}

/// FLUX (BFL, kohya and diffusers names) and SD3 (kohya `joint_blocks`, diffusers MMDiT names
/// that FLUX also uses, separated by FLUX's 3072 width).
fn flux_or_sd3(p: &Probe) -> Option<Identification> {
    let flux = [
        "double_blocks_",
        "single_blocks_",
        "single_transformer_blocks_",
    ];
    if let Some(k) = p.find(|k| k.starts(&flux)) {
        return Some(by_key(Architecture::Flux1, k));
    }
    if let Some(k) = p.find(|k| k.starts(&["joint_blocks_"])) {
        return Some(by_key(Architecture::Sd3, k));
    }
    let mmdit = [
        "_add_q_proj",
        "_add_k_proj",
        "_add_v_proj",
        "_to_add_out",
        "_ff_context_",
    ];
    let k = p.find(|k| k.starts(&["transformer_blocks_"]) && k.contains(&mmdit))?;
    let wide = p.find(|k| k.starts(&["transformer_blocks_"]) && k.in_dim() == Some(3072));
    Some(match wide {
        Some(w) => by_shape(Architecture::Flux1, w, "has in-dim 3072".into()),
        None => by_key(Architecture::Sd3, k),
    })
}

fn wan(p: &Probe) -> Option<Identification> {
    let k = p.find(|k| {
        k.starts(&["blocks_", "_blocks_"])
            && k.contains(&["_self_attn_", "_cross_attn_", "_ffn_", "_attn1_", "_attn2_"])
    })?;
    Some(by_key(Architecture::Wan, k))
}

/// The Z-Image target of a key, if its module name is a Z-Image (or ComfyUI Z-Image) name.
fn zimage_target(k: &KeyView) -> Option<Target> {
    let stem = match names::split_suffix(k.key) {
        Some((stem, _)) => stem,
        // LoKr / LoHa / DoRA keys: the module name is everything before the last segment.
        None => k.key.rsplit_once('.')?.0,
    };
    names::resolve_stem(stem).map(|(_, r)| r.target)
}

fn lumina2(p: &Probe) -> Option<Identification> {
    let stacks = ["layers_", "noise_refiner_", "context_refiner_"];
    let names = ["_adaLN_modulation_1_", "_attn_to_", "_feed_forward_linear_"];
    if let Some(k) = p.find(|k| k.starts(&stacks) && k.contains(&names)) {
        return Some(by_key(Architecture::Lumina2, k));
    }
    if p.dim != LUMINA2_DIM {
        let narrow = p.find(|k| k.in_dim() == Some(LUMINA2_DIM) && input_is_dim(k));
        if let Some(k) = narrow {
            let fact = format!("has in-dim {LUMINA2_DIM} (Z-Image: {})", p.dim);
            return Some(by_shape(Architecture::Lumina2, k, fact));
        }
    }
    if 3 * p.dim != LUMINA2_QKV_ROWS {
        let qkv = p.find(|k| {
            k.rows() == Some(LUMINA2_QKV_ROWS)
                && matches!(zimage_target(k), Some(Target::FusedQkv(_)))
        });
        if let Some(k) = qkv {
            let fact = format!("has {LUMINA2_QKV_ROWS} qkv rows (Z-Image: {})", 3 * p.dim);
            return Some(by_shape(Architecture::Lumina2, k, fact));
        }
    }
    let meta = metadata_family(p.metadata)?;
    (meta.architecture == Architecture::Lumina2).then_some(meta)
}

/// Block modules whose input is the model width (so their down in-dim must equal `dim`).
fn input_is_dim(k: &KeyView) -> bool {
    match zimage_target(k) {
        Some(Target::FusedQkv(_)) => true,
        Some(Target::Module(m)) => [".attention.", ".feed_forward.w1", ".feed_forward.w3"]
            .iter()
            .any(|s| m.contains(s)),
        None => false,
    }
}

fn zimage(p: &Probe) -> Option<Identification> {
    let k = p.find(|k| zimage_target(k).is_some())?;
    Some(by_key(Architecture::ZImage, k))
}

/// Only reached when no key names any family, Z-Image included.
fn metadata_only(p: &Probe) -> Option<Identification> {
    metadata_family(p.metadata)
}

/// Lower-case fragments of `ss_base_model_version` / `modelspec.architecture` values.
const METADATA_FAMILIES: [(&str, Architecture); 16] = [
    ("lumina", Architecture::Lumina2),
    ("hunyuan", Architecture::HunyuanVideo),
    ("z_image", Architecture::ZImage),
    ("zimage", Architecture::ZImage),
    ("z-image", Architecture::ZImage),
    ("qwen", Architecture::QwenImage),
    ("wan", Architecture::Wan),
    ("sdxl", Architecture::Sdxl),
    ("stable-diffusion-xl", Architecture::Sdxl),
    ("sd_v1", Architecture::Sd1),
    ("stable-diffusion-v1", Architecture::Sd1),
    ("sd_v2", Architecture::Sd2),
    ("stable-diffusion-v2", Architecture::Sd2),
    ("sd3", Architecture::Sd3),
    ("stable-diffusion-3", Architecture::Sd3),
    ("flux", Architecture::Flux1),
];

fn metadata_family(meta: &BTreeMap<String, String>) -> Option<Identification> {
    ["ss_base_model_version", "modelspec.architecture"]
        .iter()
        .filter_map(|k| meta.get(*k).map(|v| (k, v)))
        .find_map(|(k, v)| {
            let lower = v.to_lowercase();
            let (_, family) = METADATA_FAMILIES.iter().find(|(f, _)| lower.contains(f))?;
            Some(Identification {
                architecture: *family,
                evidence: format!("metadata {k} = {v}"),
            })
        })
}

/// Adapter algorithms, told apart by tensor names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Algorithm {
    LoRA,
    LoKr,
    LoHa,
    /// Weight-decomposed LoRA (`dora_scale`, ai-toolkit `magnitude`, PEFT
    /// `lora_magnitude_vector`): zlora cannot apply it.
    DoRA,
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Algorithm::LoRA => "LoRA",
            Algorithm::LoKr => "LoKr (LyCORIS)",
            Algorithm::LoHa => "LoHa (LyCORIS)",
            Algorithm::DoRA => "DoRA (weight-decomposed LoRA)",
        })
    }
}

/// The algorithm a key belongs to; `None` for keys that any algorithm may carry (`alpha`)
/// or that are not adapter keys at all.
pub fn algorithm_of(key: &str) -> Option<Algorithm> {
    let segments: Vec<&str> = key.split('.').collect();
    let has = |pred: &dyn Fn(&str) -> bool| segments.iter().any(|s| pred(s));
    if has(&|s| ["dora_scale", "magnitude", "lora_magnitude_vector"].contains(&s)) {
        Some(Algorithm::DoRA)
    } else if has(&|s| s.starts_with("lokr_")) {
        Some(Algorithm::LoKr)
    } else if has(&|s| s.starts_with("hada_")) {
        Some(Algorithm::LoHa)
    } else if has(&|s| s.starts_with("lora_") || s == "lora") {
        Some(Algorithm::LoRA)
    } else {
        None
    }
}

/// How many keys of each algorithm a file has.
pub fn algorithms<'a>(keys: impl IntoIterator<Item = &'a String>) -> BTreeMap<Algorithm, usize> {
    let mut counts = BTreeMap::new();
    for a in keys.into_iter().filter_map(|k| algorithm_of(k)) {
        *counts.entry(a).or_insert(0) += 1;
    }
    counts
}

/// The keys of an algorithm zlora cannot apply (DoRA), if any.
pub fn unsupported_algorithm<'a>(
    keys: impl IntoIterator<Item = &'a String>,
) -> Option<(Algorithm, Vec<&'a str>)> {
    let keys: Vec<&str> = keys
        .into_iter()
        .map(String::as_str)
        .filter(|k| algorithm_of(k) == Some(Algorithm::DoRA))
        .collect();
    (!keys.is_empty()).then_some((Algorithm::DoRA, keys))
}

/// Keys that adapt a text encoder (kohya `lora_te*`, diffusers `text_encoder*`).
pub fn text_encoder_keys<'a>(keys: impl IntoIterator<Item = &'a String>) -> Vec<&'a str> {
    keys.into_iter()
        .map(String::as_str)
        .filter(|k| k.starts_with("lora_te") || k.starts_with("text_encoder"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arch(keys: &[(&str, &[usize])]) -> Architecture {
        let shapes = keys
            .iter()
            .map(|(k, s)| (k.to_string(), s.to_vec()))
            .collect();
        identify(&shapes, &BTreeMap::new(), ZIMAGE_DIM).architecture
    }

    #[test]
    fn families_by_key_pattern() {
        let cases: [(&str, Architecture); 12] = [
            (
                "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
                Architecture::Sdxl,
            ),
            (
                "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
                Architecture::Sd1,
            ),
            (
                "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
                Architecture::Flux1,
            ),
            (
                "diffusion_model.single_blocks.0.linear1.lora_A.weight",
                Architecture::Flux1,
            ),
            (
                "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight",
                Architecture::Flux1,
            ),
            (
                "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight",
                Architecture::Sd3,
            ),
            (
                "transformer_blocks.0.img_mlp.net.0.proj.lora_A.weight",
                Architecture::QwenImage,
            ),
            (
                "diffusion_model.blocks.0.self_attn.q.lora_A.weight",
                Architecture::Wan,
            ),
            (
                "lora_unet__blocks_0_cross_attn_k.lora_down.weight",
                Architecture::Wan,
            ),
            (
                "double_blocks.0.img_attn_qkv.lora_A.weight",
                Architecture::HunyuanVideo,
            ),
            (
                "diffusion_model.layers.0.adaLN_modulation.1.lora_A.weight",
                Architecture::Lumina2,
            ),
            (
                "lora_unet_layers_0_feed_forward_w1.lora_down.weight",
                Architecture::ZImage,
            ),
        ];
        for (key, want) in cases {
            assert_eq!(arch(&[(key, &[4, 8])]), want, "{key}");
        }
    }

    #[test]
    fn shapes_separate_lookalikes() {
        let sd2 =
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight";
        assert_eq!(arch(&[(sd2, &[4, 1024])]), Architecture::Sd2);
        let q = "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight";
        assert_eq!(arch(&[(q, &[4, 3072])]), Architecture::Flux1);
        assert_eq!(arch(&[(q, &[4, 1536])]), Architecture::Sd3);
        let qkv_up = "diffusion_model.layers.0.attention.qkv.lora_B.weight";
        assert_eq!(arch(&[(qkv_up, &[3840, 4])]), Architecture::Lumina2);
        assert_eq!(arch(&[(qkv_up, &[11520, 4])]), Architecture::ZImage);
        let lokr = "diffusion_model.layers.0.attention.to_q.lokr_w1";
        assert_eq!(arch(&[(lokr, &[60, 60])]), Architecture::ZImage);
    }

    #[test]
    fn metadata_is_a_fallback() {
        let meta = BTreeMap::from([("ss_base_model_version".into(), "sdxl_base_v1-0".into())]);
        let shapes = BTreeMap::from([("foo.weight".to_string(), vec![1])]);
        let id = identify(&shapes, &meta, ZIMAGE_DIM);
        assert_eq!(id.architecture, Architecture::Sdxl);
        assert!(id.evidence.contains("sdxl_base_v1-0"));
    }

    #[test]
    fn algorithms_and_text_encoders() {
        let keys: Vec<String> = [
            "a.lora_A.weight",
            "b.hada_w1_a",
            "c.dora_scale",
            "d.lokr_w2",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            unsupported_algorithm(&keys),
            Some((Algorithm::DoRA, vec!["c.dora_scale"]))
        );
        assert_eq!(unsupported_algorithm(&keys[..2]), None);
        let counts = algorithms(&keys);
        assert_eq!(counts.get(&Algorithm::LoKr), Some(&1));
        assert_eq!(counts.get(&Algorithm::LoRA), Some(&1));
        let te: Vec<String> = vec![
            "lora_te1_x.alpha".into(),
            "text_encoder.y".into(),
            "z".into(),
        ];
        assert_eq!(text_encoder_keys(&te).len(), 2);
    }
}
