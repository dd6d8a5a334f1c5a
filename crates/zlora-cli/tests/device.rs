//! No silent device fallback: a GPU this build cannot give is an error that says why and what
//! to do; otherwise every command that loads a model prints the device and dtype it runs on.

mod common;

use std::ffi::OsStr;
use std::path::Path;

use common::parity::fixtures;
use common::{generate_small, stderr, zlora_env};

fn model() -> String {
    fixtures().join("model").to_string_lossy().into_owned()
}

fn generate(env: &[(&str, &OsStr)], out: &str) -> std::process::Output {
    let args = ["--steps", "1", "--seed", "1"];
    generate_small(Path::new(&model()), Path::new(out), &args, env)
}

#[test]
fn a_gpu_this_build_lacks_is_an_error_not_a_cpu_run() {
    let dir = tempfile::tempdir().unwrap();
    for (gpu, feature) in [("cuda", "--features cuda"), ("metal", "--features metal")] {
        let png = dir.path().join(format!("{gpu}.png"));
        let out = generate(&[("ZLORA_DEVICE", OsStr::new(gpu))], png.to_str().unwrap());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{gpu}: ran anyway:\n{err}");
        assert!(
            err.contains(&format!("ZLORA_DEVICE={gpu}")) && err.contains(feature),
            "{gpu}: {err}"
        );
        assert!(err.contains("ZLORA_DEVICE=cpu"), "names the way out: {err}");
        assert!(!png.exists(), "{gpu}: wrote an image");
    }
}

#[test]
fn an_unknown_device_or_kernel_set_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("x.png");
    for (key, value) in [("ZLORA_DEVICE", "gpu"), ("ZLORA_KERNELS", "fast")] {
        let out = generate(&[(key, OsStr::new(value))], png.to_str().unwrap());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{key}={value}: {err}");
        assert!(err.contains(&format!("{key}={value}")), "{err}");
    }
}

#[test]
fn generate_says_where_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("a.png");
    let err = stderr(&generate(&[], png.to_str().unwrap()));
    assert!(err.contains("device: CPU, f32"), "{err}");
    let png = dir.path().join("b.png");
    let env = [
        ("ZLORA_DEVICE", OsStr::new("cpu")),
        ("ZLORA_KERNELS", OsStr::new("generic")),
    ];
    let err = stderr(&generate(&env, png.to_str().unwrap()));
    assert!(err.contains("device: CPU (generic kernels), f32"), "{err}");
}

/// validate renders on the chosen device too (it used to be pinned to the CPU).
#[test]
fn validate_asks_for_the_device_like_generate() {
    let dir = tempfile::tempdir().unwrap();
    let lora = fixtures().join("lora_peft.safetensors");
    let out = dir.path().join("report");
    let args = [
        "validate",
        "--lora",
        lora.to_str().unwrap(),
        "--base",
        &model(),
        "--turbo",
        &model(),
        "--width",
        "32",
        "--height",
        "32",
        "--output",
        out.to_str().unwrap(),
    ];
    let run = zlora_env(&args, &[("ZLORA_DEVICE", OsStr::new("cuda"))]);
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success(), "{err}");
    assert!(err.contains("ZLORA_DEVICE=cuda"), "{err}");
}
