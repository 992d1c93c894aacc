//! The sentence a second instance prints before exiting 75: who holds the app, asked over
//! the holder's control socket, with the PID file as the fallback.

use std::path::Path;
use std::time::Duration;

use crate::control::client;
use crate::control::protocol::{Command, Response};
use crate::service::lock::LockError;

/// How long to wait for the holder's answer: it is alive (it holds the lock), so it
/// answers at once unless it is wedged.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

pub async fn describe(error: &LockError) -> String {
    let LockError::Held {
        holder: Some(holder),
        ..
    } = error
    else {
        return error.to_string();
    };
    let live = if holder.control_socket.as_os_str().is_empty() {
        None
    } else {
        Some(ask(&holder.control_socket).await)
    };
    match live {
        Some(Ok(report)) => format!("{error}; it reports: {report}"),
        Some(Err(why)) => format!("{error}; its control socket does not answer ({why})"),
        None => error.to_string(),
    }
}

async fn ask(socket: &Path) -> Result<String, String> {
    match client::request(socket, Command::Status, ASK_TIMEOUT).await {
        Ok(Response::Status(status)) => {
            let since = status
                .connected_since
                .map(|s| {
                    let at = std::time::UNIX_EPOCH + Duration::from_secs(s);
                    format!(
                        ", connected since {}",
                        humantime::format_rfc3339_seconds(at)
                    )
                })
                .unwrap_or_default();
            Ok(format!(
                "environment {}, state {}{since}",
                status.environment, status.phase
            ))
        }
        Ok(other) => Err(format!("unexpected answer {other:?}")),
        Err(error) => Err(error.to_string()),
    }
}
