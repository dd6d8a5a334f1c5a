//! `zlora sweep PLAN.toml`: arms over rank, learning rate, steps, mode and dataset — a
//! `[grid]` crossed or `[[arm]]`s listed — each trained and validated by [`super::arms`],
//! then compared in one report ([`super::compare`]). (The checkpoint sweep of one run is
//! [`super::sweep`].)
//!
//! Arms may run in this process one after another, as child processes one per device, or as
//! the tasks of a Slurm job array. However they run, each arm that finishes records its
//! completion in `OUTPUT/finished/` under the sweep's lock, and the arm whose completion
//! makes the set complete builds the report: the report is written once, by the last arm.

use std::fs::File;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::arms::{self, run_arm, Arm, ArmValues, ArmsPlan, Event};
use super::compare::{self, SweepSummary};
use crate::fsutil::write_atomic;
use crate::outdir::{self, OutputDir};
use crate::{Error, Result};

/// A sweep's axes: every combination of the listed values is an arm, the first axis
/// outermost (mode, dataset, rank, learning_rate, steps); an axis left out keeps the plan's
/// value.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Grid {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mode: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dataset: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rank: Vec<usize>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub learning_rate: Vec<f64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<u64>,
}

impl Grid {
    /// The arms' values: the cartesian product of the axes, in order.
    pub fn values(&self) -> Vec<ArmValues> {
        let mut arms = vec![ArmValues::default()];
        cross(&mut arms, &self.mode, |a, m| a.mode = Some(m));
        cross(&mut arms, &self.dataset, |a, d| a.dataset = Some(d));
        cross(&mut arms, &self.rank, |a, r| a.rank = Some(r));
        cross(&mut arms, &self.learning_rate, |a, lr| {
            a.learning_rate = Some(lr)
        });
        cross(&mut arms, &self.steps, |a, s| a.steps = Some(s));
        arms
    }

    fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// Each arm once per value of `axis` (unchanged when the axis is not given).
fn cross<T: Clone>(arms: &mut Vec<ArmValues>, axis: &[T], set: impl Fn(&mut ArmValues, T)) {
    if axis.is_empty() {
        return;
    }
    *arms = arms
        .iter()
        .flat_map(|arm| {
            axis.iter().map(|x| {
                let mut a = arm.clone();
                set(&mut a, x.clone());
                a
            })
        })
        .collect();
}

/// A sweep plan with its arms built (every training config checked) and its text.
#[derive(Debug, Clone, PartialEq)]
pub struct SweepPlan {
    pub plan: ArmsPlan,
    pub arms: Vec<Arm>,
    pub text: String,
}

/// The plan's copy in the output folder: arms run by index or name check against it.
const PLAN_COPY: &str = "plan.toml";
/// Completion records, one `NAME.json` per finished arm.
const FINISHED: &str = "finished";
/// Held while an arm records its completion and, if it completes the set, writes the report.
const LOCK: &str = ".sweep-lock";
pub const SLURM_SCRIPT: &str = "sweep.sbatch";

impl SweepPlan {
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::parse(path, &crate::fsutil::read_text(path)?)
    }

    /// Reads the plan and builds every arm's training config, so that a mistake anywhere is
    /// an error naming the file before anything runs.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let plan = ArmsPlan::parse(path, text)?;
        let arms = build_arms(&plan).map_err(|e| Error::bad_file(path, e.to_string()))?;
        Ok(Self {
            plan,
            arms,
            text: text.to_string(),
        })
    }

    pub fn output(&self) -> &Path {
        &self.plan.output
    }

    /// The index of the arm named `name`, or an error listing the names.
    pub fn index_of(&self, name: &str) -> Result<usize> {
        self.arms
            .iter()
            .position(|a| a.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self.arms.iter().map(|a| a.name.as_str()).collect();
                Error::Invalid(format!(
                    "the plan has no arm {name:?} (its arms: {})",
                    names.join(", ")
                ))
            })
    }

    /// The arm of a job array's task index, or an error naming the range.
    pub fn check_index(&self, index: usize) -> Result<()> {
        if index < self.arms.len() {
            return Ok(());
        }
        Err(Error::Invalid(format!(
            "arm index {index} is out of range: the plan has {} arms (0-{})",
            self.arms.len(),
            self.arms.len() - 1
        )))
    }

    fn finished_record(&self, arm: &Arm) -> PathBuf {
        self.output()
            .join(FINISHED)
            .join(format!("{}.json", arm.name))
    }
}

/// The arms of the plan's `[grid]` or `[[arm]]`s, named by their values (names unique).
fn build_arms(plan: &ArmsPlan) -> Result<Vec<Arm>> {
    let values = match (&plan.grid, plan.arms.is_empty()) {
        (Some(_), false) => {
            return Err(Error::Invalid(
                "give either [grid] or [[arm]] tables, not both".into(),
            ))
        }
        (Some(g), true) if !g.is_empty() => g.values(),
        (Some(_), true) => {
            return Err(Error::Invalid(
                "[grid] lists no values: give at least one of mode, dataset, rank, learning_rate, steps".into(),
            ))
        }
        (None, false) => plan.arms.clone(),
        (None, true) => {
            return Err(Error::Invalid(
                "a sweep plan needs a [grid] or [[arm]] tables (docs/sweep.md)".into(),
            ))
        }
    };
    let mut arms: Vec<Arm> = Vec::new();
    for v in &values {
        let name = v.name();
        if arms.iter().any(|a| a.name == name) {
            return Err(Error::Invalid(format!(
                "two arms are both named {name}: list each combination of values once (datasets need folders of different names)"
            )));
        }
        arms.push(plan.arm(&name, v)?);
    }
    Ok(arms)
}

