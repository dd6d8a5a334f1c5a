//! The dataset folder: images with same-stem caption files, the `[dataset]` settings, and the
//! scan that turns them into training items and a preflight report.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::io::Cursor;
use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageDecoder, ImageReader};
use serde::{Deserialize, Serialize};

use super::buckets::{Bucket, Buckets};
use super::preflight::{Preflight, Problem, ProblemKind, Severity};
use crate::model::text::PromptTokenizer;
use crate::{Error, Result};

/// Image extensions read, compared case-insensitively (cameras write `.JPG`).
pub const IMAGE_EXTENSIONS: [&str; 4] = ["png", "jpg", "jpeg", "webp"];

/// The `[dataset]` table of the training config. Defaults are documented in docs/datasets.md.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// The folder of images and captions (not searched recursively).
    pub path: PathBuf,
    /// Training images, or regularization images mixed in at `ratio`. Default "train".
    #[serde(default, skip_serializing_if = "DatasetKind::is_train")]
    pub kind: DatasetKind,
    /// Buckets hold about resolution² pixels; a list trains each image at several sizes.
    /// Default 1024, Z-Image's native size.
    #[serde(default)]
    pub resolution: Resolution,
    /// With several resolutions: every image at each ("all") or at one drawn per epoch
    /// ("random"). Default "all".
    #[serde(default, skip_serializing_if = "ResolutionMode::is_all")]
    pub resolution_mode: ResolutionMode,
    /// Added at the front of every caption that does not already contain it as a whole word.
    #[serde(default)]
    pub trigger: Option<String>,
    /// Share of training items whose caption is replaced by the empty prompt. Default 0.05.
    #[serde(default = "default_caption_dropout")]
    pub caption_dropout: f64,
    /// How many times each image appears per epoch. Default 1.
    #[serde(default = "default_repeats")]
    pub repeats: usize,
    /// Caption files are `<image stem>.<caption_extension>`. Default "txt".
    #[serde(default = "default_caption_extension")]
    pub caption_extension: String,
    /// Images whose shorter side is below this are errors. Default resolution / 2.
    #[serde(default)]
    pub min_side: Option<u32>,
    /// What an image without a caption file means. Default "error".
    #[serde(default)]
    pub missing_caption: MissingCaption,
    /// Train without the items that have errors instead of stopping. Default false.
    #[serde(default)]
    pub skip_problems: bool,
    /// Where encoded latents and caption features are kept. Default `<path>/.zlora-cache`.
    #[serde(default)]
    pub cache_dir: Option<PathBuf>,
    /// A folder of loss masks named like the images; default: `NAME.mask.png` beside each.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masks: Option<PathBuf>,
    /// The least loss weight of a pixel, where the mask is black (OneTrainer's
    /// `unmasked_weight`: the mask is clamped to [unmasked_weight, 1]). Default 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub unmasked_weight: f64,
    /// Every item's loss is multiplied by this (kohya's `prior_loss_weight` for a
    /// regularization set). Default 1.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub loss_weight: f64,
    /// Regularization only: its items per epoch as a share of the training items per epoch
    /// (drawn in a seeded cycle). Default 1, kohya's one regularization image per training image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ratio: Option<f64>,
}

/// What a dataset is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    /// What the LoRA learns.
    #[default]
    Train,
    /// Images of the class without the subject, which keep the model's prior (DreamBooth's
    /// prior preservation).
    Regularization,
}

impl DatasetKind {
    fn is_train(&self) -> bool {
        *self == Self::Train
    }
}

/// How an image is used when several resolutions are listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResolutionMode {
    /// Every image at every resolution, each epoch.
    #[default]
    All,
    /// Every image once per epoch, at a resolution drawn from the seeded stream.
    Random,
}

impl ResolutionMode {
    fn is_all(&self) -> bool {
        *self == Self::All
    }
}

/// `resolution = 1024` or `resolution = [512, 768, 1024]`: the bucket areas an image trains at.
/// One size is written back as a number, so configs and checkpoints of before the list read
/// and compare the same.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Resolution {
    One(u32),
    Several(Vec<u32>),
}

impl Default for Resolution {
    fn default() -> Self {
        Self::One(1024)
    }
}

impl Resolution {
    /// The sizes in the order written.
    pub fn sizes(&self) -> &[u32] {
        match self {
            Self::One(r) => std::slice::from_ref(r),
            Self::Several(v) => v,
        }
    }

