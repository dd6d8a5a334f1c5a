//! Records what a CUDA build was made with, for `zlora doctor`: the CUDA release of the nvcc that
//! compiled candle's kernels and the architecture they target. Both are found the way candle's
//! kernel build finds them (cudaforge: `$NVCC`, `PATH`, `$CUDA_HOME`; `CUDA_COMPUTE_CAP`, else
//! `nvidia-smi`). A CPU build records nothing.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    for var in ["NVCC", "PATH", "CUDA_HOME", "CUDA_PATH", "CUDA_COMPUTE_CAP"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    if let Some(release) = nvcc_release() {
        println!("cargo:rustc-env=ZLORA_CUDA_RELEASE={release}");
    }
    if let Some(cap) = compute_cap() {
        println!("cargo:rustc-env=ZLORA_CUDA_COMPUTE_CAP={cap}");
    }
}

/// "13.0" from nvcc's `Cuda compilation tools, release 13.0, V13.0.88`.
fn nvcc_release() -> Option<String> {
    let roots = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .map(|root| format!("{root}/bin/nvcc"));
    let mut candidates = std::env::var("NVCC")
        .into_iter()
        .chain(["nvcc".to_string()])
        .chain(roots);
    candidates.find_map(|nvcc| {
        let out = Command::new(nvcc).arg("--version").output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let release = text.split("release ").nth(1)?.split(',').next()?;
        Some(release.trim().to_string())
    })
}

/// The compute capability as a number (90 for "90", "9.0", "sm_90a"): candle builds its kernels
/// for `CUDA_COMPUTE_CAP`, or for the first GPU `nvidia-smi` lists.
fn compute_cap() -> Option<u32> {
    let raw = match std::env::var("CUDA_COMPUTE_CAP") {
        Ok(cap) => cap,
        Err(_) => {
            let out = Command::new("nvidia-smi")
                .args(["--query-gpu=compute_cap", "--format=csv,noheader"])
                .output()
                .ok()?;
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .next()?
                .to_string()
        }
    };
    let digits: String = raw
        .trim()
        .trim_start_matches("sm_")
        .chars()
        .filter(|c| c.is_ascii_digit())
        .collect();
    let cap: u32 = digits.parse().ok()?;
    // "8.6" and "9" are major[.minor]; "86" and "90a" are already whole.
    Some(if cap < 20 { cap * 10 } else { cap })
}
