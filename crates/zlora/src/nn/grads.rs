//! Gradients collected by hand-written backward passes, keyed like candle's `GradStore`
//! (which cannot be built outside candle) by the id of the tensor they belong to.

use std::collections::HashMap;

use candle_core::{Result, Tensor, TensorId};

#[derive(Debug, Default)]
pub struct Grads(HashMap<TensorId, Tensor>);

impl Grads {
    /// Adds `grad` to what `tensor` has received so far.
    pub fn add(&mut self, tensor: &Tensor, grad: Tensor) -> Result<()> {
        let sum = match self.0.remove(&tensor.id()) {
            Some(acc) => (acc + grad)?,
            None => grad,
        };
        self.0.insert(tensor.id(), sum);
        Ok(())
    }

    pub fn take(&mut self, tensor: &Tensor) -> Option<Tensor> {
        self.0.remove(&tensor.id())
    }
}
