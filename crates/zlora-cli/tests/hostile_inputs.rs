//! Hostile but realistic inputs (issue 17, input side): every size is bounded before anything
//! is allocated, no NaN or inf passes silently, readers refuse what is not a regular file, and
//! each refusal is one line naming the thing and the limit, with a failing exit code.

mod common;

use common::parity::fixtures;
use common::{copy_tree, generate_small, stderr, tiny_model_and_data, zlora};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The fixture model (diffusers layout, dim 32) and a PEFT LoRA that fits it.
fn model() -> PathBuf {
    fixtures().join("model")
}

fn lora() -> PathBuf {
    fixtures().join("lora_peft.safetensors")
}

/// Asserts exit code 1 and a single `error:` line holding every one of `parts`; the line.
fn refused(out: &Output, parts: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "stderr:\n{err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "one error line:\n{err}");
    for p in parts {
        assert!(errors[0].contains(p), "{p:?} missing from:\n{err}");
    }
    errors[0].to_string()
}

/// `zlora generate` on the fixture model with `extra` arguments; 32×32, 2 steps and
/// DIR/out.png unless `extra` sets them.
fn generate(dir: &Path, extra: &[&str]) -> Output {
    generate_small(&model(), &dir.join("out.png"), extra, &[])
}

#[test]
fn image_sizes_beyond_the_rope_tables_are_refused_before_loading() {
    let dir = tempfile::tempdir().unwrap();
    for (w, h) in [
        ("100000", "100000"),
        ("2147483648", "2147483648"),
        ("8589934592", "8"),
    ] {
        let out = generate(dir.path(), &["--width", w, "--height", h]);
        let line = refused(&out, &["larger than this model's limit of", "RoPE"]);
        assert!(line.contains(&format!("{w}×{h}")), "{line}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !err.contains("encoding the prompt"),
            "before loading:\n{err}"
        );
    }
}

#[test]
fn an_image_that_cannot_fit_in_memory_is_refused_with_the_estimate() {
    let dir = tempfile::tempdir().unwrap();
    // Within the fixture's RoPE tables (4096 px) but 256 GiB of attention scores.
    let out = generate(dir.path(), &["--width", "4096", "--height", "4096"]);
    refused(&out, &["4096×4096 needs at least 256.0 GiB", "available"]);
}

#[test]
fn steps_shift_guidance_and_strengths_are_checked_at_parse_time() {
    let dir = tempfile::tempdir().unwrap();
    let lora = s(&lora()).to_owned();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--steps".into(), "4294967296".into()],
            "steps must be 1 to 1000",
        ),
        (
            vec!["--shift=0".into()],
            "shift must be a positive finite number",
        ),
        (vec!["--shift=-1".into()], "got -1"),
        (vec!["--shift=nan".into()], "got NaN"),
        (vec!["--shift=inf".into()], "got inf"),
        (
            vec!["--guidance=inf".into()],
            "guidance must be a finite number",
        ),
        (
            vec!["--lora".into(), format!("{lora}:1e999")],
            "strength of LoRA",
        ),
        (
            vec!["--seed=1".into(), "--seed=1".into(), "--seed=2".into()],
            "seed 1 is given twice",
        ),
    ];
    for (extra, part) in cases {
        let args: Vec<&str> = extra.iter().map(String::as_str).collect();
        let out = generate(dir.path(), &args);
        refused(&out, &[part]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.contains("encoding the prompt"), "{extra:?}:\n{err}");
    }
    assert!(!dir.path().join("out.png").exists());
}

#[test]
fn a_missing_lora_is_reported_before_the_model_loads() {
    let dir = tempfile::tempdir().unwrap();
    let out = generate(dir.path(), &["--lora", "f:abc"]);
    refused(&out, &["f:abc", "FILE:STRENGTH"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("loading the transformer"), "{err}");
}

#[test]
fn a_jpg_output_name_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let jpg = dir.path().join("x.jpg");
    let out = generate(dir.path(), &["--out", s(&jpg)]);
    refused(&out, &["x.jpg", "must be a .png file"]);
    assert!(!jpg.exists());
}

#[test]
fn a_file_name_with_a_newline_is_escaped_in_the_one_error_line() {
    let dir = tempfile::tempdir().unwrap();
    let name = dir.path().join("bad\nname.safetensors");
    let out = generate(dir.path(), &["--lora", s(&name)]);
    refused(&out, &["bad\\nname.safetensors"]);
}

