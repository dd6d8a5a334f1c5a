//! The gradient exchange of data-parallel training: each worker (one per GPU) computes the
//! gradients of its share of a global batch, and the exchange turns them into the global
//! batch's gradients before clipping and the optimizer step. One small interface, so the
//! trainer's math is the same whatever carries the numbers: [`Alone`] (one worker), an
//! in-process group of threads (the CPU tests), or NCCL across GPUs and nodes.

mod in_process;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod rendezvous;

pub use in_process::InProcess;

use candle_core::{DType, Tensor};

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

/// Each tensor's mean over the workers through ONE `all_reduce_mean` call: the tensors are
/// flattened into a single f32 vector and cut back into their shapes (each collective pays
/// NCCL's latency, so a step makes one, not one per LoRA tensor). A world of one exchanges
/// nothing and copies nothing.
pub fn mean_in_one_call(
    exchange: &mut dyn GradientExchange,
    tensors: Vec<Tensor>,
) -> Result<Vec<Tensor>> {
    if exchange.world_size() == 1 {
        return Ok(tensors);
    }
    let flat = tensors
        .iter()
        .map(|t| t.flatten_all()?.to_dtype(DType::F32))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let packed = Tensor::cat(&flat, 0)?;
    let mean = exchange
        .all_reduce_mean(std::slice::from_ref(&packed))?
        .pop()
        .ok_or_else(|| crate::Error::Invalid("the gradient exchange returned nothing".into()))?;
    let mut at = 0;
    tensors
        .iter()
        .map(|t| {
            let n = t.elem_count();
            let part = mean
                .narrow(0, at, n)?
                .reshape(t.shape())?
                .to_dtype(t.dtype())?;
            at += n;
            Ok(part)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Counts the collectives it passes on to an in-process group.
    struct Counted(InProcess, usize);

    impl GradientExchange for Counted {
        fn rank(&self) -> usize {
            self.0.rank()
        }
        fn world_size(&self) -> usize {
            self.0.world_size()
        }
        fn all_reduce_mean(&mut self, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
            self.1 += 1;
            self.0.all_reduce_mean(tensors)
        }
        fn barrier(&mut self) -> Result<()> {
            self.0.barrier()
        }
    }

    #[test]
    fn tensors_of_several_shapes_are_averaged_in_one_collective() {
        let threads: Vec<_> = InProcess::group(2)
            .into_iter()
            .map(|w| {
                std::thread::spawn(move || {
                    let r = w.rank() as f32;
                    let mut w = Counted(w, 0);
                    let a = Tensor::new(&[[r, 1.0], [2.0 * r, 3.0]], &Device::Cpu).unwrap();
                    let b = Tensor::new(4.0 * r, &Device::Cpu).unwrap();
                    let means = mean_in_one_call(&mut w, vec![a, b]).unwrap();
                    assert_eq!(means[1].dims(), &[] as &[usize]);
                    let a = means[0].to_vec2::<f32>().unwrap();
                    (a, means[1].to_scalar::<f32>().unwrap(), w.1)
                })
            })
            .collect();
        for t in threads {
            let (a, b, calls) = t.join().unwrap();
            assert_eq!(a, vec![vec![0.5, 1.0], vec![1.0, 3.0]]);
            assert_eq!(b, 2.0);
            assert_eq!(calls, 1);
        }
    }
}
