//! Keeps `connection.sockets` Socket Mode connections alive: a fresh URL per connect,
//! backoff between failures, zero-gap rotation, each disconnect reason handled on its own
//! terms, and new connections paced whenever Slack keeps ending them before they stay up.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::SeedableRng;
use rand::rngs::SmallRng;
use tokio::sync::{mpsc, watch};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::config::{AppMismatch, AppPin, ConnectionSettings, OtherClientsPolicy, Settings, Whose};
use crate::deadline::far_future;
use crate::dispatch::Dispatcher;
use crate::metrics::labels::{DisconnectLabel, OpenOutcome, ReconnectCause};
use crate::slack::api::{OpenError, SlackApi};
use crate::slack::backoff::Backoff;
use crate::slack::connection::{self, ConnEvent, ConnectError, ConnectionHandle, EndCause};
use crate::slack::throttle::LogThrottle;
use crate::state::{Counters, InstanceState, Phase};
use crate::token::AppToken;
use flowcoach_protocol::{DisconnectReason, Hello};

/// Failed attempts logged at once before the throttle holds lines back; then one per
/// [`LOG_EVERY`]: a long outage is a few lines a minute.
const LOG_BURST: u32 = 3;
const LOG_EVERY: Duration = Duration::from_secs(20);

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
    #[error(transparent)]
    AppMismatch(#[from] AppMismatch),
    /// Other clients are connected to the app and the policy says exit.
    #[error("{0}; conflicts.other_clients = \"exit\", so this instance stops")]
    OtherClients(OtherClients),
}

/// Slack counts sockets of the app that are not this instance's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "Slack counts {counted} open sockets for app {app_id} but this instance holds {ours}: {others} belong to another client \
     (another host, a laptop with the same token, or a hung process), which takes a share of this app's events"
)]
pub struct OtherClients {
    pub app_id: String,
    pub counted: u32,
    pub ours: u32,
    pub others: u32,
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

/// Why a connect attempt failed, when trying again may help.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Socket(#[from] ConnectError),
}

/// Why a connect attempt failed, and what to do about it.
enum Failure {
    Fatal(FatalError),
    /// The service is stopping.
    Stopped,
    Retry {
        /// Wait at least this long (Retry-After, the too_many_websockets floor).
        at_least: Duration,
        error: AttemptError,
    },
}

/// One of the sockets the supervisor keeps open. Each has its own history: a slot whose
/// connections keep ending early backs off while the others serve on.
struct Slot {
    /// 1-based, for logs and diagnoses.
    number: usize,
    conn: Option<ConnectionHandle>,
    /// The connection the slot opens next: a reconnect when `conn` is gone, a rotation
    /// when `conn` still serves until its replacement has said hello.
    next: Option<Planned>,
    /// When the current connection counts as stable (and resets the backoff).
    stable_at: Option<Instant>,
    backoff: Backoff,
}

struct Planned {
    at: Instant,
    cause: String,
}

/// Owns the connection lifecycle for one app.
pub struct Supervisor {
    api: SlackApi,
    token: AppToken,
    /// New tokens (SIGHUP after the token file changed): each one rotates the connection.
    tokens: Option<watch::Receiver<AppToken>>,
    /// `[cluster]`: the membership, for a fresh view of the members at each hello.
    members: Option<crate::cluster::Members>,
    /// The app hello must name.
    pin: AppPin,
    /// A hello without the socket count or the app has been reported.
    minimal_hello_said: bool,
    /// When our own sockets closed: Slack counts them for a while yet.
    recently_closed: VecDeque<Instant>,
    /// Settings that a reload (SIGHUP) may change; read at each use.
    live: watch::Receiver<Settings>,
    dispatcher: Arc<Dispatcher>,
    state: Arc<InstanceState>,
    events_tx: mpsc::UnboundedSender<ConnEvent>,
    events: mpsc::UnboundedReceiver<ConnEvent>,
    rng: SmallRng,
    next_conn_id: u64,
    slots: Vec<Slot>,
    /// Replaced connections finishing their acks before they close.
    retiring: Vec<ConnectionHandle>,
    /// Failed connect attempts: every one is worth a line, but not thousands of them.
    failure_log: LogThrottle,
    /// The pacing diagnosis, likewise.
    pacing_log: LogThrottle,
}

