//! The HTML pages, rendered on the server with maud (which escapes every interpolated string).
//! The little JavaScript they need (static/app.js) only calls the JSON API.

use std::path::{Path, PathBuf};

use maud::{html, Markup, DOCTYPE};
use zlora::hub::known::KNOWN;
use zlora::validate::experiment::WAYS;

use crate::api::{self, caption, dataset_dir, encode, images, internal, Answer, REPORT};
use crate::chart::{loss_chart, losses};
use crate::http::{Reply, Request};
use crate::jobs::{sweep_arms, Jobs, Kind, FETCH_CACHE};
use crate::preflight;
use crate::root::segment;
use crate::store::{Job, State};

/// How many lines of a job's log its page shows (the newest).
const LOG_LINES: usize = 200;

pub fn layout(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · zlora" }
                link rel="stylesheet" href="/static/app.css";
                script src="/static/app.js" defer {}
            }
            body {
                nav { a href="/jobs" { "Jobs" } a href="/new" { "New run" } a href="/results" { "Results" } a href="/datasets" { "Datasets" } }
                main {
                    h1 { (title) }
                    p #status role="status" {}
                    (body)
                }
            }
        }
    }
}

pub fn error_page(status: u16, message: &str) -> Markup {
    layout(&format!("Error {status}"), html! { p.error { (message) } })
}

pub fn login(failed: bool) -> Markup {
    layout(
        "Log in",
        html! {
            @if failed { p.error { "That token is not this server's." } }
            form method="post" action="/login" {
                label { "Token " input type="password" name="token" autocomplete="current-password" autofocus; }
                button { "Log in" }
            }
        },
    )
}

pub fn jobs(jobs: &Jobs) -> Answer {
    let list = jobs.store().list().map_err(internal)?;
    Ok(Reply::html(
        200,
        layout(
            "Jobs",
            html! {
                @if list.is_empty() { p.muted { "No jobs yet." } } @else {
                    table {
                        thead { tr { th { "Job" } th { "Kind" } th { "State" } th { "Progress" } th { "Output" } } }
                        tbody {
                            @for job in &list {
                                tr {
                                    td { a href=(format!("/jobs/{}", job.id)) { "#" (job.id) } }
                                    td { (job.kind) }
                                    td { span class=(format!("state {}", job.state.as_str())) { (job.state.as_str()) } }
                                    td { (progress_text(job)) }
                                    td { code { (job.output) } }
                                }
                            }
                        }
                    }
                }
                h2 { "New job" }
                p.muted { "A train config (docs/training.md), a validation plan or an experiment plan (docs/validation.md) or a sweep plan (docs/sweep.md), as TOML; paths are read from the app's folder, e.g. "
                    code { "models/tiny" } ", " code { "datasets/tiny" } ", " code { "runs/first" } "." }
                form data-json="" action="/api/jobs" data-next="/jobs/{id}" {
                    select name="kind" {
                        @for kind in Kind::ALL.into_iter().filter(|k| k.field().0 == "config") {
                            option value=(kind.as_str()) { (kind.as_str()) }
                        }
                    }
                    textarea name="config" rows="14" cols="80" spellcheck="false" required {}
                    button { "Queue" }
                }
                h2 { "Fetch a model" }
                p.muted { "Downloads into " code { (FETCH_CACHE) } " (a Hugging Face cache); the job's output is the model's folder, for a config's "
                    code { "[model] path" } ". Names: " (KNOWN.iter().map(|k| k.alias).collect::<Vec<_>>().join(", ")) ", or a repository id (org/name)." }
                form #fetch data-json="" action="/api/jobs" data-next="/jobs/{id}" {
                    input type="hidden" name="kind" value="fetch";
                    input name="repo" placeholder="turbo" required;
                    " "
                    button { "Fetch" }
                }
            },
        ),
    ))
}

