//! `zlora validate --checkpoints RUN_DIR`: every saved checkpoint of a training run on the
//! run's own model at the run's sampling settings, against the model without LoRA; metrics
//! against step as a chart, and the step that balances effect and sharpness best.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::chart::{line_chart, Series};
use super::findings::{effect_measured, effect_rule, effect_state};
use super::html::{Cell, Page, State};
use super::metrics::{sharpness, sharpness_ratio, EffectCheck, EffectVerdict, BLUR_RATIO};
use super::plan::{default_prompts, trigger_word, Precision, RenderSettings, StepsGuidance};
use super::render::{Event, Progress, Session};
use super::{claim_output, file_hash, Outputs};
use crate::fsutil::write_atomic;
use crate::lora::LoraFile;
use crate::sample::image::{encode_png, Rgb8};
use crate::train::config::TrainConfig;
use crate::train::state::checkpoints_dir;
use crate::{Error, Result};

/// The adapter name each checkpoint's LoRA carries while it is rendered.
const CHECKPOINT: &str = "checkpoint";
/// The variant key of the images without LoRA.
const REFERENCE: &str = "no-lora";

#[derive(Debug, Clone)]
pub struct SweepRequest {
    pub run: PathBuf,
    pub output: PathBuf,
    /// Empty: the run's sample prompts, else the default compositions with its trigger.
    pub prompts: Vec<String>,
    /// Empty: the run's sample seeds.
    pub seeds: Vec<u64>,
    /// The image size (default: the run's sample size, else its dataset resolution).
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub dtype: Precision,
    pub overwrite: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointMetrics {
    pub step: u64,
    pub effect: EffectCheck,
    /// Median sharpness ratio against the model without LoRA.
    pub sharpness_ratio: f64,
    pub blurred: bool,
    /// effect · min(1, sharpness ratio) for checkpoints that learn, are not overfit and not
    /// blurred; None for the others.
    pub score: Option<f64>,
}

impl CheckpointMetrics {
    fn new(step: u64, effect: EffectCheck, sharpness_ratio: f64) -> Self {
        let blurred = sharpness_ratio < BLUR_RATIO;
        let eligible = effect.verdict == EffectVerdict::Learning && !blurred;
        let score = eligible.then(|| effect.effect * sharpness_ratio.min(1.0));
        Self {
            step,
            effect,
            sharpness_ratio,
            blurred,
            score,
        }
    }
}

/// The best balance: the highest score, the earlier step on a tie (less training, less risk
/// of overfitting). None when no checkpoint is eligible.
pub fn best_step(checkpoints: &[CheckpointMetrics]) -> Option<u64> {
    let mut best: Option<(u64, f64)> = None;
    for c in checkpoints {
        if let Some(s) = c.score {
            if best.is_none_or(|(_, b)| s > b) {
                best = Some((c.step, s));
            }
        }
    }
    best.map(|(step, _)| step)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepRecord {
    pub run: PathBuf,
    pub mode: String,
    pub model: String,
    pub sampling: StepsGuidance,
    pub prompts: Vec<String>,
    pub seeds: Vec<u64>,
    pub checkpoints: Vec<CheckpointMetrics>,
    pub best_step: Option<u64>,
}

pub struct SweepOutcome {
    pub report: PathBuf,
    pub chart: PathBuf,
    pub record: SweepRecord,
}

/// The run's checkpoints with a LoRA file, by step.
pub fn checkpoints(run: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let dir = checkpoints_dir(run);
    let out: Vec<(u64, PathBuf)> = crate::train::state::complete(run)?
        .into_iter()
        .map(|(step, path)| (step, path.join("lora.safetensors")))
        .filter(|(_, lora)| lora.is_file())
        .collect();
    if out.is_empty() {
        return Err(Error::bad_file(
            &dir,
            "no checkpoints (step-*/lora.safetensors) in this folder",
        ));
    }
    Ok(out)
}

/// The run's training config: the one the checkpoint's state.json keeps (with the local
/// paths), else the `zlora.config` metadata zlora writes into every LoRA (where paths may be
/// cut to their names, [`crate::train::config::OutputSection`]), plus the trigger word.
fn run_config(lora: &Path) -> Result<(TrainConfig, Option<String>)> {
    let header = crate::lora::LoraHeader::read(lora)?;
    let saved = lora
        .parent()
        .and_then(|dir| crate::train::state::read_state(dir).ok())
        .and_then(|state| state.config);
    let text = saved
        .as_ref()
        .or_else(|| header.metadata.get("zlora.config"))
        .ok_or_else(|| {
            Error::bad_file(
                lora,
                "has no zlora.config metadata: not a checkpoint of a zlora training run",
            )
        })?;
    let cfg = TrainConfig::parse(text)
        .map_err(|e| Error::bad_file(lora, format!("its zlora.config is invalid: {e}")))?;
    Ok((cfg, trigger_word(&header.metadata)))
}

/// Prompts, seeds and size: the request's, else the run's [sample] settings.
fn render_settings(req: &SweepRequest, cfg: &TrainConfig, trigger: Option<&str>) -> RenderSettings {
    let s = &cfg.sample;
    let prompts = if !req.prompts.is_empty() {
        req.prompts.clone()
    } else if !s.prompts.is_empty() {
        s.prompts.clone()
    } else {
        default_prompts(trigger)
    };
    let resolution = cfg.resolution() as usize;
    RenderSettings {
        prompts,
        seeds: if req.seeds.is_empty() {
            s.seeds.clone()
        } else {
            req.seeds.clone()
        },
        negative_prompt: s.negative_prompt.clone(),
        width: req.width.or(s.width).unwrap_or(resolution),
        height: req.height.or(s.height).unwrap_or(resolution),
        dtype: req.dtype,
        // The base the LoRA was trained on.
        quantize: cfg.model.quantize,
        blocks_on_device: cfg.model.blocks_on_device,
        quantize_text_encoder: cfg.model.quantize_text_encoder,
    }
}

pub fn sweep(req: &SweepRequest, events: &mut dyn FnMut(Event)) -> Result<SweepOutcome> {
    let ckpts = checkpoints(&req.run)?;
    let newest = &ckpts[ckpts.len() - 1].1;
    let (cfg, trigger) = run_config(newest)?;
    let render = render_settings(req, &cfg, trigger.as_deref());
    render.check()?;
    let (steps, guidance) = cfg.mode().sampling();
    let sampling = StepsGuidance {
        steps: cfg.sample.steps.unwrap_or(steps),
        guidance: cfg.sample.guidance.unwrap_or(guidance),
    };
    let model = Path::new(&cfg.model.path);
    let inputs = [
        ("the training run", req.run.as_path()),
        ("the model", model),
    ];
    let (out, _claimed) = claim_output(&req.output, req.overwrite, &inputs)?;
    let keys: Vec<String> = std::iter::once(REFERENCE.to_string())
        .chain(ckpts.iter().map(|(s, _)| format!("step-{s:06}")))
        .collect();
    if !req.overwrite {
        out.refuse_existing(render.prompts.len(), &keys, &render.seeds)?;
        super::refuse_existing(&[chart_path(&out)])?;
    }
    let mut progress = Progress::new(
        keys.len() * render.prompts.len() * render.seeds.len(),
        events,
    );
    let model = &cfg.model.path;
    let (images, shift) = render_checkpoints(model, &render, sampling, &ckpts, &mut progress)?;
    for (i, (key, imgs)) in keys.iter().zip(&images).enumerate() {
        let loras = match i.checked_sub(1) {
            Some(c) => json!([{"file": ckpts[c].1.display().to_string(), "strength": 1.0}]),
            None => json!([]),
        };
        let params = json!({
            "software": "zlora", "model": model, "width": render.width, "height": render.height,
            "negative_prompt": (sampling.guidance > 0.0).then_some(&render.negative_prompt),
            "steps": sampling.steps, "guidance": sampling.guidance, "shift": shift,
            "loras": loras, "dtype": render.dtype.name(),
        });
        out.save_images(key, &params, &render.prompts, &render.seeds, imgs)?;
    }
    progress.stage("measuring");
    let metrics = measure(&ckpts, &images)?;
    let record = SweepRecord {
        run: req.run.clone(),
        mode: cfg.mode().name().into(),
        model: model.clone(),
        sampling,
        prompts: render.prompts.clone(),
        seeds: render.seeds.clone(),
        best_step: best_step(&metrics),
        checkpoints: metrics,
    };
    let labels = std::iter::once("no LoRA".to_string())
        .chain(ckpts.iter().map(|(s, _)| format!("step {s}")));
    let rows: Vec<(String, &[Rgb8])> = labels.zip(images.iter().map(Vec::as_slice)).collect();
    let sheets = out.write_sheets(&render.prompts, &render.seeds, &rows, req.overwrite)?;
    let chart = encode_png(&chart(&record)?, &[])?;
    write_atomic(&chart_path(&out), &chart, req.overwrite)?;
    let html = report(&record, &chart, &sheets, &cfg, newest)?;
    out.finish(&html, &record, req.overwrite)?;
    Ok(SweepOutcome {
        report: out.report(),
        chart: chart_path(&out),
        record,
    })
}

/// The model without LoRA, then each checkpoint attached in turn, on one load; returns the
/// images (one group per row of the sheets) and the model's scheduler shift.
fn render_checkpoints(
    model: &str,
    render: &RenderSettings,
    sampling: StepsGuidance,
    ckpts: &[(u64, PathBuf)],
    progress: &mut Progress,
) -> Result<(Vec<Vec<Rgb8>>, f64)> {
    let cfg = sampling.guidance > 0.0;
    let mut session = Session::open(model, render, &render.prompts, cfg, progress)?;
    progress.stage("rendering without LoRA");
    let mut latents = vec![session.denoise_all(sampling, progress)?];
    for (step, path) in ckpts {
        let lora = LoraFile::read_for_dim(path, session.dim())?;
        session.attach(&lora, CHECKPOINT, 1.0)?;
        progress.stage(&format!("rendering step {step}"));
        latents.push(session.denoise_all(sampling, progress)?);
        session.detach(CHECKPOINT);
    }
    let shift = session.shift();
    progress.stage("decoding");
    Ok((session.decode(latents)?, shift))
}

fn chart_path(out: &Outputs) -> PathBuf {
    out.dir.join("metrics.png")
}

/// Each checkpoint's images against the reference (`images[0]`).
fn measure(ckpts: &[(u64, PathBuf)], images: &[Vec<Rgb8>]) -> Result<Vec<CheckpointMetrics>> {
    let (reference, rest) = images
        .split_first()
        .ok_or_else(|| Error::Invalid("nothing was rendered".into()))?;
    let ref_sharpness: Vec<f64> = reference.iter().map(sharpness).collect();
    ckpts
        .iter()
        .zip(rest)
        .map(|((step, _), imgs)| {
            let s: Vec<f64> = imgs.iter().map(sharpness).collect();
            let effect = EffectCheck::measure(imgs, reference)?;
            Ok(CheckpointMetrics::new(
                *step,
                effect,
                sharpness_ratio(&s, &ref_sharpness)?,
            ))
        })
        .collect()
}

fn chart(r: &SweepRecord) -> Result<Rgb8> {
    let series = |name: &str, color, f: &dyn Fn(&CheckpointMetrics) -> Option<f64>| Series {
        name: name.into(),
        color,
        points: r
            .checkpoints
            .iter()
            .map(|c| (c.step as f64, f(c).unwrap_or(f64::NAN)))
            .collect(),
    };
    let all = [
        series("effect", [200, 40, 40], &|c| Some(c.effect.effect)),
        series("sharpness ratio", [40, 80, 200], &|c| {
            Some(c.sharpness_ratio)
        }),
        series("diversity kept", [30, 150, 60], &|c| {
            c.effect.diversity_ratio
        }),
    ];
    let label = r.best_step.map(|s| format!("best: step {s}"));
    let marker = r
        .best_step
        .zip(label.as_deref())
        .map(|(s, l)| (s as f64, l));
    line_chart(
        &format!("{}: metrics by checkpoint", r.mode),
        "training step",
        &all,
        marker,
    )
}

fn report(
    r: &SweepRecord,
    chart: &[u8],
    sheets: &[(String, Vec<u8>)],
    cfg: &TrainConfig,
    newest: &Path,
) -> Result<String> {
    let title = format!("zlora checkpoint sweep: {}", r.run.display());
    let mut page = Page::new(&title);
    page.paragraph(&format!(
        "{} checkpoints of a {} run on {} at {} steps, guidance {}; {} prompts × {} seeds, identical noise per seed.",
        r.checkpoints.len(), r.mode, r.model, r.sampling.steps, r.sampling.guidance, r.prompts.len(), r.seeds.len()
    ));
    match r.best_step {
        Some(s) => page.paragraph(&format!("Best balance of effect and sharpness: step {s} (highest effect · min(1, sharpness ratio) among checkpoints that learn, are not overfit and not blurred).")),
        None => page.paragraph("No checkpoint qualifies: every one is not learning, overfit or blurred."),
    }
    page.image(chart, "effect, sharpness ratio and diversity kept by step");
    page.heading("Checkpoints");
    let rows: Vec<Vec<Cell>> = r
        .checkpoints
        .iter()
        .map(|c| {
            let blur = if c.blurred {
                Cell::state("blurred", State::Bad)
            } else {
                Cell::state("sharp", State::Good)
            };
            vec![
                Cell::plain(&c.step.to_string()),
                Cell::plain(&effect_measured(&c.effect)),
                Cell::state(c.effect.verdict.label(), effect_state(c.effect.verdict)),
                Cell::plain(&format!("×{:.2}", c.sharpness_ratio)),
                blur,
                Cell::plain(&c.score.map_or("—".into(), |s| format!("{s:.3}"))),
            ]
        })
        .collect();
    page.table(
        &[
            "step",
            "measured",
            "effect verdict",
            "sharpness vs no LoRA",
            "blur",
            "score",
        ],
        &rows,
    );
    page.paragraph(&format!(
        "Effect rule: {}. Blurred: sharpness ratio < {BLUR_RATIO}.",
        effect_rule()
    ));
    page.heading("Contact sheets (rows: checkpoints, columns: seeds)");
    for (caption, png) in sheets {
        page.image(png, caption);
    }
    page.heading("Training config");
    page.preformatted(&toml::to_string(cfg).map_err(|e| Error::Invalid(e.to_string()))?);
    page.paragraph(&format!(
        "From the metadata of {} (blake3 {}).",
        newest.display(),
        file_hash(newest)?
    ));
    Ok(page.finish(&title))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(step: u64, effect: f64, verdict: EffectVerdict, ratio: f64) -> CheckpointMetrics {
        let e = EffectCheck {
            effect,
            similarity_lora: None,
            similarity_reference: None,
            diversity_ratio: None,
            verdict,
        };
        CheckpointMetrics::new(step, e, ratio)
    }

    #[test]
    fn the_best_step_learns_stays_sharp_and_is_not_overfit() {
        let cs = [
            check(100, 0.01, EffectVerdict::NotLearning, 1.0),
            check(200, 0.20, EffectVerdict::Learning, 1.1),
            check(300, 0.30, EffectVerdict::Learning, 0.8), // 0.24: best
            check(400, 0.45, EffectVerdict::Learning, 0.6), // blurred
            check(500, 0.60, EffectVerdict::Overfit, 1.0),
        ];
        assert_eq!(best_step(&cs), Some(300));
        assert!(cs[3].blurred && cs[3].score.is_none());
        assert_eq!(best_step(&cs[..1]), None);
        // Ties go to the earlier step.
        let tie = [
            check(1, 0.3, EffectVerdict::Learning, 1.0),
            check(2, 0.3, EffectVerdict::Learning, 1.2),
        ];
        assert_eq!(best_step(&tie), Some(1));
    }
}
