//! Socket Mode wire types: the frames Slack sends and the acks we send back.
//!
//! Inbound frames are parsed in one pass into [`RawFrame`] (every field optional) and then
//! classified, so that an unknown `type` or a missing field is a value we can log and count,
//! never a crash. Payloads stay as raw JSON until a handler asks for them.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use serde_json::value::RawValue;

/// Acks of 20 KB or more have been seen to be dropped silently by Slack (slack-go), so we
/// refuse to send them rather than lose the response without a trace.
pub const MAX_ACK_BYTES: usize = 20_000;

/// The first frame on every connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Open sockets of this app, counting other processes, other hosts and stale sockets.
    /// Slack's SDKs do not require it, nor `connection_info`: a bare hello is accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_info: Option<ConnectionInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub debug_info: Option<DebugInfo>,
}

impl Hello {
    /// The app Slack says this socket belongs to, if it says.
    pub fn app_id(&self) -> Option<&str> {
        self.connection_info.as_ref().map(|c| c.app_id.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionInfo {
    pub app_id: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebugInfo {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_number: Option<u64>,
    /// Seconds until Slack expects to refresh this connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approximate_connection_time: Option<u64>,
}

/// The kinds of envelope Slack delivers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvelopeKind {
    EventsApi,
    SlashCommands,
    Interactive,
}

impl EnvelopeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EnvelopeKind::EventsApi => "events_api",
            EnvelopeKind::SlashCommands => "slash_commands",
            EnvelopeKind::Interactive => "interactive",
        }
    }

    fn parse(kind: &str) -> Option<Self> {
        match kind {
            "events_api" => Some(EnvelopeKind::EventsApi),
            "slash_commands" => Some(EnvelopeKind::SlashCommands),
            "interactive" => Some(EnvelopeKind::Interactive),
            _ => None,
        }
    }
}

/// One envelope as Slack sends it. The simulator serialises this same type.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Envelope {
    pub envelope_id: String,
    #[serde(rename = "type")]
    pub kind: EnvelopeKind,
    #[serde(default)]
    pub accepts_response_payload: bool,
    pub payload: Box<RawValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_attempt: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_reason: Option<String>,
}

/// The fields of a payload that routing, deduplication and logging need.
#[derive(Debug, Default, Deserialize)]
pub struct PayloadSummary {
    /// Identifies an Events API event across redeliveries.
    pub event_id: Option<String>,
    /// Absent for e.g. `app_rate_limited`.
    pub event: Option<EventSummary>,
    /// Slash commands: `/flowcoach`.
    pub command: Option<String>,
    pub text: Option<String>,
    /// Interactive payloads: `block_actions`, `view_submission`, …; events_api: `event_callback`.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub channel_id: Option<String>,
    pub user_id: Option<String>,
    pub user: Option<UserRef>,
    pub channel: Option<ChannelRef>,
}

#[derive(Debug, Default, Deserialize)]
pub struct EventSummary {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub channel: Option<String>,
    pub user: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct UserRef {
    pub id: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct ChannelRef {
    pub id: Option<String>,
}

impl Envelope {
    /// Reads the routing fields from the payload. A payload that is not an object (or has
    /// fields of unexpected types) yields an empty summary: routing falls back to the
    /// envelope id.
    pub fn summary(&self) -> PayloadSummary {
        serde_json::from_str(self.payload.get()).unwrap_or_default()
    }
}

impl PayloadSummary {
    pub fn channel(&self) -> Option<&str> {
        self.event
            .as_ref()
            .and_then(|e| e.channel.as_deref())
            .or(self.channel_id.as_deref())
            .or(self.channel.as_ref().and_then(|c| c.id.as_deref()))
    }

    pub fn user(&self) -> Option<&str> {
        self.event
            .as_ref()
            .and_then(|e| e.user.as_deref())
            .or(self.user_id.as_deref())
            .or(self.user.as_ref().and_then(|u| u.id.as_deref()))
    }
}

/// `{"type":"disconnect","reason":…}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disconnect {
    pub reason: String,
}

/// Disconnect reasons, each handled on its own terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectReason {
    /// Slack will refresh this connection in about 10 s.
    Warning,
    /// Routine rotation: reconnect now.
    RefreshRequested,
    /// Socket Mode was switched off in the app's settings.
    LinkDisabled,
    /// The app already has the maximum of open sockets.
    TooManyWebsockets,
    Other(String),
}

