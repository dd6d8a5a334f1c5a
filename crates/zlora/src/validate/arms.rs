//! Arms: trainings that share a plan's settings and differ in a few values (mode, rank,
//! learning rate, steps, dataset), each trained (resumable) and then validated. The engine of
//! `zlora experiment` (three arms: the workflow's ways) and `zlora sweep` (a grid or a list).
//!
//! An arm is finished when its run holds `lora.safetensors` and `experiment-run.json` (the
//! config it finished with) and its validation folder a `metrics.json` of that very LoRA file
//! and validation plan; a finished part is never repeated, an interrupted run continues from
//! its newest checkpoint.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::file_hash;
use super::plan::{RenderSettings, Sampling, ValidationPlan};
use super::render;
use super::run::{validate, Record};
use crate::data::dataset::DatasetKind;
use crate::fsutil::write_atomic;
use crate::outdir::{self, OutputDir, Policy};
use crate::train::config::{Mode, TrainConfig};
use crate::train::resume::SAFE_KEYS;
use crate::train::trainer::{self, train, TrainOptions};
use crate::{Error, Result};

/// Every mode an arm can train in, as plans name them.
pub const MODES: [Mode; 4] = [
    Mode::Base,
    Mode::TurboAdapter,
    Mode::TurboDirect,
    Mode::DeTurbo,
];

/// The settings every arm of a plan shares: the models each mode needs, the training tables
/// and the validation; `grid` or `arm` say how the arms differ (`zlora sweep` only).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ArmsPlan {
    pub output: PathBuf,
    /// The Base model: base arms train on it; every arm is validated on it.
    pub base: String,
    /// The Turbo model: turbo arms train on it; every arm is validated on it.
    pub turbo: String,
    /// The De-Turbo model, needed by de-turbo arms.
    #[serde(default)]
    pub de_turbo: Option<String>,
    /// The training adapter, needed by turbo-adapter arms.
    #[serde(default)]
    pub training_adapter: Option<PathBuf>,
    #[serde(default = "one")]
    pub training_adapter_strength: f64,
    /// Validates turbo-direct arms with the DistillPatch too.
    #[serde(default)]
    pub distill_patch: Option<PathBuf>,
    #[serde(default = "one")]
    pub distill_patch_strength: f64,
    /// `[model] base_dtype` of every run.
    #[serde(default = "bf16")]
    pub base_dtype: String,
    /// The `[dataset]` table (or `[[dataset]]` tables), `[lora]`, `[train]` (without
    /// `output`) and `[sample]` of a training config (docs/training.md), shared by the arms.
    pub dataset: toml::Value,
    pub lora: toml::Table,
    pub train: toml::Table,
    #[serde(default)]
    pub sample: Option<toml::Table>,
    /// How every arm is validated (docs/validation.md).
    #[serde(default)]
    pub render: RenderSettings,
    #[serde(default)]
    pub sampling: Sampling,
    /// A sweep's axes, crossed (`zlora sweep`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grid: Option<super::grid::Grid>,
    /// A sweep's arms, listed (`zlora sweep`).
    #[serde(default, rename = "arm", skip_serializing_if = "Vec::is_empty")]
    pub arms: Vec<ArmValues>,
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

/// What one arm sets over the shared tables; unset values are the plan's.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ArmValues {
    /// base, turbo-adapter, turbo-direct or de-turbo.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub learning_rate: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u64>,
    /// The training dataset's folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
}

impl ArmValues {
    /// The arm's name: its values in a fixed order, filesystem-safe (the mode as itself,
    /// `r16`, `lr0.0001`, `s3000`, `d-FOLDER`), so the same values always name the same
    /// folders; `default` when it sets nothing.
    pub fn name(&self) -> String {
        let mut parts = Vec::new();
        parts.extend(self.mode.clone());
        parts.extend(self.rank.map(|r| format!("r{r}")));
        parts.extend(self.learning_rate.map(|lr| format!("lr{lr}")));
        parts.extend(self.steps.map(|s| format!("s{s}")));
        parts.extend(self.dataset.as_deref().map(|d| {
            let folder = Path::new(d).file_name().unwrap_or(d.as_ref());
            format!("d-{}", folder.to_string_lossy())
        }));
        if parts.is_empty() {
            return "default".into();
        }
        let name = parts.join("_");
        name.chars()
            .map(|c| match c {
                'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' => c,
                _ => '-',
            })
            .collect()
    }
}

