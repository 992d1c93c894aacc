//! Keeps one Socket Mode connection alive: fresh URL per connect, backoff between
//! failures, zero-gap rotation, and each disconnect reason handled on its own terms.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::config::{
    Config, ConnectionSettings, EnvironmentSettings, OtherClientsPolicy, Settings, mismatch_message,
};
use crate::dispatch::Dispatcher;
use crate::slack::api::{OpenError, SlackApi};
use crate::slack::backoff::Backoff;
use crate::slack::connection::{self, ConnEvent, ConnectError, ConnectionHandle, EndCause};
use crate::slack::far_future;
use crate::slack::wire::{DisconnectReason, Hello};
use crate::state::{Counters, Phase, ServiceState};
use crate::token::AppToken;

/// Errors that stop the service: retrying cannot fix them (exit 78).
#[derive(Debug, thiserror::Error)]
pub enum FatalError {
    #[error(transparent)]
    Auth(OpenError),
    #[error(
        "Slack disconnected with link_disabled: Socket Mode is switched off for this app; enable it under Settings > Socket Mode"
    )]
    LinkDisabled,
    /// Slack's hello names another app than the environment is pinned to (or than the
    /// token's hint, which names the lock).
    #[error("{0}")]
    AppMismatch(String),
    /// Other clients are connected to the app and the policy says exit.
    #[error("{0}")]
    OtherClients(String),
}

impl FatalError {
    pub fn exit_code(&self) -> u8 {
        match self {
            // Someone else holds the app: try again later (EX_TEMPFAIL).
            FatalError::OtherClients(_) => crate::exit::TEMPFAIL,
            FatalError::Auth(_) | FatalError::LinkDisabled | FatalError::AppMismatch(_) => {
                crate::exit::CONFIG
            }
        }
    }
}

/// Why a connect attempt failed, and what to do about it.
enum Failure {
    Fatal(FatalError),
    Retry {
        /// Wait at least this long (Retry-After, the too_many_websockets floor).
        at_least: Duration,
        cause: String,
    },
}

/// Owns the connection lifecycle for one app.
pub struct Supervisor {
    api: SlackApi,
    token: AppToken,
    /// New tokens (SIGHUP after the token file changed): each one rotates the connection.
    tokens: Option<watch::Receiver<AppToken>>,
    /// The app hello must name, and the environments for the message when it does not.
    expected_app: Option<String>,
    environment: String,
    environments: BTreeMap<String, EnvironmentSettings>,
    /// When our own sockets closed: Slack counts them for a while yet.
    recently_closed: VecDeque<Instant>,
    /// Settings that a reload (SIGHUP) may change; read at each use.
    live: watch::Receiver<Settings>,
    dispatcher: Arc<Dispatcher>,
    state: Arc<ServiceState>,
    events_tx: mpsc::UnboundedSender<ConnEvent>,
    events: mpsc::UnboundedReceiver<ConnEvent>,
    backoff: Backoff,
    rng: SmallRng,
    next_conn_id: u64,
    active: Option<ConnectionHandle>,
    /// Replaced connections finishing their acks before they close.
    retiring: Vec<ConnectionHandle>,
}

impl Supervisor {
    pub fn new(
        config: &Config,
        live: watch::Receiver<Settings>,
        dispatcher: Arc<Dispatcher>,
        state: Arc<ServiceState>,
    ) -> Result<Self, OpenError> {
        let settings = live.borrow().connection.clone();
        let api = SlackApi::new(&config.api_url, config.settings.slack.debug_reconnects)?;
        let (events_tx, events) = mpsc::unbounded_channel();
        Ok(Supervisor {
            api,
            token: config.token.clone(),
            tokens: None,
            expected_app: config.expected_app().map(str::to_owned),
            environment: config.settings.environment.clone(),
            environments: config.settings.environments.clone(),
            recently_closed: VecDeque::new(),
            backoff: Backoff::new(settings.backoff_initial, settings.backoff_max),
            live,
            dispatcher,
            state,
            events_tx,
            events,
            rng: SmallRng::from_os_rng(),
            next_conn_id: 1,
            active: None,
            retiring: Vec::new(),
        })
    }

