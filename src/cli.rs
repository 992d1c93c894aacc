//! Command-line definitions for both binaries, in the library so that man pages and shell
//! completions can be generated from them.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// FlowCoach: keeps a Slack app connected over Socket Mode.
#[derive(Debug, Parser)]
#[command(name = "flowcoach", version, about)]
pub struct DaemonCli {
    /// Settings file (TOML); also `FLOWCOACH_CONFIG`. The app token comes from
    /// `SLACK_APP_TOKEN`, never from the command line.
    #[arg(long, global = true, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// The environment to run, from the configuration's `[environments]` (also
    /// `FLOWCOACH_ENV`).
    #[arg(long = "env", global = true, value_name = "NAME")]
    pub environment: Option<String>,
    /// Take the app over from the instance running for it on this host (a new version, a
    /// new container), with no gap: connect, then ask it to hand over. Starts normally
    /// when none runs.
    #[arg(long, global = true)]
    pub takeover: bool,
    #[command(subcommand)]
    pub command: Option<DaemonCommand>,
}

#[derive(Debug, Subcommand)]
pub enum DaemonCommand {
    /// Run the service (the default).
    Run,
    /// Validate the configuration and the token's shape without connecting; exit 0 or 78.
    CheckConfig,
}
