//! The training order: each epoch is every training image `repeats` times (at each of its
//! resolutions, or at one drawn per epoch), plus the regularization items mixed in at their
//! ratio, shuffled by a seeded RNG, then cut into batches of one bucket each (one latent size
//! per batch; captions may differ in length, the transformer takes them per item). Caption
//! dropout is drawn from the same seeded stream.
//!
//! Epoch `e` uses ChaCha8 seeded with the run's seed on stream `e` for the shuffle and the
//! dropout, and on stream `e + 2⁶³` for the draws of resolutions and regularization items, so
//! any epoch's plan is computed directly from (seed, e): `LoaderState { epoch, cursor }` is
//! all a checkpoint needs to continue with exactly the batches an uninterrupted run would
//! have seen. (A single dataset at a single resolution draws nothing from the second stream,
//! so its order is the one of the loader before these features.)

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::buckets::Bucket;
use super::cache::CachedDataset;
use super::dataset::{DatasetConfig, DatasetKind, ResolutionMode};
use crate::{Error, Result};

/// Where the loader is: the next batch is batch `cursor` of epoch `epoch`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct LoaderState {
    pub epoch: u64,
    pub cursor: usize,
}

/// How one dataset's items enter the epochs.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceOptions {
    pub repeats: usize,
    pub caption_dropout: f64,
    /// None for a training set; a regularization set's items per epoch per training item.
    pub regularization_ratio: Option<f64>,
    pub resolution_mode: ResolutionMode,
}

impl SourceOptions {
    pub fn new(dataset: &DatasetConfig) -> Self {
        Self {
            repeats: dataset.repeats,
            caption_dropout: dataset.caption_dropout,
            regularization_ratio: (dataset.kind == DatasetKind::Regularization)
                .then(|| dataset.regularization_ratio()),
            resolution_mode: dataset.resolution_mode,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoaderOptions {
    pub batch_size: usize,
    pub seed: u64,
    /// One per dataset, in the order of `Entry::source`.
    pub sources: Vec<SourceOptions>,
}

impl LoaderOptions {
    /// Repeats, caption dropout, kind and resolution mode from each `[dataset]`, batch size
    /// and seed from `[train]`.
    pub fn new(datasets: &[DatasetConfig], batch_size: usize, seed: u64) -> Self {
        Self {
            batch_size,
            seed,
            sources: datasets.iter().map(SourceOptions::new).collect(),
        }
    }
}

/// One item the loader orders: its bucket, its dataset and its image (an image's items at
/// several resolutions share the image number).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub bucket: Bucket,
    pub source: usize,
    pub image: usize,
}

/// Which items make one batch, and which of them train on the empty caption.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchPlan {
    pub bucket: Bucket,
    pub indices: Vec<usize>,
    pub drop_caption: Vec<bool>,
}

impl BatchPlan {
    /// The plan's items `range` (a data-parallel worker's share of a global batch).
    pub fn share(&self, range: std::ops::Range<usize>) -> BatchPlan {
        BatchPlan {
            bucket: self.bucket,
            indices: self.indices[range.clone()].to_vec(),
            drop_caption: self.drop_caption[range].to_vec(),
        }
    }

    /// The batch, read from the cache onto `device`.
    pub fn load(self, data: &CachedDataset, device: &Device) -> Result<Batch> {
        let latents = self
            .indices
            .iter()
            .map(|&i| data.latent(i, device))
            .collect::<Result<Vec<_>>>()?;
        let captions = self
            .indices
            .iter()
            .zip(&self.drop_caption)
            .map(|(&i, &drop)| match drop {
                true => Ok(data.empty_caption().to_device(device)?),
                false => data.caption(i, device),
            })
            .collect::<Result<Vec<_>>>()?;
        let latents = Tensor::stack(&latents, 0)?;
        Ok(Batch {
            masks: batch_masks(data, &self.indices, &latents, device)?,
            latents,
            captions,
            indices: self.indices,
            drop_caption: self.drop_caption,
        })
    }
}

/// One training batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// (B, 16, h, w) in the transformer's latent space, f32.
    pub latents: Tensor,
    /// (B, 1, h, w) loss masks, ones for an item without one; None when no item has one.
    pub masks: Option<Tensor>,
    /// One (L_i, hidden) f32 tensor per item; the empty caption's where dropped.
    pub captions: Vec<Tensor>,
    pub indices: Vec<usize>,
    pub drop_caption: Vec<bool>,
}

