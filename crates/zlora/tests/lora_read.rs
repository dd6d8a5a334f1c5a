//! LoRA reading end to end: synthetic files in every producer layout, written with the
//! safetensors crate at toy sizes (dim 64, 2 layers, FFN 170, adaLN 256 → 4·64), read back
//! and attached to a mock model.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use zlora::lora::identify::{identify, Architecture};
use zlora::lora::{Layout, LoraFile, LoraHeader};
use zlora::nn::{AdapterWeights, Linear, LinearTargets};

use common::matrix;

const DIM: usize = 64;
const FFN: usize = 170;
const RANK: usize = 4;
const ALPHA: f32 = 2.0;

/// Every adapter-capable Linear of the toy model with its (out, in).
fn model_shapes() -> Vec<(String, (usize, usize))> {
    let mut v = Vec::new();
    let blocks = [
        "layers.0",
        "layers.1",
        "noise_refiner.0",
        "context_refiner.0",
    ];
    for block in blocks {
        for m in ["to_q", "to_k", "to_v", "to_out.0"] {
            v.push((format!("{block}.attention.{m}"), (DIM, DIM)));
        }
        v.push((format!("{block}.feed_forward.w1"), (FFN, DIM)));
        v.push((format!("{block}.feed_forward.w2"), (DIM, FFN)));
        v.push((format!("{block}.feed_forward.w3"), (FFN, DIM)));
        if !block.starts_with("context_refiner") {
            v.push((format!("{block}.adaLN_modulation.0"), (4 * DIM, 256)));
        }
    }
    v.push(("all_final_layer.2-1.linear".into(), (16, DIM)));
    v
}

struct Mock {
    linears: BTreeMap<String, Linear>,
}

impl Mock {
    fn new() -> Self {
        let linears = model_shapes()
            .into_iter()
            .map(|(p, (o, i))| {
                let w = Tensor::zeros((o, i), DType::F32, &Device::Cpu).unwrap();
                (p, Linear::new(w, None))
            })
            .collect();
        Mock { linears }
    }

    fn adapter_count(&self) -> usize {
        self.linears.values().map(|l| l.adapters().len()).sum()
    }
}

impl LinearTargets for Mock {
    fn linear_shapes(&self) -> Vec<(String, (usize, usize))> {
        self.linears
            .iter()
            .map(|(p, l)| (p.clone(), l.shape()))
            .collect()
    }

    fn linear_mut(&mut self, path: &str) -> Option<&mut Linear> {
        self.linears.get_mut(path)
    }

    fn placement(&self) -> (Device, DType) {
        (Device::Cpu, DType::F32)
    }
}

fn scalar(x: f32) -> Tensor {
    Tensor::new(x, &Device::Cpu).unwrap()
}

/// One reference LoRA: A, B per module, all with alpha ALPHA.
struct Reference {
    modules: BTreeMap<String, (Tensor, Tensor)>,
}

impl Reference {
    fn new() -> Self {
        let modules = model_shapes()
            .into_iter()
            .enumerate()
            .map(|(i, (p, (o, inp)))| {
                let seed = i as u64 * 2;
                (p, (matrix(seed, RANK, inp), matrix(seed + 1, o, RANK)))
            })
            .collect();
        Reference { modules }
    }

    fn delta(&self, path: &str) -> Tensor {
        let (a, b) = &self.modules[path];
        (b.matmul(a).unwrap() * (ALPHA as f64 / RANK as f64)).unwrap()
    }
}

type Tensors = Vec<(String, Tensor)>;

fn write(dir: &Path, name: &str, tensors: Tensors, dtype: DType, meta: &[(&str, &str)]) -> PathBuf {
    let path = dir.join(name);
    let tensors: Tensors = tensors
        .into_iter()
        .map(|(k, t)| (k, t.to_dtype(dtype).unwrap()))
        .collect();
    let meta: HashMap<String, String> = meta
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    safetensors::serialize_to_file(tensors, Some(meta), &path).unwrap();
    path
}

