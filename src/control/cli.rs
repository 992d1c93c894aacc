//! flowcoachctl's command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

/// flowcoachctl: talk to a running flowcoach over its control socket.
#[derive(Debug, Parser)]
#[command(name = "flowcoachctl", version, about)]
pub struct CtlCli {
    /// The control socket (also FLOWCOACH_CONTROL_SOCKET); by default the one socket in
    /// the runtime directory.
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Talk to the instance of this environment when several run.
    #[arg(long = "env", global = true, value_name = "NAME")]
    pub environment: Option<String>,
    /// Talk to the instance of this Slack app when several run.
    #[arg(long, global = true, value_name = "ID")]
    pub app: Option<String>,
    /// Give up when the daemon has not answered within this long [default: 5s; for
    /// handover 2m].
    #[arg(long, global = true, value_parser = humantime::parse_duration)]
    pub timeout: Option<Duration>,
    #[command(subcommand)]
    pub command: CtlCommand,
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Show what the daemon is doing: connection, counters, health.
    Status {
        /// Print the full status report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print the health; exit 0 when healthy, 1 when degraded or unhealthy, 2 when no
    /// daemon answers (for container health checks).
    Health,
    /// Print the metrics in the Prometheus text format, as the `/metrics` endpoint serves
    /// them (which need not be on).
    Metrics {
        /// Print OpenMetrics instead.
        #[arg(long)]
        openmetrics: bool,
    },
    /// Hand the app over to a successor started from the binary on disk (an upgrade takes
    /// effect), with no gap: exit 0 once it holds the app, non-zero with the reason when
    /// the handover was rolled back and the running instance kept serving.
    Handover,
}
