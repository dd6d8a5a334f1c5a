//! Jobs: a submitted config checked against DIR, and the runner that takes queued jobs one at
//! a time and runs each as a child process of this same binary (`zlora KIND --events json`:
//! train, validate, caption, experiment, sweep, fetch), so that a crash stays in the child, its
//! memory goes back to the system when it ends, and a stop is a signal the trainer answers
//! with a checkpoint.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;
use zlora::train::config::TrainConfig;
use zlora::validate::arms::ArmsPlan;
use zlora::validate::experiment::ExperimentPlan;
use zlora::validate::grid::SweepPlan;
use zlora::validate::plan::ValidationPlan;

use crate::root::{Refused, Root};
use crate::store::{Job, State, Store};

/// What a job runs: a command of this binary (`zlora KIND … --events json`). A kind is one
/// entry in each `match` below: its name, the request field it takes, how that is checked,
/// and its command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Train,
    Validate,
    Caption,
    Experiment,
    Sweep,
    Fetch,
}

impl Kind {
    pub const ALL: [Kind; 6] = [
        Kind::Train,
        Kind::Validate,
        Kind::Caption,
        Kind::Experiment,
        Kind::Sweep,
        Kind::Fetch,
    ];

    pub fn parse(s: &str) -> Option<Kind> {
        Self::ALL.into_iter().find(|k| k.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Train => "train",
            Kind::Validate => "validate",
            Kind::Caption => "caption",
            Kind::Experiment => "experiment",
            Kind::Sweep => "sweep",
            Kind::Fetch => "fetch",
        }
    }

    /// The field of `POST /api/jobs` that holds what the job runs, and what it must be.
    pub fn field(self) -> (&'static str, &'static str) {
        match self {
            Kind::Train => ("config", "the TOML text of a train config"),
            Kind::Validate => ("config", "the TOML text of a validation plan"),
            Kind::Caption => (
                "dataset",
                "a dataset's name (with model, style, …: docs/serve.md)",
            ),
            Kind::Experiment => ("config", "the TOML text of an experiment plan"),
            Kind::Sweep => ("config", "the TOML text of a sweep plan"),
            Kind::Fetch => ("repo", "a known model name or a repository id (org/name)"),
        }
    }
}

/// Where a fetch job puts models: a Hugging Face cache (`HF_HUB_CACHE`) inside DIR, so that
/// a snapshot folder under it is a `[model] path` like any other.
pub const FETCH_CACHE: &str = "models/hub";

/// A submitted job made safe to run: every path absolute and inside DIR.
pub struct CheckedConfig {
    /// What the command reads: a config's TOML, or a fetch's model name.
    pub toml: String,
    /// The job's output folder, relative to DIR.
    pub output: String,
    /// Known before the run for a training; the others' counts come with their events.
    pub steps: u64,
}

/// Parses a submitted config with the command's own parser and resolves each of its path
/// fields against DIR, refusing any that leaves it.
pub fn check_config(root: &Root, kind: Kind, text: &str) -> Result<CheckedConfig, Refused> {
    let (toml, output, steps) =
        match kind {
            Kind::Train => check_train(root, text)?,
            Kind::Validate => check_validation(root, text)?,
            Kind::Caption => return Err(Refused(
                "a caption job is queued with its fields (dataset, model, style, …), not a config"
                    .into(),
            )),
            Kind::Experiment => {
                check_arms_plan(root, text, "the experiment plan", ExperimentPlan::parse)?
            }
            Kind::Sweep => check_arms_plan(root, text, "the sweep plan", SweepPlan::parse)?,
            Kind::Fetch => (check_fetch_name(text)?, root.path().join(FETCH_CACHE), 0),
        };
    Ok(CheckedConfig {
        toml,
        output: root.relative(&output),
        steps,
    })
}

/// A config's TOML (paths made absolute), its output folder and its step count.
type Checked = (String, PathBuf, u64);

fn invalid(e: impl std::fmt::Display) -> Refused {
    Refused(format!("config: {e}"))
}

