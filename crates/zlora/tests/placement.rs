//! Device and dtype by construction: a LoRA file's tensors enter a model on the model's device
//! in its compute dtype whatever the file's layout (on the CPU, the dtype is the visible twin of
//! the device: a file read in f32 must not stay f32 on a bf16 model, as it must not stay on the
//! CPU beside a CUDA model); inference records no autograd graph even with the LoRA being
//! trained attached; and `Device::Cpu` is named only where the CPU is meant.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::fixtures;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use zlora::lora::write::{save, Metadata};
use zlora::lora::{Layout, LoraFile};
use zlora::model::weights::{component_files, TransformerCheckpoint};
use zlora::model::{TransformerConfig, ZImageTransformer};
use zlora::nn::LinearTargets;
use zlora::sample::pipeline::{denoise, Conditioning, DenoiseSettings};
use zlora::sample::Guidance;
use zlora::train::lora::{LoraConfig, TrainableLora};

fn model(dtype: DType) -> ZImageTransformer {
    let dir = fixtures().join("model/transformer");
    let cfg = TransformerConfig::from_file(&dir.join("config.json")).unwrap();
    let ckpt = TransformerCheckpoint::open(component_files(&dir).unwrap()).unwrap();
    ckpt.load(&cfg, dtype, &Device::Cpu).unwrap()
}

/// The fixture LoRA rewritten in every layout, plus the LyCORIS LoKr and LoHa fixtures.
fn every_layout(dir: &Path, dim: usize) -> Vec<PathBuf> {
    let source = LoraFile::read_for_dim(fixtures().join("lora_peft.safetensors"), dim).unwrap();
    let layouts = [
        Layout::AiToolkit,
        Layout::DiffusersPeft,
        Layout::DiffSynth,
        Layout::Kohya,
        Layout::ComfyFused,
    ];
    let mut files: Vec<PathBuf> = layouts
        .iter()
        .enumerate()
        .map(|(i, &layout)| {
            let path = dir.join(format!("layout{i}.safetensors"));
            save(
                &path,
                &source.modules,
                layout,
                DType::F32,
                &Metadata::default(),
                false,
            )
            .unwrap();
            path
        })
        .collect();
    files.extend(["lokr", "loha"].map(|a| fixtures().join(format!("lora_{a}.safetensors"))));
    files
}

#[test]
fn every_layout_enters_a_bf16_model_in_bf16_on_its_device() {
    let mut model = model(DType::BF16);
    let dim = model.config().dim;
    let dir = tempfile::tempdir().unwrap();
    let files = every_layout(dir.path(), dim);
    for (i, path) in files.iter().enumerate() {
        let file = LoraFile::read_for_dim(path, dim).unwrap();
        let n = file
            .attach_named(&format!("file{i}"), 0.5, &mut model)
            .unwrap();
        assert!(n > 0, "{}", path.display());
    }
    let mut seen = vec![0usize; files.len()];
    for (path, _) in model.linear_shapes() {
        for adapter in model.linear_mut(&path).unwrap().adapters() {
            let i: usize = adapter.name["file".len()..].parse().unwrap();
            seen[i] += 1;
            for t in adapter.weights.tensors() {
                assert_eq!(t.dtype(), DType::BF16, "{path}: {}", adapter.name);
                assert!(t.device().is_cpu(), "{path}: {}", adapter.name);
            }
        }
    }
    assert!(seen.iter().all(|&n| n > 0), "every file attached: {seen:?}");
    // The bf16 model with all of them runs.
    let out = forward(&model);
    assert_eq!(out.dtype(), DType::F32);
}

fn forward(model: &ZImageTransformer) -> Tensor {
    let x = Tensor::randn(0f32, 1.0, (1, 16, 8, 8), &Device::Cpu).unwrap();
    let cap = Tensor::randn(0f32, 1.0, (5, model.config().cap_feat_dim), &Device::Cpu).unwrap();
    let t = Tensor::new(&[0.5f32], &Device::Cpu).unwrap();
    model.forward(&x, &t, &[cap]).unwrap()
}

