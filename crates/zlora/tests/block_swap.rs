//! Block swap: the main layers after the first N keep their frozen weights in host memory
//! and are copied to the device as each block runs. On the CPU host and device are one
//! memory, but the copy is real (a fresh allocation), so these tests run the swap's path:
//! outputs and a training step's gradients are bit for bit those of the unswapped model,
//! and every swapped block is copied once per forward and once more per backward.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use zlora::model::folder::ModelFolder;
use zlora::model::tiny::TinySpec;
use zlora::model::{BaseStorage, ZImageTransformer};
use zlora::nn::{LinearTargets, Quantization};
use zlora::train::backprop::{loss_and_grads, MicroBatch};
use zlora::train::lora::{LoraConfig, TrainableLora};
use zlora::train::objective::{gaussian_like, noise};

mod common;
use common::wake_zero_factors;

const LAYERS: usize = 4;

/// A random model with four main layers, dim 96 (FFN 256, adaLN 96: q8_0's 32-value blocks
/// divide every width, as the tests assert).
fn tiny(dir: &Path) -> PathBuf {
    let root = dir.join("model");
    let spec = TinySpec {
        dim: 96,
        layers: LAYERS,
        ..TinySpec::default()
    };
    zlora::model::tiny::create(&root, &spec, false).unwrap();
    root
}

fn load(
    root: &Path,
    quantize: Option<Quantization>,
    blocks_on_device: Option<usize>,
) -> ZImageTransformer {
    ModelFolder::open(root.to_str().unwrap())
        .unwrap()
        .load_transformer(
            None,
            DType::F32,
            &Device::Cpu,
            BaseStorage {
                quantize,
                blocks_on_device,
                ..BaseStorage::default()
            },
        )
        .unwrap()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

/// The bytes block swap moves per pass, from the Linears' shapes and the storage alone:
/// the frozen weights of main layers N.. (f32 or quantized), biases excluded (they stay).
fn swapped_bytes(model: &ZImageTransformer, quantize: Option<Quantization>, n: usize) -> usize {
    model
        .linear_shapes()
        .into_iter()
        .filter(|(path, _)| {
            let mut parts = path.split('.');
            parts.next() == Some("layers")
                && parts.next().and_then(|i| i.parse::<usize>().ok()) >= Some(n)
        })
        .map(|(_, (out, inp))| match quantize {
            Some(q) => q.bytes(out, inp),
            None => out * inp * 4,
        })
        .sum()
}

struct Inputs {
    x: Tensor,
    t: Tensor,
    caps: Vec<Tensor>,
}

fn inputs(model: &ZImageTransformer) -> Inputs {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
    let cap_dim = model.config().cap_feat_dim;
    Inputs {
        x: gaussian_like(&zeros(&[2, 16, 8, 8]), &mut rng).unwrap(),
        t: Tensor::new(&[0.3f32, 0.8], &Device::Cpu).unwrap(),
        // Captions of different lengths: the key mask is on.
        caps: [5, 9]
            .iter()
            .map(|&n| gaussian_like(&zeros(&[n, cap_dim]), &mut rng).unwrap())
            .collect(),
    }
}

/// Inference: the same output bits with every block resident, N = 0, 2 and 4 of 4 on the
/// device, for a dense, an int8 and a q8_0 base; each forward copies the L − N swapped
/// blocks once, and exactly their weights' bytes.
#[test]
fn a_swapped_forward_gives_the_same_bits_and_copies_each_swapped_block_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = tiny(dir.path());
    let cfg = load(&root, None, None).config().clone();
    for quantize in [None, Some(Quantization::Int8), Some(Quantization::Q8_0)] {
        if let Some(q) = quantize {
            ZImageTransformer::check_quantization(&cfg, q).expect("the tiny widths take q");
        }
        let whole = load(&root, quantize, None);
        let inp = inputs(&whole);
        let reference = bits(&whole.forward(&inp.x, &inp.t, &inp.caps).unwrap());
        assert_eq!(whole.transfers().blocks, 0);
        for n in [0, 2, LAYERS] {
            let model = load(&root, quantize, Some(n));
            assert_eq!(model.layers().resident(), n);
            for pass in 1..=2 {
                let out = model.forward(&inp.x, &inp.t, &inp.caps).unwrap();
                assert!(
                    bits(&out) == reference,
                    "{quantize:?}, N = {n}: output differs"
                );
                let moved = model.transfers();
                assert_eq!(moved.blocks, pass * (LAYERS - n), "{quantize:?}, N = {n}");
                assert_eq!(
                    moved.bytes,
                    pass * swapped_bytes(&model, quantize, n),
                    "{quantize:?}, N = {n}"
                );
            }
        }
    }
}