/// Writes each reference module as `<prefix><name><suffix>` with `name` from `spell`.
fn per_module(
    r: &Reference,
    spell: impl Fn(&str) -> String,
    suffixes: [&str; 2],
    alpha: Option<&str>,
) -> Tensors {
    let mut out = Vec::new();
    for (p, (a, b)) in &r.modules {
        let stem = spell(p);
        out.push((format!("{stem}{}", suffixes[0]), a.clone()));
        out.push((format!("{stem}{}", suffixes[1]), b.clone()));
        if let Some(s) = alpha {
            out.push((format!("{stem}{s}"), scalar(ALPHA)));
        }
    }
    out
}

/// ComfyUI layout: q/k/v fused into a block-diagonal qkv (exact), `to_out.0` → `out`,
/// `all_final_layer.2-1` → `final_layer`.
fn comfy(r: &Reference) -> Tensors {
    let mut out = Vec::new();
    for (p, (a, b)) in &r.modules {
        if p.contains("attention.to_q")
            || p.contains("attention.to_k")
            || p.contains("attention.to_v")
        {
            continue;
        }
        let name = p
            .replace("attention.to_out.0", "attention.out")
            .replace("all_final_layer.2-1", "final_layer");
        let stem = format!("lora_unet_{}", name.replace('.', "_"));
        out.push((format!("{stem}.lora_down.weight"), a.clone()));
        out.push((format!("{stem}.lora_up.weight"), b.clone()));
        out.push((format!("{stem}.alpha"), scalar(ALPHA)));
    }
    let blocks = [
        ("layers_0", "layers.0"),
        ("layers_1", "layers.1"),
        ("noise_refiner_0", "noise_refiner.0"),
        ("context_refiner_0", "context_refiner.0"),
    ];
    for (block, dotted) in blocks {
        let parts: Vec<&(Tensor, Tensor)> = ["to_q", "to_k", "to_v"]
            .iter()
            .map(|m| &r.modules[&format!("{dotted}.attention.{m}")])
            .collect();
        let down = Tensor::cat(&[&parts[0].0, &parts[1].0, &parts[2].0], 0).unwrap();
        let up = block_diagonal(&[&parts[0].1, &parts[1].1, &parts[2].1]);
        out.push((
            format!("lora_unet_{block}_attention_qkv.lora_down.weight"),
            down,
        ));
        out.push((
            format!("lora_unet_{block}_attention_qkv.lora_up.weight"),
            up,
        ));
        out.push((
            format!("lora_unet_{block}_attention_qkv.alpha"),
            scalar(3.0 * ALPHA),
        ));
    }
    out
}

fn block_diagonal(parts: &[&Tensor]) -> Tensor {
    let rows: Vec<Tensor> = parts
        .iter()
        .enumerate()
        .map(|(i, b)| {
            let (out, r) = b.dims2().unwrap();
            let cols: Vec<Tensor> = (0..parts.len())
                .map(|j| match i == j {
                    true => (*b).clone(),
                    false => Tensor::zeros((out, r), DType::F32, &Device::Cpu).unwrap(),
                })
                .collect();
            Tensor::cat(&cols, 1).unwrap()
        })
        .collect();
    Tensor::cat(&rows, 0).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar()
        .unwrap()
}

fn read(path: &Path) -> LoraFile {
    LoraFile::read_for_dim(path, DIM).unwrap()
}

fn read_err(path: &Path) -> String {
    let msg = LoraFile::read_for_dim(path, DIM).unwrap_err().to_string();
    let name = path.file_name().unwrap().to_string_lossy();
    assert!(
        msg.contains(name.as_ref()),
        "error does not name the file: {msg}"
    );
    msg
}

