//! Captioning a dataset folder: which images get a caption (the training image rules,
//! existing captions kept unless asked), the instruction per style, the trigger word first,
//! atomic `NAME.txt` writes, and the summary. Refusals happen before any model is loaded.

use std::path::{Path, PathBuf};

use super::{Captioner, Decoding};
use crate::data::dataset::{images_by_stem, open_image};
use crate::model::text::PromptTokenizer;
use crate::{Error, Result};

/// What kind of caption to ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Style {
    /// One detailed paragraph, the usual caption for a style or concept LoRA.
    Natural,
    /// Comma-separated tags.
    Tags,
    /// One short sentence, so that the trigger word carries a character's identity.
    Short,
    /// The trigger word alone; no model is run.
    TriggerOnly,
}

impl Style {
    /// The instruction sent with the image; None for `TriggerOnly`.
    pub fn instruction(self) -> Option<&'static str> {
        match self {
            Style::Natural => Some(
                "Describe this image in one detailed paragraph, as a caption for training a \
                 text-to-image model: the subject, clothing, pose, setting, lighting, colors and \
                 style. Start with the subject; do not start with \"This image\".",
            ),
            Style::Tags => Some(
                "List what is visible in this image as comma-separated tags, most important \
                 first. Answer with the tags only.",
            ),
            Style::Short => {
                Some("Describe this image in one short sentence. Answer with the sentence only.")
            }
            Style::TriggerOnly => None,
        }
    }
}

/// What to do with an image that already has a caption file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Refuse the whole run, naming the files (the default).
    Refuse,
    /// Caption only the images without one.
    Skip,
    /// Replace them (`--force`).
    Overwrite,
}

#[derive(Debug, Clone)]
pub struct CaptionJob {
    pub dir: PathBuf,
    pub style: Style,
    pub trigger: Option<String>,
    /// Replaces the style's instruction.
    pub prompt: Option<String>,
    pub existing: Existing,
    /// Caption but write nothing.
    pub dry_run: bool,
    pub decoding: Decoding,
    /// Images per forward pass.
    pub batch_size: usize,
}

/// One image of the folder and what the job will do with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    pub image: PathBuf,
    pub caption_file: PathBuf,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Caption,
    /// Its caption exists and `--skip-existing` keeps it.
    Skip,
    /// Cannot be captioned (shares its caption file with another image).
    Fail(String),
}

/// What happened to one image.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Captioned {
        caption: String,
        /// Reaches the text encoder's token limit: training would cut its end.
        too_long: bool,
    },
    Skipped,
    Failed(String),
}

/// Totals of a run, with each failure's reason and each caption past the token limit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Summary {
    pub captioned: usize,
    pub skipped: usize,
    pub failed: Vec<(PathBuf, String)>,
    pub too_long: Vec<PathBuf>,
}

impl CaptionJob {
    /// Checks the settings and lists the folder's images with their actions. Existing
    /// captions without `--skip-existing` or `--force` are an error naming them.
    pub fn plan(&self) -> Result<Vec<Planned>> {
        self.check()?;
        let mut planned = Vec::new();
        for images in images_by_stem(&self.dir)?.into_values() {
            for image in &images {
                planned.push(self.plan_one(image, &images));
            }
        }
        if planned.is_empty() {
            return Err(Error::bad_file(
                &self.dir,
                "no images to caption (png, jpg, jpeg, webp)",
            ));
        }
        let existing: Vec<_> = planned
            .iter()
            .filter(|p| p.action == Action::Caption && p.caption_file.exists())
            .collect();
        if let (Existing::Refuse, Some(first)) = (self.existing, existing.first()) {
            return Err(Error::Invalid(format!(
                "{} image(s) already have a caption ({}, ...): pass --skip-existing to caption only \
                 the others, or --force to overwrite them",
                existing.len(),
                crate::error::shown(&first.caption_file)
            )));
        }
        Ok(planned)
    }

