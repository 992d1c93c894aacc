//! A local stand-in for Slack's Socket Mode backend, for integration tests, benchmarks and
//! the offline demo. It behaves like the real service as the project's
//! `docs/slack-socket-mode.md` describes it: single-use websocket URLs, `hello` with the app's socket
//! count, envelopes to one random socket, redelivery of unacked events, disconnect reasons
//! with their graces, the 10-socket limit counting stale sockets, and TCP held open after
//! the close handshake. Tests script failures and inspect a [`Record`] of what happened.
//!
//! All times are `tokio::time::Instant`s, so tests may pause time.

mod api;
mod bot_api;
mod config;
mod delivery;
mod link;
mod load;
mod record;
mod registry;
mod session;
mod spec;
mod state;
#[cfg(test)]
mod tests;
mod tickets;
mod timers;

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

pub use api::OpenResponse;
pub use config::{
    DEFAULT_APP_ID, HelloStyle, SimApp, SimConfig, bot_id, bot_user_id, fake_bot_token,
    fake_signing_secret, fake_token,
};
pub use load::{LoadMix, LoadSpec};
pub use record::{
    ApiCall, CloseKind, Delivery, EnvelopeRecord, OpenCall, Record, ResponseUrlPost, SocketId,
    SocketRecord, WaitTimeout,
};
pub use registry::RawFrame;
pub use spec::{EnvelopeSpec, SIM_CHANNEL_ID, SIM_TEAM_ID, SIM_USER_ID};

use registry::SocketCommand;
use state::Shared;

/// `shutdown` waits at most this long for the simulator's tasks to finish.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// A running simulator. Clones share it; its tasks stop on [`Simulator::shutdown`] or when
/// the last clone is dropped.
#[derive(Clone)]
pub struct Simulator {
    shared: Arc<Shared>,
    _lifetime: Arc<Lifetime>,
}

/// Cancels the simulator's tasks when the last `Simulator` clone goes away (the tasks
/// themselves hold only `Shared`, which would otherwise keep them alive).
struct Lifetime(CancellationToken);

impl Drop for Lifetime {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl fmt::Debug for Simulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulator")
            .field("api", &self.shared.api_addr)
            .field("link", &self.shared.link_addr)
            .finish_non_exhaustive()
    }
}

