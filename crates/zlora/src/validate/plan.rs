//! The validation plan (TOML, or built from the command line's flags): which LoRA on which
//! models, the prompts and seeds, and how each variant samples. Unknown keys are errors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde::{Deserialize, Serialize};

use crate::model::BaseStorage;
use crate::nn::Quantization;
use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationPlan {
    pub lora: PathBuf,
    #[serde(default = "one")]
    pub lora_strength: f64,
    /// The undistilled model: a diffusers folder or a repo id in the local HF cache.
    pub base: String,
    /// The distilled model.
    pub turbo: String,
    /// DiffSynth's DistillPatch LoRA; adds the Turbo + LoRA + DistillPatch variant.
    #[serde(default)]
    pub distill_patch: Option<PathBuf>,
    #[serde(default = "one")]
    pub distill_patch_strength: f64,
    pub output: PathBuf,
    #[serde(default)]
    pub render: RenderSettings,
    #[serde(default)]
    pub sampling: Sampling,
}

/// What every variant shares, so that differences come from the variant alone.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RenderSettings {
    /// Empty: [`default_prompts`] with the LoRA's trigger word.
    #[serde(default)]
    pub prompts: Vec<String>,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    #[serde(default)]
    pub negative_prompt: String,
    #[serde(default = "default_size")]
    pub width: usize,
    #[serde(default = "default_size")]
    pub height: usize,
    #[serde(default)]
    pub dtype: Precision,
    /// How the transformer blocks' frozen weights are stored (as `generate --quantize`).
    #[serde(default)]
    pub quantize: Option<Quantization>,
    /// Block swap: main layers kept on the device (as `generate --blocks-on-device`).
    #[serde(default)]
    pub blocks_on_device: Option<usize>,
    /// How the text encoder's decoder layers are stored (as `generate --quantize-text-encoder`).
    #[serde(default)]
    pub quantize_text_encoder: Option<Quantization>,
}

impl RenderSettings {
    /// How the frozen base is held (quantized, swapped).
    pub fn storage(&self) -> BaseStorage {
        BaseStorage {
            quantize: self.quantize,
            blocks_on_device: self.blocks_on_device,
            quantize_text_encoder: self.quantize_text_encoder,
        }
    }
}

impl Default for RenderSettings {
    fn default() -> Self {
        Self {
            prompts: Vec::new(),
            seeds: default_seeds(),
            negative_prompt: String::new(),
            width: default_size(),
            height: default_size(),
            dtype: Precision::default(),
            quantize: None,
            blocks_on_device: None,
            quantize_text_encoder: None,
        }
    }
}

/// The compute dtype of the transformer and text encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// The device's default: bf16 on a GPU (a 6 B model in f32 does not fit a 24 GB card),
    /// f32 on the CPU (exact).
    #[default]
    Auto,
    F32,
    Bf16,
}

impl Precision {
    /// As written in plans and image parameters.
    pub fn name(self) -> &'static str {
        match self {
            Precision::Auto => "auto",
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// The dtype on `device`.
    pub fn dtype(self, device: &Device) -> DType {
        match self {
            Precision::Auto => crate::device::default_dtype(device),
            Precision::F32 => DType::F32,
            Precision::Bf16 => DType::BF16,
        }
    }
}

/// Steps and guidance (zlora's g: pos + g·(pos − neg)).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StepsGuidance {
    pub steps: usize,
    pub guidance: f64,
}

/// The samplers of the three groups of variants. Variants in one group share theirs, so a
/// with/without comparison never mixes step counts.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Sampling {
    /// Base and Base + LoRA (official: 50 steps, CFG 4 = classic 5).
    #[serde(default = "base_sampling")]
    pub base: StepsGuidance,
    /// Turbo, Turbo + LoRA and Turbo + LoRA + DistillPatch (distilled: 8 steps, no CFG).
    #[serde(default = "turbo_sampling")]
    pub turbo: StepsGuidance,
    /// Turbo + LoRA without the shortcut: only the step count changes, so a LoRA that blurs
    /// at 8 steps but not here has broken the distillation.
    #[serde(default = "turbo_long_sampling")]
    pub turbo_long: StepsGuidance,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            base: base_sampling(),
            turbo: turbo_sampling(),
            turbo_long: turbo_long_sampling(),
        }
    }
}

fn one() -> f64 {
    1.0
}
fn default_seeds() -> Vec<u64> {
    vec![1, 2, 3]
}
fn default_size() -> usize {
    1024
}
fn base_sampling() -> StepsGuidance {
    StepsGuidance {
        steps: 50,
        guidance: 4.0,
    }
}
fn turbo_sampling() -> StepsGuidance {
    StepsGuidance {
        steps: 8,
        guidance: 0.0,
    }
}
fn turbo_long_sampling() -> StepsGuidance {
    StepsGuidance {
        steps: 30,
        guidance: 0.0,
    }
}

/// Which checkpoint a variant runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Checkpoint {
    Base,
    Turbo,
}