pub struct Loader {
    opts: LoaderOptions,
    entries: Vec<Entry>,
    /// Per image (in first-appearance order): its dataset and its entries.
    images: Vec<(usize, Vec<usize>)>,
    state: LoaderState,
    plan: Vec<BatchPlan>,
}

impl Loader {
    /// A loader over the given items, positioned at `state` (`LoaderState::default()` for a
    /// new run).
    pub fn new(entries: Vec<Entry>, opts: LoaderOptions, state: LoaderState) -> Result<Self> {
        check(&entries, &opts)?;
        let mut images: Vec<(usize, Vec<usize>)> = Vec::new();
        let mut index: BTreeMap<usize, usize> = BTreeMap::new();
        for (i, e) in entries.iter().enumerate() {
            let at = *index.entry(e.image).or_insert_with(|| {
                images.push((e.source, Vec::new()));
                images.len() - 1
            });
            images[at].1.push(i);
        }
        let mut loader = Self {
            opts,
            entries,
            images,
            state,
            plan: Vec::new(),
        };
        loader.plan = loader.epoch_plan(state.epoch);
        if state.cursor > loader.plan.len() {
            return Err(Error::Invalid(format!(
                "the saved data order is at batch {} of an epoch that now has {}: the dataset \
                 changed since the checkpoint",
                state.cursor,
                loader.plan.len()
            )));
        }
        Ok(loader)
    }

    /// A loader over a cached dataset's items.
    pub fn for_cached(
        data: &CachedDataset,
        opts: LoaderOptions,
        state: LoaderState,
    ) -> Result<Self> {
        let entries = data
            .items()
            .iter()
            .map(|i| Entry {
                bucket: i.bucket,
                source: i.source,
                image: i.image,
            })
            .collect();
        Self::new(entries, opts, state)
    }

    /// The state to save in a checkpoint: resuming from it yields the batches that follow.
    pub fn state(&self) -> LoaderState {
        self.state
    }

    /// Batches in the current epoch (with `resolution_mode = "random"` epochs differ).
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
            self.plan = self.epoch_plan(self.state.epoch);
        }
        let plan = self.plan[self.state.cursor].clone();
        self.state.cursor += 1;
        plan
    }

    /// The next batch, read from the cache onto `device`.
    pub fn next_batch(&mut self, data: &CachedDataset, device: &Device) -> Result<Batch> {
        self.next_plan().load(data, device)
    }
    /// Epoch `epoch`'s batches. Batches are emitted as soon as they fill, walking the
    /// shuffled order, so bucket order is as random as item order; unfilled batches close the
    /// epoch rather than being dropped, so every image is seen every epoch.
    fn epoch_plan(&self, epoch: u64) -> Vec<BatchPlan> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.opts.seed);
        rng.set_stream(epoch);
        let mut draws = ChaCha8Rng::seed_from_u64(self.opts.seed);
        draws.set_stream(epoch | 1 << 63);
        let mut order = self.pool(None, &mut draws);
        let trained = order.len();
        for (source, o) in self.opts.sources.iter().enumerate() {
            if let Some(ratio) = o.regularization_ratio {
                let want = (ratio * trained as f64).round() as usize;
                order.extend(cycle(self.pool(Some(source), &mut draws), want, &mut draws));
            }
        }
        order.shuffle(&mut rng);
        let dropout = |i: usize| self.opts.sources[self.entries[i].source].caption_dropout;
        fill_batches(&order, &self.entries, self.opts.batch_size)
            .into_iter()
            .map(|(bucket, indices)| {
                let drop_caption = indices
                    .iter()
                    .map(|&i| rng.random::<f64>() < dropout(i))
                    .collect();
                BatchPlan {
                    bucket,
                    indices,
                    drop_caption,
                }
            })
            .collect()
    }

    /// The entries of one epoch's pass over the training sets (`None`) or over one
    /// regularization set: each image `repeats` times, at every resolution or at one drawn.
    fn pool(&self, regularization: Option<usize>, draws: &mut ChaCha8Rng) -> Vec<usize> {
        let mut pool = Vec::new();
        for (source, variants) in &self.images {
            let o = &self.opts.sources[*source];
            let wanted = match regularization {
                None => o.regularization_ratio.is_none(),
                Some(r) => r == *source,
            };
            if !wanted {
                continue;
            }
            for _ in 0..o.repeats {
                match o.resolution_mode {
                    ResolutionMode::Random if variants.len() > 1 => {
                        pool.push(variants[draws.random_range(0..variants.len())])
                    }
                    _ => pool.extend_from_slice(variants),
                }
            }
        }
        pool
    }
}

