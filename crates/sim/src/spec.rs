//! What a test asks the sim to deliver, and the Slack-shaped payload built from it.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use flowcoach_protocol::EnvelopeKind;

/// The team every simulated payload belongs to.
pub const SIM_TEAM_ID: &str = "T0SIM";
/// The user who "sends" simulated commands and messages.
pub const SIM_USER_ID: &str = "U0SIM";
/// The channel of simulated slash commands.
pub const SIM_CHANNEL_ID: &str = "C0SIM";

/// An envelope to inject.
#[derive(Debug, Clone)]
pub enum EnvelopeSpec {
    /// `events_api` with an `event_callback` payload wrapping `event`.
    Event { event_id: String, event: Value },
    /// `events_api` whose payload has no inner `event` (e.g. `app_rate_limited`). The
    /// payload is sent as given, plus `event_id` if one is named and the payload lacks it.
    EventWithoutInner {
        event_id: Option<String>,
        payload: Value,
    },
    /// `slash_commands` from the sim user in the sim channel.
    SlashCommand { command: String, text: String },
    /// `interactive` with the payload as given.
    Interactive {
        payload: Value,
        accepts_response_payload: bool,
    },
}

impl EnvelopeSpec {
    /// A `message` event by the sim user.
    pub fn message(event_id: impl Into<String>, channel: &str, text: &str) -> Self {
        EnvelopeSpec::Event {
            event_id: event_id.into(),
            event: json!({
                "type": "message",
                "channel": channel,
                "user": SIM_USER_ID,
                "text": text,
                "ts": slack_ts(),
                "channel_type": "channel",
            }),
        }
    }

    /// An `app_mention` event: the sim user mentions `app_id`'s bot user in `channel`.
    pub fn app_mention(
        event_id: impl Into<String>,
        app_id: &str,
        channel: &str,
        text: &str,
    ) -> Self {
        EnvelopeSpec::Event {
            event_id: event_id.into(),
            event: json!({
                "type": "app_mention",
                "channel": channel,
                "user": SIM_USER_ID,
                "text": format!("<@{}> {text}", super::config::bot_user_id(app_id)),
                "ts": slack_ts(),
            }),
        }
    }

    /// A slash command (`/flowcoach`, say) from the sim user in the sim channel.
    pub fn slash_command(command: &str, text: impl Into<String>) -> Self {
        EnvelopeSpec::SlashCommand {
            command: command.to_owned(),
            text: text.into(),
        }
    }

    /// Builds the envelope's fields; `seq` makes trigger ids unique. Slash commands, and
    /// the interactions Slack gives one (`block_actions`, `message_action`) unless the test
    /// set its own, carry `response_url`.
    pub(super) fn into_content(
        self,
        app_id: &str,
        seq: u64,
        response_url: &str,
    ) -> EnvelopeContent {
        match self {
            EnvelopeSpec::Event { event_id, event } => EnvelopeContent {
                kind: EnvelopeKind::EventsApi,
                accepts_response_payload: false,
                payload: json!({
                    "token": "simverificationtoken",
                    "team_id": SIM_TEAM_ID,
                    "api_app_id": app_id,
                    "event": event,
                    "type": "event_callback",
                    "event_id": event_id,
                    "event_time": unix_seconds(),
                }),
                event_id: Some(event_id),
            },
            EnvelopeSpec::EventWithoutInner {
                event_id,
                mut payload,
            } => {
                if let (Some(id), Some(fields)) = (&event_id, payload.as_object_mut()) {
                    fields
                        .entry("event_id")
                        .or_insert_with(|| Value::String(id.clone()));
                }
                let event_id = event_id.or_else(|| {
                    payload
                        .get("event_id")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                });
                EnvelopeContent {
                    kind: EnvelopeKind::EventsApi,
                    accepts_response_payload: false,
                    payload,
                    event_id,
                }
            }
            EnvelopeSpec::SlashCommand { command, text } => EnvelopeContent {
                kind: EnvelopeKind::SlashCommands,
                accepts_response_payload: true,
                payload: json!({
                    "token": "simverificationtoken",
                    "team_id": SIM_TEAM_ID,
                    "team_domain": "sim",
                    "channel_id": SIM_CHANNEL_ID,
                    "channel_name": "sim",
                    "user_id": SIM_USER_ID,
                    "user_name": "sim.user",
                    "command": command,
                    "text": text,
                    "api_app_id": app_id,
                    "is_enterprise_install": "false",
                    "response_url": response_url,
                    "trigger_id": trigger_id(seq),
                }),
                event_id: None,
            },
            EnvelopeSpec::Interactive {
                mut payload,
                accepts_response_payload,
            } => {
                let has_one = matches!(
                    payload["type"].as_str(),
                    Some("block_actions" | "message_action")
                );
                if let (true, Some(fields)) = (has_one, payload.as_object_mut()) {
                    fields
                        .entry("response_url")
                        .or_insert_with(|| Value::String(response_url.to_owned()));
                }
                EnvelopeContent {
                    kind: EnvelopeKind::Interactive,
                    accepts_response_payload,
                    payload,
                    event_id: None,
                }
            }
        }
    }
}

