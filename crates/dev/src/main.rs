//! `flowcoach-dev`: the development tools beside the daemon: the Socket Mode simulator on a
//! fixed address, a narrated demo, and the benchmarks. Each runs the real `flowcoach`
//! binary as a child process, so what they show and measure is the daemon itself.

mod app;
mod bench;
mod bolt_compare;
mod demo;
mod noop_app;
mod outages;
mod sim;

use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// flowcoach's development tools: simulator, demo, benchmarks.
#[derive(Debug, Parser)]
#[command(name = "flowcoach-dev", version, about)]
struct Cli {
    #[command(subcommand)]
    tool: Tool,
}

#[derive(Debug, Subcommand)]
enum Tool {
    /// Run the Socket Mode simulator, a local stand-in for Slack.
    Sim(SimArgs),
    /// Run flowcoach against the simulator and watch it work: a bot in HTTP mode behind it
    /// (a mention answered with chat.postMessage, /hello in the ack), a rotation, a dropped
    /// connection, a clean stop.
    Demo(DemoArgs),
    /// Run a small Slack app in HTTP mode (signed requests on /slack/events, replies through
    /// the Web API), to put behind flowcoach's `[forward]`. Configured by its environment,
    /// as a Bolt app is: SLACK_SIGNING_SECRET, SLACK_BOT_TOKEN, HOST (127.0.0.1), PORT
    /// (3001), SLACK_API_URL (http://127.0.0.1:3000/api, the simulator's).
    App,
    /// Measure flowcoach (as a child process) against the simulator: throughput, CPU per
    /// envelope, ack latency, resident memory; or handovers.
    Bench(BenchArgs),
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Envelopes to send.
    #[arg(long, default_value_t = 100_000)]
    pub envelopes: u64,
    /// Envelopes in flight (sent, not yet acked) at most.
    #[arg(long, default_value_t = 64)]
    pub window: usize,
    /// Envelopes per second; without it, as fast as flowcoach acks them (within the
    /// window). Ack latency is best read at a steady rate (10, 100 per second). With
    /// --handovers: the rate of the stream, 200 per second by default.
    #[arg(long, value_name = "PER_SECOND")]
    pub rate: Option<f64>,
    /// Drop the first connection and start the stream on its replacement.
    #[arg(long, conflicts_with = "handovers")]
    pub after_reconnect: bool,
    /// Forward every envelope (`[forward]`) to a no-op app in HTTP mode run by the bench:
    /// the cost of signing, sending and waiting for the app's 200 before the ack.
    #[arg(long, conflicts_with = "handovers")]
    pub forward: bool,
    /// Turn the durable inbox off (`[inbox] enabled = false`): events are acked on accept
    /// instead of once on disk. With it on (the default), it lives in a temporary
    /// directory under $TMPDIR: on the disk to measure.
    #[arg(long, conflicts_with = "handovers")]
    pub no_inbox: bool,
    /// Keep the inbox in PostgreSQL instead (`[cluster]`), as the members of a cluster do:
    /// a server of the bench's own, from the distribution's server package, in a
    /// temporary directory, reached over loopback TCP with a password. Events are acked
    /// once committed there.
    #[arg(long, conflicts_with_all = ["handovers", "no_inbox"])]
    pub postgres: bool,
    /// Turn the Prometheus endpoint on (`[metrics] listen`) and scrape it every second
    /// during the run, as Prometheus would: the cost of the metrics.
    #[arg(long, conflicts_with = "handovers")]
    pub metrics: bool,
    /// Measure handovers instead: this many `flowcoachctl handover`s in a row under a
    /// steady event stream (time to complete, time with no socket open, envelopes lost or
    /// handled twice).
    #[arg(long, value_name = "N")]
    pub handovers: Option<u32>,
    /// With --handovers: break before make (`[handover] strict = true`).
    #[arg(long, requires = "handovers")]
    pub strict: bool,
    /// Measure dropped connections instead: this many TCP resets of one socket, each after
    /// the connections proved stable (time from the drop to the replacement's hello, time
    /// with no socket open).
    #[arg(long, value_name = "N", conflicts_with_all = ["handovers", "storm"])]
    pub drops: Option<u32>,
    /// With --drops: the sockets flowcoach keeps open (`[connection] sockets`).
    #[arg(long, default_value_t = 1, requires = "drops")]
    pub sockets: usize,
    /// Measure a Slack that answers every hello with a disconnect instead, for this many
    /// seconds (calls to apps.connections.open a minute).
    #[arg(long, value_name = "SECONDS", conflicts_with = "handovers")]
    pub storm: Option<u64>,
    /// Compare instead, for this many seconds of mentions: the Bolt for Python example in
    /// Socket Mode with its own SocketModeHandler, and in HTTP mode behind flowcoach, against
    /// a Slack that rotates and drops connections (acks past the deadline, events handled
    /// twice, ack p99). With --rate: mentions per second, 20 by default.
    #[arg(long, value_name = "SECONDS", conflicts_with_all = ["handovers", "drops", "storm", "forward", "after_reconnect"])]
    pub bolt_compare: Option<u64>,
    /// With --storm: the disconnect reason.
    #[arg(long, default_value = "refresh_requested", requires = "storm")]
    pub storm_reason: String,
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
    /// Mention the app's bot (an `app_mention` event) this often, for a bot behind
    /// flowcoach (`flowcoach-dev app`) to answer.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub mention_every: Option<Duration>,
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// How long the demo runs before stopping flowcoach with SIGTERM.
    #[arg(long, default_value = "12s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.tool, Tool::Demo(_) | Tool::Bench(_))
        && let Err(error) = build_the_daemon()
    {
        eprintln!("flowcoach-dev: {error}");
        return ExitCode::FAILURE;
    }
    match cli.tool {
        Tool::Sim(args) => sim::run(&args),
        Tool::App => app::run(),
        Tool::Demo(args) => demo::run(&args),
        Tool::Bench(args) => bench::run(&args),
    }
}

/// Under `cargo run`, builds `flowcoach` and `flowcoachctl` with this binary's profile
/// first, so that one command runs the demo or a benchmark on the current source: cargo
/// builds only the package it runs. Run on its own, the binaries beside it are used.
fn build_the_daemon() -> Result<(), String> {
    if std::env::var_os("CARGO").is_none() {
        return Ok(());
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let profile: &[&str] = if cfg!(debug_assertions) {
        &[]
    } else {
        &["--release"]
    };
    let args = [profile, &["--package", "flowcoach", "--bins"]].concat();
    let status = flowcoach_harness::cargo::build(&workspace, &args)
        .map_err(|error| format!("cannot run cargo build: {error}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("cargo build of the daemon failed ({status})"))
    }
}

/// The tools run the simulator on a multi-threaded runtime of their own: the child
/// process is measured, not this one.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}
