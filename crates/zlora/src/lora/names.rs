//! The key grammar of Z-Image LoRA files: `<prefix><module><suffix>`.
//!
//! Module names are resolved by lookup against the enumerated Z-Image Linear names (both the
//! diffusers and the ComfyUI family), never by turning underscores into dots: `feed_forward`,
//! `adaLN_modulation`, `to_out_0`, `noise_refiner`, `context_refiner` and `all_final_layer`
//! all contain underscores of their own.

use crate::model::dit::{BLOCK_LINEARS as BLOCK_MODULES, STACKS};

/// Linear modules outside the blocks, in diffusers naming.
const GLOBAL_MODULES: [&str; 6] = [
    "all_x_embedder.2-1",
    "all_final_layer.2-1.linear",
    "all_final_layer.2-1.adaLN_modulation.1",
    "t_embedder.mlp.0",
    "t_embedder.mlp.2",
    "cap_embedder.1",
];

/// ComfyUI names that differ from diffusers ones, with their diffusers equivalent.
const COMFY_GLOBALS: [(&str, &str); 3] = [
    ("x_embedder", "all_x_embedder.2-1"),
    ("final_layer.linear", "all_final_layer.2-1.linear"),
    (
        "final_layer.adaLN_modulation.1",
        "all_final_layer.2-1.adaLN_modulation.1",
    ),
];

/// ComfyUI's fused attention input projection; split into these three, in row order.
pub(crate) const QKV_PARTS: [&str; 3] = ["attention.to_q", "attention.to_k", "attention.to_v"];
const COMFY_QKV: &str = "attention.qkv";
const COMFY_OUT: (&str, &str) = ("attention.out", "attention.to_out.0");

/// What a LoRA module name addresses.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Target {
    /// A Linear by its diffusers path, e.g. `layers.3.attention.to_out.0`.
    Module(String),
    /// ComfyUI's fused `attention.qkv` of the block at this path, e.g. `layers.3`.
    FusedQkv(String),
}

impl Target {
    /// The module path as the file spells it in diffusers-style naming (for messages).
    pub fn path(&self) -> String {
        match self {
            Target::Module(p) => p.clone(),
            Target::FusedQkv(block) => fused_qkv(block),
        }
    }
}

/// A resolved module name; `comfy` says it used a name only ComfyUI's family has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Resolved {
    pub target: Target,
    pub comfy: bool,
}

/// How module paths are written after the key prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Prefix {
    /// `diffusion_model.<path>` (ai-toolkit, ComfyUI).
    DiffusionModel,
    /// `transformer.<path>` (diffusers / PEFT, SimpleTuner).
    Transformer,
    /// `lora_unet_<path with . → _>` (kohya, musubi).
    LoraUnet,
    /// `lycoris_<path with . → _>` (LyCORIS wrapper).
    Lycoris,
    /// `<path>` with no prefix (DiffSynth-Studio).
    Bare,
}

const PREFIXES: [(&str, Prefix); 4] = [
    ("diffusion_model.", Prefix::DiffusionModel),
    ("transformer.", Prefix::Transformer),
    ("lora_unet_", Prefix::LoraUnet),
    ("lycoris_", Prefix::Lycoris),
];

impl Prefix {
    /// The separator that replaces `.` inside module paths under this prefix.
    fn sep(self) -> char {
        match self {
            Prefix::LoraUnet | Prefix::Lycoris => '_',
            _ => '.',
        }
    }
}

/// The part of a key after the module name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Role {
    /// LoRA A: [rank, in].
    Down,
    /// LoRA B: [out, rank].
    Up,
    /// 0-dim alpha; scale = alpha / rank.
    Alpha,
    /// LoKr factors: `lokr_w1` or `lokr_w1_a`·`lokr_w1_b`, and the same for w2.
    LokrW1,
    LokrW1A,
    LokrW1B,
    LokrW2,
    LokrW2A,
    LokrW2B,
    /// LoHa products `hada_w1_a`·`hada_w1_b` and `hada_w2_a`·`hada_w2_b`.
    HadaW1A,
    HadaW1B,
    HadaW2A,
    HadaW2B,
}

