//! Writing LoRA files: every layout reads back to the same effective deltas (1e-6 relative),
//! through every pair of layouts, for LoRA, LoKr and LoHa, and for the real PEFT fixture.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::DType;
use zlora::lora::write::{save, tensors, Metadata};
use zlora::lora::{Layout, LoraFile, LoraModule};
use zlora::nn::{AdapterWeights, Factor};

use common::{fixtures, matrix, rel_err};

const DIM: usize = 64;
const FFN: usize = 170;
const LAYOUTS: [Layout; 5] = [
    Layout::AiToolkit,
    Layout::DiffusersPeft,
    Layout::DiffSynth,
    Layout::Kohya,
    Layout::ComfyFused,
];

fn lora(seed: u64, rank: usize, (out, inp): (usize, usize), scale: f64) -> LoraModule {
    LoraModule {
        weights: AdapterWeights::LowRank {
            down: matrix(seed, rank, inp),
            up: matrix(seed + 1, out, rank),
        },
        scale,
        source_key: String::new(),
    }
}

/// Mixed ranks and scales; a block with all of q/k/v, one with q and v only, globals.
fn reference() -> BTreeMap<String, LoraModule> {
    let specs: [(&str, usize, (usize, usize), f64); 10] = [
        ("layers.0.attention.to_q", 4, (DIM, DIM), 0.5),
        ("layers.0.attention.to_k", 2, (DIM, DIM), 2.0),
        ("layers.0.attention.to_v", 4, (DIM, DIM), 0.5),
        ("layers.0.attention.to_out.0", 3, (DIM, DIM), 1.0),
        ("layers.1.attention.to_q", 4, (DIM, DIM), 0.25),
        ("layers.1.attention.to_v", 4, (DIM, DIM), 0.25),
        ("layers.1.feed_forward.w2", 4, (DIM, FFN), 0.7),
        ("noise_refiner.0.adaLN_modulation.0", 4, (4 * DIM, 256), 1.0),
        ("all_x_embedder.2-1", 2, (DIM, 64), 1.5),
        ("all_final_layer.2-1.linear", 4, (64, DIM), 1.0),
    ];
    specs
        .iter()
        .enumerate()
        .map(|(i, (p, r, shape, s))| (p.to_string(), lora(10 * i as u64, *r, *shape, *s)))
        .collect()
}

fn save_read(
    dir: &Path,
    name: &str,
    modules: &BTreeMap<String, LoraModule>,
    layout: Layout,
) -> LoraFile {
    let path = dir.join(name);
    save(
        &path,
        modules,
        layout,
        DType::F32,
        &Metadata::default(),
        false,
    )
    .unwrap();
    LoraFile::read_for_dim(&path, DIM).unwrap()
}

fn assert_same_deltas(
    got: &BTreeMap<String, LoraModule>,
    want: &BTreeMap<String, LoraModule>,
    tol: f32,
    what: &str,
) {
    let (g, w): (Vec<&String>, Vec<&String>) = (got.keys().collect(), want.keys().collect());
    assert_eq!(g, w, "{what}: modules");
    for (p, m) in want {
        let err = rel_err(&got[p].delta().unwrap(), &m.delta().unwrap());
        assert!(err <= tol, "{what} {p}: relative error {err}");
    }
}

#[test]
fn every_pair_of_layouts_round_trips_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let r = reference();
    for from in LAYOUTS {
        let first = save_read(dir.path(), &format!("{from:?}.safetensors"), &r, from);
        assert_eq!(first.layout, from);
        assert_same_deltas(&first.modules, &r, 1e-6, &format!("{from:?}"));
        for to in LAYOUTS {
            let name = format!("{from:?}-{to:?}.safetensors");
            let second = save_read(dir.path(), &name, &first.modules, to);
            assert_same_deltas(&second.modules, &r, 1e-6, &name);
        }
    }
}

