//! The JSON API (docs/serve.md), the same routes the pages call.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use zlora::data::dataset::{decode_image, IMAGE_EXTENSIONS};

use crate::http::{Reply, Request};
use crate::jobs::{check_config, CheckedConfig, Jobs, Kind};
use crate::root::{segment, Refused};
use crate::store::{Job, State};

/// The longest caption accepted (a caption is a sentence or a paragraph, not a file).
const MAX_CAPTION: usize = 64 << 10;

pub type Answer = Result<Reply, Reply>;

impl From<Refused> for Reply {
    fn from(r: Refused) -> Reply {
        Reply::error(400, &r.0)
    }
}

/// An unexpected failure (the database, the disk): a 500 with its cause.
pub fn internal(e: impl std::fmt::Display) -> Reply {
    Reply::error(500, &e.to_string())
}

pub fn job_json(job: &Job) -> Value {
    json!(job)
}

pub fn list_jobs(jobs: &Jobs) -> Answer {
    let list = jobs.store().list().map_err(internal)?;
    Ok(Reply::json(200, &json!(list)))
}

/// `{"kind": K, FIELD: …}` → 201 `{"id": N}`: `"config": "<TOML>"` for a train,
/// validate, experiment or sweep job, `"repo": NAME` for a fetch ([`Kind::field`]), a caption job's
/// own fields (crate::caption).
pub fn create_job(jobs: &Jobs, req: &Request) -> Answer {
    let body = req.json()?;
    let name = body["kind"].as_str().unwrap_or_default();
    let Some(kind) = Kind::parse(name) else {
        let kinds: Vec<String> = Kind::ALL
            .iter()
            .map(|k| format!("{:?}", k.as_str()))
            .collect();
        return Err(Reply::error(
            400,
            &format!("\"kind\" must be one of {}, got {name:?}", kinds.join(", ")),
        ));
    };
    if kind == Kind::Caption {
        let checked = crate::caption::check(&jobs.root, &body)?;
        let id = insert(jobs, kind, &checked)?;
        return Ok(Reply::json(201, &json!({ "id": id })));
    }
    let (field, what) = kind.field();
    let Some(text) = body[field].as_str() else {
        return Err(Reply::error(
            400,
            &format!("a job of kind {name:?} needs \"{field}\": {what}"),
        ));
    };
    let id = queue(jobs, kind, text)?;
    Ok(Reply::json(201, &json!({ "id": id })))
}

/// Checks a config as its command would (paths inside DIR) and queues it: the one way a job
/// enters the queue, from the API and from the New run page.
pub fn queue(jobs: &Jobs, kind: Kind, text: &str) -> Result<i64, Reply> {
    let checked = check_config(&jobs.root, kind, text)?;
    insert(jobs, kind, &checked)
}

fn insert(jobs: &Jobs, kind: Kind, checked: &CheckedConfig) -> Result<i64, Reply> {
    jobs.store()
        .insert(kind.as_str(), &checked.toml, &checked.output, checked.steps)
        .map_err(internal)
}

pub fn job(jobs: &Jobs, id: i64) -> Result<Job, Reply> {
    jobs.store()
        .get(id)
        .map_err(internal)?
        .ok_or_else(|| Reply::error(404, &format!("no job {id}")))
}

pub fn get_job(jobs: &Jobs, id: i64) -> Answer {
    Ok(Reply::json(200, &job_json(&job(jobs, id)?)))
}

/// 202 and the job: a running job stops after its step and checkpoint, a queued one at once.
pub fn stop_job(jobs: &Jobs, id: i64) -> Answer {
    let before = job(jobs, id)?;
    if !jobs.stop(id).map_err(internal)? {
        return Err(Reply::error(
            409,
            &format!("job {id} is {}: nothing to stop", before.state.as_str()),
        ));
    }
    Ok(Reply::json(202, &job_json(&job(jobs, id)?)))
}

/// Queues a stopped, interrupted or failed job again: a training continues from its last
/// checkpoint, a validation runs again.
pub fn resume_job(jobs: &Jobs, id: i64) -> Answer {
    let store = jobs.store();
    let job = store
        .get(id)
        .map_err(internal)?
        .ok_or_else(|| Reply::error(404, &format!("no job {id}")))?;
    if !job.state.resumable() {
        return Err(Reply::error(
            409,
            &format!(
                "job {id} is {}: only a stopped, interrupted or failed job resumes",
                job.state.as_str()
            ),
        ));
    }
    store.requeue(id).map_err(internal)?;
    Ok(Reply::json(202, &json!({ "id": id, "state": "queued" })))
}

