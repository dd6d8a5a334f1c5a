//! A Linear layer that carries an ordered stack of LoRA adapters.
//!
//! One type serves inference and training: the base weight is frozen; each adapter holds its
//! own `down` (A, [rank, in]) and `up` (B, [out, rank]) matrices, a scale (alpha / rank, or 1
//! when the producer folded alpha in), a user strength and an on/off switch. Training makes an
//! adapter's tensors `Var`s; nothing here needs to change for that.

use candle_core::{DType, Module, Tensor};

/// One low-rank adapter on one Linear: `delta_W = strength * scale * up @ down`.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// Which file or run this adapter came from (for messages and for switching it off).
    pub name: String,
    /// A: [rank, in_features].
    pub down: Tensor,
    /// B: [out_features, rank].
    pub up: Tensor,
    /// alpha / rank as the producer defines it.
    pub scale: f64,
    /// The user's strength (1.0 = as trained).
    pub strength: f64,
    pub enabled: bool,
}

impl Adapter {
    fn factor(&self) -> f64 {
        self.scale * self.strength
    }

    /// The dense weight delta this adapter adds, in f32 ([out, in]).
    pub fn delta(&self) -> candle_core::Result<Tensor> {
        let up = self.up.to_dtype(DType::F32)?;
        let down = self.down.to_dtype(DType::F32)?;
        up.matmul(&down)? * self.factor()
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        // Adapters compute in their own dtype (f32 for LoRA weights per the precision policy).
        let xa = x.to_dtype(self.down.dtype())?;
        let h = xa.broadcast_matmul(&self.down.t()?)?;
        let y = h.broadcast_matmul(&self.up.t()?)?;
        (y * self.factor())?.to_dtype(x.dtype())
    }
}

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
        let (r_down, in_down) = adapter.down.dims2().map_err(|e| e.to_string())?;
        let (out_up, r_up) = adapter.up.dims2().map_err(|e| e.to_string())?;
        if in_down != inp || out_up != out || r_down != r_up {
            return Err(format!(
                "adapter shapes down [{r_down}, {in_down}] / up [{out_up}, {r_up}] do not fit a \
                 Linear of [{out}, {inp}]"
            ));
        }
        self.adapters.push(adapter);
        Ok(())
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let w = self.weight.to_dtype(x.dtype())?;
        let mut y = x.broadcast_matmul(&w.t()?)?;
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
