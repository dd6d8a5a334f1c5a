//! `zlora caption DIR --model M`: a caption file beside every image of a dataset folder,
//! written by a local Qwen3-VL (docs/caption.md); with `--events json` its progress and
//! outcome as JSON lines on stdout (how `zlora serve` runs it as a job).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::ValueEnum;
use indicatif::ProgressBar;
use serde_json::json;
use zlora::caption::job::{Action, CaptionJob, Existing, Outcome, Planned, Style, Summary};
use zlora::caption::sheet::{write_review_sheet, SheetFormat, SheetRow};
use zlora::caption::{Captioner, Decoding, VlmFolder};
use zlora::model::text::PromptTokenizer;
use zlora::nn::Quantization;

use crate::events::{self, EventFormat};
use crate::progress::images_bar;

#[derive(Clone, Copy, ValueEnum)]
enum StyleArg {
    Natural,
    Tags,
    Short,
    TriggerOnly,
}

#[derive(clap::Args)]
pub struct Args {
    /// The dataset folder (the images training reads: png, jpg, webp).
    dir: PathBuf,
    /// A Qwen3-VL Instruct folder, or its repo id in the Hugging Face cache.
    #[arg(long)]
    model: String,
    /// What to ask for: a detailed paragraph, tags, one short sentence, or the trigger alone.
    #[arg(long, value_enum, default_value = "natural")]
    style: StyleArg,
    /// Put this word first in every caption (trigger-only: the caption is just this word).
    #[arg(long)]
    trigger: Option<String>,
    /// Your own instruction instead of the style's.
    #[arg(long)]
    prompt: Option<String>,
    /// The most tokens one caption may have.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Resize larger images to at most this many pixels (the processor's own limit when
    /// lower). Memory grows with the square of the patch count.
    #[arg(long, default_value_t = 1024 * 1024)]
    max_pixels: usize,
    /// Images captioned together in one forward pass (prompts padded to the longest).
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Store the Linears of the vision blocks and decoder layers quantized: fp8, int8, q8_0,
    /// q6_k, q5_k or q4_k (default: the compute dtype).
    #[arg(long)]
    quantize: Option<Quantization>,
    /// Caption only the images without a caption file.
    #[arg(long, conflicts_with = "force")]
    skip_existing: bool,
    /// Overwrite existing caption files.
    #[arg(long)]
    force: bool,
    /// Print the captions, write no caption files.
    #[arg(long)]
    dry_run: bool,
    /// Also write a review sheet, every image's thumbnail beside its caption: FILE.png, or
    /// FILE.html (one self-contained page).
    #[arg(long)]
    sheet: Option<PathBuf>,
    /// Sample at this temperature instead of greedy decoding.
    #[arg(long)]
    temperature: Option<f64>,
    /// The sampling seed (with --temperature).
    #[arg(long, requires = "temperature", default_value_t = 0)]
    seed: u64,
    /// Print progress and the outcome as JSON lines on stdout (image, then done or failed)
    /// instead of a bar; docs/serve.md lists the events.
    #[arg(long, value_enum)]
    events: Option<EventFormat>,
}

