//! Gradients are real: every LoRA tensor receives a gradient that matches finite
//! differences, the hand-written backward equals candle's autograd (with frozen adapters of
//! every kind in the stacks), and block checkpointing gives the same gradients.

mod common;
mod parity;

use candle_core::{DType, Device, Tensor, Var};
use common::{get, reference, wake_zero_factors};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use zlora::model::folder::ModelFolder;
use zlora::model::tiny::TinySpec;
use zlora::model::{BaseStorage, ZImageTransformer};
use zlora::nn::{Adapter, AdapterWeights, Factor, LinearTargets, Quantization};
use zlora::train::backprop::{loss_and_grads, MicroBatch};
use zlora::train::lora::{set_enabled, LoraConfig, TrainableLora, TRAINED};
use zlora::train::objective::{gaussian_like, loss};
use zlora::train::preservation::{loss_and_grads_with, ClassCaptions};

fn model() -> ZImageTransformer {
    parity::transformer(DType::F32)
}

/// A LoRA on every Linear of every block (adaLN included), with non-zero up matrices so
/// that the down matrices get non-zero gradients too.
fn full_lora(model: &mut ZImageTransformer) -> TrainableLora {
    let cfg: LoraConfig = toml_cfg(
        r#"rank = 2
alpha = 3.0
stacks = ["layers", "noise_refiner", "context_refiner"]
modules = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0"]"#,
    );
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let lora = TrainableLora::new(&cfg, model, &mut rng).unwrap();
    wake_zero_factors(&lora, &mut rng);
    lora.attach(model).unwrap();
    lora
}

fn toml_cfg(text: &str) -> LoraConfig {
    toml::from_str(text).unwrap()
}

struct Inputs {
    x: Tensor,
    t: Tensor,
    caps: Vec<Tensor>,
    target: Tensor,
    weights: Vec<f32>,
}

fn inputs() -> Inputs {
    let r = reference();
    let lat = |n: &str| get(&r, n).squeeze(1).unwrap().unsqueeze(0).unwrap();
    let x = Tensor::cat(&[lat("dit.x.0"), lat("dit.x.1")], 0).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let target = gaussian_like(&x, &mut rng).unwrap();
    Inputs {
        t: get(&r, "dit.t"),
        caps: vec![get(&r, "dit.cap.0"), get(&r, "dit.cap.1")],
        x,
        target,
        weights: vec![1.0, 0.5],
    }
}

fn batch(i: &Inputs) -> MicroBatch<'_> {
    MicroBatch {
        x: &i.x,
        t: &i.t,
        captions: &i.caps,
        target: &i.target,
        weights: &i.weights,
        pixel_weights: None,
    }
}

fn loss_at(model: &ZImageTransformer, i: &Inputs) -> f64 {
    let out = model.forward_autograd(&i.x, &i.t, &i.caps).unwrap();
    loss(&out, &i.target, &i.weights, None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
}

/// The value of a 0-d f32 tensor (the loss).
fn scalar(t: &Tensor) -> f32 {
    t.to_scalar::<f32>().unwrap()
}

fn norm(t: &Tensor) -> f64 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt() as f64
}

/// Moves `var` by `eps` along `dir` and returns the loss there.
fn shifted_loss(model: &ZImageTransformer, i: &Inputs, var: &Var, dir: &Tensor, eps: f64) -> f64 {
    let orig = var.as_tensor().copy().unwrap();
    var.set(&(&orig + (dir * eps).unwrap()).unwrap()).unwrap();
    let l = loss_at(model, i);
    var.set(&orig).unwrap();
    l
}

#[test]
fn every_lora_tensor_gets_a_gradient_that_matches_finite_differences() {
    let mut model = model();
    let lora = full_lora(&mut model);
    let i = inputs();
    let (_, grads) = loss_and_grads(&model, &lora, &batch(&i), false).unwrap();
    assert_eq!(grads.len(), lora.vars().len());
    let names = lora.var_names();
    let mut worst = 0f64;
    for ((var, g), name) in lora.vars().into_iter().zip(&grads).zip(&names) {
        let gn = norm(g);
        assert!(gn > 0.0, "{name}: zero gradient");
        let dir = (g / gn).unwrap();
        let eps = 1e-2;
        let fd = (shifted_loss(&model, &i, var, &dir, eps)
            - shifted_loss(&model, &i, var, &dir, -eps))
            / (2.0 * eps);
        let rel = (fd - gn).abs() / gn;
        worst = worst.max(rel);
        assert!(
            rel < 2e-2,
            "{name}: analytic {gn:e}, finite difference {fd:e}"
        );
    }
    eprintln!(
        "{} LoRA tensors, worst relative error {worst:.2e}",
        names.len()
    );
    assert!(
        names.iter().any(|n| n.contains("context_refiner"))
            && names.iter().any(|n| n.contains("adaLN"))
    );
}

