//! The daemon's side of the control socket.
//!
//! It shares the current-thread runtime with the Slack connection, so nothing here blocks
//! and every client is bounded: the caller is checked (`SO_PEERCRED` and the access policy)
//! before anything is read, its request line must arrive within
//! [`Limits::request_timeout`] and be at most [`MAX_MESSAGE_BYTES`] long, the whole
//! exchange ends within [`Limits::exchange_timeout`], and at most [`Limits::max_clients`]
//! connections are served at once, with a pause after accept errors (EMFILE…) instead of a
//! busy loop.
//!
//! Idle or half-open connections cannot keep `status` and `health` out: when every slot is
//! taken, a new connection takes the slot of the one that has waited longest for its
//! request line, which is told so and closed. Only when every slot holds a request being
//! answered (a moment: answers are computed at once) is a new connection refused as busy.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

pub use super::listen::{Passed, bind, from_systemd};

use super::ControlContext;
use super::access::Peer;
use super::protocol::{
    Command, HealthReport, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Request, Response, StatusReport,
};
use crate::metrics::Format;

/// Bounds on what clients may cost the daemon.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The whole exchange (reading the request, writing the answer) must end within this;
    /// a client that sends nothing or reads nothing is dropped then.
    pub exchange_timeout: Duration,
    /// From the accept to the end of the request line (the caller check included): a
    /// client that has not sent its request by then is dropped.
    pub request_timeout: Duration,
    /// Connections served at once; beyond this, a new one takes the slot of the one that
    /// has waited longest for its request line, or, when none is waiting, gets a short
    /// error and is closed.
    pub max_clients: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            exchange_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(1),
            max_clients: 32,
        }
    }
}

/// How long to pause after a failed `accept` (EMFILE, ENFILE, ENOBUFS…).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves control requests on `listener` with the default [`Limits`] until `shutdown`.
pub async fn serve(listener: UnixListener, ctx: Arc<ControlContext>, shutdown: CancellationToken) {
    serve_with(listener, ctx, Limits::default(), shutdown).await;
}

/// [`serve`] with explicit limits.
pub async fn serve_with(
    listener: UnixListener,
    ctx: Arc<ControlContext>,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Slots::new(limits.max_clients));
    let mut busy_log = Throttle::default();
    let mut dropped_log = Throttle::default();
    let mut error_log = Throttle::default();
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => match slots.admit() {
                Some((slot, dropped_waiting)) => {
                    if dropped_waiting && let Some(suppressed) = dropped_log.ready() {
                        tracing::warn!(
                            max_clients = limits.max_clients,
                            suppressed,
                            "control: every connection slot is taken; dropped the connection that waited longest for its request"
                        );
                    }
                    tokio::spawn(connection(stream, ctx.clone(), limits, slot));
                }
                None => {
                    refuse_busy(&stream, limits.max_clients);
                    if let Some(suppressed) = busy_log.ready() {
                        tracing::warn!(
                            max_clients = limits.max_clients,
                            suppressed,
                            "control: too many connections at once, refusing new ones"
                        );
                    }
                }
            },
            Err(error) => {
                if let Some(suppressed) = error_log.ready() {
                    tracing::warn!(%error, suppressed, "control: cannot accept a connection");
                }
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
    tracing::debug!("control: stopped accepting connections");
}

/// The connections being served, oldest first.
struct Slots {
    max: usize,
    table: Mutex<SlotTable>,
}

#[derive(Default)]
struct SlotTable {
    next_id: u64,
    taken: VecDeque<Taken>,
}

struct Taken {
    id: u64,
    /// Still waiting for its request line: it may be dropped to make room.
    waiting: bool,
    drop_it: CancellationToken,
}

/// One connection's slot, given back when dropped.
struct Slot {
    slots: Arc<Slots>,
    id: u64,
    /// Cancelled when a newer connection took this slot while the request was awaited.
    dropped: CancellationToken,
}