/// The loader's inputs are consistent: items to train, options in range.
fn check(entries: &[Entry], opts: &LoaderOptions) -> Result<()> {
    let trains = |e: &Entry| {
        opts.sources
            .get(e.source)
            .is_some_and(|s| s.regularization_ratio.is_none())
    };
    if entries.iter().any(|e| e.source >= opts.sources.len()) {
        return Err(Error::Invalid(
            "an item names a dataset the loader has no options for".into(),
        ));
    }
    if !entries.iter().any(trains) {
        return Err(Error::Invalid("the dataset has no items to train".into()));
    }
    if opts.batch_size == 0 || opts.sources.iter().any(|s| s.repeats == 0) {
        return Err(Error::Invalid(
            "batch size and repeats must be at least 1".into(),
        ));
    }
    if let Some(s) = opts
        .sources
        .iter()
        .find(|s| !(0.0..1.0).contains(&s.caption_dropout))
    {
        return Err(Error::Invalid(format!(
            "caption dropout must be in [0, 1), got {}",
            s.caption_dropout
        )));
    }
    Ok(())
}

/// `want` entries from `pool`, walking it in a fresh shuffle each time it runs out, so every
/// item is used as evenly as the count allows.
fn cycle(pool: Vec<usize>, want: usize, draws: &mut ChaCha8Rng) -> Vec<usize> {
    let mut out = Vec::with_capacity(want);
    while !pool.is_empty() && out.len() < want {
        let mut round = pool.clone();
        round.shuffle(draws);
        round.truncate(want - out.len());
        out.extend(round);
    }
    out
}

/// Cuts the shuffled order into batches of one bucket, each emitted when it fills; the
/// unfilled ones follow in the order of their first item.
fn fill_batches(
    order: &[usize],
    entries: &[Entry],
    batch_size: usize,
) -> Vec<(Bucket, Vec<usize>)> {
    let mut batches = Vec::new();
    // Per bucket: the position of its first waiting item (for the order of leftovers) and
    // the items waiting.
    let mut open: BTreeMap<Bucket, (usize, Vec<usize>)> = BTreeMap::new();
    for (pos, &i) in order.iter().enumerate() {
        let bucket = entries[i].bucket;
        let waiting = open.entry(bucket).or_insert_with(|| (pos, Vec::new()));
        waiting.1.push(i);
        if waiting.1.len() == batch_size {
            if let Some((_, indices)) = open.remove(&bucket) {
                batches.push((bucket, indices));
            }
        }
    }
    let mut leftovers: Vec<_> = open.into_iter().collect();
    leftovers.sort_by_key(|(_, (first, _))| *first);
    batches.extend(leftovers.into_iter().map(|(b, (_, indices))| (b, indices)));
    batches
}

