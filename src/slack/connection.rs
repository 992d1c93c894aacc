//! One Socket Mode websocket: connect and wait for `hello`, then a single task that reads
//! frames, writes acks (the only writer, so frames never interleave), keeps the connection
//! alive with pings and closes it within a bound.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until, timeout};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::config::ConnectionSettings;
use crate::deadline::far_future;
use crate::dispatch::{AckFrame, AckSink, Dispatcher, PendingAcks};
use crate::metrics::labels::{EnvelopeType, ReconnectCause};
use crate::metrics::timings;
use crate::state::{Counters, InstanceState};
use flowcoach_protocol::{DisconnectReason, Envelope, FrameError, Hello, Inbound, parse_inbound};

type WsStream = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Acks written per flush at most: batching saves syscalls under load, the cap keeps reads
/// (and pongs) flowing.
const MAX_ACKS_PER_FLUSH: usize = 128;

/// Messages already received that are handled before a flush, so that their acks share it.
const MAX_READ_AHEAD: usize = 16;

/// Why a connection could not be established.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("websocket handshake failed: {0}")]
    Handshake(String),
    #[error("no hello within {0:?}")]
    HelloTimeout(Duration),
    #[error("Slack sent disconnect ({}) instead of hello", .0.as_str())]
    Disconnected(DisconnectReason),
    #[error("the socket closed before hello")]
    ClosedBeforeHello,
    /// The service is stopping: the socket was closed (Close 1000) while it waited.
    #[error("stopped while waiting for hello")]
    Stopped,
}

/// Sent by a connection task to the supervisor.
#[derive(Debug)]
pub enum ConnEvent {
    Disconnect { conn: u64, reason: DisconnectReason },
    Ended { conn: u64, cause: EndCause },
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndCause {
    /// We closed it (rotation, shutdown, a disconnect reason).
    ClosedByUs,
    /// Slack sent a Close frame.
    ClosedByServer,
    /// Neither a pong nor any frame arrived in time: half-open.
    Stale,
    /// A message exceeded `max_message_bytes`; the stream cannot be resynchronised.
    Oversized,
    /// TCP or protocol error, or EOF without a Close frame.
    Lost(String),
}

impl std::fmt::Display for EndCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EndCause::ClosedByUs => f.write_str("closed by us"),
            EndCause::ClosedByServer => f.write_str("closed by Slack"),
            EndCause::Stale => f.write_str("stale (no pong)"),
            EndCause::Oversized => f.write_str("oversized message"),
            EndCause::Lost(why) => write!(f, "lost: {why}"),
        }
    }
}

impl EndCause {
    /// The bounded label of this cause, for `flowcoach_reconnects_total{cause}`.
    pub fn metric_cause(&self) -> ReconnectCause {
        match self {
            EndCause::ClosedByUs => ReconnectCause::ClosedByUs,
            EndCause::ClosedByServer => ReconnectCause::ClosedBySlack,
            EndCause::Stale => ReconnectCause::Stale,
            EndCause::Oversized => ReconnectCause::Oversized,
            EndCause::Lost(_) => ReconnectCause::Lost,
        }
    }
}

enum Control {
    /// Close once every envelope this socket delivered is acked, or at `deadline`.
    Retire { deadline: Instant },
    /// Close now.
    Close,
}

/// The supervisor's grip on a running connection.
pub struct ConnectionHandle {
    pub id: u64,
    /// Acks for envelopes that arrived on another socket after that one's Close.
    acks: AckSink,
    control: mpsc::UnboundedSender<Control>,
    task: JoinHandle<()>,
}

impl ConnectionHandle {
    /// Stop using this socket: it closes as soon as its pending acks are written.
    pub fn retire(&self, budget: Duration) {
        let _ = self.control.send(Control::Retire {
            deadline: Instant::now() + budget,
        });
    }

    pub fn close(&self) {
        let _ = self.control.send(Control::Close);
    }

    /// The way to ack, on this socket, an envelope that came on another one.
    pub fn acks(&self) -> &AckSink {
        &self.acks
    }

    /// Waits for the task to finish (it always does, within its close bound).
    pub async fn finished(self) {
        let _ = self.task.await;
    }
}

