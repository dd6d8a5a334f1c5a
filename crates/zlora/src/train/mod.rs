//! LoRA training: the trainable LoRA, the flow-matching objective, AdamW, and gradients with
//! block checkpointing.

pub mod backprop;
pub mod lora;
pub mod objective;
pub mod optim;
