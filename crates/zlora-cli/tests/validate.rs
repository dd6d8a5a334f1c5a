//! `zlora validate` and `zlora experiment` end to end on two tiny models (a Base-like one with
//! shift 6 and a Turbo-like one with shift 3): outputs, parameters in every PNG, identical
//! noise across variants, verdicts with known answers, the report in a real browser, the
//! checkpoint sweep, and an experiment that resumes and runs the same in one process, as
//! three CPU child processes at once and as a Slurm job array run task by task.

mod common;

use common::{crop, event_lines, find, lora_contents, stdout, tiny_base_and_turbo, zlora};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use zlora::lora::write::{save, Metadata};
use zlora::lora::{Layout, LoraModule};
use zlora::model::folder::ModelFolder;
use zlora::nn::{AdapterWeights, LinearTargets};
use zlora::sample::image::{read_png, Rgb8};
use zlora::validate::run::Record;

/// Runs zlora, asserts success and returns stdout.
fn ok(args: &[&str]) -> String {
    stdout(&zlora(args))
}

/// How a test LoRA's up matrices are filled.
enum Up {
    Zero,
    Random(f32),
}

/// A temp folder with the two tiny models (width 32) and a synthetic dataset.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let s = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        tiny_base_and_turbo(s.dir.path());
        let data = s.p("data");
        ok(&[
            "tiny-dataset",
            "--out",
            &data,
            "--count",
            "6",
            "--size",
            "64",
        ]);
        s
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn p(&self, name: &str) -> String {
        self.path(name).to_str().unwrap().to_string()
    }

    /// A rank-4 LoRA in ai-toolkit layout on `modules` of both main layers.
    fn lora(&self, name: &str, modules: &[&str], up: Up, trigger: Option<&str>) -> String {
        let model = ModelFolder::open(&self.p("turbo"))
            .unwrap()
            .load_transformer(None, DType::F32, &Device::Cpu, Default::default())
            .unwrap();
        let shapes: BTreeMap<String, (usize, usize)> = model.linear_shapes().into_iter().collect();
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(name.len() as u64);
        let mut rand = |rows: usize, cols: usize, scale: f32| {
            let v: Vec<f32> = (0..rows * cols)
                .map(|_| rng.random_range(-scale..scale))
                .collect();
            Tensor::from_vec(v, (rows, cols), &Device::Cpu).unwrap()
        };
        let mut map = BTreeMap::new();
        for layer in 0..2 {
            for m in modules {
                let path = format!("layers.{layer}.{m}");
                let (out, inp) = shapes[&path];
                let up = match up {
                    Up::Zero => Tensor::zeros((out, 4), DType::F32, &Device::Cpu).unwrap(),
                    Up::Random(s) => rand(out, 4, s),
                };
                let module = LoraModule {
                    weights: AdapterWeights::LowRank {
                        down: rand(4, inp, 0.5),
                        up,
                    },
                    scale: 1.0,
                    source_key: path.clone(),
                };
                map.insert(path, module);
            }
        }
        let meta = Metadata {
            trigger_words: trigger.iter().map(|t| t.to_string()).collect(),
            ..Metadata::default()
        };
        let file = self.path(&format!("{name}.safetensors"));
        save(&file, &map, Layout::AiToolkit, DType::F32, &meta, false).unwrap();
        file.to_str().unwrap().to_string()
    }

    /// The experiment's training adapter and DistillPatch.
    fn adapter_and_patch(&self) -> (String, String) {
        let adapter = self.lora(
            "adapter",
            &["feed_forward.w1", "feed_forward.w3"],
            Up::Random(0.3),
            None,
        );
        (
            adapter,
            self.lora("patch", &ATTENTION, Up::Random(0.3), None),
        )
    }

    /// Writes `NAME.toml`, a tiny experiment plan into the folder `NAME`; its path.
    fn experiment_plan(&self, name: &str, (adapter, patch): &(String, String)) -> String {
        let plan = self.path(&format!("{name}.toml"));
        std::fs::write(
            &plan,
            format!(
                "output = \"{}\"\nbase = \"{}\"\nturbo = \"{}\"\ntraining_adapter = \"{adapter}\"\n\
                 distill_patch = \"{patch}\"\nbase_dtype = \"f32\"\n\
                 [dataset]\npath = \"{}\"\nresolution = 32\ntrigger = \"zkchar\"\n\
                 [lora]\nrank = 2\nalpha = 2\n\
                 [train]\nsteps = 2\nlearning_rate = 1e-2\nbatch_size = 2\nsave_every = 2\n\
                 [render]\nprompts = [\"zkchar\"]\nseeds = [1, 2]\nwidth = 32\nheight = 32\n\
                 [sampling.base]\nsteps = 4\nguidance = 2.0\n\
                 [sampling.turbo_long]\nsteps = 6\nguidance = 0.0\n",
                self.p(name),
                self.p("base"),
                self.p("turbo"),
                self.p("data")
            ),
        )
        .unwrap();
        plan.to_str().unwrap().to_string()
    }
}

