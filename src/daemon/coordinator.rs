//! The incumbent's main loop: serve Slack, and run handovers to successors, one at a time,
//! rolling back when they fail.

use std::os::fd::AsFd;
use std::process::ExitStatus;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{UnixListener, UnixStream};
use tokio::process::Child;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use super::{DaemonError, EXTEND_STEP, Instance, Serving};
use crate::config::token_variable;
use crate::control::protocol::{Command, Response};
use crate::control::server::HandoverCall;
use crate::deadline::far_future;
use crate::handover::incumbent::{self, Handed, Outcome, Terms};
use crate::handover::{Session, spawn};
use crate::host::lock::InstanceLock;
use crate::host::systemd;
use crate::metrics::labels::HandoverOutcome;

/// Copies of the descriptors a successor receives.
pub fn handed(
    lock: &InstanceLock,
    listener: &UnixListener,
    metrics: Option<&std::net::TcpListener>,
) -> std::io::Result<Handed> {
    Ok(Handed {
        lock: lock.as_fd().try_clone_to_owned()?,
        listener: listener.as_fd().try_clone_to_owned()?,
        metrics: metrics
            .map(|listener| listener.as_fd().try_clone_to_owned())
            .transpose()?,
    })
}

/// A handover under way.
enum Underway {
    Idle,
    /// `flowcoachctl handover` started a successor; waiting for it to ask for the app.
    Spawned {
        child: Child,
        caller: UnixStream,
        started: Instant,
    },
    /// A session with a successor runs.
    Session {
        task: JoinHandle<Outcome>,
        child: Option<Child>,
        caller: Option<UnixStream>,
        started: Instant,
    },
}

pub struct Coordinator<'a> {
    instance: &'a Instance,
    handed: Handed,
    calls: mpsc::Receiver<HandoverCall>,
    requests_tx: mpsc::Sender<incumbent::Request>,
    requests: mpsc::Receiver<incumbent::Request>,
    underway: Underway,
}

impl<'a> Coordinator<'a> {
    pub fn new(
        instance: &'a Instance,
        handed: Handed,
        calls: mpsc::Receiver<HandoverCall>,
    ) -> Self {
        let (requests_tx, requests) = mpsc::channel(1);
        Coordinator {
            instance,
            handed,
            calls,
            requests_tx,
            requests,
            underway: Underway::Idle,
        }
    }

    /// Serves until a stop signal, a completed handover, or a fatal error.
    pub async fn serve(
        mut self,
        mut serving: Serving,
        shutdown: &CancellationToken,
    ) -> Result<Ending, DaemonError> {
        let mut active = true;
        loop {
            let spawn_deadline = match &self.underway {
                Underway::Spawned { started, .. } => *started + self.terms().timeout,
                _ => far_future(),
            };
            tokio::select! {
                ended = &mut serving.run, if active => {
                    // Without a stop request, the supervisor ends only on a fatal error.
                    ended?;
                    return Ok(Ending::Stopped);
                }
                () = shutdown.cancelled() => {
                    self.abandon("the incumbent is stopping").await;
                    if active {
                        self.instance.systemd.stopping();
                        serving.stop.cancel();
                        systemd::extend_while(&self.instance.systemd, &mut serving.run, EXTEND_STEP).await?;
                        self.report_unanswerable();
                    }
                    return Ok(Ending::Stopped);
                }
                Some(call) = self.calls.recv() => self.on_call(call).await,
                Some(request) = self.requests.recv() => {
                    let incumbent::Request::StopServing(reply) = request;
                    if active {
                        serving.stop.cancel();
                        if let Err(error) = (&mut serving.run).await {
                            tracing::warn!(%error, "the connection ended with an error while stopping for the handover");
                        }
                        active = false;
                    }
                    let _ = reply.send(incumbent::Stopped {
                        dedup: self.instance.dispatcher.dedup_snapshot(),
                        late: self.instance.dispatcher.take_orphans(),
                    });
                }
                () = sleep_until(spawn_deadline) => {
                    let reason = format!("the successor did not ask for the app within {:?}", self.terms().timeout);
                    self.abandon(&reason).await;
                }
                event = next_event(&mut self.underway) => match event {
                    Event::ChildExited(status) => self.spawned_exited(status).await,
                    Event::SessionEnded(outcome) => match self.finish(outcome).await {
                        Finished::Exit => return Ok(Ending::HandedOver),
                        Finished::ServeAgain if !active => {
                            self.instance.dispatcher.resume();
                            serving = self.instance.start_serving()?;
                            active = true;
                        }
                        Finished::ServeAgain => {}
                    },
                },
            }
        }
    }

