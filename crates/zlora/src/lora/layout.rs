//! From key names and shapes to a plan: which keys form which module, and the file's layout.
//!
//! Everything here works on the header alone, so a file is refused before any tensor data is
//! decoded, and every problem of one kind is reported at once.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::listing;
use super::names::{self, Prefix, Role, Target, QKV_PARTS};

/// How a producer named its keys. See the module documentation of [`crate::lora`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `diffusion_model.<diffusers path>.lora_A/B.weight` (ai-toolkit; also kohya suffixes).
    AiToolkit,
    /// `transformer.<diffusers path>.lora_A/B.weight`, alpha in the `lora_adapter_metadata`
    /// header (diffusers, SimpleTuner).
    DiffusersPeft,
    /// `<diffusers path>.lora_A/B.default.weight` with no prefix (DiffSynth-Studio).
    DiffSynth,
    /// `lora_unet_<path with . → _>.lora_down/up.weight` + `.alpha` (kohya, musubi; also the
    /// LyCORIS `lycoris_` prefix).
    Kohya,
    /// ComfyUI names (`attention.qkv`, `attention.out`, `x_embedder`, `final_layer`) under
    /// `diffusion_model.` or `lora_unet_`.
    ComfyFused,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Layout::AiToolkit => "ai-toolkit (diffusion_model.<module>.lora_A/B)",
            Layout::DiffusersPeft => "diffusers/PEFT (transformer.<module>.lora_A/B)",
            Layout::DiffSynth => "DiffSynth-Studio (<module>.lora_A/B.default)",
            Layout::Kohya => "kohya/musubi (lora_unet_<module>.lora_down/up + alpha)",
            Layout::ComfyFused => "ComfyUI (fused attention.qkv / attention.out)",
        })
    }
}

impl Layout {
    fn new(prefix: Prefix, comfy: bool) -> Self {
        match (prefix, comfy) {
            (_, true) => Layout::ComfyFused,
            (Prefix::DiffusionModel, false) => Layout::AiToolkit,
            (Prefix::Transformer, false) => Layout::DiffusersPeft,
            (Prefix::Bare, false) => Layout::DiffSynth,
            (Prefix::LoraUnet | Prefix::Lycoris, false) => Layout::Kohya,
        }
    }
}

/// The keys of one LoRA module (before a fused qkv is split).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Group {
    pub target: Target,
    /// The key without its suffix, e.g. `lora_unet_layers_0_attention_to_q`.
    pub stem: String,
    pub down: String,
    pub up: String,
    pub alpha: Option<String>,
}

/// A key taken apart.
struct Parsed<'a> {
    key: &'a str,
    stem: &'a str,
    role: Role,
    prefix: Prefix,
    resolved: names::Resolved,
}

/// Checks every key and groups them into modules.
pub(crate) fn plan(shapes: &BTreeMap<String, Vec<usize>>) -> Result<(Layout, Vec<Group>), String> {
    let parsed = parse_keys(shapes.keys())?;
    let layout = layout_of(&parsed)?;
    let groups = group(&parsed)?;
    check_shapes(&groups, shapes)?;
    Ok((layout, groups))
}

fn parse_keys<'a>(keys: impl Iterator<Item = &'a String>) -> Result<Vec<Parsed<'a>>, String> {
    let (mut parsed, mut bad_suffix, mut bad_module) = (Vec::new(), Vec::new(), Vec::new());
    for key in keys {
        let Some((stem, role)) = names::split_suffix(key) else {
            bad_suffix.push(key.clone());
            continue;
        };
        match names::resolve_stem(stem) {
            Some((prefix, resolved)) => parsed.push(Parsed {
                key,
                stem,
                role,
                prefix,
                resolved,
            }),
            None => bad_module.push(key.clone()),
        }
    }
    if bad_suffix.is_empty() && bad_module.is_empty() {
        return Ok(parsed);
    }
    let mut parts = Vec::new();
    if !bad_suffix.is_empty() {
        parts.push(format!(
            "keys without a LoRA suffix (lora_A/B, lora_down/up, alpha) ({}): {}",
            bad_suffix.len(),
            listing(bad_suffix)
        ));
    }
    if !bad_module.is_empty() {
        parts.push(format!(
            "keys naming no Z-Image module ({}): {}",
            bad_module.len(),
            listing(bad_module)
        ));
    }
    Err(format!("unrecognised keys: {}", parts.join("; ")))
}

