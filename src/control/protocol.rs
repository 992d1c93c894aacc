//! The control protocol, one set of types for the daemon and `flowcoachctl`.
//!
//! A unix stream socket carries one request and one response, each a single line of JSON
//! ending in `\n` and at most [`MAX_MESSAGE_BYTES`] long; then the daemon closes the
//! connection. For example:
//!
//! ```text
//! → {"version":1,"command":"health"}
//! ← {"response":"health","health":{"health":"healthy"},"phase":"connected"}
//! ```
//!
//! Stable across protocol versions, so that mismatched releases can say so: the `version`
//! field of a request and the `error` response (`message`, and `protocol`, the version the
//! daemon speaks, when it rejects a request's version).

use serde::{Deserialize, Serialize};

use crate::health::Health;
use crate::state::{CounterSnapshot, Phase};

/// The protocol this build speaks. Raise it when a change is not backwards compatible.
pub const PROTOCOL_VERSION: u32 = 1;

/// Longest request or response line, newline included.
pub const MAX_MESSAGE_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub version: u32,
    #[serde(flatten)]
    pub command: Command,
}

impl Request {
    /// A request in this build's protocol version.
    pub fn new(command: Command) -> Self {
        Request {
            version: PROTOCOL_VERSION,
            command,
        }
    }
}

/// What a client asks for. New commands (with their own fields) become new variants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Command {
    /// The full [`StatusReport`].
    Status,
    /// Only the health judgement, for health checks.
    Health,
    /// The Prometheus exposition the `/metrics` endpoint serves, for hosts without
    /// Prometheus (`flowcoachctl metrics`); OpenMetrics when `openmetrics` is set.
    Metrics {
        #[serde(default)]
        openmetrics: bool,
    },
    /// Start a successor from the binary on disk and hand the app over to it
    /// (`flowcoachctl handover`, `systemctl reload`). Answered when it is done.
    Handover,
    /// Sent by a successor (`flowcoach --takeover`): the connection becomes a handover
    /// session (see `crate::handover`).
    Takeover { pid: u32, release: String },
    /// The inbox's counts: [`Response::Inbox`].
    Inbox,
    /// The envelopes in the inbox, oldest first: the dead letters, or the others.
    InboxList {
        dead: bool,
        /// With each envelope as received (it may hold user content).
        payload: bool,
        limit: u32,
    },
    /// Makes a dead letter (`id`), or every one (`None`), pending again.
    InboxRetry { id: Option<i64> },
    /// Removes an envelope for good.
    InboxDrop { id: i64 },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "snake_case")]
pub enum Response {
    Status(Box<StatusReport>),
    Health(HealthReport),
    Metrics {
        exposition: String,
    },
    /// The handover is done: `successor_pid` holds the app now.
    HandedOver {
        successor_pid: u32,
        took_ms: u64,
    },
    /// A takeover request was accepted; the session continues with handover steps.
    TakeoverAccepted {
        strict: bool,
        timeout_ms: u64,
        /// The incumbent's open sockets, which Slack counts in the successor's hellos
        /// until the incumbent has closed them (one, from releases that did not say).
        #[serde(default = "one_socket")]
        sockets: u32,
    },
    Inbox(InboxReport),
    /// Cut short (`truncated`) when the whole list would not fit in one answer.
    InboxList {
        envelopes: Vec<InboxEntry>,
        truncated: bool,
    },
    /// How many envelopes a retry or a drop changed.
    InboxChanged {
        count: u64,
    },
    Error {
        message: String,
        /// Set when the request's protocol version was rejected: the version this daemon
        /// speaks.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        protocol: Option<u32>,
    },
}

fn one_socket() -> u32 {
    1
}

impl Response {
    pub fn error(message: impl Into<String>) -> Self {
        Response::Error {
            message: message.into(),
            protocol: None,
        }
    }

