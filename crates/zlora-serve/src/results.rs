//! Results: the training runs under DIR/runs with their LoRAs (downloaded in any layout,
//! converted on the fly by the library's `lora::write`, as `zlora lora convert` does), their
//! checkpoints, sample grids and validation reports (a sweep's or an experiment's folder as
//! its arms and report), and two runs' grids side by side.

use std::path::{Path, PathBuf};

use candle_core::DType;
use maud::{html, Markup};
use zlora::lora::write::{save, Metadata};
use zlora::lora::{Layout, LoraFile};

use crate::api::{encode, images, internal, Answer, REPORT};
use crate::http::{Reply, Request};
use crate::jobs::Jobs;
use crate::pages::{file_url, layout, report_url};
use crate::root::segment;

/// The layouts a LoRA downloads in, by the names `zlora lora convert --to` takes.
const LAYOUTS: [(&str, Layout); 5] = [
    ("default", Layout::AiToolkit),
    ("comfyui", Layout::ComfyFused),
    ("diffusers", Layout::DiffusersPeft),
    ("musubi", Layout::Kohya),
    ("diffsynth", Layout::DiffSynth),
];

/// The file a run (and each checkpoint) keeps its LoRA in.
const LORA: &str = "lora.safetensors";

/// A run as its URL names it: a folder of DIR/runs (`/runs/RUN`), or an arm of a sweep's or
/// an experiment's folder there (`/runs/SET/arms/ARM`, the run `runs/SET/runs/ARM`).
pub enum RunRef<'a> {
    Run(&'a str),
    Arm { set: &'a str, arm: &'a str },
}

impl RunRef<'_> {
    /// Its folder, each segment checked (no path outside DIR); 404 when there is none.
    fn dir(&self, jobs: &Jobs) -> Result<PathBuf, Reply> {
        let dir = match self {
            RunRef::Run(run) => jobs.root.url_path("runs", &[run])?,
            RunRef::Arm { set, arm } => jobs.root.url_path("runs", &[set, "runs", arm])?,
        };
        if !dir.is_dir() {
            return Err(Reply::error(404, &format!("no run {:?}", self.name()?)));
        }
        Ok(dir)
    }

    /// `RUN`, or `SET/ARM`.
    fn name(&self) -> Result<String, Reply> {
        Ok(match self {
            RunRef::Run(run) => segment(run)?,
            RunRef::Arm { set, arm } => format!("{}/{}", segment(set)?, segment(arm)?),
        })
    }

    /// Its page's URL.
    fn href(&self) -> Result<String, Reply> {
        Ok(match self {
            RunRef::Run(run) => format!("/runs/{}", encode(&segment(run)?)),
            RunRef::Arm { set, arm } => format!(
                "/runs/{}/arms/{}",
                encode(&segment(set)?),
                encode(&segment(arm)?)
            ),
        })
    }
}

/// The run folders, sorted by name (hidden ones left out).
fn runs(jobs: &Jobs) -> Result<Vec<String>, Reply> {
    let dir = jobs.root.path().join("runs");
    Ok(zlora::fsutil::sorted_entries(&dir)
        .map_err(internal)?
        .iter()
        .filter(|p| p.is_dir())
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .filter(|n| !n.starts_with('.'))
        .collect())
}

/// Checkpoint steps of a run that hold a LoRA, oldest first.
fn checkpoints(run: &Path) -> Vec<u64> {
    let entries = zlora::fsutil::sorted_entries(&run.join("checkpoints")).unwrap_or_default();
    entries
        .iter()
        .filter(|p| p.join(LORA).is_file())
        .filter_map(|p| p.file_name()?.to_str()?.strip_prefix("step-")?.parse().ok())
        .collect()
}

