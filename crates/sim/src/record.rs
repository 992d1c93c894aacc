//! What the simulator saw: every `apps.connections.open` call, socket and envelope. Tests
//! assert on snapshots of it.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use tokio::time::Instant;

use flowcoach_protocol::{EnvelopeKind, Hello};

/// Identifies one websocket (or refused handshake) of the simulator, in order of arrival.
pub type SocketId = u64;

/// Everything observed so far. [`Simulator::record`](super::Simulator::record) hands out
/// snapshots.
#[derive(Debug, Clone, Default)]
pub struct Record {
    pub open_calls: Vec<OpenCall>,
    /// Indexed by `SocketId - 1`.
    pub sockets: Vec<SocketRecord>,
    pub envelopes: Vec<EnvelopeRecord>,
    /// Acks for unknown envelope ids, and client frames that are not acks at all.
    pub unknown_acks: u64,
    /// Every change of an app's count of open sockets: (app, when, new count).
    pub open_count_changes: Vec<(String, Instant, usize)>,
    /// Every call of a bot's Web API method (`chat.postMessage`, `views.open`, …), refused
    /// ones included.
    pub api_calls: Vec<ApiCall>,
    /// Every POST to a `response_url` the simulator handed out, refused ones included.
    pub response_url_posts: Vec<ResponseUrlPost>,
}

/// One call of a bot's Web API method.
#[derive(Debug, Clone)]
pub struct ApiCall {
    /// The method, e.g. `chat.postMessage`.
    pub method: String,
    pub at: Instant,
    /// The app whose bot token was presented, if it was one.
    pub app_id: Option<String>,
    /// The arguments: the JSON body as sent, or a form body decoded to an object of strings.
    pub body: serde_json::Value,
    /// The `error` of the answer; `None` when it was `ok`.
    pub error: Option<String>,
}

impl ApiCall {
    /// The call succeeded (`"ok": true`).
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// One POST to a `response_url`.
#[derive(Debug, Clone)]
pub struct ResponseUrlPost {
    /// The envelope whose payload carried the URL.
    pub envelope_id: String,
    pub at: Instant,
    /// The message posted: JSON as sent, or a form body decoded to an object.
    pub body: serde_json::Value,
    /// The URL was not one the simulator handed out.
    pub refused: bool,
}

/// One `apps.connections.open` call.
#[derive(Debug, Clone)]
pub struct OpenCall {
    pub at: Instant,
    /// The bearer token belonged to a configured app.
    pub token_ok: bool,
    /// The app of the token, if it had one.
    pub app_id: Option<String>,
    /// The bearer token presented (simulator tokens are not secrets): shows which of an
    /// app's tokens a client used, e.g. after a token rotation.
    pub token: Option<String>,
    /// `"ok"`, the `error` code of the answer, or `"http <status>"`.
    pub outcome: String,
}

/// One websocket handshake and, if it succeeded, the socket's life.
#[derive(Debug, Clone)]
pub struct SocketRecord {
    pub id: SocketId,
    /// Empty when the handshake carried no valid ticket.
    pub app_id: String,
    pub opened_at: Instant,
    pub hello_at: Option<Instant>,
    pub hello: Option<Hello>,
    /// When the websocket stopped counting as open (Close frame sent or received, TCP lost,
    /// stale socket expired, handshake refused).
    pub closed_at: Option<Instant>,
    pub close: Option<CloseKind>,
    /// When the client dropped TCP, if the sim saw it.
    pub tcp_closed_at: Option<Instant>,
    /// The status code of the client's Close frame, 1005 (no status) for a Close without
    /// one; `None` while no Close came.
    pub client_close_code: Option<u16>,
    /// The first disconnect reason sent on this socket.
    pub disconnect_sent: Option<String>,
    pub client_pings: u64,
    pub stale: bool,
    /// The HTTP status the upgrade was refused with.
    pub rejected_handshake: Option<u16>,
}

/// How a socket ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseKind {
    /// The client sent a Close frame.
    ClientCloseHandshake,
    /// EOF or reset with no Close frame.
    ClientDroppedTcp,
    /// The sim closed it after a disconnect with this reason.
    ServerClosed(String),
    /// `drop_socket`: TCP dropped with no Close frame.
    ServerDropped,
    /// A stale socket's TTL passed.
    StaleExpired,
    /// The app already had the maximum of sockets: disconnect, no hello.
    TooManyWebsockets,
}

