//! The successor's path: take the app over from the running instance, or take it alone
//! when none runs (any more).

use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use super::{DaemonError, Held, Instance, Passed, Serving, listen, listen_metrics, lock_failure};
use crate::handover::HandoverError;
use crate::handover::successor::{Received, Takeover};
use crate::host::lock::{InstanceLock, read_holder};
use crate::metrics::labels::HandoverOutcome;
use crate::metrics::timings;
use crate::slack::supervisor::FatalError;

/// Why a takeover failed (besides a fatal Slack error, which ends it as it ends a start).
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    #[error(transparent)]
    Handover(#[from] HandoverError),
    #[error("stopped by a signal")]
    Stopped,
    #[error("our connection to Slack stopped")]
    ConnectionStopped,
    #[error("no hello from Slack within {0:?}")]
    NoHello(Duration),
}

/// How the session with the incumbent ended for us.
enum Outcome {
    /// It handed on its lock, listener and state.
    Received(Received),
    /// It went away before: the app is free, as for a first start.
    Vanished,
}

/// Takes the app over from the instance that holds it on this host; takes it alone when
/// that instance goes away first. `from_systemd`: the listeners systemd passed, if
/// any: the app alone is taken as a first start takes it.
pub async fn take_over(
    instance: &Instance,
    from_systemd: Passed,
    shutdown: &CancellationToken,
) -> Result<Held, DaemonError> {
    let socket = read_holder(&instance.paths.lock)
        .map(|holder| holder.control_socket)
        .filter(|socket| !socket.as_os_str().is_empty())
        .unwrap_or_else(|| instance.paths.socket.clone());
    let started = std::time::Instant::now();
    let mut takeover = match Takeover::request(&socket).await {
        Ok(takeover) => takeover,
        Err(HandoverError::Disconnected(why)) => {
            tracing::warn!(%why, "no running instance answers; starting as the only one");
            return alone(instance, from_systemd, None).await;
        }
        Err(error) => return Err(TakeoverError::from(error).into()),
    };
    tracing::info!(
        strict = takeover.strict,
        "the running instance accepted the takeover"
    );
    let mut serving = None;
    let outcome = with_incumbent(instance, &mut takeover, &mut serving, shutdown).await;
    // From here on Slack's count holds our sockets alone.
    instance
        .state
        .predecessor_sockets
        .store(0, Ordering::Relaxed);
    let received = match outcome {
        Ok(Outcome::Received(received)) => received,
        Ok(Outcome::Vanished) => {
            tracing::warn!(
                "the running instance went away during the handover; taking the app alone"
            );
            let held = alone(instance, from_systemd, serving).await?;
            tracing::info!("took the app over alone");
            return Ok(held);
        }
        Err(error) => {
            takeover.fail(&error.to_string()).await;
            return Err(error);
        }
    };
    let Received {
        lock,
        listener,
        metrics,
        dedup,
        late,
    } = received;
    instance.dispatcher.release(Some(dedup));
    // Acked on our socket once we have one (at once in overlap mode), deduplicated
    // against the incumbent's state like everything else.
    for envelope in late {
        instance.dispatcher.orphan(envelope);
    }
    if let Err(error) = takeover.adopted().await {
        // We hold the app now; the incumbent cannot roll back without its session.
        tracing::warn!(%error, "could not confirm the takeover to the previous instance");
    }
    let listener = UnixListener::from_std(listener).map_err(DaemonError::ControlSocket)?;
    let serving = match serving {
        Some(serving) => serving,
        // Strict: we connect only now that the incumbent has closed.
        None => match connected(instance, shutdown, takeover.timeout).await {
            Ok((serving, _)) => {
                let _ = takeover.serving().await;
                serving
            }
            Err(error) => {
                takeover.fail(&error.to_string()).await;
                return Err(error);
            }
        },
    };
    tracing::info!("took the app over");
    let counters = &instance.state.counters;
    counters.handovers.bump(HandoverOutcome::Completed);
    timings::observe(&instance.state.timings.handover_duration, started.elapsed());
    // The incumbent's endpoint, else (it had none) ours, as for a first start.
    let metrics = match metrics {
        Some(metrics) => Some(metrics),
        None => listen_metrics(from_systemd.metrics, &instance.config)?,
    };
    Ok(Held {
        lock,
        listener,
        metrics,
        serving,
    })
}

