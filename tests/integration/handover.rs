//! Handovers between real flowcoach processes on one host (a shared runtime directory),
//! against the simulator: `flowcoachctl handover` (the incumbent starts its successor) and
//! `flowcoach --takeover` (a successor started by someone else asks for the app). Under a
//! steady event stream nothing is lost, nothing is handled twice, the app always has an
//! open socket and the lock is never free; failed successors are rolled back; an incumbent
//! that dies mid-handover leaves the app to its successor; strict mode breaks before it
//! makes.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::time::Duration;

use flowcoach_harness::logs::handled_events;
use flowcoach_harness::process::{self, Strays};
use flowcoach_harness::{
    APP, Daemon, FAST_CONFIG, WAIT, acked, all_acked_in_time, connected, ctl, event, simulator,
};
use flowcoach_protocol::EnvelopeKind;
use flowcoach_sim::{CloseKind, LoadMix, LoadSpec, OpenResponse, Record, Simulator};
use nix::sys::signal::Signal;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// One host: every process of a test shares this runtime directory (lock, control socket).
struct Host {
    dir: tempfile::TempDir,
    dir_text: String,
    socket_text: String,
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let dir_text = dir.path().display().to_string();
        let socket_text = format!("{dir_text}/{APP}.test.sock");
        Host {
            dir,
            dir_text,
            socket_text,
        }
    }

    fn env(&self) -> (&'static str, &str) {
        ("FLOWCOACH_RUNTIME_DIR", self.dir_text.as_str())
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join(format!("{APP}.test.sock"))
    }

    fn lock_file(&self) -> PathBuf {
        self.dir.path().join(format!("{APP}.test.pid"))
    }

    /// `flowcoach` started plainly, as a first instance (or a conflicting one).
    fn start(&self, sim: &Simulator, config: &str) -> Daemon {
        Daemon::start_with(sim, config, &[self.env()])
    }

    /// `flowcoach --takeover`.
    fn takeover(&self, sim: &Simulator, config: &str) -> Daemon {
        self.takeover_env(sim, config, &[])
    }

    fn takeover_env(&self, sim: &Simulator, config: &str, env: &[(&str, &str)]) -> Daemon {
        let mut all = vec![self.env()];
        all.extend_from_slice(env);
        Daemon::start_args(sim, config, &all, &["--takeover"])
    }

    /// `flowcoachctl --socket <this host's socket> ARGS`.
    fn ctl_args<'a>(&'a self, args: &[&'a str]) -> Vec<&'a str> {
        [&["--socket", self.socket_text.as_str()], args].concat()
    }

    /// Runs flowcoachctl to the end (asynchronously: the simulator runs on this runtime).
    async fn ctl(&self, args: &[&str]) -> Output {
        ctl::run(&self.ctl_args(args), &[]).await
    }

    /// Starts `flowcoachctl handover`; [`finished`] collects its answer.
    fn start_handover(&self) -> Child {
        ctl::command(&self.ctl_args(&["--timeout", "30s", "handover"]), &[])
            .spawn()
            .unwrap()
    }

    /// The pid in `flowcoachctl status --json`.
    async fn status_pid(&self) -> u32 {
        let status = self.ctl(&["status", "--json"]).await;
        assert!(status.status.success(), "{status:?}");
        let report: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
        report["pid"].as_u64().unwrap() as u32
    }

    /// The pid the lock file names.
    fn lock_pid(&self) -> u32 {
        let text = std::fs::read_to_string(self.lock_file()).unwrap();
        text.lines().next().unwrap().parse().unwrap()
    }

    /// Starts flowcoach plainly and checks it exits 75, the app being held; returns what it
    /// said.
    async fn refused_75(&self, sim: &Simulator, config: &str) -> String {
        let mut third = self.start(sim, config);
        let code = third.exit_code().await;
        let said = third.stderr();
        assert_eq!(code, 75, "a plain start while the app is held: {said}");
        said
    }

    /// Whether a plain start, refused as [`Host::refused_75`] checks, named pid `pid`.
    async fn refusal_names(&self, sim: &Simulator, config: &str, pid: u32) -> bool {
        let said = self.refused_75(sim, config).await;
        said.contains(&format!("pid {pid}"))
    }
}

/// The output of a finished `flowcoachctl handover`.
async fn finished(handover: Child) -> Output {
    tokio::time::timeout(Duration::from_secs(40), handover.wait_with_output())
        .await
        .expect("flowcoachctl handover answers")
        .unwrap()
}

