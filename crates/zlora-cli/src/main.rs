//! `zlora`: the command line. This file only parses arguments and dispatches; each command
//! lives in its own file and calls the library.

mod generate;
mod process;
mod progress;
mod tiny;

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
    /// Generate images with a Z-Image model and any number of LoRAs.
    Generate(Box<generate::Args>),
    /// Create a tiny random-weight Z-Image model (diffusers layout) to try every command on.
    TinyModel(tiny::Args),
}

fn main() -> ExitCode {
    process::keep_freed_memory();
    process::park_idle_workers();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(args) => generate::run(*args),
        Command::TinyModel(args) => tiny::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
