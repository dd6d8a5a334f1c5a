//! `zlora doctor [--config CONFIG] [--memory-gib N]`: the first command on a rented machine.
//! One line per check (ok, or a problem with its fix), then a one-line verdict; the exit code
//! is 0 only when the machine is ready (docs/gpu.md).

use std::path::PathBuf;
use std::process::ExitCode;

use zlora::doctor::{diagnose, Options, Report};
use zlora::train::config::TrainConfig;

#[derive(clap::Args)]
pub struct Args {
    /// A training configuration: does `zlora plan`'s peak memory fit what is free here?
    #[arg(long)]
    config: Option<PathBuf>,
    /// Check the configuration against this many GiB instead of the device's free memory.
    #[arg(long)]
    memory_gib: Option<f64>,
}

pub fn run(a: Args) -> anyhow::Result<ExitCode> {
    if let Some(gib) = a.memory_gib {
        anyhow::ensure!(
            gib > 0.0 && gib.is_finite(),
            "--memory-gib must be a positive number of GiB"
        );
    }
    let config = a
        .config
        .as_deref()
        .map(TrainConfig::from_file)
        .transpose()?;
    let report = diagnose(&Options {
        requested: std::env::var("ZLORA_DEVICE").ok(),
        config: config.as_ref(),
        memory_gib: a.memory_gib,
    })?;
    print!("{}", render(&report));
    Ok(if report.ready() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn render(report: &Report) -> String {
    let mut out = String::new();
    for check in &report.checks {
        let status = if check.fix.is_some() { "PROBLEM" } else { "ok" };
        out += &format!("{status:<8} {:<13} {}\n", check.what, check.detail);
        if let Some(fix) = &check.fix {
            out += &format!("{:<22} fix: {fix}\n", "");
        }
    }
    out += &format!("verdict: {}\n", report.verdict());
    out
}
