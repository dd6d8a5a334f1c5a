//! The transformer against diffusers' ZImageTransformer2DModel on the tiny fixture model.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, get, reference};
use zlora::model::weights::{component_files, TransformerCheckpoint};
use zlora::model::{TransformerConfig, ZImageTransformer};

fn load(files: Vec<std::path::PathBuf>, dtype: DType) -> ZImageTransformer {
    let cfg = TransformerConfig::from_file(&fixtures().join("model/transformer/config.json")).unwrap();
    TransformerCheckpoint::open(files).unwrap().load(&cfg, dtype, &Device::Cpu).unwrap()
}

fn diffusers_model() -> ZImageTransformer {
    let files = component_files(&fixtures().join("model/transformer")).unwrap();
    assert!(files.len() >= 2, "the fixture transformer is sharded");
    load(files, DType::F32)
}

/// (16, 1, H, W) reference latents → (1, 16, H, W).
fn latent(r: &std::collections::HashMap<String, Tensor>, name: &str) -> Tensor {
    get(r, name).squeeze(1).unwrap().unsqueeze(0).unwrap()
}

#[test]
fn batch_with_different_caption_lengths_matches_diffusers() {
    let r = reference();
    let model = diffusers_model();
    let x = Tensor::cat(&[latent(&r, "dit.x.0"), latent(&r, "dit.x.1")], 0).unwrap();
    let caps = [get(&r, "dit.cap.0"), get(&r, "dit.cap.1")];
    let out = model.forward(&x, &get(&r, "dit.t"), &caps).unwrap();
    for i in 0..2 {
        let expected = latent(&r, &format!("dit.out.{i}"));
        assert_close(&out.narrow(0, i, 1).unwrap(), &expected, 1e-4, &format!("item {i}"));
    }
}

#[test]
fn single_item_matches_diffusers() {
    let r = reference();
    let model = diffusers_model();
    let t = get(&r, "dit.t").narrow(0, 0, 1).unwrap();
    let out = model.forward(&latent(&r, "dit.x.0"), &t, &[get(&r, "dit.cap.0")]).unwrap();
    assert_close(&out, &latent(&r, "dit.single.out.0"), 1e-4, "single item");
}
