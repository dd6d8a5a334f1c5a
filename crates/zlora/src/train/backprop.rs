//! Loss and LoRA gradients for one micro-batch, with or without gradient checkpointing.
//!
//! The transformer blocks run without an autograd graph and are differentiated by hand
//! (`TransformerBlock::backward`, from each block's tape); candle's autograd handles only the
//! small parts around them (the final layer and loss, the join of the two refined streams).
//! Without checkpointing every block keeps its tape from the forward pass; with it a block
//! keeps only its input and recomputes its tape when the backward pass reaches it, so peak
//! memory holds one block's activations. Both give the same gradients (a test checks this).

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::lora::TrainableLora;
use super::objective::loss;
use crate::model::dit::{BlockStack, BlockTape, Embedded, Grad, Sequence};
use crate::model::ZImageTransformer;
use crate::nn::Grads;
use crate::{Error, Result};

/// One micro-batch: noised latents, model times, captions, targets, per-item weights and
/// per-pixel loss weights (from masks).
pub struct MicroBatch<'a> {
    pub x: &'a Tensor,
    pub t: &'a Tensor,
    pub captions: &'a [Tensor],
    pub target: &'a Tensor,
    pub weights: &'a [f32],
    /// (B, 1, h, w); None weighs every pixel 1.
    pub pixel_weights: Option<&'a Tensor>,
}

/// What a block keeps from the forward pass for its backward.
enum Saved {
    Tape(BlockTape),
    /// Checkpointing: only the input, the tape is recomputed.
    Input(Tensor),
}

/// What a stack keeps for its backward pass.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Keep {
    /// No backward pass runs through it.
    Nothing,
    /// Checkpointing: each block's input; with `last_tape`, the last block keeps its tape
    /// (for the stack whose backward starts right after its forward, so that the peak still
    /// holds one tape).
    Inputs {
        last_tape: bool,
    },
    Tapes,
}

impl Keep {
    fn new(needed: bool, checkpointing: bool, backward_next: bool) -> Self {
        match (needed, checkpointing) {
            (false, _) => Keep::Nothing,
            (true, true) => Keep::Inputs {
                last_tape: backward_next,
            },
            (true, false) => Keep::Tapes,
        }
    }
}

/// Runs a stack; returns the output and what each block saved.
fn forward_stack(
    blocks: &BlockStack,
    seq: &Sequence,
    c: Option<&Tensor>,
    keep: Keep,
) -> Result<(Tensor, Vec<Saved>)> {
    let mut x = seq.x.detach();
    let mut saved = Vec::with_capacity(blocks.len());
    for item in blocks.walk(0..blocks.len()) {
        let (i, block) = item?;
        let (out, tape) = block.forward_taped(&x, &seq.rot, seq.mask.as_ref(), c, Grad::ByHand)?;
        let last = i + 1 == blocks.len();
        match keep {
            Keep::Nothing => {}
            Keep::Inputs { last_tape } if !(last && last_tape) => saved.push(Saved::Input(x)),
            Keep::Inputs { .. } | Keep::Tapes => saved.push(Saved::Tape(tape)),
        }
        x = out;
    }
    Ok((x, saved))
}

/// Walks a stack backwards from the gradient of its output; returns the input's gradient
/// when `input_grad` (otherwise the first block computes none). A swapped block is fetched
/// again, once for its recomputed tape and its backward.
fn backward_stack(
    blocks: &BlockStack,
    mut saved: Vec<Saved>,
    seq: &Sequence,
    c: Option<&Tensor>,
    grad: Tensor,
    grads: &mut Grads,
    input_grad: bool,
) -> Result<Option<Tensor>> {
    let mut grad = Some(grad);
    for item in blocks.walk((0..blocks.len()).rev()) {
        let (i, block) = item?;
        let Some(g) = grad else { break };
        let saved = saved
            .pop()
            .ok_or_else(|| Error::Invalid(format!("block {i} saved nothing for its backward")))?;
        let tape = match saved {
            Saved::Tape(tape) => tape,
            Saved::Input(x) => {
                block
                    .forward_taped(&x, &seq.rot, seq.mask.as_ref(), c, Grad::ByHand)?
                    .1
            }
        };
        grad = block.backward(&tape, &seq.rot, &g, grads, i > 0 || input_grad)?;
    }
    Ok(grad)
}

