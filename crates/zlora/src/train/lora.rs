//! The LoRA being trained: one (down, up) pair of f32 `Var`s per targeted Linear, attached to
//! the model as an ordinary adapter so the same forward serves training and sampling.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::lora::LoraModule;
use crate::model::dit::{BLOCK_LINEARS, STACKS};
use crate::nn::{Adapter, AdapterWeights, LinearTargets};
use crate::{Error, Result};

/// The adapter name the trained LoRA carries on every Linear.
pub const TRAINED: &str = "trained";

/// Which Linears get a trainable LoRA: `{stack}.{i}.{module}` for every listed stack and module.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    /// Block stacks: "layers" (default), "noise_refiner", "context_refiner".
    #[serde(default = "default_stacks")]
    pub stacks: Vec<String>,
    /// Module paths inside a block; add "adaLN_modulation.0" to train the modulation.
    #[serde(default = "default_modules")]
    pub modules: Vec<String>,
}

fn default_stacks() -> Vec<String> {
    vec!["layers".into()]
}

/// ai-toolkit's and musubi's common core: attention q/k/v/out and the SwiGLU FFN (every block
/// Linear but the adaLN modulation).
fn default_modules() -> Vec<String> {
    BLOCK_LINEARS
        .iter()
        .filter(|m| !m.starts_with("adaLN"))
        .map(|m| m.to_string())
        .collect()
}

impl LoraConfig {
    /// Rejects unknown stack or module names (a typo must not silently train nothing).
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(Error::Invalid("[lora] rank must be at least 1".into()));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::Invalid(format!(
                "[lora] alpha must be a positive finite number (the LoRA's scale is alpha / rank), \
                 got {}",
                self.alpha
            )));
        }
        for s in &self.stacks {
            if !STACKS.contains(&s.as_str()) {
                return Err(Error::Invalid(format!(
                    "[lora] unknown stack {s:?}; known: {STACKS:?}"
                )));
            }
        }
        for m in &self.modules {
            if !BLOCK_LINEARS.contains(&m.as_str()) {
                return Err(Error::Invalid(format!(
                    "[lora] unknown module {m:?}; known: {BLOCK_LINEARS:?}"
                )));
            }
        }
        Ok(())
    }

    /// The rank must not exceed min(out, in) of any targeted Linear, given as
    /// (path, (out, in)): a LoRA cannot have more rank than the Linear it adapts.
    pub fn check_rank<'a>(
        &self,
        linears: impl IntoIterator<Item = (&'a str, (usize, usize))>,
    ) -> Result<()> {
        for (path, (out, inp)) in linears {
            if self.targets(path) && self.rank > out.min(inp) {
                return Err(Error::Invalid(format!(
                    "[lora] rank {} is above min(out, in) = {} of {path}: a LoRA cannot have \
                     more rank than the Linear it adapts",
                    self.rank,
                    out.min(inp)
                )));
            }
        }
        Ok(())
    }

    pub(crate) fn targets(&self, path: &str) -> bool {
        let mut parts = path.splitn(3, '.');
        let (Some(stack), Some(index), Some(module)) = (parts.next(), parts.next(), parts.next())
        else {
            return false;
        };
        index.parse::<usize>().is_ok()
            && self.stacks.iter().any(|s| s == stack)
            && self.modules.iter().any(|m| m == module)
    }
}

/// One trainable pair: ΔW = (alpha / rank) · up · down.
#[derive(Debug, Clone)]
pub struct TrainableModule {
    pub path: String,
    pub down: Var,
    pub up: Var,
}

#[derive(Debug, Clone)]
pub struct TrainableLora {
    pub rank: usize,
    pub alpha: f64,
    pub modules: Vec<TrainableModule>,
}

impl TrainableLora {
    /// New pairs for every targeted Linear: down ~ U(−1/√in, 1/√in) (PEFT's kaiming-uniform
    /// with a = √5), up = 0, so training starts from the base model exactly.
    pub fn new(cfg: &LoraConfig, model: &impl LinearTargets, rng: &mut ChaCha8Rng) -> Result<Self> {
        cfg.validate()?;
        // The model's device; f32 whatever its compute dtype (master weights).
        let (device, _) = model.placement();
        let device = &device;
        let shapes = model.linear_shapes();
        cfg.check_rank(shapes.iter().map(|(p, s)| (p.as_str(), *s)))?;
        let mut modules = Vec::new();
        for (path, (out, inp)) in shapes {
            if !cfg.targets(&path) {
                continue;
            }
            let bound = 1.0 / (inp as f32).sqrt();
            let down: Vec<f32> = (0..cfg.rank * inp)
                .map(|_| rng.random_range(-bound..bound))
                .collect();
            modules.push(TrainableModule {
                path,
                down: Var::from_tensor(&Tensor::from_vec(down, (cfg.rank, inp), device)?)?,
                up: Var::zeros((out, cfg.rank), DType::F32, device)?,
            });
        }
        if modules.is_empty() {
            return Err(Error::Invalid(
                "[lora] the stacks and modules select no Linear of this model".into(),
            ));
        }
        Ok(Self {
            rank: cfg.rank,
            alpha: cfg.alpha,
            modules,
        })
    }

    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// Every trainable tensor in a fixed order (down, up per module).
    pub fn vars(&self) -> Vec<&Var> {
        self.modules.iter().flat_map(|m| [&m.down, &m.up]).collect()
    }

