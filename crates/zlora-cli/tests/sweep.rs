//! `zlora sweep` end to end on two tiny models: a 2×1 grid run in this process (a failed arm
//! reported, the others going on, the rerun skipping the finished arm), as a Slurm job array
//! run task by task (the report only after the last), and as two CPU child processes at once
//! (the same LoRAs); bad plans are one-line errors.

mod common;

use std::path::{Path, PathBuf};

use common::{
    copy_tree, event_lines, lora_contents, stderr, tiny_base_and_turbo, zlora, zlora_env,
};
use serde_json::Value;

/// A temp folder with the two tiny models and a synthetic dataset in `data`.
struct Setup {
    dir: tempfile::TempDir,
}

impl Setup {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        tiny_base_and_turbo(dir.path());
        let data = dir.path().join("data");
        stderr(&zlora(&[
            "tiny-dataset",
            "--out",
            data.to_str().unwrap(),
            "--count",
            "4",
            "--size",
            "32",
        ]));
        Self { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Writes `name`: a sweep plan into `output` with `grid` (TOML lines), tiny everything.
    fn plan(&self, name: &str, output: &str, grid: &str) -> String {
        let p = |s: &str| self.path(s).to_str().unwrap().to_string();
        let text = format!(
            "output = \"{}\"\nbase = \"{}\"\nturbo = \"{}\"\nbase_dtype = \"f32\"\n\
             [dataset]\npath = \"{}\"\nresolution = 32\ntrigger = \"zkchar\"\n\
             [lora]\nrank = 2\nalpha = 2\n\
             [train]\nsteps = 2\nlearning_rate = 1e-2\nbatch_size = 2\nsave_every = 2\n\
             [render]\nprompts = [\"zkchar\"]\nseeds = [1, 2]\nwidth = 32\nheight = 32\n\
             [sampling.base]\nsteps = 2\nguidance = 2.0\n\
             [sampling.turbo]\nsteps = 2\nguidance = 0.0\n\
             [sampling.turbo_long]\nsteps = 3\nguidance = 0.0\n\
             {grid}",
            p(output),
            p("base"),
            p("turbo"),
            p("data"),
        );
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    }
}

fn modified(path: &Path) -> std::time::SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

fn summary(out: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(out.join("sweep.json")).unwrap()).unwrap()
}

#[test]
fn a_failed_arm_lets_the_others_finish_and_the_rerun_skips_them() {
    let s = Setup::new();
    let plan = s.plan(
        "plan.toml",
        "sweep",
        &format!(
            "[grid]\nmode = [\"turbo-direct\"]\ndataset = [\"{}\", \"{}\"]\n",
            s.path("data").display(),
            s.path("data2").display()
        ),
    );
    let out = s.path("sweep");
    // data2 does not exist yet: its arm fails, the first finishes, no report.
    let first = zlora(&["sweep", &plan]);
    assert!(!first.status.success());
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(
        err.contains("1 of 2 arms failed: turbo-direct_d-data2"),
        "{err}"
    );
    let lora = out.join("runs/turbo-direct_d-data/lora.safetensors");
    assert!(lora.is_file() && out.join("finished/turbo-direct_d-data.json").is_file());
    assert!(!out.join("report.html").exists() && !out.join("sweep.json").exists());
    let trained = modified(&lora);

    copy_tree(&s.path("data"), &s.path("data2"));
    let second = zlora(&["sweep", &plan, "--events", "json"]);
    assert!(
        second.status.success(),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let events = event_lines(&second);
    let texts: Vec<&str> = events.iter().filter_map(|e| e["text"].as_str()).collect();
    assert!(
        texts.contains(&"turbo-direct_d-data: finished earlier, not repeated")
            && texts.contains(&"turbo-direct_d-data: validated earlier, not repeated"),
        "{texts:?}"
    );
    let trainings: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "training")
        .map(|e| e["arm"].as_str().unwrap())
        .collect();
    assert_eq!(trainings, ["turbo-direct_d-data2"]);
    assert!(events.iter().any(|e| e["event"] == "step"));
    assert_eq!(
        modified(&lora),
        trained,
        "the finished arm was not retrained"
    );

    let done = events.last().unwrap();
    assert_eq!(done["event"], "done");
    let json = summary(&out);
    let names: Vec<&str> = json["arms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["turbo-direct_d-data", "turbo-direct_d-data2"]);
    assert_eq!(done["best"], json["best"]);
    for a in json["arms"].as_array().unwrap() {
        assert!(a["final_loss"].as_f64().unwrap().is_finite());
        assert!(a["score"].is_null() || a["score"].as_f64().unwrap() > 0.0);
    }
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains("turbo-direct_d-data2") && html.contains("training loss"));
    assert!(html.contains("validation/turbo-direct_d-data/report.html"));
    // The plan's text is shown escaped.
    assert!(html.contains("[grid]") && html.contains("&quot;turbo-direct&quot;"));
    assert!(out.join("loss.png").is_file());
}

