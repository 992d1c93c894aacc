//! Handover: moving the app from a running instance (the incumbent) to a successor with no
//! gap, no event lost and none handled twice.
//!
//! A TLS websocket cannot move between processes, but a flock (an open file description)
//! and a listening socket can, over SCM_RIGHTS. So the successor opens its own Slack
//! connection; the incumbent drains, acks, closes, and passes on its deduplication state,
//! its lock, its control listener and, when on, its metrics listener. The session runs over the control socket, one JSON
//! line per step, each side waiting for the other (lockstep):
//!
//! ```text
//! successor                                  incumbent
//! {"command":"takeover",…}              →
//!                                       ←    {"response":"takeover_accepted","strict":false,…}
//! (overlap: connects, waits for hello,
//!  holds envelopes unacked)
//! {"step":"ready","app_id":"A…",
//!  "takes_envelopes":true}              →
//!                                            stops taking envelopes, drains, acks, closes
//!                                       ←    {"step":"envelope","frame":"…"} (each
//!                                            envelope that came after its Close)
//!                                       ←    {"step":"state_part","dedup":{…}} (0 or more)
//!                                       ←    {"step":"state","dedup":{…}}
//! {"step":"send_fds"}                   →
//!                                       ←    one byte + SCM_RIGHTS [lock, control listener,
//!                                            metrics listener if the endpoint is on]
//! (adopts them, takes over the dedup
//!  state, releases held envelopes, handles
//!  and acks the handed-on ones)
//! {"step":"adopted"}                    →
//! (strict: only now connects;
//!  {"step":"serving"} once hello came)  →
//!                                            MAINPID=successor, exits 0
//! ```
//!
//! Every line is at most 64 KiB, as on the control socket: the deduplication state (up to
//! about 0.5 MiB) travels in parts.
//!
//! The lock's open file description is held by both processes from the fd transfer until
//! the incumbent exits, so no third process can take the app in between. Until the
//! successor says `adopted` (or `serving`, strict), the incumbent can roll back: it stops
//! the successor and serves again.

mod dedup_state;
pub mod incumbent;
mod process;
mod session;
pub mod spawn;
pub mod successor;

use serde::{Deserialize, Serialize};

use crate::dispatch::DedupSnapshot;

pub use session::Session;

/// One step of a handover session after the takeover request was accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum Step {
    /// Successor: connected and greeted by Slack (overlap), or ready to start (strict).
    /// `takes_envelopes`: it accepts `envelope` steps (an older successor does not say so,
    /// and gets none).
    Ready {
        app_id: Option<String>,
        #[serde(default)]
        takes_envelopes: bool,
    },
    /// Incumbent, before its state, one line each: an envelope that arrived after its
    /// Close, which it could not ack; the successor handles it and acks it on its own
    /// socket (Slack matches acks by envelope id). The frame as Slack sent it.
    Envelope { frame: String },
    /// Incumbent: drained and closed; a part of its deduplication state, more to follow.
    StatePart { dedup: DedupSnapshot },
    /// Incumbent: drained and closed; the last part of its deduplication state.
    State { dedup: DedupSnapshot },
    /// Successor: ready to receive the lock and the control listener.
    SendFds,
    /// Successor: holds the lock and the listener.
    Adopted,
    /// Successor (strict mode): its own connection said hello.
    Serving,
    /// Either side: giving up, and why.
    Failed { reason: String },
}

/// Why a handover did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    #[error("the other side gave up: {0}")]
    PeerFailed(String),
    #[error("the other side went away ({0})")]
    Disconnected(String),
    #[error("no answer within {0:?} while {1}")]
    Timeout(std::time::Duration, &'static str),
    #[error("unexpected step {got} while {waiting}")]
    Unexpected { got: String, waiting: &'static str },
    #[error("a handover line is longer than {limit} bytes")]
    TooLong { limit: usize },
    /// The incumbent refused the takeover; its words.
    #[error("{0}")]
    Refused(String),
    #[error("the successor is connected to app {theirs}, this instance serves {ours}")]
    OtherApp { ours: String, theirs: String },
    #[error("the daemon is stopping")]
    DaemonStopping,
    #[error("cannot encode a step: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("protocol error: data before the descriptors")]
    DataBeforeDescriptors,
    #[error("the incumbent sent {got} descriptors instead of the lock and the listener")]
    MissingDescriptors { got: usize },
    #[error("taking over the lock: {0}")]
    AdoptLock(#[source] crate::host::lock::LockError),
    #[error("taking over the control socket: {0}")]
    AdoptListener(#[source] std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A successor of an earlier release does not say it takes envelopes: it gets none,
    /// since it would not expect them before the state.
    #[test]
    fn a_ready_step_without_takes_envelopes_takes_none() {
        let step: Step = serde_json::from_str(r#"{"step":"ready","app_id":"A1"}"#).unwrap();
        assert_eq!(
            step,
            Step::Ready {
                app_id: Some("A1".into()),
                takes_envelopes: false
            }
        );
    }
}
