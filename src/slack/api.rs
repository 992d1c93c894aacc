//! `apps.connections.open`: the Web API call that yields a fresh, single-use websocket URL.

use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::config::is_loopback;
use crate::http_body::{BodyError, read_capped};
use crate::token::AppToken;

/// Errors that mean the configuration must change; retrying cannot help.
const PERMANENT_ERRORS: &[&str] = &[
    "invalid_auth",
    "not_authed",
    "account_inactive",
    "token_revoked",
    "token_expired",
    "user_removed_from_team",
    "team_disabled",
    "forbidden_team",
    "link_disabled",
    "not_allowed_token_type",
    "missing_scope",
    "invalid_token",
];

/// Slack's answer is about 300 bytes: a larger one is not Slack's, and reading it whole
/// would cost memory without bound.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// The longest wait a `Retry-After` can impose. Slack's rate limits are per minute, so
/// after a minute a call is allowed again; a larger value is a broken header, and obeying
/// it would stop the service for good.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The token or the app's settings are wrong: stop and tell the operator.
    #[error("Slack refused the app token: {code} ({})", permanent_hint(code))]
    Permanent { code: String },
    /// HTTP 429: wait at least `retry_after` before the next call.
    #[error("apps.connections.open is rate limited; Slack asks to retry after {retry_after:?}")]
    RateLimited { retry_after: Duration },
    /// Anything else: network errors, 5xx, odd answers. Retried with backoff.
    #[error("apps.connections.open failed: {0}")]
    Transient(String),
}

/// What the operator should do about a permanent error.
pub fn permanent_hint(code: &str) -> &'static str {
    match code {
        "invalid_auth" | "not_authed" | "invalid_token" => {
            "the token is wrong or missing; copy the app-level token (xapp-…) from the app's Basic Information page"
        }
        "token_revoked" | "token_expired" => {
            "the token was revoked; generate a new app-level token with scope connections:write"
        }
        "not_allowed_token_type" => {
            "this is not an app-level token; Socket Mode needs an xapp-… token"
        }
        "missing_scope" => "add the connections:write scope to the app-level token",
        "link_disabled" => "Socket Mode is switched off in the app's settings; enable it",
        _ => {
            "the workspace or account behind this token is not usable; check the app's installation"
        }
    }
}

#[derive(Deserialize)]
struct OpenResponse {
    ok: bool,
    url: Option<String>,
    error: Option<String>,
}

/// A client for `apps.connections.open`.
#[derive(Clone)]
pub struct SlackApi {
    http: reqwest::Client,
    endpoint: Url,
    debug_reconnects: bool,
}

