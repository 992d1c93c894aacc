//! Getting the control socket's listener: bound by the daemon, or passed by systemd.

use std::io;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::socket::{AddressFamily, SockType, SockaddrLike, SockaddrStorage, sockopt};
use tokio::net::UnixListener;

/// The `FileDescriptorName=` of the control socket in a `.socket` unit.
const SYSTEMD_FD_NAME: &str = "control";

/// Binds the control socket at `path` with mode 0660 (the owner and the control group).
///
/// A socket file left at `path` by an earlier instance is removed first: call this only
/// while holding the instance lock, which proves that no live instance owns the socket.
/// Anything at `path` that is not a socket is left alone and reported as an error.
///
/// Must be called inside a tokio runtime.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    let named = |e: io::Error, what: &str| {
        io::Error::new(
            e.kind(),
            format!("{what} control socket {}: {e}", path.display()),
        )
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|e| named(e, "cannot remove the stale"))?;
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "cannot bind the control socket {}: something that is not a socket is in the way",
                    path.display()
                ),
            ));
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(named(e, "cannot inspect the")),
    }
    let listener = UnixListener::bind(path).map_err(|e| named(e, "cannot bind the"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .map_err(|e| named(e, "cannot set the mode of the"))?;
    Ok(listener)
}

static TAKEN: AtomicBool = AtomicBool::new(false);

/// The control socket passed by systemd's socket activation: the fd named
/// `control` in `LISTEN_FDNAMES` (or the only fd when no names are given), if
/// `LISTEN_PID` is this process. `None` without socket activation.
///
/// Call it once, early in `main`, before the runtime starts; it leaves the environment
/// alone. The listener is already non-blocking: hand it to
/// `tokio::net::UnixListener::from_std` inside the runtime.
pub fn from_systemd() -> io::Result<Option<StdUnixListener>> {
    let fds: Vec<_> = sd_notify::listen_fds_with_names()?.collect();
    let names_given = std::env::var_os("LISTEN_FDNAMES").is_some();
    let chosen = match fds.as_slice() {
        [(fd, _)] if !names_given => Some(*fd),
        fds => fds
            .iter()
            .find(|(_, name)| name == SYSTEMD_FD_NAME)
            .map(|(fd, _)| *fd),
    };
    let Some(fd) = chosen else {
        return Ok(None);
    };
    if TAKEN.swap(true, Ordering::SeqCst) {
        return Err(io::Error::other(
            "the control socket from systemd was already taken",
        ));
    }
    // SAFETY: systemd passed this fd to this process (LISTEN_PID matched) and nothing else
    // in the process claims the LISTEN_FDS range; TAKEN makes sure it is owned only once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    check_listening_unix_stream(&owned).map_err(|reason| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {fd} passed by systemd as {SYSTEMD_FD_NAME:?} {reason}"),
        )
    })?;
    let listener = StdUnixListener::from(owned);
    listener.set_nonblocking(true)?;
    Ok(Some(listener))
}

fn check_listening_unix_stream(fd: &OwnedFd) -> Result<(), String> {
    let fd = fd.as_fd();
    let kind = nix::sys::socket::getsockopt(&fd, sockopt::SockType)
        .map_err(|e| format!("is not a socket ({e})"))?;
    let listening = nix::sys::socket::getsockopt(&fd, sockopt::AcceptConn)
        .map_err(|e| format!("cannot be inspected ({e})"))?;
    let address: SockaddrStorage =
        nix::sys::socket::getsockname(std::os::fd::AsRawFd::as_raw_fd(&fd))
            .map_err(|e| format!("cannot be inspected ({e})"))?;
    if kind != SockType::Stream || address.family() != Some(AddressFamily::Unix) || !listening {
        return Err("is not a listening unix stream socket".to_owned());
    }
    Ok(())
}