fn check_train(root: &Root, text: &str) -> Result<Checked, Refused> {
    let path = |field: &str, p: &Path, model: bool| root.config_path(field, p, model);
    let mut cfg = TrainConfig::parse(text).map_err(invalid)?;
    let model = path("[model] path", Path::new(&cfg.model.path), true)?;
    cfg.model.path = model.to_string_lossy().into_owned();
    if let Some(adapter) = &cfg.model.training_adapter {
        cfg.model.training_adapter = Some(path("[model] training_adapter", adapter, true)?);
    }
    if let Some(file) = &cfg.model.transformer {
        cfg.model.transformer = Some(path("[model] transformer", file, true)?);
    }
    for d in &mut cfg.datasets {
        d.path = path("[dataset] path", &d.path, false)?;
        if let Some(cache) = &d.cache_dir {
            d.cache_dir = Some(path("[dataset] cache_dir", cache, false)?);
        }
        if let Some(masks) = &d.masks {
            d.masks = Some(path("[dataset] masks", masks, false)?);
        }
    }
    cfg.train.output = path("[train] output", &cfg.train.output, false)?;
    let toml = toml::to_string(&cfg).map_err(invalid)?;
    Ok((toml, cfg.train.output, cfg.train.steps))
}

fn check_validation(root: &Root, text: &str) -> Result<Checked, Refused> {
    let path = |field: &str, p: &Path, model: bool| root.config_path(field, p, model);
    let mut plan = ValidationPlan::parse(text).map_err(invalid)?;
    plan.lora = path("lora", &plan.lora, false)?;
    for (field, model) in [("base", &mut plan.base), ("turbo", &mut plan.turbo)] {
        *model = model_path(root, field, model)?;
    }
    if let Some(patch) = &plan.distill_patch {
        plan.distill_patch = Some(path("distill_patch", patch, true)?);
    }
    plan.output = path("output", &plan.output, false)?;
    let toml = toml::to_string(&plan).map_err(invalid)?;
    Ok((toml, plan.output, 0))
}

/// An experiment or sweep plan (`what`, for the command's own check `parse`): its paths
/// confined by [`confine_arms_plan`], then the plan checked as the command reads it (every
/// arm's or way's training config), on the paths as the job gets them. The runs' outputs are
/// under its output.
fn check_arms_plan<T>(
    root: &Root,
    text: &str,
    what: &str,
    parse: fn(&Path, &str) -> zlora::Result<T>,
) -> Result<Checked, Refused> {
    let mut plan: ArmsPlan = toml::from_str(text).map_err(invalid)?;
    confine_arms_plan(root, &mut plan)?;
    let toml = toml::to_string(&plan).map_err(invalid)?;
    parse(Path::new(what), &toml).map_err(invalid)?;
    Ok((toml, plan.output, 0))
}

/// Makes every path of a plan of arms absolute inside DIR: its models and adapters, output,
/// the shared `[dataset]` table's folders (those of a train config's `[dataset]`), and a
/// sweep's datasets (`[grid] dataset`, `[[arm]] dataset`).
fn confine_arms_plan(root: &Root, plan: &mut ArmsPlan) -> Result<(), Refused> {
    let path = |field: &str, p: &Path, model: bool| root.config_path(field, p, model);
    let folder = |field: &str, p: &mut String| -> Result<(), Refused> {
        *p = path(field, Path::new(p.as_str()), false)?
            .to_string_lossy()
            .into_owned();
        Ok(())
    };
    for (field, model) in [("base", &mut plan.base), ("turbo", &mut plan.turbo)] {
        *model = model_path(root, field, model)?;
    }
    if let Some(model) = &mut plan.de_turbo {
        *model = model_path(root, "de_turbo", model)?;
    }
    for (field, file) in [
        ("training_adapter", &mut plan.training_adapter),
        ("distill_patch", &mut plan.distill_patch),
    ] {
        if let Some(p) = file {
            *file = Some(path(field, p, true)?);
        }
    }
    let datasets = match &mut plan.dataset {
        toml::Value::Array(tables) => tables.iter_mut().collect(),
        one => vec![one],
    };
    for dataset in datasets {
        let Some(table) = dataset.as_table_mut() else {
            return Err(invalid("[dataset] must be a table"));
        };
        for key in ["path", "cache_dir", "masks"] {
            let field = format!("[dataset] {key}");
            match table.get_mut(key) {
                None => {}
                Some(toml::Value::String(p)) => folder(&field, p)?,
                Some(other) => return Err(invalid(format!("{field} must be a path, got {other}"))),
            }
        }
    }
    if let Some(grid) = &mut plan.grid {
        for p in &mut grid.dataset {
            folder("[grid] dataset", p)?;
        }
    }
    for p in plan.arms.iter_mut().filter_map(|a| a.dataset.as_mut()) {
        folder("[[arm]] dataset", p)?;
    }
    plan.output = path("output", &plan.output, false)?;
    Ok(())
}

