//! The interface between envelope routing and the bot's behaviour.

use std::future::Future;
use std::pin::Pin;

use flowcoach_protocol::{Envelope, PayloadSummary};

pub type HandlerError = Box<dyn std::error::Error + Send + Sync>;

/// A handler's answer: `Some(payload)` goes into the ack when the envelope accepts a
/// response payload, and is ignored otherwise.
pub type HandlerResult = Result<Option<serde_json::Value>, HandlerError>;

pub type HandlerFuture = Pin<Box<dyn Future<Output = HandlerResult> + Send>>;

/// One envelope handed to a handler, with its payload's routing fields already read.
#[derive(Debug)]
pub struct Incoming {
    pub envelope: Envelope,
    pub summary: PayloadSummary,
}

/// When an envelope that takes no response payload (an event, most interactions) is
/// acked. Envelopes that take one are always acked with the handler's answer, or without
/// it at the response deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckPolicy {
    /// As soon as it is accepted, before the handler runs: a slow handler never costs a
    /// redelivery, and what the handler does with it is its own affair.
    OnAccept,
    /// Once the handler has taken it (`Ok`). An `Err` leaves it unacked, and forgotten by
    /// the deduplication, so that Slack's redelivery is handled again: at least once,
    /// for handlers that hand envelopes on to something that may fail.
    WhenHandled,
}

/// Bot behaviour. Handlers run concurrently (up to the configured bound) on the async
/// runtime; CPU-heavy work belongs in `tokio::task::spawn_blocking`.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, incoming: Incoming) -> HandlerFuture;

    /// When envelopes without a response payload are acked; read once per envelope.
    fn ack_policy(&self) -> AckPolicy {
        AckPolicy::OnAccept
    }
}