/// The parts of an envelope that stay the same across redeliveries.
#[derive(Debug)]
pub(super) struct EnvelopeContent {
    pub(super) kind: EnvelopeKind,
    pub(super) accepts_response_payload: bool,
    pub(super) event_id: Option<String>,
    pub(super) payload: Value,
}

/// Slack trigger ids look like `13345224609.738474920.8088930838d88f008e0`.
pub(super) fn trigger_id(seq: u64) -> String {
    format!("{seq}.{}.{:020x}", unix_seconds(), rand::random::<u128>())
}

fn unix_seconds() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A message timestamp of now, `seconds.micros` like Slack's `ts`.
fn slack_ts() -> String {
    ts_from_micros(unix_micros())
}

pub(super) fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// Slack's `ts` for a time in microseconds since the epoch: `seconds.micros`.
pub(super) fn ts_from_micros(micros: u64) -> String {
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RESPONSE_URL: &str = "http://127.0.0.1:9/response/e1";

    #[test]
    fn event_payload_wraps_the_event() {
        let content = EnvelopeSpec::message("Ev1", "C1", "hi").into_content("A1", 1, RESPONSE_URL);
        assert_eq!(content.kind, EnvelopeKind::EventsApi);
        assert!(!content.accepts_response_payload);
        assert_eq!(content.event_id.as_deref(), Some("Ev1"));
        assert_eq!(content.payload["type"], "event_callback");
        assert_eq!(content.payload["event_id"], "Ev1");
        assert_eq!(content.payload["api_app_id"], "A1");
        assert_eq!(content.payload["team_id"], SIM_TEAM_ID);
        assert_eq!(content.payload["event"]["channel"], "C1");
    }

    #[test]
    fn a_mention_names_the_bot_user() {
        let content = EnvelopeSpec::app_mention("Ev9", "A0X1", "C1", "hi").into_content(
            "A0X1",
            9,
            RESPONSE_URL,
        );
        assert_eq!(content.payload["event"]["type"], "app_mention");
        assert_eq!(content.payload["event"]["text"], "<@U0X1> hi");
        assert_eq!(content.payload["event"]["user"], SIM_USER_ID);
    }

    #[test]
    fn event_without_inner_keeps_its_payload() {
        let content = EnvelopeSpec::EventWithoutInner {
            event_id: Some("Ev2".into()),
            payload: json!({"type": "app_rate_limited", "minute_rate_limited": 1}),
        }
        .into_content("A1", 2, RESPONSE_URL);
        assert!(content.payload.get("event").is_none());
        assert_eq!(content.payload["event_id"], "Ev2");
        assert_eq!(content.event_id.as_deref(), Some("Ev2"));

        let found = EnvelopeSpec::EventWithoutInner {
            event_id: None,
            payload: json!({"type": "app_rate_limited", "event_id": "Ev3"}),
        }
        .into_content("A1", 3, RESPONSE_URL);
        assert_eq!(found.event_id.as_deref(), Some("Ev3"));
    }

    #[test]
    fn slash_commands_accept_a_response() {
        let content =
            EnvelopeSpec::slash_command("/flowcoach", "status").into_content("A1", 4, RESPONSE_URL);
        assert_eq!(content.kind, EnvelopeKind::SlashCommands);
        assert!(content.accepts_response_payload);
        assert_eq!(content.payload["command"], "/flowcoach");
        assert_eq!(content.payload["user_id"], SIM_USER_ID);
        assert_eq!(content.payload["channel_id"], SIM_CHANNEL_ID);
        assert_eq!(content.payload["response_url"], RESPONSE_URL);
        assert!(
            content.payload["trigger_id"]
                .as_str()
                .unwrap()
                .starts_with("4.")
        );
    }

    #[test]
    fn block_actions_get_a_response_url_unless_they_have_one() {
        let interactive = |payload: Value| {
            EnvelopeSpec::Interactive {
                payload,
                accepts_response_payload: true,
            }
            .into_content("A1", 5, RESPONSE_URL)
            .payload
        };
        let given = interactive(json!({"type": "block_actions"}));
        assert_eq!(given["response_url"], RESPONSE_URL);
        let own = interactive(json!({"type": "block_actions", "response_url": "http://x/y"}));
        assert_eq!(own["response_url"], "http://x/y");
        let submission = interactive(json!({"type": "view_submission"}));
        assert!(submission.get("response_url").is_none());
    }

    #[test]
    fn timestamps_are_seconds_and_six_digits() {
        assert_eq!(ts_from_micros(1_700_000_000_000_042), "1700000000.000042");
    }
}
