//! FlowCoach's own behaviour: `/flowcoach status|help` answered in the ack, everything else
//! logged with structured fields.

use std::sync::Arc;
use std::time::SystemTime;

use serde_json::{Value, json};

use crate::dispatch::{Handler, HandlerFuture, Incoming};
use crate::state::InstanceState;
use flowcoach_protocol::EnvelopeKind;

pub const COMMAND: &str = "/flowcoach";

/// The built-in handlers.
pub struct FlowCoach {
    state: Arc<InstanceState>,
}

impl FlowCoach {
    pub fn new(state: Arc<InstanceState>) -> Self {
        FlowCoach { state }
    }

    fn slash_command(&self, incoming: &Incoming) -> Option<Value> {
        let summary = &incoming.summary;
        let command = summary.command.as_deref().unwrap_or_default();
        let text = summary.text.as_deref().unwrap_or_default().trim();
        tracing::info!(
            kind = "slash_commands",
            envelope_id = %incoming.envelope.envelope_id,
            command,
            text,
            channel = summary.channel(),
            user = summary.user(),
            "slash command received"
        );
        if command != COMMAND {
            return None;
        }
        let answer = match text.split_whitespace().next().unwrap_or("help") {
            "status" => self.status_text(),
            "help" => help_text(),
            other => format!("Unknown subcommand `{other}`.\n{}", help_text()),
        };
        Some(json!({ "response_type": "ephemeral", "text": answer }))
    }

    /// Which instance answered: the question to ask when several might be connected.
    fn status_text(&self) -> String {
        let instance = &self.state.instance;
        let status = self.state.status();
        let since = status
            .connected_since
            .map(format_time)
            .unwrap_or_else(|| "not connected".to_owned());
        format!(
            "FlowCoach {version} answering from host {host}, pid {pid}, environment {env}; \
             connected since {since}; app {app}; Slack counts {sockets} open socket(s) for this app.",
            version = instance.version,
            host = instance.host,
            pid = instance.pid,
            env = instance.environment,
            app = status.app_id.as_deref().unwrap_or("unknown"),
            sockets = status
                .num_connections
                .map_or_else(|| "?".to_owned(), |n| n.to_string()),
        )
    }
}

fn help_text() -> String {
    format!(
        "`{COMMAND} status`: which FlowCoach instance answers, and since when it is connected.\n\
         `{COMMAND} help`: this text."
    )
}

fn format_time(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

fn log_event(incoming: &Incoming) {
    let summary = &incoming.summary;
    let envelope = &incoming.envelope;
    let event_type = summary
        .event
        .as_ref()
        .and_then(|e| e.kind.as_deref())
        .or(summary.kind.as_deref());
    tracing::info!(
        kind = envelope.kind.as_str(),
        envelope_id = %envelope.envelope_id,
        event_type,
        event_id = summary.event_id.as_deref(),
        channel = summary.channel(),
        user = summary.user(),
        retry_attempt = envelope.retry_attempt,
        "event handled"
    );
}

impl Handler for FlowCoach {
    fn handle(&self, incoming: Incoming) -> HandlerFuture {
        let answer = match incoming.envelope.kind {
            EnvelopeKind::SlashCommands => self.slash_command(&incoming),
            EnvelopeKind::EventsApi | EnvelopeKind::Interactive => {
                log_event(&incoming);
                None
            }
        };
        Box::pin(async move { Ok(answer) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::InstanceInfo;
    use flowcoach_protocol::{Inbound, parse_inbound};

    fn incoming(frame: &str) -> Incoming {
        let Ok(Inbound::Envelope(envelope)) = parse_inbound(frame) else {
            panic!("not an envelope: {frame}")
        };
        let summary = envelope.summary();
        Incoming { envelope, summary }
    }

    fn bot() -> FlowCoach {
        let state = Arc::new(InstanceState::new(InstanceInfo::current("prod")));
        state.update(|s| {
            s.app_id = Some("A0TEST".into());
            s.connected_since = Some(SystemTime::UNIX_EPOCH);
            s.num_connections = Some(2);
        });
        FlowCoach::new(state)
    }

    async fn answer(frame: &str) -> Option<Value> {
        bot().handle(incoming(frame)).await.unwrap()
    }

    #[tokio::test]
    async fn status_names_the_instance() {
        let reply = answer(
            r#"{"envelope_id":"e","type":"slash_commands","accepts_response_payload":true,
            "payload":{"command":"/flowcoach","text":"status"}}"#,
        )
        .await
        .unwrap();
        let text = reply["text"].as_str().unwrap();
        let pid = std::process::id().to_string();
        assert!(text.contains(&pid), "{text}");
        assert!(text.contains("environment prod"), "{text}");
        assert!(text.contains("1970-01-01T00:00:00Z"), "{text}");
        assert!(text.contains(env!("CARGO_PKG_VERSION")), "{text}");
    }

    #[tokio::test]
    async fn help_and_unknown_subcommands_explain_usage() {
        for text in ["help", "", "dance"] {
            let frame = format!(
                r#"{{"envelope_id":"e","type":"slash_commands","payload":{{"command":"/flowcoach","text":"{text}"}}}}"#
            );
            let reply = answer(&frame).await.unwrap();
            assert!(
                reply["text"]
                    .as_str()
                    .unwrap()
                    .contains("/flowcoach status")
            );
        }
    }

    #[tokio::test]
    async fn other_commands_and_events_get_no_answer() {
        assert!(
            answer(r#"{"envelope_id":"e","type":"slash_commands","payload":{"command":"/other"}}"#)
                .await
                .is_none()
        );
        assert!(
            answer(r#"{"envelope_id":"e","type":"events_api","payload":{"event_id":"Ev1"}}"#)
                .await
                .is_none()
        );
    }
}
