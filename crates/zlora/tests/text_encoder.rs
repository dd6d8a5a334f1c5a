//! Qwen3 text encoder and prompt tokenisation against the transformers reference in
//! fixtures/tiny (see fixtures/README.md).

mod common;
mod parity;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use parity::{
    assert_within, prompt_encoder, reference_prompts, text_config as config, text_encoder_from,
    text_hidden_errors, text_pipeline_errors, text_weights as weights, tokenizer, TOL,
};
use zlora::model::folder::ModelFolder;
use zlora::model::text::{
    chat_prompt, PromptEncoder, PromptTokenizer, Qwen3TextEncoder, TextEncoderConfig,
};
use zlora::nn::Quantization;
use zlora::sample::pipeline::seeded_noise;
use zlora::Error;

type TestResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn encoder_from(tensors: HashMap<String, Tensor>) -> zlora::Result<Qwen3TextEncoder> {
    text_encoder_from(tensors, DType::F32)
}

#[test]
fn config_reads_transformers_5_layout() -> TestResult {
    let cfg = config()?;
    // transformers 5 nests rope_theta in rope_parameters.
    assert_eq!(cfg.rope_theta, 1_000_000.0);
    assert_eq!((cfg.num_attention_heads, cfg.num_key_value_heads), (4, 2));
    assert_eq!(cfg.head_dim, 8);
    assert_eq!(cfg.layers_used(), 2);
    // Z-Image reads the output of layer 34 of Qwen3-4B's 36.
    assert_eq!(TextEncoderConfig::qwen3_4b().layers_used(), 35);
    Ok(())
}

#[test]
fn head_dim_defaults_to_hidden_over_heads() -> TestResult {
    let json = r#"{"vocab_size": 10, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "rope_theta": 500.0}"#;
    let cfg: TextEncoderConfig = serde_json::from_str(json)?;
    assert_eq!((cfg.head_dim, cfg.num_key_value_heads), (8, 4));
    assert_eq!(cfg.rope_theta, 500.0);
    Ok(())
}

#[test]
fn token_ids_equal_reference() -> TestResult {
    let reference = common::reference();
    let tok = tokenizer()?;
    for (i, prompt) in reference_prompts().iter().enumerate() {
        let want: Vec<i64> = reference[&format!("te.ids.{i}")].to_vec1()?;
        let got: Vec<i64> = tok.ids(prompt)?.into_iter().map(i64::from).collect();
        assert_eq!(got, want, "prompt {i}: {:?}", chat_prompt(prompt));
    }
    Ok(())
}

#[test]
fn hidden_states_match_reference() {
    assert_within(&text_hidden_errors(DType::F32), TOL, "f32");
}

#[test]
fn pipeline_prompt_embeds_match_reference() {
    // The base pipeline's positive and negative prompts have different lengths (24, 37).
    assert_within(&text_pipeline_errors(DType::F32), TOL, "f32");
}

#[test]
fn bf16_weights_stay_close() -> TestResult {
    let reference = common::reference();
    let enc = prompt_encoder(DType::BF16)?;
    let hidden = enc.encode(&[reference_prompts()[0].as_str()])?.remove(0);
    assert_eq!(hidden.dtype(), DType::F32);
    let err = common::rel_err(&hidden, &reference["te.hidden.0"]);
    println!("te.hidden.0 with bf16 weights: max rel err {err:.3e}");
    assert!(err < 5e-2, "{err}");
    Ok(())
}

#[test]
fn batch_equals_separate_runs() -> TestResult {
    let enc = prompt_encoder(DType::F32)?;
    let prompts = ["a red fox in the snow", "", "the cat sat in the window"];
    let batch = enc.encode(&prompts)?;
    for (prompt, batched) in prompts.iter().zip(&batch) {
        let alone = enc.encode(&[prompt])?.remove(0);
        let err = common::rel_err(batched, &alone);
        assert!(err < 1e-6, "{prompt:?}: {err}");
    }
    Ok(())
}

#[test]
fn truncation_keeps_the_head() -> TestResult {
    let prompts = reference_prompts();
    let long = prompts[1].as_str();
    let full = prompt_encoder(DType::F32)?.encode(&[long])?.remove(0);
    let short_tok = tokenizer()?.with_max_tokens(20)?;
    assert_eq!(short_tok.ids(long)?, tokenizer()?.ids(long)?[..20]);
    let short = PromptEncoder::new(short_tok, encoder_from(weights()?)?);
    let cut = short.encode(&[long])?.remove(0);
    // Causal attention: the first 20 outputs do not depend on what was cut.
    assert!(common::rel_err(&cut, &full.narrow(0, 0, 20)?) < 1e-6);
    assert!(tokenizer()?.with_max_tokens(0).is_err());
    Ok(())
}