    /// The answer to a request in protocol `requested`, which this daemon does not speak.
    pub fn version_mismatch(requested: u32) -> Self {
        Response::Error {
            message: version_mismatch_message(requested, PROTOCOL_VERSION),
            protocol: Some(PROTOCOL_VERSION),
        }
    }
}

/// What to tell someone whose `flowcoachctl` and daemon speak different protocols.
pub fn version_mismatch_message(client: u32, daemon: u32) -> String {
    format!(
        "flowcoachctl speaks protocol {client}, this daemon {daemon}: use the flowcoachctl of the same release"
    )
}

/// Everything `flowcoachctl status` shows. Times are unix seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub pid: u32,
    pub host: String,
    /// The daemon's crate version.
    pub version: String,
    pub environment: String,
    /// The app ID from the latest `hello`.
    pub app_id: Option<String>,
    /// The lifecycle phase in words, e.g. "reconnecting in 4.2s after warning".
    pub phase: String,
    /// The lifecycle phase as one word: starting, connecting, connected, reconnecting,
    /// draining, stopped.
    pub phase_name: String,
    pub started_at: u64,
    pub uptime_s: u64,
    pub connected_since: Option<u64>,
    /// Sockets this instance holds open (two during a rotation).
    pub sockets_open: u32,
    /// Slack's count of the app's open sockets, other clients included.
    pub num_connections: Option<u32>,
    pub reconnects: u64,
    pub rotations: u64,
    pub last_disconnect: Option<String>,
    /// Why new connections are paced: Slack keeps ending them before they stay up.
    #[serde(default)]
    pub pacing: Option<String>,
    /// The step of a handover in progress.
    #[serde(default)]
    pub handover: Option<String>,
    pub counters: CounterSnapshot,
    /// Where the token came from (a variable or file name, never the token).
    pub token_source: String,
    pub health: Health,
    /// `[forward]`: the app's URL(s); none with the built-in bot.
    #[serde(default)]
    pub app_url: Option<String>,
    /// `[forward]`: the app's latest failure.
    #[serde(default)]
    pub app_last_error: Option<String>,
    /// The inbox's depth as of its latest count (none with the inbox off).
    #[serde(default)]
    pub inbox: Option<InboxReport>,
    /// `[cluster]`: the members as of the latest heartbeat.
    #[serde(default)]
    pub cluster: Option<ClusterReport>,
}

/// A cluster as one member sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterReport {
    pub name: String,
    /// Where the shared store is: no password.
    pub store: String,
    /// This member's name.
    pub member: String,
    /// The live members, this one included, by name.
    pub members: Vec<MemberReport>,
    /// Why heartbeats fail, until one succeeds.
    pub trouble: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberReport {
    pub name: String,
    pub host: String,
    pub pid: u32,
    pub version: String,
    pub sockets: u32,
    /// healthy, degraded or unhealthy.
    pub health: String,
    pub health_reason: Option<String>,
    /// The heartbeat's age now, as the latest read found it plus the time since.
    pub heartbeat_age_ms: u64,
}

/// The inbox's depth.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxReport {
    /// The database file.
    pub path: String,
    pub pending: u64,
    pub delivering: u64,
    pub dead: u64,
    /// How long the oldest envelope not yet delivered has waited.
    pub oldest_pending_age_s: Option<u64>,
}

/// One envelope in the inbox, for `flowcoachctl inbox list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InboxEntry {
    /// The inbox's own id, for `inbox retry` and `inbox drop`.
    pub id: i64,
    pub envelope_id: String,
    pub kind: String,
    pub event_type: Option<String>,
    /// pending, delivering or dead.
    pub state: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub age_s: u64,
    /// The envelope as received, only when asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthReport {
    pub health: Health,
    /// The lifecycle phase in words.
    pub phase: String,
}