/// One arm: its name, values, training config and validation plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Arm {
    pub name: String,
    pub values: ArmValues,
    pub mode: Mode,
    pub config: TrainConfig,
    pub validation: ValidationPlan,
}

impl Arm {
    pub fn run_dir(&self) -> &Path {
        &self.config.train.output
    }

    pub fn lora(&self) -> PathBuf {
        self.run_dir().join("lora.safetensors")
    }

    /// Every value an arm can set, as this arm trains with it (the plan's where it sets none).
    pub fn settings(&self) -> ArmValues {
        let c = &self.config;
        let training = c.datasets.iter().find(|d| d.kind == DatasetKind::Train);
        ArmValues {
            mode: Some(self.mode.name().into()),
            rank: Some(c.lora.rank),
            learning_rate: Some(c.train.learning_rate),
            steps: Some(c.train.steps),
            dataset: training.map(|d| d.path.display().to_string()),
        }
    }
}

/// What the arms report while they work.
pub enum Event<'a> {
    Message(String),
    /// An arm's training starts or continues: its events follow as [`Event::Train`].
    Training {
        arm: &'a str,
        steps: u64,
    },
    Train(trainer::Event<'a>),
    /// An arm's validation starts: its events follow as [`Event::Validate`].
    Validating {
        arm: &'a str,
    },
    Validate(render::Event<'a>),
}

impl ArmsPlan {
    /// Parses a plan's text (`path` names it in errors) with its output resolved.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let mut plan: Self =
            toml::from_str(text).map_err(|e| Error::bad_file(path, one_line(&e, text)))?;
        plan.output =
            outdir::resolve(&plan.output).map_err(|e| Error::bad_file(path, e.to_string()))?;
        plan.source = Some(path.to_path_buf());
        plan.render
            .check()
            .map_err(|e| Error::bad_file(path, e.to_string()))?;
        Ok(plan)
    }

    pub fn run_dir(&self, name: &str) -> PathBuf {
        self.output.join("runs").join(name)
    }

    pub fn validation_dir(&self, name: &str) -> PathBuf {
        self.output.join("validation").join(name)
    }

    /// The arm of `values` named `name`: its training config built and checked, so that a
    /// typo in any table is an error before anything runs.
    pub fn arm(&self, name: &str, values: &ArmValues) -> Result<Arm> {
        let mode = parse_mode(name, values.mode.as_deref())?;
        let config = self.train_config(name, mode, values)?;
        let validation = self.validation_plan(name, mode);
        validation.check()?;
        Ok(Arm {
            name: name.to_string(),
            values: values.clone(),
            mode,
            config,
            validation,
        })
    }

    /// The `[model]` table of a mode: its checkpoint, and the training adapter it needs.
    fn model_table(&self, name: &str, mode: Mode) -> Result<toml::Table> {
        let missing = |key: &str| {
            Error::Invalid(format!(
                "arm {name} trains {} and needs `{key}` in the plan",
                mode.name()
            ))
        };
        let (path, variant) = match mode {
            Mode::Base => (self.base.clone(), "base"),
            Mode::DeTurbo => (
                self.de_turbo.clone().ok_or_else(|| missing("de_turbo"))?,
                "de-turbo",
            ),
            Mode::TurboAdapter | Mode::TurboDirect => (self.turbo.clone(), "turbo"),
        };
        let mut model = toml::Table::new();
        model.insert("path".into(), path.into());
        model.insert("variant".into(), variant.into());
        model.insert("base_dtype".into(), self.base_dtype.clone().into());
        if mode == Mode::TurboAdapter {
            let adapter = self
                .training_adapter
                .as_ref()
                .ok_or_else(|| missing("training_adapter"))?;
            model.insert(
                "training_adapter".into(),
                adapter.display().to_string().into(),
            );
            model.insert(
                "training_adapter_strength".into(),
                self.training_adapter_strength.into(),
            );
        }
        Ok(model)
    }

    /// The training config of one arm: the shared tables with the arm's model and values.
    fn train_config(&self, name: &str, mode: Mode, values: &ArmValues) -> Result<TrainConfig> {
        if self.train.contains_key("output") {
            return Err(Error::Invalid(
                "[train] output is set by the plan (OUTPUT/runs/<arm>); remove it".into(),
            ));
        }
        let mut train = self.train.clone();
        train.insert(
            "output".into(),
            self.run_dir(name).display().to_string().into(),
        );
        if let Some(steps) = values.steps {
            train.insert("steps".into(), (steps as i64).into());
        }
        if let Some(lr) = values.learning_rate {
            train.insert("learning_rate".into(), lr.into());
        }
        let mut lora = self.lora.clone();
        if let Some(rank) = values.rank {
            lora.insert("rank".into(), (rank as i64).into());
        }
        let mut dataset = self.dataset.clone();
        if let Some(path) = &values.dataset {
            set_training_folder(&mut dataset, path)?;
        }
        let mut doc = toml::Table::new();
        doc.insert("model".into(), self.model_table(name, mode)?.into());
        doc.insert("dataset".into(), dataset);
        doc.insert("lora".into(), lora.into());
        doc.insert("train".into(), train.into());
        if let Some(sample) = &self.sample {
            doc.insert("sample".into(), sample.clone().into());
        }
        let text = toml::to_string(&doc).map_err(|e| Error::Invalid(e.to_string()))?;
        // The tables' keys are checked here first: the error names the arm and the key
        // without the generated config's lines, which are not the plan's.
        if let Err(e) = toml::from_str::<TrainConfig>(&text) {
            return Err(Error::Invalid(format!("arm {name}: {}", e.message())));
        }
        TrainConfig::parse(&text).map_err(|e| Error::Invalid(format!("arm {name}: {e}")))
    }

    /// The validation of one arm's LoRA; only direct Turbo arms get the DistillPatch variant
    /// (the patch exists to repair direct Turbo training).
    fn validation_plan(&self, name: &str, mode: Mode) -> ValidationPlan {
        ValidationPlan {
            lora: self.run_dir(name).join("lora.safetensors"),
            lora_strength: 1.0,
            base: self.base.clone(),
            turbo: self.turbo.clone(),
            distill_patch: self
                .distill_patch
                .clone()
                .filter(|_| mode == Mode::TurboDirect),
            distill_patch_strength: self.distill_patch_strength,
            output: self.validation_dir(name),
            render: self.render.clone(),
            sampling: self.sampling,
        }
    }

    /// Claims the output folder for `command` (experiment, sweep): a new or empty one, an
    /// earlier run of it (continued), or with `force` any folder zlora made (started over).
    pub fn claim_output(&self, command: &str, arms: &[Arm], force: bool) -> Result<OutputDir> {
        let mut inputs: Vec<outdir::Protected> = vec![
            ("the Base model", Path::new(&self.base)),
            ("the Turbo model", Path::new(&self.turbo)),
        ];
        inputs.extend(
            self.de_turbo
                .as_deref()
                .map(|d| ("the De-Turbo model", Path::new(d))),
        );
        inputs.extend(
            self.training_adapter
                .as_deref()
                .map(|a| ("the training adapter", a)),
        );
        inputs.extend(
            self.distill_patch
                .as_deref()
                .map(|d| ("the DistillPatch", d)),
        );
        inputs.extend(self.source.as_deref().map(|s| ("the plan file", s)));
        for arm in arms {
            inputs.extend(
                arm.config
                    .datasets
                    .iter()
                    .map(|d| ("a dataset", d.path.as_path())),
            );
        }
        let out = &self.output;
        outdir::refuse_inputs(out, &inputs)?;
        if force {
            return OutputDir::claim(out, command, &inputs, Policy::Replace);
        }
        if !outdir::is_zloras(out) && outdir::has_files(out)? {
            return Err(outdir::not_zloras(out));
        }
        OutputDir::claim(out, command, &inputs, Policy::Keep)
    }
}