/// A model named by a string field, made absolute inside DIR.
fn model_path(root: &Root, field: &str, value: &str) -> Result<String, Refused> {
    let p = root.config_path(field, Path::new(value), true)?;
    Ok(p.to_string_lossy().into_owned())
}

/// A fetch's name goes to `zlora fetch` as an argument (after `--`, so never as an option),
/// which says whether it knows it: here it need only be one plain line.
fn check_fetch_name(name: &str) -> Result<String, Refused> {
    let name = name.trim();
    if name.is_empty() || name.len() > 200 || name.chars().any(char::is_control) {
        return Err(Refused(format!(
            "\"repo\" must be {}, got {name:?}",
            Kind::Fetch.field().1
        )));
    }
    Ok(name.to_string())
}

/// What the HTTP side shares with the runner.
pub struct Jobs {
    pub root: Root,
    pub store: Mutex<Store>,
    running: Mutex<Option<Running>>,
}

/// The job being run: its child once started, and whether a stop came before that.
#[derive(Clone, Copy)]
struct Running {
    id: i64,
    pid: Option<u32>,
    stop: bool,
}

impl Jobs {
    pub fn new(root: Root, store: Store) -> Self {
        Self {
            root,
            store: Mutex::new(store),
            running: Mutex::new(None),
        }
    }

    pub fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        // A panic while holding the lock leaves the database itself consistent (each change
        // is one statement), so the guard is taken over.
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The folder of a job's config and log.
    pub fn job_dir(&self, id: i64) -> PathBuf {
        self.root.state_dir().join("jobs").join(id.to_string())
    }

    pub fn log_path(&self, id: i64) -> PathBuf {
        self.job_dir(id).join("log.txt")
    }

