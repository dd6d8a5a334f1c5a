//! Shared helpers of the CLI tests: running the binary and checking that it succeeded.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::process::{Command, Output};

/// The library's parity helpers: fixture paths, reference tensors, relative errors.
#[path = "../../../zlora/tests/common/mod.rs"]
pub mod parity;

/// Runs the zlora binary with extra environment variables (never with the user's HF_TOKEN).
pub fn zlora_env(args: &[&str], env: &[(&str, &OsStr)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zlora"));
    cmd.args(args).env_remove("HF_TOKEN");
    for (key, value) in env {
        cmd.env(key, value);
    }
    cmd.output().unwrap()
}

pub fn zlora(args: &[&str]) -> Output {
    zlora_env(args, &[])
}

fn succeeded(out: &Output) {
    assert!(
        out.status.success(),
        "zlora failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Asserts that the run succeeded; its stdout, trimmed.
pub fn stdout(out: &Output) -> String {
    succeeded(out);
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Asserts that the run succeeded; its stderr (progress and messages).
pub fn stderr(out: &Output) -> String {
    succeeded(out);
    String::from_utf8_lossy(&out.stderr).to_string()
}
