//! The reference fixtures through the generic kernels (`ZLORA_KERNELS=generic`): the ops a
//! GPU runs (candle's composed and fused ops, in the same order and dtypes), run on the CPU.
//! The switch is process-wide and the tests of one binary run on parallel threads, so this
//! file is its own binary and every test sets the switch first.
//!
//! f32 is held to the native tests' bounds (`parity::TOL`, `parity::LOSS_TOL`). bf16 (weights
//! and compute in bf16; the LoRA in f32 as the trainer keeps it) is held to bounds in units of
//! bf16's unit roundoff U = 2⁻⁸: a value rounded to bf16 (8 significant bits) is off by at
//! most U of itself. The f32 runs of the same path are within 7e-6 of the references, so what
//! the bf16 runs add is bf16 rounding alone, and every bound below is twice the error measured
//! with `cargo test --release -p zlora --test generic_kernels -- --nocapture`, rounded up to a
//! whole U (a quarter U for the loss): a few U, as expected of independent roundings summed
//! over a handful of layers. docs/gpu.md lists the measurements.

mod common;
mod parity;

use candle_core::DType;
use parity::{
    assert_within, dit_batch_errors, dit_single_error, text_hidden_errors, text_pipeline_errors,
    train_step_errors, transformer, vae_errors, LOSS_TOL, TOL,
};
use zlora::nn::kernels::{self, Kernels};

/// bf16's unit roundoff.
const U: f32 = 1.0 / 256.0;

/// DiT output, batch of two with a padding mask: measured 1.44e-2 (3.7 U).
const DIT_BF16: f32 = 8.0 * U;
/// Text encoder hidden states: measured 1.21e-2 (3.1 U).
const TEXT_BF16: f32 = 7.0 * U;
/// VAE encode and decode with the convolutions in bf16 (f32 accumulation, as cuDNN does):
/// measured 2.53e-2 (6.5 U) with model/vae.rs kept in bf16 (docs/gpu.md says how). A VAE
/// that widens bf16 to f32 on the CPU measures 1e-6.
const VAE_BF16: f32 = 13.0 * U;
/// The training step's loss, a mean over every latent element (rounding errors average
/// out): measured 2.7e-4 (0.07 U).
const LOSS_BF16: f32 = 0.25 * U;
/// Every LoRA gradient: products of bf16 activations and bf16 output gradients through the
/// blocks, measured at most 3.97e-2 (10.2 U).
const GRAD_BF16: f32 = 21.0 * U;

fn generic() {
    kernels::set(Kernels::Generic);
}

#[test]
fn dit_matches_diffusers() {
    generic();
    assert_within(&dit_batch_errors(DType::F32), TOL, "f32 batch");
    let model = transformer(DType::F32);
    assert_within(&dit_single_error(&model, "dit.single.out.0"), TOL, "f32");
}

#[test]
fn dit_in_bf16_stays_within_its_bound() {
    generic();
    assert_within(&dit_batch_errors(DType::BF16), DIT_BF16, "bf16 batch");
}

#[test]
fn text_encoder_matches_transformers() {
    generic();
    assert_within(&text_hidden_errors(DType::F32), TOL, "f32");
    assert_within(&text_pipeline_errors(DType::F32), TOL, "f32");
}

#[test]
fn text_encoder_in_bf16_stays_within_its_bound() {
    generic();
    assert_within(&text_hidden_errors(DType::BF16), TEXT_BF16, "bf16");
    assert_within(&text_pipeline_errors(DType::BF16), TEXT_BF16, "bf16");
}

#[test]
fn vae_matches_diffusers() {
    generic();
    assert_within(&vae_errors(DType::F32), TOL, "f32");
}

#[test]
fn vae_in_bf16_stays_within_its_bound() {
    generic();
    assert_within(&vae_errors(DType::BF16), VAE_BF16, "bf16");
}

#[test]
fn one_training_step_matches_diffusers_and_peft() {
    generic();
    let (loss, grads) = train_step_errors(DType::F32);
    assert!(loss <= LOSS_TOL, "f32 loss relative error {loss:e}");
    assert_within(&grads, TOL, "f32 gradient");
}

#[test]
fn one_training_step_in_bf16_stays_within_its_bounds() {
    generic();
    let (loss, grads) = train_step_errors(DType::BF16);
    eprintln!("bf16 loss: relative error {loss:.3e}");
    assert!(loss <= LOSS_BF16, "bf16 loss relative error {loss:e}");
    assert_within(&grads, GRAD_BF16, "bf16 gradient");
}
