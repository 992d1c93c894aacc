//! The Web API side: `POST /api/apps.connections.open`, which checks the app-level token
//! and hands out a single-use websocket URL, unless a test has scripted another answer;
//! the bot's methods and `response_url`s are routed to [`bot_api`].

use std::collections::VecDeque;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::bot_api;
use super::config::stable_hex;
use super::record::OpenCall;
use super::state::Shared;

/// A scripted answer to `apps.connections.open`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenResponse {
    /// HTTP 200 with `{"ok":false,"error":…}`.
    Error(String),
    /// HTTP 429 with `Retry-After` and `{"ok":false,"error":"ratelimited"}`.
    RateLimited { retry_after_secs: u64 },
    /// This bare status with the body `oops`.
    HttpStatus(u16),
}

/// Scripted answers: one-shot ones first (FIFO), then the sticky one, then normal behaviour.
#[derive(Debug, Default)]
pub(super) struct OpenOverrides {
    one_shot: VecDeque<OpenResponse>,
    sticky: Option<OpenResponse>,
}

impl OpenOverrides {
    pub(super) fn push(&mut self, response: OpenResponse) {
        self.one_shot.push_back(response);
    }

    pub(super) fn set_sticky(&mut self, response: Option<OpenResponse>) {
        self.sticky = response;
    }

    fn next(&mut self) -> Option<OpenResponse> {
        self.one_shot.pop_front().or_else(|| self.sticky.clone())
    }
}

/// What one call gets.
enum Answer {
    Url(String),
    Error(String),
    Scripted(OpenResponse),
}

impl Answer {
    /// The outcome as recorded: `"ok"`, the error code or `"http <status>"`.
    fn outcome(&self) -> String {
        match self {
            Answer::Url(_) => "ok".to_owned(),
            Answer::Error(code) | Answer::Scripted(OpenResponse::Error(code)) => code.clone(),
            Answer::Scripted(OpenResponse::RateLimited { .. }) => "http 429".to_owned(),
            Answer::Scripted(OpenResponse::HttpStatus(status)) => format!("http {status}"),
        }
    }
}

impl IntoResponse for Answer {
    fn into_response(self) -> Response {
        match self {
            Answer::Url(url) => axum::Json(json!({"ok": true, "url": url})).into_response(),
            Answer::Error(code) | Answer::Scripted(OpenResponse::Error(code)) => {
                axum::Json(json!({"ok": false, "error": code})).into_response()
            }
            Answer::Scripted(OpenResponse::RateLimited { retry_after_secs }) => {
                let mut response = (
                    StatusCode::TOO_MANY_REQUESTS,
                    axum::Json(json!({"ok": false, "error": "ratelimited"})),
                )
                    .into_response();
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
                response
            }
            Answer::Scripted(OpenResponse::HttpStatus(status)) => {
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                (status, "oops").into_response()
            }
        }
    }
}

/// Serves the Web API until shutdown.
pub(super) async fn serve(shared: Arc<Shared>, listener: TcpListener) {
    let shutdown = shared.shutdown.clone();
    let app = Router::new()
        .route("/api/apps.connections.open", post(connections_open))
        .route("/api/{method}", post(bot_api::call))
        .route("/response/{envelope_id}", post(bot_api::response_url))
        .fallback(unknown_method)
        .with_state(shared);
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(error) = served {
        warn!(%error, "simulated Web API stopped");
    }
}

async fn connections_open(State(shared): State<Arc<Shared>>, headers: HeaderMap) -> Response {
    let token = bearer_token(&headers);
    let app = token.and_then(|t| shared.config.app_for_token(t));
    let answer = shared.update(|inner| {
        let now = Instant::now();
        let answer = match (inner.open_overrides.next(), token, app) {
            (Some(scripted), _, _) => Answer::Scripted(scripted),
            (None, None, _) => Answer::Error("not_authed".to_owned()),
            (None, Some(_), None) => Answer::Error("invalid_auth".to_owned()),
            (None, Some(_), Some(app)) => {
                let ticket = inner.tickets.issue(&app.app_id, now);
                Answer::Url(link_url(&shared, &ticket, &app.app_id))
            }
        };
        inner.record.open_calls.push(OpenCall {
            at: now,
            token_ok: app.is_some(),
            app_id: app.map(|a| a.app_id.clone()),
            token: token.map(str::to_owned),
            outcome: answer.outcome(),
        });
        answer
    });
    debug!(
        app = app.map(|a| a.app_id.as_str()),
        outcome = answer.outcome(),
        "apps.connections.open"
    );
    answer.into_response()
}

pub(super) async fn unknown_method() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(json!({"ok": false, "error": "unknown_method"})),
    )
        .into_response()
}

/// The token of `Authorization: Bearer …`, the only place Slack reads app-level tokens.
pub(super) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Like Slack's, the URL names the app by a hash; the real app id comes in `hello`.
fn link_url(shared: &Shared, ticket: &str, app_id: &str) -> String {
    format!(
        "ws://{}/link/?ticket={ticket}&app_id={}",
        reachable(shared.link_addr),
        stable_hex(app_id, 40)
    )
}

/// `addr` as clients dial it: a listener on the unspecified address is reached on loopback.
pub(super) fn reachable(mut addr: SocketAddr) -> SocketAddr {
    if addr.ip().is_unspecified() {
        addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    addr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shot_answers_come_first_then_the_sticky_one() {
        let mut overrides = OpenOverrides::default();
        assert_eq!(overrides.next(), None);
        overrides.set_sticky(Some(OpenResponse::HttpStatus(503)));
        overrides.push(OpenResponse::Error("a".into()));
        overrides.push(OpenResponse::RateLimited {
            retry_after_secs: 2,
        });
        assert_eq!(overrides.next(), Some(OpenResponse::Error("a".into())));
        assert_eq!(
            overrides.next(),
            Some(OpenResponse::RateLimited {
                retry_after_secs: 2
            })
        );
        assert_eq!(overrides.next(), Some(OpenResponse::HttpStatus(503)));
        assert_eq!(overrides.next(), Some(OpenResponse::HttpStatus(503)));
        overrides.set_sticky(None);
        assert_eq!(overrides.next(), None);
    }

    #[test]
    fn bearer_tokens_are_read_from_the_authorization_header() {
        let mut headers = HeaderMap::new();
        assert_eq!(bearer_token(&headers), None);
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer xapp-1"),
        );
        assert_eq!(bearer_token(&headers), Some("xapp-1"));
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer  xapp-2 "),
        );
        assert_eq!(bearer_token(&headers), Some("xapp-2"));
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer_token(&headers), None);
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer "));
        assert_eq!(bearer_token(&headers), None);
    }

    #[test]
    fn outcomes_name_errors_and_statuses() {
        assert_eq!(Answer::Url("ws://x".into()).outcome(), "ok");
        assert_eq!(
            Answer::Error("invalid_auth".into()).outcome(),
            "invalid_auth"
        );
        assert_eq!(
            Answer::Scripted(OpenResponse::RateLimited {
                retry_after_secs: 1
            })
            .outcome(),
            "http 429"
        );
        assert_eq!(
            Answer::Scripted(OpenResponse::HttpStatus(500)).outcome(),
            "http 500"
        );
    }
}
