//! Envelopes from injection to ack: the queue of envelopes waiting for a socket, ack
//! deadlines, redelivery of unacked events and giving up.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, warn};

use super::record::{Delivery, EnvelopeRecord, SocketId};
use super::registry::SocketCommand;
use super::spec::EnvelopeSpec;
use super::state::{Inner, Shared};
use super::timers::sleep_until_some;
use flowcoach_protocol::{Ack, Envelope, EnvelopeKind};

/// What happens when an envelope's ack deadline passes.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Expiry {
    Redeliver { retry_attempt: u32 },
    GiveUp,
}

/// Slack retries only Events API envelopes (the user of a slash command or button sees an
/// error instead), and at most `max_retries` times.
pub(super) fn on_deadline(kind: EnvelopeKind, deliveries_made: u32, max_retries: u32) -> Expiry {
    if kind == EnvelopeKind::EventsApi && deliveries_made <= max_retries {
        Expiry::Redeliver {
            retry_attempt: deliveries_made,
        }
    } else {
        Expiry::GiveUp
    }
}

/// Envelopes neither acked nor given up, and the bookkeeping to deliver them.
pub(super) struct Deliveries {
    ack_deadline: Duration,
    max_retries: u32,
    timer_wakeup: Arc<Notify>,
    next_seq: u64,
    /// Position of every envelope ever injected in `Record::envelopes`.
    index: HashMap<String, usize>,
    unfinished: HashMap<String, Unfinished>,
    /// Per app, envelopes waiting for a socket that accepts them.
    waiting: HashMap<String, VecDeque<String>>,
    /// Ack deadlines in the order they fall due: every delivery adds `now + ack_deadline`,
    /// so pushing at the back keeps the queue sorted. Entries of envelopes acked since are
    /// skipped when they come due.
    deadlines: VecDeque<Deadline>,
}

struct Unfinished {
    app_id: String,
    kind: EnvelopeKind,
    accepts_response_payload: bool,
    payload: Box<RawValue>,
    deliveries_made: u32,
}

struct Deadline {
    due: Instant,
    envelope_id: String,
    /// Which delivery this deadline belongs to; an older one is void after a redelivery.
    delivery_no: u32,
}

impl Deliveries {
    pub(super) fn new(ack_deadline: Duration, max_retries: u32, timer_wakeup: Arc<Notify>) -> Self {
        Deliveries {
            ack_deadline,
            max_retries,
            timer_wakeup,
            next_seq: 0,
            index: HashMap::new(),
            unfinished: HashMap::new(),
            waiting: HashMap::new(),
            deadlines: VecDeque::new(),
        }
    }

    /// True while the envelope is neither acked nor given up.
    pub(super) fn is_outstanding(&self, envelope_id: &str) -> bool {
        self.unfinished.contains_key(envelope_id)
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.front().map(|d| d.due)
    }

    /// A UUID-shaped id whose last group is a sequence number, so ids never repeat.
    fn new_envelope_id(&mut self) -> (String, u64) {
        self.next_seq += 1;
        let seq = self.next_seq;
        let r = rand::random::<u64>();
        let id = format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{seq:012x}",
            r >> 32,
            (r >> 16) & 0xffff,
            r & 0xfff,
            0x8000 | (r.rotate_left(7) & 0x3fff)
        );
        (id, seq)
    }
}

impl Inner {
    /// Records the envelope and delivers it, or queues it until the app has a socket.
    pub(super) fn inject(&mut self, app_id: &str, spec: EnvelopeSpec, now: Instant) -> String {
        let (envelope_id, seq) = self.deliveries.new_envelope_id();
        let response_url = self.response_url(&envelope_id);
        let content = spec.into_content(app_id, seq, &response_url);
        let payload = RawValue::from_string(content.payload.to_string())
            .expect("a serde_json::Value prints as valid JSON");
        self.deliveries
            .index
            .insert(envelope_id.clone(), self.record.envelopes.len());
        self.record.envelopes.push(EnvelopeRecord {
            envelope_id: envelope_id.clone(),
            app_id: app_id.to_owned(),
            kind: content.kind,
            event_id: content.event_id,
            deliveries: Vec::new(),
            acked_at: None,
            ack_socket: None,
            ack_payload: None,
            extra_acks: 0,
            gave_up: false,
            pending_since: now,
        });
        self.deliveries.unfinished.insert(
            envelope_id.clone(),
            Unfinished {
                app_id: app_id.to_owned(),
                kind: content.kind,
                accepts_response_payload: content.accepts_response_payload,
                payload,
                deliveries_made: 0,
            },
        );
        self.dispatch(&envelope_id, now);
        envelope_id
    }