#[test]
fn a_strength_whose_result_overflows_gives_no_image() {
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("{}:1e30", s(&lora()));
    let out = generate(dir.path(), &["--lora", &spec]);
    refused(&out, &["latents of image 1 came out NaN or inf"]);
    assert!(!dir.path().join("out.png").exists(), "no black PNG");
}

#[test]
fn a_scheduler_config_with_shift_zero_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("model");
    copy_tree(&model(), &copy);
    let config = copy.join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    json["shift"] = 0.0.into();
    std::fs::write(&config, json.to_string()).unwrap();
    let out = generate_small(&copy, &dir.path().join("a.png"), &[], &[]);
    refused(
        &out,
        &[
            "scheduler_config.json",
            "shift must be a positive finite number",
        ],
    );
}

#[test]
fn nan_latents_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nan.safetensors");
    let t = candle_core::Tensor::full(f32::NAN, (1, 16, 8, 8), &candle_core::Device::Cpu).unwrap();
    let map = [("latents".to_string(), t)].into_iter().collect();
    zlora::fsutil::save_safetensors(&path, &map, None, false).unwrap();
    let out = generate(dir.path(), &["--latents", s(&path)]);
    refused(&out, &["nan.safetensors", "NaN or inf"]);
}

#[test]
fn a_long_prompt_is_cut_with_a_warning_naming_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = "fox ".repeat(2625);
    assert_eq!(prompt.len(), 10_500);
    let out = generate(dir.path(), &["--prompt", &prompt, "--steps", "1"]);
    let err = stderr(&out);
    assert!(
        err.contains("warning: the prompt is") && err.contains("reads the first 512"),
        "{err}"
    );
}

/// A copy of the fixture LoRA with its first f32 value of the first tensor set to NaN.
fn nan_lora(dir: &Path) -> (PathBuf, String) {
    let mut bytes = std::fs::read(lora()).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (name, view) = st
        .tensors()
        .into_iter()
        .filter(|(_, v)| v.dtype() == safetensors::Dtype::F32)
        .min_by(|a, b| a.0.cmp(&b.0))
        .unwrap();
    let at = view.data().as_ptr() as usize - bytes.as_ptr() as usize;
    drop(st);
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let path = dir.join("nan_lora.safetensors");
    std::fs::write(&path, bytes).unwrap();
    (path, name)
}

#[test]
fn a_lora_with_a_nan_is_flagged_by_inspect_and_refused_unless_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let (nan, _) = nan_lora(dir.path());
    let inspect = zlora(&["lora", "inspect", s(&nan)]);
    assert_eq!(inspect.status.code(), Some(5));
    let err = String::from_utf8_lossy(&inspect.stderr);
    assert!(err.contains("1 NaN/inf values in 1 modules"), "{err}");
    // generate, convert, combine and merge refuse it with the same count.
    let converted = dir.path().join("c.safetensors");
    let merged = dir.path().join("merged");
    let runs = [
        generate(dir.path(), &["--lora", s(&nan)]),
        zlora(&["lora", "convert", s(&nan), s(&converted)]),
        zlora(&["lora", "combine", s(&nan), "-o", s(&converted)]),
        zlora(&[
            "lora",
            "merge",
            "--model",
            s(&model()),
            s(&nan),
            "-o",
            s(&merged),
        ]),
    ];
    for out in &runs {
        refused(
            out,
            &[
                "nan_lora.safetensors",
                "1 NaN/inf values",
                "--allow-nonfinite",
            ],
        );
    }
    assert!(!converted.exists() && !merged.exists());
    let allowed = zlora(&[
        "lora",
        "convert",
        s(&nan),
        s(&converted),
        "--allow-nonfinite",
    ]);
    stderr(&allowed);
    assert!(converted.exists());
}

#[test]
fn an_infinite_strength_and_an_overflowing_merge_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m");
    let inf = format!("{}:1e999", s(&lora()));
    let run = zlora(&["lora", "merge", "--model", s(&model()), &inf, "-o", s(&out)]);
    refused(&run, &["is inf; any finite number is accepted"]);
    let combined = dir.path().join("c.safetensors");
    let run = zlora(&["lora", "combine", &inf, "-o", s(&combined)]);
    refused(&run, &["is inf"]);
    let huge = format!("{}:1e300", s(&lora()));
    let run = zlora(&[
        "lora",
        "merge",
        "--model",
        s(&model()),
        &huge,
        "-o",
        s(&out),
    ]);
    refused(
        &run,
        &["at strength 1e300 overflows", "no weight file was written"],
    );
    // Only zlora's own marker and lock may be there, no weight file.
    let written: Vec<String> = std::fs::read_dir(&out).map_or(Vec::new(), |d| {
        d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with(".zlora-"))
            .collect()
    });
    assert!(written.is_empty(), "{written:?}");
}

