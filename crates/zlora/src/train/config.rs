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
use super::preservation::Preservation;
use crate::data::dataset::DatasetKind;
use crate::data::DatasetConfig;
use crate::model::BaseStorage;
use crate::nn::Quantization;
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelSection,
    /// `[dataset]` (one table) or `[[dataset]]` (several, training and regularization sets);
    /// one is written back as a table, so older configs and checkpoints compare the same.
    #[serde(rename = "dataset", with = "one_or_many")]
    pub datasets: Vec<DatasetConfig>,
    pub lora: LoraConfig,
    pub train: TrainSection,
    #[serde(default)]
    pub sample: SampleSection,
    #[serde(default, skip_serializing_if = "OutputSection::is_default")]
    pub output: OutputSection,
    #[serde(default, skip_serializing_if = "LogSection::is_default")]
    pub log: LogSection,
}

/// Where the run's numbers go besides `log.jsonl` (always written).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// TensorBoard event files in `<output>/tensorboard/`: every number of the JSONL log per
    /// step and the sample grids as images.
    #[serde(default)]
    pub tensorboard: bool,
}

impl LogSection {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }
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
    /// Block swap: only the first N main transformer layers stay on the device, the others'
    /// frozen weights are copied in from host memory as each runs (forward and backward).
    /// None: every block stays on the device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blocks_on_device: Option<usize>,
    /// Stores the text encoder's decoder layers quantized while captions and sample prompts
    /// are encoded (the same formats as `quantize`). None: stored in the encode dtype.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantize_text_encoder: Option<Quantization>,
}

