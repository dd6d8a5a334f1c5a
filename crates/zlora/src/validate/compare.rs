//! A sweep's comparison of its arms: `sweep.json` (each arm's values, verdicts, score and
//! final loss; the best arm) and `report.html` (the table with the best arm marked, the loss
//! curves overlaid, every arm's validation images side by side per prompt and seed).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::arm_set::ArmSet;
use super::arms::{Arm, ArmValues};
use super::chart::{line_chart, Series};
use super::findings::effect_state;
use super::grid::SweepPlan;
use super::html::{Cell, Page, State};
use super::metrics::EffectVerdict;
use super::plan::VariantId;
use super::run::Record;
use super::verdicts::Verdicts;
use super::{sheet_png, Outputs};
use crate::fsutil::write_atomic;
use crate::sample::image::{encode_png, read_png, Rgb8};
use crate::train::log::StepLog;
use crate::{Error, Result};

/// One arm in `sweep.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArmSummary {
    pub name: String,
    /// The arm's mode, rank, learning rate, steps and training dataset.
    pub values: ArmValues,
    pub run: PathBuf,
    pub validation: PathBuf,
    /// The overall verdict: learning, not learning or overfit.
    pub verdict: EffectVerdict,
    pub base_effect: f64,
    pub turbo_effect: f64,
    /// Turbo + LoRA at the distilled step count against the long count and plain Turbo.
    pub sharpness_vs_long: f64,
    pub sharpness_vs_plain: f64,
    pub blurred: bool,
    /// [`score`]; None when the arm is not eligible.
    pub score: Option<f64>,
    /// The smoothed loss of the run's last logged step.
    pub final_loss: Option<f64>,
}

/// `sweep.json`: every arm in plan order, and the best one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SweepSummary {
    pub arms: Vec<ArmSummary>,
    pub best: Option<String>,
    pub report: PathBuf,
}

/// The validation score of an arm: its effect on Turbo at the distilled step count times
/// min(1, its sharpness ratio there) — the checkpoint sweep's score on Turbo — for an arm
/// that learns on Turbo, overfits on neither model and is not blurred; None for the others.
pub fn score(v: &Verdicts) -> Option<f64> {
    let eligible = v.turbo.verdict == EffectVerdict::Learning
        && v.base.verdict != EffectVerdict::Overfit
        && !v.blur.blurred;
    let ratio = v.blur.vs_long.min(v.blur.vs_plain);
    eligible.then(|| v.turbo.effect * ratio.min(1.0))
}

/// The arm with the highest score, the earlier one on a tie; None when none is eligible.
pub fn best(arms: &[ArmSummary]) -> Option<usize> {
    let mut best: Option<(usize, f64)> = None;
    for (i, a) in arms.iter().enumerate() {
        if let Some(s) = a.score {
            if best.is_none_or(|(_, b)| s > b) {
                best = Some((i, s));
            }
        }
    }
    best.map(|(i, _)| i)
}

/// The run's smoothed loss per logged step.
fn loss_curve(run: &Path) -> Result<Vec<(f64, f64)>> {
    let path = run.join("log.jsonl");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<StepLog>(l).ok())
        .map(|s| (s.step as f64, s.loss_smoothed))
        .collect())
}

fn summarize(arm: &Arm, record: &Record, curve: &[(f64, f64)]) -> ArmSummary {
    let v = &record.verdicts;
    ArmSummary {
        name: arm.name.clone(),
        values: arm.settings(),
        run: arm.run_dir().to_path_buf(),
        validation: arm.validation.output.join("report.html"),
        verdict: v.overall(),
        base_effect: v.base.effect,
        turbo_effect: v.turbo.effect,
        sharpness_vs_long: v.blur.vs_long,
        sharpness_vs_plain: v.blur.vs_plain,
        blurred: v.blur.blurred,
        score: score(v),
        final_loss: curve.last().map(|p| p.1),
    }
}

/// Writes `report.html`, `loss.png` and `sweep.json` (last) for the arms' records.
pub fn write_report(plan: &SweepPlan, records: &[Record]) -> Result<SweepSummary> {
    let curves: Vec<Vec<(f64, f64)>> = plan
        .arms
        .iter()
        .map(|a| loss_curve(a.run_dir()))
        .collect::<Result<_>>()?;
    let arms: Vec<ArmSummary> = plan
        .arms
        .iter()
        .zip(records)
        .zip(&curves)
        .map(|((a, r), c)| summarize(a, r, c))
        .collect();
    let best = best(&arms);
    let out = plan.output();
    let chart = loss_chart(plan, &curves)?;
    write_atomic(&out.join("loss.png"), &chart, true)?;
    let html = report(plan, records, &arms, best, &chart)?;
    let summary = SweepSummary {
        best: best.map(|i| arms[i].name.clone()),
        arms,
        report: out.join("report.html"),
    };
    write_atomic(&summary.report, html.as_bytes(), true)?;
    let json = serde_json::to_string_pretty(&summary).map_err(|e| Error::Invalid(e.to_string()))?;
    write_atomic(&out.join("sweep.json"), json.as_bytes(), true)?;
    Ok(summary)
}

