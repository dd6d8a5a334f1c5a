//! The training configuration (TOML). Unknown keys are errors: a typo must never be silently
//! ignored. Every key has a default with a reason in docs/training.md; the keys of the issue's
//! contract (`[model] path/variant/training_adapter`, `[dataset] path/resolution/trigger`,
//! `[lora] rank/alpha`, `[train] steps/learning_rate/batch_size/seed/save_every/output`,
//! `[sample] every/prompts/seeds`) are fixed.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::lora::LoraConfig;
use super::objective::{LossWeighting, TimestepSampling};
use super::optim::{
    AdafactorSettings, AdamWConfig, LrSchedule, OptimizerConfig, OptimizerKind, ProdigySettings,
};
use crate::data::DatasetConfig;
use crate::nn::Quantization;
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelSection,
    pub dataset: DatasetConfig,
    pub lora: LoraConfig,
    pub train: TrainSection,
    #[serde(default)]
    pub sample: SampleSection,
    #[serde(default, skip_serializing_if = "OutputSection::is_default")]
    pub output: OutputSection,
}

/// What the written LoRA files may say about this machine.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// Keep the model, dataset and output paths as written in the files' metadata; by default
    /// only their last names are kept (a shared LoRA must not reveal the user's folders).
    #[serde(default)]
    pub embed_paths: bool,
}

impl OutputSection {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
}

/// Which checkpoint the LoRA is trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Variant {
    /// Undistilled Base: trained and sampled at 50 steps with CFG.
    Base,
    /// Distilled Turbo: sampled at 8 steps without CFG.
    Turbo,
    /// ostris's de-distilled Turbo: trained like Base, sampled at 25 steps with low CFG.
    DeTurbo,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A diffusers folder or a repo id in the local HF cache.
    pub path: String,
    pub variant: Variant,
    /// A single-file transformer replacing the folder's (as `generate --transformer`): a
    /// ComfyUI or diffusers safetensors file, a ComfyUI fp8 checkpoint or a GGUF.
    #[serde(default)]
    pub transformer: Option<PathBuf>,
    /// A de-distillation LoRA applied (frozen) during training only; needs variant "turbo".
    #[serde(default)]
    pub training_adapter: Option<PathBuf>,
    #[serde(default = "one")]
    pub training_adapter_strength: f64,
    /// Storage dtype of the frozen weights: "bf16" halves memory; "f32" is exact.
    #[serde(default = "default_base_dtype")]
    pub base_dtype: String,
    /// Stores the transformer blocks' frozen weights quantized (fp8, int8, q8_0, q6_k, q5_k,
    /// q4_k); base_dtype stays the compute dtype. None: stored in base_dtype.
    #[serde(default)]
    pub quantize: Option<Quantization>,
}

/// The three ways of the workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    Base,
    DeTurbo,
    TurboAdapter,
    TurboDirect,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub steps: u64,
    pub learning_rate: f64,
    #[serde(default = "one_usize")]
    pub batch_size: usize,
    #[serde(default)]
    pub seed: u64,
    /// Checkpoint every N steps (0 = only at the end).
    #[serde(default = "default_save_every")]
    pub save_every: u64,
    pub output: PathBuf,
    #[serde(default = "one_usize")]
    pub gradient_accumulation: usize,
    #[serde(default)]
    pub warmup_steps: u64,
    #[serde(default = "default_schedule")]
    pub lr_schedule: LrSchedule,
    /// "adamw", "adamw8bit", "prodigy" or "adafactor" (docs/training.md).
    #[serde(default, skip_serializing_if = "is_adamw")]
    pub optimizer: OptimizerKind,
    /// Prodigy's own knobs (only with optimizer = "prodigy").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prodigy: Option<ProdigySettings>,
    /// Adafactor's own knobs (only with optimizer = "adafactor").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adafactor: Option<AdafactorSettings>,
    /// Decay of an exponential moving average of the LoRA, saved beside it (none by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ema: Option<f64>,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// Global gradient-norm clip (0 = off).
    #[serde(default = "one")]
    pub max_grad_norm: f64,
    #[serde(default = "default_sampling")]
    pub timestep_sampling: TimestepSampling,
    /// Shift of the training sigmas (logit_normal and shift sampling).
    #[serde(default = "default_shift")]
    pub timestep_shift: f64,
    #[serde(default)]
    pub logit_mean: f64,
    #[serde(default = "one")]
    pub logit_std: f64,
    #[serde(default = "default_weighting")]
    pub loss_weighting: LossWeighting,
    #[serde(default = "yes")]
    pub gradient_checkpointing: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SampleSection {
    /// Sample every N steps (0 = never).
    #[serde(default)]
    pub every: u64,
    #[serde(default)]
    pub prompts: Vec<String>,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    #[serde(default)]
    pub negative_prompt: String,
    /// Sample size (default: the dataset resolution).
    #[serde(default)]
    pub width: Option<usize>,
    #[serde(default)]
    pub height: Option<usize>,
    /// Override the mode's validation steps / guidance.
    #[serde(default)]
    pub steps: Option<usize>,
    #[serde(default)]
    pub guidance: Option<f64>,
    /// Sample from the EMA of the LoRA (needs `[train] ema`) instead of the trained one.
    #[serde(default, skip_serializing_if = "is_false")]
    pub ema: bool,
}

