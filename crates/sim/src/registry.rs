//! Which sockets are open, which of them may receive envelopes, and the socket lifecycle
//! transitions that must update the registry and the record together.

use std::collections::HashMap;

use rand::seq::IteratorRandom;
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tracing::{debug, info};

use super::config::{HelloStyle, SimConfig};
use super::record::{CloseKind, SocketId, SocketRecord};
use super::state::Inner;
use flowcoach_protocol::{ConnectionInfo, DebugInfo, Hello};

/// A frame for [`Simulator::send_raw`](super::Simulator::send_raw), sent as is.
#[derive(Debug, Clone)]
pub enum RawFrame {
    Text(String),
    Binary(Vec<u8>),
}

/// Orders for a socket's task. The channel is unbounded because the senders run under the
/// state lock and must not wait; deliveries are bounded by the load generator's window.
#[derive(Debug)]
pub(super) enum SocketCommand {
    Send(Message),
    /// An envelope the state has routed to this socket.
    Deliver {
        envelope_id: String,
        frame: Message,
    },
    /// Send a disconnect frame and close after the reason's grace.
    Disconnect(String),
    MakeStale,
    Drop,
}

struct LiveSocket {
    app_id: String,
    commands: UnboundedSender<SocketCommand>,
    /// Hello sent, no disconnect sent, not stale: envelopes may go here.
    accepting: bool,
    stale: bool,
}

/// The open sockets: hello sent and not yet closed.
#[derive(Default)]
pub(super) struct Registry {
    live: HashMap<SocketId, LiveSocket>,
}

impl Registry {
    pub(super) fn open_count(&self, app_id: &str) -> usize {
        self.live.values().filter(|s| s.app_id == app_id).count()
    }

    pub(super) fn open_ids(&self, app_id: &str) -> Vec<SocketId> {
        let mut ids: Vec<SocketId> = self
            .live
            .iter()
            .filter(|(_, s)| s.app_id == app_id)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        ids
    }

    /// A random socket of the app that accepts envelopes: Slack promises no pattern.
    pub(super) fn pick_receiver(&self, app_id: &str) -> Option<SocketId> {
        self.live
            .iter()
            .filter(|(_, s)| s.accepting && s.app_id == app_id)
            .map(|(id, _)| *id)
            .choose(&mut rand::rng())
    }

    /// False if the socket is gone or its task no longer listens.
    pub(super) fn send(&self, id: SocketId, command: SocketCommand) -> bool {
        self.live
            .get(&id)
            .is_some_and(|s| s.commands.send(command).is_ok())
    }
}

/// The outcome of a socket that passed the websocket handshake.
#[derive(Debug)]
pub(super) enum Admission {
    Hello(Hello),
    /// Open, but [`HelloStyle::Withheld`]: no hello is sent.
    Silent,
    TooManyWebsockets,
}

impl Inner {
    /// Records a new handshake and returns its id.
    pub(super) fn new_socket(&mut self, app_id: &str, now: Instant) -> SocketId {
        let id = self.record.sockets.len() as SocketId + 1;
        self.record.sockets.push(SocketRecord {
            id,
            app_id: app_id.to_owned(),
            opened_at: now,
            hello_at: None,
            hello: None,
            closed_at: None,
            close: None,
            tcp_closed_at: None,
            client_close_code: None,
            disconnect_sent: None,
            client_pings: 0,
            stale: false,
            rejected_handshake: None,
        });
        id
    }

    pub(super) fn refuse_handshake(&mut self, app_id: &str, status: u16, now: Instant) {
        let id = self.new_socket(app_id, now);
        if let Some(socket) = self.record.socket_mut(id) {
            socket.rejected_handshake = Some(status);
            socket.closed_at = Some(now);
        }
        info!(
            socket = id,
            app = app_id,
            status,
            "websocket handshake refused"
        );
    }

    /// Admits an upgraded socket unless the app is full, and sends it the envelopes that
    /// were waiting for a socket (the socket task writes them after the hello).
    pub(super) fn admit(
        &mut self,
        id: SocketId,
        app_id: &str,
        commands: UnboundedSender<SocketCommand>,
        config: &SimConfig,
        now: Instant,
    ) -> Admission {
        let already_open = self.sockets.open_count(app_id);
        if already_open >= config.max_sockets_per_app {
            if let Some(socket) = self.record.socket_mut(id) {
                socket.disconnect_sent = Some("too_many_websockets".to_owned());
                socket.closed_at = Some(now);
                socket.close = Some(CloseKind::TooManyWebsockets);
            }
            info!(
                socket = id,
                app = app_id,
                reason = "too_many_websockets",
                open = already_open,
                "websocket refused: app has too many sockets"
            );
            return Admission::TooManyWebsockets;
        }
        let says_hello = config.hello != HelloStyle::Withheld;
        self.sockets.live.insert(
            id,
            LiveSocket {
                app_id: app_id.to_owned(),
                commands,
                accepting: says_hello,
                stale: false,
            },
        );
        let open = already_open + 1;
        self.record
            .open_count_changes
            .push((app_id.to_owned(), now, open));
        let hello = match config.hello {
            HelloStyle::Withheld => {
                info!(
                    socket = id,
                    app = app_id,
                    open,
                    "websocket opened; hello withheld"
                );
                return Admission::Silent;
            }
            HelloStyle::Bare => Hello {
                num_connections: None,
                connection_info: None,
                debug_info: None,
            },
            HelloStyle::Full => Hello {
                num_connections: Some(u32::try_from(open).unwrap_or(u32::MAX)),
                connection_info: Some(ConnectionInfo {
                    app_id: app_id.to_owned(),
                }),
                debug_info: Some(DebugInfo {
                    host: Some(format!("applink-sim-{id}")),
                    build_number: Some(1),
                    approximate_connection_time: Some(config.approximate_connection_time),
                }),
            },
        };
        if let Some(socket) = self.record.socket_mut(id) {
            socket.hello_at = Some(now);
            socket.hello = Some(hello.clone());
        }
        info!(socket = id, app = app_id, open, "websocket opened");
        self.deliver_waiting(app_id, now);
        Admission::Hello(hello)
    }

