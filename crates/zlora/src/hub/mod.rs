//! The Hugging Face Hub: the repositories zlora knows, and downloads into the standard cache
//! (docs/fetch.md).

pub mod fetch;
pub mod known;
