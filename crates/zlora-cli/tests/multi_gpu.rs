//! `zlora train` on several GPUs, as far as a machine without GPUs can check it: `--gpus`
//! parsing, the launcher variables a rank reads (torchrun's, Slurm's), and the one error of a
//! build without the `nccl` feature. The launcher's process handling has unit tests
//! (src/launch.rs); the exchange itself needs GPUs (docs/multi-gpu.md).

mod common;

use std::ffi::OsStr;
use std::process::Output;

use common::zlora_env;

/// A config that parses; its model and data do not exist, as nothing here gets that far.
fn config(dir: &tempfile::TempDir) -> String {
    let path = dir.path().join("train.toml");
    let text = r#"[model]
path = "missing-model"
variant = "turbo"

[dataset]
path = "missing-data"
resolution = 32

[lora]
rank = 2
alpha = 2

[train]
steps = 2
learning_rate = 1e-3
batch_size = 2
output = "out"
"#;
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

fn train(args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().unwrap();
    let config = config(&dir);
    let mut all = vec!["train", config.as_str()];
    all.extend(args);
    let env: Vec<(&str, &OsStr)> = env.iter().map(|(k, v)| (*k, OsStr::new(*v))).collect();
    zlora_env(&all, &env)
}

/// Asserts that the run failed with `code` and that its stderr names every one of `words`.
fn refused(out: &Output, code: i32, words: &[&str]) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{err}");
    for word in words {
        assert!(err.contains(word), "{word:?} not in: {err}");
    }
}

const TORCHRUN_RANK_1: [(&str, &str); 5] = [
    ("RANK", "1"),
    ("WORLD_SIZE", "2"),
    ("LOCAL_RANK", "1"),
    ("MASTER_ADDR", "127.0.0.1"),
    ("MASTER_PORT", "29511"),
];

#[test]
fn several_gpus_without_nccl_is_one_error_naming_the_feature_and_the_build() {
    if cfg!(feature = "nccl") {
        return;
    }
    let fix = ["`nccl` feature", "scripts/cuda-build.sh"];
    refused(
        &train(&["--gpus", "0,1"], &[]),
        1,
        &[&["--gpus 0,1"][..], &fix].concat(),
    );
    refused(
        &train(&[], &TORCHRUN_RANK_1),
        1,
        &[&["rank 1 of a world of 2"][..], &fix].concat(),
    );
    let slurm = [
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "4"),
        ("SLURM_LOCALID", "0"),
        ("SLURM_JOB_NODELIST", "gpu[01-02]"),
    ];
    refused(
        &train(&[], &slurm),
        1,
        &[&["rank 0 of a world of 4"][..], &fix].concat(),
    );
}

#[test]
fn one_gpu_is_a_plain_run_on_that_gpu() {
    if cfg!(feature = "cuda") {
        return;
    }
    // The device selection names the GPU asked for: this CPU build has no CUDA.
    let out = train(&["--gpus", "3"], &[]);
    refused(&out, 1, &["ZLORA_DEVICE=cuda:3", "--features cuda"]);
    // A world of one (srun -n 1) is a plain run too.
    let one = [
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "1"),
        ("SLURM_LOCALID", "0"),
        ("SLURM_JOB_NODELIST", "gpu07"),
    ];
    let out = train(&[], &[&one[..], &[("ZLORA_DEVICE", "cuda:2")]].concat());
    refused(&out, 1, &["ZLORA_DEVICE=cuda:2", "--features cuda"]);
}

#[test]
fn bad_gpu_lists_are_usage_errors() {
    for (list, why) in [
        ("0,,1", "'' is not a GPU number"),
        ("a", "'a' is not a GPU number"),
        ("0-3", "'0-3' is not a GPU number"),
        ("1,2,1", "GPU 1 is listed twice"),
    ] {
        refused(&train(&["--gpus", list], &[]), 2, &["--gpus", why]);
    }
}

#[test]
fn launcher_variables_that_are_missing_or_wrong_are_named() {
    let without_rank = &TORCHRUN_RANK_1[1..];
    refused(
        &train(&[], without_rank),
        1,
        &["RANK is not set", "torchrun"],
    );
    let bad_size = [("RANK", "0"), ("WORLD_SIZE", "two"), ("LOCAL_RANK", "0")];
    refused(&train(&[], &bad_size), 1, &["WORLD_SIZE=two"]);
    let no_nodes = [
        ("SLURM_PROCID", "1"),
        ("SLURM_NTASKS", "2"),
        ("SLURM_LOCALID", "1"),
    ];
    refused(
        &train(&[], &no_nodes),
        1,
        &["SLURM_JOB_NODELIST is not set", "srun"],
    );
    // --gpus inside a launcher's world would start processes that start processes.
    refused(
        &train(&["--gpus", "0,1"], &TORCHRUN_RANK_1),
        1,
        &["leave out --gpus", "rank 1 of 2"],
    );
}
