//! Everything one can say about a LoRA file, and whether it applies cleanly to Z-Image.
//!
//! [`inspect`] never fails: a file the reader refuses is still described from its header
//! (tensors, dtypes, metadata, architecture with evidence, algorithms), and the [`Verdict`]
//! says why it cannot be applied. Exit codes of `zlora lora inspect` are [`Verdict::code`]:
//!
//! | code | verdict |
//! |---|---|
//! | 0 | applies cleanly to Z-Image (and to `--model` when given) |
//! | 1 | unreadable: missing file, not safetensors, corrupt or forged header |
//! | 2 | not a Z-Image transformer LoRA: another architecture, text encoder only, or nothing recognisable |
//! | 3 | unsupported algorithm (DoRA) |
//! | 4 | keys that match nothing, incomplete or mis-shaped modules, or modules that do not fit `--model` |
//! | 5 | NaN or inf values in a factor or alpha (the report counts them per module) |

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;

use super::identify::{algorithms, identify, Architecture, Identification};
use super::{listing, refusal, LoraFile, LoraHeader, LoraModule, Refusal};

/// Why a file does or does not apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Clean,
    Unreadable,
    Foreign,
    Unsupported,
    Mismatch,
    NonFinite,
}

impl Verdict {
    /// The exit code of `zlora lora inspect` (see the module documentation).
    pub fn code(self) -> u8 {
        match self {
            Verdict::Clean => 0,
            Verdict::Unreadable => 1,
            Verdict::Foreign => 2,
            Verdict::Unsupported => 3,
            Verdict::Mismatch => 4,
            Verdict::NonFinite => 5,
        }
    }
}