/// Removes a job that is not queued or running from the queue, with its config and log; its
/// run folder (the results) stays.
pub fn delete_job(jobs: &Jobs, id: i64) -> Answer {
    let store = jobs.store();
    let job = store
        .get(id)
        .map_err(internal)?
        .ok_or_else(|| Reply::error(404, &format!("no job {id}")))?;
    if matches!(job.state, State::Queued | State::Running) {
        return Err(Reply::error(
            409,
            &format!("job {id} is {}: stop it first", job.state.as_str()),
        ));
    }
    store.delete(id).map_err(internal)?;
    let dir = jobs.job_dir(id);
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(internal)?;
    }
    Ok(Reply::json(200, &json!({ "deleted": id })))
}

/// A dataset: its folder under DIR/datasets, named by one URL segment.
pub fn dataset_dir(jobs: &Jobs, name: &str) -> Result<PathBuf, Reply> {
    let dir = jobs.root.url_path("datasets", &[name])?;
    if !dir.is_dir() {
        return Err(Reply::error(
            404,
            &format!("no dataset {:?}", segment(name)?),
        ));
    }
    Ok(dir)
}

/// Dataset folders (hidden ones, such as the trash, left out) with their image counts.
pub fn datasets(jobs: &Jobs) -> Result<Vec<(String, usize)>, Reply> {
    let dir = jobs.root.path().join("datasets");
    let mut out = Vec::new();
    for p in zlora::fsutil::sorted_entries(&dir).map_err(internal)? {
        let name = p
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        if p.is_dir() && !name.starts_with('.') {
            out.push((name, images(&p).map_err(internal)?.len()));
        }
    }
    Ok(out)
}

pub fn list_datasets(jobs: &Jobs) -> Answer {
    let list: Vec<Value> = datasets(jobs)?
        .into_iter()
        .map(|(name, images)| json!({"name": name, "images": images}))
        .collect();
    Ok(Reply::json(200, &json!(list)))
}

/// `{"name": N}` creates an empty dataset; with `"tiny": true` the built-in synthetic one
/// (what `zlora tiny-dataset` writes: six 64 px images with captions).
pub fn create_dataset(jobs: &Jobs, req: &Request) -> Answer {
    let body = req.json()?;
    let name = body["name"].as_str().unwrap_or_default();
    let dir = jobs.root.url_path("datasets", &[&encode(name)])?;
    if dir.exists() {
        return Err(Reply::error(409, &format!("dataset {name:?} exists")));
    }
    let tiny = match &body["tiny"] {
        Value::Null => false,
        Value::Bool(b) => *b,
        other => {
            return Err(Reply::error(
                400,
                &format!("\"tiny\" must be true or false, got {other}"),
            ))
        }
    };
    if tiny {
        zlora::data::synthetic::create(&dir, 6, 64, false).map_err(internal)?;
    } else {
        std::fs::create_dir(&dir).map_err(internal)?;
    }
    Ok(Reply::json(201, &json!({ "name": name })))
}

/// Percent-encodes a name from a JSON body, so that it passes the same check as a URL's.
pub fn encode(name: &str) -> String {
    percent_encoding::utf8_percent_encode(name, percent_encoding::NON_ALPHANUMERIC).to_string()
}

/// The images of a dataset folder, sorted by name.
pub fn images(dir: &Path) -> zlora::Result<Vec<PathBuf>> {
    Ok(zlora::fsutil::sorted_entries(dir)?
        .into_iter()
        .filter(|p| p.is_file() && is_image_name(p))
        .collect())
}

fn is_image_name(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|i| e.eq_ignore_ascii_case(i)))
}

/// The caption file beside an image (`NAME.txt`, the trainer's default extension).
pub fn caption_path(image: &Path) -> PathBuf {
    image.with_extension("txt")
}

pub fn caption(image: &Path) -> String {
    std::fs::read_to_string(caption_path(image)).unwrap_or_default()
}

pub fn get_dataset(jobs: &Jobs, name: &str) -> Answer {
    let dir = dataset_dir(jobs, name)?;
    let items: Vec<Value> = images(&dir)
        .map_err(internal)?
        .iter()
        .map(|p| {
            json!({
                "image": p.file_name().unwrap_or_default().to_string_lossy(),
                "caption": caption(p),
            })
        })
        .collect();
    Ok(Reply::json(
        200,
        &json!({ "name": segment(name)?, "items": items }),
    ))
}

/// The trainer's dataset check at `?resolution=` (default 1024) with `?model=`'s tokenizer
/// and VAE (default the first Z-Image folder under models/), and the bucket counts.
pub fn preflight(jobs: &Jobs, name: &str, req: &Request) -> Answer {
    let dir = dataset_dir(jobs, name)?;
    let check = crate::preflight::check(&jobs.root, &dir, &req.query)?;
    Ok(Reply::json(200, &check.json(&segment(name)?)))
}

