//! Trainable LoKr and LoHa against LyCORIS' own modules (scripts/make_lycoris_train_fixtures.py,
//! lycoris-lora 4.1.3): for each case, zlora's config builds factors of LyCORIS' shapes with
//! the same factors at zero and the same scale; with LyCORIS' factor values, zlora's forward,
//! its hand-written backward (input gradient and every factor's gradient) and candle's
//! autograd over the same forward agree with LyCORIS' forward and torch's gradients. All in
//! f32; the tolerance is 1e-5 of the reference's largest magnitude.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use candle_core::{Device, Module, Tensor, Var};
use common::{assert_close, get};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use zlora::nn::{Adapter, AdapterWeights, Factor, Grads, Linear};
use zlora::train::lora::{LoraConfig, TrainableModule};

const TOL: f32 = 1e-5;

/// The fixture's tensors and its settings (JSON metadata "config").
fn case(name: &str) -> (HashMap<String, Tensor>, serde_json::Value) {
    let path = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../fixtures"))
        .join(format!("lycoris_train/{name}.safetensors"));
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let config = meta.metadata().as_ref().unwrap()["config"].clone();
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    (tensors, serde_json::from_str(&config).unwrap())
}

/// The `[lora]` section that asks zlora for the case's LyCORIS module.
fn lora_config(name: &str, c: &serde_json::Value) -> LoraConfig {
    let algorithm = if name.starts_with("lokr") {
        "lokr"
    } else {
        "loha"
    };
    let mut toml = format!(
        "rank = {}\nalpha = {}\nalgorithm = \"{algorithm}\"\n",
        c["lora_dim"], c["alpha"]
    );
    for key in ["factor", "decompose_both", "full_matrix"] {
        if let Some(v) = c.get(key) {
            toml.push_str(&format!("{key} = {v}\n"));
        }
    }
    toml::from_str(&toml).unwrap()
}

/// A factor from the fixture: the full matrix `{w}` when there is one, else `{w}_a`·`{w}_b`.
fn factor(t: &HashMap<String, Tensor>, w: &str) -> Factor {
    match t.get(w) {
        Some(m) => Factor::Full(m.clone()),
        None => Factor::Product(get(t, &format!("{w}_a")), get(t, &format!("{w}_b"))),
    }
}

fn fixture_weights(name: &str, t: &HashMap<String, Tensor>) -> AdapterWeights {
    if name.starts_with("lokr") {
        AdapterWeights::Kronecker {
            w1: factor(t, "lokr_w1"),
            w2: factor(t, "lokr_w2"),
        }
    } else {
        AdapterWeights::Hadamard {
            w1: factor(t, "hada_w1"),
            w2: factor(t, "hada_w2"),
        }
    }
}

/// Factor name (without the module path) → tensor.
fn named(module: &TrainableModule) -> Vec<(String, Var)> {
    module
        .var_names()
        .into_iter()
        .map(|n| n.trim_start_matches("x.").to_string())
        .zip(module.vars().iter().cloned())
        .collect()
}

#[test]
fn lokr_and_loha_train_as_lycoris_does() {
    let cases = [
        "lokr",
        "lokr_decompose_both",
        "lokr_factor4",
        "lokr_full_matrix",
        "loha",
    ];
    for name in cases {
        let (t, c) = case(name);
        let cfg = lora_config(name, &c);
        let weight = get(&t, "weight");
        let (out, inp) = weight.dims2().unwrap();

        // A new module: LyCORIS' factor names, shapes, zero factors and scale.
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let fresh = cfg.new_weights((out, inp), &mut rng, &Device::Cpu).unwrap();
        let fresh = TrainableModule::new("x".into(), fresh, cfg.alpha).unwrap();
        let mut zero = Vec::new();
        for (n, v) in named(&fresh) {
            assert_eq!(v.dims(), get(&t, &n).dims(), "{name}: shape of {n}");
            let max: f32 = v.abs().unwrap().max_all().unwrap().to_scalar().unwrap();
            if max == 0.0 {
                zero.push(n);
            }
        }
        let want_zero: Vec<String> = serde_json::from_value(c["zero_init"].clone()).unwrap();
        assert_eq!(zero, want_zero, "{name}: factors started at zero");
        assert_eq!(fresh.scale, c["scale"].as_f64().unwrap(), "{name}: scale");
        let names: BTreeSet<String> = named(&fresh).into_iter().map(|(n, _)| n).collect();
        let in_fixture: BTreeSet<String> = t
            .keys()
            .filter(|k| k.ends_with(".grad") && k.as_str() != "x.grad")
            .map(|k| k.trim_end_matches(".grad").to_string())
            .collect();
        assert_eq!(names, in_fixture, "{name}: factor names");

        // LyCORIS' values: forward, hand-written backward, autograd.
        let module =
            TrainableModule::new("x".into(), fixture_weights(name, &t), cfg.alpha).unwrap();
        let mut linear = Linear::new(weight, Some(get(&t, "bias")));
        linear
            .push_adapter(Adapter {
                name: "trained".into(),
                weights: module.weights.clone(),
                scale: module.scale,
                strength: 1.0,
                enabled: true,
            })
            .unwrap();
        let (x, dy) = (get(&t, "x"), get(&t, "dy"));
        let what = |s: &str| format!("{name} {s}");
        assert_close(
            &linear.forward_untracked(&x).unwrap(),
            &get(&t, "out"),
            TOL,
            &what("out"),
        );
        let mut grads = Grads::default();
        let dx = linear.backward(&x, &dy, &mut grads).unwrap();
        assert_close(&dx, &get(&t, "dx"), TOL, &what("dx"));
        let xv = Var::from_tensor(&x).unwrap();
        let store = (linear.forward(xv.as_tensor()).unwrap() * &dy)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for (n, v) in named(&module) {
            let want = get(&t, &format!("{n}.grad"));
            let by_hand = grads
                .take(v.as_tensor())
                .expect("a gradient for every factor");
            assert_close(&by_hand, &want, TOL, &what(&n));
            let auto = store.get(v.as_tensor()).unwrap();
            assert_close(auto, &want, TOL, &what(&format!("{n} (autograd)")));
        }
    }
}
