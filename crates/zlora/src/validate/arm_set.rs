//! Running the arms of a plan of several — a sweep ([`super::grid`]) or an experiment
//! ([`super::experiment`]) — in any way: in this process one after another, as child
//! processes one per device, or as the tasks of a Slurm job array.
//!
//! However they run, each arm that finishes records its completion in `OUTPUT/finished/`
//! under the set's lock, and the arm whose completion makes the set complete writes the
//! set's report: the report is written once, by the last arm.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::arms::{self, run_arm, Arm, ArmsPlan, Event};
use super::run::Record;
use crate::fsutil::write_atomic;
use crate::outdir::{self, OutputDir};
use crate::{Error, Result};

/// A plan of several arms, and the report written when they have all finished.
pub trait ArmSet {
    /// What the finished set gives: the report's path and what the command prints.
    type Report;
    /// The `zlora` subcommand that runs the plan; also the output folder's maker.
    const COMMAND: &'static str;
    /// The shared plan, its arms in order, and the plan's text (copied into the output folder).
    fn parts(&self) -> (&ArmsPlan, &[Arm], &str);

    fn plan(&self) -> &ArmsPlan {
        self.parts().0
    }

    fn arms(&self) -> &[Arm] {
        self.parts().1
    }

    fn text(&self) -> &str {
        self.parts().2
    }
    /// Writes the report from every arm's validation record, in arm order.
    fn write_report(&self, records: &[Record]) -> Result<Self::Report>;
    /// The report the set's last arm wrote (read back by the process that ran the arms as
    /// child processes).
    fn written_report(&self) -> Result<Self::Report>;

    fn output(&self) -> &Path {
        &self.plan().output
    }

    /// The index of the arm named `name`, or an error listing the names.
    fn index_of(&self, name: &str) -> Result<usize> {
        self.arms()
            .iter()
            .position(|a| a.name == name)
            .ok_or_else(|| {
                let names: Vec<&str> = self.arms().iter().map(|a| a.name.as_str()).collect();
                Error::Invalid(format!(
                    "the plan has no arm {name:?} (its arms: {})",
                    names.join(", ")
                ))
            })
    }

    /// The arm of a job array's task index, or an error naming the range.
    fn check_index(&self, index: usize) -> Result<()> {
        let count = self.arms().len();
        if index < count {
            return Ok(());
        }
        Err(Error::Invalid(format!(
            "arm index {index} is out of range: the plan has {count} arms (0-{})",
            count - 1
        )))
    }
}

/// What running one arm came to.
pub enum ArmOutcome<R> {
    /// The stop flag was set before the arm's end; a rerun continues it.
    Stopped,
    /// The arm finished; others have not yet.
    Finished,
    /// The arm finished and completed the set: the set's report.
    Completed(R),
}

/// The plan's copy in the output folder: arms run by index or name check against it.
const PLAN_COPY: &str = "plan.toml";
/// Completion records, one `NAME.json` per finished arm.
const FINISHED: &str = "finished";

fn finished_record(set: &impl ArmSet, arm: &Arm) -> PathBuf {
    set.output()
        .join(FINISHED)
        .join(format!("{}.json", arm.name))
}

/// The Slurm script's file name in the output folder, `COMMAND.sbatch`.
pub fn slurm_script<S: ArmSet>() -> String {
    format!("{}.sbatch", S::COMMAND)
}

/// Claims the output folder for the whole set (this process, or its child processes) and
/// writes the plan's copy; with `force`, a folder zlora made is started over.
pub fn prepare<S: ArmSet>(set: &S, force: bool) -> Result<OutputDir> {
    let claimed = set.plan().claim_output(S::COMMAND, set.arms(), force)?;
    write_atomic(&set.output().join(PLAN_COPY), set.text().as_bytes(), true)?;
    Ok(claimed)
}

/// For one arm run on its own (`--arm`, `--arm-index`): the output folder must be this
/// command's, prepared from the same plan text (by the whole set or `--emit slurm`), so that
/// every task agrees on the arms and their indices.
pub fn check_prepared<S: ArmSet>(set: &S) -> Result<()> {
    let out = set.output();
    let copy = out.join(PLAN_COPY);
    let command = S::COMMAND;
    if outdir::made_by(out).as_deref() != Some(command) || !copy.is_file() {
        return Err(Error::bad_file(
            out,
            format!("is not prepared for this {command}: run `zlora {command} PLAN --emit slurm` (or the whole {command}) first"),
        ));
    }
    let text = std::fs::read_to_string(&copy).map_err(|e| Error::io(&copy, e))?;
    if text != set.text() {
        return Err(Error::bad_file(
            &copy,
            format!("differs from the plan given: the {command} was prepared from another plan; prepare it again (`--emit slurm`)"),
        ));
    }
    Ok(())
}

