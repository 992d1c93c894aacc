//! The handover session's transport: JSON lines in lockstep, and one byte carrying file
//! descriptors.

use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::UnixStream;

use super::{HandoverError, Step};

/// The deduplication state is the largest message: about 25 bytes an entry.
const MAX_LINE_BYTES: usize = 32 << 20;

/// One end of a handover session.
pub struct Session {
    stream: UnixStream,
    /// Bytes read past the last line. Lockstep means there never are any when fds are due;
    /// `receive_fds` checks it.
    pending: Vec<u8>,
}

impl Session {
    pub fn new(stream: UnixStream) -> Self {
        Session {
            stream,
            pending: Vec::new(),
        }
    }

    pub fn peer_pid(&self) -> Option<u32> {
        self.stream
            .peer_cred()
            .ok()
            .and_then(|cred| cred.pid())
            .and_then(|pid| u32::try_from(pid).ok())
    }

    /// Writes one message as a JSON line.
    pub async fn send<T: Serialize>(&mut self, message: &T) -> Result<(), HandoverError> {
        let mut line = serde_json::to_vec(message)
            .map_err(|e| HandoverError::Local(format!("cannot encode a step: {e}")))?;
        line.push(b'\n');
        self.stream
            .write_all(&line)
            .await
            .map_err(|e| HandoverError::Disconnected(e.to_string()))
    }

    /// Reads one JSON line within `bound`.
    pub async fn receive<T: DeserializeOwned>(
        &mut self,
        bound: Duration,
        waiting: &'static str,
    ) -> Result<T, HandoverError> {
        let line = tokio::time::timeout(bound, self.read_line())
            .await
            .map_err(|_| HandoverError::Timeout(bound, waiting))??;
        serde_json::from_slice(&line).map_err(|e| HandoverError::Unexpected {
            got: format!("an unreadable message ({e})"),
            waiting,
        })
    }

    /// Reads the next step, turning `Failed` into an error.
    pub async fn step(
        &mut self,
        bound: Duration,
        waiting: &'static str,
    ) -> Result<Step, HandoverError> {
        match self.receive(bound, waiting).await? {
            Step::Failed { reason } => Err(HandoverError::PeerFailed(reason)),
            step => Ok(step),
        }
    }

    async fn read_line(&mut self) -> Result<Vec<u8>, HandoverError> {
        loop {
            if let Some(end) = self.pending.iter().position(|b| *b == b'\n') {
                let rest = self.pending.split_off(end + 1);
                let line = std::mem::replace(&mut self.pending, rest);
                return Ok(line);
            }
            if self.pending.len() > MAX_LINE_BYTES {
                return Err(HandoverError::Local(
                    "a handover message is too long".into(),
                ));
            }
            let mut chunk = [0u8; 64 * 1024];
            let read = self
                .stream
                .read(&mut chunk)
                .await
                .map_err(|e| HandoverError::Disconnected(e.to_string()))?;
            if read == 0 {
                return Err(HandoverError::Disconnected("end of stream".into()));
            }
            self.pending.extend_from_slice(&chunk[..read]);
        }
    }

    /// Waits (at most `bound`) until the peer closes its end, e.g. because it exited.
    pub async fn wait_closed(&mut self, bound: Duration) {
        let drain = async {
            let mut chunk = [0u8; 4096];
            while matches!(self.stream.read(&mut chunk).await, Ok(n) if n > 0) {}
        };
        let _ = tokio::time::timeout(bound, drain).await;
    }

    /// Sends one byte carrying `fds` (SCM_RIGHTS). The receiver gets its own copies.
    pub async fn send_fds(&self, fds: &[RawFd]) -> Result<(), HandoverError> {
        let socket = self.stream.as_raw_fd();
        let sent = loop {
            self.stream
                .writable()
                .await
                .map_err(|e| HandoverError::Disconnected(e.to_string()))?;
            let attempt = self.stream.try_io(Interest::WRITABLE, || {
                let byte = [1u8];
                let iov = [IoSlice::new(&byte)];
                let rights = [ControlMessage::ScmRights(fds)];
                sendmsg::<()>(socket, &iov, &rights, MsgFlags::empty(), None)
                    .map_err(io::Error::from)
            });
            match attempt {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => break other,
            }
        };
        sent.map(|_| ())
            .map_err(|e| HandoverError::Disconnected(format!("sending descriptors: {e}")))
    }

    /// Receives the byte sent by [`Session::send_fds`] and the descriptors it carries.
    pub async fn receive_fds(&mut self, bound: Duration) -> Result<Vec<OwnedFd>, HandoverError> {
        if !self.pending.is_empty() {
            return Err(HandoverError::Local(
                "protocol error: data before the descriptors".into(),
            ));
        }
        tokio::time::timeout(bound, self.read_fds())
            .await
            .map_err(|_| HandoverError::Timeout(bound, "waiting for the lock and the listener"))?
    }

    async fn read_fds(&self) -> Result<Vec<OwnedFd>, HandoverError> {
        let socket = self.stream.as_raw_fd();
        loop {
            self.stream
                .readable()
                .await
                .map_err(|e| HandoverError::Disconnected(e.to_string()))?;
            let attempt = self.stream.try_io(Interest::READABLE, || {
                let mut byte = [0u8; 1];
                let mut iov = [IoSliceMut::new(&mut byte)];
                let mut space = nix::cmsg_space!([RawFd; 4]);
                let message = recvmsg::<()>(
                    socket,
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(io::Error::from)?;
                if message.bytes == 0 {
                    return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
                }
                let mut fds = Vec::new();
                for cmsg in message.cmsgs().map_err(io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(received) = cmsg {
                        // SAFETY: the kernel just installed these descriptors in this
                        // process for us; nothing else owns them.
                        fds.extend(
                            received
                                .into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                Ok(fds)
            });
            match attempt {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    return Err(HandoverError::Disconnected(format!(
                        "receiving descriptors: {e}"
                    )));
                }
                Ok(fds) => return Ok(fds),
            }
        }
    }
}
