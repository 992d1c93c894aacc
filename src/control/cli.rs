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
    /// The durable inbox: how many envelopes wait (pending, being delivered, dead
    /// letters) and for how long; `list`, `retry` and `drop` them.
    Inbox {
        #[command(subcommand)]
        action: Option<InboxAction>,
    },
}

#[derive(Debug, Subcommand)]
pub enum InboxAction {
    /// List the envelopes waiting, oldest first: inbox id, state, kind, event type,
    /// envelope id, attempts, age, last error. No payloads unless --payload.
    List {
        /// The dead letters instead: envelopes not delivered within inbox.max_age.
        #[arg(long)]
        dead: bool,
        /// Show each envelope as received (it holds what users wrote).
        #[arg(long)]
        payload: bool,
        /// Show at most this many.
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Deliver a dead letter again (by its inbox id), or every dead letter (--dead).
    Retry {
        #[arg(required_unless_present = "dead", conflicts_with = "dead")]
        id: Option<i64>,
        #[arg(long)]
        dead: bool,
    },
    /// Remove an envelope from the inbox for good (by its inbox id).
    Drop { id: i64 },
}
