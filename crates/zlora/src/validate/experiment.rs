//! `zlora experiment PLAN.toml`: the workflow's three trainings on one dataset — Base, Turbo
//! with a training adapter, and direct Turbo as the control — sharing every setting except
//! the model and the adapter (the variable under test), then each validated (the direct one
//! with and without the DistillPatch) and compared in one report.
//!
//! The three ways are three arms of [`super::arms`], which makes it resumable: a finished run
//! and a finished validation are not repeated; an interrupted run continues from its newest
//! checkpoint. A stop (a flag the caller sets, e.g. on SIGTERM) ends a training after its
//! step with a checkpoint, and a validation in progress when that validation ends; a rerun
//! continues from there. The arms form an [`ArmSet`], so they may also run one per device
//! or as a Slurm job array ([`super::arm_set`]); the last to finish writes the report.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::arm_set::{self, ArmOutcome, ArmSet};
use super::arms::{self, Arm, ArmValues, ArmsPlan, Event};
use super::findings::effect_state;
use super::html::{Cell, Page, State};
use super::metrics::EffectCheck;
use super::run::Record;
use super::Outputs;
use crate::fsutil::write_atomic;
use crate::train::config::Mode;
use crate::{Error, Result};

/// The three ways, in report order.
pub const WAYS: [Mode; 3] = [Mode::Base, Mode::TurboAdapter, Mode::TurboDirect];

/// An experiment plan: an arms plan (docs/validation.md) with a training adapter and no
/// sweep tables, whose arms are the three ways, named after them.
#[derive(Debug, Clone, PartialEq)]
pub struct ExperimentPlan {
    pub plan: ArmsPlan,
    /// One arm per way, in [`WAYS`] order.
    pub arms: Vec<Arm>,
    pub text: String,
}

pub struct ExperimentOutcome {
    pub report: PathBuf,
    /// Each way with its validation record.
    pub results: Vec<(Mode, Record)>,
}

impl ExperimentPlan {
    /// Reads the plan and builds the three training configs, so a typo in any table is an
    /// error naming the file before anything runs.
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::parse(path, &crate::fsutil::read_text(path)?)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let plan = ArmsPlan::parse(path, text)?;
        let check = || -> Result<Vec<Arm>> {
            if plan.grid.is_some() || !plan.arms.is_empty() || plan.de_turbo.is_some() {
                return Err(Error::Invalid(
                    "[grid], [[arm]] and de_turbo belong in a `zlora sweep` plan; an experiment trains base, turbo-adapter and turbo-direct".into(),
                ));
            }
            WAYS.iter()
                .map(|way| {
                    let values = ArmValues {
                        mode: Some(way.name().into()),
                        ..ArmValues::default()
                    };
                    plan.arm(way.name(), &values)
                })
                .collect()
        };
        let arms = check().map_err(|e| Error::bad_file(path, e.to_string()))?;
        Ok(Self {
            plan,
            arms,
            text: text.to_string(),
        })
    }
}

impl ArmSet for ExperimentPlan {
    type Report = ExperimentOutcome;
    const COMMAND: &'static str = "experiment";

    fn parts(&self) -> (&ArmsPlan, &[Arm], &str) {
        (&self.plan, &self.arms, &self.text)
    }

    /// `report.html`, the three ways compared.
    fn write_report(&self, records: &[Record]) -> Result<ExperimentOutcome> {
        let results: Vec<(Mode, Record)> = WAYS.into_iter().zip(records.iter().cloned()).collect();
        let path = self.output().join("report.html");
        write_atomic(&path, report(self, &results)?.as_bytes(), true)?;
        Ok(ExperimentOutcome {
            report: path,
            results,
        })
    }

    /// Each way's validation record, beside the report.
    fn written_report(&self) -> Result<ExperimentOutcome> {
        let report = self.output().join("report.html");
        if !report.is_file() {
            return Err(Error::bad_file(
                &report,
                "is missing: the experiment's arms have not all finished; run it again",
            ));
        }
        let mut results = Vec::new();
        for (way, arm) in WAYS.into_iter().zip(&self.arms) {
            let record = arms::finished(arm)?.ok_or_else(|| {
                Error::Invalid(format!(
                    "arm {}: not finished; run the experiment again",
                    arm.name
                ))
            })?;
            results.push((way, record));
        }
        Ok(ExperimentOutcome { report, results })
    }
}

/// Runs the experiment's arms one after another in this process; `None` when `stop` was set
/// before its end (a rerun continues).
pub fn experiment(
    plan: &ExperimentPlan,
    force: bool,
    stop: Option<Arc<AtomicBool>>,
    events: &mut dyn FnMut(Event),
) -> Result<Option<ExperimentOutcome>> {
    let _claimed = arm_set::prepare(plan, force)?;
    let mut outcome = None;
    // Every arm, even when an earlier one completes the set: a rerun checks each arm (and
    // continues one whose output is missing) before the report stands.
    for index in 0..plan.arms.len() {
        match arm_set::run_one(plan, index, stop.as_ref(), events)? {
            ArmOutcome::Stopped => return Ok(None),
            ArmOutcome::Finished => {}
            ArmOutcome::Completed(o) => outcome = Some(o),
        }
    }
    // The last arm's completion record makes the set complete unless an earlier arm's
    // output changed while this one ran.
    outcome.map(Some).ok_or_else(|| {
        Error::Invalid(format!(
            "{}: an arm's output changed while the experiment ran; run it again",
            plan.output().display()
        ))
    })
}