impl DisconnectReason {
    pub fn parse(reason: &str) -> Self {
        match reason {
            "warning" => DisconnectReason::Warning,
            "refresh_requested" => DisconnectReason::RefreshRequested,
            "link_disabled" => DisconnectReason::LinkDisabled,
            "too_many_websockets" => DisconnectReason::TooManyWebsockets,
            other => DisconnectReason::Other(other.to_owned()),
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            DisconnectReason::Warning => "warning",
            DisconnectReason::RefreshRequested => "refresh_requested",
            DisconnectReason::LinkDisabled => "link_disabled",
            DisconnectReason::TooManyWebsockets => "too_many_websockets",
            DisconnectReason::Other(other) => other,
        }
    }
}

/// A classified inbound text frame.
#[derive(Debug)]
pub enum Inbound {
    Hello(Hello),
    Envelope(Envelope),
    Disconnect(DisconnectReason),
}

/// Why an inbound text frame could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame is not valid JSON: {0}")]
    Malformed(#[source] serde_json::Error),
    #[error("frame has no \"type\" field")]
    MissingType,
    #[error("unknown frame type {kind:?}")]
    UnknownType {
        kind: String,
        /// Present when the frame looks like an envelope of a type we do not know: it can
        /// still be acked so Slack does not redeliver what we cannot handle.
        envelope_id: Option<String>,
    },
    #[error("{kind} frame is missing {field:?}")]
    MissingField {
        kind: &'static str,
        field: &'static str,
    },
    /// Valid JSON, but a field that is a string in every Slack frame is something else.
    #[error("{field} must be a string")]
    NotAString { field: &'static str },
    /// An envelope whose payload is missing or null: there is nothing to handle, and a
    /// redelivery would bring nothing more, so it can still be acked.
    #[error("{kind} envelope {envelope_id} has no payload")]
    NoPayload {
        kind: &'static str,
        envelope_id: String,
    },
}

/// Every field any frame may carry, all optional, so that one parse classifies any frame.
#[derive(Deserialize)]
struct RawFrame {
    /// The two identifying fields are read as any JSON value, so that one of another type
    /// is reported by name rather than as a frame that is not JSON.
    #[serde(rename = "type")]
    kind: Option<Value>,
    envelope_id: Option<Value>,
    #[serde(default)]
    accepts_response_payload: bool,
    payload: Option<Box<RawValue>>,
    retry_attempt: Option<u32>,
    retry_reason: Option<String>,
    num_connections: Option<u32>,
    connection_info: Option<ConnectionInfo>,
    debug_info: Option<Box<RawValue>>,
    reason: Option<String>,
}

/// Parses and classifies one inbound text frame.
pub fn parse_inbound(text: &str) -> Result<Inbound, FrameError> {
    let raw: RawFrame = serde_json::from_str(text).map_err(FrameError::Malformed)?;
    let kind = string_field(raw.kind, "type")?.ok_or(FrameError::MissingType)?;
    let envelope_id = string_field(raw.envelope_id, "envelope_id")?;
    if kind == "hello" {
        // debug_info is informational: a malformed one must not cost us the connection.
        let debug_info = raw
            .debug_info
            .and_then(|d| serde_json::from_str::<DebugInfo>(d.get()).ok());
        return Ok(Inbound::Hello(Hello {
            num_connections: raw.num_connections,
            connection_info: raw.connection_info,
            debug_info,
        }));
    }
    if kind == "disconnect" {
        let reason = raw.reason.unwrap_or_default();
        return Ok(Inbound::Disconnect(DisconnectReason::parse(&reason)));
    }
    let Some(envelope_kind) = EnvelopeKind::parse(&kind) else {
        return Err(FrameError::UnknownType { kind, envelope_id });
    };
    let kind_name = envelope_kind.as_str();
    let envelope_id = envelope_id.ok_or(FrameError::MissingField {
        kind: kind_name,
        field: "envelope_id",
    })?;
    // `null` deserialises to `None` as well.
    let Some(payload) = raw.payload else {
        return Err(FrameError::NoPayload {
            kind: kind_name,
            envelope_id,
        });
    };
    Ok(Inbound::Envelope(Envelope {
        envelope_id,
        kind: envelope_kind,
        accepts_response_payload: raw.accepts_response_payload,
        payload,
        retry_attempt: raw.retry_attempt,
        retry_reason: raw.retry_reason,
    }))
}

/// A field that must be a string when present.
fn string_field(value: Option<Value>, field: &'static str) -> Result<Option<String>, FrameError> {
    match value {
        None => Ok(None),
        Some(Value::String(text)) => Ok(Some(text)),
        Some(_) => Err(FrameError::NotAString { field }),
    }
}

/// The ack we send for an envelope: `{"envelope_id":…}` or with a response `payload`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ack {
    pub envelope_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<serde_json::Value>,
}