/// An image of a dataset named by URL segments (it must have an image's extension), and
/// its decoded file name.
fn dataset_image(jobs: &Jobs, name: &str, file: &str) -> Result<(PathBuf, String), Reply> {
    dataset_dir(jobs, name)?;
    let path = jobs.root.url_path("datasets", &[name, file])?;
    let shown = segment(file)?;
    if !is_image_name(&path) {
        return Err(Reply::error(
            400,
            &format!("{shown:?} is not an image name (.png, .jpg, .jpeg or .webp)"),
        ));
    }
    Ok((path, shown))
}

/// An existing image of a dataset.
fn existing_image(jobs: &Jobs, name: &str, file: &str) -> Result<(PathBuf, String), Reply> {
    let (path, shown) = dataset_image(jobs, name, file)?;
    if !path.is_file() {
        return Err(Reply::error(404, &format!("no image {shown:?}")));
    }
    Ok((path, shown))
}

/// The body (UTF-8 text) becomes the image's caption, written atomically.
pub fn put_caption(jobs: &Jobs, name: &str, file: &str, req: &Request) -> Answer {
    let (image, shown) = existing_image(jobs, name, file)?;
    let text = std::str::from_utf8(&req.body)
        .map_err(|_| Reply::error(400, "a caption must be UTF-8 text"))?;
    if text.len() > MAX_CAPTION {
        return Err(Reply::error(
            413,
            &format!("a caption is at most {} KiB", MAX_CAPTION >> 10),
        ));
    }
    zlora::fsutil::write_atomic(&caption_path(&image), text.as_bytes(), true).map_err(internal)?;
    Ok(Reply::json(
        200,
        &json!({ "image": shown, "caption": text }),
    ))
}

/// The body is an image: kept only if it decodes (the trainer's decoder and size limits),
/// never over an existing file.
pub fn put_image(jobs: &Jobs, name: &str, file: &str, req: &Request) -> Answer {
    let (image, shown) = dataset_image(jobs, name, file)?;
    if image.exists() {
        return Err(Reply::error(
            409,
            &format!("{shown:?} exists; delete it first"),
        ));
    }
    if let Err(e) = decode_image(&req.body) {
        return Err(Reply::error(
            400,
            &format!("{shown:?} is not a readable image: {e}"),
        ));
    }
    zlora::fsutil::write_atomic(&image, &req.body, false).map_err(internal)?;
    Ok(Reply::json(201, &json!({ "image": shown })))
}

/// Moves an image and its caption to DIR/datasets/.trash/NAME/, never deleting them.
pub fn delete_image(jobs: &Jobs, name: &str, file: &str) -> Answer {
    let (image, shown) = existing_image(jobs, name, file)?;
    let trash = jobs
        .root
        .path()
        .join("datasets/.trash")
        .join(segment(name)?);
    std::fs::create_dir_all(&trash).map_err(internal)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    for p in [caption_path(&image), image] {
        if p.exists() {
            let file_name = p.file_name().unwrap_or_default().to_string_lossy();
            std::fs::rename(&p, trash.join(format!("{stamp}-{file_name}"))).map_err(internal)?;
        }
    }
    Ok(Reply::json(200, &json!({ "trashed": shown })))
}

/// An image file anywhere under DIR (dataset images, sample grids), by URL segments.
pub fn file(jobs: &Jobs, raw: &[String]) -> Answer {
    let segments: Vec<&str> = raw.iter().map(String::as_str).collect();
    let path = jobs.root.url_path("", &segments)?;
    let kind = match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
    {
        Some(e) if e == "png" => "image/png",
        Some(e) if e == "jpg" || e == "jpeg" => "image/jpeg",
        Some(e) if e == "webp" => "image/webp",
        _ => return Err(Reply::error(403, "only images are served")),
    };
    let bytes = zlora::fsutil::read_regular(&path)
        .map_err(|_| Reply::error(404, &format!("no image {}", jobs.root.relative(&path))))?;
    Ok(Reply::new(200, kind, bytes))
}

/// The file name of a validation report (`zlora validate` writes it self-contained).
pub const REPORT: &str = "report.html";

/// A validation report under DIR, served under its own sandboxing policy.
pub fn report(jobs: &Jobs, raw: &[String]) -> Answer {
    let segments: Vec<&str> = raw.iter().map(String::as_str).collect();
    let path = jobs.root.url_path("", &segments)?;
    if path.file_name().is_none_or(|n| n != REPORT) {
        return Err(Reply::error(
            403,
            "only validation reports (report.html) are served here",
        ));
    }
    let html = zlora::fsutil::read_regular(&path)
        .map_err(|_| Reply::error(404, &format!("no report {}", jobs.root.relative(&path))))?;
    Ok(Reply::report(html))
}
