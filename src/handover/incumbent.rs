//! The incumbent's side of a handover session.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::process::Process;
use super::{HandoverError, Session, Step, dedup_state};
use crate::control::protocol::Response;
use crate::dispatch::DedupSnapshot;
use crate::state::InstanceState;
use flowcoach_protocol::Envelope;

/// Envelopes handed on are one session line each, kept well below the session's line
/// limit (Slack's envelopes are a few KiB); a larger one is left for Slack to redeliver.
const MAX_HANDED_ON_FRAME: usize = 48 * 1024;

/// What the session needs from the daemon, and tells it.
#[derive(Debug)]
pub enum Request {
    /// Stop serving Slack (stop taking envelopes, drain, ack, close) and answer with what
    /// the successor needs.
    StopServing(oneshot::Sender<Stopped>),
}

/// What an instance that stopped serving hands on.
#[derive(Debug)]
pub struct Stopped {
    /// The final deduplication state.
    pub dedup: DedupSnapshot,
    /// Envelopes that arrived after its Close, unacked.
    pub late: Vec<Envelope>,
}

/// How a session ended.
#[derive(Debug)]
pub enum Outcome {
    /// The successor holds the app: exit.
    Completed { successor: u32 },
    /// The successor failed; `stopped_serving` says whether this instance must start
    /// serving again.
    RolledBack {
        reason: String,
        stopped_serving: bool,
    },
}

/// Settings of one session.
#[derive(Debug, Clone, Copy)]
pub struct Terms {
    /// Break before make: the incumbent closes before the successor connects.
    pub strict: bool,
    /// How long the successor may take to connect (and, strict, to say hello).
    pub timeout: Duration,
    /// How long the other steps may take (the drain is bounded on its own).
    pub step_timeout: Duration,
}

/// The descriptors to hand on: copies of the lock's and the control listener's (they share
/// the open file description, which is what holds the lock and the listening socket).
pub struct Handed {
    pub lock: OwnedFd,
    pub listener: OwnedFd,
    /// The metrics endpoint's listener, when it is on: the successor serves it on, so a
    /// reload keeps the endpoint (and a socket systemd passed) without a rebind.
    pub metrics: Option<OwnedFd>,
}

impl Handed {
    pub fn try_clone(&self) -> std::io::Result<Handed> {
        Ok(Handed {
            lock: self.lock.try_clone()?,
            listener: self.listener.try_clone()?,
            metrics: self.metrics.as_ref().map(OwnedFd::try_clone).transpose()?,
        })
    }
}