/// `handed over to pid N in M ms` → N.
pub(crate) fn handed_to(output: &Output) -> u32 {
    let text = String::from_utf8_lossy(&output.stdout);
    let pid = text
        .strip_prefix("handed over to pid ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok());
    pid.unwrap_or_else(|| panic!("not a completed handover: {output:?}"))
}

/// Waits for one of our children to exit; its exit code. (Not [`Daemon::exit_code`]: a
/// successor it started shares its stderr, so that never reaches its end.)
pub(crate) async fn exited(daemon: &mut Daemon) -> i32 {
    let status = tokio::time::timeout(WAIT, daemon.child.wait())
        .await
        .unwrap_or_else(|_| panic!("pid {} did not exit:\n{}", daemon.pid(), daemon.stderr()))
        .unwrap();
    status.code().unwrap_or(-1)
}

/// "event handled" log lines per event_id, over every process's log.
fn handled(daemons: &[&Daemon]) -> HashMap<String, usize> {
    let lines: Vec<serde_json::Value> = daemons.iter().flat_map(|d| d.logs()).collect();
    handled_events(&lines)
}

/// The event ids of the acked `events_api` envelopes.
fn acked_event_ids(record: &Record) -> Vec<String> {
    record
        .envelopes
        .iter()
        .filter(|e| e.kind == EnvelopeKind::EventsApi && e.acked_at.is_some())
        .filter_map(|e| e.event_id.clone())
        .collect()
}

/// Every acked event was handled exactly once, and nothing was handled twice. Log lines
/// trail the acks (an event is acked before its handler runs): waits for them first.
async fn handled_exactly_once(record: &Record, daemons: &[&Daemon]) {
    let expected = acked_event_ids(record);
    let deadline = Instant::now() + WAIT;
    let counts = loop {
        let counts = handled(daemons);
        if expected.iter().all(|id| counts.contains_key(id)) || Instant::now() >= deadline {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "events handled more than once: {twice:?}");
    let missing: Vec<_> = expected
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acked events never handled, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}

/// Waits until every envelope is acked; none may have been given up.
async fn all_acked(sim: &Simulator) -> Record {
    let record = sim
        .wait_until(WAIT, |r| {
            r.all_acked() || r.envelopes.iter().any(|e| e.gave_up)
        })
        .await
        .unwrap_or_else(|e| panic!("not every envelope was acked: {e}"));
    assert!(record.all_acked(), "envelopes given up:\n{record}");
    record
}

/// How many envelopes have been acked.
fn acked_count(record: &Record) -> usize {
    record
        .envelopes
        .iter()
        .filter(|e| e.acked_at.is_some())
        .count()
}

/// Waits until `more` envelopes have been acked beyond `since`; the new count.
pub(crate) async fn acks_beyond(sim: &Simulator, since: usize, more: usize) -> usize {
    let record = sim
        .wait_until(WAIT, |r| acked_count(r) >= since + more)
        .await
        .unwrap_or_else(|e| panic!("the stream stalled: {e}"));
    acked_count(&record)
}

/// After a handover ended: exactly one instance serves the app, `pid`, which the control
/// socket and the lock file name, and it acks a fresh event.
async fn serving_alone(sim: &Simulator, host: &Host, pid: u32, event_id: &str) {
    sim.wait_until(WAIT, |r| r.open_sockets(APP) == 1)
        .await
        .unwrap_or_else(|e| panic!("not exactly one open socket: {e}"));
    assert_eq!(
        host.status_pid().await,
        pid,
        "flowcoachctl status answers from"
    );
    assert_eq!(host.lock_pid(), pid, "the lock file names");
    acked(sim, event(event_id, "after the handover")).await;
    let record = sim.record();
    assert_eq!(record.open_sockets(APP), 1, "{record}");
}

/// A steady stream of message events.
fn stream(sim: &Simulator, rate: f64, seconds: u64) -> tokio::task::JoinHandle<()> {
    stream_of(sim, rate, seconds, LoadMix::EventsOnly)
}

/// A steady stream of `mix`.
fn stream_of(
    sim: &Simulator,
    rate: f64,
    seconds: u64,
    mix: LoadMix,
) -> tokio::task::JoinHandle<()> {
    sim.start_load(
        APP,
        LoadSpec {
            count: (rate * seconds as f64) as u64,
            rate_per_sec: Some(rate),
            max_outstanding: None,
            mix,
        },
    )
}

fn with_handover(settings: &str) -> String {
    format!("{FAST_CONFIG}\n[handover]\n{settings}\n")
}

/// A simulator, a host and an incumbent started there with `config`, connected.
async fn connected_incumbent(config: &str) -> (Simulator, Host, Daemon) {
    let sim = simulator(|_| {}).await;
    let host = Host::new();
    let incumbent = host.start(&sim, config);
    connected(&sim).await;
    (sim, host, incumbent)
}

/// Under a stream of events, a successor (`--takeover`) that has said hello: the
/// simulator, the host, the incumbent, the successor and the stream.
async fn takeover_under_load() -> (Simulator, Host, Daemon, Daemon, tokio::task::JoinHandle<()>) {
    let (sim, host, incumbent) = connected_incumbent(FAST_CONFIG).await;
    let load = stream(&sim, 50.0, 60);
    acks_beyond(&sim, 0, 10).await;
    let successor = host.takeover(&sim, FAST_CONFIG);
    sim.wait_until(WAIT, |r| r.hellos() >= 2)
        .await
        .expect("the successor connects");
    (sim, host, incumbent, successor, load)
}

/// A successor (`--takeover`) that cannot connect yet (the simulator refuses handshakes
/// until told otherwise), once the incumbent has accepted its takeover.
async fn takeover_kept_waiting(sim: &Simulator, host: &Host, config: &str) -> Daemon {
    sim.set_handshake_status(Some(409));
    let mut successor = host.takeover(sim, config);
    successor
        .wait_log("the running instance accepted the takeover", |_| true)
        .await;
    successor
}

/// Kills `daemon` outright and reaps it.
async fn kill_now(daemon: &mut Daemon) {
    daemon.signal(Signal::SIGKILL);
    daemon.child.wait().await.unwrap();
}

/// Waits until the incumbent logs that it rolls a handover back; that line.
async fn rolling_back(incumbent: &mut Daemon) -> serde_json::Value {
    incumbent
        .wait_log("handover failed; rolling back", |_| true)
        .await
}

/// `flowcoachctl handover`, which must fail; what it said on stderr.
async fn handover_refused(host: &Host) -> String {
    let output = host.ctl(&["handover"]).await;
    let said = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "{output:?}");
    said
}

/// Who holds the app in the chain of handovers.
enum Holder {
    /// A process this test started (index into its daemons).
    Ours(usize),
    /// A successor an incumbent started (`flowcoachctl handover`).
    Spawned(u32),
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_handovers_both_ways_under_load_lose_nothing_and_handle_nothing_twice() {
    const HANDOVERS: usize = 20;
    let started = Instant::now();
    let config = with_handover("timeout = \"10s\"");
    let (sim, host, first) = connected_incumbent(&config).await;
    let mut daemons = vec![first];
    let mut strays = Strays::default();
    let load = stream(&sim, 100.0, 120);
    let mut acks = acks_beyond(&sim, 0, 20).await;
    let mut holder = Holder::Ours(0);
    // Conflicting starts that named the incumbent, i.e. ran before the successor adopted
    // the lock, out of those started during a handover.
    let mut during_named_incumbent = 0;
    for round in 0..HANDOVERS {
        let (incumbent_pid, new_holder) = if round % 2 == 0 {
            // flowcoachctl handover: the incumbent starts its successor.
            let Holder::Ours(index) = holder else {
                unreachable!("the chain alternates")
            };
            let incumbent = &mut daemons[index];
            let incumbent_pid = incumbent.pid() as u32;
            let handover = host.start_handover();
            incumbent
                .wait_log("started a successor for a handover", |_| true)
                .await;
            during_named_incumbent +=
                usize::from(host.refusal_names(&sim, &config, incumbent_pid).await);
            let output = finished(handover).await;
            assert!(
                output.status.success(),
                "round {round}: {output:?}\n{}",
                incumbent.stderr()
            );
            let successor = handed_to(&output);
            strays.add(successor);
            assert_eq!(exited(incumbent).await, 0, "{}", incumbent.stderr());
            (incumbent_pid, Holder::Spawned(successor))
        } else {
            // flowcoach --takeover, started by someone else.
            let Holder::Spawned(incumbent_pid) = holder else {
                unreachable!("the chain alternates")
            };
            let mut successor = host.takeover(&sim, &config);
            successor
                .wait_log("the running instance accepted the takeover", |_| true)
                .await;
            during_named_incumbent +=
                usize::from(host.refusal_names(&sim, &config, incumbent_pid).await);
            successor.wait_log("took the app over", |_| true).await;
            strays.gone(incumbent_pid, WAIT).await.unwrap();
            daemons.push(successor);
            (incumbent_pid, Holder::Ours(daemons.len() - 1))
        };
        holder = new_holder;
        let holder_pid = match holder {
            Holder::Ours(index) => daemons[index].pid() as u32,
            Holder::Spawned(pid) => pid,
        };
        assert_ne!(holder_pid, incumbent_pid);
        // Just after completion, a plain start is refused too, naming the new holder.
        let said = host.refused_75(&sim, &config).await;
        assert!(said.contains(&format!("pid {holder_pid}")), "{said}");
        assert_eq!(host.status_pid().await, holder_pid);
        assert_eq!(host.lock_pid(), holder_pid);
        // The stream goes on through the new holder before the next handover.
        acks = acks_beyond(&sim, acks, 20).await;
    }
    load.abort();
    let record = all_acked(&sim).await;
    assert_eq!(
        record.zero_open_stretches(APP),
        0,
        "the app had no open socket at some point:\n{record}"
    );
    assert_eq!(record.open_sockets(APP), 1, "{record}");
    // Every incumbent closed its websocket with a close handshake.
    for socket in record.sockets.iter().filter(|s| s.closed_at.is_some()) {
        assert_eq!(
            socket.close,
            Some(CloseKind::ClientCloseHandshake),
            "socket #{}:\n{record}",
            socket.id
        );
    }
    assert_eq!(
        record.hellos(),
        HANDOVERS + 1,
        "one connection per instance"
    );
    let Holder::Ours(last) = holder else {
        unreachable!("an even number of handovers ends with a takeover")
    };
    let mut last = daemons.remove(last);
    last.stop().await;
    let mut all: Vec<&Daemon> = daemons.iter().collect();
    all.push(&last);
    handled_exactly_once(&record, &all).await;
    // Every instance, ours or started by an incumbent, ended well (a spawned successor
    // logs where its incumbent does).
    for daemon in &all {
        let failed = daemon.count_by("flowcoach stopped on an error", "error");
        assert!(failed.is_empty(), "{failed:?}");
    }
    // The conflicting starts really overlapped the handovers: the lock file still named
    // the incumbent when they were refused.
    assert!(during_named_incumbent >= 1);
    let redelivered = record
        .envelopes
        .iter()
        .filter(|e| e.deliveries.len() > 1)
        .count();
    eprintln!(
        "{HANDOVERS} handovers in {:?}: {} envelopes, {redelivered} delivered more than once; \
         {during_named_incumbent} conflicting starts during a handover named the incumbent",
        started.elapsed(),
        record.envelopes.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_with_a_bad_token_exits_78_and_the_incumbent_keeps_serving() {
    let (sim, host, mut incumbent) = connected_incumbent(FAST_CONFIG).await;
    // Same app (same lock and socket), a token Slack does not know.
    let mut successor = host.takeover_env(
        &sim,
        FAST_CONFIG,
        &[("SLACK_APP_TOKEN", "xapp-1-A0SIMAPP01-1-0badc0ffee")],
    );
    assert_eq!(successor.exit_code().await, 78, "{}", successor.stderr());
    assert!(successor.stderr().contains("invalid_auth"));
    successor.assert_token_never_printed();
    rolling_back(&mut incumbent).await;
    serving_alone(&sim, &host, incumbent.pid() as u32, "EvAfterBadToken").await;
    incumbent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flowcoachctl_handover_with_an_invalid_config_on_disk_is_rolled_back() {
    let (sim, host, mut incumbent) = connected_incumbent(FAST_CONFIG).await;
    std::fs::write(
        incumbent.config_path(),
        "[connection]\nping_interval = \"soon\"\n",
    )
    .unwrap();
    let said = handover_refused(&host).await;
    assert!(
        said.contains("failed") && said.contains("keeps serving") && said.contains("78"),
        "{said}"
    );
    // The successor's complaint went where the incumbent's logs go (written in pieces,
    // so it may be split among the incumbent's lines: look for the field it names).
    incumbent
        .wait_log("", |l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.contains("ping_interval"))
        })
        .await;
    serving_alone(&sim, &host, incumbent.pid() as u32, "EvAfterBadConfig").await;
    incumbent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_killed_after_connecting_is_rolled_back_losing_nothing() {
    let (sim, host, mut incumbent, mut successor, load) = takeover_under_load().await;
    kill_now(&mut successor).await;
    rolling_back(&mut incumbent).await;
    acks_beyond(&sim, acked_count(&sim.record()), 20).await;
    load.abort();
    serving_alone(&sim, &host, incumbent.pid() as u32, "EvAfterCrash").await;
    // What the successor held unacked was redelivered and handled by the incumbent, once.
    let record = all_acked(&sim).await;
    incumbent.stop().await;
    handled_exactly_once(&record, &[&incumbent, &successor]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successor_that_never_says_ready_is_rolled_back_after_the_timeout() {
    let config = with_handover("timeout = \"3s\"");
    let (sim, host, mut incumbent) = connected_incumbent(&config).await;
    sim.set_handshake_status(Some(409));
    let asked = Instant::now();
    let mut successor = host.takeover(&sim, &config);
    let code = exited(&mut successor).await;
    assert_ne!(code, 0, "{}", successor.stderr());
    let rolled_back = rolling_back(&mut incumbent).await;
    assert!(
        asked.elapsed() >= Duration::from_millis(2900),
        "rolled back before the timeout: {rolled_back}"
    );
    assert!(
        rolled_back["reason"]
            .as_str()
            .is_some_and(|r| r.contains("3s")),
        "{rolled_back}"
    );
    sim.set_handshake_status(None);
    serving_alone(&sim, &host, incumbent.pid() as u32, "EvAfterTimeout").await;
    incumbent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incumbent_killed_after_the_successors_hello_leaves_the_app_to_the_successor() {
    let (sim, host, mut incumbent, mut successor, load) = takeover_under_load().await;
    kill_now(&mut incumbent).await;
    // Alone, or with the lock and listener if they were passed before the kill.
    successor.wait_log("took the app over", |_| true).await;
    acks_beyond(&sim, acked_count(&sim.record()), 20).await;
    load.abort();
    serving_alone(&sim, &host, successor.pid() as u32, "EvAfterKill").await;
    all_acked(&sim).await;
    successor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incumbent_killed_while_the_successor_connects_leaves_the_app_to_the_successor() {
    let config = with_handover("timeout = \"10s\"");
    let (sim, host, mut incumbent) = connected_incumbent(&config).await;
    // The successor cannot connect until the incumbent is gone.
    let mut successor = takeover_kept_waiting(&sim, &host, &config).await;
    sim.wait_until(WAIT, |r| {
        r.sockets.iter().any(|s| s.rejected_handshake.is_some())
    })
    .await
    .expect("the successor tries to connect");
    kill_now(&mut incumbent).await;
    sim.set_handshake_status(None);
    successor
        .wait_log("the running instance went away during the handover", |_| {
            true
        })
        .await;
    successor
        .wait_log("took the app over alone", |_| true)
        .await;
    serving_alone(&sim, &host, successor.pid() as u32, "EvAfterKillEarly").await;
    successor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_handover_request_is_refused_while_one_is_under_way() {
    let config = with_handover("timeout = \"15s\"");
    let (sim, host, mut incumbent) = connected_incumbent(&config).await;
    // Keep the first handover under way: its successor cannot connect yet.
    let mut first = takeover_kept_waiting(&sim, &host, &config).await;

    let said = handover_refused(&host).await;
    assert!(said.contains("a handover is already in progress"), "{said}");

    let mut second = host.takeover(&sim, &config);
    assert_ne!(second.exit_code().await, 0);
    assert!(
        second
            .stderr()
            .contains("a handover is already in progress"),
        "{}",
        second.stderr()
    );

    // The first one goes on and completes.
    sim.set_handshake_status(None);
    first.wait_log("took the app over", |_| true).await;
    assert_eq!(exited(&mut incumbent).await, 0, "{}", incumbent.stderr());
    serving_alone(&sim, &host, first.pid() as u32, "EvAfterRefusal").await;
    first.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mode_breaks_before_making_and_the_successor_acks_what_arrived_meanwhile() {
    let config = with_handover("strict = true");
    let (sim, host, mut incumbent) = connected_incumbent(&config).await;
    let mut strays = Strays::default();
    let load = stream(&sim, 200.0, 60);
    let acks = acks_beyond(&sim, 0, 50).await;
    // The successor's first apps.connections.open fails: it connects after a backoff, so
    // the gap (no socket open) is long enough for envelopes to arrive in it.
    sim.push_open_response(OpenResponse::HttpStatus(503));
    let output = host.ctl(&["handover"]).await;
    assert!(
        output.status.success(),
        "{output:?}\n{}",
        incumbent.stderr()
    );
    let successor = handed_to(&output);
    strays.add(successor);
    assert_eq!(exited(&mut incumbent).await, 0, "{}", incumbent.stderr());
    acks_beyond(&sim, acks, 100).await;
    load.abort();
    let record = all_acked(&sim).await;
    serving_alone(&sim, &host, successor, "EvAfterStrict").await;

    // Break before make: one stretch with no socket, between the incumbent's close and the
    // successor's hello.
    assert_eq!(record.zero_open_stretches(APP), 1, "{record}");
    let old = &record.sockets[0];
    let new = record
        .sockets
        .iter()
        .find(|s| s.hello_at.is_some() && s.closed_at.is_none())
        .expect("the successor's socket");
    let (closed, hello) = (old.closed_at.unwrap(), new.hello_at.unwrap());
    assert!(closed <= new.opened_at, "{record}");
    assert_eq!(old.close, Some(CloseKind::ClientCloseHandshake));
    // Envelopes injected during the gap, or left unacked by the draining incumbent, were
    // delivered again once the successor connected, and it acked them.
    let caught: Vec<_> = record
        .envelopes
        .iter()
        .filter(|e| {
            let in_gap = e.pending_since >= closed && e.pending_since <= hello;
            let left =
                e.deliveries.iter().any(|d| d.socket == old.id) && e.ack_socket != Some(old.id);
            in_gap || left
        })
        .collect();
    assert!(
        !caught.is_empty(),
        "nothing arrived during the gap:\n{record}"
    );
    for e in &caught {
        assert_eq!(e.ack_socket, Some(new.id), "{e:?}");
    }
    eprintln!(
        "strict handover: gap {:?}, {} envelopes caught by the successor",
        hello - closed,
        caught.len()
    );
    process::signal(successor, Signal::SIGTERM);
    strays.gone(successor, WAIT).await.unwrap();
    handled_exactly_once(&record, &[&incumbent]).await;
}

/// A deduplication state of thousands of entries is more than one line of the session
/// holds: it travels in parts, and the successor still recognises the incumbent's events,
/// the oldest and the newest, when Slack delivers them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_carries_a_deduplication_state_of_thousands_of_entries() {
    const EVENTS: u64 = 8000;
    // The state in memory: with the inbox, the store holds it and nothing travels.
    let config = format!("{FAST_CONFIG}\n[inbox]\nenabled = false\n");
    let (sim, host, mut incumbent) = connected_incumbent(&config).await;
    acked(&sim, event("EvOldest", "first of all")).await;
    let load = sim.start_load(
        APP,
        LoadSpec {
            count: EVENTS,
            rate_per_sec: None,
            max_outstanding: Some(256),
            mix: LoadMix::EventsOnly,
        },
    );
    sim.wait_until(WAIT, |r| acked_count(r) > EVENTS as usize)
        .await
        .expect("the load is acked");
    load.await.unwrap();
    acked(&sim, event("EvNewest", "last before the takeover")).await;
    let mut successor = host.takeover(&sim, &config);
    let adopted = successor
        .wait_log("took over the predecessor's deduplication state", |_| true)
        .await;
    assert!(adopted["entries"].as_u64() >= Some(EVENTS + 2), "{adopted}");
    successor.wait_log("took the app over", |_| true).await;
    assert_eq!(exited(&mut incumbent).await, 0, "{}", incumbent.stderr());
    for id in ["EvOldest", "EvNewest"] {
        acked(&sim, event(id, "delivered again")).await;
    }
    acked(&sim, event("EvAfterBigState", "after the takeover")).await;
    successor.stop().await;
    let counts = handled(&[&incumbent, &successor]);
    for id in ["EvOldest", "EvNewest", "EvAfterBigState"] {
        assert_eq!(counts.get(id), Some(&1), "{id} handled once: {counts:?}");
    }
}

/// Set in the child process of [`a_fake_successor_sending_32_mib_without_a_newline_is_cut_off`]:
/// the control socket to flood.
const FLOOD_CHILD: &str = "FLOWCOACH_TEST_FLOOD_SOCKET";
const FLOOD_BYTES: usize = 32 << 20;
/// Marks the child's report among libtest's output.
const FLOOD_MARK: &str = "@@flood@@ ";

/// A permitted client asks for a takeover, then sends 32 MiB without a newline. The
/// incumbent cuts it off once a line passes 64 KiB (a handover line is capped like a control
/// request), stops it (SIGTERM, to that process) and keeps serving: events sent meanwhile
/// are acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fake_successor_sending_32_mib_without_a_newline_is_cut_off() {
    let (sim, host, mut incumbent) = connected_incumbent(FAST_CONFIG).await;
    let flood = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "handover::flood_child",
            "--ignored",
            "--nocapture",
        ])
        .env(FLOOD_CHILD, host.socket())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    incumbent
        .wait_log("handing over to pid", |l| {
            l["successor"].as_u64() == flood.id().map(u64::from)
        })
        .await;
    for i in 0..10 {
        acked(&sim, event(&format!("EvDuringFlood{i}"), "flooded")).await;
    }
    let output = tokio::time::timeout(WAIT, flood.wait_with_output())
        .await
        .expect("the flooding client ends")
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let report = stdout
        .lines()
        .find_map(|line| line.split_once(FLOOD_MARK).map(|(_, report)| report))
        .unwrap_or_else(|| panic!("no report from the flooding client:\n{stdout}"));
    let field = |name: &str| {
        report
            .split_whitespace()
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            .unwrap_or_else(|| panic!("no {name} in {report:?}"))
            .to_owned()
    };
    let written: usize = field("written").parse().unwrap();
    // 64 KiB read, then what the socket buffers hold before the writer learns of the close.
    assert!(
        written < 1 << 20,
        "the incumbent read {written} of {FLOOD_BYTES} bytes before cutting the client off"
    );
    assert_eq!(
        field("terminated"),
        "true",
        "the failed successor was stopped"
    );
    let rolled_back = rolling_back(&mut incumbent).await;
    assert!(
        rolled_back["reason"]
            .as_str()
            .is_some_and(|r| r.contains("65536 bytes")),
        "{rolled_back}"
    );
    serving_alone(&sim, &host, incumbent.pid() as u32, "EvAfterFlood").await;
    incumbent.stop().await;
}

#[test]
#[ignore = "runs in the child process of a_fake_successor_sending_32_mib_without_a_newline_is_cut_off"]
fn flood_child() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, sigaction};
    use std::io::{BufRead, Write};
    use std::sync::atomic::{AtomicBool, Ordering};

    static TERMINATED: AtomicBool = AtomicBool::new(false);
    extern "C" fn on_term(_: nix::libc::c_int) {
        TERMINATED.store(true, Ordering::SeqCst);
    }

    let Some(socket) = std::env::var_os(FLOOD_CHILD) else {
        return;
    };
    // Noted instead of dying of it, so the report says whether the incumbent stopped us.
    let action = SigAction::new(
        SigHandler::Handler(on_term),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe { sigaction(Signal::SIGTERM, &action) }.unwrap();
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    writeln!(
        stream,
        r#"{{"version":1,"command":"takeover","pid":{},"release":"0.0.0-flood"}}"#,
        std::process::id()
    )
    .unwrap();
    let mut accepted = String::new();
    std::io::BufReader::new(stream.try_clone().unwrap())
        .read_line(&mut accepted)
        .unwrap();
    assert!(accepted.contains("takeover_accepted"), "{accepted}");
    let chunk = vec![b'x'; 64 * 1024];
    let mut written = 0;
    while written < FLOOD_BYTES {
        match stream.write(&chunk) {
            Ok(n) => written += n,
            Err(_) => break,
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !TERMINATED.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "{FLOOD_MARK}written={written} terminated={}",
        TERMINATED.load(Ordering::SeqCst)
    );
}

/// The environment the kernel shows for `pid` (`/proc/PID/environ`).
fn environ_of(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    String::from_utf8_lossy(&raw).replace('\0', "\n")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_from_the_environment_is_in_neither_process_environment_after_a_handover() {
    let (sim, host, mut incumbent) = connected_incumbent(FAST_CONFIG).await;
    let mut strays = Strays::default();
    let secret = flowcoach_harness::token_secret();
    let environ = environ_of(incumbent.pid() as u32);
    assert!(
        !environ.contains(&secret),
        "the incumbent's environment shows the token:\n{environ}"
    );
    let output = host.ctl(&["handover"]).await;
    assert!(
        output.status.success(),
        "{output:?}\n{}",
        incumbent.stderr()
    );
    let successor = handed_to(&output);
    strays.add(successor);
    assert_eq!(exited(&mut incumbent).await, 0, "{}", incumbent.stderr());
    // The successor got the token (it connected with it) through a pipe, not its
    // environment.
    let environ = environ_of(successor);
    assert!(
        !environ.contains(&secret) && !environ.contains("SLACK_APP_TOKEN="),
        "the successor's environment shows the token:\n{environ}"
    );
    assert!(environ.contains("FLOWCOACH_APP_TOKEN_FD="), "{environ}");
    serving_alone(&sim, &host, successor, "EvAfterSecretHandover").await;
    process::signal(successor, Signal::SIGTERM);
    strays.gone(successor, WAIT).await.unwrap();
    incumbent.assert_token_never_printed();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_two_sockets_a_takeover_counts_all_of_the_incumbents_sockets_and_leaves_no_gap() {
    let config = flowcoach_harness::fast_config_with(&[("sockets", "2")]);
    let sim = simulator(|_| {}).await;
    let host = Host::new();
    let mut incumbent = host.start(&sim, &config);
    sim.wait_until(WAIT, |r| r.open_sockets(APP) == 2)
        .await
        .expect("the incumbent opens two sockets");
    let load = stream(&sim, 50.0, 60);
    acks_beyond(&sim, 0, 10).await;
    let mut successor = host.takeover(&sim, &config);
    successor.wait_log("took the app over", |_| true).await;
    assert_eq!(exited(&mut incumbent).await, 0, "{}", incumbent.stderr());
    let record = sim
        .wait_until(WAIT, |r| r.hellos() >= 4 && r.open_sockets(APP) == 2)
        .await
        .expect("the successor holds two sockets");
    acks_beyond(&sim, acked_count(&record), 20).await;
    load.abort();
    let record = all_acked(&sim).await;
    assert_eq!(record.zero_open_stretches(APP), 0, "{record}");
    // Slack counted the incumbent's two sockets in the successor's hellos: not another
    // client's.
    let first_hello = successor.wait_log("connected to Slack", |_| true).await;
    assert_eq!(first_hello["num_connections"], 3, "{first_hello}");
    assert!(
        !successor.stderr().contains("belong to another client"),
        "{}",
        successor.stderr()
    );
    let status = successor.status_json().await;
    assert_eq!(status["sockets_open"], 2, "{status}");
    successor.stop().await;
    handled_exactly_once(&record, &[&incumbent, &successor]).await;
}

/// `rounds` handovers (`flowcoachctl handover`) in a row under a stream of events, slash
/// commands and interactions at 200/s: every envelope is acked on its first delivery and
/// within the ack deadline, none waits for a redelivery and none is given up (a slash
/// command or an interaction is never redelivered), including those that reach an
/// incumbent after its Close.
async fn handovers_under_a_mixed_stream(strict: bool, rounds: usize) {
    let config = with_handover(&format!("strict = {strict}\ntimeout = \"10s\""));
    let (sim, host, mut first) = connected_incumbent(&config).await;
    let mut strays = Strays::default();
    let load = stream_of(&sim, 200.0, 120, LoadMix::Mixed);
    let mut acks = acks_beyond(&sim, 0, 20).await;
    let mut holder: Option<u32> = None;
    for round in 0..rounds {
        let output = host.ctl(&["handover"]).await;
        assert!(
            output.status.success(),
            "round {round}: {output:?}\n{}",
            first.stderr()
        );
        let successor = handed_to(&output);
        strays.add(successor);
        match holder {
            None => assert_eq!(exited(&mut first).await, 0, "{}", first.stderr()),
            Some(incumbent) => strays.gone(incumbent, WAIT).await.unwrap(),
        }
        holder = Some(successor);
        acks = acks_beyond(&sim, acks, 20).await;
    }
    load.abort();
    let record = all_acked_in_time(&sim).await;
    let redelivered = record
        .envelopes
        .iter()
        .filter(|e| e.deliveries.len() > 1)
        .count();
    assert_eq!(redelivered, 0, "{record}");
    let holder = holder.expect("at least one round");
    process::signal(holder, Signal::SIGTERM);
    strays.gone(holder, WAIT).await.unwrap();
    handled_exactly_once(&record, &[&first]).await;
    let handed_on = first.count_by(
        "handling an envelope that arrived on a closing socket",
        "message",
    );
    eprintln!(
        "{rounds} handovers (strict: {strict}): {} envelopes, {} handled by a successor after the incumbent's Close",
        record.envelopes.len(),
        handed_on.values().sum::<usize>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handovers_under_a_mixed_stream_ack_every_envelope_in_time() {
    handovers_under_a_mixed_stream(false, 10).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_handovers_under_a_mixed_stream_ack_every_envelope_in_time() {
    handovers_under_a_mixed_stream(true, 10).await;
}
