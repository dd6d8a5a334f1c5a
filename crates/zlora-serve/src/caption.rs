//! The `caption` job: `zlora caption DATASET --model M --events json` of this binary, run
//! like a training. Its request names a dataset of DIR and a Qwen3-VL model (a folder under
//! DIR/models, or a repo id already in the Hugging Face cache); both are resolved to absolute
//! folders before the job is queued, so the child reads nothing else.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use zlora::caption::job::{CaptionJob, Existing, Style};
use zlora::caption::{Decoding, VlmFolder};

use crate::api::encode;
use crate::jobs::CheckedConfig;
use crate::root::{Refused, Root};

/// The files of a Qwen3-VL folder (what `VlmFolder::open` asks for).
pub const VLM_FILES: [&str; 3] = ["config.json", "preprocessor_config.json", "tokenizer.json"];

/// `zlora caption`'s `--style` values.
pub const STYLES: [&str; 4] = ["natural", "tags", "short", "trigger-only"];

/// A caption job as queued (its config, shown on the job's page).
#[derive(Debug, Serialize, Deserialize)]
struct Request {
    dataset: PathBuf,
    model: PathBuf,
    style: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    trigger: Option<String>,
    /// Caption only the images without a caption (`--skip-existing`).
    skip_existing: bool,
    /// Overwrite existing captions (`--force`); never implied.
    force: bool,
}

/// `{"dataset": NAME, "model": "models/NAME" | REPO_ID, "style"?, "trigger"?,
/// "skip_existing"?, "force"?}`, checked as `zlora caption` would check it before loading the
/// model (existing captions refused unless one of the two flags says what to do with them).
pub fn check(root: &Root, body: &Value) -> Result<CheckedConfig, Refused> {
    let text = |key: &str| match &body[key] {
        Value::Null => Ok(None),
        Value::String(s) => Ok(Some(s.trim().to_string()).filter(|s| !s.is_empty())),
        other => Err(Refused(format!("\"{key}\" must be a string, got {other}"))),
    };
    let name = text("dataset")?.ok_or_else(|| {
        Refused("\"dataset\" must name a dataset (a folder under datasets/)".into())
    })?;
    let dataset = root.url_path("datasets", &[&encode(&name)])?;
    if !dataset.is_dir() {
        return Err(Refused(format!("no dataset {name:?}")));
    }
    let model = text("model")?.ok_or_else(|| {
        Refused("\"model\" must be a Qwen3-VL folder under models/ or a repo id".into())
    })?;
    let request = Request {
        model: model_folder(root, &model)?,
        style: text("style")?.unwrap_or_else(|| STYLES[0].into()),
        trigger: text("trigger")?,
        skip_existing: flag(body, "skip_existing")?,
        force: flag(body, "force")?,
        dataset,
    };
    request.job()?.plan().map_err(|e| Refused(e.to_string()))?;
    let toml = toml::to_string(&request).map_err(|e| Refused(format!("caption job: {e}")))?;
    Ok(CheckedConfig {
        toml,
        output: root.relative(&request.dataset),
        // The image count comes with the first event.
        steps: 0,
    })
}

/// `models/…` is a folder under DIR (a link under models/ is the operator's and is
/// followed); anything else is a repo id or `zlora fetch` alias, read from the Hugging Face
/// cache (nothing is downloaded).
fn model_folder(root: &Root, model: &str) -> Result<PathBuf, Refused> {
    let folder = if model.starts_with("models/") {
        root.config_path("model", Path::new(model), true)?
    } else {
        let (repo, _) = zlora::hub::known::resolve(model).ok_or_else(|| {
            Refused(format!(
                "model {model:?} is neither a folder under models/ nor a repo id (org/name)"
            ))
        })?;
        let config = zlora::hub::known::cached(&repo, VLM_FILES[0]).ok_or_else(|| {
            Refused(format!(
                "model {model:?} is not in the Hugging Face cache: zlora fetch {model} first, or put its folder under models/"
            ))
        })?;
        config
            .parent()
            .ok_or_else(|| Refused(format!("model {model:?}: no folder holds its config.json")))?
            .to_path_buf()
    };
    let spec = folder
        .to_str()
        .ok_or_else(|| Refused(format!("model {model:?}: its path is not UTF-8")))?;
    VlmFolder::open(spec).map_err(|e| Refused(e.to_string()))?;
    Ok(folder)
}

/// A JSON boolean (a form's checkbox), false when absent.
fn flag(body: &Value, key: &str) -> Result<bool, Refused> {
    match &body[key] {
        Value::Null => Ok(false),
        Value::Bool(b) => Ok(*b),
        other => Err(Refused(format!(
            "\"{key}\" must be true or false, got {other}"
        ))),
    }
}

impl Request {
    /// The library's job for these settings (its checks and its listing of the folder; the
    /// decoding settings are the child's defaults and are not checked here).
    fn job(&self) -> Result<CaptionJob, Refused> {
        let style = match self.style.as_str() {
            "natural" => Style::Natural,
            "tags" => Style::Tags,
            "short" => Style::Short,
            "trigger-only" => Style::TriggerOnly,
            other => {
                return Err(Refused(format!(
                    "\"style\" must be one of {}, got {other:?}",
                    STYLES.join(", ")
                )))
            }
        };
        let existing = match (self.skip_existing, self.force) {
            (true, true) => {
                return Err(Refused(
                    "\"skip_existing\" and \"force\" exclude each other: keep existing captions, or overwrite them"
                        .into(),
                ))
            }
            (true, false) => Existing::Skip,
            (false, true) => Existing::Overwrite,
            (false, false) => Existing::Refuse,
        };
        Ok(CaptionJob {
            dir: self.dataset.clone(),
            style,
            trigger: self.trigger.clone(),
            prompt: None,
            existing,
            dry_run: false,
            decoding: Decoding {
                max_tokens: 1,
                temperature: None,
                seed: 0,
            },
            batch_size: 1,
        })
    }
}

/// The arguments after `zlora caption --events json` for a queued job's config. Run again (a resume), the images
/// captioned so far are kept: `--skip-existing`, unless the job overwrites.
pub fn args(config: &str, again: bool) -> anyhow::Result<Vec<OsString>> {
    let r: Request = toml::from_str(config)?;
    let mut args: Vec<OsString> = vec![
        r.dataset.into(),
        "--model".into(),
        r.model.into(),
        "--style".into(),
        r.style.into(),
    ];
    if let Some(t) = r.trigger {
        // One argument, so that a trigger starting with "-" is not read as a flag.
        args.push(format!("--trigger={t}").into());
    }
    if r.force {
        args.push("--force".into());
    } else if r.skip_existing || again {
        args.push("--skip-existing".into());
    }
    Ok(args)
}
