//! Envelope routing: deduplication, acks, bounded concurrent handlers, in-flight tracking.

mod ack;
mod dedup;
mod handler;

pub use ack::{AckFrame, AckSendError, AckSink, PendingAck, PendingAcks};
pub use dedup::{Dedup, DedupSnapshot};
pub use handler::{AckPolicy, Handler, HandlerError, HandlerFuture, HandlerResult, Incoming};

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::config::{DispatchSettings, Settings};
use crate::inbox::Inbox;
use crate::inbox::delivery::Running;
use crate::metrics::labels::EnvelopeType;
use crate::state::{Counters, InstanceState};
use flowcoach_protocol::Envelope;

/// The envelopes seen recently, under one lock.
struct Seen {
    /// Keys handled (or being handled): redeliveries are acked, not handled again.
    dedup: Dedup,
    /// Keys of envelopes whose [`AckPolicy::WhenHandled`] handler has not finished: a
    /// redelivery meanwhile is neither handled again nor acked, since the first delivery
    /// may still fail.
    taking: HashSet<String>,
}

/// What happened to one envelope on arrival.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// Handed to a handler.
    Dispatched,
    /// Queued for the inbox: acked once on disk, delivered from there.
    Kept,
    /// Seen before: acked again, not handled again.
    Duplicate,
    /// Not acked, so Slack redelivers it (queue full, or the service is stopping).
    Deferred,
    /// Kept, unacked, until a handover brings the predecessor's deduplication state.
    Held,
    /// Arrived while the service stops taking envelopes: kept, unacked, for a successor to
    /// ack on its own socket (a handover), else left for Slack to redeliver.
    Orphaned,
}

/// Routes envelopes to the handler. Cheap to share: connections call [`Dispatcher::accept`]
/// from their read loops, which never waits on a handler.
pub struct Dispatcher {
    handler: Arc<dyn Handler>,
    /// Settings that a reload (SIGHUP) may change; the deadline is read per envelope.
    live: watch::Receiver<Settings>,
    state: Arc<InstanceState>,
    seen: Arc<std::sync::Mutex<Seen>>,
    /// Handlers running or queued; bounds memory.
    admitted: Arc<Semaphore>,
    /// Handlers running.
    running: Arc<Semaphore>,
    tracker: TaskTracker,
    accepting: AtomicBool,
    /// `Some` while a successor waits for its predecessor's deduplication state: envelopes
    /// wait here, unacked, so that none is handled twice and, if the handover fails,
    /// none is lost (Slack redelivers them).
    held: std::sync::Mutex<Option<Vec<(Envelope, PendingAck)>>>,
    /// Envelopes that reached this process on a socket that can no longer ack them (they
    /// arrived after our Close), or that a predecessor handed on for the same reason: they
    /// wait here for another socket of this process, or for a successor.
    orphans: std::sync::Mutex<Vec<Envelope>>,
    orphan_added: Notify,
    /// Where events and answerless interactions go when the inbox is on.
    inbox: Option<Arc<Inbox>>,
    /// Delivery from the inbox, while this process holds the instance.
    delivery: std::sync::Mutex<Option<Running>>,
}

impl Dispatcher {
    /// Queue bounds and the deduplication window are fixed at start; the response
    /// deadline follows reloads.
    pub fn new(
        handler: Arc<dyn Handler>,
        live: watch::Receiver<Settings>,
        state: Arc<InstanceState>,
    ) -> Self {
        let settings: DispatchSettings = live.borrow().dispatch.clone();
        let admitted = settings.max_concurrent_handlers + settings.max_queued_handlers;
        Dispatcher {
            handler,
            seen: Arc::new(std::sync::Mutex::new(Seen {
                dedup: Dedup::new(settings.dedup_ttl, settings.dedup_capacity),
                taking: HashSet::new(),
            })),
            admitted: Arc::new(Semaphore::new(admitted)),
            running: Arc::new(Semaphore::new(settings.max_concurrent_handlers)),
            live,
            state,
            tracker: TaskTracker::new(),
            accepting: AtomicBool::new(true),
            held: std::sync::Mutex::new(None),
            orphans: std::sync::Mutex::new(Vec::new()),
            orphan_added: Notify::new(),
            inbox: None,
            delivery: std::sync::Mutex::new(None),
        }
    }