    /// Names for checkpoint files, aligned with `vars()`.
    pub fn var_names(&self) -> Vec<String> {
        self.modules
            .iter()
            .flat_map(|m| [format!("{}.down", m.path), format!("{}.up", m.path)])
            .collect()
    }

    /// Pushes the pairs onto the model's Linears as the adapter named `TRAINED`.
    pub fn attach(&self, model: &mut impl LinearTargets) -> Result<()> {
        for m in &self.modules {
            let linear = model
                .linear_mut(&m.path)
                .ok_or_else(|| Error::Invalid(format!("model has no Linear {}", m.path)))?;
            linear
                .push_adapter(Adapter {
                    name: TRAINED.into(),
                    weights: AdapterWeights::LowRank {
                        down: m.down.as_tensor().clone(),
                        up: m.up.as_tensor().clone(),
                    },
                    scale: self.scale(),
                    strength: 1.0,
                    enabled: true,
                })
                .map_err(|e| Error::Invalid(format!("{}: {e}", m.path)))?;
        }
        Ok(())
    }

    /// The canonical modules (diffusers path → down, up, scale) for writing a LoRA file.
    pub fn to_modules(&self) -> Result<BTreeMap<String, LoraModule>> {
        self.modules
            .iter()
            .map(|m| {
                let module = LoraModule {
                    weights: AdapterWeights::LowRank {
                        down: m.down.as_tensor().copy()?,
                        up: m.up.as_tensor().copy()?,
                    },
                    scale: self.scale(),
                    source_key: m.path.clone(),
                };
                Ok((m.path.clone(), module))
            })
            .collect()
    }

    /// Overwrites the values from named tensors (a checkpoint), checking names and shapes.
    pub fn load_values(&self, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        for (name, var) in self.var_names().iter().zip(self.vars()) {
            let t = tensors
                .get(name)
                .ok_or_else(|| Error::Invalid(format!("checkpoint lacks LoRA tensor {name}")))?;
            if t.dims() != var.dims() {
                return Err(Error::Invalid(format!(
                    "checkpoint tensor {name} has shape {:?}, expected {:?}",
                    t.dims(),
                    var.dims()
                )));
            }
            var.set(&t.to_dtype(DType::F32)?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// The values by name (for checkpoints).
    pub fn values(&self) -> BTreeMap<String, Tensor> {
        self.var_names()
            .into_iter()
            .zip(self.vars())
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect()
    }
}

/// Switches every adapter with this name on or off (e.g. the training adapter for samples).
pub fn set_enabled(model: &mut impl LinearTargets, name: &str, enabled: bool) {
    for_each_stack(model, |stack| {
        for a in stack.iter_mut().filter(|a| a.name == name) {
            a.enabled = enabled;
        }
    });
}

/// Removes every adapter with this name (e.g. one checkpoint's LoRA before the next one's).
pub fn detach(model: &mut impl LinearTargets, name: &str) {
    for_each_stack(model, |stack| stack.retain(|a| a.name != name));
}

/// Calls `f` on the adapter stack of every Linear of `model`.
fn for_each_stack(model: &mut impl LinearTargets, mut f: impl FnMut(&mut Vec<Adapter>)) {
    let paths: Vec<String> = model.linear_shapes().into_iter().map(|(p, _)| p).collect();
    for p in paths {
        if let Some(l) = model.linear_mut(&p) {
            f(l.adapters_mut());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_match_stack_index_and_module() {
        let cfg = LoraConfig {
            rank: 4,
            alpha: 4.0,
            stacks: default_stacks(),
            modules: default_modules(),
        };
        assert!(cfg.targets("layers.3.attention.to_q"));
        assert!(cfg.targets("layers.0.attention.to_out.0"));
        assert!(!cfg.targets("noise_refiner.0.attention.to_q"));
        assert!(!cfg.targets("layers.3.adaLN_modulation.0"));
        assert!(!cfg.targets("t_embedder.mlp.0"));
    }

    #[test]
    fn unknown_names_are_rejected() {
        let mut cfg = LoraConfig {
            rank: 4,
            alpha: 4.0,
            stacks: default_stacks(),
            modules: default_modules(),
        };
        cfg.modules.push("attention.to_qq".into());
        assert!(cfg.validate().unwrap_err().to_string().contains("to_qq"));
    }
}
