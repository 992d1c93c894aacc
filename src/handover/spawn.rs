//! Starting a successor from the binary on disk (`flowcoachctl handover`, `systemctl
//! reload`), so that an upgraded package takes effect.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::{Child, Command};

/// Variables that describe this process, not the child: the child must not take the
/// systemd sockets (they come over SCM_RIGHTS) or another pid's watchdog for its own.
const NOT_INHERITED: &[&str] = &["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES", "WATCHDOG_PID"];

/// Starts `flowcoach run --takeover` with this process's configuration file, Slack
/// environment name and process environment (the token stays in the process environment,
/// never in argv). Its output goes where ours goes (the journal, under systemd).
pub fn successor(
    exe: &Path,
    config: Option<&PathBuf>,
    environment: &str,
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
    command.spawn()
}
