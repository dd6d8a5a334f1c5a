//! The dataset check of the Datasets page and `GET /api/datasets/{name}/preflight`: the
//! trainer's own scan (`Dataset::scan`, what `zlora train` runs before step 1) at a chosen
//! resolution, with a Z-Image model's tokenizer (caption lengths) and VAE (bucket sizes), and
//! how many images land in each aspect bucket.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use maud::{html, Markup};
use serde_json::{json, Value};
use zlora::data::{
    Bucket, Dataset, DatasetConfig, Preflight, Problem, ProblemKind, Resolution, Severity,
};
use zlora::model::text::PromptTokenizer;
use zlora::model::vae::VaeConfig;

use crate::root::{Refused, Root};

/// The resolution checked when none is asked: Z-Image's native size, the trainer's default.
pub const DEFAULT_RESOLUTION: u32 = 1024;

/// The sizes the page offers (any size the buckets accept can be asked).
const RESOLUTIONS: [u32; 3] = [512, 768, 1024];

/// What the check reads of a Z-Image folder.
const TOKENIZER: &str = "tokenizer/tokenizer.json";
const VAE_CONFIG: &str = "vae/config.json";

/// One dataset checked at one resolution.
pub struct Check {
    /// The model whose tokenizer and VAE were used, relative to DIR.
    pub model: String,
    pub resolution: u32,
    pub report: Preflight,
    /// The buckets that hold images, narrowest first, with their image counts.
    pub buckets: Vec<(Bucket, usize)>,
    /// How many buckets the resolution has in all.
    pub bucket_count: usize,
}

/// The query's `resolution` (default [`DEFAULT_RESOLUTION`]) and `model` (a Z-Image folder
/// under DIR; default the first under models/).
pub fn check(root: &Root, dir: &Path, query: &HashMap<String, String>) -> Result<Check, Refused> {
    let resolution = match query.get("resolution") {
        None => DEFAULT_RESOLUTION,
        Some(r) => r.parse().map_err(|_| {
            Refused(format!(
                "resolution must be a whole number of pixels such as 1024, got {r:?}"
            ))
        })?,
    };
    let model = match query.get("model") {
        Some(m) => root.config_path("model", Path::new(m), true)?,
        None => zimage_models(root)?.into_iter().next().ok_or_else(|| {
            Refused(
                "the dataset check reads a Z-Image model's tokenizer (caption lengths) and VAE \
                 (bucket sizes): put one under models/ (zlora fetch, or a link to its folder)"
                    .into(),
            )
        })?,
    };
    let refused = |e: zlora::Error| Refused(e.to_string());
    let tokenizer = PromptTokenizer::from_file(&model.join(TOKENIZER)).map_err(refused)?;
    let vae = VaeConfig::from_file(&model.join(VAE_CONFIG)).map_err(refused)?;
    let cfg = DatasetConfig {
        resolution: Resolution::One(resolution),
        ..DatasetConfig::new(dir)
    };
    let buckets = cfg.buckets(vae.spatial_factor()).map_err(refused)?;
    let (dataset, report) = Dataset::scan(&cfg, &buckets, &tokenizer).map_err(refused)?;
    // One resolution: one bucket per item, one bucket set.
    let mut counts = BTreeMap::new();
    for item in dataset.items() {
        *counts.entry(item.buckets[0]).or_insert(0) += 1;
    }
    Ok(Check {
        model: root.relative(&model),
        resolution,
        report,
        buckets: counts.into_iter().collect(),
        bucket_count: buckets[0].all().len(),
    })
}

/// The Z-Image folders under DIR/models (links to folders elsewhere included).
pub fn zimage_models(root: &Root) -> Result<Vec<PathBuf>, Refused> {
    models_with(root, &[TOKENIZER, VAE_CONFIG])
}

/// The folders under DIR/models that hold every one of `files`.
pub fn models_with(root: &Root, files: &[&str]) -> Result<Vec<PathBuf>, Refused> {
    let entries = zlora::fsutil::sorted_entries(&root.path().join("models"))
        .map_err(|e| Refused(e.to_string()))?;
    Ok(entries
        .into_iter()
        .filter(|p| files.iter().all(|f| p.join(f).is_file()))
        .collect())
}

impl Check {
    /// The problems of one image: its own and its caption file's.
    pub fn problems_of<'a>(&'a self, image: &'a Path) -> impl Iterator<Item = &'a Problem> {
        let caption = crate::api::caption_path(image);
        self.report
            .problems
            .iter()
            .filter(move |p| p.file == image || p.file == caption)
    }