/// The Linears of a model: diffusers module path → (out, in), and its width.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelLinears {
    /// How to name the model in messages.
    pub name: String,
    pub width: usize,
    pub linears: BTreeMap<String, (usize, usize)>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub file: String,
    pub bytes: usize,
    pub tensors: usize,
    /// dtype → tensor count.
    pub dtypes: BTreeMap<String, usize>,
    pub metadata: BTreeMap<String, String>,
    pub architecture: String,
    pub evidence: String,
    /// Algorithm → key count.
    pub algorithms: BTreeMap<String, usize>,
    /// The producer layout; `None` when the reader refused the file.
    pub layout: Option<String>,
    pub modules: Vec<ModuleInfo>,
    /// Targeted blocks and modules, grouped.
    pub targets: Vec<TargetGroup>,
    /// Modules grouped by (algorithm, rank, alpha, scale).
    pub ranks: Vec<RankGroup>,
    pub model_match: Option<ModelMatch>,
    pub verdict: Verdict,
    pub code: u8,
    /// One line.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModuleInfo {
    pub path: String,
    pub source_key: String,
    pub algorithm: String,
    /// The rank alpha is divided by (`None`: LoKr with two full factors).
    pub rank: Option<usize>,
    /// scale · rank: the file's alpha (or the one its producer implied).
    pub alpha: Option<f64>,
    /// alpha / rank as applied.
    pub scale: f64,
    /// [out, in] of the adapted Linear.
    pub shape: [usize; 2],
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TargetGroup {
    /// `layers`, `noise_refiner`, `context_refiner`, or `global`.
    pub stack: String,
    /// Block indices as ranges, e.g. `0–3, 5`; empty for globals.
    pub blocks: String,
    pub block_count: usize,
    pub modules: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RankGroup {
    pub algorithm: String,
    pub rank: Option<usize>,
    pub alpha: Option<f64>,
    pub scale: f64,
    pub count: usize,
    /// Up to three module paths.
    pub examples: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelMatch {
    pub model: String,
    /// Modules that fit the model.
    pub applies: usize,
    pub not_in_model: Vec<String>,
    pub shape_mismatches: Vec<String>,
}

/// Describes the file at `path`; `model` adds the match against that model's Linears.
pub fn inspect(path: &Path, model: Option<&ModelLinears>) -> Report {
    let width = model.map_or(super::identify::ZIMAGE_DIM, |m| m.width);
    let bytes = match crate::fsutil::read_regular(path) {
        Ok(b) => b,
        Err(e) => return unreadable(path, 0, without_path(path, &e)),
    };
    let header = match LoraHeader::from_bytes(path, &bytes) {
        Ok(h) => h,
        Err(e) => return unreadable(path, bytes.len(), without_path(path, &e)),
    };
    let id = identify(&header.shapes, &header.metadata, width);
    let mut report = describe_header(path, bytes.len(), &header, &id);
    if let Some((verdict, reason)) = header_verdict(&header, &id) {
        return report.finish(verdict, reason);
    }
    let file = match LoraFile::from_bytes(path, &bytes, width) {
        Ok(f) => f,
        Err(e) => return report.finish(Verdict::Mismatch, without_path(path, &e)),
    };
    report.layout = Some(file.layout.to_string());
    report.modules = file
        .modules
        .iter()
        .filter_map(|(p, m)| module_info(p, m))
        .collect();
    report.targets = targets(file.modules.keys());
    report.ranks = rank_groups(&report.modules);
    match file.nonfinite() {
        Ok(found) if found.is_empty() => {}
        Ok(found) => return report.finish(Verdict::NonFinite, super::nonfinite_message(&found)),
        Err(e) => return report.finish(Verdict::Unreadable, e.to_string()),
    }
    let Some(model) = model else {
        let reason = format!(
            "applies cleanly to Z-Image ({} modules)",
            report.modules.len()
        );
        return report.finish(Verdict::Clean, reason);
    };
    let matched = match_model(&report.modules, model);
    let misfits = matched.not_in_model.len() + matched.shape_mismatches.len();
    let (verdict, reason) = if misfits == 0 {
        let n = matched.applies;
        (
            Verdict::Clean,
            format!("applies cleanly to {} ({n} modules)", model.name),
        )
    } else {
        let mut all = matched.not_in_model.clone();
        all.extend(matched.shape_mismatches.iter().cloned());
        let msg = format!(
            "{misfits} modules do not fit {}: {}",
            model.name,
            listing(all)
        );
        (Verdict::Mismatch, msg)
    };
    report.model_match = Some(matched);
    report.finish(verdict, reason)
}

impl Report {
    fn finish(mut self, verdict: Verdict, reason: String) -> Report {
        self.verdict = verdict;
        self.code = verdict.code();
        self.reason = reason.replace('\n', " ");
        self
    }
}

/// The error's message without the leading `<path>: ` (the report names the file).
fn without_path(path: &Path, e: &crate::Error) -> String {
    let text = e.to_string();
    let prefix = format!("{}: ", crate::error::shown(path));
    text.strip_prefix(&prefix)
        .map(str::to_string)
        .unwrap_or(text)
}

fn unreadable(path: &Path, bytes: usize, reason: String) -> Report {
    blank(path, bytes).finish(Verdict::Unreadable, reason)
}

/// A report with nothing known yet (the verdict is set by [`Report::finish`]).
fn blank(path: &Path, bytes: usize) -> Report {
    Report {
        file: crate::error::shown(path),
        bytes,
        tensors: 0,
        dtypes: BTreeMap::new(),
        metadata: BTreeMap::new(),
        architecture: Architecture::Unknown.to_string(),
        evidence: String::new(),
        algorithms: BTreeMap::new(),
        layout: None,
        modules: Vec::new(),
        targets: Vec::new(),
        ranks: Vec::new(),
        model_match: None,
        verdict: Verdict::Unreadable,
        code: 0,
        reason: String::new(),
    }
}

fn describe_header(path: &Path, bytes: usize, h: &LoraHeader, id: &Identification) -> Report {
    let mut dtypes = BTreeMap::new();
    for d in h.dtypes.values() {
        *dtypes.entry(format!("{d:?}").to_uppercase()).or_insert(0) += 1;
    }
    let mut report = blank(path, bytes);
    report.tensors = h.shapes.len();
    report.dtypes = dtypes;
    report.metadata = h.metadata.clone();
    report.architecture = id.architecture.to_string();
    report.evidence = id.evidence.clone();
    report.algorithms = algorithms(h.shapes.keys())
        .into_iter()
        .map(|(a, n)| (a.to_string(), n))
        .collect();
    report
}

/// The reader's header checks as a verdict, plus one of inspect's own: a file in which no
/// key names a Z-Image module and no metadata names a family is not a Z-Image LoRA.
fn header_verdict(h: &LoraHeader, id: &Identification) -> Option<(Verdict, String)> {
    if let Some(r) = refusal(&h.shapes, &h.metadata, id) {
        let verdict = match r {
            Refusal::NotZImage(_) => Verdict::Foreign,
            Refusal::Unsupported(_) => Verdict::Unsupported,
            Refusal::Content(_) => Verdict::Mismatch,
        };
        return Some((verdict, r.message().to_string()));
    }
    (id.architecture == Architecture::Unknown).then(|| {
        let reason = "no key names a Z-Image module and the header names no model family";
        (Verdict::Foreign, format!("unknown architecture: {reason}"))
    })
}

fn module_info(path: &str, m: &LoraModule) -> Option<ModuleInfo> {
    let (out, inp) = m.shape().ok()?;
    let rank = m.weights.alpha_rank();
    Some(ModuleInfo {
        path: path.to_string(),
        source_key: m.source_key.clone(),
        algorithm: m.weights.kind().to_string(),
        rank,
        alpha: rank.map(|r| m.scale * r as f64),
        scale: m.scale,
        shape: [out, inp],
    })
}

/// Stacks in the order a report lists them (main layers first).
const STACKS: [&str; 3] = ["layers", "noise_refiner", "context_refiner"];

/// Block modules grouped by stack and by the set of modules each block has.
fn targets<'a>(paths: impl Iterator<Item = &'a String>) -> Vec<TargetGroup> {
    let mut per_block: BTreeMap<(&str, usize), Vec<String>> = BTreeMap::new();
    let mut globals = Vec::new();
    for path in paths {
        let block = STACKS.iter().find_map(|stack| {
            let rest = path.strip_prefix(stack)?.strip_prefix('.')?;
            let (index, module) = rest.split_once('.')?;
            Some(((*stack, index.parse::<usize>().ok()?), module.to_string()))
        });
        match block {
            Some((key, module)) => per_block.entry(key).or_default().push(module),
            None => globals.push(path.clone()),
        }
    }
    let mut groups: BTreeMap<(usize, Vec<String>), Vec<usize>> = BTreeMap::new();
    for ((stack, index), modules) in per_block {
        let order = STACKS.iter().position(|s| *s == stack).unwrap_or(0);
        groups.entry((order, modules)).or_default().push(index);
    }
    let mut out: Vec<TargetGroup> = groups
        .into_iter()
        .map(|((order, modules), blocks)| TargetGroup {
            stack: STACKS[order].to_string(),
            blocks: ranges(&blocks),
            block_count: blocks.len(),
            modules,
        })
        .collect();
    if !globals.is_empty() {
        out.push(TargetGroup {
            stack: "global".into(),
            blocks: String::new(),
            block_count: 0,
            modules: globals,
        });
    }
    out
}

/// `[0, 1, 2, 5, 7, 8]` → `0–2, 5, 7–8`.
fn ranges(sorted: &[usize]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let mut j = i;
        while j + 1 < sorted.len() && sorted[j + 1] == sorted[j] + 1 {
            j += 1;
        }
        parts.push(match j > i {
            true => format!("{}–{}", sorted[i], sorted[j]),
            false => sorted[i].to_string(),
        });
        i = j + 1;
    }
    parts.join(", ")
}