#[test]
fn every_layout_gives_the_same_deltas() {
    let dir = tempfile::tempdir().unwrap();
    let r = Reference::new();
    let kohya = |p: &str| format!("lora_unet_{}", p.replace('.', "_"));
    let peft_meta = r#"{"transformer.r": 4, "transformer.lora_alpha": 2.0}"#;
    let files = [
        (
            write(
                dir.path(),
                "ai.safetensors",
                per_module(
                    &r,
                    |p| format!("diffusion_model.{p}"),
                    [".lora_A.weight", ".lora_B.weight"],
                    Some(".alpha"),
                ),
                DType::BF16,
                &[],
            ),
            Layout::AiToolkit,
        ),
        (
            write(
                dir.path(),
                "peft.safetensors",
                per_module(
                    &r,
                    |p| format!("transformer.{p}"),
                    [".lora_A.weight", ".lora_B.weight"],
                    None,
                ),
                DType::F32,
                &[("lora_adapter_metadata", peft_meta), ("format", "pt")],
            ),
            Layout::DiffusersPeft,
        ),
        (
            write(
                dir.path(),
                "diffsynth.safetensors",
                per_module(
                    &r,
                    str::to_string,
                    [".lora_A.default.weight", ".lora_B.default.weight"],
                    Some(".alpha"),
                ),
                DType::F32,
                &[],
            ),
            Layout::DiffSynth,
        ),
        (
            write(
                dir.path(),
                "kohya.safetensors",
                per_module(
                    &r,
                    kohya,
                    [".lora_down.weight", ".lora_up.weight"],
                    Some(".alpha"),
                ),
                DType::F16,
                &[("ss_base_model_version", "z_image")],
            ),
            Layout::Kohya,
        ),
        (
            write(dir.path(), "comfy.safetensors", comfy(&r), DType::BF16, &[]),
            Layout::ComfyFused,
        ),
    ];
    for (path, layout) in files {
        let file = read(&path);
        assert_eq!(file.layout, layout, "{}", path.display());
        let got: Vec<&String> = file.modules.keys().collect();
        let want: Vec<&String> = r.modules.keys().collect();
        assert_eq!(got, want, "{}", path.display());
        for (p, m) in &file.modules {
            let diff = max_diff(&m.delta().unwrap(), &r.delta(p));
            assert!(
                diff < 1e-6,
                "{} {p}: delta differs by {diff}",
                path.display()
            );
        }
    }
}

#[test]
fn fused_qkv_splits_exactly() {
    let dir = tempfile::tempdir().unwrap();
    // A dense (not block-diagonal) fused LoRA: splitting must still be exact.
    let down = matrix(7, 6, DIM);
    let up = matrix(8, 3 * DIM, 6);
    let tensors = vec![
        (
            "diffusion_model.layers.1.attention.qkv.lora_A.weight".to_string(),
            down.clone(),
        ),
        (
            "diffusion_model.layers.1.attention.qkv.lora_B.weight".to_string(),
            up.clone(),
        ),
        (
            "diffusion_model.layers.1.attention.qkv.alpha".to_string(),
            scalar(3.0),
        ),
    ];
    let file = read(&write(
        dir.path(),
        "qkv.safetensors",
        tensors,
        DType::F32,
        &[],
    ));
    let fused = (up.matmul(&down).unwrap() * 0.5).unwrap();
    for (i, part) in ["to_q", "to_k", "to_v"].iter().enumerate() {
        let m = &file.modules[&format!("layers.1.attention.{part}")];
        assert_eq!(m.scale, 0.5);
        assert_eq!(m.source_key, "diffusion_model.layers.1.attention.qkv");
        let AdapterWeights::LowRank { down: shared, .. } = &m.weights else {
            panic!("{part} is not a LoRA");
        };
        assert_eq!(max_diff(shared, &down), 0.0);
        let block = fused.narrow(0, i * DIM, DIM).unwrap();
        assert_eq!(max_diff(&m.delta().unwrap(), &block), 0.0, "{part}");
    }
    assert_eq!(file.modules.len(), 3);
}

