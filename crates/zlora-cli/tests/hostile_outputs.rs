//! Hostile but realistic use of zlora's outputs (issue 17, the output side), on the tiny
//! model in a project folder: `--force` never removes the user's files, one writer per output
//! folder, leftovers of killed runs are cleaned, `--resume` refuses a changed training and
//! survives a damaged checkpoint, LoRA metadata names no local folders, and unwritable
//! outputs fail before any work. Every test checks the exit code, the message, and that the
//! user's files are still there.

mod common;

use common::{stderr, tiny_model_and_data};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use zlora::outdir::{OutputDir, Policy};

/// A PID no process has (above the kernel's pid_max, at most 2^22).
const DEAD_PID: u32 = 99_999_999;

/// A project folder as a user keeps it: the tiny model, a dataset, notes; commands run in it
/// with HOME at `home/` inside it.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        tiny_model_and_data(dir.path(), 32, 4, 32);
        std::fs::write(dir.path().join("notes.txt"), "my notes").unwrap();
        std::fs::create_dir_all(dir.path().join("home")).unwrap();
        Self { dir }
    }

    fn path(&self, s: &str) -> PathBuf {
        self.dir.path().join(s)
    }

    /// Writes `NAME.toml` (relative paths, as in a project) with `output`, after `edits`
    /// (text replacements) and with `extra` appended; returns its file name.
    fn config(&self, name: &str, output: &str, edits: &[(&str, &str)], extra: &str) -> String {
        let mut text = format!(
            "[model]\npath = \"model\"\nvariant = \"turbo\"\nbase_dtype = \"f32\"\n\
             [dataset]\npath = \"data\"\nresolution = 32\ntrigger = \"zkchar\"\n\
             [lora]\nrank = 2\nalpha = 2\n\
             [train]\nsteps = 4\nlearning_rate = 1e-3\nbatch_size = 2\nseed = 7\n\
             save_every = 2\noutput = \"{output}\"\n{extra}"
        );
        for (from, to) in edits {
            assert!(text.contains(from), "{from}");
            text = text.replace(from, to);
        }
        let file = format!("{name}.toml");
        std::fs::write(self.path(&file), text).unwrap();
        file
    }

    /// Writes `plan.toml`, an experiment plan into `output` (the adapter file is never read:
    /// the output folder is refused first); returns its file name.
    fn plan(&self, output: &str) -> &'static str {
        let plan = format!(
            "output = \"{output}\"\nbase = \"model\"\nturbo = \"model\"\n\
             training_adapter = \"adapter.safetensors\"\n\
             [dataset]\npath = \"data\"\nresolution = 32\n\
             [lora]\nrank = 2\nalpha = 2\n[train]\nsteps = 2\nlearning_rate = 1e-3\n"
        );
        std::fs::write(self.path("plan.toml"), plan).unwrap();
        "plan.toml"
    }

    /// Runs zlora in the project folder.
    fn run(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_zlora"))
            .args(args)
            .current_dir(self.dir.path())
            .env("HOME", self.path("home"))
            .env_remove("HF_TOKEN")
            .output()
            .unwrap()
    }

    /// A run trained to its end in `output`.
    fn trained(&self, name: &str, output: &str) -> PathBuf {
        let cfg = self.config(name, output, &[], "");
        stderr(&self.run(&["train", &cfg]));
        self.path(output)
    }

    /// Every file under the project with its bytes.
    fn files(&self) -> BTreeMap<PathBuf, Vec<u8>> {
        fn walk(dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.insert(p.clone(), std::fs::read(&p).unwrap());
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(self.dir.path(), &mut out);
        out
    }

    /// Every file of `before` is still there with the same bytes (a lock file holds the PID
    /// of its latest holder).
    fn assert_kept(&self, before: &BTreeMap<PathBuf, Vec<u8>>) {
        let now = self.files();
        let lock = std::ffi::OsStr::new(zlora::outdir::LOCK);
        for (path, bytes) in before.iter().filter(|(p, _)| p.file_name() != Some(lock)) {
            assert!(
                now.get(path) == Some(bytes),
                "{} was removed or changed",
                path.display()
            );
        }
    }
}

/// Asserts a failure whose stderr contains every one of `needles`; returns stderr.
fn refused(out: &Output, needles: &[&str]) -> String {
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected a failure:\n{err}");
    assert_eq!(out.status.code(), Some(1), "{err}");
    for n in needles {
        assert!(err.contains(n), "missing {n:?} in:\n{err}");
    }
    assert!(!err.contains("panicked"), "{err}");
    err
}

