//! flowcoach as a real child process against a simulator, and the waits tests build on.

use std::collections::HashMap;
use std::io::Write;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::activation::Activation;
use flowcoach_protocol::EnvelopeKind;
use flowcoach_sim::{
    CloseKind, EnvelopeRecord, EnvelopeSpec, Record, SIM_CHANNEL_ID, SimConfig, Simulator,
};

pub const APP: &str = "A0SIMAPP01";

/// Generous bound for anything a test waits on.
pub const WAIT: Duration = Duration::from_secs(20);

/// The token of the simulator's default app.
pub fn token() -> String {
    SimConfig::default().apps[0].tokens[0].clone()
}

/// The part of the token that must never be printed.
pub fn token_secret() -> String {
    token().rsplit('-').next().unwrap().to_owned()
}

/// Where a daemon's log lines go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logs {
    /// JSON lines, collected: [`Daemon::wait_log`], [`Daemon::logs`], [`Daemon::stderr`].
    Collect,
    /// Text on this process's stderr, for a person watching (the demo).
    Show,
}

/// A running flowcoach process.
pub struct Daemon {
    pub child: Child,
    logs: watch::Receiver<Vec<Value>>,
    raw: Arc<Mutex<String>>,
    _config: tempfile::NamedTempFile,
    /// Each daemon gets a runtime directory of its own (lock, control socket) unless the
    /// test passes `FLOWCOACH_RUNTIME_DIR`: separate directories stand for separate hosts.
    _runtime: Option<tempfile::TempDir>,
    pub runtime_dir: std::path::PathBuf,
}

/// Settings that make timing-dependent behaviour fast enough to test.
pub const FAST_CONFIG: &str = r#"
environment = "test"
[connection]
ping_interval = "1s"
pong_timeout = "1s"
hello_timeout = "5s"
close_timeout = "1s"
backoff_initial = "200ms"
backoff_max = "2s"
too_many_websockets_backoff = "500ms"
max_message_bytes = 65536
"#;

/// [`FAST_CONFIG`] with these `[connection]` settings (TOML values) in place of its own.
pub fn fast_config_with(connection: &[(&str, &str)]) -> String {
    let overridden = |line: &str| {
        connection
            .iter()
            .any(|(key, _)| line.starts_with(&format!("{key} =")))
    };
    let mut config = String::new();
    for line in FAST_CONFIG.lines().filter(|line| !overridden(line)) {
        config.push_str(line);
        config.push('\n');
        if line == "[connection]" {
            for (key, value) in connection {
                config.push_str(&format!("{key} = {value}\n"));
            }
        }
    }
    config
}

impl Daemon {
    /// Starts flowcoach against `sim` with [`FAST_CONFIG`] plus `extra` TOML.
    pub fn start(sim: &Simulator, extra: &str) -> Daemon {
        Self::start_with(sim, &format!("{FAST_CONFIG}\n{extra}"), &[])
    }

    /// [`Daemon::start`] with nothing extra, then waits until it is [`connected`].
    pub async fn start_connected(sim: &Simulator) -> Daemon {
        let daemon = Self::start(sim, "");
        connected(sim).await;
        daemon
    }

    pub fn start_with(sim: &Simulator, config_text: &str, env: &[(&str, &str)]) -> Daemon {
        Self::start_args(sim, config_text, env, &[])
    }