#[derive(Debug, thiserror::Error)]
pub enum AckError {
    #[error(
        "ack for envelope {envelope_id} is {size} bytes; Slack silently drops acks of {MAX_ACK_BYTES} bytes or more"
    )]
    TooLarge { envelope_id: String, size: usize },
    #[error("ack could not be serialised: {0}")]
    Serialise(#[from] serde_json::Error),
}

impl Ack {
    /// Serialises the ack, refusing one Slack would drop.
    pub fn to_frame(&self) -> Result<String, AckError> {
        let text = serde_json::to_string(self)?;
        if text.len() >= MAX_ACK_BYTES {
            return Err(AckError::TooLarge {
                envelope_id: self.envelope_id.clone(),
                size: text.len(),
            });
        }
        Ok(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_is_parsed_with_debug_info() {
        let frame = r#"{"type":"hello","num_connections":2,"connection_info":{"app_id":"A123"},
            "debug_info":{"host":"applink-1","build_number":54,"approximate_connection_time":18060}}"#;
        let Inbound::Hello(hello) = parse_inbound(frame).unwrap() else {
            panic!("not a hello")
        };
        assert_eq!(hello.num_connections, Some(2));
        assert_eq!(hello.app_id(), Some("A123"));
        assert_eq!(
            hello.debug_info.unwrap().approximate_connection_time,
            Some(18060)
        );
    }

    #[test]
    fn hello_with_broken_debug_info_still_counts() {
        let frame = r#"{"type":"hello","connection_info":{"app_id":"A1"},"debug_info":7}"#;
        assert!(matches!(parse_inbound(frame), Ok(Inbound::Hello(h)) if h.debug_info.is_none()));
    }

    #[test]
    fn a_bare_hello_is_accepted_without_inventing_a_count() {
        let Inbound::Hello(hello) = parse_inbound(r#"{"type":"hello"}"#).unwrap() else {
            panic!("not a hello")
        };
        assert_eq!(hello.num_connections, None);
        assert_eq!(hello.app_id(), None);
        let frame = r#"{"type":"hello","connection_info":{"app_id":"A1"}}"#;
        let Inbound::Hello(hello) = parse_inbound(frame).unwrap() else {
            panic!("not a hello")
        };
        assert_eq!(hello.num_connections, None);
        assert_eq!(hello.app_id(), Some("A1"));
    }

    #[test]
    fn envelope_keeps_payload_raw_and_summarises_it() {
        let frame = r#"{"envelope_id":"e1","type":"events_api","accepts_response_payload":false,
            "retry_attempt":1,"retry_reason":"timeout",
            "payload":{"event_id":"Ev1","event":{"type":"message","channel":"C1","user":"U1"}}}"#;
        let Inbound::Envelope(env) = parse_inbound(frame).unwrap() else {
            panic!("not an envelope")
        };
        assert_eq!(env.kind, EnvelopeKind::EventsApi);
        assert_eq!(env.retry_attempt, Some(1));
        let summary = env.summary();
        assert_eq!(summary.event_id.as_deref(), Some("Ev1"));
        assert_eq!(summary.channel(), Some("C1"));
        assert_eq!(summary.user(), Some("U1"));
    }