    /// Sends the envelope's next delivery to a random accepting socket of its app, or puts
    /// it in the app's waiting queue.
    fn dispatch(&mut self, envelope_id: &str, now: Instant) {
        let Some(envelope) = self.deliveries.unfinished.get_mut(envelope_id) else {
            return;
        };
        let retry_attempt = envelope.deliveries_made;
        let is_event = envelope.kind == EnvelopeKind::EventsApi;
        let retry_reason = if retry_attempt == 0 { "" } else { "timeout" };
        let frame = Envelope {
            envelope_id: envelope_id.to_owned(),
            kind: envelope.kind,
            accepts_response_payload: envelope.accepts_response_payload,
            payload: envelope.payload.clone(),
            // Only Events API envelopes carry the retry fields.
            retry_attempt: is_event.then_some(retry_attempt),
            retry_reason: is_event.then(|| retry_reason.to_owned()),
        };
        let text = match serde_json::to_string(&frame) {
            Ok(text) => text,
            Err(e) => {
                warn!(envelope = envelope_id, error = %e, "envelope could not be serialised");
                return;
            }
        };
        let receiver = self
            .sockets
            .pick_receiver(&envelope.app_id)
            .filter(|&socket| {
                self.sockets.send(
                    socket,
                    SocketCommand::Deliver {
                        envelope_id: envelope_id.to_owned(),
                        frame: Message::text(text),
                    },
                )
            });
        let Some(socket) = receiver else {
            debug!(
                envelope = envelope_id,
                app = envelope.app_id,
                "no socket accepts envelopes; queued"
            );
            self.deliveries
                .waiting
                .entry(envelope.app_id.clone())
                .or_default()
                .push_back(envelope_id.to_owned());
            return;
        };
        envelope.deliveries_made += 1;
        debug!(
            envelope = envelope_id,
            socket, retry_attempt, "envelope delivered"
        );
        let delivery_no = envelope.deliveries_made;
        if let Some(&i) = self.deliveries.index.get(envelope_id) {
            self.record.envelopes[i].deliveries.push(Delivery {
                socket,
                at: now,
                retry_attempt,
            });
        }
        if self.deliveries.deadlines.is_empty() {
            self.deliveries.timer_wakeup.notify_one();
        }
        let due = now + self.deliveries.ack_deadline;
        self.deliveries.deadlines.push_back(Deadline {
            due,
            envelope_id: envelope_id.to_owned(),
            delivery_no,
        });
    }

    /// Envelopes routed to `socket` that its task never wrote: the client closed first (its
    /// Close came in while they waited in the socket's queue). Nothing went out, so, as on
    /// Slack's side, they go to another socket now rather than wait for a redelivery.
    pub(super) fn never_sent(&mut self, socket: SocketId, envelope_ids: Vec<String>, now: Instant) {
        for envelope_id in envelope_ids {
            let Some(envelope) = self.deliveries.unfinished.get_mut(&envelope_id) else {
                continue;
            };
            let Some(&i) = self.deliveries.index.get(&envelope_id) else {
                continue;
            };
            let deliveries = &mut self.record.envelopes[i].deliveries;
            if deliveries.last().is_none_or(|d| d.socket != socket) {
                continue;
            }
            deliveries.pop();
            let void = envelope.deliveries_made;
            envelope.deliveries_made -= 1;
            self.deliveries
                .deadlines
                .retain(|d| !(d.envelope_id == envelope_id && d.delivery_no == void));
            debug!(envelope = envelope_id, socket, "never sent; routed again");
            self.dispatch(&envelope_id, now);
        }
    }

    /// Delivers the envelopes that waited for a socket of this app.
    pub(super) fn deliver_waiting(&mut self, app_id: &str, now: Instant) {
        let Some(queue) = self.deliveries.waiting.remove(app_id) else {
            return;
        };
        for envelope_id in queue {
            self.dispatch(&envelope_id, now);
        }
    }

