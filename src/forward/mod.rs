//! The forwarder: a [`Handler`] that re-sends each envelope to the app behind flowcoach as
//! the signed request Slack would send in HTTP mode, and turns the app's answer into the
//! ack. Unmodified HTTP-mode apps (Bolt's `/slack/events`) run behind it.
//!
//! Events are acked once the app answered 2xx ([`AckPolicy::WhenHandled`]): a failure
//! leaves them to Slack's redelivery. Slash commands and interactions carry the app's
//! answer in the ack; a slash command whose app fails gets `fallback_text`.

mod answer;
mod body;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use url::Url;

use crate::config::Forward;
use crate::dispatch::{AckPolicy, Handler, HandlerFuture, HandlerResult, Incoming};
use crate::http_body::{BodyError, read_capped};
use crate::metrics::timings;
use crate::state::{Counters, InstanceState};
use flowcoach_protocol::signature::{SIGNATURE_HEADER, TIMESTAMP_HEADER, sign};
use flowcoach_protocol::{Ack, AckError, Envelope, EnvelopeKind};

pub use body::{BuildError, HttpBody, build};

/// Slack's retry headers, from the envelope's `retry_attempt` and `retry_reason`.
const RETRY_NUM_HEADER: &str = "x-slack-retry-num";
const RETRY_REASON_HEADER: &str = "x-slack-retry-reason";
/// An app's answer header asking Slack not to retry the request.
const NO_RETRY_HEADER: &str = "x-slack-no-retry";

