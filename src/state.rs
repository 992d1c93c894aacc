//! What the instance is doing right now: lifecycle phase, connection facts and counters,
//! shared by the supervisor, the dispatcher, the built-in handlers, the control socket and
//! the systemd notifications.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::metrics::labels::{
    ByLabel, DisconnectLabel, EnvelopeType, HandoverOutcome, OpenOutcome, ReconnectCause,
};
use crate::metrics::timings::Timings;

/// The lifecycle: `starting → connecting → connected ⇄ reconnecting → draining → stopped`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    Starting,
    Connecting,
    Connected,
    /// Waiting `delay` before the next connect because of `cause`.
    Reconnecting {
        #[serde(with = "humantime_serde")]
        delay: Duration,
        cause: String,
    },
    Draining,
    Stopped,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Phase::Starting => f.write_str("starting"),
            Phase::Connecting => f.write_str("connecting"),
            Phase::Connected => f.write_str("connected"),
            Phase::Reconnecting { delay, cause } => {
                write!(
                    f,
                    "reconnecting in {:.1}s after {cause}",
                    delay.as_secs_f64()
                )
            }
            Phase::Draining => f.write_str("draining"),
            Phase::Stopped => f.write_str("stopped"),
        }
    }
}

/// Facts about the Slack connection that change over time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectionStatus {
    pub phase: Phase,
    /// The app ID from the latest `hello`.
    pub app_id: Option<String>,
    pub connected_since: Option<SystemTime>,
    /// Sockets this instance holds open (two during a rotation).
    pub sockets_open: u32,
    /// `hello.num_connections`: every open socket of the app, other clients included.
    pub num_connections: Option<u32>,
    /// Sockets of other clients at the latest hello: `num_connections` less ours and less
    /// a predecessor's we are taking over from.
    pub other_connections: Option<u32>,
    pub last_disconnect: Option<String>,
    /// When the current outage began: set when a connection that had said hello is lost,
    /// cleared by the next hello. Drives health and the watchdog's outage budget.
    pub down_since: Option<SystemTime>,
    /// `too_many_websockets` answers since the last hello.
    pub too_many_in_a_row: u32,
    /// A diagnosed conflict with other clients of the app (health: unhealthy).
    pub conflict: Option<String>,
    /// Why new connections are paced rather than opened at once: Slack keeps ending them
    /// before they stay up (a rotation or reconnect storm). Cleared once they stay up.
    pub pacing: Option<String>,
    /// The step of a handover in progress, in words (`handing over to pid 4243: waiting
    /// for its hello`).
    pub handover: Option<String>,
    /// `[forward]`: the app's URL(s), no secrets.
    pub app_url: Option<String>,
    /// Why the app's latest exchange failed, until one succeeds (health: degraded).
    pub app_failing: Option<String>,
    /// The app's latest failure, kept after it recovered.
    pub app_last_error: Option<String>,
    /// Why the inbox cannot store envelopes, until it can again.
    pub inbox_trouble: Option<InboxTrouble>,
    /// The inbox's depth as of its latest count, and how old its oldest pending envelope
    /// may be before health is degraded (`inbox.stale_after`).
    pub inbox: Option<(crate::inbox::Counts, Duration)>,
    /// `[cluster]`: the members as of the latest heartbeat.
    pub cluster: Option<crate::cluster::ClusterView>,
}

impl Default for ConnectionStatus {
    fn default() -> Self {
        ConnectionStatus {
            phase: Phase::Starting,
            app_id: None,
            connected_since: None,
            sockets_open: 0,
            num_connections: None,
            other_connections: None,
            last_disconnect: None,
            down_since: None,
            too_many_in_a_row: 0,
            conflict: None,
            pacing: None,
            handover: None,
            app_url: None,
            app_failing: None,
            app_last_error: None,
            inbox_trouble: None,
            inbox: None,
            cluster: None,
        }
    }
}

/// Why the inbox cannot store envelopes: what kind of trouble, and the whole sentence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InboxTrouble {
    pub trouble: crate::inbox::Trouble,
    pub reason: String,
}

impl InboxTrouble {
    /// A shared store that cannot be reached (PostgreSQL restarting or failing over) comes
    /// back by itself and stops every member alike: health is degraded. A local disk that
    /// is full, read-only or broken needs an operator: unhealthy.
    pub fn passes_by_itself(&self) -> bool {
        self.trouble == crate::inbox::Trouble::Unreachable
    }
}

/// Monotonic counters, the one record of each figure: `status` reads their totals, the
/// metrics endpoint every labelled value. Relaxed atomics: each is read on its own.
#[derive(Debug, Default)]
pub struct Counters {
    pub envelopes_received: ByLabel<EnvelopeType>,
    pub envelopes_acked: ByLabel<EnvelopeType>,
    pub envelopes_deduplicated: ByLabel<EnvelopeType>,
    /// Left unacked because the handler queue was full; Slack redelivers them.
    pub envelopes_deferred: ByLabel<EnvelopeType>,
    pub handler_errors: AtomicU64,
    /// Handler answers that came after the response deadline (acked without payload).
    pub late_responses: AtomicU64,
    /// Acks that could not be sent (socket already gone or ack too large).
    pub acks_failed: AtomicU64,
    pub frames_malformed: AtomicU64,
    pub frames_unknown: AtomicU64,
    pub frames_binary: AtomicU64,
    pub frames_oversized: AtomicU64,
    pub connects: AtomicU64,
    pub reconnects: ByLabel<ReconnectCause>,
    pub rotations: AtomicU64,
    /// `disconnect` messages from Slack, by reason.
    pub disconnects: ByLabel<DisconnectLabel>,
    /// `too_many_websockets` refusals, at connect time or as a disconnect.
    pub too_many_websockets: AtomicU64,
    /// `apps.connections.open` calls, by outcome.
    pub connection_opens: ByLabel<OpenOutcome>,
    /// Handovers: completed ones counted by the successor, failed ones by the incumbent
    /// (each by the process that lives on).
    pub handovers: ByLabel<HandoverOutcome>,
    pub in_flight: AtomicU64,
    /// `[forward]`: envelopes the app took (2xx).
    pub forwarded: AtomicU64,
    /// `[forward]`: envelopes the app did not take (unreachable, non-2xx, timeout, …).
    pub forward_failed: AtomicU64,
}