    /// On a stop, what arrived after the last Close has no socket left to be acked on
    /// (nothing may follow a Close, and no client can keep Slack from sending until it has
    /// read it): Slack redelivers the events, to the next instance; slash commands and
    /// interactions among them are not redelivered.
    fn report_unanswerable(&self) {
        let left = self.instance.dispatcher.take_orphans();
        let answers_due = left.iter().filter(|e| e.accepts_response_payload).count();
        if !left.is_empty() {
            tracing::warn!(
                count = left.len(),
                answers_due,
                "envelopes arrived while stopping (during the drain or after the last Close), with no socket left to ack them: Slack redelivers the events among them, not slash commands or interactions"
            );
        }
    }

    fn terms(&self) -> Terms {
        let settings = &self.instance.live.borrow().handover;
        Terms {
            strict: settings.strict,
            timeout: settings.timeout,
            step_timeout: self.instance.live.borrow().dispatch.drain_timeout
                + Duration::from_secs(10),
        }
    }

    async fn on_call(&mut self, call: HandoverCall) {
        let HandoverCall {
            mut stream,
            peer,
            command,
        } = call;
        let from_our_child = match &self.underway {
            Underway::Spawned { child, .. } => {
                child.id().is_some() && child.id().map(|id| id as i32) == peer.pid
            }
            _ => false,
        };
        match (command, &self.underway) {
            // As PID 1 (a container without an init), our exit ends the container and
            // with it any successor we start.
            (Command::Handover, Underway::Idle) if std::process::id() == 1 => {
                reply(
                    &mut stream,
                    Response::error(
                        "flowcoach is PID 1 here (a container without --init): a successor it starts would die with it; start a new container with --takeover instead",
                    ),
                )
                .await;
            }
            (Command::Handover, Underway::Idle) => {
                match spawn::successor(
                    &self.instance.exe,
                    self.instance.config.path.as_ref(),
                    &self.instance.config.settings.environment,
                    token_variable::taken_values(),
                ) {
                    Ok(child) => {
                        let pid = child.id().unwrap_or(0);
                        tracing::info!(successor = pid, exe = %self.instance.exe.display(), "started a successor for a handover");
                        self.instance.state.update(|s| {
                            s.handover = Some(format!(
                                "handing over to pid {pid}: waiting for it to start"
                            ));
                        });
                        self.underway = Underway::Spawned {
                            child,
                            caller: stream,
                            started: Instant::now(),
                        };
                    }
                    Err(error) => {
                        reply(
                            &mut stream,
                            Response::error(format!(
                                "cannot start a successor from {}: {error}",
                                self.instance.exe.display()
                            )),
                        )
                        .await;
                    }
                }
            }
            (Command::Takeover { .. }, Underway::Idle) => {
                self.start_session(stream, None, None, Instant::now())
            }
            (Command::Takeover { .. }, Underway::Spawned { .. }) if from_our_child => {
                let Underway::Spawned {
                    child,
                    caller,
                    started,
                } = std::mem::replace(&mut self.underway, Underway::Idle)
                else {
                    unreachable!("matched above");
                };
                self.start_session(stream, Some(child), Some(caller), started);
            }
            _ => {
                reply(
                    &mut stream,
                    Response::error(
                        "a handover is already in progress; try again when it has ended",
                    ),
                )
                .await;
            }
        }
    }

    fn start_session(
        &mut self,
        stream: UnixStream,
        child: Option<Child>,
        caller: Option<UnixStream>,
        started: Instant,
    ) {
        let handed = match self.handed.try_clone() {
            Ok(handed) => handed,
            Err(error) => {
                tracing::error!(%error, "cannot copy the descriptors for a handover");
                return;
            }
        };
        let app_id = self.instance.state.status().app_id;
        let task = tokio::spawn(incumbent::run(
            Session::new(stream),
            self.terms(),
            app_id,
            handed,
            self.instance.state.clone(),
            self.requests_tx.clone(),
        ));
        self.underway = Underway::Session {
            task,
            child,
            caller,
            started,
        };
    }

