//! The training order: each epoch is every item `repeats` times, shuffled by a seeded RNG,
//! then cut into batches of one bucket each (one latent size per batch; captions may differ
//! in length, the transformer takes them per item). Caption dropout is drawn from the same
//! seeded stream.
//!
//! Epoch `e` uses ChaCha8 seeded with the run's seed on stream `e`, so any epoch's plan is
//! computed directly from (seed, e): `LoaderState { epoch, cursor }` is all a checkpoint needs
//! to continue with exactly the batches an uninterrupted run would have seen.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::buckets::Bucket;
use super::cache::CachedDataset;
use super::dataset::DatasetConfig;
use crate::{Error, Result};

/// Where the loader is: the next batch is batch `cursor` of epoch `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LoaderState {
    pub epoch: u64,
    pub cursor: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoaderOptions {
    pub batch_size: usize,
    pub repeats: usize,
    pub caption_dropout: f64,
    pub seed: u64,
}

impl LoaderOptions {
    /// Repeats and caption dropout from `[dataset]`, batch size and seed from `[train]`.
    pub fn new(dataset: &DatasetConfig, batch_size: usize, seed: u64) -> Self {
        Self {
            batch_size,
            repeats: dataset.repeats,
            caption_dropout: dataset.caption_dropout,
            seed,
        }
    }
}

/// Which items make one batch, and which of them train on the empty caption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPlan {
    pub bucket: Bucket,
    pub indices: Vec<usize>,
    pub drop_caption: Vec<bool>,
}

/// One training batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// (B, 16, h, w) in the transformer's latent space, f32.
    pub latents: Tensor,
    /// One (L_i, hidden) f32 tensor per item; the empty caption's where dropped.
    pub captions: Vec<Tensor>,
    pub indices: Vec<usize>,
    pub drop_caption: Vec<bool>,
}

pub struct Loader {
    opts: LoaderOptions,
    buckets: Vec<Bucket>,
    state: LoaderState,
    plan: Vec<BatchPlan>,
}

impl Loader {
    /// A loader over items with the given buckets (one per item), positioned at `state`
    /// (`LoaderState::default()` for a new run).
    pub fn new(buckets: Vec<Bucket>, opts: LoaderOptions, state: LoaderState) -> Result<Self> {
        if buckets.is_empty() {
            return Err(Error::Invalid("the dataset has no items to train".into()));
        }
        if opts.batch_size == 0 || opts.repeats == 0 {
            return Err(Error::Invalid(
                "batch size and repeats must be at least 1".into(),
            ));
        }
        if !(0.0..1.0).contains(&opts.caption_dropout) {
            return Err(Error::Invalid(format!(
                "caption dropout must be in [0, 1), got {}",
                opts.caption_dropout
            )));
        }
        let plan = epoch_plan(&buckets, &opts, state.epoch);
        if state.cursor > plan.len() {
            return Err(Error::Invalid(format!(
                "the saved data order is at batch {} of an epoch that now has {}: the dataset \
                 changed since the checkpoint",
                state.cursor,
                plan.len()
            )));
        }
        Ok(Self {
            opts,
            buckets,
            state,
            plan,
        })
    }

    /// A loader over a cached dataset's items.
    pub fn for_cached(
        data: &CachedDataset,
        opts: LoaderOptions,
        state: LoaderState,
    ) -> Result<Self> {
        Self::new(data.items().iter().map(|i| i.bucket).collect(), opts, state)
    }

    /// The state to save in a checkpoint: resuming from it yields the batches that follow.
    pub fn state(&self) -> LoaderState {
        self.state
    }

    pub fn batches_per_epoch(&self) -> usize {
        self.plan.len()
    }

    /// The next batch's plan, moving to a new epoch when this one is done.
    pub fn next_plan(&mut self) -> BatchPlan {
        if self.state.cursor >= self.plan.len() {
            self.state = LoaderState {
                epoch: self.state.epoch + 1,
                cursor: 0,
            };
            self.plan = epoch_plan(&self.buckets, &self.opts, self.state.epoch);
        }
        let plan = self.plan[self.state.cursor].clone();
        self.state.cursor += 1;
        plan
    }

    /// The next batch, read from the cache onto `device`.
    pub fn next_batch(&mut self, data: &CachedDataset, device: &Device) -> Result<Batch> {
        let plan = self.next_plan();
        let latents = plan
            .indices
            .iter()
            .map(|&i| data.latent(i, device))
            .collect::<Result<Vec<_>>>()?;
        let captions = plan
            .indices
            .iter()
            .zip(&plan.drop_caption)
            .map(|(&i, &drop)| match drop {
                true => Ok(data.empty_caption().to_device(device)?),
                false => data.caption(i, device),
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Batch {
            latents: Tensor::stack(&latents, 0)?,
            captions,
            indices: plan.indices,
            drop_caption: plan.drop_caption,
        })
    }
}

/// Epoch `epoch`'s batches. Batches are emitted as soon as they fill, walking the shuffled
/// order, so bucket order is as random as item order; unfilled batches close the epoch
/// rather than being dropped, so every image is seen every epoch.
fn epoch_plan(buckets: &[Bucket], opts: &LoaderOptions, epoch: u64) -> Vec<BatchPlan> {
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed);
    rng.set_stream(epoch);
    let mut order: Vec<usize> = (0..buckets.len())
        .flat_map(|i| std::iter::repeat_n(i, opts.repeats))
        .collect();
    order.shuffle(&mut rng);