#[test]
fn alpha_is_read_per_layout() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (matrix(1, RANK, DIM), matrix(2, DIM, RANK));
    let pair = |stem: &str, sa: &str, sb: &str| {
        vec![
            (format!("{stem}{sa}"), a.clone()),
            (format!("{stem}{sb}"), b.clone()),
        ]
    };
    let scale = |name: &str, tensors: Tensors, meta: &[(&str, &str)]| {
        let file = read(&write(dir.path(), name, tensors, DType::F32, meta));
        file.modules["layers.0.feed_forward.w1"].scale
    };
    let mut kohya = pair(
        "lora_unet_layers_0_feed_forward_w1",
        ".lora_down.weight",
        ".lora_up.weight",
    );
    kohya.push((
        "lora_unet_layers_0_feed_forward_w1.alpha".into(),
        scalar(1.0),
    ));
    assert_eq!(scale("kohya.safetensors", kohya, &[]), 0.25);
    let peft = pair(
        "transformer.layers.0.feed_forward.w1",
        ".lora_A.weight",
        ".lora_B.weight",
    );
    let meta = [(
        "lora_adapter_metadata",
        r#"{"transformer.r": 4, "transformer.lora_alpha": 8}"#,
    )];
    assert_eq!(scale("peft.safetensors", peft.clone(), &meta), 2.0);
    assert_eq!(scale("peft-bare.safetensors", peft, &[]), 1.0);
    let ai = pair(
        "diffusion_model.layers.0.feed_forward.w1",
        ".lora_A.weight",
        ".lora_B.weight",
    );
    assert_eq!(scale("ai.safetensors", ai, &[]), 1.0);
}

fn valid_pair(stem: &str) -> Tensors {
    vec![
        (format!("{stem}.lora_A.weight"), matrix(1, RANK, DIM)),
        (format!("{stem}.lora_B.weight"), matrix(2, DIM, RANK)),
    ]
}

#[test]
fn unknown_keys_are_all_listed() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = valid_pair("diffusion_model.layers.0.attention.to_q");
    t.extend(valid_pair("diffusion_model.layers.0.attention.bogus"));
    t.push((
        "diffusion_model.layers.0.attention.to_k.lora_mid.weight".into(),
        scalar(1.0),
    ));
    t.push(("diffusion_model.zz_extra".into(), scalar(1.0)));
    let msg = read_err(&write(
        dir.path(),
        "unknown.safetensors",
        t,
        DType::F32,
        &[],
    ));
    assert!(
        msg.contains("keys without a LoRA suffix (lora_A/B, lora_down/up, alpha) (2)"),
        "{msg}"
    );
    assert!(
        msg.contains("to_k.lora_mid.weight, diffusion_model.zz_extra"),
        "{msg}"
    );
    assert!(msg.contains("keys naming no Z-Image module (2)"), "{msg}");
    assert!(
        msg.contains("bogus.lora_A.weight, diffusion_model.layers.0.attention.bogus.lora_B"),
        "{msg}"
    );
}

#[test]
fn long_lists_are_capped_with_a_count() {
    let dir = tempfile::tempdir().unwrap();
    let t: Tensors = (0..30)
        .map(|i| {
            (
                format!("diffusion_model.layers.{i}.nope.lora_A.weight"),
                matrix(1, RANK, DIM),
            )
        })
        .collect();
    let msg = read_err(&write(dir.path(), "many.safetensors", t, DType::F32, &[]));
    assert!(msg.contains("keys naming no Z-Image module (30)"), "{msg}");
    assert!(msg.contains("and 10 more"), "{msg}");
}

#[test]
fn half_pairs_and_rank_mismatches_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = valid_pair("transformer.layers.0.attention.to_q");
    t.push((
        "transformer.layers.0.attention.to_k.lora_A.weight".into(),
        matrix(1, RANK, DIM),
    ));
    t.push((
        "transformer.layers.0.attention.to_v.lora_B.weight".into(),
        matrix(1, DIM, RANK),
    ));
    let msg = read_err(&write(dir.path(), "half.safetensors", t, DType::F32, &[]));
    assert!(msg.contains("incomplete modules (2)"), "{msg}");
    assert!(
        msg.contains("to_k (has transformer.layers.0.attention.to_k.lora_A.weight, lacks up/B)"),
        "{msg}"
    );
    assert!(
        msg.contains("to_v (has transformer.layers.0.attention.to_v.lora_B.weight, lacks down/A)"),
        "{msg}"
    );

    let t = vec![
        (
            "transformer.layers.0.attention.to_q.lora_A.weight".to_string(),
            matrix(1, RANK, DIM),
        ),
        (
            "transformer.layers.0.attention.to_q.lora_B.weight".to_string(),
            matrix(1, DIM, RANK + 1),
        ),
    ];
    let msg = read_err(&write(dir.path(), "rank.safetensors", t, DType::F32, &[]));
    assert!(
        msg.contains("rank mismatch: lora_down.weight [4, 64] vs lora_up.weight [64, 5]"),
        "{msg}"
    );
}

