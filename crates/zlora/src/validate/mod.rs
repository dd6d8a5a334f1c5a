//! Validation: the careful workflow as commands with measured verdicts (docs/validation.md).
//!
//! - [`run::validate`]: one LoRA on Base and Turbo — Base with and without it, Turbo with and
//!   without it at the distilled step count, Turbo + LoRA at a long step count, and with the
//!   DistillPatch — over fixed prompts and seeds, from identical noise per seed.
//! - [`sweep::sweep`]: every checkpoint of a training run on the run's model, with a chart of
//!   the metrics against step and the step that balances effect and sharpness best.
//! - [`arms`]: trainings that share a plan and differ in a few values, each trained and
//!   validated; finished parts are not repeated. [`experiment`] is the workflow's three ways
//!   as arms; [`grid`] (`zlora sweep`) a grid or list of arms, compared by [`compare`]. Both
//!   are an [`arm_set::ArmSet`]: their arms run in this process, one per device or as a Slurm
//!   job array, and the last to finish writes the report.
//!
//! Each loads a model once and switches adapters by name between variants; images keep their
//! parameters in their PNG; reports are single self-contained HTML files.

pub mod arm_set;
pub mod arms;
pub mod chart;
pub mod compare;
pub mod experiment;
pub mod findings;
pub mod grid;
pub mod html;
pub mod metrics;
pub mod plan;
pub mod render;
pub mod run;
pub mod sweep;
pub mod verdicts;

use std::path::{Path, PathBuf};

use crate::fsutil::write_atomic;
use crate::outdir::{OutputDir, Policy, Protected};
use crate::sample::image::{encode_png, save_png, Rgb8};
use crate::sample::sheet::contact_sheet;
use crate::{Error, Result};

/// Sheet cells are scaled down to at most this many pixels a side, so that a sheet of
/// 1024² images stays a size a browser shows whole; metrics use the full images.
const SHEET_CELL: usize = 320;

/// Where the files of one validation or sweep go: `images/p{P}-{variant}-s{seed}.png`,
/// `sheet-p{P}.png` per prompt, `report.html` and `metrics.json` (written last: its presence
/// means the work finished).
pub struct Outputs {
    pub dir: PathBuf,
}

/// Claims a validation's output folder for as long as the guard lives: locked, checked
/// against the inputs, and with `overwrite` (--force) only a folder zlora made.
fn claim_output(dir: &Path, overwrite: bool, inputs: &[Protected]) -> Result<(Outputs, OutputDir)> {
    let policy = if overwrite {
        Policy::Overwrite
    } else {
        Policy::Keep
    };
    let claimed = OutputDir::claim(dir, "validate", inputs, policy)?;
    let out = Outputs {
        dir: claimed.path().to_path_buf(),
    };
    Ok((out, claimed))
}

impl Outputs {
    pub fn report(&self) -> PathBuf {
        self.dir.join("report.html")
    }

    pub fn record(&self) -> PathBuf {
        self.dir.join("metrics.json")
    }

    pub fn sheet(&self, prompt: usize) -> PathBuf {
        self.dir.join(format!("sheet-p{}.png", prompt + 1))
    }

    pub fn image(&self, prompt: usize, variant: &str, seed: u64) -> PathBuf {
        self.dir
            .join("images")
            .join(format!("p{}-{variant}-s{seed}.png", prompt + 1))
    }

    /// Fails, naming the file, if any output of these variants already exists.
    fn refuse_existing(&self, prompts: usize, variants: &[String], seeds: &[u64]) -> Result<()> {
        let mut planned = vec![self.report(), self.record()];
        for p in 0..prompts {
            planned.push(self.sheet(p));
            for v in variants {
                planned.extend(seeds.iter().map(|&s| self.image(p, v, s)));
            }
        }
        refuse_existing(&planned)
    }

    /// Saves one variant's images (prompt-major, then seed), each with `params` plus its
    /// prompt and seed as JSON in the PNG's "parameters".
    fn save_images(
        &self,
        variant: &str,
        params: &serde_json::Value,
        prompts: &[String],
        seeds: &[u64],
        images: &[Rgb8],
    ) -> Result<()> {
        for (i, img) in images.iter().enumerate() {
            let (p, seed) = (i / seeds.len(), seeds[i % seeds.len()]);
            let mut params = params.clone();
            params["prompt"] = prompts[p].clone().into();
            params["seed"] = seed.into();
            params["validation_variant"] = variant.into();
            let text = [("parameters", params.to_string())];
            save_png(&self.image(p, variant, seed), img, &text, true)?;
        }
        Ok(())
    }

