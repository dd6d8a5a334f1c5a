//! `zlora validate`: a plan file, the fixed flags form, or `--checkpoints RUN_DIR`; with
//! `--events json` its progress and results as JSON lines on stdout.

use std::path::PathBuf;

use anyhow::Context;
use indicatif::ProgressBar;
use serde_json::json;
use zlora::validate::findings::findings;
use zlora::validate::plan::{Precision, RenderSettings, Sampling, ValidationPlan};
use zlora::validate::render::Event;
use zlora::validate::run::validate;
use zlora::validate::sweep::{sweep, SweepRequest};

use crate::events::{self, EventFormat};
use crate::progress::count_bar;

#[derive(Clone, Copy, clap::ValueEnum)]
enum DtypeArg {
    F32,
    Bf16,
}

#[derive(clap::Args)]
pub struct Args {
    /// A validation plan (TOML, see docs/validation.md); flags given with it override it.
    #[arg(conflicts_with_all = ["lora", "base", "turbo", "distill_patch", "checkpoints"])]
    plan: Option<PathBuf>,
    /// The LoRA to validate (with --base, --turbo and --output).
    #[arg(long, requires_all = ["base", "turbo", "output"])]
    lora: Option<PathBuf>,
    /// The Base model: a diffusers folder or a repo id in the local HF cache.
    #[arg(long)]
    base: Option<String>,
    /// The Turbo model.
    #[arg(long)]
    turbo: Option<String>,
    /// DiffSynth's DistillPatch LoRA: adds Turbo + LoRA + DistillPatch at 8 steps.
    #[arg(long)]
    distill_patch: Option<PathBuf>,
    /// Validate every checkpoint of a training run folder instead.
    #[arg(long, conflicts_with_all = ["lora", "base", "turbo", "distill_patch"])]
    checkpoints: Option<PathBuf>,
    /// A prompt (repeatable; default: a portrait, a full body and a scene with the LoRA's
    /// trigger word).
    #[arg(long)]
    prompt: Vec<String>,
    /// A seed (repeatable; default 1, 2, 3).
    #[arg(long)]
    seed: Vec<u64>,
    /// Image width (default 1024; a sweep defaults to the run's sample size).
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// Compute dtype of the transformer and text encoder (default: bf16 on a GPU, f32 on the CPU).
    #[arg(long, value_enum)]
    dtype: Option<DtypeArg>,
    /// The output folder (report.html, sheet-p*.png, images/, metrics.json); a sweep
    /// defaults to RUN_DIR/validation.
    #[arg(long)]
    output: Option<PathBuf>,
    /// Overwrite earlier outputs (in a folder zlora made).
    #[arg(long)]
    force: bool,
    /// Print progress and results as JSON lines on stdout (stage, image, then done or failed);
    /// docs/serve.md lists the events.
    #[arg(long, value_enum)]
    events: Option<EventFormat>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let json = a.events.is_some();
    let result = match a.checkpoints.clone() {
        Some(run_dir) => run_sweep(a, run_dir),
        None => run_one(a),
    };
    if let (true, Err(e)) = (json, &result) {
        events::failed(e);
    }
    result
}

fn run_one(a: Args) -> anyhow::Result<()> {
    let mut plan = match (&a.plan, &a.lora, &a.base, &a.turbo, &a.output) {
        (Some(path), ..) => ValidationPlan::from_file(path)?,
        (None, Some(lora), Some(base), Some(turbo), Some(output)) => ValidationPlan {
            lora: lora.clone(),
            lora_strength: 1.0,
            base: base.clone(),
            turbo: turbo.clone(),
            distill_patch: a.distill_patch.clone(),
            distill_patch_strength: 1.0,
            output: output.clone(),
            render: RenderSettings::default(),
            sampling: Sampling::default(),
        },
        _ => anyhow::bail!(
            "give a PLAN.toml, or --lora FILE --base DIR --turbo DIR --output DIR, or --checkpoints RUN_DIR"
        ),
    };
    apply_overrides(&a, &mut plan.render);
    if let Some(out) = a.output {
        plan.output = out;
    }
    let mut progress = Progress::new(a.events);
    let outcome =
        validate(&plan, a.force, &mut |e| progress.show(e)).context("validation failed")?;
    progress.finish();
    let found = findings(&outcome.record.verdicts, &plan.sampling);
    if a.events.is_some() {
        let found: Vec<_> = found
            .iter()
            .map(|f| json!({"check": f.check, "measured": f.measured, "verdict": f.verdict}))
            .collect();
        events::done(json!({"report": outcome.report, "findings": found}));
        return Ok(());
    }
    for f in found {
        println!(
            "{}: {} → {}",
            f.check,
            f.measured,
            if f.verdict.is_empty() {
                "-"
            } else {
                &f.verdict
            }
        );
    }
    println!("{}", outcome.report.display());
    Ok(())
}

