//! The check of the whole dataset before step 1: every image decoded, every caption read and
//! tokenized, so that a bad file stops the run at once with a list of everything to fix,
//! instead of crashing hours in.

use std::fmt;
use std::path::{Path, PathBuf};

/// What is wrong with one file.
#[derive(Debug, Clone, PartialEq)]
pub enum ProblemKind {
    /// The image cannot be opened or decoded (corrupt, truncated, not an image).
    Unreadable(String),
    /// The image's shorter side is below `min_side`: it would be upscaled into blur.
    TooSmall {
        width: u32,
        height: u32,
        min_side: u32,
    },
    /// The image header's size is beyond [`super::dataset::MAX_IMAGE_PIXELS`]: decoding it
    /// would take more memory than training images are allowed.
    TooLarge { width: u32, height: u32 },
    /// The image has no caption file of the configured extension; `read_as_empty` under
    /// `missing_caption = "empty"`.
    MissingCaption {
        expected: PathBuf,
        read_as_empty: bool,
    },
    /// The caption file cannot be read as UTF-8 text.
    CaptionUnreadable(String),
    /// The caption file holds only whitespace.
    EmptyCaption,
    /// The templated caption reaches the text encoder's limit of `max` tokens; the tail would
    /// be cut. (The tokenizer truncates, so reaching the limit is all that can be seen.)
    CaptionTooLong { max: usize },
    /// Another image has the same stem, so both would read the same caption file.
    DuplicateStem { other: PathBuf },
    /// Another image decodes to the same pixels (a copy under another name): the picture
    /// would weigh twice in training.
    DuplicateImage { other: PathBuf },
    /// A caption file with no image of the same stem.
    OrphanCaption,
    /// The loss mask cannot be opened or decoded.
    MaskUnreadable(String),
    /// The loss mask's shape is not its image's (width, height).
    MaskMismatch { mask: (u32, u32), image: (u32, u32) },
    /// A `NAME.mask.*` file with no image `NAME.*`.
    OrphanMask,
    /// The `masks` folder holds no mask named like any image.
    NoMaskMatches,
    /// Another `NAME.mask.*` file belongs to the same image.
    DuplicateMask { other: PathBuf },
}

/// How a problem affects the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    /// The item cannot be trained as it is: the run stops, or the item is skipped.
    Error,
    /// Worth knowing; training goes on with the item.
    Warning,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub file: PathBuf,
    pub kind: ProblemKind,
    pub severity: Severity,
}

/// The outcome of the check: counts and every problem found, in file order.
#[derive(Debug, Clone, PartialEq)]
pub struct Preflight {
    pub root: PathBuf,
    /// Image files found (all of them, good or bad).
    pub images: usize,
    /// Images that will be trained.
    pub usable: usize,
    /// Usable images with a loss mask (the others train on every pixel).
    pub masked: usize,
    /// Files and folders that are neither images nor captions, or are hidden.
    pub ignored: usize,
    pub problems: Vec<Problem>,
    /// `skip_problems` was set: errors drop their item instead of stopping the run.
    pub skip: bool,
}

impl Preflight {
    pub fn errors(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
    }

    pub fn warnings(&self) -> impl Iterator<Item = &Problem> {
        self.problems
            .iter()
            .filter(|p| p.severity == Severity::Warning)
    }

    /// True when training must not start: an error without `skip_problems`, or nothing left
    /// to train.
    pub fn is_fatal(&self) -> bool {
        self.usable == 0 || (!self.skip && self.errors().next().is_some())
    }
}

impl fmt::Display for Preflight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let errors = self.errors().count();
        write!(
            f,
            "dataset {}: {} images, {} usable, {} errors, {} warnings, {} other files ignored",
            crate::error::shown(&self.root),
            self.images,
            self.usable,
            errors,
            self.warnings().count(),
            self.ignored
        )?;
        if self.masked > 0 {
            write!(
                f,
                "\n  masks: {} images have one, {} have none (trained on every pixel)",
                self.masked,
                self.usable - self.masked
            )?;
        }
        for p in &self.problems {
            let label = match (p.severity, self.skip) {
                (Severity::Error, false) => "error",
                (Severity::Error, true) => "skipped",
                (Severity::Warning, _) => "warning",
            };
            write!(f, "\n  {label}: {}: {}", name(&self.root, &p.file), p.kind)?;
        }
        if self.usable == 0 {
            write!(f, "\nno image can be trained")?;
        } else if errors > 0 && !self.skip {
            write!(
                f,
                "\nfix these files, or set skip_problems = true in [dataset] to train without them"
            )?;
        }
        Ok(())
    }
}

impl fmt::Display for ProblemKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreadable(msg) => write!(f, "cannot be decoded: {msg}"),
            Self::TooSmall {
                width,
                height,
                min_side,
            } => write!(
                f,
                "{width}×{height} is smaller than min_side {min_side} px (it would be upscaled into blur)"
            ),
            Self::TooLarge { width, height } => write!(
                f,
                "{width}×{height} is more than {} pixels, the limit for a training image \
                 (its f32 RGB copy for resizing would pass 1 GiB); scale it down",
                super::dataset::MAX_IMAGE_PIXELS
            ),
            Self::MissingCaption {
                expected,
                read_as_empty,
            } => {
                write!(f, "no caption file {}", file_name(expected))?;
                if *read_as_empty {
                    write!(f, ": read as empty (missing_caption = \"empty\")")
                } else {
                    write!(f, " (write one, or set missing_caption = \"empty\" to train it on the trigger word alone)")
                }
            }
            Self::CaptionUnreadable(msg) => write!(f, "caption cannot be read: {msg}"),
            Self::EmptyCaption => write!(f, "empty caption: trains on the trigger word alone, or unconditionally without one"),
            Self::CaptionTooLong { max } => write!(
                f,
                "caption reaches the text encoder's limit of {max} tokens (chat template \
                 included): the end would be cut, shorten it"
            ),
            Self::DuplicateStem { other } => write!(
                f,
                "has the same name as {} and would share its caption; rename one",
                file_name(other)
            ),
            Self::DuplicateImage { other } => write!(
                f,
                "is the same picture as {} (identical pixels): it would be trained twice as \
                 often; remove one unless that is meant",
                file_name(other)
            ),
            Self::OrphanCaption => write!(f, "caption without an image of the same name"),
            Self::MaskUnreadable(msg) => write!(f, "mask cannot be decoded: {msg}"),
            Self::MaskMismatch { mask, image } => write!(
                f,
                "mask is {}×{} but its image is {}×{}: a mask must have its image's shape \
                 (the same size, or scaled); repaint or resize it",
                mask.0, mask.1, image.0, image.1
            ),
            Self::OrphanMask => write!(f, "mask without an image of the same name"),
            Self::DuplicateMask { other } => write!(
                f,
                "{} is a mask for the same image; keep one",
                file_name(other)
            ),
            Self::NoMaskMatches => write!(
                f,
                "the masks folder has no mask named like an image (for NAME.jpg: NAME.jpg or \
                 NAME.png); every image trains unmasked"
            ),
        }
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| crate::error::shown(Path::new(n)))
        .unwrap_or_default()
}

/// The file's path relative to the dataset folder, for a short report.
fn name(root: &Path, file: &Path) -> String {
    crate::error::shown(file.strip_prefix(root).unwrap_or(file))
}