const ATTENTION: [&str; 4] = [
    "attention.to_q",
    "attention.to_k",
    "attention.to_v",
    "attention.to_out.0",
];

fn image(dir: &Path, name: &str) -> Rgb8 {
    read_png(&dir.join("images").join(name)).unwrap().0
}

fn parameters(dir: &Path, name: &str) -> serde_json::Value {
    let (_, text) = read_png(&dir.join("images").join(name)).unwrap();
    let json = &text.iter().find(|(k, _)| k == "parameters").unwrap().1;
    serde_json::from_str(json).unwrap()
}

#[test]
fn a_lora_with_zero_b_is_not_learning_and_every_variant_starts_from_the_same_noise() {
    let s = Setup::new();
    let lora = s.lora("zero", &ATTENTION, Up::Zero, None);
    let patch = s.lora("patch", &ATTENTION, Up::Random(0.5), None);
    let out = s.path("v");
    let stdout = ok(&[
        "validate",
        "--lora",
        &lora,
        "--base",
        &s.p("base"),
        "--turbo",
        &s.p("turbo"),
        "--distill-patch",
        &patch,
        "--prompt",
        "a red circle",
        "--prompt",
        "a blue square",
        "--seed",
        "3",
        "--seed",
        "4",
        "--width",
        "32",
        "--height",
        "32",
        "--output",
        &s.p("v"),
    ]);
    assert!(
        stdout.contains("LoRA effect on Base: effect 0.000"),
        "{stdout}"
    );
    assert!(stdout.contains("→ not learning"), "{stdout}");
    assert!(out.join("report.html").is_file() && out.join("metrics.json").is_file());
    for p in ["sheet-p1.png", "sheet-p2.png"] {
        assert!(out.join(p).is_file(), "{p}");
    }
    let images = std::fs::read_dir(out.join("images")).unwrap().count();
    assert_eq!(images, 6 * 2 * 2, "6 variants × 2 prompts × 2 seeds");
    // B = 0: with and without the LoRA are the same pictures, so the noise was the same.
    for (with, without) in [("base-lora", "base"), ("turbo-lora", "turbo")] {
        for seed in [3, 4] {
            assert_eq!(
                image(&out, &format!("p2-{with}-s{seed}.png")),
                image(&out, &format!("p2-{without}-s{seed}.png"))
            );
        }
    }
    // The patch changes the picture; seeds differ.
    assert_ne!(
        image(&out, "p1-turbo-lora-patch-s3.png"),
        image(&out, "p1-turbo-s3.png")
    );
    assert_ne!(
        image(&out, "p1-turbo-s3.png"),
        image(&out, "p1-turbo-s4.png")
    );
    let params = parameters(&out, "p2-turbo-lora-patch-s4.png");
    assert_eq!(params["prompt"], "a blue square");
    assert_eq!(params["seed"], 4);
    assert_eq!(params["steps"], 8);
    assert_eq!(params["guidance"], 0.0);
    assert_eq!(params["shift"], 3.0);
    assert_eq!(params["loras"].as_array().unwrap().len(), 2);
    let base = parameters(&out, "p1-base-s3.png");
    assert_eq!(
        (
            base["steps"].clone(),
            base["guidance"].clone(),
            base["shift"].clone()
        ),
        (50.into(), 4.0.into(), 6.0.into())
    );
    let long = parameters(&out, "p1-turbo-lora-long-s3.png");
    assert_eq!(long["steps"], 30);
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(record["verdicts"]["base"]["verdict"], "not-learning");
    assert_eq!(record["verdicts"]["turbo"]["verdict"], "not-learning");
}