#[test]
fn readers_refuse_devices_fifos_and_folders_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe.safetensors");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    for path in ["/dev/zero", s(&fifo), s(dir.path())] {
        let start = Instant::now();
        let out = zlora(&["lora", "inspect", path]);
        assert!(start.elapsed() < Duration::from_secs(10), "{path} was read");
        assert_eq!(out.status.code(), Some(1), "{path}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("not a regular file"), "{err}");
    }
    // A training config and --latents go through the same check.
    let out = zlora(&["train", s(&fifo)]);
    refused(&out, &["pipe.safetensors", "a device, FIFO or socket"]);
    let out = generate(dir.path(), &["--latents", "/dev/zero"]);
    refused(
        &out,
        &["/dev/zero: is a device, FIFO or socket, not a regular file"],
    );
    // So do model checkpoints, before they are memory-mapped.
    let merged = dir.path().join("m");
    let out = zlora(&[
        "lora",
        "merge",
        "--model",
        s(&fifo),
        s(&lora()),
        "-o",
        s(&merged),
    ]);
    refused(&out, &["pipe.safetensors: is a device, FIFO or socket"]);
}

#[test]
fn plan_caption_tokens_are_bounded_by_the_text_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let setup = TrainSetup::new(dir.path());
    let cfg = setup.config("", "");
    let out = zlora(&["plan", s(&cfg), "--caption-tokens", "18446744073709551615"]);
    refused(
        &out,
        &["--caption-tokens must be 1 to 512", "18446744073709551615"],
    );
}

#[test]
fn validate_warns_about_a_long_prompt_and_refuses_duplicate_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let (m, lora) = (model(), lora());
    let (m, lora) = (s(&m), s(&lora));
    let prompt = "fox ".repeat(2625);
    let base = [
        "validate", "--lora", lora, "--base", m, "--turbo", m, "--width", "32", "--height", "32",
    ];
    let twice = dir.path().join("twice");
    let mut args = base.to_vec();
    args.extend(["--output", s(&twice), "--seed", "1", "--seed", "1"]);
    refused(&zlora(&args), &["seed 1 is given twice"]);
    assert!(!twice.exists());
    let mut args = base.to_vec();
    let long = dir.path().join("long");
    args.extend(["--output", s(&long), "--seed", "1", "--prompt", &prompt]);
    let err = stderr(&zlora(&args));
    assert!(
        err.contains("reads the first 512, the rest is ignored"),
        "{err}"
    );
}

#[test]
fn validate_refuses_a_width_beyond_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let m = s(&model()).to_owned();
    let out = zlora(&[
        "validate",
        "--lora",
        s(&lora()),
        "--base",
        &m,
        "--turbo",
        &m,
        "--output",
        s(&dir.path().join("v")),
        "--width",
        "100000",
        "--height",
        "32",
    ]);
    refused(&out, &["100000×32 is larger than this model's limit"]);
}

/// A tiny model (dim 32) and synthetic dataset, with a config writer.
struct TrainSetup {
    dir: PathBuf,
}

impl TrainSetup {
    fn new(dir: &Path) -> Self {
        tiny_model_and_data(dir, 32, 2, 64);
        Self {
            dir: dir.to_path_buf(),
        }
    }

