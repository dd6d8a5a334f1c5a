//! The Z-Image family: text encoder and VAE.

pub mod text;
pub mod vae;