impl Simulator {
    /// Starts on 127.0.0.1 with ephemeral ports.
    pub async fn start(config: SimConfig) -> std::io::Result<Simulator> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config).await
    }

    /// Serves the Web API on `api_addr`; the websocket link listens on an ephemeral port of
    /// the same address (clients learn it from `apps.connections.open`).
    pub async fn start_on(api_addr: SocketAddr, config: SimConfig) -> std::io::Result<Simulator> {
        let api_listener = TcpListener::bind(api_addr).await?;
        let link_listener = TcpListener::bind((api_addr.ip(), 0)).await?;
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let shared = Arc::new(Shared::new(
            config,
            api_listener.local_addr()?,
            link_listener.local_addr()?,
            shutdown.clone(),
            tasks.clone(),
        ));
        tasks.spawn(api::serve(shared.clone(), api_listener));
        tasks.spawn(link::accept_loop(shared.clone(), link_listener));
        tasks.spawn(delivery::run_redelivery_timer(shared.clone()));
        info!(
            api = %shared.api_addr,
            link = %shared.link_addr,
            "Slack Socket Mode simulator listening"
        );
        Ok(Simulator {
            shared,
            _lifetime: Arc::new(Lifetime(shutdown)),
        })
    }

    /// The Web API base, e.g. `http://127.0.0.1:41234/api`.
    pub fn api_url(&self) -> String {
        format!("http://{}/api", self.shared.api_addr)
    }

    /// The `response_url` the payload of envelope `envelope_id` carries (slash commands,
    /// block actions), e.g. `http://127.0.0.1:41234/response/<id>`.
    pub fn response_url(&self, envelope_id: &str) -> String {
        self.shared.read(|inner| inner.response_url(envelope_id))
    }

    pub fn config(&self) -> &SimConfig {
        &self.shared.config
    }

    /// Stops every task (sockets are dropped without Close frames) and waits for them,
    /// at most a few seconds.
    pub async fn shutdown(&self) {
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
        if tokio::time::timeout(SHUTDOWN_WAIT, self.shared.tasks.wait())
            .await
            .is_err()
        {
            warn!("simulator tasks still running after shutdown");
        }
    }

    /// Answers the next `apps.connections.open` call with `response` (queued, first in
    /// first out, before any sticky answer).
    pub fn push_open_response(&self, response: OpenResponse) {
        self.shared
            .update(|inner| inner.open_overrides.push(response));
    }

    /// Answers every `apps.connections.open` call with `response` until set to `None`.
    pub fn set_open_response(&self, response: Option<OpenResponse>) {
        self.shared
            .update(|inner| inner.open_overrides.set_sticky(response));
    }

    /// Refuses every websocket upgrade with this HTTP status (e.g. 409) until `None`.
    pub fn set_handshake_status(&self, status: Option<u16>) {
        self.shared.update(|inner| inner.handshake_status = status);
    }

    /// Delivers an envelope to one random accepting socket of the app, or queues it until
    /// one opens. Returns the envelope id.
    pub fn inject(&self, app_id: &str, spec: EnvelopeSpec) -> String {
        if !self.shared.config.apps.iter().any(|a| a.app_id == app_id) {
            warn!(
                app = app_id,
                "injecting for an app the simulator does not serve"
            );
        }
        self.shared
            .update(|inner| inner.inject(app_id, spec, Instant::now()))
    }

    /// Injects a stream of envelopes in the background; the handle ends when all are
    /// injected (not acked) or on shutdown.
    pub fn start_load(&self, app_id: &str, load: LoadSpec) -> JoinHandle<()> {
        let run = self.shared.load_runs.fetch_add(1, Ordering::Relaxed) + 1;
        self.shared.tasks.spawn(load::run_load(
            self.shared.clone(),
            app_id.to_owned(),
            load,
            run,
        ))
    }

    /// Sends a frame as is on an open socket, for bad-input tests.
    pub fn send_raw(&self, socket: SocketId, frame: RawFrame) {
        let message = match frame {
            RawFrame::Text(text) => Message::text(text),
            RawFrame::Binary(bytes) => Message::binary(bytes),
        };
        self.shared.read(|inner| {
            inner.sockets.send(socket, SocketCommand::Send(message));
        });
    }

    /// Sends `{"type":"disconnect","reason":…}`, stops delivering to the socket and closes
    /// it after the reason's grace unless the client closes first.
    pub fn disconnect(&self, socket: SocketId, reason: &str) {
        self.shared.update(|inner| inner.disconnect(socket, reason));
    }

    /// Drops the socket's TCP stream at once, with no Close frame.
    pub fn drop_socket(&self, socket: SocketId) {
        self.shared.read(|inner| {
            inner.sockets.send(socket, SocketCommand::Drop);
        });
    }

    /// Makes the socket half-open: it reads and writes nothing (no pongs) but keeps TCP and
    /// counts toward the app's sockets until `stale_socket_ttl` passes.
    pub fn make_stale(&self, socket: SocketId) {
        self.shared.update(|inner| inner.make_stale(socket));
    }

    /// A snapshot of the record.
    pub fn record(&self) -> Record {
        self.shared.read(|inner| inner.record.clone())
    }

    /// Waits until `pred` holds for the record, re-checking on every change. `pred` runs
    /// under the simulator's lock: keep it quick and do not call the simulator from it.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        pred: impl Fn(&Record) -> bool,
    ) -> Result<Record, WaitTimeout> {
        let deadline = Instant::now() + timeout;
        let mut changes = self.shared.subscribe();
        loop {
            changes.borrow_and_update();
            let met = self
                .shared
                .read(|inner| pred(&inner.record).then(|| inner.record.clone()));
            if let Some(record) = met {
                return Ok(record);
            }
            let woken = tokio::time::timeout_at(deadline, changes.changed()).await;
            if !matches!(woken, Ok(Ok(()))) {
                return Err(WaitTimeout {
                    waited: timeout,
                    record: self.record(),
                });
            }
        }
    }

    /// Waits until every envelope in `ids` has been acked.
    pub async fn wait_acked(
        &self,
        timeout: Duration,
        ids: &[impl AsRef<str>],
    ) -> Result<Record, WaitTimeout> {
        self.wait_until(timeout, |r| ids.iter().all(|id| r.is_acked(id.as_ref())))
            .await
    }

    /// Injects an envelope (see [`Simulator::inject`]) and waits until it is acked;
    /// returns what became of it.
    pub async fn inject_and_wait_ack(
        &self,
        app_id: &str,
        spec: EnvelopeSpec,
        timeout: Duration,
    ) -> Result<EnvelopeRecord, WaitTimeout> {
        let id = self.inject(app_id, spec);
        let record = self.wait_acked(timeout, &[&id]).await?;
        Ok(record
            .envelope(&id)
            .expect("an acked envelope is recorded")
            .clone())
    }

    /// The app's open sockets (hello sent, not closed; stale ones included), by id.
    pub fn open_sockets(&self, app_id: &str) -> Vec<SocketId> {
        self.shared.read(|inner| inner.sockets.open_ids(app_id))
    }
}
