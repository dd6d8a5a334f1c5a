//! `zlora sweep PLAN.toml`: the plan's arms one after another in this process, one per
//! device at a time as child processes of this binary (`--gpus`), one arm of a prepared
//! sweep (`--arm`, `--arm-index`: what the children and Slurm's array tasks run), or the
//! Slurm job array's script (`--emit slurm`), all through [`crate::arm_set`]. docs/sweep.md.

use std::path::PathBuf;
use std::process::ExitCode;

use serde_json::json;
use zlora::validate::compare::SweepSummary;
use zlora::validate::grid::SweepPlan;

use crate::arm_set::{self, Placed, Placement};
use crate::events;

#[derive(clap::Args)]
pub struct Args {
    /// The sweep plan (TOML; see docs/sweep.md).
    plan: PathBuf,
    #[command(flatten)]
    placement: Placement,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let json = a.placement.events.is_some();
    let result = run_plan(&a);
    if let (true, Err(e)) = (json, &result) {
        events::failed(e);
    }
    result
}

fn run_plan(a: &Args) -> anyhow::Result<ExitCode> {
    let (plan, placed) = a.placement.placed(|| SweepPlan::from_file(&a.plan))?;
    let json = a.placement.events.is_some();
    let devices = match placed {
        Placed::Slurm => {
            arm_set::emit_slurm(&plan, a.placement.force, json)?;
            return Ok(ExitCode::SUCCESS);
        }
        Placed::One(i) => return arm_set::run_one(&plan, i, json, report),
        Placed::InProcess => Vec::new(),
        Placed::Devices(d) => d,
    };
    Ok(
        match arm_set::run_all(&a.plan, &plan, &devices, a.placement.force, json)? {
            Some(summary) => {
                report(&summary, json);
                ExitCode::SUCCESS
            }
            None => arm_set::stopped(json),
        },
    )
}

/// The comparison: one line per arm and the best, then the report's path.
fn report(s: &SweepSummary, json: bool) {
    if json {
        events::done(json!({"report": s.report, "best": s.best, "arms": s.arms}));
        return;
    }
    for a in &s.arms {
        let score = a.score.map_or("—".into(), |x| format!("{x:.3}"));
        println!(
            "{}: score {score}, {} (Base {:.3}, Turbo {:.3}){}",
            a.name,
            a.verdict.label(),
            a.base_effect,
            a.turbo_effect,
            if a.blurred { ", blurred" } else { "" }
        );
    }
    match &s.best {
        Some(b) => println!("best: {b}"),
        None => println!("best: none (every arm is not learning on Turbo, overfit or blurred)"),
    }
    println!("{}", s.report.display());
}