impl SlackApi {
    pub fn new(api_base: &Url, debug_reconnects: bool) -> Result<Self, OpenError> {
        let mut endpoint = api_base.clone();
        endpoint
            .path_segments_mut()
            .map_err(|_| OpenError::Transient(format!("{api_base} cannot be a base URL")))?
            .pop_if_empty()
            .push("apps.connections.open");
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(15))
            .user_agent(concat!("flowcoach/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| OpenError::Transient(e.to_string()))?;
        Ok(SlackApi {
            http,
            endpoint,
            debug_reconnects,
        })
    }

    /// Asks Slack for a new websocket URL. Called before every connect: the URL is
    /// single-use in practice.
    pub async fn open_connection(&self, token: &AppToken) -> Result<Url, OpenError> {
        let response = self
            .http
            .post(self.endpoint.clone())
            .bearer_auth(token.expose_secret())
            .header("content-type", "application/x-www-form-urlencoded")
            .send()
            .await
            .map_err(|e| OpenError::Transient(e.without_url().to_string()))?;
        if response.status() == reqwest::StatusCode::TOO_MANY_REQUESTS {
            return Err(OpenError::RateLimited {
                retry_after: retry_after(response.headers()),
            });
        }
        if !response.status().is_success() {
            return Err(OpenError::Transient(format!("HTTP {}", response.status())));
        }
        let body = read_answer(response).await?;
        let body: OpenResponse = serde_json::from_slice(&body)
            .map_err(|e| OpenError::Transient(format!("unreadable answer: {e}")))?;
        if !body.ok {
            let code = body.error.unwrap_or_else(|| "unknown_error".to_owned());
            if code == "ratelimited" {
                return Err(OpenError::RateLimited {
                    retry_after: Duration::from_secs(1),
                });
            }
            if PERMANENT_ERRORS.contains(&code.as_str()) {
                return Err(OpenError::Permanent { code });
            }
            return Err(OpenError::Transient(code));
        }
        let raw = body
            .url
            .ok_or_else(|| OpenError::Transient("answer has ok=true but no url".to_owned()))?;
        self.websocket_url(&raw)
    }

    fn websocket_url(&self, raw: &str) -> Result<Url, OpenError> {
        let mut url = Url::parse(raw)
            .map_err(|e| OpenError::Transient(format!("answer has a bad url: {e}")))?;
        match url.scheme() {
            "wss" => {}
            "ws" if is_loopback(&url) => {}
            "ws" => {
                return Err(OpenError::Transient(format!(
                    "refusing ws:// URL: host {} is not a loopback address (plain ws is only for a local simulator; Slack's URLs are wss)",
                    url.host_str().unwrap_or_default()
                )));
            }
            other => {
                return Err(OpenError::Transient(format!(
                    "refusing websocket URL with scheme {other:?}: only wss (or ws on loopback)"
                )));
            }
        }
        if self.debug_reconnects {
            url.query_pairs_mut()
                .append_pair("debug_reconnects", "true");
        }
        Ok(url)
    }
}

/// The body of a successful answer, at most [`MAX_ANSWER_BYTES`] of it.
async fn read_answer(response: reqwest::Response) -> Result<Vec<u8>, OpenError> {
    read_capped(response, MAX_ANSWER_BYTES)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge { .. } => {
                OpenError::Transient(format!("{e} (Slack's is about 300)"))
            }
            BodyError::Read(ref source) => OpenError::Transient(format!("{e}: {source}")),
        })
}

/// `Retry-After` in seconds, at most [`MAX_RETRY_AFTER`]; Slack sends integers. Missing
/// or unreadable: 1 s.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Duration {
    let Some(asked) = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
    else {
        return Duration::from_secs(1);
    };
    let asked = Duration::from_secs(asked);
    if asked > MAX_RETRY_AFTER {
        tracing::warn!(
            retry_after_s = asked.as_secs(),
            waiting_s = MAX_RETRY_AFTER.as_secs(),
            "apps.connections.open asked to retry after more than {}s; waiting {}s instead",
            MAX_RETRY_AFTER.as_secs(),
            MAX_RETRY_AFTER.as_secs()
        );
        return MAX_RETRY_AFTER;
    }
    asked
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(debug: bool) -> SlackApi {
        SlackApi::new(&Url::parse("https://slack.com/api").unwrap(), debug).unwrap()
    }

    #[test]
    fn endpoint_is_appended_to_the_base() {
        assert_eq!(
            api(false).endpoint.as_str(),
            "https://slack.com/api/apps.connections.open"
        );
        let with_slash =
            SlackApi::new(&Url::parse("http://127.0.0.1:1/api/").unwrap(), false).unwrap();
        assert_eq!(
            with_slash.endpoint.as_str(),
            "http://127.0.0.1:1/api/apps.connections.open"
        );
    }

    #[test]
    fn websocket_urls_are_checked_and_tagged() {
        let url = api(true)
            .websocket_url("wss://wss-primary.slack.com/link/?ticket=t&app_id=h")
            .unwrap();
        assert!(url.as_str().ends_with("&debug_reconnects=true"));
        assert!(api(false).websocket_url("ws://127.0.0.1:9/link/").is_ok());
        assert!(api(false).websocket_url("ws://slack.com/link/").is_err());
        assert!(api(false).websocket_url("https://slack.com/").is_err());
    }

    #[test]
    fn plain_ws_elsewhere_than_loopback_is_refused_for_its_host() {
        for (url, host) in [
            ("ws://0.0.0.0:9/link/?ticket=t", "0.0.0.0"),
            ("ws://wss-primary.slack.com/link/", "wss-primary.slack.com"),
        ] {
            let error = api(false).websocket_url(url).unwrap_err().to_string();
            assert!(
                error.contains(&format!("host {host} is not a loopback address")),
                "{error}"
            );
            assert!(!error.contains("scheme"), "{error}");
            assert!(!error.contains("ticket"), "{error}");
        }
        let error = api(false).websocket_url("https://slack.com/").unwrap_err();
        assert!(error.to_string().contains("scheme \"https\""), "{error}");
    }

    #[test]
    fn retry_after_defaults_to_a_second() {
        let mut headers = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&headers), Duration::from_secs(1));
        headers.insert(reqwest::header::RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&headers), Duration::from_secs(7));
    }

    #[test]
    fn retry_after_is_capped() {
        let mut headers = reqwest::header::HeaderMap::new();
        for value in ["18446744073709551615", "61"] {
            headers.insert(reqwest::header::RETRY_AFTER, value.parse().unwrap());
            assert_eq!(retry_after(&headers), MAX_RETRY_AFTER, "{value}");
        }
        headers.insert(reqwest::header::RETRY_AFTER, "60".parse().unwrap());
        assert_eq!(retry_after(&headers), Duration::from_secs(60));
    }
}