    pub fn largest(&self) -> u32 {
        self.sizes().iter().copied().max().unwrap_or(0)
    }

    pub fn smallest(&self) -> u32 {
        self.sizes().iter().copied().min().unwrap_or(0)
    }
}

impl<'de> Deserialize<'de> for Resolution {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Resolution;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a resolution in pixels (1024) or a list of them ([512, 768, 1024])")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Resolution, E> {
                u32::try_from(v)
                    .map(Resolution::One)
                    .map_err(|_| E::custom(format!("resolution {v} is too large")))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Resolution, E> {
                u64::try_from(v)
                    .map_err(|_| E::custom(format!("resolution {v} is negative")))
                    .and_then(|v| self.visit_u64(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Resolution, A::Error> {
                let mut sizes = Vec::new();
                while let Some(r) = seq.next_element::<u32>()? {
                    sizes.push(r);
                }
                Ok(Resolution::Several(sizes))
            }
        }
        d.deserialize_any(Visit)
    }
}

/// The policy for an image without a caption file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MissingCaption {
    /// A preflight error: usually a typo or a forgotten file.
    #[default]
    Error,
    /// Read as an empty caption: the trigger word alone (or unconditional without a trigger).
    Empty,
}

fn one() -> f64 {
    1.0
}
fn is_one(v: &f64) -> bool {
    *v == 1.0
}
fn is_zero(v: &f64) -> bool {
    *v == 0.0
}
fn default_caption_dropout() -> f64 {
    0.05
}
fn default_repeats() -> usize {
    1
}
fn default_caption_extension() -> String {
    "txt".into()
}

impl DatasetConfig {
    /// The folder at `path` with every other setting at its default.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            kind: DatasetKind::default(),
            resolution: Resolution::default(),
            resolution_mode: ResolutionMode::default(),
            trigger: None,
            caption_dropout: default_caption_dropout(),
            repeats: default_repeats(),
            caption_extension: default_caption_extension(),
            min_side: None,
            missing_caption: MissingCaption::default(),
            skip_problems: false,
            cache_dir: None,
            masks: None,
            unmasked_weight: 0.0,
            loss_weight: 1.0,
            ratio: None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Invalid(format!("[dataset] {msg}")));
        if !(0.0..1.0).contains(&self.caption_dropout) {
            return bad(format!(
                "caption_dropout must be in [0, 1), got {}",
                self.caption_dropout
            ));
        }
        if self.repeats == 0 {
            return bad("repeats must be at least 1".into());
        }
        let ext = &self.caption_extension;
        if ext.is_empty() || ext.contains(['.', '/', '\\']) {
            return bad(format!(
                "caption_extension must be a bare extension such as \"txt\", got {ext:?}"
            ));
        }
        if IMAGE_EXTENSIONS.iter().any(|e| ext.eq_ignore_ascii_case(e)) {
            return bad(format!("caption_extension {ext:?} is an image extension"));
        }
        if let Some(t) = &self.trigger {
            if t.trim().is_empty() || t.trim() != t {
                return bad(format!(
                    "trigger must be non-empty without surrounding spaces, got {t:?}"
                ));
            }
        }
        if self.min_side == Some(0) {
            return bad("min_side must be at least 1".into());
        }
        self.check_resolution()?;
        self.check_weights()
    }

    fn check_resolution(&self) -> Result<()> {
        let sizes = self.resolution.sizes();
        if sizes.is_empty() {
            return Err(Error::Invalid(
                "[dataset] resolution is an empty list; give at least one size, e.g. [1024]".into(),
            ));
        }
        if let Some(r) = sizes
            .iter()
            .find(|r| sizes.iter().filter(|s| s == r).count() > 1)
        {
            return Err(Error::Invalid(format!(
                "[dataset] resolution {r} is listed twice"
            )));
        }
        Ok(())
    }

    /// The loss weights and the regularization ratio: finite and in range, the ratio only on
    /// a regularization set.
    fn check_weights(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::Invalid(format!("[dataset] {msg}")));
        if !(0.0..=1.0).contains(&self.unmasked_weight) {
            return bad(format!(
                "unmasked_weight must be in [0, 1], got {}",
                self.unmasked_weight
            ));
        }
        if !(self.loss_weight > 0.0 && self.loss_weight.is_finite()) {
            return bad(format!(
                "loss_weight must be a positive number, got {}",
                self.loss_weight
            ));
        }
        match (self.kind, self.ratio) {
            (DatasetKind::Train, Some(_)) => bad(
                "ratio is only used with kind = \"regularization\" (it sets how many of its \
                 images are mixed in per training image)"
                    .into(),
            ),
            (_, Some(r)) if !(r > 0.0 && r.is_finite()) => {
                bad(format!("ratio must be a positive number, got {r}"))
            }
            _ => Ok(()),
        }
    }

    /// The buckets of each listed resolution, for a VAE that shrinks by `vae_factor`.
    pub fn buckets(&self, vae_factor: usize) -> Result<Vec<Buckets>> {
        self.resolution
            .sizes()
            .iter()
            .map(|&r| Buckets::for_vae(r, vae_factor))
            .collect()
    }

    /// Regularization items per epoch per training item.
    pub fn regularization_ratio(&self) -> f64 {
        self.ratio.unwrap_or(1.0)
    }

    /// Default: half the smallest resolution, so every image is usable at every size
    /// without more than about 2× upscaling at the smallest.
    pub fn min_side(&self) -> u32 {
        self.min_side.unwrap_or(self.resolution.smallest() / 2)
    }

    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .unwrap_or_else(|| self.path.join(".zlora-cache"))
    }

    /// The caption as trained: the file's text, with the trigger in front when it is not
    /// already there as a whole word (case-sensitive, because the tokenizer is: "Zkchar" and
    /// "zkchar" are different tokens).
    pub fn caption_with_trigger(&self, text: &str) -> String {
        match &self.trigger {
            Some(t) if !contains_word(text, t) => {
                if text.is_empty() {
                    t.clone()
                } else {
                    format!("{t}, {text}")
                }
            }
            _ => text.to_string(),
        }
    }

    /// Differential output preservation's caption: `caption` (as trained) with every
    /// whole-word occurrence of the trigger replaced by `class` (ai-toolkit replaces every
    /// substring; a whole word keeps "zk" from changing "zkchar"). None without a trigger.
    pub fn caption_with_class(&self, caption: &str, class: &str) -> Option<String> {
        let trigger = self.trigger.as_deref()?;
        let mut out = String::with_capacity(caption.len());
        let mut from = 0;
        for at in word_positions(caption, trigger) {
            out.push_str(&caption[from..at]);
            out.push_str(class);
            from = at + trigger.len();
        }
        out.push_str(&caption[from..]);
        Some(out)
    }
}

