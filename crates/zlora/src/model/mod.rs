//! The Z-Image family: one architecture for Turbo, Base and De-Turbo.

pub mod config;
pub mod dit;
pub mod rope;
pub mod weights;

pub use config::TransformerConfig;
pub use dit::ZImageTransformer;