#[cfg(test)]
mod network_tests {
    use super::*;

    #[tokio::test]
    async fn an_https_failure_is_transient_not_a_panic() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        });
        let base = Url::parse(&format!("https://127.0.0.1:{port}/api")).unwrap();
        let api = SlackApi::new(&base, false).unwrap();
        let token = AppToken::parse("xapp-1-A0TEST-1-abc").unwrap();
        let error = api.open_connection(&token).await.unwrap_err();
        assert!(matches!(error, OpenError::Transient(_)), "{error:?}");
        assert!(!error.to_string().contains("abc"));
    }

    /// An HTTP server on loopback that answers every request with `head`, then streams
    /// `padding` bytes of JSON whitespace and a valid answer; its API base.
    async fn answering_server(head: &'static str, padding: usize) -> Url {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    // The request has no body: its head ends the first read or few.
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => request.extend_from_slice(&buf[..n]),
                        }
                    }
                    if stream.write_all(head.as_bytes()).await.is_err() {
                        return;
                    }
                    let spaces = [b' '; 8192];
                    let mut sent = 0;
                    while sent < padding {
                        let n = spaces.len().min(padding - sent);
                        if stream.write_all(&spaces[..n]).await.is_err() {
                            return;
                        }
                        sent += n;
                    }
                    let answer = br#"{"ok":true,"url":"ws://127.0.0.1:9/link/?ticket=t"}"#;
                    let _ = stream.write_all(answer).await;
                });
            }
        });
        Url::parse(&format!("http://127.0.0.1:{port}/api")).unwrap()
    }

    #[tokio::test]
    async fn an_oversized_answer_is_refused_without_reading_it_all() {
        let token = AppToken::parse("xapp-1-A0TEST-1-abc").unwrap();
        // Streamed until the server closes, with no length announced: valid JSON, but
        // 1 MiB of it; and an announced 300 MiB that never comes.
        for head in [
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 314572800\r\n\r\n",
        ] {
            let padding = if head.contains("content-length") {
                0
            } else {
                1 << 20
            };
            let base = answering_server(head, padding).await;
            let api = SlackApi::new(&base, false).unwrap();
            let error = api.open_connection(&token).await.unwrap_err();
            assert!(matches!(error, OpenError::Transient(_)), "{error:?}");
            assert!(
                error.to_string().contains(&MAX_ANSWER_BYTES.to_string()),
                "the error names the limit: {error}"
            );
        }
    }

    #[tokio::test]
    async fn a_small_answer_is_read() {
        let head = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n\r\n";
        let base = answering_server(head, 100).await;
        let api = SlackApi::new(&base, false).unwrap();
        let token = AppToken::parse("xapp-1-A0TEST-1-abc").unwrap();
        let url = api.open_connection(&token).await.unwrap();
        assert_eq!(url.as_str(), "ws://127.0.0.1:9/link/?ticket=t");
    }
}