impl Supervisor {
    /// A supervisor that connects with `token` through `api` to the app `pin` names.
    pub fn new(
        api: SlackApi,
        token: AppToken,
        pin: AppPin,
        live: watch::Receiver<Settings>,
        dispatcher: Arc<Dispatcher>,
        state: Arc<InstanceState>,
    ) -> Self {
        let settings = live.borrow().connection.clone();
        let (events_tx, events) = mpsc::unbounded_channel();
        let now = Instant::now();
        let slots = (1..=settings.sockets)
            .map(|number| Slot {
                number,
                conn: None,
                next: Some(Planned {
                    at: now,
                    cause: "start".to_owned(),
                }),
                stable_at: None,
                backoff: Backoff::new(settings.backoff_initial, settings.backoff_max),
            })
            .collect();
        Supervisor {
            api,
            token,
            tokens: None,
            members: None,
            pin,
            minimal_hello_said: false,
            recently_closed: VecDeque::new(),
            live,
            dispatcher,
            state,
            events_tx,
            events,
            rng: SmallRng::from_os_rng(),
            next_conn_id: 1,
            slots,
            retiring: Vec::new(),
            failure_log: LogThrottle::new(LOG_BURST, LOG_EVERY),
            pacing_log: LogThrottle::new(LOG_BURST, LOG_EVERY),
        }
    }

