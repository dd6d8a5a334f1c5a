//! `zlora demo [--out DIR] [--force]`: the README's quick start in one go, through the same
//! library calls as `tiny-model`, `tiny-dataset`, `generate`, `train` and `validate`. DIR is
//! laid out as a `zlora serve` folder (models/, datasets/, runs/, reports/), so that
//! `zlora serve --root DIR` (or `zlora serve --demo`) shows it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use zlora::model::tiny::{self, TinySpec};
use zlora::outdir::{self, OutputDir, Policy};
use zlora::sample::generate::{generate, GenerateRequest, LoraSpec, Preset};
use zlora::sample::Guidance;
use zlora::train::config::TrainConfig;
use zlora::train::trainer::{train, TrainOptions};
use zlora::validate::plan::{RenderSettings, Sampling, ValidationPlan};
use zlora::validate::run::validate;

use crate::train::TrainDisplay;

/// The quick start's training config; its paths are replaced by the demo folder's.
const CONFIG: &str = include_str!("../../../examples/tiny.toml");
/// The command name in the folder's marker (`--force` replaces only a folder it made).
pub const COMMAND: &str = "demo";

#[derive(clap::Args)]
pub struct Args {
    /// The folder to create (a `zlora serve --root` folder).
    #[arg(long, default_value = "zlora-demo")]
    pub out: PathBuf,
    /// Replace the folder if an earlier `zlora demo` made it.
    #[arg(long)]
    pub force: bool,
}

/// Where the demo writes each of its outputs under DIR.
pub struct Layout {
    pub model: PathBuf,
    pub base: PathBuf,
    pub dataset: PathBuf,
    pub before: PathBuf,
    pub after: PathBuf,
    pub run: PathBuf,
    pub report: PathBuf,
}

impl Layout {
    pub fn new(dir: &Path) -> Self {
        Self {
            model: dir.join("models/tiny"),
            base: dir.join("models/tiny-base"),
            dataset: dir.join("datasets/tiny"),
            before: dir.join("before.png"),
            after: dir.join("after.png"),
            run: dir.join("runs/tiny"),
            report: dir.join("reports/tiny"),
        }
    }
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let l = make(&a.out, a.force)?;
    println!("the demo is in {}:", a.out.display());
    println!(
        "  {} and {}: the same seed without and with the trained LoRA",
        l.before.display(),
        l.after.display()
    );
    println!(
        "  {}: the LoRA, samples/ (grids during training), log.jsonl, tensorboard/",
        l.run.display()
    );
    println!(
        "  {}: the validation report",
        l.report.join("report.html").display()
    );
    println!(
        "  zlora serve --root {}: the same in the web app",
        a.out.display()
    );
    Ok(())
}

/// Makes the whole demo in `dir`: models, dataset, before image, training, after image,
/// validation report.
pub fn make(dir: &Path, force: bool) -> anyhow::Result<Layout> {
    let claimed = claim(dir, force)?;
    let l = Layout::new(claimed.path());
    eprintln!("1/6 the tiny model and a Base-like one");
    tiny::create(&l.model, &TinySpec::default(), false)?;
    let base = TinySpec {
        shift: 6.0,
        seed: 1,
        ..TinySpec::default()
    };
    tiny::create(&l.base, &base, false)?;
    eprintln!("2/6 the synthetic dataset");
    zlora::data::synthetic::create(&l.dataset, 8, 96, false)?;
    eprintln!("3/6 before: the model without a LoRA");
    render(&l.model, None, &l.before)?;
    eprintln!("4/6 training (examples/tiny.toml)");
    let lora = train_lora(&l)?;
    eprintln!("5/6 after: the same seed with the trained LoRA");
    render(&l.model, Some(&lora), &l.after)?;
    eprintln!("6/6 validation on Base and Turbo");
    validate_lora(&l, &lora)?;
    Ok(l)
}

/// The folder: new, empty, or (with --force) one an earlier demo made.
fn claim(dir: &Path, force: bool) -> anyhow::Result<OutputDir> {
    if force {
        if let Some(other) = outdir::made_by(dir).filter(|c| c != COMMAND) {
            anyhow::bail!(
                "{}: was made by `zlora {other}`, not `zlora demo`: choose another --out",
                dir.display()
            );
        }
        return Ok(OutputDir::claim(dir, COMMAND, &[], Policy::Replace)?);
    }
    if outdir::has_files(dir)? {
        anyhow::bail!(
            "{}: already exists (pass --force to replace an earlier demo, or choose another --out)",
            dir.display()
        );
    }
    Ok(OutputDir::claim(dir, COMMAND, &[], Policy::Keep)?)
}

/// One 64 px Turbo image of the quick start's prompt and seed.
fn render(model: &Path, lora: Option<&Path>, out: &Path) -> anyhow::Result<()> {
    let req = GenerateRequest {
        model: model.to_string_lossy().into_owned(),
        transformer_file: None,
        prompt: "zkchar, a red circle".into(),
        negative_prompt: String::new(),
        width: 64,
        height: 64,
        steps: Preset::Turbo.steps(),
        shift: None,
        guidance: Guidance {
            scale: Preset::Turbo.guidance(),
            truncation: 1.0,
            normalization: 0.0,
        },
        seeds: vec![1],
        latents: None,
        loras: lora
            .map(|p| LoraSpec {
                path: p.to_path_buf(),
                strength: 1.0,
            })
            .into_iter()
            .collect(),
        save_latents: None,
        dtype: None,
        storage: Default::default(),
        out: out.to_path_buf(),
        overwrite: false,
        allow_nonfinite: false,
    };
    let mut bar = None;
    generate(&req, &mut |e| crate::generate::show(e, &mut bar)).context("generate failed")?;
    Ok(())
}

fn train_lora(l: &Layout) -> anyhow::Result<PathBuf> {
    let mut cfg = TrainConfig::parse(CONFIG)?;
    cfg.model.path = l.model.to_string_lossy().into_owned();
    cfg.datasets[0].path = l.dataset.clone();
    cfg.train.output = l.run.clone();
    let opts = TrainOptions {
        resume: false,
        force: false,
        allow_changes: Vec::new(),
        config_file: None,
        stop: None,
    };
    let mut display = TrainDisplay::new(cfg.train.steps);
    let outcome = train(&cfg, &opts, &mut |e| display.show(e)).context("training failed")?;
    display.finish();
    Ok(outcome.lora)
}

/// The README's `zlora validate --width 64 --height 64` of the trained LoRA.
fn validate_lora(l: &Layout, lora: &Path) -> anyhow::Result<()> {
    let plan = ValidationPlan {
        lora: lora.to_path_buf(),
        lora_strength: 1.0,
        base: l.base.to_string_lossy().into_owned(),
        turbo: l.model.to_string_lossy().into_owned(),
        distill_patch: None,
        distill_patch_strength: 1.0,
        output: l.report.clone(),
        render: RenderSettings {
            width: 64,
            height: 64,
            ..RenderSettings::default()
        },
        sampling: Sampling::default(),
    };
    let mut bar = None;
    validate(&plan, false, &mut |e| crate::validate::show(e, &mut bar))
        .context("validation failed")?;
    if let Some(b) = bar {
        b.finish();
    }
    Ok(())
}
