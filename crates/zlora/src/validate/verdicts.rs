//! The verdicts of one validation, from the images of its variants (docs/validation.md).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::metrics::NOT_LEARNING_EFFECT;
use super::metrics::{sharpness, sharpness_ratio, EffectCheck, EffectVerdict, BLUR_RATIO};
use super::plan::VariantId;
use crate::sample::image::Rgb8;
use crate::{Error, Result};

/// Is Turbo + LoRA sharp at the distilled step count?
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlurCheck {
    /// Median sharpness ratio against Turbo + LoRA at the long step count.
    pub vs_long: f64,
    /// Median sharpness ratio against Turbo without the LoRA.
    pub vs_plain: f64,
    /// Either ratio below [`BLUR_RATIO`].
    pub blurred: bool,
}

/// What the DistillPatch does for Turbo + LoRA at the distilled step count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PatchVerdict {
    /// Turbo + LoRA was not blurred: nothing to repair.
    NotNeeded,
    Repairs,
    DoesNotRepair,
}

impl PatchVerdict {
    pub fn label(self) -> &'static str {
        match self {
            PatchVerdict::NotNeeded => "not needed",
            PatchVerdict::Repairs => "repairs",
            PatchVerdict::DoesNotRepair => "does not repair",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PatchCheck {
    /// The blur check of Turbo + LoRA + DistillPatch (same references as [`BlurCheck`]).
    pub with: BlurCheck,
    /// 1 − SSIM against Turbo without LoRA, with and without the patch (with it, the patch's
    /// own change is included).
    pub effect_with: f64,
    pub effect_without: f64,
    pub verdict: PatchVerdict,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdicts {
    /// Mean sharpness of each variant's images.
    pub sharpness: BTreeMap<VariantId, f64>,
    /// Base + LoRA against Base.
    pub base: EffectCheck,
    /// Turbo + LoRA against Turbo (distilled step count).
    pub turbo: EffectCheck,
    pub blur: BlurCheck,
    /// 100 · turbo effect / base effect; None when the LoRA does nothing on Base.
    pub retention_pct: Option<f64>,
    pub patch: Option<PatchCheck>,
}

/// Each variant's images (prompt-major, then seed) with their sharpness, computed once.
struct Measured<'a> {
    images: &'a BTreeMap<VariantId, Vec<Rgb8>>,
    sharpness: BTreeMap<VariantId, Vec<f64>>,
}

impl Measured<'_> {
    fn images(&self, id: VariantId) -> Result<&[Rgb8]> {
        self.images
            .get(&id)
            .map(Vec::as_slice)
            .ok_or_else(|| Error::Invalid(format!("no images of variant {}", id.key())))
    }

    fn sharpness(&self, id: VariantId) -> Result<&[f64]> {
        self.sharpness
            .get(&id)
            .map(Vec::as_slice)
            .ok_or_else(|| Error::Invalid(format!("no images of variant {}", id.key())))
    }

    fn effect(&self, lora: VariantId, reference: VariantId) -> Result<EffectCheck> {
        EffectCheck::measure(self.images(lora)?, self.images(reference)?)
    }

    /// `id` at the distilled step count against the long run and against plain Turbo.
    fn blur(&self, id: VariantId) -> Result<BlurCheck> {
        let s = self.sharpness(id)?;
        let vs_long = sharpness_ratio(s, self.sharpness(VariantId::TurboLoraLong)?)?;
        let vs_plain = sharpness_ratio(s, self.sharpness(VariantId::Turbo)?)?;
        Ok(BlurCheck {
            vs_long,
            vs_plain,
            blurred: vs_long.min(vs_plain) < BLUR_RATIO,
        })
    }
}

impl Verdicts {
    /// `images` holds every variant of the plan, in the same (prompt, seed) order.
    pub fn measure(images: &BTreeMap<VariantId, Vec<Rgb8>>) -> Result<Self> {
        let m = Measured {
            images,
            sharpness: images
                .iter()
                .map(|(id, imgs)| (*id, imgs.iter().map(sharpness).collect()))
                .collect(),
        };
        let base = m.effect(VariantId::BaseLora, VariantId::Base)?;
        let turbo = m.effect(VariantId::TurboLora, VariantId::Turbo)?;
        let blur = m.blur(VariantId::TurboLora)?;
        let retention_pct =
            (base.effect >= NOT_LEARNING_EFFECT).then(|| 100.0 * turbo.effect / base.effect);
        let patch = if images.contains_key(&VariantId::TurboLoraPatch) {
            let with = m.blur(VariantId::TurboLoraPatch)?;
            let verdict = match (blur.blurred, with.blurred) {
                (false, _) => PatchVerdict::NotNeeded,
                (true, false) => PatchVerdict::Repairs,
                (true, true) => PatchVerdict::DoesNotRepair,
            };
            Some(PatchCheck {
                with,
                effect_with: m
                    .effect(VariantId::TurboLoraPatch, VariantId::Turbo)?
                    .effect,
                effect_without: turbo.effect,
                verdict,
            })
        } else {
            None
        };
        let mean = |v: &Vec<f64>| v.iter().sum::<f64>() / v.len().max(1) as f64;
        Ok(Self {
            sharpness: m.sharpness.iter().map(|(id, v)| (*id, mean(v))).collect(),
            base,
            turbo,
            blur,
            retention_pct,
            patch,
        })
    }