fn rank_groups(modules: &[ModuleInfo]) -> Vec<RankGroup> {
    let mut groups: Vec<RankGroup> = Vec::new();
    for m in modules {
        let same = |g: &&mut RankGroup| {
            g.algorithm == m.algorithm
                && g.rank == m.rank
                && g.alpha == m.alpha
                && g.scale == m.scale
        };
        match groups.iter_mut().find(same) {
            Some(g) => {
                g.count += 1;
                if g.examples.len() < 3 {
                    g.examples.push(m.path.clone());
                }
            }
            None => groups.push(RankGroup {
                algorithm: m.algorithm.clone(),
                rank: m.rank,
                alpha: m.alpha,
                scale: m.scale,
                count: 1,
                examples: vec![m.path.clone()],
            }),
        }
    }
    groups.sort_by_key(|g| std::cmp::Reverse(g.count));
    groups
}

fn match_model(modules: &[ModuleInfo], model: &ModelLinears) -> ModelMatch {
    let mut m = ModelMatch {
        model: model.name.clone(),
        applies: 0,
        not_in_model: Vec::new(),
        shape_mismatches: Vec::new(),
    };
    for info in modules {
        match model.linears.get(&info.path) {
            None => m
                .not_in_model
                .push(format!("{} ({})", info.path, info.source_key)),
            Some(&(o, i)) if [o, i] != info.shape => m.shape_mismatches.push(format!(
                "{} (LoRA {:?}, model [{o}, {i}])",
                info.path, info.shape
            )),
            Some(_) => m.applies += 1,
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_ranges_are_compact() {
        assert_eq!(ranges(&[0, 1, 2, 5, 7, 8]), "0–2, 5, 7–8");
        assert_eq!(ranges(&[3]), "3");
        assert_eq!(ranges(&[]), "");
    }

    #[test]
    fn targets_group_blocks_with_the_same_modules() {
        let paths: Vec<String> = [
            "layers.0.attention.to_q",
            "layers.1.attention.to_q",
            "layers.2.attention.to_q",
            "layers.2.feed_forward.w1",
            "noise_refiner.0.attention.to_q",
            "all_x_embedder.2-1",
        ]
        .map(String::from)
        .to_vec();
        let t = targets(paths.iter());
        assert_eq!(t.len(), 4);
        assert_eq!(
            (t[0].stack.as_str(), t[0].blocks.as_str()),
            ("layers", "0–1")
        );
        assert_eq!(t[1].modules, ["attention.to_q", "feed_forward.w1"]);
        assert_eq!(t[2].stack, "noise_refiner");
        assert_eq!(t[3].modules, ["all_x_embedder.2-1"]);
    }
}
