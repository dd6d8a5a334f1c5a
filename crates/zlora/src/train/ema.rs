//! An exponential moving average of the LoRA factors (`[train] ema`), kept in f32 on the
//! device beside them: after every optimizer step, shadow ← decay · shadow + (1 − decay) · p,
//! starting from the initial LoRA (B = 0, so step 0 is the base model, as the raw LoRA).
//! It is saved in each checkpoint (`NAME.ema` in state.safetensors, and `lora.ema.safetensors`
//! beside the raw LoRA) and restored exactly on resume. Samples can be drawn from it.

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};

use super::lora::TrainableLora;
use crate::{Error, Result};

pub struct Ema {
    decay: f64,
    shadow: Vec<Tensor>,
}

impl Ema {
    pub fn new(decay: f64, vars: &[&Var]) -> Result<Self> {
        // Deep copies: Var::set writes into the variable's storage, which a clone shares.
        let shadow = vars
            .iter()
            .map(|v| v.as_tensor().copy())
            .collect::<candle_core::Result<_>>()?;
        Ok(Self { decay, shadow })
    }

    /// Folds in the factors after a step.
    pub fn update(&mut self, vars: &[&Var]) -> Result<()> {
        for (s, v) in self.shadow.iter_mut().zip(vars) {
            *s = ((&*s * self.decay)? + (v.as_tensor() * (1.0 - self.decay))?)?;
        }
        Ok(())
    }

    /// The averages by checkpoint name.
    pub fn state(&self, names: &[String]) -> BTreeMap<String, Tensor> {
        names
            .iter()
            .zip(&self.shadow)
            .map(|(n, t)| (format!("{n}.ema"), t.clone()))
            .collect()
    }

    pub fn load_state(
        &mut self,
        names: &[String],
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        for (n, s) in names.iter().zip(self.shadow.iter_mut()) {
            let saved = tensors
                .get(&format!("{n}.ema"))
                .ok_or_else(|| Error::Invalid(format!("checkpoint lacks the EMA of {n}")))?;
            if saved.dims() != s.dims() {
                return Err(Error::Invalid(format!(
                    "the EMA of {n} has shape {:?}, expected {:?}",
                    saved.dims(),
                    s.dims()
                )));
            }
            *s = saved.to_dtype(s.dtype())?.to_device(s.device())?;
        }
        Ok(())
    }

    /// Runs `f` with the LoRA's factors set to the averages (on the model too: its adapter
    /// shares their storage), then puts the trained factors back, bit for bit, whatever `f`
    /// returned.
    pub fn swapped_in<T>(&self, lora: &TrainableLora, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let vars = lora.vars();
        let raw = vars
            .iter()
            .map(|v| v.as_tensor().copy())
            .collect::<candle_core::Result<Vec<_>>>()?;
        for (v, s) in vars.iter().zip(&self.shadow) {
            v.set(s)?;
        }
        let result = f();
        for (v, r) in vars.iter().zip(&raw) {
            v.set(r)?;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::lora::LoraConfig;
    use candle_core::{DType, Device};

    #[test]
    fn the_average_follows_its_formula() -> Result<()> {
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::new(&[1f32, -2.0], &dev)?)?;
        let mut ema = Ema::new(0.9, &[&var])?;
        var.set(&Tensor::new(&[3f32, 0.0], &dev)?)?;
        ema.update(&[&var])?;
        // 0.9·1 + 0.1·3 = 1.2, 0.9·(−2) + 0.1·0 = −1.8; the initial copy did not follow the set.
        let got = ema.state(&["p".into()])["p.ema"].to_vec1::<f32>()?;
        assert!(
            (got[0] - 1.2).abs() < 1e-6 && (got[1] + 1.8).abs() < 1e-6,
            "{got:?}"
        );
        Ok(())
    }

    /// Inside, the factors are the averages; after, the trained ones again, the same bits;
    /// an average saved and loaded into another is the same.
    #[test]
    fn swapping_in_restores_the_trained_factors_exactly() -> Result<()> {
        use crate::model::tiny::{self, TinySpec};
        use rand::SeedableRng;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("model");
        tiny::create(&root, &TinySpec::default(), false)?;
        let folder = crate::model::folder::ModelFolder::open(root.to_str().unwrap())?;
        let model = folder.load_transformer(None, DType::F32, &Device::Cpu, Default::default())?;
        let cfg: LoraConfig = toml::from_str("rank = 2\nalpha = 2").unwrap();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
        let lora = TrainableLora::new(&cfg, &model, &mut rng)?;
        let mut ema = Ema::new(0.5, &lora.vars())?;
        for v in lora.vars() {
            v.set(&(v.as_tensor() + 1.0)?)?;
        }
        ema.update(&lora.vars())?;
        let before = lora
            .values()
            .into_values()
            .map(|t| t.copy())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let names = lora.var_names();
        let inside = ema.swapped_in(&lora, || {
            let copies = lora.values().into_iter().map(|(n, t)| Ok((n, t.copy()?)));
            copies.collect::<Result<BTreeMap<_, _>>>()
        })?;
        for (n, t) in &inside {
            let want = &ema.state(&names)[&format!("{n}.ema")];
            assert_eq!(
                (t - want)?.abs()?.max_all()?.to_scalar::<f32>()?,
                0.0,
                "{n}"
            );
        }
        for (t, b) in lora.values().values().zip(&before) {
            assert_eq!((t - b)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        }
        let mut other = Ema::new(0.5, &lora.vars())?;
        other.load_state(&names, &ema.state(&names))?;
        for (a, b) in other.shadow.iter().zip(&ema.shadow) {
            assert_eq!((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        }
        Ok(())
    }
}
