//! `zlora validate`: one LoRA on Base and Turbo, every variant of the plan over the same
//! prompts and seeds, then the pictures, the verdicts and the report.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::findings::findings;
use super::html::{Cell, Page};
use super::plan::{trigger_word, Checkpoint, ValidationPlan, Variant, VariantId};
use super::render::{Event, Progress, Session};
use super::verdicts::Verdicts;
use super::{claim_output, file_hash};
use crate::lora::LoraFile;
use crate::model::folder::ModelFolder;
use crate::sample::image::Rgb8;
use crate::{Error, Result};

/// The adapter names the LoRA and the DistillPatch carry on the model.
const LORA: &str = "lora";
const PATCH: &str = "distill-patch";

/// What `metrics.json` holds: the verdicts and what they were measured on. Written last, so
/// its presence means the validation finished.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub lora: PathBuf,
    /// blake3 of the LoRA file's bytes.
    pub lora_blake3: String,
    /// The plan as TOML.
    pub plan: String,
    pub prompts: Vec<String>,
    pub verdicts: Verdicts,
}

impl Record {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(path, format!("not a zlora validation record: {e}")))
    }
}

pub struct Outcome {
    pub report: PathBuf,
    pub sheets: Vec<PathBuf>,
    pub record: Record,
}

pub fn validate(
    plan: &ValidationPlan,
    overwrite: bool,
    events: &mut dyn FnMut(Event),
) -> Result<Outcome> {
    plan.check()?;
    let mut inputs = vec![
        ("the LoRA", plan.lora.as_path()),
        ("the Base model", Path::new(&plan.base)),
        ("the Turbo model", Path::new(&plan.turbo)),
    ];
    inputs.extend(
        plan.distill_patch
            .as_deref()
            .map(|p| ("the DistillPatch", p)),
    );
    let (out, _claimed) = claim_output(&plan.output, overwrite, &inputs)?;
    let dim = ModelFolder::open(&plan.turbo)?.transformer_config()?.dim;
    let lora = LoraFile::read_for_dim(&plan.lora, dim)?;
    let patch = match &plan.distill_patch {
        Some(p) => Some(LoraFile::read_for_dim(p, dim)?),
        None => None,
    };
    let prompts = plan
        .render
        .prompts_or_default(trigger_word(&lora.metadata).as_deref());
    let variants = plan.variants();
    let seeds = &plan.render.seeds;
    if !overwrite {
        let keys: Vec<String> = variants.iter().map(|v| v.id.key().to_string()).collect();
        out.refuse_existing(prompts.len(), &keys, seeds)?;
    }
    let mut progress = Progress::new(variants.len() * prompts.len() * seeds.len(), events);
    let mut images = BTreeMap::new();
    for checkpoint in [Checkpoint::Base, Checkpoint::Turbo] {
        let group: Vec<Variant> = variants
            .iter()
            .filter(|v| v.checkpoint == checkpoint)
            .copied()
            .collect();
        let (rendered, shift) = render_group(
            plan,
            checkpoint,
            &group,
            &lora,
            patch.as_ref(),
            &prompts,
            &mut progress,
        )?;
        for (v, imgs) in group.iter().zip(rendered) {
            let params = parameters(plan, v, shift);
            out.save_images(v.id.key(), &params, &prompts, seeds, &imgs)?;
            images.insert(v.id, imgs);
        }
    }
    progress.stage("measuring");
    let verdicts = Verdicts::measure(&images)?;
    let rows: Vec<(String, &[Rgb8])> = variants
        .iter()
        .map(|v| (v.label(), images[&v.id].as_slice()))
        .collect();
    let sheets = out.write_sheets(&prompts, seeds, &rows, overwrite)?;
    let record = Record {
        lora: plan.lora.clone(),
        lora_blake3: file_hash(&plan.lora)?,
        plan: toml::to_string(plan).map_err(|e| Error::Invalid(e.to_string()))?,
        prompts,
        verdicts,
    };
    let html = report(plan, &lora, &variants, &record, &sheets);
    out.finish(&html, &record, overwrite)?;
    Ok(Outcome {
        report: out.report(),
        sheets: (0..record.prompts.len()).map(|p| out.sheet(p)).collect(),
        record,
    })
}

