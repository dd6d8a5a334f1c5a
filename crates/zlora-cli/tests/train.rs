//! `zlora train` end to end on the built-in tiny model and a synthetic dataset: outputs,
//! determinism, resume after SIGKILL (with each optimizer), refusal to overwrite a run without --force, NaN stop, training adapter, and
//! the dataset check.

mod common;

use common::{stderr, tiny_model_and_data, zlora};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use zlora::lora::LoraFile;

/// A temp folder with a tiny model and dataset, and a config writer.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        Self::with_dim(32)
    }

    fn with_dim(dim: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        tiny_model_and_data(dir.path(), dim, 6, 64);
        Self { dir }
    }

    fn path(&self, s: &str) -> PathBuf {
        self.dir.path().join(s)
    }

    /// Writes a config (with `extra` TOML appended to [train]) and returns its path.
    fn config(&self, name: &str, model_extra: &str, train_extra: &str, sample: &str) -> PathBuf {
        let text = format!(
            r#"[model]
path = "{model}"
variant = "turbo"
base_dtype = "f32"
{model_extra}
[dataset]
path = "{data}"
resolution = 32
trigger = "zkchar"

[lora]
rank = 2
alpha = 2

[train]
steps = 6
learning_rate = 1e-3
batch_size = 2
seed = 7
save_every = 2
output = "{out}"
{train_extra}
{sample}
"#,
            model = self.path("model").display(),
            data = self.path("data").display(),
            out = self.path(name).display(),
        );
        let path = self.path(&format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }
}

