//! systemd notifications against a real `NOTIFY_SOCKET`: a datagram socket in a temporary
//! directory (or the abstract namespace) that records everything sent to it.
//!
//! The first tests drive `flowcoach::host::systemd` in process, each with its own socket
//! (`Systemd::with_socket`), so nothing touches the process-global environment. The last
//! ones run the real daemon with `NOTIFY_SOCKET` and `WATCHDOG_USEC` set.

use std::ffi::OsString;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use flowcoach::host::systemd::{Systemd, extend_while, spawn_status_reporter, spawn_watchdog};
use flowcoach::state::{InstanceInfo, InstanceState, Phase};

use flowcoach_harness::{APP, Daemon, FAST_CONFIG, WAIT, connected, simulator, token};
use flowcoach_sim::Simulator;

/// One datagram: the lines of one notification, and when it arrived.
#[derive(Debug, Clone)]
struct Datagram {
    at: Instant,
    lines: Vec<String>,
}

/// A stand-in for systemd's notification socket. A thread of its own receives, so that a
/// test's runtime can never hold up the senders.
struct Recorder {
    /// The value for `NOTIFY_SOCKET`.
    address: OsString,
    datagrams: watch::Receiver<Vec<Datagram>>,
    _dir: Option<tempfile::TempDir>,
}

impl Recorder {
    fn bind() -> Recorder {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = UnixDatagram::bind(&path).unwrap();
        Recorder::record(socket, path.into_os_string(), Some(dir))
    }

    fn bind_abstract() -> Recorder {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "flowcoach-test-notify-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        Recorder::record(socket, format!("@{name}").into(), None)
    }