/// Where `word` occurs in `text` with no letter, digit or underscore right before or after
/// it (so "zk" is not found inside "zkchar").
fn word_positions<'a>(text: &'a str, word: &'a str) -> impl Iterator<Item = usize> + 'a {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    text.match_indices(word)
        .map(|(at, _)| at)
        .filter(move |&at| {
            let before = text[..at].chars().next_back();
            let after = text[at + word.len()..].chars().next();
            !before.is_some_and(is_word) && !after.is_some_and(is_word)
        })
}

fn contains_word(text: &str, word: &str) -> bool {
    word_positions(text, word).next().is_some()
}

/// One training image, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    pub image: PathBuf,
    /// The caption as trained (trimmed, trigger added).
    pub caption: String,
    /// Size after EXIF orientation.
    pub width: u32,
    pub height: u32,
    /// One bucket per listed resolution, in the config's order.
    pub buckets: Vec<Bucket>,
    /// The loss mask, checked to decode and to match the image's shape.
    pub mask: Option<PathBuf>,
}

/// The checked items of a dataset folder, sorted by file name, with the settings they were
/// scanned with.
#[derive(Debug, Clone)]
pub struct Dataset {
    config: DatasetConfig,
    items: Vec<Item>,
}

impl Dataset {
    /// Reads and checks the whole folder: every image is decoded and every caption tokenized.
    /// Bad files become problems in the report, never errors; the error case is a folder that
    /// cannot be listed or an invalid config. Items with errors are never in the dataset:
    /// check `Preflight::is_fatal` before training.
    pub fn scan(
        cfg: &DatasetConfig,
        buckets: &[Buckets],
        tokenizer: &PromptTokenizer,
    ) -> Result<(Self, Preflight)> {
        cfg.validate()?;
        if let Some(dir) = cfg.masks.as_deref().filter(|d| !d.is_dir()) {
            return Err(Error::bad_file(
                dir,
                "[dataset] masks is not a folder (it holds one mask per image, named like the image)",
            ));
        }
        let listing = Listing::read(&cfg.path, &cfg.caption_extension)?;
        let mut problems = Vec::new();
        let mut items = Vec::new();
        let mut pictures = Vec::new();
        for images in listing.images.values() {
            if let [image] = images.as_slice() {
                let check = ItemCheck {
                    cfg,
                    buckets,
                    tokenizer,
                    beside: &listing.masks,
                };
                if let Some((item, picture)) = check.run(image, &mut problems) {
                    items.push(item);
                    pictures.push(picture);
                }
            } else {
                duplicates(images, &mut problems);
            }
        }
        same_pictures(&items, &pictures, &mut problems);
        for caption in &listing.captions {
            let has_image = caption
                .file_stem()
                .is_some_and(|s| listing.images.contains_key(s));
            if !has_image {
                let kind = ProblemKind::OrphanCaption;
                push(&mut problems, caption.clone(), kind, Severity::Warning);
            }
        }
        for (stem, masks) in &listing.masks {
            if !listing.images.contains_key(stem) {
                for mask in masks {
                    let kind = ProblemKind::OrphanMask;
                    push(&mut problems, mask.clone(), kind, Severity::Warning);
                }
            }
        }
        let masked = items.iter().filter(|i| i.mask.is_some()).count();
        if let (Some(dir), 0) = (&cfg.masks, masked) {
            let kind = ProblemKind::NoMaskMatches;
            push(&mut problems, dir.clone(), kind, Severity::Warning);
        }
        problems.sort_by(|a, b| a.file.cmp(&b.file));
        let report = Preflight {
            root: cfg.path.clone(),
            images: listing.images.values().map(Vec::len).sum(),
            usable: items.len(),
            masked,
            ignored: listing.ignored,
            problems,
            skip: cfg.skip_problems,
        };
        let dataset = Self {
            config: cfg.clone(),
            items,
        };
        Ok((dataset, report))
    }