    /// Events and interactions that take no answer go to `inbox` from now on.
    pub fn with_inbox(mut self, inbox: Option<Arc<Inbox>>) -> Self {
        self.inbox = inbox;
        self
    }

    pub fn inbox(&self) -> Option<&Arc<Inbox>> {
        self.inbox.as_ref()
    }

    /// Starts delivering from the inbox (if any): called once this process holds the
    /// instance, so that one process at a time delivers.
    pub fn start_delivery(&self) {
        let Some(inbox) = &self.inbox else {
            return;
        };
        let mut delivery = self.delivery.lock().expect("delivery lock poisoned");
        if delivery.is_none() {
            *delivery = Some(inbox.deliver(self.handler.clone()));
        }
    }

    /// A dispatcher for a successor: it holds envelopes until [`Dispatcher::release`].
    pub fn held(
        handler: Arc<dyn Handler>,
        live: watch::Receiver<Settings>,
        state: Arc<InstanceState>,
    ) -> Self {
        let dispatcher = Self::new(handler, live, state);
        *dispatcher.held.lock().expect("held lock poisoned") = Some(Vec::new());
        dispatcher
    }

    /// Ends holding: takes over the predecessor's deduplication state (if any), then
    /// dispatches the held envelopes as if they had just arrived.
    pub fn release(&self, predecessor: Option<DedupSnapshot>) {
        if let Some(snapshot) = predecessor {
            let entries = snapshot.len();
            let adopted = self
                .seen
                .lock()
                .expect("dedup lock poisoned")
                .dedup
                .adopt(snapshot, Instant::now());
            if adopted {
                tracing::info!(entries, "took over the predecessor's deduplication state");
            } else {
                tracing::warn!(
                    "deduplication state not taken over: this instance already handled envelopes"
                );
            }
        }
        let held = self.held.lock().expect("held lock poisoned").take();
        for (envelope, pending) in held.unwrap_or_default() {
            self.dispatch(envelope, pending);
        }
    }

    /// The deduplication state, for a successor (taken after the drain, so it is final).
    /// Envelopes that a [`AckPolicy::WhenHandled`] handler still has (it outlasted the
    /// drain) are left out, and forgotten here too: they were not taken, and their
    /// redelivery must be handled, by the successor or, after a rollback, by us.
    pub fn dedup_snapshot(&self) -> DedupSnapshot {
        let mut seen = self.seen.lock().expect("dedup lock poisoned");
        let Seen { dedup, taking } = &mut *seen;
        for key in taking.iter() {
            dedup.forget(key);
        }
        dedup.snapshot(Instant::now())
    }

    /// Takes envelopes again after [`Dispatcher::stop_accepting`] and a drain: a handover
    /// that failed rolls back to serving.
    pub fn resume(&self) {
        self.tracker.reopen();
        self.accepting.store(true, Ordering::Release);
        self.start_delivery();
    }

    /// Takes one envelope from the connection `acks` belongs to.
    pub fn accept(&self, envelope: Envelope, acks: &AckSink) -> Accepted {
        let kind = EnvelopeType::from(envelope.kind);
        self.state.counters.envelopes_received.bump(kind);
        let pending = acks.expect(envelope.envelope_id.clone(), kind);
        {
            let mut held = self.held.lock().expect("held lock poisoned");
            if let Some(queue) = held.as_mut() {
                let room = self.live.borrow().dispatch.max_queued_handlers;
                if queue.len() >= room {
                    return self.defer(
                        &envelope,
                        "the queue of envelopes held for a handover is full",
                    );
                }
                queue.push((envelope, pending));
                return Accepted::Held;
            }
        }
        self.dispatch(envelope, pending)
    }