    /// Stops deliveries to a socket that is being sent a disconnect. False if the socket is
    /// not open or is stale (a stale socket writes nothing).
    pub(super) fn note_disconnect(&mut self, id: SocketId, reason: &str) -> bool {
        let Some(socket) = self.sockets.live.get_mut(&id) else {
            return false;
        };
        if socket.stale {
            return false;
        }
        socket.accepting = false;
        info!(
            socket = id,
            app = socket.app_id,
            reason,
            "sending disconnect"
        );
        if let Some(record) = self.record.socket_mut(id) {
            record
                .disconnect_sent
                .get_or_insert_with(|| reason.to_owned());
        }
        true
    }

    /// `Simulator::disconnect`: records it and has the socket's task send the frame.
    pub(super) fn disconnect(&mut self, id: SocketId, reason: &str) {
        if self.note_disconnect(id, reason) {
            self.sockets
                .send(id, SocketCommand::Disconnect(reason.to_owned()));
        }
    }

    pub(super) fn make_stale(&mut self, id: SocketId) {
        let Some(socket) = self.sockets.live.get_mut(&id) else {
            return;
        };
        socket.accepting = false;
        socket.stale = true;
        info!(socket = id, app = socket.app_id, "socket made stale");
        if let Some(record) = self.record.socket_mut(id) {
            record.stale = true;
        }
        self.sockets.send(id, SocketCommand::MakeStale);
    }

    /// The socket stopped counting as open. The first close recorded wins.
    pub(super) fn socket_closed(&mut self, id: SocketId, kind: CloseKind, now: Instant) {
        if let Some(socket) = self.sockets.live.remove(&id) {
            let open = self.sockets.open_count(&socket.app_id);
            self.record
                .open_count_changes
                .push((socket.app_id, now, open));
        }
        let Some(record) = self.record.socket_mut(id) else {
            return;
        };
        if record.close.is_some() {
            return;
        }
        info!(socket = id, app = record.app_id, reason = ?kind, "websocket closed");
        record.closed_at = Some(now);
        record.close = Some(kind);
    }

    pub(super) fn client_dropped_tcp(&mut self, id: SocketId, now: Instant) {
        if let Some(record) = self.record.socket_mut(id) {
            debug!(socket = id, app = record.app_id, "client dropped TCP");
            record.tcp_closed_at.get_or_insert(now);
        }
    }

    pub(super) fn count_client_ping(&mut self, id: SocketId) {
        if let Some(record) = self.record.socket_mut(id) {
            record.client_pings += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::sync::Notify;
    use tokio::sync::mpsc::unbounded_channel;

    fn inner(config: &SimConfig) -> Inner {
        Inner::new(config, Arc::new(Notify::new()), String::new())
    }

    #[test]
    fn hello_counts_open_sockets_and_the_limit_refuses() {
        let config = SimConfig {
            max_sockets_per_app: 2,
            ..SimConfig::default()
        };
        let mut inner = inner(&config);
        let now = Instant::now();
        let mut receivers = Vec::new();
        let mut admit = |inner: &mut Inner| {
            let (tx, rx) = unbounded_channel();
            receivers.push(rx);
            let id = inner.new_socket("A1", now);
            (id, inner.admit(id, "A1", tx, &config, now))
        };
        let (first, a) = admit(&mut inner);
        assert!(matches!(a, Admission::Hello(h) if h.num_connections == Some(1)));
        let (_, b) = admit(&mut inner);
        assert!(matches!(b, Admission::Hello(h) if h.num_connections == Some(2)));
        let (third, c) = admit(&mut inner);
        assert!(matches!(c, Admission::TooManyWebsockets));
        assert_eq!(
            inner.record.socket(third).unwrap().close,
            Some(CloseKind::TooManyWebsockets)
        );

        // A stale socket still counts; a closed one does not.
        inner.make_stale(first);
        assert_eq!(inner.sockets.open_count("A1"), 2);
        inner.socket_closed(first, CloseKind::StaleExpired, now);
        assert_eq!(inner.sockets.open_count("A1"), 1);
        assert_eq!(inner.record.open_sockets("A1"), 1);
        let counts: Vec<usize> = inner
            .record
            .open_count_changes
            .iter()
            .map(|c| c.2)
            .collect();
        assert_eq!(counts, [1, 2, 1]);
    }

    #[test]
    fn disconnected_and_stale_sockets_receive_nothing() {
        let config = SimConfig::default();
        let mut inner = inner(&config);
        let now = Instant::now();
        let (tx, _rx) = unbounded_channel();
        let id = inner.new_socket("A1", now);
        inner.admit(id, "A1", tx, &config, now);
        assert_eq!(inner.sockets.pick_receiver("A1"), Some(id));
        inner.disconnect(id, "warning");
        inner.disconnect(id, "refresh_requested");
        assert_eq!(inner.sockets.pick_receiver("A1"), None);
        assert_eq!(
            inner.record.socket(id).unwrap().disconnect_sent.as_deref(),
            Some("warning")
        );

        let (tx, _rx2) = unbounded_channel();
        let stale = inner.new_socket("A1", now);
        inner.admit(stale, "A1", tx, &config, now);
        inner.make_stale(stale);
        assert_eq!(inner.sockets.pick_receiver("A1"), None);
        assert!(!inner.note_disconnect(stale, "warning"));
    }
}
