//! Shared helpers for the parity tests: fixture paths and tolerant comparisons.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};

pub fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures/tiny"))
}

/// The reference tensors written by scripts/make_fixtures.py.
pub fn reference() -> HashMap<String, Tensor> {
    let path = fixtures().join("reference.safetensors");
    candle_core::safetensors::load(&path, &Device::Cpu)
        .expect("fixtures/tiny/reference.safetensors")
}

pub fn get(r: &HashMap<String, Tensor>, name: &str) -> Tensor {
    r.get(name)
        .unwrap_or_else(|| panic!("reference tensor {name} missing"))
        .clone()
}

/// Largest absolute difference divided by the reference's largest magnitude.
pub fn rel_err(actual: &Tensor, expected: &Tensor) -> f32 {
    assert_eq!(actual.dims(), expected.dims(), "shape");
    let a = actual.to_dtype(candle_core::DType::F32).unwrap();
    let e = expected.to_dtype(candle_core::DType::F32).unwrap();
    let diff = (a - &e)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let scale = e
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    diff / scale.max(1e-12)
}

pub fn assert_close(actual: &Tensor, expected: &Tensor, tol: f32, what: &str) {
    let err = rel_err(actual, expected);
    eprintln!("{what}: relative error {err:.3e}");
    assert!(err <= tol, "{what}: relative error {err:e} > {tol:e}");
}

/// Deterministic values that are multiples of 1/16 in [-0.5, 0.5]: exact in F16 and BF16, so
/// every layout can be compared exactly whatever dtype it is written in.
pub fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) % 17) as f32 / 16.0 - 0.5
        })
        .collect()
}

/// A [rows, cols] f32 matrix of [`values`].
pub fn matrix(seed: u64, rows: usize, cols: usize) -> Tensor {
    Tensor::from_vec(values(seed, rows * cols), (rows, cols), &Device::Cpu).unwrap()
}

/// Sets every factor of a trainable adapter that starts at zero (LoRA up, LoKr w2 or w2_b,
/// LoHa w2_a) to small noise, so that the other factors get non-zero gradients too.
pub fn wake_zero_factors(
    lora: &zlora::train::lora::TrainableLora,
    rng: &mut rand_chacha::ChaCha8Rng,
) {
    for v in lora.vars() {
        let zero = v
            .as_tensor()
            .abs()
            .and_then(|a| a.max_all()?.to_scalar::<f32>())
            .unwrap()
            == 0.0;
        if zero {
            let t = (zlora::train::objective::gaussian_like(v.as_tensor(), rng).unwrap() * 0.1)
                .unwrap();
            v.set(&t).unwrap();
        }
    }
}
