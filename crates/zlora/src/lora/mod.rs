//! placeholder

mod container;