/// Every tensor's name and raw bytes (the header metadata, which names paths, is left out).
fn tensor_bytes(p: &Path) -> Vec<(String, Vec<u8>)> {
    let file = std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let st = safetensors::SafeTensors::deserialize(&file).unwrap();
    let mut out: Vec<(String, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect();
    out.sort();
    out
}

/// The two LoRA files hold bit-identical tensors.
fn assert_same_tensors(a: &Path, b: &Path) {
    let (ta, tb) = (tensor_bytes(a), tensor_bytes(b));
    assert_eq!(ta.len(), tb.len());
    for ((na, da), (nb, db)) in ta.iter().zip(&tb) {
        assert_eq!(na, nb);
        assert!(
            da == db,
            "{na} differs between {} and {}",
            a.display(),
            b.display()
        );
    }
}

#[test]
fn a_tiny_run_writes_lora_checkpoints_samples_and_log() {
    let s = Setup::new();
    let cfg = s.config(
        "run",
        "",
        "",
        "[sample]\nevery = 3\nprompts = [\"zkchar, a red circle\"]\nseeds = [1, 2]",
    );
    let log = stderr(&zlora(&["train", cfg.to_str().unwrap()]));
    assert!(log.contains("mode turbo-direct"), "{log}");
    assert!(
        log.contains("device: CPU, "),
        "the run names its device: {log}"
    );
    let out = s.path("run");
    let lora = LoraFile::read_for_dim(out.join("lora.safetensors"), 32).unwrap();
    assert_eq!(lora.modules.len(), 2 * 7);
    assert_eq!(lora.metadata["modelspec.trigger_phrase"], "zkchar");
    assert!(lora.metadata["zlora.training"].contains("\"mode\":\"turbo-direct\""));
    let moved = lora.modules.values().any(|m| {
        m.delta()
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    });
    assert!(moved, "training changed the LoRA");
    for step in ["000002", "000004", "000006"] {
        assert!(out
            .join(format!("checkpoints/step-{step}/lora.safetensors"))
            .is_file());
    }
    for step in ["000000", "000003", "000006"] {
        assert!(out.join(format!("samples/step-{step}.png")).is_file());
    }
    let lines = std::fs::read_to_string(out.join("log.jsonl")).unwrap();
    assert_eq!(lines.lines().count(), 6);
    let last: serde_json::Value = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
    assert_eq!(last["step"], 6);
    assert!(
        last["loss"].as_f64().unwrap().is_finite() && last["grad_norm"].as_f64().unwrap() > 0.0
    );
}

#[test]
fn the_same_seed_gives_the_same_lora_bit_for_bit() {
    let s = Setup::new();
    let a = s.config("a", "", "", "");
    let b = s.config("b", "", "", "");
    stderr(&zlora(&["train", a.to_str().unwrap()]));
    stderr(&zlora(&["train", b.to_str().unwrap()]));
    assert_same_tensors(&s.path("a/lora.safetensors"), &s.path("b/lora.safetensors"));
}

/// A run with `optimizer` (`[train]` lines) killed three times at random moments and resumed
/// ends with the uninterrupted run's LoRA and optimizer state, bit for bit; the state holds
/// the optimizer's own tensor `kept`.
fn killed_runs_resume_exactly(optimizer: &str, kept: &str) {
    let s = Setup::new();
    let steps = ["--steps", "40"];
    let reference = s.config("reference", "", optimizer, "");
    let started = Instant::now();
    stderr(&zlora(&[
        "train",
        reference.to_str().unwrap(),
        steps[0],
        steps[1],
    ]));
    let cfg = s.config("killed", "", optimizer, "");
    train_with_kills(&s, "killed", &cfg, &steps, started.elapsed(), 3);
    assert_same_tensors(
        &s.path("killed/lora.safetensors"),
        &s.path("reference/lora.safetensors"),
    );
    if s.path("reference/lora.ema.safetensors").exists() {
        assert_same_tensors(
            &s.path("killed/lora.ema.safetensors"),
            &s.path("reference/lora.ema.safetensors"),
        );
    }
    let state = "checkpoints/step-000040/state.safetensors";
    let names = tensor_bytes(&s.path(&format!("reference/{state}")));
    assert!(names.iter().any(|(n, _)| n.ends_with(kept)), "no {kept}");
    assert_same_tensors(
        &s.path(&format!("killed/{state}")),
        &s.path(&format!("reference/{state}")),
    );
}

/// Runs `cfg` (writing to `name`) SIGKILLed `kills` times at random moments of a run as long
/// as `full`, resuming each time, then to the end.
fn train_with_kills(
    s: &Setup,
    name: &str,
    cfg: &Path,
    steps: &[&str],
    full: Duration,
    kills: usize,
) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
    let (mut killed, mut attempts) = (0, 0);
    let resume = || {
        let resume = zlora::train::state::latest(&s.path(name))
            .unwrap()
            .is_some();
        if resume {
            "--resume"
        } else {
            "--force"
        }
    };
    let mut args = vec!["train", cfg.to_str().unwrap()];
    args.extend_from_slice(steps);
    while killed < kills && attempts < 20 {
        attempts += 1;
        let mut child = Command::new(env!("CARGO_BIN_EXE_zlora"))
            .args(&args)
            .arg(resume())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_secs_f64(
            rng.random_range(0.1..0.9) * full.as_secs_f64(),
        ));
        if child.try_wait().unwrap().is_some() {
            // Finished before the kill: start over so that the kills land mid-run.
            std::fs::remove_dir_all(s.path(name)).unwrap();
            continue;
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        killed += 1;
    }
    assert_eq!(
        killed, kills,
        "{kills} kills landed mid-run in {attempts} attempts"
    );
    args.push(resume());
    stderr(&zlora(&args));
}

/// Every step's loss in a run's log.
fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("log.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64())
        .collect()
}