    /// Writes the report, then the record (last: it marks the work finished).
    fn finish(&self, html: &str, record: &impl serde::Serialize, overwrite: bool) -> Result<()> {
        write_atomic(&self.report(), html.as_bytes(), overwrite)?;
        let json =
            serde_json::to_string_pretty(record).map_err(|e| Error::Invalid(e.to_string()))?;
        write_atomic(&self.record(), json.as_bytes(), overwrite)
    }

    /// One contact sheet per prompt (rows: the labelled variants, columns: seeds), written
    /// to `sheet-p{P}.png`; returns each sheet's title and PNG bytes for the report.
    fn write_sheets(
        &self,
        prompts: &[String],
        seeds: &[u64],
        rows: &[(String, &[Rgb8])],
        overwrite: bool,
    ) -> Result<Vec<(String, Vec<u8>)>> {
        let labels: Vec<String> = rows.iter().map(|r| r.0.clone()).collect();
        let cols: Vec<String> = seeds.iter().map(|s| format!("seed {s}")).collect();
        let n = seeds.len();
        let mut out = Vec::new();
        for (p, prompt) in prompts.iter().enumerate() {
            let cells = rows
                .iter()
                .map(|r| r.1[p * n..(p + 1) * n].iter().collect())
                .collect();
            let title = format!("prompt {}: {prompt}", p + 1);
            let png = sheet_png(&title, &labels, &cols, cells)?;
            write_atomic(&self.sheet(p), &png, overwrite)?;
            out.push((title, png));
        }
        Ok(out)
    }
}

/// An error naming the first of `paths` that exists (nothing is overwritten without --force).
fn refuse_existing(paths: &[PathBuf]) -> Result<()> {
    match paths.iter().find(|p| p.exists()) {
        Some(p) => Err(Error::bad_file(
            p,
            "already exists (pass --force to overwrite it)",
        )),
        None => Ok(()),
    }
}

/// blake3 of a file's bytes, hex.
pub(crate) fn file_hash(path: &Path) -> Result<String> {
    let bytes = crate::fsutil::read_regular(path)?;
    Ok(blake3::hash(&bytes).to_hex().to_string())
}

/// A labelled contact sheet of `cells[row][col]` (scaled down to [`SHEET_CELL`]) as PNG bytes
/// with the title as its parameters.
fn sheet_png(
    title: &str,
    rows: &[String],
    cols: &[String],
    cells: Vec<Vec<&Rgb8>>,
) -> Result<Vec<u8>> {
    let cells: Vec<Vec<Rgb8>> = cells
        .into_iter()
        .map(|row| row.into_iter().map(|c| thumbnail(c, SHEET_CELL)).collect())
        .collect::<Result<_>>()?;
    let sheet = contact_sheet(title, rows, cols, &cells)?;
    encode_png(&sheet, &[("parameters", title.to_string())])
}

/// `img` scaled down (triangle filter) so that its longer side is at most `max_side`.
fn thumbnail(img: &Rgb8, max_side: usize) -> Result<Rgb8> {
    let long = img.width.max(img.height);
    if long <= max_side {
        return Ok(img.clone());
    }
    let (w, h) = (
        (img.width * max_side / long).max(1),
        (img.height * max_side / long).max(1),
    );
    let src = image::RgbImage::from_raw(img.width as u32, img.height as u32, img.pixels.clone())
        .ok_or_else(|| Error::Invalid("image buffer does not match its size".into()))?;
    let small = image::imageops::resize(
        &src,
        w as u32,
        h as u32,
        image::imageops::FilterType::Triangle,
    );
    Ok(Rgb8 {
        width: w,
        height: h,
        pixels: small.into_raw(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbnails_keep_the_aspect_and_small_images_stay() -> Result<()> {
        let img = Rgb8 {
            width: 640,
            height: 320,
            pixels: vec![7; 640 * 320 * 3],
        };
        let t = thumbnail(&img, 320)?;
        assert_eq!((t.width, t.height), (320, 160));
        assert!(t.pixels.iter().all(|&p| p == 7));
        assert_eq!(thumbnail(&t, 320)?, t);
        Ok(())
    }
}