    let mut batches = Vec::new();
    // Per bucket: the position of its first waiting item (for the order of leftovers) and
    // the items waiting.
    let mut open: BTreeMap<Bucket, (usize, Vec<usize>)> = BTreeMap::new();
    for (pos, &i) in order.iter().enumerate() {
        let bucket = buckets[i];
        let waiting = open.entry(bucket).or_insert_with(|| (pos, Vec::new()));
        waiting.1.push(i);
        if waiting.1.len() == opts.batch_size {
            if let Some((_, indices)) = open.remove(&bucket) {
                batches.push((bucket, indices));
            }
        }
    }
    let mut leftovers: Vec<_> = open.into_iter().collect();
    leftovers.sort_by_key(|(_, (first, _))| *first);
    batches.extend(leftovers.into_iter().map(|(b, (_, indices))| (b, indices)));

    batches
        .into_iter()
        .map(|(bucket, indices)| {
            let drop_caption = indices
                .iter()
                .map(|_| rng.random::<f64>() < opts.caption_dropout)
                .collect();
            BatchPlan {
                bucket,
                indices,
                drop_caption,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn buckets() -> Vec<Bucket> {
        let square = Bucket {
            width: 64,
            height: 64,
        };
        let wide = Bucket {
            width: 96,
            height: 40,
        };
        (0..11)
            .map(|i| if i % 3 == 0 { wide } else { square })
            .collect()
    }

    fn opts(batch_size: usize) -> LoaderOptions {
        LoaderOptions {
            batch_size,
            repeats: 2,
            caption_dropout: 0.3,
            seed: 7,
        }
    }

    fn take(loader: &mut Loader, n: usize) -> Vec<BatchPlan> {
        (0..n).map(|_| loader.next_plan()).collect()
    }

    #[test]
    fn every_item_appears_repeats_times_per_epoch_in_one_bucket_batches() -> Result<()> {
        let b = buckets();
        let mut loader = Loader::new(b.clone(), opts(3), LoaderState::default())?;
        let per_epoch = loader.batches_per_epoch();
        let epoch = take(&mut loader, per_epoch);
        let mut seen = vec![0; b.len()];
        for plan in &epoch {
            assert!(!plan.indices.is_empty() && plan.indices.len() <= 3);
            assert_eq!(plan.indices.len(), plan.drop_caption.len());
            for &i in &plan.indices {
                assert_eq!(b[i], plan.bucket, "one bucket per batch");
                seen[i] += 1;
            }
        }
        assert!(seen.iter().all(|&n| n == 2), "{seen:?}");
        assert_eq!(loader.state().epoch, 0);
        loader.next_plan();
        assert_eq!(
            loader.state(),
            LoaderState {
                epoch: 1,
                cursor: 1
            }
        );
        Ok(())
    }

    #[test]
    fn same_seed_same_order_other_seed_or_epoch_differs() -> Result<()> {
        let a = take(
            &mut Loader::new(buckets(), opts(2), LoaderState::default())?,
            30,
        );
        let b = take(
            &mut Loader::new(buckets(), opts(2), LoaderState::default())?,
            30,
        );
        assert_eq!(a, b);
        let other = LoaderOptions { seed: 8, ..opts(2) };
        let c = take(
            &mut Loader::new(buckets(), other, LoaderState::default())?,
            30,
        );
        assert_ne!(a, c);
        let per_epoch =
            Loader::new(buckets(), opts(2), LoaderState::default())?.batches_per_epoch();
        assert_ne!(
            a[..per_epoch],
            a[per_epoch..2 * per_epoch],
            "epochs reshuffle"
        );
        Ok(())
    }

    #[test]
    fn resuming_from_a_saved_state_continues_exactly() -> Result<()> {
        let whole = take(
            &mut Loader::new(buckets(), opts(2), LoaderState::default())?,
            40,
        );
        for k in [0, 1, 5, 9, 10, 11, 23] {
            let mut first = Loader::new(buckets(), opts(2), LoaderState::default())?;
            take(&mut first, k);
            let saved =
                serde_json::to_string(&first.state()).map_err(|e| Error::Invalid(e.to_string()))?;
            let state: LoaderState =
                serde_json::from_str(&saved).map_err(|e| Error::Invalid(e.to_string()))?;
            let mut resumed = Loader::new(buckets(), opts(2), state)?;
            assert_eq!(
                take(&mut resumed, 40 - k),
                whole[k..],
                "resumed after {k} batches"
            );
        }
        Ok(())
    }

    #[test]
    fn caption_dropout_rate_is_about_right() -> Result<()> {
        let mut loader = Loader::new(buckets(), opts(1), LoaderState::default())?;
        let plans = take(&mut loader, 2000);
        let dropped = plans.iter().filter(|p| p.drop_caption[0]).count() as f64 / 2000.0;
        assert!((dropped - 0.3).abs() < 0.05, "{dropped}");
        let none = LoaderOptions {
            caption_dropout: 0.0,
            ..opts(1)
        };
        let mut loader = Loader::new(buckets(), none, LoaderState::default())?;
        assert!(take(&mut loader, 100).iter().all(|p| !p.drop_caption[0]));
        Ok(())
    }

    #[test]
    fn a_cursor_past_the_epoch_is_refused() {
        let state = LoaderState {
            epoch: 3,
            cursor: 1000,
        };
        assert!(Loader::new(buckets(), opts(2), state).is_err());
    }
}
