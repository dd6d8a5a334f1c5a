//! placeholder

mod container;
mod names;
mod peft;
