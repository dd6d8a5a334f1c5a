//! `zlora`: the command line. This file only parses arguments and dispatches; each command
//! lives in its own file and calls the library.

mod arm_set;
mod caption;
mod demo;
mod doctor;
mod events;
mod experiment;
mod fetch;
mod generate;
mod launch;
mod lora;
mod plan;
mod process;
mod progress;
mod quantize;
mod serve;
mod sweep;
mod tiny;
mod train;
mod validate;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "zlora",
    version,
    about = "Train, convert and validate LoRAs for Z-Image (Turbo, Base, De-Turbo)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Caption a dataset folder's images with a local Qwen3-VL model (NAME.txt beside each).
    Caption(caption::Args),
    /// The quick start in one go: tiny model and dataset, before/after images, a short
    /// training with samples, a validation report.
    Demo(demo::Args),
    /// Check this machine first: build, GPU, driver, kernels, memory, and whether a config fits.
    Doctor(doctor::Args),
    /// Generate images with a Z-Image model and any number of LoRAs.
    Generate(Box<generate::Args>),
    /// Create a tiny random-weight Z-Image model (diffusers layout) to try every command on.
    TinyModel(tiny::Args),
    /// Create a small synthetic dataset (images + captions) to train the tiny model on.
    TinyDataset(tiny::DatasetArgs),
    /// Train a LoRA (base, turbo with a training adapter, or direct turbo) from a TOML config.
    Train(train::Args),
    /// Validate a LoRA on Base and Turbo (or every checkpoint of a run): sheets, verdicts, report.
    Validate(Box<validate::Args>),
    /// Train Base, Turbo + training adapter and direct Turbo on one dataset, validate, compare.
    Experiment(experiment::Args),
    /// Train and validate a grid or list of arms (rank, learning rate, steps, mode, dataset),
    /// in turn, one per GPU or as a Slurm job array, and compare them in one report.
    Sweep(sweep::Args),
    /// Download a model or adapter into the Hugging Face cache (resumable, verified).
    Fetch(fetch::Args),
    /// Estimate memory, time, cost and downloads of a training configuration per GPU.
    Plan(plan::Args),
    /// Start the local web app: datasets, a training queue with live progress (docs/serve.md).
    Serve(serve::Args),
    /// Write the transformer as a GGUF (q8_0, q6_k, q5_k, q4_k) that ComfyUI-GGUF loads.
    Quantize(quantize::Args),
    /// Inspect, convert, combine, merge and extract LoRA files.
    #[command(subcommand)]
    Lora(lora::Command),
}

fn main() -> ExitCode {
    process::keep_freed_memory();
    process::park_idle_workers();
    let cli = Cli::parse();
    if let Err(e) = zlora::nn::kernels::set_from_env() {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Caption(args) => caption::run(args),
        Command::Demo(args) => demo::run(args).map(|()| ExitCode::SUCCESS),
        Command::Doctor(args) => doctor::run(args),
        Command::Generate(args) => generate::run(*args).map(|()| ExitCode::SUCCESS),
        Command::TinyModel(args) => tiny::run(args).map(|()| ExitCode::SUCCESS),
        Command::TinyDataset(args) => tiny::run_dataset(args).map(|()| ExitCode::SUCCESS),
        Command::Train(args) => train::run(args),
        Command::Validate(args) => validate::run(*args).map(|()| ExitCode::SUCCESS),
        Command::Experiment(args) => experiment::run(args),
        Command::Sweep(args) => sweep::run(args),
        Command::Fetch(args) => fetch::run(args).map(|()| ExitCode::SUCCESS),
        Command::Plan(args) => plan::run(args).map(|()| ExitCode::SUCCESS),
        Command::Serve(args) => serve::run(args).map(|()| ExitCode::SUCCESS),
        Command::Quantize(args) => quantize::run(args).map(|()| ExitCode::SUCCESS),
        Command::Lora(command) => lora::run(command),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