/// Frozen adapters (a LoRA as a training adapter would be, a LoKr and a LoHa) under the
/// trained one.
fn attach_frozen_adapters(model: &mut ZImageTransformer) {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let mut m = |rows: usize, cols: usize| {
        let z = Tensor::zeros((rows, cols), DType::F32, &Device::Cpu).unwrap();
        (gaussian_like(&z, &mut rng).unwrap() * 0.2).unwrap()
    };
    let dim = model.config().dim;
    let adapters = [
        (
            "layers.0.attention.to_q",
            AdapterWeights::LowRank {
                down: m(4, dim),
                up: m(dim, 4),
            },
        ),
        (
            "layers.1.attention.to_out.0",
            AdapterWeights::Kronecker {
                w1: Factor::Full(m(2, 2)),
                w2: Factor::Product(m(dim / 2, 2), m(2, dim / 2)),
            },
        ),
        (
            "noise_refiner.0.adaLN_modulation.0",
            AdapterWeights::Hadamard {
                w1: Factor::Product(m(4 * dim, 2), m(2, model.config().adaln_dim())),
                w2: Factor::Product(m(4 * dim, 2), m(2, model.config().adaln_dim())),
            },
        ),
    ];
    for (path, weights) in adapters {
        let adapter = Adapter {
            name: "frozen".into(),
            weights,
            scale: 0.5,
            strength: 1.0,
            enabled: true,
        };
        model
            .linear_mut(path)
            .expect(path)
            .push_adapter(adapter)
            .unwrap();
    }
}

#[test]
fn the_hand_written_backward_equals_autograd() {
    let mut model = model();
    attach_frozen_adapters(&mut model);
    let lora = full_lora(&mut model);
    equals_autograd(&model, &lora);
}

/// A trained LoKr (w2 a product; both factors products; both full) or LoHa on every Linear
/// of every block: the hand-written backward carries their factors' gradients as autograd
/// does through the same forward.
#[test]
fn the_hand_written_backward_equals_autograd_for_lokr_and_loha() {
    for options in [
        "rank = 2\nalgorithm = \"lokr\"",
        "rank = 1\nalgorithm = \"lokr\"\ndecompose_both = true",
        "rank = 2\nalgorithm = \"lokr\"\nfull_matrix = true",
        "rank = 2\nalgorithm = \"loha\"",
    ] {
        let mut model = model();
        let cfg = toml_cfg(&format!(
            "{options}\nalpha = 3.0\nstacks = [\"layers\", \"noise_refiner\", \"context_refiner\"]\n\
             modules = [\"attention.to_q\", \"attention.to_out.0\", \"feed_forward.w2\", \
             \"adaLN_modulation.0\"]"
        ));
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let lora = TrainableLora::new(&cfg, &model, &mut rng).unwrap();
        wake_zero_factors(&lora, &mut rng);
        lora.attach(&mut model).unwrap();
        eprintln!("{options}");
        equals_autograd(&model, &lora);
    }
}

/// The default targets (the first main block's input needs no gradient) with adaLN added
/// (that block's attention input gradient is still needed for the modulation's).
#[test]
fn the_hand_written_backward_equals_autograd_for_main_layer_targets() {
    for modules in [
        "",
        r#"modules = ["attention.to_q", "feed_forward.w2", "adaLN_modulation.0"]"#,
    ] {
        let mut model = model();
        let cfg = toml_cfg(&format!("rank = 2\nalpha = 2.0\n{modules}"));
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let lora = TrainableLora::new(&cfg, &model, &mut rng).unwrap();
        wake_zero_factors(&lora, &mut rng);
        lora.attach(&mut model).unwrap();
        assert!(lora.modules.iter().all(|m| m.path.starts_with("layers.")));
        equals_autograd(&model, &lora);
    }
}

