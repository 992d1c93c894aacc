//! The path from a handler's answer back to the socket its envelope came on.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::{Notify, mpsc};

use crate::metrics::labels::EnvelopeType;
use flowcoach_protocol::{Ack, AckError};

/// Acks waiting to be written, counted per connection so a connection being retired can
/// close only once every envelope it delivered has been acked.
#[derive(Debug, Default)]
pub struct PendingAcks {
    count: AtomicUsize,
    drained: Notify,
}

impl PendingAcks {
    pub fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Resolves once the count is zero.
    pub async fn wait_drained(&self) {
        loop {
            let notified = self.drained.notified();
            if self.count() == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// An ack ready to be written, with what its metrics need: the envelope's type, and when
/// it arrived (the ack latency ends when the frame is written).
#[derive(Debug)]
pub struct AckFrame {
    pub text: String,
    pub kind: EnvelopeType,
    pub received_at: Instant,
}

/// The sending side of one connection's ack queue. Frames are written by the connection's
/// own task, the only writer of its socket, so frames never interleave.
#[derive(Debug, Clone)]
pub struct AckSink {
    frames: mpsc::UnboundedSender<AckFrame>,
    pending: Arc<PendingAcks>,
}

#[derive(Debug, thiserror::Error)]
pub enum AckSendError {
    #[error(transparent)]
    Refused(#[from] AckError),
    #[error("the connection that delivered envelope {0} is gone; Slack will redeliver it")]
    ConnectionGone(String),
}

impl AckSink {
    pub fn new(frames: mpsc::UnboundedSender<AckFrame>) -> (Self, Arc<PendingAcks>) {
        let pending = Arc::new(PendingAcks::default());
        (
            AckSink {
                frames,
                pending: pending.clone(),
            },
            pending,
        )
    }

    /// Promises an ack for `envelope_id`, received now: the connection stays open for it
    /// while retiring.
    pub fn expect(&self, envelope_id: String, kind: EnvelopeType) -> PendingAck {
        self.pending.count.fetch_add(1, Ordering::AcqRel);
        PendingAck {
            envelope_id,
            kind,
            received_at: Instant::now(),
            sink: self.clone(),
        }
    }
}

/// An ack that is owed. Sending consumes it; dropping it unsent releases the connection
/// without an ack (the envelope is then redelivered by Slack).
#[derive(Debug)]
pub struct PendingAck {
    envelope_id: String,
    kind: EnvelopeType,
    received_at: Instant,
    sink: AckSink,
}

impl PendingAck {
    pub fn envelope_id(&self) -> &str {
        &self.envelope_id
    }

    /// Queues the ack, with `payload` when the envelope accepts a response.
    pub fn send(self, payload: Option<serde_json::Value>) -> Result<(), AckSendError> {
        let ack = Ack {
            envelope_id: self.envelope_id.clone(),
            payload,
        };
        let frame = AckFrame {
            text: ack.to_frame()?,
            kind: self.kind,
            received_at: self.received_at,
        };
        self.sink
            .frames
            .send(frame)
            .map_err(|_| AckSendError::ConnectionGone(self.envelope_id.clone()))
    }
}

impl Drop for PendingAck {
    fn drop(&mut self) {
        let pending = &self.sink.pending;
        if pending.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            pending.drained.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn acks_are_queued_and_counted() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (sink, pending) = AckSink::new(tx);
        let first = sink.expect("e1".into(), EnvelopeType::EventsApi);
        let second = sink.expect("e2".into(), EnvelopeType::EventsApi);
        assert_eq!(pending.count(), 2);
        first.send(None).unwrap();
        assert_eq!(rx.recv().await.unwrap().text, r#"{"envelope_id":"e1"}"#);
        assert_eq!(pending.count(), 1);
        drop(second);
        tokio::time::timeout(std::time::Duration::from_secs(1), pending.wait_drained())
            .await
            .expect("drained");
    }

    #[tokio::test]
    async fn a_gone_connection_is_reported() {
        let (tx, rx) = mpsc::unbounded_channel();
        let (sink, pending) = AckSink::new(tx);
        drop(rx);
        let err = sink
            .expect("e9".into(), EnvelopeType::EventsApi)
            .send(None)
            .unwrap_err();
        assert!(matches!(err, AckSendError::ConnectionGone(id) if id == "e9"));
        assert_eq!(pending.count(), 0);
    }

    #[tokio::test]
    async fn oversized_responses_are_refused_not_sent() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (sink, _) = AckSink::new(tx);
        let huge = serde_json::json!({ "text": "x".repeat(30_000) });
        let err = sink
            .expect("e1".into(), EnvelopeType::EventsApi)
            .send(Some(huge))
            .unwrap_err();
        assert!(matches!(err, AckSendError::Refused(_)));
        assert!(rx.try_recv().is_err());
    }
}
