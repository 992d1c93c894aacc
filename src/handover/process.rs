//! The other process of a handover session, held by a pidfd: a failed successor is stopped
//! through it, so the signal reaches that process or, once it has ended, nobody; never a
//! later process that happens to get the same pid.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::libc;
use nix::sys::signal::Signal;
use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::UnixStream;

/// A process known by a pidfd.
#[derive(Debug)]
pub struct Process {
    pid: u32,
    pidfd: OwnedFd,
}

impl Process {
    /// The process that connected `stream`: `SO_PEERPIDFD` (Linux 6.5), else a pidfd opened
    /// now for the pid `SO_PEERCRED` reports (a process that has ended since it connected
    /// leaves a gap only that wide).
    pub fn peer_of(stream: &UnixStream) -> io::Result<Process> {
        let pid = stream
            .peer_cred()?
            .pid()
            .and_then(|pid| u32::try_from(pid).ok())
            .filter(|pid| *pid != 0)
            .ok_or_else(|| io::Error::other("the peer's pid is not visible here"))?;
        let pidfd = match getsockopt(stream, sockopt::PeerPidfd) {
            Ok(pidfd) => pidfd,
            Err(_) => pidfd_open(pid)?,
        };
        Ok(Process { pid, pidfd })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Sends `signal` to this process; `ESRCH` once it has ended.
    pub fn signal(&self, signal: Signal) -> io::Result<()> {
        // SAFETY: pidfd_send_signal reads nothing from a null siginfo and takes no other
        // pointers; the descriptor is a pidfd we own.
        let sent = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                signal as libc::c_int,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if sent == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }
}

fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid).map_err(io::Error::other)?;
    // SAFETY: pidfd_open takes no pointers; a non-negative result is a new descriptor that
    // nothing else owns.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = libc::c_int::try_from(fd).map_err(io::Error::other)?;
    // SAFETY: see above.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The peer of a connection is this process here; signals go to the process the pidfd
    /// names and stop reaching anything once it has ended, whatever runs under its pid.
    #[tokio::test]
    async fn signals_reach_the_peer_and_nobody_after_it() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let peer = Process::peer_of(&ours).unwrap();
        assert_eq!(peer.pid(), std::process::id());

        let mut child = std::process::Command::new("sleep")
            .arg("60")
            .spawn()
            .unwrap();
        let process = Process {
            pid: child.id(),
            pidfd: pidfd_open(child.id()).unwrap(),
        };
        process.signal(Signal::SIGTERM).unwrap();
        let status = child.wait().unwrap();
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(Signal::SIGTERM as i32)
        );
        let gone = process.signal(Signal::SIGTERM).unwrap_err();
        assert_eq!(gone.raw_os_error(), Some(libc::ESRCH), "{gone}");
    }
}