/// Flags given with a plan replace its values.
fn apply_overrides(a: &Args, r: &mut RenderSettings) {
    if !a.prompt.is_empty() {
        r.prompts = a.prompt.clone();
    }
    if !a.seed.is_empty() {
        r.seeds = a.seed.clone();
    }
    r.width = a.width.unwrap_or(r.width);
    r.height = a.height.unwrap_or(r.height);
    r.dtype = precision(a.dtype).unwrap_or(r.dtype);
}

fn precision(d: Option<DtypeArg>) -> Option<Precision> {
    d.map(|d| match d {
        DtypeArg::F32 => Precision::F32,
        DtypeArg::Bf16 => Precision::Bf16,
    })
}

fn run_sweep(a: Args, run_dir: PathBuf) -> anyhow::Result<()> {
    let req = SweepRequest {
        output: a.output.unwrap_or_else(|| run_dir.join("validation")),
        run: run_dir,
        prompts: a.prompt,
        seeds: a.seed,
        width: a.width,
        height: a.height,
        dtype: precision(a.dtype).unwrap_or_default(),
        overwrite: a.force,
    };
    let mut progress = Progress::new(a.events);
    let outcome = sweep(&req, &mut |e| progress.show(e)).context("checkpoint sweep failed")?;
    progress.finish();
    if a.events.is_some() {
        let checkpoints: Vec<_> = outcome
            .record
            .checkpoints
            .iter()
            .map(|c| {
                json!({
                    "step": c.step,
                    "effect": c.effect.effect,
                    "verdict": c.effect.verdict.label(),
                    "sharpness_ratio": c.sharpness_ratio,
                    "blurred": c.blurred,
                })
            })
            .collect();
        events::done(json!({
            "report": outcome.report,
            "chart": outcome.chart,
            "best_step": outcome.record.best_step,
            "checkpoints": checkpoints,
        }));
        return Ok(());
    }
    for c in &outcome.record.checkpoints {
        println!(
            "step {}: effect {:.3} ({}), sharpness ×{:.2}{}",
            c.step,
            c.effect.effect,
            c.effect.verdict.label(),
            c.sharpness_ratio,
            if c.blurred { " (blurred)" } else { "" }
        );
    }
    match outcome.record.best_step {
        Some(s) => println!("best step: {s}"),
        None => println!("best step: none (every checkpoint is not learning, overfit or blurred)"),
    }
    println!("{}", outcome.chart.display());
    println!("{}", outcome.report.display());
    Ok(())
}

/// A validation's progress: bars on stderr, or JSON lines on stdout.
struct Progress {
    json: bool,
    bar: Option<ProgressBar>,
}

impl Progress {
    fn new(format: Option<EventFormat>) -> Self {
        Self {
            json: format.is_some(),
            bar: None,
        }
    }

    fn show(&mut self, e: Event) {
        if self.json {
            events::validation(e);
        } else {
            show(e, &mut self.bar);
        }
    }

    fn finish(self) {
        if let Some(b) = self.bar {
            b.finish();
        }
    }
}

/// Stage lines on stderr and a bar over the images of each validation.
pub fn show(e: Event, bar: &mut Option<ProgressBar>) {
    match e {
        Event::Stage(msg) => match bar {
            Some(b) => b.set_message(msg.to_string()),
            None => eprintln!("{msg}"),
        },
        Event::Image { done, total } => {
            if done == 1 {
                if let Some(old) = bar.replace(count_bar(total as u64, "rendering".into())) {
                    old.finish();
                }
            }
            if let Some(b) = bar {
                b.set_position(done as u64);
            }
        }
    }
}