/// The variants of the default plan, in report order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum VariantId {
    Base,
    BaseLora,
    Turbo,
    TurboLora,
    TurboLoraLong,
    TurboLoraPatch,
}

/// One row of the contact sheets.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Variant {
    pub id: VariantId,
    pub checkpoint: Checkpoint,
    pub lora: bool,
    pub distill_patch: bool,
    pub sampling: StepsGuidance,
}

impl VariantId {
    /// The file-name form (`turbo-lora-long`).
    pub fn key(self) -> &'static str {
        match self {
            VariantId::Base => "base",
            VariantId::BaseLora => "base-lora",
            VariantId::Turbo => "turbo",
            VariantId::TurboLora => "turbo-lora",
            VariantId::TurboLoraLong => "turbo-lora-long",
            VariantId::TurboLoraPatch => "turbo-lora-patch",
        }
    }
}

impl Variant {
    /// "Turbo + LoRA, 8 steps, g 0".
    pub fn label(&self) -> String {
        let model = match self.checkpoint {
            Checkpoint::Base => "Base",
            Checkpoint::Turbo => "Turbo",
        };
        let lora = if self.lora { " + LoRA" } else { "" };
        let patch = if self.distill_patch { " + patch" } else { "" };
        let s = self.sampling;
        format!("{model}{lora}{patch}, {} steps, g {}", s.steps, s.guidance)
    }
}

impl ValidationPlan {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::fsutil::read_text(path)?;
        Self::parse(&text).map_err(|e| Error::bad_file(path, e.to_string()))
    }

    /// A plan from its TOML text, checked.
    pub fn parse(text: &str) -> Result<Self> {
        let plan: Self = toml::from_str(text).map_err(|e| Error::Invalid(e.to_string()))?;
        plan.check()?;
        Ok(plan)
    }

    /// Settings out of range are errors before any model is loaded.
    pub fn check(&self) -> Result<()> {
        self.render.check()?;
        let s = &self.sampling;
        for (name, sg) in [
            ("base", s.base),
            ("turbo", s.turbo),
            ("turbo_long", s.turbo_long),
        ] {
            if !(sg.guidance >= 0.0 && sg.guidance.is_finite()) {
                return Err(Error::Invalid(format!(
                    "[sampling.{name}] needs a finite guidance ≥ 0"
                )));
            }
            crate::sample::schedule::check_steps(sg.steps)
                .map_err(|m| Error::Invalid(format!("[sampling.{name}] {m}")))?;
        }
        for strength in [self.lora_strength, self.distill_patch_strength] {
            if !strength.is_finite() {
                return Err(Error::Invalid(format!("strength {strength} is not finite")));
            }
        }
        Ok(())
    }

    /// The model folder or repo id of a checkpoint.
    pub fn model(&self, checkpoint: Checkpoint) -> &str {
        match checkpoint {
            Checkpoint::Base => &self.base,
            Checkpoint::Turbo => &self.turbo,
        }
    }

    /// The default plan's variants; the DistillPatch one only when a patch is given.
    pub fn variants(&self) -> Vec<Variant> {
        let s = &self.sampling;
        let v = |id, checkpoint, lora, distill_patch, sampling| Variant {
            id,
            checkpoint,
            lora,
            distill_patch,
            sampling,
        };
        let mut out = vec![
            v(VariantId::Base, Checkpoint::Base, false, false, s.base),
            v(VariantId::BaseLora, Checkpoint::Base, true, false, s.base),
            v(VariantId::Turbo, Checkpoint::Turbo, false, false, s.turbo),
            v(
                VariantId::TurboLora,
                Checkpoint::Turbo,
                true,
                false,
                s.turbo,
            ),
            v(
                VariantId::TurboLoraLong,
                Checkpoint::Turbo,
                true,
                false,
                s.turbo_long,
            ),
        ];
        if self.distill_patch.is_some() {
            out.push(v(
                VariantId::TurboLoraPatch,
                Checkpoint::Turbo,
                true,
                true,
                s.turbo,
            ));
        }
        out
    }
}

impl RenderSettings {
    pub fn check(&self) -> Result<()> {
        if self.seeds.is_empty() {
            return Err(Error::Invalid("at least one seed is needed".into()));
        }
        if let Some(seed) = crate::sample::generate::duplicate(&self.seeds) {
            return Err(Error::Invalid(format!("seed {seed} is given twice")));
        }
        if self.width == 0 || self.height == 0 {
            return Err(Error::Invalid("width and height must be positive".into()));
        }
        if self.prompts.iter().any(|p| p.trim().is_empty()) {
            return Err(Error::Invalid("a prompt is empty".into()));
        }
        Ok(())
    }

    /// The prompts as given, or the default compositions with `trigger`.
    pub fn prompts_or_default(&self, trigger: Option<&str>) -> Vec<String> {
        if self.prompts.is_empty() {
            default_prompts(trigger)
        } else {
            self.prompts.clone()
        }
    }
}