    /// [`Daemon::start_with`] with extra command-line arguments, e.g. `&["--takeover"]`.
    pub fn start_args(
        sim: &Simulator,
        config_text: &str,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Daemon {
        Self::launch(sim, config_text, env, args, Logs::Collect)
    }

    /// Starts `flowcoach --config <config_text> ARGS` against `sim`, with nothing of this
    /// process's environment but `env` (the token goes through the environment, never argv,
    /// as in production), in a runtime directory of its own unless `env` names one.
    pub fn launch(
        sim: &Simulator,
        config_text: &str,
        env: &[(&str, &str)],
        args: &[&str],
        logs: Logs,
    ) -> Daemon {
        Self::launch_activated(sim, config_text, env, args, logs, None)
    }

    /// [`Daemon::launch`], socket-activated with `activation`'s sockets when given.
    pub fn launch_activated(
        sim: &Simulator,
        config_text: &str,
        env: &[(&str, &str)],
        args: &[&str],
        logs: Logs,
        activation: Option<Activation>,
    ) -> Daemon {
        let mut config = tempfile::NamedTempFile::new().unwrap();
        config.write_all(config_text.as_bytes()).unwrap();
        let mut command = match &activation {
            Some(_) => Activation::command(crate::binaries::flowcoach()),
            None => Command::new(crate::binaries::flowcoach()),
        };
        command
            .arg("--config")
            .arg(config.path())
            .args(args)
            .env_clear()
            .env("SLACK_APP_TOKEN", token())
            .env("FLOWCOACH_SLACK_API_URL", sim.api_url())
            .env("FLOWCOACH_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true);
        match logs {
            Logs::Collect => command
                .env("FLOWCOACH_LOG_FORMAT", "json")
                .stderr(Stdio::piped()),
            Logs::Show => command.stderr(Stdio::inherit()),
        };
        let runtime = if env.iter().any(|(key, _)| *key == "FLOWCOACH_RUNTIME_DIR") {
            None
        } else {
            Some(tempfile::tempdir().unwrap())
        };
        if let Some(dir) = &runtime {
            command.env("FLOWCOACH_RUNTIME_DIR", dir.path());
        }
        let runtime_dir = match &runtime {
            Some(dir) => dir.path().to_owned(),
            None => env
                .iter()
                .find(|(key, _)| *key == "FLOWCOACH_RUNTIME_DIR")
                .map(|(_, dir)| dir.into())
                .unwrap(),
        };
        // The inbox lives beside the runtime files unless the test places it: daemons
        // sharing a runtime directory (one host) share it, as a successor does.
        command.env("STATE_DIRECTORY", runtime_dir.join("state"));
        for (key, value) in env {
            command.env(key, value);
        }
        if let Some(activation) = activation {
            activation.pass(&mut command);
        }
        let mut child = command.spawn().expect("spawn flowcoach");
        let (tx, logs) = watch::channel(Vec::new());
        let raw = Arc::new(Mutex::new(String::new()));
        // Shown logs go straight to our stderr: nothing to collect.
        if let Some(stderr) = child.stderr.take() {
            tokio::spawn(collect_logs(stderr, tx, raw.clone()));
        }
        Daemon {
            child,
            logs,
            raw,
            _config: config,
            _runtime: runtime,
            runtime_dir,
        }
    }

    /// The configuration file the daemon was started with (tests rewrite it for SIGHUP).
    pub fn config_path(&self) -> &std::path::Path {
        self._config.path()
    }

    pub fn pid(&self) -> i32 {
        self.child.id().expect("running") as i32
    }

    /// Everything the process wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.raw.lock().unwrap().clone()
    }

    pub fn logs(&self) -> Vec<Value> {
        self.logs.borrow().clone()
    }

    /// Waits for a log line whose message starts with `message` (and matching `pred`).
    pub async fn wait_log(&mut self, message: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let found = tokio::time::timeout(
            WAIT,
            self.logs
                .wait_for(|logs| logs.iter().any(|l| starts_with(l, message) && pred(l))),
        )
        .await
        .ok()
        .and_then(Result::ok)
        .and_then(|logs| {
            logs.iter()
                .find(|l| starts_with(l, message) && pred(l))
                .cloned()
        });
        match found {
            Some(line) => line,
            None => panic!(
                "no log line {message:?} within {WAIT:?}; stderr so far:\n{}",
                self.stderr()
            ),
        }
    }

    /// Waits until `count` log lines start with `message`.
    pub async fn wait_log_count(&mut self, message: &str, count: usize) {
        let found = tokio::time::timeout(
            WAIT,
            self.logs
                .wait_for(|logs| logs.iter().filter(|l| starts_with(l, message)).count() >= count),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if !found {
            panic!(
                "fewer than {count} log lines {message:?} within {WAIT:?}; stderr so far:\n{}",
                self.stderr()
            );
        }
    }

    /// Counts log lines with this message, per value of `field`.
    pub fn count_by(&self, message: &str, field: &str) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for line in self.logs() {
            if starts_with(&line, message) {
                let key = line[field].as_str().unwrap_or_default().to_owned();
                *counts.entry(key).or_insert(0) += 1;
            }
        }
        counts
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// SIGTERM, as systemd stops a service: flowcoach must exit 0.
    pub async fn stop(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let code = self.exit_code().await;
        assert_eq!(
            code,
            0,
            "exit code after SIGTERM; stderr:\n{}",
            self.stderr()
        );
    }

    /// Waits for the process to exit; returns its exit code.
    pub async fn exit_code(&mut self) -> i32 {
        let status = tokio::time::timeout(WAIT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("flowcoach did not exit; stderr:\n{}", self.stderr()))
            .unwrap();
        // Let the log reader catch the last lines.
        let _ = tokio::time::timeout(Duration::from_secs(2), self.logs.wait_for(|_| false)).await;
        status.code().unwrap_or(-1)
    }

    /// `flowcoachctl status --json` for this daemon: its status report.
    pub async fn status_json(&self) -> Value {
        let dir = self.runtime_dir.display().to_string();
        let output = crate::ctl::run(
            &["status", "--json"],
            &[("FLOWCOACH_RUNTIME_DIR", dir.as_str())],
        )
        .await;
        assert!(output.status.success(), "{output:?}");
        serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|e| panic!("status --json is not JSON ({e}): {output:?}"))
    }

    /// The token must never appear in what flowcoach prints.
    pub fn assert_token_never_printed(&self) {
        let stderr = self.stderr();
        assert!(
            !stderr.contains(&token_secret()),
            "the token leaked into the logs:\n{stderr}"
        );
    }
}

/// Reads the daemon's JSON log lines until its stderr closes (it and every successor that
/// inherited it have exited).
async fn collect_logs(
    stderr: tokio::process::ChildStderr,
    parsed: watch::Sender<Vec<Value>>,
    raw: Arc<Mutex<String>>,
) {
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        {
            let mut raw = raw.lock().unwrap();
            raw.push_str(&line);
            raw.push('\n');
        }
        let value = serde_json::from_str(&line)
            .unwrap_or_else(|_| serde_json::json!({ "message": line, "unparsed": true }));
        parsed.send_modify(|logs| logs.push(value));
    }
}

