//! The client's side of the control socket.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

use super::protocol::{
    Command, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Request, Response, version_mismatch_message,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no flowcoach answers at {}: is it running? (systemctl status flowcoach)",
        path.display()
    )]
    NoDaemon { path: PathBuf },
    #[error(
        "permission denied on {}: run as root or as a member of the control group",
        path.display()
    )]
    PermissionDenied { path: PathBuf },
    #[error(
        "flowcoach at {} did not answer within {}",
        path.display(),
        humantime::format_duration(*after)
    )]
    Timeout { path: PathBuf, after: Duration },
    #[error("unexpected answer from flowcoach: {0}")]
    Protocol(String),
    #[error("{}", version_mismatch_message(*client, *daemon))]
    VersionMismatch { client: u32, daemon: u32 },
    #[error("cannot talk to flowcoach at {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// Sends `command` to the daemon at `path` and reads its answer, all within `timeout`.
/// A [`Response::Error`] is returned as it is, except a protocol version mismatch, which
/// becomes [`ClientError::VersionMismatch`].
pub async fn request(
    path: &Path,
    command: Command,
    timeout: Duration,
) -> Result<Response, ClientError> {
    match tokio::time::timeout(timeout, exchange(path, &Request::new(command))).await {
        Ok(result) => result,
        Err(_) => Err(ClientError::Timeout {
            path: path.to_owned(),
            after: timeout,
        }),
    }
}

async fn exchange(path: &Path, request: &Request) -> Result<Response, ClientError> {
    let io_error = |source: io::Error| ClientError::Io {
        path: path.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(path)
        .await
        .map_err(|error| match error.kind() {
            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ClientError::NoDaemon {
                path: path.to_owned(),
            },
            io::ErrorKind::PermissionDenied => ClientError::PermissionDenied {
                path: path.to_owned(),
            },
            _ => io_error(error),
        })?;
    let mut line = serde_json::to_vec(request)
        .map_err(|error| ClientError::Protocol(format!("cannot encode the request: {error}")))?;
    line.push(b'\n');
    // The daemon may answer (an error) and close before reading everything: read its answer
    // even when writing failed.
    let written = stream.write_all(&line).await;
    let mut reader = BufReader::new((&mut stream).take(MAX_MESSAGE_BYTES as u64));
    let mut answer = Vec::new();
    let read = reader.read_until(b'\n', &mut answer).await;
    if answer.last() != Some(&b'\n') {
        if answer.len() >= MAX_MESSAGE_BYTES {
            return Err(ClientError::Protocol(format!(
                "an answer longer than {MAX_MESSAGE_BYTES} bytes"
            )));
        }
        written.map_err(io_error)?;
        read.map_err(io_error)?;
        return Err(ClientError::Protocol(
            "the connection was closed without a complete answer".to_owned(),
        ));
    }
    let response: Response = serde_json::from_slice(&answer).map_err(|error| {
        ClientError::Protocol(format!(
            "{error}: {}",
            String::from_utf8_lossy(&answer).trim_end()
        ))
    })?;
    match response {
        Response::Error {
            protocol: Some(daemon),
            ..
        } if daemon != PROTOCOL_VERSION => Err(ClientError::VersionMismatch {
            client: PROTOCOL_VERSION,
            daemon,
        }),
        response => Ok(response),
    }
}
