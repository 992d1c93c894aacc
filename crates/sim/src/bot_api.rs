//! What a bot calls back: the Web API methods a typical bot uses (`chat.postMessage`,
//! `chat.postEphemeral`, `views.open`, `views.update`, `auth.test`) with the app's bot token,
//! and the `response_url`s slash commands and interactions carry. Bodies are JSON or form
//! encoded, as Slack's Web API takes them; every call is recorded for tests to wait on.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value, json};
use tokio::time::Instant;
use tracing::info;

use super::api::{bearer_token, unknown_method};
use super::config::{bot_id, bot_user_id};
use super::record::{ApiCall, ResponseUrlPost};
use super::spec::{SIM_TEAM_ID, ts_from_micros, unix_micros};
use super::state::{Inner, Shared};
use flowcoach_protocol::EnvelopeKind;

/// The bot methods the simulator serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    PostMessage,
    PostEphemeral,
    ViewsOpen,
    ViewsUpdate,
    AuthTest,
}

impl Method {
    fn parse(name: &str) -> Option<Method> {
        Some(match name {
            "chat.postMessage" => Method::PostMessage,
            "chat.postEphemeral" => Method::PostEphemeral,
            "views.open" => Method::ViewsOpen,
            "views.update" => Method::ViewsUpdate,
            "auth.test" => Method::AuthTest,
            _ => return None,
        })
    }
}

/// What the bot methods remember between calls.
#[derive(Debug, Default)]
pub(crate) struct BotState {
    /// The last message `ts` handed out, in microseconds: each new one is later, so two
    /// messages never share a `ts`.
    last_ts_micros: u64,
    /// Views opened so far: (view id, external id).
    views: Vec<(String, Option<String>)>,
}

impl BotState {
    fn next_ts(&mut self) -> String {
        self.last_ts_micros = unix_micros().max(self.last_ts_micros + 1);
        ts_from_micros(self.last_ts_micros)
    }
}

/// A Web API error code, as in `{"ok":false,"error":…}`.
type ApiError = &'static str;

/// The arguments of a call: a JSON object, or a form body decoded to an object of strings.
type Args = Map<String, Value>;

/// `POST /api/{method}` for the bot methods.
pub(super) async fn call(
    State(shared): State<Arc<Shared>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(method) = Method::parse(&name) else {
        return unknown_method().await;
    };
    let args = decode_body(&headers, &body);
    let token = bearer_token(&headers);
    let config = &shared.config;
    let app = token.and_then(|t| config.app_for_bot_token(t));
    // Logged, so that a person watching `flowcoach-dev sim` sees what the bot said where.
    let arg = |name| {
        args.as_ref()
            .ok()
            .and_then(|a| text_arg(a, name))
            .map(str::to_owned)
    };
    let (channel, text) = (arg("channel"), arg("text"));
    let answer = shared.update(|inner| {
        let answer = match (token, app, &args) {
            (None, _, _) => Err("not_authed"),
            (Some(t), None, _) if config.app_for_token(t).is_some() => {
                Err("not_allowed_token_type")
            }
            (Some(_), None, _) => Err("invalid_auth"),
            (_, _, Err(error)) => Err(*error),
            (_, Some(app), Ok(args)) => answer(method, &app.app_id, args, inner),
        };
        inner.record.api_calls.push(ApiCall {
            method: name.clone(),
            at: Instant::now(),
            app_id: app.map(|a| a.app_id.clone()),
            body: args.map_or_else(|_| lossy(&body), Value::Object),
            error: answer.as_ref().err().map(|e| (*e).to_owned()),
        });
        answer
    });
    info!(
        method = name,
        channel,
        text,
        error = answer.as_ref().err(),
        "the bot called the Web API"
    );
    let body = answer.unwrap_or_else(|error| json!({"ok": false, "error": error}));
    axum::Json(body).into_response()
}

