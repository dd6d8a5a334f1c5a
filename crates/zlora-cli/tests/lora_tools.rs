//! `zlora lora ...` end to end on the tiny fixture model: merge (diffusers shards and ComfyUI
//! single file) generates exactly like the attached LoRA, extract recovers the merged LoRA,
//! convert and combine through the binary.

mod common;

use common::parity::{fixtures, rel_err};
use common::{stdout, zlora};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use zlora::lora::LoraFile;

fn lora_fixture() -> PathBuf {
    fixtures().join("lora_peft.safetensors")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let dest = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir(&path, &dest);
        } else {
            std::fs::copy(&path, &dest).unwrap();
        }
    }
}

/// Final latents of a 2-step turbo generation (seed 3) with `extra` arguments.
fn latents(dir: &Path, model: &Path, extra: &[&str]) -> Tensor {
    let fin = dir.join(format!("final-{}.safetensors", extra.len()));
    let png = dir.join("out.png");
    let mut args = vec![
        "generate",
        "--model",
        s(model),
        "--prompt",
        "a red fox",
        "--width",
        "80",
        "--height",
        "48",
        "--steps",
        "2",
        "--seed",
        "3",
        "--save-latents",
        s(&fin),
        "--out",
        s(&png),
        "--force",
    ];
    args.extend_from_slice(extra);
    stdout(&zlora(&args));
    let t = candle_core::safetensors::load(&fin, &Device::Cpu).unwrap()["latents"].clone();
    std::fs::remove_file(&fin).unwrap();
    t
}

/// A copy of the fixture model whose transformer is the fixture LoRA merged at 0.7, written
/// in shards of at most 500 kB.
fn merged_model(dir: &Path) -> PathBuf {
    let model = dir.join("model");
    copy_dir(&fixtures().join("model"), &model);
    let transformer = model.join("transformer");
    std::fs::remove_dir_all(&transformer).unwrap();
    let lora = format!("{}:0.7", lora_fixture().display());
    let src = fixtures().join("model");
    stdout(&zlora(&[
        "lora",
        "merge",
        "--model",
        s(&src),
        &lora,
        "-o",
        s(&transformer),
        "--max-shard-size",
        "500000",
    ]));
    model
}

#[test]
fn merged_models_generate_like_the_attached_lora() {
    let dir = tempfile::tempdir().unwrap();
    let fixture_model = fixtures().join("model");
    let lora = format!("{}:0.7", lora_fixture().display());
    let attached = latents(dir.path(), &fixture_model, &["--lora", &lora]);
    let plain = latents(dir.path(), &fixture_model, &[]);
    assert!(rel_err(&plain, &attached) > 1e-2, "the LoRA must matter");

    let model = merged_model(dir.path());
    let transformer = model.join("transformer");
    let shards = std::fs::read_dir(&transformer)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .to_string_lossy()
                .contains("-of-")
        })
        .count();
    assert!(shards >= 2, "{shards} shards");
    assert!(transformer
        .join("diffusion_pytorch_model.safetensors.index.json")
        .is_file());
    let sharded = latents(dir.path(), &model, &[]);
    let err = rel_err(&sharded, &attached);
    eprintln!("diffusers merge vs attached: relative error {err:.2e}");
    assert!(err < 1e-5, "diffusers merge: {err}");

    let comfy = dir.path().join("merged_comfy.safetensors");
    stdout(&zlora(&[
        "lora",
        "merge",
        "--model",
        s(&fixture_model),
        &lora,
        "-o",
        s(&comfy),
        "--format",
        "comfyui",
    ]));
    let header = zlora::lora::LoraHeader::read(&comfy).unwrap();
    assert_eq!(header.shapes["layers.0.attention.qkv.weight"], vec![96, 32]);
    let single = latents(dir.path(), &fixture_model, &["--transformer", s(&comfy)]);
    let err = rel_err(&single, &attached);
    eprintln!("comfyui merge vs attached: relative error {err:.2e}");
    assert!(err < 1e-5, "comfyui merge: {err}");
    // Nothing is overwritten without --force.
    let again = zlora(&[
        "lora",
        "merge",
        "--model",
        s(&fixture_model),
        &lora,
        "-o",
        s(&comfy),
        "--format",
        "comfyui",
    ]);
    assert!(!again.status.success());
}

