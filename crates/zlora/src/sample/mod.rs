//! Sampling: the sigma schedule, classifier-free guidance, the denoising loop and images.

pub mod guidance;
pub mod image;
pub mod schedule;

pub use guidance::Guidance;