#[test]
fn default_layout_has_no_alpha_and_zimage_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.safetensors");
    let meta = Metadata {
        base_model: Some("Tongyi-MAI/Z-Image-Turbo".into()),
        trigger_words: vec!["zfox".into(), "snowy".into()],
        ..Metadata::default()
    };
    save(
        &path,
        &reference(),
        Layout::AiToolkit,
        DType::F32,
        &meta,
        false,
    )
    .unwrap();
    let header = zlora::lora::LoraHeader::read(&path).unwrap();
    assert!(header
        .shapes
        .keys()
        .all(|k| k.starts_with("diffusion_model.") && !k.ends_with(".alpha")));
    assert_eq!(
        header.shapes["diffusion_model.layers.0.attention.to_k.lora_A.weight"],
        vec![2, DIM]
    );
    let m = &header.metadata;
    assert_eq!(m["modelspec.architecture"], "Z-Image/lora");
    assert_eq!(m["modelspec.base_model"], "Tongyi-MAI/Z-Image-Turbo");
    assert_eq!(m["modelspec.trigger_phrase"], "zfox, snowy");
    assert!(m["software"].contains("zlora"), "{m:?}");
    // Carried over on convert, with the math-bearing PEFT entry dropped.
    let carried = Metadata::carried_from(m);
    assert_eq!(carried.trigger_words, meta.trigger_words);
    assert!(!carried.carried.contains_key("lora_adapter_metadata"));
    let again = save(
        &path,
        &reference(),
        Layout::AiToolkit,
        DType::F32,
        &meta,
        false,
    );
    assert!(again.unwrap_err().to_string().contains("already exists"));
}

#[test]
fn comfy_layout_fuses_qkv_block_diagonally() {
    let r = reference();
    let t = tensors(&r, Layout::ComfyFused, DType::F32).unwrap();
    let dims = |k: &str| t[k].dims().to_vec();
    // layers.0: ranks 4 + 2 + 4; layers.1: q and v only, zero rows for k.
    assert_eq!(
        dims("diffusion_model.layers.0.attention.qkv.lora_down.weight"),
        [10, DIM]
    );
    assert_eq!(
        dims("diffusion_model.layers.0.attention.qkv.lora_up.weight"),
        [3 * DIM, 10]
    );
    assert_eq!(
        dims("diffusion_model.layers.1.attention.qkv.lora_up.weight"),
        [3 * DIM, 8]
    );
    assert!(t.contains_key("diffusion_model.layers.0.attention.out.lora_up.weight"));
    assert!(t.contains_key("diffusion_model.x_embedder.lora_down.weight"));
    assert!(t.contains_key("diffusion_model.final_layer.linear.lora_down.weight"));
    assert!(!t
        .keys()
        .any(|k| k.ends_with(".alpha") || k.contains("to_q")));
    let up = &t["diffusion_model.layers.1.attention.qkv.lora_up.weight"];
    let k_rows = up
        .narrow(0, DIM, DIM)
        .unwrap()
        .abs()
        .unwrap()
        .sum_all()
        .unwrap();
    assert_eq!(k_rows.to_scalar::<f32>().unwrap(), 0.0);
    // Reading splits the parts back to their own ranks, and the absent k stays absent.
    let dir = tempfile::tempdir().unwrap();
    let back = save_read(dir.path(), "comfy.safetensors", &r, Layout::ComfyFused);
    assert_eq!(
        back.modules["layers.0.attention.to_k"].weights.alpha_rank(),
        Some(2)
    );
    assert!(!back.modules.contains_key("layers.1.attention.to_k"));
}

#[test]
fn kohya_layout_stores_alpha_and_diffusers_the_peft_config() {
    let r = reference();
    let t = tensors(&r, Layout::Kohya, DType::BF16).unwrap();
    let alpha = &t["lora_unet_layers_0_attention_to_k.alpha"];
    assert_eq!(
        (alpha.dtype(), alpha.to_scalar::<f32>().unwrap()),
        (DType::F32, 4.0)
    );
    assert_eq!(
        t["lora_unet_layers_1_feed_forward_w2.lora_up.weight"].dtype(),
        DType::BF16
    );
    let dir = tempfile::tempdir().unwrap();
    let peft = save_read(dir.path(), "peft.safetensors", &r, Layout::DiffusersPeft);
    let config: serde_json::Value =
        serde_json::from_str(&peft.metadata["lora_adapter_metadata"]).unwrap();
    assert_eq!(config["transformer.r"], 4);
    assert_eq!(
        config["transformer.rank_pattern"]["layers.0.attention.to_k"],
        2
    );
    assert_eq!(
        config["transformer.alpha_pattern"]["layers.0.attention.to_out.0"],
        3
    );
    assert!(peft.modules.values().all(|m| m.scale == 1.0));
}

