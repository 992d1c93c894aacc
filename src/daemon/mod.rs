//! The daemon's wiring: the instance lock, the control socket, systemd, the Slack
//! supervisor and the dispatcher for one app, and the way they stop together.

mod conflict;
mod reload;
mod signals;

use std::os::unix::net::UnixListener as StdUnixListener;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::bot::FlowCoach;
use crate::config::{Config, ProcessEnv};
use crate::control::access::AccessPolicy;
use crate::control::{ControlContext, server};
use crate::dispatch::Dispatcher;
use crate::exit;
use crate::logging::LogHandle;
use crate::service::lock::{HolderInfo, InstanceLock, LockError};
use crate::service::paths::{InstancePaths, UNKNOWN_APP, ensure_dir, runtime_dir};
use crate::service::systemd::{self, Systemd};
use crate::slack::api::OpenError;
use crate::slack::supervisor::{FatalError, Supervisor};
use crate::state::{InstanceInfo, ServiceState};

/// How often `EXTEND_TIMEOUT_USEC` is renewed while draining.
const EXTEND_STEP: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Fatal(#[from] FatalError),
    #[error("cannot set up the Slack client: {0}")]
    Setup(#[from] OpenError),
    /// Another instance holds this app on this host.
    #[error("{0}")]
    AlreadyRunning(String),
    #[error("{0}")]
    Runtime(String),
    #[error("{0}")]
    Config(String),
}

impl DaemonError {
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::Fatal(_) | DaemonError::Config(_) => exit::CONFIG,
            DaemonError::AlreadyRunning(_) => exit::TEMPFAIL,
            DaemonError::Setup(_) | DaemonError::Runtime(_) => exit::FAILURE,
        }
    }
}

/// What `main` prepares before the runtime starts.
pub struct Startup {
    pub config: Config,
    /// The control socket from systemd's socket activation, if any.
    pub control_listener: Option<StdUnixListener>,
    pub log: LogHandle,
}

/// Serves the app until a stop signal (then drains and closes cleanly) or a fatal error.
pub async fn run(startup: Startup) -> Result<(), DaemonError> {
    let Startup {
        config,
        control_listener,
        log,
    } = startup;
    let started_at = SystemTime::now();
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
    // Held for the life of the process: closing the fd at exit releases it.
    let _lock = match InstanceLock::acquire(&paths.lock, &holder) {
        Ok(lock) => lock,
        Err(error @ LockError::Held { .. }) => {
            return Err(DaemonError::AlreadyRunning(
                conflict::describe(&error).await,
            ));
        }
        Err(error) => return Err(DaemonError::Runtime(error.to_string())),
    };
    let listener = match control_listener {
        Some(listener) => tokio::net::UnixListener::from_std(listener),
        None => server::bind(&paths.socket),
    }
    .map_err(|e| DaemonError::Runtime(format!("control socket: {e}")))?;
    let access = AccessPolicy::new(&config.settings.control.group)
        .map_err(|e| DaemonError::Config(format!("control.group: {e}")))?;

    let state = Arc::new(ServiceState::new(InstanceInfo::current(&environment)));
    let (live_tx, live) = watch::channel(config.settings.clone());
    let handler = Arc::new(FlowCoach::new(state.clone()));
    let dispatcher = Arc::new(Dispatcher::new(handler, live.clone(), state.clone()));
    tracing::info!(
        environment = %environment,
        token = %config.token,
        token_source = config.token_source,
        api_url = %config.api_url,
        lock = %paths.lock.display(),
        control_socket = %paths.socket.display(),
        version = env!("CARGO_PKG_VERSION"),
        "flowcoach starting"
    );
    let supervisor = Supervisor::new(&config, live, dispatcher, state.clone())?;

    let shutdown = CancellationToken::new();
    let mut reloads = signals::watch(shutdown.clone())
        .map_err(|e| DaemonError::Runtime(format!("signals: {e}")))?;
    // Everything around the Slack side stops after the drain, so the drain is reported to
    // systemd, watched by its watchdog, and visible over the control socket.
    let after_drain = CancellationToken::new();
    let control = ControlContext {
        state: state.clone(),
        token_source: config.token_source.to_owned(),
        started_at,
        outage_budget: config.settings.service.outage_budget,
        access,
    };
    let control_task = tokio::spawn(server::serve(
        listener,
        Arc::new(control),
        after_drain.clone(),
    ));
    let systemd = Systemd::from_env();
    let reporter =
        systemd::spawn_status_reporter(systemd.clone(), state.clone(), after_drain.clone());
    let watchdog = systemd::watchdog_interval().map(|interval| {
        systemd::spawn_watchdog(
            systemd.clone(),
            state.clone(),
            config.settings.service.outage_budget,
            interval,
            after_drain.clone(),
        )
    });
    let reloader = reload::Reloader::new(config.path.clone(), live_tx, log);
    let reload_task = tokio::spawn(async move {
        while reloads.recv().await.is_some() {
            reloader.reload(&ProcessEnv);
        }
    });

    let serving = supervisor.run(shutdown.clone());
    tokio::pin!(serving);
    let result = tokio::select! {
        result = &mut serving => result,
        () = shutdown.cancelled() => {
            systemd.stopping();
            systemd::extend_while(&systemd, serving, EXTEND_STEP).await
        }
    };
    after_drain.cancel();
    reload_task.abort();
    let _ = control_task.await;
    let _ = reporter.await;
    if let Some(watchdog) = watchdog {
        let _ = watchdog.await;
    }
    result?;
    tracing::info!("flowcoach stopped");
    Ok(())
}