/// A run on a q8_0 base (dim 96: FFN 256 and adaLN 96 are multiples of q8_0's 32-value
/// blocks) follows the f32 base's loss curve step by step (same seed, so the same noise and
/// timesteps), and resumes after SIGKILLs to the same LoRA bit for bit.
#[test]
fn a_run_on_a_quantized_base_learns_as_the_dense_one_and_resumes_to_the_same_lora() {
    let s = Setup::with_dim(96);
    let steps = ["--steps", "30"];
    let train = |cfg: &Path| {
        stderr(&zlora(&[
            "train",
            cfg.to_str().unwrap(),
            steps[0],
            steps[1],
        ]))
    };
    train(&s.config("dense", "", "", ""));
    let quantized = "quantize = \"q8_0\"";
    let started = Instant::now();
    train(&s.config("reference", quantized, "", ""));
    let full = started.elapsed();
    let (a, b) = (losses(&s.path("dense")), losses(&s.path("reference")));
    assert_eq!(a.len(), b.len());
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / x)
        .fold(0.0, f64::max);
    eprintln!("dense losses {a:?}\nq8_0 losses {b:?}\nworst relative difference {worst:.3e}");
    // Measured 1.78e-3 (docs/benchmarks.md); the bound is twice that.
    assert!(
        worst < 3.6e-3,
        "q8_0 losses differ from the f32 base's by {worst}"
    );
    let cfg = s.config("killed", quantized, "", "");
    train_with_kills(&s, "killed", &cfg, &steps, full, 2);
    assert_same_tensors(
        &s.path("killed/lora.safetensors"),
        &s.path("reference/lora.safetensors"),
    );
}

#[test]
fn a_run_killed_at_random_moments_resumes_to_the_same_lora() {
    killed_runs_resume_exactly("", ".exp_avg_sq");
}

#[test]
fn a_prodigy_run_killed_at_random_moments_resumes_exactly() {
    killed_runs_resume_exactly(
        "optimizer = \"prodigy\"\n[train.prodigy]\nd_coef = 2.0\nuse_bias_correction = true",
        "prodigy.d",
    );
}

#[test]
fn an_adafactor_run_killed_at_random_moments_resumes_exactly() {
    killed_runs_resume_exactly(
        "optimizer = \"adafactor\"\n[train.adafactor]\nbeta1 = 0.9",
        ".exp_avg_sq_row",
    );
}

/// The EMA of the LoRA resumes exactly too; it is written beside the LoRA, and differs from
/// it (it averages), in the output folder and in each checkpoint.
#[test]
fn a_run_with_an_ema_killed_at_random_moments_resumes_exactly() {
    killed_runs_resume_exactly("ema = 0.9", ".ema");
}

/// With `[train] ema` the averaged LoRA is written beside the raw one (and differs from
/// it), in the output folder and in each checkpoint; with `[sample] ema` the samples are
/// drawn from it: the same grid as the raw LoRA's at step 0 (the EMA starts as the LoRA),
/// another at step 2. A large learning rate makes the difference show in 8-bit pixels.
#[test]
fn the_ema_is_saved_beside_the_lora_and_can_be_sampled_from() {
    let s = Setup::new();
    let run = |name: &str, sample_ema: bool| {
        let sample = format!(
            "[sample]\nevery = 2\nprompts = [\"a zkchar\"]\nseeds = [1]\nsteps = 2\nema = {sample_ema}"
        );
        let cfg = s.config(name, "", "ema = 0.5", &sample);
        let text = std::fs::read_to_string(&cfg).unwrap();
        std::fs::write(
            &cfg,
            text.replace("learning_rate = 1e-3", "learning_rate = 0.3"),
        )
        .unwrap();
        stderr(&zlora(&["train", cfg.to_str().unwrap(), "--steps", "2"]));
    };
    run("ema", true);
    run("raw", false);
    for dir in ["ema", "ema/checkpoints/step-000002"] {
        let (raw, ema) = (
            tensor_bytes(&s.path(&format!("{dir}/lora.safetensors"))),
            tensor_bytes(&s.path(&format!("{dir}/lora.ema.safetensors"))),
        );
        assert_eq!(raw.len(), ema.len());
        let differ = raw.iter().zip(&ema).filter(|(a, b)| a.1 != b.1).count();
        assert!(differ > 0, "{dir}: the EMA equals the LoRA");
        LoraFile::read_for_dim(s.path(&format!("{dir}/lora.ema.safetensors")), 32).unwrap();
    }
    let grid = |run: &str, step: &str| {
        let path = s.path(run).join(format!("samples/step-{step}.png"));
        zlora::sample::image::read_png(&path).unwrap().0.pixels
    };
    assert_eq!(grid("ema", "000000"), grid("raw", "000000"));
    assert_ne!(
        grid("ema", "000002"),
        grid("raw", "000002"),
        "sampled from the raw LoRA"
    );
}