#[test]
fn model_prefix_is_detected() -> TestResult {
    let prefixed = weights()?
        .into_iter()
        .map(|(k, v)| (format!("model.{k}"), v))
        .collect();
    let ids = Tensor::new(&[[263u32, 10, 20, 30, 264]], &Device::Cpu)?;
    let bare = encoder_from(weights()?)?.forward(&ids)?;
    let with_prefix = encoder_from(prefixed)?.forward(&ids)?;
    assert_eq!(common::rel_err(&with_prefix, &bare), 0.0);
    Ok(())
}

#[test]
fn missing_or_invalid_files_name_the_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let missing = dir.path().join("tokenizer.json");
    let err = PromptTokenizer::from_file(&missing)
        .err()
        .ok_or("no error")?;
    assert!(matches!(err, Error::Io { .. }));
    assert!(err.to_string().contains("tokenizer.json"), "{err}");

    let garbage = dir.path().join("config.json");
    std::fs::write(&garbage, "{\"hidden_size\": 1}")?;
    for err in [
        TextEncoderConfig::from_file(&garbage).err(),
        PromptTokenizer::from_file(&garbage).err(),
    ] {
        let err = err.ok_or("no error")?;
        assert!(matches!(err, Error::BadFile { .. }), "{err}");
        assert!(err.to_string().contains("config.json"), "{err}");
    }
    Ok(())
}

#[test]
fn out_of_vocabulary_ids_are_an_error() -> TestResult {
    // A text encoder whose vocabulary is smaller than the tokenizer's (the template's special
    // tokens are ids 262..265).
    let mut cfg = config()?;
    cfg.vocab_size = 200;
    let mut tensors = weights()?;
    let emb = tensors["embed_tokens.weight"].narrow(0, 0, 200)?;
    tensors.insert("embed_tokens.weight".into(), emb);
    let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
    let enc = PromptEncoder::new(tokenizer()?, Qwen3TextEncoder::new(&cfg, vb)?);
    assert!(matches!(enc.encode(&["a"]), Err(Error::Invalid(_))));
    Ok(())
}

/// ‖a − b‖ / ‖b‖ over every prompt's features.
fn rel_err(a: &[Tensor], b: &[Tensor]) -> f32 {
    let norm2 = |ts: &[Tensor]| -> f32 {
        ts.iter()
            .map(|t| {
                t.sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
            })
            .sum()
    };
    let diff: Vec<Tensor> = a.iter().zip(b).map(|(x, y)| (x - y).unwrap()).collect();
    (norm2(&diff) / norm2(b)).sqrt()
}

fn tiny_model() -> ModelFolder {
    ModelFolder::open(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/tiny/model"
    ))
    .unwrap()
}

