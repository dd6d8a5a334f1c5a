//! The on-disk cache of VAE latents and caption features, so training never runs the text
//! encoder or the VAE.
//!
//! Entries are named by a hash of everything that determines them, not by file name:
//! a latent by the image bytes, its bucket (so each resolution has its own), the VAE's
//! identity and the encode dtype; a loss mask by the mask bytes, the bucket and the latent
//! grid's factor; caption
//! features by the caption text as trained (trigger included), the text encoder's and the
//! tokenizer's identity and the encode dtype. An edited image or caption therefore gets a new
//! entry and is re-encoded, an unchanged one is reused, and a renamed file costs nothing.
//!
//! Encoding is ordered for a 24 GB card: the text encoder is loaded, encodes every missing
//! caption and is dropped; only then is the VAE loaded. A model whose entries are all cached
//! is not loaded at all. Entries are small (about 1 MB per 1024² latent, 10 KB per caption
//! token at hidden 2560), so items are read from disk when a batch needs them rather than held
//! in memory; only the empty caption (for caption dropout) is kept loaded.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::buckets::{crop_resize, mask_grid, Bucket};
use super::dataset::{decode_image, Dataset, Item};
use crate::fsutil::save_safetensors;
use crate::model::folder::ModelFolder;
use crate::model::text::TextEncoderConfig;
use crate::model::vae::VaeConfig;
use crate::nn::Quantization;
use crate::{Error, Result};

/// Changes whenever what an entry holds changes meaning (preprocessing, layout), so old
/// entries are never read as new ones.
const FORMAT: &str = "zlora-cache-v1";
const LATENT: &str = "latent";
const CAPTION: &str = "caption";
const MASK: &str = "mask";

/// How the encoders run (each dataset's entries go to its own `cache_dir`).
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// The dtype the text encoder and VAE are loaded in (part of the keys: bf16 and f32
    /// encodes differ).
    pub dtype: DType,
    pub device: Device,
    /// How the text encoder's decoder layers are stored (part of the caption keys when set:
    /// a quantized encoder's features differ).
    pub quantize_text_encoder: Option<Quantization>,
    /// Differential output preservation's class word: each item's caption with its
    /// dataset's trigger replaced by it is cached beside the item's own; None without it.
    pub class: Option<String>,
}

/// Which encoder a progress report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Captions,
    Images,
}

/// What a build did. Identical captions are encoded once, so counts are of distinct entries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub captions_encoded: usize,
    pub captions_reused: usize,
    pub latents_encoded: usize,
    pub latents_reused: usize,
    pub masks_made: usize,
    pub masks_reused: usize,
}

/// One item's cache entries: an image at one of its resolutions.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedItem {
    pub latent: PathBuf,
    pub caption: PathBuf,
    /// The class caption's features (with `CacheOptions::class`).
    pub class_caption: Option<PathBuf>,
    /// The loss mask on the latent grid, when the image has one.
    pub mask: Option<PathBuf>,
    pub bucket: Bucket,
    /// The dataset it comes from (its index in the list the cache was built from).
    pub source: usize,
    /// The image it comes from, numbered over all datasets: an image's items at its
    /// several resolutions share the number.
    pub image: usize,
}

/// Datasets whose latents, masks and caption features are all on disk.
#[derive(Debug, Clone)]
pub struct CachedDataset {
    items: Vec<CachedItem>,
    empty_caption: Tensor,
}

/// One image at one resolution, before encoding.
struct Variant<'a> {
    dir: PathBuf,
    item: &'a Item,
    bucket: Bucket,
    source: usize,
    image: usize,
}

