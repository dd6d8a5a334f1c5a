//! The latent / caption-feature cache over the tiny model, and the loader that reads it.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::{DynamicImage, ImageFormat, RgbImage};
use zlora::data::cache::image_tensor;
use zlora::data::dataset::open_image;
use zlora::data::{
    Buckets, CacheOptions, CacheStats, CachedDataset, Dataset, DatasetConfig, Loader,
    LoaderOptions, LoaderState, Stage,
};
use zlora::model::folder::ModelFolder;
use zlora::model::text::PromptTokenizer;

fn model() -> ModelFolder {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/tiny/model");
    ModelFolder::open(path).expect("tiny model")
}

fn tokenizer() -> PromptTokenizer {
    PromptTokenizer::from_file(&model().root().join("tokenizer/tokenizer.json")).expect("tokenizer")
}

fn image(w: u32, h: u32, seed: u32) -> DynamicImage {
    DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            (x * 7 + seed) as u8,
            (y * 5) as u8,
            ((x + y) * 3 + seed) as u8,
        ])
    }))
}

fn save_image(dir: &Path, name: &str, w: u32, h: u32, seed: u32) {
    image(w, h, seed)
        .save_with_format(dir.join(name), ImageFormat::Png)
        .expect(name);
}

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect(name);
}

/// Five images in two aspect ratios; two of them share a caption.
fn folder(dir: &Path) {
    save_image(dir, "a.png", 64, 64, 0);
    save_image(dir, "b.png", 96, 48, 10);
    save_image(dir, "c.png", 64, 64, 20);
    save_image(dir, "d.png", 96, 48, 30);
    save_image(dir, "e.png", 80, 80, 40);
    write(dir, "a.txt", "a photo of a cat");
    write(
        dir,
        "b.txt",
        "a wide landscape with hills and a long winding river",
    );
    write(dir, "c.txt", "cat");
    write(dir, "d.txt", "a photo of a cat");
    write(
        dir,
        "e.txt",
        "a much longer caption so that caption lengths differ in a batch",
    );
}

struct Run {
    dataset: Dataset,
    cached: CachedDataset,
    stats: CacheStats,
    progress: Vec<(Stage, usize, usize)>,
}

fn build(data: &Path, cache: &Path) -> Run {
    build_with_class(data, cache, None)
}

/// With `class`, preservation's class captions (the trigger replaced by it) are cached too.
fn build_with_class(data: &Path, cache: &Path, class: Option<&str>) -> Run {
    let cfg = DatasetConfig {
        resolution: 64,
        trigger: Some("zkchar".into()),
        ..DatasetConfig::new(data)
    };
    let model = model();
    let buckets = Buckets::for_vae(64, 4).expect("buckets");
    let (dataset, report) = Dataset::scan(&cfg, &buckets, &tokenizer()).expect("scan");
    assert!(!report.is_fatal(), "{report}");
    let opts = CacheOptions {
        dir: cache.to_path_buf(),
        dtype: DType::F32,
        device: Device::Cpu,
        class_captions: class.map_or_else(Vec::new, |class| {
            let items = dataset.items().iter();
            items
                .map(|i| {
                    cfg.caption_with_class(&i.caption, class)
                        .expect("a trigger")
                })
                .collect()
        }),
    };
    let mut progress = Vec::new();
    let (cached, stats) = CachedDataset::build(&dataset, &model, &opts, |s, done, total| {
        progress.push((s, done, total))
    })
    .expect("cache");
    Run {
        dataset,
        cached,
        stats,
        progress,
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b)
        .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
        .expect("diff")
}

fn stats(
    captions_encoded: usize,
    captions_reused: usize,
    latents_encoded: usize,
    latents_reused: usize,
) -> CacheStats {
    CacheStats {
        captions_encoded,
        captions_reused,
        latents_encoded,
        latents_reused,
    }
}