/// Distinct line colours, reused in order past eight arms.
const PALETTE: [[u8; 3]; 8] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
    [227, 119, 194],
    [23, 190, 207],
];

fn loss_chart(plan: &SweepPlan, curves: &[Vec<(f64, f64)>]) -> Result<Vec<u8>> {
    let series: Vec<Series> = plan
        .arms
        .iter()
        .zip(curves)
        .enumerate()
        .map(|(i, (a, c))| Series {
            name: a.name.clone(),
            color: PALETTE[i % PALETTE.len()],
            points: c.clone(),
        })
        .collect();
    let img = line_chart("training loss (smoothed)", "step", &series, None)?;
    encode_png(&img, &[("parameters", "zlora sweep loss curves".into())])
}

fn report(
    plan: &SweepPlan,
    records: &[Record],
    arms: &[ArmSummary],
    best: Option<usize>,
    chart: &[u8],
) -> Result<String> {
    let p = &plan.plan;
    let title = format!("zlora sweep: {}", p.output.display());
    let mut page = Page::new(&title);
    page.paragraph(&format!(
        "{} arms trained with the plan's shared settings, each validated on Base {} and Turbo {} with identical prompts, seeds and noise.",
        arms.len(), p.base, p.turbo
    ));
    page.paragraph(&match best {
        Some(i) => format!("Best by validation score: {}.", arms[i].name),
        None => {
            "No arm is eligible for the best: each is not learning on Turbo, overfit or blurred."
                .into()
        }
    });
    page.table(&TABLE_HEAD, &table_rows(arms, best));
    page.paragraph(
        "Score: effect on Turbo × min(1, sharpness ratio) for arms learning on Turbo, overfit on neither model and not blurred; the earlier arm wins a tie.",
    );
    page.heading("Loss");
    page.image(chart, "training loss (smoothed) of every arm against step");
    page.heading("Samples (rows: arms, columns: seeds; same prompt, seed and noise)");
    for (png, caption) in sample_sheets(plan, records)? {
        page.image(&png, &caption);
    }
    page.heading("Arms");
    for a in arms {
        page.link(
            &relative_to(&a.validation, &p.output),
            &format!("{}: full validation report", a.name),
        );
    }
    page.heading("Plan");
    page.preformatted(&plan.text);
    Ok(page.finish(&title))
}

const TABLE_HEAD: [&str; 11] = [
    "arm",
    "mode",
    "rank",
    "learning rate",
    "steps",
    "dataset",
    "final loss",
    "effect on Base",
    "effect on Turbo",
    "sharpness (vs long / vs Turbo)",
    "score",
];

fn table_rows(arms: &[ArmSummary], best: Option<usize>) -> Vec<Vec<Cell>> {
    let opt = |v: Option<String>| Cell::plain(&v.unwrap_or_default());
    arms.iter()
        .enumerate()
        .map(|(i, a)| {
            let v = &a.values;
            let name = if best == Some(i) {
                Cell::state(&format!("{} (best)", a.name), State::Good)
            } else {
                Cell::plain(&a.name)
            };
            let blur = format!(
                "×{:.2} / ×{:.2} {}",
                a.sharpness_vs_long,
                a.sharpness_vs_plain,
                if a.blurred { "blurred" } else { "sharp" }
            );
            let blur_state = if a.blurred { State::Bad } else { State::Good };
            vec![
                name,
                opt(v.mode.clone()),
                opt(v.rank.map(|r| r.to_string())),
                opt(v.learning_rate.map(|r| r.to_string())),
                opt(v.steps.map(|r| r.to_string())),
                opt(v.dataset.clone()),
                Cell::plain(&a.final_loss.map_or("—".into(), |l| format!("{l:.4}"))),
                Cell::plain(&format!("{:.3}", a.base_effect)),
                Cell::plain(&format!("{:.3}", a.turbo_effect)),
                Cell::state(&blur, blur_state),
                match a.score {
                    Some(s) => Cell::plain(&format!("{s:.3}")),
                    None => Cell::state(
                        &format!("— ({})", a.verdict.label()),
                        effect_state(a.verdict),
                    ),
                },
            ]
        })
        .collect()
}