/// Opens the websocket and waits for `hello`.
/// Opens the websocket and waits for `hello`; a `stop` meanwhile closes it cleanly, as any
/// socket of ours is closed.
pub async fn open(
    url: &Url,
    settings: &ConnectionSettings,
    stop: &CancellationToken,
) -> Result<(WebSocket, Hello), ConnectError> {
    let config = WebSocketConfig::default()
        .max_message_size(Some(settings.max_message_bytes))
        .max_frame_size(Some(settings.max_message_bytes));
    // TCP_NODELAY: an ack is one small write, and with Nagle's algorithm it waits for the
    // server's delayed ACK of the previous one (about 10 ms at p99 instead of 1 ms).
    let disable_nagle = true;
    let handshake =
        tokio_tungstenite::connect_async_with_config(url.as_str(), Some(config), disable_nagle);
    let (ws, _response) = timeout(settings.hello_timeout, handshake)
        .await
        .map_err(|_| ConnectError::HelloTimeout(settings.hello_timeout))?
        .map_err(|e| ConnectError::Handshake(describe_handshake_error(e)))?;
    let mut ws = WebSocket { ws };
    let waited = tokio::select! {
        waited = timeout(settings.hello_timeout, ws.wait_for_hello()) => waited,
        () = stop.cancelled() => Ok(Err(ConnectError::Stopped)),
    };
    let error = match waited {
        Ok(Ok(hello)) => return Ok((ws, hello)),
        Ok(Err(error)) => error,
        Err(_) => ConnectError::HelloTimeout(settings.hello_timeout),
    };
    // Nothing was delivered to a socket that has not said hello: nothing to hand on.
    ws.close(settings.close_timeout).await;
    Err(error)
}

/// The handshake error without the URL: it carries a single-use ticket.
fn describe_handshake_error(error: tungstenite::Error) -> String {
    match error {
        tungstenite::Error::Http(response) => format!("HTTP {}", response.status()),
        other => other.to_string(),
    }
}

/// Our Close frame: 1000 (Normal). One without a code reads as 1005 (no status) to the
/// peer, which cannot tell an intended close from a broken one.
fn normal_close() -> CloseFrame {
    CloseFrame {
        code: CloseCode::Normal,
        reason: "".into(),
    }
}

/// An open websocket that has said hello.
pub struct WebSocket {
    ws: WsStream,
}

impl WebSocket {
    async fn wait_for_hello(&mut self) -> Result<Hello, ConnectError> {
        while let Some(message) = self.ws.next().await {
            let message = message.map_err(|e| ConnectError::Handshake(e.to_string()))?;
            let Message::Text(text) = message else {
                if let Message::Close(_) = message {
                    return Err(ConnectError::ClosedBeforeHello);
                }
                continue;
            };
            match parse_inbound(&text) {
                Ok(Inbound::Hello(hello)) => return Ok(hello),
                Ok(Inbound::Disconnect(reason)) => return Err(ConnectError::Disconnected(reason)),
                // Not acked: Slack redelivers it to a socket that has said hello.
                Ok(Inbound::Envelope(envelope)) => tracing::warn!(
                    envelope_id = %envelope.envelope_id,
                    "envelope before hello left for redelivery"
                ),
                Err(error) => tracing::warn!(%error, "unusable frame before hello"),
            }
        }
        Err(ConnectError::ClosedBeforeHello)
    }

    /// Sends Close, then waits at most `bound` for Slack's reply; the caller drops the
    /// socket after this, since Slack does not close TCP after the close handshake.
    /// Returns the envelopes that arrived after our Close: Slack sent them before it read
    /// our Close, and over RFC 6455 nothing, acks included, may follow our Close on this
    /// socket. No client can prevent this race (nothing tells Slack to stop sending short
    /// of the Close itself), so the caller acks them on another socket of the app.
    async fn close(&mut self, bound: Duration) -> Vec<Envelope> {
        let ws = &mut self.ws;
        let mut late = Vec::new();
        let handshake = async {
            if ws.close(Some(normal_close())).await.is_err() {
                return;
            }
            // Slack does not close TCP after its Close reply: the reply ends the wait.
            while let Some(Ok(message)) = ws.next().await {
                match message {
                    Message::Close(_) => break,
                    Message::Text(text) => {
                        if let Ok(Inbound::Envelope(envelope)) = parse_inbound(&text) {
                            tracing::info!(
                                envelope_id = %envelope.envelope_id,
                                "envelope arrived after our Close: kept to be acked on another socket or by a successor"
                            );
                            late.push(envelope);
                        }
                    }
                    _ => {}
                }
            }
        };
        if timeout(bound, handshake).await.is_err() {
            tracing::debug!("no close reply in time; dropping the socket");
        }
        late
    }

