//! Differentiable building blocks shared by inference and training. Everything here is built
//! from composed candle ops that have a backward (candle's fused norm, softmax and rope
//! kernels silently return no gradient).

pub mod adapter;
pub mod attention;
pub mod cpu;
pub mod fused;
pub mod grads;
pub mod linear;
pub mod norm;
pub mod swiglu;

pub use adapter::{Adapter, AdapterWeights, Factor};
pub use grads::Grads;
pub use linear::{Linear, LinearTargets};
pub use norm::RmsNorm;
