//! Loss and LoRA gradients for one micro-batch, with or without gradient checkpointing.
//!
//! Checkpointing runs every block forward without keeping its graph, remembering only the
//! block inputs; the backward pass then walks the blocks in reverse, recomputes each one from
//! its saved input (made a leaf `Var`) and back-propagates ⟨output, incoming gradient⟩. The
//! gradients equal plain backprop (a test checks this); peak memory holds one block's graph.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::lora::TrainableLora;
use super::objective::loss;
use crate::model::dit::{Embedded, Sequence, TransformerBlock};
use crate::model::ZImageTransformer;
use crate::{Error, Result};

/// One micro-batch: noised latents, model times, captions, targets and per-item weights.
pub struct MicroBatch<'a> {
    pub x: &'a Tensor,
    pub t: &'a Tensor,
    pub captions: &'a [Tensor],
    pub target: &'a Tensor,
    pub weights: &'a [f32],
}

/// Sums gradients of the LoRA tensors over several backward passes.
struct Accumulator<'a> {
    vars: Vec<&'a Var>,
    grads: Vec<Option<Tensor>>,
}

impl<'a> Accumulator<'a> {
    fn new(lora: &'a TrainableLora) -> Self {
        let vars = lora.vars();
        let grads = vec![None; vars.len()];
        Self { vars, grads }
    }

    fn add(&mut self, store: &GradStore) -> Result<()> {
        for (var, slot) in self.vars.iter().zip(self.grads.iter_mut()) {
            if let Some(g) = store.get(var.as_tensor()) {
                *slot = Some(match slot.take() {
                    Some(acc) => (acc + g)?,
                    None => g.clone(),
                });
            }
        }
        Ok(())
    }

    /// Every LoRA tensor must have received a gradient: a missing one means a path through
    /// the model silently cut the graph.
    fn finish(self, lora: &TrainableLora) -> Result<Vec<Tensor>> {
        let names = lora.var_names();
        self.grads
            .into_iter()
            .zip(names)
            .map(|(g, name)| g.ok_or_else(|| Error::Invalid(format!("no gradient reached {name}"))))
            .collect()
    }
}

/// Loss (f32) and one gradient per `lora.vars()` entry.
pub fn loss_and_grads(
    model: &ZImageTransformer,
    lora: &TrainableLora,
    batch: &MicroBatch,
    checkpointing: bool,
) -> Result<(f32, Vec<Tensor>)> {
    let mut acc = Accumulator::new(lora);
    let value = if checkpointing {
        checkpointed(model, lora, batch, &mut acc)?
    } else {
        let out = model.forward(batch.x, batch.t, batch.captions)?;
        let l = loss(&out, batch.target, batch.weights)?;
        acc.add(&l.backward()?)?;
        l.to_scalar::<f32>()?
    };
    Ok((value, acc.finish(lora)?))
}

/// Runs a stack without keeping graphs; returns the output and each block's input.
fn forward_saving(
    blocks: &[TransformerBlock],
    seq: &Sequence,
    c: Option<&Tensor>,
) -> Result<(Tensor, Vec<Tensor>)> {
    let mut x = seq.x.detach();
    let mut inputs = Vec::with_capacity(blocks.len());
    for block in blocks {
        inputs.push(x.clone());
        x = block.forward(&x, &seq.rot, seq.mask.as_ref(), c)?.detach();
    }
    Ok((x, inputs))
}

/// Walks a stack backwards from the gradient of its output; returns the input's gradient.
fn backward_stack(
    blocks: &[TransformerBlock],
    inputs: Vec<Tensor>,
    seq: &Sequence,
    c: Option<&Tensor>,
    mut grad: Tensor,
    acc: &mut Accumulator,
) -> Result<Tensor> {
    for (block, input) in blocks.iter().zip(inputs).rev() {
        let leaf = Var::from_tensor(&input)?;
        let out = block.forward(leaf.as_tensor(), &seq.rot, seq.mask.as_ref(), c)?;
        let store = (out * &grad)?.sum_all()?.backward()?;
        acc.add(&store)?;
        grad = input_grad(&store, &leaf)?;
    }
    Ok(grad)
}

fn input_grad(store: &GradStore, leaf: &Var) -> Result<Tensor> {
    store
        .get(leaf.as_tensor())
        .cloned()
        .ok_or_else(|| Error::Invalid("gradient did not reach a block input".into()))
}

fn trains(lora: &TrainableLora, stack: &str) -> bool {
    lora.modules
        .iter()
        .any(|m| m.path.split('.').next() == Some(stack))
}

fn checkpointed(
    model: &ZImageTransformer,
    lora: &TrainableLora,
    batch: &MicroBatch,
    acc: &mut Accumulator,
) -> Result<f32> {
    let Embedded {
        c,
        image,
        caption,
        grid,
    } = model.embed(batch.x, batch.t, batch.captions)?;
    let c = c.detach();
    let (image_out, image_inputs) = forward_saving(model.noise_refiner(), &image, Some(&c))?;
    let (caption_out, caption_inputs) = forward_saving(model.context_refiner(), &caption, None)?;
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
    let (last, layer_inputs) = forward_saving(model.layers(), &unified, Some(&c))?;

    let head = Var::from_tensor(&last)?;
    let l = loss(
        &model.finish(head.as_tensor(), &c, grid)?,
        batch.target,
        batch.weights,
    )?;
    let store = l.backward()?;
    acc.add(&store)?;
    let grad = backward_stack(
        model.layers(),
        layer_inputs,
        &unified,
        Some(&c),
        input_grad(&store, &head)?,
        acc,
    )?;

    let (refine_image, refine_caption) = (
        trains(lora, "noise_refiner"),
        trains(lora, "context_refiner"),
    );
    if refine_image || refine_caption {
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
                image_inputs,
                &image,
                Some(&c),
                input_grad(&store, &iv)?,
                acc,
            )?;
        }
        if refine_caption {
            backward_stack(
                model.context_refiner(),
                caption_inputs,
                &caption,
                None,
                input_grad(&store, &cv)?,
                acc,
            )?;
        }
    }
    Ok(l.to_scalar::<f32>()?)
}
