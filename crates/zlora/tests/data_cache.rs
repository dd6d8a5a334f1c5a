//! The latent / caption-feature cache over the tiny model, and the loader that reads it.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::{DynamicImage, ImageFormat, RgbImage};
use zlora::data::cache::image_tensor;
use zlora::data::dataset::open_image;
use zlora::data::{
    Buckets, CacheOptions, CacheStats, CachedDataset, Dataset, DatasetConfig, DatasetKind, Loader,
    LoaderOptions, LoaderState, Resolution, Stage,
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
    build_sets(
        &[DatasetConfig {
            trigger: Some("zkchar".into()),
            ..config(data, cache, Resolution::One(64))
        }],
        class,
    )
}

fn config(data: &Path, cache: &Path, resolution: Resolution) -> DatasetConfig {
    DatasetConfig {
        resolution,
        cache_dir: Some(cache.to_path_buf()),
        ..DatasetConfig::new(data)
    }
}

/// Scans and caches the datasets (with preservation's class word, if any); `dataset` is
/// the first one.
fn build_sets(cfgs: &[DatasetConfig], class: Option<&str>) -> Run {
    let model = model();
    let datasets: Vec<Dataset> = cfgs
        .iter()
        .map(|cfg| {
            let buckets = cfg.buckets(4).expect("buckets");
            let (dataset, report) = Dataset::scan(cfg, &buckets, &tokenizer()).expect("scan");
            assert!(!report.is_fatal(), "{report}");
            dataset
        })
        .collect();
    let opts = CacheOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        quantize_text_encoder: None,
        class: class.map(str::to_string),
    };
    let mut progress = Vec::new();
    let (cached, stats) = CachedDataset::build(&datasets, &model, &opts, |s, done, total| {
        progress.push((s, done, total))
    })
    .expect("cache");
    Run {
        dataset: datasets[0].clone(),
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
        ..CacheStats::default()
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
        let x = image_tensor(
            &open_image(&item.image).expect("image"),
            item.buckets[0],
            &cpu,
        )
        .expect("tensor");
        let direct = vae
            .encode(&x)
            .and_then(|z| vae.to_transformer_space(&z))
            .and_then(|z| Ok(z.squeeze(0)?))
            .expect("encode");
        let cached = run.cached.latent(i, &cpu).expect("latent");
        let (h, w) = (
            item.buckets[0].height as usize / 4,
            item.buckets[0].width as usize / 4,
        );
        assert_eq!(cached.dims(), [16, h, w]);
        assert!(
            max_diff(&cached, &direct) < 1e-6,
            "latent of {}",
            item.image.display()
        );
    }

    let encoder = model
        .load_prompt_encoder(DType::F32, &cpu, None)
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
        .load_prompt_encoder(DType::F32, &Device::Cpu, None)
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
    let source = DatasetConfig {
        repeats: 3,
        caption_dropout: 0.25,
        ..DatasetConfig::new(data.path())
    };
    let opts = LoaderOptions::new(&[source], 2, 42);
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
        resolution: Resolution::One(64),
        ..cfg
    };
    let (dataset, report) = Dataset::scan(&cfg, &[buckets], &tokenizer()).expect("scan");
    assert_eq!(dataset.len(), 5);
    assert_eq!(report.ignored, 1, "{report}");
}

/// A grayscale mask `w`×`h`: white left of column `edge`, black from it on.
fn half_mask(dir: &Path, name: &str, w: u32, h: u32, edge: u32) {
    let mask =
        image::GrayImage::from_fn(w, h, |x, _| image::Luma([if x < edge { 255 } else { 0 }]));
    mask.save_with_format(dir.join(name), ImageFormat::Png)
        .expect(name);
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().expect("2-d mask")
}

