//! Shared helpers of the CLI tests: running the binary and checking that it succeeded.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::process::{Command, Output};

use zlora::sample::image::Rgb8;

/// The library's parity helpers: fixture paths, reference tensors, relative errors.
#[path = "../../../zlora/tests/common/mod.rs"]
pub mod parity;

/// Runs the zlora binary with extra environment variables (never with the user's HF_TOKEN).
pub fn zlora_env(args: &[&str], env: &[(&str, &OsStr)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zlora"));
    cmd.args(args).env_remove("HF_TOKEN");
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd.output().unwrap()
}

pub fn zlora(args: &[&str]) -> Output {
    zlora_env(args, &[])
}

fn succeeded(out: &Output) {
    assert!(
        out.status.success(),
        "zlora failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts that the run succeeded; its stdout, trimmed.
pub fn stdout(out: &Output) -> String {
    succeeded(out);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Asserts that the run succeeded; its stderr (progress and messages).
pub fn stderr(out: &Output) -> String {
    succeeded(out);
    String::from_utf8_lossy(&out.stderr).to_string()
}

/// Writes a tiny model of width `dim` to `dir/model` and a synthetic dataset of `count`
/// images of `size` px to `dir/data`.
pub fn tiny_model_and_data(dir: &std::path::Path, dim: usize, count: usize, size: u32) {
    let p = |s: &str| dir.join(s).to_str().unwrap().to_string();
    stderr(&zlora(&[
        "tiny-model",
        "--out",
        &p("model"),
        "--dim",
        &dim.to_string(),
    ]));
    stderr(&zlora(&[
        "tiny-dataset",
        "--out",
        &p("data"),
        "--count",
        &count.to_string(),
        "--size",
        &size.to_string(),
    ]));
}

/// Writes two tiny models of width 32 that validation tells apart: a Base-like one with
/// shift 6 to `dir/base` and a Turbo-like one with shift 3 to `dir/turbo`.
pub fn tiny_base_and_turbo(dir: &std::path::Path) {
    let p = |s: &str| dir.join(s).to_str().unwrap().to_string();
    stderr(&zlora(&[
        "tiny-model",
        "--out",
        &p("turbo"),
        "--dim",
        "32",
        "--shift",
        "3",
    ]));
    stderr(&zlora(&[
        "tiny-model",
        "--out",
        &p("base"),
        "--dim",
        "32",
        "--shift",
        "6",
        "--seed",
        "1",
    ]));
}

/// Copies a folder tree (e.g. the fixture model, to alter a copy).
pub fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let p = entry.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_tree(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

/// `zlora generate` of `model` into `out`, 32×32 px, 2 steps, prompt "a red fox", with `env`:
/// `extra` arguments are appended, and a flag given in `extra` replaces its default.
pub fn generate_small(
    model: &std::path::Path,
    out: &std::path::Path,
    extra: &[&str],
    env: &[(&str, &OsStr)],
) -> Output {
    let mut args = vec!["generate", "--model", model.to_str().unwrap()];
    let defaults = [
        ("--prompt", "a red fox"),
        ("--width", "32"),
        ("--height", "32"),
        ("--steps", "2"),
        ("--out", out.to_str().unwrap()),
    ];
    for (flag, value) in defaults {
        if !extra.contains(&flag) {
            args.extend([flag, value]);
        }
    }
    args.extend_from_slice(extra);
    zlora_env(&args, env)
}

/// The Chromium binary, which the browser tests need (.ci/run installs it).
pub fn chromium() -> &'static str {
    ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect("chromium is needed for the browser tests (apt-get install chromium; .ci/run installs it)")
}

/// The flags every browser test starts Chromium with: headless, no sandbox or GPU, nothing
/// fetched or synced in the background, pixels at scale 1.
pub const HEADLESS: [&str; 9] = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--force-device-scale-factor=1",
];

pub fn px(img: &Rgb8, x: usize, y: usize) -> &[u8] {
    let i = (y * img.width + x) * 3;
    &img.pixels[i..i + 3]
}

/// Where the `patch` (a block of pixels) appears in `img`, within ±`tol` per channel.
pub fn find(img: &Rgb8, patch: &Rgb8, tol: u8) -> Option<(usize, usize)> {
    let close = |a: u8, b: u8| a.abs_diff(b) <= tol;
    let matches = |x0: usize, y0: usize| {
        (0..patch.height).all(|y| {
            (0..patch.width).all(|x| {
                px(img, x0 + x, y0 + y)
                    .iter()
                    .zip(px(patch, x, y))
                    .all(|(a, b)| close(*a, *b))
            })
        })
    };
    (0..=img.height - patch.height)
        .flat_map(|y| (0..=img.width - patch.width).map(move |x| (x, y)))
        .find(|&(x, y)| matches(x, y))
}

pub fn crop(img: &Rgb8, x0: usize, y0: usize, size: usize) -> Rgb8 {
    let pixels = (y0..y0 + size)
        .flat_map(|y| {
            img.pixels[(y * img.width + x0) * 3..(y * img.width + x0 + size) * 3].to_vec()
        })
        .collect();
    Rgb8 {
        width: size,
        height: size,
        pixels,
    }
}

/// Runs a Python reader script (`args` after the script) with the Python that `ZLORA_PYTHON`
/// names (default `python3`) and returns its stdout as JSON. Without that Python or the
/// `package` it imports the test fails saying so: `scripts/test-python.sh` makes a venv with
/// every package the tests read with (as .ci/run does).
pub fn python_json(package: &str, script: &std::path::Path, args: &[&OsStr]) -> serde_json::Value {
    let python = std::env::var_os("ZLORA_PYTHON").unwrap_or_else(|| "python3".into());
    let needs = format!(
        "this test reads zlora's files with the `{package}` Python package: set ZLORA_PYTHON to a \
         Python that has it (export ZLORA_PYTHON=$(bash scripts/test-python.sh))"
    );
    let out = std::process::Command::new(&python)
        .arg(script)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{} cannot run ({e}); {needs}", python.to_string_lossy()));
    assert!(
        out.status.success(),
        "{} failed; {needs}:\n{}",
        python.to_string_lossy(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The JSON lines of a run's stdout.
pub fn event_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// A safetensors file's header (as JSON, so metadata order does not matter) and data bytes.
pub fn lora_contents(path: &std::path::Path) -> (serde_json::Value, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}
