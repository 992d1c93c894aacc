//! The daemon's wiring: the instance lock, the control socket, systemd, the Slack
//! supervisor and the dispatcher for one app, handovers, and the way they stop together.

mod conflict;
mod handovers;
mod reload;
mod signals;
mod takeover;

use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::bot::FlowCoach;
use crate::config::{Config, ProcessEnv, Settings};
use crate::control::{ControlContext, server};
use crate::dispatch::{Dispatcher, Handler};
use crate::exit;
use crate::forward::{self, Forwarder};
use crate::logging::LogHandle;
use crate::service::lock::{HolderInfo, InstanceLock, LockError};
use crate::service::paths::{InstancePaths, UNKNOWN_APP, ensure_dir, runtime_dir};
use crate::service::systemd::{self, Systemd};
use crate::slack::api::OpenError;
use crate::slack::supervisor::{FatalError, Supervisor};
use crate::state::{InstanceInfo, ServiceState};
use crate::token::AppToken;

/// How often `EXTEND_TIMEOUT_USEC` is renewed while draining.
const EXTEND_STEP: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Fatal(#[from] FatalError),
    #[error("cannot set up the Slack client: {0}")]
    Setup(#[from] OpenError),
    #[error(transparent)]
    Forward(#[from] forward::SetupError),
    /// Another instance holds this app on this host.
    #[error("{0}")]
    AlreadyRunning(String),
    #[error("{0}")]
    Runtime(String),
    #[error("takeover failed: {0}")]
    Takeover(String),
}

impl DaemonError {
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::Fatal(fatal) => fatal.exit_code(),
            DaemonError::AlreadyRunning(_) => exit::TEMPFAIL,
            DaemonError::Setup(_)
            | DaemonError::Forward(_)
            | DaemonError::Runtime(_)
            | DaemonError::Takeover(_) => exit::FAILURE,
        }
    }
}

/// What `main` prepares before the runtime starts.
pub struct Startup {
    pub config: Config,
    /// The control socket from systemd's socket activation, if any.
    pub control_listener: Option<StdUnixListener>,
    pub log: LogHandle,
    /// The binary on disk, for starting a successor after an upgrade.
    pub exe: PathBuf,
    /// `--takeover`: ask a running instance to hand the app over.
    pub takeover: bool,
}

/// A running Slack supervisor and the token that stops it.
struct Serving {
    run: Pin<Box<dyn Future<Output = Result<(), FatalError>>>>,
    stop: CancellationToken,
}

/// What every phase of the daemon's life shares.
struct Service {
    config: Config,
    paths: InstancePaths,
    holder: HolderInfo,
    state: Arc<ServiceState>,
    live: watch::Receiver<Settings>,
    /// The current token; a reload that finds a new one sends it here.
    tokens: Arc<watch::Sender<AppToken>>,
    dispatcher: Arc<Dispatcher>,
    systemd: Systemd,
    started_at: SystemTime,
    exe: PathBuf,
}

