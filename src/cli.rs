//! Command-line definitions for both binaries, in the library so that man pages and shell
//! completions can be generated from them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

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
    /// Run the built-in Socket Mode simulator, a local stand-in for Slack.
    Sim(SimArgs),
    /// Run flowcoach against the built-in simulator and watch it work: events, a slash
    /// command, a rotation, a dropped connection.
    Demo(DemoArgs),
    /// Measure flowcoach (as a child process) against the simulator: throughput, CPU per
    /// envelope, ack latency, resident memory.
    Bench(BenchArgs),
    /// Write man pages and shell completions (bash, zsh, fish) for both binaries, generated
    /// from these definitions, into a directory: for packaging.
    #[command(hide = true)]
    GenerateAssets(AssetsArgs),
}

#[derive(Debug, Args)]
pub struct AssetsArgs {
    /// The directory to write into (created if missing): `man/`, `completions/{bash,zsh,fish}/`.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Envelopes to send.
    #[arg(long, default_value_t = 100_000)]
    pub envelopes: u64,
    /// Envelopes in flight (sent, not yet acked) at most.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Measure handovers instead: this many `flowcoachctl handover`s in a row under a
    /// steady event stream (time to complete, time with no socket open, envelopes lost or
    /// handled twice).
    #[arg(long, value_name = "N")]
    pub handovers: Option<u32>,
    /// With --handovers: break before make (`[handover] strict = true`).
    #[arg(long, requires = "handovers")]
    pub strict: bool,
    /// With --handovers: events per second in the stream.
    #[arg(long, default_value_t = 200.0, value_name = "PER_SECOND")]
    pub rate: f64,
    /// With --handovers: what the stream carries (mixed: one slash command and one
    /// interaction in every ten envelopes, the rest events).
    #[arg(long, value_enum, default_value_t = StreamMix::Mixed, requires = "handovers")]
    pub mix: StreamMix,
    /// Print the figures as JSON.
    #[arg(long)]
    pub json: bool,
}

/// The kinds of envelope in a benchmark's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StreamMix {
    Events,
    Mixed,
}

#[derive(Debug, Args)]
pub struct SimArgs {
    /// Address for the simulator's Web API and websocket endpoints.
    #[arg(long, default_value = "127.0.0.1:3000")]
    pub listen: SocketAddr,
    /// The simulated app's ID.
    #[arg(long, default_value = "A0SIMAPP01")]
    pub app_id: String,
    /// Events per second to inject once a client is connected (0: none).
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// Ask each connection to rotate after this long, like `debug_reconnects`.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub rotate_every: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How long the demo runs before stopping flowcoach with SIGTERM.
    #[arg(long, default_value = "12s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
}