pub fn job(jobs: &Jobs, id: i64) -> Answer {
    let job = api::job(jobs, id)?;
    let run = jobs.root.path().join(&job.output);
    let live = matches!(job.state, State::Queued | State::Running);
    let title = format!("Job #{} · {}", job.id, job.state.as_str());
    let runs = trainings(&job, &run)?;
    let report_label = match Kind::parse(&job.kind) {
        Some(Kind::Experiment) => "Experiment report",
        Some(Kind::Sweep) => "Sweep report",
        _ => "Validation report",
    };
    Ok(Reply::html(
        200,
        layout(
            &title,
            html! {
                div data-poll=[live.then(|| format!("/api/jobs/{id}"))] {
                    (progress(&job))
                    p {
                        @if live { button data-post=(format!("/api/jobs/{id}/stop")) { "Stop" } }
                        @if job.state.resumable() { button data-post=(format!("/api/jobs/{id}/resume")) { "Resume" } }
                        @if !live { button data-delete=(format!("/api/jobs/{id}")) data-next="/jobs" { "Delete" } }
                    }
                    @if let Some(e) = &job.error { p.error { (e) } }
                }
                @if run.join(REPORT).is_file() {
                    p { a href=(report_url(jobs, &run.join(REPORT))) { (report_label) } }
                }
                @for (way, folder) in &runs {
                    h2 { "Loss" @if let Some(w) = way { " · " (w) } }
                    (loss_chart(&losses(folder)))
                    h2 { "Samples" @if let Some(w) = way { " · " (w) } }
                    (samples(jobs, folder))
                }
                h2 { "Log" }
                pre.log { (log_tail(&jobs.log_path(id))) }
                details { summary { "Config" } pre { (job.config) } }
            },
        ),
    ))
}

/// The training runs whose loss and samples a job's page shows: a training's folder, an
/// experiment's three ways and a sweep's arms (`OUTPUT/runs/NAME`, named); none for the
/// other kinds.
fn trainings(job: &Job, output: &Path) -> Result<Vec<(Option<String>, PathBuf)>, Reply> {
    let names: Vec<String> = match Kind::parse(&job.kind) {
        Some(Kind::Train) => return Ok(vec![(None, output.to_path_buf())]),
        Some(Kind::Experiment) => WAYS.iter().map(|w| w.name().to_string()).collect(),
        Some(Kind::Sweep) => sweep_arms(&job.config).map_err(internal)?,
        _ => Vec::new(),
    };
    Ok(names
        .into_iter()
        .map(|n| {
            let folder = output.join("runs").join(&n);
            (Some(n), folder)
        })
        .collect())
}

/// A job's progress in its own units: a training's steps, a validation's or a captioning's
/// images, a fetch's bytes; an experiment's or a sweep's phase (way or arm, and stage) first.
fn progress_text(job: &Job) -> String {
    let counts = match Kind::parse(&job.kind) {
        Some(Kind::Fetch) => format!("{} / {}", gigabytes(job.step), gigabytes(job.steps)),
        Some(Kind::Train) => format!("step {} / {}", job.step, job.steps),
        Some(Kind::Validate | Kind::Caption) => format!("image {} / {}", job.step, job.steps),
        _ => format!("{} / {}", job.step, job.steps),
    };
    match &job.phase {
        Some(phase) => format!("{phase}: {counts}"),
        None => counts,
    }
}

fn gigabytes(bytes: u64) -> String {
    format!("{:.2} GB", bytes as f64 / 1e9)
}

fn progress(job: &Job) -> Markup {
    let eta = job
        .rate
        .filter(|r| *r > 0.0)
        .map(|r| (job.steps.saturating_sub(job.step)) as f64 / r);
    let rate = match Kind::parse(&job.kind) {
        Some(Kind::Fetch) => job.rate.map(|r| format!("{:.1} MB/s", r / 1e6)),
        Some(Kind::Validate | Kind::Caption) => job.rate.map(|r| format!("{r:.2} images/s")),
        _ => job.rate.map(|r| format!("{r:.2} steps/s")),
    };
    html! {
        p {
            progress max=(job.steps) value=(job.step) {}
            " " (progress_text(job))
            @if let Some(r) = rate { " · " (r) }
            @if let Some(s) = eta.filter(|_| job.state == State::Running) { " · ETA " (format!("{:.0}", s)) " s" }
        }
        p { "Output " code { (job.output) } }
    }
}

/// The run's sample grids, newest first.
fn samples(jobs: &Jobs, run: &Path) -> Markup {
    let mut grids = images(&run.join("samples")).unwrap_or_default();
    grids.reverse();
    html! {
        @if grids.is_empty() { p.muted { "No samples yet." } }
        @for g in &grids {
            figure {
                img src=(file_url(jobs, g)) alt="sample grid";
                figcaption { (g.file_name().unwrap_or_default().to_string_lossy()) }
            }
        }
    }
}

/// The URL of an image under DIR (each segment encoded).
pub fn file_url(jobs: &Jobs, p: &Path) -> String {
    format!("/files/{}", encoded_path(jobs, p))
}

pub fn report_url(jobs: &Jobs, p: &Path) -> String {
    format!("/report/{}", encoded_path(jobs, p))
}

