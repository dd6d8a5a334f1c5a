//! A Linear layer that carries an ordered stack of adapters ([`Adapter`]: LoRA, LoKr, LoHa).
//!
//! One type serves inference and training: the base weight is frozen; each adapter holds its
//! own factors, a scale (alpha / rank, or 1 when the producer folded alpha in), a user
//! strength and an on/off switch. Training makes an adapter's tensors `Var`s; nothing here
//! needs to change for that.

use candle_core::{Module, Tensor};

use super::adapter::Adapter;

#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    adapters: Vec<Adapter>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            adapters: Vec::new(),
        }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// (out_features, in_features).
    pub fn shape(&self) -> (usize, usize) {
        let d = self.weight.dims();
        (d[0], d[1])
    }

    pub fn adapters(&self) -> &[Adapter] {
        &self.adapters
    }

    pub fn adapters_mut(&mut self) -> &mut Vec<Adapter> {
        &mut self.adapters
    }

    /// Appends an adapter after checking that its shapes fit this layer.
    pub fn push_adapter(&mut self, adapter: Adapter) -> Result<(), String> {
        let (out, inp) = self.shape();
        let (a_out, a_in) = adapter.weights.shape().map_err(|e| e.to_string())?;
        if (a_out, a_in) != (out, inp) {
            return Err(format!(
                "{} adapter of [{a_out}, {a_in}] does not fit a Linear of [{out}, {inp}]",
                adapter.weights.kind()
            ));
        }
        self.adapters.push(adapter);
        Ok(())
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.weight.to_dtype(x.dtype())?;
        let mut y = super::fused::frozen_matmul(x, &w.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.to_dtype(x.dtype())?)?;
        }
        for a in self.adapters.iter().filter(|a| a.enabled) {
            y = (y + a.forward(x)?)?;
        }
        Ok(y)
    }
}

/// A model whose Linear layers can carry adapters, addressed by their diffusers module path
/// (for example `layers.3.attention.to_q`). LoRA files attach through this and nothing else.
pub trait LinearTargets {
    /// Every adapter-capable Linear's path with its (out_features, in_features).
    fn linear_shapes(&self) -> Vec<(String, (usize, usize))>;
    fn linear_mut(&mut self, path: &str) -> Option<&mut Linear>;
}