/// Runs one arm (skipping what finished earlier), records its completion and, when that
/// completes the set, writes the set's report.
pub fn run_one<S: ArmSet>(
    set: &S,
    index: usize,
    stop: Option<&Arc<AtomicBool>>,
    events: &mut dyn FnMut(Event),
) -> Result<ArmOutcome<S::Report>> {
    set.check_index(index)?;
    let arm = &set.arms()[index];
    let Some(record) = run_arm(arm, stop, events)? else {
        return Ok(ArmOutcome::Stopped);
    };
    let lock = hold_lock(&set.output().join(format!(".{}-lock", S::COMMAND)))?;
    let json = serde_json::json!({"arm": arm.name, "lora_blake3": record.lora_blake3});
    write_atomic(
        &finished_record(set, arm),
        json.to_string().as_bytes(),
        true,
    )?;
    let report = complete_set(set)?
        .map(|records| set.write_report(&records))
        .transpose()?;
    drop(lock);
    Ok(match report {
        Some(r) => {
            events(Event::Message(format!(
                "every arm finished: {}",
                set.output().join("report.html").display()
            )));
            ArmOutcome::Completed(r)
        }
        None => ArmOutcome::Finished,
    })
}

/// Every arm's validation record when each has recorded its completion and is still
/// finished (a stale record of an arm whose plan changed does not count).
fn complete_set(set: &impl ArmSet) -> Result<Option<Vec<Record>>> {
    let mut records = Vec::new();
    for arm in set.arms() {
        if !finished_record(set, arm).is_file() {
            return Ok(None);
        }
        match arms::finished(arm)? {
            Some(r) => records.push(r),
            None => return Ok(None),
        }
    }
    Ok(Some(records))
}

/// The set's lock (`OUTPUT/.COMMAND-lock`), held while an arm records its completion and,
/// if it completes the set, writes the report; waited for, so that arms finishing at the
/// same time record their completion one after the other.
fn hold_lock(path: &Path) -> Result<File> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    file.lock().map_err(|e| Error::io(path, e))?;
    Ok(file)
}

/// Writes `OUTPUT/COMMAND.sbatch`: a Slurm job array of one task per arm, one GPU each, in
/// the folder the plan was given from (relative paths in the plan stay right); `zlora` is
/// this executable. Prepares the output folder first (as the whole set would).
pub fn emit_slurm<S: ArmSet>(set: &S, zlora: &Path, force: bool) -> Result<PathBuf> {
    let _claimed = prepare(set, force)?;
    let here = std::env::current_dir().map_err(|e| Error::io(".", e))?;
    let source = set
        .plan()
        .source
        .as_deref()
        .ok_or_else(|| Error::Invalid("the plan was not read from a file".into()))?;
    let plan_file = here.join(source);
    let logs = here.join(set.output()).join("logs");
    std::fs::create_dir_all(&logs).map_err(|e| Error::io(&logs, e))?;
    let script = format!(
        "#!/bin/bash\n\
         # zlora {command}: one array task per arm (0-{last}); each trains and validates its arm,\n\
         # and the task that completes the set writes {out}/report.html.\n\
         # Submit: sbatch {script}. Resubmitting reruns only the arms that did not finish.\n\
         #SBATCH --job-name=zlora-{command}\n\
         #SBATCH --array=0-{last}\n\
         #SBATCH --ntasks=1\n\
         #SBATCH --gres=gpu:1\n\
         #SBATCH --chdir={here}\n\
         #SBATCH --output={logs}/slurm-%A_%a.log\n\
         set -euo pipefail\n\
         exec {zlora} {command} {plan} --arm-index \"$SLURM_ARRAY_TASK_ID\"\n",
        command = S::COMMAND,
        last = set.arms().len() - 1,
        out = shell_quote(&here.join(set.output())),
        script = shell_quote(&here.join(set.output()).join(slurm_script::<S>())),
        here = here.display(),
        logs = logs.display(),
        zlora = shell_quote(zlora),
        plan = shell_quote(&plan_file),
    );
    let path = set.output().join(slurm_script::<S>());
    write_atomic(&path, script.as_bytes(), true)?;
    Ok(path)
}

/// A path as one single-quoted shell word.
fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "'\\''"))
}
