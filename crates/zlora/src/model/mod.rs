//! The Z-Image family: one architecture for Turbo, Base and De-Turbo.

pub mod config;
pub mod dit;
pub mod folder;
pub mod gguf;
pub mod qwen3;
pub mod rope;
pub mod text;
pub mod tiny;
pub mod vae;
pub mod weights;

pub use config::TransformerConfig;
pub use dit::{BaseStorage, ZImageTransformer};
