//! `zlora caption` (docs/caption.md): captions with a local Qwen3-VL Instruct model, at
//! parity with transformers' `Qwen3VLForConditionalGeneration` + `Qwen3VLProcessor`.
//!
//! `config` reads the model's config files, `preprocess` turns an image into the processor's
//! `pixel_values`, `vision` and `text` are the two halves of the model, `job` captions a
//! dataset folder. Here: the model folder, the prompt, the M-RoPE positions and decoding.

pub mod config;
pub mod job;
pub mod preprocess;
pub mod sheet;
pub mod text;
pub mod vision;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use tokenizers::Tokenizer;

use self::config::{ProcessorConfig, VlmConfig};
use self::preprocess::PixelPatches;
use self::text::{ImageInputs, TextModel};
use self::vision::VisionModel;
use crate::nn::{Linear, Quantization};
use crate::{Error, Result};

/// A Qwen3-VL model folder (config.json, preprocessor_config.json, tokenizer.json, weights),
/// by path or by repo id in the local Hugging Face cache.
#[derive(Debug, Clone)]
pub struct VlmFolder {
    root: PathBuf,
}

const FILES: [&str; 3] = ["config.json", "preprocessor_config.json", "tokenizer.json"];

impl VlmFolder {
    pub fn open(spec: &str) -> Result<Self> {
        let path = PathBuf::from(spec);
        let root = if path.is_dir() {
            path
        } else {
            let cache = crate::model::folder::hf_cache();
            let config = cache.model(spec.to_string()).get("config.json");
            match config.as_deref().and_then(Path::parent) {
                Some(root) => root.to_path_buf(),
                None => {
                    return Err(Error::bad_file(
                        &path,
                        format!(
                            "not a model folder, and no repo of that id in the Hugging Face cache at {}",
                            cache.path().display()
                        ),
                    ))
                }
            }
        };
        if let Some(missing) = FILES.iter().find(|f| !root.join(f).is_file()) {
            return Err(Error::bad_file(
                &root,
                format!("not a Qwen3-VL model folder: no {missing} (zlora fetch qwen3-vl-4b, or point --model at a Qwen3-VL Instruct folder)"),
            ));
        }
        Ok(Self { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> Result<VlmConfig> {
        VlmConfig::from_file(&self.root.join("config.json"))
    }

    pub fn processor(&self) -> Result<ProcessorConfig> {
        ProcessorConfig::from_file(&self.root.join("preprocessor_config.json"))
    }

    pub fn tokenizer_file(&self) -> PathBuf {
        self.root.join("tokenizer.json")
    }

    /// The ids that end an answer: generation_config.json's `eos_token_id`, else `<|im_end|>`.
    fn stop_tokens(&self, tokenizer: &Tokenizer) -> Result<Vec<u32>> {
        let path = self.root.join("generation_config.json");
        if path.is_file() {
            let value: serde_json::Value = serde_json::from_str(&crate::fsutil::read_text(&path)?)
                .map_err(|e| Error::bad_file(&path, format!("not JSON: {e}")))?;
            let ids = match &value["eos_token_id"] {
                serde_json::Value::Array(a) => a.iter().filter_map(|v| v.as_u64()).collect(),
                v => v.as_u64().into_iter().collect::<Vec<_>>(),
            };
            if !ids.is_empty() {
                return Ok(ids.into_iter().map(|i| i as u32).collect());
            }
        }
        let end = tokenizer
            .token_to_id("<|im_end|>")
            .ok_or_else(|| Error::bad_file(self.tokenizer_file(), "has no <|im_end|> token"))?;
        Ok(vec![end])
    }
}

/// Prompts left-padded to one length: ids (B × L, sequence after sequence), each sequence's
/// padding, M-RoPE positions and decoding delta.
#[derive(Default)]
struct Batch {
    ids: Vec<u32>,
    pads: Vec<usize>,
    positions: Vec<[Vec<i64>; 3]>,
    deltas: Vec<i64>,
}

/// How tokens are picked: greedy, or sampled at `temperature` from a seeded stream.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decoding {
    pub max_tokens: usize,
    pub temperature: Option<f64>,
    pub seed: u64,
}

/// A loaded Qwen3-VL: the vision tower, the text decoder, the tokenizer and the processor.
pub struct Captioner {
    vision: VisionModel,
    text: TextModel,
    tokenizer: Tokenizer,
    processor: ProcessorConfig,
    cfg: VlmConfig,
    stop: Vec<u32>,
    dtype: DType,
    device: Device,
}

impl Captioner {
    /// The model in `dtype` on `device`; with `quantize`, the Linears of the vision blocks,
    /// the mergers and the decoder layers are stored in that format (nn/quant.rs), each as
    /// soon as it is read.
    pub fn load(
        folder: &VlmFolder,
        dtype: DType,
        device: &Device,
        quantize: Option<Quantization>,
    ) -> Result<Self> {
        let cfg = folder.config()?;
        let processor = folder.processor()?;
        processor
            .check_against(&cfg.vision)
            .map_err(|msg| Error::bad_file(folder.root().join("preprocessor_config.json"), msg))?;
        let tokenizer = Tokenizer::from_bytes(crate::fsutil::read_regular(
            &folder.tokenizer_file(),
        )?)
        .map_err(|e| {
            Error::bad_file(
                folder.tokenizer_file(),
                format!("not a tokenizer.json: {e}"),
            )
        })?;
        let stop = folder.stop_tokens(&tokenizer)?;
        let files = crate::model::weights::component_files(folder.root())?;
        let vb = crate::model::weights::plain_var_builder(&files, dtype, device)?;
        let load = || -> Result<(VisionModel, TextModel)> {
            let vision = VisionModel::new(&cfg.vision, vb.pp("model.visual"), quantize)?;
            let text = TextModel::new(&cfg.text, cfg.tie_word_embeddings, vb.clone(), quantize)?;
            Ok((vision, text))
        };
        let (vision, text) = load().map_err(|e| e.in_file(folder.root()))?;
        Ok(Self {
            vision,
            text,
            tokenizer,
            processor,
            cfg,
            stop,
            dtype,
            device: device.clone(),
        })
    }

    /// Caps the resized image area below the processor's `max_pixels` (Qwen3-VL's is
    /// 16.8 M pixels: a 4K photo becomes 32 k patches, whose attention scores alone would
    /// take tens of GB). Images under the cap are processed exactly as the reference does.
    pub fn limit_pixels(&mut self, max_pixels: usize) -> Result<()> {
        let min = self.processor.min_pixels;
        if max_pixels < min {
            return Err(Error::Invalid(format!(
                "--max-pixels {max_pixels} is below the processor's min_pixels {min}"
            )));
        }
        self.processor.max_pixels = self.processor.max_pixels.min(max_pixels);
        Ok(())
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The processor's `pixel_values` and grid for one image.
    pub fn pixels(&self, img: &RgbImage) -> Result<PixelPatches> {
        preprocess::pixel_patches(img, &self.processor)
    }

    /// The prompt's ids: Qwen3-VL Instruct's chat template for one user turn (the image,
    /// then the instruction) and the assistant's turn, with the image placeholder repeated
    /// once per merged patch, as `Qwen3VLProcessor` expands it.
    pub fn prompt_ids(&self, instruction: &str, grid: [usize; 3]) -> Result<Vec<u32>> {
        let token = |id: u32| {
            self.tokenizer.id_to_token(id).ok_or_else(|| {
                Error::Invalid(format!(
                    "the tokenizer has no token {id} that config.json names"
                ))
            })
        };
        let merged = grid.iter().product::<usize>() / self.cfg.vision.spatial_merge_size.pow(2);
        let text = format!(
            "<|im_start|>user\n{}{}{}{instruction}<|im_end|>\n<|im_start|>assistant\n",
            token(self.cfg.vision_start_token_id)?,
            token(self.cfg.image_token_id)?.repeat(merged),
            token(self.cfg.vision_end_token_id)?,
        );
        let encoding = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| Error::Invalid(format!("cannot tokenize the prompt: {e}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// The first step: the logits (vocab, f32) after the whole prompt. Clears the cache.
    pub fn prefill(&mut self, pixels: &PixelPatches, ids: &[u32]) -> Result<Tensor> {
        let batch = self.batch(&[ids.to_vec()], &[pixels.grid]);
        Ok(self
            .prefill_batch(std::slice::from_ref(pixels), &batch)?
            .squeeze(0)?)
    }

    /// The prompts left-padded to the longest, with their M-RoPE positions (padding at 0, as
    /// `get_rope_index` leaves it under an attention mask).
    fn batch(&self, prompts: &[Vec<u32>], grids: &[[usize; 3]]) -> Batch {
        let len = prompts.iter().map(Vec::len).max().unwrap_or(0);
        // Never seen: padding is masked out as a key; any id that is no image placeholder.
        let pad_id = self.stop[0];
        let mut batch = Batch {
            ids: Vec::with_capacity(prompts.len() * len),
            ..Batch::default()
        };
        for (ids, &grid) in prompts.iter().zip(grids) {
            let pad = len - ids.len();
            let (positions, delta) = self.positions(ids, grid);
            batch
                .ids
                .extend(std::iter::repeat_n(pad_id, pad).chain(ids.iter().copied()));
            batch
                .positions
                .push(positions.map(|axis| std::iter::repeat_n(0, pad).chain(axis).collect()));
            batch.pads.push(pad);
            batch.deltas.push(delta);
        }
        batch
    }

    /// The logits (B, vocab, f32) after each padded prompt: the vision tower over all the
    /// images (each attending within itself), their rows placed at the placeholders of their
    /// own prompt. Clears the cache.
    fn prefill_batch(&mut self, pixels: &[PixelPatches], batch: &Batch) -> Result<Tensor> {
        self.text.clear_cache();
        let patches: usize = pixels.iter().map(PixelPatches::patches).sum();
        let patch_dim = pixels.first().map_or(0, |p| p.patch_dim);
        let values: Vec<f32> = pixels
            .iter()
            .flat_map(|p| p.values.iter().copied())
            .collect();
        let values =
            Tensor::from_vec(values, (patches, patch_dim), &self.device)?.to_dtype(self.dtype)?;
        let grids: Vec<[usize; 3]> = pixels.iter().map(|p| p.grid).collect();
        let features = self.vision.forward(&values, &grids)?;
        let (rows, deepstack_rows) =
            image_rows(&batch.ids, self.cfg.image_token_id, features.embeds.dim(0)?)?;
        let total = batch.ids.len();
        let rows = Tensor::from_vec(rows, total, &self.device)?;
        let deepstack_rows = Tensor::from_vec(deepstack_rows, total, &self.device)?;
        let shape = (batch.pads.len(), total / batch.pads.len().max(1));
        let ids = Tensor::from_slice(&batch.ids, shape, &self.device)?;
        let image = ImageInputs {
            rows: &rows,
            deepstack_rows: &deepstack_rows,
            embeds: &features.embeds,
            deepstack: &features.deepstack,
        };
        self.text
            .forward(&ids, &batch.positions, &batch.pads, Some(image))
    }

    /// Generated ids (stop token excluded) for one image and instruction.
    pub fn generate(
        &mut self,
        img: &RgbImage,
        instruction: &str,
        decoding: &Decoding,
    ) -> Result<Vec<u32>> {
        let mut out = self.generate_batch(std::slice::from_ref(img), instruction, decoding)?;
        Ok(out.remove(0))
    }

    /// Generated ids for several images in one batch: prompts left-padded, decoded together
    /// until each has stopped. Each image draws from its own stream seeded with
    /// `decoding.seed`, so an image gets the tokens it would get alone.
    pub fn generate_batch(
        &mut self,
        imgs: &[RgbImage],
        instruction: &str,
        decoding: &Decoding,
    ) -> Result<Vec<Vec<u32>>> {
        if imgs.is_empty() {
            return Ok(Vec::new());
        }
        let pixels: Vec<PixelPatches> =
            imgs.iter().map(|i| self.pixels(i)).collect::<Result<_>>()?;
        let prompts: Vec<Vec<u32>> = pixels
            .iter()
            .map(|p| self.prompt_ids(instruction, p.grid))
            .collect::<Result<_>>()?;
        let grids: Vec<[usize; 3]> = pixels.iter().map(|p| p.grid).collect();
        let batch = self.batch(&prompts, &grids);
        let mut logits = self.prefill_batch(&pixels, &batch)?;
        let mut rngs: Vec<_> = imgs
            .iter()
            .map(|_| rand_chacha::ChaCha8Rng::seed_from_u64(decoding.seed))
            .collect();
        let mut out = vec![Vec::new(); imgs.len()];
        let mut done = vec![false; imgs.len()];
        loop {
            let mut step = Vec::with_capacity(imgs.len());
            for (b, row) in logits.to_vec2::<f32>()?.iter().enumerate() {
                if done[b] {
                    // A finished sequence keeps its slot; what it is fed is never read.
                    step.push(self.stop[0]);
                    continue;
                }
                let next = pick(row, decoding.temperature, &mut rngs[b]);
                done[b] = self.stop.contains(&next);
                if !done[b] {
                    out[b].push(next);
                    done[b] = out[b].len() == decoding.max_tokens;
                }
                step.push(next);
            }
            if done.iter().all(|&d| d) {
                break;
            }
            // Past the prompt every axis advances together: the sequence's own (unpadded)
            // length plus its prompt's delta.
            let cached = self.text.cached();
            let positions: Vec<[Vec<i64>; 3]> = batch
                .pads
                .iter()
                .zip(&batch.deltas)
                .map(|(&pad, &delta)| {
                    let p = (cached - pad) as i64 + delta;
                    [vec![p], vec![p], vec![p]]
                })
                .collect();
            let step = Tensor::from_vec(step, (imgs.len(), 1), &self.device)?;
            logits = self.text.forward(&step, &positions, &batch.pads, None)?;
        }
        self.text.clear_cache();
        Ok(out)
    }

    /// Generated texts for several images in one batch, special tokens dropped and
    /// whitespace trimmed.
    pub fn captions(
        &mut self,
        imgs: &[RgbImage],
        instruction: &str,
        decoding: &Decoding,
    ) -> Result<Vec<String>> {
        let answers = self.generate_batch(imgs, instruction, decoding)?;
        answers
            .iter()
            .map(|ids| {
                let text = self
                    .tokenizer
                    .decode(ids, true)
                    .map_err(|e| Error::Invalid(format!("cannot decode the answer: {e}")))?;
                Ok(text.trim().to_string())
            })
            .collect()
    }

    fn positions(&self, ids: &[u32], grid: [usize; 3]) -> ([Vec<i64>; 3], i64) {
        rope_positions(
            ids,
            self.cfg.image_token_id,
            grid,
            self.cfg.vision.spatial_merge_size,
        )
    }
}

/// A checkpoint Linear at `vb`, its weight stored as `quantize` when given.
fn linear(
    inp: usize,
    out: usize,
    bias: bool,
    vb: candle_nn::VarBuilder,
    quantize: Option<Quantization>,
) -> Result<Linear> {
    Ok(Linear::load((inp, out), bias, quantize, &vb)?)
}

/// For each prompt position (over the batch, sequence after sequence), its row in [token
/// embeddings; image rows] and in [zero; DeepStack rows]. The placeholders must be exactly as
/// many as the image rows.
fn image_rows(ids: &[u32], image_token: u32, image_rows: usize) -> Result<(Vec<u32>, Vec<u32>)> {
    let len = ids.len() as u32;
    let mut k = 0u32;
    let mut rows = Vec::with_capacity(ids.len());
    let mut deepstack = Vec::with_capacity(ids.len());
    for (l, &id) in ids.iter().enumerate() {
        if id == image_token {
            rows.push(len + k);
            deepstack.push(1 + k);
            k += 1;
        } else {
            rows.push(l as u32);
            deepstack.push(0);
        }
    }
    if k as usize != image_rows {
        return Err(Error::Invalid(format!(
            "the prompt has {k} image placeholders for {image_rows} image features"
        )));
    }
    Ok((rows, deepstack))
}

/// transformers' `get_rope_index` for one image: text runs count up on all three axes; a run
/// of image placeholders takes (T, H, W) = start + (t, row, column) over the merged grid,
/// and the text after it starts at start + max(rows, columns). Also returns the delta that
/// decoding adds to the cache length.
pub fn rope_positions(
    ids: &[u32],
    image_token: u32,
    grid: [usize; 3],
    merge: usize,
) -> ([Vec<i64>; 3], i64) {
    let [t, h, w] = [grid[0], grid[1] / merge, grid[2] / merge];
    let mut pos: [Vec<i64>; 3] = Default::default();
    let mut next = 0i64;
    let mut l = 0;
    while l < ids.len() {
        if ids[l] != image_token {
            pos.iter_mut().for_each(|axis| axis.push(next));
            next += 1;
            l += 1;
            continue;
        }
        let run = ids[l..].iter().take_while(|&&id| id == image_token).count();
        let cells =
            (0..t).flat_map(|ti| (0..h).flat_map(move |hi| (0..w).map(move |wi| (ti, hi, wi))));
        for (ti, hi, wi) in cells.take(run) {
            pos[0].push(next + ti as i64);
            pos[1].push(next + hi as i64);
            pos[2].push(next + wi as i64);
        }
        next += h.max(w) as i64;
        l += run;
    }
    let max = pos.iter().flatten().copied().max().unwrap_or(-1);
    (pos, max + 1 - ids.len() as i64)
}

/// Greedy: the first largest logit (torch.argmax). With a temperature: a draw from
/// softmax(logits / T).
fn pick(logits: &[f32], temperature: Option<f64>, rng: &mut impl Rng) -> u32 {
    let argmax = || {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    let Some(t) = temperature.filter(|&t| t > 0.0) else {
        return argmax();
    };
    let max = logits[argmax() as usize] as f64;
    let weights: Vec<f64> = logits
        .iter()
        .map(|&v| ((v as f64 - max) / t).exp())
        .collect();
    let mut u = rng.random::<f64>() * weights.iter().sum::<f64>();
    for (i, w) in weights.iter().enumerate() {
        if u < *w {
            return i as u32;
        }
        u -= w;
    }
    argmax()
}
