//! Device→host reads of the training step. On a GPU every read waits for all queued work, so
//! a step keeps its numbers (loss, gradient norm) on the device and reads them together once,
//! at its end. Every read of the step goes through [`read`], which counts it; a test holds a
//! real step to at most two.

use std::cell::Cell;

use candle_core::{DType, Tensor};

use crate::Result;

thread_local! {
    /// Reads made on this thread (the training loop runs on its caller's thread; counting per
    /// thread keeps tests that run side by side out of each other's counts).
    static READS: Cell<u64> = const { Cell::new(0) };
}

/// The values of `t` as f32 on the host: one device→host transfer.
pub(crate) fn read(t: &Tensor) -> Result<Vec<f32>> {
    READS.with(|r| r.set(r.get() + 1));
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// How many reads this thread has made so far.
#[cfg(test)]
pub(crate) fn reads() -> u64 {
    READS.with(Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::synthetic;
    use crate::model::tiny::{self, TinySpec};
    use crate::train::config::TrainConfig;
    use crate::train::trainer::{train, Event, TrainOptions};

    /// Real steps on the tiny model, with two micro-batches per step (a read per micro-batch
    /// would show) and clipping on (a read per gradient tensor would show: 28 of them), with
    /// each optimizer (Prodigy's d and Adafactor's RMS stay on the device) and an EMA.
    #[test]
    fn a_training_step_reads_from_the_device_at_most_twice() -> Result<()> {
        for optimizer in ["adamw", "adamw8bit", "prodigy", "adafactor"] {
            let per_step = reads_per_step(optimizer)?;
            assert_eq!(per_step.len(), 3);
            assert!(
                per_step.iter().all(|&n| (1..=2).contains(&n)),
                "{optimizer}: device→host reads per step: {per_step:?}"
            );
        }
        Ok(())
    }

    fn reads_per_step(optimizer: &str) -> Result<Vec<u64>> {
        let dir = tempfile::tempdir().unwrap();
        let (model, data) = (dir.path().join("model"), dir.path().join("data"));
        let spec = TinySpec {
            dim: 32,
            ..TinySpec::default()
        };
        tiny::create(&model, &spec, false)?;
        synthetic::create(&data, 4, 64, false)?;
        let cfg = TrainConfig::parse(&format!(
            r#"[model]
path = "{model}"
variant = "turbo"
base_dtype = "f32"
[dataset]
path = "{data}"
resolution = 32
[lora]
rank = 2
alpha = 2
[train]
steps = 3
learning_rate = 1e-3
batch_size = 1
gradient_accumulation = 2
max_grad_norm = 1e-4
save_every = 2
output = "{out}"
optimizer = "{optimizer}"
ema = 0.99
"#,
            model = model.display(),
            data = data.display(),
            out = dir.path().join("out").display(),
        ))?;
        let mut counts = vec![reads()];
        train(&cfg, &TrainOptions::default(), &mut |event| {
            if let Event::Step(_) = event {
                counts.push(reads());
            }
        })?;
        Ok(counts.windows(2).map(|w| w[1] - w[0]).collect())
    }

    /// The step's own modules read only through [`read`] (a raw `to_scalar` would bypass
    /// the count above).
    #[test]
    fn the_step_reads_only_through_the_counter() {
        let sources = [
            ("backprop.rs", include_str!("backprop.rs")),
            ("objective.rs", include_str!("objective.rs")),
            ("optim.rs", include_str!("optim.rs")),
            ("prodigy.rs", include_str!("prodigy.rs")),
            ("adafactor.rs", include_str!("adafactor.rs")),
            ("adamw8bit.rs", include_str!("adamw8bit.rs")),
            ("trainer.rs", include_str!("trainer.rs")),
        ];
        for (file, text) in sources {
            let code = text.split("#[cfg(test)]").next().unwrap_or(text);
            for raw in ["to_scalar", "to_vec0", "to_vec1", "to_vec2", "to_vec3"] {
                assert!(!code.contains(raw), "{file} reads with {raw}");
            }
        }
    }
}