/// The machine-friendly name of a phase.
pub fn phase_name(phase: &Phase) -> &'static str {
    match phase {
        Phase::Starting => "starting",
        Phase::Connecting => "connecting",
        Phase::Connected => "connected",
        Phase::Reconnecting { .. } => "reconnecting",
        Phase::Draining => "draining",
        Phase::Stopped => "stopped",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_flat_json_lines() {
        let request = Request::new(Command::Status);
        let text = serde_json::to_string(&request).unwrap();
        assert_eq!(text, r#"{"version":1,"command":"status"}"#);
        let back: Request = serde_json::from_str(r#"{"command":"health","version":1}"#).unwrap();
        assert_eq!(back, Request::new(Command::Health));
    }

    #[test]
    fn unknown_commands_are_rejected_by_name() {
        let error = serde_json::from_str::<Request>(r#"{"version":1,"command":"reboot"}"#)
            .unwrap_err()
            .to_string();
        assert!(error.contains("reboot"), "{error}");
    }

    #[test]
    fn responses_round_trip() {
        let report = StatusReport {
            pid: 7,
            host: "h".into(),
            version: "0.1.0".into(),
            environment: "prod".into(),
            app_id: Some("A1".into()),
            phase: "connected".into(),
            phase_name: "connected".into(),
            started_at: 1,
            uptime_s: 2,
            connected_since: Some(3),
            sockets_open: 1,
            num_connections: Some(1),
            reconnects: 4,
            rotations: 5,
            last_disconnect: None,
            pacing: Some("paced".into()),
            handover: None,
            counters: CounterSnapshot {
                envelopes_received: 9,
                in_flight: 1,
                ..CounterSnapshot::default()
            },
            token_source: "SLACK_APP_TOKEN".into(),
            health: Health::Degraded("why".into()),
            app_url: Some("http://127.0.0.1:3000/slack/events".into()),
            app_last_error: None,
            inbox: None,
            cluster: Some(ClusterReport {
                name: "it".into(),
                store: "postgres://flow@db/flowcoach".into(),
                member: "m1".into(),
                members: vec![MemberReport {
                    name: "m1".into(),
                    host: "h".into(),
                    pid: 7,
                    version: "0.1.0".into(),
                    sockets: 1,
                    health: "healthy".into(),
                    health_reason: None,
                    heartbeat_age_ms: 300,
                }],
                trouble: None,
            }),
        };
        for response in [
            Response::Status(Box::new(report)),
            Response::Health(HealthReport {
                health: Health::Healthy,
                phase: "connected".into(),
            }),
            Response::error("no"),
            Response::version_mismatch(2),
        ] {
            let text = serde_json::to_string(&response).unwrap();
            assert!(!text.contains('\n'));
            let back: Response = serde_json::from_str(&text).unwrap();
            assert_eq!(back, response, "{text}");
        }
    }

    #[test]
    fn an_incumbent_that_does_not_count_its_sockets_has_one() {
        let older = r#"{"response":"takeover_accepted","strict":false,"timeout_ms":30000}"#;
        let parsed: Response = serde_json::from_str(older).unwrap();
        assert_eq!(
            parsed,
            Response::TakeoverAccepted {
                strict: false,
                timeout_ms: 30000,
                sockets: 1
            }
        );
    }

    #[test]
    fn a_version_mismatch_names_both_versions() {
        let Response::Error { message, protocol } = Response::version_mismatch(2) else {
            panic!("not an error");
        };
        assert_eq!(protocol, Some(PROTOCOL_VERSION));
        assert_eq!(
            message,
            "flowcoachctl speaks protocol 2, this daemon 1: use the flowcoachctl of the same release"
        );
    }

    #[test]
    fn phase_names_are_single_words() {
        let phase = Phase::Reconnecting {
            delay: std::time::Duration::from_secs(1),
            cause: "warning".into(),
        };
        assert_eq!(phase_name(&phase), "reconnecting");
        assert_eq!(phase_name(&Phase::Connected), "connected");
    }
}