/// Claims the output folder for a whole sweep (this process, or its child processes) and
/// writes the plan's copy; with `force`, a folder zlora made is started over.
pub fn prepare(plan: &SweepPlan, force: bool) -> Result<OutputDir> {
    let claimed = plan.plan.claim_output("sweep", &plan.arms, force)?;
    write_atomic(&plan.output().join(PLAN_COPY), plan.text.as_bytes(), true)?;
    Ok(claimed)
}

/// For one arm run on its own (`--arm`, `--arm-index`): the output folder must be this
/// sweep's, prepared from the same plan text (by the whole sweep or `--emit slurm`), so that
/// every task agrees on the arms and their indices.
pub fn check_prepared(plan: &SweepPlan) -> Result<()> {
    let out = plan.output();
    let copy = out.join(PLAN_COPY);
    if outdir::made_by(out).as_deref() != Some("sweep") || !copy.is_file() {
        return Err(Error::bad_file(
            out,
            "is not prepared for this sweep: run `zlora sweep PLAN --emit slurm` (or the whole sweep) first",
        ));
    }
    let text = std::fs::read_to_string(&copy).map_err(|e| Error::io(&copy, e))?;
    if text != plan.text {
        return Err(Error::bad_file(
            &copy,
            "differs from the plan given: the sweep was prepared from another plan; prepare it again (`--emit slurm`)",
        ));
    }
    Ok(())
}

/// Runs one arm (skipping what finished earlier), records its completion and, when that
/// completes the set, writes the report and `sweep.json`.
pub fn run_one(
    plan: &SweepPlan,
    index: usize,
    events: &mut dyn FnMut(Event),
) -> Result<Option<SweepSummary>> {
    plan.check_index(index)?;
    let arm = &plan.arms[index];
    // Sweeps stop by their processes ending: an arm without a stop flag runs to its end.
    let record = run_arm(arm, None, events)?
        .ok_or_else(|| Error::Invalid(format!("arm {}: stopped before its end", arm.name)))?;
    let lock = hold_lock(plan.output())?;
    let path = plan.finished_record(arm);
    let json = serde_json::json!({"arm": arm.name, "lora_blake3": record.lora_blake3});
    write_atomic(&path, json.to_string().as_bytes(), true)?;
    let summary = complete_set(plan)?
        .map(|records| compare::write_report(plan, &records))
        .transpose()?;
    drop(lock);
    if let Some(s) = &summary {
        events(Event::Message(format!(
            "every arm finished: {}",
            s.report.display()
        )));
    }
    Ok(summary)
}

/// Every arm's validation record when each has recorded its completion and is still
/// finished (a stale record of an arm whose plan changed does not count).
fn complete_set(plan: &SweepPlan) -> Result<Option<Vec<super::run::Record>>> {
    let mut records = Vec::new();
    for arm in &plan.arms {
        if !plan.finished_record(arm).is_file() {
            return Ok(None);
        }
        match arms::finished(arm)? {
            Some(r) => records.push(r),
            None => return Ok(None),
        }
    }
    Ok(Some(records))
}

/// The sweep's lock, waited for: arms finishing at the same time record their completion
/// one after the other.
fn hold_lock(out: &Path) -> Result<File> {
    let path = out.join(LOCK);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(&path, e))?;
    file.lock().map_err(|e| Error::io(&path, e))?;
    Ok(file)
}

/// Writes `OUTPUT/sweep.sbatch`: a Slurm job array of one task per arm, one GPU each, in the
/// folder the sweep was planned from (relative paths in the plan stay right); `zlora` is
/// this executable. Prepares the output folder first (as a whole sweep would).
pub fn emit_slurm(plan: &SweepPlan, zlora: &Path, force: bool) -> Result<PathBuf> {
    let _claimed = prepare(plan, force)?;
    let here = std::env::current_dir().map_err(|e| Error::io(".", e))?;
    let source = plan
        .plan
        .source
        .as_deref()
        .ok_or_else(|| Error::Invalid("the plan was not read from a file".into()))?;
    let plan_file = here.join(source);
    let logs = here.join(plan.output()).join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| Error::io(&logs, e))?;
    let script = format!(
        "#!/bin/bash\n\
         # zlora sweep: one array task per arm (0-{last}); each trains and validates its arm,\n\
         # and the task that completes the set writes {out}/report.html.\n\
         # Submit: sbatch {script}. Resubmitting reruns only the arms that did not finish.\n\
         #SBATCH --job-name=zlora-sweep\n\
         #SBATCH --array=0-{last}\n\
         #SBATCH --ntasks=1\n\
         #SBATCH --gres=gpu:1\n\
         #SBATCH --chdir={here}\n\
         #SBATCH --output={logs}/slurm-%A_%a.log\n\
         set -euo pipefail\n\
         exec {zlora} sweep {plan} --arm-index \"$SLURM_ARRAY_TASK_ID\"\n",
        last = plan.arms.len() - 1,
        out = shell_quote(&here.join(plan.output())),
        script = shell_quote(&here.join(plan.output()).join(SLURM_SCRIPT)),
        here = here.display(),
        logs = logs.display(),
        zlora = shell_quote(zlora),
        plan = shell_quote(&plan_file),
    );
    let path = plan.output().join(SLURM_SCRIPT);
    write_atomic(&path, script.as_bytes(), true)?;
    Ok(path)
}