impl CachedDataset {
    /// Encodes what is missing from the datasets' caches and returns the items over them:
    /// each image once per resolution, datasets in order. `progress` is called after each
    /// encode with the stage, the number done and the stage's total.
    pub fn build(
        datasets: &[Dataset],
        model: &ModelFolder,
        opts: &CacheOptions,
        mut progress: impl FnMut(Stage, usize, usize),
    ) -> Result<(Self, CacheStats)> {
        let first = datasets
            .first()
            .ok_or_else(|| Error::Invalid("no dataset to cache".into()))?;
        let keys = Keys::new(model, opts)?;
        let variants = variants(datasets);
        let mut stats = CacheStats::default();
        let class_texts = class_captions(datasets, &variants, opts.class.as_deref());
        // The empty caption comes first: caption dropout trains on its features.
        let empty_dir = first.config().cache_dir();
        let texts: Vec<(&Path, &str)> = std::iter::once((empty_dir.as_path(), ""))
            .chain(
                variants
                    .iter()
                    .map(|v| (v.dir.as_path(), v.item.caption.as_str())),
            )
            .chain(
                variants
                    .iter()
                    .zip(&class_texts)
                    .map(|(v, c)| (v.dir.as_path(), c.as_str())),
            )
            .collect();
        let caption_paths = encode_captions(&keys, model, opts, &texts, &mut stats, &mut progress)?;
        let latent_paths =
            encode_latents(&keys, model, opts, &variants, &mut stats, &mut progress)?;
        let mask_paths = make_masks(&keys, &variants, &mut stats)?;
        let n = variants.len();
        let mut class_paths = caption_paths[1 + n..].iter().cloned();
        let items = variants
            .iter()
            .zip(caption_paths[1..=n].iter().cloned())
            .zip(latent_paths.into_iter().zip(mask_paths))
            .map(|((v, caption), (latent, mask))| CachedItem {
                latent,
                caption,
                class_caption: class_paths.next(),
                mask,
                bucket: v.bucket,
                source: v.source,
                image: v.image,
            })
            .collect();
        let empty_caption = load_tensor(&keys.caption_path(&empty_dir, ""), CAPTION, &Device::Cpu)?;
        Ok((
            Self {
                items,
                empty_caption,
            },
            stats,
        ))
    }

    pub fn items(&self) -> &[CachedItem] {
        &self.items
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Item `i`'s latent (16, h, w) in the transformer's space, f32.
    pub fn latent(&self, i: usize, device: &Device) -> Result<Tensor> {
        load_tensor(&self.item(i)?.latent, LATENT, device)
    }

    /// Item `i`'s loss mask (h, w) on its latent grid, f32 in [0, 1], if it has one.
    pub fn mask(&self, i: usize, device: &Device) -> Result<Option<Tensor>> {
        let item = self.item(i)?;
        item.mask
            .as_deref()
            .map(|p| load_tensor(p, MASK, device))
            .transpose()
    }

    /// Item `i`'s caption features (L, hidden), f32.
    pub fn caption(&self, i: usize, device: &Device) -> Result<Tensor> {
        load_tensor(&self.item(i)?.caption, CAPTION, device)
    }

    /// Item `i`'s class caption features (L, hidden), f32: differential output preservation's.
    pub fn class_caption(&self, i: usize, device: &Device) -> Result<Tensor> {
        let path = self.item(i)?.class_caption.as_ref().ok_or_else(|| {
            Error::Invalid(
                "the cache was built without class captions (no [train] preservation)".into(),
            )
        })?;
        load_tensor(path, CAPTION, device)
    }

    /// The features of the empty prompt, used for dropped captions (on the CPU).
    pub fn empty_caption(&self) -> &Tensor {
        &self.empty_caption
    }

    fn item(&self, i: usize) -> Result<&CachedItem> {
        self.items.get(i).ok_or_else(|| {
            Error::Invalid(format!(
                "item {i} is outside the dataset of {}",
                self.items.len()
            ))
        })
    }
}

/// Encodes every text whose features are not cached; returns one entry path per text.
fn encode_captions(
    keys: &Keys,
    model: &ModelFolder,
    opts: &CacheOptions,
    texts: &[(&Path, &str)],
    stats: &mut CacheStats,
    progress: &mut impl FnMut(Stage, usize, usize),
) -> Result<Vec<PathBuf>> {
    let paths: Vec<PathBuf> = texts
        .iter()
        .map(|(dir, t)| keys.caption_path(dir, t))
        .collect();
    let distinct: BTreeMap<&PathBuf, &str> = paths.iter().zip(texts.iter().map(|t| t.1)).collect();
    let hidden = keys.text_hidden;
    let shape_ok = |s: &[usize]| matches!(s, [len, h] if *len > 0 && *h == hidden);
    let (_, todo): (Vec<_>, Vec<_>) = distinct
        .into_iter()
        .partition(|(path, _)| entry_ok(path, CAPTION, shape_ok));
    stats.captions_reused = distinct_count(&paths) - todo.len();
    if todo.is_empty() {
        return Ok(paths);
    }
    // The encoder lives only in this scope: it is dropped before the VAE is loaded.
    let encoder =
        model.load_prompt_encoder(opts.dtype, &opts.device, opts.quantize_text_encoder)?;
    for (n, (path, text)) in todo.iter().enumerate() {
        let features = encoder.encode(&[text])?;
        let features = features
            .into_iter()
            .next()
            .ok_or_else(|| Error::Invalid("the text encoder returned no features".into()))?;
        save_entry(path, CAPTION, features)?;
        stats.captions_encoded += 1;
        progress(Stage::Captions, n + 1, todo.len());
    }
    Ok(paths)
}

/// Every image of every dataset at each of its dataset's resolutions, datasets in order.
/// Differential output preservation's caption of each variant: its caption with its
/// dataset's trigger replaced by `class` (unchanged for a dataset without a trigger, such as
/// a regularization set); none without preservation.
fn class_captions(datasets: &[Dataset], variants: &[Variant], class: Option<&str>) -> Vec<String> {
    let Some(class) = class else {
        return Vec::new();
    };
    variants
        .iter()
        .map(|v| {
            let caption = &v.item.caption;
            datasets[v.source]
                .config()
                .caption_with_class(caption, class)
                .unwrap_or_else(|| caption.clone())
        })
        .collect()
}

fn variants(datasets: &[Dataset]) -> Vec<Variant<'_>> {
    let images = datasets.iter().enumerate().flat_map(|(source, d)| {
        d.items()
            .iter()
            .map(move |item| (source, d.config().cache_dir(), item))
    });
    images
        .enumerate()
        .flat_map(|(image, (source, dir, item))| {
            item.buckets.iter().map(move |&bucket| Variant {
                dir: dir.clone(),
                item,
                bucket,
                source,
                image,
            })
        })
        .collect()
}