#[test]
fn a_slurm_array_runs_an_arm_per_task_and_two_cpus_run_two_arms_at_once() {
    let s = Setup::new();
    let grid = "[grid]\nmode = [\"turbo-direct\"]\nlearning_rate = [1e-2, 0.3]\n";
    let plan = s.plan("slurm.toml", "slurm", grid);
    let out = s.path("slurm");
    let emitted = zlora(&["sweep", &plan, "--emit", "slurm"]);
    let script_path = common::stdout(&emitted);
    assert_eq!(Path::new(&script_path), out.join("sweep.sbatch"));
    let script = std::fs::read_to_string(&script_path).unwrap();
    for line in [
        "#!/bin/bash",
        "#SBATCH --array=0-1",
        "#SBATCH --gres=gpu:1",
        &format!(
            "#SBATCH --chdir={}",
            std::env::current_dir().unwrap().display()
        ),
        &format!(
            "exec '{}' sweep '{plan}' --arm-index \"$SLURM_ARRAY_TASK_ID\"",
            env!("CARGO_BIN_EXE_zlora")
        ),
    ] {
        assert!(script.lines().any(|l| l == line), "{line} in\n{script}");
    }
    // Each task in turn, as Slurm would start them; the report comes with the last.
    for index in ["0", "1"] {
        assert!(!out.join("report.html").exists(), "before task {index}");
        let task = zlora_env(
            &["sweep", &plan, "--arm-index", index],
            &[("SLURM_ARRAY_TASK_ID", index.as_ref())],
        );
        stderr(&task);
    }
    // The best arm is the one with the highest score, and the report marks it.
    let json = summary(&out);
    let best = json["arms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["score"].is_number())
        .max_by(|a, b| {
            a["score"]
                .as_f64()
                .partial_cmp(&b["score"].as_f64())
                .unwrap()
        })
        .map(|a| a["name"].clone());
    assert_eq!(best, Some(json["best"].clone()), "{json}");
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(html.contains(&format!("{} (best)", json["best"].as_str().unwrap())));
    let bad = zlora(&["sweep", &plan, "--arm-index", "2"]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("arm index 2 is out of range"));

    // The same arms as two CPU child processes at once, into another folder.
    let parallel = s.plan("parallel.toml", "parallel", grid);
    let run = zlora(&["sweep", &parallel, "--gpus", "cpu,cpu", "--events", "json"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let arm_events: Vec<(String, String)> = event_lines(&run)
        .iter()
        .filter(|e| e["event"] == "arm")
        .map(|e| {
            assert_eq!(e["device"], "cpu");
            (
                e["state"].as_str().unwrap().into(),
                e["arm"].as_str().unwrap().into(),
            )
        })
        .collect();
    let states: Vec<&str> = arm_events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        states,
        ["started", "started", "finished", "finished"],
        "both arms ran at once"
    );
    // One slot: the queue runs them one after the other.
    let single = s.plan("single.toml", "single", grid);
    let run = zlora(&["sweep", &single, "--gpus", "cpu", "--events", "json"]);
    let states: Vec<Value> = event_lines(&run)
        .iter()
        .filter(|e| e["event"] == "arm")
        .map(|e| e["state"].clone())
        .collect();
    assert_eq!(states, ["started", "finished", "started", "finished"]);
    let p = s.path("parallel");
    for arm in ["turbo-direct_lr0.01", "turbo-direct_lr0.3"] {
        let log = std::fs::read_to_string(p.join(format!("logs/{arm}.log"))).unwrap();
        assert!(log.contains("device: CPU"), "{log}");
        let lora = |dir: &Path| lora_contents(&dir.join(format!("runs/{arm}/lora.safetensors")));
        assert!(
            lora(&p) == lora(&out),
            "{arm}: the same LoRA as the tasks run one by one"
        );
    }
    let measures = |dir: &Path| -> Vec<Value> {
        summary(dir)["arms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| serde_json::json!([a["name"], a["final_loss"], a["turbo_effect"], a["score"]]))
            .collect()
    };
    assert_eq!(measures(&p), measures(&out));
}

/// Starts `zlora sweep PLAN --events json` with `extra`, waits until `arms` arms are training
/// past step 2, sends SIGTERM, and returns the exit code and every event.
fn stopped_sweep(plan: &str, extra: &[&str], out: &Path, arms: usize) -> (Option<i32>, Vec<Value>) {
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    let mut child = Command::new(env!("CARGO_BIN_EXE_zlora"))
        .args(["sweep", plan, "--events", "json"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        std::io::BufReader::new(stdout)
            .lines()
            .map(|l| serde_json::from_str::<Value>(&l.unwrap()).unwrap())
            .collect::<Vec<_>>()
    });
    // Each arm's log.jsonl, written by its trainer in its own run folder.
    let training = || {
        std::fs::read_dir(out.join("runs"))
            .map(|d| {
                d.filter(|e| {
                    let log = e.as_ref().unwrap().path().join("log.jsonl");
                    std::fs::read_to_string(log).is_ok_and(|t| t.lines().count() >= 2)
                })
                .count()
            })
            .unwrap_or(0)
    };
    let started = std::time::Instant::now();
    while training() < arms {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the sweep ended before its arms trained"
        );
        assert!(started.elapsed().as_secs() < 120, "the arms never trained");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let kill = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(kill.unwrap().success());
    let code = child.wait().unwrap().code();
    (code, reader.join().unwrap())
}

/// Every run folder under OUTPUT/runs holds a checkpoint and no final LoRA.
fn assert_stopped_with_checkpoints(out: &Path, arms: usize) {
    let runs: Vec<PathBuf> = std::fs::read_dir(out.join("runs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(runs.len(), arms, "{runs:?}");
    for run in runs {
        let checkpoints = std::fs::read_dir(run.join("checkpoints")).unwrap().count();
        assert!(checkpoints >= 1, "{}: no checkpoint", run.display());
        assert!(!run.join("lora.safetensors").exists(), "{}", run.display());
    }
    assert!(!out.join("report.html").exists());
}

#[test]
fn sigterm_stops_the_arms_with_checkpoints_and_the_rerun_finishes_them() {
    let s = Setup::new();
    let long = "[grid]\nmode = [\"turbo-direct\"]\nrank = [2, 4]\n";
    // In this process: the first arm stops, the second never starts.
    let plan = std::fs::read_to_string(s.plan("one.toml", "one", long))
        .unwrap()
        .replacen("steps = 2\n", "steps = 1000000\n", 1);
    let plan_path = s.path("one.toml");
    std::fs::write(&plan_path, &plan).unwrap();
    let out = s.path("one");
    let (code, events) = stopped_sweep(plan_path.to_str().unwrap(), &[], &out, 1);
    assert_eq!(code, Some(130), "{events:?}");
    let arm_states: Vec<&str> = events
        .iter()
        .filter(|e| e["event"] == "arm")
        .map(|e| e["state"].as_str().unwrap())
        .collect();
    assert_eq!(arm_states, ["started", "stopped"], "{events:?}");
    assert_eq!(events.last().unwrap()["event"], "stopped");
    assert_stopped_with_checkpoints(&out, 1);
    // The rerun continues the stopped arm from its checkpoint (fewer steps now: it ends at
    // once) and runs the other.
    std::fs::write(
        &plan_path,
        plan.replacen("steps = 1000000\n", "steps = 3\n", 1),
    )
    .unwrap();
    let rerun = zlora(&["sweep", plan_path.to_str().unwrap()]);
    let err = stderr(&rerun);
    assert!(err.contains("resumed from"), "{err}");
    assert!(out.join("report.html").is_file());

    // Two arms as child processes: SIGTERM to the queue reaches both, each checkpoints.
    let plan = std::fs::read_to_string(s.plan("two.toml", "two", long))
        .unwrap()
        .replacen("steps = 2\n", "steps = 1000000\n", 1);
    let plan_path = s.path("two.toml");
    std::fs::write(&plan_path, &plan).unwrap();
    let out = s.path("two");
    let (code, events) =
        stopped_sweep(plan_path.to_str().unwrap(), &["--gpus", "cpu,cpu"], &out, 2);
    assert_eq!(code, Some(130), "{events:?}");
    let stopped = events
        .iter()
        .filter(|e| e["event"] == "arm" && e["state"] == "stopped")
        .count();
    assert_eq!(stopped, 2, "{events:?}");
    assert_eq!(events.last().unwrap()["event"], "stopped");
    assert_stopped_with_checkpoints(&out, 2);
}

#[test]
fn bad_plans_and_flags_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let plan = dir.path().join("plan.toml");
    let cases = [
        ("output = \"o\"\nbase = \"b\"\nturbo = \"t\"\nbsae = 1\n", "unknown field `bsae`"),
        (
            "output = \"o\"\nbase = \"b\"\nturbo = \"t\"\n[dataset]\npath = \"d\"\n[lora]\nrank = 2\nalpha = 2\n[train]\nsteps = 2\nlearning_rate = 1e-2\n[grid]\nmode = [\"turbo-adapter\"]\n",
            "needs `training_adapter`",
        ),
    ];
    for (text, expected) in cases {
        std::fs::write(&plan, text).unwrap();
        let out = zlora(&["sweep", plan.to_str().unwrap()]);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("plan.toml") && err.contains(expected) && err.trim().lines().count() == 1,
            "{err}"
        );
    }
    let out = zlora(&["sweep", plan.to_str().unwrap(), "--gpus", "gpu0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("--gpus \"gpu0\""),
        "{err}"
    );
}
