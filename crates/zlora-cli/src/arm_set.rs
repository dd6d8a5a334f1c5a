//! How `sweep` and `experiment` run their arms besides one after another in this process:
//! one per device at a time as child processes of this binary (`--gpus`), one arm of a
//! prepared set (`--arm`, `--arm-index`: what the children and Slurm's array tasks run), or
//! the Slurm job array's script (`--emit slurm`). docs/sweep.md, docs/validation.md.

use std::collections::VecDeque;
use std::path::Path;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde_json::{json, Value};
use zlora::validate::arm_set::{self, ArmOutcome, ArmSet};

use crate::events::{self, EventFormat};
use crate::experiment::ArmProgress;
use crate::train::{stop_on_signals, STOPPED};

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum Emit {
    Slurm,
}

/// Where the arms run, and how the command starts and reports: the options both commands
/// share.
#[derive(clap::Args)]
pub struct Placement {
    /// Delete the output folder and start over (otherwise finished arms are kept); only a
    /// folder zlora made.
    #[arg(long, conflicts_with_all = ["arm", "arm_index"])]
    pub force: bool,
    /// Print progress and results as JSON lines on stdout (arm, training, step, validating,
    /// image, then done, stopped or failed) instead of bars; docs/sweep.md and docs/serve.md
    /// list the events.
    #[arg(long, value_enum)]
    pub events: Option<EventFormat>,
    /// Run the arms as child processes, one per listed device at a time: GPU indices
    /// (`0,1` gives ZLORA_DEVICE=cuda:0 and cuda:1) or `cpu` (`cpu,cpu`: two arms at once).
    #[arg(long, value_delimiter = ',', conflicts_with_all = ["arm", "arm_index", "emit"])]
    gpus: Vec<String>,
    /// Write OUTPUT/sweep.sbatch (or experiment.sbatch), a Slurm job array of one task per
    /// arm, instead of running.
    #[arg(long, value_enum, conflicts_with_all = ["arm", "arm_index"])]
    emit: Option<Emit>,
    /// Run only the arm of this name, in a set prepared from the same plan.
    #[arg(long, conflicts_with = "arm_index")]
    arm: Option<String>,
    /// Run only the arm at this index (from 0), as a Slurm array task does.
    #[arg(long)]
    arm_index: Option<usize>,
}

/// What the placement options ask for.
pub enum Placed {
    /// Every arm one after another in this process.
    InProcess,
    /// Every arm as child processes, one per device (ZLORA_DEVICE values) at a time.
    Devices(Vec<String>),
    /// One arm of a prepared set.
    One(usize),
    /// The Slurm script.
    Slurm,
}

impl Placement {
    /// The plan `read` gives and where its arms run; the options are checked first.
    pub fn placed<S: ArmSet>(
        &self,
        read: impl FnOnce() -> zlora::Result<S>,
    ) -> anyhow::Result<(S, Placed)> {
        let devices = devices(&self.gpus)?;
        let set = read()?;
        let placed = self.place(&set, devices)?;
        Ok((set, placed))
    }

    fn place(&self, set: &impl ArmSet, devices: Vec<String>) -> anyhow::Result<Placed> {
        if self.emit.is_some() {
            return Ok(Placed::Slurm);
        }
        let index = match (&self.arm, self.arm_index) {
            (Some(name), _) => Some(set.index_of(name)?),
            (None, Some(i)) => Some(i),
            (None, None) => None,
        };
        Ok(match (index, devices.is_empty()) {
            (Some(i), _) => {
                set.check_index(i)?;
                Placed::One(i)
            }
            (None, true) => Placed::InProcess,
            (None, false) => Placed::Devices(devices),
        })
    }
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

/// `--emit slurm`: prepares the output folder and writes the script.
pub fn emit_slurm<S: ArmSet>(set: &S, force: bool, json: bool) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("cannot find the zlora executable")?;
    let script = arm_set::emit_slurm(set, &exe, force)?;
    finish(
        json,
        json!({"script": script}),
        &script.display().to_string(),
    )
}

