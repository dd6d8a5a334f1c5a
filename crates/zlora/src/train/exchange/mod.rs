//! The gradient exchange of data-parallel training: each worker (one per GPU) computes the
//! gradients of its share of a global batch, and the exchange turns them into the global
//! batch's gradients before clipping and the optimizer step. One small interface, so the
//! trainer's math is the same whatever carries the numbers: [`Alone`] (one worker), an
//! in-process group of threads (the CPU tests), or NCCL across GPUs and nodes.

#[cfg(feature = "nccl")]
pub mod nccl;
pub mod rendezvous;

use candle_core::Tensor;

use crate::Result;

/// How data-parallel workers combine what each computed.
pub trait GradientExchange: Send {
    /// This worker's place, 0..world_size; rank 0 writes the run's files.
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Each tensor's mean over all workers, in the same order. Every worker passes tensors of
    /// the same shapes and dtypes in the same order.
    fn all_reduce_mean(&mut self, tensors: &[Tensor]) -> Result<Vec<Tensor>>;
    /// Returns once every worker has called it (e.g. rank 0 has built the shared cache).
    fn barrier(&mut self) -> Result<()>;
}

/// A world of one worker: every exchange is the identity.
pub struct Alone;

impl GradientExchange for Alone {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_mean(&mut self, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
        Ok(tensors.to_vec())
    }

    fn barrier(&mut self) -> Result<()> {
        Ok(())
    }
}