/// Per prompt and model, one sheet: the model without LoRA, then each arm's LoRA, over the
/// validation's seeds (every arm's images of one seed start from the same noise).
fn sample_sheets(plan: &SweepPlan, records: &[Record]) -> Result<Vec<(Vec<u8>, String)>> {
    let r = &plan.plan.render;
    let s = &plan.plan.sampling;
    let prompts = records.first().map_or(0, |rec| rec.prompts.len());
    let cols: Vec<String> = r.seeds.iter().map(|s| format!("seed {s}")).collect();
    let mut sheets = Vec::new();
    for p in 0..prompts {
        for (model, reference, with_lora, steps) in [
            ("Base", VariantId::Base, VariantId::BaseLora, s.base.steps),
            (
                "Turbo",
                VariantId::Turbo,
                VariantId::TurboLora,
                s.turbo.steps,
            ),
        ] {
            let mut labels = vec![format!("{model}, no LoRA")];
            let mut rows = vec![images(&plan.arms[0], p, reference, &r.seeds)?];
            for arm in &plan.arms {
                labels.push(arm.name.clone());
                rows.push(images(arm, p, with_lora, &r.seeds)?);
            }
            let caption = format!(
                "prompt {}: {} — {model}, {steps} steps",
                p + 1,
                records[0].prompts[p]
            );
            let cells = rows.iter().map(|row| row.iter().collect()).collect();
            sheets.push((sheet_png(&caption, &labels, &cols, cells)?, caption));
        }
    }
    Ok(sheets)
}

fn images(arm: &Arm, prompt: usize, variant: VariantId, seeds: &[u64]) -> Result<Vec<Rgb8>> {
    let out = Outputs {
        dir: arm.validation.output.clone(),
    };
    seeds
        .iter()
        .map(|&seed| Ok(read_png(&out.image(prompt, variant.key(), seed))?.0))
        .collect()
}

/// `path` relative to `base` when inside it (links in a report that moves with its folder).
fn relative_to(path: &Path, base: &Path) -> String {
    path.strip_prefix(base)
        .unwrap_or(path)
        .display()
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::metrics::EffectCheck;
    use crate::validate::verdicts::BlurCheck;

    fn verdicts(turbo: f64, turbo_verdict: EffectVerdict, ratio: f64) -> Verdicts {
        let check = |effect, verdict| EffectCheck {
            effect,
            similarity_lora: None,
            similarity_reference: None,
            diversity_ratio: None,
            verdict,
        };
        Verdicts {
            sharpness: Default::default(),
            base: check(0.3, EffectVerdict::Learning),
            turbo: check(turbo, turbo_verdict),
            blur: BlurCheck {
                vs_long: ratio,
                vs_plain: 1.0,
                blurred: ratio < super::super::metrics::BLUR_RATIO,
            },
            retention_pct: None,
            patch: None,
        }
    }

    fn summary(name: &str, v: &Verdicts) -> ArmSummary {
        ArmSummary {
            name: name.into(),
            values: ArmValues::default(),
            run: PathBuf::new(),
            validation: PathBuf::new(),
            verdict: v.overall(),
            base_effect: v.base.effect,
            turbo_effect: v.turbo.effect,
            sharpness_vs_long: v.blur.vs_long,
            sharpness_vs_plain: v.blur.vs_plain,
            blurred: v.blur.blurred,
            score: score(v),
            final_loss: None,
        }
    }

    #[test]
    fn the_best_arm_learns_on_turbo_stays_sharp_and_scores_highest() {
        let arms = [
            summary("weak", &verdicts(0.1, EffectVerdict::Learning, 1.0)),
            summary("soft", &verdicts(0.4, EffectVerdict::Learning, 0.8)),
            summary("blurred", &verdicts(0.6, EffectVerdict::Learning, 0.5)),
            summary("overfit", &verdicts(0.9, EffectVerdict::Overfit, 1.0)),
            summary("tie", &verdicts(0.32, EffectVerdict::Learning, 1.0)),
        ];
        assert!((arms[1].score.unwrap() - 0.32).abs() < 1e-12);
        assert_eq!(arms[2].score, None);
        assert_eq!(arms[3].score, None);
        assert_eq!(best(&arms), Some(1), "the earlier arm wins the tie");
        assert_eq!(best(&arms[2..4]), None);
    }
}