    async fn finish(&mut self, outcome: Outcome) -> Finished {
        let Underway::Session {
            child,
            caller,
            started,
            ..
        } = std::mem::replace(&mut self.underway, Underway::Idle)
        else {
            return Finished::ServeAgain;
        };
        let took_ms = started.elapsed().as_millis() as u64;
        match outcome {
            Outcome::Completed { successor } => {
                tracing::info!(successor, took_ms, "handed the app over");
                self.instance.systemd.main_pid(successor);
                if let Some(mut caller) = caller {
                    reply(
                        &mut caller,
                        Response::HandedOver {
                            successor_pid: successor,
                            took_ms,
                        },
                    )
                    .await;
                }
                // The child lives on as the service's main process; not ours to reap.
                drop(child);
                Finished::Exit
            }
            Outcome::RolledBack { reason, .. } => {
                self.count_failed();
                if let Some(child) = child {
                    reap(child).await;
                }
                if let Some(mut caller) = caller {
                    reply(
                        &mut caller,
                        Response::error(format!(
                            "handover rolled back, this instance keeps serving: {reason}"
                        )),
                    )
                    .await;
                }
                Finished::ServeAgain
            }
        }
    }

    /// A failed handover is counted here, by the incumbent that serves on; a completed one
    /// by the successor.
    fn count_failed(&self) {
        self.instance
            .state
            .counters
            .handovers
            .bump(HandoverOutcome::Failed);
    }

    async fn spawned_exited(&mut self, status: ExitStatus) {
        let reason =
            format!("the successor exited ({status}) before asking for the app; see its log");
        self.fail_spawned(&reason).await;
    }

    /// Ends whatever is under way without completing it.
    async fn abandon(&mut self, reason: &str) {
        match &self.underway {
            Underway::Idle => {}
            Underway::Spawned { .. } => self.fail_spawned(reason).await,
            Underway::Session { .. } => {
                // The session task rolls back on its own when the successor is stopped.
                if let Underway::Session {
                    task,
                    child,
                    caller,
                    ..
                } = std::mem::replace(&mut self.underway, Underway::Idle)
                {
                    task.abort();
                    if let Some(child) = child {
                        reap(child).await;
                    }
                    if let Some(mut caller) = caller {
                        reply(
                            &mut caller,
                            Response::error(format!("handover abandoned: {reason}")),
                        )
                        .await;
                    }
                }
            }
        }
        self.instance.state.update(|s| s.handover = None);
    }

    async fn fail_spawned(&mut self, reason: &str) {
        if let Underway::Spawned {
            child, mut caller, ..
        } = std::mem::replace(&mut self.underway, Underway::Idle)
        {
            tracing::warn!(%reason, "handover failed; this instance keeps serving");
            self.count_failed();
            reap(child).await;
            reply(
                &mut caller,
                Response::error(format!(
                    "handover failed, this instance keeps serving: {reason}"
                )),
            )
            .await;
        }
        self.instance.state.update(|s| s.handover = None);
    }
}

/// How the incumbent's service ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Stopped,
    /// A successor holds the app: it reports to systemd from now on.
    HandedOver,
}

enum Finished {
    Exit,
    ServeAgain,
}

enum Event {
    /// A spawned successor exited before its session began.
    ChildExited(ExitStatus),
    SessionEnded(Outcome),
}

/// The next thing that happens to the handover under way; pending when none is.
async fn next_event(underway: &mut Underway) -> Event {
    match underway {
        Underway::Spawned { child, .. } => match child.wait().await {
            Ok(status) => Event::ChildExited(status),
            Err(_) => std::future::pending().await,
        },
        Underway::Session { task, .. } => Event::SessionEnded(match task.await {
            Ok(outcome) => outcome,
            Err(error) => Outcome::RolledBack {
                reason: format!("the handover task failed: {error}"),
                stopped_serving: true,
            },
        }),
        Underway::Idle => std::future::pending().await,
    }
}

/// Stops a successor that must not go on (SIGTERM, then SIGKILL) and waits for it.
async fn reap(mut child: Child) {
    // Signalling by pid is safe here: the child is ours, and `id` is `None` once it has
    // been reaped, so until then its pid cannot have passed to another process.
    if let Some(pid) = child.id() {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }
    if tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

async fn reply(stream: &mut UnixStream, response: Response) {
    let mut line = serde_json::to_vec(&response).unwrap_or_default();
    line.push(b'\n');
    let _ = stream.write_all(&line).await;
}
