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

/// The keys of one adapted module (before a fused qkv is split).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Group {
    pub target: Target,
    /// The key without its suffix, e.g. `lora_unet_layers_0_attention_to_q`.
    pub stem: String,
    /// Role → key: a complete LoRA, LoKr or LoHa set, optionally with `Role::Alpha`.
    pub keys: BTreeMap<Role, String>,
}

impl Group {
    pub fn key(&self, role: Role) -> Option<&str> {
        self.keys.get(&role).map(String::as_str)
    }
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
    keys: BTreeMap<Role, &'a str>,
}

fn group(parsed: &[Parsed]) -> Result<Vec<Group>, String> {
    let mut slots: BTreeMap<Target, Slots> = BTreeMap::new();
    let mut conflicts = Vec::new();
    for p in parsed {
        let s = slots.entry(p.resolved.target.clone()).or_default();
        if s.stem.is_empty() {
            s.stem = p.stem;
        }
        if s.stem != p.stem || s.keys.contains_key(&p.role) {
            conflicts.push(format!("{} ({})", p.key, p.resolved.target.path()));
        } else {
            s.keys.insert(p.role, p.key);
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

/// Every module needs a complete set of one algorithm; an alpha alone or half a pair is an
/// error.
fn complete(slots: BTreeMap<Target, Slots>) -> Result<Vec<Group>, String> {
    let mut groups = Vec::new();
    let mut missing = Vec::new();
    for (target, s) in slots {
        let roles: BTreeSet<Role> = s.keys.keys().copied().collect();
        match lacks(&roles) {
            None => groups.push(Group {
                target,
                stem: s.stem.to_string(),
                keys: s
                    .keys
                    .into_iter()
                    .map(|(r, k)| (r, k.to_string()))
                    .collect(),
            }),
            Some(lacks) => {
                let have: Vec<&str> = s.keys.values().copied().collect();
                missing.push(format!("{} (has {}, {lacks})", s.stem, have.join(" + ")));
            }
        }
    }
    if missing.is_empty() {
        return Ok(groups);
    }
    let n = missing.len();
    Err(format!("incomplete modules ({n}): {}", listing(missing)))
}

const LORA: [Role; 2] = [Role::Down, Role::Up];
const LOKR: [Role; 6] = [
    Role::LokrW1,
    Role::LokrW1A,
    Role::LokrW1B,
    Role::LokrW2,
    Role::LokrW2A,
    Role::LokrW2B,
];
const LOHA: [Role; 4] = [Role::HadaW1A, Role::HadaW1B, Role::HadaW2A, Role::HadaW2B];

/// What a module's roles lack to form one complete adapter, `None` when complete.
fn lacks(roles: &BTreeSet<Role>) -> Option<String> {
    let any = |set: &[Role]| set.iter().any(|r| roles.contains(r));
    let families = [any(&LORA), any(&LOKR), any(&LOHA)];
    if families.iter().filter(|f| **f).count() > 1 {
        return Some("mixes LoRA, LoKr and LoHa tensors".into());
    }
    let absent = |set: &[Role]| -> Vec<Role> {
        set.iter().copied().filter(|r| !roles.contains(r)).collect()
    };
    let text = match families {
        [_, true, _] => lokr_lacks(roles),
        [_, _, true] => {
            let names: Vec<&str> = absent(&LOHA).iter().map(|r| r.name()).collect();
            (!names.is_empty()).then(|| names.join(" + "))
        }
        _ => match absent(&LORA).as_slice() {
            [] => None,
            [Role::Down, ..] => Some("down/A".into()),
            _ => Some("up/B".into()),
        },
    };
    text.map(|t| format!("lacks {t}"))
}

/// A LoKr factor is either full or a product, never both, never half a product.
fn lokr_lacks(roles: &BTreeSet<Role>) -> Option<String> {
    let factor = |name: &str, full: Role, a: Role, b: Role| -> Option<String> {
        let has = |r: Role| roles.contains(&r);
        match (has(full), has(a), has(b)) {
            (true, false, false) | (false, true, true) => None,
            _ => Some(format!(
                "exactly one of lokr_{name} or lokr_{name}_a + lokr_{name}_b"
            )),
        }
    };
    let w1 = factor("w1", Role::LokrW1, Role::LokrW1A, Role::LokrW1B);
    let w2 = factor("w2", Role::LokrW2, Role::LokrW2A, Role::LokrW2B);
    let parts: Vec<String> = [w1, w2].into_iter().flatten().collect();
    (!parts.is_empty()).then(|| parts.join(" and "))
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
    let shape = |r: Role| {
        g.key(r)
            .and_then(|k| shapes.get(k))
            .map(Vec::as_slice)
            .unwrap_or_default()
    };
    if g.key(Role::Alpha).is_some() && shape(Role::Alpha).iter().product::<usize>() != 1 {
        return Some(format!("alpha {:?} is not a scalar", shape(Role::Alpha)));
    }
    let product = |a: Role, b: Role| product_dims((a, shape(a)), (b, shape(b)));
    let factor = |full: Role, a: Role, b: Role| match g.key(full) {
        Some(_) => matrix_dims(full, shape(full)),
        None => product(a, b),
    };
    // Rows of the factor that a fused qkv split cuts into thirds.
    let outer = if g.key(Role::Down).is_some() {
        product(Role::Up, Role::Down).map(|(out, _)| out)
    } else if g.key(Role::HadaW1A).is_some() {
        let w1 = product(Role::HadaW1A, Role::HadaW1B);
        let w2 = product(Role::HadaW2A, Role::HadaW2B);
        match (w1, w2) {
            (Ok(s1), Ok(s2)) if s1 != s2 => Err(format!("LoHa products {s1:?} and {s2:?} differ")),
            (w1, w2) => w2.and(w1).map(|(out, _)| out),
        }
    } else {
        let w2 = factor(Role::LokrW2, Role::LokrW2A, Role::LokrW2B);
        w2.and(factor(Role::LokrW1, Role::LokrW1A, Role::LokrW1B))
            .map(|(l, _)| l)
    };
    match outer {
        Err(e) => Some(e),
        Ok(rows) if matches!(g.target, Target::FusedQkv(_)) && rows % 3 != 0 => Some(format!(
            "fused qkv has {rows} outer rows, not a multiple of 3 (cannot be split exactly)"
        )),
        Ok(_) => None,
    }
}

fn matrix_dims(role: Role, shape: &[usize]) -> Result<(usize, usize), String> {
    match shape {
        [rows, cols] if *rows > 0 && *cols > 0 => Ok((*rows, *cols)),
        _ => Err(format!(
            "{} {shape:?} must be a non-empty 2-D matrix",
            role.name()
        )),
    }
}

/// (rows, cols) of `a · b`, checking both are 2-D and share a non-zero rank.
fn product_dims(
    (ra, a): (Role, &[usize]),
    (rb, b): (Role, &[usize]),
) -> Result<(usize, usize), String> {
    let ([rows, rank_a], [rank_b, cols]) = (a, b) else {
        return Err(format!(
            "{} {a:?} and {} {b:?} must both be 2-D",
            ra.name(),
            rb.name()
        ));
    };
    if rank_a != rank_b {
        return Err(format!(
            "rank mismatch: {} {b:?} vs {} {a:?}",
            rb.name(),
            ra.name()
        ));
    }
    if *rank_a == 0 {
        return Err("rank 0".into());
    }
    Ok((*rows, *cols))
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
        assert!(groups[0].key(Role::Alpha).is_some());
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