/// One file, one naming convention: mixed prefixes mean a merged or damaged file.
fn layout_of(parsed: &[Parsed]) -> Result<Layout, String> {
    let prefixes: BTreeSet<Prefix> = parsed.iter().map(|p| p.prefix).collect();
    let comfy = parsed.iter().any(|p| p.resolved.comfy);
    let mut it = prefixes.iter();
    match (it.next(), it.next()) {
        (Some(&prefix), None) => Ok(Layout::new(prefix, comfy)),
        (None, _) => Err("contains no LoRA tensors".into()),
        (Some(_), Some(_)) => {
            let examples: Vec<String> = prefixes
                .iter()
                .filter_map(|pre| parsed.iter().find(|p| p.prefix == *pre))
                .map(|p| p.key.to_string())
                .collect();
            Err(format!("mixes key layouts: {}", listing(examples)))
        }
    }
}

#[derive(Default)]
struct Slots<'a> {
    stem: &'a str,
    down: Option<&'a str>,
    up: Option<&'a str>,
    alpha: Option<&'a str>,
}

fn group(parsed: &[Parsed]) -> Result<Vec<Group>, String> {
    let mut slots: BTreeMap<Target, Slots> = BTreeMap::new();
    let mut conflicts = Vec::new();
    for p in parsed {
        let s = slots.entry(p.resolved.target.clone()).or_default();
        if s.stem.is_empty() {
            s.stem = p.stem;
        }
        let same_stem = s.stem == p.stem;
        let slot = match p.role {
            Role::Down => &mut s.down,
            Role::Up => &mut s.up,
            Role::Alpha => &mut s.alpha,
        };
        if !same_stem || slot.is_some() {
            conflicts.push(format!("{} ({})", p.key, p.resolved.target.path()));
        } else {
            *slot = Some(p.key);
        }
    }
    conflicts.extend(fused_and_split(&slots));
    if !conflicts.is_empty() {
        let n = conflicts.len();
        let msg = format!(
            "keys addressing a module another key already sets ({n}): {}",
            listing(conflicts)
        );
        return Err(msg);
    }
    complete(slots)
}

/// A fused qkv next to a separate to_q/to_k/to_v of the same block would apply twice.
fn fused_and_split(slots: &BTreeMap<Target, Slots>) -> Vec<String> {
    slots
        .keys()
        .filter_map(|t| match t {
            Target::FusedQkv(block) => Some(block),
            Target::Module(_) => None,
        })
        .flat_map(|block| QKV_PARTS.iter().map(move |p| format!("{block}.{p}")))
        .filter(|m| slots.contains_key(&Target::Module(m.clone())))
        .map(|m| format!("{m} (also in the fused attention.qkv)"))
        .collect()
}

/// Every module needs both matrices; an alpha alone or half a pair is an error.
fn complete(slots: BTreeMap<Target, Slots>) -> Result<Vec<Group>, String> {
    let mut groups = Vec::new();
    let mut missing = Vec::new();
    for (target, s) in slots {
        match (s.down, s.up) {
            (Some(down), Some(up)) => groups.push(Group {
                target,
                stem: s.stem.to_string(),
                down: down.to_string(),
                up: up.to_string(),
                alpha: s.alpha.map(str::to_string),
            }),
            (down, up) => {
                let have: Vec<&str> = [s.alpha, down, up].into_iter().flatten().collect();
                let lacks = if down.is_none() { "down/A" } else { "up/B" };
                missing.push(format!(
                    "{} (has {}, lacks {lacks})",
                    s.stem,
                    have.join(" + ")
                ));
            }
        }
    }
    if missing.is_empty() {
        return Ok(groups);
    }
    let n = missing.len();
    Err(format!("incomplete modules ({n}): {}", listing(missing)))
}

fn check_shapes(groups: &[Group], shapes: &BTreeMap<String, Vec<usize>>) -> Result<(), String> {
    let problems: Vec<String> = groups
        .iter()
        .filter_map(|g| shape_problem(g, shapes).map(|p| format!("{}: {p}", g.stem)))
        .collect();
    if problems.is_empty() {
        return Ok(());
    }
    let n = problems.len();
    Err(format!(
        "modules with bad shapes ({n}): {}",
        listing(problems)
    ))
}

