//! Starting flowcoach as a child process pointed at a simulator.

use std::process::Stdio;

use tokio::process::{Child, Command};

use crate::config::env;
use crate::sim::Simulator;

/// How the child's log output is handled.
pub enum Logs {
    /// Shown on our stderr, human-readable (the demo).
    Inherit,
    /// Discarded (the benchmark measures the daemon, not its log volume).
    Discard,
}

/// Spawns `flowcoach run` against `sim`. The token goes through the environment, never
/// argv, as in production.
pub fn spawn(sim: &Simulator, token: &str, level: &str, logs: Logs) -> std::io::Result<Child> {
    let exe = std::env::current_exe()?;
    let mut command = Command::new(exe);
    command
        .arg("run")
        .env(env::APP_TOKEN, token)
        .env(env::API_URL, sim.api_url())
        .env(env::LOG, level)
        .env_remove(env::CONFIG)
        .stdin(Stdio::null())
        .kill_on_drop(true);
    match logs {
        Logs::Inherit => command.stderr(Stdio::inherit()),
        Logs::Discard => command.stderr(Stdio::null()),
    };
    command.spawn()
}

/// Asks the child to stop as systemd would, with SIGTERM.
pub fn terminate(child: &Child) {
    if let Some(pid) = child.id() {
        let pid = nix::unistd::Pid::from_raw(pid as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    }
}
