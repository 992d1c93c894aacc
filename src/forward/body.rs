//! The body Slack would POST in HTTP mode for an envelope: an event's payload as it came,
//! byte for byte; a slash command's fields form-encoded; an interaction as one form field
//! `payload=<its JSON>`.

use serde_json::{Map, Value};

use flowcoach_protocol::{Envelope, EnvelopeKind};

pub const JSON: &str = "application/json";
pub const FORM: &str = "application/x-www-form-urlencoded";

/// A request body and its content type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpBody {
    pub content_type: &'static str,
    pub bytes: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("the slash command's payload is not an object of fields")]
    NotAnObject(#[source] serde_json::Error),
}

pub fn build(envelope: &Envelope) -> Result<HttpBody, BuildError> {
    let payload = envelope.payload.get();
    Ok(match envelope.kind {
        EnvelopeKind::EventsApi => HttpBody {
            content_type: JSON,
            bytes: payload.as_bytes().to_vec(),
        },
        EnvelopeKind::SlashCommands => {
            let fields: Map<String, Value> =
                serde_json::from_str(payload).map_err(BuildError::NotAnObject)?;
            let mut form = url::form_urlencoded::Serializer::new(String::new());
            for (name, value) in &fields {
                match value {
                    Value::String(text) => form.append_pair(name, text),
                    Value::Null => form.append_pair(name, ""),
                    // Slack sends strings; anything else goes as its JSON text.
                    other => form.append_pair(name, &other.to_string()),
                };
            }
            HttpBody {
                content_type: FORM,
                bytes: form.finish().into_bytes(),
            }
        }
        EnvelopeKind::Interactive => HttpBody {
            content_type: FORM,
            bytes: url::form_urlencoded::Serializer::new(String::new())
                .append_pair("payload", payload)
                .finish()
                .into_bytes(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowcoach_protocol::{Inbound, parse_inbound};

    fn envelope(kind: &str, payload: &str) -> Envelope {
        let frame = format!(r#"{{"envelope_id":"e1","type":"{kind}","payload":{payload}}}"#);
        let Ok(Inbound::Envelope(envelope)) = parse_inbound(&frame) else {
            panic!("not an envelope: {frame}")
        };
        envelope
    }

    #[test]
    fn an_event_goes_byte_for_byte() {
        let payload = r#"{"type":"event_callback",  "event_id":"Ev1","event":{"text":"é \u00e9"}}"#;
        let body = build(&envelope("events_api", payload)).unwrap();
        assert_eq!(body.content_type, JSON);
        assert_eq!(body.bytes, payload.as_bytes());
    }

    #[test]
    fn a_slash_command_is_form_encoded() {
        let payload = r#"{"command":"/deploy","text":"app to prod & more=1 é",
            "response_url":"https://hooks.slack.com/commands/T1/2/x","user_id":"U1"}"#;
        let body = build(&envelope("slash_commands", payload)).unwrap();
        assert_eq!(body.content_type, FORM);
        let text = String::from_utf8(body.bytes).unwrap();
        assert_eq!(
            text,
            "command=%2Fdeploy&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1%2F2%2Fx\
             &text=app+to+prod+%26+more%3D1+%C3%A9&user_id=U1"
        );
        let fields: Vec<(String, String)> = url::form_urlencoded::parse(text.as_bytes())
            .into_owned()
            .collect();
        assert!(fields.contains(&("text".into(), "app to prod & more=1 é".into())));
        assert!(build(&envelope("slash_commands", "[1]")).is_err());
    }

    #[test]
    fn an_interaction_is_one_payload_field() {
        let payload = r#"{"type":"block_actions","actions":[{"value":"a&b"}]}"#;
        let body = build(&envelope("interactive", payload)).unwrap();
        assert_eq!(body.content_type, FORM);
        let fields: Vec<(String, String)> = url::form_urlencoded::parse(&body.bytes)
            .into_owned()
            .collect();
        assert_eq!(fields, vec![("payload".to_owned(), payload.to_owned())]);
        assert!(
            String::from_utf8(body.bytes)
                .unwrap()
                .starts_with("payload=%7B%22type%22")
        );
    }
}
