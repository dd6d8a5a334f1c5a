//! The reference-fixture parity checks, each for a compute dtype: the fixture model is loaded
//! in that dtype, run on the reference inputs, and every output's relative error (largest
//! difference over the reference's largest magnitude, `common::rel_err`) is returned by name.
//! The native test binaries (dit_parity, text_encoder, vae, train_grads) hold them to their
//! f32 bounds; generic_kernels runs the same checks through the generic kernels.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use zlora::model::text::{PromptEncoder, PromptTokenizer, Qwen3TextEncoder, TextEncoderConfig};
use zlora::model::vae::{AutoencoderKL, VaeConfig};
use zlora::model::weights::{component_files, TransformerCheckpoint};
use zlora::model::{TransformerConfig, ZImageTransformer};
use zlora::train::backprop::{loss_and_grads, MicroBatch};
use zlora::train::lora::{LoraConfig, TrainableLora};

use crate::common::{fixtures, get, reference, rel_err};

/// The f32 parity bound of every check, relative to the reference's largest magnitude.
pub const TOL: f32 = 1e-4;

/// The f32 bound of the training step's loss (a mean over every latent element).
pub const LOSS_TOL: f32 = 1e-5;

/// Named relative errors of one check.
pub type Errors = Vec<(String, f32)>;

/// Prints every error and asserts that each is within `tol`.
pub fn assert_within(errors: &Errors, tol: f32, what: &str) {
    for (name, err) in errors {
        eprintln!("{what}: {name}: relative error {err:.3e}");
    }
    for (name, err) in errors {
        assert!(
            *err <= tol,
            "{what}: {name}: relative error {err:e} > {tol:e}"
        );
    }
}

// ---- the transformer (diffusers' ZImageTransformer2DModel) ----

pub fn transformer_from(files: Vec<PathBuf>, dtype: DType) -> ZImageTransformer {
    let cfg =
        TransformerConfig::from_file(&fixtures().join("model/transformer/config.json")).unwrap();
    TransformerCheckpoint::open(files)
        .unwrap()
        .load(&cfg, dtype, &Device::Cpu)
        .unwrap()
}

/// The sharded diffusers transformer of the fixture model.
pub fn transformer(dtype: DType) -> ZImageTransformer {
    let files = component_files(&fixtures().join("model/transformer")).unwrap();
    assert!(files.len() >= 2, "the fixture transformer is sharded");
    transformer_from(files, dtype)
}

/// (16, 1, H, W) reference latents → (1, 16, H, W).
pub fn latent(r: &HashMap<String, Tensor>, name: &str) -> Tensor {
    get(r, name).squeeze(1).unwrap().unsqueeze(0).unwrap()
}

/// The DiT's output for a batch of two items whose captions have different lengths.
pub fn dit_batch(dtype: DType) -> Tensor {
    let r = reference();
    let x = Tensor::cat(&[latent(&r, "dit.x.0"), latent(&r, "dit.x.1")], 0).unwrap();
    let caps = [get(&r, "dit.cap.0"), get(&r, "dit.cap.1")];
    let out = transformer(dtype)
        .forward(&x, &get(&r, "dit.t"), &caps)
        .unwrap();
    assert_eq!(out.dtype(), DType::F32, "the DiT returns f32 latents");
    out
}

/// [`dit_batch`] against diffusers, item by item.
pub fn dit_batch_errors(dtype: DType) -> Errors {
    let r = reference();
    let out = dit_batch(dtype);
    (0..2)
        .map(|i| {
            let want = latent(&r, &format!("dit.out.{i}"));
            (
                format!("item {i}"),
                rel_err(&out.narrow(0, i, 1).unwrap(), &want),
            )
        })
        .collect()
}

/// One item alone (no padding mask).
pub fn dit_single_error(model: &ZImageTransformer, expected: &str) -> Errors {
    let r = reference();
    let t = get(&r, "dit.t").narrow(0, 0, 1).unwrap();
    let out = model
        .forward(&latent(&r, "dit.x.0"), &t, &[get(&r, "dit.cap.0")])
        .unwrap();
    assert_eq!(out.dtype(), DType::F32, "the DiT returns f32 latents");
    vec![(expected.to_string(), rel_err(&out, &latent(&r, expected)))]
}

// ---- the Qwen3 text encoder (transformers) ----

/// The prompts the reference was made from, kept in the file's `params` metadata.
pub fn reference_prompts() -> Vec<String> {
    let bytes = std::fs::read(fixtures().join("reference.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let params = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("params"))
        .expect("reference.safetensors has params metadata");
    let params: serde_json::Value = serde_json::from_str(params).unwrap();
    serde_json::from_value(params["te"]["prompts"].clone()).unwrap()
}

pub fn tokenizer() -> zlora::Result<PromptTokenizer> {
    PromptTokenizer::from_file(&fixtures().join("model/tokenizer/tokenizer.json"))
}

pub fn text_config() -> zlora::Result<TextEncoderConfig> {
    TextEncoderConfig::from_file(&fixtures().join("model/text_encoder/config.json"))
}

pub fn text_weights() -> zlora::Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        fixtures().join("model/text_encoder/model.safetensors"),
        &Device::Cpu,
    )?)
}