/// Tensor names and bytes of a safetensors file (not its metadata).
fn tensor_bytes(p: &Path) -> Vec<(String, Vec<u8>)> {
    let file = std::fs::read(p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&file).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.data().to_vec()))
        .collect();
    out.sort();
    out
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn force_never_removes_the_project_the_dataset_or_the_model() {
    let p = Project::new();
    let before = p.files();
    for (output, what) in [
        (".", "the dataset"),
        ("data", "the dataset"),
        ("model", "the model"),
        ("..", "the dataset"),
        ("./data/../data/", "the dataset"),
    ] {
        let cfg = p.config("t", output, &[], "");
        for flags in [&[][..], &["--force"], &["--resume"]] {
            let mut args = vec!["train", cfg.as_str()];
            args.extend(flags);
            let out = p.run(&args);
            refused(
                &out,
                &["is or contains", what, "choose another output folder"],
            );
            p.assert_kept(&before);
        }
    }
    // An experiment into the project folder.
    let plan = p.plan(".");
    let before = p.files();
    refused(
        &p.run(&["experiment", plan, "--force"]),
        &["is or contains the Base model"],
    );
    p.assert_kept(&before);
    // The config file's own folder, given on the command line.
    std::fs::create_dir_all(p.path("cfgs")).unwrap();
    let cfg = p.config("cfgs/c", "unused", &[], "");
    let out = p.run(&["train", &cfg, "--force", "--output", "cfgs"]);
    refused(&out, &["is or contains the config file"]);
    assert!(p.path(&cfg).is_file());
}

#[test]
fn an_empty_output_is_refused_and_nothing_lands_in_the_current_folder() {
    let p = Project::new();
    let cfg = p.config("t", "", &[], "");
    let before = names_in(p.dir.path());
    for force in [false, true] {
        let mut args = vec!["train", cfg.as_str()];
        args.extend(force.then_some("--force"));
        refused(&p.run(&args), &["the output folder is empty"]);
    }
    assert_eq!(names_in(p.dir.path()), before);
}

#[test]
fn a_tilde_output_is_in_the_home_folder() {
    let p = Project::new();
    let cfg = p.config("t", "~/runs/x", &[], "");
    stderr(&p.run(&["train", &cfg, "--steps", "1"]));
    assert!(p.path("home/runs/x/lora.safetensors").is_file());
    assert!(!p.path("~").exists(), "no literal ~ folder");
}

#[test]
fn force_refuses_a_folder_zlora_did_not_make_and_never_advises_it() {
    let p = Project::new();
    std::fs::create_dir_all(p.path("mine")).unwrap();
    std::fs::write(p.path("mine/thesis.txt"), "mine").unwrap();
    let before = p.files();
    let cfg = p.config("t", "mine", &[], "");
    for force in [false, true] {
        let mut args = vec!["train", cfg.as_str()];
        args.extend(force.then_some("--force"));
        let err = refused(&p.run(&args), &["mine", "was not made by zlora"]);
        assert!(
            !err.contains("pass --force") && !err.contains("or --force"),
            "{err}"
        );
    }
    // experiment: the plan is checked, then the folder; nothing is trained.
    let plan = p.plan("mine");
    for force in [false, true] {
        let mut args = vec!["experiment", plan];
        args.extend(force.then_some("--force"));
        let err = refused(&p.run(&args), &["mine", "was not made by zlora"]);
        assert!(!err.contains("pass --force"), "{err}");
    }
    p.assert_kept(&before);
    // validate --force would overwrite the user's report.html.
    std::fs::write(p.path("mine/report.html"), "my report").unwrap();
    let before = p.files();
    let lora = p.trained("r", "run").join("lora.safetensors");
    let lora = lora.to_str().unwrap();
    let out = p.run(&[
        "validate", "--lora", lora, "--base", "model", "--turbo", "model", "--output", "mine",
        "--force",
    ]);
    refused(&out, &["mine", "was not made by zlora"]);
    p.assert_kept(&before);
}