impl Service {
    fn start_serving(&self) -> Result<Serving, DaemonError> {
        let supervisor = Supervisor::new(
            &self.config,
            self.live.clone(),
            self.dispatcher.clone(),
            self.state.clone(),
        )?
        .follow_tokens(self.tokens.subscribe());
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
        control_listener,
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
    ensure_dir(&paths.dir).map_err(|e| DaemonError::Runtime(e.to_string()))?;
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
    let state = Arc::new(ServiceState::new(InstanceInfo::current(&environment)));
    let (live_tx, live) = watch::channel(config.settings.clone());
    // The app behind `[forward]`, else the built-in bot.
    let handler: Arc<dyn Handler> = match &config.forward {
        Some(settings) => Arc::new(Forwarder::new(settings.clone(), state.clone())?),
        None => Arc::new(FlowCoach::new(state.clone())),
    };
    let dispatcher = Arc::new(if lock.is_none() && !config.settings.handover.strict {
        // Until the incumbent's deduplication state arrives, envelopes wait unacked.
        Dispatcher::held(handler, live.clone(), state.clone())
    } else {
        Dispatcher::new(handler, live.clone(), state.clone())
    });
    tracing::info!(
        environment = %environment,
        token = %config.token,
        token_source = %config.token_source,
        api_url = %config.api_url,
        forward_url = config.forward.as_ref().map(|f| f.describe_urls()),
        signing_secret_source = config.forward.as_ref().map(|f| f.secret_source.to_string()),
        lock = %paths.lock.display(),
        control_socket = %paths.socket.display(),
        version = env!("CARGO_PKG_VERSION"),
        takeover = lock.is_none(),
        "flowcoach starting"
    );
    let tokens = Arc::new(watch::Sender::new(config.token.clone()));
    let service = Service {
        config,
        paths,
        holder,
        state,
        live,
        tokens,
        dispatcher,
        systemd: Systemd::from_env(),
        started_at: SystemTime::now(),
        exe,
    };
    let shutdown = CancellationToken::new();
    let reloads = signals::watch(shutdown.clone())
        .map_err(|e| DaemonError::Runtime(format!("signals: {e}")))?;

    let (lock, listener, serving) = match lock {
        Some(lock) => {
            let listener = listen(control_listener, &service.paths.socket)?;
            (lock, listener, service.start_serving()?)
        }
        None => match takeover::take_over(&service, &shutdown).await? {
            takeover::Taken::App {
                lock,
                listener,
                serving,
            } => (lock, listener, serving),
            // The incumbent went away before handing on: the app is free; take the lock
            // as a first start would.
            takeover::Taken::Nothing => {
                let lock = InstanceLock::acquire(&service.paths.lock, &service.holder);
                let lock = match lock {
                    Ok(lock) => lock,
                    Err(error) => return Err(lock_failure(error).await),
                };
                service.dispatcher.release(None);
                let listener = listen(control_listener, &service.paths.socket)?;
                (lock, listener, service.start_serving()?)
            }
        },
    };
    serve(
        service, lock, listener, serving, shutdown, reloads, live_tx, log,
    )
    .await
}

/// Why the lock could not be taken: another instance holds the app (75, naming it), or the
/// file could not be locked at all.
async fn lock_failure(error: LockError) -> DaemonError {
    match error {
        LockError::Held { .. } => DaemonError::AlreadyRunning(conflict::describe(&error).await),
        error => DaemonError::Runtime(error.to_string()),
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
    .map_err(|e| DaemonError::Runtime(format!("control socket: {e}")))
}

/// The PID file names the control socket for a second start's message: with socket
/// activation (or after a handover) that is where the listener really is.
fn record_control_socket(service: &Service, lock: &InstanceLock, listener: &UnixListener) {
    let Some(path) = listener
        .local_addr()
        .ok()
        .and_then(|address| address.as_pathname().map(std::path::Path::to_path_buf))
    else {
        return;
    };
    let holder = HolderInfo {
        control_socket: path,
        ..service.holder.clone()
    };
    if let Err(error) = lock.update(&holder) {
        tracing::warn!(%error, "cannot record the control socket in the PID file");
    }
}

/// Holds the app: the control server, systemd, reloads, handovers, until a stop.
#[allow(clippy::too_many_arguments)]
async fn serve(
    service: Service,
    lock: InstanceLock,
    listener: UnixListener,
    serving: Serving,
    shutdown: CancellationToken,
    mut reloads: mpsc::Receiver<()>,
    live_tx: watch::Sender<Settings>,
    log: LogHandle,
) -> Result<(), DaemonError> {
    record_control_socket(&service, &lock, &listener);
    let handed = handovers::handed(&lock, &listener)
        .map_err(|e| DaemonError::Runtime(format!("preparing for handovers: {e}")))?;
    // One call at a time: a second one is refused by the control server at once.
    let (calls_tx, calls) = mpsc::channel(1);
    // Everything around the Slack side stops after the drain, so the drain is reported to
    // systemd, watched by its watchdog, and visible over the control socket.
    let after_drain = CancellationToken::new();
    let (token_source, token_source_now) = watch::channel(service.config.token_source.to_string());
    let control = ControlContext {
        state: service.state.clone(),
        token_source: token_source_now,
        started_at: service.started_at,
        outage_budget: service.config.settings.service.outage_budget,
        access: service.config.access.clone(),
        handover: Some(calls_tx),
    };
    let control_task = tokio::spawn(server::serve(
        listener,
        Arc::new(control),
        after_drain.clone(),
    ));
    let systemd = service.systemd.clone();
    let reporter =
        systemd::spawn_status_reporter(systemd.clone(), service.state.clone(), after_drain.clone());
    let watchdog = systemd::watchdog_interval().map(|interval| {
        systemd::spawn_watchdog(
            systemd.clone(),
            service.state.clone(),
            service.config.settings.service.outage_budget,
            interval,
            after_drain.clone(),
        )
    });
    let reloader = reload::Reloader::new(
        service.config.path.clone(),
        service.config.settings.environment.clone(),
        live_tx,
        service.tokens.clone(),
        token_source,
        log,
    );
    let reload_task = tokio::spawn(async move {
        while reloads.recv().await.is_some() {
            reloader.reload(&ProcessEnv);
        }
    });

    let result = handovers::Coordinator::new(&service, handed, calls)
        .serve(serving, &shutdown)
        .await;
    if matches!(result, Ok(handovers::Ending::HandedOver)) {
        // The successor reports to systemd now: no last STATUS= or WATCHDOG=1 from here.
        reporter.abort();
        if let Some(watchdog) = &watchdog {
            watchdog.abort();
        }
    }
    after_drain.cancel();
    reload_task.abort();
    let _ = control_task.await;
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
