//! LoRA training: configuration, the trainable LoRA, the flow-matching objective, the
//! optimizers (AdamW, 8-bit AdamW, Prodigy, Adafactor), gradients with block checkpointing, checkpoints,
//! samples, differential output preservation, the logs and the training loop.

pub mod adafactor;
pub mod adamw8bit;
pub mod backprop;
pub mod config;
pub mod ema;
pub mod exchange;
pub(crate) mod host;
pub mod log;
pub mod lora;
pub mod objective;
pub mod optim;
pub mod preservation;
pub mod prodigy;
pub mod resume;
pub mod samples;
pub mod state;
pub mod tensorboard;
pub mod trainer;
