//! `zlora lora ...` end to end on the tiny fixture model: merge (diffusers shards and ComfyUI
//! single file) generates exactly like the attached LoRA, extract recovers the merged LoRA,
//! convert and combine through the binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use zlora::lora::LoraFile;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/tiny"))
}

fn lora_fixture() -> PathBuf {
    fixtures().join("lora_peft.safetensors")
}

fn zlora(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_zlora"))
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "zlora failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
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
    ok(&zlora(&args));
    let t = candle_core::safetensors::load(&fin, &Device::Cpu).unwrap()["latents"].clone();
    std::fs::remove_file(&fin).unwrap();
    t
}

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap()
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
    ok(&zlora(&[
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
    ok(&zlora(&[
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
        let report = ok(&zlora(&[
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
    let report = ok(&zlora(&[
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
    let out = ok(&zlora(&[
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
    let out = ok(&zlora(&[
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