/// One injected envelope and what became of it.
#[derive(Debug, Clone)]
pub struct EnvelopeRecord {
    pub envelope_id: String,
    pub app_id: String,
    pub kind: EnvelopeKind,
    pub event_id: Option<String>,
    pub deliveries: Vec<Delivery>,
    pub acked_at: Option<Instant>,
    pub ack_socket: Option<SocketId>,
    pub ack_payload: Option<serde_json::Value>,
    /// Acks after the first.
    pub extra_acks: u32,
    /// No ack came after the last allowed delivery.
    pub gave_up: bool,
    /// When it was injected.
    pub pending_since: Instant,
}

impl EnvelopeRecord {
    /// From its first delivery to its ack: beyond the ack deadline, it was acked only
    /// after a redelivery (an event) or in vain (a slash command or an interaction).
    /// `None` while it is not acked.
    pub fn ack_delay(&self) -> Option<std::time::Duration> {
        Some(self.acked_at? - self.deliveries.first()?.at)
    }
}

/// One delivery of an envelope to a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    pub socket: SocketId,
    pub at: Instant,
    pub retry_attempt: u32,
}

impl Record {
    pub fn envelope(&self, id: &str) -> Option<&EnvelopeRecord> {
        self.envelopes.iter().find(|e| e.envelope_id == id)
    }

    pub fn socket(&self, id: SocketId) -> Option<&SocketRecord> {
        socket_index(id).and_then(|i| self.sockets.get(i))
    }

    /// True when the envelope with this id has been acked.
    pub fn is_acked(&self, id: &str) -> bool {
        self.envelope(id).is_some_and(|e| e.acked_at.is_some())
    }

    /// True when every injected envelope has been acked (vacuously true with none).
    pub fn all_acked(&self) -> bool {
        self.envelopes.iter().all(|e| e.acked_at.is_some())
    }

    /// The number of sockets that got a hello, open or closed since: the client's
    /// connections so far.
    pub fn hellos(&self) -> usize {
        self.sockets.iter().filter(|s| s.hello_at.is_some()).count()
    }

    /// Sockets of the app that got a hello and have not closed (stale ones included).
    pub fn open_sockets(&self, app_id: &str) -> usize {
        self.sockets
            .iter()
            .filter(|s| s.app_id == app_id && s.hello_at.is_some() && s.closed_at.is_none())
            .count()
    }

    /// Number of times an app's open count fell to zero after its first socket opened (and
    /// the current zero stretch, if any).
    pub fn zero_open_stretches(&self, app_id: &str) -> usize {
        self.zero_open_durations(app_id, None).len()
    }

    /// The longest time the app had no open socket after its first one opened; a stretch
    /// still going on counts up to `now`.
    pub fn longest_zero_open(&self, app_id: &str, now: Instant) -> Duration {
        self.zero_open_durations(app_id, Some(now))
            .into_iter()
            .max()
            .unwrap_or_default()
    }

    /// Durations of the stretches with no open socket of the app after its first one
    /// opened; an unfinished one lasts until `now` (zero if `now` is not given).
    pub fn zero_open_durations(&self, app_id: &str, now: Option<Instant>) -> Vec<Duration> {
        let mut stretches = Vec::new();
        let mut seen_open = false;
        let mut zero_since: Option<Instant> = None;
        for (_, at, count) in self.open_count_changes.iter().filter(|c| c.0 == app_id) {
            if *count > 0 {
                seen_open = true;
                if let Some(start) = zero_since.take() {
                    stretches.push(at.saturating_duration_since(start));
                }
            } else if seen_open && zero_since.is_none() {
                zero_since = Some(*at);
            }
        }
        if let Some(start) = zero_since {
            stretches.push(now.map_or(Duration::ZERO, |now| now.saturating_duration_since(start)));
        }
        stretches
    }