/// Runs one session with a successor whose takeover request was accepted.
pub async fn run(
    mut session: Session,
    terms: Terms,
    app_id: Option<String>,
    handed: Handed,
    state: Arc<InstanceState>,
    daemon: mpsc::Sender<Request>,
) -> Outcome {
    // Held from the start: the pid may belong to another process by the time we stop it.
    let process = session.peer();
    let successor = process.as_ref().map_or(0, Process::pid);
    let step = |text: &str| {
        let text = format!("handing over to pid {successor}: {text}");
        tracing::info!(successor, "{text}");
        state.update(|s| s.handover = Some(text));
    };
    let mut stopped_serving = false;
    let mut fds_sent = false;
    let result = async {
        session
            .send(&Response::TakeoverAccepted {
                strict: terms.strict,
                timeout_ms: terms.timeout.as_millis() as u64,
                sockets: state.status().sockets_open,
            })
            .await?;
        step(if terms.strict {
            "waiting for it to be ready (strict: it connects after this instance closes)"
        } else {
            "waiting for its hello"
        });
        let takes_envelopes = match session
            .step(terms.timeout, "waiting for the successor to be ready")
            .await?
        {
            Step::Ready {
                app_id: theirs,
                takes_envelopes,
            } => {
                check_app(app_id.as_deref(), theirs.as_deref())?;
                takes_envelopes
            }
            other => return Err(unexpected(other, "waiting for the successor to be ready")),
        };
        step("draining and closing this instance's connection");
        let (reply, snapshot) = oneshot::channel();
        daemon
            .send(Request::StopServing(reply))
            .await
            .map_err(|_| HandoverError::DaemonStopping)?;
        let stopped = snapshot.await.map_err(|_| HandoverError::DaemonStopping)?;
        stopped_serving = true;
        hand_on_late(&mut session, stopped.late, takes_envelopes).await?;
        step("passing on the deduplication state, the lock and the control socket");
        dedup_state::send(&mut session, stopped.dedup).await?;
        match session
            .step(terms.step_timeout, "waiting for send_fds")
            .await?
        {
            Step::SendFds => {}
            other => return Err(unexpected(other, "waiting for send_fds")),
        }
        fds_sent = true;
        let mut fds = vec![handed.lock.as_raw_fd(), handed.listener.as_raw_fd()];
        fds.extend(handed.metrics.as_ref().map(AsRawFd::as_raw_fd));
        session.send_fds(&fds).await?;
        match session
            .step(terms.step_timeout, "waiting for adopted")
            .await?
        {
            Step::Adopted => {}
            other => return Err(unexpected(other, "waiting for adopted")),
        }
        if terms.strict {
            step("waiting for its hello (strict)");
            match session
                .step(terms.timeout, "waiting for the successor's hello")
                .await?
            {
                Step::Serving => {}
                other => return Err(unexpected(other, "waiting for the successor's hello")),
            }
        }
        Ok(())
    }
    .await;
    match result {
        // The handover step stays in our status: clearing it would send systemd one more
        // STATUS= from this process after the successor has taken over.
        Ok(()) => {
            tracing::info!(successor, "handover complete: the successor holds the app");
            Outcome::Completed { successor }
        }
        Err(error) => {
            state.update(|s| s.handover = None);
            let reason = error.to_string();
            tracing::warn!(successor, %reason, "handover failed; rolling back: this instance keeps the app");
            let _ = session
                .send(&Step::Failed {
                    reason: format!("the incumbent rolls back: {reason}"),
                })
                .await;
            if let Some(process) = &process {
                stop_successor(process);
            }
            if fds_sent {
                // It may hold copies of the lock and the listener: serve again only once
                // it is gone, which closes its end of the session.
                session.wait_closed(terms.step_timeout).await;
            }
            Outcome::RolledBack {
                reason,
                stopped_serving,
            }
        }
    }
}

/// Sends the successor, one line each, the envelopes that arrived after our Close: it acks
/// them on its socket. An older successor cannot take them: Slack redelivers the events.
async fn hand_on_late(
    session: &mut Session,
    late: Vec<Envelope>,
    takes_envelopes: bool,
) -> Result<(), HandoverError> {
    if late.is_empty() {
        return Ok(());
    }
    if !takes_envelopes {
        tracing::warn!(
            count = late.len(),
            "the successor cannot take the envelopes that arrived after our Close; Slack redelivers the events among them"
        );
        return Ok(());
    }
    tracing::info!(
        count = late.len(),
        "handing on the envelopes that arrived after our Close"
    );
    for envelope in late {
        let frame = serde_json::to_string(&envelope).map_err(HandoverError::Encode)?;
        if frame.len() > MAX_HANDED_ON_FRAME {
            tracing::warn!(
                envelope_id = %envelope.envelope_id,
                bytes = frame.len(),
                "an envelope too large to hand on is left for Slack to redeliver"
            );
            continue;
        }
        session.send(&Step::Envelope { frame }).await?;
    }
    Ok(())
}

fn check_app(ours: Option<&str>, theirs: Option<&str>) -> Result<(), HandoverError> {
    match (ours, theirs) {
        (Some(ours), Some(theirs)) if ours != theirs => Err(HandoverError::OtherApp {
            ours: ours.to_owned(),
            theirs: theirs.to_owned(),
        }),
        _ => Ok(()),
    }
}

fn unexpected(step: Step, waiting: &'static str) -> HandoverError {
    HandoverError::Unexpected {
        got: format!("{step:?}"),
        waiting,
    }
}

/// A successor that failed must not go on serving beside us: it may hold copies of the
/// lock and the listener. The signal goes through its pidfd: if it has ended meanwhile,
/// nobody gets it, not a newer process under the same pid.
fn stop_successor(process: &Process) {
    if process.pid() == std::process::id() {
        return;
    }
    if let Err(error) = process.signal(nix::sys::signal::Signal::SIGTERM) {
        tracing::debug!(%error, successor = process.pid(), "could not stop the failed successor (it may have ended)");
    }
}