    fn dispatch(&self, envelope: Envelope, pending: PendingAck) -> Accepted {
        let counters = &self.state.counters;
        let summary = envelope.summary();
        // Slack's event_id survives redeliveries; the envelope id does not, but it is all
        // slash commands and interactions have.
        if let Some(inbox) = self
            .inbox
            .as_ref()
            .filter(|_| !envelope.accepts_response_payload)
        {
            // Deduplicated by the store, where the keys outlive this process. Kept even
            // while draining: once on disk, whoever holds the instance next delivers it.
            return match inbox.keep(&envelope, &summary, pending) {
                Ok(()) => Accepted::Kept,
                Err(full) => self.defer(&envelope, &full.to_string()),
            };
        }
        let key = summary.event_id.as_deref().unwrap_or(&envelope.envelope_id);
        let now = Instant::now();
        let mut seen = self.seen.lock().expect("dedup lock poisoned");
        if seen.dedup.contains(key, now) {
            let taking = seen.taking.contains(key);
            drop(seen);
            if taking {
                return self.defer(
                    &envelope,
                    "a redelivery while the handler still has the first delivery",
                );
            }
            tracing::info!(
                envelope_id = %envelope.envelope_id,
                event_id = summary.event_id.as_deref(),
                retry_attempt = envelope.retry_attempt,
                "duplicate delivery acked again, not handled again"
            );
            counters
                .envelopes_deduplicated
                .bump(EnvelopeType::from(envelope.kind));
            self.send_ack(pending, None);
            return Accepted::Duplicate;
        }
        if !self.accepting.load(Ordering::Acquire) {
            // Draining for a stop or a handover: a successor can still take it, as it takes
            // what arrives after the Close.
            drop(seen);
            drop(pending);
            self.orphan(envelope);
            return Accepted::Orphaned;
        }
        let Ok(admission) = self.admitted.clone().try_acquire_owned() else {
            return self.defer(&envelope, "the handler queue is full");
        };
        seen.dedup.insert(key, now);
        // The response rides in the ack only where Slack accepts one; everything else is
        // acked as the handler's policy says.
        let policy = (!envelope.accepts_response_payload).then(|| self.handler.ack_policy());
        if policy == Some(AckPolicy::WhenHandled) {
            seen.taking.insert(key.to_owned());
        }
        drop(seen);
        let owed = match policy {
            None => Owed::Answer(pending),
            Some(AckPolicy::OnAccept) => {
                self.send_ack(pending, None);
                Owed::Nothing
            }
            Some(AckPolicy::WhenHandled) => Owed::WhenHandled {
                pending,
                key: key.to_owned(),
            },
        };
        let job = Job {
            handler: self.handler.clone(),
            seen: self.seen.clone(),
            state: self.state.clone(),
            running: self.running.clone(),
            response_deadline: self.live.borrow().dispatch.response_deadline,
            accepted_at: now,
        };
        Counters::bump(&counters.in_flight);
        self.tracker.spawn(async move {
            let _admission = admission;
            job.run(Incoming { envelope, summary }, owed).await;
        });
        Accepted::Dispatched
    }

    /// Keeps an envelope that its socket can no longer ack, for another socket (Slack
    /// matches acks by envelope id, on any socket of the app) or a successor. Bounded like
    /// the handler queue: beyond that it is left for Slack to redeliver.
    pub fn orphan(&self, envelope: Envelope) {
        let room = self.live.borrow().dispatch.max_queued_handlers;
        let mut orphans = self.orphans.lock().expect("orphans lock poisoned");
        if orphans.len() >= room {
            drop(orphans);
            self.defer(&envelope, "too many envelopes wait for another socket");
            return;
        }
        orphans.push(envelope);
        drop(orphans);
        self.orphan_added.notify_waiters();
    }

    /// The envelopes waiting for another socket, in arrival order.
    pub fn take_orphans(&self) -> Vec<Envelope> {
        std::mem::take(&mut *self.orphans.lock().expect("orphans lock poisoned"))
    }

    /// Resolves once an envelope waits for another socket.
    pub async fn orphaned(&self) {
        loop {
            let added = self.orphan_added.notified();
            if !self
                .orphans
                .lock()
                .expect("orphans lock poisoned")
                .is_empty()
            {
                return;
            }
            added.await;
        }
    }

    fn defer(&self, envelope: &Envelope, why: &str) -> Accepted {
        self.state
            .counters
            .envelopes_deferred
            .bump(EnvelopeType::from(envelope.kind));
        tracing::warn!(
            envelope_id = %envelope.envelope_id,
            "{why}: envelope left unacked for Slack to redeliver"
        );
        Accepted::Deferred
    }

    fn send_ack(&self, pending: PendingAck, payload: Option<serde_json::Value>) {
        send_ack(&self.state.counters, pending, payload);
    }

    /// Stops taking new envelopes: from now on they wait unacked with the orphans
    /// ([`Dispatcher::take_orphans`]), for a successor, or for Slack's redelivery.
    /// Delivery from the inbox stops too: a successor delivers next.
    pub fn stop_accepting(&self) {
        self.accepting.store(false, Ordering::Release);
        if let Some(delivery) = &*self.delivery.lock().expect("delivery lock poisoned") {
            delivery.cancel();
        }
    }

