//! Building blocks shared by inference and training. Each op has a backward: candle's fused
//! norm, softmax and rope kernels (which silently return no gradient) go through `fused`'s
//! custom ops, and every op the hand-written backward needs has its gradient here; `cpu`
//! holds the fused f32 CPU kernels used where no autograd graph is needed, unless `kernels`
//! asks for the generic ops a GPU runs.

pub mod adapter;
pub mod attention;
pub mod cpu;
pub mod fused;
pub mod grads;
pub mod kernels;
pub mod linear;
pub mod norm;
pub mod quant;
pub mod rotary;
pub mod swiglu;

pub use adapter::{Adapter, AdapterWeights, Factor};
pub use grads::Grads;
pub use linear::{FrozenWeight, Linear, LinearTargets};
pub use norm::RmsNorm;
pub use quant::{QuantWeight, Quantization};
