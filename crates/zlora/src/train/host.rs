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
    use crate::train::exchange::{Alone, GradientExchange, InProcess};
    use crate::train::trainer::{train_with, Event, TrainOptions};

    /// Real steps on the tiny model, with two micro-batches per step (a read per micro-batch
    /// would show) and clipping on (a read per gradient tensor would show: 28 of them), with
    /// each optimizer (Prodigy's d and Adafactor's RMS stay on the device) and an EMA.
    #[test]
    fn a_training_step_reads_from_the_device_at_most_twice() -> Result<()> {
        for optimizer in ["adamw", "adamw8bit", "prodigy", "adafactor"] {
            let dir = tempfile::tempdir().unwrap();
            let cfg = tiny_run(dir.path(), optimizer, 1)?;
            assert_one_or_two_per_step(&reads_per_step(&cfg, &mut Alone)?, optimizer);
        }
        Ok(())
    }

    /// Each of two data-parallel workers (threads) reads once or twice a step too: the
    /// exchanged losses and stop flag come back in the step's one read. (The in-process
    /// exchange itself goes through the host, where NCCL does not; it reads outside the count.)
    #[test]
    fn a_data_parallel_step_reads_from_the_device_at_most_twice_on_each_worker() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let cfg = tiny_run(dir.path(), "adamw", 2)?;
        let per_worker = std::thread::scope(|scope| {
            let threads: Vec<_> = InProcess::group(2)
                .into_iter()
                .map(|mut exchange| {
                    let cfg = &cfg;
                    scope.spawn(move || reads_per_step(cfg, &mut exchange))
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect::<Result<Vec<_>>>()
        })?;
        for per_step in per_worker {
            assert_one_or_two_per_step(&per_step, "adamw on two workers");
        }
        Ok(())
    }

    fn assert_one_or_two_per_step(per_step: &[u64], what: &str) {
        assert_eq!(per_step.len(), 3);
        assert!(
            per_step.iter().all(|&n| (1..=2).contains(&n)),
            "{what}: device→host reads per step: {per_step:?}"
        );
    }

    /// A tiny model, data and a three-step config with `optimizer` in `dir`.
    fn tiny_run(dir: &std::path::Path, optimizer: &str, batch_size: usize) -> Result<TrainConfig> {
        let (model, data) = (dir.join("model"), dir.join("data"));
        let spec = TinySpec {
            dim: 32,
            ..TinySpec::default()
        };
        tiny::create(&model, &spec, false)?;
        synthetic::create(&data, 4, 64, false)?;
        TrainConfig::parse(&format!(
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
batch_size = {batch_size}
gradient_accumulation = 2
max_grad_norm = 1e-4
save_every = 2
output = "{out}"
optimizer = "{optimizer}"
ema = 0.99
"#,
            model = model.display(),
            data = data.display(),
            out = dir.join("out").display(),
        ))
    }

    fn reads_per_step(cfg: &TrainConfig, exchange: &mut dyn GradientExchange) -> Result<Vec<u64>> {
        let mut counts = vec![reads()];
        train_with(cfg, &TrainOptions::default(), exchange, &mut |event| {
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