#[test]
fn unchanged_files_are_reused_and_edited_ones_re_encoded() {
    let data = tempfile::tempdir().expect("tempdir");
    let cache = tempfile::tempdir().expect("tempdir");
    folder(data.path());

    // Four distinct captions plus the empty one; five images.
    let first = build(data.path(), cache.path());
    assert_eq!(first.stats, stats(5, 0, 5, 0));
    let captions: Vec<_> = first
        .progress
        .iter()
        .filter(|p| p.0 == Stage::Captions)
        .collect();
    assert_eq!(captions.last().map(|p| (p.1, p.2)), Some((5, 5)));
    assert_eq!(first.progress.len(), 10, "one report per encode");

    let second = build(data.path(), cache.path());
    assert_eq!(second.stats, stats(0, 5, 0, 5));
    assert!(
        second.progress.is_empty(),
        "nothing encoded, no model loaded"
    );
    assert_eq!(second.cached.items(), first.cached.items());

    write(data.path(), "c.txt", "a black cat");
    let edited_caption = build(data.path(), cache.path());
    assert_eq!(edited_caption.stats, stats(1, 4, 0, 5));

    save_image(data.path(), "a.png", 64, 64, 99);
    let edited_image = build(data.path(), cache.path());
    assert_eq!(edited_image.stats, stats(0, 5, 1, 4));

    // A damaged entry is found at build time and re-encoded, not read mid-training.
    let entry = &edited_image.cached.items()[1].latent;
    let bytes = std::fs::read(entry).expect("entry");
    std::fs::write(entry, &bytes[..bytes.len() - 10]).expect("truncate");
    let repaired = build(data.path(), cache.path());
    assert_eq!(repaired.stats, stats(0, 5, 1, 4));
}

#[test]
fn cached_entries_equal_direct_encodes() {
    let data = tempfile::tempdir().expect("tempdir");
    let cache = tempfile::tempdir().expect("tempdir");
    folder(data.path());
    let run = build(data.path(), cache.path());
    let model = model();
    let cpu = Device::Cpu;

    let vae = model.load_vae(DType::F32, &cpu).expect("vae");
    for (i, item) in run.dataset.items().iter().enumerate() {
        let x = image_tensor(&open_image(&item.image).expect("image"), item.bucket, &cpu)
            .expect("tensor");
        let direct = vae
            .encode(&x)
            .and_then(|z| vae.to_transformer_space(&z))
            .and_then(|z| Ok(z.squeeze(0)?))
            .expect("encode");
        let cached = run.cached.latent(i, &cpu).expect("latent");
        let (h, w) = (
            item.bucket.height as usize / 4,
            item.bucket.width as usize / 4,
        );
        assert_eq!(cached.dims(), [16, h, w]);
        assert!(
            max_diff(&cached, &direct) < 1e-6,
            "latent of {}",
            item.image.display()
        );
    }

    let encoder = model
        .load_prompt_encoder(DType::F32, &cpu)
        .expect("encoder");
    for (i, item) in run.dataset.items().iter().enumerate() {
        let direct = encoder.encode(&[&item.caption]).expect("encode").remove(0);
        let cached = run.cached.caption(i, &cpu).expect("caption");
        assert!(
            max_diff(&cached, &direct) < 1e-6,
            "caption {:?}",
            item.caption
        );
    }
    let empty = encoder.encode(&[""]).expect("encode").remove(0);
    assert!(max_diff(run.cached.empty_caption(), &empty) < 1e-6);
}

/// Preservation's class captions are cached with the others, keyed by their text: each is
/// encoded once (two items share one), reused by the next build, and reads back as the
/// direct encode of its text; a cache built without them says so when asked for one.
#[test]
fn class_captions_are_cached_by_their_text() {
    let data = tempfile::tempdir().expect("tempdir");
    let cache = tempfile::tempdir().expect("tempdir");
    folder(data.path());
    let plain = build(data.path(), cache.path());
    let e = plain.cached.class_caption(0, &Device::Cpu).unwrap_err();
    assert!(e.to_string().contains("[train] preservation"), "{e}");

    // "zkchar, a photo of a cat" → "cat, a photo of a cat": four new distinct texts.
    let first = build_with_class(data.path(), cache.path(), Some("cat"));
    assert_eq!(first.stats, stats(4, 5, 0, 5));
    let again = build_with_class(data.path(), cache.path(), Some("cat"));
    assert_eq!(again.stats, stats(0, 9, 0, 5));
    let encoder = model()
        .load_prompt_encoder(DType::F32, &Device::Cpu)
        .expect("encoder");
    for (i, item) in first.dataset.items().iter().enumerate() {
        let text = item.caption.replacen("zkchar", "cat", 1);
        let direct = encoder.encode(&[&text]).expect("encode").remove(0);
        let cached = first.cached.class_caption(i, &Device::Cpu).expect("cached");
        assert!(max_diff(&cached, &direct) < 1e-6, "{text:?}");
    }
}