/// A TOML error on one line: where in `text` and what.
fn one_line(e: &toml::de::Error, text: &str) -> String {
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line = before.matches('\n').count() + 1;
            format!("line {line}: {}", e.message().trim())
        }
        None => e.message().trim().to_string(),
    }
}

/// A mode by its plan name; an arm without one is an error naming the arm.
fn parse_mode(arm: &str, mode: Option<&str>) -> Result<Mode> {
    let names: Vec<&str> = MODES.iter().map(|m| m.name()).collect();
    let Some(mode) = mode else {
        return Err(Error::Invalid(format!(
            "arm {arm} has no mode: set mode ({}) in [grid] or the [[arm]]",
            names.join(", ")
        )));
    };
    MODES.into_iter().find(|m| m.name() == mode).ok_or_else(|| {
        Error::Invalid(format!(
            "arm {arm}: unknown mode {mode:?} (one of {})",
            names.join(", ")
        ))
    })
}

/// Sets the folder of the one training set among `[dataset]` / `[[dataset]]` (regularization
/// sets stay as they are).
fn set_training_folder(dataset: &mut toml::Value, path: &str) -> Result<()> {
    let is_train = |t: &toml::Table| t.get("kind").is_none_or(|k| k.as_str() == Some("train"));
    let mut tables: Vec<&mut toml::Table> = match dataset {
        toml::Value::Table(t) => vec![t],
        toml::Value::Array(a) => a.iter_mut().filter_map(|v| v.as_table_mut()).collect(),
        _ => vec![],
    };
    tables.retain(|t| is_train(t));
    match tables.as_mut_slice() {
        [one] => {
            one.insert("path".into(), path.into());
            Ok(())
        }
        _ => Err(Error::Invalid(
            "a dataset value needs exactly one training [dataset] in the plan (the others with kind = \"regularization\")".into(),
        )),
    }
}

