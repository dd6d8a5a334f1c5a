//! `zlora sweep PLAN.toml`: the plan's arms one after another in this process, one per
//! device at a time as child processes of this binary (`--gpus`), one arm of a prepared
//! sweep (`--arm`, `--arm-index`: what the children and Slurm's array tasks run), or the
//! Slurm job array's script (`--emit slurm`). docs/sweep.md.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use zlora::validate::compare::SweepSummary;
use zlora::validate::grid::{self, SweepPlan};

use crate::events::{self, EventFormat};
use crate::experiment::ArmProgress;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Emit {
    Slurm,
}

#[derive(clap::Args)]
pub struct Args {
    /// The sweep plan (TOML; see docs/sweep.md).
    plan: PathBuf,
    /// Run the arms as child processes, one per listed device at a time: GPU indices
    /// (`0,1` gives ZLORA_DEVICE=cuda:0 and cuda:1) or `cpu` (`cpu,cpu`: two arms at once).
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["arm", "arm_index", "emit"])]
    gpus: Vec<String>,
    /// Write OUTPUT/sweep.sbatch, a Slurm job array of one task per arm, instead of running.
    #[arg(long, value_enum, conflicts_with_all = ["arm", "arm_index"])]
    emit: Option<Emit>,
    /// Run only the arm of this name, in a sweep prepared from the same plan.
    #[arg(long, conflicts_with = "arm_index")]
    arm: Option<String>,
    /// Run only the arm at this index (from 0), as a Slurm array task does.
    #[arg(long)]
    arm_index: Option<usize>,
    /// Delete the output folder and start over (otherwise finished arms are kept); only a
    /// folder zlora made.
    #[arg(long, conflicts_with_all = ["arm", "arm_index"])]
    force: bool,
    /// Print progress and results as JSON lines on stdout (arm, training, step, stage, image,
    /// then done or failed); docs/sweep.md lists the events.
    #[arg(long, value_enum)]
    events: Option<EventFormat>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let json = a.events.is_some();
    let result = run_plan(&a);
    if let (true, Err(e)) = (json, &result) {
        events::failed(e);
    }
    result
}

fn run_plan(a: &Args) -> anyhow::Result<()> {
    let devices = devices(&a.gpus)?;
    let plan = SweepPlan::from_file(&a.plan)?;
    let json = a.events.is_some();
    if a.emit.is_some() {
        let exe = std::env::current_exe().context("cannot find the zlora executable")?;
        let script = grid::emit_slurm(&plan, &exe, a.force)?;
        return finish(
            json,
            json!({"script": script}),
            &script.display().to_string(),
        );
    }
    let index = match (&a.arm, a.arm_index) {
        (Some(name), _) => Some(plan.index_of(name)?),
        (None, Some(i)) => Some(i),
        (None, None) => None,
    };
    if let Some(i) = index {
        plan.check_index(i)?;
        grid::check_prepared(&plan)?;
        return run_one(&plan, i, json);
    }
    let _claimed = grid::prepare(&plan, a.force)?;
    let failed = if devices.is_empty() {
        run_in_process(&plan, json)
    } else {
        Scheduler::new(&a.plan, &plan, json).run(&devices)?
    };
    if !failed.is_empty() {
        bail!(
            "{} of {} arms failed: {} (rerun the plan to retry them; finished arms are kept)",
            failed.len(),
            plan.arms.len(),
            failed.join(", ")
        );
    }
    let summary = read_summary(&plan)?;
    report(&summary, json)
}

/// One arm of a prepared sweep: the report when it completed the set.
fn run_one(plan: &SweepPlan, index: usize, json: bool) -> anyhow::Result<()> {
    let name = &plan.arms[index].name;
    let summary = run_arm(plan, index, json).with_context(|| format!("arm {name} failed"))?;
    match summary {
        Some(s) => report(&s, json),
        None => finish(
            json,
            json!({"arm": name}),
            &format!("{name}: finished; other arms have not yet"),
        ),
    }
}

/// Every arm in turn; the names of those that failed.
fn run_in_process(plan: &SweepPlan, json: bool) -> Vec<String> {
    (0..plan.arms.len())
        .filter(|&i| run_arm(plan, i, json).is_err())
        .map(|i| plan.arms[i].name.clone())
        .collect()
}

/// Trains and validates one arm in this process (unless finished) and records its
/// completion, between its `started` and `finished` or `failed` events.
fn run_arm(plan: &SweepPlan, index: usize, json: bool) -> zlora::Result<Option<SweepSummary>> {
    let name = &plan.arms[index].name;
    arm_event(json, name, "started", json!({}));
    let mut progress = ArmProgress::new(json);
    let result = grid::run_one(plan, index, &mut |e| progress.show(e));
    progress.finish();
    match &result {
        Ok(_) => arm_event(json, name, "finished", json!({})),
        Err(e) => arm_event(json, name, "failed", json!({"error": e.to_string()})),
    }
    result
}

