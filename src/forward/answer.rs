//! The app's answer as the ack's payload, as Slack reads an HTTP-mode answer: JSON as it
//! is, plain text as a message's text, nothing for an empty body.

use serde_json::{Value, json};

#[derive(Debug, thiserror::Error)]
pub enum AnswerError {
    #[error("the app's answer is neither JSON nor text (not UTF-8)")]
    NotText(#[source] std::str::Utf8Error),
}

pub fn payload(body: &[u8]) -> Result<Option<Value>, AnswerError> {
    let text = std::str::from_utf8(body).map_err(AnswerError::NotText)?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    match serde_json::from_str::<Value>(text) {
        Ok(value @ Value::Object(_)) => Ok(Some(value)),
        _ => Ok(Some(json!({ "text": text }))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_text_and_nothing() {
        assert_eq!(
            payload(br#"{"response_type":"ephemeral","text":"hi"}"#).unwrap(),
            Some(json!({"response_type":"ephemeral","text":"hi"}))
        );
        assert_eq!(
            payload(b"Deploying now").unwrap(),
            Some(json!({"text":"Deploying now"}))
        );
        assert_eq!(payload(b"42").unwrap(), Some(json!({"text":"42"})));
        assert_eq!(payload(b"").unwrap(), None);
        assert_eq!(payload(b" \n").unwrap(), None);
        assert!(payload(&[0xff, 0xfe]).is_err());
    }
}