    fn check(&self) -> Result<()> {
        if let Some(t) = &self.trigger {
            if t.trim().is_empty() || t.trim() != t || t.contains('\n') {
                return Err(Error::Invalid(format!(
                    "--trigger {t:?}: give one word or phrase without surrounding spaces"
                )));
            }
        }
        if self.style == Style::TriggerOnly && self.trigger.is_none() {
            return Err(Error::Invalid(
                "--style trigger-only needs --trigger WORD".into(),
            ));
        }
        if self.batch_size == 0 {
            return Err(Error::Invalid("--batch-size must be at least 1".into()));
        }
        if self.decoding.max_tokens == 0 {
            return Err(Error::Invalid("--max-tokens must be at least 1".into()));
        }
        if self
            .decoding
            .temperature
            .is_some_and(|t| !(t > 0.0 && t.is_finite()))
        {
            return Err(Error::Invalid(
                "--temperature must be a positive number".into(),
            ));
        }
        Ok(())
    }

    fn plan_one(&self, image: &Path, same_stem: &[PathBuf]) -> Planned {
        let caption_file = image.with_extension("txt");
        let action = if same_stem.len() > 1 {
            let others: Vec<_> = same_stem
                .iter()
                .filter(|p| p.as_path() != image)
                .map(|p| crate::error::shown(p))
                .collect();
            Action::Fail(format!(
                "shares its caption file with {}; rename one",
                others.join(", ")
            ))
        } else if self.existing == Existing::Skip && caption_file.exists() {
            Action::Skip
        } else {
            Action::Caption
        };
        Planned {
            image: image.to_path_buf(),
            caption_file,
            action,
        }
    }

    /// Whether a model is needed at all (not for `trigger-only`).
    pub fn needs_model(&self) -> bool {
        self.instruction().is_some()
    }

    fn instruction(&self) -> Option<&str> {
        match (&self.prompt, self.style) {
            (_, Style::TriggerOnly) => None,
            (Some(p), _) => Some(p),
            (None, style) => style.instruction(),
        }
    }

    /// Captions the planned images, `batch_size` at a time through the model, writing each file
    /// (unless a dry run) and calling `done(index, outcome)` for every image as it finishes.
    /// `model` is needed unless the style is trigger-only; `limit` is the text encoder's
    /// tokenizer. An image that fails (undecodable, or its batch's forward) fails alone in
    /// the summary; the others go on.
    pub fn run(
        &self,
        planned: &[Planned],
        mut model: Option<&mut Captioner>,
        limit: &PromptTokenizer,
        mut done: impl FnMut(usize, &Outcome),
    ) {
        let mut pending = Vec::with_capacity(self.batch_size);
        for (i, p) in planned.iter().enumerate() {
            match &p.action {
                Action::Skip => done(i, &Outcome::Skipped),
                Action::Fail(reason) => done(i, &Outcome::Failed(reason.clone())),
                Action::Caption => pending.push(i),
            }
            let last = i + 1 == planned.len();
            if pending.len() >= self.batch_size || (last && !pending.is_empty()) {
                let items: Vec<&Planned> = pending.iter().map(|&k| &planned[k]).collect();
                let outcomes = self.caption_batch(&items, model.as_deref_mut(), limit);
                for (k, outcome) in pending.drain(..).zip(&outcomes) {
                    done(k, outcome);
                }
            }
        }
    }

    /// Outcomes of one batch, in its order: the images are decoded one by one (an unreadable
    /// one fails alone), the others captioned together.
    fn caption_batch(
        &self,
        items: &[&Planned],
        model: Option<&mut Captioner>,
        limit: &PromptTokenizer,
    ) -> Vec<Outcome> {
        let texts: Vec<Result<String>> = match (self.instruction(), model) {
            (None, _) => items.iter().map(|_| Ok(String::new())).collect(),
            (Some(instruction), Some(model)) => self.answers(items, instruction, model),
            (Some(_), None) => items
                .iter()
                .map(|_| Err(Error::Invalid("no captioning model loaded".into())))
                .collect(),
        };
        items
            .iter()
            .zip(texts)
            .map(
                |(p, text)| match text.and_then(|t| self.finish(p, &t, limit)) {
                    Ok(outcome) => outcome,
                    Err(e) => Outcome::Failed(e.to_string()),
                },
            )
            .collect()
    }