fn encoded_path(jobs: &Jobs, p: &Path) -> String {
    let rel = jobs.root.relative(p);
    rel.split('/').map(encode).collect::<Vec<_>>().join("/")
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_LINES)..].join("\n")
}

pub fn datasets(jobs: &Jobs) -> Answer {
    let list = api::datasets(jobs)?;
    Ok(Reply::html(
        200,
        layout(
            "Datasets",
            html! {
                @if list.is_empty() { p.muted { "No datasets yet." } }
                ul {
                    @for (name, count) in &list {
                        li { a href=(format!("/datasets/{}", encode(name))) { (name) } " · " (count) " images" }
                    }
                }
                h2 { "New dataset" }
                form data-json="" action="/api/datasets" data-next="/datasets" {
                    label { "Name " input name="name" required; }
                    label { input type="checkbox" name="tiny"; " with the built-in tiny dataset (six 64 px images)" }
                    button { "Create" }
                }
            },
        ),
    ))
}

/// A dataset's images with their captions (edited in place) and findings, the trainer's
/// check of the folder with its bucket counts, and a form that queues a caption job.
pub fn dataset(jobs: &Jobs, raw_name: &str, req: &Request) -> Answer {
    let dir = dataset_dir(jobs, raw_name)?;
    let name = segment(raw_name)?;
    let base = format!("/api/datasets/{}", encode(&name));
    let list = images(&dir).map_err(internal)?;
    let check = preflight::check(&jobs.root, &dir, &req.query);
    // The form shows what was checked, or after a refused check the default to edit.
    let resolution = check
        .as_ref()
        .map_or(preflight::DEFAULT_RESOLUTION, |c| c.resolution);
    let checked_model = check.as_ref().ok().map(|c| c.model.as_str());
    let zimages = preflight::zimage_models(&jobs.root).map_err(|e| internal(e.0))?;
    let vlms = preflight::models_with(&jobs.root, &crate::caption::VLM_FILES)
        .map_err(|e| internal(e.0))?;
    Ok(Reply::html(
        200,
        layout(
            &format!("Dataset {name}"),
            html! {
                p { (list.len()) " images · captions are saved as you leave the field" }
                label { "Add images " input type="file" accept="image/png,image/jpeg,image/webp" multiple data-upload=(format!("{base}/images/")); }
                h2 { "Check" }
                (preflight::form(&jobs.root, &zimages, resolution, checked_model))
                @match &check {
                    Ok(c) => (c.markup()),
                    Err(e) => p.error { (e.0) },
                }
                h2 { "Caption" }
                (caption_form(jobs, &vlms, &name))
                h2 { "Images" }
                div.grid {
                    @for img in &list {
                        @let file = img.file_name().unwrap_or_default().to_string_lossy().into_owned();
                        figure {
                            img src=(file_url(jobs, img)) alt=(file) loading="lazy";
                            figcaption {
                                (file)
                                @if let Ok(c) = &check {
                                    @for p in c.problems_of(img) {
                                        p class=(format!("finding {}", preflight::severity(p))) { (p.kind) }
                                    }
                                }
                                textarea data-put=(format!("{base}/captions/{}", encode(&file))) rows="3" { (caption(img)) }
                                button data-delete=(format!("{base}/images/{}", encode(&file))) { "Delete" }
                            }
                        }
                    }
                }
            },
        ),
    ))
}

/// Queues `zlora caption` of the dataset with a Qwen3-VL under models/ (one of `vlms`,
/// offered) or a repo id in the Hugging Face cache. Existing captions are kept or overwritten
/// only when a box says so.
fn caption_form(jobs: &Jobs, vlms: &[PathBuf], dataset: &str) -> Markup {
    let models: Vec<String> = vlms.iter().map(|m| jobs.root.relative(m)).collect();
    html! {
        p.muted { "Writes NAME.txt beside each image with a local Qwen3-VL (" code { "zlora caption" } ", docs/caption.md), as a job." }
        form.caption data-json="" action="/api/jobs" data-next="/jobs/{id}" {
            input type="hidden" name="kind" value="caption";
            input type="hidden" name="dataset" value=(dataset);
            label { "Model " input name="model" list="vlms" required value=[models.first()] placeholder="models/NAME or org/name"; }
            datalist #vlms { @for m in &models { option value=(m) {} } }
            label { " Style " select name="style" { @for s in crate::caption::STYLES { option value=(s) { (s) } } } }
            label { " Trigger " input name="trigger"; }
            label { input type="checkbox" name="skip_existing"; " only the images without a caption" }
            label { input type="checkbox" name="force"; " overwrite existing captions" }
            button { "Caption" }
        }
    }
}
