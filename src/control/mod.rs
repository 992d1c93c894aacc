//! The control socket: a small JSON-lines protocol over a unix socket through which
//! `flowcoachctl` (and container health checks) ask a running daemon for its status and
//! health.
//!
//! The daemon's side, in order:
//!
//! 1. in `main`, before the runtime starts: [`server::from_systemd`] (socket activation);
//! 2. otherwise, while holding the instance lock: [`server::bind`];
//! 3. a [`ControlContext`] with the [`access::AccessPolicy`] that `Config::load` resolved
//!    from `control.group`;
//! 4. `tokio::spawn(`[`server::serve`]`(listener, ctx, shutdown))`.
//!
//! The client's side: [`discover`] finds the socket, [`client::request`] asks,
//! [`ctl`] runs `flowcoachctl`'s commands.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::state::InstanceState;

pub mod access;
pub mod cli;
pub mod client;
pub mod ctl;
pub mod discover;
mod inbox;
mod listen;
pub mod protocol;
mod render;
mod report;
pub mod server;

/// What the control server answers from.
#[derive(Debug)]
pub struct ControlContext {
    pub state: Arc<InstanceState>,
    /// The metrics, for `flowcoachctl metrics`.
    pub exposition: Arc<crate::metrics::Exposition>,
    /// Where the current token came from (`Config::token_source`), for status output:
    /// a reload that finds the token elsewhere sends the new place here.
    pub token_source: tokio::sync::watch::Receiver<String>,
    /// When the daemon started, for `started_at` and uptime.
    pub started_at: SystemTime,
    /// `service.outage_budget`: how long an outage is degraded before it is unhealthy.
    pub outage_budget: Duration,
    /// Who may ask.
    pub access: access::AccessPolicy,
    /// Where handover requests go; `None` refuses them.
    pub handover: Option<tokio::sync::mpsc::Sender<server::HandoverCall>>,
    /// The inbox, for `flowcoachctl inbox`; `None` with the inbox off.
    pub inbox: Option<Arc<crate::inbox::Inbox>>,
}