/// Masks reach the cache on each resolution's latent grid as cell averages, and each
/// resolution has its own latent entry.
#[test]
fn masks_are_cached_per_resolution_as_latent_cell_averages() {
    let data = tempfile::tempdir().expect("tempdir");
    let cache = tempfile::tempdir().expect("tempdir");
    folder(data.path());
    // a.png is 64×64: white up to column 34, so latent column 8 (pixels 32..36 at factor 4)
    // is half covered. The RGB mask is read as luminance.
    half_mask(data.path(), "a.mask.png", 64, 64, 34);
    let rgb = DynamicImage::ImageLuma8(
        image::open(data.path().join("a.mask.png"))
            .expect("mask")
            .to_luma8(),
    )
    .to_rgb8();
    rgb.save(data.path().join("c.mask.png")).expect("rgb mask");
    let run = build_sets(
        &[config(
            data.path(),
            cache.path(),
            Resolution::Several(vec![64, 32]),
        )],
        None,
    );
    assert_eq!(run.stats.latents_encoded, 10, "five images at two sizes");
    assert_eq!((run.stats.masks_made, run.stats.masks_reused), (4, 0));
    let items = run.cached.items();
    assert_eq!(items.len(), 10);
    let cpu = Device::Cpu;
    let (full, small) = (&items[0], &items[1]);
    assert_eq!((full.image, small.image), (0, 0), "a.png at both sizes");
    assert_ne!(full.latent, small.latent, "one latent entry per size");
    assert_eq!((full.bucket.width, small.bucket.width), (64, 32));

    let at_64 = rows(
        &run.cached
            .mask(0, &cpu)
            .expect("read")
            .expect("a has a mask"),
    );
    assert_eq!((at_64.len(), at_64[0].len()), (16, 16));
    for row in &at_64 {
        assert!(row[..8].iter().all(|&v| v == 1.0), "{row:?}");
        assert!((row[8] - 0.5).abs() < 1e-6, "half-covered cell: {}", row[8]);
        assert!(row[9..].iter().all(|&v| v == 0.0), "{row:?}");
    }
    // At 32 px each latent cell covers 8 source columns: cell 4 holds columns 32..40, a
    // quarter white (the triangle filter's blur stays inside the cell's neighbours).
    let at_32 = rows(
        &run.cached
            .mask(1, &cpu)
            .expect("read")
            .expect("a has a mask"),
    );
    assert_eq!((at_32.len(), at_32[0].len()), (8, 8));
    for row in &at_32 {
        assert!(row[..4].iter().all(|&v| (v - 1.0).abs() < 1e-6), "{row:?}");
        assert!((row[4] - 0.25).abs() < 0.05, "{row:?}");
        assert!(row[5..].iter().all(|&v| v.abs() < 1e-6), "{row:?}");
    }
    let c = items.iter().position(|i| i.image == 2).expect("c.png");
    let c_mask = run.cached.mask(c, &cpu).expect("read").expect("c");
    let a_mask = run.cached.mask(0, &cpu).expect("read").expect("a");
    assert!(
        max_diff(&c_mask, &a_mask) < 1e-6,
        "RGB white reads as luminance 1"
    );
    assert!(
        run.cached.mask(2, &cpu).expect("read").is_none(),
        "b.png has no mask"
    );

    let again = build_sets(
        &[config(
            data.path(),
            cache.path(),
            Resolution::Several(vec![64, 32]),
        )],
        None,
    );
    assert_eq!((again.stats.masks_made, again.stats.masks_reused), (0, 4));
}

/// A training set with masks and a regularization set through the cache and the loader:
/// batches carry masks (ones for the unmasked items), regularization items come in at their
/// ratio, and a resumed loader serves the same batches.
#[test]
fn a_training_and_a_regularization_set_load_together_and_resume() {
    let data = tempfile::tempdir().expect("tempdir");
    let reg = tempfile::tempdir().expect("tempdir");
    let cache = tempfile::tempdir().expect("tempdir");
    folder(data.path());
    half_mask(data.path(), "a.mask.png", 64, 64, 32);
    half_mask(data.path(), "b.mask.png", 96, 48, 48);
    save_image(reg.path(), "r1.png", 64, 64, 50);
    save_image(reg.path(), "r2.png", 64, 64, 60);
    write(reg.path(), "r1.txt", "a photo of a dog");
    write(reg.path(), "r2.txt", "a dog");
    let train = config(data.path(), cache.path(), Resolution::One(64));
    let regularization = DatasetConfig {
        kind: DatasetKind::Regularization,
        ratio: Some(0.8),
        ..config(reg.path(), cache.path(), Resolution::One(64))
    };
    let cfgs = [train, regularization];
    let run = build_sets(&cfgs, None);
    let opts = LoaderOptions::new(&cfgs, 2, 5);
    let cpu = Device::Cpu;
    let mut loader =
        Loader::for_cached(&run.cached, opts.clone(), LoaderState::default()).expect("loader");
    let per_epoch = loader.batches_per_epoch();
    let batches: Vec<_> = (0..2 * per_epoch)
        .map(|_| loader.next_batch(&run.cached, &cpu).expect("batch"))
        .collect();
    let epoch: Vec<usize> = batches[..per_epoch]
        .iter()
        .flat_map(|b| b.indices.clone())
        .collect();
    assert_eq!(
        epoch
            .iter()
            .filter(|&&i| run.cached.items()[i].source == 1)
            .count(),
        4,
        "5 × 0.8"
    );
    assert_eq!(
        epoch
            .iter()
            .filter(|&&i| run.cached.items()[i].source == 0)
            .count(),
        5
    );
    for batch in &batches {
        let masked: Vec<bool> = batch
            .indices
            .iter()
            .map(|&i| run.cached.items()[i].mask.is_some())
            .collect();
        let Some(masks) = &batch.masks else {
            assert!(!masked.contains(&true));
            continue;
        };
        let (_, _, h, w) = batch.latents.dims4().expect("4-d");
        assert_eq!(masks.dims(), [batch.indices.len(), 1, h, w]);
        for (k, (&i, has)) in batch.indices.iter().zip(&masked).enumerate() {
            let got = masks.get(k).and_then(|m| m.squeeze(0)).expect("mask");
            let want = match has {
                true => run.cached.mask(i, &cpu).expect("read").expect("mask"),
                false => Tensor::ones((h, w), DType::F32, &cpu).expect("ones"),
            };
            assert_eq!(max_diff(&got, &want), 0.0);
        }
    }
    assert!(batches.iter().any(|b| b.masks.is_some()));

    let k = per_epoch + 1;
    let mut first =
        Loader::for_cached(&run.cached, opts.clone(), LoaderState::default()).expect("loader");
    (0..k).for_each(|_| drop(first.next_plan()));
    let mut resumed = Loader::for_cached(&run.cached, opts, first.state()).expect("loader");
    let rest: Vec<_> = (k..2 * per_epoch)
        .map(|_| resumed.next_batch(&run.cached, &cpu).expect("batch"))
        .collect();
    assert_eq!(indices(&rest), indices(&batches[k..]));
}