#[test]
fn extract_recovers_a_merged_lora() {
    let dir = tempfile::tempdir().unwrap();
    let model = merged_model(dir.path());
    let base = fixtures().join("model");
    let fixture = LoraFile::read_for_dim(lora_fixture(), 32).unwrap();
    let mut worst = 0f32;
    for rank in ["4", "6"] {
        let out = dir.path().join(format!("extracted{rank}.safetensors"));
        let report = stdout(&zlora(&[
            "lora",
            "extract",
            "--base",
            s(&base),
            "--tuned",
            s(&model),
            "--rank",
            rank,
            "-o",
            s(&out),
        ]));
        assert!(
            report.contains("captured energy: mean 100.0000%"),
            "{report}"
        );
        let extracted = LoraFile::read_for_dim(&out, 32).unwrap();
        assert_eq!(extracted.modules.len(), fixture.modules.len());
        for (path, m) in &fixture.modules {
            let want = (m.delta().unwrap() * 0.7).unwrap();
            let err = rel_err(&extracted.modules[path].delta().unwrap(), &want);
            worst = worst.max(err);
            assert!(err < 1e-4, "rank {rank} {path}: {err}");
        }
    }
    eprintln!("extract vs merged LoRA: worst relative delta error {worst:.2e}");
    let out = dir.path().join("low.safetensors");
    let report = stdout(&zlora(&[
        "lora",
        "extract",
        "--base",
        s(&base),
        "--tuned",
        s(&model),
        "--rank",
        "2",
        "-o",
        s(&out),
    ]));
    assert!(!report.contains("mean 100.0000%"), "{report}");
}

#[test]
fn convert_and_combine_through_the_binary() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = lora_fixture();
    let comfy = dir.path().join("comfy.safetensors");
    let out = stdout(&zlora(&[
        "lora",
        "convert",
        s(&fixture),
        s(&comfy),
        "--to",
        "comfyui",
        "--trigger",
        "zfox",
    ]));
    assert!(out.contains("28 modules"), "{out}");
    let again = zlora(&["lora", "convert", s(&fixture), s(&comfy)]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    let combined = dir.path().join("both.safetensors");
    let a = format!("{}:0.5", fixture.display());
    let b = format!("{}:0.5", comfy.display());
    let out = stdout(&zlora(&[
        "lora",
        "combine",
        &a,
        &b,
        "-o",
        s(&combined),
        "--max-rank",
        "4",
    ]));
    assert!(out.contains("28 modules"), "{out}");
    let back = LoraFile::read_for_dim(&combined, 32).unwrap();
    let original = LoraFile::read_for_dim(&fixture, 32).unwrap();
    for (path, m) in &original.modules {
        let err = rel_err(&back.modules[path].delta().unwrap(), &m.delta().unwrap());
        assert!(err < 1e-5, "{path}: {err}");
    }
    // Trigger words of the inputs carry over.
    assert_eq!(back.metadata["modelspec.trigger_phrase"], "zfox");
}

/// Saves f32 tensors of the given shapes (values 0.01) under `keys`.
fn synthetic(dir: &Path, name: &str, keys: &[(&str, &[usize])]) -> PathBuf {
    let tensors: std::collections::HashMap<String, Tensor> = keys
        .iter()
        .map(|(k, shape)| {
            let t = Tensor::full(0.01f32, *shape, &Device::Cpu).unwrap();
            (k.to_string(), t)
        })
        .collect();
    let path = dir.join(name);
    candle_core::safetensors::save(&tensors, &path).unwrap();
    path
}

/// Exit code and stdout of `lora inspect` with `extra` arguments.
fn inspect(file: &Path, extra: &[&str]) -> (i32, String, String) {
    let mut args = vec!["lora", "inspect", s(file)];
    args.extend_from_slice(extra);
    let out = zlora(&args);
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn inspect_exit_codes_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let kohya_sdxl = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k";
    let cases: Vec<(PathBuf, i32, &str)> = vec![
        (
            synthetic(
                d,
                "sdxl.safetensors",
                &[
                    (&format!("{kohya_sdxl}.lora_down.weight"), &[4, 2048]),
                    (&format!("{kohya_sdxl}.lora_up.weight"), &[640, 4]),
                    (
                        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight",
                        &[4, 1280],
                    ),
                ],
            ),
            2,
            "a SDXL LoRA",
        ),
        (
            synthetic(
                d,
                "flux.safetensors",
                &[
                    (
                        "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight",
                        &[4, 3072],
                    ),
                    (
                        "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight",
                        &[12288, 4],
                    ),
                ],
            ),
            2,
            "a FLUX.1 LoRA",
        ),
        (
            synthetic(
                d,
                "lumina2.safetensors",
                &[
                    (
                        "lora_unet_layers_0_attention_qkv.lora_down.weight",
                        &[4, 2304],
                    ),
                    (
                        "lora_unet_layers_0_attention_qkv.lora_up.weight",
                        &[3840, 4],
                    ),
                ],
            ),
            2,
            "a Lumina-Image 2.0 LoRA",
        ),
        (
            synthetic(
                d,
                "te.safetensors",
                &[(
                    "lora_te_model_layers_0_mlp_up_proj.lora_down.weight",
                    &[4, 2560],
                )],
            ),
            2,
            "text-encoder LoRA",
        ),
        (
            synthetic(
                d,
                "dora.safetensors",
                &[
                    (
                        "diffusion_model.layers.0.attention.to_q.lora_A.weight",
                        &[4, 3840],
                    ),
                    (
                        "diffusion_model.layers.0.attention.to_q.lora_B.weight",
                        &[3840, 4],
                    ),
                    (
                        "diffusion_model.layers.0.attention.to_q.dora_scale",
                        &[3840, 1],
                    ),
                ],
            ),
            3,
            "DoRA",
        ),
        (
            synthetic(
                d,
                "unknown-keys.safetensors",
                &[
                    (
                        "diffusion_model.layers.0.attention.to_q.lora_A.weight",
                        &[4, 3840],
                    ),
                    (
                        "diffusion_model.layers.0.attention.to_q.lora_B.weight",
                        &[3840, 4],
                    ),
                    (
                        "diffusion_model.layers.0.attention.to_z.lora_A.weight",
                        &[4, 3840],
                    ),
                ],
            ),
            4,
            "keys naming no Z-Image module (1)",
        ),
    ];
    for (path, code, needle) in cases {
        let (got, stdout, stderr) = inspect(&path, &[]);
        assert_eq!(got, code, "{}: {stdout}", path.display());
        assert!(stdout.contains(needle), "{stdout}");
        assert_eq!(stderr.lines().count(), 1, "one-line reason: {stderr}");
        assert!(stderr.contains(needle), "{stderr}");
    }
    let bytes = std::fs::read(lora_fixture()).unwrap();
    let cut = d.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let (code, _, stderr) = inspect(&cut, &[]);
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("truncated"), "{stderr}");
}