    fn record(socket: UnixDatagram, address: OsString, dir: Option<tempfile::TempDir>) -> Self {
        socket
            .set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let (tx, datagrams) = watch::channel(Vec::new());
        std::thread::spawn(move || {
            let mut buf = vec![0; 64 * 1024];
            // Ends when the recorder is dropped.
            while !tx.is_closed() {
                match socket.recv(&mut buf) {
                    Ok(n) => {
                        let datagram = Datagram {
                            at: Instant::now(),
                            lines: String::from_utf8_lossy(&buf[..n])
                                .lines()
                                .map(str::to_owned)
                                .collect(),
                        };
                        tx.send_modify(|all| all.push(datagram));
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(e) => panic!("recording notifications: {e}"),
                }
            }
        });
        Recorder {
            address,
            datagrams,
            _dir: dir,
        }
    }

    fn systemd(&self) -> Systemd {
        Systemd::with_socket(&self.address)
    }

    fn datagrams(&self) -> Vec<Datagram> {
        self.datagrams.borrow().clone()
    }

    /// Every line received so far, in order.
    fn lines(&self) -> Vec<String> {
        self.datagrams().into_iter().flat_map(|d| d.lines).collect()
    }

    fn count(&self, line: &str) -> usize {
        self.lines().iter().filter(|l| *l == line).count()
    }

    /// Waits until `line` has been received `n` times; returns every datagram so far.
    async fn wait_count(&mut self, line: &str, n: usize) -> Vec<Datagram> {
        let seen = |all: &Vec<Datagram>| {
            all.iter()
                .flat_map(|d| &d.lines)
                .filter(|l| *l == line)
                .count()
                >= n
        };
        let found = tokio::time::timeout(WAIT, self.datagrams.wait_for(seen))
            .await
            .ok()
            .and_then(Result::ok)
            .map(|all| all.clone());
        found.unwrap_or_else(|| {
            panic!(
                "{line:?} not received {n} times within {WAIT:?}; received: {:#?}",
                self.lines()
            )
        })
    }

    async fn wait_line(&mut self, line: &str) -> Vec<Datagram> {
        self.wait_count(line, 1).await
    }
}

fn new_state() -> Arc<InstanceState> {
    Arc::new(InstanceState::new(InstanceInfo::current("test")))
}

/// Puts `state` in an outage since `down_since`: the socket lost to `cause`, reconnecting
/// after `delay`.
fn outage(state: &InstanceState, cause: &str, delay: Duration, down_since: SystemTime) {
    state.update(|s| {
        s.phase = Phase::Reconnecting {
            delay,
            cause: cause.into(),
        };
        s.sockets_open = 0;
        s.last_disconnect = Some(cause.into());
        s.down_since = Some(down_since);
    });
}

fn position(lines: &[String], line: &str) -> usize {
    lines
        .iter()
        .position(|l| l == line)
        .unwrap_or_else(|| panic!("no {line:?} in {lines:#?}"))
}

async fn finish(task: tokio::task::JoinHandle<()>) {
    tokio::time::timeout(WAIT, task)
        .await
        .expect("task ends when stopped")
        .expect("task did not panic");
}

#[tokio::test]
async fn ready_once_after_the_first_hello_and_a_status_for_every_change() {
    let mut recorder = Recorder::bind();
    let state = new_state();
    let stop = CancellationToken::new();
    let reporter = spawn_status_reporter(recorder.systemd(), state.clone(), stop.clone());

    recorder.wait_line("STATUS=starting").await;
    state.set_phase(Phase::Connecting);
    recorder.wait_line("STATUS=connecting").await;
    assert_eq!(recorder.count("READY=1"), 0, "not ready before a hello");

    state.update(|s| {
        s.phase = Phase::Connected;
        s.app_id = Some(APP.to_owned());
        s.sockets_open = 1;
        s.num_connections = Some(1);
        s.connected_since = Some(SystemTime::now());
    });
    let datagrams = recorder.wait_line("READY=1").await;
    let ready = datagrams
        .iter()
        .find(|d| d.lines.iter().any(|l| l == "READY=1"))
        .unwrap();
    assert_eq!(
        ready.lines,
        [
            "READY=1",
            "STATUS=connected to A0SIMAPP01 (1 socket; Slack counts 1)"
        ]
    );

    outage(
        &state,
        "too_many_websockets",
        Duration::from_millis(4200),
        SystemTime::now(),
    );
    recorder
        .wait_line("STATUS=reconnecting in 4.2s after too_many_websockets")
        .await;
    state.set_phase(Phase::Connecting);
    recorder
        .wait_line("STATUS=connecting (last disconnect: too_many_websockets)")
        .await;
    state.update(|s| {
        s.phase = Phase::Connected;
        s.sockets_open = 1;
        s.num_connections = Some(2);
        s.down_since = None;
    });
    recorder
        .wait_line("STATUS=connected to A0SIMAPP01 (1 socket; Slack counts 2)")
        .await;

    // The number in flight changes without a state notification: refreshed while draining.
    state.counters.in_flight.store(3, Ordering::Relaxed);
    state.set_phase(Phase::Draining);
    recorder
        .wait_line("STATUS=draining: 3 envelopes in flight")
        .await;
    state.counters.in_flight.store(1, Ordering::Relaxed);
    recorder
        .wait_line("STATUS=draining: 1 envelope in flight")
        .await;
    state.counters.in_flight.store(0, Ordering::Relaxed);
    state.set_phase(Phase::Stopped);
    stop.cancel();
    finish(reporter).await;
    recorder.wait_line("STATUS=stopped").await;

    let lines = recorder.lines();
    assert_eq!(recorder.count("READY=1"), 1, "{lines:#?}");
    assert!(
        position(&lines, "STATUS=connecting") < position(&lines, "READY=1"),
        "{lines:#?}"
    );
    // Statuses are sent on change only.
    for line in &lines {
        assert!(line.starts_with("STATUS=") || line == "READY=1", "{line}");
    }
    let statuses: Vec<&String> = lines.iter().filter(|l| l.starts_with("STATUS=")).collect();
    assert!(
        statuses.windows(2).all(|w| w[0] != w[1]),
        "repeated status: {statuses:#?}"
    );
}

#[tokio::test]
async fn a_short_lived_first_connection_still_counts_as_ready() {
    let mut recorder = Recorder::bind();
    let state = new_state();
    let stop = CancellationToken::new();
    // The hello and the loss of the connection both happen before the reporter looks.
    state.update(|s| {
        s.phase = Phase::Connected;
        s.app_id = Some(APP.to_owned());
    });
    state.update(|s| {
        s.phase = Phase::Connecting;
        s.last_disconnect = Some("stale (no pong)".into());
        s.down_since = Some(SystemTime::now());
    });
    let reporter = spawn_status_reporter(recorder.systemd(), state, stop.clone());
    recorder.wait_line("READY=1").await;
    assert_eq!(
        recorder.datagrams()[0].lines,
        [
            "READY=1",
            "STATUS=connecting (last disconnect: stale (no pong))"
        ]
    );
    stop.cancel();
    finish(reporter).await;
}

#[tokio::test]
async fn the_watchdog_is_fed_at_half_the_interval_only_while_healthy() {
    const PING: &str = "WATCHDOG=1";
    let interval = Duration::from_millis(200);
    let budget = Duration::from_secs(60);
    let mut recorder = Recorder::bind();
    let state = new_state();
    state.update(|s| {
        s.phase = Phase::Connected;
        s.app_id = Some(APP.to_owned());
        s.sockets_open = 1;
        s.num_connections = Some(1);
    });
    let stop = CancellationToken::new();
    let watchdog = spawn_watchdog(
        recorder.systemd(),
        state.clone(),
        budget,
        interval,
        stop.clone(),
    );

    let datagrams = recorder.wait_count(PING, 5).await;
    let pings: Vec<Instant> = datagrams.iter().map(|d| d.at).collect();
    let span = pings[4] - pings[0];
    // Four periods of 100 ms: not a burst, and not a ping per interval.
    assert!(
        span >= Duration::from_millis(300) && span < Duration::from_secs(3),
        "5 pings in {span:?}"
    );

    // An outage beyond the budget: systemd must be left to restart the service.
    outage(
        &state,
        "stale (no pong)",
        Duration::from_secs(30),
        SystemTime::now() - Duration::from_secs(3600),
    );
    let before = recorder.count(PING);
    // Showing that nothing comes takes waiting: six ping periods. At most one ping sent
    // before the change may still have been on its way.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let starved = recorder.count(PING);
    assert!(starved <= before + 1, "{before} pings, then {starved}");

    // Recovered: the pings resume.
    state.update(|s| {
        s.phase = Phase::Connected;
        s.sockets_open = 1;
        s.down_since = None;
    });
    recorder.wait_count(PING, starved + 3).await;

    stop.cancel();
    finish(watchdog).await;
    assert!(recorder.lines().iter().all(|l| l == PING));
}

#[tokio::test]
async fn the_watchdog_is_fed_through_degraded_states() {
    let mut recorder = Recorder::bind();
    let state = new_state();
    // Starting, then a recent outage within the budget: degraded, recovering on its own.
    let stop = CancellationToken::new();
    let watchdog = spawn_watchdog(
        recorder.systemd(),
        state.clone(),
        Duration::from_secs(60),
        Duration::from_millis(100),
        stop.clone(),
    );
    recorder.wait_count("WATCHDOG=1", 2).await;
    state.update(|s| {
        s.phase = Phase::Connecting;
        s.last_disconnect = Some("refresh_requested".into());
        s.down_since = Some(SystemTime::now() - Duration::from_secs(5));
    });
    let now = recorder.count("WATCHDOG=1");
    recorder.wait_count("WATCHDOG=1", now + 3).await;
    stop.cancel();
    finish(watchdog).await;
}

#[tokio::test]
async fn the_stop_timeout_is_extended_while_a_drain_runs() {
    let mut recorder = Recorder::bind();
    let systemd = recorder.systemd();
    const EXTEND: &str = "EXTEND_TIMEOUT_USEC=200000";

    // A drain that lasts until systemd has been asked three times for more time.
    let drained = extend_while(
        &systemd,
        async {
            recorder.wait_count(EXTEND, 3).await;
            "drained"
        },
        Duration::from_millis(100),
    )
    .await;
    assert_eq!(drained, "drained");

    // A drain that is over at once asks for nothing. Datagrams from one socket arrive in
    // order, so STOPPING=1 marks the end of what was sent before it.
    let extensions = recorder.count(EXTEND);
    let quick = extend_while(&systemd, async { 7 }, Duration::from_millis(100)).await;
    assert_eq!(quick, 7);
    systemd.stopping();
    recorder.wait_line("STOPPING=1").await;
    assert_eq!(recorder.count(EXTEND), extensions);
    assert!(extensions >= 3);
}

#[tokio::test]
async fn single_notifications_are_sent_as_given() {
    let mut recorder = Recorder::bind();
    let systemd = recorder.systemd();
    systemd.stopping();
    systemd.main_pid(4242);
    systemd.extend_timeout(Duration::from_secs(30));
    systemd.watchdog_ping();
    systemd.status("two\nlines");
    systemd.ready();
    recorder.wait_line("READY=1").await;
    assert_eq!(
        recorder.lines(),
        [
            "STOPPING=1",
            "MAINPID=4242",
            "EXTEND_TIMEOUT_USEC=30000000",
            "WATCHDOG=1",
            "STATUS=two lines",
            "READY=1"
        ]
    );
}

#[tokio::test]
async fn abstract_namespace_sockets_work() {
    let mut recorder = Recorder::bind_abstract();
    recorder.systemd().ready();
    recorder.wait_line("READY=1").await;
}

#[tokio::test]
async fn without_a_socket_everything_is_a_no_op() {
    let systemd = Systemd::with_socket("not/absolute");
    let state = new_state();
    let stop = CancellationToken::new();
    systemd.ready();
    assert_eq!(extend_while(&systemd, async { 1 }, Duration::ZERO).await, 1);
    // The tasks have nothing to do and end at once, without being stopped.
    finish(spawn_status_reporter(
        systemd.clone(),
        state.clone(),
        stop.clone(),
    ))
    .await;
    finish(spawn_watchdog(
        systemd,
        state,
        Duration::from_secs(60),
        Duration::from_millis(100),
        stop,
    ))
    .await;
}

/// Runs the daemon against a simulator with stderr going to a file and `JOURNAL_STREAM`
/// set to `journal_stream(dev, ino of that file)`, until it has connected; returns its
/// stderr.
async fn stderr_with_journal_stream(journal_stream: impl Fn(u64, u64) -> String) -> String {
    use std::os::unix::fs::MetadataExt;

    let sim = simulator(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let stderr_path = dir.path().join("stderr");
    let stderr = std::fs::File::create(&stderr_path).unwrap();
    let meta = stderr.metadata().unwrap();
    let mut child = tokio::process::Command::new(flowcoach_harness::binaries::flowcoach())
        .env_clear()
        .env("SLACK_APP_TOKEN", token())
        .env("FLOWCOACH_SLACK_API_URL", sim.api_url())
        .env("FLOWCOACH_RUNTIME_DIR", dir.path())
        .env("STATE_DIRECTORY", dir.path())
        .env("JOURNAL_STREAM", journal_stream(meta.dev(), meta.ino()))
        .stdin(std::process::Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The logger is installed, and has said what it had to, before the daemon connects.
    connected(&sim).await;
    child.kill().await.unwrap();
    std::fs::read_to_string(&stderr_path).unwrap()
}

const NO_JOURNALD: &str = "stderr is the journal but journald's socket cannot be used";

#[tokio::test]
async fn stderr_is_taken_for_the_journal_only_when_journal_stream_names_it() {
    if std::path::Path::new("/run/systemd/journal/socket").exists() {
        // With a journald to talk to, the logs would go there instead of to the file.
        eprintln!("skipped: this machine runs journald");
        return;
    }
    // Stderr is the journal, but journald cannot be reached: a warning, then stderr.
    let stderr = stderr_with_journal_stream(|dev, ino| format!("{dev}:{ino}")).await;
    assert!(stderr.contains(NO_JOURNALD), "{stderr}");
    // A JOURNAL_STREAM inherited with a redirected stderr names another file.
    let stderr = stderr_with_journal_stream(|dev, ino| format!("{dev}:{}", ino + 1)).await;
    assert!(!stderr.contains(NO_JOURNALD), "{stderr}");
}

// The daemon itself, as a process with a NOTIFY_SOCKET of the test's.

/// flowcoach against a simulator, with a [`Recorder`] as its `NOTIFY_SOCKET` and `env`
/// (the watchdog's variables) set.
async fn notifying_daemon(env: &[(&str, &str)]) -> (Simulator, Recorder, Daemon) {
    let sim = simulator(|_| {}).await;
    let recorder = Recorder::bind();
    let socket = recorder.address.to_str().unwrap();
    let env: Vec<(&str, &str)> = [("NOTIFY_SOCKET", socket)]
        .into_iter()
        .chain(env.iter().copied())
        .collect();
    let daemon = Daemon::start_with(&sim, FAST_CONFIG, &env);
    (sim, recorder, daemon)
}

#[tokio::test]
async fn the_daemon_notifies_ready_status_watchdog_and_stopping() {
    let (_sim, mut recorder, mut daemon) = notifying_daemon(&[("WATCHDOG_USEC", "400000")]).await;
    recorder.wait_line("READY=1").await;
    recorder
        .wait_line("STATUS=connected to A0SIMAPP01 (1 socket; Slack counts 1)")
        .await;
    let ready_at = position(&recorder.lines(), "READY=1");
    // Pings every 200 ms; three after READY.
    let pings_before = recorder.lines()[..ready_at]
        .iter()
        .filter(|l| *l == "WATCHDOG=1")
        .count();
    recorder.wait_count("WATCHDOG=1", pings_before + 3).await;

    daemon.stop().await;
    recorder.wait_line("STOPPING=1").await;
    daemon.assert_token_never_printed();

    let lines = recorder.lines();
    assert_eq!(recorder.count("READY=1"), 1, "{lines:#?}");
    assert_eq!(recorder.count("STOPPING=1"), 1, "{lines:#?}");
    let stopping_at = position(&lines, "STOPPING=1");
    let connected_at = position(
        &lines,
        "STATUS=connected to A0SIMAPP01 (1 socket; Slack counts 1)",
    );
    assert!(
        ready_at <= connected_at && connected_at < stopping_at,
        "{lines:#?}"
    );
    let fed = lines[ready_at..stopping_at]
        .iter()
        .filter(|l| *l == "WATCHDOG=1")
        .count();
    assert!(fed >= 3, "{lines:#?}");
}

#[tokio::test]
async fn the_daemon_ignores_a_watchdog_meant_for_another_process() {
    // WATCHDOG_PID names another process (as when inherited from a parent): no pings.
    let (_sim, mut recorder, mut daemon) =
        notifying_daemon(&[("WATCHDOG_USEC", "200000"), ("WATCHDOG_PID", "1")]).await;
    recorder.wait_line("READY=1").await;
    // Showing that nothing comes takes waiting: ten would-be ping periods.
    tokio::time::sleep(Duration::from_secs(1)).await;
    daemon.stop().await;
    recorder.wait_line("STOPPING=1").await;
    assert_eq!(recorder.count("WATCHDOG=1"), 0, "{:#?}", recorder.lines());
}
