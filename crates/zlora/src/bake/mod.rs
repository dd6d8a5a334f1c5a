//! Baking LoRAs into transformer checkpoints ([`merge`]) and taking them back out of the
//! difference of two checkpoints ([`extract`]). Both work one tensor (one module) at a time,
//! so memory stays bounded by the largest tensor, not the model.

pub mod extract;
pub mod merge;

pub use extract::{extract, ExtractOptions, ExtractReport, ExtractedModule};
pub use merge::{merge, MergeFormat, MergeReport};
