//! `zlora experiment PLAN.toml`: the workflow's three trainings on one dataset — Base, Turbo
//! with a training adapter, and direct Turbo as the control — sharing every setting except
//! the model and the adapter (the variable under test), then each validated (the direct one
//! with and without the DistillPatch) and compared in one report.
//!
//! Resumable: a finished run (final LoRA + `experiment-run.json` with its config) and a
//! finished validation (`metrics.json` naming the LoRA's hash and the plan) are not repeated;
//! an interrupted run continues from its newest checkpoint. A stop (a flag the caller sets,
//! e.g. on SIGTERM) ends a training after its step with a checkpoint, and a validation in
//! progress when that validation ends; a rerun continues from there.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::findings::effect_state;
use super::html::{Cell, Page, State};
use super::metrics::EffectCheck;
use super::plan::{RenderSettings, Sampling, ValidationPlan};
use super::render;
use super::run::{validate, Record};
use super::{file_hash, Outputs};
use crate::fsutil::write_atomic;
use crate::outdir::{self, OutputDir, Policy};
use crate::train::config::{Mode, TrainConfig};
use crate::train::resume::SAFE_KEYS;
use crate::train::trainer::{self, train, TrainOptions};
use crate::{Error, Result};

/// The three ways, in report order.
pub const WAYS: [Mode; 3] = [Mode::Base, Mode::TurboAdapter, Mode::TurboDirect];

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentPlan {
    pub output: PathBuf,
    pub base: String,
    pub turbo: String,
    pub training_adapter: PathBuf,
    #[serde(default = "one")]
    pub training_adapter_strength: f64,
    #[serde(default)]
    pub distill_patch: Option<PathBuf>,
    #[serde(default = "one")]
    pub distill_patch_strength: f64,
    /// `[model] base_dtype` of the three runs.
    #[serde(default = "bf16")]
    pub base_dtype: String,
    /// The `[dataset]`, `[lora]`, `[train]` (without `output`) and `[sample]` tables of a
    /// training config (docs/training.md), shared by the three runs.
    pub dataset: toml::Table,
    pub lora: toml::Table,
    pub train: toml::Table,
    #[serde(default)]
    pub sample: Option<toml::Table>,
    /// How every run is validated (docs/validation.md).
    #[serde(default)]
    pub render: RenderSettings,
    #[serde(default)]
    pub sampling: Sampling,
    /// The plan file it was read from (the output folder must not hold it).
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

fn one() -> f64 {
    1.0
}
fn bf16() -> String {
    "bf16".into()
}

/// What the experiment reports while it works.
pub enum Event<'a> {
    Message(String),
    /// A training run starts or continues: its events follow as [`Event::Train`].
    Training {
        way: Mode,
        steps: u64,
    },
    Train(trainer::Event<'a>),
    /// A way's validation starts: its events follow as [`Event::Validate`].
    Validating {
        way: Mode,
    },
    Validate(render::Event<'a>),
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
        let text = crate::fsutil::read_text(path)?;
        let mut plan = Self::parse(&text).map_err(|e| Error::bad_file(path, e.to_string()))?;
        plan.output =
            outdir::resolve(&plan.output).map_err(|e| Error::bad_file(path, e.to_string()))?;
        plan.source = Some(path.to_path_buf());
        Ok(plan)
    }

    /// A plan from its TOML text, checked as [`ExperimentPlan::from_file`] checks it (its
    /// paths as written).
    pub fn parse(text: &str) -> Result<Self> {
        let plan: Self = toml::from_str(text).map_err(|e| Error::Invalid(e.to_string()))?;
        plan.render.check()?;
        for way in WAYS {
            plan.train_config(way)?;
            plan.validation_plan(way).check()?;
        }
        Ok(plan)
    }

    pub fn run_dir(&self, way: Mode) -> PathBuf {
        self.output.join("runs").join(way.name())
    }

    pub fn validation_dir(&self, way: Mode) -> PathBuf {
        self.output.join("validation").join(way.name())
    }

    /// The training config of one way: the shared tables with this way's `[model]`.
    pub fn train_config(&self, way: Mode) -> Result<TrainConfig> {
        let mut model = toml::Table::new();
        let (path, variant) = match way {
            Mode::Base => (&self.base, "base"),
            _ => (&self.turbo, "turbo"),
        };
        model.insert("path".into(), path.clone().into());
        model.insert("variant".into(), variant.into());
        model.insert("base_dtype".into(), self.base_dtype.clone().into());
        if way == Mode::TurboAdapter {
            let adapter = self.training_adapter.display().to_string();
            model.insert("training_adapter".into(), adapter.into());
            model.insert(
                "training_adapter_strength".into(),
                self.training_adapter_strength.into(),
            );
        }
        if self.train.contains_key("output") {
            return Err(Error::Invalid(
                "[train] output is set by the experiment (OUTPUT/runs/<way>); remove it".into(),
            ));
        }
        let mut train = self.train.clone();
        let output = self.run_dir(way).display().to_string();
        train.insert("output".into(), output.into());
        let mut doc = toml::Table::new();
        doc.insert("model".into(), model.into());
        doc.insert("dataset".into(), self.dataset.clone().into());
        doc.insert("lora".into(), self.lora.clone().into());
        doc.insert("train".into(), train.into());
        if let Some(sample) = &self.sample {
            doc.insert("sample".into(), sample.clone().into());
        }
        let text = toml::to_string(&doc).map_err(|e| Error::Invalid(e.to_string()))?;
        TrainConfig::parse(&text)
    }

    /// The validation of one way's LoRA; only the direct run gets the DistillPatch variant
    /// (the patch exists to repair direct Turbo training).
    pub fn validation_plan(&self, way: Mode) -> ValidationPlan {
        ValidationPlan {
            lora: self.run_dir(way).join("lora.safetensors"),
            lora_strength: 1.0,
            base: self.base.clone(),
            turbo: self.turbo.clone(),
            distill_patch: self
                .distill_patch
                .clone()
                .filter(|_| way == Mode::TurboDirect),
            distill_patch_strength: self.distill_patch_strength,
            output: self.validation_dir(way),
            render: self.render.clone(),
            sampling: self.sampling,
        }
    }
}

/// The marker of a finished run: the config it finished with.
#[derive(Debug, Serialize, Deserialize)]
struct RunMarker {
    config: String,
    lora_blake3: String,
}

const MARKER: &str = "experiment-run.json";
const PLAN_COPY: &str = "plan.toml";

/// Runs the experiment; `None` when `stop` was set before its end (a rerun continues).
pub fn experiment(
    plan: &ExperimentPlan,
    plan_text: &str,
    force: bool,
    stop: Option<Arc<AtomicBool>>,
    events: &mut dyn FnMut(Event),
) -> Result<Option<ExperimentOutcome>> {
    let _claimed = prepare_output(plan, force)?;
    write_atomic(&plan.output.join(PLAN_COPY), plan_text.as_bytes(), true)?;
    let stopped = || stop.as_ref().is_some_and(|s| s.load(Ordering::SeqCst));
    for way in WAYS {
        if stopped() || !train_way(plan, way, stop.clone(), events)? {
            return Ok(None);
        }
    }
    let mut results = Vec::new();
    for way in WAYS {
        if stopped() {
            return Ok(None);
        }
        results.push((way, validate_way(plan, way, events)?));
    }
    let html = report(plan, &results, plan_text)?;
    let path = plan.output.join("report.html");
    write_atomic(&path, html.as_bytes(), true)?;
    Ok(Some(ExperimentOutcome {
        report: path,
        results,
    }))
}

/// Claims the output folder for the whole experiment: a new or empty one, an earlier run of
/// this experiment (continued), or with `force` any folder zlora made (started over).
fn prepare_output(plan: &ExperimentPlan, force: bool) -> Result<OutputDir> {
    let dataset = plan
        .dataset
        .get("path")
        .and_then(|v| v.as_str())
        .map(Path::new);
    let mut inputs: Vec<outdir::Protected> = vec![
        ("the Base model", Path::new(&plan.base)),
        ("the Turbo model", Path::new(&plan.turbo)),
        ("the training adapter", &plan.training_adapter),
    ];
    inputs.extend(dataset.map(|d| ("the dataset", d)));
    inputs.extend(
        plan.distill_patch
            .as_deref()
            .map(|d| ("the DistillPatch", d)),
    );
    inputs.extend(plan.source.as_deref().map(|s| ("the plan file", s)));
    let out = &plan.output;
    outdir::refuse_inputs(out, &inputs)?;
    if force {
        return OutputDir::claim(out, "experiment", &inputs, Policy::Replace);
    }
    if !outdir::is_zloras(out) && outdir::has_files(out)? {
        return Err(outdir::not_zloras(out));
    }
    OutputDir::claim(out, "experiment", &inputs, Policy::Keep)
}

/// Trains one way unless it finished earlier with the same config; `false` when it stopped
/// before its end (then it has no finished marker, and a rerun resumes it).
fn train_way(
    plan: &ExperimentPlan,
    way: Mode,
    stop: Option<Arc<AtomicBool>>,
    events: &mut dyn FnMut(Event),
) -> Result<bool> {
    let cfg = plan.train_config(way)?;
    let dir = plan.run_dir(way);
    let lora = dir.join("lora.safetensors");
    let marker = dir.join(MARKER);
    if marker.is_file() && lora.is_file() {
        let text = std::fs::read_to_string(&marker).map_err(|e| Error::io(&marker, e))?;
        let m: RunMarker = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&marker, format!("unreadable run marker: {e}")))?;
        if TrainConfig::parse(&m.config).ok().as_ref() != Some(&cfg) {
            return Err(Error::bad_file(
                &dir,
                "finished with other settings than the plan now asks for (delete this folder or pass --force)",
            ));
        }
        events(Event::Message(format!(
            "{}: finished earlier, not repeated",
            way.name()
        )));
        return Ok(true);
    }
    let resume = crate::train::state::latest(&dir)?.is_some();
    events(Event::Training {
        way,
        steps: cfg.train.steps,
    });
    // The plan is the only place to change a run's settings, and it has no --allow-changes:
    // an interrupted run continues after a change of steps or samples; a change to what
    // training computes is refused as `train --resume` refuses it.
    let opts = TrainOptions {
        resume,
        force: !resume,
        allow_changes: SAFE_KEYS.iter().map(|k| k.to_string()).collect(),
        config_file: None,
        stop,
    };
    if train(&cfg, &opts, &mut |e| events(Event::Train(e)))?.stopped {
        return Ok(false);
    }
    let m = RunMarker {
        config: toml::to_string(&cfg).map_err(|e| Error::Invalid(e.to_string()))?,
        lora_blake3: file_hash(&lora)?,
    };
    let json = serde_json::to_string_pretty(&m).map_err(|e| Error::Invalid(e.to_string()))?;
    write_atomic(&marker, json.as_bytes(), true)?;
    Ok(true)
}