pub fn text_encoder_from(
    tensors: HashMap<String, Tensor>,
    dtype: DType,
) -> zlora::Result<Qwen3TextEncoder> {
    let vb = VarBuilder::from_tensors(tensors, dtype, &Device::Cpu);
    Qwen3TextEncoder::new(&text_config()?, vb)
}

pub fn prompt_encoder(dtype: DType) -> zlora::Result<PromptEncoder> {
    Ok(PromptEncoder::new(
        tokenizer()?,
        text_encoder_from(text_weights()?, dtype)?,
    ))
}

/// `hidden_states[-2]` of the reference prompts, encoded as one batch.
pub fn text_hidden_errors(dtype: DType) -> Errors {
    let r = reference();
    let prompts = reference_prompts();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let got = prompt_encoder(dtype).unwrap().encode(&prompts).unwrap();
    assert_eq!(got.len(), prompts.len());
    got.iter()
        .enumerate()
        .map(|(i, hidden)| {
            let name = format!("te.hidden.{i}");
            let err = rel_err(hidden, &r[&name]);
            (name, err)
        })
        .collect()
}

/// The base pipeline's positive and negative prompt embeddings (lengths 24 and 37).
pub fn text_pipeline_errors(dtype: DType) -> Errors {
    let r = reference();
    let got = prompt_encoder(dtype)
        .unwrap()
        .encode(&["a cat", "blurry, low quality"])
        .unwrap();
    got.iter()
        .zip(["base.prompt_embeds", "base.negative_prompt_embeds"])
        .map(|(hidden, name)| (name.to_string(), rel_err(hidden, &r[name])))
        .collect()
}

// ---- the VAE (diffusers' AutoencoderKL) ----

pub fn vae_config() -> zlora::Result<VaeConfig> {
    VaeConfig::from_file(&fixtures().join("model/vae/config.json"))
}

pub fn vae(dtype: DType) -> zlora::Result<AutoencoderKL> {
    let tensors = candle_core::safetensors::load(
        fixtures().join("model/vae/diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )?;
    let vb = VarBuilder::from_tensors(tensors, dtype, &Device::Cpu);
    AutoencoderKL::new(&vae_config()?, vb)
}

/// The encoder's mode and a decode, each returned in f32.
pub fn vae_errors(dtype: DType) -> Errors {
    let r = reference();
    let vae = vae(dtype).unwrap();
    let mode = vae.encode(&r["vae.image_in"]).unwrap();
    let image = vae.decode(&r["vae.z_in"]).unwrap();
    assert_eq!((mode.dtype(), image.dtype()), (DType::F32, DType::F32));
    vec![
        (
            "vae.encode.mode".into(),
            rel_err(&mode, &r["vae.encode.mode"]),
        ),
        (
            "vae.decode.out".into(),
            rel_err(&image, &r["vae.decode.out"]),
        ),
    ]
}

// ---- one training step (diffusers + peft, scripts/make_train_fixtures.py) ----

fn train_reference() -> HashMap<String, Tensor> {
    let path = fixtures().join("train_reference.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu).unwrap()
}

/// The loss and every LoRA gradient (by name) of one step of a rank-4 LoRA on the main layers
/// (the trainer's default targets) with the fixture's LoRA values, injected noise and sigmas,
/// the base in `dtype` and the LoRA in f32 as the trainer has them.
pub fn train_step(dtype: DType) -> (f32, Vec<(String, Tensor)>) {
    let r = train_reference();
    let mut model = transformer(dtype);
    let cfg: LoraConfig = toml::from_str("rank = 4\nalpha = 4.0").unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let lora = TrainableLora::new(&cfg, &model, &mut rng).unwrap();
    let values = lora
        .var_names()
        .into_iter()
        .map(|n| {
            let t = r
                .get(&format!("lora.{n}"))
                .unwrap_or_else(|| panic!("fixture lacks {n}"));
            (n, t.clone())
        })
        .collect();
    lora.load_values(&values).unwrap();
    lora.attach(&mut model).unwrap();

    let sigmas = r["sigmas"].to_vec1::<f32>().unwrap();
    let noised = zlora::train::objective::noise(&r["x0"], &r["eps"], &sigmas).unwrap();
    let caps = vec![r["caps.0"].clone(), r["caps.1"].clone()];
    let batch = MicroBatch {
        x: &noised.x,
        t: &noised.t,
        captions: &caps,
        target: &noised.target,
        weights: &[1.0, 1.0],
        pixel_weights: None,
    };
    let (loss, grads) = loss_and_grads(&model, &lora, &batch, true).unwrap();
    let loss = loss.to_scalar::<f32>().unwrap();
    (loss, lora.var_names().into_iter().zip(grads).collect())
}

/// [`train_step`] against diffusers + peft (scripts/make_train_fixtures.py): the loss's
/// relative error and every gradient's.
pub fn train_step_errors(dtype: DType) -> (f32, Errors) {
    let r = train_reference();
    let (loss, grads) = train_step(dtype);
    let expected = r["loss"].to_scalar::<f32>().unwrap();
    eprintln!("loss {loss} (diffusers {expected})");
    let grads = grads
        .into_iter()
        .map(|(name, g)| {
            let err = rel_err(&g, &r[&format!("grad.{name}")]);
            (name, err)
        })
        .collect();
    ((loss - expected).abs() / expected.abs(), grads)
}