    /// Starts the connection's task.
    pub fn spawn(
        self,
        id: u64,
        settings: ConnectionSettings,
        dispatcher: Arc<Dispatcher>,
        state: Arc<InstanceState>,
        events: mpsc::UnboundedSender<ConnEvent>,
    ) -> ConnectionHandle {
        let (frames_tx, frames) = mpsc::unbounded_channel();
        let (acks, pending) = AckSink::new(frames_tx);
        let (control_tx, control) = mpsc::unbounded_channel();
        let task = ConnectionTask {
            id,
            ws: self,
            frames,
            control,
            acks: acks.clone(),
            pending,
            dispatcher,
            state,
            settings,
            events,
            last_inbound: Instant::now(),
            ping_sent_at: None,
            written: Vec::with_capacity(MAX_ACKS_PER_FLUSH),
        };
        let task = tokio::spawn(async move {
            let mut task = task;
            let cause = task.serve().await;
            task.report_unsent_acks();
            task.forward(ConnEvent::Ended { conn: id, cause });
        });
        ConnectionHandle {
            id,
            acks,
            control: control_tx,
            task,
        }
    }
}

/// What reading one message means for the connection.
enum Next {
    Continue,
    End(EndCause),
    Disconnect(DisconnectReason),
}

struct ConnectionTask {
    id: u64,
    ws: WebSocket,
    frames: mpsc::UnboundedReceiver<AckFrame>,
    control: mpsc::UnboundedReceiver<Control>,
    acks: AckSink,
    pending: Arc<PendingAcks>,
    dispatcher: Arc<Dispatcher>,
    state: Arc<InstanceState>,
    settings: ConnectionSettings,
    events: mpsc::UnboundedSender<ConnEvent>,
    last_inbound: Instant,
    ping_sent_at: Option<Instant>,
    /// The acks of the batch being written: type and receipt, recorded once it is out.
    written: Vec<(EnvelopeType, std::time::Instant)>,
}

impl ConnectionTask {
    async fn serve(&mut self) -> EndCause {
        let mut retire_by: Option<Instant> = None;
        loop {
            if retire_by.is_some() && self.pending.count() == 0 && self.frames.is_empty() {
                return self.close().await;
            }
            let liveness_deadline = match self.ping_sent_at {
                None => self.last_inbound + self.settings.ping_interval,
                Some(sent) => sent + self.settings.pong_timeout,
            };
            let retire_deadline = retire_by.unwrap_or_else(far_future);
            tokio::select! {
                biased;
                Some(control) = self.control.recv() => match control {
                    Control::Retire { deadline } => retire_by = Some(deadline),
                    Control::Close => return self.close().await,
                },
                Some(frame) = self.frames.recv() => {
                    // What has already arrived is read first, so that its acks leave in
                    // this same write: with TCP_NODELAY each write is a segment of its own.
                    let after_reading = self.read_arrived();
                    if let Next::End(cause) = after_reading {
                        return cause;
                    }
                    if let Err(error) = self.write_acks(frame).await {
                        return EndCause::Lost(format!("writing acks: {error}"));
                    }
                    if let Next::Disconnect(reason) = after_reading {
                        self.on_disconnect(reason);
                    }
                }
                () = self.pending.wait_drained(), if retire_by.is_some() => {}
                () = sleep_until(retire_deadline), if retire_by.is_some() => {
                    tracing::warn!(
                        conn = self.id,
                        pending = self.pending.count(),
                        "acks still pending at the retirement deadline; closing anyway"
                    );
                    return self.close().await;
                }
                message = self.ws.ws.next() => match self.on_message(message) {
                    Next::Continue => {}
                    Next::End(cause) => return cause,
                    Next::Disconnect(reason) => self.on_disconnect(reason),
                },
                () = sleep_until(liveness_deadline) => {
                    if self.ping_sent_at.is_some() {
                        tracing::warn!(
                            conn = self.id,
                            silent_for_ms = self.last_inbound.elapsed().as_millis() as u64,
                            "no pong or frame from Slack in time: connection is stale"
                        );
                        return EndCause::Stale;
                    }
                    if let Err(error) = self.ping().await {
                        return EndCause::Lost(format!("sending ping: {error}"));
                    }
                }
            }
        }
    }

    /// Handles the messages that can be read without waiting, at most [`MAX_READ_AHEAD`];
    /// stops at the first that is not an envelope or a control frame to go on with.
    fn read_arrived(&mut self) -> Next {
        for _ in 0..MAX_READ_AHEAD {
            let Some(message) = self.ws.ws.next().now_or_never() else {
                break;
            };
            match self.on_message(message) {
                Next::Continue => {}
                other => return other,
            }
        }
        Next::Continue
    }