/// A path as one single-quoted shell word.
fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHARED: &str = r#"
output = "sweeps/s"
base = "models/base"
turbo = "models/turbo"
training_adapter = "adapter.safetensors"

[dataset]
path = "data"

[lora]
rank = 4
alpha = 4

[train]
steps = 10
learning_rate = 1e-4
"#;

    fn parse(extra: &str) -> Result<SweepPlan> {
        SweepPlan::parse(Path::new("plan.toml"), &format!("{SHARED}{extra}"))
    }

    #[test]
    fn a_grid_crosses_its_axes_in_order() -> Result<()> {
        let plan = parse(
            "[grid]\nmode = [\"base\", \"turbo-adapter\"]\nrank = [4, 8]\nlearning_rate = [1e-4]\n",
        )?;
        let names: Vec<&str> = plan.arms.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "base_r4_lr0.0001",
                "base_r8_lr0.0001",
                "turbo-adapter_r4_lr0.0001",
                "turbo-adapter_r8_lr0.0001"
            ]
        );
        let arm = &plan.arms[3];
        assert_eq!(arm.config.lora.rank, 8);
        assert_eq!(arm.config.train.steps, 10, "the plan's value");
        assert_eq!(
            arm.config.train.output,
            Path::new("sweeps/s/runs/turbo-adapter_r8_lr0.0001")
        );
        assert!(arm.config.model.training_adapter.is_some());
        assert_eq!(plan.index_of("base_r8_lr0.0001")?, 1);
        assert!(plan.index_of("nope").is_err() && plan.check_index(4).is_err());
        Ok(())
    }

    #[test]
    fn listed_arms_set_their_own_values() -> Result<()> {
        let plan = parse(
            "[[arm]]\nmode = \"base\"\nsteps = 20\ndataset = \"other/data2\"\n\
             [[arm]]\nmode = \"turbo-direct\"\nlearning_rate = 5e-5\n",
        )?;
        let (a, b) = (&plan.arms[0], &plan.arms[1]);
        assert_eq!(a.name, "base_s20_d-data2");
        assert_eq!(a.config.train.steps, 20);
        assert_eq!(a.config.datasets[0].path, Path::new("other/data2"));
        assert_eq!(b.config.train.learning_rate, 5e-5);
        assert_eq!(b.config.datasets[0].path, Path::new("data"));
        Ok(())
    }

    #[test]
    fn the_example_plan_is_eight_arms() -> Result<()> {
        let text = include_str!("../../../../examples/sweep.toml");
        let plan = SweepPlan::parse(Path::new("examples/sweep.toml"), text)?;
        assert_eq!(plan.arms.len(), 8);
        assert_eq!(plan.arms[3].name, "turbo-adapter_r16_lr0.0002");
        let patched: Vec<bool> = plan
            .arms
            .iter()
            .map(|a| a.validation.distill_patch.is_some())
            .collect();
        assert_eq!(
            patched,
            [false, false, false, false, true, true, true, true]
        );
        Ok(())
    }

    #[test]
    fn bad_plans_are_refused_with_the_reason() {
        let cases = [
            (
                "[grid]\nmode = [\"base\"]\nrnak = [4]\n",
                "unknown field `rnak`",
            ),
            (
                "[[arm]]\nmode = \"base\"\nalpha = 2\n",
                "unknown field `alpha`",
            ),
            ("", "needs a [grid] or [[arm]]"),
            ("[grid]\n", "lists no values"),
            ("[grid]\nrank = [4]\n", "arm r4 has no mode"),
            ("[grid]\nmode = [\"turbo\"]\n", "unknown mode \"turbo\""),
            ("[grid]\nmode = [\"de-turbo\"]\n", "needs `de_turbo`"),
            (
                "[grid]\nmode = [\"base\"]\nrank = [4, 4]\n",
                "both named base_r4",
            ),
            (
                "[grid]\nmode = [\"base\"]\n[[arm]]\nmode = \"base\"\n",
                "not both",
            ),
            ("[grid]\nmode = [\"base\"]\nsteps = [0]\n", "arm base_s0"),
        ];
        for (extra, expected) in cases {
            let err = parse(extra).unwrap_err().to_string();
            assert!(
                err.contains("plan.toml") && err.contains(expected) && !err.contains('\n'),
                "{extra:?}: {err}"
            );
        }
    }
}