    /// The LoRA's overall state: not learning on either model, overfit on either, else
    /// learning.
    pub fn overall(&self) -> EffectVerdict {
        let both = [self.base.verdict, self.turbo.verdict];
        if both.contains(&EffectVerdict::Overfit) {
            EffectVerdict::Overfit
        } else if both.iter().all(|v| *v == EffectVerdict::NotLearning) {
            EffectVerdict::NotLearning
        } else {
            EffectVerdict::Learning
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::validate::metrics::tests::{blur, texture};

    /// Six variants over 2 prompts × 2 seeds: Turbo + LoRA is `turbo_lora(seed)`, the rest
    /// are textures of their own.
    fn set(turbo_lora: impl Fn(u64) -> Rgb8, patch: bool) -> BTreeMap<VariantId, Vec<Rgb8>> {
        let mut ids = vec![
            VariantId::Base,
            VariantId::BaseLora,
            VariantId::Turbo,
            VariantId::TurboLoraLong,
        ];
        if patch {
            ids.push(VariantId::TurboLoraPatch);
        }
        let mut out: BTreeMap<VariantId, Vec<Rgb8>> = ids
            .into_iter()
            .enumerate()
            .map(|(k, id)| {
                (
                    id,
                    (0..4).map(|i| texture(100 * k as u64 + i, 48)).collect(),
                )
            })
            .collect();
        out.insert(VariantId::TurboLora, (0..4).map(turbo_lora).collect());
        out
    }

    #[test]
    fn a_blurred_turbo_lora_is_flagged_and_a_sharp_patch_repairs_it() -> Result<()> {
        let v = Verdicts::measure(&set(|i| blur(&texture(700 + i, 48), 2), true))?;
        assert!(v.blur.blurred, "{:?}", v.blur);
        assert!(v.blur.vs_long < BLUR_RATIO && v.blur.vs_plain < BLUR_RATIO);
        let patch = v.patch.as_ref().expect("a patch check");
        assert_eq!(patch.verdict, PatchVerdict::Repairs, "{patch:?}");

        let sharp = Verdicts::measure(&set(|i| texture(700 + i, 48), true))?;
        assert!(!sharp.blur.blurred, "{:?}", sharp.blur);
        assert_eq!(
            sharp.patch.map(|p| p.verdict),
            Some(PatchVerdict::NotNeeded)
        );
        Ok(())
    }

    #[test]
    fn retention_compares_the_effects_on_turbo_and_base() -> Result<()> {
        let mut images = set(|i| texture(700 + i, 48), false);
        // Turbo + LoRA = Turbo: no effect on Turbo, a full one on Base.
        images.insert(VariantId::TurboLora, images[&VariantId::Turbo].clone());
        let v = Verdicts::measure(&images)?;
        assert_eq!(v.turbo.verdict, EffectVerdict::NotLearning);
        assert_eq!(v.retention_pct, Some(0.0));
        assert_eq!(v.overall(), EffectVerdict::Learning);
        assert!(v.patch.is_none());
        Ok(())
    }
}
