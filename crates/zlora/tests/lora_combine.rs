//! `combine`: exact rank concatenation, SVD re-compression with an exact error report, and
//! LoKr meeting LoRA on one module.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::Tensor;
use zlora::lora::combine::combine;
use zlora::lora::{Layout, LoraFile, LoraModule};
use zlora::nn::{AdapterWeights, Factor};

use common::{fixtures, matrix, rel_err};

fn file(name: &str, modules: BTreeMap<String, LoraModule>) -> LoraFile {
    LoraFile {
        path: PathBuf::from(name),
        layout: Layout::AiToolkit,
        metadata: BTreeMap::new(),
        modules,
    }
}

fn module(weights: AdapterWeights, scale: f64) -> LoraModule {
    LoraModule {
        weights,
        scale,
        source_key: String::new(),
    }
}

fn lora(seed: u64, rank: usize, out: usize, inp: usize) -> AdapterWeights {
    AdapterWeights::LowRank {
        down: matrix(seed, rank, inp),
        up: matrix(seed + 1, out, rank),
    }
}

fn peft() -> LoraFile {
    LoraFile::read_for_dim(fixtures().join("lora_peft.safetensors"), 32).unwrap()
}

/// The fixture's to_q and w2 again, other values, scale 0.5, plus a module of its own.
fn other() -> LoraFile {
    file(
        "other",
        BTreeMap::from([
            (
                "layers.0.attention.to_q".into(),
                module(lora(1, 3, 32, 32), 0.5),
            ),
            (
                "layers.0.feed_forward.w2".into(),
                module(lora(3, 2, 32, 85), 0.5),
            ),
            (
                "layers.1.adaLN_modulation.0".into(),
                module(lora(5, 2, 128, 32), 2.0),
            ),
        ]),
    )
}

/// Σ strength · delta over the files that have `path`.
fn expected(inputs: &[(&LoraFile, f64)], path: &str) -> Tensor {
    let mut sum: Option<Tensor> = None;
    for (f, s) in inputs {
        if let Some(m) = f.modules.get(path) {
            let d = (m.delta().unwrap() * *s).unwrap();
            sum = Some(match sum {
                Some(acc) => (acc + d).unwrap(),
                None => d,
            });
        }
    }
    sum.unwrap()
}

#[test]
fn rank_concatenation_is_exact() {
    let (a, b) = (peft(), other());
    let inputs = [(&a, 0.8), (&b, 1.0)];
    let (modules, reports) = combine(&inputs, None).unwrap();
    assert_eq!(modules.len(), 29);
    for (path, m) in &modules {
        let err = rel_err(&m.delta().unwrap(), &expected(&inputs, path));
        assert!(err < 1e-6, "{path}: {err}");
    }
    let q = reports
        .iter()
        .find(|r| r.path == "layers.0.attention.to_q")
        .unwrap();
    assert_eq!((q.rank_in, q.rank_out, q.rel_error), (7, 7, 0.0));
}

#[test]
fn max_rank_recompresses_and_reports_the_true_error() {
    let (a, b) = (peft(), other());
    let inputs = [(&a, 0.8), (&b, 1.0)];
    let (modules, reports) = combine(&inputs, Some(4)).unwrap();
    for r in &reports {
        let want = expected(&inputs, &r.path);
        let got = modules[&r.path].delta().unwrap();
        let diff = (&got - &want).unwrap().sqr().unwrap().sum_all().unwrap();
        let norm = want.sqr().unwrap().sum_all().unwrap();
        let actual = (diff.to_scalar::<f32>().unwrap() / norm.to_scalar::<f32>().unwrap()).sqrt();
        assert!(r.rank_out <= 4, "{}", r.path);
        assert!(
            (f64::from(actual) - r.rel_error).abs() < 1e-5,
            "{}: {actual} vs {}",
            r.path,
            r.rel_error
        );
        if r.rank_in <= 4 {
            assert_eq!(r.rel_error, 0.0, "{}", r.path);
        }
    }
    let q = reports
        .iter()
        .find(|r| r.path == "layers.0.attention.to_q")
        .unwrap();
    assert!(q.rel_error > 1e-3, "rank 7 → 4 must lose something");
    // A file combined with itself has its own rank: the cap loses nothing.
    let (modules, reports) = combine(&[(&a, 0.5), (&a, 0.5)], Some(4)).unwrap();
    for r in &reports {
        assert!(r.rel_error < 1e-6, "{}: {}", r.path, r.rel_error);
        let err = rel_err(
            &modules[&r.path].delta().unwrap(),
            &a.modules[&r.path].delta().unwrap(),
        );
        assert!(err < 1e-5, "{}: {err}", r.path);
    }
}

#[test]
fn lokr_meets_lora_only_with_a_rank_cap() {
    let lokr = AdapterWeights::Kronecker {
        w1: Factor::Full(matrix(7, 4, 4)),
        w2: Factor::Product(matrix(8, 8, 1), matrix(9, 1, 8)),
    };
    let k = file(
        "lokr",
        BTreeMap::from([("layers.0.attention.to_q".into(), module(lokr, 0.5))]),
    );
    let b = other();
    let inputs = [(&k, 1.0), (&b, 0.7)];
    let err = combine(&inputs, None).unwrap_err().to_string();
    assert!(err.contains("pass --max-rank"), "{err}");
    // kron(rank 4, rank 1) has rank 4, plus rank 3: a cap of 7 is exact.
    let (modules, reports) = combine(&inputs, Some(7)).unwrap();
    let q = &modules["layers.0.attention.to_q"];
    assert_eq!(q.weights.kind(), "LoRA");
    let e = rel_err(
        &q.delta().unwrap(),
        &expected(&inputs, "layers.0.attention.to_q"),
    );
    assert!(e < 1e-5, "{e}");
    assert!(reports.iter().all(|r| r.rel_error < 1e-6));
    // Alone, a LoKr keeps its algorithm.
    let (alone, _) = combine(&[(&k, 0.5)], None).unwrap();
    assert_eq!(alone["layers.0.attention.to_q"].weights.kind(), "LoKr");
    assert_eq!(alone["layers.0.attention.to_q"].scale, 0.25);
}