#[test]
fn inspect_describes_every_layout_and_matches_a_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixtures().join("model");
    let (code, report, _) = inspect(&lora_fixture(), &["--model", s(&model)]);
    assert_eq!(code, 0, "{report}");
    for needle in [
        "layout: diffusers/PEFT",
        "architecture: Z-Image",
        "layers 0–1 (2 blocks): attention.to_k, attention.to_out.0",
        "LoRA rank 4, alpha 8, scale 2 (all 28 modules)",
        "lora_adapter_metadata = {",
        "28 modules apply, 0 not in the model, 0 shape mismatches",
    ] {
        assert!(report.contains(needle), "{needle}: {report}");
    }
    for (to, layout) in [
        ("default", "ai-toolkit"),
        ("comfyui", "ComfyUI"),
        ("musubi", "kohya/musubi"),
        ("diffsynth", "DiffSynth-Studio"),
        ("diffusers", "diffusers/PEFT"),
    ] {
        let out = dir.path().join(format!("{to}.safetensors"));
        stdout(&zlora(&[
            "lora",
            "convert",
            s(&lora_fixture()),
            s(&out),
            "--to",
            to,
        ]));
        let (code, stdout, _) = inspect(&out, &["--model", s(&model), "--json"]);
        assert_eq!(code, 0, "{to}: {stdout}");
        let json: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        assert!(
            json["layout"].as_str().unwrap().starts_with(layout),
            "{json}"
        );
        assert_eq!(json["model_match"]["applies"], 28);
        assert_eq!(json["metadata"]["modelspec.architecture"], "Z-Image/lora");
    }
    for (algo, needle) in [
        ("lokr", "LoKr (LyCORIS) (77 keys)"),
        ("loha", "LoHa (LyCORIS) (124 keys)"),
    ] {
        let file = fixtures().join(format!("lora_{algo}.safetensors"));
        let (code, stdout, _) = inspect(&file, &["--model", s(&model)]);
        assert_eq!(code, 0, "{algo}: {stdout}");
        assert!(stdout.contains(needle), "{stdout}");
        assert!(stdout.contains("31 modules apply"), "{stdout}");
    }
    // A LoRA for a wider model: every module mismatches the tiny model.
    let wide = synthetic(
        dir.path(),
        "wide.safetensors",
        &[
            (
                "diffusion_model.layers.0.attention.to_q.lora_A.weight",
                &[4, 64],
            ),
            (
                "diffusion_model.layers.0.attention.to_q.lora_B.weight",
                &[64, 4],
            ),
            (
                "diffusion_model.layers.7.attention.to_q.lora_A.weight",
                &[4, 32],
            ),
            (
                "diffusion_model.layers.7.attention.to_q.lora_B.weight",
                &[32, 4],
            ),
        ],
    );
    let (code, stdout, stderr) = inspect(&wide, &["--model", s(&model)]);
    assert_eq!(code, 4, "{stdout}");
    assert!(
        stdout.contains("0 modules apply, 1 not in the model, 1 shape mismatches"),
        "{stdout}"
    );
    assert!(
        stderr.contains("layers.0.attention.to_q (LoRA [64, 64], model [32, 32])"),
        "{stderr}"
    );
    assert_eq!(
        inspect(&wide, &[]).0,
        0,
        "without --model the file itself is fine"
    );
}