fn job(a: &Args) -> CaptionJob {
    let existing = match (a.skip_existing, a.force) {
        (true, _) => Existing::Skip,
        (_, true) => Existing::Overwrite,
        _ => Existing::Refuse,
    };
    CaptionJob {
        dir: a.dir.clone(),
        style: match a.style {
            StyleArg::Natural => Style::Natural,
            StyleArg::Tags => Style::Tags,
            StyleArg::Short => Style::Short,
            StyleArg::TriggerOnly => Style::TriggerOnly,
        },
        trigger: a.trigger.clone(),
        prompt: a.prompt.clone(),
        existing,
        dry_run: a.dry_run,
        decoding: Decoding {
            max_tokens: a.max_tokens,
            temperature: a.temperature,
            seed: a.seed,
        },
        batch_size: a.batch_size,
    }
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    let json = a.events.is_some();
    let summary = match caption(&a) {
        Ok(summary) => summary,
        Err(e) => {
            if json {
                events::failed(&e);
            }
            return Err(e);
        }
    };
    if json {
        finished(&summary);
    }
    Ok(if summary.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The last event: `done` with the counts, or `failed` naming the images that failed.
fn finished(s: &Summary) {
    if s.failed.is_empty() {
        events::done(json!({
            "captioned": s.captioned,
            "skipped": s.skipped,
            "too_long": s.too_long,
        }));
        return;
    }
    let failed: Vec<String> = s
        .failed
        .iter()
        .map(|(image, reason)| format!("{}: {reason}", zlora::error::shown(image)))
        .collect();
    let error = anyhow::anyhow!(
        "{} image(s) could not be captioned: {}",
        failed.len(),
        failed.join("; ")
    );
    events::failed(&error);
}

/// Captions the folder; the summary of what happened to each image.
fn caption(a: &Args) -> anyhow::Result<Summary> {
    let json = a.events.is_some();
    let job = job(a);
    let planned = job.plan()?;
    if let Some(sheet) = &a.sheet {
        SheetFormat::of(sheet)?;
    }
    if let Some(sheet) = a.sheet.as_ref().filter(|s| s.exists() && !a.force) {
        anyhow::bail!(
            "{} exists: pass --force to replace the review sheet, or choose another path",
            zlora::error::shown(sheet)
        );
    }
    let folder = VlmFolder::open(&a.model)?;
    let limit = PromptTokenizer::from_file(&folder.tokenizer_file())?;
    let to_caption = planned.iter().any(|p| p.action == Action::Caption);
    let mut model = if job.needs_model() && to_caption {
        let device = zlora::device::select()?;
        let dtype = zlora::device::default_dtype(&device);
        eprintln!("{}", zlora::device::describe(&device, dtype));
        let mut model = Captioner::load(&folder, dtype, &device, a.quantize)?;
        model.limit_pixels(a.max_pixels)?;
        Some(model)
    } else {
        None
    };
    let total = planned.len();
    let bar = if json {
        ProgressBar::hidden()
    } else {
        images_bar(total as u64, "captioning".into())
    };
    let mut summary = Summary::default();
    let mut outcomes = vec![None; total];
    job.run(&planned, model.as_mut(), &limit, |i, outcome| {
        let p = &planned[i];
        if let (true, Outcome::Captioned { caption, .. }) = (a.dry_run, outcome) {
            let line = format!("{}: {caption}", zlora::error::shown(&p.caption_file));
            if json {
                events::emit(json!({"event": "message", "text": line}));
            } else {
                bar.suspend(|| println!("{line}"));
            }
        }
        summary.add(p, outcome);
        outcomes[i] = Some(outcome.clone());
        bar.inc(1);
        if json {
            events::images(bar.position() as usize, total);
        }
    });
    bar.finish();
    // In the folder's order, whichever batch each image finished in.
    let rows: Vec<SheetRow> = planned
        .iter()
        .zip(outcomes)
        .map(|(p, outcome)| sheet_row(&a.dir, p, &outcome.expect("job.run reports every image")))
        .collect();
    report(&summary, a.dry_run);
    if let Some(path) = &a.sheet {
        write_review_sheet(path, &rows, a.force)?;
        eprintln!("review sheet: {}", zlora::error::shown(path));
    }
    Ok(summary)
}

/// The sheet's line for one image: its caption, the kept one, or why it has none.
fn sheet_row(dir: &std::path::Path, p: &Planned, outcome: &Outcome) -> SheetRow {
    let text = match outcome {
        Outcome::Captioned { caption, too_long } if *too_long => {
            format!("[past the 512-token cut] {caption}")
        }
        Outcome::Captioned { caption, .. } => caption.clone(),
        Outcome::Skipped => zlora::fsutil::read_text(&p.caption_file)
            .unwrap_or_else(|e| format!("[kept caption unreadable: {e}]")),
        Outcome::Failed(reason) => format!("[failed: {reason}]"),
    };
    SheetRow {
        image: p.image.clone(),
        name: zlora::error::shown(p.image.strip_prefix(dir).unwrap_or(&p.image)),
        text,
    }
}

fn report(s: &Summary, dry_run: bool) {
    let written = if dry_run {
        " (dry run: nothing written)"
    } else {
        ""
    };
    eprintln!(
        "captioned {}, skipped {}, failed {}{written}",
        s.captioned,
        s.skipped,
        s.failed.len()
    );
    for (image, reason) in &s.failed {
        eprintln!("  failed {}: {reason}", zlora::error::shown(image));
    }
    for file in &s.too_long {
        eprintln!(
            "  warning: {} reaches the text encoder's limit of {} tokens (chat template \
             included): training would cut its end, shorten it",
            zlora::error::shown(file),
            zlora::model::text::DEFAULT_MAX_TOKENS
        );
    }
}