fn shape_problem(g: &Group, shapes: &BTreeMap<String, Vec<usize>>) -> Option<String> {
    let shape = |k: &str| shapes.get(k).map(Vec::as_slice).unwrap_or_default();
    let (down, up) = (shape(&g.down), shape(&g.up));
    let ([r_down, _], [out, r_up]) = (down, up) else {
        return Some(format!("down {down:?} and up {up:?} must both be 2-D"));
    };
    if r_down != r_up {
        return Some(format!("rank mismatch: down {down:?} vs up {up:?}"));
    }
    if *r_down == 0 {
        return Some("rank 0".into());
    }
    if matches!(g.target, Target::FusedQkv(_)) && out % 3 != 0 {
        return Some(format!("fused qkv up has {out} rows, not a multiple of 3"));
    }
    let alpha = g.alpha.as_deref().map(shape);
    match alpha {
        Some(a) if a.iter().product::<usize>() != 1 => Some(format!("alpha {a:?} is not a scalar")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shapes(keys: &[(&str, &[usize])]) -> BTreeMap<String, Vec<usize>> {
        keys.iter()
            .map(|(k, s)| (k.to_string(), s.to_vec()))
            .collect()
    }

    #[test]
    fn groups_kohya_keys_with_alpha() {
        let s = shapes(&[
            (
                "lora_unet_layers_0_feed_forward_w2.lora_down.weight",
                &[4, 170],
            ),
            (
                "lora_unet_layers_0_feed_forward_w2.lora_up.weight",
                &[64, 4],
            ),
            ("lora_unet_layers_0_feed_forward_w2.alpha", &[]),
        ]);
        let (layout, groups) = plan(&s).unwrap();
        assert_eq!(layout, Layout::Kohya);
        assert_eq!(groups.len(), 1);
        assert_eq!(
            groups[0].target,
            Target::Module("layers.0.feed_forward.w2".into())
        );
        assert!(groups[0].alpha.is_some());
    }

    #[test]
    fn refuses_conflicts_and_mixed_prefixes() {
        let dup = shapes(&[
            ("layers.0.attention.to_q.lora_A.weight", &[4, 64]),
            ("layers.0.attention.to_q.lora_A.default.weight", &[4, 64]),
            ("layers.0.attention.to_q.lora_B.weight", &[64, 4]),
        ]);
        assert!(plan(&dup).unwrap_err().contains("already sets"));
        let both = shapes(&[
            (
                "diffusion_model.layers.0.attention.qkv.lora_A.weight",
                &[4, 64],
            ),
            (
                "diffusion_model.layers.0.attention.qkv.lora_B.weight",
                &[192, 4],
            ),
            (
                "diffusion_model.layers.0.attention.to_k.lora_A.weight",
                &[4, 64],
            ),
            (
                "diffusion_model.layers.0.attention.to_k.lora_B.weight",
                &[64, 4],
            ),
        ]);
        assert!(plan(&both)
            .unwrap_err()
            .contains("layers.0.attention.to_k (also in the fused"));
        let mixed = shapes(&[
            (
                "diffusion_model.layers.0.attention.to_q.lora_A.weight",
                &[4, 64],
            ),
            (
                "transformer.layers.0.attention.to_q.lora_B.weight",
                &[64, 4],
            ),
        ]);
        assert!(plan(&mixed).unwrap_err().contains("mixes key layouts"));
    }

    #[test]
    fn refuses_bad_shapes() {
        let cases: [(&[usize], &[usize], &str); 4] = [
            (&[4, 64], &[64, 2], "rank mismatch"),
            (&[4, 64, 1], &[64, 4], "2-D"),
            (&[0, 64], &[64, 0], "rank 0"),
            (&[4, 64], &[100, 4], "multiple of 3"),
        ];
        for (down, up, needle) in cases {
            let s = shapes(&[
                ("lora_unet_layers_0_attention_qkv.lora_down.weight", down),
                ("lora_unet_layers_0_attention_qkv.lora_up.weight", up),
            ]);
            let err = plan(&s).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }
}