#[test]
fn dora_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let mut dora = valid_pair("diffusion_model.layers.0.attention.to_q");
    dora.push((
        "diffusion_model.layers.0.attention.to_q.dora_scale".into(),
        matrix(3, DIM, 1),
    ));
    let mut peft_dora = valid_pair("transformer.layers.0.attention.to_q");
    peft_dora.push((
        "transformer.layers.0.attention.to_q.lora_magnitude_vector".into(),
        matrix(3, 1, DIM),
    ));
    let needle = "DoRA (weight-decomposed LoRA) adapters are not supported yet";
    for (name, tensors) in [
        ("dora.safetensors", dora),
        ("peft-dora.safetensors", peft_dora),
    ] {
        let msg = read_err(&write(dir.path(), name, tensors, DType::F32, &[]));
        assert!(msg.contains(needle), "{msg}");
    }
    let meta = [("lora_adapter_metadata", r#"{"transformer.use_dora": true}"#)];
    let t = valid_pair("transformer.layers.0.attention.to_q");
    let msg = read_err(&write(
        dir.path(),
        "dora-header.safetensors",
        t,
        DType::F32,
        &meta,
    ));
    assert!(msg.contains("DoRA"), "{msg}");
}

/// LoKr and LoHa in both namings, with LyCORIS' scale rules: alpha / rank of the decomposed
/// factor; a LoKr with two full factors has scale 1 whatever its alpha.
#[test]
fn lokr_and_loha_read_with_lycoris_scales() {
    let dir = tempfile::tempdir().unwrap();
    let (w1, w2a, w2b) = (matrix(1, 8, 8), matrix(2, 8, 2), matrix(3, 2, 8));
    let lokr = vec![
        (
            "diffusion_model.layers.0.attention.to_q.lokr_w1".to_string(),
            w1.clone(),
        ),
        (
            "diffusion_model.layers.0.attention.to_q.lokr_w2_a".to_string(),
            w2a.clone(),
        ),
        (
            "diffusion_model.layers.0.attention.to_q.lokr_w2_b".to_string(),
            w2b.clone(),
        ),
        (
            "diffusion_model.layers.0.attention.to_q.alpha".to_string(),
            scalar(1.0),
        ),
        (
            "diffusion_model.layers.0.attention.to_k.lokr_w1".to_string(),
            w1.clone(),
        ),
        (
            "diffusion_model.layers.0.attention.to_k.lokr_w2".to_string(),
            matrix(4, 8, 8),
        ),
        (
            "diffusion_model.layers.0.attention.to_k.alpha".to_string(),
            scalar(1e10),
        ),
    ];
    let file = read(&write(
        dir.path(),
        "lokr.safetensors",
        lokr,
        DType::F32,
        &[],
    ));
    let q = &file.modules["layers.0.attention.to_q"];
    assert_eq!((q.weights.kind(), q.scale), ("LoKr", 0.5));
    let w2 = w2a.matmul(&w2b).unwrap();
    let want = (zlora::nn::adapter::kron(&w1, &w2).unwrap() * 0.5).unwrap();
    assert!(max_diff(&q.delta().unwrap(), &want) < 1e-6);
    assert_eq!(file.modules["layers.0.attention.to_k"].scale, 1.0);

    let (a1, b1, a2, b2) = (
        matrix(5, DIM, RANK),
        matrix(6, RANK, DIM),
        matrix(7, DIM, RANK),
        matrix(8, RANK, DIM),
    );
    let stem = "lycoris_layers_0_attention_to_q";
    let loha = vec![
        (format!("{stem}.hada_w1_a"), a1.clone()),
        (format!("{stem}.hada_w1_b"), b1.clone()),
        (format!("{stem}.hada_w2_a"), a2.clone()),
        (format!("{stem}.hada_w2_b"), b2.clone()),
        (format!("{stem}.alpha"), scalar(ALPHA)),
    ];
    let file = read(&write(
        dir.path(),
        "loha.safetensors",
        loha,
        DType::BF16,
        &[],
    ));
    let q = &file.modules["layers.0.attention.to_q"];
    assert_eq!((q.weights.kind(), q.scale), ("LoHa", 0.5));
    let want = ((a1.matmul(&b1).unwrap() * a2.matmul(&b2).unwrap()).unwrap() * 0.5).unwrap();
    assert!(max_diff(&q.delta().unwrap(), &want) < 1e-6);
    let mut model = Mock::new();
    assert_eq!(file.attach(1.0, &mut model).unwrap(), 1);
}

#[test]
fn incomplete_lokr_and_loha_sets_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let t = vec![
        (
            "lycoris_layers_0_attention_to_q.lokr_w1".to_string(),
            matrix(1, 8, 8),
        ),
        (
            "lycoris_layers_0_attention_to_q.lokr_w2_a".to_string(),
            matrix(2, 8, 2),
        ),
        (
            "lycoris_layers_0_attention_to_k.hada_w1_a".to_string(),
            matrix(2, DIM, 2),
        ),
        (
            "lycoris_layers_0_attention_to_k.hada_w1_b".to_string(),
            matrix(2, 2, DIM),
        ),
    ];
    let msg = read_err(&write(dir.path(), "half.safetensors", t, DType::F32, &[]));
    assert!(msg.contains("incomplete modules (2)"), "{msg}");
    assert!(
        msg.contains("lacks exactly one of lokr_w2 or lokr_w2_a + lokr_w2_b"),
        "{msg}"
    );
    assert!(msg.contains("lacks hada_w2_a + hada_w2_b"), "{msg}");
}