fn input_grad(store: &GradStore, leaf: &Var) -> Result<Tensor> {
    store
        .get(leaf.as_tensor())
        .cloned()
        .ok_or_else(|| Error::Invalid("gradient did not reach a block input".into()))
}

/// One gradient per `lora.vars()` entry: a missing one means a path through the model
/// silently cut the graph.
fn collect(mut grads: Grads, lora: &TrainableLora) -> Result<Vec<Tensor>> {
    lora.vars()
        .into_iter()
        .zip(lora.var_names())
        .map(|(var, name)| {
            grads
                .take(var.as_tensor())
                .ok_or_else(|| Error::Invalid(format!("no gradient reached {name}")))
        })
        .collect()
}

fn trains(lora: &TrainableLora, stack: &str) -> bool {
    lora.modules
        .iter()
        .any(|m| m.path.split('.').next() == Some(stack))
}

/// Loss (a 0-d f32 tensor, left on the device: the step reads it with the gradient norm) and
/// one gradient per `lora.vars()` entry.
pub fn loss_and_grads(
    model: &ZImageTransformer,
    lora: &TrainableLora,
    batch: &MicroBatch,
    checkpointing: bool,
) -> Result<(Tensor, Vec<Tensor>)> {
    let mut grads = Grads::default();
    let Embedded {
        c,
        image,
        caption,
        grid,
    } = model.embed(batch.x, batch.t, batch.captions)?;
    let c = c.detach();
    let (refine_image, refine_caption) = (
        trains(lora, "noise_refiner"),
        trains(lora, "context_refiner"),
    );
    let (image_out, image_saved) = forward_stack(
        model.noise_refiner(),
        &image,
        Some(&c),
        Keep::new(refine_image, checkpointing, false),
    )?;
    let (caption_out, caption_saved) = forward_stack(
        model.context_refiner(),
        &caption,
        None,
        Keep::new(refine_caption, checkpointing, false),
    )?;
    let unified = Sequence::unify(
        &Sequence {
            x: image_out.clone(),
            ..image.clone()
        },
        &Sequence {
            x: caption_out.clone(),
            ..caption.clone()
        },
    )?;
    let (last, layer_saved) = forward_stack(
        model.layers(),
        &unified,
        Some(&c),
        Keep::new(true, checkpointing, true),
    )?;

    let head = Var::from_tensor(&last)?;
    let l = loss(
        &model.finish(head.as_tensor(), &c, grid)?,
        batch.target,
        batch.weights,
        batch.pixel_weights,
    )?;
    let grad = backward_stack(
        model.layers(),
        layer_saved,
        &unified,
        Some(&c),
        input_grad(&l.backward()?, &head)?,
        &mut grads,
        refine_image || refine_caption,
    )?;

    if let Some(grad) = grad {
        let iv = Var::from_tensor(&image_out)?;
        let cv = Var::from_tensor(&caption_out)?;
        let joined = Sequence::unify(
            &Sequence {
                x: iv.as_tensor().clone(),
                ..image.clone()
            },
            &Sequence {
                x: cv.as_tensor().clone(),
                ..caption.clone()
            },
        )?;
        let store = (joined.x * &grad)?.sum_all()?.backward()?;
        if refine_image {
            backward_stack(
                model.noise_refiner(),
                image_saved,
                &image,
                Some(&c),
                input_grad(&store, &iv)?,
                &mut grads,
                false,
            )?;
        }
        if refine_caption {
            backward_stack(
                model.context_refiner(),
                caption_saved,
                &caption,
                None,
                input_grad(&store, &cv)?,
                &mut grads,
                false,
            )?;
        }
    }
    Ok((l.detach(), collect(grads, lora)?))
}

/// Element-wise sums of two gradient lists (micro-batches, or a loss's terms).
pub fn add_grads(a: &[Tensor], b: &[Tensor]) -> Result<Vec<Tensor>> {
    Ok(a.iter()
        .zip(b)
        .map(|(a, b)| a + b)
        .collect::<candle_core::Result<_>>()?)
}