/// A LoRA on every Linear of every stack, with non-zero up matrices (so that every factor
/// gets a non-zero gradient).
fn full_lora(model: &mut ZImageTransformer) -> TrainableLora {
    let cfg: LoraConfig = toml::from_str(
        r#"rank = 2
alpha = 3.0
stacks = ["layers", "noise_refiner", "context_refiner"]
modules = ["attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0",
           "feed_forward.w1", "feed_forward.w2", "feed_forward.w3", "adaLN_modulation.0"]"#,
    )
    .unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let lora = TrainableLora::new(&cfg, model, &mut rng).unwrap();
    wake_zero_factors(&lora, &mut rng);
    lora.attach(model).unwrap();
    lora
}

/// One training step's loss and LoRA gradients, and the blocks it copied.
fn step(
    root: &Path,
    quantize: Option<Quantization>,
    n: Option<usize>,
    checkpointing: bool,
) -> (Vec<u32>, Vec<Vec<u32>>, usize) {
    let mut model = load(root, quantize, n);
    let lora = full_lora(&mut model);
    let inp = inputs(&model);
    let eps = gaussian_like(&inp.x, &mut ChaCha8Rng::seed_from_u64(8)).unwrap();
    let noised = noise(&inp.x, &eps, &[0.3, 0.8]).unwrap();
    let batch = MicroBatch {
        x: &noised.x,
        t: &noised.t,
        captions: &inp.caps,
        target: &noised.target,
        weights: &[1.0, 0.5],
        pixel_weights: None,
    };
    let (loss, grads) = loss_and_grads(&model, &lora, &batch, checkpointing).unwrap();
    (
        bits(&loss),
        grads.iter().map(bits).collect(),
        model.transfers().blocks,
    )
}

/// Training: the loss and every LoRA gradient of a step are bit for bit the unswapped
/// ones with N = 0 and 2, with and without checkpointing, on a dense and a q8_0 base; the
/// step copies each swapped block twice (its forward, then its backward, which also
/// recomputes a checkpointed block's tape from the same copy).
#[test]
fn a_swapped_training_step_gives_the_same_gradients_and_copies_each_block_twice() {
    let dir = tempfile::tempdir().unwrap();
    let root = tiny(dir.path());
    for quantize in [None, Some(Quantization::Q8_0)] {
        for checkpointing in [true, false] {
            let (loss, grads, moved) = step(&root, quantize, None, checkpointing);
            assert_eq!(moved, 0);
            assert!(grads.iter().all(|g| g.iter().any(|&v| v != 0)));
            for n in [0, 2] {
                let (l, g, moved) = step(&root, quantize, Some(n), checkpointing);
                let case = format!("{quantize:?}, N = {n}, checkpointing {checkpointing}");
                assert!(l == loss, "{case}: loss differs");
                assert!(g == grads, "{case}: gradients differ");
                assert_eq!(moved, 2 * (LAYERS - n), "{case}");
            }
        }
    }
}

#[test]
fn more_blocks_on_the_device_than_layers_is_refused_naming_the_setting() {
    let dir = tempfile::tempdir().unwrap();
    let root = tiny(dir.path());
    let folder = ModelFolder::open(root.to_str().unwrap()).unwrap();
    let storage = BaseStorage {
        blocks_on_device: Some(LAYERS + 1),
        ..BaseStorage::default()
    };
    let err = folder.check_storage(storage).unwrap_err().to_string();
    assert!(
        err.contains("blocks_on_device") && err.contains("5") && err.contains("at most 4"),
        "{err}"
    );
    let err = folder
        .load_transformer(None, DType::F32, &Device::Cpu, storage)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("blocks_on_device") && err.contains("at most 4"),
        "{err}"
    );
    folder
        .check_storage(BaseStorage {
            blocks_on_device: Some(LAYERS),
            ..storage
        })
        .unwrap();
}