    /// A config with `dataset` lines in [dataset] and `rest` (more tables) appended.
    fn config(&self, dataset: &str, rest: &str) -> PathBuf {
        let text = format!(
            "[model]\npath = {:?}\nvariant = \"turbo\"\nbase_dtype = \"f32\"\n\
             [dataset]\npath = {:?}\n{dataset}\n\
             [lora]\nrank = 2\nalpha = 2\n\
             [train]\nsteps = 2\nlearning_rate = 1e-3\noutput = {:?}\n{rest}\n",
            self.dir.join("model"),
            self.dir.join("data"),
            self.dir.join("out"),
        );
        let path = self.dir.join("train.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    fn train(&self, dataset: &str, rest: &str) -> Output {
        zlora(&["train", s(&self.config(dataset, rest))])
    }
}

#[test]
fn training_settings_are_refused_at_config_validation() {
    let dir = tempfile::tempdir().unwrap();
    let t = TrainSetup::new(dir.path());
    let out = t.train("resolution = 32", "[sample]\nseeds = []");
    refused(&out, &["[sample] seeds is empty"]);
    let out = t.train("resolution = 32", "[sample]\nseeds = [1, 1]");
    refused(&out, &["[sample] seed 1 is given twice"]);
    let cfg = t.config("resolution = 32", "").to_str().unwrap().to_owned();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("alpha = 2", "alpha = nan");
    std::fs::write(&cfg, text).unwrap();
    let out = zlora(&["train", &cfg]);
    refused(
        &out,
        &["[lora] alpha must be a positive finite number", "got NaN"],
    );
    assert!(!dir.path().join("out").exists(), "nothing started");
}

#[test]
fn a_long_sample_prompt_is_warned_about_in_training() {
    let dir = tempfile::tempdir().unwrap();
    let t = TrainSetup::new(dir.path());
    let prompt = "fox ".repeat(2625);
    let sample = format!("[sample]\nevery = 100\nprompts = [{prompt:?}]\nseeds = [1]");
    let err = stderr(&t.train("resolution = 32", &sample));
    assert!(
        err.contains("warning: the prompt is") && err.contains("reads the first 512"),
        "{err}"
    );
}

#[test]
fn a_rank_above_the_layer_width_is_refused_before_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let t = TrainSetup::new(dir.path());
    let cfg = t.config("resolution = 32", "").to_str().unwrap().to_owned();
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("rank = 2", "rank = 4096");
    std::fs::write(&cfg, text).unwrap();
    let out = zlora(&["train", &cfg]);
    refused(&out, &["[lora] rank 4096 is above min(out, in) = 32 of"]);
    assert!(
        !dir.path().join("data/.zlora-cache").exists(),
        "nothing encoded"
    );
}

#[test]
fn a_resolution_beyond_the_model_is_refused_before_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let t = TrainSetup::new(dir.path());
    let out = t.train("resolution = 8192", "");
    refused(
        &out,
        &["[dataset] resolution 8192 makes a", "limit of 4096×4096"],
    );
    assert!(
        !dir.path().join("data/.zlora-cache").exists(),
        "nothing encoded"
    );
}

/// A PNG whose header says `width`×`height` (8-bit grey): signature, IHDR, an empty IDAT and
/// IEND, with correct CRCs. Only the header is ever read.
fn png_header(width: u32, height: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8], data: &[u8]) {
        out.extend((data.len() as u32).to_be_bytes());
        let body: Vec<u8> = kind.iter().chain(data).copied().collect();
        out.extend(&body);
        out.extend(crc32(&body).to_be_bytes());
    }
    let mut ihdr = Vec::new();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]);
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

/// CRC-32 (IEEE), bit by bit: PNG's chunk checksum.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[test]
fn a_30000_pixel_png_is_unusable_in_preflight_and_never_decoded() {
    assert_eq!(crc32(b"IEND"), 0xAE42_6082, "the checksum PNG uses");
    let dir = tempfile::tempdir().unwrap();
    let t = TrainSetup::new(dir.path());
    std::fs::write(dir.path().join("data/huge.png"), png_header(30000, 30000)).unwrap();
    std::fs::write(dir.path().join("data/huge.txt"), "a black square").unwrap();
    let out = t.train("resolution = 32", "");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("huge.png: 30000×30000 is more than 89478485 pixels"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn extract_clamps_the_rank_to_the_layer_width_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a"), dir.path().join("b"));
    stderr(&zlora(&["tiny-model", "--out", s(&a), "--dim", "32"]));
    stderr(&zlora(&[
        "tiny-model",
        "--out",
        s(&b),
        "--dim",
        "32",
        "--seed",
        "1",
    ]));
    let out_file = dir.path().join("x.safetensors");
    let start = Instant::now();
    let out = zlora(&[
        "lora",
        "extract",
        "--base",
        s(&a),
        "--tuned",
        s(&b),
        "--rank",
        "512",
        "-o",
        s(&out_file),
    ]);
    assert!(start.elapsed() < Duration::from_secs(60));
    let err = stderr(&out);
    assert!(
        err.contains("warning: --rank 512 is above min(out, in) of"),
        "{err}"
    );
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("energy 100.0000%"), "{report}");
}