    fn on_disconnect(&self, reason: DisconnectReason) {
        tracing::info!(
            conn = self.id,
            reason = reason.as_str(),
            "Slack sent disconnect"
        );
        self.forward(ConnEvent::Disconnect {
            conn: self.id,
            reason,
        });
    }

    fn forward(&self, event: ConnEvent) {
        // The supervisor outlives its connections; a send fails only during teardown.
        let _ = self.events.send(event);
    }

    fn counters(&self) -> &Counters {
        &self.state.counters
    }

    fn on_message(&mut self, message: Option<Result<Message, tungstenite::Error>>) -> Next {
        let message = match message {
            None => return Next::End(EndCause::Lost("TCP closed without a Close frame".into())),
            Some(Err(tungstenite::Error::Capacity(error))) => {
                Counters::bump(&self.counters().frames_oversized);
                tracing::error!(
                    conn = self.id,
                    %error,
                    limit = self.settings.max_message_bytes,
                    "oversized message from Slack; reconnecting, since the stream cannot be resynchronised"
                );
                return Next::End(EndCause::Oversized);
            }
            Some(Err(error)) => return Next::End(EndCause::Lost(error.to_string())),
            Some(Ok(message)) => message,
        };
        // Any frame proves the peer is alive, not just a pong.
        self.last_inbound = Instant::now();
        self.ping_sent_at = None;
        match message {
            Message::Text(text) => self.on_text(&text),
            Message::Binary(bytes) => {
                Counters::bump(&self.counters().frames_binary);
                tracing::warn!(conn = self.id, len = bytes.len(), "ignored a binary frame");
                Next::Continue
            }
            Message::Close(frame) => {
                tracing::info!(
                    conn = self.id,
                    code = frame.as_ref().map(|f| u16::from(f.code)),
                    reason = frame.as_ref().map(|f| f.reason.as_str()),
                    "Slack closed the websocket"
                );
                Next::End(EndCause::ClosedByServer)
            }
            // tungstenite answers pings itself; pongs only refresh liveness.
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Next::Continue,
        }
    }

    fn on_text(&mut self, text: &str) -> Next {
        match parse_inbound(text) {
            Ok(Inbound::Envelope(envelope)) => {
                self.dispatcher.accept(envelope, &self.acks);
                Next::Continue
            }
            Ok(Inbound::Disconnect(reason)) => Next::Disconnect(reason),
            Ok(Inbound::Hello(hello)) => {
                tracing::info!(
                    conn = self.id,
                    num_connections = hello.num_connections,
                    "repeated hello"
                );
                Next::Continue
            }
            Err(error) => {
                self.on_bad_frame(error, text);
                Next::Continue
            }
        }
    }

    fn on_bad_frame(&self, error: FrameError, text: &str) {
        let excerpt: String = text.chars().take(120).collect();
        match error {
            FrameError::UnknownType {
                kind,
                envelope_id: Some(envelope_id),
            } => {
                Counters::bump(&self.counters().frames_unknown);
                tracing::warn!(conn = self.id, kind, %envelope_id, "acked an envelope of unknown type without handling it");
                self.ack_unhandled(envelope_id);
            }
            FrameError::NoPayload { kind, envelope_id } => {
                Counters::bump(&self.counters().frames_malformed);
                tracing::warn!(conn = self.id, kind, %envelope_id, "acked an envelope without a payload, not handled");
                self.ack_unhandled(envelope_id);
            }
            FrameError::UnknownType { kind, .. } => {
                Counters::bump(&self.counters().frames_unknown);
                tracing::warn!(conn = self.id, kind, "ignored a frame of unknown type");
            }
            error => {
                Counters::bump(&self.counters().frames_malformed);
                tracing::warn!(conn = self.id, %error, excerpt, "ignored a malformed frame");
            }
        }
    }

    /// Acks an envelope we cannot handle: redelivery would not change that, so Slack
    /// should stop retrying.
    fn ack_unhandled(&self, envelope_id: String) {
        if let Err(error) = self
            .acks
            .expect(envelope_id, EnvelopeType::Unknown)
            .send(None)
        {
            tracing::warn!(%error, "ack not sent");
        }
    }

