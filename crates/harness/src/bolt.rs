//! The example Bolt apps (`examples/bolt-python`, `examples/bolt-js`) as real child
//! processes, one way for both languages: whether their packages are installed, start one on
//! a port and wait until it listens, stop it. The Python one also runs in Socket Mode with
//! Bolt's own handler (`socket_mode.py`), what the comparison benchmark sets flowcoach against.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::WAIT;

/// Set to `1` (as CI does), a Bolt test whose packages are missing fails instead of
/// skipping ([`crate::gate`]).
pub const MANDATORY_VARIABLE: &str = "FLOWCOACH_BOLT";

/// The line an example app prints on stdout once it listens, followed by its URL.
const READY_LINE: &str = "listening on ";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bolt {
    Python,
    JavaScript,
}

impl Bolt {
    /// The example's directory in the workspace.
    pub fn dir(self) -> PathBuf {
        let name = match self {
            Bolt::Python => "bolt-python",
            Bolt::JavaScript => "bolt-js",
        };
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples")
            .join(name)
    }

    /// The interpreter running `script` in the example's directory.
    fn command(self, script: &str) -> Command {
        let program = match self {
            Bolt::Python => "python3",
            Bolt::JavaScript => "node",
        };
        let mut command = Command::new(program);
        command.arg(script).current_dir(self.dir());
        command
    }