#[test]
fn a_misshapen_text_encoder_is_one_message_naming_its_folder() {
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("model");
    copy_tree(&model(), &copy);
    let file = copy.join("text_encoder/model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
    let name = "embed_tokens.weight";
    let embed = tensors[name].clone();
    let cut = embed.narrow(1, 0, embed.dim(1).unwrap() / 2).unwrap();
    tensors.insert(name.into(), cut);
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let out = generate_small(&copy, &dir.path().join("a.png"), &[], &[]);
    let line = refused(&out, &["text_encoder: ", name]);
    // Said once: the tensor, its shape in the file and the shape the model expects.
    assert_eq!(line.matches(", expected [").count(), 1, "{line}");
    assert!(line.contains(&format!("{name}: shape [")), "{line}");
    assert!(!line.contains("tensor error"), "{line}");
}

#[test]
fn tiny_model_and_dataset_sizes_are_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let out = s(&dir.path().join("m")).to_owned();
    let run = zlora(&["tiny-model", "--out", &out, "--dim", "1048576"]);
    refused(&run, &["dim must be 1 to 3840", "got dim 1048576"]);
    let run = zlora(&["tiny-model", "--out", &out, "--shift", "nan"]);
    refused(&run, &["shift must be a positive finite number"]);
    let run = zlora(&["tiny-dataset", "--out", &out, "--size", "100000"]);
    refused(&run, &["size must be 16 to 4096 px", "got size 100000"]);
    assert!(!dir.path().join("m").exists());
}

/// The ComfyUI-GGUF fixture (scripts/make_quantized_fixtures.py).
fn gguf_fixture() -> PathBuf {
    fixtures().join("../quantized/comfy_gguf.gguf")
}

#[test]
fn a_truncated_gguf_is_one_line_naming_the_tensor_and_the_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(gguf_fixture()).unwrap();
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let out = generate(dir.path(), &["--transformer", s(&cut)]);
    refused(
        &out,
        &["cut.gguf", "truncated: tensor", "needs bytes up to"],
    );
    // Cut inside the header: the reader's own message.
    std::fs::write(&cut, &bytes[..100]).unwrap();
    let out = generate(dir.path(), &["--transformer", s(&cut)]);
    refused(&out, &["cut.gguf", "not a readable GGUF file"]);
}

#[test]
fn a_gguf_of_another_architecture_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = std::fs::read(gguf_fixture()).unwrap();
    // Same length, so the header stays valid: HiDream is another ComfyUI-GGUF architecture.
    let at = bytes.windows(7).position(|w| w == b"lumina2").unwrap();
    bytes[at..at + 7].copy_from_slice(b"hidream");
    let other = dir.path().join("hidream.gguf");
    std::fs::write(&other, &bytes).unwrap();
    let out = generate(dir.path(), &["--transformer", s(&other)]);
    refused(&out, &["hidream.gguf", "architecture 'hidream'", "lumina2"]);
}

#[test]
fn a_gguf_of_an_unknown_quantization_type_names_the_types_zlora_reads() {
    let dir = tempfile::tempdir().unwrap();
    let file = fixtures().join("../quantized/unknown_type.gguf");
    let out = generate(dir.path(), &["--transformer", s(&file)]);
    refused(
        &out,
        &["unknown_type.gguf", "unknown dtype", "Q4_0", "Q2_K to Q8_K"],
    );
}

#[test]
fn a_quantized_transformer_refuses_requantization() {
    let dir = tempfile::tempdir().unwrap();
    let gguf = gguf_fixture();
    let args = ["--transformer", s(&gguf), "--quantize", "q8_0"];
    let out = generate(dir.path(), &args);
    refused(
        &out,
        &["comfy_gguf.gguf", "stored quantized already", "q8_0"],
    );
    assert!(!dir.path().join("out.png").exists());
}

#[test]
fn quantize_refuses_formats_gguf_lacks_quantized_sources_and_existing_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("m.gguf");
    let run = zlora(&["quantize", s(&model()), "--to", "fp8", "--out", s(&out)]);
    refused(&run, &["fp8 has no GGUF type", "q8_0"]);
    let src = s(&gguf_fixture()).to_owned();
    let run = zlora(&["quantize", &src, "--to", "q8_0", "--out", s(&out)]);
    refused(
        &run,
        &["comfy_gguf.gguf", "stored quantized already", "dense"],
    );
    assert!(!out.exists());
    std::fs::write(&out, b"keep").unwrap();
    // The fixture's widths (FFN 85) take no GGUF type; the existing file is checked first.
    let run = zlora(&["quantize", s(&model()), "--to", "q8_0", "--out", s(&out)]);
    refused(&run, &["m.gguf", "already exists", "--force"]);
    assert_eq!(std::fs::read(&out).unwrap(), b"keep");
}
