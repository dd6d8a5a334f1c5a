//! `zlora doctor` on the CPU build: the verdict and exit code, ZLORA_DEVICE asking for a backend
//! the build lacks, a training config that fits or does not (against `zlora plan`'s own
//! figures), and bad input.
#![cfg(not(any(feature = "cuda", feature = "metal")))]

use std::path::Path;
use std::process::{Command, Output};

/// Runs `zlora doctor ARGS` with ZLORA_DEVICE set to `device` (or unset) and an empty HF cache
/// (the examples' repo ids are never found locally: plans use the built-in dimensions).
fn doctor(args: &[&str], device: Option<&str>, cache: &Path) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zlora"));
    cmd.arg("doctor")
        .args(args)
        .env_remove("ZLORA_DEVICE")
        .env_remove("HF_TOKEN")
        .env("HF_HUB_CACHE", cache);
    if let Some(d) = device {
        cmd.env("ZLORA_DEVICE", d);
    }
    cmd.output().unwrap()
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn example(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name)
        .to_str()
        .unwrap()
        .to_string()
}

/// The line of the check named `what`.
fn line<'a>(stdout: &'a str, what: &str) -> &'a str {
    stdout
        .lines()
        .find(|l| l.split_whitespace().nth(1) == Some(what))
        .unwrap_or_else(|| panic!("no {what} line in:\n{stdout}"))
}

/// `zlora plan --json`'s CPU peak for `config`, in GiB, as doctor prints it.
fn planned_cpu_peak_gib(config: &str, cache: &Path) -> f64 {
    let out = Command::new(env!("CARGO_BIN_EXE_zlora"))
        .args(["plan", config, "--json"])
        .env("HF_HUB_CACHE", cache)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    plan["cpu"]["peak_rss_mib"].as_f64().unwrap() / 1024.0
}

#[test]
fn the_cpu_build_is_ready_for_cpu_work() {
    let cache = tempfile::tempdir().unwrap();
    let out = doctor(&[], None, cache.path());
    let stdout = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(!stdout.contains("PROBLEM"), "{stdout}");
    let build = line(&stdout, "build");
    assert!(
        build.starts_with("ok") && build.contains("backends: CPU"),
        "{build}"
    );
    assert!(!build.contains("CUDA"), "{build}");
    assert!(
        line(&stdout, "device").contains("no GPU backend"),
        "{stdout}"
    );
    assert!(
        line(&stdout, "memory").contains("GiB of RAM available"),
        "{stdout}"
    );
    assert_eq!(
        stdout.lines().last(),
        Some("verdict: ready for CPU work (CPU build, no GPU backend)")
    );
}

#[test]
fn asking_a_cpu_build_for_cuda_is_a_problem_with_its_fix() {
    let cache = tempfile::tempdir().unwrap();
    let out = doctor(&[], Some("cuda"), cache.path());
    let stdout = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let device = line(&stdout, "device");
    assert!(device.starts_with("PROBLEM"), "{device}");
    assert!(device.contains("ZLORA_DEVICE=cuda, but this binary has no CUDA backend"));
    let fix = stdout
        .lines()
        .skip_while(|l| *l != device)
        .nth(1)
        .unwrap()
        .trim();
    assert!(fix.starts_with("fix: "), "{fix}");
    assert!(fix.contains("--features cuda"), "{fix}");
    let version = env!("CARGO_PKG_VERSION");
    assert!(
        fix.contains(&format!("zlora-{version}-linux-x86_64-cuda")),
        "{fix}"
    );
    assert_eq!(
        stdout.lines().last(),
        Some("verdict: not ready: 1 problem, each with its fix above")
    );

    let out = doctor(&[], Some("tpu"), cache.path());
    assert_eq!(out.status.code(), Some(1));
    assert!(line(&text(&out), "device").contains("ZLORA_DEVICE=tpu is not a device"));
}

#[test]
fn a_config_fits_when_the_planned_peak_is_below_the_memory() {
    let cache = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    // The same run with bf16 and with f32 frozen weights; a budget between their planned CPU
    // peaks fits only the first.
    let small = example("turbo-adapter.toml");
    let large = dir.path().join("f32.toml");
    let bf16 = std::fs::read_to_string(&small).unwrap();
    assert!(bf16.contains("variant = \"turbo\"\n") && !bf16.contains("base_dtype"));
    let f32 = bf16.replace(
        "variant = \"turbo\"\n",
        "variant = \"turbo\"\nbase_dtype = \"f32\"\n",
    );
    std::fs::write(&large, f32).unwrap();
    let (small, large) = (small.as_str(), large.to_str().unwrap());
    let (peak_small, peak_large) = (
        planned_cpu_peak_gib(small, cache.path()),
        planned_cpu_peak_gib(large, cache.path()),
    );
    assert!(peak_small < peak_large, "{peak_small} {peak_large}");
    let budget = format!("{:.2}", (peak_small + peak_large) / 2.0);

    let out = doctor(
        &["--config", small, "--memory-gib", &budget],
        None,
        cache.path(),
    );
    let stdout = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    let config = line(&stdout, "config");
    assert!(config.starts_with("ok"), "{config}");
    assert!(
        config.contains(&format!("peak {peak_small:.2} GiB in phase"))
            && config.contains("(zlora plan, on the CPU) fits in"),
        "{config}"
    );

    let out = doctor(
        &["--config", large, "--memory-gib", &budget],
        None,
        cache.path(),
    );
    let stdout = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let config = line(&stdout, "config");
    assert!(config.starts_with("PROBLEM"), "{config}");
    assert!(
        config.contains(&format!("peak {peak_large:.2} GiB")) && config.contains("does not fit"),
        "{config}"
    );
    assert!(
        stdout.contains("fix: use a machine with more memory"),
        "{stdout}"
    );
    assert!(stdout.ends_with("verdict: not ready: 1 problem, each with its fix above\n"));
}

#[test]
fn bad_input_is_a_one_line_error() {
    let cache = tempfile::tempdir().unwrap();
    for (args, expected) in [
        (
            vec!["--config", "/nonexistent/train.toml"],
            "/nonexistent/train.toml",
        ),
        (vec!["--memory-gib", "0"], "--memory-gib"),
    ] {
        let out = doctor(&args, None, cache.path());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(out.stdout.is_empty(), "{}", text(&out));
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.starts_with("error: ") && stderr.contains(expected),
            "{stderr}"
        );
    }
}