/// A point-in-time copy of the counters. A counter a daemon does not report reads 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct CounterSnapshot {
    pub envelopes_received: u64,
    pub envelopes_acked: u64,
    pub envelopes_deduplicated: u64,
    pub envelopes_deferred: u64,
    pub handler_errors: u64,
    pub late_responses: u64,
    pub acks_failed: u64,
    pub frames_malformed: u64,
    pub frames_unknown: u64,
    pub frames_binary: u64,
    pub frames_oversized: u64,
    pub connects: u64,
    pub reconnects: u64,
    pub rotations: u64,
    pub in_flight: u64,
    pub forwarded: u64,
    pub forward_failed: u64,
}

impl Counters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> CounterSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CounterSnapshot {
            envelopes_received: self.envelopes_received.total(),
            envelopes_acked: self.envelopes_acked.total(),
            envelopes_deduplicated: self.envelopes_deduplicated.total(),
            envelopes_deferred: self.envelopes_deferred.total(),
            handler_errors: get(&self.handler_errors),
            late_responses: get(&self.late_responses),
            acks_failed: get(&self.acks_failed),
            frames_malformed: get(&self.frames_malformed),
            frames_unknown: get(&self.frames_unknown),
            frames_binary: get(&self.frames_binary),
            frames_oversized: get(&self.frames_oversized),
            connects: get(&self.connects),
            reconnects: self.reconnects.total(),
            rotations: get(&self.rotations),
            in_flight: get(&self.in_flight),
            forwarded: get(&self.forwarded),
            forward_failed: get(&self.forward_failed),
        }
    }
}

/// Who this instance is, for answers like `/flowcoach status`.
#[derive(Debug, Clone, Serialize)]
pub struct InstanceInfo {
    pub host: String,
    pub pid: u32,
    pub environment: String,
    pub version: &'static str,
}

impl InstanceInfo {
    pub fn current(environment: &str) -> Self {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "unknown-host".to_owned());
        InstanceInfo {
            host,
            pid: std::process::id(),
            environment: environment.to_owned(),
            version: env!("CARGO_PKG_VERSION"),
        }
    }
}

/// The shared state of one service instance.
#[derive(Debug)]
pub struct InstanceState {
    pub instance: InstanceInfo,
    pub counters: Counters,
    /// Latency histograms, for the metrics endpoint.
    pub timings: Timings,
    /// Sockets of a predecessor this instance is taking over from: Slack counts them in
    /// `hello.num_connections`, but they are not another client.
    pub predecessor_sockets: std::sync::atomic::AtomicU32,
    /// `[cluster]`: the sockets Slack may count for the other live members, as of the
    /// latest heartbeat; not another client's either.
    pub member_sockets: std::sync::atomic::AtomicU32,
    status: watch::Sender<ConnectionStatus>,
}

impl InstanceState {
    pub fn new(instance: InstanceInfo) -> Self {
        InstanceState {
            instance,
            counters: Counters::default(),
            timings: Timings::default(),
            predecessor_sockets: std::sync::atomic::AtomicU32::new(0),
            member_sockets: std::sync::atomic::AtomicU32::new(0),
            status: watch::Sender::new(ConnectionStatus::default()),
        }
    }

    pub fn status(&self) -> ConnectionStatus {
        self.status.borrow().clone()
    }

    /// Changes of the connection status, for STATUS= notifications and tests.
    pub fn subscribe(&self) -> watch::Receiver<ConnectionStatus> {
        self.status.subscribe()
    }

    pub fn update(&self, change: impl FnOnce(&mut ConnectionStatus)) {
        self.status.send_if_modified(|status| {
            let before = status.clone();
            change(status);
            *status != before
        });
    }

    pub fn set_phase(&self, phase: Phase) {
        self.update(|status| status.phase = phase);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_read_as_words() {
        let phase = Phase::Reconnecting {
            delay: Duration::from_millis(4200),
            cause: "too_many_websockets".into(),
        };
        assert_eq!(
            phase.to_string(),
            "reconnecting in 4.2s after too_many_websockets"
        );
        assert_eq!(Phase::Connected.to_string(), "connected");
    }

    #[test]
    fn updates_notify_only_on_change() {
        let state = InstanceState::new(InstanceInfo::current("test"));
        let mut changes = state.subscribe();
        state.set_phase(Phase::Starting);
        assert!(!changes.has_changed().unwrap());
        state.set_phase(Phase::Connecting);
        assert!(changes.has_changed().unwrap());
        assert_eq!(changes.borrow_and_update().phase, Phase::Connecting);
    }
}