fn starts_with(line: &Value, message: &str) -> bool {
    line["message"]
        .as_str()
        .is_some_and(|m| m.starts_with(message))
}

/// A simulator with the default app and `adjust` applied to its configuration.
pub async fn simulator(adjust: impl FnOnce(&mut SimConfig)) -> Simulator {
    let mut config = SimConfig::default();
    adjust(&mut config);
    Simulator::start(config).await.expect("start simulator")
}

/// Waits until flowcoach has said hello on a socket that is still open.
pub async fn connected(sim: &Simulator) -> Record {
    sim.wait_until(WAIT, |r| r.hellos() >= 1 && r.open_sockets(APP) >= 1)
        .await
        .expect("flowcoach connects")
}

/// Waits until flowcoach has got a hello on `hellos` sockets in all (open or closed since):
/// after `hellos - 1` lost connections, it has reconnected.
pub async fn wait_hellos(sim: &Simulator, hellos: usize) -> Record {
    sim.wait_until(WAIT, |r| r.hellos() >= hellos)
        .await
        .unwrap_or_else(|e| panic!("fewer than {hellos} hellos: {e:?}"))
}

/// Waits until the first socket has closed; it must have closed with a close handshake.
pub async fn first_socket_closed_cleanly(sim: &Simulator) -> Record {
    let record = sim
        .wait_until(WAIT, |r| r.sockets[0].close.is_some())
        .await
        .expect("socket closed");
    assert_eq!(
        record.sockets[0].close,
        Some(CloseKind::ClientCloseHandshake)
    );
    assert_eq!(
        record.sockets[0].client_close_code,
        Some(1000),
        "the Close frame says Normal"
    );
    record
}

/// A `message` event saying `text` in the simulator's channel.
pub fn event(event_id: &str, text: &str) -> EnvelopeSpec {
    EnvelopeSpec::message(event_id, SIM_CHANNEL_ID, text)
}

/// `/flowcoach <text>`.
pub fn slash(text: &str) -> EnvelopeSpec {
    EnvelopeSpec::slash_command("/flowcoach", text)
}

/// Injects `spec` for [`APP`] and waits until flowcoach acks it; returns what became of it.
pub async fn acked(sim: &Simulator, spec: EnvelopeSpec) -> EnvelopeRecord {
    let what = format!("{spec:?}");
    sim.inject_and_wait_ack(APP, spec, WAIT)
        .await
        .unwrap_or_else(|e| panic!("{what} not acked: {e:?}"))
}

/// Waits until every envelope is acked or given up; then checks that each was acked within
/// the ack deadline of its first delivery (an event acked later waited for a redelivery; a
/// slash command or an interaction acked later, or never, failed for its user).
pub async fn all_acked_in_time(sim: &Simulator) -> Record {
    let record = sim
        .wait_until(WAIT, |r| {
            r.envelopes
                .iter()
                .all(|e| e.acked_at.is_some() || e.gave_up)
        })
        .await
        .unwrap_or_else(|e| panic!("envelopes neither acked nor given up: {e}"));
    let deadline = sim.config().ack_deadline;
    let late: Vec<(EnvelopeKind, usize, bool)> = record
        .envelopes
        .iter()
        .filter(|e| e.ack_delay().is_none_or(|delay| delay > deadline))
        .map(|e| (e.kind, e.deliveries.len(), e.gave_up))
        .collect();
    assert!(
        late.is_empty(),
        "{} of {} envelopes acked past the deadline or never (kind, deliveries, given up): {late:?}",
        late.len(),
        record.envelopes.len()
    );
    record
}