#[test]
fn a_run_that_stopped_before_its_first_checkpoint_starts_over_without_force() {
    let p = Project::new();
    let diverging = [("learning_rate = 1e-3", "learning_rate = 1e30")];
    let extra = "max_grad_norm = 0.0\n";
    let cfg = p.config("t", "run", &diverging, extra);
    let cfg = {
        let text = std::fs::read_to_string(p.path(&cfg)).unwrap();
        std::fs::write(
            p.path(&cfg),
            text.replace("save_every = 2", "save_every = 100"),
        )
        .unwrap();
        cfg
    };
    let err = refused(
        &p.run(&["train", &cfg]),
        &["loss became", "no checkpoint was written"],
    );
    assert!(!err.contains("last good checkpoint"), "{err}");
    assert!(!p.path("run/checkpoints").exists());
    refused(
        &p.run(&["train", &cfg, "--resume"]),
        &[
            "no checkpoint in this output folder",
            "run without --resume",
        ],
    );
    // The same folder, a sane learning rate, no --force: it starts over.
    let good = p.config("good", "run", &[], "");
    stderr(&p.run(&["train", &good]));
    assert!(p.path("run/lora.safetensors").is_file());
}

#[test]
fn a_diverging_run_names_a_checkpoint_that_exists() {
    let p = Project::new();
    let cfg = p.config(
        "t",
        "run",
        &[
            ("learning_rate = 1e-3", "learning_rate = 1e30"),
            ("save_every = 2", "save_every = 1"),
        ],
        "max_grad_norm = 0.0\n",
    );
    let err = refused(
        &p.run(&["train", &cfg]),
        &["the last good checkpoint is kept in "],
    );
    let named = err
        .split("kept in ")
        .nth(1)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .trim();
    assert!(p.path(named).join("state.json").is_file(), "{named}");
}

#[test]
fn a_second_writer_is_refused_at_once_naming_the_holder() {
    let p = Project::new();
    let run = p.trained("t", "run");
    let before = p.files();
    let pid = std::process::id().to_string();
    let held = OutputDir::claim(&run, "train", &[], Policy::Keep).unwrap();
    let cfg = "t.toml";
    for args in [
        vec!["train", cfg, "--force"],
        vec!["train", cfg, "--resume", "--steps", "6"],
    ] {
        let err = refused(&p.run(&args), &["run", "in use by another zlora run", &pid]);
        assert!(
            !err.contains("mode turbo"),
            "refused before the model loads: {err}"
        );
    }
    drop(held);
    p.assert_kept(&before);

    // A checkpoint sweep into a folder another sweep writes.
    let sweep_out = run.join("validation");
    let held = OutputDir::claim(&sweep_out, "validate", &[], Policy::Keep).unwrap();
    refused(
        &p.run(&["validate", "--checkpoints", "run"]),
        &["validation", "in use", &pid],
    );
    drop(held);

    // A merge into a folder another merge writes.
    let lora = format!("{}", run.join("lora.safetensors").display());
    let held = OutputDir::claim(&p.path("merged"), "lora merge", &[], Policy::Keep).unwrap();
    refused(
        &p.run(&["lora", "merge", "--model", "model", &lora, "-o", "merged"]),
        &["merged", "in use", &pid],
    );
    drop(held);
    // Released, the folder takes the merge. A sibling test that forks a child in the moment
    // the lock is held gives that child a copy of the descriptor until it execs, so the
    // release is waited for briefly.
    let merged = (0..50).any(|_| {
        let out = p.run(&["lora", "merge", "--model", "model", &lora, "-o", "merged"]);
        out.status.success() || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            false
        }
    });
    assert!(
        merged
            && p.path("merged/diffusion_pytorch_model.safetensors")
                .is_file()
    );
}