/// Why an envelope did not reach the app, or its answer was unusable.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("cannot build the request")]
    Build(#[from] BuildError),
    #[error("no answer from the app within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("cannot connect to the app")]
    Connect(#[source] reqwest::Error),
    #[error("the request to the app failed")]
    Send(#[source] reqwest::Error),
    #[error(
        "the app answered HTTP {status} (a redirect to {location}), which is not followed: forward.url must be the app's own URL"
    )]
    Redirect { status: u16, location: String },
    #[error("the app answered HTTP {0}")]
    Status(u16),
    #[error("the app's answer exceeds forward.max_response_bytes ({limit} bytes)")]
    TooLarge { limit: usize },
    #[error("cannot read the app's answer")]
    Read(#[source] reqwest::Error),
    #[error(transparent)]
    Answer(#[from] answer::AnswerError),
    /// Slack drops acks of 20 000 bytes or more: such an answer is the app's failure.
    #[error("the app's answer does not fit in an ack")]
    AckTooLarge(#[source] AckError),
}

#[derive(Debug, thiserror::Error)]
#[error("cannot set up the HTTP client for [forward]")]
pub struct SetupError(#[source] reqwest::Error);

/// A failed exchange: the error, the app's status if it answered, and whether it asked
/// Slack not to retry.
struct Failure {
    error: ForwardError,
    status: Option<u16>,
    no_retry: bool,
}

impl Failure {
    fn new(error: ForwardError) -> Self {
        Failure {
            error,
            status: None,
            no_retry: false,
        }
    }
}

/// The app's 2xx answer.
struct Answer {
    status: u16,
    payload: Option<Value>,
}

/// Forwards envelopes to the app of `[forward]`.
pub struct Forwarder {
    inner: Arc<Inner>,
}

struct Inner {
    client: reqwest::Client,
    forward: Forward,
    permits: Semaphore,
    state: Arc<InstanceState>,
    /// Whether the latest exchange failed: the shared status changes only when this flips
    /// (or the failure changes), not on every success.
    failing: AtomicBool,
}

impl Forwarder {
    pub fn new(forward: Forward, state: Arc<InstanceState>) -> Result<Self, SetupError> {
        let mut client = reqwest::Client::builder()
            // A redirect would send the signed request somewhere the operator did not
            // name: it is the app's misconfiguration, shown as such.
            .redirect(reqwest::redirect::Policy::none())
            // The app is named explicitly and usually sits beside flowcoach: proxies meant
            // for Slack's API (HTTPS_PROXY) are not for it.
            .no_proxy()
            .timeout(forward.timeout)
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .user_agent(concat!("flowcoach/", env!("CARGO_PKG_VERSION")));
        if let Some(socket) = &forward.socket {
            // Every connection to the app goes to its socket; the URL still gives the
            // path and the Host header the app sees.
            client = client.unix_socket(socket.as_path());
        }
        let client = client.build().map_err(SetupError)?;
        let urls = forward.describe_urls();
        state.update(|s| s.app_url = Some(urls));
        Ok(Forwarder {
            inner: Arc::new(Inner {
                client,
                permits: Semaphore::new(forward.max_concurrent),
                forward,
                state,
                failing: AtomicBool::new(false),
            }),
        })
    }
}

impl Handler for Forwarder {
    fn handle(&self, incoming: Incoming) -> HandlerFuture {
        let inner = self.inner.clone();
        Box::pin(async move { inner.forward(&incoming.envelope).await })
    }

    fn ack_policy(&self) -> AckPolicy {
        AckPolicy::WhenHandled
    }
}

impl Inner {
    fn url(&self, kind: EnvelopeKind) -> &Url {
        match kind {
            EnvelopeKind::EventsApi => &self.forward.events_url,
            EnvelopeKind::SlashCommands => &self.forward.commands_url,
            EnvelopeKind::Interactive => &self.forward.interactions_url,
        }
    }

    async fn forward(&self, envelope: &Envelope) -> HandlerResult {
        let started = Instant::now();
        let outcome = self.exchange(envelope).await;
        let elapsed = started.elapsed();
        timings::observe(&self.state.timings.forward_latency, elapsed);
        let elapsed_ms = elapsed.as_millis() as u64;
        let counters = &self.state.counters;
        let envelope_id = envelope.envelope_id.as_str();
        let kind = envelope.kind.as_str();
        match outcome {
            Ok(answer) => {
                Counters::bump(&counters.forwarded);
                if self.failing.swap(false, Ordering::Relaxed) {
                    self.state.update(|s| s.app_failing = None);
                }
                if envelope.accepts_response_payload {
                    // Low volume and seen by people: each answer is worth a line.
                    tracing::info!(
                        envelope_id,
                        kind,
                        status = answer.status,
                        elapsed_ms,
                        answered = answer.payload.is_some(),
                        "the app answered"
                    );
                    Ok(answer.payload)
                } else {
                    tracing::debug!(
                        envelope_id,
                        kind,
                        status = answer.status,
                        elapsed_ms,
                        "the app took the envelope"
                    );
                    Ok(None)
                }
            }
            Err(failure) => {
                Counters::bump(&counters.forward_failed);
                let error = error_chain(&failure.error);
                self.failing.store(true, Ordering::Relaxed);
                self.state.update(|s| {
                    s.app_failing = Some(error.clone());
                    s.app_last_error = Some(error.clone());
                });
                tracing::warn!(
                    envelope_id,
                    kind,
                    status = failure.status,
                    elapsed_ms,
                    error,
                    "the app did not take the envelope"
                );
                if envelope.accepts_response_payload {
                    Ok(self.fallback(envelope.kind))
                } else if failure.no_retry {
                    tracing::info!(
                        envelope_id,
                        "acked all the same: the app asked for no retry (X-Slack-No-Retry)"
                    );
                    Ok(None)
                } else {
                    Err(failure.error.into())
                }
            }
        }
    }

    /// The ephemeral reply to a slash command whose app failed, if one is configured.
    fn fallback(&self, kind: EnvelopeKind) -> Option<Value> {
        let text = &self.forward.fallback_text;
        (kind == EnvelopeKind::SlashCommands && !text.is_empty())
            .then(|| json!({ "response_type": "ephemeral", "text": text }))
    }

    async fn exchange(&self, envelope: &Envelope) -> Result<Answer, Failure> {
        let body = build(envelope).map_err(|e| Failure::new(e.into()))?;
        let _permit = self.permits.acquire().await.expect("never closed");
        // Signed now, as it is sent: a request that waited for a permit is not stale.
        let timestamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let signature = sign(
            self.forward.signing_secret.expose_secret(),
            timestamp,
            &body.bytes,
        );
        let mut request = self
            .client
            .post(self.url(envelope.kind).clone())
            .header(reqwest::header::CONTENT_TYPE, body.content_type)
            .header(TIMESTAMP_HEADER, timestamp)
            .header(SIGNATURE_HEADER, signature);
        if let Some(attempt) = envelope.retry_attempt.filter(|n| *n > 0) {
            request = request.header(RETRY_NUM_HEADER, attempt);
        }
        if let Some(reason) = envelope.retry_reason.as_deref().filter(|r| !r.is_empty()) {
            request = request.header(RETRY_REASON_HEADER, reason);
        }
        let response = request
            .body(body.bytes)
            .send()
            .await
            .map_err(|e| Failure::new(self.request_error(e)))?;
        let status = response.status();
        let no_retry = response
            .headers()
            .get(NO_RETRY_HEADER)
            .is_some_and(|v| v.as_bytes() == b"1");
        let fail = |error| Failure {
            error,
            status: Some(status.as_u16()),
            no_retry,
        };
        if status.is_redirection() {
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("nowhere")
                .to_owned();
            return Err(fail(ForwardError::Redirect {
                status: status.as_u16(),
                location,
            }));
        }
        if !status.is_success() {
            return Err(fail(ForwardError::Status(status.as_u16())));
        }
        let bytes = read_capped(response, self.forward.max_response_bytes)
            .await
            .map_err(|e| {
                fail(match e {
                    BodyError::TooLarge { limit } => ForwardError::TooLarge { limit },
                    BodyError::Read(source) => match self.request_error(source) {
                        ForwardError::Send(source) => ForwardError::Read(source),
                        other => other,
                    },
                })
            })?;
        // Slack reads the answer's body only where it has a use for it.
        let payload = if envelope.accepts_response_payload {
            let ack = Ack {
                envelope_id: envelope.envelope_id.clone(),
                payload: answer::payload(&bytes).map_err(|e| fail(e.into()))?,
            };
            ack.to_frame()
                .map_err(|e| fail(ForwardError::AckTooLarge(e)))?;
            ack.payload
        } else {
            None
        };
        Ok(Answer {
            status: status.as_u16(),
            payload,
        })
    }

    fn request_error(&self, error: reqwest::Error) -> ForwardError {
        let error = error.without_url();
        if error.is_timeout() {
            ForwardError::Timeout(self.forward.timeout)
        } else if error.is_connect() {
            ForwardError::Connect(error)
        } else {
            ForwardError::Send(error)
        }
    }
}

/// The error and its causes in one line, for logs and status: "cannot connect to the app:
/// … : Connection refused (os error 111)".
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