    /// The example app in HTTP mode.
    fn http_mode_script(self) -> &'static str {
        match self {
            Bolt::Python => "app.py",
            Bolt::JavaScript => "app.js",
        }
    }

    /// The interpreter, its flag to run code, and that code loading the Bolt package.
    fn probe(self) -> (&'static str, &'static str, &'static str) {
        match self {
            Bolt::Python => ("python3", "-c", "import slack_bolt"),
            Bolt::JavaScript => ("node", "-e", "require('@slack/bolt')"),
        }
    }

    fn install_hint(self) -> &'static str {
        match self {
            Bolt::Python => "python3 -m pip install -r examples/bolt-python/requirements.txt",
            Bolt::JavaScript => "(cd examples/bolt-js && npm ci)",
        }
    }

    /// Why the example cannot run here (interpreter or Bolt package missing), if it cannot:
    /// the interpreter loading Bolt from the example's directory, as the example does.
    pub fn missing(self) -> Option<String> {
        let (program, flag, code) = self.probe();
        let outcome = std::process::Command::new(program)
            .args([flag, code])
            .current_dir(self.dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let why = match outcome {
            Ok(status) if status.success() => return None,
            Ok(status) => format!("`{program} {flag} \"{code}\"` failed ({status})"),
            Err(e) => format!("{program} cannot be run ({e})"),
        };
        Some(format!(
            "the {self:?} Bolt example cannot run: {why}; install it with `{}`",
            self.install_hint()
        ))
    }

    /// Whether a test of this app should run: see [`crate::gate::runnable`].
    pub fn runnable(self, test: &str) -> bool {
        crate::gate::runnable(test, self.missing(), MANDATORY_VARIABLE)
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct Progress {
    /// The port it says it listens on.
    listening: Option<u16>,
    /// Its stdout closed: it exited (or closed it, which the examples never do).
    ended: bool,
}

/// A running example app.
pub struct BoltApp {
    bolt: Bolt,
    child: Child,
    port: u16,
    output: Arc<Mutex<String>>,
}

impl BoltApp {
    /// Starts `bolt`'s example on `127.0.0.1:port` (0: a free port it picks, so no other
    /// test can take it first) with `env` (signing secret, bot token, Web API base: the
    /// environment, never argv) and waits until it says it listens.
    pub async fn start(bolt: Bolt, port: u16, env: &[(&str, &str)]) -> BoltApp {
        let mut command = bolt.command(bolt.http_mode_script());
        command
            .env("HOST", "127.0.0.1")
            .env("PORT", port.to_string());
        let (child, output, mut progress_seen) = spawn(bolt, command, env);
        let outcome = tokio::time::timeout(
            WAIT,
            progress_seen.wait_for(|p| p.listening.is_some() || p.ended),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .and_then(|p| p.listening);
        let Some(port) = outcome else {
            panic!(
                "the {bolt:?} Bolt app did not start listening within {WAIT:?}; its output:\n{}",
                output.lock().unwrap()
            );
        };
        BoltApp {
            bolt,
            child,
            port,
            output,
        }
    }

    /// Where flowcoach forwards to: Bolt's default path.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/slack/events", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Everything it wrote so far, stdout and stderr interleaved by line.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// SIGTERM, and waits until it has exited.
    pub async fn stop(&mut self) {
        stop(self.bolt, &mut self.child, &self.output).await;
    }
}

/// The Python example app run in Socket Mode by Bolt's `SocketModeHandler`
/// (`socket_mode.py`): its own connection to Slack, no flowcoach.
pub struct SocketModeBoltApp {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl SocketModeBoltApp {
    /// Starts it with `env` (the app-level token, signing secret, bot token, Web API base:
    /// the environment, never argv). It prints nothing once connected: the caller waits for
    /// its connection where it arrives.
    pub fn start(env: &[(&str, &str)]) -> SocketModeBoltApp {
        let bolt = Bolt::Python;
        let (child, output, _) = spawn(bolt, bolt.command("socket_mode.py"), env);
        SocketModeBoltApp { child, output }
    }

    /// Everything it wrote so far, stdout and stderr interleaved by line.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// SIGTERM, and waits until it has exited.
    pub async fn stop(&mut self) {
        stop(Bolt::Python, &mut self.child, &self.output).await;
    }
}

/// Spawns `command` with `env`, its output collected; the receiver sees its progress.
fn spawn(
    bolt: Bolt,
    mut command: Command,
    env: &[(&str, &str)],
) -> (Child, Arc<Mutex<String>>, watch::Receiver<Progress>) {
    command
        .env("PYTHONUNBUFFERED", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("spawn the {bolt:?} Bolt app: {e}"));
    let output = Arc::new(Mutex::new(String::new()));
    let (progress, progress_seen) = watch::channel(Progress::default());
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    tokio::spawn(collect(stdout, output.clone(), Some(progress)));
    tokio::spawn(collect(stderr, output.clone(), None));
    (child, output, progress_seen)
}

/// SIGTERM to `child`, and waits until it has exited.
async fn stop(bolt: Bolt, child: &mut Child, output: &Mutex<String>) {
    if let Some(pid) = child.id() {
        crate::process::signal(pid, nix::sys::signal::Signal::SIGTERM);
    }
    if tokio::time::timeout(WAIT, child.wait()).await.is_err() {
        panic!(
            "the {bolt:?} Bolt app did not exit on SIGTERM; its output:\n{}",
            output.lock().unwrap()
        );
    }
}

async fn collect(
    stream: impl AsyncRead + Unpin,
    output: Arc<Mutex<String>>,
    progress: Option<watch::Sender<Progress>>,
) {
    let mut lines = BufReader::new(stream).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        {
            let mut output = output.lock().unwrap();
            output.push_str(&line);
            output.push('\n');
        }
        if let Some(progress) = &progress
            && let Some(port) = listening_port(&line)
        {
            progress.send_modify(|p| p.listening = Some(port));
        }
    }
    if let Some(progress) = progress {
        progress.send_modify(|p| p.ended = true);
    }
}

/// The port in a `listening on http://HOST:PORT/slack/events` line.
fn listening_port(line: &str) -> Option<u16> {
    let url = line.strip_prefix(READY_LINE)?.strip_prefix("http://")?;
    let authority = url.split('/').next()?;
    authority.rsplit_once(':')?.1.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::listening_port;

    #[test]
    fn the_port_comes_from_the_ready_line() {
        assert_eq!(
            listening_port("listening on http://127.0.0.1:40123/slack/events"),
            Some(40123)
        );
        assert_eq!(
            listening_port("listening on http://127.0.0.1/slack/events"),
            None
        );
        assert_eq!(
            listening_port("127.0.0.1 - - \"POST /slack/events\" 200"),
            None
        );
    }
}