/// `--gpus` values as ZLORA_DEVICE values.
fn devices(list: &[String]) -> anyhow::Result<Vec<String>> {
    list.iter()
        .map(|d| match d.trim() {
            "cpu" => Ok("cpu".to_string()),
            n if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => Ok(format!("cuda:{n}")),
            other => bail!(
                "--gpus {other:?}: give GPU indices or cpu, comma-separated (e.g. --gpus 0,1)"
            ),
        })
        .collect()
}

/// A queue of arms run as child processes (`zlora sweep PLAN --arm NAME`), at most one per
/// device at a time; each child's output goes to OUTPUT/logs/NAME.log.
struct Scheduler<'a> {
    plan_file: &'a Path,
    plan: &'a SweepPlan,
    json: bool,
}

struct Running {
    child: Child,
    index: usize,
    slot: usize,
}

impl<'a> Scheduler<'a> {
    fn new(plan_file: &'a Path, plan: &'a SweepPlan, json: bool) -> Self {
        Self {
            plan_file,
            plan,
            json,
        }
    }

    fn run(&self, devices: &[String]) -> anyhow::Result<Vec<String>> {
        let exe = std::env::current_exe().context("cannot find the zlora executable")?;
        let logs = self.plan.output().join("logs");
        std::fs::create_dir_all(&logs)
            .with_context(|| format!("{}: cannot create", logs.display()))?;
        let mut queue: VecDeque<usize> = (0..self.plan.arms.len()).collect();
        let mut free: Vec<usize> = (0..devices.len()).rev().collect();
        let mut running: Vec<Running> = Vec::new();
        let mut failed = Vec::new();
        loop {
            while !queue.is_empty() && !free.is_empty() {
                let (Some(index), Some(slot)) = (queue.pop_front(), free.pop()) else {
                    break;
                };
                let child = self.spawn(&exe, &logs, index, &devices[slot])?;
                running.push(Running { child, index, slot });
            }
            if running.is_empty() {
                return Ok(failed);
            }
            std::thread::sleep(Duration::from_millis(200));
            let mut still = Vec::new();
            for mut r in running {
                match r.child.try_wait()? {
                    None => still.push(r),
                    Some(status) => {
                        free.push(r.slot);
                        let name = &self.plan.arms[r.index].name;
                        if status.success() {
                            arm_event(
                                self.json,
                                name,
                                "finished",
                                json!({"device": devices[r.slot]}),
                            );
                        } else {
                            let log = logs.join(format!("{name}.log"));
                            if !self.json {
                                eprintln!("{name}: failed ({status}); see {}", log.display());
                            }
                            arm_event(
                                self.json,
                                name,
                                "failed",
                                json!({"device": devices[r.slot], "log": log}),
                            );
                            failed.push(name.clone());
                        }
                    }
                }
            }
            running = still;
        }
    }

    fn spawn(&self, exe: &Path, logs: &Path, index: usize, device: &str) -> anyhow::Result<Child> {
        let name = &self.plan.arms[index].name;
        let log_path = logs.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("{}: cannot create", log_path.display()))?;
        let err = log
            .try_clone()
            .with_context(|| format!("{}: cannot reopen", log_path.display()))?;
        let child = Command::new(exe)
            .arg("sweep")
            .arg(self.plan_file)
            .args(["--arm", name])
            .env(zlora::device::ENV, device)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .with_context(|| format!("cannot start arm {name}"))?;
        arm_event(
            self.json,
            name,
            "started",
            json!({"device": device, "log": log_path}),
        );
        Ok(child)
    }
}

/// An arm started, finished or failed: an `arm` event with the time in seconds since the
/// epoch, or a line on stderr.
fn arm_event(json: bool, arm: &str, state: &str, extra: Value) {
    if !json {
        let details: Vec<String> = extra
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k} {}", v.as_str().map_or(v.to_string(), str::to_string)))
            .collect();
        match details.is_empty() {
            true => eprintln!("{arm}: {state}"),
            false => eprintln!("{arm}: {state} ({})", details.join(", ")),
        }
        return;
    }
    let time = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let mut e = json!({"event": "arm", "arm": arm, "state": state, "time": time});
    if let (Some(e), Value::Object(x)) = (e.as_object_mut(), extra) {
        e.extend(x);
    }
    events::emit(e);
}

fn read_summary(plan: &SweepPlan) -> anyhow::Result<SweepSummary> {
    let path = plan.output().join("sweep.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{}: the sweep's summary is missing", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: not a sweep summary", path.display()))
}

/// The comparison: one line per arm and the best, then the report's path.
fn report(s: &SweepSummary, json: bool) -> anyhow::Result<()> {
    if json {
        events::done(json!({"report": s.report, "best": s.best, "arms": s.arms}));
        return Ok(());
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
    Ok(())
}

/// The last output of a command that wrote something: a `done` event or the line.
fn finish(json: bool, fields: Value, line: &str) -> anyhow::Result<()> {
    if json {
        events::done(fields);
    } else {
        println!("{line}");
    }
    Ok(())
}