#[test]
fn an_existing_output_is_not_overwritten_without_force() {
    let s = Setup::new();
    let cfg = s.config("out", "", "", "");
    stderr(&zlora(&["train", cfg.to_str().unwrap(), "--steps", "2"]));
    let refused = zlora(&["train", cfg.to_str().unwrap()]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("--resume") && err.contains("--force"), "{err}");
    assert!(s.path("out/checkpoints/step-000002").is_dir());
    stderr(&zlora(&[
        "train",
        cfg.to_str().unwrap(),
        "--force",
        "--steps",
        "1",
    ]));
    assert!(s.path("out/lora.safetensors").is_file());
    assert!(
        !s.path("out/checkpoints/step-000002").exists(),
        "--force started the run over"
    );
}

#[test]
fn a_diverging_run_stops_and_keeps_the_last_good_checkpoint() {
    let s = Setup::new();
    let cfg = s.config(
        "nan",
        "",
        "max_grad_norm = 0.0\nlr_schedule = \"constant\"",
        "",
    );
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("learning_rate = 1e-3", "learning_rate = 1e30")
        .replace("save_every = 2", "save_every = 1");
    std::fs::write(&cfg, text).unwrap();
    let run = zlora(&["train", cfg.to_str().unwrap()]);
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("loss became") && err.contains("last good checkpoint"),
        "{err}"
    );
    let (step, dir) = zlora::train::state::latest(&s.path("nan"))
        .unwrap()
        .expect("a checkpoint");
    assert!(step >= 1 && dir.join("lora.safetensors").is_file());
    assert!(
        !s.path("nan/lora.safetensors").exists(),
        "no final LoRA from a diverged run"
    );
}

/// A training adapter on the adaLN modulation of every main layer of the dim-32 model:
/// disjoint from the trained set.
fn adaln_adapter(s: &Setup) -> PathBuf {
    let adapter = s.path("adapter.safetensors");
    let mut tensors = std::collections::BTreeMap::new();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    for i in 0..2 {
        let key = format!("diffusion_model.layers.{i}.adaLN_modulation.0");
        let rand = |shape: (usize, usize), rng: &mut rand_chacha::ChaCha8Rng| {
            let v: Vec<f32> = (0..shape.0 * shape.1)
                .map(|_| rng.random_range(-0.5..0.5))
                .collect();
            candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu).unwrap()
        };
        tensors.insert(format!("{key}.lora_A.weight"), rand((4, 32), &mut rng));
        tensors.insert(format!("{key}.lora_B.weight"), rand((128, 4), &mut rng));
    }
    zlora::fsutil::save_safetensors(&adapter, &tensors, None, false).unwrap();
    adapter
}

/// The training adapter stacks on an int8 base (whose adaLN weights it adapts): the run's
/// losses follow the f32 base's with the adapter, and differ from the int8 base's without it.
#[test]
fn the_training_adapter_stacks_on_a_quantized_base() {
    let s = Setup::new();
    let adapter = format!("training_adapter = \"{}\"", adaln_adapter(&s).display());
    let int8 = "quantize = \"int8\"";
    let runs = [
        ("dense", adapter.clone()),
        ("int8", format!("{adapter}\n{int8}")),
        ("plain", int8.to_string()),
    ];
    for (name, model) in &runs {
        let cfg = s.config(name, model, "", "");
        let log = stderr(&zlora(&["train", cfg.to_str().unwrap(), "--steps", "4"]));
        let said = log.contains("blocks stored as int8");
        assert_eq!(said, model.contains("int8"), "{name}: {log}");
    }
    let (dense, int8, plain) = (
        losses(&s.path("dense")),
        losses(&s.path("int8")),
        losses(&s.path("plain")),
    );
    let rel = |a: &[f64], b: &[f64]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() / x)
            .fold(0.0, f64::max)
    };
    eprintln!("with the adapter, f32 {dense:?}, int8 {int8:?}; int8 without it {plain:?}");
    let (same, effect) = (rel(&dense, &int8), rel(&int8, &plain));
    assert!(
        same * 10.0 < effect,
        "int8 vs f32 {same}, adapter effect {effect}"
    );
}

