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
    /// Buckets hold about resolution² pixels. Default 1024, Z-Image's native size.
    #[serde(default = "default_resolution")]
    pub resolution: u32,
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

fn default_resolution() -> u32 {
    1024
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
            resolution: default_resolution(),
            trigger: None,
            caption_dropout: default_caption_dropout(),
            repeats: default_repeats(),
            caption_extension: default_caption_extension(),
            min_side: None,
            missing_caption: MissingCaption::default(),
            skip_problems: false,
            cache_dir: None,
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
        Ok(())
    }

    pub fn min_side(&self) -> u32 {
        self.min_side.unwrap_or(self.resolution / 2)
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
}

/// True when `word` occurs in `text` with no letter, digit or underscore right before or
/// after it (so "zk" is not found inside "zkchar").
fn contains_word(text: &str, word: &str) -> bool {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    text.match_indices(word).any(|(at, _)| {
        let before = text[..at].chars().next_back();
        let after = text[at + word.len()..].chars().next();
        !before.is_some_and(is_word) && !after.is_some_and(is_word)
    })
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
    pub bucket: Bucket,
}

/// The checked items of a dataset folder, sorted by file name.
#[derive(Debug, Clone)]
pub struct Dataset {
    root: PathBuf,
    items: Vec<Item>,
}

impl Dataset {
    /// Reads and checks the whole folder: every image is decoded and every caption tokenized.
    /// Bad files become problems in the report, never errors; the error case is a folder that
    /// cannot be listed or an invalid config. Items with errors are never in the dataset:
    /// check `Preflight::is_fatal` before training.
    pub fn scan(
        cfg: &DatasetConfig,
        buckets: &Buckets,
        tokenizer: &PromptTokenizer,
    ) -> Result<(Self, Preflight)> {
        cfg.validate()?;
        let listing = Listing::read(&cfg.path, &cfg.caption_extension)?;
        let mut problems = Vec::new();
        let mut items = Vec::new();
        for images in listing.images.values() {
            if let [image] = images.as_slice() {
                let check = ItemCheck {
                    cfg,
                    buckets,
                    tokenizer,
                };
                if let Some(item) = check.run(image, &mut problems) {
                    items.push(item);
                }
            } else {
                duplicates(images, &mut problems);
            }
        }
        for caption in &listing.captions {
            let has_image = caption
                .file_stem()
                .is_some_and(|s| listing.images.contains_key(s));
            if !has_image {
                let kind = ProblemKind::OrphanCaption;
                push(&mut problems, caption.clone(), kind, Severity::Warning);
            }
        }
        problems.sort_by(|a, b| a.file.cmp(&b.file));
        let report = Preflight {
            root: cfg.path.clone(),
            images: listing.images.values().map(Vec::len).sum(),
            usable: items.len(),
            ignored: listing.ignored,
            problems,
            skip: cfg.skip_problems,
        };
        let dataset = Self {
            root: cfg.path.clone(),
            items,
        };
        Ok((dataset, report))
    }

    pub fn root(&self) -> &Path {
        &self.root
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

/// The folder's entries, sorted.
struct Listing {
    /// Image files by stem; more than one per stem is a duplicate.
    images: BTreeMap<OsString, Vec<PathBuf>>,
    captions: BTreeSet<PathBuf>,
    ignored: usize,
}

impl Listing {
    fn read(dir: &Path, caption_extension: &str) -> Result<Self> {
        let paths = crate::fsutil::sorted_entries(dir)?;
        let mut listing = Self {
            images: BTreeMap::new(),
            captions: BTreeSet::new(),
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
                if IMAGE_EXTENSIONS.iter().any(|e| ext.eq_ignore_ascii_case(e)) {
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
    buckets: &'a Buckets,
    tokenizer: &'a PromptTokenizer,
}

impl ItemCheck<'_> {
    fn run(&self, image: &Path, problems: &mut Vec<Problem>) -> Option<Item> {
        let caption = self.caption(image, problems);
        let size = self.image_size(image, problems);
        let (caption, (width, height)) = (caption?, size?);
        Some(Item {
            image: image.to_path_buf(),
            caption,
            width,
            height,
            bucket: self.buckets.assign(width, height),
        })
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

    fn image_size(&self, image: &Path, problems: &mut Vec<Problem>) -> Option<(u32, u32)> {
        let mut report = |kind| push(problems, image.to_path_buf(), kind, Severity::Error);
        let decoded = crate::fsutil::read_regular(image)
            .map_err(|e| Decode::Failed(e.to_string()))
            .and_then(|bytes| decode_image(&bytes));
        let (width, height) = match decoded {
            Ok(img) => (img.width(), img.height()),
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
        Some((width, height))
    }
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
    fn trigger_is_added_once_and_only_as_a_word() {
        let mut cfg = DatasetConfig::new("x");
        cfg.trigger = Some("zk".into());
        assert_eq!(cfg.caption_with_trigger("a photo"), "zk, a photo");
        assert_eq!(cfg.caption_with_trigger("a photo of zk."), "a photo of zk.");
        assert_eq!(cfg.caption_with_trigger("zk"), "zk");
        assert_eq!(cfg.caption_with_trigger("zkchar, hat"), "zk, zkchar, hat");
        assert_eq!(cfg.caption_with_trigger("Zk smiling"), "zk, Zk smiling");
        assert_eq!(cfg.caption_with_trigger(""), "zk");
        cfg.trigger = None;
        assert_eq!(cfg.caption_with_trigger("a photo"), "a photo");
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
