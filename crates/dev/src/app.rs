//! `flowcoach-dev app`: a small Slack app in HTTP mode, served the way a Bolt app serves
//! one (everything on `POST /slack/events`), to run behind flowcoach's `[forward]`. It is
//! also an example of what such an app does:
//!
//! - every request's signature is checked with the app's signing secret (401 otherwise);
//! - `url_verification` is answered with its challenge;
//! - an `app_mention` (or a message saying "hello") is answered 200 at once, then replied
//!   to in the channel with `chat.postMessage`;
//! - the slash command `/hello` is answered in the response body, which flowcoach puts in
//!   the ack;
//! - a `block_actions` interaction is answered 200 at once, then replied to through its
//!   `response_url`.

#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use flowcoach::config::LogSettings;
use flowcoach_protocol::signature::{self, SIGNATURE_HEADER, TIMESTAMP_HEADER};

/// The path Bolt apps serve by default.
pub const EVENTS_PATH: &str = "/slack/events";

/// Web API calls give up after this long.
const API_TIMEOUT: Duration = Duration::from_secs(10);

/// What the app needs to know: both secrets come from the environment, never argv.
#[derive(Clone)]
pub struct AppConfig {
    pub signing_secret: String,
    pub bot_token: String,
    /// The Web API base, e.g. `http://127.0.0.1:3000/api`.
    pub api_url: String,
}

/// A running app; it stops when dropped.
pub struct DemoApp {
    /// Where Slack (or flowcoach) sends requests: `http://ADDR/slack/events`.
    pub url: String,
    task: JoinHandle<()>,
}

impl DemoApp {
    pub async fn start(listen: SocketAddr, config: AppConfig) -> std::io::Result<DemoApp> {
        let listener = TcpListener::bind(listen).await?;
        let url = format!("http://{}{EVENTS_PATH}", listener.local_addr()?);
        let http = reqwest::Client::builder()
            .timeout(API_TIMEOUT)
            .build()
            .map_err(std::io::Error::other)?;
        let app = Arc::new(App { config, http });
        let router = Router::new()
            .route(EVENTS_PATH, post(slack_events))
            .with_state(app);
        let task = tokio::spawn(async move {
            if let Err(error) = axum::serve(listener, router).await {
                warn!(%error, "the demo app stopped serving");
            }
        });
        Ok(DemoApp { url, task })
    }
}

impl Drop for DemoApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Where the app serves and calls when its environment does not say.
const DEFAULT_HOST: &str = "127.0.0.1";
const DEFAULT_PORT: &str = "3001";
/// The simulator's Web API on its default address.
const DEFAULT_API_URL: &str = "http://127.0.0.1:3000/api";

/// What is wrong with the app's environment.
#[derive(Debug, thiserror::Error)]
enum EnvError {
    #[error("{0} is not set (the simulator prints the values to use)")]
    Missing(&'static str),
    #[error("HOST={0:?} is not an IP address")]
    Host(String),
    #[error("PORT={0:?} is not a port number")]
    Port(String),
}

/// Reads the app's settings from the environment, with the names Bolt apps use:
/// `SLACK_SIGNING_SECRET`, `SLACK_BOT_TOKEN`, `SLACK_API_URL`, `HOST` and `PORT` (so a unit
/// or a container runs it as it runs a Bolt app). The secrets never come from argv.
fn from_env() -> Result<(SocketAddr, AppConfig), EnvError> {
    let set = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let required = |name: &'static str| set(name).ok_or(EnvError::Missing(name));
    let host = set("HOST").unwrap_or_else(|| DEFAULT_HOST.to_owned());
    let port = set("PORT").unwrap_or_else(|| DEFAULT_PORT.to_owned());
    let ip: IpAddr = host.parse().map_err(|_| EnvError::Host(host.clone()))?;
    let port: u16 = port.parse().map_err(|_| EnvError::Port(port.clone()))?;
    let config = AppConfig {
        signing_secret: required("SLACK_SIGNING_SECRET")?,
        bot_token: required("SLACK_BOT_TOKEN")?,
        api_url: set("SLACK_API_URL").unwrap_or_else(|| DEFAULT_API_URL.to_owned()),
    };
    Ok((SocketAddr::new(ip, port), config))
}

/// `flowcoach-dev app`: serves until Ctrl-C or SIGTERM (a service manager's stop).
pub fn run() -> ExitCode {
    flowcoach::logging::init(&LogSettings::default());
    let (listen, config) = match from_env() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("flowcoach-dev app: {error}");
            return ExitCode::from(64);
        }
    };
    let served = super::runtime().and_then(|rt| {
        rt.block_on(async {
            let app = DemoApp::start(listen, config).await?;
            println!("The demo app serves Slack's HTTP mode on {}", app.url);
            stop_requested().await
        })
    });
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("flowcoach-dev app: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Ctrl-C in a terminal, SIGTERM from systemd or `podman stop`: the app runs as PID 1 in a
/// container, where SIGTERM has no default action.
async fn stop_requested() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate())?;
    tokio::select! {
        interrupted = tokio::signal::ctrl_c() => interrupted,
        _ = terminate.recv() => Ok(()),
    }
}

struct App {
    config: AppConfig,
    http: reqwest::Client,
}