    pub fn root(&self) -> &Path {
        &self.config.path
    }

    pub fn config(&self) -> &DatasetConfig {
        &self.config
    }

    pub fn items(&self) -> &[Item] {
        &self.items
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// Images that decode to the same pixels, each reported with the next of its group.
fn same_pictures(items: &[Item], pictures: &[blake3::Hash], problems: &mut Vec<Problem>) {
    let mut groups: BTreeMap<[u8; 32], Vec<PathBuf>> = BTreeMap::new();
    for (item, picture) in items.iter().zip(pictures) {
        groups
            .entry(*picture.as_bytes())
            .or_default()
            .push(item.image.clone());
    }
    for group in groups.values().filter(|g| g.len() > 1) {
        for (i, image) in group.iter().enumerate() {
            let other = group[(i + 1) % group.len()].clone();
            let kind = ProblemKind::DuplicateImage { other };
            push(problems, image.clone(), kind, Severity::Warning);
        }
    }
}

fn duplicates(images: &[PathBuf], problems: &mut Vec<Problem>) {
    for (i, image) in images.iter().enumerate() {
        let other = images[(i + 1) % images.len()].clone();
        let kind = ProblemKind::DuplicateStem { other };
        push(problems, image.clone(), kind, Severity::Error);
    }
}

/// The training images of a folder by file stem, as `Dataset::scan` finds them (its image
/// formats, hidden files skipped); more than one image per stem would share a caption.
pub fn images_by_stem(dir: &Path) -> Result<BTreeMap<OsString, Vec<PathBuf>>> {
    Ok(Listing::read(dir, "txt")?.images)
}

/// A mask beside its image is `NAME.mask.png` (any image extension) for image `NAME.*`.
const MASK_SUFFIX: &str = ".mask";

/// The folder's entries, sorted.
struct Listing {
    /// Image files by stem; more than one per stem is a duplicate.
    images: BTreeMap<OsString, Vec<PathBuf>>,
    captions: BTreeSet<PathBuf>,
    /// `NAME.mask.*` files by the stem of the image they belong to (more than one is an
    /// error).
    masks: BTreeMap<OsString, Vec<PathBuf>>,
    ignored: usize,
}

impl Listing {
    fn read(dir: &Path, caption_extension: &str) -> Result<Self> {
        let paths = crate::fsutil::sorted_entries(dir)?;
        let mut listing = Self {
            images: BTreeMap::new(),
            captions: BTreeSet::new(),
            masks: BTreeMap::new(),
            ignored: 0,
        };
        for path in paths {
            listing.add(path, caption_extension);
        }
        Ok(listing)
    }

    fn add(&mut self, path: PathBuf, caption_extension: &str) {
        // Hidden files include macOS "._x.png" resource forks, which look like broken images.
        let hidden = path
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stem = path.file_stem().map(OsString::from);
        match stem {
            Some(stem) if !hidden && path.is_file() => {
                let image = IMAGE_EXTENSIONS.iter().any(|e| ext.eq_ignore_ascii_case(e));
                let mask_of = stem
                    .to_str()
                    .and_then(|s| s.strip_suffix(MASK_SUFFIX))
                    .map(OsString::from);
                if let (true, Some(of)) = (image, mask_of) {
                    self.masks.entry(of).or_default().push(path);
                } else if image {
                    self.images.entry(stem).or_default().push(path);
                } else if ext == caption_extension {
                    self.captions.insert(path);
                } else {
                    self.ignored += 1;
                }
            }
            _ => self.ignored += 1,
        }
    }
}

/// The checks of one image and its caption; every problem is recorded, not just the first.
struct ItemCheck<'a> {
    cfg: &'a DatasetConfig,
    buckets: &'a [Buckets],
    tokenizer: &'a PromptTokenizer,
    /// The dataset folder's `NAME.mask.*` files.
    beside: &'a BTreeMap<OsString, Vec<PathBuf>>,
}

impl ItemCheck<'_> {
    /// The item, and a hash of its decoded pixels (to find copies under other names).
    fn run(&self, image: &Path, problems: &mut Vec<Problem>) -> Option<(Item, blake3::Hash)> {
        let caption = self.caption(image, problems);
        let decoded = self.image_size(image, problems);
        let (caption, ((width, height), picture)) = (caption?, decoded?);
        let mask = match self.mask_files(image).as_slice() {
            [] => None,
            [mask] => Some(check_mask(mask, (width, height), problems)?),
            [mask, other, ..] => {
                let kind = ProblemKind::DuplicateMask {
                    other: other.clone(),
                };
                push(problems, mask.clone(), kind, Severity::Error);
                return None;
            }
        };
        let item = Item {
            image: image.to_path_buf(),
            caption,
            width,
            height,
            buckets: self
                .buckets
                .iter()
                .map(|b| b.assign(width, height))
                .collect(),
            mask,
        };
        Some((item, picture))
    }