/// The sampler with the LoRA being trained attached (its factors are `Var`s) records no
/// graph: its output tracks no op, while the autograd forward of the same model does.
#[test]
fn inference_records_no_graph_through_trainable_adapters() {
    let mut model = model(DType::F32);
    let cfg: LoraConfig = toml::from_str("rank = 2\nalpha = 2.0").unwrap();
    let lora = TrainableLora::new(&cfg, &model, &mut ChaCha8Rng::seed_from_u64(1)).unwrap();
    lora.attach(&mut model).unwrap();
    let cap = Tensor::randn(0f32, 1.0, (5, model.config().cap_feat_dim), &Device::Cpu).unwrap();
    let cond = Conditioning {
        positive: cap.clone(),
        negative: Some(cap.clone()),
    };
    let settings = DenoiseSettings {
        steps: 2,
        shift: 3.0,
        guidance: Guidance {
            scale: 2.0,
            ..Guidance::default()
        },
    };
    let start = Tensor::randn(0f32, 1.0, (1, 16, 8, 8), &Device::Cpu).unwrap();
    let out = denoise(&model, &cond, start.clone(), &settings, &mut |_, _| {}).unwrap();
    assert!(
        !out.track_op(),
        "the sampler's latents carry an autograd graph"
    );
    assert!(!forward(&model).track_op());
    let t = Tensor::new(&[0.5f32], &Device::Cpu).unwrap();
    let tracked = model.forward_autograd(&start, &t, &[cap]).unwrap();
    assert!(
        tracked.track_op(),
        "the autograd forward must record its graph"
    );
}

/// Files where `Device::Cpu` legitimately means the CPU (outside `#[cfg(test)]` modules), and
/// why. Anywhere else, a tensor made on the CPU would sit beside a GPU model.
const CPU_PLACES: [(&str, &str); 11] = [
    ("zlora/src/device.rs", "the CPU device when chosen"),
    ("zlora/src/nn/cpu.rs", "the CPU kernels' outputs"),
    (
        "zlora/src/lora/container.rs",
        "LoRA files are parsed on the host",
    ),
    (
        "zlora/src/lora/write.rs",
        "LoRA files are written from the host",
    ),
    ("zlora/src/linalg.rs", "QR/SVD in f64 on the host"),
    (
        "zlora/src/model/weights.rs",
        "lazy checkpoint reads before placement",
    ),
    ("zlora/src/model/tiny.rs", "random weights written to files"),
    ("zlora/src/sample/image.rs", "pixels for PNG files"),
    (
        "zlora/src/data/cache.rs",
        "the latent/caption cache on disk",
    ),
    ("zlora/src/train/state.rs", "checkpoints read from disk"),
    (
        "zlora/src/model/dit/swap.rs",
        "block swap keeps swapped weights in host memory",
    ),
];

/// The source before its `#[cfg(test)]` module (tests may use the CPU freely).
fn non_test_code(text: &str) -> &str {
    text.find("#[cfg(test)]").map_or(text, |i| &text[..i])
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn the_cpu_is_named_only_where_the_cpu_is_meant() {
    let crates = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    for src in ["zlora/src", "zlora-cli/src"] {
        rust_files(&crates.join(src), &mut files);
    }
    let mut offenders = Vec::new();
    for path in files {
        let rel = path
            .strip_prefix(&crates)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        let allowed = CPU_PLACES.iter().any(|(place, _)| rel == *place);
        let text = std::fs::read_to_string(&path).unwrap();
        if !allowed && non_test_code(&text).contains("Device::Cpu") {
            offenders.push(rel);
        }
    }
    assert!(
        offenders.is_empty(),
        "Device::Cpu named outside the places that mean the CPU (place tensors on the model's \
         device, or add the file to CPU_PLACES with the reason): {offenders:?}"
    );
    let stale: Vec<&str> = CPU_PLACES
        .iter()
        .map(|(p, _)| *p)
        .filter(|p| !crates.join(p).exists())
        .collect();
    assert!(
        stale.is_empty(),
        "CPU_PLACES lists missing files: {stale:?}"
    );
}