/// Encodes every image whose latent is not cached; returns one entry path per variant.
fn encode_latents(
    keys: &Keys,
    model: &ModelFolder,
    opts: &CacheOptions,
    variants: &[Variant],
    stats: &mut CacheStats,
    progress: &mut impl FnMut(Stage, usize, usize),
) -> Result<Vec<PathBuf>> {
    let mut paths = Vec::with_capacity(variants.len());
    let mut todo = BTreeMap::new();
    for (i, v) in variants.iter().enumerate() {
        let bytes = crate::fsutil::read_regular(&v.item.image)?;
        let path = keys.latent_path(&v.dir, &bytes, v.bucket);
        let shape = keys.latent_shape(v.bucket);
        if !todo.contains_key(&path) && !entry_ok(&path, LATENT, |s| s == shape) {
            todo.insert(path.clone(), i);
        }
        paths.push(path);
    }
    stats.latents_reused = distinct_count(&paths) - todo.len();
    if todo.is_empty() {
        return Ok(paths);
    }
    let vae = model.load_vae(opts.dtype, &opts.device)?;
    for (n, (path, &i)) in todo.iter().enumerate() {
        let v = &variants[i];
        let bytes = crate::fsutil::read_regular(&v.item.image)?;
        if &keys.latent_path(&v.dir, &bytes, v.bucket) != path {
            return Err(changed(&v.item.image));
        }
        let image = decode_image(&bytes)
            .map_err(|e| Error::bad_file(&v.item.image, format!("cannot decode image: {e}")))?;
        let x = image_tensor(&image, v.bucket, &opts.device)?;
        let latent = vae.to_transformer_space(&vae.encode(&x)?)?.squeeze(0)?;
        save_entry(path, LATENT, latent)?;
        stats.latents_encoded += 1;
        progress(Stage::Images, n + 1, todo.len());
    }
    Ok(paths)
}