    /// Successful calls of `method` (e.g. `chat.postMessage`), in order.
    pub fn api_calls_of<'a>(&'a self, method: &'a str) -> impl Iterator<Item = &'a ApiCall> {
        self.api_calls
            .iter()
            .filter(move |c| c.method == method && c.ok())
    }

    pub(super) fn socket_mut(&mut self, id: SocketId) -> Option<&mut SocketRecord> {
        socket_index(id).and_then(|i| self.sockets.get_mut(i))
    }

    /// The earliest instant in the record, to print the others relative to it.
    fn epoch(&self) -> Option<Instant> {
        let calls = self.open_calls.iter().map(|c| c.at);
        let sockets = self.sockets.iter().map(|s| s.opened_at);
        let envelopes = self.envelopes.iter().map(|e| e.pending_since);
        calls.chain(sockets).chain(envelopes).min()
    }
}

fn socket_index(id: SocketId) -> Option<usize> {
    usize::try_from(id).ok()?.checked_sub(1)
}

/// A summary for failure messages: outcomes, one line per socket, envelopes not acked.
impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let epoch = self.epoch();
        let at = |t: Instant| match epoch {
            Some(epoch) => format!("+{:.3}s", t.saturating_duration_since(epoch).as_secs_f64()),
            None => "?".to_owned(),
        };
        let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
        for call in &self.open_calls {
            *outcomes.entry(call.outcome.as_str()).or_default() += 1;
        }
        writeln!(f, "open calls: {} {outcomes:?}", self.open_calls.len())?;
        writeln!(f, "sockets: {}", self.sockets.len())?;
        for s in &self.sockets {
            write!(
                f,
                "  #{} app={:?} opened {}",
                s.id,
                s.app_id,
                at(s.opened_at)
            )?;
            if let Some(status) = s.rejected_handshake {
                write!(f, " refused with HTTP {status}")?;
            }
            if let Some(hello) = &s.hello {
                match hello.num_connections {
                    Some(n) => write!(f, " hello(n={n})")?,
                    None => write!(f, " hello(no count)")?,
                }
            }
            if let Some(reason) = &s.disconnect_sent {
                write!(f, " disconnect={reason}")?;
            }
            if s.stale {
                write!(f, " stale")?;
            }
            match (&s.close, s.closed_at) {
                (Some(kind), Some(t)) => write!(f, " closed {} {kind:?}", at(t))?,
                (None, Some(t)) => write!(f, " closed {}", at(t))?,
                _ => write!(f, " open")?,
            }
            if let Some(code) = s.client_close_code {
                write!(f, " client-close-code={code}")?;
            }
            if let Some(t) = s.tcp_closed_at {
                write!(f, " tcp-dropped-by-client {}", at(t))?;
            }
            writeln!(f, " client_pings={}", s.client_pings)?;
        }
        let acked = self
            .envelopes
            .iter()
            .filter(|e| e.acked_at.is_some())
            .count();
        let gave_up = self.envelopes.iter().filter(|e| e.gave_up).count();
        writeln!(
            f,
            "envelopes: {} ({acked} acked, {gave_up} given up), unknown acks: {}",
            self.envelopes.len(),
            self.unknown_acks
        )?;
        let refused_calls = self.api_calls.iter().filter(|c| !c.ok()).count();
        writeln!(
            f,
            "bot Web API calls: {} ({refused_calls} refused), response_url posts: {}",
            self.api_calls.len(),
            self.response_url_posts.len()
        )?;
        const SHOWN: usize = 10;
        let unacked: Vec<&EnvelopeRecord> = self
            .envelopes
            .iter()
            .filter(|e| e.acked_at.is_none())
            .collect();
        for e in unacked.iter().take(SHOWN) {
            let sockets: Vec<SocketId> = e.deliveries.iter().map(|d| d.socket).collect();
            writeln!(
                f,
                "  unacked {} {} injected {} delivered to {sockets:?}{}",
                e.envelope_id,
                e.kind.as_str(),
                at(e.pending_since),
                if e.gave_up { " (given up)" } else { "" }
            )?;
        }
        if unacked.len() > SHOWN {
            writeln!(f, "  … and {} more unacked", unacked.len() - SHOWN)?;
        }
        Ok(())
    }
}

