//! The daemon's wiring: state, handlers, dispatcher and supervisor for one app.

use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::bot::FlowCoach;
use crate::config::Config;
use crate::dispatch::Dispatcher;
use crate::exit;
use crate::slack::api::OpenError;
use crate::slack::supervisor::{FatalError, Supervisor};
use crate::state::{InstanceInfo, ServiceState};

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Fatal(#[from] FatalError),
    #[error("cannot set up the Slack client: {0}")]
    Setup(#[from] OpenError),
}

impl DaemonError {
    pub fn exit_code(&self) -> u8 {
        match self {
            DaemonError::Fatal(_) => exit::CONFIG,
            DaemonError::Setup(_) => exit::FAILURE,
        }
    }
}

/// Serves the app until `shutdown` is cancelled, then drains and closes cleanly.
pub async fn serve(config: Config, shutdown: CancellationToken) -> Result<(), DaemonError> {
    let state = Arc::new(ServiceState::new(InstanceInfo::current(
        &config.settings.environment,
    )));
    let (_reload, live) = watch::channel(config.settings.clone());
    let handler = Arc::new(FlowCoach::new(state.clone()));
    let dispatcher = Arc::new(Dispatcher::new(handler, live.clone(), state.clone()));
    tracing::info!(
        environment = %config.settings.environment,
        token = %config.token,
        token_source = config.token_source,
        api_url = %config.api_url,
        version = env!("CARGO_PKG_VERSION"),
        "flowcoach starting"
    );
    let supervisor = Supervisor::new(&config, live, dispatcher, state)?;
    supervisor.run(shutdown).await?;
    tracing::info!("flowcoach stopped");
    Ok(())
}