/// Brings every variant's mask onto its latent grid (no model needed); returns one entry path
/// per variant, None for an image without a mask.
fn make_masks(
    keys: &Keys,
    variants: &[Variant],
    stats: &mut CacheStats,
) -> Result<Vec<Option<PathBuf>>> {
    let mut made = BTreeSet::new();
    let mut paths = Vec::with_capacity(variants.len());
    for v in variants {
        let Some(file) = &v.item.mask else {
            paths.push(None);
            continue;
        };
        let bytes = crate::fsutil::read_regular(file)?;
        let path = keys.mask_path(&v.dir, &bytes, v.bucket);
        let [_, h, w] = keys.latent_shape(v.bucket);
        if !made.contains(&path) && !entry_ok(&path, MASK, |s| s == [h, w]) {
            let mask = decode_image(&bytes)
                .map_err(|e| Error::bad_file(file, format!("cannot decode mask: {e}")))?;
            let grid = mask_grid(&mask, v.bucket, keys.vae_factor as u32);
            save_entry(&path, MASK, Tensor::from_vec(grid, (h, w), &Device::Cpu)?)?;
            made.insert(path.clone());
        }
        paths.push(Some(path));
    }
    stats.masks_made = made.len();
    let distinct: BTreeSet<&PathBuf> = paths.iter().flatten().collect();
    stats.masks_reused = distinct.len() - made.len();
    Ok(paths)
}

fn changed(file: &Path) -> Error {
    Error::bad_file(file, "changed while the cache was being built; run again")
}

fn distinct_count(paths: &[PathBuf]) -> usize {
    paths.iter().collect::<BTreeSet<_>>().len()
}

/// The VAE input for `image` in `bucket`: (1, 3, h, w) f32 in [-1, 1], center-cropped and
/// resized as in `crop_resize`.
pub fn image_tensor(
    image: &image::DynamicImage,
    bucket: Bucket,
    device: &Device,
) -> Result<Tensor> {
    let rgb = crop_resize(image, bucket);
    let (w, h) = (rgb.width() as usize, rgb.height() as usize);
    let hwc = Tensor::from_vec(rgb.into_raw(), (h, w, 3), &Device::Cpu)?;
    let chw = hwc.permute((2, 0, 1))?.affine(2.0, -1.0)?.unsqueeze(0)?;
    Ok(chw.to_device(device)?)
}

/// What the keys are made of, computed once per build.
struct Keys {
    vae: blake3::Hash,
    text: blake3::Hash,
    vae_factor: usize,
    latent_channels: usize,
    text_hidden: usize,
}

impl Keys {
    fn new(model: &ModelFolder, opts: &CacheOptions) -> Result<Self> {
        let root = model.root();
        let vae_cfg = VaeConfig::from_file(&root.join("vae/config.json"))?;
        let text_cfg = TextEncoderConfig::from_file(&root.join("text_encoder/config.json"))?;
        let dtype = format!("{:?}", opts.dtype);
        let mut vae = blake3::Hasher::new();
        vae.update(FORMAT.as_bytes());
        vae.update(dtype.as_bytes());
        identify_folder(&root.join("vae"), &mut vae)?;
        let mut text = blake3::Hasher::new();
        text.update(FORMAT.as_bytes());
        text.update(dtype.as_bytes());
        // Unset adds nothing, so the keys of dense encodes stay those of earlier caches.
        if let Some(q) = opts.quantize_text_encoder {
            text.update(format!("quantize_text_encoder {q}").as_bytes());
        }
        identify_folder(&root.join("text_encoder"), &mut text)?;
        identify_folder(&root.join("tokenizer"), &mut text)?;
        Ok(Self {
            vae: vae.finalize(),
            text: text.finalize(),
            vae_factor: vae_cfg.spatial_factor(),
            latent_channels: vae_cfg.latent_channels,
            text_hidden: text_cfg.hidden_size,
        })
    }

    fn caption_path(&self, dir: &Path, text: &str) -> PathBuf {
        let mut h = blake3::Hasher::new();
        h.update(self.text.as_bytes());
        h.update(text.as_bytes());
        entry(dir, "captions", h.finalize())
    }

    fn latent_path(&self, dir: &Path, image_bytes: &[u8], bucket: Bucket) -> PathBuf {
        let mut h = blake3::Hasher::new();
        h.update(self.vae.as_bytes());
        h.update(&bucket.width.to_le_bytes());
        h.update(&bucket.height.to_le_bytes());
        h.update(image_bytes);
        entry(dir, "latents", h.finalize())
    }