    #[test]
    fn events_api_payload_without_event_is_fine() {
        let frame = r#"{"envelope_id":"e2","type":"events_api","payload":{"type":"app_rate_limited","minute_rate_limited":1}}"#;
        let Inbound::Envelope(env) = parse_inbound(frame).unwrap() else {
            panic!("not an envelope")
        };
        let summary = env.summary();
        assert!(summary.event.is_none());
        assert_eq!(summary.kind.as_deref(), Some("app_rate_limited"));
    }

    #[test]
    fn non_object_payload_gives_an_empty_summary() {
        let frame = r#"{"envelope_id":"e3","type":"interactive","payload":[1,2]}"#;
        let Inbound::Envelope(env) = parse_inbound(frame).unwrap() else {
            panic!("not an envelope")
        };
        assert!(env.summary().event_id.is_none());
    }

    #[test]
    fn bad_frames_are_classified() {
        assert!(matches!(
            parse_inbound("{not json"),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            parse_inbound(r#"{"a":1}"#),
            Err(FrameError::MissingType)
        ));
        assert!(matches!(
            parse_inbound(r#"{"type":"surprise"}"#),
            Err(FrameError::UnknownType { kind, envelope_id: None }) if kind == "surprise"
        ));
        assert!(matches!(
            parse_inbound(r#"{"type":"workflow_step","envelope_id":"e7","payload":{}}"#),
            Err(FrameError::UnknownType { envelope_id: Some(id), .. }) if id == "e7"
        ));
        assert!(matches!(
            parse_inbound(r#"{"type":"events_api","payload":{}}"#),
            Err(FrameError::MissingField {
                field: "envelope_id",
                ..
            })
        ));
        for frame in [
            r#"{"type":"events_api","envelope_id":"x"}"#,
            r#"{"type":"slash_commands","envelope_id":"x","payload":null}"#,
        ] {
            assert!(
                matches!(
                    parse_inbound(frame),
                    Err(FrameError::NoPayload { envelope_id, .. }) if envelope_id == "x"
                ),
                "{frame}"
            );
        }
    }

    #[test]
    fn a_field_of_the_wrong_type_is_named_not_called_bad_json() {
        for (frame, field) in [
            (
                r#"{"type":"events_api","envelope_id":7,"payload":{}}"#,
                "envelope_id",
            ),
            (
                r#"{"type":"events_api","envelope_id":{"id":"e"},"payload":{}}"#,
                "envelope_id",
            ),
            (r#"{"type":5}"#, "type"),
        ] {
            let error = parse_inbound(frame).unwrap_err();
            assert!(
                matches!(error, FrameError::NotAString { field: named } if named == field),
                "{frame}: {error:?}"
            );
            assert_eq!(error.to_string(), format!("{field} must be a string"));
        }
    }

    #[test]
    fn disconnect_reasons_are_classified() {
        for (text, reason) in [
            ("warning", DisconnectReason::Warning),
            ("refresh_requested", DisconnectReason::RefreshRequested),
            ("link_disabled", DisconnectReason::LinkDisabled),
            ("too_many_websockets", DisconnectReason::TooManyWebsockets),
            ("brand_new", DisconnectReason::Other("brand_new".into())),
        ] {
            let frame = format!(r#"{{"type":"disconnect","reason":"{text}"}}"#);
            let Inbound::Disconnect(parsed) = parse_inbound(&frame).unwrap() else {
                panic!("not a disconnect")
            };
            assert_eq!(parsed, reason);
            assert_eq!(parsed.as_str(), text);
        }
    }

    #[test]
    fn acks_serialise_and_oversized_ones_are_refused() {
        let plain = Ack {
            envelope_id: "e1".into(),
            payload: None,
        };
        assert_eq!(plain.to_frame().unwrap(), r#"{"envelope_id":"e1"}"#);
        let with_payload = Ack {
            envelope_id: "e2".into(),
            payload: Some(serde_json::json!({"text":"hi"})),
        };
        assert_eq!(
            with_payload.to_frame().unwrap(),
            r#"{"envelope_id":"e2","payload":{"text":"hi"}}"#
        );
        let huge = Ack {
            envelope_id: "e3".into(),
            payload: Some(serde_json::json!({"text": "x".repeat(MAX_ACK_BYTES)})),
        };
        assert!(matches!(huge.to_frame(), Err(AckError::TooLarge { .. })));
    }
}