    /// Writes `first` and whatever else is queued, then flushes once; counts them acked
    /// once they are written.
    async fn write_acks(&mut self, first: AckFrame) -> Result<(), tungstenite::Error> {
        let bound = self.settings.pong_timeout;
        let ws = &mut self.ws.ws;
        let frames = &mut self.frames;
        let written = &mut self.written;
        written.clear();
        let batch = async {
            let mut next = Some(first);
            while let Some(frame) = next.take() {
                ws.feed(Message::text(frame.text)).await?;
                written.push((frame.kind, frame.received_at));
                if written.len() < MAX_ACKS_PER_FLUSH {
                    next = frames.try_recv().ok();
                }
            }
            ws.flush().await
        };
        // A peer that stops reading must not wedge us: treat it like a stale connection.
        timeout(bound, batch)
            .await
            .map_err(|_| tungstenite::Error::Io(std::io::ErrorKind::TimedOut.into()))??;
        let now = std::time::Instant::now();
        for &(kind, received_at) in &self.written {
            self.state.counters.envelopes_acked.bump(kind);
            timings::observe(
                &self.state.timings.ack_latency,
                now.saturating_duration_since(received_at),
            );
        }
        Ok(())
    }

    async fn ping(&mut self) -> Result<(), tungstenite::Error> {
        self.ping_sent_at = Some(Instant::now());
        let bound = self.settings.pong_timeout;
        timeout(bound, self.ws.ws.send(Message::Ping(Default::default())))
            .await
            .map_err(|_| tungstenite::Error::Io(std::io::ErrorKind::TimedOut.into()))?
    }

    async fn close(&mut self) -> EndCause {
        for envelope in self.ws.close(self.settings.close_timeout).await {
            self.dispatcher.orphan(envelope);
        }
        EndCause::ClosedByUs
    }

    fn report_unsent_acks(&mut self) {
        let mut unsent = 0u64;
        while self.frames.try_recv().is_ok() {
            unsent += 1;
        }
        if unsent > 0 {
            self.counters()
                .acks_failed
                .fetch_add(unsent, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                conn = self.id,
                unsent,
                "acks not sent before the socket closed; Slack will redeliver those envelopes"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP listener that accepts and hangs up: the TLS handshake over it must fail as an
    /// error (which also proves a rustls crypto provider is available), never a panic.
    async fn hang_up_listener() -> u16 {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                drop(stream);
            }
        });
        port
    }

    #[tokio::test]
    async fn a_failed_tls_handshake_is_an_error() {
        let port = hang_up_listener().await;
        let url = Url::parse(&format!("wss://127.0.0.1:{port}/link/?ticket=t")).unwrap();
        let result = open(
            &url,
            &ConnectionSettings::default(),
            &CancellationToken::new(),
        )
        .await;
        assert!(
            matches!(result, Err(ConnectError::Handshake(_))),
            "{:?}",
            result.err()
        );
    }

    /// A websocket server on loopback that accepts one upgrade, sends `first` (if any) and
    /// then keeps the socket open without a word; its URL.
    async fn websocket_server(first: Option<&'static str>) -> Url {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let mut ws = tokio_tungstenite::accept_async(stream).await.unwrap();
            if let Some(text) = first {
                ws.send(Message::text(text)).await.unwrap();
            }
            std::future::pending::<()>().await;
        });
        Url::parse(&format!("ws://127.0.0.1:{port}/link/")).unwrap()
    }

    #[tokio::test]
    async fn a_silent_server_is_a_hello_timeout() {
        let url = websocket_server(None).await;
        let settings = ConnectionSettings {
            hello_timeout: Duration::from_millis(300),
            ..ConnectionSettings::default()
        };
        let result = open(&url, &settings, &CancellationToken::new()).await;
        assert!(
            matches!(result, Err(ConnectError::HelloTimeout(_))),
            "{:?}",
            result.err()
        );
    }

    #[tokio::test]
    async fn the_socket_sends_without_nagle_delay() {
        let url = websocket_server(Some(
            r#"{"type":"hello","num_connections":1,"connection_info":{"app_id":"A1"}}"#,
        ))
        .await;
        let (socket, _hello) = open(
            &url,
            &ConnectionSettings::default(),
            &CancellationToken::new(),
        )
        .await
        .unwrap();
        let MaybeTlsStream::Plain(tcp) = socket.ws.get_ref() else {
            panic!("a ws:// URL gives a plain TCP stream");
        };
        assert!(
            tcp.nodelay().unwrap(),
            "TCP_NODELAY is off: acks wait for delayed ACKs"
        );
    }
}