    /// The image's mask files (one, or none): with `masks = DIR`, `DIR/<image file name>`,
    /// else `DIR/<stem>.png`; otherwise every `<stem>.mask.*` beside the image.
    fn mask_files(&self, image: &Path) -> Vec<PathBuf> {
        let (Some(stem), Some(name)) = (image.file_stem(), image.file_name()) else {
            return Vec::new();
        };
        match &self.cfg.masks {
            Some(dir) => {
                let png = dir.join(stem).with_extension("png");
                [dir.join(name), png]
                    .into_iter()
                    .find(|p| p.is_file())
                    .into_iter()
                    .collect()
            }
            None => self.beside.get(stem).cloned().unwrap_or_default(),
        }
    }

    fn caption(&self, image: &Path, problems: &mut Vec<Problem>) -> Option<String> {
        let path = image.with_extension(&self.cfg.caption_extension);
        let text = if path.is_file() {
            caption_file(&path, problems)?
        } else {
            self.missing_caption(image, &path, problems)?
        };
        let caption = self.cfg.caption_with_trigger(&text);
        let max = self.tokenizer.max_tokens();
        let kind = match self.tokenizer.reaches_limit(&caption) {
            Ok(false) => return Some(caption),
            Ok(true) => ProblemKind::CaptionTooLong { max },
            Err(e) => ProblemKind::CaptionUnreadable(e.to_string()),
        };
        // A caption past the limit is reported on its file (the image's when there is none).
        let file = if path.is_file() {
            path
        } else {
            image.to_path_buf()
        };
        push(problems, file, kind, Severity::Error);
        None
    }

    /// The caption of an image without a caption file, if the policy gives it one.
    fn missing_caption(
        &self,
        image: &Path,
        expected: &Path,
        problems: &mut Vec<Problem>,
    ) -> Option<String> {
        let read_as_empty = self.cfg.missing_caption == MissingCaption::Empty;
        let kind = ProblemKind::MissingCaption {
            expected: expected.to_path_buf(),
            read_as_empty,
        };
        // The problem is the image's: its caption file does not exist to be named.
        if read_as_empty {
            push(problems, image.to_path_buf(), kind, Severity::Warning);
            Some(String::new())
        } else {
            push(problems, image.to_path_buf(), kind, Severity::Error);
            None
        }
    }