/// Why a Web API call failed.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("{0} could not be called")]
    Http(&'static str, #[source] reqwest::Error),
    #[error("{method} answered {error}")]
    Slack { method: &'static str, error: String },
}

/// `POST /slack/events`: events (JSON), slash commands (a form) and interactions (a form
/// with one field, `payload`), told apart as Bolt does: by content type and fields.
async fn slack_events(State(app): State<Arc<App>>, headers: HeaderMap, body: Bytes) -> Response {
    if let Err(why) = app.verify(&headers, &body) {
        warn!(%why, "refused a request without a valid signature");
        return StatusCode::UNAUTHORIZED.into_response();
    }
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if is_json {
        return match serde_json::from_slice::<Value>(&body) {
            Ok(request) => app.on_json(request),
            Err(_) => StatusCode::BAD_REQUEST.into_response(),
        };
    }
    let form: serde_json::Map<String, Value> = url::form_urlencoded::parse(&body)
        .map(|(k, v)| (k.into_owned(), Value::String(v.into_owned())))
        .collect();
    let interaction = form
        .get("payload")
        .and_then(Value::as_str)
        .and_then(|p| serde_json::from_str::<Value>(p).ok());
    match (interaction, form.contains_key("command")) {
        (Some(payload), _) => app.on_interaction(payload),
        (None, true) => on_command(&form),
        (None, false) => StatusCode::BAD_REQUEST.into_response(),
    }
}

/// Why a request's signature was refused.
#[derive(Debug, thiserror::Error)]
enum Unsigned {
    #[error("no {0} header")]
    Missing(&'static str),
    #[error(transparent)]
    Bad(#[from] signature::SignatureError),
}

impl App {
    fn verify(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), Unsigned> {
        let header = |name: &'static str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .ok_or(Unsigned::Missing(name))
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        signature::verify(
            self.config.signing_secret.as_bytes(),
            header(TIMESTAMP_HEADER)?,
            header(SIGNATURE_HEADER)?,
            body,
            now,
        )?;
        Ok(())
    }

    fn on_json(self: &Arc<Self>, request: Value) -> Response {
        match request["type"].as_str() {
            Some("url_verification") => {
                axum::Json(json!({"challenge": request["challenge"]})).into_response()
            }
            Some("event_callback") => {
                let event = &request["event"];
                if wants_a_greeting(event) {
                    let channel = event["channel"].as_str().unwrap_or_default().to_owned();
                    let user = event["user"].as_str().unwrap_or_default();
                    let text =
                        format!("Hello <@{user}>! (answered by the demo app behind flowcoach)");
                    // Answer Slack first (it wants a 2xx within 3 s), then reply.
                    let app = self.clone();
                    tokio::spawn(async move { app.post_message(&channel, &text).await });
                }
                StatusCode::OK.into_response()
            }
            _ => StatusCode::OK.into_response(),
        }
    }

    fn on_interaction(self: &Arc<Self>, payload: Value) -> Response {
        if payload["type"] == "block_actions"
            && let Some(url) = payload["response_url"].as_str()
        {
            let action = payload["actions"][0]["action_id"]
                .as_str()
                .unwrap_or("a button");
            let reply = json!({
                "response_type": "ephemeral",
                "replace_original": false,
                "text": format!("You pressed {action}. (the demo app, through response_url)"),
            });
            let (app, url) = (self.clone(), url.to_owned());
            tokio::spawn(async move { app.respond(&url, &reply).await });
        }
        // Block actions, view submissions (an empty body closes the modal) and the rest.
        StatusCode::OK.into_response()
    }

    async fn post_message(&self, channel: &str, text: &str) {
        let message = json!({"channel": channel, "text": text});
        match self.call("chat.postMessage", &message).await {
            Ok(answer) => info!(
                channel,
                ts = answer["ts"].as_str(),
                "replied in the channel"
            ),
            Err(error) => warn!(error = %error_chain(&error), "could not reply"),
        }
    }

    /// Calls a Web API method with the bot token and a JSON body.
    async fn call(&self, method: &'static str, arguments: &Value) -> Result<Value, CallError> {
        let answer: Value = self
            .http
            .post(format!("{}/{method}", self.config.api_url))
            .bearer_auth(&self.config.bot_token)
            .json(arguments)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| CallError::Http(method, e))?
            .json()
            .await
            .map_err(|e| CallError::Http(method, e))?;
        if answer["ok"] == true {
            Ok(answer)
        } else {
            Err(CallError::Slack {
                method,
                error: answer["error"].as_str().unwrap_or("no error").to_owned(),
            })
        }
    }

    async fn respond(&self, url: &str, reply: &Value) {
        let sent = self
            .http
            .post(url)
            .json(reply)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status);
        match sent {
            Ok(_) => info!("replied through response_url"),
            Err(error) => {
                warn!(error = %error_chain(&error), "could not reply through response_url")
            }
        }
    }
}

/// An `app_mention`, or a person's message that says hello (not a bot's: the app would
/// answer itself).
fn wants_a_greeting(event: &Value) -> bool {
    match event["type"].as_str() {
        Some("app_mention") => true,
        Some("message") => {
            event.get("bot_id").is_none()
                && event.get("subtype").is_none()
                && event["text"]
                    .as_str()
                    .is_some_and(|t| t.to_lowercase().contains("hello"))
        }
        _ => false,
    }
}

/// A slash command: `/hello` is answered in the response body, as an ephemeral message.
fn on_command(form: &serde_json::Map<String, Value>) -> Response {
    let field = |name: &str| form.get(name).and_then(Value::as_str).unwrap_or_default();
    let text = match field("command") {
        "/hello" => format!(
            "Hello <@{}>! (answered in the ack by the demo app behind flowcoach)",
            field("user_id")
        ),
        other => format!("The demo app knows /hello, not {other}."),
    };
    axum::Json(json!({"response_type": "ephemeral", "text": text})).into_response()
}

/// An error and its causes, for one log field.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        text.push_str(": ");
        text.push_str(&next.to_string());
        cause = next.source();
    }
    text
}