    pub fn json(&self, dataset: &str) -> Value {
        let r = &self.report;
        let problems: Vec<Value> = r
            .problems
            .iter()
            .map(|p| {
                json!({
                    "file": self.file(p),
                    "severity": severity(p),
                    "kind": kind_name(&p.kind),
                    "message": p.kind.to_string(),
                })
            })
            .collect();
        let buckets: Vec<Value> = self
            .buckets
            .iter()
            .map(|(b, n)| json!({"width": b.width, "height": b.height, "images": n}))
            .collect();
        json!({
            "dataset": dataset,
            "model": self.model,
            "resolution": self.resolution,
            "images": r.images,
            "usable": r.usable,
            "errors": r.errors().count(),
            "warnings": r.warnings().count(),
            "ignored": r.ignored,
            "ready": !r.is_fatal(),
            "summary": self.summary(),
            "problems": problems,
            "buckets": buckets,
            "bucket_count": self.bucket_count,
        })
    }

    /// The counts and the verdict in one line.
    pub fn summary(&self) -> String {
        let r = &self.report;
        let verdict = if r.usable == 0 {
            "no image can be trained"
        } else if r.is_fatal() {
            "training would stop: fix the files named below, or set skip_problems = true in [dataset] to train without them"
        } else {
            "ready to train"
        };
        format!(
            "{} images at {} px: {} usable, {} errors, {} warnings, {} other files ignored; {verdict}",
            r.images,
            self.resolution,
            r.usable,
            r.errors().count(),
            r.warnings().count(),
            r.ignored
        )
    }

    /// A problem's file, relative to the dataset folder.
    fn file(&self, p: &Problem) -> String {
        zlora::error::shown(p.file.strip_prefix(&self.report.root).unwrap_or(&p.file))
    }

    /// The report as the dataset page shows it: the summary, every finding by file, and the
    /// bucket counts.
    pub fn markup(&self) -> Markup {
        html! {
            p.summary { (self.summary()) " · captions measured with " code { (self.model) } }
            @if !self.report.problems.is_empty() {
                table.preflight {
                    thead { tr { th { "File" } th { "" } th { "Finding" } } }
                    tbody {
                        @for p in &self.report.problems {
                            tr class=(severity(p)) {
                                td { code { (self.file(p)) } }
                                td { (severity(p)) }
                                td { (p.kind) }
                            }
                        }
                    }
                }
            }
            h3 { "Buckets at " (self.resolution) " px" }
            p.muted { (self.buckets.len()) " of the " (self.bucket_count) " aspect buckets hold images (each image is cropped to its nearest one)." }
            @if !self.buckets.is_empty() {
                table.buckets {
                    thead { tr { th { "Bucket" } th { "Images" } } }
                    tbody {
                        @for (b, n) in &self.buckets { tr { td { (b) } td { (n) } } }
                    }
                }
            }
        }
    }
}

/// The form that asks for another resolution or one of `models` (the Z-Image folders);
/// `model` is the one checked, if any.
pub fn form(root: &Root, models: &[PathBuf], resolution: u32, model: Option<&str>) -> Markup {
    html! {
        form.inline method="get" {
            label { "Resolution "
                input type="number" name="resolution" value=(resolution) min="32" step="16" list="resolutions";
                datalist #resolutions { @for r in RESOLUTIONS { option value=(r) {} } }
            }
            @if models.len() > 1 {
                label { " Model "
                    select name="model" {
                        @for m in models {
                            @let rel = root.relative(m);
                            option value=(rel) selected[model == Some(rel.as_str())] { (rel) }
                        }
                    }
                }
            }
            button { "Check" }
        }
    }
}

pub fn severity(p: &Problem) -> &'static str {
    match p.severity {
        Severity::Error => "error",
        Severity::Warning => "warning",
    }
}

/// A stable name of each kind of problem, for scripts.
fn kind_name(kind: &ProblemKind) -> &'static str {
    match kind {
        ProblemKind::Unreadable(_) => "unreadable",
        ProblemKind::TooSmall { .. } => "too_small",
        ProblemKind::TooLarge { .. } => "too_large",
        ProblemKind::MissingCaption { .. } => "missing_caption",
        ProblemKind::CaptionUnreadable(_) => "caption_unreadable",
        ProblemKind::EmptyCaption => "empty_caption",
        ProblemKind::CaptionTooLong { .. } => "caption_too_long",
        ProblemKind::DuplicateStem { .. } => "duplicate_name",
        ProblemKind::DuplicateImage { .. } => "duplicate_image",
        ProblemKind::OrphanCaption => "orphan_caption",
        ProblemKind::MaskUnreadable(_) => "mask_unreadable",
        ProblemKind::MaskMismatch { .. } => "mask_mismatch",
        ProblemKind::OrphanMask => "orphan_mask",
        ProblemKind::NoMaskMatches => "no_mask_matches",
        ProblemKind::DuplicateMask { .. } => "duplicate_mask",
    }
}
