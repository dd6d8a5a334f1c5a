//! Quantized transformer files other tools use (issue 12, item 2): GGUFs in ComfyUI-GGUF's
//! Z-Image layout, ComfyUI's fp8 checkpoints, and `zlora quantize`, whose GGUF the `gguf`
//! Python package (llama.cpp's reader, the one ComfyUI-GGUF uses) reads as the same model.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::parity::{fixtures, rel_err};
use common::{generate_small, python_json, stdout, zlora};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn quantized_fixtures() -> PathBuf {
    fixtures().join("../quantized")
}

/// A random model whose widths every GGUF format takes (dim 768, FFN 2048, adaLN 256).
fn wide_model(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    stdout(&zlora(&[
        "tiny-model",
        "--out",
        s(&model),
        "--dim",
        "768",
        "--heads",
        "6",
    ]));
    model
}

/// The final latents of an 8-step 64×64 Turbo generation of `model` with `extra` arguments.
fn latents(model: &Path, dir: &Path, name: &str, extra: &[&str]) -> Tensor {
    let file = dir.join(format!("{name}.safetensors"));
    let png = dir.join(format!("{name}.png"));
    let mut args = vec![
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "8",
        "--seed",
        "3",
        "--save-latents",
        s(&file),
    ];
    args.extend_from_slice(extra);
    stdout(&generate_small(model, &png, &args, &[]));
    candle_core::safetensors::load(&file, &Device::Cpu).unwrap()["latents"].clone()
}

fn quantize(model: &Path, q: &str, out: &Path) {
    stdout(&zlora(&["quantize", s(model), "--to", q, "--out", s(out)]));
}

/// The GGUF that `zlora quantize` writes loads as the model `--quantize` builds: the same
/// bytes in every quantized weight, the same float tensors, so the same latents bit for bit;
/// with every main layer swapped in from host memory too.
#[test]
fn generate_from_a_quantized_gguf_equals_generate_with_quantize() {
    let dir = tempfile::tempdir().unwrap();
    let model = wide_model(dir.path());
    for q in ["q8_0", "q4_k"] {
        let gguf = dir.path().join(format!("{q}.gguf"));
        quantize(&model, q, &gguf);
        let from_file = latents(&model, dir.path(), q, &["--transformer", s(&gguf)]);
        let built = latents(
            &model,
            dir.path(),
            &format!("{q}-built"),
            &["--quantize", q],
        );
        assert_eq!(
            rel_err(&from_file, &built),
            0.0,
            "{q}: the GGUF's model differs from --quantize's"
        );
        // Block swap holds the file's quantized weights in host memory between their
        // blocks' runs: the same latents.
        let args = ["--transformer", s(&gguf), "--blocks-on-device", "0"];
        let swapped = latents(&model, dir.path(), &format!("{q}-swapped"), &args);
        assert_eq!(
            rel_err(&swapped, &from_file),
            0.0,
            "{q}: block swap changed the GGUF's latents"
        );
    }
}

/// `zlora quantize`'s GGUF read back by the `gguf` package: architecture `lumina2`, ComfyUI
/// names with the fused qkv, block weights in the asked type, norms F32; and the weights that
/// reader dequantizes (what ComfyUI-GGUF computes with) generate what zlora generates from
/// the GGUF, up to candle's quantized kernels rounding the activations to 8 bits.
#[test]
fn zlora_quantize_writes_a_gguf_the_gguf_package_reads_as_the_same_model() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/gguf_dequantize.py");
    let dir = tempfile::tempdir().unwrap();
    let model = wide_model(dir.path());
    // Bounds: twice the measured error (q8_0 5.1e-3, q4_k 5.8e-3; docs/generate.md).
    for (q, ggml, file_type, tol) in [("q8_0", "Q8_0", 7, 1.1e-2), ("q4_k", "Q4_K", 14, 1.2e-2)] {
        let gguf = dir.path().join(format!("{q}.gguf"));
        let dense = dir.path().join(format!("{q}-dequantized.safetensors"));
        quantize(&model, q, &gguf);
        let summary = python_json("gguf", &script, &[gguf.as_os_str(), dense.as_os_str()]);
        assert_eq!(summary["architecture"], "lumina2");
        assert_eq!(summary["file_type"], file_type);
        let tensors = summary["tensors"].as_object().unwrap();
        let entry = |name: &str| tensors[name].clone();
        assert_eq!(
            entry("layers.0.attention.qkv.weight"),
            serde_json::json!([ggml, [2304, 768]])
        );
        assert_eq!(
            entry("noise_refiner.0.feed_forward.w2.weight"),
            serde_json::json!([ggml, [768, 2048]])
        );
        assert_eq!(
            entry("x_embedder.weight"),
            serde_json::json!(["F32", [768, 64]])
        );
        assert_eq!(entry("final_layer.linear.weight")[0], "F32");
        for (name, value) in tensors {
            assert!(
                !name.contains("to_q") && !name.starts_with("all_") && !name.contains("to_out"),
                "{name}: not a ComfyUI name"
            );
            if value[1].as_array().unwrap().len() == 1 {
                assert_eq!(value[0], "F32", "{name}");
            }
        }
        let from_gguf = latents(&model, dir.path(), q, &["--transformer", s(&gguf)]);
        let from_reader = latents(
            &model,
            dir.path(),
            &format!("{q}-reader"),
            &["--transformer", s(&dense)],
        );
        let err = rel_err(&from_gguf, &from_reader);
        eprintln!("{q}: latents from the GGUF vs the gguf package's weights: {err:.2e}");
        assert!(err < tol, "{q}: {err}");
    }
}

