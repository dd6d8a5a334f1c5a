//! The transformer against diffusers' ZImageTransformer2DModel on the tiny fixture model.

mod common;
mod parity;

use candle_core::{DType, Device, Tensor};
use common::fixtures;
use parity::{
    assert_within, dit_batch_errors, dit_single_error, transformer, transformer_from, TOL,
};
use zlora::model::weights::{component_files, TransformerCheckpoint};
use zlora::model::TransformerConfig;

#[test]
fn batch_with_different_caption_lengths_matches_diffusers() {
    assert_within(&dit_batch_errors(DType::F32), TOL, "batch");
}

#[test]
fn single_item_matches_diffusers() {
    let model = transformer(DType::F32);
    assert_within(
        &dit_single_error(&model, "dit.single.out.0"),
        TOL,
        "single item",
    );
}

#[test]
fn comfyui_single_file_loads_into_the_same_weights() {
    let file = fixtures().join("comfy_transformer.safetensors");
    let checkpoint = TransformerCheckpoint::open(vec![file.clone()]).unwrap();
    assert_eq!(
        checkpoint.layout(),
        zlora::model::weights::CheckpointLayout::ComfyUi
    );
    let model = transformer_from(vec![file], DType::F32);
    // The reference ran the same bf16-rounded weights in f32.
    assert_within(
        &dit_single_error(&model, "dit_bf16w.out.0"),
        TOL,
        "ComfyUI file",
    );
}

/// Elements in the storage behind a CPU tensor (all of it, not only the tensor's view).
fn storage_elems(t: &Tensor) -> usize {
    use candle_core::{CpuStorage, Storage};
    match &*t.storage_and_layout().0 {
        Storage::Cpu(CpuStorage::BF16(v)) => v.len(),
        Storage::Cpu(CpuStorage::F32(v)) => v.len(),
        other => panic!("unexpected storage {:?}", other.dtype()),
    }
}

/// Each of q/k/v from a ComfyUI file owns its rows only (one copy of the fused qkv in all,
/// as when loading the diffusers folder), and they are the fused tensor's row thirds.
#[test]
fn comfyui_qkv_parts_own_only_their_rows() {
    let file = fixtures().join("comfy_transformer.safetensors");
    let checkpoint = TransformerCheckpoint::open(vec![file.clone()]).unwrap();
    let fused = candle_core::safetensors::load(&file, &Device::Cpu).unwrap()
        ["model.diffusion_model.layers.0.attention.qkv.weight"]
        .clone();
    let third = fused.dim(0).unwrap() / 3;
    for (i, part) in ["to_q", "to_k", "to_v"].iter().enumerate() {
        let t = checkpoint
            .tensor(&format!("layers.0.attention.{part}.weight"))
            .unwrap();
        assert_eq!(t.dtype(), DType::BF16, "stored dtype, no conversion copy");
        assert_eq!(
            storage_elems(&t),
            t.elem_count(),
            "{part} holds more than its rows"
        );
        let want = fused.narrow(0, i * third, third).unwrap();
        let diff = common::rel_err(&t, &want);
        assert_eq!(diff, 0.0, "{part} differs from its rows of qkv");
    }
}

#[test]
fn missing_and_misshapen_tensors_are_all_named() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.safetensors");
    let src = fixtures().join("model/transformer");
    let mut tensors = std::collections::BTreeMap::new();
    for f in component_files(&src).unwrap() {
        tensors.extend(candle_core::safetensors::load(&f, &Device::Cpu).unwrap());
    }
    tensors.remove("layers.1.feed_forward.w2.weight");
    tensors.insert(
        "x_pad_token".into(),
        Tensor::zeros((1, 7), DType::F32, &Device::Cpu).unwrap(),
    );
    tensors.insert(
        "extra.weight".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    zlora::fsutil::save_safetensors(&file, &tensors, None, false).unwrap();
    let cfg = TransformerConfig::from_file(&src.join("config.json")).unwrap();
    let err = TransformerCheckpoint::open(vec![file])
        .unwrap()
        .check(&cfg)
        .unwrap_err()
        .to_string();
    assert!(err.contains("broken.safetensors"), "{err}");
    assert!(
        err.contains("missing layers.1.feed_forward.w2.weight"),
        "{err}"
    );
    assert!(
        err.contains("x_pad_token: shape [1, 7], expected [1, 32]"),
        "{err}"
    );
    assert!(err.contains("unexpected tensor extra.weight"), "{err}");
}

#[test]
fn bf16_compute_stays_close_to_f32() {
    let model = transformer(DType::BF16);
    assert_within(
        &dit_single_error(&model, "dit.single.out.0"),
        5e-2,
        "bf16 compute",
    );
}
