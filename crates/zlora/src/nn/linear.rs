//! A Linear layer that carries an ordered stack of adapters ([`Adapter`]: LoRA, LoKr, LoHa).
//!
//! One type serves inference and training: the base weight is frozen; each adapter holds its
//! own factors, a scale (alpha / rank, or 1 when the producer folded alpha in), a user
//! strength and an on/off switch. Training makes an adapter's tensors `Var`s; nothing here
//! needs to change for that.
//!
//! The base weight is dense (the model's dtype) or quantized ([`QuantWeight`]); adapters
//! stack on either the same way. Under block swap a weight waits in host memory between
//! uses ([`FrozenWeight::Host`]) and its block fetches a device copy before it runs.

use candle_core::{DType, Device, Module, Tensor};

use super::adapter::Adapter;
use super::cpu::{matmul, matmul_plus};
use super::grads::Grads;
use super::quant::{QuantWeight, Quantization};

/// A Linear's frozen (out, in) weight.
#[derive(Debug, Clone)]
pub enum FrozenWeight {
    Dense(Tensor),
    Quantized(QuantWeight),
    /// Held in host memory for a Linear computed on `device` (block swap): only its fetched
    /// copy ([`Linear::fetch`]) multiplies.
    Host {
        weight: Box<FrozenWeight>,
        device: Device,
    },
}

/// The error of a product asked of a weight still in host memory: its block was not fetched.
fn not_fetched() -> candle_core::Error {
    candle_core::Error::Msg("a swapped block's weight was used before its block was fetched".into())
}

impl FrozenWeight {
    /// The device the weight computes on (a host-held weight's compute device).
    fn device(&self) -> Device {
        match self {
            Self::Dense(w) => w.device().clone(),
            Self::Quantized(q) => q.device(),
            Self::Host { device, .. } => device.clone(),
        }
    }

    /// Bytes the stored weight takes (what a swap moves).
    pub fn bytes(&self) -> usize {
        match self {
            Self::Dense(w) => w.elem_count() * w.dtype().size_in_bytes(),
            Self::Quantized(q) => q.bytes(),
            Self::Host { weight, .. } => weight.bytes(),
        }
    }

    /// A copy in fresh memory on `device`, also when the weight is already there (the CPU's
    /// host and device are one memory: the copy keeps the swap's path and cost).
    fn copy_to(&self, device: &Device) -> candle_core::Result<Self> {
        match self {
            Self::Dense(w) => Ok(Self::Dense(super::quant::copy_to(w, device)?)),
            Self::Quantized(q) => Ok(Self::Quantized(q.copy_to(device)?)),
            Self::Host { weight, .. } => weight.copy_to(device),
        }
    }

    /// (out_features, in_features).
    fn shape(&self) -> (usize, usize) {
        match self {
            Self::Dense(w) => {
                let d = w.dims();
                (d[0], d[1])
            }
            Self::Quantized(q) => q.shape(),
            Self::Host { weight, .. } => weight.shape(),
        }
    }

