//! Differential output preservation (DOP, ai-toolkit's `diff_output_preservation`): keeps a
//! character LoRA from leaking into its class. Each item's caption with the trigger replaced
//! by the class word ("zkchar, smiling" → "woman, smiling") is run twice on the main batch's
//! noisy latents and timesteps: once with the trained LoRA switched off and no graph (the
//! prior), once with it on, differentiated. The mean squared difference, times `weight`, is
//! added to the flow-matching loss, so the LoRA learns the trigger while the class prompt's
//! prediction stays the base model's.
//!
//! Cost per micro-batch: one more graph-free forward and one more forward and backward
//! (docs/training.md has the measurement; `zlora plan` counts both).

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::backprop::{add_grads, loss_and_grads, MicroBatch};
use super::lora::{set_enabled, TrainableLora, TRAINED};
use crate::model::ZImageTransformer;
use crate::{Error, Result};

/// `[train] preservation = { class = "woman", weight = 1.0 }`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Preservation {
    /// The word that replaces the trigger in the preservation captions: what the subject
    /// is an instance of ("woman", "man", "person", "dog").
    pub class: String,
    /// The preservation loss's weight (ai-toolkit's `diff_output_preservation_multiplier`).
    #[serde(default = "one")]
    pub weight: f64,
}

fn one() -> f64 {
    1.0
}

impl Preservation {
    /// The class word is a word, the weight a finite number ≥ 0, and there is a trigger to
    /// replace.
    pub fn validate(&self, trigger: Option<&str>) -> Result<()> {
        let bad = |m: String| Err(Error::Invalid(format!("[train] preservation: {m}")));
        let class = &self.class;
        if class.trim().is_empty() || class.trim() != class {
            return bad(format!(
                "class must be a word without surrounding spaces (e.g. \"woman\"), got {class:?}"
            ));
        }
        if !(self.weight >= 0.0 && self.weight.is_finite()) {
            return bad(format!(
                "weight must be a finite number ≥ 0 (e.g. 1.0), got {}",
                self.weight
            ));
        }
        match trigger {
            None => bad("it replaces the trigger by the class word: set [dataset] trigger".into()),
            Some(t) if t == class => bad(format!(
                "class {class:?} is the trigger itself: the preservation captions would be the training captions"
            )),
            Some(_) => Ok(()),
        }
    }
}

/// One micro-batch's class captions (an item's caption with the trigger replaced by the
/// class word) and the preservation loss's weight.
pub struct ClassCaptions<'a> {
    pub captions: &'a [Tensor],
    pub weight: f64,
}

/// One micro-batch's losses (0-d f32, left on the device) and gradients.
pub struct Losses {
    /// The flow-matching loss.
    pub main: Tensor,
    /// The preservation loss, its weight applied (with class captions).
    pub preservation: Option<Tensor>,
    /// One per `lora.vars()` entry: the main loss's, plus the preservation loss's.
    pub grads: Vec<Tensor>,
}

/// The flow-matching loss and gradients of `batch`; with `class`, the preservation term on
/// the same noisy latents and model times: the prior prediction with the LoRA off, then
/// the weighted mean squared error of the LoRA's prediction against it, its gradients
/// added to the main ones.
pub fn loss_and_grads_with(
    model: &mut ZImageTransformer,
    lora: &TrainableLora,
    batch: &MicroBatch,
    class: Option<&ClassCaptions>,
    checkpointing: bool,
) -> Result<Losses> {
    let (main, grads) = loss_and_grads(model, lora, batch, checkpointing)?;
    let Some(class) = class else {
        return Ok(Losses {
            main,
            preservation: None,
            grads,
        });
    };
    let prior = prior(model, batch.x, batch.t, class.captions)?;
    // objective::loss averages per item, then over the batch; the items of a batch share a
    // bucket, so equal weights give the mean over every element, as torch's mse_loss.
    let weights = vec![class.weight as f32; class.captions.len()];
    // Every pixel is held to the prior: a loss mask marks the subject of the training
    // image, while preservation is about the whole picture of the class.
    let preserve = MicroBatch {
        captions: class.captions,
        target: &prior,
        weights: &weights,
        pixel_weights: None,
        ..*batch
    };
    let (preservation, extra) = loss_and_grads(model, lora, &preserve, checkpointing)?;
    Ok(Losses {
        main,
        preservation: Some(preservation),
        grads: add_grads(&grads, &extra)?,
    })
}

/// The model's prediction with the trained LoRA switched off (a training adapter stays on:
/// it is part of the base being preserved), without a graph.
fn prior(
    model: &mut ZImageTransformer,
    x: &Tensor,
    t: &Tensor,
    captions: &[Tensor],
) -> Result<Tensor> {
    set_enabled(model, TRAINED, false);
    let prior = model.forward(x, t, captions);
    set_enabled(model, TRAINED, true);
    Ok(prior?)
}