impl SampleSection {
    /// Seeds (at least one, each once), steps and guidance, checked before the run starts.
    fn check(&self) -> Result<()> {
        if self.seeds.is_empty() {
            return Err(Error::Invalid(
                "[sample] seeds is empty; give at least one seed (one image per prompt and seed)"
                    .into(),
            ));
        }
        if let Some(seed) = crate::sample::generate::duplicate(&self.seeds) {
            return Err(Error::Invalid(format!(
                "[sample] seed {seed} is given twice"
            )));
        }
        if let Some(steps) = self.steps {
            crate::sample::schedule::check_steps(steps)
                .map_err(|m| Error::Invalid(format!("[sample] {m}")))?;
        }
        match self.guidance {
            Some(g) if !g.is_finite() => Err(Error::Invalid(format!(
                "[sample] guidance must be a finite number, got {g}"
            ))),
            _ => Ok(()),
        }
    }
}

impl Default for SampleSection {
    fn default() -> Self {
        Self {
            every: 0,
            prompts: Vec::new(),
            seeds: default_seeds(),
            negative_prompt: String::new(),
            width: None,
            height: None,
            steps: None,
            guidance: None,
            ema: false,
        }
    }
}

fn one() -> f64 {
    1.0
}
fn one_usize() -> usize {
    1
}
fn yes() -> bool {
    true
}
fn default_base_dtype() -> String {
    "bf16".into()
}
fn default_save_every() -> u64 {
    250
}
fn default_schedule() -> LrSchedule {
    LrSchedule::Constant
}
/// Left out of the saved config when off, which older checkpoints (before the key) match.
fn is_false(b: &bool) -> bool {
    !*b
}
/// AdamW is left out of the saved config, which older checkpoints (before the key) match.
fn is_adamw(kind: &OptimizerKind) -> bool {
    *kind == OptimizerKind::AdamW
}
fn default_weight_decay() -> f64 {
    0.01
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_sampling() -> TimestepSampling {
    TimestepSampling::LogitNormal
}
fn default_shift() -> f64 {
    3.0
}
fn default_weighting() -> LossWeighting {
    LossWeighting::None
}
fn default_seeds() -> Vec<u64> {
    vec![1, 2]
}

impl TrainConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::fsutil::read_text(path)?;
        Self::parse(&text).map_err(|e| match e {
            Error::Invalid(msg) => Error::bad_file(path, msg),
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Self> {
        let cfg: Self = toml::from_str(text).map_err(|e| Error::Invalid(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<()> {
        self.dataset.validate()?;
        self.lora.validate()?;
        let t = &self.train;
        let bad = |m: &str| Err(Error::Invalid(m.to_string()));
        if t.steps == 0 {
            return bad("[train] steps must be at least 1");
        }
        if t.batch_size == 0 || t.gradient_accumulation == 0 {
            return bad("[train] batch_size and gradient_accumulation must be at least 1");
        }
        if !(t.learning_rate > 0.0 && t.learning_rate.is_finite()) {
            return bad("[train] learning_rate must be a positive number");
        }
        if self.model.training_adapter.is_some() && self.model.variant != Variant::Turbo {
            return bad("[model] training_adapter is only used with variant = \"turbo\"");
        }
        if !["bf16", "f32"].contains(&self.model.base_dtype.as_str()) {
            return bad("[model] base_dtype must be \"bf16\" or \"f32\"");
        }
        if self.sample.every > 0 && self.sample.prompts.is_empty() {
            return bad("[sample] every > 0 needs at least one prompt");
        }
        if self.sample.ema && t.ema.is_none() {
            return bad("[sample] ema = true needs an EMA: set [train] ema (e.g. 0.999)");
        }
        if t.ema.is_some_and(|d| !(d > 0.0 && d < 1.0)) {
            return bad("[train] ema must be a decay between 0 and 1 (e.g. 0.999)");
        }
        self.check_numbers()?;
        self.check_optimizer()?;
        self.sample.check()
    }

    /// An optimizer's table only beside that optimizer, its numbers in their ranges.
    fn check_optimizer(&self) -> Result<()> {
        let t = &self.train;
        let kind = t.optimizer;
        let bad = |m: String| Err(Error::Invalid(m));
        let stray = [
            ("prodigy", t.prodigy.is_some(), OptimizerKind::Prodigy),
            ("adafactor", t.adafactor.is_some(), OptimizerKind::Adafactor),
        ];
        if let Some((name, _, _)) = stray.iter().find(|(_, set, k)| *set && *k != kind) {
            return bad(format!(
                "[train.{name}] is only used with optimizer = \"{name}\" (the run uses \"{}\")",
                kind.name()
            ));
        }
        let p = t.prodigy.unwrap_or_default();
        let in_unit = |b: Option<f64>| b.is_none_or(|b| (0.0..1.0).contains(&b));
        if !(p.d_coef > 0.0 && p.d_coef.is_finite() && p.d0 > 0.0 && p.d0.is_finite()) {
            return bad("[train.prodigy] d_coef and d0 must be positive numbers".into());
        }
        if !in_unit(p.beta3) {
            return bad(format!(
                "[train.prodigy] beta3 must be in [0, 1), got {:?}",
                p.beta3
            ));
        }
        let a = t.adafactor.unwrap_or_default();
        if !in_unit(a.beta1) {
            return bad(format!(
                "[train.adafactor] beta1 must be in [0, 1), got {:?}",
                a.beta1
            ));
        }
        // 1 − t^decay_rate is a decay in [0, 1) only for a negative exponent.
        if !(a.decay_rate < 0.0 && a.decay_rate.is_finite()) {
            return bad(format!(
                "[train.adafactor] decay_rate must be negative (default -0.8), got {}",
                a.decay_rate
            ));
        }
        if !(a.clip_threshold > 0.0
            && a.clip_threshold.is_finite()
            && a.eps > 0.0
            && a.eps.is_finite())
        {
            return bad("[train.adafactor] clip_threshold and eps must be positive numbers".into());
        }
        Ok(())
    }

    /// Every float of `[model]` and `[train]` is finite and in its range: a NaN would
    /// otherwise train silently into a NaN LoRA.
    fn check_numbers(&self) -> Result<()> {
        let t = &self.train;
        let bad = |m: String| Err(Error::Invalid(m));
        let named = [
            (
                "[model] training_adapter_strength",
                self.model.training_adapter_strength,
            ),
            ("[train] logit_mean", t.logit_mean),
            ("[train] logit_std", t.logit_std),
            ("[train] weight_decay", t.weight_decay),
            ("[train] eps", t.eps),
            ("[train] max_grad_norm", t.max_grad_norm),
        ];
        if let Some((name, v)) = named.iter().find(|(_, v)| !v.is_finite()) {
            return bad(format!("{name} must be a finite number, got {v}"));
        }
        if t.weight_decay < 0.0 || t.max_grad_norm < 0.0 || t.eps <= 0.0 || t.logit_std <= 0.0 {
            return bad(
                "[train] weight_decay and max_grad_norm must be ≥ 0, eps and logit_std > 0".into(),
            );
        }
        if !t.betas.iter().all(|b| (0.0..1.0).contains(b)) {
            return bad(format!(
                "[train] betas must be in [0, 1), got {:?}",
                t.betas
            ));
        }
        crate::sample::schedule::check_shift(t.timestep_shift)
            .map_err(|m| Error::Invalid(format!("[train] timestep_{m}")))
    }

    pub fn mode(&self) -> Mode {
        match (self.model.variant, &self.model.training_adapter) {
            (Variant::Base, _) => Mode::Base,
            (Variant::DeTurbo, _) => Mode::DeTurbo,
            (Variant::Turbo, Some(_)) => Mode::TurboAdapter,
            (Variant::Turbo, None) => Mode::TurboDirect,
        }
    }
}

impl TrainSection {
    pub fn optimizer_config(&self) -> OptimizerConfig {
        OptimizerConfig {
            kind: self.optimizer,
            adam: AdamWConfig {
                beta1: self.betas[0],
                beta2: self.betas[1],
                eps: self.eps,
                weight_decay: self.weight_decay,
            },
            prodigy: self.prodigy.unwrap_or_default(),
            adafactor: self.adafactor.unwrap_or_default(),
        }
    }
}

impl Mode {
    /// Validation sampling of the mode: (steps, guidance). Turbo modes sample plain Turbo at
    /// 8 steps without CFG (the adapter switched off); Base 50 steps at 4 (classic 5);
    /// De-Turbo 25 steps at 2 (classic 3, ostris's card).
    pub fn sampling(self) -> (usize, f64) {
        match self {
            Mode::Base => (50, 4.0),
            Mode::DeTurbo => (25, 2.0),
            Mode::TurboAdapter | Mode::TurboDirect => (8, 0.0),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Base => "base",
            Mode::DeTurbo => "de-turbo",
            Mode::TurboAdapter => "turbo-adapter",
            Mode::TurboDirect => "turbo-direct",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(train_extra: &str) -> Result<TrainConfig> {
        TrainConfig::parse(&format!(
            "[model]\npath = \"m\"\nvariant = \"turbo\"\n[dataset]\npath = \"d\"\nresolution = 32\n\
             [lora]\nrank = 2\nalpha = 2\n[train]\nsteps = 6\nlearning_rate = 1\noutput = \"o\"\n\
             {train_extra}\n"
        ))
    }

    fn error(train_extra: &str) -> String {
        parse(train_extra).unwrap_err().to_string()
    }

    #[test]
    fn the_optimizer_and_its_table_reach_the_optimizer_config() -> Result<()> {
        assert_eq!(
            parse("")?.train.optimizer_config().kind,
            OptimizerKind::AdamW
        );
        let cfg = parse("optimizer = \"prodigy\"\n[train.prodigy]\nd_coef = 0.5")?;
        let opt = cfg.train.optimizer_config();
        assert_eq!(opt.kind, OptimizerKind::Prodigy);
        assert_eq!(opt.prodigy.d_coef, 0.5);
        assert_eq!(opt.prodigy.d0, 1e-6);
        let cfg = parse("optimizer = \"adafactor\"\n[train.adafactor]\nbeta1 = 0.9")?;
        assert_eq!(cfg.train.optimizer_config().adafactor.beta1, Some(0.9));
        Ok(())
    }

    #[test]
    fn a_wrong_optimizer_or_setting_is_refused_by_name() {
        assert!(error("optimizer = \"lion\"").contains("unknown variant"));
        let e = error("[train.prodigy]\nd_coef = 2.0");
        assert!(
            e.contains("[train.prodigy] is only used with optimizer = \"prodigy\""),
            "{e}"
        );
        let e = error("optimizer = \"prodigy\"\n[train.prodigy]\nd_coef = 0.0");
        assert!(e.contains("d_coef"), "{e}");
        let e = error("optimizer = \"adafactor\"\n[train.adafactor]\ndecay_rate = 0.8");
        assert!(e.contains("decay_rate must be negative"), "{e}");
        let e = error("optimizer = \"adafactor\"\n[train.adafactor]\nbeta2 = 0.9");
        assert!(e.contains("unknown field"), "{e}");
        assert!(error("ema = 1.0").contains("[train] ema must be a decay"));
        assert!(error("[sample]\nema = true").contains("set [train] ema"));
    }
}