/// The marker of a finished run: the config it finished with.
#[derive(Debug, Serialize, Deserialize)]
struct RunMarker {
    config: String,
    lora_blake3: String,
}

const RUN_MARKER: &str = "experiment-run.json";

/// Trains an arm unless it finished earlier, then validates it unless a validation of this
/// very LoRA and plan finished earlier. `None` when `stop` was set before the arm's end: a
/// training stops after its step with a checkpoint, a validation in progress finishes
/// first; a rerun continues from there.
pub fn run_arm(
    arm: &Arm,
    stop: Option<&Arc<AtomicBool>>,
    events: &mut dyn FnMut(Event),
) -> Result<Option<Record>> {
    let stopped = || stop.is_some_and(|s| s.load(Ordering::SeqCst));
    if stopped() || !train_arm(arm, stop, events)? || stopped() {
        return Ok(None);
    }
    validate_arm(arm, events).map(Some)
}

/// The arm's validation record if the whole arm finished (nothing of it would be repeated).
pub fn finished(arm: &Arm) -> Result<Option<Record>> {
    if !trained(arm)? {
        return Ok(None);
    }
    validated(arm)
}

/// Whether the arm's run finished with the config the plan asks for; an error when it
/// finished with other settings.
fn trained(arm: &Arm) -> Result<bool> {
    let dir = arm.run_dir();
    let marker = dir.join(RUN_MARKER);
    if !(marker.is_file() && arm.lora().is_file()) {
        return Ok(false);
    }
    let text = std::fs::read_to_string(&marker).map_err(|e| Error::io(&marker, e))?;
    let m: RunMarker = serde_json::from_str(&text)
        .map_err(|e| Error::bad_file(&marker, format!("unreadable run marker: {e}")))?;
    if TrainConfig::parse(&m.config).ok().as_ref() != Some(&arm.config) {
        return Err(Error::bad_file(
            dir,
            "finished with other settings than the plan now asks for (delete this folder or pass --force)",
        ));
    }
    Ok(true)
}

/// The arm's validation record if it is of the current LoRA file and validation plan.
fn validated(arm: &Arm) -> Result<Option<Record>> {
    let vplan = &arm.validation;
    let path = vplan.output.join("metrics.json");
    if !path.is_file() || !vplan.lora.is_file() {
        return Ok(None);
    }
    let old = Record::read(&path)?;
    let same_plan = toml::to_string(vplan).map_err(|e| Error::Invalid(e.to_string()))?;
    let current = old.plan == same_plan && old.lora_blake3 == file_hash(&vplan.lora)?;
    Ok(current.then_some(old))
}