/// [`Simulator::wait_until`](super::Simulator::wait_until) gave up; carries the last record.
pub struct WaitTimeout {
    pub waited: Duration,
    pub record: Record,
}

impl fmt::Debug for WaitTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

impl fmt::Display for WaitTimeout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "condition not met within {:?}; last record:",
            self.waited
        )?;
        write!(f, "{}", self.record)
    }
}

impl std::error::Error for WaitTimeout {}

#[cfg(test)]
mod tests {
    use super::*;

    fn record_with_counts(app: &str, base: Instant, changes: &[(u64, usize)]) -> Record {
        Record {
            open_count_changes: changes
                .iter()
                .map(|&(ms, n)| (app.to_owned(), base + Duration::from_millis(ms), n))
                .collect(),
            ..Record::default()
        }
    }

    #[test]
    fn smooth_rotation_has_no_zero_stretch() {
        let base = Instant::now();
        let record = record_with_counts("A1", base, &[(0, 1), (100, 2), (200, 1)]);
        assert_eq!(record.zero_open_stretches("A1"), 0);
        assert_eq!(
            record.longest_zero_open("A1", base + Duration::from_secs(9)),
            Duration::ZERO
        );
    }

    #[test]
    fn zero_stretches_are_counted_and_measured() {
        let base = Instant::now();
        let record = record_with_counts(
            "A1",
            base,
            &[
                (0, 1),
                (1000, 0),
                (1300, 1),
                (2000, 0),
                (2100, 1),
                (5000, 0),
            ],
        );
        assert_eq!(record.zero_open_stretches("A1"), 3);
        assert_eq!(record.zero_open_stretches("A2"), 0);
        // Finished stretches: 300 ms and 100 ms; the current one has run 250 ms at `now`.
        let now = base + Duration::from_millis(5250);
        assert_eq!(
            record.longest_zero_open("A1", now),
            Duration::from_millis(300)
        );
        let later = base + Duration::from_millis(6000);
        assert_eq!(
            record.longest_zero_open("A1", later),
            Duration::from_millis(1000)
        );
    }

    #[test]
    fn other_apps_do_not_interleave() {
        let base = Instant::now();
        let mut record = record_with_counts("A1", base, &[(0, 1), (500, 0)]);
        record
            .open_count_changes
            .push(("A2".to_owned(), base + Duration::from_millis(600), 1));
        assert_eq!(record.zero_open_stretches("A1"), 1);
        assert_eq!(record.zero_open_stretches("A2"), 0);
    }

    fn envelope(id: &str, acked: bool) -> EnvelopeRecord {
        EnvelopeRecord {
            envelope_id: id.to_owned(),
            app_id: "A1".to_owned(),
            kind: EnvelopeKind::EventsApi,
            event_id: None,
            deliveries: Vec::new(),
            acked_at: acked.then(Instant::now),
            ack_socket: None,
            ack_payload: None,
            extra_acks: 0,
            gave_up: false,
            pending_since: Instant::now(),
        }
    }

    #[test]
    fn all_acked_and_lookup() {
        let mut record = Record::default();
        assert!(record.all_acked());
        record.envelopes.push(envelope("e1", true));
        record.envelopes.push(envelope("e2", false));
        assert!(!record.all_acked());
        assert!(record.envelope("e2").is_some());
        assert!(record.envelope("e3").is_none());
        let summary = record.to_string();
        assert!(summary.contains("unacked e2"), "{summary}");
        assert!(!summary.contains("unacked e1"), "{summary}");
    }

    #[test]
    fn socket_ids_start_at_one() {
        assert_eq!(socket_index(0), None);
        assert_eq!(socket_index(1), Some(0));
    }
}