fn equals_autograd(model: &ZImageTransformer, lora: &TrainableLora) {
    let i = inputs();
    let (l_hand, g_hand) = loss_and_grads(model, lora, &batch(&i), false).unwrap();
    let out = model.forward_autograd(&i.x, &i.t, &i.caps).unwrap();
    let l_auto = loss(&out, &i.target, &i.weights, None).unwrap();
    let store = l_auto.backward().unwrap();
    assert_eq!(scalar(&l_hand), l_auto.to_scalar::<f32>().unwrap());
    let mut worst = 0f64;
    for ((var, g), name) in lora.vars().into_iter().zip(&g_hand).zip(lora.var_names()) {
        let want = store.get(var.as_tensor()).expect("autograd gradient");
        let rel = norm(&(want - g).unwrap()) / norm(want).max(1e-12);
        worst = worst.max(rel);
        assert!(rel < 1e-5, "{name}: differs from autograd by {rel:e}");
    }
    eprintln!(
        "{} LoRA tensors, worst relative difference {worst:.2e}",
        g_hand.len()
    );
}

#[test]
fn checkpointing_gives_the_same_gradients() {
    let mut model = model();
    let lora = full_lora(&mut model);
    let i = inputs();
    let (l_plain, g_plain) = loss_and_grads(&model, &lora, &batch(&i), false).unwrap();
    let (l_ckpt, g_ckpt) = loss_and_grads(&model, &lora, &batch(&i), true).unwrap();
    assert_eq!(scalar(&l_plain), scalar(&l_ckpt));
    for ((a, b), name) in g_plain.iter().zip(&g_ckpt).zip(lora.var_names()) {
        let diff = norm(&(a - b).unwrap());
        assert!(
            diff <= 1e-5 * norm(a).max(1e-12),
            "{name}: checkpointed gradient differs by {diff:e}"
        );
    }
}

#[test]
fn the_default_lora_trains_only_the_main_layers() {
    let mut model = model();
    let cfg: LoraConfig = toml_cfg("rank = 4\nalpha = 4.0");
    let lora = TrainableLora::new(&cfg, &model, &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
    lora.attach(&mut model).unwrap();
    assert_eq!(
        lora.modules.len(),
        2 * 7,
        "q, k, v, out, w1, w2, w3 of the 2 main layers"
    );
    let i = inputs();
    let before = loss_at(&model, &i);
    let (l, grads) = loss_and_grads(&model, &lora, &batch(&i), true).unwrap();
    assert!(
        (scalar(&l) as f64 - before).abs() < 1e-6,
        "B = 0: the LoRA starts as a no-op"
    );
    // With B = 0 only the up matrices get a non-zero gradient.
    for (g, name) in grads.iter().zip(lora.var_names()) {
        assert_eq!(norm(g) > 0.0, name.ends_with(".up"), "{name}");
    }
}

/// One training step against diffusers + peft (scripts/make_train_fixtures.py): same LoRA
/// values, injected noise and sigmas; loss and every LoRA gradient agree.
#[test]
fn one_step_matches_diffusers_and_peft() {
    let (loss_err, grads) = parity::train_step_errors(DType::F32);
    assert!(
        loss_err <= parity::LOSS_TOL,
        "loss relative error {loss_err:e}"
    );
    parity::assert_within(&grads, parity::TOL, "gradient");
}

/// cos ∠(a, b).
fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    let dot = (a * b)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    dot / (norm(a) * norm(b))
}

