//! One admitted websocket from hello to the moment the sim lets go of its TCP stream:
//! writing envelopes and pings, reading acks, disconnect graces, rotation, half-open
//! (stale) behaviour, and Slack's habit of holding TCP after the close handshake.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde::Serialize;
use serde_json::json;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::time::{Instant, Interval, MissedTickBehavior, interval_at, sleep_until};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::record::{CloseKind, SocketId};
use super::registry::SocketCommand;
use super::state::Shared;
use super::timers::{sleep_until_some, tick};
use flowcoach_protocol::Hello;

type Ws = WebSocketStream<TcpStream>;

/// A write the client does not take within this (full TCP buffers) counts as a lost client.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the open phase of a socket ended.
enum Ending {
    ClientClosed,
    ClientDroppedTcp,
    /// The grace after a disconnect with this reason passed.
    CloseAfterDisconnect(String),
    Dropped,
    Stale,
    Shutdown,
}

/// The socket's own view of a pending close.
struct PlannedClose {
    at: Instant,
    reason: String,
    /// Rotation: when the `warning` grace passes, send `refresh_requested` rather than
    /// closing, as Slack does.
    escalate_to_refresh: bool,
}

pub(super) struct Session {
    shared: Arc<Shared>,
    id: SocketId,
    ws: Ws,
    commands: UnboundedReceiver<SocketCommand>,
}

/// The `hello` frame: the wire type plus its `type` tag.
#[derive(Serialize)]
struct Tagged<'a, T> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(flatten)]
    body: &'a T,
}

impl Session {
    pub(super) fn new(
        shared: Arc<Shared>,
        id: SocketId,
        ws: Ws,
        commands: UnboundedReceiver<SocketCommand>,
    ) -> Self {
        Session {
            shared,
            id,
            ws,
            commands,
        }
    }

    /// Serves an admitted socket until the sim is done with its TCP stream; `hello` is
    /// `None` when it is withheld.
    pub(super) async fn run(mut self, hello: Option<Hello>) {
        let hello_sent = match hello.map(|body| {
            serde_json::to_string(&Tagged {
                kind: "hello",
                body: &body,
            })
        }) {
            None => true,
            Some(Ok(text)) => self.write(Message::text(text)).await,
            Some(Err(_)) => false,
        };
        let ending = if hello_sent {
            self.serve_open().await
        } else {
            self.lost()
        };
        match ending {
            Ending::ClientClosed => {
                self.closed(CloseKind::ClientCloseHandshake);
                self.route_unsent_elsewhere();
                // Sends the Close reply tungstenite queued when it read the client's Close.
                bounded_write(&self.shared.shutdown, self.ws.flush()).await;
                let until = Instant::now() + self.shared.config.hold_tcp_after_close;
                self.hold_tcp(until).await;
            }
            Ending::ClientDroppedTcp => {
                let now = Instant::now();
                self.shared.update(|inner| {
                    inner.socket_closed(self.id, CloseKind::ClientDroppedTcp, now);
                    inner.client_dropped_tcp(self.id, now);
                });
            }
            Ending::CloseAfterDisconnect(reason) => {
                self.closed(CloseKind::ServerClosed(reason));
                self.close_and_hold().await;
            }
            Ending::Dropped => self.closed(CloseKind::ServerDropped),
            Ending::Stale => self.linger_stale().await,
            Ending::Shutdown => {}
        }
    }

    /// `too_many_websockets`: a disconnect instead of a hello, then the close handshake.
    pub(super) async fn refuse_too_many(mut self) {
        if self.write(disconnect_frame("too_many_websockets")).await {
            self.close_and_hold().await;
        }
    }

