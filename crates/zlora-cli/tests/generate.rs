//! `zlora generate` end to end against the diffusers pipelines of the tiny fixture model
//! (reference §5): injected initial latents, final latents within 1e-4, PNGs within one level;
//! again through the generic kernels (`ZLORA_KERNELS=generic`, the ops a GPU runs) in f32 at
//! the same bounds and in bf16 at bounds derived from bf16's rounding.

mod common;

use common::parity::{fixtures, reference, rel_err};
use common::{copy_tree, generate_small, stdout, zlora, zlora_env};
use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use candle_core::{Device, Tensor};
use zlora::sample::image::read_png;

/// The pipeline parameters the fixture script recorded in the header.
fn params(pipeline: &str) -> serde_json::Value {
    let bytes = std::fs::read(fixtures().join("reference.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let text = meta.metadata().as_ref().unwrap()["params"].clone();
    let all: serde_json::Value = serde_json::from_str(&text).unwrap();
    all["pipelines"][pipeline].clone()
}

fn save_latents(path: &Path, t: &Tensor) {
    let map = [("latents".to_string(), t.clone())].into_iter().collect();
    zlora::fsutil::save_safetensors(path, &map, None, false).unwrap();
}

/// The recorded pipelines: distilled turbo, base with CFG, and turbo with a peft LoRA.
const PIPELINES: [&str; 3] = ["turbo", "base", "lora"];

/// The arguments beyond size, steps and guidance that a recorded pipeline ran with.
fn pipeline_args(name: &str) -> Vec<String> {
    let p = params(name);
    let text = |key: &str| match &p[key] {
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    match name {
        // Negative prompt, shift, CFG truncation and normalization.
        "base" => [
            "--negative-prompt",
            "negative_prompt",
            "--shift",
            "shift",
            "--cfg-truncation",
            "cfg_truncation",
            "--cfg-normalization",
            "cfg_normalization",
        ]
        .chunks(2)
        .flat_map(|f| [f[0].to_string(), text(f[1])])
        .collect(),
        // A LoRA at a strength below one.
        "lora" => vec![
            "--lora".into(),
            format!(
                "{}:{}",
                fixtures().join("lora_peft.safetensors").display(),
                p["lora_strength"]
            ),
        ],
        _ => Vec::new(),
    }
}

/// The child's environment for the generic kernels: the ops a GPU runs, on the CPU.
const GENERIC: [(&str, &str); 1] = [("ZLORA_KERNELS", "generic")];

/// Runs `generate` with a pipeline's recorded settings (plus `extra` arguments and `env`)
/// and checks latents and pixels.
fn check_pipeline(
    name: &str,
    extra: &[&str],
    env: &[(&str, &str)],
    latent_tol: f32,
    pixel_tol: f32,
) {
    let r = reference();
    let p = params(name);
    let dir = tempfile::tempdir().unwrap();
    let start = dir.path().join("start.safetensors");
    save_latents(&start, &r[&format!("{name}.latents_in")]);
    let (png, fin) = (
        dir.path().join("out.png"),
        dir.path().join("final.safetensors"),
    );
    let model = fixtures().join("model");
    let steps = p["num_inference_steps"].to_string();
    let guidance = p["guidance_scale"].to_string();
    let mut args = vec![
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        p["prompt"].as_str().unwrap(),
        "--width",
        "80",
        "--height",
        "48",
        "--steps",
        &steps,
        "--guidance",
        &guidance,
        "--latents",
        start.to_str().unwrap(),
        "--save-latents",
        fin.to_str().unwrap(),
        "--out",
        png.to_str().unwrap(),
    ];
    let recorded = pipeline_args(name);
    args.extend(recorded.iter().map(String::as_str));
    args.extend_from_slice(extra);
    let env: Vec<(&str, &OsStr)> = env.iter().map(|(k, v)| (*k, OsStr::new(v))).collect();
    stdout(&zlora_env(&args, &env));

    let got = candle_core::safetensors::load(&fin, &Device::Cpu).unwrap()["latents"].clone();
    let err = rel_err(&got, &r[&format!("{name}.latents_out")]);
    eprintln!("{name} {extra:?} {env:?}: final latents relative error {err:.3e}");
    assert!(err <= latent_tol, "{name}: latents error {err}");

    let (img, text) = read_png(&png).unwrap();
    let expected = r[&format!("{name}.image_u8")]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let worst = img
        .pixels
        .iter()
        .zip(&expected)
        .map(|(&a, &b)| (a as f32 - b).abs())
        .fold(0f32, f32::max);
    eprintln!("{name} {extra:?} {env:?}: largest pixel difference {worst}");
    assert!(
        worst <= pixel_tol,
        "{name}: pixels differ by {worst} levels"
    );
    let params = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(params.contains(p["prompt"].as_str().unwrap()), "{params}");
}

#[test]
fn turbo_pipeline_matches_diffusers() {
    check_pipeline("turbo", &[], &[], 1e-4, 1.0);
}

#[test]
fn base_pipeline_with_negative_prompt_truncation_and_normalization_matches_diffusers() {
    check_pipeline("base", &[], &[], 1e-4, 1.0);
}

#[test]
fn peft_lora_at_strength_below_one_matches_diffusers() {
    check_pipeline("lora", &[], &[], 1e-4, 1.0);
}

#[test]
fn comfyui_single_file_gives_the_turbo_result_up_to_bf16_weights() {
    let comfy = fixtures().join("comfy_transformer.safetensors");
    // bf16-rounded weights move the result by a few levels; the DiT test checks them exactly.
    check_pipeline(
        "turbo",
        &["--transformer", comfy.to_str().unwrap()],
        &[],
        2e-2,
        4.0,
    );
}

#[test]
fn the_pipelines_match_diffusers_through_the_generic_kernels() {
    for name in PIPELINES {
        check_pipeline(name, &[], &GENERIC, 1e-4, 1.0);
    }
}

/// bf16's unit roundoff: a value rounded to bf16 is off by at most 2⁻⁸ of itself.
const U: f32 = 1.0 / 256.0;

/// Final latents with the text encoder and transformer in bf16, over every step: measured
/// 1.1e-2, 1.9e-2 and 7.7e-3 (turbo, base, lora; 2.9, 4.9 and 2.0 U); the bound is twice the
/// worst, in whole U (docs/gpu.md). The f32 runs of the same path are within 1e-6.
const LATENTS_BF16: f32 = 10.0 * U;

/// Pixels (0-255) of those runs: measured 3, 6 and 4 levels; twice the worst. It also holds
/// a VAE decoding in bf16, which alone moves the image by 2.2e-2 of its range (about 3 levels;
/// crates/zlora/tests/generic_kernels.rs).
const PIXELS_BF16: f32 = 12.0;

#[test]
fn the_pipelines_in_bf16_through_the_generic_kernels_stay_within_their_bounds() {
    for name in PIPELINES {
        let bf16 = ["--dtype", "bf16"];
        check_pipeline(name, &bf16, &GENERIC, LATENTS_BF16, PIXELS_BF16);
    }
}

#[test]
fn tiny_model_generates_one_png_per_seed_with_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    stdout(&zlora(&["tiny-model", "--out", model.to_str().unwrap()]));
    let out = dir.path().join("img.png");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "generate",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "a lighthouse",
            "--width",
            "64",
            "--height",
            "32",
            "--steps",
            "2",
            "--seed",
            "1",
            "--seed",
            "2",
            "--out",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        zlora(&args)
    };
    stdout(&run(&[]));
    let (a, text) = read_png(&dir.path().join("img_s1.png")).unwrap();
    let (b, _) = read_png(&dir.path().join("img_s2.png")).unwrap();
    assert_eq!((a.width, a.height), (64, 32));
    assert_ne!(a.pixels, b.pixels, "different seeds give different images");
    let meta: serde_json::Value = serde_json::from_str(&text[0].1).unwrap();
    assert_eq!(meta["seed"], 1);
    assert_eq!(meta["steps"], 2);

    let again = run(&[]);
    assert!(
        !again.status.success(),
        "existing outputs are not overwritten without --force"
    );
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    stdout(&run(&["--force"]));
    let (a2, _) = read_png(&dir.path().join("img_s1.png")).unwrap();
    assert_eq!(a.pixels, a2.pixels, "same seed, same image");
}

#[test]
fn bad_sizes_and_missing_models_fail_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("model");
    let out = dir.path().join("x.png");
    let bad = zlora(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
        "--width",
        "50",
        "--height",
        "48",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("multiples of 8"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );
    let missing = zlora(&[
        "generate",
        "--model",
        "/nonexistent/model",
        "--prompt",
        "x",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("/nonexistent/model"));
}

#[test]
fn a_repo_id_resolves_from_the_local_hugging_face_cache() {
    let home = tempfile::tempdir().unwrap();
    let repo = home.path().join("hub/models--Tongyi-MAI--Z-Image-Turbo");
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    copy_tree(&fixtures().join("model"), &repo.join("snapshots/0123abcd"));
    let out = home.path().join("x.png");
    let run = Command::new(env!("CARGO_BIN_EXE_zlora"))
        .env("HF_HOME", home.path())
        .env_remove("HF_HUB_CACHE")
        .args([
            "generate",
            "--model",
            "Tongyi-MAI/Z-Image-Turbo",
            "--prompt",
            "x",
            "--width",
            "32",
        ])
        .args([
            "--height",
            "32",
            "--steps",
            "1",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    stdout(&run);
    assert!(out.is_file());
    let missing = Command::new(env!("CARGO_BIN_EXE_zlora"))
        .env("HF_HOME", home.path())
        .env_remove("HF_HUB_CACHE")
        .args([
            "generate",
            "--model",
            "Tongyi-MAI/Z-Image",
            "--prompt",
            "x",
            "--out",
            out.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("Hugging Face cache"));
}

#[test]
fn a_foreign_lora_is_named_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let lora = dir.path().join("sdxl.safetensors");
    let t = |shape: &[usize]| Tensor::zeros(shape, candle_core::DType::F32, &Device::Cpu).unwrap();
    let key = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k";
    let tensors = [
        (format!("{key}.lora_down.weight"), t(&[4, 2048])),
        (format!("{key}.lora_up.weight"), t(&[640, 4])),
    ]
    .into_iter()
    .collect();
    zlora::fsutil::save_safetensors(&lora, &tensors, None, false).unwrap();
    let out = dir.path().join("x.png");
    let model = fixtures().join("model");
    let run = zlora(&[
        "generate",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "x",
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "1",
        "--lora",
        lora.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("SDXL") && err.contains("sdxl.safetensors"),
        "{err}"
    );
    assert!(!out.exists());
}

/// The Turbo, Base and LoRA pipelines with the fixture's blocks stored as int8 and fp8 (the
/// formats that take its widths: dim 32, FFN 85) against diffusers' unquantized results: the
/// LoRA applies on the quantized base. Measured (turbo, base, lora): int8 latents 1.09e-2,
/// 1.30e-2, 1.06e-2, pixels 3 levels each; fp8 3.86e-2, 6.14e-2, 3.18e-2, pixels 14, 15, 13
/// levels. The bounds are twice the worst (docs/benchmarks.md).
#[test]
fn the_pipelines_on_an_int8_or_fp8_base_stay_within_their_bounds() {
    for (q, latents, pixels) in [("int8", 2.6e-2, 6.0), ("fp8", 0.123, 30.0)] {
        for name in PIPELINES {
            check_pipeline(name, &["--quantize", q], &[], latents, pixels);
        }
    }
}

/// Peak signal-to-noise ratio (dB) of two 8-bit images.
fn psnr(a: &[u8], b: &[u8]) -> f64 {
    let mse = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
        .sum::<f64>()
        / a.len() as f64;
    10.0 * (255.0f64.powi(2) / mse).log10()
}

/// Every format on a random model whose widths all of them take (dim 768, FFN 2048, adaLN
/// 256): final latents and pixels of an 8-step Turbo generation against the same model
/// unquantized. The bounds: twice the measured latent error, the measured PSNR less 6 dB
/// (twice the error's amplitude); measurements in docs/benchmarks.md.
#[test]
fn generation_on_a_quantized_base_stays_close_to_the_dense_one() {
    let dir = tempfile::tempdir().unwrap();
    let p = |s: &str| dir.path().join(s).to_str().unwrap().to_string();
    stdout(&zlora(&[
        "tiny-model",
        "--out",
        &p("model"),
        "--dim",
        "768",
        "--heads",
        "6",
    ]));
    let run = |q: Option<&str>| {
        let name = q.unwrap_or("dense");
        let (png, fin) = (p(&format!("{name}.png")), p(&format!("{name}.safetensors")));
        let model = p("model");
        let mut args = vec![
            "generate",
            "--model",
            &model,
            "--prompt",
            "a red cube",
            "--width",
            "64",
            "--height",
            "64",
            "--seed",
            "3",
            "--save-latents",
            &fin,
            "--out",
            &png,
        ];
        args.extend(q.iter().flat_map(|q| ["--quantize", q]));
        stdout(&zlora(&args));
        let latents =
            candle_core::safetensors::load(&fin, &Device::Cpu).unwrap()["latents"].clone();
        let text = read_png(Path::new(&png)).unwrap().1;
        let params = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
        assert_eq!(
            params.contains("\"quantize\":null"),
            q.is_none(),
            "{params}"
        );
        (latents, read_png(Path::new(&png)).unwrap().0.pixels)
    };
    let (dense, dense_png) = run(None);
    for (q, latent_tol, min_psnr) in [
        ("q8_0", 1.3e-2, 47.0),
        ("int8", 1.2e-2, 47.0),
        ("fp8", 5.0e-2, 38.0),
        ("q6_k", 3.2e-2, 40.0),
        ("q5_k", 7.5e-2, 34.0),
        ("q4_k", 0.144, 29.0),
    ] {
        let (latents, png) = run(Some(q));
        let (err, db) = (rel_err(&latents, &dense), psnr(&png, &dense_png));
        eprintln!("{q}: final latents relative error {err:.3e}, PNG PSNR {db:.1} dB");
        assert!(err <= latent_tol && db >= min_psnr, "{q}: {err} {db}");
    }
}

#[test]
fn a_quantization_whose_blocks_do_not_divide_the_widths_is_refused_before_loading() {
    let model = fixtures().join("model");
    let out = tempfile::tempdir().unwrap();
    let png = out.path().join("x.png");
    let res = generate_small(&model, &png, &["--quantize", "q4_k"], &[]);
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    let last = err.trim().lines().last().unwrap();
    assert!(
        last.contains("q4_k") && last.contains("256") && last.contains("ffn 85"),
        "{err}"
    );
    assert!(!err.contains("encoding the prompt"), "{err}");
    assert!(!png.exists());

    // A single-file transformer has no config to check first: it is refused when it loads.
    let comfy = fixtures().join("comfy_transformer.safetensors");
    let args = [
        "--transformer",
        comfy.to_str().unwrap(),
        "--quantize",
        "q8_0",
    ];
    let res = generate_small(&model, &png, &args, &[]);
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    let last = err.trim().lines().last().unwrap();
    assert!(
        last.contains("q8_0") && last.contains("32") && last.contains("ffn 85"),
        "{err}"
    );
    assert!(!png.exists());
}

/// `--blocks-on-device N` swaps the fixture's main layers after the first N in from host
/// memory: the final latents are the resident model's bit for bit (also on an int8 base),
/// and more blocks than the model has is refused before any work, naming the flag.
#[test]
fn block_swap_gives_the_same_latents_and_refuses_more_blocks_than_layers() {
    let model = fixtures().join("model");
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let png = dir.path().join(format!("{name}.png"));
        let fin = dir.path().join(format!("{name}.safetensors"));
        let mut args = vec![
            "--seed",
            "4",
            "--save-latents",
            fin.to_str().unwrap(),
            "--force",
        ];
        args.extend_from_slice(extra);
        let log = stdout(&generate_small(&model, &png, &args, &[]));
        (std::fs::read(&fin).unwrap(), log)
    };
    for base in [&[][..], &["--quantize", "int8"]] {
        let (resident, _) = run("resident", base);
        for n in ["0", "1"] {
            let args = [base, &["--blocks-on-device", n][..]].concat();
            let (swapped, _) = run(&format!("swapped{n}"), &args);
            assert!(swapped == resident, "{base:?}, N = {n}: latents differ");
        }
    }

    let png = dir.path().join("refused.png");
    let res = generate_small(&model, &png, &["--blocks-on-device", "3"], &[]);
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    let last = err.trim().lines().last().unwrap();
    assert!(
        last.contains("--blocks-on-device") && last.contains("3") && last.contains("at most 2"),
        "{err}"
    );
    assert!(!err.contains("encoding the prompt"), "{err}");
    assert!(!png.exists());
}

/// The fixture's text encoder stored as int8, q8_0 and fp8 (the formats its widths 32 and 64
/// take) while the prompt is encoded: the final latents stay close to the dense encoder's
/// (measured relative errors in docs/benchmarks.md; the bounds are twice them), the PNG
/// records the setting, and a K-quant, whose 256-value blocks do not divide 32, is refused
/// before any work with one line naming the flag.
#[test]
fn a_quantized_text_encoder_generates_close_to_the_dense_one() {
    let model = fixtures().join("model");
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, extra: &[&str]| {
        let png = dir.path().join(format!("{name}.png"));
        let fin = dir.path().join(format!("{name}.safetensors"));
        let mut args = vec!["--seed", "4", "--save-latents", fin.to_str().unwrap()];
        args.extend_from_slice(extra);
        let log =
            String::from_utf8_lossy(&generate_small(&model, &png, &args, &[]).stderr).to_string();
        let params = read_png(&png).unwrap().1;
        let params = params
            .iter()
            .find(|(k, _)| k == "parameters")
            .unwrap()
            .1
            .clone();
        let latents =
            candle_core::safetensors::load(&fin, &Device::Cpu).unwrap()["latents"].clone();
        (latents, params, log)
    };
    let (dense, params, _) = run("dense", &[]);
    assert!(
        params.contains("\"quantize_text_encoder\":null"),
        "{params}"
    );
    // Measured 3.22e-3, 4.75e-3 and 1.72e-2.
    for (q, bound) in [("int8", 6.4e-3), ("q8_0", 9.5e-3), ("fp8", 3.4e-2)] {
        let (latents, params, log) = run(q, &["--quantize-text-encoder", q]);
        let err = rel_err(&latents, &dense);
        eprintln!("text encoder {q}: final latents relative error {err:.2e}");
        assert!(err < bound, "{q}: {err}");
        assert!(
            params.contains(&format!("\"quantize_text_encoder\":\"{q}\"")),
            "{params}"
        );
        assert!(
            log.contains(&format!("text encoder stored as {q}")),
            "{log}"
        );
    }
    let png = dir.path().join("k.png");
    let res = generate_small(&model, &png, &["--quantize-text-encoder", "q4_k"], &[]);
    assert!(!res.status.success());
    let err = String::from_utf8_lossy(&res.stderr);
    let last = err.trim().lines().last().unwrap();
    assert!(
        last.contains("--quantize-text-encoder")
            && last.contains("256")
            && last.contains("hidden 32"),
        "{err}"
    );
    assert!(!err.contains("encoding the prompt"), "{err}");
    assert!(!png.exists());
}