/// The batch's masks as (B, 1, h, w), ones for the items without one; None when none has one.
fn batch_masks(
    data: &CachedDataset,
    indices: &[usize],
    latents: &Tensor,
    device: &Device,
) -> Result<Option<Tensor>> {
    let masks = indices
        .iter()
        .map(|&i| data.mask(i, device))
        .collect::<Result<Vec<_>>>()?;
    if masks.iter().all(Option::is_none) {
        return Ok(None);
    }
    let (_, _, h, w) = latents.dims4()?;
    let ones = Tensor::ones((h, w), candle_core::DType::F32, device)?;
    let masks: Vec<Tensor> = masks
        .into_iter()
        .map(|m| m.unwrap_or_else(|| ones.clone()))
        .collect();
    Ok(Some(Tensor::stack(&masks, 0)?.unsqueeze(1)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SQUARE: Bucket = Bucket {
        width: 64,
        height: 64,
    };
    const WIDE: Bucket = Bucket {
        width: 96,
        height: 40,
    };

    /// 11 images of one training set, every third wide.
    fn buckets() -> Vec<Entry> {
        (0..11)
            .map(|i| Entry {
                bucket: if i % 3 == 0 { WIDE } else { SQUARE },
                source: 0,
                image: i,
            })
            .collect()
    }

    fn source(repeats: usize, caption_dropout: f64) -> SourceOptions {
        SourceOptions {
            repeats,
            caption_dropout,
            regularization_ratio: None,
            resolution_mode: ResolutionMode::All,
        }
    }

    fn opts(batch_size: usize) -> LoaderOptions {
        LoaderOptions {
            batch_size,
            seed: 7,
            sources: vec![source(2, 0.3)],
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
                assert_eq!(b[i].bucket, plan.bucket, "one bucket per batch");
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
            sources: vec![source(2, 0.0)],
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

    /// 4 training images at two resolutions (entries 2i, 2i+1) and 3 regularization images
    /// at one (entries 8..11).
    fn two_sets(mode: ResolutionMode, ratio: f64) -> (Vec<Entry>, LoaderOptions) {
        let mut entries: Vec<Entry> = (0..8)
            .map(|i| Entry {
                bucket: if i % 2 == 0 { SQUARE } else { WIDE },
                source: 0,
                image: i / 2,
            })
            .collect();
        entries.extend((0..3).map(|i| Entry {
            bucket: SQUARE,
            source: 1,
            image: 4 + i,
        }));
        let train = SourceOptions {
            resolution_mode: mode,
            ..source(1, 0.0)
        };
        let reg = SourceOptions {
            regularization_ratio: Some(ratio),
            ..source(1, 0.0)
        };
        let opts = LoaderOptions {
            batch_size: 2,
            seed: 3,
            sources: vec![train, reg],
        };
        (entries, opts)
    }

    fn counts(plans: &[BatchPlan], n: usize) -> Vec<usize> {
        let mut seen = vec![0; n];
        for i in plans.iter().flat_map(|p| &p.indices) {
            seen[*i] += 1;
        }
        seen
    }

    #[test]
    fn regularization_items_are_mixed_in_at_their_ratio() -> Result<()> {
        let (entries, opts) = two_sets(ResolutionMode::All, 1.5);
        let loader = Loader::new(entries.clone(), opts, LoaderState::default())?;
        for e in 0..3 {
            let seen = counts(&loader.epoch_plan(e), entries.len());
            assert_eq!(seen[..8], [1; 8], "each training image at each size");
            // 8 training items at ratio 1.5: 12 regularization items from 3 images, 4 each.
            assert_eq!(seen[8..], [4, 4, 4], "{seen:?}");
        }
        let mixed = loader
            .epoch_plan(1)
            .iter()
            .any(|p| p.indices.iter().any(|&i| i < 8) && p.indices.iter().any(|&i| i >= 8));
        assert!(mixed, "training and regularization items share batches");
        Ok(())
    }

    #[test]
    fn random_resolution_takes_each_image_once_per_epoch_at_a_drawn_size() -> Result<()> {
        let (entries, opts) = two_sets(ResolutionMode::Random, 0.5);
        let loader = Loader::new(entries.clone(), opts, LoaderState::default())?;
        let mut sizes = std::collections::BTreeSet::new();
        for e in 0..20 {
            let epoch = loader.epoch_plan(e);
            let seen = counts(&epoch, entries.len());
            for image in 0..4 {
                assert_eq!(seen[2 * image] + seen[2 * image + 1], 1, "{seen:?}");
                sizes.insert((image, seen[2 * image]));
            }
            assert_eq!(
                seen[8..].iter().sum::<usize>(),
                2,
                "4 × 0.5 regularization items"
            );
        }
        assert_eq!(
            sizes.len(),
            8,
            "every image was drawn at both sizes over twenty epochs"
        );
        Ok(())
    }

    #[test]
    fn two_datasets_resume_exactly_across_epochs() -> Result<()> {
        for mode in [ResolutionMode::All, ResolutionMode::Random] {
            let (entries, opts) = two_sets(mode, 0.75);
            let new = |state| Loader::new(entries.clone(), opts.clone(), state);
            let whole = take(&mut new(LoaderState::default())?, 40);
            for k in [1, 6, 7, 13, 29] {
                let mut first = new(LoaderState::default())?;
                take(&mut first, k);
                let mut resumed = new(first.state())?;
                assert_eq!(take(&mut resumed, 40 - k), whole[k..], "{mode:?} after {k}");
            }
        }
        Ok(())
    }

    #[test]
    fn a_loader_without_training_items_is_refused() {
        let (entries, opts) = two_sets(ResolutionMode::All, 1.0);
        let reg_only: Vec<Entry> = entries.into_iter().filter(|e| e.source == 1).collect();
        let err = Loader::new(reg_only, opts, LoaderState::default()).err();
        assert!(err.is_some_and(|e| e.to_string().contains("no items to train")));
    }
}
