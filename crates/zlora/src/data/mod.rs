//! Training data: a folder of images and captions, checked as a whole before training
//! (`preflight`), sorted into aspect-ratio `buckets`, encoded once into an on-disk `cache`, and
//! served in a seeded, resumable order (`loader`). See docs/datasets.md.

pub mod buckets;
pub mod cache;
pub mod dataset;
pub mod loader;
pub mod preflight;
pub mod synthetic;

pub use buckets::{Bucket, Buckets};
pub use cache::{CacheOptions, CacheStats, CachedDataset, Stage};
pub use dataset::{
    Dataset, DatasetConfig, DatasetKind, Item, MissingCaption, Resolution, ResolutionMode,
};
pub use loader::{Batch, BatchPlan, Entry, Loader, LoaderOptions, LoaderState, SourceOptions};
pub use preflight::{Preflight, Problem, ProblemKind, Severity};