#[test]
fn temporary_files_of_killed_writers_are_removed_on_the_next_run() {
    let p = Project::new();
    let run = p.trained("t", "run");
    let dead = [
        run.join(format!(".lora.safetensors.tmp{DEAD_PID}")),
        run.join(format!("checkpoints/step-000004/.state.json.tmp{DEAD_PID}")),
    ];
    // A writer that still runs (this test) keeps its file.
    let alive = run.join(format!(".log.jsonl.tmp{}", std::process::id()));
    for f in dead.iter().chain([&alive]) {
        std::fs::write(f, vec![0u8; 1000]).unwrap();
    }
    let partial = run.join("checkpoints/.step-000006.partial");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("state.json"), "{").unwrap();
    let log = stderr(&p.run(&["train", "t.toml", "--resume", "--steps", "5"]));
    assert!(
        log.contains("removed 2 temporary files and 1 unfinished checkpoints"),
        "{log}"
    );
    assert!(dead.iter().all(|f| !f.exists()) && alive.is_file() && !partial.exists());

    let lora = format!("{}", run.join("lora.safetensors").display());
    let merge = |out: &str, extra: &[&str]| {
        let mut args = vec!["lora", "merge", "--model", "model", &lora, "-o", out];
        args.extend(extra);
        stderr(&p.run(&args));
    };
    merge("merged", &[]);
    let stale =
        p.path(format!("merged/.diffusion_pytorch_model.safetensors.tmp{DEAD_PID}").as_str());
    std::fs::write(&stale, "partial").unwrap();
    merge("merged", &["--force"]);
    assert!(!stale.exists());

    let stale = p.path(format!(".comfy.safetensors.tmp{DEAD_PID}").as_str());
    let other = p.path(format!(".notes.txt.tmp{DEAD_PID}").as_str());
    std::fs::write(&stale, "partial").unwrap();
    std::fs::write(&other, "not zlora's output").unwrap();
    merge("comfy.safetensors", &["--format", "comfyui"]);
    assert!(!stale.exists() && other.exists());
    // Every atomic write does the same for its file: a killed convert's leftover.
    let stale = p.path(format!(".conv.safetensors.tmp{DEAD_PID}").as_str());
    std::fs::write(&stale, "partial").unwrap();
    let lora = lora.as_str();
    stderr(&p.run(&[
        "lora",
        "convert",
        lora,
        "conv.safetensors",
        "--to",
        "comfyui",
    ]));
    assert!(!stale.exists() && p.path("conv.safetensors").is_file());
}

#[test]
fn merge_force_with_another_shard_size_leaves_no_stale_shards() {
    let p = Project::new();
    let run = p.trained("t", "run");
    let lora = format!("{}", run.join("lora.safetensors").display());
    let merge = |extra: &[&str]| {
        let mut args = vec!["lora", "merge", "--model", "model", &lora, "-o", "merged"];
        args.extend(extra);
        stderr(&p.run(&args));
        names_in(&p.path("merged"))
            .into_iter()
            .filter(|n| n.starts_with("diffusion_pytorch_model"))
            .collect::<Vec<_>>()
    };
    let sharded = merge(&["--max-shard-size", "20000"]);
    let shards = sharded.iter().filter(|n| n.contains("-of-")).count();
    assert!(shards > 1 && sharded.len() == shards + 1, "{sharded:?}");
    let single = merge(&["--force"]);
    assert_eq!(
        single,
        vec!["diffusion_pytorch_model.safetensors".to_string()]
    );
    let again = merge(&["--force", "--max-shard-size", "20000"]);
    assert_eq!(again, sharded, "the single file is gone again");
    // What is left loads as one transformer.
    zlora::model::weights::TransformerCheckpoint::open_path(&p.path("merged")).unwrap();
}

#[test]
fn resume_refuses_a_changed_training_and_names_the_keys() {
    let p = Project::new();
    p.config("t", "run", &[("steps = 4", "steps = 2")], "");
    stderr(&p.run(&["train", "t.toml"]));
    let before = p.files();
    let resume = |edits: &[(&str, &str)], extra: &[&str]| {
        let cfg = p.config("changed", "run", edits, "");
        let mut args = vec!["train", cfg.as_str(), "--resume"];
        args.extend(extra);
        p.run(&args)
    };
    let steps = ("steps = 4", "steps = 2");
    refused(
        &resume(
            &[steps, ("learning_rate = 1e-3", "learning_rate = 1e-2")],
            &[],
        ),
        &["train.learning_rate: 0.001 → 0.01", "start a new run"],
    );
    let err = refused(
        &resume(&[steps, ("rank = 2", "rank = 4")], &[]),
        &["lora.rank: 2 → 4"],
    );
    assert!(!err.contains("shape"), "{err}");
    refused(
        &resume(
            &[
                steps,
                ("seed = 7", "seed = 8"),
                ("batch_size = 2", "batch_size = 1"),
                ("trigger = \"zkchar\"", "trigger = \"other\""),
                ("resolution = 32", "resolution = 48"),
                ("alpha = 2", "alpha = 1"),
                ("path = \"model\"", "path = \"./model\""),
            ],
            &[],
        ),
        &[
            "train.seed",
            "train.batch_size",
            "dataset.trigger",
            "dataset.resolution",
            "lora.alpha",
            "model.path",
        ],
    );
    refused(
        &resume(&[steps], &["--allow-changes", "learning_rate"]),
        &["--allow-changes learning_rate: only"],
    );
    // A safe change must be named; then it is accepted and said.
    let save = ("save_every = 2", "save_every = 1");
    refused(
        &resume(&[steps, save], &[]),
        &["--allow-changes train.save_every"],
    );
    p.assert_kept(&before);
    let log = stderr(&resume(
        &[save],
        &["--allow-changes", "save_every", "steps"],
    ));
    assert!(
        log.contains("changed on resume: train.save_every: 2 → 1")
            && log.contains("resumed from")
            && p.path("run/checkpoints/step-000003").is_dir(),
        "{log}"
    );
}