    /// The model's answer for each item: its image's decode error, or its caption. The
    /// readable images are captioned in one batch; if that fails, each of them fails with
    /// its error.
    fn answers(
        &self,
        items: &[&Planned],
        instruction: &str,
        model: &mut Captioner,
    ) -> Vec<Result<String>> {
        let mut readable = Vec::with_capacity(items.len());
        let mut answers: Vec<Option<Result<String>>> = items
            .iter()
            .map(|p| match open_image(&p.image) {
                Ok(img) => {
                    readable.push(super::preprocess::rgb_on_white(&img));
                    None
                }
                Err(e) => Some(Err(e)),
            })
            .collect();
        if !readable.is_empty() {
            let mut captions = match model.captions(&readable, instruction, &self.decoding) {
                Ok(captions) => captions.into_iter().map(Ok).collect::<Vec<_>>(),
                Err(e) => {
                    let msg = e.to_string();
                    let failed = || Err(Error::Invalid(msg.clone()));
                    readable.iter().map(|_| failed()).collect()
                }
            }
            .into_iter();
            for slot in answers.iter_mut().filter(|a| a.is_none()) {
                *slot = captions.next();
            }
        }
        answers
            .into_iter()
            .map(|a| a.expect("one answer per readable image"))
            .collect()
    }

    /// The caption with the trigger first, checked against the token limit and written.
    fn finish(&self, planned: &Planned, text: &str, limit: &PromptTokenizer) -> Result<Outcome> {
        if text.is_empty() && self.instruction().is_some() {
            return Err(Error::Invalid(
                "the model answered with an empty caption".into(),
            ));
        }
        let caption = trigger_first(text, self.trigger.as_deref());
        let too_long = limit.reaches_limit(&caption)?;
        if !self.dry_run {
            let overwrite = self.existing == Existing::Overwrite;
            crate::fsutil::write_atomic(&planned.caption_file, caption.as_bytes(), overwrite)?;
        }
        Ok(Outcome::Captioned { caption, too_long })
    }
}

impl Summary {
    pub fn add(&mut self, planned: &Planned, outcome: &Outcome) {
        match outcome {
            Outcome::Captioned { too_long, .. } => {
                self.captioned += 1;
                if *too_long {
                    self.too_long.push(planned.caption_file.clone());
                }
            }
            Outcome::Skipped => self.skipped += 1,
            Outcome::Failed(reason) => self.failed.push((planned.image.clone(), reason.clone())),
        }
    }
}

/// The caption with the trigger word in front ("TRIGGER, caption"), unless it already starts
/// with it; just the trigger for an empty caption.
pub fn trigger_first(caption: &str, trigger: Option<&str>) -> String {
    let Some(t) = trigger else {
        return caption.to_string();
    };
    let rest = caption.strip_prefix(t);
    let starts = rest.is_some_and(|r| !r.starts_with(|c: char| c.is_alphanumeric() || c == '_'));
    match (caption.is_empty(), starts) {
        (true, _) => t.to_string(),
        (false, true) => caption.to_string(),
        (false, false) => format!("{t}, {caption}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_goes_first_once() {
        assert_eq!(trigger_first("a cat", Some("zk")), "zk, a cat");
        assert_eq!(trigger_first("zk, a cat", Some("zk")), "zk, a cat");
        assert_eq!(trigger_first("zk a cat", Some("zk")), "zk a cat");
        assert_eq!(
            trigger_first("zkchar, a cat", Some("zk")),
            "zk, zkchar, a cat"
        );
        assert_eq!(
            trigger_first("a photo of zk", Some("zk")),
            "zk, a photo of zk"
        );
        assert_eq!(trigger_first("", Some("zk")), "zk");
        assert_eq!(trigger_first("a cat", None), "a cat");
    }
}
