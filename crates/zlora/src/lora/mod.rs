//! placeholder

mod container;
pub mod identify;
mod names;
mod peft;
