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

/// Bot behaviour. Handlers run concurrently (up to the configured bound) on the async
/// runtime; CPU-heavy work belongs in `tokio::task::spawn_blocking`.
pub trait Handler: Send + Sync + 'static {
    fn handle(&self, incoming: Incoming) -> HandlerFuture;
}