/// The session up to the incumbent's hand-on: in overlap mode our connection says hello
/// first (into `serving`) and keeps running, holding envelopes, while the incumbent drains.
async fn with_incumbent(
    instance: &Instance,
    takeover: &mut Takeover,
    serving: &mut Option<Serving>,
    shutdown: &CancellationToken,
) -> Result<Outcome, DaemonError> {
    let app_id = if takeover.strict {
        None
    } else {
        // Slack's count in our hellos includes the incumbent's sockets.
        instance
            .state
            .predecessor_sockets
            .store(takeover.incumbent_sockets, Ordering::Relaxed);
        let (running, app_id) = connected(instance, shutdown, takeover.timeout).await?;
        *serving = Some(running);
        Some(app_id)
    };
    let received = match takeover.ready(app_id).await {
        // The incumbent died before we said ready: as when it dies later.
        Err(HandoverError::Disconnected(_)) => return Ok(Outcome::Vanished),
        Err(error) => return Err(TakeoverError::from(error).into()),
        Ok(()) => match serving {
            Some(running) => tokio::select! {
                received = takeover.receive(&instance.paths.lock, &instance.holder) => received,
                ended = &mut running.run => return Err(connection_ended(ended)),
            },
            None => {
                takeover
                    .receive(&instance.paths.lock, &instance.holder)
                    .await
            }
        },
    };
    match received {
        Ok(received) => Ok(Outcome::Received(received)),
        Err(HandoverError::Disconnected(_)) => Ok(Outcome::Vanished),
        Err(error) => Err(TakeoverError::from(error).into()),
    }
}

/// Takes the app as a first start does: the lock (exit 75 naming whoever was faster),
/// the control listener (systemd's, if it passed one), the envelopes held so far released
/// with no predecessor's state, and a connection (`serving`, if one runs already).
pub(super) async fn alone(
    instance: &Instance,
    from_systemd: Passed,
    serving: Option<Serving>,
) -> Result<Held, DaemonError> {
    let lock = match InstanceLock::acquire(&instance.paths.lock, &instance.holder) {
        Ok(lock) => lock,
        Err(error) => return Err(lock_failure(error).await),
    };
    let listener = listen(from_systemd.control, &instance.paths.socket)?;
    let metrics = listen_metrics(from_systemd.metrics, &instance.config)?;
    instance.dispatcher.release(None);
    let serving = match serving {
        Some(serving) => serving,
        None => instance.start_serving()?,
    };
    Ok(Held {
        lock,
        listener,
        metrics,
        serving,
    })
}

/// Starts serving and waits, at most `bound`, for a hello; the app ID it names.
async fn connected(
    instance: &Instance,
    shutdown: &CancellationToken,
    bound: Duration,
) -> Result<(Serving, String), DaemonError> {
    let mut running = instance.start_serving()?;
    let mut status = instance.state.subscribe();
    let hello = tokio::select! {
        () = shutdown.cancelled() => return Err(TakeoverError::Stopped.into()),
        hello = tokio::time::timeout(bound, status.wait_for(|s| s.app_id.is_some())) => hello,
        ended = &mut running.run => return Err(connection_ended(ended)),
    };
    let app_id = match hello {
        Ok(Ok(status)) => status.app_id.clone().unwrap_or_default(),
        Ok(Err(_)) => return Err(TakeoverError::ConnectionStopped.into()),
        Err(_) => return Err(TakeoverError::NoHello(bound).into()),
    };
    Ok((running, app_id))
}

/// Our connection ended while the takeover needed it: a bad token or the wrong app ends
/// the takeover as it ends a first start (78).
fn connection_ended(ended: Result<(), FatalError>) -> DaemonError {
    match ended {
        Ok(()) => TakeoverError::ConnectionStopped.into(),
        Err(fatal) => DaemonError::Fatal(fatal),
    }
}