/// The validation reports of a run: its checkpoint sweep (RUN/validation), and each report
/// under DIR/reports whose metrics name a LoRA of this run.
fn reports(jobs: &Jobs, name: &str, run: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = vec![run.join("validation").join(REPORT)];
    let dir = jobs.root.path().join("reports");
    for folder in zlora::fsutil::sorted_entries(&dir).unwrap_or_default() {
        let lora = std::fs::read_to_string(folder.join("metrics.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|m| m["lora"].as_str().map(PathBuf::from));
        if lora.is_some_and(|l| of_run(&l, name)) {
            found.push(folder.join(REPORT));
        }
    }
    found.retain(|p| p.is_file());
    found
}

/// Whether a LoRA path lies in `runs/NAME/` (however the validation was given it).
fn of_run(lora: &Path, name: &str) -> bool {
    let parts: Vec<_> = lora.components().map(|c| c.as_os_str()).collect();
    parts
        .windows(2)
        .any(|w| w[0] == "runs" && w[1] == std::ffi::OsStr::new(name))
}

pub fn list(jobs: &Jobs) -> Answer {
    let names = runs(jobs)?;
    Ok(Reply::html(
        200,
        layout(
            "Results",
            html! {
                @if names.is_empty() { p.muted { "No runs yet (they appear under runs/ as jobs train)." } }
                table {
                    thead { tr { th { "Run" } th { "LoRA" } th { "Checkpoints" } th { "Reports" } } }
                    tbody {
                        @for name in &names {
                            @let dir = jobs.root.path().join("runs").join(name);
                            @if let Some(command) = arm_set(&dir) {
                                (arm_set_row(jobs, name, &dir, &command))
                            } @else {
                                @let href = format!("/runs/{}", encode(name));
                                tr {
                                    td { a href=(href) { (name) } }
                                    td { @if dir.join(LORA).is_file() { (downloads(&href, None)) } @else { span.muted { "not finished" } } }
                                    td { (checkpoints(&dir).len()) }
                                    td { @for r in reports(jobs, name, &dir) { a href=(report_url(jobs, &r)) { (jobs.root.relative(&r)) } " " } }
                                }
                            }
                        }
                    }
                }
                h2 { "Compare two runs' samples" }
                form method="get" action="/compare" {
                    (run_select("a", &names)) (run_select("b", &names))
                    label { "Step " input name="step" type="number" min="0" value="0"; }
                    button { "Compare" }
                }
            },
        ),
    ))
}

/// The command whose arms a folder holds (`sweep`, `experiment`): its runs are under
/// `runs/`, its comparison is `report.html`.
fn arm_set(dir: &Path) -> Option<String> {
    zlora::outdir::made_by(dir).filter(|c| c == "sweep" || c == "experiment")
}

/// A sweep's or an experiment's row: its arms (each a run in `NAME/runs/ARM`, linked to its
/// page) in place of a LoRA, and its report once written.
fn arm_set_row(jobs: &Jobs, name: &str, dir: &Path, command: &str) -> Markup {
    let arms = zlora::fsutil::sorted_entries(&dir.join("runs")).unwrap_or_default();
    let arms: Vec<String> = arms
        .iter()
        .filter_map(|a| Some(a.file_name()?.to_string_lossy().into_owned()))
        .collect();
    let report = dir.join(REPORT);
    html! {
        tr {
            td { (name) " " span.muted { "(" (command) ")" } }
            td { "arms: " @for a in &arms { a href=(format!("/runs/{}/arms/{}", encode(name), encode(a))) { code { (a) } } " " } }
            td { "—" }
            td { @if report.is_file() { a href=(report_url(jobs, &report)) { (jobs.root.relative(&report)) } } @else { span.muted { "not finished" } } }
        }
    }
}

fn run_select(field: &str, names: &[String]) -> Markup {
    html! { label { "Run " select name=(field) { @for n in names { option value=(n) { (n) } } } } " " }
}

/// Download links of a run's LoRA (or a checkpoint's), one per layout; `href` is the run's
/// page.
fn downloads(href: &str, step: Option<u64>) -> Markup {
    let step = step.map_or(String::new(), |s| format!("&step={s}"));
    html! {
        @for (layout, _) in &LAYOUTS {
            a href=(format!("{href}/lora?layout={layout}{step}")) download { (layout) } " "
        }
    }
}

pub fn run(jobs: &Jobs, run: RunRef) -> Answer {
    let dir = run.dir(jobs)?;
    let name = run.name()?;
    let href = run.href()?;
    let lora = dir.join(LORA);
    let metadata = lora
        .is_file()
        .then(|| LoraFile::read(&lora).map(|f| f.metadata));
    let mut grids = images(&dir.join("samples")).unwrap_or_default();
    grids.reverse();
    Ok(Reply::html(
        200,
        layout(
            &format!("Run {name}"),
            html! {
                h2 { "LoRA" }
                @match &metadata {
                    None => p.muted { "No final LoRA yet." },
                    Some(Err(e)) => p.error { (e) },
                    Some(Ok(meta)) => {
                        p { "Download: " (downloads(&href, None)) }
                        table.metadata { @for (k, v) in meta { tr { th { (k) } td { pre { (v) } } } } }
                    },
                }
                h2 { "Checkpoints" }
                ul { @for step in checkpoints(&dir) { li { "step " (step) ": " (downloads(&href, Some(step))) } } }
                h2 { "Validation reports" }
                ul { @for r in run_reports(jobs, &run, &dir) { li { a href=(report_url(jobs, &r)) { (jobs.root.relative(&r)) } } } }
                h2 { "Samples" }
                @for g in &grids {
                    figure { img src=(file_url(jobs, g)) alt="sample grid"; figcaption { (g.file_name().unwrap_or_default().to_string_lossy()) } }
                }
            },
        ),
    ))
}

/// A run's validation reports: a run of DIR/runs as [`reports`] finds them; an arm's, its
/// set's validation of it (`SET/validation/ARM`) and its own checkpoint sweep.
fn run_reports(jobs: &Jobs, run: &RunRef, dir: &Path) -> Vec<PathBuf> {
    match run {
        RunRef::Run(name) => segment(name).map_or(Vec::new(), |n| reports(jobs, &n, dir)),
        RunRef::Arm { set, arm } => {
            let set_dir = jobs.root.path().join("runs").join(set);
            [
                set_dir.join("validation").join(arm).join(REPORT),
                dir.join("validation").join(REPORT),
            ]
            .into_iter()
            .filter(|p| p.is_file())
            .collect()
        }
    }
}

/// `GET /runs/{run}/lora?layout=L[&step=N]` (or `/runs/{set}/arms/{arm}/lora`): the run's
/// (or checkpoint N's) LoRA rewritten in layout L, as an attachment.
pub fn download(jobs: &Jobs, run: RunRef, req: &Request) -> Answer {
    let dir = run.dir(jobs)?;
    let name = req.query.get("layout").map_or("default", String::as_str);
    let Some((_, layout)) = LAYOUTS.iter().find(|(n, _)| *n == name) else {
        let names: Vec<_> = LAYOUTS.iter().map(|(n, _)| *n).collect();
        return Err(Reply::error(
            400,
            &format!("layout {name:?}: one of {}", names.join(", ")),
        ));
    };
    let source = match req.query.get("step") {
        None => dir.join(LORA),
        Some(s) => {
            let step: u64 = s
                .parse()
                .map_err(|_| Reply::error(400, &format!("step {s:?} is not a step number")))?;
            dir.join(format!("checkpoints/step-{step:06}")).join(LORA)
        }
    };
    if !source.is_file() {
        return Err(Reply::error(
            404,
            &format!("no LoRA {}", jobs.root.relative(&source)),
        ));
    }
    let bytes = convert(jobs, &source, *layout)?;
    let file_name = format!("{}-{name}.safetensors", safe_name(&run.name()?));
    Ok(Reply::new(200, "application/octet-stream", bytes).with(
        "Content-Disposition",
        format!("attachment; filename=\"{file_name}\""),
    ))
}

/// The LoRA rewritten by `lora::write::save` (f32, metadata carried as `lora convert` does)
/// into a temporary file in the app's state folder, read back and removed.
fn convert(jobs: &Jobs, source: &Path, layout: Layout) -> Result<Vec<u8>, Reply> {
    let file = LoraFile::read(source).map_err(|e| Reply::error(422, &e.to_string()))?;
    let tmp = tempfile::Builder::new()
        .suffix(".safetensors")
        .tempfile_in(jobs.root.state_dir())
        .map_err(internal)?;
    let metadata = Metadata::carried_from(&file.metadata);
    save(
        tmp.path(),
        &file.modules,
        layout,
        DType::F32,
        &metadata,
        true,
    )
    .map_err(internal)?;
    std::fs::read(tmp.path()).map_err(internal)
}

/// A file name for the Content-Disposition header: letters, digits, `.`, `-`, `_` only.
fn safe_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || ".-_".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `GET /compare?a=RUN&b=RUN&step=N`: both runs' sample grids at step N side by side.
pub fn compare(jobs: &Jobs, req: &Request) -> Answer {
    let field = |k: &str| {
        req.query
            .get(k)
            .cloned()
            .ok_or_else(|| Reply::error(400, &format!("compare needs {k}")))
    };
    let (a, b) = (field("a")?, field("b")?);
    let step: u64 = field("step")?
        .parse()
        .map_err(|_| Reply::error(400, "step must be a step number"))?;
    let grid = |run: &str| -> Result<(String, Option<PathBuf>), Reply> {
        let raw = encode(run);
        let dir = RunRef::Run(&raw).dir(jobs)?;
        let png = dir.join(format!("samples/step-{step:06}.png"));
        Ok((run.to_string(), png.is_file().then_some(png)))
    };
    let sides = [grid(&a)?, grid(&b)?];
    Ok(Reply::html(
        200,
        layout(
            &format!("Step {step}: {a} and {b}"),
            html! {
                div.compare {
                    @for (run, png) in &sides {
                        figure {
                            @match png {
                                Some(p) => img src=(file_url(jobs, p)) alt=(format!("{run} at step {step}"));,
                                None => p.muted { "no samples at this step" },
                            }
                            figcaption { a href=(format!("/runs/{}", encode(run))) { (run) } }
                        }
                    }
                }
            },
        ),
    ))
}