    /// Resolves when every accepted envelope has been handled, and deliveries from the
    /// inbox have ended (call after [`Dispatcher::stop_accepting`]).
    pub async fn wait_idle(&self) {
        self.tracker.close();
        let delivery = self.delivery.lock().expect("delivery lock poisoned").take();
        if let Some(delivery) = delivery {
            delivery.stop().await;
        }
        self.tracker.wait().await;
    }

    /// Envelopes accepted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.tracker.len()
    }
}

pub(crate) fn send_ack(
    counters: &Counters,
    pending: PendingAck,
    payload: Option<serde_json::Value>,
) {
    match pending.send(payload) {
        Ok(()) => {}
        Err(AckSendError::Refused(error)) => {
            Counters::bump(&counters.acks_failed);
            tracing::error!(%error, "response not sent");
        }
        Err(error @ AckSendError::ConnectionGone(_)) => {
            Counters::bump(&counters.acks_failed);
            tracing::warn!(%error, "ack not sent");
        }
    }
}

/// What is still owed to Slack for a dispatched envelope.
enum Owed {
    /// Acked on accept.
    Nothing,
    /// The ack, with the handler's answer if it comes by the response deadline.
    Answer(PendingAck),
    /// The ack once the handler has taken the envelope ([`AckPolicy::WhenHandled`]);
    /// `key` is its deduplication key, forgotten if the handler fails.
    WhenHandled { pending: PendingAck, key: String },
}

/// One handler invocation and the ack that depends on it.
struct Job {
    handler: Arc<dyn Handler>,
    seen: Arc<std::sync::Mutex<Seen>>,
    state: Arc<InstanceState>,
    running: Arc<Semaphore>,
    response_deadline: Duration,
    accepted_at: Instant,
}

impl Job {
    async fn run(self, incoming: Incoming, owed: Owed) {
        let counters = &self.state.counters;
        let envelope_id = incoming.envelope.envelope_id.clone();
        let deadline = self.accepted_at + self.response_deadline;
        let unacked_on_error = matches!(owed, Owed::WhenHandled { .. });
        let outcome = match owed {
            Owed::Nothing => self.invoke(incoming).await,
            Owed::WhenHandled { pending, key } => {
                let outcome = self.invoke(incoming).await;
                let mut seen = self.seen.lock().expect("dedup lock poisoned");
                match &outcome {
                    Ok(_) => send_ack(counters, pending, None),
                    Err(_) => {
                        // Dropped unsent: Slack redelivers it, and the redelivery must not
                        // be taken for a duplicate.
                        seen.dedup.forget(&key);
                        drop(pending);
                    }
                }
                seen.taking.remove(&key);
                drop(seen);
                outcome
            }
            Owed::Answer(pending) => {
                let invocation = self.invoke(incoming);
                tokio::pin!(invocation);
                tokio::select! {
                    outcome = &mut invocation => {
                        let payload = outcome.as_ref().ok().cloned().flatten();
                        send_ack(counters, pending, payload);
                        outcome
                    }
                    _ = tokio::time::sleep_until(deadline) => {
                        // Slack's deadline is 3 s: ack now, without the answer, rather
                        // than have the envelope redelivered and handled twice.
                        send_ack(counters, pending, None);
                        let outcome = invocation.await;
                        Counters::bump(&counters.late_responses);
                        tracing::warn!(
                            %envelope_id,
                            deadline_ms = self.response_deadline.as_millis() as u64,
                            "handler answered after the response deadline; acked without its response"
                        );
                        outcome
                    }
                }
            }
        };
        if let Err(error) = outcome {
            Counters::bump(&counters.handler_errors);
            if unacked_on_error {
                tracing::warn!(
                    %envelope_id,
                    %error,
                    "handler failed; envelope left unacked for Slack to redeliver"
                );
            } else {
                tracing::error!(%envelope_id, %error, "handler failed");
            }
        }
        counters
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }

    async fn invoke(&self, incoming: Incoming) -> HandlerResult {
        let _permit = self
            .running
            .acquire()
            .await
            .map_err(|_| HandlerError::from("handler pool closed"))?;
        self.handler.handle(incoming).await
    }
}