#[test]
fn foreign_architectures_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let sdxl_stem = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k";
    let mut sdxl = vec![
        (
            format!("{sdxl_stem}.lora_down.weight"),
            matrix(1, RANK, 2048),
        ),
        (format!("{sdxl_stem}.lora_up.weight"), matrix(2, 640, RANK)),
        (format!("{sdxl_stem}.alpha"), scalar(1.0)),
    ];
    sdxl.push((
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight".into(),
        matrix(3, RANK, 1280),
    ));
    let flux = vec![
        (
            "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight".to_string(),
            matrix(1, RANK, 3072),
        ),
        (
            "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight".to_string(),
            matrix(2, 9216, RANK),
        ),
    ];
    let bfl = vec![(
        "diffusion_model.single_blocks.3.linear1.lora_A.weight".to_string(),
        matrix(1, RANK, 3072),
    )];
    // Lumina2 uses the very names of ComfyUI's Z-Image layout; only the width differs.
    let lumina = vec![
        (
            "diffusion_model.layers.0.attention.qkv.lora_A.weight".to_string(),
            matrix(1, RANK, 2304),
        ),
        (
            "diffusion_model.layers.0.attention.qkv.lora_B.weight".to_string(),
            matrix(2, 3840, RANK),
        ),
    ];
    let cases = [
        ("sdxl.safetensors", sdxl, "this is a SDXL LoRA, not a Z-Image LoRA (evidence: lora_unet_input_blocks_4_1"),
        ("flux.safetensors", flux, "this is a FLUX.1 LoRA, not a Z-Image LoRA (evidence: lora_unet_double_blocks_0"),
        ("flux-bfl.safetensors", bfl, "this is a FLUX.1 LoRA, not a Z-Image LoRA (evidence: diffusion_model.single_blocks.3"),
        ("lumina.safetensors", lumina, "this is a Lumina-Image 2.0 LoRA, not a Z-Image LoRA (evidence: diffusion_model.layers.0.attention.qkv.lora_A.weight has in-dim 2304"),
    ];
    for (name, tensors, needle) in cases {
        let msg = read_err(&write(dir.path(), name, tensors, DType::F32, &[]));
        assert!(msg.contains(needle), "{msg}");
    }
    // The same verdict is available without reading the file as a LoRA (for `lora inspect`).
    let header = LoraHeader::read(dir.path().join("flux.safetensors")).unwrap();
    let id = identify(&header.shapes, &header.metadata, DIM);
    assert_eq!(id.architecture, Architecture::Flux1);
}

