//! `zlora caption` against transformers on the tiny random Qwen3-VL of
//! scripts/make_caption_fixtures.py: pixel values and grid, prompt ids, first-step logits and
//! a 30-token greedy caption, for a wide image (above max_pixels) and a tall one (below
//! min_pixels); and both images in one left-padded batch, against each alone and against
//! transformers' batched `generate`.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use zlora::caption::{Captioner, Decoding, VlmFolder};
use zlora::nn::Quantization;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/caption")
}

struct Reference {
    pixels: Vec<f32>,
    grid: Vec<i64>,
    ids: Vec<u32>,
    logits: Vec<f32>,
    tokens: Vec<u32>,
    prompt: String,
}

fn reference(name: &str) -> Reference {
    let path = fixtures().join(format!("{name}.safetensors"));
    let t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let ints = |k: &str| t[k].to_vec1::<i64>().unwrap();
    let ids = |k: &str| ints(k).into_iter().map(|v| v as u32).collect::<Vec<_>>();
    let prompt: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("prompt.json")).unwrap())
            .unwrap();
    Reference {
        pixels: t["pixel_values"].flatten_all().unwrap().to_vec1().unwrap(),
        grid: t["image_grid_thw"]
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap(),
        ids: ids("input_ids"),
        logits: t["logits"].to_vec1().unwrap(),
        tokens: ids("tokens"),
        prompt: prompt["prompt"].as_str().unwrap().to_string(),
    }
}

fn captioner() -> Captioner {
    let folder = VlmFolder::open(fixtures().join("model").to_str().unwrap()).unwrap();
    Captioner::load(&folder, DType::F32, &Device::Cpu, None).unwrap()
}