    /// A mask's entry depends on its bytes, the bucket and the grid, not on any model.
    fn mask_path(&self, dir: &Path, mask_bytes: &[u8], bucket: Bucket) -> PathBuf {
        let mut h = blake3::Hasher::new();
        h.update(FORMAT.as_bytes());
        h.update(MASK.as_bytes());
        h.update(&(self.vae_factor as u64).to_le_bytes());
        h.update(&bucket.width.to_le_bytes());
        h.update(&bucket.height.to_le_bytes());
        h.update(mask_bytes);
        entry(dir, "masks", h.finalize())
    }

    fn latent_shape(&self, bucket: Bucket) -> [usize; 3] {
        let f = self.vae_factor;
        [
            self.latent_channels,
            bucket.height as usize / f,
            bucket.width as usize / f,
        ]
    }
}

fn entry(dir: &Path, kind: &str, hash: blake3::Hash) -> PathBuf {
    dir.join(kind)
        .join(format!("{}.safetensors", hash.to_hex()))
}

/// Feeds a model component's identity to `hasher`: the content of its small files (configs,
/// tokenizer) and the name, size and modification time of its large ones (weights). Hashing
/// gigabytes of weights at every start would cost more than it saves; a replaced weight file
/// changes its time, so the cache is rebuilt rather than silently reused.
fn identify_folder(dir: &Path, hasher: &mut blake3::Hasher) -> Result<()> {
    const SMALL: u64 = 1 << 20;
    let paths = crate::fsutil::sorted_entries(dir)?;
    for path in paths {
        let meta = std::fs::metadata(&path).map_err(|e| Error::io(&path, e))?;
        if !meta.is_file() {
            continue;
        }
        hasher.update(path.file_name().unwrap_or_default().as_encoded_bytes());
        hasher.update(&meta.len().to_le_bytes());
        if meta.len() <= SMALL {
            hasher.update(&std::fs::read(&path).map_err(|e| Error::io(&path, e))?);
        } else if let Ok(modified) = meta.modified() {
            let since = modified
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            hasher.update(&since.as_nanos().to_le_bytes());
        }
    }
    Ok(())
}

fn save_entry(path: &Path, name: &str, tensor: Tensor) -> Result<()> {
    let tensor = tensor
        .to_dtype(DType::F32)?
        .to_device(&Device::Cpu)?
        .contiguous()?;
    let tensors = BTreeMap::from([(name.to_string(), tensor)]);
    // Overwrite: an existing file of this name failed `entry_ok` and is being repaired.
    save_safetensors(path, &tensors, None, true)
}

/// True when `path` is a complete safetensors file holding an f32 tensor `name` whose shape
/// passes `shape_ok`. Only the header is read; the file length is checked against it, so a
/// truncated or foreign file is re-encoded now instead of failing mid-training.
fn entry_ok(path: &Path, name: &str, shape_ok: impl Fn(&[usize]) -> bool) -> bool {
    let header = || -> Option<(u64, serde_json::Value, u64)> {
        let mut file = std::fs::File::open(path).ok()?;
        let file_len = file.metadata().ok()?.len();
        let mut n = [0u8; 8];
        file.read_exact(&mut n).ok()?;
        let n = u64::from_le_bytes(n);
        let mut json = vec![0u8; usize::try_from(n).ok().filter(|&n| n < 1 << 20)?];
        file.read_exact(&mut json).ok()?;
        Some((n, serde_json::from_slice(&json).ok()?, file_len))
    };
    let Some((n, header, file_len)) = header() else {
        return false;
    };
    let info = &header[name];
    let shape: Option<Vec<usize>> = serde_json::from_value(info["shape"].clone()).ok();
    let end = info["data_offsets"][1].as_u64();
    info["dtype"] == "F32"
        && shape.is_some_and(|s| shape_ok(&s))
        && end.is_some_and(|end| 8 + n + end == file_len)
}

fn load_tensor(path: &Path, name: &str, device: &Device) -> Result<Tensor> {
    let mut tensors = candle_core::safetensors::load(path, device).map_err(|e| {
        Error::bad_file(
            path,
            format!("cannot read cache entry ({e}); delete it and run again to re-encode"),
        )
    })?;
    tensors
        .remove(name)
        .ok_or_else(|| Error::bad_file(path, format!("cache entry holds no tensor {name:?}")))
}
