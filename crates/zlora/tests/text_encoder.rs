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
use zlora::model::text::{
    chat_prompt, PromptEncoder, PromptTokenizer, Qwen3TextEncoder, TextEncoderConfig,
};
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
