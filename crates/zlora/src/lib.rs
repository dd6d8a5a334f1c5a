//! zlora: train, convert and validate LoRAs for the Z-Image family (Turbo, Base, De-Turbo).
//!
//! Data flows one way: `model` (weights, DiT, text encoder, VAE) ← `sample` (schedules,
//! guidance, the generate pipeline); `lora` reads and writes adapter files and depends only on
//! tensors. `nn` holds the differentiable building blocks that both inference and training use.
//! `bake` joins the two: it merges LoRAs into checkpoints and extracts them from checkpoint
//! differences. `linalg` has the QR and SVD they need.

pub mod bake;
pub mod caption;
pub mod child;
pub mod data;
pub mod device;
pub mod doctor;
pub mod error;
pub mod fsutil;
pub mod html;
pub mod hub;
pub mod linalg;
pub mod lora;
pub mod model;
pub mod nn;
pub mod outdir;
pub mod plan;
pub mod sample;
pub mod train;
pub mod validate;

pub use error::{Error, Result};
