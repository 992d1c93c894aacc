//! The successor's path: take the app over from the running instance.

use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{DaemonError, Service, Serving};
use crate::handover::HandoverError;
use crate::handover::successor::{Received, Takeover};
use crate::service::lock::{InstanceLock, read_holder};
use crate::state::ConnectionStatus;

pub enum Taken {
    /// We hold the app: the incumbent's lock and listener, and our running connection.
    App {
        lock: InstanceLock,
        listener: UnixListener,
        serving: Serving,
    },
    /// No incumbent answered: start as a first instance would.
    Nothing,
}

pub async fn take_over(
    service: &Service,
    shutdown: &CancellationToken,
) -> Result<Taken, DaemonError> {
    let socket = read_holder(&service.paths.lock)
        .map(|holder| holder.control_socket)
        .filter(|socket| !socket.as_os_str().is_empty())
        .unwrap_or_else(|| service.paths.socket.clone());
    let mut takeover = match Takeover::request(&socket).await {
        Ok(takeover) => takeover,
        Err(HandoverError::Disconnected(why)) => {
            tracing::warn!(%why, "no running instance answers; starting as the only one");
            return Ok(Taken::Nothing);
        }
        Err(error) => return Err(DaemonError::Takeover(error.to_string())),
    };
    tracing::info!(
        strict = takeover.strict,
        "the running instance accepted the takeover"
    );
    let mut serving = None;
    let ready = if !takeover.strict {
        // Slack's count in our hello includes the incumbent's socket.
        service
            .state
            .predecessor_sockets
            .store(1, std::sync::atomic::Ordering::Relaxed);
        let mut running = service.start_serving()?;
        let connected = tokio::select! {
            () = shutdown.cancelled() => Err(DaemonError::Takeover("stopped by a signal".to_owned())),
            hello = wait_for_hello(service.state.subscribe(), takeover.timeout) => hello.map_err(DaemonError::Takeover),
            ended = &mut running.run => Err(match ended {
                Ok(()) => DaemonError::Takeover("the connection stopped".to_owned()),
                // A bad token or the wrong app: exit as a first start would (78).
                Err(error) => DaemonError::Fatal(error),
            }),
        };
        let ready = match connected {
            Ok(app_id) => takeover.ready(Some(app_id)).await,
            Err(error) => {
                takeover.fail(&reason(&error)).await;
                return Err(error);
            }
        };
        serving = Some(running);
        ready
    } else {
        takeover.ready(None).await
    };
    let received = match ready {
        // The incumbent died before we said ready: handled below, as when it dies later.
        Err(error @ HandoverError::Disconnected(_)) => Err(error),
        Err(error) => return Err(DaemonError::Takeover(error.to_string())),
        Ok(()) => match &mut serving {
            // Our connection keeps running (holding envelopes) while the incumbent drains.
            Some(running) => tokio::select! {
                received = takeover.receive(&service.paths.lock, &service.holder) => received,
                ended = &mut running.run => Err(HandoverError::Local(format!("our connection ended: {ended:?}"))),
            },
            None => takeover.receive(&service.paths.lock, &service.holder).await,
        },
    };
    let Received {
        lock,
        listener,
        dedup,
        late,
    } = match received {
        Ok(received) => received,
        Err(HandoverError::Disconnected(why)) => {
            // The incumbent died mid-handover: the app is ours if its lock is free.
            tracing::warn!(%why, "the running instance went away during the handover; taking the app alone");
            let lock = InstanceLock::acquire(&service.paths.lock, &service.holder)
                .map_err(|e| DaemonError::Takeover(e.to_string()))?;
            let listener = super::listen(None, &service.paths.socket)?;
            service.dispatcher.release(None);
            service
                .state
                .predecessor_sockets
                .store(0, std::sync::atomic::Ordering::Relaxed);
            let serving = match serving {
                Some(serving) => serving,
                None => service.start_serving()?,
            };
            tracing::info!("took the app over alone");
            return Ok(Taken::App {
                lock,
                listener,
                serving,
            });
        }
        Err(error) => {
            takeover.fail(&error.to_string()).await;
            return Err(DaemonError::Takeover(error.to_string()));
        }
    };
    service.dispatcher.release(Some(dedup));
    // Acked on our socket once we have one (at once in overlap mode), deduplicated
    // against the incumbent's state like everything else.
    for envelope in late {
        service.dispatcher.orphan(envelope);
    }
    service
        .state
        .predecessor_sockets
        .store(0, std::sync::atomic::Ordering::Relaxed);
    if let Err(error) = takeover.adopted().await {
        // We hold the app now; the incumbent cannot roll back without its session.
        tracing::warn!(%error, "could not confirm the takeover to the previous instance");
    }
    let listener = UnixListener::from_std(listener)
        .map_err(|e| DaemonError::Runtime(format!("control socket: {e}")))?;
    let serving = match serving {
        Some(serving) => serving,
        None => {
            let mut running = service.start_serving()?;
            let hello = tokio::select! {
                hello = wait_for_hello(service.state.subscribe(), takeover.timeout) => hello.map_err(DaemonError::Takeover),
                ended = &mut running.run => Err(match ended {
                    Ok(()) => DaemonError::Takeover("the connection stopped".to_owned()),
                    Err(error) => DaemonError::Fatal(error),
                }),
            };
            match hello {
                Ok(_) => {
                    let _ = takeover.serving().await;
                }
                Err(error) => {
                    takeover.fail(&reason(&error)).await;
                    return Err(error);
                }
            }
            running
        }
    };
    tracing::info!("took the app over");
    Ok(Taken::App {
        lock,
        listener,
        serving,
    })
}

/// Why we give up, for the incumbent's log and its caller.
fn reason(error: &DaemonError) -> String {
    match error {
        DaemonError::Takeover(reason) => reason.clone(),
        other => other.to_string(),
    }
}

/// Resolves with the app ID once a connection has said hello.
async fn wait_for_hello(
    mut status: watch::Receiver<ConnectionStatus>,
    bound: std::time::Duration,
) -> Result<String, String> {
    let hello = tokio::time::timeout(bound, status.wait_for(|s| s.app_id.is_some()))
        .await
        .map_err(|_| format!("no hello from Slack within {bound:?}"))?
        .map_err(|_| "the service stopped".to_owned())?;
    Ok(hello.app_id.clone().unwrap_or_default())
}