    /// The decoded image's size and a hash of its pixels, or None with the problem recorded.
    fn image_size(
        &self,
        image: &Path,
        problems: &mut Vec<Problem>,
    ) -> Option<((u32, u32), blake3::Hash)> {
        let mut report = |kind| push(problems, image.to_path_buf(), kind, Severity::Error);
        let decoded = crate::fsutil::read_regular(image)
            .map_err(|e| Decode::Failed(e.to_string()))
            .and_then(|bytes| decode_image(&bytes));
        let (width, height, picture) = match decoded {
            Ok(img) => (img.width(), img.height(), pixel_hash(&img)),
            Err(Decode::TooLarge { width, height }) => {
                report(ProblemKind::TooLarge { width, height });
                return None;
            }
            Err(Decode::Failed(msg)) => {
                report(ProblemKind::Unreadable(msg));
                return None;
            }
        };
        let min_side = self.cfg.min_side();
        if width.min(height) < min_side {
            report(ProblemKind::TooSmall {
                width,
                height,
                min_side,
            });
            return None;
        }
        Some(((width, height), picture))
    }
}

/// The decoded pixels' hash: equal for copies of one picture whatever their names or
/// containers, as long as the pixels and their layout are the same.
fn pixel_hash(img: &DynamicImage) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&img.width().to_le_bytes());
    hasher.update(&img.height().to_le_bytes());
    hasher.update(format!("{:?}", img.color()).as_bytes());
    hasher.update(img.as_bytes());
    hasher.finalize()
}

/// `mask` decodes and has the image's aspect ratio (to within a pixel, so a mask painted at a
/// smaller scale fits); otherwise the problem is recorded on the mask file.
fn check_mask(mask: &Path, image: (u32, u32), problems: &mut Vec<Problem>) -> Option<PathBuf> {
    let decoded = crate::fsutil::read_regular(mask)
        .map_err(|e| Decode::Failed(e.to_string()))
        .and_then(|bytes| decode_image(&bytes));
    let kind = match decoded {
        Err(e) => ProblemKind::MaskUnreadable(e.to_string()),
        Ok(m) if !same_aspect((m.width(), m.height()), image) => ProblemKind::MaskMismatch {
            mask: (m.width(), m.height()),
            image,
        },
        Ok(_) => return Some(mask.to_path_buf()),
    };
    push(problems, mask.to_path_buf(), kind, Severity::Error);
    None
}

/// The mask's height, scaled to the image's width, is the image's height within a pixel.
fn same_aspect((mw, mh): (u32, u32), (iw, ih): (u32, u32)) -> bool {
    let scaled = f64::from(mh) * f64::from(iw) / f64::from(mw.max(1));
    (scaled - f64::from(ih)).abs() <= 1.0
}

fn push(problems: &mut Vec<Problem>, file: PathBuf, kind: ProblemKind, severity: Severity) {
    problems.push(Problem {
        file,
        kind,
        severity,
    });
}

/// The text of an existing caption file, or None after reporting why it cannot be used.
fn caption_file(path: &Path, problems: &mut Vec<Problem>) -> Option<String> {
    match read_caption(path) {
        Ok(text) if text.is_empty() => {
            let kind = ProblemKind::EmptyCaption;
            push(problems, path.to_path_buf(), kind, Severity::Warning);
            Some(text)
        }
        Ok(text) => Some(text),
        Err(msg) => {
            let kind = ProblemKind::CaptionUnreadable(msg);
            push(problems, path.to_path_buf(), kind, Severity::Error);
            None
        }
    }
}

/// The caption file's text, trimmed, without a byte-order mark.
fn read_caption(path: &Path) -> std::result::Result<String, String> {
    crate::fsutil::check_regular(path, crate::fsutil::MAX_TEXT_BYTES).map_err(|e| e.to_string())?;
    let bytes = std::fs::read(path).map_err(|e| e.to_string())?;
    let text = String::from_utf8(bytes).map_err(|e| {
        format!(
            "not UTF-8 text (bad byte at {})",
            e.utf8_error().valid_up_to()
        )
    })?;
    Ok(text.trim_start_matches('\u{feff}').trim().to_string())
}