fn indices(batches: &[zlora::data::Batch]) -> Vec<(Vec<usize>, Vec<bool>)> {
    batches
        .iter()
        .map(|b| (b.indices.clone(), b.drop_caption.clone()))
        .collect()
}

#[test]
fn loader_batches_one_bucket_with_per_item_captions_and_resumes_exactly() {
    let data = tempfile::tempdir().expect("tempdir");
    let cache = tempfile::tempdir().expect("tempdir");
    folder(data.path());
    let run = build(data.path(), cache.path());
    let cpu = Device::Cpu;
    let opts = LoaderOptions {
        batch_size: 2,
        repeats: 3,
        caption_dropout: 0.25,
        seed: 42,
    };
    let next = |loader: &mut Loader, n: usize| {
        (0..n)
            .map(|_| loader.next_batch(&run.cached, &cpu).expect("batch"))
            .collect::<Vec<_>>()
    };

    let mut whole =
        Loader::for_cached(&run.cached, opts.clone(), LoaderState::default()).expect("loader");
    let all = next(&mut whole, 20);
    for batch in &all {
        let bucket = run.cached.items()[batch.indices[0]].bucket;
        let (h, w) = (bucket.height as usize / 4, bucket.width as usize / 4);
        assert_eq!(batch.latents.dims(), [batch.indices.len(), 16, h, w]);
        assert_eq!(batch.captions.len(), batch.indices.len());
        for ((&i, &dropped), caption) in batch
            .indices
            .iter()
            .zip(&batch.drop_caption)
            .zip(&batch.captions)
        {
            let expected = match dropped {
                true => run.cached.empty_caption().clone(),
                false => run.cached.caption(i, &cpu).expect("caption"),
            };
            assert_eq!(max_diff(caption, &expected), 0.0);
        }
    }
    let lengths: std::collections::BTreeSet<usize> = all
        .iter()
        .flat_map(|b| b.captions.iter().map(|c| c.dim(0).expect("len")))
        .collect();
    assert!(
        lengths.len() > 2,
        "captions of different lengths: {lengths:?}"
    );
    assert!(all.iter().any(|b| b.drop_caption.contains(&true)));

    let k = 7;
    let mut first =
        Loader::for_cached(&run.cached, opts.clone(), LoaderState::default()).expect("loader");
    next(&mut first, k);
    let saved = serde_json::to_string(&first.state()).expect("save");
    let state: LoaderState = serde_json::from_str(&saved).expect("load");
    let mut resumed = Loader::for_cached(&run.cached, opts, state).expect("loader");
    let rest = next(&mut resumed, 20 - k);
    assert_eq!(indices(&rest), indices(&all[k..]));
    for (a, b) in rest.iter().zip(&all[k..]) {
        assert_eq!(max_diff(&a.latents, &b.latents), 0.0);
    }
}

#[test]
fn the_default_cache_folder_is_ignored_by_the_scan() {
    let data = tempfile::tempdir().expect("tempdir");
    folder(data.path());
    let cfg = DatasetConfig::new(data.path());
    let cache: PathBuf = cfg.cache_dir();
    std::fs::create_dir_all(cache.join("latents")).expect("cache dir");
    let buckets = Buckets::for_vae(64, 4).expect("buckets");
    let cfg = DatasetConfig {
        resolution: 64,
        ..cfg
    };
    let (dataset, report) = Dataset::scan(&cfg, &buckets, &tokenizer()).expect("scan");
    assert_eq!(dataset.len(), 5);
    assert_eq!(report.ignored, 1, "{report}");
}
