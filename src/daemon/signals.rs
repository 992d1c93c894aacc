//! Signals, daemon(7) style: SIGTERM or SIGINT stop gracefully (a second one exits at
//! once), SIGHUP reloads the configuration.

use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::exit;

/// Installs the handlers; SIGHUPs arrive on the returned channel.
pub fn watch(shutdown: CancellationToken) -> std::io::Result<mpsc::Receiver<()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    // One pending reload is enough: several SIGHUPs in a row mean "reload", once.
    let (reload_tx, reload_rx) = mpsc::channel(1);
    tokio::spawn(async move {
        let mut stops = 0;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = hup.recv() => {
                    let _ = reload_tx.try_send(());
                    continue;
                }
            };
            stops += 1;
            if stops > 1 {
                tracing::warn!(signal = name, "second stop signal: exiting at once");
                std::process::exit(i32::from(exit::FAILURE));
            }
            tracing::info!(signal = name, "stopping: draining in-flight envelopes");
            shutdown.cancel();
        }
    });
    Ok(reload_rx)
}
