//! LoKr and LoHa against LyCORIS itself: files written by LyCORIS' `save_weights`
//! (scripts/make_fixtures.py, lycoris-lora 4.1.3), attached at strength 0.7 to the tiny
//! transformer, reproduce the output of LyCORIS' own forward.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use common::{assert_close, fixtures, get, reference};
use zlora::lora::write::{save, Metadata};
use zlora::lora::{Layout, LoraFile};
use zlora::model::weights::{component_files, TransformerCheckpoint};
use zlora::model::{TransformerConfig, ZImageTransformer};

const STRENGTH: f64 = 0.7;

fn model() -> ZImageTransformer {
    let dir = fixtures().join("model/transformer");
    let cfg = TransformerConfig::from_file(&dir.join("config.json")).unwrap();
    TransformerCheckpoint::open(component_files(&dir).unwrap())
        .unwrap()
        .load(&cfg, DType::F32, &Device::Cpu)
        .unwrap()
}

fn lycoris_reference() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        fixtures().join("lycoris_reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

/// Output for dit item 0 with `file` attached at 0.7.
fn forward_with(file: &LoraFile) -> Tensor {
    let r = reference();
    let mut m = model();
    assert_eq!(file.attach(STRENGTH, &mut m).unwrap(), 31);
    let x = get(&r, "dit.x.0").squeeze(1).unwrap().unsqueeze(0).unwrap();
    let t = get(&r, "dit.t").narrow(0, 0, 1).unwrap();
    m.forward(&x, &t, &[get(&r, "dit.cap.0")]).unwrap()
}

fn expected(algo: &str) -> Tensor {
    let r = lycoris_reference();
    get(&r, &format!("dit_{algo}.out.0"))
        .squeeze(1)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
}

#[test]
fn lycoris_lokr_and_loha_match_lycoris() {
    for (algo, kind) in [("lokr", "LoKr"), ("loha", "LoHa")] {
        let file = LoraFile::read_for_dim(fixtures().join(format!("lora_{algo}.safetensors")), 32)
            .unwrap();
        assert_eq!(file.layout, Layout::Kohya);
        assert!(file.modules.values().all(|m| m.weights.kind() == kind));
        assert_close(&forward_with(&file), &expected(algo), 1e-4, algo);
    }
    // Full LoKr factors have scale 1 whatever alpha; a decomposed w2 has alpha / rank.
    let lokr = LoraFile::read_for_dim(fixtures().join("lora_lokr.safetensors"), 32).unwrap();
    assert_eq!(lokr.modules["layers.0.attention.to_q"].scale, 1.0);
    assert_eq!(lokr.modules["layers.0.feed_forward.w1"].scale, 0.5);
}

#[test]
fn lycoris_files_convert_to_the_default_and_comfyui_layouts() {
    let dir = tempfile::tempdir().unwrap();
    for algo in ["lokr", "loha"] {
        let file = LoraFile::read_for_dim(fixtures().join(format!("lora_{algo}.safetensors")), 32)
            .unwrap();
        for layout in [Layout::AiToolkit, Layout::ComfyFused] {
            let path = dir.path().join(format!("{algo}-{layout:?}.safetensors"));
            save(
                &path,
                &file.modules,
                layout,
                DType::F32,
                &Metadata::default(),
                false,
            )
            .unwrap();
            let back = LoraFile::read_for_dim(&path, 32).unwrap();
            let what = format!("{algo} as {layout:?}");
            assert_close(&forward_with(&back), &expected(algo), 1e-4, &what);
        }
    }
}
