//! The daemon's wiring: the instance lock, the control socket, systemd, the Slack
//! supervisor and the dispatcher for one app, handovers, and the way they stop together.

mod conflict;
mod coordinator;
mod reload;
mod signals;
mod takeover;

use std::net::TcpListener as StdTcpListener;
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use self::conflict::AlreadyRunning;
use crate::bot::FlowCoach;
use crate::cluster::{JoinError, Membership};
use crate::config::{Config, NoStateDirectory, ProcessEnv, Settings};
use crate::control::ControlContext;
use crate::control::server::{self, Passed};
use crate::dispatch::{Dispatcher, Handler};
use crate::exit;
use crate::forward::{self, Forwarder};
use crate::host::lock::{HolderInfo, InstanceLock, LockError};
use crate::host::paths::{InstancePaths, UNKNOWN_APP, ensure_dir, runtime_dir};
use crate::host::systemd::{self, Systemd};
use crate::inbox::{self, Inbox, InboxError, Trouble};
use crate::logging::LogHandle;
use crate::metrics::{self, Exposition};
use crate::slack::api::{OpenError, SlackApi};
use crate::slack::supervisor::{FatalError, Supervisor};
use crate::state::{InstanceInfo, InstanceState};
use crate::token::AppToken;

/// How often `EXTEND_TIMEOUT_USEC` is renewed while draining.
const EXTEND_STEP: Duration = Duration::from_secs(5);

