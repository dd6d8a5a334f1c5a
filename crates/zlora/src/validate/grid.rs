//! `zlora sweep PLAN.toml`: arms over rank, learning rate, steps, mode and dataset — a
//! `[grid]` crossed or `[[arm]]`s listed — each trained and validated by [`super::arms`],
//! then compared in one report ([`super::compare`]). (The checkpoint sweep of one run is
//! [`super::sweep`].)
//!
//! The arms run as an [`ArmSet`] ([`super::arm_set`]): in this process, one per device, or
//! as a Slurm job array; the last arm to finish writes the comparison.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::arm_set::ArmSet;
use super::arms::{Arm, ArmValues, ArmsPlan};
use super::compare::{self, SweepSummary};
use super::run::Record;
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
}

impl ArmSet for SweepPlan {
    type Report = SweepSummary;
    const COMMAND: &'static str = "sweep";

    fn parts(&self) -> (&ArmsPlan, &[Arm], &str) {
        (&self.plan, &self.arms, &self.text)
    }

    /// The comparison: `report.html`, `loss.png` and `sweep.json`.
    fn write_report(&self, records: &[Record]) -> Result<SweepSummary> {
        compare::write_report(self, records)
    }

    /// `sweep.json`.
    fn written_report(&self) -> Result<SweepSummary> {
        let path = self.output().join("sweep.json");
        let text = crate::fsutil::read_text(&path)?;
        serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&path, format!("not a sweep summary: {e}")))
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
