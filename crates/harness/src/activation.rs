//! Starting a process as systemd's socket activation starts a service: the sockets at fds
//! 3, 4, … with their names in `LISTEN_FDNAMES`, `LISTEN_FDS`, and `LISTEN_PID` set to the
//! child's own pid (through `sh`, which knows it before it execs the program).

use std::ffi::OsStr;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use tokio::process::Command;

/// Sockets to pass, each with its `FileDescriptorName=`.
pub struct Activation {
    fds: Vec<(OwnedFd, String)>,
}

impl Activation {
    /// Copies of `sockets`, above the fds the child will use, so that moving them to 3, 4,
    /// … in the child cannot clobber one with another.
    pub fn new(sockets: &[(&dyn AsFd, &str)]) -> Activation {
        let fds = sockets
            .iter()
            .map(|(socket, name)| {
                let raw =
                    nix::fcntl::fcntl(socket, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(100)).unwrap();
                // SAFETY: fcntl just created this fd, nothing else owns it.
                (unsafe { OwnedFd::from_raw_fd(raw) }, (*name).to_owned())
            })
            .collect();
        Activation { fds }
    }

    /// A command running `program` with `LISTEN_PID` set to its pid; add its arguments,
    /// then [`Activation::pass`] the sockets.
    pub fn command(program: impl AsRef<OsStr>) -> Command {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(r#"LISTEN_PID=$$; export LISTEN_PID; exec "$0" "$@""#)
            .arg(program.as_ref());
        command
    }

    /// Passes the sockets to `command`'s child: call it after anything that clears the
    /// environment. The copies stay open in this process until `command` is dropped.
    pub fn pass(self, command: &mut Command) {
        let names: Vec<&str> = self.fds.iter().map(|(_, name)| name.as_str()).collect();
        command
            .env("LISTEN_FDS", self.fds.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
        let raws: Vec<i32> = self.fds.iter().map(|(fd, _)| fd.as_raw_fd()).collect();
        // SAFETY: dup2 is async-signal-safe; `raws` is moved into the closure, and the fds
        // stay open in the parent (owned by the closure, which the command keeps) until the
        // command is dropped, after spawn.
        unsafe {
            let fds = self.fds;
            command.pre_exec(move || {
                let _keep = &fds;
                for (to, from) in (3..).zip(&raws) {
                    if nix::libc::dup2(*from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
}
