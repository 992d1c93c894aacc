//! What a second instance says before exiting 75: who holds the app, asked over the
//! holder's control socket, with the PID file as the fallback.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use crate::control::client::{self, ClientError};
use crate::control::protocol::{Command, Response, StatusReport};
use crate::host::lock::LockError;

/// How long to wait for the holder's answer: it is alive (it holds the lock), so it
/// answers at once unless it is wedged.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);

/// Another instance holds the app on this host.
#[derive(Debug, thiserror::Error)]
#[error("{held}{report}")]
pub struct AlreadyRunning {
    /// The lock's refusal, naming the holder from the PID file.
    held: LockError,
    /// What the holder says about itself.
    report: HolderReport,
}

/// What the holder answered on its control socket.
#[derive(Debug)]
enum HolderReport {
    /// The PID file names no control socket to ask.
    NotAsked,
    Answered(Box<StatusReport>),
    /// It answered something else than a status.
    Unexpected(Box<Response>),
    Silent(ClientError),
}

impl fmt::Display for HolderReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HolderReport::NotAsked => Ok(()),
            HolderReport::Answered(status) => {
                write!(
                    f,
                    "; it reports: environment {}, state {}",
                    status.environment, status.phase
                )?;
                if let Some(since) = status.connected_since {
                    let at = std::time::UNIX_EPOCH + Duration::from_secs(since);
                    write!(
                        f,
                        ", connected since {}",
                        humantime::format_rfc3339_seconds(at)
                    )?;
                }
                Ok(())
            }
            HolderReport::Unexpected(answer) => write!(
                f,
                "; its control socket does not answer (unexpected answer {answer:?})"
            ),
            HolderReport::Silent(error) => {
                write!(f, "; its control socket does not answer ({error})")
            }
        }
    }
}

/// The refusal `held` ([`LockError::Held`]) with what its holder says about itself.
pub async fn already_running(held: LockError) -> AlreadyRunning {
    let socket = match &held {
        LockError::Held {
            holder: Some(holder),
            ..
        } if !holder.control_socket.as_os_str().is_empty() => Some(holder.control_socket.clone()),
        _ => None,
    };
    let report = match socket {
        Some(socket) => ask(&socket).await,
        None => HolderReport::NotAsked,
    };
    AlreadyRunning { held, report }
}

async fn ask(socket: &Path) -> HolderReport {
    match client::request(socket, Command::Status, ASK_TIMEOUT).await {
        Ok(Response::Status(status)) => HolderReport::Answered(status),
        Ok(other) => HolderReport::Unexpected(Box::new(other)),
        Err(error) => HolderReport::Silent(error),
    }
}