    /// `[cluster]`: Slack's count at each hello is judged against a fresh view of the
    /// other members' sockets.
    pub fn with_members(mut self, members: Option<crate::cluster::Members>) -> Self {
        self.members = members;
        self
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
        loop {
            let now = Instant::now();
            let due = self
                .slots
                .iter()
                .position(|slot| slot.next.as_ref().is_some_and(|next| next.at <= now));
            if let Some(index) = due {
                // The attempt itself ends at a stop, closing a socket it has opened.
                self.open(index, shutdown).await?;
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                continue;
            }
            let next_due = self
                .slots
                .iter()
                .filter_map(|s| s.next.as_ref())
                .map(|n| n.at)
                .min();
            let next_stable = self.slots.iter().filter_map(|s| s.stable_at).min();
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = sleep_until(next_due.unwrap_or_else(far_future)), if next_due.is_some() => {}
                () = sleep_until(next_stable.unwrap_or_else(far_future)), if next_stable.is_some() => {
                    self.on_stable();
                }
                Some(event) = self.events.recv() => self.on_event(event).await?,
                token = next_token(&mut self.tokens) => {
                    tracing::info!(token = %token, "the app token changed; rotating to connections with the new one");
                    self.token = token;
                    for index in 0..self.slots.len() {
                        if self.slots[index].next.is_none() {
                            self.plan(index, Duration::ZERO, "the app token changed".to_owned());
                        }
                    }
                }
                () = self.dispatcher.orphaned(), if self.any_connected() => self.adopt_orphans(),
            }
        }
    }

    /// Opens the slot's planned connection: the first, a reconnect, or the replacement of
    /// a rotating one, which says hello before the old socket (once its pending acks are
    /// written) is closed, so at every instant a socket can take envelopes.
    async fn open(&mut self, index: usize, shutdown: &CancellationToken) -> Result<(), FatalError> {
        self.slots[index].next = None;
        if !self.any_connected() {
            self.state.set_phase(Phase::Connecting);
        }
        match self.connect(shutdown).await {
            Ok((handle, hello)) => {
                let stable_after = self.settings().stable_after;
                let budget = self.retire_budget();
                let slot = &mut self.slots[index];
                slot.stable_at = Some(Instant::now() + stable_after);
                let new = handle.id;
                if let Some(old) = slot.conn.replace(handle) {
                    Counters::bump(&self.state.counters.rotations);
                    tracing::info!(
                        socket = slot.number,
                        old = old.id,
                        new,
                        "rotated to a new connection"
                    );
                    old.retire(budget);
                    self.retiring.push(old);
                }
                if let Some(members) = &self.members {
                    // Our row says our sockets, theirs are read after Slack counted them.
                    self.sync_socket_count();
                    members.refresh().await;
                }
                self.on_hello(&hello)
            }
            Err(Failure::Fatal(error)) => Err(error),
            Err(Failure::Stopped) => Ok(()),
            Err(Failure::Retry { at_least, error }) => {
                self.set_backoff_bounds(index);
                let delay = self.slots[index]
                    .backoff
                    .next_delay(&mut self.rng)
                    .max(at_least);
                self.log_failure(index, &error, delay);
                self.plan(index, delay, error.to_string());
                Ok(())
            }
        }
    }

    /// Every failed attempt, with its cause and the wait before the next one; throttled.
    fn log_failure(&mut self, index: usize, error: &AttemptError, delay: Duration) {
        // Diagnosed on its own, at error level (see `diagnose_too_many_websockets`).
        if matches!(
            error,
            AttemptError::Socket(ConnectError::Disconnected(
                DisconnectReason::TooManyWebsockets
            ))
        ) {
            return;
        }
        let Some(suppressed) = self.failure_log.admit(Instant::now()) else {
            return;
        };
        let slot = &self.slots[index];
        let held_back = if suppressed > 0 {
            format!(" ({suppressed} more failed attempts not logged since the last line)")
        } else {
            String::new()
        };
        let serving = if slot.conn.is_some() {
            "; the current connection serves meanwhile"
        } else {
            ""
        };
        tracing::warn!(
            socket = slot.number,
            cause = %error,
            delay_ms = delay.as_millis() as u64,
            attempt = slot.backoff.attempts(),
            suppressed,
            "could not connect to Slack: {error}; next attempt in {:.1}s{serving}{held_back}",
            delay.as_secs_f64()
        );
    }

    /// Reacts to one connection event.
    async fn on_event(&mut self, event: ConnEvent) -> Result<(), FatalError> {
        match event {
            ConnEvent::Ended { conn, cause } => {
                self.recently_closed.push_back(Instant::now());
                match self.slot_of(conn) {
                    Some(index) => self.on_lost(index, conn, &cause),
                    None => self.retired(conn, &cause).await,
                }
                Ok(())
            }
            ConnEvent::Disconnect { conn, reason } => {
                self.state
                    .counters
                    .disconnects
                    .bump(DisconnectLabel::from(&reason));
                // A retiring socket's disconnect needs nothing: it is closing anyway.
                let Some(index) = self.slot_of(conn) else {
                    return Ok(());
                };
                self.state
                    .update(|s| s.last_disconnect = Some(reason.as_str().to_owned()));
                self.on_disconnect(index, reason)
            }
        }
    }

    /// A slot's connection ended without being replaced first.
    fn on_lost(&mut self, index: usize, conn: u64, cause: &EndCause) {
        let slot = &mut self.slots[index];
        slot.conn = None;
        slot.stable_at = None;
        self.sync_socket_count();
        self.state.counters.reconnects.bump(cause.metric_cause());
        if !self.any_connected() {
            self.mark_down(&cause.to_string());
        }
        let delay = match &self.slots[index].next {
            // A paced rotation was waiting: its replacement keeps its time.
            Some(next) => next.at.saturating_duration_since(Instant::now()),
            None => {
                let delay = self.pace(index, &cause.to_string());
                self.plan(index, delay, cause.to_string());
                delay
            }
        };
        tracing::warn!(
            socket = self.slots[index].number,
            conn,
            %cause,
            delay_ms = delay.as_millis() as u64,
            "connection ended; reconnecting"
        );
        self.show_waiting();
    }

    fn on_disconnect(&mut self, index: usize, reason: DisconnectReason) -> Result<(), FatalError> {
        match reason {
            DisconnectReason::LinkDisabled => Err(FatalError::LinkDisabled),
            DisconnectReason::TooManyWebsockets => {
                let slot = &mut self.slots[index];
                slot.stable_at = None;
                if let Some(conn) = slot.conn.take() {
                    conn.close();
                    self.retiring.push(conn);
                }
                self.sync_socket_count();
                if !self.any_connected() {
                    self.mark_down("too_many_websockets");
                }
                self.state
                    .counters
                    .reconnects
                    .bump(ReconnectCause::TooManyWebsockets);
                self.set_backoff_bounds(index);
                let floor = self.settings().too_many_websockets_backoff;
                let delay = self.slots[index]
                    .backoff
                    .next_delay(&mut self.rng)
                    .max(floor);
                self.diagnose_too_many_websockets(delay);
                self.count_too_many_websockets();
                self.plan(index, delay, "too_many_websockets".to_owned());
                self.show_waiting();
                Ok(())
            }
            DisconnectReason::Warning
            | DisconnectReason::RefreshRequested
            | DisconnectReason::Other(_) => {
                if let DisconnectReason::Other(reason) = &reason {
                    tracing::warn!(reason, "unknown disconnect reason; rotating the connection");
                }
                // `refresh_requested` after `warning`: the replacement is planned already.
                if self.slots[index].next.is_none() {
                    self.slots[index].stable_at = None;
                    let cause = format!("disconnect {}", reason.as_str());
                    let delay = self.pace(index, &cause);
                    self.plan(index, delay, cause);
                }
                Ok(())
            }
        }
    }

    /// The wait before a slot replaces a connection that ended or must rotate: at once
    /// after stable ones, growing while Slack keeps ending them early. Paced waits are
    /// diagnosed in the log (throttled) and in the status.
    fn pace(&mut self, index: usize, cause: &str) -> Duration {
        self.set_backoff_bounds(index);
        let stable_after = self.settings().stable_after;
        let slot = &mut self.slots[index];
        let delay = slot.backoff.after_loss(&mut self.rng);
        let in_a_row = slot.backoff.attempts();
        if in_a_row == 0 {
            return delay;
        }
        let serving = if slot.conn.is_some() {
            ", while the current one serves until Slack closes it"
        } else {
            ""
        };
        let text = format!(
            "Slack ended {} connections of socket {} in a row before they stayed up {} (last: {cause}): \
             new connections are paced to keep from a reconnect loop; the next one opens in {:.1}s{serving}",
            in_a_row + 1,
            slot.number,
            humantime::format_duration(stable_after),
            delay.as_secs_f64(),
        );
        if let Some(suppressed) = self.pacing_log.admit(Instant::now()) {
            tracing::warn!(
                socket = slot.number,
                cause,
                delay_ms = delay.as_millis() as u64,
                in_a_row = in_a_row + 1,
                suppressed,
                "reconnects paced: {text}"
            );
        }
        self.state.update(|s| s.pacing = Some(text));
        delay
    }

    /// Connections that stayed up `stable_after` prove the path works: their slots start
    /// over.
    fn on_stable(&mut self) {
        let now = Instant::now();
        for slot in &mut self.slots {
            if slot.stable_at.is_some_and(|at| at <= now) {
                slot.stable_at = None;
                if !slot.backoff.is_fresh() {
                    tracing::info!(
                        socket = slot.number,
                        "connection stable; the next loss reconnects at once"
                    );
                }
                slot.backoff.reset();
            }
        }
        if self.slots.iter().all(|s| s.backoff.attempts() == 0) {
            self.failure_log.reset();
            self.pacing_log.reset();
            self.state.update(|s| s.pacing = None);
        }
    }

    /// Plans the slot's next connection `delay` from now.
    fn plan(&mut self, index: usize, delay: Duration, cause: String) {
        self.slots[index].next = Some(Planned {
            at: Instant::now() + delay,
            cause,
        });
        self.show_waiting();
    }

    /// With no connection left, the phase shows the soonest planned one.
    fn show_waiting(&self) {
        if self.any_connected() {
            return;
        }
        let now = Instant::now();
        if let Some(next) = self
            .slots
            .iter()
            .filter_map(|s| s.next.as_ref())
            .min_by_key(|n| n.at)
        {
            self.state.set_phase(Phase::Reconnecting {
                delay: next.at.saturating_duration_since(now),
                cause: next.cause.clone(),
            });
        }
    }

    fn any_connected(&self) -> bool {
        self.slots.iter().any(|s| s.conn.is_some())
    }

    fn slot_of(&self, conn: u64) -> Option<usize> {
        self.slots
            .iter()
            .position(|s| s.conn.as_ref().is_some_and(|c| c.id == conn))
    }

    /// Acks on an open socket the envelopes that arrived on a closing one after its Close
    /// (or that a predecessor handed on): Slack matches acks by envelope id on any socket of
    /// the app, so none waits for a redelivery and no command is lost.
    fn adopt_orphans(&self) {
        let Some(open) = self.slots.iter().find_map(|slot| slot.conn.as_ref()) else {
            return;
        };
        for envelope in self.dispatcher.take_orphans() {
            tracing::info!(
                conn = open.id,
                envelope_id = %envelope.envelope_id,
                "handling an envelope that arrived on a closing socket"
            );
            self.dispatcher.accept(envelope, open.acks());
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
    async fn connect(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<(ConnectionHandle, Hello), Failure> {
        Counters::bump(&self.state.counters.connects);
        let opened = tokio::select! {
            opened = self.api.open_connection(&self.token) => opened,
            () = shutdown.cancelled() => return Err(Failure::Stopped),
        };
        self.state.counters.connection_opens.bump(match &opened {
            Ok(_) => OpenOutcome::Ok,
            Err(OpenError::RateLimited { .. }) => OpenOutcome::RateLimited,
            Err(OpenError::Transient(_)) => OpenOutcome::Transient,
            Err(OpenError::Permanent { .. }) => OpenOutcome::Permanent,
        });
        let url = opened.map_err(|error| match error {
            OpenError::Permanent { .. } => Failure::Fatal(FatalError::Auth(error)),
            OpenError::RateLimited { retry_after } => Failure::Retry {
                at_least: retry_after,
                error: error.into(),
            },
            OpenError::Transient(_) => Failure::Retry {
                at_least: Duration::ZERO,
                error: error.into(),
            },
        })?;
        let settings = self.settings();
        let (socket, hello) = connection::open(&url, &settings, shutdown)
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
            error @ ConnectError::Disconnected(DisconnectReason::TooManyWebsockets) => {
                let floor = self.settings().too_many_websockets_backoff;
                self.diagnose_too_many_websockets(floor);
                self.count_too_many_websockets();
                Failure::Retry {
                    at_least: floor,
                    error: error.into(),
                }
            }
            ConnectError::Stopped => Failure::Stopped,
            other => Failure::Retry {
                at_least: Duration::ZERO,
                error: other.into(),
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
        Counters::bump(&self.state.counters.too_many_websockets);
        let app = self.pin.expected().unwrap_or("this app").to_owned();
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

    /// Reloaded bounds apply from the next delay on.
    fn set_backoff_bounds(&mut self, index: usize) {
        let settings = self.settings();
        self.slots[index]
            .backoff
            .set_bounds(settings.backoff_initial, settings.backoff_max);
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
        self.note_minimal_hello(hello);
        if let Some(actual) = hello.app_id() {
            self.pin.check(actual, Whose::Hello)?;
        }
        self.sync_socket_count();
        let ours = self.state.status().sockets_open;
        let others = hello
            .num_connections
            .map(|counted| self.other_connections(counted, ours));
        // Without Slack's word, the app is the one the token (or the pin) names.
        let app_id = hello.app_id().or(self.pin.expected()).map(str::to_owned);
        self.state.update(|s| {
            s.phase = Phase::Connected;
            s.app_id.clone_from(&app_id);
            s.num_connections = hello.num_connections;
            s.other_connections = others;
            s.connected_since.get_or_insert_with(SystemTime::now);
            s.down_since = None;
            s.too_many_in_a_row = 0;
            s.conflict = None;
        });
        let expected_lifetime_s = hello
            .debug_info
            .as_ref()
            .and_then(|d| d.approximate_connection_time);
        let app_id = app_id.as_deref().unwrap_or("?");
        tracing::info!(
            app_id,
            num_connections = hello.num_connections,
            ours,
            expected_lifetime_s,
            "connected to Slack"
        );
        if let (Some(counted), Some(others)) = (hello.num_connections, others)
            && others > 0
        {
            let conflict = OtherClients {
                app_id: app_id.to_owned(),
                counted,
                ours,
                others,
            };
            tracing::warn!(
                app_id,
                num_connections = counted,
                ours,
                others,
                "{conflict}"
            );
            if self.live.borrow().conflicts.other_clients == OtherClientsPolicy::Exit {
                return Err(FatalError::OtherClients(conflict));
            }
        }
        Ok(())
    }

    /// Slack's SDKs accept a hello without `num_connections` or `connection_info`, and so
    /// does flowcoach; what that costs is said once, not at every hello.
    fn note_minimal_hello(&mut self, hello: &Hello) {
        if self.minimal_hello_said {
            return;
        }
        let mut missing = Vec::new();
        if hello.num_connections.is_none() {
            missing.push("num_connections: other clients of this app are not counted");
        }
        if hello.app_id().is_none() {
            missing.push("connection_info: the app is taken from the token, unconfirmed by Slack");
        }
        if missing.is_empty() {
            return;
        }
        self.minimal_hello_said = true;
        tracing::warn!("Slack's hello lacks {}", missing.join("; it lacks "));
    }

    /// Sockets of other clients in Slack's count: not ours, not a predecessor's we take
    /// over from, not ours that closed so recently that Slack still counts them, and not
    /// the other members' of our cluster.
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
        let members = self
            .state
            .member_sockets
            .load(std::sync::atomic::Ordering::Relaxed);
        counted
            .saturating_sub(ours)
            .saturating_sub(predecessor)
            .saturating_sub(members)
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
        for slot in &mut self.slots {
            if let Some(conn) = slot.conn.take() {
                conn.retire(Duration::from_secs(1));
                self.retiring.push(conn);
            }
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
        let open = self.slots.iter().filter(|s| s.conn.is_some()).count() + self.retiring.len();
        let open = u32::try_from(open).unwrap_or(u32::MAX);
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