    /// x·Wᵀ, attached to x's autograd graph (if any) with only the input gradient.
    fn frozen_product(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(w) => super::fused::frozen_matmul(x, &w.to_dtype(x.dtype())?.t()?),
            Self::Quantized(q) => super::fused::quantized_matmul(x, q),
            Self::Host { .. } => Err(not_fetched()),
        }
    }

    /// The weight as a dense tensor of `dtype`: the input gradient's matrix (one Linear's
    /// weight at a time for a quantized base).
    fn dense(&self, dtype: DType) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(w) => w.to_dtype(dtype),
            Self::Quantized(q) => q.dequantize(dtype),
            Self::Host { .. } => Err(not_fetched()),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Linear {
    weight: FrozenWeight,
    bias: Option<Tensor>,
    adapters: Vec<Adapter>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: FrozenWeight::Dense(weight),
            bias,
            adapters: Vec::new(),
        }
    }

    /// A checkpoint's Linear at `vb` (`weight` (out, inp), `bias` when asked), its weight
    /// stored as `quantize` as soon as it is read; a width the format's blocks do not divide
    /// is an error naming the tensor.
    pub fn load(
        (inp, out): (usize, usize),
        bias: bool,
        quantize: Option<Quantization>,
        vb: &candle_nn::VarBuilder,
    ) -> candle_core::Result<Self> {
        let bias = if bias {
            Some(vb.get(out, "bias")?)
        } else {
            None
        };
        let mut linear = Self::new(vb.get((out, inp), "weight")?, bias);
        if let Some(q) = quantize {
            linear.quantize(q).map_err(|e| {
                candle_core::Error::Msg(format!(
                    "{}.weight cannot be stored as {q}: {e}; int8 and fp8 take any width",
                    vb.prefix()
                ))
            })?;
        }
        Ok(linear)
    }

    pub fn weight(&self) -> &FrozenWeight {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    /// (out_features, in_features).
    pub fn shape(&self) -> (usize, usize) {
        self.weight.shape()
    }

    /// Stores the base weight as `q` (a no-op on an already quantized one); `Err` says why the
    /// format does not fit this weight.
    pub fn quantize(&mut self, q: Quantization) -> Result<(), String> {
        if let FrozenWeight::Dense(w) = &self.weight {
            self.weight = FrozenWeight::Quantized(QuantWeight::new(w, q)?);
        }
        Ok(())
    }

    /// Moves the frozen weight to `host` memory, where it waits between its block's runs;
    /// the Linear still computes (and takes adapters) on its device.
    pub fn offload(&mut self, host: &Device) -> candle_core::Result<()> {
        if matches!(self.weight, FrozenWeight::Host { .. }) {
            return Ok(());
        }
        let device = self.weight.device();
        let held = if device.same_device(host) {
            self.weight.clone()
        } else {
            self.weight.copy_to(host)?
        };
        self.weight = FrozenWeight::Host {
            weight: Box::new(held),
            device,
        };
        Ok(())
    }

    /// Replaces a host-held weight by a copy on the compute device; returns the bytes moved
    /// (0 for a weight already there). Adapters stay the same tensors.
    pub fn fetch(&mut self) -> candle_core::Result<usize> {
        let FrozenWeight::Host { weight, device } = &self.weight else {
            return Ok(0);
        };
        let bytes = weight.bytes();
        self.weight = weight.copy_to(device)?;
        Ok(bytes)
    }

    /// Replaces the frozen weight by one of the same shape (a checkpoint's quantized weight
    /// for the stand-in the model was built with).
    pub fn set_weight(&mut self, weight: FrozenWeight) -> Result<(), String> {
        if weight.shape() != self.shape() {
            return Err(format!(
                "weight of shape {:?} for a Linear of shape {:?}",
                weight.shape(),
                self.shape()
            ));
        }
        self.weight = match &self.weight {
            // Under block swap the Linear's weight waits in host memory.
            FrozenWeight::Host {
                weight: held,
                device,
            } => {
                let host = held.device();
                let weight = if weight.device().same_device(&host) {
                    weight
                } else {
                    weight.copy_to(&host).map_err(|e| e.to_string())?
                };
                FrozenWeight::Host {
                    weight: Box::new(weight),
                    device: device.clone(),
                }
            }
            _ => weight,
        };
        Ok(())
    }

    pub fn adapters(&self) -> &[Adapter] {
        &self.adapters
    }

    pub fn adapters_mut(&mut self) -> &mut Vec<Adapter> {
        &mut self.adapters
    }

    /// Appends an adapter after checking that its shapes fit this layer and that its tensors
    /// are on this layer's device (a CPU factor on a CUDA model would fail in the first
    /// forward, far from the file it came from).
    pub fn push_adapter(&mut self, adapter: Adapter) -> Result<(), String> {
        let here = &self.weight.device();
        if let Some(t) = adapter
            .weights
            .tensors()
            .into_iter()
            .find(|t| !t.device().same_device(here))
        {
            return Err(format!(
                "{} adapter {} is on {:?} but the layer is on {:?}",
                adapter.weights.kind(),
                adapter.name,
                t.device().location(),
                here.location()
            ));
        }
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

impl Linear {
    /// Whether an enabled adapter has trainable factors (`Var`s).
    pub fn has_trainable(&self) -> bool {
        self.enabled().any(Adapter::is_trainable)
    }

    fn enabled(&self) -> impl Iterator<Item = &Adapter> {
        self.adapters.iter().filter(|a| a.enabled)
    }

    fn forward_with(&self, x: &Tensor, track: bool) -> candle_core::Result<Tensor> {
        let mut y = match self.low_rank_terms(x, track)? {
            Some(terms) => self.base_plus(x, &terms)?,
            None => {
                let mut y = self.weight.frozen_product(x)?;
                for a in self.enabled() {
                    let delta = if track {
                        a.forward(x)?
                    } else {
                        a.forward_untracked(x)?
                    };
                    y = (y + delta)?;
                }
                y
            }
        };
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.to_dtype(x.dtype())?)?;
        }
        Ok(y)
    }

    /// x·Wᵀ + Σ u·q without an autograd graph: a dense weight's gemm adds the low-rank terms
    /// itself.
    fn base_plus(&self, x: &Tensor, terms: &[(Tensor, Tensor)]) -> candle_core::Result<Tensor> {
        match &self.weight {
            FrozenWeight::Dense(w) => matmul_plus(x, &w.to_dtype(x.dtype())?.t()?, terms),
            FrozenWeight::Quantized(q) => {
                let mut y = q.forward(x)?;
                for (u, m) in terms {
                    y = (y + matmul(u, m)?.to_dtype(x.dtype())?)?;
                }
                Ok(y)
            }
            FrozenWeight::Host { .. } => Err(not_fetched()),
        }
    }

    /// Without an autograd graph and with only LoRAs enabled: (f·x·Aᵀ, Bᵀ) per LoRA, the
    /// terms `matmul_plus` adds to the base product.
    fn low_rank_terms(
        &self,
        x: &Tensor,
        track: bool,
    ) -> candle_core::Result<Option<Vec<(Tensor, Tensor)>>> {
        if track && (x.track_op() || self.has_trainable()) {
            return Ok(None);
        }
        let mut terms = Vec::new();
        for adapter in self.enabled() {
            let Some((a, b, f)) = adapter.low_rank() else {
                return Ok(None);
            };
            let u = (matmul(&x.to_dtype(a.dtype())?, &a.t()?)? * f)?;
            terms.push((u, b.t()?));
        }
        Ok(Some(terms))
    }

    /// The forward pass without an autograd graph (not even through trainable adapters), for
    /// passes whose backward is [`Linear::backward`].
    pub fn forward_untracked(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with(x, false)
    }

    /// Only the trainable adapters' gradients for the output gradient `dy`, without the
    /// input's.
    pub fn param_grads(
        &self,
        x: &Tensor,
        dy: &Tensor,
        grads: &mut Grads,
    ) -> candle_core::Result<()> {
        for a in self.enabled().filter(|a| a.is_trainable()) {
            if a.low_rank_backward(x, dy, grads)?.is_none() {
                a.dense_factor_grads(x, dy, grads)?;
            }
        }
        Ok(())
    }

    /// The gradient of the input `x` for the output gradient `dy`; trainable adapters (LoRA,
    /// LoKr, LoHa) add the gradients of their factors to `grads`. The base weight is frozen.
    pub fn backward(
        &self,
        x: &Tensor,
        dy: &Tensor,
        grads: &mut Grads,
    ) -> candle_core::Result<Tensor> {
        let w = self.weight.dense(dy.dtype())?;
        let (mut terms, mut dense) = (Vec::new(), Vec::new());
        for a in self.enabled() {
            match a.low_rank_backward(x, dy, grads)? {
                Some(term) => terms.push(term),
                None => {
                    a.dense_factor_grads(x, dy, grads)?;
                    dense.push(a.dense_backward(x, dy)?);
                }
            }
        }
        let mut dx = matmul_plus(dy, &w, &terms)?;
        for d in dense {
            dx = (dx + d)?;
        }
        Ok(dx)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_with(x, true)
    }
}