    /// A text frame from a client: an ack, or a frame the sim counts as unknown.
    pub(super) fn on_client_text(&mut self, socket: SocketId, text: &str, now: Instant) {
        let Ok(ack) = serde_json::from_str::<Ack>(text) else {
            debug!(socket, frame = text, "client frame is not an ack");
            self.record.unknown_acks += 1;
            return;
        };
        let Some(&i) = self.deliveries.index.get(&ack.envelope_id) else {
            debug!(
                socket,
                envelope = ack.envelope_id,
                "ack for an unknown envelope"
            );
            self.record.unknown_acks += 1;
            return;
        };
        let record = &mut self.record.envelopes[i];
        if record.acked_at.is_some() {
            record.extra_acks += 1;
            return;
        }
        debug!(socket, envelope = ack.envelope_id, "envelope acked");
        record.acked_at = Some(now);
        record.ack_socket = Some(socket);
        record.ack_payload = ack.payload;
        // An envelope waiting for redelivery stays in its queue; dispatch skips it.
        self.deliveries.unfinished.remove(&ack.envelope_id);
    }

    /// Redelivers or gives up every envelope whose ack deadline has passed.
    pub(super) fn expire_due(&mut self, now: Instant) {
        while self
            .deliveries
            .next_deadline()
            .is_some_and(|due| due <= now)
        {
            let Some(deadline) = self.deliveries.deadlines.pop_front() else {
                break;
            };
            let Some(envelope) = self.deliveries.unfinished.get(&deadline.envelope_id) else {
                continue;
            };
            if envelope.deliveries_made != deadline.delivery_no {
                continue;
            }
            match on_deadline(
                envelope.kind,
                envelope.deliveries_made,
                self.deliveries.max_retries,
            ) {
                Expiry::Redeliver { .. } => self.dispatch(&deadline.envelope_id, now),
                Expiry::GiveUp => {
                    debug!(envelope = deadline.envelope_id, "no ack; giving up");
                    self.deliveries.unfinished.remove(&deadline.envelope_id);
                    if let Some(&i) = self.deliveries.index.get(&deadline.envelope_id) {
                        self.record.envelopes[i].gave_up = true;
                    }
                }
            }
        }
    }
}