/// The comparison page: one row per way, then each way's sheets and a link to its report.
fn report(plan: &ExperimentPlan, results: &[(Mode, Record)]) -> Result<String> {
    let plan_text = &plan.text;
    let plan = &plan.plan;
    let title = format!("zlora experiment: {}", plan.output.display());
    let mut page = Page::new(&title);
    page.paragraph(&format!(
        "Three LoRAs trained on one dataset with the same settings; only the model and the training adapter differ. Validated on Base {} and Turbo {} with identical prompts, seeds and noise.",
        plan.base, plan.turbo
    ));
    let fast = plan.sampling.turbo.steps;
    let head = [
        "run".to_string(),
        "effect on Base".into(),
        format!("effect on Turbo ({fast} steps)"),
        "Base → Turbo retention".into(),
        format!("sharpness at {fast} steps (vs long / vs Turbo)"),
        "DistillPatch".into(),
    ];
    let rows: Vec<Vec<Cell>> = results
        .iter()
        .map(|(way, r)| {
            let v = &r.verdicts;
            let effect = |c: &EffectCheck| {
                Cell::state(
                    &format!("{:.3} {}", c.effect, c.verdict.label()),
                    effect_state(c.verdict),
                )
            };
            let blur = format!(
                "×{:.2} / ×{:.2} {}",
                v.blur.vs_long,
                v.blur.vs_plain,
                if v.blur.blurred { "blurred" } else { "sharp" }
            );
            let blur_state = if v.blur.blurred {
                State::Bad
            } else {
                State::Good
            };
            vec![
                Cell::plain(way.name()),
                effect(&v.base),
                effect(&v.turbo),
                Cell::plain(
                    &v.retention_pct
                        .map_or("n/a".into(), |p| format!("{p:.0} %")),
                ),
                Cell::state(&blur, blur_state),
                Cell::plain(v.patch.as_ref().map_or("—", |p| p.verdict.label())),
            ]
        })
        .collect();
    let head: Vec<&str> = head.iter().map(String::as_str).collect();
    page.table(&head, &rows);
    for (way, r) in results {
        page.heading(way.name());
        page.link(
            &format!("validation/{}/report.html", way.name()),
            "full validation report",
        );
        let out = Outputs {
            dir: plan.validation_dir(way.name()),
        };
        for (i, prompt) in r.prompts.iter().enumerate() {
            let path = out.sheet(i);
            let png = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            page.image(&png, &format!("{}: prompt {}: {prompt}", way.name(), i + 1));
        }
    }
    page.heading("Plan");
    page.preformatted(plan_text);
    Ok(page.finish(&title))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::config::TrainConfig;

    const PLAN: &str = r#"
output = "exp"
base = "models/base"
turbo = "models/turbo"
training_adapter = "adapter.safetensors"
distill_patch = "patch.safetensors"

[dataset]
path = "data"
trigger = "zkchar"

[lora]
rank = 4
alpha = 4

[train]
steps = 10
learning_rate = 1e-4
"#;

    fn parse(text: &str) -> Result<ExperimentPlan> {
        ExperimentPlan::parse(Path::new("plan.toml"), text)
    }

    #[test]
    fn the_three_runs_differ_only_in_model_and_adapter() -> Result<()> {
        let plan = parse(PLAN)?;
        let cfgs: Vec<&TrainConfig> = plan.arms.iter().map(|a| &a.config).collect();
        let modes: Vec<Mode> = cfgs.iter().map(|c| c.mode()).collect();
        assert_eq!(modes, WAYS);
        for c in &cfgs[1..] {
            assert_eq!(
                (&c.datasets, &c.lora, &c.sample),
                (&cfgs[0].datasets, &cfgs[0].lora, &cfgs[0].sample)
            );
            let mut train = c.train.clone();
            train.output = cfgs[0].train.output.clone();
            assert_eq!(train, cfgs[0].train, "only the output folder differs");
        }
        assert_eq!(cfgs[0].model.path, "models/base");
        assert_eq!(
            cfgs[1].model.training_adapter.as_deref(),
            Some(Path::new("adapter.safetensors"))
        );
        assert_eq!(cfgs[2].model.training_adapter, None);
        assert_eq!(cfgs[2].train.output, Path::new("exp/runs/turbo-direct"));
        // Only the direct run is validated with the DistillPatch.
        let patched: Vec<bool> = plan
            .arms
            .iter()
            .map(|a| a.validation.distill_patch.is_some())
            .collect();
        assert_eq!(patched, [false, false, true]);
        Ok(())
    }

    #[test]
    fn an_output_in_the_train_table_is_refused() {
        let err = parse(&format!("{PLAN}output = \"mine\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("plan.toml") && err.contains("[train] output"),
            "{err}"
        );
    }

    #[test]
    fn sweep_tables_and_a_missing_adapter_are_refused() {
        let err = parse(&format!("{PLAN}[grid]\nrank = [4, 8]\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("zlora sweep"), "{err}");
        let err = parse(&PLAN.replace("training_adapter = \"adapter.safetensors\"", ""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs `training_adapter`"), "{err}");
    }
}