/// Validates one way's LoRA unless a finished validation of this very file and plan exists.
fn validate_way(plan: &ExperimentPlan, way: Mode, events: &mut dyn FnMut(Event)) -> Result<Record> {
    let vplan = plan.validation_plan(way);
    let record_path = vplan.output.join("metrics.json");
    if record_path.is_file() {
        let old = Record::read(&record_path)?;
        let same_plan = toml::to_string(&vplan).map_err(|e| Error::Invalid(e.to_string()))?;
        if old.plan == same_plan && old.lora_blake3 == file_hash(&vplan.lora)? {
            events(Event::Message(format!(
                "{}: validated earlier, not repeated",
                way.name()
            )));
            return Ok(old);
        }
    }
    events(Event::Validating { way });
    Ok(validate(&vplan, true, &mut |e| events(Event::Validate(e)))?.record)
}

/// The comparison page: one row per way, then each way's sheets and a link to its report.
fn report(plan: &ExperimentPlan, results: &[(Mode, Record)], plan_text: &str) -> Result<String> {
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
            dir: plan.validation_dir(*way),
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

    #[test]
    fn the_three_runs_differ_only_in_model_and_adapter() -> Result<()> {
        let plan: ExperimentPlan =
            toml::from_str(PLAN).map_err(|e| Error::Invalid(e.to_string()))?;
        let cfgs: Vec<TrainConfig> = WAYS
            .iter()
            .map(|&w| plan.train_config(w))
            .collect::<Result<_>>()?;
        let modes: Vec<Mode> = cfgs.iter().map(TrainConfig::mode).collect();
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
        let patched: Vec<bool> = WAYS
            .iter()
            .map(|&w| plan.validation_plan(w).distill_patch.is_some())
            .collect();
        assert_eq!(patched, [false, false, true]);
        Ok(())
    }

    #[test]
    fn an_output_in_the_train_table_is_refused() {
        let plan: ExperimentPlan = toml::from_str(&format!("{PLAN}output = \"mine\"\n")).unwrap();
        let err = plan.train_config(Mode::Base).unwrap_err().to_string();
        assert!(err.contains("[train] output"), "{err}");
    }
}