    /// The open socket: envelopes and pings out, acks and pings in, until it ends.
    async fn serve_open(&mut self) -> Ending {
        let config = &self.shared.config;
        let opened = Instant::now();
        let mut server_pings: Option<Interval> = config.server_ping_interval.map(|every| {
            let mut pings = interval_at(opened + every, every);
            pings.set_missed_tick_behavior(MissedTickBehavior::Delay);
            pings
        });
        let mut rotate_at = config.rotate_after.map(|age| opened + age);
        let mut planned_close: Option<PlannedClose> = None;
        if let Some(reason) = config.disconnect_after_hello.clone() {
            let accepted = self
                .shared
                .update(|inner| inner.note_disconnect(self.id, &reason));
            if accepted
                && !self
                    .send_disconnect(&reason, &mut planned_close, false)
                    .await
            {
                return self.lost();
            }
        }
        let shutdown = self.shared.shutdown.clone();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ending::Shutdown,
                command = self.commands.recv() => match command {
                    Some(SocketCommand::Send(message) | SocketCommand::Deliver { frame: message, .. }) => {
                        if !self.write_batched(message).await {
                            return self.lost();
                        }
                    }
                    Some(SocketCommand::Disconnect(reason)) => {
                        if !self.send_disconnect(&reason, &mut planned_close, false).await {
                            return self.lost();
                        }
                    }
                    Some(SocketCommand::MakeStale) => return Ending::Stale,
                    Some(SocketCommand::Drop) => return Ending::Dropped,
                    // The registry dropped this socket's sender: nothing is left to do.
                    None => return Ending::Shutdown,
                },
                incoming = self.ws.next() => match incoming {
                    Some(Ok(Message::Close(frame))) => {
                        self.client_sent_close(frame.as_ref());
                        return Ending::ClientClosed;
                    }
                    Some(Ok(message)) => self.receive(message),
                    None | Some(Err(_)) => return Ending::ClientDroppedTcp,
                },
                _ = tick(&mut server_pings) => {
                    let ping = Message::Ping(format!("Ping from applink-sim-{}", self.id).into());
                    if !self.write(ping).await {
                        return self.lost();
                    }
                }
                () = sleep_until_some(rotate_at) => {
                    rotate_at = None;
                    // A socket already being disconnected is not rotated on top of that.
                    if planned_close.is_some() {
                        continue;
                    }
                    let accepted = self.shared.update(|inner| inner.note_disconnect(self.id, "warning"));
                    if accepted && !self.send_disconnect("warning", &mut planned_close, true).await {
                        return self.lost();
                    }
                }
                () = sleep_until_some(planned_close.as_ref().map(|c| c.at)) => {
                    let Some(due) = planned_close.take() else { continue };
                    if !due.escalate_to_refresh {
                        return Ending::CloseAfterDisconnect(due.reason);
                    }
                    let reason = "refresh_requested";
                    self.shared.update(|inner| inner.note_disconnect(self.id, reason));
                    if !self.send_disconnect(reason, &mut planned_close, false).await {
                        return self.lost();
                    }
                }
            }
        }
    }

    /// Handles a data or control frame from the client.
    fn receive(&self, message: Message) {
        let now = Instant::now();
        match message {
            Message::Text(text) => self
                .shared
                .update(|inner| inner.on_client_text(self.id, text.as_str(), now)),
            Message::Binary(_) => self.shared.update(|inner| {
                debug!(socket = self.id, "binary frame from client");
                inner.record.unknown_acks += 1;
            }),
            // tungstenite queues the Pong and sends it with the next read or write.
            Message::Ping(_) => self.shared.update(|inner| inner.count_client_ping(self.id)),
            Message::Pong(_) | Message::Frame(_) | Message::Close(_) => {}
        }
    }

    /// Sends a disconnect frame and plans the close after that reason's grace (keeping an
    /// earlier planned close). False if the client is gone.
    async fn send_disconnect(
        &mut self,
        reason: &str,
        planned_close: &mut Option<PlannedClose>,
        escalate_to_refresh: bool,
    ) -> bool {
        let at = Instant::now() + self.shared.config.close_grace(reason);
        if planned_close.as_ref().is_none_or(|c| at < c.at) {
            *planned_close = Some(PlannedClose {
                at,
                reason: reason.to_owned(),
                escalate_to_refresh,
            });
        }
        self.write(disconnect_frame(reason)).await
    }

    /// A half-open socket: reads and writes nothing (no pongs either) and keeps TCP until
    /// the TTL passes, still counting toward the app's sockets.
    async fn linger_stale(&mut self) {
        let expires = Instant::now() + self.shared.config.stale_socket_ttl;
        loop {
            tokio::select! {
                () = self.shared.shutdown.cancelled() => return,
                () = sleep_until(expires) => {
                    self.closed(CloseKind::StaleExpired);
                    return;
                }
                command = self.commands.recv() => match command {
                    Some(SocketCommand::Drop) => {
                        self.closed(CloseKind::ServerDropped);
                        return;
                    }
                    None => return,
                    // Frames to a stale socket are lost, as on a half-open connection.
                    Some(_) => {}
                },
            }
        }
    }

    /// Sends Close, waits for the client's Close (reading what it sent before), then holds
    /// TCP like Slack until `hold_tcp_after_close` has passed since the Close.
    async fn close_and_hold(&mut self) {
        let until = Instant::now() + self.shared.config.hold_tcp_after_close;
        if !self.write(Message::Close(None)).await {
            self.client_dropped_tcp();
            return;
        }
        loop {
            let incoming = tokio::select! {
                () = self.shared.shutdown.cancelled() => return,
                () = sleep_until(until) => return,
                incoming = self.ws.next() => incoming,
            };
            match incoming {
                Some(Ok(Message::Close(frame))) => {
                    self.client_sent_close(frame.as_ref());
                    break;
                }
                None => break,
                Some(Ok(message)) => self.receive(message),
                Some(Err(_)) => {
                    self.client_dropped_tcp();
                    return;
                }
            }
        }
        self.hold_tcp(until).await;
    }

    /// Keeps the TCP stream after the close handshake until `until`, noting when the
    /// client drops it.
    async fn hold_tcp(&mut self, until: Instant) {
        let mut scratch = [0u8; 1024];
        loop {
            tokio::select! {
                () = self.shared.shutdown.cancelled() => return,
                () = sleep_until(until) => {
                    debug!(socket = self.id, "dropping TCP after the close hold");
                    return;
                }
                read = self.ws.get_mut().read(&mut scratch) => match read {
                    Ok(0) | Err(_) => {
                        self.client_dropped_tcp();
                        return;
                    }
                    // Bytes after the Close frame mean nothing; keep waiting for EOF.
                    Ok(_) => {}
                },
            }
        }
    }

    /// The envelopes still queued for this socket when its client closed were never written
    /// (and now cannot be: the Close reply is the last frame): route them to another socket.
    fn route_unsent_elsewhere(&mut self) {
        let mut unsent = Vec::new();
        while let Ok(command) = self.commands.try_recv() {
            if let SocketCommand::Deliver { envelope_id, .. } = command {
                unsent.push(envelope_id);
            }
        }
        if !unsent.is_empty() {
            self.shared
                .update(|inner| inner.never_sent(self.id, unsent, Instant::now()));
        }
    }

    /// A write or read failed: the client is gone, unless the sim is shutting down.
    fn lost(&self) -> Ending {
        if self.shared.shutdown.is_cancelled() {
            Ending::Shutdown
        } else {
            Ending::ClientDroppedTcp
        }
    }

    fn client_sent_close(&self, frame: Option<&CloseFrame>) {
        // RFC 6455 7.1.5: a Close without a status code is reported as 1005.
        let code = frame.map_or(1005, |frame| u16::from(frame.code));
        self.shared.update(|inner| {
            if let Some(record) = inner.record.socket_mut(self.id) {
                record.client_close_code.get_or_insert(code);
            }
        });
    }

    fn closed(&self, kind: CloseKind) {
        self.shared
            .update(|inner| inner.socket_closed(self.id, kind, Instant::now()));
    }

    fn client_dropped_tcp(&self) {
        self.shared
            .update(|inner| inner.client_dropped_tcp(self.id, Instant::now()));
    }

    /// Writes and flushes one frame. False if the client is gone or stopped reading.
    async fn write(&mut self, message: Message) -> bool {
        bounded_write(&self.shared.shutdown, self.ws.send(message)).await
    }

    /// Queues an envelope and flushes once no further command is waiting, so a burst of
    /// envelopes costs one flush instead of one per frame.
    async fn write_batched(&mut self, message: Message) -> bool {
        if !bounded_write(&self.shared.shutdown, self.ws.feed(message)).await {
            return false;
        }
        !self.commands.is_empty() || bounded_write(&self.shared.shutdown, self.ws.flush()).await
    }
}

/// Runs one write, bounded by [`WRITE_TIMEOUT`] and shutdown. False unless it succeeded.
async fn bounded_write(
    shutdown: &CancellationToken,
    write: impl Future<Output = Result<(), tungstenite::Error>>,
) -> bool {
    tokio::select! {
        () = shutdown.cancelled() => false,
        written = tokio::time::timeout(WRITE_TIMEOUT, write) => matches!(written, Ok(Ok(()))),
    }
}

fn disconnect_frame(reason: &str) -> Message {
    let frame = json!({"type": "disconnect", "reason": reason, "debug_info": {"host": "sim"}});
    Message::text(frame.to_string())
}