/// One step's LoRA gradients (default targets: the main layers) on a random model whose
/// widths every format takes (dim 768, FFN 2048, adaLN 256), with its blocks stored as `q`.
fn quantized_step(root: &std::path::Path, q: Option<Quantization>) -> Vec<Tensor> {
    let folder = ModelFolder::open(root.to_str().unwrap()).unwrap();
    let mut model = folder
        .load_transformer(
            None,
            DType::F32,
            &Device::Cpu,
            BaseStorage {
                quantize: q,
                ..BaseStorage::default()
            },
        )
        .unwrap();
    let cfg: LoraConfig = toml_cfg("rank = 4\nalpha = 4.0");
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let lora = TrainableLora::new(&cfg, &model, &mut rng).unwrap();
    wake_zero_factors(&lora, &mut rng);
    lora.attach(&mut model).unwrap();
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    let x0 = gaussian_like(&zeros(&[2, 16, 8, 8]), &mut rng).unwrap();
    let eps = gaussian_like(&x0, &mut rng).unwrap();
    let caps: Vec<Tensor> = (0..2)
        .map(|_| gaussian_like(&zeros(&[5, model.config().cap_feat_dim]), &mut rng).unwrap())
        .collect();
    let noised = zlora::train::objective::noise(&x0, &eps, &[0.3, 0.8]).unwrap();
    let batch = MicroBatch {
        x: &noised.x,
        t: &noised.t,
        captions: &caps,
        target: &noised.target,
        weights: &[1.0, 1.0],
        pixel_weights: None,
    };
    loss_and_grads(&model, &lora, &batch, true).unwrap().1
}

/// Every LoRA tensor's gradient of one step on a quantized base points where the f32 base's
/// does: the cosine similarity's bound per format is 1 − 2·(1 − the worst measured),
/// measurements in docs/benchmarks.md.
#[test]
fn lora_gradients_on_a_quantized_base_point_where_the_dense_ones_do() {
    let dir = tempfile::tempdir().unwrap();
    let spec = TinySpec {
        dim: 768,
        heads: 6,
        ..TinySpec::default()
    };
    let root = dir.path().join("model");
    zlora::model::tiny::create(&root, &spec, false).unwrap();
    let dense = quantized_step(&root, None);
    for (q, min_cos) in [
        (Quantization::Q8_0, 0.995),
        (Quantization::Int8, 0.997),
        (Quantization::Fp8, 0.95),
        (Quantization::Q6K, 0.983),
        (Quantization::Q5K, 0.94),
        (Quantization::Q4K, 0.78),
    ] {
        let grads = quantized_step(&root, Some(q));
        let cosines: Vec<f64> = grads
            .iter()
            .zip(&dense)
            .map(|(g, d)| cosine(g, d))
            .collect();
        let worst = cosines.iter().copied().fold(1.0, f64::min);
        let mean = cosines.iter().sum::<f64>() / cosines.len() as f64;
        eprintln!("{q}: LoRA gradient cosine similarity: worst {worst:.4}, mean {mean:.4}");
        assert!(worst >= min_cos, "{q}: cosine {worst}");
    }
}

/// candle's autograd: the loss of the model's prediction on (x, t, `caps`) against `target`
/// with per-item `weights`, and its gradient per LoRA tensor.
fn autograd(
    model: &ZImageTransformer,
    lora: &TrainableLora,
    i: &Inputs,
    (caps, target, weights): (&[Tensor], &Tensor, &[f32]),
) -> (f32, Vec<Tensor>) {
    let out = model.forward_autograd(&i.x, &i.t, caps).unwrap();
    let l = loss(&out, target, weights, None).unwrap();
    let store = l.backward().unwrap();
    let grads = lora
        .vars()
        .into_iter()
        .map(|v| store.get(v.as_tensor()).expect("autograd gradient").clone())
        .collect();
    (scalar(&l), grads)
}

fn bits(t: &Tensor) -> Vec<u32> {
    let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v.into_iter().map(f32::to_bits).collect()
}