#[test]
fn text_encoder_adapters_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let te = vec![(
        "lora_te_model_layers_0_self_attn_q_proj.lora_down.weight".to_string(),
        matrix(1, RANK, 2560),
    )];
    let msg = read_err(&write(
        dir.path(),
        "te.safetensors",
        te.clone(),
        DType::F32,
        &[],
    ));
    assert!(msg.contains("is a text-encoder LoRA"), "{msg}");
    let mut mixed = valid_pair("diffusion_model.layers.0.attention.to_q");
    mixed.extend(te);
    let msg = read_err(&write(
        dir.path(),
        "mixed.safetensors",
        mixed,
        DType::F32,
        &[],
    ));
    assert!(
        msg.contains("mixes text-encoder and transformer adapters"),
        "{msg}"
    );
}

#[test]
fn truncated_and_forged_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(
        dir.path(),
        "good.safetensors",
        valid_pair("layers.0.attention.to_q"),
        DType::F32,
        &[],
    );
    let bytes = std::fs::read(&good).unwrap();
    for cut in [bytes.len() - 1, bytes.len() / 2, 20, 7, 0] {
        let path = dir.path().join(format!("cut{cut}.safetensors"));
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let msg = read_err(&path);
        assert!(
            msg.contains("truncated") || msg.contains("too short"),
            "{cut}: {msg}"
        );
    }
    let json = r#"{"layers.0.attention.to_q.lora_A.weight":{"dtype":"F32","shape":[4,64],"data_offsets":[0,1024]},"layers.0.attention.to_q.lora_B.weight":{"dtype":"F32","shape":[64,4],"data_offsets":[1024,99999999999]}}"#;
    let mut forged = (json.len() as u64).to_le_bytes().to_vec();
    forged.extend_from_slice(json.as_bytes());
    forged.extend(vec![0u8; 2048]);
    let path = dir.path().join("forged.safetensors");
    std::fs::write(&path, forged).unwrap();
    assert!(read_err(&path).contains("outside the 2048 data bytes"));
    let missing = dir.path().join("absent.safetensors");
    read_err(&missing);
}

#[test]
fn attach_checks_everything_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = valid_pair("diffusion_model.layers.0.attention.to_q");
    t.extend(valid_pair("diffusion_model.layers.5.attention.to_q"));
    t.extend(vec![
        (
            "diffusion_model.layers.1.feed_forward.w2.lora_A.weight".to_string(),
            matrix(1, RANK, 100),
        ),
        (
            "diffusion_model.layers.1.feed_forward.w2.lora_B.weight".to_string(),
            matrix(1, DIM, RANK),
        ),
    ]);
    let file = read(&write(dir.path(), "misfit.safetensors", t, DType::F32, &[]));
    let mut model = Mock::new();
    let msg = file.attach(1.0, &mut model).unwrap_err().to_string();
    assert!(msg.contains("misfit.safetensors"), "{msg}");
    assert!(
        msg.contains("modules that do not fit the model (2), nothing attached"),
        "{msg}"
    );
    assert!(
        msg.contains("layers.1.feed_forward.w2 (LoRA [64, 100], model [64, 170])"),
        "{msg}"
    );
    assert!(
        msg.contains("layers.5.attention.to_q (not in the model)"),
        "{msg}"
    );
    assert_eq!(model.adapter_count(), 0);
}

#[test]
fn attach_pushes_one_adapter_per_module() {
    let dir = tempfile::tempdir().unwrap();
    let r = Reference::new();
    let file = read(&write(
        dir.path(),
        "style.safetensors",
        comfy(&r),
        DType::F32,
        &[],
    ));
    let mut model = Mock::new();
    assert_eq!(file.attach(0.5, &mut model).unwrap(), r.modules.len());
    assert_eq!(model.adapter_count(), r.modules.len());
    let q = &model.linears["layers.1.attention.to_k"].adapters()[0];
    assert_eq!(
        (q.name.as_str(), q.strength, q.enabled),
        ("style", 0.5, true)
    );
    let want = (r.delta("layers.1.attention.to_k") * 0.5).unwrap();
    assert_eq!(max_diff(&q.delta().unwrap(), &want), 0.0);
}
