//! Jobs: a submitted config checked against DIR, and the runner that takes queued jobs one at
//! a time and runs each as a child process of this same binary (`zlora train --events json`,
//! `zlora validate …`, `zlora caption …`),
//! so that a crash stays in the child, its memory goes back to the system when it ends, and a
//! stop is a signal the trainer answers with a checkpoint.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use serde_json::Value;
use zlora::train::config::TrainConfig;
use zlora::validate::plan::ValidationPlan;

use crate::root::{Refused, Root};
use crate::store::{Job, State, Store};

/// What a job runs: `zlora train` or `zlora validate` of a config, or `zlora caption` of a
/// dataset (crate::caption).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Train,
    Validate,
    Caption,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "train" => Some(Kind::Train),
            "validate" => Some(Kind::Validate),
            "caption" => Some(Kind::Caption),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Train => "train",
            Kind::Validate => "validate",
            Kind::Caption => "caption",
        }
    }
}

/// A submitted config made safe to run: every path absolute and inside DIR.
pub struct CheckedConfig {
    pub toml: String,
    /// The job's output folder, relative to DIR.
    pub output: String,
    /// Known before the run for a training; a validation's count of images comes with its
    /// first event.
    pub steps: u64,
}

/// Parses a submitted config with the command's own parser and resolves each of its path
/// fields against DIR, refusing any that leaves it.
pub fn check_config(root: &Root, kind: Kind, text: &str) -> Result<CheckedConfig, Refused> {
    let invalid = |e: &dyn std::fmt::Display| Refused(format!("config: {e}"));
    let path = |field: &str, p: &Path, model: bool| root.config_path(field, p, model);
    let (toml, output, steps) = match kind {
        Kind::Train => {
            let mut cfg = TrainConfig::parse(text).map_err(|e| invalid(&e))?;
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
            let toml = toml::to_string(&cfg).map_err(|e| invalid(&e))?;
            (toml, cfg.train.output, cfg.train.steps)
        }
        Kind::Validate => {
            let mut plan = ValidationPlan::parse(text).map_err(|e| invalid(&e))?;
            plan.lora = path("lora", &plan.lora, false)?;
            for (field, model) in [("base", &mut plan.base), ("turbo", &mut plan.turbo)] {
                *model = path(field, Path::new(model.as_str()), true)?
                    .to_string_lossy()
                    .into_owned();
            }
            if let Some(patch) = &plan.distill_patch {
                plan.distill_patch = Some(path("distill_patch", patch, true)?);
            }
            plan.output = path("output", &plan.output, false)?;
            let toml = toml::to_string(&plan).map_err(|e| invalid(&e))?;
            (toml, plan.output, 0)
        }
        Kind::Caption => {
            return Err(Refused(
                "a caption job is queued with its fields (dataset, model, style, …), not a config"
                    .into(),
            ))
        }
    };
    Ok(CheckedConfig {
        toml,
        output: root.relative(&output),
        steps,
    })
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
                        terminate(pid);
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
        let again = match kind {
            Kind::Train => job.resume && has_checkpoint(&self.root.path().join(&job.output)),
            Kind::Validate | Kind::Caption => job.resume,
        };
        writeln!(log, "== {} ==", if again { "resumed" } else { "started" })?;
        let args = command_args(kind, &config, &job.config, again)?;
        let mut child = spawn(&args, log.try_clone()?)?;
        if let Some(r) = self.running().as_mut() {
            r.pid = Some(child.id());
            if r.stop {
                terminate(child.id());
            }
        }
        let end = self.follow(job.id, &mut child, &mut log);
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
    fn follow(
        &self,
        id: i64,
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
            match event["event"].as_str().unwrap_or_default() {
                "step" | "image" => {
                    let [step, steps] = match event["event"].as_str() {
                        Some("step") => ["step", "steps"],
                        _ => ["done", "total"],
                    }
                    .map(|k| event[k].as_u64().unwrap_or(0));
                    progress.latest = (step, steps, event["rate"].as_f64());
                    if progress.due() {
                        self.save_progress(id, &mut progress)?;
                    }
                }
                "message" | "stage" => writeln!(log, "{}", text("text"))?,
                "checkpoint" | "samples" => writeln!(log, "{} {}", text("event"), text("path"))?,
                "done" => end = Some((State::Done, None)),
                "stopped" => end = Some((State::Stopped, None)),
                "failed" => end = Some((State::Failed, Some(text("error")))),
                _ => {}
            }
        }
        if progress.saved.is_some() {
            self.save_progress(id, &mut progress)?;
        }
        Ok(end)
    }

    fn save_progress(&self, id: i64, progress: &mut Progress) -> anyhow::Result<()> {
        let (step, steps, rate) = progress.latest;
        progress.saved = Some(Instant::now());
        self.store().progress(id, step, steps, rate)
    }
}

/// A job's newest step, step count (images for a validation) and rate, written to the database at most every [`Progress::EVERY`]:
/// a tiny model takes hundreds of steps a second, and each write is a disk sync.
#[derive(Default)]
struct Progress {
    latest: (u64, u64, Option<f64>),
    saved: Option<Instant>,
}

impl Progress {
    const EVERY: Duration = Duration::from_millis(200);

    fn due(&self) -> bool {
        self.saved.is_none_or(|t| t.elapsed() >= Self::EVERY)
    }
}

/// `zlora train CONFIG --events json [--resume]`, `zlora validate PLAN --events json
/// [--force]` (run again, a validation replaces its own earlier output), or the `zlora
/// caption` of a caption job's settings (`text`, the config file's content).
fn command_args(
    kind: Kind,
    config: &Path,
    text: &str,
    again: bool,
) -> anyhow::Result<Vec<OsString>> {
    let again_flag = match kind {
        Kind::Train => "--resume",
        Kind::Validate => "--force",
        Kind::Caption => return crate::caption::args(text, again),
    };
    let mut args: Vec<OsString> = vec![kind.as_str().into(), config.into()];
    args.extend(["--events", "json"].map(OsString::from));
    args.extend(again.then(|| again_flag.into()));
    Ok(args)
}

/// This binary with `args`; its stderr goes to the log.
fn spawn(args: &[OsString], log: std::fs::File) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find this program to run the job")?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    stop_with_parent(&mut cmd);
    cmd.spawn().context("cannot start the job")
}

/// The child gets SIGTERM when the server goes away, so that it stops cleanly with a
/// checkpoint instead of running on unseen (and holding its output folder's lock).
#[cfg(target_os = "linux")]
fn stop_with_parent(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe, as code between fork and exec must be.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[cfg(not(target_os = "linux"))]
fn stop_with_parent(_cmd: &mut Command) {}

fn terminate(pid: u32) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill only sends a signal.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
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