/// One arm of a prepared set; `show` prints the report when this arm completed the set.
/// SIGTERM or SIGINT stops it cleanly (its training checkpoints; exit status 130).
pub fn run_one<S: ArmSet>(
    set: &S,
    index: usize,
    json: bool,
    show: fn(&S::Report, bool),
) -> anyhow::Result<ExitCode> {
    arm_set::check_prepared(set)?;
    let stop = stop_on_signals()?;
    let name = &set.arms()[index].name;
    match run_arm(set, index, json, &stop).with_context(|| format!("arm {name} failed"))? {
        ArmOutcome::Completed(report) => show(&report, json),
        ArmOutcome::Finished => finish(
            json,
            json!({"arm": name}),
            &format!("{name}: finished; other arms have not yet"),
        )?,
        ArmOutcome::Stopped => return Ok(stopped(json)),
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs every arm, in this process one after another (`devices` empty; an arm that fails
/// does not stop the others) or as child processes one per device, in a folder claimed
/// for the set; then reads back the report the last arm wrote. `None` when SIGTERM or
/// SIGINT stopped it: the arms in progress checkpoint, no other starts.
pub fn run_all<S: ArmSet>(
    plan_file: &Path,
    set: &S,
    devices: &[String],
    force: bool,
    json: bool,
) -> anyhow::Result<Option<S::Report>> {
    let _claimed = arm_set::prepare(set, force)?;
    let stop = stop_on_signals()?;
    let ended = if devices.is_empty() {
        in_turn(set, json, &stop)
    } else {
        Scheduler::new(plan_file, set, json).run(devices, &stop)?
    };
    let failed = match ended {
        Ended::Stopped => return Ok(None),
        Ended::Ran { failed } => failed,
    };
    if !failed.is_empty() {
        bail!(
            "{} of {} arms failed: {} (rerun the plan to retry them; finished arms are kept)",
            failed.len(),
            set.arms().len(),
            failed.join(", ")
        );
    }
    Ok(Some(set.written_report()?))
}

/// How a run of every arm ended.
enum Ended {
    Stopped,
    /// Every arm ran; the names of those that failed.
    Ran {
        failed: Vec<String>,
    },
}

/// Every arm one after another in this process, until a stop.
fn in_turn<S: ArmSet>(set: &S, json: bool, stop: &Arc<AtomicBool>) -> Ended {
    let mut failed = Vec::new();
    for (i, arm) in set.arms().iter().enumerate() {
        match run_arm(set, i, json, stop) {
            Ok(ArmOutcome::Stopped) => return Ended::Stopped,
            Ok(_) => {}
            Err(_) => failed.push(arm.name.clone()),
        }
    }
    Ended::Ran { failed }
}

/// A stopped run's last output: the `stopped` event or a line; exit status 130.
pub fn stopped(json: bool) -> ExitCode {
    match json {
        true => events::emit(json!({"event": "stopped"})),
        false => eprintln!("stopped; run the same command again to continue"),
    }
    ExitCode::from(STOPPED)
}

/// Trains and validates one arm in this process (unless finished) and records its
/// completion, between its `started` and `finished`, `stopped` or `failed` events.
fn run_arm<S: ArmSet>(
    set: &S,
    index: usize,
    json: bool,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<ArmOutcome<S::Report>> {
    let name = &set.arms()[index].name;
    arm_event(json, name, "started", json!({}));
    let mut progress = ArmProgress::new(json);
    let result = arm_set::run_one(set, index, Some(stop), &mut |e| progress.show(e));
    progress.finish();
    match &result {
        Ok(ArmOutcome::Stopped) => arm_event(json, name, "stopped", json!({})),
        Ok(_) => arm_event(json, name, "finished", json!({})),
        Err(e) => arm_event(json, name, "failed", json!({"error": e.to_string()})),
    }
    Ok(result?)
}

/// A queue of arms run as child processes (`zlora COMMAND PLAN --arm NAME`), at most one per
/// device at a time; each child's output goes to OUTPUT/logs/NAME.log.
struct Scheduler<'a, S> {
    plan_file: &'a Path,
    plan: &'a S,
    json: bool,
}

struct Running {
    child: Child,
    index: usize,
    slot: usize,
}

impl<'a, S: ArmSet> Scheduler<'a, S> {
    fn new(plan_file: &'a Path, plan: &'a S, json: bool) -> Self {
        Self {
            plan_file,
            plan,
            json,
        }
    }

    /// Runs the queue until every arm ran, or until `stop`: then no arm starts, each running
    /// one gets SIGTERM (it checkpoints), and the queue waits for them.
    fn run(&self, devices: &[String], stop: &AtomicBool) -> anyhow::Result<Ended> {
        let exe = std::env::current_exe().context("cannot find the zlora executable")?;
        let logs = self.plan.output().join("logs");
        std::fs::create_dir_all(&logs)
            .with_context(|| format!("{}: cannot create", logs.display()))?;
        let mut queue: VecDeque<usize> = (0..self.plan.arms().len()).collect();
        let mut free: Vec<usize> = (0..devices.len()).rev().collect();
        let mut running: Vec<Running> = Vec::new();
        let mut failed = Vec::new();
        let mut stopping = false;
        loop {
            if stop.load(Ordering::SeqCst) && !stopping {
                stopping = true;
                queue.clear();
                for r in &running {
                    zlora::child::terminate(r.child.id());
                }
            }
            while !queue.is_empty() && !free.is_empty() {
                let (Some(index), Some(slot)) = (queue.pop_front(), free.pop()) else {
                    break;
                };
                let child = self.spawn(&exe, &logs, index, &devices[slot])?;
                running.push(Running { child, index, slot });
            }
            if running.is_empty() {
                return Ok(match stopping {
                    true => Ended::Stopped,
                    false => Ended::Ran { failed },
                });
            }
            std::thread::sleep(Duration::from_millis(200));
            let mut still = Vec::new();
            for mut r in running {
                match r.child.try_wait()? {
                    None => still.push(r),
                    Some(status) => {
                        free.push(r.slot);
                        let name = &self.plan.arms()[r.index].name;
                        let device = json!({"device": devices[r.slot]});
                        if status.success() {
                            arm_event(self.json, name, "finished", device);
                        } else if status.code() == Some(i32::from(STOPPED)) {
                            arm_event(self.json, name, "stopped", device);
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
        let name = &self.plan.arms()[index].name;
        let log_path = logs.join(format!("{name}.log"));
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("{}: cannot create", log_path.display()))?;
        let err = log
            .try_clone()
            .with_context(|| format!("{}: cannot reopen", log_path.display()))?;
        let mut cmd = Command::new(exe);
        cmd.arg(S::COMMAND)
            .arg(self.plan_file)
            .args(["--arm", name])
            .env(zlora::device::ENV, device)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err);
        zlora::child::stop_with_parent(&mut cmd);
        let child = cmd
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

/// An arm started, finished, stopped or failed: an `arm` event with the time in seconds since the
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

/// The last output of a command that wrote something: a `done` event or the line.
fn finish(json: bool, fields: Value, line: &str) -> anyhow::Result<()> {
    if json {
        events::done(fields);
    } else {
        println!("{line}");
    }
    Ok(())
}