/// Recognised suffixes: PEFT (`lora_A/B`, optionally with adapter name `default`), kohya
/// (`lora_down/up`), LyCORIS LoKr / LoHa, and the alpha scalar any layout may carry.
const SUFFIXES: [(&str, Role); 17] = [
    (".lora_A.default.weight", Role::Down),
    (".lora_B.default.weight", Role::Up),
    (".lora_A.weight", Role::Down),
    (".lora_B.weight", Role::Up),
    (".lora_down.weight", Role::Down),
    (".lora_up.weight", Role::Up),
    (".alpha", Role::Alpha),
    (".lokr_w1", Role::LokrW1),
    (".lokr_w1_a", Role::LokrW1A),
    (".lokr_w1_b", Role::LokrW1B),
    (".lokr_w2", Role::LokrW2),
    (".lokr_w2_a", Role::LokrW2A),
    (".lokr_w2_b", Role::LokrW2B),
    (".hada_w1_a", Role::HadaW1A),
    (".hada_w1_b", Role::HadaW1B),
    (".hada_w2_a", Role::HadaW2A),
    (".hada_w2_b", Role::HadaW2B),
];

impl Role {
    /// The tensor's name after the module path: kohya spelling for LoRA (`lora_down.weight`,
    /// `lora_up.weight`), LyCORIS names for LoKr / LoHa, `alpha`.
    pub fn name(self) -> &'static str {
        SUFFIXES
            .iter()
            .rev()
            .find(|(_, r)| *r == self)
            .map(|(s, _)| &s[1..])
            .unwrap_or_default()
    }
}

/// The ComfyUI spelling of a diffusers module path (q/k/v excepted: ComfyUI fuses them).
pub(crate) fn comfy_name(path: &str) -> String {
    if let Some((comfy, _)) = COMFY_GLOBALS.iter().find(|(_, d)| *d == path) {
        return comfy.to_string();
    }
    match path.strip_suffix(COMFY_OUT.1) {
        Some(block) => format!("{block}{}", COMFY_OUT.0),
        None => path.to_string(),
    }
}

/// For `<block>.attention.to_q|to_k|to_v`: the block path and the part's index in the fused
/// qkv.
pub(crate) fn qkv_part(path: &str) -> Option<(&str, usize)> {
    QKV_PARTS.iter().enumerate().find_map(|(i, part)| {
        let block = path.strip_suffix(part)?.strip_suffix('.')?;
        Some((block, i))
    })
}

/// The fused qkv module path of a block, e.g. `layers.0.attention.qkv`.
pub(crate) fn fused_qkv(block: &str) -> String {
    format!("{block}.{COMFY_QKV}")
}

/// Splits `key` into its stem (prefix + module) and role, if the suffix is known.
pub(crate) fn split_suffix(key: &str) -> Option<(&str, Role)> {
    SUFFIXES
        .iter()
        .find_map(|(s, role)| key.strip_suffix(s).map(|stem| (stem, *role)))
}

/// Splits a stem into its prefix style and the module name that follows.
pub(crate) fn split_prefix(stem: &str) -> (Prefix, &str) {
    PREFIXES
        .iter()
        .find_map(|(p, kind)| stem.strip_prefix(p).map(|rest| (*kind, rest)))
        .unwrap_or((Prefix::Bare, stem))
}

/// Resolves a stem (prefix + module name) to a Z-Image module.
pub(crate) fn resolve_stem(stem: &str) -> Option<(Prefix, Resolved)> {
    let (prefix, module) = split_prefix(stem);
    resolve(module, prefix.sep()).map(|r| (prefix, r))
}

/// Resolves a module name written with `sep` between path segments.
pub(crate) fn resolve(name: &str, sep: char) -> Option<Resolved> {
    resolve_global(name, sep).or_else(|| resolve_block(name, sep))
}

fn spell(path: &str, sep: char) -> String {
    path.replace('.', &sep.to_string())
}

fn resolve_global(name: &str, sep: char) -> Option<Resolved> {
    let plain = GLOBAL_MODULES
        .iter()
        .find(|g| spell(g, sep) == name)
        .map(|g| (g.to_string(), false));
    let comfy = || {
        COMFY_GLOBALS
            .iter()
            .find(|(c, _)| spell(c, sep) == name)
            .map(|(_, d)| (d.to_string(), true))
    };
    plain.or_else(comfy).map(|(path, comfy)| Resolved {
        target: Target::Module(path),
        comfy,
    })
}