/// The most pixels a training image may have: PIL's decompression-bomb limit, 2³⁰ / 4 / 3,
/// so that the f32 RGB copy the bucket resize works on stays within 1 GiB.
pub const MAX_IMAGE_PIXELS: u64 = (1 << 30) / 4 / 3;

/// Why image bytes did not decode.
#[derive(Debug, Clone, PartialEq)]
pub enum Decode {
    /// The header's size is beyond [`MAX_IMAGE_PIXELS`]; nothing was decoded.
    TooLarge {
        width: u32,
        height: u32,
    },
    Failed(String),
}

impl From<image::ImageError> for Decode {
    fn from(e: image::ImageError) -> Self {
        Decode::Failed(e.to_string())
    }
}

impl From<String> for Decode {
    fn from(msg: String) -> Self {
        Decode::Failed(msg)
    }
}

impl std::fmt::Display for Decode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decode::TooLarge { width, height } => write!(
                f,
                "{width}×{height} is more than {MAX_IMAGE_PIXELS} pixels, the limit for a training image"
            ),
            Decode::Failed(msg) => f.write_str(msg),
        }
    }
}

/// Decodes image bytes of any supported format (found from the content, not the extension)
/// and applies the EXIF orientation, so phone photos train upright. The size is read from
/// the header first: an image beyond [`MAX_IMAGE_PIXELS`] is refused before any pixel
/// buffer is allocated, and the decoder's own allocations are capped as well.
pub fn decode_image(bytes: &[u8]) -> std::result::Result<DynamicImage, Decode> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| Decode::Failed(e.to_string()))?;
    let mut limits = image::Limits::default();
    // 8 bytes per pixel covers 16-bit RGBA, the widest buffer a decoder fills.
    limits.max_alloc = Some(MAX_IMAGE_PIXELS * 8);
    reader.limits(limits);
    let mut decoder = reader.into_decoder()?;
    let (width, height) = decoder.dimensions();
    if u64::from(width) * u64::from(height) > MAX_IMAGE_PIXELS {
        return Err(Decode::TooLarge { width, height });
    }
    let orientation = decoder.orientation()?;
    let mut img = DynamicImage::from_decoder(decoder)?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// Reads and decodes one image file; errors name the file.
pub fn open_image(path: &Path) -> Result<DynamicImage> {
    let bytes = crate::fsutil::read_regular(path)?;
    decode_image(&bytes).map_err(|e| Error::bad_file(path, format!("cannot decode image: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_is_added_once_and_replaced_by_the_class_only_as_a_word() {
        let mut cfg = DatasetConfig::new("x");
        cfg.trigger = Some("zk".into());
        assert_eq!(cfg.caption_with_trigger("a photo"), "zk, a photo");
        assert_eq!(cfg.caption_with_trigger("a photo of zk."), "a photo of zk.");
        assert_eq!(cfg.caption_with_trigger("zk"), "zk");
        assert_eq!(cfg.caption_with_trigger("zkchar, hat"), "zk, zkchar, hat");
        assert_eq!(cfg.caption_with_trigger("Zk smiling"), "zk, Zk smiling");
        assert_eq!(cfg.caption_with_trigger(""), "zk");
        let class = |c: &str| cfg.caption_with_class(c, "woman");
        assert_eq!(class("zk, a photo").as_deref(), Some("woman, a photo"));
        assert_eq!(
            class("zk, zkchar with zk's hat, Zk").as_deref(),
            Some("woman, zkchar with woman's hat, Zk")
        );
        assert_eq!(class("zk").as_deref(), Some("woman"));
        cfg.trigger = None;
        assert_eq!(cfg.caption_with_trigger("a photo"), "a photo");
        assert_eq!(cfg.caption_with_class("a photo", "woman"), None);
    }

    #[test]
    fn config_defaults_and_validation() {
        let cfg = DatasetConfig::new("d");
        assert!(cfg.validate().is_ok());
        assert_eq!(cfg.min_side(), 512);
        assert_eq!(cfg.cache_dir(), Path::new("d/.zlora-cache"));
        for bad in [
            DatasetConfig {
                caption_dropout: 1.0,
                ..cfg.clone()
            },
            DatasetConfig {
                repeats: 0,
                ..cfg.clone()
            },
            DatasetConfig {
                caption_extension: ".txt".into(),
                ..cfg.clone()
            },
            DatasetConfig {
                trigger: Some(" zk".into()),
                ..cfg.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