    /// Follows token changes: each new token rotates the connection with no gap.
    pub fn follow_tokens(mut self, tokens: watch::Receiver<AppToken>) -> Self {
        self.tokens = Some(tokens);
        self
    }

    /// Runs until `shutdown` is cancelled (then closes cleanly) or a fatal error.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), FatalError> {
        let result = self.serve(&shutdown).await;
        self.close_all().await;
        self.state.set_phase(Phase::Stopped);
        result
    }

    async fn serve(&mut self, shutdown: &CancellationToken) -> Result<(), FatalError> {
        let mut wait_before_connect: Option<(Duration, String)> = None;
        let mut stable_at: Option<Instant> = None;
        loop {
            if self.active.is_none() {
                if let Some((delay, cause)) = wait_before_connect.take() {
                    self.state.set_phase(Phase::Reconnecting { delay, cause });
                    tokio::select! {
                        () = shutdown.cancelled() => return Ok(()),
                        () = sleep(delay) => {}
                    }
                }
                self.state.set_phase(Phase::Connecting);
                let attempt = tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    attempt = self.connect() => attempt,
                };
                match attempt {
                    Ok((handle, hello)) => {
                        self.active = Some(handle);
                        self.on_hello(&hello)?;
                        stable_at = Some(Instant::now() + self.settings().stable_after);
                    }
                    Err(Failure::Fatal(error)) => return Err(error),
                    Err(Failure::Retry { at_least, cause }) => {
                        wait_before_connect = Some((self.next_delay(at_least), cause));
                    }
                }
                continue;
            }

            let stable_deadline = stable_at.unwrap_or_else(far_future);
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = sleep_until(stable_deadline), if stable_at.is_some() => {
                    // A connection that stayed up proves the path works: start over.
                    self.backoff.reset();
                    stable_at = None;
                }
                Some(event) = self.events.recv() => {
                    if let Some(next) = self.on_event(event, shutdown).await? {
                        stable_at = None;
                        wait_before_connect = Some(next);
                    }
                }
                () = self.dispatcher.orphaned(), if self.active.is_some() => self.adopt_orphans(),
                token = next_token(&mut self.tokens) => {
                    tracing::info!(token = %token, "the app token changed; rotating to a connection with the new one");
                    self.token = token;
                    self.rotate(shutdown).await?;
                }
            }
        }
    }

    /// Reacts to one connection event; returns the wait before reconnecting when the
    /// active connection is gone.
    async fn on_event(
        &mut self,
        event: ConnEvent,
        shutdown: &CancellationToken,
    ) -> Result<Option<(Duration, String)>, FatalError> {
        let active_id = self.active.as_ref().map(|c| c.id);
        match event {
            ConnEvent::Ended { conn, cause } if Some(conn) == active_id => {
                self.recently_closed.push_back(Instant::now());
                self.active = None;
                self.sync_socket_count();
                self.mark_down(&cause.to_string());
                Counters::bump(&self.state.counters.reconnects);
                tracing::warn!(conn, %cause, "connection ended; reconnecting");
                let delay = self.next_delay(Duration::ZERO);
                Ok(Some((delay, cause.to_string())))
            }
            ConnEvent::Ended { conn, cause } => {
                self.recently_closed.push_back(Instant::now());
                self.retired(conn, &cause).await;
                Ok(None)
            }
            ConnEvent::Disconnect { conn, reason } if Some(conn) == active_id => {
                self.state
                    .update(|s| s.last_disconnect = Some(reason.as_str().to_owned()));
                self.on_disconnect(reason, shutdown).await
            }
            // A retiring socket's disconnect needs nothing: it is closing anyway.
            ConnEvent::Disconnect { .. } => Ok(None),
        }
    }

    async fn on_disconnect(
        &mut self,
        reason: DisconnectReason,
        shutdown: &CancellationToken,
    ) -> Result<Option<(Duration, String)>, FatalError> {
        match reason {
            DisconnectReason::LinkDisabled => Err(FatalError::LinkDisabled),
            DisconnectReason::TooManyWebsockets => {
                if let Some(active) = self.active.take() {
                    active.close();
                    self.retiring.push(active);
                }
                self.sync_socket_count();
                self.mark_down("too_many_websockets");
                Counters::bump(&self.state.counters.reconnects);
                let delay = self.next_delay(self.settings().too_many_websockets_backoff);
                self.diagnose_too_many_websockets(delay);
                self.count_too_many_websockets();
                Ok(Some((delay, "too_many_websockets".to_owned())))
            }
            DisconnectReason::Warning
            | DisconnectReason::RefreshRequested
            | DisconnectReason::Other(_) => {
                if let DisconnectReason::Other(reason) = &reason {
                    tracing::warn!(reason, "unknown disconnect reason; rotating the connection");
                }
                self.rotate(shutdown).await
            }
        }
    }

    /// Zero-gap rotation: the replacement says hello before the old socket closes, so
    /// at every instant one socket can take envelopes.
    async fn rotate(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Option<(Duration, String)>, FatalError> {
        let attempt = tokio::select! {
            () = shutdown.cancelled() => return Ok(None),
            attempt = self.connect() => attempt,
        };
        match attempt {
            Ok((replacement, hello)) => {
                Counters::bump(&self.state.counters.rotations);
                if let Some(old) = self.active.replace(replacement) {
                    tracing::info!(
                        old = old.id,
                        new = self.active.as_ref().map(|c| c.id),
                        "rotated to a new connection"
                    );
                    old.retire(self.retire_budget());
                    self.retiring.push(old);
                }
                self.on_hello(&hello)?;
                Ok(None)
            }
            Err(Failure::Fatal(error)) => Err(error),
            // The old socket still serves until Slack closes it; its end then goes
            // through the normal reconnect path.
            Err(Failure::Retry { cause, .. }) => {
                tracing::warn!(%cause, "could not open a replacement connection; keeping the current one while it lasts");
                Ok(None)
            }
        }
    }

    /// Acks on the active socket the envelopes that arrived on a closing one after its
    /// Close (or that a predecessor handed on): Slack matches acks by envelope id on any
    /// socket of the app, so none waits for a redelivery and no command is lost.
    fn adopt_orphans(&self) {
        let Some(active) = &self.active else { return };
        for envelope in self.dispatcher.take_orphans() {
            tracing::info!(
                conn = active.id,
                envelope_id = %envelope.envelope_id,
                "handling an envelope that arrived on a closing socket"
            );
            self.dispatcher.accept(envelope, active.acks());
        }
    }

    async fn retired(&mut self, conn: u64, cause: &EndCause) {
        if let Some(index) = self.retiring.iter().position(|c| c.id == conn) {
            self.retiring.swap_remove(index).finished().await;
            self.sync_socket_count();
            tracing::debug!(conn, %cause, "retired connection closed");
        }
    }

    /// One attempt: a fresh URL from `apps.connections.open`, then the websocket and its
    /// `hello`.
    async fn connect(&mut self) -> Result<(ConnectionHandle, Hello), Failure> {
        Counters::bump(&self.state.counters.connects);
        let url = self
            .api
            .open_connection(&self.token)
            .await
            .map_err(|error| match error {
                OpenError::Permanent { .. } => Failure::Fatal(FatalError::Auth(error)),
                OpenError::RateLimited { retry_after } => Failure::Retry {
                    at_least: retry_after,
                    cause: format!(
                        "rate limited by apps.connections.open (Retry-After {}s)",
                        retry_after.as_secs()
                    ),
                },
                OpenError::Transient(why) => Failure::Retry {
                    at_least: Duration::ZERO,
                    cause: why,
                },
            })?;
        let settings = self.settings();
        let (socket, hello) = connection::open(&url, &settings)
            .await
            .map_err(|error| self.classify_connect_error(error))?;
        let id = self.next_conn_id;
        self.next_conn_id += 1;
        let handle = socket.spawn(
            id,
            settings,
            self.dispatcher.clone(),
            self.state.clone(),
            self.events_tx.clone(),
        );
        Ok((handle, hello))
    }

    fn classify_connect_error(&self, error: ConnectError) -> Failure {
        match error {
            ConnectError::Disconnected(DisconnectReason::LinkDisabled) => {
                Failure::Fatal(FatalError::LinkDisabled)
            }
            ConnectError::Disconnected(DisconnectReason::TooManyWebsockets) => {
                let floor = self.settings().too_many_websockets_backoff;
                self.diagnose_too_many_websockets(floor);
                self.count_too_many_websockets();
                Failure::Retry {
                    at_least: floor,
                    cause: "too_many_websockets".to_owned(),
                }
            }
            other => Failure::Retry {
                at_least: Duration::ZERO,
                cause: other.to_string(),
            },
        }
    }

    fn diagnose_too_many_websockets(&self, delay: Duration) {
        let app = self
            .state
            .status()
            .app_id
            .or_else(|| self.token.app_id_hint().map(str::to_owned))
            .unwrap_or_else(|| "this app".to_owned());
        tracing::error!(
            app_id = %app,
            backoff_ms = delay.as_millis() as u64,
            "Slack refused the connection with too_many_websockets: app {app} already has the maximum of open sockets. \
             Other clients hold this app's sockets: another flowcoach instance, a laptop running with the same token, \
             or a hung process. Stop them or use a separate app per environment; backing off"
        );
    }

    /// After enough refusals in a row, health turns unhealthy with the diagnosis.
    fn count_too_many_websockets(&self) {
        let limit = self
            .live
            .borrow()
            .conflicts
            .too_many_websockets_unhealthy_after;
        let app = self
            .expected_app
            .clone()
            .unwrap_or_else(|| "this app".to_owned());
        self.state.update(|s| {
            s.too_many_in_a_row += 1;
            if limit > 0 && s.too_many_in_a_row >= limit {
                s.conflict = Some(format!(
                    "Slack refused {} connections in a row with too_many_websockets: other clients hold app {app}'s sockets \
                     (another instance, a laptop with the same token, a hung process); stop them or give each environment its own app",
                    s.too_many_in_a_row
                ));
            }
        });
    }

    fn next_delay(&mut self, at_least: Duration) -> Duration {
        let settings = self.settings();
        self.backoff
            .set_bounds(settings.backoff_initial, settings.backoff_max);
        self.backoff.next_delay(&mut self.rng).max(at_least)
    }

    fn settings(&self) -> ConnectionSettings {
        self.live.borrow().connection.clone()
    }

    /// A retired socket may still owe acks for envelopes whose handlers answer in the ack:
    /// it gets their whole deadline, plus the time to write.
    fn retire_budget(&self) -> Duration {
        self.live.borrow().dispatch.response_deadline + Duration::from_secs(1)
    }

    fn on_hello(&mut self, hello: &Hello) -> Result<(), FatalError> {
        let actual = &hello.connection_info.app_id;
        if let Some(expected) = &self.expected_app {
            if expected != actual {
                return Err(FatalError::AppMismatch(mismatch_message(
                    &self.environment,
                    expected,
                    actual,
                    "Slack's hello says this token belongs to",
                    &self.environments,
                )));
            }
        }
        self.sync_socket_count();
        let ours = self.state.status().sockets_open;
        let others = self.other_connections(hello.num_connections, ours);
        self.state.update(|s| {
            s.phase = Phase::Connected;
            s.app_id = Some(hello.connection_info.app_id.clone());
            s.num_connections = Some(hello.num_connections);
            s.other_connections = Some(others);
            s.connected_since.get_or_insert_with(SystemTime::now);
            s.down_since = None;
            s.too_many_in_a_row = 0;
            s.conflict = None;
        });
        let expected_lifetime_s = hello
            .debug_info
            .as_ref()
            .and_then(|d| d.approximate_connection_time);
        tracing::info!(
            app_id = %hello.connection_info.app_id,
            num_connections = hello.num_connections,
            ours,
            expected_lifetime_s,
            "connected to Slack"
        );
        if others > 0 {
            let message = format!(
                "Slack counts {} open sockets for app {} but this instance holds {ours}: {others} belong to another client \
                 (another host, a laptop with the same token, or a hung process), which takes a share of this app's events",
                hello.num_connections, hello.connection_info.app_id,
            );
            tracing::warn!(
                app_id = %hello.connection_info.app_id,
                num_connections = hello.num_connections,
                ours,
                others,
                "{message}"
            );
            if self.live.borrow().conflicts.other_clients == OtherClientsPolicy::Exit {
                return Err(FatalError::OtherClients(format!(
                    "{message}; conflicts.other_clients = \"exit\", so this instance stops"
                )));
            }
        }
        Ok(())
    }

    /// Sockets of other clients in Slack's count: not ours, not a predecessor's we take
    /// over from, and not ours that closed so recently that Slack still counts them.
    fn other_connections(&mut self, counted: u32, ours: u32) -> u32 {
        let grace = self.live.borrow().conflicts.own_socket_grace;
        let now = Instant::now();
        while self
            .recently_closed
            .front()
            .is_some_and(|closed| now.duration_since(*closed) > grace)
        {
            self.recently_closed.pop_front();
        }
        let predecessor = self
            .state
            .predecessor_sockets
            .load(std::sync::atomic::Ordering::Relaxed);
        counted
            .saturating_sub(ours)
            .saturating_sub(predecessor)
            .saturating_sub(self.recently_closed.len() as u32)
    }

    /// Shutdown: stop taking envelopes, let handlers finish and ack within the drain
    /// budget, then close every socket cleanly. Envelopes that arrive after a socket's
    /// Close wait in the dispatcher ([`Dispatcher::take_orphans`]) for a successor.
    async fn close_all(&mut self) {
        self.state.set_phase(Phase::Draining);
        self.dispatcher.stop_accepting();
        let drain = self.dispatcher.wait_idle();
        if tokio::time::timeout(self.drain_budget(), drain)
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = self.dispatcher.in_flight(),
                "drain budget spent with handlers still running"
            );
        }
        if let Some(active) = self.active.take() {
            active.retire(Duration::from_secs(1));
            self.retiring.push(active);
        }
        for connection in self.retiring.drain(..) {
            connection.finished().await;
        }
        self.sync_socket_count();
    }

    fn drain_budget(&self) -> Duration {
        self.live.borrow().dispatch.drain_timeout
    }

    /// The app has no usable connection from now on, until the next hello.
    fn mark_down(&self, cause: &str) {
        self.state.update(|s| {
            s.last_disconnect = Some(cause.to_owned());
            s.connected_since = None;
            s.down_since.get_or_insert_with(SystemTime::now);
        });
    }

    fn sync_socket_count(&self) {
        let open = u32::from(self.active.is_some()) + self.retiring.len() as u32;
        self.state.update(|s| s.sockets_open = open);
    }
}

/// The next token from a reload; pending forever when tokens are not followed.
async fn next_token(tokens: &mut Option<watch::Receiver<AppToken>>) -> AppToken {
    let Some(tokens) = tokens else {
        return std::future::pending().await;
    };
    if tokens.changed().await.is_err() {
        return std::future::pending().await;
    }
    tokens.borrow_and_update().clone()
}
