//! Sampling: the sigma schedule, classifier-free guidance, the denoising loop, the generate
//! command's orchestration and PNG output.

pub mod canvas;
pub mod generate;
pub mod guidance;
pub mod image;
pub mod limits;
pub mod pipeline;
pub mod schedule;
pub mod sheet;

pub use guidance::Guidance;