/// Sleeps until the earliest ack deadline, then expires what is due; woken early when a
/// deadline is set while none was pending.
pub(super) async fn run_redelivery_timer(shared: Arc<Shared>) {
    loop {
        let next = shared.read(|inner| inner.deliveries.next_deadline());
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            () = shared.timer_wakeup.notified() => {}
            () = sleep_until_some(next) => {
                shared.update(|inner| inner.expire_due(Instant::now()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SimConfig;
    use flowcoach_protocol::{Inbound, parse_inbound};
    use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

    #[test]
    fn retry_policy_redelivers_events_up_to_the_limit() {
        let events = EnvelopeKind::EventsApi;
        assert_eq!(
            on_deadline(events, 1, 3),
            Expiry::Redeliver { retry_attempt: 1 }
        );
        assert_eq!(
            on_deadline(events, 3, 3),
            Expiry::Redeliver { retry_attempt: 3 }
        );
        assert_eq!(on_deadline(events, 4, 3), Expiry::GiveUp);
        assert_eq!(on_deadline(events, 1, 0), Expiry::GiveUp);
        assert_eq!(
            on_deadline(EnvelopeKind::SlashCommands, 1, 3),
            Expiry::GiveUp
        );
        assert_eq!(on_deadline(EnvelopeKind::Interactive, 1, 3), Expiry::GiveUp);
    }

    fn config() -> SimConfig {
        SimConfig {
            ack_deadline: Duration::from_secs(3),
            max_retries: 2,
            ..SimConfig::default()
        }
    }

    fn open_socket(
        inner: &mut Inner,
        config: &SimConfig,
        now: Instant,
    ) -> (SocketId, UnboundedReceiver<SocketCommand>) {
        let (tx, rx) = unbounded_channel();
        let id = inner.new_socket("A1", now);
        inner.admit(id, "A1", tx, config, now);
        (id, rx)
    }

    /// The envelopes the socket was told to send, as (id, retry_attempt, retry_reason).
    fn sent(
        rx: &mut UnboundedReceiver<SocketCommand>,
    ) -> Vec<(String, Option<u32>, Option<String>)> {
        let mut frames = Vec::new();
        while let Ok(command) = rx.try_recv() {
            let SocketCommand::Deliver {
                frame: Message::Text(text),
                ..
            } = command
            else {
                panic!("unexpected command {command:?}");
            };
            let Ok(Inbound::Envelope(env)) = parse_inbound(&text) else {
                panic!("not an envelope: {text}");
            };
            frames.push((env.envelope_id, env.retry_attempt, env.retry_reason));
        }
        frames
    }

    #[test]
    fn envelopes_wait_for_a_socket_and_are_redelivered_until_given_up() {
        let config = config();
        let mut inner = Inner::new(&config, Arc::new(Notify::new()), String::new());
        let t0 = Instant::now();
        let id = inner.inject("A1", EnvelopeSpec::message("Ev1", "C1", "hi"), t0);
        assert!(inner.record.envelope(&id).unwrap().deliveries.is_empty());

        let (socket, mut rx) = open_socket(&mut inner, &config, t0);
        assert_eq!(sent(&mut rx), [(id.clone(), Some(0), Some(String::new()))]);

        let mut t = t0;
        for attempt in 1..=2 {
            t += config.ack_deadline;
            inner.expire_due(t);
            assert_eq!(
                sent(&mut rx),
                [(id.clone(), Some(attempt), Some("timeout".to_owned()))]
            );
        }
        t += config.ack_deadline;
        inner.expire_due(t);
        assert!(sent(&mut rx).is_empty());
        let record = inner.record.envelope(&id).unwrap();
        assert!(record.gave_up);
        let attempts: Vec<u32> = record.deliveries.iter().map(|d| d.retry_attempt).collect();
        assert_eq!(attempts, [0, 1, 2]);
        assert!(record.deliveries.iter().all(|d| d.socket == socket));
        assert!(!inner.deliveries.is_outstanding(&id));
    }

    /// One socket of app A1, and a slash command (`/x`) injected while it is open.
    struct SlashCommandOnASocket {
        config: SimConfig,
        inner: Inner,
        now: Instant,
        socket: SocketId,
        rx: UnboundedReceiver<SocketCommand>,
        id: String,
    }

    fn slash_command_on_a_socket() -> SlashCommandOnASocket {
        let config = config();
        let mut inner = Inner::new(&config, Arc::new(Notify::new()), String::new());
        let now = Instant::now();
        let (socket, rx) = open_socket(&mut inner, &config, now);
        let id = inner.inject("A1", EnvelopeSpec::slash_command("/x", ""), now);
        SlashCommandOnASocket {
            config,
            inner,
            now,
            socket,
            rx,
            id,
        }
    }

    #[test]
    fn acks_count_once_and_unknown_ones_are_counted() {
        let SlashCommandOnASocket {
            config,
            mut inner,
            now,
            socket,
            mut rx,
            id,
        } = slash_command_on_a_socket();
        assert_eq!(sent(&mut rx), [(id.clone(), None, None)]);
        let ack = format!(r#"{{"envelope_id":"{id}","payload":{{"text":"ok"}}}}"#);
        inner.on_client_text(socket, &ack, now);
        inner.on_client_text(socket, &ack, now);
        inner.on_client_text(socket, r#"{"envelope_id":"nope"}"#, now);
        inner.on_client_text(socket, "not json", now);
        let record = inner.record.envelope(&id).unwrap();
        assert_eq!(record.ack_socket, Some(socket));
        assert_eq!(record.ack_payload, Some(serde_json::json!({"text": "ok"})));
        assert_eq!(record.extra_acks, 1);
        assert_eq!(inner.record.unknown_acks, 2);
        // The acked envelope's deadline passes without a redelivery.
        inner.expire_due(now + config.ack_deadline);
        assert!(sent(&mut rx).is_empty());
        assert!(!inner.record.envelope(&id).unwrap().gave_up);
    }

    #[test]
    fn unacked_slash_commands_are_given_up_without_retry() {
        let SlashCommandOnASocket {
            config,
            mut inner,
            now,
            mut rx,
            id,
            ..
        } = slash_command_on_a_socket();
        sent(&mut rx);
        inner.expire_due(now + config.ack_deadline);
        assert!(sent(&mut rx).is_empty());
        assert!(inner.record.envelope(&id).unwrap().gave_up);
    }

    #[test]
    fn envelope_ids_are_unique() {
        let mut deliveries = Deliveries::new(Duration::from_secs(1), 0, Arc::new(Notify::new()));
        let ids: std::collections::HashSet<String> =
            (0..1000).map(|_| deliveries.new_envelope_id().0).collect();
        assert_eq!(ids.len(), 1000);
    }
}