/// The fixture's ComfyUI file with `overlay`'s tensors (the dequantized weights of a
/// quantized copy) in place of its own, in f32: the dense model another tool computes with.
fn overlaid(overlay: &Path, out: &Path) -> PathBuf {
    let source = fixtures().join("comfy_transformer.safetensors");
    let mut tensors: HashMap<String, Tensor> =
        candle_core::safetensors::load(source, &Device::Cpu).unwrap();
    let replaced = candle_core::safetensors::load(overlay, &Device::Cpu).unwrap();
    let prefix = "model.diffusion_model.";
    for (name, t) in replaced {
        let key = format!("{prefix}{}", name.trim_start_matches(prefix));
        assert!(tensors.contains_key(&key), "{key}");
        tensors.insert(key, t);
    }
    let tensors: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(DType::F32).unwrap()))
        .collect();
    candle_core::safetensors::save(&tensors, out).unwrap();
    out.to_path_buf()
}

/// The fixture model's 2-step latents with `transformer` in place of its own.
fn fixture_latents(transformer: &Path, dir: &Path, name: &str) -> Tensor {
    let file = dir.join(format!("{name}.safetensors"));
    let args = [
        "--transformer",
        s(transformer),
        "--seed",
        "5",
        "--save-latents",
        s(&file),
    ];
    let png = dir.join(format!("{name}.png"));
    stdout(&generate_small(&fixtures().join("model"), &png, &args, &[]));
    candle_core::safetensors::load(&file, &Device::Cpu).unwrap()["latents"].clone()
}

/// The relative difference between the fixture model's latents with the quantized
/// transformer file `file` and with its dequantized weights `dequantized` (both in
/// fixtures/quantized/).
fn against_dequantized(file: &str, dequantized: &str) -> f32 {
    let dir = tempfile::tempdir().unwrap();
    let q = quantized_fixtures();
    let dense = overlaid(
        &q.join(dequantized),
        &dir.path().join("dense-transformer.safetensors"),
    );
    let from_file = fixture_latents(&q.join(file), dir.path(), "file");
    let from_dense = fixture_latents(&dense, dir.path(), "dense");
    rel_err(&from_file, &from_dense)
}

/// A GGUF the `gguf` package wrote in ComfyUI-GGUF's layout (Q8_0, Q4_0, F16, BF16 and F32
/// tensors; scripts/make_quantized_fixtures.py) generates as its dequantized weights do, up
/// to the 8-bit activations of the quantized kernels.
#[test]
fn a_gguf_from_the_gguf_package_generates_as_its_dequantized_weights() {
    let err = against_dequantized("comfy_gguf.gguf", "comfy_gguf_dequantized.safetensors");
    eprintln!("GGUF fixture vs its dequantized weights: {err:.2e}");
    // Twice the measured 6.0e-3 (docs/generate.md).
    assert!(err < 1.2e-2, "{err}");
}

/// A ComfyUI scaled-fp8 checkpoint (e4m3 weights with `scale_weight`, one without, some with
/// `scale_input`, the `scaled_fp8` marker) generates exactly as ComfyUI's dequantized weights
/// do: each Linear dequantizes its codes × scale in f32 before the same product.
#[test]
fn a_comfyui_fp8_checkpoint_generates_as_its_dequantized_weights() {
    let err = against_dequantized("comfy_fp8.safetensors", "comfy_fp8_dequantized.safetensors");
    assert_eq!(err, 0.0, "fp8 fixture vs its dequantized weights");
}

/// A ComfyUI-style fp8 text encoder (e4m3 layer weights with `scale_weight`) in the model
/// folder encodes as its dequantized weights do: the latents are the same bit for bit.
#[test]
fn an_fp8_text_encoder_encodes_as_its_dequantized_weights() {
    let dir = tempfile::tempdir().unwrap();
    let q = quantized_fixtures();
    let run = |encoder: PathBuf, name: &str| {
        let model = dir.path().join(name);
        common::copy_tree(&fixtures().join("model"), &model);
        std::fs::copy(encoder, model.join("text_encoder/model.safetensors")).unwrap();
        let latents = dir.path().join(format!("{name}.safetensors"));
        let png = dir.path().join(format!("{name}.png"));
        let args = ["--seed", "5", "--save-latents", s(&latents)];
        stdout(&generate_small(&model, &png, &args, &[]));
        candle_core::safetensors::load(&latents, &Device::Cpu).unwrap()["latents"].clone()
    };
    let fp8 = run(q.join("text_encoder_fp8.safetensors"), "fp8");
    let dense = run(q.join("text_encoder_fp8_dequantized.safetensors"), "dense");
    assert_eq!(rel_err(&fp8, &dense), 0.0);
    // The scales matter: the fixture's own f32 encoder gives other latents.
    let original = fixtures().join("model/text_encoder/model.safetensors");
    let original = run(original, "original");
    assert!(rel_err(&fp8, &original) > 0.0);
    // Requantizing its 8-bit weights would only add error: refused, naming the flag.
    let png = dir.path().join("requantized.png");
    let args = ["--quantize-text-encoder", "int8"];
    let res = generate_small(&dir.path().join("fp8"), &png, &args, &[]);
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    let last = err.trim().lines().last().unwrap();
    assert!(
        last.contains("fp8") && last.contains("--quantize-text-encoder"),
        "{err}"
    );
    assert!(!png.exists());
}