/// Trains an arm unless it finished earlier with the same config; `false` when it stopped
/// before its end (then it has no finished marker, and a rerun resumes it).
fn train_arm(
    arm: &Arm,
    stop: Option<&Arc<AtomicBool>>,
    events: &mut dyn FnMut(Event),
) -> Result<bool> {
    if trained(arm)? {
        events(Event::Message(format!(
            "{}: finished earlier, not repeated",
            arm.name
        )));
        return Ok(true);
    }
    let dir = arm.run_dir();
    let resume = crate::train::state::latest(dir)?.is_some();
    events(Event::Training {
        arm: &arm.name,
        steps: arm.config.train.steps,
    });
    // The plan is the only place to change a run's settings, and it has no --allow-changes:
    // an interrupted run continues after a change of steps or samples; a change to what
    // training computes is refused as `train --resume` refuses it.
    let opts = TrainOptions {
        resume,
        force: !resume,
        allow_changes: SAFE_KEYS.iter().map(|k| k.to_string()).collect(),
        config_file: None,
        stop: stop.cloned(),
    };
    if train(&arm.config, &opts, &mut |e| events(Event::Train(e)))?.stopped {
        return Ok(false);
    }
    let m = RunMarker {
        config: toml::to_string(&arm.config).map_err(|e| Error::Invalid(e.to_string()))?,
        lora_blake3: file_hash(&arm.lora())?,
    };
    let json = serde_json::to_string_pretty(&m).map_err(|e| Error::Invalid(e.to_string()))?;
    write_atomic(&dir.join(RUN_MARKER), json.as_bytes(), true)?;
    Ok(true)
}

/// Validates an arm's LoRA unless a finished validation of this very file and plan exists.
fn validate_arm(arm: &Arm, events: &mut dyn FnMut(Event)) -> Result<Record> {
    if let Some(old) = validated(arm)? {
        events(Event::Message(format!(
            "{}: validated earlier, not repeated",
            arm.name
        )));
        return Ok(old);
    }
    events(Event::Validating { arm: &arm.name });
    Ok(validate(&arm.validation, true, &mut |e| events(Event::Validate(e)))?.record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_values_and_are_filesystem_safe() {
        let v = ArmValues {
            mode: Some("turbo-adapter".into()),
            rank: Some(16),
            learning_rate: Some(1e-4),
            steps: Some(3000),
            dataset: Some("/data/my set (v2)".into()),
        };
        assert_eq!(v.name(), "turbo-adapter_r16_lr0.0001_s3000_d-my-set--v2-");
        assert_eq!(ArmValues::default().name(), "default");
        let mode_only = ArmValues {
            mode: Some("base".into()),
            ..ArmValues::default()
        };
        assert_eq!(mode_only.name(), "base");
    }

    #[test]
    fn the_training_folder_is_the_one_training_set() {
        let mut one: toml::Value = toml::from_str::<toml::Table>("path = \"a\"")
            .unwrap()
            .into();
        set_training_folder(&mut one, "b").unwrap();
        assert_eq!(one["path"].as_str(), Some("b"));
        let two: toml::Table = toml::from_str(
            "[[dataset]]\npath = \"a\"\n[[dataset]]\npath = \"reg\"\nkind = \"regularization\"\n",
        )
        .unwrap();
        let mut two = two["dataset"].clone();
        set_training_folder(&mut two, "b").unwrap();
        assert_eq!(two[0]["path"].as_str(), Some("b"));
        assert_eq!(two[1]["path"].as_str(), Some("reg"));
        let three: toml::Table =
            toml::from_str("[[dataset]]\npath = \"a\"\n[[dataset]]\npath = \"c\"\n").unwrap();
        let mut three = three["dataset"].clone();
        let err = set_training_folder(&mut three, "b")
            .unwrap_err()
            .to_string();
        assert!(err.contains("exactly one training [dataset]"), "{err}");
    }
}