/// `POST /response/{envelope_id}`: a reply to a slash command or an interaction.
pub(super) async fn response_url(
    State(shared): State<Arc<Shared>>,
    Path(envelope_id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let message = decode_body(&headers, &body);
    let accepted = shared.update(|inner| {
        let issued = inner.record.envelope(&envelope_id).is_some_and(|e| {
            matches!(
                e.kind,
                EnvelopeKind::SlashCommands | EnvelopeKind::Interactive
            )
        });
        let accepted = issued && message.is_ok();
        inner.record.response_url_posts.push(ResponseUrlPost {
            envelope_id: envelope_id.clone(),
            at: Instant::now(),
            body: message.clone().map_or_else(|_| lossy(&body), Value::Object),
            refused: !accepted,
        });
        accepted
    });
    let text = message.as_ref().ok().and_then(|m| text_arg(m, "text"));
    info!(
        envelope_id,
        text, accepted, "the bot posted to a response_url"
    );
    match (accepted, message) {
        (true, _) => axum::Json(json!({"ok": true})).into_response(),
        (false, Err(error)) => (
            StatusCode::BAD_REQUEST,
            axum::Json(json!({"ok": false, "error": error})),
        )
            .into_response(),
        (false, Ok(_)) => (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"ok": false, "error": "expired_url"})),
        )
            .into_response(),
    }
}

/// The arguments of a body: JSON when the content type says so (an object), else a form.
fn decode_body(headers: &HeaderMap, body: &[u8]) -> Result<Args, ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/json")
        });
    if !json {
        return Ok(url::form_urlencoded::parse(body)
            .map(|(key, value)| (key.into_owned(), Value::String(value.into_owned())))
            .collect());
    }
    match serde_json::from_slice(body) {
        Ok(Value::Object(args)) => Ok(args),
        Ok(_) => Err("json_not_object"),
        Err(_) => Err("invalid_json"),
    }
}

/// A body that could not be decoded, recorded as text.
fn lossy(body: &[u8]) -> Value {
    Value::String(String::from_utf8_lossy(body).into_owned())
}

/// A non-empty string argument.
fn text_arg<'a>(args: &'a Args, name: &str) -> Option<&'a str> {
    args.get(name)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// An argument that is JSON: as JSON in a JSON body, or a string of JSON in a form.
fn json_arg(args: &Args, name: &str) -> Option<Value> {
    match args.get(name)? {
        Value::String(text) if text.is_empty() => None,
        Value::String(text) => serde_json::from_str(text).ok(),
        Value::Null => None,
        other => Some(other.clone()),
    }
}

/// The `ok` answer of `method`, or its error.
fn answer(method: Method, app_id: &str, args: &Args, inner: &mut Inner) -> Result<Value, ApiError> {
    let state = &mut inner.bot;
    match method {
        Method::PostMessage => {
            let channel = text_arg(args, "channel").ok_or("channel_not_found")?;
            let mut message = message(app_id, args)?;
            let ts = state.next_ts();
            message.insert("ts".to_owned(), json!(ts));
            if let Some(thread) = text_arg(args, "thread_ts") {
                message.insert("thread_ts".to_owned(), json!(thread));
            }
            Ok(json!({"ok": true, "channel": channel, "ts": ts, "message": message}))
        }
        Method::PostEphemeral => {
            text_arg(args, "channel").ok_or("channel_not_found")?;
            text_arg(args, "user").ok_or("user_not_in_channel")?;
            message(app_id, args)?;
            Ok(json!({"ok": true, "message_ts": state.next_ts()}))
        }
        Method::ViewsOpen => {
            text_arg(args, "trigger_id").ok_or("invalid_arguments")?;
            let view = view_arg(args)?;
            let id = format!("V0SIM{:06}", state.views.len() + 1);
            let external_id = text_arg(&view, "external_id").map(str::to_owned);
            state.views.push((id.clone(), external_id));
            Ok(json!({"ok": true, "view": view_answer(app_id, id, view, state)}))
        }
        Method::ViewsUpdate => {
            let view = view_arg(args)?;
            let wanted_id = text_arg(args, "view_id");
            let wanted_external = text_arg(args, "external_id");
            let id = state
                .views
                .iter()
                .find(|(id, external)| {
                    wanted_id == Some(id.as_str())
                        || (wanted_external.is_some() && wanted_external == external.as_deref())
                })
                .map(|(id, _)| id.clone())
                .ok_or("not_found")?;
            Ok(json!({"ok": true, "view": view_answer(app_id, id, view, state)}))
        }
        Method::AuthTest => Ok(json!({
            "ok": true,
            "url": "https://sim.slack.example/",
            "team": "Simulated workspace",
            "user": "flowcoach-sim-bot",
            "team_id": SIM_TEAM_ID,
            "user_id": bot_user_id(app_id),
            "bot_id": bot_id(app_id),
            "app_id": app_id,
            "is_enterprise_install": false,
        })),
    }
}