#[test]
fn a_damaged_newest_checkpoint_falls_back_to_the_one_before() {
    let p = Project::new();
    let run = p.trained("t", "run");
    let whole = tensor_bytes(&run.join("lora.safetensors"));
    let newest = run.join("checkpoints/step-000004/state.safetensors");
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    let log = stderr(&p.run(&["train", "t.toml", "--resume"]));
    assert!(
        log.contains("step-000004 is damaged") && log.contains("step-000002 (step 2)"),
        "{log}"
    );
    assert_eq!(
        tensor_bytes(&run.join("lora.safetensors")),
        whole,
        "steps 3-4 redone from step 2 give the same LoRA"
    );
}

#[test]
fn lora_metadata_names_no_local_folders_unless_asked() {
    let p = Project::new();
    let root = p.dir.path().to_str().unwrap().to_string();
    let abs = |s: &str| format!("path = \"{}\"", p.path(s).display());
    let edits = [
        ("path = \"model\"", abs("model")),
        ("path = \"data\"", abs("data")),
    ];
    let edits: Vec<(&str, &str)> = edits.iter().map(|(a, b)| (*a, b.as_str())).collect();
    let out = p.path("run").display().to_string();
    let cfg = p.config("t", &out, &edits, "");
    stderr(&p.run(&["train", &cfg, "--steps", "2"]));
    for file in [
        "run/lora.safetensors",
        "run/checkpoints/step-000002/lora.safetensors",
    ] {
        let header = zlora::lora::LoraHeader::read(p.path(file)).unwrap();
        for (key, value) in &header.metadata {
            assert!(!value.contains(&root), "{file}: {key} = {value}");
        }
        let config = &header.metadata["zlora.config"];
        assert!(
            config.contains("path = \"data\"") && config.contains("output = \"run\""),
            "{config}"
        );
        assert_eq!(header.metadata["modelspec.base_model"], "model");
    }
    let cfg = p.config(
        "e",
        &format!("{out}2"),
        &edits,
        "[output]\nembed_paths = true\n",
    );
    stderr(&p.run(&["train", &cfg, "--steps", "1"]));
    let header = zlora::lora::LoraHeader::read(p.path("run2/lora.safetensors")).unwrap();
    assert!(header.metadata["zlora.config"].contains(&abs("data")));
}

#[test]
fn unwritable_outputs_fail_before_any_work() {
    let p = Project::new();
    // A regular file where a folder is needed: not writable even for root.
    std::fs::write(p.path("blocker"), "a file").unwrap();
    let before = p.files();
    let out = p.run(&[
        "generate",
        "--model",
        "model",
        "--prompt",
        "x",
        "--width",
        "32",
        "--height",
        "32",
        "--steps",
        "1",
        "--out",
        "blocker/a.png",
    ]);
    let err = refused(&out, &["blocker"]);
    assert!(!err.contains("encoding the prompt"), "{err}");
    let cfg = p.config("t", "blocker/run", &[], "");
    let err = refused(&p.run(&["train", &cfg]), &["blocker"]);
    assert!(!err.contains("mode turbo"), "{err}");
    let lora = p.trained("r", "run").join("lora.safetensors");
    let out = p.run(&[
        "validate",
        "--lora",
        lora.to_str().unwrap(),
        "--base",
        "model",
        "--turbo",
        "model",
        "--output",
        "blocker/v",
    ]);
    let err = refused(&out, &["blocker"]);
    assert!(!err.contains("rendering"), "{err}");
    p.assert_kept(&before);
}