/// The fixture's text encoder (widths 32 and 64) with its decoder layers stored as each format
/// that takes them: the reference prompts' caption features against the dense encoder's.
/// Measured relative errors: int8 8.92e-3, q8_0 1.29e-2, fp8 3.77e-2 (docs/benchmarks.md);
/// the bounds are twice those. The K-quants' 256-value blocks do not divide 32: refused, naming
/// the setting.
#[test]
fn the_fixture_encoder_stored_quantized_stays_close_to_the_dense_one() -> TestResult {
    let model = tiny_model();
    let prompts = reference_prompts();
    let prompts: Vec<&str> = prompts.iter().map(String::as_str).collect();
    let encode = |q: Option<Quantization>| {
        model
            .load_prompt_encoder(DType::F32, &Device::Cpu, q)?
            .encode(&prompts)
    };
    let dense = encode(None)?;
    for (q, bound) in [
        (Quantization::Int8, 1.8e-2),
        (Quantization::Q8_0, 2.6e-2),
        (Quantization::Fp8, 7.6e-2),
    ] {
        let err = rel_err(&encode(Some(q))?, &dense);
        eprintln!("fixture text encoder, {q}: caption features relative error {err:.2e}");
        assert!(err < bound, "{q}: {err}");
    }
    for q in [Quantization::Q6K, Quantization::Q5K, Quantization::Q4K] {
        let err = encode(Some(q)).err().ok_or("refused")?.to_string();
        assert!(
            err.contains("quantize_text_encoder")
                && err.contains("256")
                && err.contains("hidden 32"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
    }
    Ok(())
}

/// A random Qwen3 whose widths every format divides: hidden 256, 4 heads of 64 (2 key/value
/// heads), intermediate 512, 3 layers (2 used).
fn wide_config() -> TextEncoderConfig {
    TextEncoderConfig {
        vocab_size: 64,
        hidden_size: 256,
        intermediate_size: 512,
        num_hidden_layers: 3,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 64,
        rms_norm_eps: 1e-6,
        rope_theta: 1e6,
        max_position_embeddings: 128,
        attention_bias: false,
    }
}

/// The decoder layers' projections as (name, (out, in)).
fn projections(cfg: &TextEncoderConfig) -> Vec<(String, (usize, usize))> {
    let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
    let (q, kv) = (
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
    );
    let each = [
        ("self_attn.q_proj", (q, h)),
        ("self_attn.k_proj", (kv, h)),
        ("self_attn.v_proj", (kv, h)),
        ("self_attn.o_proj", (h, q)),
        ("mlp.gate_proj", (i, h)),
        ("mlp.up_proj", (i, h)),
        ("mlp.down_proj", (h, i)),
    ];
    (0..cfg.layers_used())
        .flat_map(|l| each.map(|(n, s)| (format!("layers.{l}.{n}"), s)))
        .collect()
}

/// Seeded Gaussian weights, each projection scaled by 1/√in so activations keep their size.
fn wide_weights(cfg: &TextEncoderConfig) -> HashMap<String, Tensor> {
    let mut seed = 0;
    let mut randn = |shape: &[usize], scale: f64| {
        seed += 1;
        (seeded_noise(seed, shape, &Device::Cpu).unwrap() * scale).unwrap()
    };
    let (h, hd) = (cfg.hidden_size, cfg.head_dim);
    let mut tensors = HashMap::new();
    tensors.insert(
        "embed_tokens.weight".into(),
        randn(&[cfg.vocab_size, h], 1.0),
    );
    for (name, (out, inp)) in projections(cfg) {
        let w = randn(&[out, inp], 1.0 / (inp as f64).sqrt());
        tensors.insert(format!("{name}.weight"), w);
    }
    for l in 0..cfg.layers_used() {
        for (norm, n) in [
            ("input_layernorm", h),
            ("post_attention_layernorm", h),
            ("self_attn.q_norm", hd),
            ("self_attn.k_norm", hd),
        ] {
            let w = (randn(&[n], 0.1) + 1.0).unwrap();
            tensors.insert(format!("layers.{l}.{norm}.weight"), w);
        }
    }
    tensors
}

/// Every format on the wide random encoder: hidden states of a 24-token sequence against the
/// dense encoder's, and the projections stored in exactly the bytes the format's count gives
/// (what `zlora plan` counts). Measured relative errors in docs/benchmarks.md; the bounds are
/// twice them.
#[test]
fn a_wide_encoder_stored_in_each_format_stays_close_to_the_dense_one() -> TestResult {
    let cfg = wide_config();
    let tensors = wide_weights(&cfg);
    let load = |q: Option<Quantization>| {
        let vb = VarBuilder::from_tensors(tensors.clone(), DType::F32, &Device::Cpu);
        Qwen3TextEncoder::new_stored(&cfg, vb, q)
    };
    let ids: Vec<u32> = (0..24u32).map(|i| (i * 37 + 5) % 64).collect();
    let ids = Tensor::from_vec(ids, (1, 24), &Device::Cpu)?;
    let dense_encoder = load(None)?;
    let dense = dense_encoder.forward(&ids)?;
    let shapes = projections(&cfg);
    let dense_bytes: usize = shapes.iter().map(|(_, (o, i))| o * i * 4).sum();
    assert_eq!(dense_encoder.projection_bytes(), dense_bytes);
    for (q, bound) in [
        (Quantization::Int8, 2.4e-2),
        (Quantization::Q8_0, 3.5e-2),
        (Quantization::Q6K, 6.9e-2),
        (Quantization::Fp8, 9.1e-2),
        (Quantization::Q5K, 0.13),
        (Quantization::Q4K, 0.25),
    ] {
        let encoder = load(Some(q))?;
        let err = rel_err(&[encoder.forward(&ids)?], std::slice::from_ref(&dense));
        eprintln!("wide text encoder, {q}: hidden states relative error {err:.2e}");
        assert!(err < bound, "{q}: {err}");
        let want: usize = shapes.iter().map(|(_, (o, i))| q.bytes(*o, *i)).sum();
        assert_eq!(encoder.projection_bytes(), want, "{q}");
    }
    Ok(())
}