fn image(name: &str) -> image::RgbImage {
    let img = zlora::data::dataset::open_image(&fixtures().join(format!("{name}.png"))).unwrap();
    zlora::caption::preprocess::rgb_on_white(&img)
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn check(name: &str) {
    let r = reference(name);
    let mut model = captioner();
    let img = image(name);

    let pixels = model.pixels(&img).unwrap();
    let grid: Vec<i64> = pixels.grid.iter().map(|&g| g as i64).collect();
    assert_eq!(grid, r.grid, "{name}: grid");
    assert_eq!(pixels.values, r.pixels, "{name}: pixel values");

    let ids = model.prompt_ids(&r.prompt, pixels.grid).unwrap();
    assert_eq!(ids, r.ids, "{name}: prompt ids");

    let logits = model
        .prefill(&pixels, &ids)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let scale = r.logits.iter().fold(0f32, |m, v| m.max(v.abs()));
    let rel = max_abs(&logits, &r.logits) / scale;
    eprintln!("{name}: first-step logits, max |Δ| / max |ref| = {rel:.2e}");
    assert!(rel <= 1e-4, "{name}: logits differ by {rel:e} relative");

    let decoding = Decoding {
        max_tokens: 30,
        temperature: None,
        seed: 0,
    };
    let tokens = model.generate(&img, &r.prompt, &decoding).unwrap();
    assert_eq!(tokens, r.tokens, "{name}: greedy tokens");
}

#[test]
fn wide_image_matches_transformers() {
    check("wide");
}

#[test]
fn tall_image_matches_transformers() {
    check("tall");
}

#[test]
fn a_prompt_without_the_image_placeholders_is_refused() {
    let r = reference("tall");
    let mut model = captioner();
    let pixels = model.pixels(&image("tall")).unwrap();
    let folder = VlmFolder::open(fixtures().join("model").to_str().unwrap()).unwrap();
    let image_token = folder.config().unwrap().image_token_id;
    let first = r.ids.iter().position(|&id| id == image_token).unwrap();
    let mut one_short = r.ids.clone();
    one_short.remove(first);
    let err = model.prefill(&pixels, &one_short).unwrap_err().to_string();
    assert!(
        err.contains("5 image placeholders for 6 image features"),
        "{err}"
    );
}

fn batch_reference(name: &str) -> Vec<u32> {
    let t =
        candle_core::safetensors::load(fixtures().join("batch.safetensors"), &Device::Cpu).unwrap();
    let tokens = t[name].to_vec1::<i64>().unwrap();
    tokens.into_iter().map(|v| v as u32).collect()
}

#[test]
fn a_left_padded_batch_matches_each_image_alone_and_transformers_batch() {
    let r = reference("wide");
    let mut model = captioner();
    let decoding = Decoding {
        max_tokens: 30,
        temperature: None,
        seed: 0,
    };
    let (wide, tall) = (image("wide"), image("tall"));
    let batched = model
        .generate_batch(&[wide.clone(), tall.clone()], &r.prompt, &decoding)
        .unwrap();
    // The tall image's prompt is the shorter one: it is the padded row, in either order.
    assert_eq!(batched[0], batch_reference("wide"), "wide in the batch");
    assert_eq!(batched[1], batch_reference("tall"), "tall in the batch");
    assert_eq!(
        batched[0],
        model.generate(&wide, &r.prompt, &decoding).unwrap()
    );
    assert_eq!(
        batched[1],
        model.generate(&tall, &r.prompt, &decoding).unwrap()
    );
    let swapped = model
        .generate_batch(&[tall, wide], &r.prompt, &decoding)
        .unwrap();
    assert_eq!(swapped, [batched[1].clone(), batched[0].clone()]);
}

#[test]
fn a_sequence_that_stops_early_leaves_the_others_in_the_batch_unchanged() {
    let r = reference("wide");
    let mut model = captioner();
    let images = [image("wide"), image("tall")];
    // Hot sampling reaches the end token now and then: find a seed where the two images,
    // each alone, stop at different lengths, then batch them.
    let found = (0..200).find_map(|seed| {
        let decoding = Decoding {
            max_tokens: 30,
            temperature: Some(4.0),
            seed,
        };
        let alone: Vec<Vec<u32>> = images
            .iter()
            .map(|img| model.generate(img, &r.prompt, &decoding).unwrap())
            .collect();
        (alone[0].len() != alone[1].len()).then_some((decoding, alone))
    });
    let (decoding, alone) = found.expect("a seed where one image stops before the other");
    eprintln!(
        "seed {}: lengths {} and {}",
        decoding.seed,
        alone[0].len(),
        alone[1].len()
    );
    let batched = model.generate_batch(&images, &r.prompt, &decoding).unwrap();
    assert_eq!(batched, alone);
}

fn quantized(q: Quantization) -> zlora::Result<Captioner> {
    let folder = VlmFolder::open(fixtures().join("model").to_str().unwrap()).unwrap();
    Captioner::load(&folder, DType::F32, &Device::Cpu, Some(q))
}

/// q8_0 rounds each weight to 8 bits of its 32-value block and the activations to 8 bits
/// (candle's kernels), a product's relative error under 2^-6 (nn/quant.rs). Measured through
/// the whole tiny model: 1.6e-2 (wide) and 2.9e-2 (tall) of the largest logit; the bound is
/// twice the larger.
#[test]
fn q8_0_weights_keep_the_first_step_logits_close() {
    let mut dense = captioner();
    let mut q8 = quantized(Quantization::Q8_0).unwrap();
    for name in ["wide", "tall"] {
        let r = reference(name);
        let pixels = dense.pixels(&image(name)).unwrap();
        let exact = dense
            .prefill(&pixels, &r.ids)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let close = q8
            .prefill(&pixels, &r.ids)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let scale = exact.iter().fold(0f32, |m, v| m.max(v.abs()));
        let rel = max_abs(&close, &exact) / scale;
        eprintln!("{name}: q8_0 first-step logits, max |Δ| / max |dense| = {rel:.2e}");
        assert!(
            rel <= 6e-2,
            "{name}: q8_0 logits differ by {rel:e} relative"
        );
    }
}

#[test]
fn a_format_whose_blocks_do_not_divide_a_width_is_refused_naming_the_weight() {
    let err = quantized(Quantization::Q4K).err().unwrap().to_string();
    assert!(
        err.contains("model.visual.blocks.0.attn.qkv.weight")
            && err.contains("blocks of 256 values, but this weight's rows have 32"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}
