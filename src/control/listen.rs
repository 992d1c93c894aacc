//! Getting the control socket's listener: bound by the daemon, or passed by systemd.

use std::io;
use std::net::TcpListener as StdTcpListener;
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::sys::socket::{AddressFamily, SockType, SockaddrLike, SockaddrStorage, sockopt};
use tokio::net::UnixListener;

/// The `FileDescriptorName=` of the control socket in a `.socket` unit.
const SYSTEMD_FD_NAME: &str = "control";
/// The `FileDescriptorName=` of the metrics endpoint's socket.
const SYSTEMD_METRICS_FD_NAME: &str = "metrics";

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

/// The listeners systemd's socket activation passed.
#[derive(Debug, Default)]
pub struct Passed {
    /// The control socket: the fd named `control` (or the only fd when none is named).
    pub control: Option<StdUnixListener>,
    /// The metrics endpoint: the fd named `metrics` (`flowcoach-metrics.socket`).
    pub metrics: Option<StdTcpListener>,
}

/// The sockets passed by systemd's socket activation, if `LISTEN_PID` is this process:
/// the fd named `control` in `LISTEN_FDNAMES` (or the only fd when no names are given)
/// and the fd named `metrics`. Both `None` without socket activation.
///
/// Call it once, early in `main`, before the runtime starts; it leaves the environment
/// alone. The control listener is already non-blocking: hand it to tokio inside the
/// runtime; the metrics server makes its own so.
pub fn from_systemd() -> io::Result<Passed> {
    let fds: Vec<_> = sd_notify::listen_fds_with_names()?.collect();
    let names_given = std::env::var_os("LISTEN_FDNAMES").is_some();
    let named = |wanted: &str| {
        fds.iter()
            .find(|(_, name)| name == wanted)
            .map(|(fd, _)| *fd)
    };
    let control = match fds.as_slice() {
        [(fd, _)] if !names_given => Some(*fd),
        _ => named(SYSTEMD_FD_NAME),
    };
    let metrics = named(SYSTEMD_METRICS_FD_NAME);
    if (control.is_some() || metrics.is_some()) && TAKEN.swap(true, Ordering::SeqCst) {
        return Err(io::Error::other(
            "the sockets from systemd were already taken",
        ));
    }
    let control = control
        .map(|fd| take(fd, SYSTEMD_FD_NAME, AddressFamily::Unix))
        .transpose()?
        .map(StdUnixListener::from);
    let metrics = metrics
        .map(|fd| take(fd, SYSTEMD_METRICS_FD_NAME, AddressFamily::Inet))
        .transpose()?
        .map(StdTcpListener::from);
    if let Some(control) = &control {
        control.set_nonblocking(true)?;
    }
    Ok(Passed { control, metrics })
}

/// Owns `fd` once it proved to be a listening stream socket of `family` (for TCP, IPv4
/// or IPv6).
fn take(fd: RawFd, name: &str, family: AddressFamily) -> io::Result<OwnedFd> {
    // SAFETY: systemd passed this fd to this process (LISTEN_PID matched) and nothing else
    // in the process claims the LISTEN_FDS range; TAKEN makes sure it is owned only once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    check_listening_stream(&owned, family).map_err(|reason| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("fd {fd} passed by systemd as {name:?} {reason}"),
        )
    })?;
    Ok(owned)
}

fn check_listening_stream(fd: &OwnedFd, family: AddressFamily) -> Result<(), String> {
    let fd = fd.as_fd();
    let kind = nix::sys::socket::getsockopt(&fd, sockopt::SockType)
        .map_err(|e| format!("is not a socket ({e})"))?;
    let listening = nix::sys::socket::getsockopt(&fd, sockopt::AcceptConn)
        .map_err(|e| format!("cannot be inspected ({e})"))?;
    let address: SockaddrStorage =
        nix::sys::socket::getsockname(std::os::fd::AsRawFd::as_raw_fd(&fd))
            .map_err(|e| format!("cannot be inspected ({e})"))?;
    let family_matches = match family {
        AddressFamily::Inet => matches!(
            address.family(),
            Some(AddressFamily::Inet | AddressFamily::Inet6)
        ),
        family => address.family() == Some(family),
    };
    if kind != SockType::Stream || !family_matches || !listening {
        return Err(match family {
            AddressFamily::Unix => "is not a listening unix stream socket",
            _ => "is not a listening TCP socket",
        }
        .to_owned());
    }
    Ok(())
}
