//! `flowcoachctl` as a real process, the way an operator runs it.

use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::process::Command;

use crate::WAIT;

/// `flowcoachctl ARGS` with nothing of this process's environment but `env`, its output
/// collected: spawn it, or hand it to [`run`].
pub fn command(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(crate::binaries::flowcoachctl());
    command
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Runs [`command`] to its end, asynchronously (a simulator may run on the caller's
/// runtime); panics when it takes longer than any flowcoachctl call should.
pub async fn run(args: &[&str], env: &[(&str, &str)]) -> Output {
    let bound = WAIT + Duration::from_secs(10);
    tokio::time::timeout(bound, command(args, env).output())
        .await
        .unwrap_or_else(|_| panic!("flowcoachctl {args:?} did not finish within {bound:?}"))
        .expect("run flowcoachctl")
}