impl ModelSection {
    /// How the frozen base is held (quantized, swapped).
    pub fn storage(&self) -> BaseStorage {
        BaseStorage {
            quantize: self.quantize,
            blocks_on_device: self.blocks_on_device,
            quantize_text_encoder: self.quantize_text_encoder,
        }
    }
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
    /// Differential output preservation: the class prompt's prediction held to the base
    /// model's (train/preservation.rs; none by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preservation: Option<Preservation>,
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
        self.check_datasets()?;
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
        if let Some(p) = &t.preservation {
            for d in self.training_sets() {
                p.validate(d.trigger.as_deref())?;
            }
        }
        self.check_numbers()?;
        self.check_optimizer()?;
        self.sample.check()
    }

    /// Each dataset valid (named by its folder when there are several), one at least a
    /// training set.
    fn check_datasets(&self) -> Result<()> {
        for d in &self.datasets {
            d.validate().map_err(|e| match (e, self.datasets.len()) {
                (Error::Invalid(m), n) if n > 1 => Error::Invalid(format!(
                    "{m} (in the [[dataset]] of {})",
                    crate::error::shown(&d.path)
                )),
                (e, _) => e,
            })?;
        }
        if !self.datasets.iter().any(|d| d.kind == DatasetKind::Train) {
            return Err(Error::Invalid(
                "no [dataset] with kind = \"train\": regularization images alone teach nothing; \
                 add the training set"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The training sets (not the regularization ones).
    pub fn training_sets(&self) -> impl Iterator<Item = &DatasetConfig> {
        self.datasets
            .iter()
            .filter(|d| d.kind == DatasetKind::Train)
    }

    /// The largest resolution of any dataset: what sizes the peak memory, and the default
    /// sample size.
    pub fn resolution(&self) -> u32 {
        self.datasets
            .iter()
            .map(|d| d.resolution.largest())
            .max()
            .unwrap_or(0)
    }

    /// The training sets' trigger words, each once, in order.
    pub fn triggers(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for t in self.training_sets().filter_map(|d| d.trigger.clone()) {
            if !out.contains(&t) {
                out.push(t);
            }
        }
        out
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

/// `dataset` as one table or an array of tables, written back as a table when there is one.
/// A visitor rather than an untagged enum, so that a typo inside a table is still reported
/// by its key name.
mod one_or_many {
    use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
    use serde::de::{MapAccess, SeqAccess, Visitor};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use crate::data::DatasetConfig;

    pub fn serialize<S: Serializer>(v: &[DatasetConfig], s: S) -> Result<S::Ok, S::Error> {
        match v {
            [one] => one.serialize(s),
            many => many.serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<DatasetConfig>, D::Error> {
        struct Visit;
        impl<'de> Visitor<'de> for Visit {
            type Value = Vec<DatasetConfig>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a [dataset] table or [[dataset]] tables")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                DatasetConfig::deserialize(MapAccessDeserializer::new(map)).map(|d| vec![d])
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                Vec::deserialize(SeqAccessDeserializer::new(seq))
            }
        }
        d.deserialize_any(Visit)
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

    #[test]
    fn preservation_needs_a_trigger_and_a_sane_class_and_weight() -> Result<()> {
        let e = error("preservation = { class = \"woman\" }");
        assert!(
            e.contains("[train] preservation") && e.contains("set [dataset] trigger"),
            "{e}"
        );
        let with_trigger = |extra: &str| {
            TrainConfig::parse(&format!(
                "[model]\npath = \"m\"\nvariant = \"base\"\n[dataset]\npath = \"d\"\n\
                 trigger = \"zk\"\n[lora]\nrank = 2\nalpha = 2\n[train]\nsteps = 6\n\
                 learning_rate = 1\noutput = \"o\"\n{extra}\n"
            ))
        };
        let p = with_trigger("preservation = { class = \"woman\" }")?
            .train
            .preservation;
        assert_eq!(p.map(|p| (p.class, p.weight)), Some(("woman".into(), 1.0)));
        for (bad, says) in [
            ("{ class = \"\" }", "class must be a word"),
            ("{ class = \"zk\" }", "is the trigger itself"),
            ("{ class = \"woman\", weight = -1.0 }", "weight must be"),
            ("{ class = \"woman\", weight = nan }", "weight must be"),
            ("{ class = \"woman\", multiplier = 1.0 }", "unknown field"),
        ] {
            let e = with_trigger(&format!("preservation = {bad}"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        let log = with_trigger("[log]\ntensorboard = true")?;
        assert!(log.log.tensorboard);
        Ok(())
    }

    /// A config with `datasets` (TOML) in place of the `[dataset]` table.
    fn with_datasets(datasets: &str) -> Result<TrainConfig> {
        TrainConfig::parse(&format!(
            "[model]\npath = \"m\"\nvariant = \"turbo\"\n{datasets}\n\
             [lora]\nrank = 2\nalpha = 2\n[train]\nsteps = 6\nlearning_rate = 1\noutput = \"o\"\n"
        ))
    }

    #[test]
    fn one_dataset_table_still_parses_and_is_written_back_as_one() -> Result<()> {
        let cfg = parse("")?;
        assert_eq!(cfg.datasets.len(), 1);
        assert_eq!(cfg.datasets[0].resolution, crate::data::Resolution::One(32));
        assert_eq!(cfg.resolution(), 32);
        let text = toml::to_string(&cfg).map_err(|e| Error::Invalid(e.to_string()))?;
        assert!(
            text.contains("[dataset]\npath = \"d\"\nresolution = 32\n"),
            "{text}"
        );
        for new_key in ["kind", "loss_weight =", "ratio", "masks", "resolution_mode"] {
            assert!(
                !text.contains(new_key),
                "{new_key} at its default is left out: {text}"
            );
        }
        assert_eq!(TrainConfig::parse(&text)?, cfg);
        Ok(())
    }

    #[test]
    fn several_datasets_with_resolutions_and_masks_parse() -> Result<()> {
        let cfg = with_datasets(
            "[[dataset]]\npath = \"d\"\nresolution = [512, 768, 1024]\nresolution_mode = \"random\"\n\
             masks = \"d/masks\"\nunmasked_weight = 0.1\ntrigger = \"zk\"\n\
             [[dataset]]\npath = \"reg\"\nkind = \"regularization\"\nratio = 0.5\nloss_weight = 0.8\n",
        )?;
        let [train, reg] = cfg.datasets.as_slice() else {
            return Err(Error::Invalid(format!("{:?}", cfg.datasets)));
        };
        assert_eq!(train.resolution.sizes(), [512, 768, 1024]);
        assert_eq!(train.resolution_mode, crate::data::ResolutionMode::Random);
        assert_eq!(train.min_side(), 256);
        assert_eq!(reg.kind, DatasetKind::Regularization);
        assert_eq!((reg.regularization_ratio(), reg.loss_weight), (0.5, 0.8));
        assert_eq!(cfg.resolution(), 1024);
        assert_eq!(cfg.triggers(), ["zk"]);
        let text = toml::to_string(&cfg).map_err(|e| Error::Invalid(e.to_string()))?;
        assert!(text.contains("[[dataset]]"), "{text}");
        assert_eq!(TrainConfig::parse(&text)?, cfg);
        Ok(())
    }

    #[test]
    fn bad_dataset_lists_are_refused_by_name() {
        let error = |d: &str| with_datasets(d).unwrap_err().to_string();
        let e = error("[[dataset]]\npath = \"d\"\nresolutoin = 512\n");
        assert!(e.contains("unknown field `resolutoin`"), "{e}");
        let e = error("[[dataset]]\npath = \"d\"\nkind = \"regularization\"\n");
        assert!(e.contains("no [dataset] with kind = \"train\""), "{e}");
        let e = error("[dataset]\npath = \"d\"\nratio = 2.0\n");
        assert!(
            e.contains("ratio is only used with kind = \"regularization\""),
            "{e}"
        );
        let e = error("[[dataset]]\npath = \"d\"\n[[dataset]]\npath = \"r\"\nkind = \"regularization\"\nratio = -1.0\n");
        assert!(
            e.contains("ratio must be a positive number") && e.contains("r"),
            "{e}"
        );
        let e = error("[dataset]\npath = \"d\"\nresolution = []\n");
        assert!(e.contains("resolution is an empty list"), "{e}");
        let e = error("[dataset]\npath = \"d\"\nresolution = [512, 512]\n");
        assert!(e.contains("resolution 512 is listed twice"), "{e}");
        let e = error("[dataset]\npath = \"d\"\nresolution = \"big\"\n");
        assert!(e.contains("a resolution in pixels"), "{e}");
        let e = error("[dataset]\npath = \"d\"\nunmasked_weight = 2.0\n");
        assert!(e.contains("unmasked_weight must be in [0, 1]"), "{e}");
        let e = error("[dataset]\npath = \"d\"\nloss_weight = 0.0\n");
        assert!(e.contains("loss_weight must be a positive number"), "{e}");
    }
}