#[test]
fn the_training_adapter_is_applied_frozen_off_for_samples_and_not_saved() {
    let s = Setup::new();
    let adapter = adaln_adapter(&s);
    let sample = "[sample]\nevery = 1\nprompts = [\"zkchar\"]\nseeds = [3]";
    let with = s.config(
        "with",
        &format!("training_adapter = \"{}\"", adapter.display()),
        "",
        sample,
    );
    let without = s.config("without", "", "", sample);
    let log = stderr(&zlora(&["train", with.to_str().unwrap(), "--steps", "1"]));
    assert!(
        log.contains("mode turbo-adapter") && log.contains("applied at strength 1 to 2 modules"),
        "{log}"
    );
    stderr(&zlora(&[
        "train",
        without.to_str().unwrap(),
        "--steps",
        "1",
    ]));
    // Step 0: the trained LoRA is still zero, so with the adapter off both runs sample plain
    // Turbo: the grids agree below their titles (which name the modes).
    let grid = |run: &str| {
        zlora::sample::image::read_png(&s.path(run).join("samples/step-000000.png"))
            .unwrap()
            .0
    };
    let (a, b) = (grid("with"), grid("without"));
    let head = 50; // the title and column-label rows of a contact sheet
    let width = a.width.min(b.width);
    let rows = |img: &zlora::sample::image::Rgb8| -> Vec<u8> {
        (head..img.height)
            .flat_map(|y| img.pixels[y * img.width * 3..(y * img.width + width) * 3].to_vec())
            .collect()
    };
    assert_eq!(rows(&a), rows(&b), "samples ran with the adapter off");
    let saved = LoraFile::read_for_dim(s.path("with/lora.safetensors"), 32).unwrap();
    assert!(
        saved.modules.keys().all(|k| !k.contains("adaLN")),
        "the adapter is not in the saved LoRA"
    );
    // During training it was on: the trained LoRAs differ.
    assert!(
        tensor_bytes(&s.path("with/lora.safetensors"))
            != tensor_bytes(&s.path("without/lora.safetensors"))
    );
}

#[test]
fn a_bad_dataset_fails_before_step_one_naming_the_file() {
    let s = Setup::new();
    std::fs::write(s.path("data/broken.png"), b"not a png").unwrap();
    std::fs::write(s.path("data/broken.txt"), "a caption").unwrap();
    let cfg = s.config("bad", "", "", "");
    let run = zlora(&["train", cfg.to_str().unwrap()]);
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("broken.png"), "{err}");
    assert!(!s.path("bad/log.jsonl").exists(), "nothing was trained");
}

/// `[model] transformer` takes a GGUF: a run on the q8_0 GGUF that `zlora quantize` wrote
/// is the run with `quantize = "q8_0"`, loss for loss and byte for byte.
#[test]
fn a_run_on_a_gguf_transformer_is_the_run_with_the_same_quantization() {
    let s = Setup::with_dim(96);
    let gguf = s.path("model-q8_0.gguf");
    stderr(&zlora(&[
        "quantize",
        s.path("model").to_str().unwrap(),
        "--to",
        "q8_0",
        "--out",
        gguf.to_str().unwrap(),
    ]));
    let train = |cfg: &Path| stderr(&zlora(&["train", cfg.to_str().unwrap()]));
    train(&s.config("built", "quantize = \"q8_0\"", "", ""));
    let file = format!("transformer = \"{}\"", gguf.display());
    train(&s.config("file", &file, "", ""));
    let built = losses(&s.path("built"));
    assert_eq!(built.len(), 6);
    assert_eq!(losses(&s.path("file")), built);
    assert_same_tensors(
        &s.path("file/lora.safetensors"),
        &s.path("built/lora.safetensors"),
    );
}