impl Slots {
    fn new(max: usize) -> Self {
        Slots {
            max: max.max(1),
            table: Mutex::default(),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, SlotTable> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A slot for a new connection: a free one, else the slot of the connection that has
    /// waited longest for its request line (then `true`: that one is told to go). `None`
    /// when every slot holds a request being answered.
    fn admit(self: &Arc<Self>) -> Option<(Slot, bool)> {
        let mut table = self.table();
        let mut dropped_waiting = false;
        if table.taken.len() >= self.max {
            let oldest = table.taken.iter().position(|taken| taken.waiting)?;
            if let Some(taken) = table.taken.remove(oldest) {
                taken.drop_it.cancel();
            }
            dropped_waiting = true;
        }
        let id = table.next_id;
        table.next_id += 1;
        let dropped = CancellationToken::new();
        table.taken.push_back(Taken {
            id,
            waiting: true,
            drop_it: dropped.clone(),
        });
        let slot = Slot {
            slots: self.clone(),
            id,
            dropped,
        };
        Some((slot, dropped_waiting))
    }
}

impl Slot {
    /// The request has arrived: from now on the slot is kept until the answer is sent.
    fn requested(&self) {
        if let Some(taken) = self
            .slots
            .table()
            .taken
            .iter_mut()
            .find(|taken| taken.id == self.id)
        {
            taken.waiting = false;
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.table().taken.retain(|taken| taken.id != self.id);
    }
}

/// At most one log line a second for a repeated condition.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    /// `Some(lines suppressed since the last one)` when a line may be logged now.
    fn ready(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Tells a connection beyond the limit so without waiting: a fresh socket's send buffer has
/// room for one short line, and if not, closing it says enough.
fn refuse_busy(stream: &UnixStream, max_clients: usize) {
    let line = response_line(&Response::error(format!(
        "busy: {max_clients} control connections are being served, try again in a moment"
    )));
    let _ = stream.try_write(&line);
}

async fn connection(mut stream: UnixStream, ctx: Arc<ControlContext>, limits: Limits, slot: Slot) {
    let peer = match stream.peer_cred() {
        Ok(cred) => Peer {
            uid: cred.uid(),
            gid: cred.gid(),
            pid: cred.pid(),
        },
        Err(error) => {
            tracing::debug!(%error, "control: cannot identify a caller, closing");
            return;
        }
    };
    let exchange_deadline = tokio::time::Instant::now() + limits.exchange_timeout;
    let request_timeout = limits.request_timeout.min(limits.exchange_timeout);
    let incoming = tokio::select! {
        () = slot.dropped.cancelled() => {
            tracing::debug!(uid = peer.uid, pid = peer.pid, "control: dropped a client waiting for its request to make room");
            let line = response_line(&Response::error(format!(
                "dropped: all {} control connection slots were taken, and this connection had waited longest for its request line",
                limits.max_clients
            )));
            let _ = stream.try_write(&line);
            return;
        }
        received = tokio::time::timeout(request_timeout, receive(&mut stream, &ctx, &peer)) => match received {
            Ok(Ok(Some(incoming))) => incoming,
            Ok(Ok(None)) => return,
            Ok(Err(error)) => {
                tracing::debug!(%error, uid = peer.uid, pid = peer.pid, "control: connection failed");
                return;
            }
            Err(_) => {
                timed_out(
                    &stream,
                    &peer,
                    format!("the request line must arrive within {request_timeout:?}"),
                );
                return;
            }
        },
    };
    slot.requested();
    let exchange = limits.exchange_timeout;
    match tokio::time::timeout_at(exchange_deadline, respond(&mut stream, &ctx, incoming)).await {
        Ok(Ok(None)) => {}
        Ok(Ok(Some(command))) => hand_off(stream, &ctx, peer, command).await,
        Ok(Err(error)) => {
            tracing::debug!(%error, uid = peer.uid, pid = peer.pid, "control: connection failed");
        }
        Err(_) => timed_out(
            &stream,
            &peer,
            format!("the exchange must end within {exchange:?}"),
        ),
    }
}

/// Tells a client that broke a time rule so, without waiting for it to read, before it is
/// dropped.
fn timed_out(stream: &UnixStream, peer: &Peer, rule: String) {
    tracing::debug!(
        uid = peer.uid,
        pid = peer.pid,
        "control: dropping a client: {rule}"
    );
    let line = response_line(&Response::error(format!("timed out: {rule}")));
    let _ = stream.try_write(&line);
}

/// What came in on a connection.
enum Incoming {
    Line(Vec<u8>),
    TooLong,
    /// The client closed without sending anything.
    Nothing,
}

/// A request the server does not answer itself: the connection goes to the daemon's
/// handover coordinator, which may keep it for a long exchange.
#[derive(Debug)]
pub struct HandoverCall {
    pub stream: UnixStream,
    pub peer: Peer,
    pub command: Command,
}

/// Checks the caller, then reads its request. `None` when the caller was refused (and told
/// so): nothing of what it sends is read.
async fn receive(
    stream: &mut UnixStream,
    ctx: &ControlContext,
    peer: &Peer,
) -> std::io::Result<Option<Incoming>> {
    if let Err(refusal) = ctx.access.authorize(peer).await {
        tracing::warn!(uid = peer.uid, pid = peer.pid, %refusal, "control: refused a caller");
        send(stream, &Response::error(refusal.to_string())).await?;
        return Ok(None);
    }
    read_request(stream).await.map(Some)
}

/// Answers one request, or returns the command whose connection must be handed off.
async fn respond(
    stream: &mut UnixStream,
    ctx: &ControlContext,
    incoming: Incoming,
) -> std::io::Result<Option<Command>> {
    let response = match incoming {
        Incoming::Nothing => return Ok(None),
        Incoming::TooLong => Response::error(format!(
            "request too long: a request is one line of at most {MAX_MESSAGE_BYTES} bytes"
        )),
        Incoming::Line(line) => match answer(ctx, &line) {
            Answer::Now(response) => response,
            Answer::Inbox(command) => super::inbox::answer(ctx, command).await,
            Answer::HandOff(command) => return Ok(Some(command)),
        },
    };
    send(stream, &response).await?;
    Ok(None)
}

async fn hand_off(mut stream: UnixStream, ctx: &ControlContext, peer: Peer, command: Command) {
    let Some(coordinator) = &ctx.handover else {
        let _ = send(
            &mut stream,
            &Response::error("this daemon does not take part in handovers"),
        )
        .await;
        return;
    };
    if let Err(refused) = coordinator.try_send(HandoverCall {
        stream,
        peer,
        command,
    }) {
        let mut call = refused.into_inner();
        let _ = send(
            &mut call.stream,
            &Response::error("a handover is already in progress; try again when it has ended"),
        )
        .await;
    }
}

/// Reads one line, never more than [`MAX_MESSAGE_BYTES`]. A request cut short by the end of
/// the stream instead of a newline is taken as it is.
async fn read_request(stream: &mut UnixStream) -> std::io::Result<Incoming> {
    let mut reader = BufReader::new((&mut *stream).take(MAX_MESSAGE_BYTES as u64));
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line).await?;
    Ok(if line.last() == Some(&b'\n') {
        Incoming::Line(line)
    } else if line.len() >= MAX_MESSAGE_BYTES {
        Incoming::TooLong
    } else if line.is_empty() {
        Incoming::Nothing
    } else {
        Incoming::Line(line)
    })
}

enum Answer {
    Now(Response),
    /// Answered from the inbox's store, which takes a wait.
    Inbox(Command),
    HandOff(Command),
}

impl From<Response> for Answer {
    fn from(response: Response) -> Self {
        Answer::Now(response)
    }
}

/// The response to one request line.
fn answer(ctx: &ControlContext, line: &[u8]) -> Answer {
    let value: serde_json::Value = match serde_json::from_slice(line) {
        Ok(value) => value,
        Err(error) => {
            return Response::error(format!("invalid request: not JSON ({error})")).into();
        }
    };
    let Some(object) = value.as_object() else {
        return Response::error("invalid request: expected a JSON object").into();
    };
    let version = match object.get("version").map(serde_json::Value::as_u64) {
        None => return Response::error("invalid request: no \"version\" field").into(),
        Some(None) => {
            return Response::error("invalid request: \"version\" must be a protocol number")
                .into();
        }
        Some(Some(version)) => version,
    };
    if version != u64::from(PROTOCOL_VERSION) {
        return Response::version_mismatch(u32::try_from(version).unwrap_or(u32::MAX)).into();
    }
    let request: Request = match serde_json::from_value(value) {
        Ok(request) => request,
        Err(error) => return Response::error(format!("invalid request: {error}")).into(),
    };
    match request.command {
        Command::Status => Response::Status(Box::new(StatusReport::collect(ctx))).into(),
        Command::Health => Response::Health(HealthReport::collect(ctx)).into(),
        Command::Metrics { openmetrics } => {
            let format = if openmetrics {
                Format::OpenMetrics
            } else {
                Format::Text
            };
            Response::Metrics {
                exposition: ctx.exposition.render(format),
            }
            .into()
        }
        command @ (Command::Handover | Command::Takeover { .. }) => Answer::HandOff(command),
        command @ (Command::Inbox
        | Command::InboxList { .. }
        | Command::InboxRetry { .. }
        | Command::InboxDrop { .. }) => Answer::Inbox(command),
    }
}

fn response_line(response: &Response) -> Vec<u8> {
    let mut line = serde_json::to_vec(response).unwrap_or_else(|_| {
        br#"{"response":"error","message":"cannot encode the answer"}"#.to_vec()
    });
    line.push(b'\n');
    line
}

async fn send(stream: &mut UnixStream, response: &Response) -> std::io::Result<()> {
    let mut line = response_line(response);
    if line.len() > MAX_MESSAGE_BYTES {
        line = response_line(&Response::error(format!(
            "the answer is longer than {MAX_MESSAGE_BYTES} bytes"
        )));
    }
    stream.write_all(&line).await?;
    stream.shutdown().await
}