    /// Asks job `id` to stop: a queued job is stopped at once; a running one gets SIGTERM and
    /// finishes its step, writes a checkpoint and exits. `Ok(false)`: nothing to stop.
    pub fn stop(&self, id: i64) -> anyhow::Result<bool> {
        let store = self.store();
        let Some(job) = store.get(id)? else {
            return Ok(false);
        };
        match job.state {
            State::Queued => store.set_state(id, State::Stopped, None)?,
            State::Running => {
                let mut running = self.running();
                if let Some(r) = running.as_mut().filter(|r| r.id == id) {
                    r.stop = true;
                    if let Some(pid) = r.pid {
                        zlora::child::terminate(pid);
                    }
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn running(&self) -> std::sync::MutexGuard<'_, Option<Running>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs queued jobs one at a time, for ever.
    pub fn run_queue(self: Arc<Self>) {
        loop {
            match self.start_next() {
                Ok(Some(job)) => self.run(job),
                Ok(None) => std::thread::sleep(Duration::from_millis(250)),
                Err(e) => {
                    eprintln!("job queue: {e:#}");
                    std::thread::sleep(Duration::from_secs(5));
                }
            }
        }
    }

    /// The next queued job, marked running here and in the database under the same lock, so
    /// that a stop never finds one without the other.
    fn start_next(&self) -> anyhow::Result<Option<Job>> {
        let store = self.store();
        let next = store.start_next()?;
        *self.running() = next.as_ref().map(|job| Running {
            id: job.id,
            pid: None,
            stop: false,
        });
        Ok(next)
    }

    /// One job from start to its final state.
    fn run(&self, job: Job) {
        let (state, error) = match self.run_child(&job) {
            Ok(end) => end,
            Err(e) => (State::Failed, Some(format!("{e:#}"))),
        };
        let store = self.store();
        if let Err(e) = store.set_state(job.id, state, error.as_deref()) {
            eprintln!("job {}: {e:#}", job.id);
        }
        *self.running() = None;
    }

    fn run_child(&self, job: &Job) -> anyhow::Result<(State, Option<String>)> {
        let dir = self.job_dir(job.id);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let config = dir.join("config.toml");
        zlora::fsutil::write_atomic(&config, job.config.as_bytes(), true)?;
        let log_path = self.log_path(job.id);
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("cannot open {}", log_path.display()))?;
        let kind = Kind::parse(&job.kind)
            .with_context(|| format!("job {} has an unknown kind {:?}", job.id, job.kind))?;
        let (mut cmd, again) = self.command(kind, job, &config)?;
        let arms = match kind {
            Kind::Sweep => sweep_arms(&job.config)?,
            _ => Vec::new(),
        };
        writeln!(log, "== {} ==", if again { "resumed" } else { "started" })?;
        cmd.stderr(log.try_clone()?);
        let mut child = cmd.spawn().context("cannot start the job")?;
        if let Some(r) = self.running().as_mut() {
            r.pid = Some(child.id());
            if r.stop {
                zlora::child::terminate(child.id());
            }
        }
        let end = self.follow(job.id, &arms, &mut child, &mut log);
        let status = child.wait()?;
        let stopped = self.running().is_some_and(|r| r.stop);
        Ok(end?.unwrap_or_else(|| {
            if stopped {
                // A validation has no clean stop: SIGTERM ends it, and a resume runs it again.
                return (State::Stopped, None);
            }
            let why = format!("the job ended ({status}) without a final event; see its log");
            (State::Failed, Some(why))
        }))
    }

    /// Reads the child's events until its stdout closes; the final state if it said one.
    /// `arms`: a sweep's, in order, to say which of them a phase is.
    fn follow(
        &self,
        id: i64,
        arms: &[String],
        child: &mut Child,
        log: &mut std::fs::File,
    ) -> anyhow::Result<Option<(State, Option<String>)>> {
        let stdout = child
            .stdout
            .take()
            .context("the job's output is not piped")?;
        let mut end = None;
        let mut progress = Progress::default();
        for line in BufReader::new(stdout).lines() {
            let line = line?;
            let Ok(event) = serde_json::from_str::<Value>(&line) else {
                writeln!(log, "{line}")?;
                continue;
            };
            let text = |k: &str| event[k].as_str().unwrap_or_default().to_string();
            let count = |k: &str| event[k].as_u64().unwrap_or(0);
            match event["event"].as_str().unwrap_or_default() {
                "step" => progress.count(count("step"), count("steps"), event["rate"].as_f64()),
                "image" => progress.count(count("done"), count("total"), None),
                "download" => progress.count(count("done"), count("total"), event["rate"].as_f64()),
                "training" => {
                    progress.phase(arm_phase(arms, &text("arm"), "training"), count("steps"))
                }
                "validating" => progress.phase(arm_phase(arms, &text("arm"), "validating"), 0),
                "arm" => {
                    let line = format!("arm {} {} {}", text("arm"), text("state"), text("error"));
                    writeln!(log, "{}", line.trim_end())?
                }
                "listed" => progress.phase(format!("downloading {}", text("repo")), count("bytes")),
                "message" | "stage" => writeln!(log, "{}", text("text"))?,
                "checkpoint" | "samples" => writeln!(log, "{} {}", text("event"), text("path"))?,
                "done" => {
                    if let Some(folder) = event["snapshot"].as_str() {
                        writeln!(log, "snapshot {folder}")?;
                        let output = self.root.relative(Path::new(folder));
                        self.store().set_output(id, &output)?;
                    }
                    end = Some((State::Done, None));
                }
                "stopped" => end = Some((State::Stopped, None)),
                "failed" => end = Some((State::Failed, Some(text("error")))),
                _ => {}
            }
            if progress.due() {
                self.save_progress(id, &mut progress)?;
            }
        }
        if progress.pending {
            self.save_progress(id, &mut progress)?;
        }
        Ok(end)
    }

    fn save_progress(&self, id: i64, progress: &mut Progress) -> anyhow::Result<()> {
        let (step, steps, rate) = progress.latest;
        progress.saved = Some(Instant::now());
        progress.pending = false;
        self.store()
            .progress(id, step, steps, rate, progress.name.as_deref())
    }
}

/// The names of a sweep's arms, in the order it runs them, from its checked plan's text.
pub fn sweep_arms(config: &str) -> zlora::Result<Vec<String>> {
    let plan = SweepPlan::parse(Path::new("the sweep plan"), config)?;
    Ok(plan.arms.into_iter().map(|a| a.name).collect())
}

/// The phase of an arm (an experiment's way, a sweep's arm) at `stage`; for a sweep, which of
/// its arms it is.
fn arm_phase(arms: &[String], arm: &str, stage: &str) -> String {
    match arms.iter().position(|a| a == arm) {
        Some(i) => format!("{arm} {stage} · arm {} of {}", i + 1, arms.len()),
        None => format!("{arm} {stage}"),
    }
}

/// A job's newest step, step count (images for a validation, bytes for a fetch), rate and
/// phase (an experiment's way and stage, a fetch's repository), written to the database at
/// most every [`Progress::EVERY`] (a tiny model takes hundreds of steps a second, and each
/// write is a disk sync), and at once when the phase changes.
#[derive(Default)]
struct Progress {
    latest: (u64, u64, Option<f64>),
    name: Option<String>,
    saved: Option<Instant>,
    /// Whether `latest` or `name` changed since the last write.
    pending: bool,
}

impl Progress {
    const EVERY: Duration = Duration::from_millis(200);

    fn count(&mut self, step: u64, steps: u64, rate: Option<f64>) {
        self.latest = (step, steps, rate);
        self.pending = true;
    }

    fn phase(&mut self, name: String, steps: u64) {
        self.count(0, steps, None);
        self.name = Some(name);
        self.saved = None;
    }

    fn due(&self) -> bool {
        self.pending && self.saved.is_none_or(|t| t.elapsed() >= Self::EVERY)
    }
}

impl Jobs {
    /// The job's command: `zlora KIND --events json …` of this binary, its stdout piped (the
    /// events) and its stdin closed; and whether it continues an earlier run. A training
    /// resumes from its checkpoint (`--resume`, when there is one), a validation runs again
    /// (`--force`, replacing its own output), an experiment keeps what it finished and
    /// resumes its training in progress, a sweep keeps its finished arms and runs the others
    /// (in this process, one after another), a fetch continues its partial files.
    fn command(&self, kind: Kind, job: &Job, config: &Path) -> anyhow::Result<(Command, bool)> {
        let exe = std::env::current_exe().context("cannot find this program to run the job")?;
        let mut cmd = Command::new(exe);
        cmd.arg(kind.as_str())
            .args(["--events", "json"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        zlora::child::stop_with_parent(&mut cmd);
        let again = match kind {
            Kind::Train => job.resume && has_checkpoint(&self.root.path().join(&job.output)),
            Kind::Validate | Kind::Caption | Kind::Experiment | Kind::Sweep | Kind::Fetch => {
                job.resume
            }
        };
        match kind {
            Kind::Train => cmd.arg(config).args(again.then_some("--resume")),
            Kind::Validate => cmd.arg(config).args(again.then_some("--force")),
            Kind::Caption => cmd.args(crate::caption::args(&job.config, again)?),
            Kind::Experiment | Kind::Sweep => cmd.arg(config),
            Kind::Fetch => cmd
                .env("HF_HUB_CACHE", self.root.path().join(FETCH_CACHE))
                .args(["--", &job.config]),
        };
        Ok((cmd, again))
    }
}

/// Whether a run folder holds a finished checkpoint (`checkpoints/step-N`; unfinished ones
/// are dot-named), which `--resume` needs: without one a resumed job starts over.
fn has_checkpoint(output: &Path) -> bool {
    std::fs::read_dir(output.join("checkpoints")).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("step-"))
    })
}
