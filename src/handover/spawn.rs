//! Starting a successor from the binary on disk (`flowcoachctl handover`, `systemctl
//! reload`), so that an upgraded package takes effect.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::{Child, Command};

use crate::config::{env, token_variable};

/// Variables that describe this process, not the child: the child must not take the
/// systemd sockets (they come over SCM_RIGHTS) or another pid's watchdog for its own.
const NOT_INHERITED: &[&str] = &["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_PID"];

/// Starts `flowcoach run --takeover` with this process's configuration file, Slack
/// environment name and process environment. Its output goes where ours goes (the
/// journal, under systemd). What the secret variables held (`secrets`, from
/// `token_variable`) goes through an inherited pipe, never in argv or the child's
/// environment.
pub fn successor(
    exe: &Path,
    config: Option<&PathBuf>,
    environment: &str,
    secrets: &[(&str, String)],
) -> std::io::Result<Child> {
    let mut command = Command::new(exe);
    if let Some(config) = config {
        command.arg("--config").arg(config);
    }
    command.arg("--env").arg(environment);
    command.arg("run").arg("--takeover").stdin(Stdio::null());
    for name in NOT_INHERITED {
        command.env_remove(name);
    }
    for name in token_variable::SECRET_VARIABLES {
        command.env_remove(name);
    }
    // Our copy of the read end is closed when this returns; the child has its own.
    let _token_pipe = match secrets {
        [] => None,
        secrets => {
            let pipe = token_variable::pipe_for_child(secrets)?;
            let fd = pipe.as_raw_fd();
            command.env(env::APP_TOKEN_FD, fd.to_string());
            // SAFETY: runs in the forked child before exec, where only async-signal-safe
            // calls are allowed: fcntl is one. It lets this one descriptor survive exec.
            unsafe {
                command.pre_exec(move || {
                    if nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) == -1 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            Some(pipe)
        }
    };
    command.spawn()
}