/// With differential output preservation a micro-batch's gradient is the main loss's plus
/// weight × the gradient of the mean squared error between the LoRA's prediction on the
/// class captions and the prior (the model with the LoRA off), each computed separately
/// with candle's autograd; at weight 0 it is the main gradient bit for bit.
#[test]
fn preservation_adds_its_weighted_gradient_to_the_main_one() {
    let mut model = model();
    let lora = full_lora(&mut model);
    let i = inputs();
    // Class captions: other features of the same lengths.
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let class: Vec<Tensor> = i
        .caps
        .iter()
        .map(|c| gaussian_like(c, &mut rng).unwrap())
        .collect();
    set_enabled(&mut model, TRAINED, false);
    let prior = model.forward(&i.x, &i.t, &class).unwrap();
    set_enabled(&mut model, TRAINED, true);
    let (main_loss, main) = autograd(&model, &lora, &i, (&i.caps, &i.target, &i.weights));
    let (kept_loss, kept) = autograd(&model, &lora, &i, (&class, &prior, &[1.0, 1.0]));
    assert!(kept_loss > 0.0 && kept.iter().all(|g| norm(g) > 0.0));

    let weight = 0.7;
    let mut with = |weight| {
        let class = ClassCaptions {
            captions: &class,
            weight,
        };
        loss_and_grads_with(&mut model, &lora, &batch(&i), Some(&class), true).unwrap()
    };
    let got = with(weight);
    let rel = |a: f32, b: f32| ((a - b) / b).abs();
    assert!(rel(scalar(&got.main), main_loss) < 1e-5);
    let preservation = scalar(got.preservation.as_ref().unwrap());
    assert!(rel(preservation, weight as f32 * kept_loss) < 1e-5);
    let mut worst = 0f64;
    for (((g, m), k), name) in got.grads.iter().zip(&main).zip(&kept).zip(lora.var_names()) {
        let want = (m + (k * weight).unwrap()).unwrap();
        let err = norm(&(g - &want).unwrap()) / norm(&want);
        worst = worst.max(err);
        assert!(
            err < 1e-5,
            "{name}: differs from the analytic sum by {err:e}"
        );
    }
    eprintln!("worst relative difference from main + {weight} × preservation: {worst:.2e}");

    let zero = with(0.0);
    let plain = loss_and_grads_with(&mut model, &lora, &batch(&i), None, true).unwrap();
    assert!(plain.preservation.is_none());
    assert_eq!(scalar(zero.preservation.as_ref().unwrap()), 0.0);
    for (a, b) in zero.grads.iter().zip(&plain.grads) {
        assert_eq!(bits(a), bits(b));
    }
}

/// A mask over the left half of the latent: the LoRA gradient of the masked loss equals
/// candle's autograd gradient of the squared error of the left half alone (cut out with
/// `narrow`, divided by every pixel as the masked loss is), and moving the target in the
/// right half changes no gradient value.
#[test]
fn a_half_mask_trains_on_the_masked_half_only() {
    let mut model = model();
    let lora = full_lora(&mut model);
    let i = inputs();
    let (b, c, h, w) = i.x.dims4().unwrap();
    let half = w / 2;
    let ones = Tensor::ones((b, 1, h, half), DType::F32, &Device::Cpu).unwrap();
    let zeros = Tensor::zeros((b, 1, h, w - half), DType::F32, &Device::Cpu).unwrap();
    let mask = Tensor::cat(&[&ones, &zeros], 3).unwrap();
    let masked = MicroBatch {
        pixel_weights: Some(&mask),
        ..batch(&i)
    };
    let (_, g_masked) = loss_and_grads(&model, &lora, &masked, false).unwrap();

    let out = model.forward_autograd(&i.x, &i.t, &i.caps).unwrap();
    let left = |t: &Tensor| t.narrow(3, 0, half).unwrap();
    let per_item = (left(&out) - left(&i.target))
        .and_then(|d| d.sqr()?.flatten_from(1)?.sum(1))
        .unwrap();
    let weights = Tensor::new(i.weights.as_slice(), &Device::Cpu).unwrap();
    let l_half = ((per_item / (c * h * w) as f64).unwrap() * weights)
        .and_then(|l| l.mean_all())
        .unwrap();
    let store = l_half.backward().unwrap();
    for ((var, g), name) in lora.vars().into_iter().zip(&g_masked).zip(lora.var_names()) {
        let want = store.get(var.as_tensor()).expect("autograd gradient");
        let rel = norm(&(want - g).unwrap()) / norm(want).max(1e-12);
        assert!(
            rel < 1e-5,
            "{name}: differs from the left half's gradient by {rel:e}"
        );
        assert!(norm(g) > 0.0, "{name}: the masked half trains");
    }

    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let right = i.target.narrow(3, half, w - half).unwrap();
    let moved = (&right + gaussian_like(&right, &mut rng).unwrap() * 5.0).unwrap();
    let target = Tensor::cat(&[&left(&i.target), &moved], 3).unwrap();
    let other = MicroBatch {
        target: &target,
        ..masked
    };
    let (_, g_other) = loss_and_grads(&model, &lora, &other, false).unwrap();
    for ((a, b), name) in g_masked.iter().zip(&g_other).zip(lora.var_names()) {
        assert!(
            bits(a) == bits(b),
            "{name}: the unmasked half changed a gradient"
        );
    }
}
