//! `cargo xtask`: build tasks of the workspace that are not part of any product binary.

mod assets;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "xtask", about = "Build tasks of the flowcoach workspace")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Write man pages and shell completions (bash, zsh, fish) for flowcoach and
    /// flowcoachctl, generated from their command-line definitions, into a directory
    /// (created if missing): `man/`, `completions/{bash,zsh,fish}/`. For packaging.
    Assets {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

fn main() -> ExitCode {
    let Task::Assets { out } = Cli::parse().task;
    match assets::generate(&out) {
        Ok(files) => {
            for file in files {
                println!("{}", file.display());
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!(
                "xtask: cannot generate assets in {}: {error}",
                out.display()
            );
            ExitCode::FAILURE
        }
    }
}