#[test]
fn a_plan_sets_steps_and_default_prompts_use_the_trigger_and_nothing_is_overwritten() {
    let s = Setup::new();
    let lora = s.lora("strong", &ATTENTION, Up::Random(1.0), Some("zkchar"));
    let plan = s.path("plan.toml");
    std::fs::write(
        &plan,
        format!(
            "lora = \"{lora}\"\nbase = \"{}\"\nturbo = \"{}\"\noutput = \"{}\"\n\
             [render]\nseeds = [1, 2]\nwidth = 32\nheight = 32\n\
             [sampling.base]\nsteps = 6\nguidance = 2.0\n\
             [sampling.turbo]\nsteps = 3\nguidance = 0.0\n\
             [sampling.turbo_long]\nsteps = 9\nguidance = 0.0\n",
            s.p("base"),
            s.p("turbo"),
            s.p("v")
        ),
    )
    .unwrap();
    let plan = plan.to_str().unwrap();
    let stdout = ok(&["validate", plan]);
    assert!(
        stdout.contains("LoRA effect on Turbo (3 steps)"),
        "{stdout}"
    );
    let out = s.path("v");
    assert!(out.join("sheet-p3.png").is_file(), "three default prompts");
    for (name, steps) in [
        ("p1-base-lora-s1.png", 6),
        ("p2-turbo-s2.png", 3),
        ("p3-turbo-lora-long-s1.png", 9),
    ] {
        let params = parameters(&out, name);
        assert_eq!(params["steps"], steps, "{name}");
        assert!(
            params["prompt"].as_str().unwrap().contains("zkchar"),
            "{params}"
        );
    }
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert!(
        record["verdicts"]["turbo"]["effect"].as_f64().unwrap() > 0.02,
        "{record}"
    );

    let again = zlora(&["validate", plan]);
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(
        err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    ok(&["validate", plan, "--force", "--seed", "5"]);
    assert!(out.join("images/p1-base-s5.png").is_file());
}

#[test]
fn the_report_renders_in_chromium_with_its_table_and_images() {
    let chromium = common::chromium();
    let s = Setup::new();
    let lora = s.lora("strong", &ATTENTION, Up::Random(1.0), None);
    let out = s.path("v");
    ok(&[
        "validate",
        "--lora",
        &lora,
        "--base",
        &s.p("base"),
        "--turbo",
        &s.p("turbo"),
        "--prompt",
        "a red circle",
        "--seed",
        "1",
        "--seed",
        "2",
        "--width",
        "64",
        "--height",
        "64",
        "--output",
        &s.p("v"),
    ]);
    let shot = s.path("shot.png");
    let profile = s.path("profile");
    let url = format!("file://{}", out.join("report.html").display());
    let run = Command::new(chromium)
        .args(common::HEADLESS)
        .arg("--force-color-profile=srgb")
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(format!("--screenshot={}", shot.display()))
        .args(["--window-size=1200,2000", &url])
        .output()
        .unwrap();
    assert!(
        shot.is_file(),
        "no screenshot: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    let (page, _) = read_png(&shot).unwrap();
    let count = |c: [u8; 3]| page.pixels.chunks_exact(3).filter(|p| *p == c).count();
    // The tables' header rows: 3 tables, each header about 25 pixels high.
    let header = count(zlora::validate::html::HEADER);
    assert!(
        header > 20_000,
        "table headers in the screenshot: {header} pixels"
    );
    // A verdict badge (the strong LoRA learns on Turbo: green).
    assert!(
        count(zlora::validate::html::GOOD) > 200,
        "a green verdict badge"
    );
    // Pictures: blocks of two images, found pixel for pixel where the sheets are drawn.
    for name in ["p1-turbo-lora-s2.png", "p1-base-s1.png"] {
        let patch = crop(&image(&out, name), 24, 24, 16);
        assert!(
            find(&page, &patch, 2).is_some(),
            "{name} is visible in the report"
        );
    }
    let blank = page.pixels.chunks_exact(3).all(|p| p == [255, 255, 255]);
    assert!(!blank);
}

/// A training config for the tiny Turbo model (`extra` goes into [train]).
fn train_config(s: &Setup, name: &str, extra: &str) -> String {
    let text = format!(
        "[model]\npath = \"{}\"\nvariant = \"turbo\"\nbase_dtype = \"f32\"\n\
         [dataset]\npath = \"{}\"\nresolution = 32\ntrigger = \"zkchar\"\n\
         [lora]\nrank = 4\nalpha = 4\n\
         [train]\nsteps = 6\nlearning_rate = 3e-2\nbatch_size = 2\nseed = 7\nsave_every = 2\noutput = \"{}\"\n{extra}\n\
         [sample]\nprompts = [\"zkchar, a red circle\"]\nseeds = [1, 2]\nsteps = 4\n",
        s.p("turbo"),
        s.p("data"),
        s.p(name)
    );
    let path = s.path(&format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

#[test]
fn a_checkpoint_sweep_charts_the_metrics_and_names_the_best_step() {
    let s = Setup::new();
    let cfg = train_config(&s, "run", "");
    ok(&["train", &cfg]);
    let stdout = ok(&["validate", "--checkpoints", &s.p("run")]);
    for step in [2, 4, 6] {
        assert!(stdout.contains(&format!("step {step}: effect")), "{stdout}");
    }
    assert!(stdout.contains("best step: "), "{stdout}");
    let out = s.path("run/validation");
    let (chart, _) = read_png(&out.join("metrics.png")).unwrap();
    assert!(
        chart.width > 400 && chart.pixels.chunks_exact(3).any(|p| p == [200, 40, 40]),
        "the effect line"
    );
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    let steps: Vec<u64> = record["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [2, 4, 6]);
    assert_eq!(record["sampling"]["steps"], 4, "the run's sample steps");
    // Checkpoint images carry their checkpoint; the reference carries no LoRA.
    let params = parameters(&out, "p1-step-000004-s2.png");
    assert!(params["loras"][0]["file"]
        .as_str()
        .unwrap()
        .contains("step-000004"));
    assert_eq!(
        parameters(&out, "p1-no-lora-s2.png")["loras"],
        serde_json::json!([])
    );
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("data:image/png;base64,"));

    // The same sweep as JSON lines: each image as it is rendered, then the results.
    let json_out = s.p("run/validation-events");
    let stdout = ok(&[
        "validate",
        "--checkpoints",
        &s.p("run"),
        "--output",
        &json_out,
        "--events",
        "json",
    ]);
    let events: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    let images: Vec<_> = events.iter().filter(|e| e["event"] == "image").collect();
    assert!(
        !images.is_empty()
            && images
                .iter()
                .all(|e| e["done"].as_u64() <= e["total"].as_u64())
    );
    assert!(events.iter().any(|e| e["event"] == "stage"));
    let done = events.last().unwrap();
    assert_eq!(done["event"], "done");
    let steps: Vec<u64> = done["checkpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [2, 4, 6]);
    assert_eq!(done["best_step"], record["best_step"]);
    assert!(Path::new(done["report"].as_str().unwrap()).is_file());
    let failed = zlora(&[
        "validate",
        "--checkpoints",
        "/no/such/run",
        "--events",
        "json",
    ]);
    assert!(!failed.status.success());
    let last: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&failed.stdout)
            .lines()
            .last()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(last["event"], "failed");
}

#[test]
fn an_experiment_trains_three_ways_validates_compares_and_resumes() {
    let s = Setup::new();
    let plan = s.experiment_plan("exp", &s.adapter_and_patch());
    let plan = plan.as_str();
    let first = zlora(&["experiment", plan]);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let exp = s.path("exp");
    assert!(exp.join("report.html").is_file());
    for way in ["base", "turbo-adapter", "turbo-direct"] {
        assert!(
            exp.join(format!("runs/{way}/lora.safetensors")).is_file(),
            "{way}"
        );
        assert!(
            exp.join(format!("validation/{way}/report.html")).is_file(),
            "{way}"
        );
        let patched = exp
            .join(format!(
                "validation/{way}/images/p1-turbo-lora-patch-s1.png"
            ))
            .is_file();
        assert_eq!(
            patched,
            way == "turbo-direct",
            "only the direct run is validated with the patch"
        );
    }
    let stderr = String::from_utf8_lossy(&first.stderr);
    assert!(
        stderr.contains("training adapter") && stderr.contains("mode base"),
        "{stderr}"
    );
    let html = std::fs::read_to_string(exp.join("report.html")).unwrap();
    assert!(html.contains("turbo-adapter") && html.contains("validation/turbo-direct/report.html"));

    let lora = exp.join("runs/base/lora.safetensors");
    let before = std::fs::metadata(&lora).unwrap().modified().unwrap();
    let second = zlora(&["experiment", plan]);
    assert!(second.status.success());
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert_eq!(
        stderr.matches("finished earlier, not repeated").count(),
        3,
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("validated earlier, not repeated").count(),
        3,
        "{stderr}"
    );
    assert_eq!(
        std::fs::metadata(&lora).unwrap().modified().unwrap(),
        before
    );

    // --events json: nothing to train or validate again, then the verdicts of the three ways.
    let third = zlora(&["experiment", plan, "--events", "json"]);
    assert!(third.status.success());
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&third.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!events
        .iter()
        .any(|e| e["event"] == "training" || e["event"] == "validating"));
    let done = events.last().unwrap();
    assert_eq!(done["event"], "done");
    assert_eq!(
        PathBuf::from(done["report"].as_str().unwrap()),
        exp.join("report.html")
    );
    let ways: Vec<&str> = done["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["way"].as_str().unwrap())
        .collect();
    assert_eq!(ways, ["base", "turbo-adapter", "turbo-direct"]);
    let metrics = Record::read(&exp.join("validation/base/metrics.json")).unwrap();
    let base = &done["results"][0]["base"];
    assert_eq!(base["verdict"], metrics.verdicts.base.verdict.label());
    assert_eq!(base["effect"].as_f64(), Some(metrics.verdicts.base.effect));
}

const WAYS: [&str; 3] = ["base", "turbo-adapter", "turbo-direct"];

#[test]
fn an_experiment_runs_its_arms_on_three_devices_at_once_or_as_a_slurm_array() {
    let s = Setup::new();
    let files = s.adapter_and_patch();
    let serial = s.experiment_plan("serial", &files);
    let done = |out: &std::process::Output| {
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        event_lines(out).last().unwrap().clone()
    };
    let in_process = done(&zlora(&["experiment", &serial, "--events", "json"]));

    // Three CPU child processes at once: the same LoRAs, verdicts and report.
    let parallel = s.experiment_plan("parallel", &files);
    let run = zlora(&[
        "experiment",
        &parallel,
        "--gpus",
        "cpu,cpu,cpu",
        "--events",
        "json",
    ]);
    let states: Vec<serde_json::Value> = event_lines(&run)
        .iter()
        .filter(|e| e["event"] == "arm")
        .map(|e| {
            assert_eq!(e["device"], "cpu");
            e["state"].clone()
        })
        .collect();
    assert_eq!(
        states,
        ["started", "started", "started", "finished", "finished", "finished"],
        "the three arms ran at once"
    );
    let by_devices = done(&run);
    assert_eq!(by_devices["results"], in_process["results"]);
    let p = s.path("parallel");
    assert_eq!(
        PathBuf::from(by_devices["report"].as_str().unwrap()),
        p.join("report.html")
    );
    let html = std::fs::read_to_string(p.join("report.html")).unwrap();
    assert!(html.contains("validation/turbo-direct/report.html"));
    let lora =
        |dir: &Path, way: &str| lora_contents(&dir.join(format!("runs/{way}/lora.safetensors")));
    for way in WAYS {
        let log = std::fs::read_to_string(p.join(format!("logs/{way}.log"))).unwrap();
        assert!(log.contains("device: CPU"), "{log}");
        assert!(
            lora(&p, way) == lora(&s.path("serial"), way),
            "{way}: the same LoRA as in one process"
        );
    }
    // A rerun skips the finished arms.
    let trained = std::fs::metadata(p.join("runs/base/lora.safetensors"))
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(
        done(&zlora(&[
            "experiment",
            &parallel,
            "--gpus",
            "cpu,cpu,cpu",
            "--events",
            "json"
        ]))["results"],
        in_process["results"]
    );
    for way in WAYS {
        let log = std::fs::read_to_string(p.join(format!("logs/{way}.log"))).unwrap();
        assert!(
            log.contains("finished earlier, not repeated")
                && log.contains("validated earlier, not repeated"),
            "{log}"
        );
    }
    assert_eq!(
        std::fs::metadata(p.join("runs/base/lora.safetensors"))
            .unwrap()
            .modified()
            .unwrap(),
        trained
    );

    // A Slurm job array: the script, then each task in turn; the report after the last.
    let slurm = s.experiment_plan("slurm", &files);
    let out = s.path("slurm");
    let script_path = stdout(&zlora(&["experiment", &slurm, "--emit", "slurm"]));
    assert_eq!(Path::new(&script_path), out.join("experiment.sbatch"));
    let script = std::fs::read_to_string(&script_path).unwrap();
    for line in [
        "#!/bin/bash",
        "#SBATCH --job-name=zlora-experiment",
        "#SBATCH --array=0-2",
        "#SBATCH --gres=gpu:1",
        &format!(
            "exec '{}' experiment '{slurm}' --arm-index \"$SLURM_ARRAY_TASK_ID\"",
            env!("CARGO_BIN_EXE_zlora")
        ),
    ] {
        assert!(script.lines().any(|l| l == line), "{line} in\n{script}");
    }
    for (index, way) in WAYS.iter().enumerate() {
        assert!(!out.join("report.html").exists(), "before task {index}");
        let task = zlora(&["experiment", &slurm, "--arm-index", &index.to_string()]);
        let printed = stdout(&task);
        assert_eq!(
            printed.contains("finished; other arms have not yet"),
            index < 2,
            "{printed}"
        );
        assert!(lora(&out, way) == lora(&s.path("serial"), way), "{way}");
    }
    assert!(out.join("report.html").is_file());
    let bad = zlora(&["experiment", &slurm, "--arm-index", "3"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("arm index 3 is out of range"));
    let unprepared = s.experiment_plan("unprepared", &files);
    let refused = zlora(&["experiment", &unprepared, "--arm", "base"]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("is not prepared for this experiment"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
}