fn lycoris_modules() -> BTreeMap<String, LoraModule> {
    let module = |weights, scale| LoraModule {
        weights,
        scale,
        source_key: String::new(),
    };
    let lokr_full = AdapterWeights::Kronecker {
        w1: Factor::Full(matrix(1, 8, 8)),
        w2: Factor::Full(matrix(2, 8, 8)),
    };
    let lokr_low = AdapterWeights::Kronecker {
        w1: Factor::Full(matrix(3, 8, 8)),
        w2: Factor::Product(matrix(4, 8, 2), matrix(5, 2, 8)),
    };
    let loha = AdapterWeights::Hadamard {
        w1: Factor::Product(matrix(6, DIM, 2), matrix(7, 2, DIM)),
        w2: Factor::Product(matrix(8, DIM, 2), matrix(9, 2, DIM)),
    };
    BTreeMap::from([
        (
            "layers.0.attention.to_q".to_string(),
            module(lokr_full, 1.0),
        ),
        ("layers.0.attention.to_k".to_string(), module(lokr_low, 0.5)),
        (
            "layers.0.attention.to_out.0".to_string(),
            module(loha, 0.25),
        ),
        (
            "layers.0.attention.to_v".to_string(),
            lora(20, 4, (DIM, DIM), 0.5),
        ),
    ])
}

#[test]
fn lokr_and_loha_round_trip_and_diffusers_refuses_them() {
    let dir = tempfile::tempdir().unwrap();
    let r = lycoris_modules();
    for layout in [
        Layout::AiToolkit,
        Layout::DiffSynth,
        Layout::Kohya,
        Layout::ComfyFused,
    ] {
        let name = format!("lyco-{layout:?}.safetensors");
        let back = save_read(dir.path(), &name, &r, layout);
        assert_same_deltas(&back.modules, &r, 1e-6, &name);
        assert_eq!(
            back.modules["layers.0.attention.to_k"].weights.kind(),
            "LoKr"
        );
    }
    // A block with a LoKr part is not fused: q/k/v keep diffusers names ComfyUI slices.
    let t = tensors(&r, Layout::ComfyFused, DType::F32).unwrap();
    assert!(t.contains_key("diffusion_model.layers.0.attention.to_q.lokr_w1"));
    assert!(t.contains_key("diffusion_model.layers.0.attention.to_v.lora_up.weight"));
    assert!(t.contains_key("diffusion_model.layers.0.attention.out.hada_w1_a"));
    let path = dir.path().join("peft.safetensors");
    let err = save(
        &path,
        &r,
        Layout::DiffusersPeft,
        DType::F32,
        &Metadata::default(),
        false,
    );
    assert!(err
        .unwrap_err()
        .to_string()
        .contains("diffusers cannot load"));
    assert!(!path.exists());
}

#[test]
fn peft_fixture_converts_to_every_layout() {
    let dir = tempfile::tempdir().unwrap();
    let fixture = LoraFile::read_for_dim(fixtures().join("lora_peft.safetensors"), 32).unwrap();
    assert_eq!(fixture.modules.len(), 28);
    for layout in LAYOUTS {
        let path = dir.path().join(format!("{layout:?}.safetensors"));
        save(
            &path,
            &fixture.modules,
            layout,
            DType::F32,
            &Metadata::default(),
            false,
        )
        .unwrap();
        let back = LoraFile::read_for_dim(&path, 32).unwrap();
        assert_same_deltas(
            &back.modules,
            &fixture.modules,
            1e-6,
            &format!("{layout:?}"),
        );
    }
}

#[test]
fn half_precision_output_stays_close() {
    let dir = tempfile::tempdir().unwrap();
    let r = reference();
    let path = dir.path().join("bf16.safetensors");
    save(
        &path,
        &r,
        Layout::AiToolkit,
        DType::BF16,
        &Metadata::default(),
        false,
    )
    .unwrap();
    let back = LoraFile::read_for_dim(&path, DIM).unwrap();
    assert_same_deltas(&back.modules, &r, 2e-2, "bf16");
}