/// A model whose Linear layers can carry adapters, addressed by their diffusers module path
/// (for example `layers.3.attention.to_q`). LoRA files attach through this and nothing else.
pub trait LinearTargets {
    /// Every adapter-capable Linear's path with its (out_features, in_features).
    fn linear_shapes(&self) -> Vec<(String, (usize, usize))>;
    fn linear_mut(&mut self, path: &str) -> Option<&mut Linear>;
    /// The device and compute dtype that adapters from files are placed on when they enter
    /// the model.
    fn placement(&self) -> (Device, DType);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An offloaded weight refuses to multiply until fetched; the fetch moves its bytes and
    /// gives the same product, and a second fetch moves nothing.
    #[test]
    fn an_offloaded_weight_multiplies_only_after_its_fetch() {
        let w = Tensor::arange(0f32, 12.0, &Device::Cpu)
            .unwrap()
            .reshape((3, 4))
            .unwrap();
        let x = Tensor::ones((2, 4), DType::F32, &Device::Cpu).unwrap();
        let resident = Linear::new(w, None);
        let mut swapped = resident.clone();
        swapped.offload(&Device::Cpu).unwrap();
        let err = swapped.forward_untracked(&x).unwrap_err().to_string();
        assert!(err.contains("before its block was fetched"), "{err}");
        assert_eq!(swapped.fetch().unwrap(), 3 * 4 * 4);
        assert_eq!(swapped.fetch().unwrap(), 0);
        let (a, b) = (
            swapped.forward_untracked(&x).unwrap(),
            resident.forward_untracked(&x).unwrap(),
        );
        assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    }
}