fn resolve_block(name: &str, sep: char) -> Option<Resolved> {
    let (stack, rest) = STACKS.iter().find_map(|s| {
        let rest = name.strip_prefix(&spell(s, sep))?.strip_prefix(sep)?;
        Some((*s, rest))
    })?;
    let (index, module) = rest.split_once(sep)?;
    if index.is_empty() || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let index: usize = index.parse().ok()?;
    let block = format!("{stack}.{index}");
    block_module(module, sep, block)
}

fn block_module(module: &str, sep: char, block: String) -> Option<Resolved> {
    if let Some(m) = BLOCK_MODULES.iter().find(|m| spell(m, sep) == module) {
        let target = Target::Module(format!("{block}.{m}"));
        return Some(Resolved {
            target,
            comfy: false,
        });
    }
    let target = if module == spell(COMFY_QKV, sep) {
        Target::FusedQkv(block)
    } else if module == spell(COMFY_OUT.0, sep) {
        Target::Module(format!("{block}.{}", COMFY_OUT.1))
    } else {
        return None;
    };
    Some(Resolved {
        target,
        comfy: true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(stem: &str) -> Option<(String, bool)> {
        resolve_stem(stem).map(|(_, r)| (r.target.path(), r.comfy))
    }

    #[test]
    fn underscore_names_resolve_by_lookup() {
        let cases = [
            (
                "lora_unet_layers_3_attention_to_out_0",
                "layers.3.attention.to_out.0",
            ),
            (
                "lora_unet_noise_refiner_1_feed_forward_w2",
                "noise_refiner.1.feed_forward.w2",
            ),
            (
                "lycoris_context_refiner_0_attention_to_k",
                "context_refiner.0.attention.to_k",
            ),
            (
                "lora_unet_layers_12_adaLN_modulation_0",
                "layers.12.adaLN_modulation.0",
            ),
            (
                "lora_unet_all_final_layer_2-1_adaLN_modulation_1",
                "all_final_layer.2-1.adaLN_modulation.1",
            ),
            ("lora_unet_t_embedder_mlp_2", "t_embedder.mlp.2"),
        ];
        for (stem, path) in cases {
            assert_eq!(module(stem), Some((path.to_string(), false)), "{stem}");
        }
    }

    #[test]
    fn comfy_names_map_to_diffusers() {
        assert_eq!(
            module("diffusion_model.layers.0.attention.out"),
            Some(("layers.0.attention.to_out.0".into(), true))
        );
        assert_eq!(
            module("lora_unet_layers_0_attention_qkv"),
            Some(("layers.0.attention.qkv".into(), true))
        );
        assert_eq!(
            module("diffusion_model.final_layer.adaLN_modulation.1"),
            Some(("all_final_layer.2-1.adaLN_modulation.1".into(), true))
        );
    }

    #[test]
    fn near_misses_do_not_resolve() {
        for stem in [
            "layers.0.attention.to_q.extra",
            "layers.x.attention.to_q",
            "layers..attention.to_q",
            "layers.+1.attention.to_q",
            "lora_unet_layers_0_attention.to_q",
            "diffusion_model.layers_0_attention_to_q",
            "layers.0.adaLN_modulation.1",
            "blocks.0.attention.to_q",
        ] {
            assert_eq!(module(stem), None, "{stem}");
        }
    }

    #[test]
    fn diffusers_paths_to_comfy_names() {
        assert_eq!(
            comfy_name("layers.2.attention.to_out.0"),
            "layers.2.attention.out"
        );
        assert_eq!(comfy_name("all_x_embedder.2-1"), "x_embedder");
        assert_eq!(
            comfy_name("layers.2.feed_forward.w1"),
            "layers.2.feed_forward.w1"
        );
        assert_eq!(
            qkv_part("noise_refiner.0.attention.to_v"),
            Some(("noise_refiner.0", 2))
        );
        assert_eq!(qkv_part("layers.0.attention.to_out.0"), None);
        assert_eq!(fused_qkv("layers.1"), "layers.1.attention.qkv");
    }

    #[test]
    fn suffixes_give_stem_and_role() {
        assert_eq!(
            split_suffix("layers.0.attention.to_q.lora_A.default.weight"),
            Some(("layers.0.attention.to_q", Role::Down))
        );
        assert_eq!(split_suffix("x.lokr_w1"), Some(("x", Role::LokrW1)));
        assert_eq!(split_suffix("x.lokr_w1_a"), Some(("x", Role::LokrW1A)));
        assert_eq!(split_suffix("x.lokr_t2"), None);
    }
}