/// Why the daemon stopped other than by a stop signal or a handover.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Fatal(#[from] FatalError),
    #[error("cannot set up the Slack client: {0}")]
    Setup(#[from] OpenError),
    #[error(transparent)]
    Forward(#[from] forward::SetupError),
    /// Another instance holds this app on this host.
    #[error(transparent)]
    AlreadyRunning(#[from] Box<AlreadyRunning>),
    /// The lock file could not be locked at all.
    #[error(transparent)]
    Lock(LockError),
    #[error("{0}")]
    RuntimeDirectory(#[source] std::io::Error),
    #[error("cannot install the signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("control socket: {0}")]
    ControlSocket(#[source] std::io::Error),
    #[error("cannot listen for the metrics endpoint on {0}: {1}")]
    MetricsListener(std::net::SocketAddr, #[source] std::io::Error),
    #[error("cannot copy the lock and the control socket for handovers: {0}")]
    HandoverDescriptors(#[source] std::io::Error),
    #[error("takeover failed: {0}")]
    Takeover(#[from] takeover::TakeoverError),
    #[error(transparent)]
    NoStateDirectory(#[from] NoStateDirectory),
    #[error(
        "{0}. flowcoach does not start over on its own: the file may hold acked events not yet delivered. Move it (and its -wal and -shm files) aside, keep it for inspection with sqlite3 (its .recover command may save the envelopes), then start flowcoach again: it creates a new inbox"
    )]
    CorruptInbox(#[source] InboxError),
    #[error("cannot open the inbox: {0}")]
    Inbox(#[source] InboxError),
    #[error(transparent)]
    Cluster(#[from] JoinError),
}

impl DaemonError {
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::Fatal(fatal) => fatal.exit_code(),
            DaemonError::AlreadyRunning(_) => exit::TEMPFAIL,
            DaemonError::NoStateDirectory(_) => exit::CONFIG,
            DaemonError::CorruptInbox(_) => exit::DATAERR,
            DaemonError::Cluster(JoinError::Refused(_)) => exit::UNAVAILABLE,
            DaemonError::Cluster(JoinError::Store(error)) | DaemonError::Inbox(error) => {
                match error.trouble {
                    // The place is wrong, not the moment: restarting will not help.
                    Trouble::PermissionDenied | Trouble::ReadOnly => exit::CONFIG,
                    _ => exit::FAILURE,
                }
            }
            DaemonError::Setup(_)
            | DaemonError::Lock(_)
            | DaemonError::RuntimeDirectory(_)
            | DaemonError::Signals(_)
            | DaemonError::ControlSocket(_)
            | DaemonError::MetricsListener(..)
            | DaemonError::HandoverDescriptors(_)
            | DaemonError::Forward(_)
            | DaemonError::Takeover(_) => exit::FAILURE,
        }
    }
}

/// What `main` prepares before the runtime starts.
pub struct Startup {
    pub config: Config,
    /// The control and metrics sockets from systemd's socket activation, if any.
    pub passed: Passed,
    pub log: LogHandle,
    /// The binary on disk, for starting a successor after an upgrade.
    pub exe: PathBuf,
    /// `--takeover`: ask a running instance to hand the app over.
    pub takeover: bool,
}

/// What an instance holds once the app is its own.
struct Held {
    lock: InstanceLock,
    listener: UnixListener,
    /// The metrics endpoint's listener, when it is on.
    metrics: Option<StdTcpListener>,
    serving: Serving,
}

/// A running Slack supervisor and the token that stops it.
struct Serving {
    run: Pin<Box<dyn Future<Output = Result<(), FatalError>>>>,
    stop: CancellationToken,
}

/// What every phase of the daemon's life shares.
struct Instance {
    config: Config,
    paths: InstancePaths,
    holder: HolderInfo,
    state: Arc<InstanceState>,
    live: watch::Receiver<Settings>,
    /// The current token; a reload that finds a new one sends it here.
    tokens: Arc<watch::Sender<AppToken>>,
    /// Where the current token came from, for status answers; follows reloads too.
    token_source: watch::Sender<String>,
    dispatcher: Arc<Dispatcher>,
    systemd: Systemd,
    started_at: SystemTime,
    exe: PathBuf,
    /// `[cluster]`: this member's place among the others.
    membership: Option<Membership>,
}

impl Instance {
    fn start_serving(&self) -> Result<Serving, DaemonError> {
        let api = SlackApi::new(
            &self.config.api_url,
            self.config.settings.slack.debug_reconnects,
        )?;
        let supervisor = Supervisor::new(
            api,
            self.tokens.borrow().clone(),
            self.config.app_pin(),
            self.live.clone(),
            self.dispatcher.clone(),
            self.state.clone(),
        )
        .follow_tokens(self.tokens.subscribe())
        .with_members(self.membership.as_ref().map(Membership::members));
        let stop = CancellationToken::new();
        Ok(Serving {
            run: Box::pin(supervisor.run(stop.clone())),
            stop,
        })
    }
}

/// Serves the app until a stop signal (then drains and closes cleanly), a completed
/// handover, or a fatal error.
pub async fn run(startup: Startup) -> Result<(), DaemonError> {
    let Startup {
        config,
        passed,
        log,
        exe,
        takeover,
    } = startup;
    let environment = config.settings.environment.clone();
    let paths = InstancePaths::new(
        runtime_dir(&ProcessEnv, nix::unistd::geteuid().is_root()),
        config.token.app_id_hint(),
        &environment,
    );
    ensure_dir(&paths.dir).map_err(DaemonError::RuntimeDirectory)?;
    let holder = HolderInfo::new(
        environment.clone(),
        config.token.app_id_hint().unwrap_or(UNKNOWN_APP),
        paths.socket.clone(),
    );
    let lock = match InstanceLock::acquire(&paths.lock, &holder) {
        Ok(lock) => Some(lock),
        Err(LockError::Held { .. }) if takeover => None,
        Err(error) => return Err(lock_failure(error).await),
    };
    let state = Arc::new(InstanceState::new(InstanceInfo::current(&environment)));
    let (live_tx, live) = watch::channel(config.settings.clone());
    // The app behind `[forward]`, else the built-in bot.
    let handler: Arc<dyn Handler> = match &config.forward {
        Some(settings) => Arc::new(Forwarder::new(settings.clone(), state.clone())?),
        None => Arc::new(FlowCoach::new(state.clone())),
    };
    let inbox = open_inbox(&config, &state)?;
    // Before connecting: a member the cluster has no room for never opens a socket.
    let membership = match &config.cluster {
        Some(cluster) => Some(Membership::join(cluster, state.clone(), live.clone()).await?),
        None => None,
    };
    let dispatcher = Arc::new(
        if lock.is_none() && !config.settings.handover.strict {
            // Until the incumbent's deduplication state arrives, envelopes wait unacked.
            Dispatcher::held(handler, live.clone(), state.clone())
        } else {
            Dispatcher::new(handler, live.clone(), state.clone())
        }
        .with_inbox(inbox),
    );
    tracing::info!(
        environment = %environment,
        token = %config.token,
        token_source = %config.token_source,
        api_url = %config.api_url,
        forward_url = config.forward.as_ref().map(|f| f.describe_urls()),
        signing_secret_source = config.forward.as_ref().map(|f| f.secret_source.to_string()),
        lock = %paths.lock.display(),
        inbox = dispatcher.inbox().map(|inbox| inbox.path().display().to_string()),
        control_socket = %paths.socket.display(),
        version = env!("CARGO_PKG_VERSION"),
        takeover = lock.is_none(),
        "flowcoach starting"
    );
    let tokens = Arc::new(watch::Sender::new(config.token.clone()));
    let token_source = watch::Sender::new(config.token_source.to_string());
    let reloader = reload::Reloader {
        path: config.path.clone(),
        environment: config.settings.environment.clone(),
        live: live_tx,
        tokens: tokens.clone(),
        token_source: token_source.clone(),
        log,
    };
    let instance = Instance {
        config,
        paths,
        holder,
        state,
        live,
        tokens,
        token_source,
        dispatcher,
        systemd: Systemd::from_env(),
        started_at: SystemTime::now(),
        exe,
        membership,
    };
    let shutdown = CancellationToken::new();
    let reloads = signals::watch(shutdown.clone()).map_err(DaemonError::Signals)?;
    let held = match lock {
        Some(lock) => Held {
            listener: listen(passed.control, &instance.paths.socket)?,
            metrics: listen_metrics(passed.metrics, &instance.config)?,
            serving: instance.start_serving()?,
            lock,
        },
        None => takeover::take_over(&instance, passed, &shutdown).await?,
    };
    serve(instance, held, shutdown, reloads, reloader).await
}

/// The inbox of `[inbox]`, if on: a corrupt file stops the start (exit 65), never
/// replaced silently.
fn open_inbox(
    config: &Config,
    state: &Arc<InstanceState>,
) -> Result<Option<Arc<Inbox>>, DaemonError> {
    if let Some(cluster) = &config.cluster {
        let settings = &config.settings.inbox;
        return Inbox::open_shared(cluster, settings, &config.settings.dispatch, state.clone())
            .map(|inbox| Some(Arc::new(inbox)))
            .map_err(DaemonError::Inbox);
    }
    let Some(path) = inbox::file(config, &ProcessEnv)? else {
        return Ok(None);
    };
    let settings = &config.settings.inbox;
    match Inbox::open(&path, settings, &config.settings.dispatch, state.clone()) {
        Ok(inbox) => Ok(Some(Arc::new(inbox))),
        Err(error) if error.trouble == Trouble::Corrupt => Err(DaemonError::CorruptInbox(error)),
        Err(error) => Err(DaemonError::Inbox(error)),
    }
}

/// Why the lock could not be taken: another instance holds the app (75, naming it), or the
/// file could not be locked at all.
async fn lock_failure(error: LockError) -> DaemonError {
    match error {
        LockError::Held { .. } => Box::new(conflict::already_running(error).await).into(),
        error => DaemonError::Lock(error),
    }
}

/// The control listener: the one systemd passed, else bound at `path` (only while holding
/// the lock: binding replaces a stale socket file).
fn listen(
    from_systemd: Option<StdUnixListener>,
    path: &std::path::Path,
) -> Result<UnixListener, DaemonError> {
    match from_systemd {
        Some(listener) => UnixListener::from_std(listener),
        None => server::bind(path),
    }
    .map_err(DaemonError::ControlSocket)
}

/// The metrics endpoint's listener: the one systemd passed, else bound at `[metrics]
/// listen`; none when neither is there (the endpoint is off).
fn listen_metrics(
    from_systemd: Option<StdTcpListener>,
    config: &Config,
) -> Result<Option<StdTcpListener>, DaemonError> {
    match (from_systemd, config.settings.metrics.listen) {
        (Some(listener), _) => Ok(Some(listener)),
        (None, Some(address)) => metrics::server::bind(address)
            .map(Some)
            .map_err(|error| DaemonError::MetricsListener(address, error)),
        (None, None) => Ok(None),
    }
}

/// The PID file names the control socket for a second start's message: with socket
/// activation (or after a handover) that is where the listener really is.
fn record_control_socket(instance: &Instance, lock: &InstanceLock, listener: &UnixListener) {
    let Some(path) = listener
        .local_addr()
        .ok()
        .and_then(|address| address.as_pathname().map(std::path::Path::to_path_buf))
    else {
        return;
    };
    let holder = HolderInfo {
        control_socket: path,
        ..instance.holder.clone()
    };
    if let Err(error) = lock.update(&holder) {
        tracing::warn!(%error, "cannot record the control socket in the PID file");
    }
}

/// Holds the app: the control server, systemd, reloads, handovers, until a stop.
async fn serve(
    instance: Instance,
    held: Held,
    shutdown: CancellationToken,
    mut reloads: mpsc::Receiver<()>,
    reloader: reload::Reloader,
) -> Result<(), DaemonError> {
    let Held {
        lock,
        listener,
        metrics,
        serving,
    } = held;
    record_control_socket(&instance, &lock, &listener);
    // The instance is ours: deliver from the inbox (a predecessor has stopped).
    instance.dispatcher.start_delivery();
    let handed = coordinator::handed(&lock, &listener, metrics.as_ref())
        .map_err(DaemonError::HandoverDescriptors)?;
    // One call at a time: a second one is refused by the control server at once.
    let (calls_tx, calls) = mpsc::channel(1);
    // Everything around the Slack side stops after the drain, so the drain is reported to
    // systemd, watched by its watchdog, and visible over the control socket.
    let after_drain = CancellationToken::new();
    let exposition = Arc::new(Exposition::new(
        instance.state.clone(),
        instance.config.settings.service.outage_budget,
    ));
    let metrics_task = metrics.map(|listener| {
        if let Ok(address) = listener.local_addr() {
            tracing::info!(%address, "metrics endpoint on");
        }
        tokio::spawn(metrics::server::serve(
            listener,
            exposition.clone(),
            after_drain.clone(),
        ))
    });
    let control = ControlContext {
        state: instance.state.clone(),
        exposition,
        token_source: instance.token_source.subscribe(),
        started_at: instance.started_at,
        outage_budget: instance.config.settings.service.outage_budget,
        access: instance.config.access.clone(),
        handover: Some(calls_tx),
        inbox: instance.dispatcher.inbox().cloned(),
    };
    let control_task = tokio::spawn(server::serve(
        listener,
        Arc::new(control),
        after_drain.clone(),
    ));
    let systemd = instance.systemd.clone();
    let reporter = systemd::spawn_status_reporter(
        systemd.clone(),
        instance.state.clone(),
        after_drain.clone(),
    );
    let watchdog = systemd::watchdog_interval().map(|interval| {
        systemd::spawn_watchdog(
            systemd.clone(),
            instance.state.clone(),
            instance.config.settings.service.outage_budget,
            interval,
            after_drain.clone(),
        )
    });
    let reload_task = tokio::spawn(async move {
        while reloads.recv().await.is_some() {
            reloader.reload(&ProcessEnv);
        }
    });

    let result = coordinator::Coordinator::new(&instance, handed, calls)
        .serve(serving, &shutdown)
        .await;
    // Drained: the others stop counting this member now, not after the lease. After a
    // handover, the place is the successor's and stays.
    if let Some(membership) = instance.membership {
        membership.leave().await;
    }
    if matches!(result, Ok(coordinator::Ending::HandedOver)) {
        // The successor reports to systemd now: no last STATUS= or WATCHDOG=1 from here.
        reporter.abort();
        if let Some(watchdog) = &watchdog {
            watchdog.abort();
        }
    }
    after_drain.cancel();
    reload_task.abort();
    let _ = control_task.await;
    if let Some(metrics_task) = metrics_task {
        let _ = metrics_task.await;
    }
    let _ = reporter.await;
    if let Some(watchdog) = watchdog {
        let _ = watchdog.await;
    }
    // Held to the end: the lock is released when the process exits (or, after a
    // handover, stays with the successor's copy).
    drop(lock);
    result?;
    tracing::info!("flowcoach stopped");
    Ok(())
}