/// Renders the variants of one checkpoint with one load; returns their images (in `group`
/// order) and the model's scheduler shift (for the images' parameters).
fn render_group(
    plan: &ValidationPlan,
    checkpoint: Checkpoint,
    group: &[Variant],
    lora: &LoraFile,
    patch: Option<&LoraFile>,
    prompts: &[String],
    progress: &mut Progress,
) -> Result<(Vec<Vec<Rgb8>>, f64)> {
    let model = plan.model(checkpoint);
    let cfg = group.iter().any(|v| v.sampling.guidance > 0.0);
    let mut session = Session::open(model, &plan.render, prompts, cfg, progress)?;
    session.attach(lora, LORA, plan.lora_strength)?;
    if let Some(p) = patch.filter(|_| group.iter().any(|v| v.distill_patch)) {
        session.attach(p, PATCH, plan.distill_patch_strength)?;
    }
    let mut latents = Vec::new();
    for v in group {
        progress.stage(&format!("rendering {}", v.label()));
        session.set_enabled(LORA, v.lora);
        session.set_enabled(PATCH, v.distill_patch);
        latents.push(session.denoise_all(v.sampling, progress)?);
    }
    let shift = session.shift();
    progress.stage(&format!("{model}: decoding"));
    Ok((session.decode(latents)?, shift))
}

/// The parameters every image of variant `v` shares (prompt and seed are added per image).
fn parameters(plan: &ValidationPlan, v: &Variant, shift: f64) -> serde_json::Value {
    let model = plan.model(v.checkpoint);
    let mut loras = Vec::new();
    if v.lora {
        loras
            .push(json!({"file": plan.lora.display().to_string(), "strength": plan.lora_strength}));
    }
    if let (true, Some(p)) = (v.distill_patch, &plan.distill_patch) {
        loras.push(
            json!({"file": p.display().to_string(), "strength": plan.distill_patch_strength}),
        );
    }
    let r = &plan.render;
    json!({
        "software": "zlora",
        "model": model,
        "negative_prompt": (v.sampling.guidance > 0.0).then_some(&r.negative_prompt),
        "width": r.width, "height": r.height,
        "steps": v.sampling.steps,
        "guidance": v.sampling.guidance,
        "shift": shift,
        "loras": loras,
        "dtype": r.dtype.name(),
    })
}

/// The report page: verdicts, per-variant metrics, the sheets, the plan, the LoRA's metadata.
fn report(
    plan: &ValidationPlan,
    lora: &LoraFile,
    variants: &[Variant],
    record: &Record,
    sheets: &[(String, Vec<u8>)],
) -> String {
    let title = format!("zlora validation: {}", plan.lora.display());
    let mut page = Page::new(&title);
    let r = &plan.render;
    page.paragraph(&format!(
        "LoRA {} on Base {} and Turbo {}; {} prompts × {} seeds at {}×{}; every variant starts from the same noise per seed.",
        plan.lora.display(), plan.base, plan.turbo, record.prompts.len(), r.seeds.len(), r.width, r.height
    ));
    page.heading("Verdicts");
    let rows: Vec<Vec<Cell>> = findings(&record.verdicts, &plan.sampling)
        .iter()
        .map(|f| {
            let verdict = match f.state {
                Some(s) => Cell::state(&f.verdict, s),
                None => Cell::plain(&f.verdict),
            };
            vec![
                Cell::plain(&f.check),
                Cell::plain(&f.measured),
                Cell::plain(&f.rule),
                verdict,
            ]
        })
        .collect();
    page.table(&["check", "measured", "rule", "verdict"], &rows);
    page.heading("Metrics per variant");
    page.table(
        &[
            "variant",
            "mean sharpness (variance of Laplacian)",
            "effect (1 − SSIM to reference)",
            "mean pairwise SSIM",
        ],
        &variant_rows(variants, &record.verdicts),
    );
    page.heading("Contact sheets (rows: variants, columns: seeds)");
    for (caption, png) in sheets {
        page.image(png, caption);
    }
    page.heading("Plan");
    page.preformatted(&record.plan);
    page.heading("LoRA metadata");
    page.key_values(&lora.metadata);
    page.finish(&title)
}

fn variant_rows(variants: &[Variant], v: &Verdicts) -> Vec<Vec<Cell>> {
    let number = |x: Option<f64>, digits: usize| x.map_or("".into(), |x| format!("{x:.digits$}"));
    variants
        .iter()
        .map(|var| {
            // Effect against the variant's reference; diversity as mean pairwise SSIM.
            let (effect, similarity) = match var.id {
                VariantId::Base => (None, v.base.similarity_reference),
                VariantId::BaseLora => (Some(v.base.effect), v.base.similarity_lora),
                VariantId::Turbo => (None, v.turbo.similarity_reference),
                VariantId::TurboLora => (Some(v.turbo.effect), v.turbo.similarity_lora),
                VariantId::TurboLoraLong => (None, None),
                VariantId::TurboLoraPatch => (v.patch.as_ref().map(|p| p.effect_with), None),
            };
            vec![
                Cell::plain(&var.label()),
                Cell::plain(&number(v.sharpness.get(&var.id).copied(), 1)),
                Cell::plain(&number(effect, 3)),
                Cell::plain(&number(similarity, 3)),
            ]
        })
        .collect()
}