/// Three compositions that stress a LoRA differently: a close-up, a full figure and a scene
/// where the subject is small. `trigger` (the LoRA's trigger word) names the subject.
pub fn default_prompts(trigger: Option<&str>) -> Vec<String> {
    let subject = trigger.unwrap_or("a person");
    vec![
        format!("a portrait photo of {subject}, head and shoulders, soft window light"),
        format!("a full body photo of {subject} standing on a city street, daylight"),
        format!("a wide shot of {subject} sitting at a wooden table in a busy cafe"),
    ]
}

/// The trigger word a LoRA's metadata names: zlora's `zlora.training` JSON, else the first of
/// `modelspec.trigger_phrase` / `ss_trigger_words`-style comma lists.
pub fn trigger_word(metadata: &BTreeMap<String, String>) -> Option<String> {
    let from_training = metadata
        .get("zlora.training")
        .and_then(|t| serde_json::from_str::<serde_json::Value>(t).ok())
        .and_then(|v| v.get("trigger")?.as_str().map(String::from));
    let first_of = |key: &str| {
        metadata
            .get(key)
            .and_then(|s| s.split(',').map(str::trim).find(|w| !w.is_empty()))
            .map(String::from)
    };
    from_training
        .or_else(|| first_of("modelspec.trigger_phrase"))
        .or_else(|| first_of("trigger_words"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_minimal_plan_gets_the_default_variants() -> Result<()> {
        let plan: ValidationPlan = toml::from_str(
            "lora = \"l.safetensors\"\nbase = \"b\"\nturbo = \"t\"\noutput = \"o\"\n\
             [sampling.turbo_long]\nsteps = 12\nguidance = 1.0\n",
        )
        .map_err(|e| Error::Invalid(e.to_string()))?;
        plan.check()?;
        let labels: Vec<String> = plan.variants().iter().map(|v| v.label()).collect();
        assert_eq!(
            labels,
            [
                "Base, 50 steps, g 4",
                "Base + LoRA, 50 steps, g 4",
                "Turbo, 8 steps, g 0",
                "Turbo + LoRA, 8 steps, g 0",
                "Turbo + LoRA, 12 steps, g 1",
            ]
        );
        assert_eq!(plan.render.seeds, [1, 2, 3]);
        assert_eq!(plan.render.quantize, None);
        Ok(())
    }

    #[test]
    fn the_render_settings_take_a_quantized_base() {
        let base = "lora = \"l\"\nbase = \"b\"\nturbo = \"t\"\noutput = \"o\"\n[render]\n";
        let plan: ValidationPlan = toml::from_str(&format!("{base}quantize = \"q4_k\"")).unwrap();
        assert_eq!(plan.render.quantize, Some(Quantization::Q4K));
        let err = toml::from_str::<ValidationPlan>(&format!("{base}quantize = \"q2\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown quantization 'q2'"), "{err}");
        let plan: ValidationPlan = toml::from_str(&format!("{base}blocks_on_device = 3")).unwrap();
        assert_eq!(plan.render.storage().blocks_on_device, Some(3));
        let text = format!("{base}quantize_text_encoder = \"int8\"");
        let plan: ValidationPlan = toml::from_str(&text).unwrap();
        let storage = plan.render.storage();
        assert_eq!(storage.quantize_text_encoder, Some(Quantization::Int8));
        let err = toml::from_str::<ValidationPlan>(&format!("{base}quantize_text_encoder = \"x\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("quantize_text_encoder"), "{err}");
        let err = toml::from_str::<ValidationPlan>(&format!("{base}blocks_on_device = -1"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("blocks_on_device"), "{err}");
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        let base = "lora = \"l\"\nbase = \"b\"\nturbo = \"t\"\noutput = \"o\"\n";
        assert!(toml::from_str::<ValidationPlan>(&format!("{base}lora_strenght = 1.0")).is_err());
        let plan: ValidationPlan =
            toml::from_str(&format!("{base}[sampling.base]\nsteps = 0\nguidance = 4.0")).unwrap();
        assert!(plan.check().is_err());
    }

    #[test]
    fn default_prompts_use_the_trigger_from_the_metadata() {
        let meta: BTreeMap<String, String> = [(
            "zlora.training".to_string(),
            r#"{"mode":"base","trigger":"zkchar"}"#.to_string(),
        )]
        .into();
        let trigger = trigger_word(&meta);
        assert_eq!(trigger.as_deref(), Some("zkchar"));
        let prompts = RenderSettings::default().prompts_or_default(trigger.as_deref());
        assert_eq!(prompts.len(), 3);
        assert!(prompts.iter().all(|p| p.contains("zkchar")));
        let other: BTreeMap<String, String> = [(
            "modelspec.trigger_phrase".to_string(),
            " ohwx, man".to_string(),
        )]
        .into();
        assert_eq!(trigger_word(&other).as_deref(), Some("ohwx"));
    }
}
