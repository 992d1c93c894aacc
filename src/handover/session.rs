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

use super::process::Process;
use super::{HandoverError, Step};
use crate::control::protocol::MAX_MESSAGE_BYTES;

/// Longest line either side sends or accepts, newline included: as on the control socket.
pub const MAX_LINE_BYTES: usize = MAX_MESSAGE_BYTES;

/// One end of a handover session.
pub struct Session {
    stream: UnixStream,
    /// Bytes read past the last line, never more than [`MAX_LINE_BYTES`]. Lockstep means
    /// there never are any when fds are due; `receive_fds` checks it.
    pending: Vec<u8>,
    /// How much of `pending` is known to hold no newline: each byte is scanned once.
    scanned: usize,
}

impl Session {
    pub fn new(stream: UnixStream) -> Self {
        Session {
            stream,
            pending: Vec::new(),
            scanned: 0,
        }
    }

    /// The process at the other end, as it connected; `None` when it cannot be known.
    pub fn peer(&self) -> Option<Process> {
        match Process::peer_of(&self.stream) {
            Ok(process) => Some(process),
            Err(error) => {
                tracing::warn!(%error, "cannot identify the other process of a handover session");
                None
            }
        }
    }

    /// Writes one message as a JSON line of at most [`MAX_LINE_BYTES`].
    pub async fn send<T: Serialize>(&mut self, message: &T) -> Result<(), HandoverError> {
        let mut line = serde_json::to_vec(message).map_err(HandoverError::Encode)?;
        line.push(b'\n');
        if line.len() > MAX_LINE_BYTES {
            return Err(HandoverError::TooLong {
                limit: MAX_LINE_BYTES,
            });
        }
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

    /// The next line, newline included. A line longer than [`MAX_LINE_BYTES`] is an error
    /// as soon as that many bytes came without a newline.
    async fn read_line(&mut self) -> Result<Vec<u8>, HandoverError> {
        loop {
            if let Some(offset) = self.pending[self.scanned..]
                .iter()
                .position(|b| *b == b'\n')
            {
                let rest = self.pending.split_off(self.scanned + offset + 1);
                self.scanned = 0;
                return Ok(std::mem::replace(&mut self.pending, rest));
            }
            self.scanned = self.pending.len();
            let room = MAX_LINE_BYTES - self.pending.len();
            if room == 0 {
                return Err(HandoverError::TooLong {
                    limit: MAX_LINE_BYTES,
                });
            }
            let mut chunk = [0u8; 16 * 1024];
            let read = self
                .stream
                .read(&mut chunk[..room.min(16 * 1024)])
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
            return Err(HandoverError::DataBeforeDescriptors);
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

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    /// A line that passes the limit without a newline is refused once the limit is reached,
    /// not read to its end.
    #[tokio::test]
    async fn a_line_longer_than_64_kib_is_refused() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut session = Session::new(ours);
        let flood = tokio::spawn(async move {
            let chunk = vec![b'x'; 64 * 1024];
            let mut written = 0usize;
            while written < 32 << 20 {
                match theirs.write(&chunk).await {
                    Ok(n) => written += n,
                    Err(_) => break,
                }
            }
            written
        });
        let error = session.step(WAIT, "waiting for a step").await.unwrap_err();
        assert!(
            matches!(error, HandoverError::TooLong { limit } if limit == MAX_LINE_BYTES),
            "{error}"
        );
        drop(session);
        let written = tokio::time::timeout(WAIT, flood).await.unwrap().unwrap();
        assert!(written < 32 << 20, "read all {written} bytes");
    }

    /// Several lines arriving in one read come out one by one, in order.
    #[tokio::test]
    async fn lines_read_together_come_out_one_by_one() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        theirs
            .write_all(b"{\"step\":\"send_fds\"}\n{\"step\":\"adopted\"}\n")
            .await
            .unwrap();
        let mut session = Session::new(ours);
        assert_eq!(session.step(WAIT, "first").await.unwrap(), Step::SendFds);
        assert_eq!(session.step(WAIT, "second").await.unwrap(), Step::Adopted);
    }
}
