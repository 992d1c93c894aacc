//! The successor's side of a handover session (`flowcoach --takeover`).

use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::Path;
use std::time::Duration;

use tokio::net::UnixStream;

use super::{HandoverError, Session, Step, dedup_state};
use crate::control::protocol::{Command, Request, Response};
use crate::dispatch::DedupSnapshot;
use crate::host::lock::{HolderInfo, InstanceLock};
use flowcoach_protocol::{Envelope, Inbound, parse_inbound};

/// Bound on the steps that only wait for the incumbent's drain and close.
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// An accepted takeover, in progress.
pub struct Takeover {
    session: Session,
    /// Break before make: connect only after adopting.
    pub strict: bool,
    /// How long the incumbent waits for us to be ready.
    pub timeout: Duration,
    /// The incumbent's open sockets: Slack counts them in our hellos until it closes them.
    pub incumbent_sockets: u32,
}

/// What the incumbent handed on.
pub struct Received {
    pub lock: InstanceLock,
    pub listener: StdUnixListener,
    /// The metrics endpoint's listener, when the incumbent had it on.
    pub metrics: Option<std::net::TcpListener>,
    pub dedup: DedupSnapshot,
    /// Envelopes that reached the incumbent after its Close: ours to handle and ack.
    pub late: Vec<Envelope>,
}

impl Takeover {
    /// Asks the incumbent listening on `socket` to hand the app over to this process.
    pub async fn request(socket: &Path) -> Result<Takeover, HandoverError> {
        let stream = UnixStream::connect(socket).await.map_err(|e| {
            HandoverError::Disconnected(format!("connecting to {}: {e}", socket.display()))
        })?;
        let mut session = Session::new(stream);
        session
            .send(&Request::new(Command::Takeover {
                pid: std::process::id(),
                release: env!("CARGO_PKG_VERSION").to_owned(),
            }))
            .await?;
        match session
            .receive(
                Duration::from_secs(10),
                "waiting for the incumbent to accept",
            )
            .await?
        {
            Response::TakeoverAccepted {
                strict,
                timeout_ms,
                sockets,
            } => Ok(Takeover {
                session,
                strict,
                timeout: Duration::from_millis(timeout_ms),
                incumbent_sockets: sockets,
            }),
            Response::Error { message, .. } => Err(HandoverError::Refused(message)),
            other => Err(HandoverError::Unexpected {
                got: format!("{other:?}"),
                waiting: "waiting for the incumbent to accept",
            }),
        }
    }

    /// Tells the incumbent we are ready: connected to `app_id` (overlap), or able to start.
    pub async fn ready(&mut self, app_id: Option<String>) -> Result<(), HandoverError> {
        self.session
            .send(&Step::Ready {
                app_id,
                takes_envelopes: true,
            })
            .await
    }

    /// Waits for the incumbent's state, then takes its lock and listener.
    pub async fn receive(
        &mut self,
        lock_path: &Path,
        holder: &HolderInfo,
    ) -> Result<Received, HandoverError> {
        let mut late = Vec::new();
        let dedup = dedup_state::receive(
            &mut self.session,
            STEP_TIMEOUT,
            "waiting for the incumbent's state",
            |step| match step {
                Step::Envelope { frame } => {
                    match parse_inbound(&frame) {
                        Ok(Inbound::Envelope(envelope)) => late.push(envelope),
                        // Not ours to crash on: Slack redelivers an event we cannot read.
                        _ => tracing::warn!("ignored an unreadable envelope from the incumbent"),
                    }
                    Ok(())
                }
                other => Err(other),
            },
        )
        .await?;
        self.session.send(&Step::SendFds).await?;
        let fds = self.session.receive_fds(STEP_TIMEOUT).await?;
        let got = fds.len();
        let mut fds = fds.into_iter();
        let (Some(lock_fd), Some(listener_fd)) = (fds.next(), fds.next()) else {
            return Err(HandoverError::MissingDescriptors { got });
        };
        let lock =
            InstanceLock::adopt(lock_fd, lock_path, holder).map_err(HandoverError::AdoptLock)?;
        let listener = StdUnixListener::from(listener_fd);
        listener
            .set_nonblocking(true)
            .map_err(HandoverError::AdoptListener)?;
        // Made non-blocking by the metrics server, as any listener it is given.
        let metrics = fds.next().map(std::net::TcpListener::from);
        Ok(Received {
            lock,
            listener,
            metrics,
            dedup,
            late,
        })
    }

    pub async fn adopted(&mut self) -> Result<(), HandoverError> {
        self.session.send(&Step::Adopted).await
    }

    /// Strict mode: our own connection said hello; the incumbent may go.
    pub async fn serving(&mut self) -> Result<(), HandoverError> {
        self.session.send(&Step::Serving).await
    }

    /// Tells the incumbent we give up, so it rolls back at once.
    pub async fn fail(&mut self, reason: &str) {
        let _ = self
            .session
            .send(&Step::Failed {
                reason: reason.to_owned(),
            })
            .await;
    }
}