/// The message a bot posts, as Slack echoes it: its text and blocks, from the bot user.
fn message(app_id: &str, args: &Args) -> Result<Args, ApiError> {
    let text = text_arg(args, "text");
    let blocks = json_arg(args, "blocks");
    if text.is_none() && blocks.is_none() && json_arg(args, "attachments").is_none() {
        return Err("no_text");
    }
    let mut message = Map::new();
    message.insert("type".to_owned(), json!("message"));
    message.insert("user".to_owned(), json!(bot_user_id(app_id)));
    message.insert("bot_id".to_owned(), json!(bot_id(app_id)));
    message.insert("app_id".to_owned(), json!(app_id));
    message.insert("team".to_owned(), json!(SIM_TEAM_ID));
    message.insert("text".to_owned(), json!(text.unwrap_or_default()));
    if let Some(blocks) = blocks {
        message.insert("blocks".to_owned(), blocks);
    }
    Ok(message)
}

/// The `view` argument, which must be an object.
fn view_arg(args: &Args) -> Result<Args, ApiError> {
    match json_arg(args, "view") {
        Some(Value::Object(view)) => Ok(view),
        _ => Err("invalid_arguments"),
    }
}

/// A view as Slack answers it: what was sent, with its id and Slack's fields.
fn view_answer(app_id: &str, id: String, mut view: Args, state: &mut BotState) -> Value {
    view.insert("id".to_owned(), json!(id));
    view.insert("team_id".to_owned(), json!(SIM_TEAM_ID));
    view.insert("app_id".to_owned(), json!(app_id));
    view.insert("bot_id".to_owned(), json!(bot_id(app_id)));
    view.insert("root_view_id".to_owned(), json!(id));
    view.insert("hash".to_owned(), json!(state.next_ts()));
    view.entry("state").or_insert_with(|| json!({"values": {}}));
    Value::Object(view)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(content_type: &'static str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        headers
    }

    #[test]
    fn bodies_are_json_or_forms() {
        let json = decode_body(
            &headers("application/json; charset=utf-8"),
            br#"{"channel":"C1","blocks":[]}"#,
        )
        .unwrap();
        assert_eq!(json["channel"], "C1");
        assert_eq!(json["blocks"], json!([]));
        let form = decode_body(
            &headers("application/x-www-form-urlencoded"),
            b"channel=C1&text=hi%20there&blocks=%5B%5D",
        )
        .unwrap();
        assert_eq!(form["text"], "hi there");
        assert_eq!(json_arg(&form, "blocks"), Some(json!([])));
        assert_eq!(
            decode_body(&headers("application/json"), b"[1]"),
            Err("json_not_object")
        );
        assert_eq!(
            decode_body(&headers("application/json"), b"{"),
            Err("invalid_json")
        );
        assert_eq!(decode_body(&HeaderMap::new(), b"").unwrap().len(), 0);
    }

    #[test]
    fn methods_are_slacks_names() {
        assert_eq!(Method::parse("chat.postMessage"), Some(Method::PostMessage));
        assert_eq!(Method::parse("auth.test"), Some(Method::AuthTest));
        assert_eq!(Method::parse("chat.delete"), None);
    }

    #[test]
    fn timestamps_never_repeat() {
        let mut state = BotState::default();
        let first = state.next_ts();
        let second = state.next_ts();
        assert!(second > first, "{first} then {second}");
    }
}
