//! The durable inbox: what flowcoach acks survives kill -9, restarts and handovers, and
//! reaches the app (an HTTP server in this process, behind `[forward]`) exactly once, even
//! when the app is down for longer than Slack would retry.

use std::collections::HashMap;
use std::time::Duration;

use flowcoach_harness::prometheus::value;
use flowcoach_harness::{APP, Daemon, WAIT, acked, connected, event, simulator};
use flowcoach_sim::{LoadMix, LoadSpec, Record, Simulator};
use nix::sys::signal::Signal;
use rand::Rng;
use serde_json::Value;
use tokio::net::TcpListener;

use crate::forward::{App, Reply, SECRET, Seen, config, vacant_address};

/// Retries fast enough for a test.
const INBOX: &str = "[inbox]\nretry_initial = \"50ms\"\nretry_max = \"500ms\"\n";

/// One host: the runtime directory and, under it, the state directory with the inbox,
/// shared by every process a test starts.
struct Host {
    dir: tempfile::TempDir,
}

impl Host {
    fn new() -> Host {
        Host {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn dir(&self) -> String {
        self.dir.path().display().to_string()
    }

    /// flowcoach forwarding to `url` with the inbox on, on this host.
    fn start(&self, sim: &Simulator, url: &str, extra: &str) -> Daemon {
        let dir = self.dir();
        Daemon::start_with(
            sim,
            &config(url, &format!("{INBOX}{extra}")),
            &[
                ("FLOWCOACH_RUNTIME_DIR", dir.as_str()),
                ("SLACK_SIGNING_SECRET", SECRET),
            ],
        )
    }

    fn inbox_file(&self) -> std::path::PathBuf {
        self.dir
            .path()
            .join("state")
            .join(format!("{APP}.test.inbox.sqlite"))
    }
}

/// The app, started on `addr` (where it was down so far), answering 200.
pub(crate) async fn app_on(addr: std::net::SocketAddr) -> App {
    App::start_on(
        TcpListener::bind(addr).await.unwrap(),
        Reply::Ok("text/plain", String::new()),
    )
}

fn event_id(seen: &Seen) -> String {
    let body: Value = serde_json::from_slice(&seen.body).unwrap();
    body["event_id"].as_str().unwrap().to_owned()
}

/// How many times the app saw each event.
pub(crate) fn seen_counts(app: &App) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for seen in app.seen() {
        *counts.entry(event_id(&seen)).or_insert(0) += 1;
    }
    counts
}

pub(crate) fn acked_event_ids(record: &Record) -> Vec<String> {
    record
        .envelopes
        .iter()
        .filter(|e| e.acked_at.is_some())
        .filter_map(|e| e.event_id.clone())
        .collect()
}

pub(crate) fn acked_count(record: &Record) -> usize {
    record
        .envelopes
        .iter()
        .filter(|e| e.acked_at.is_some())
        .count()
}

/// Waits until the simulator has nothing in flight (each envelope acked or given up);
/// then until the app has seen every acked event; checks it saw each exactly once.
pub(crate) async fn every_acked_event_reached_the_app_once(sim: &Simulator, app: &App) {
    let record = sim
        .wait_until(WAIT, |r| {
            r.envelopes
                .iter()
                .all(|e| e.acked_at.is_some() || e.gave_up)
        })
        .await
        .unwrap_or_else(|e| panic!("envelopes still in flight: {e}"));
    let acked = acked_event_ids(&record);
    // Short or not, the ids tell what went missing.
    let _ = app.try_wait_seen(acked.len()).await;
    let counts = seen_counts(app);
    let missing: Vec<&String> = acked
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .collect();
    let twice: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        missing.is_empty() && twice.is_empty(),
        "{} acked events; {} missing at the app, the first: {:?}; {} seen more than once: {:?}",
        acked.len(),
        missing.len(),
        &missing[..missing.len().min(20)],
        twice.len(),
        &twice[..twice.len().min(20)],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_events_survive_kill_9_and_reach_the_app_exactly_once() {
    let sim = simulator(|_| {}).await;
    let host = Host::new();
    // The app is down through every crash: everything acked waits in the inbox.
    let (addr, url) = vacant_address().await;
    let load = sim.start_load(
        APP,
        LoadSpec {
            count: 500 * 120,
            rate_per_sec: Some(500.0),
            max_outstanding: None,
            mix: LoadMix::EventsOnly,
        },
    );
    let mut rng = rand::rng();
    for round in 0..20 {
        let mut daemon = host.start(&sim, &url, "");
        sim.wait_until(WAIT, |r| r.hellos() > round)
            .await
            .unwrap_or_else(|e| panic!("round {round}: no hello: {e}"));
        // A random moment: after a random number of acks on this run.
        let before = acked_count(&sim.record());
        let more = rng.random_range(1..=150);
        sim.wait_until(WAIT, |r| acked_count(r) >= before + more)
            .await
            .unwrap_or_else(|e| panic!("round {round}: the stream stalled: {e}"));
        daemon.signal(Signal::SIGKILL);
        daemon.exit_code().await;
    }
    load.abort();
    let acked_while_down = acked_event_ids(&sim.record()).len();
    assert!(acked_while_down >= 20, "{acked_while_down}");

    let app = app_on(addr).await;
    let mut daemon = host.start(&sim, &url, "");
    every_acked_event_reached_the_app_once(&sim, &app).await;
    daemon.stop().await;
}

#[tokio::test]
async fn an_app_down_longer_than_slacks_retries_gets_every_event_in_order_when_back() {
    // Slack gives up after its retries; the inbox does not.
    let sim = simulator(|c| {
        c.ack_deadline = Duration::from_millis(500);
        c.max_retries = 1;
    })
    .await;
    let host = Host::new();
    let (addr, url) = vacant_address().await;
    let mut daemon = host.start(&sim, &url, "[dispatch]\nmax_concurrent_handlers = 1\n");
    connected(&sim).await;
    let ids: Vec<String> = (0..30).map(|n| format!("EvDown{n:02}")).collect();
    for id in &ids {
        acked(&sim, event(id, "while the app is down")).await;
    }
    // Retried and failing, one probe at a time, for longer than Slack's retries.
    daemon.wait_log("inbox: delivery failing", |_| true).await;
    daemon
        .wait_log_count("the app did not take the envelope", 3)
        .await;
    let failures_before = daemon.logs().len();

    let app = app_on(addr).await;
    let seen = app.wait_seen(ids.len()).await;
    let order: Vec<String> = seen.iter().map(event_id).collect();
    // The probe that found the app back comes first; then the rest, oldest first.
    let probe = order[0].clone();
    let rest: Vec<&String> = ids.iter().filter(|id| **id != probe).collect();
    assert_eq!(order[1..].iter().collect::<Vec<_>>(), rest, "{order:?}");
    assert!(seen.iter().all(|s| s.signature.is_ok()));
    daemon
        .wait_log("inbox: delivery works again", |_| true)
        .await;
    // A probe per failure, not one attempt per pending event per retry.
    let failures = daemon.count_by("the app did not take the envelope", "kind");
    assert!(
        failures.values().sum::<usize>() < 30,
        "{failures:?} ({failures_before} log lines before the app came back)"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_redelivery_after_a_restart_is_deduplicated_from_the_store() {
    let sim = simulator(|_| {}).await;
    let host = Host::new();
    let (addr, url) = vacant_address().await;
    let mut first = host.start(&sim, &url, "");
    connected(&sim).await;
    acked(&sim, event("EvOnce", "kept before the crash")).await;
    first.signal(Signal::SIGKILL);
    first.exit_code().await;

    let app = app_on(addr).await;
    let mut second = host.start(&sim, &url, "");
    connected(&sim).await;
    // Slack's redelivery of an event whose ack the crash took: acked, not kept again.
    let again = acked(&sim, event("EvOnce", "the redelivery")).await;
    assert_eq!(again.event_id.as_deref(), Some("EvOnce"));
    second
        .wait_log("duplicate delivery acked again", |l| {
            l["event_id"] == "EvOnce"
        })
        .await;
    acked(&sim, event("EvAfter", "a new one")).await;
    app.wait_seen(2).await;
    let counts = seen_counts(&app);
    assert_eq!(counts.get("EvOnce"), Some(&1), "{counts:?}");
    assert_eq!(counts.get("EvAfter"), Some(&1), "{counts:?}");
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_during_a_backlog_delivers_each_event_once() {
    let sim = simulator(|_| {}).await;
    let host = Host::new();
    let (addr, url) = vacant_address().await;
    let mut incumbent = host.start(&sim, &url, "");
    connected(&sim).await;
    for n in 0..40 {
        acked(&sim, event(&format!("EvBacklog{n:02}"), "backlog")).await;
    }
    // The app comes back while the backlog waits for its next probe; the successor takes
    // over meanwhile.
    let app = app_on(addr).await;
    let dir = host.dir();
    let output = flowcoach_harness::ctl::run(
        &["--timeout", "30s", "handover"],
        &[("FLOWCOACH_RUNTIME_DIR", dir.as_str())],
    )
    .await;
    assert!(
        output.status.success(),
        "{output:?}\n{}",
        incumbent.stderr()
    );
    for n in 40..60 {
        acked(
            &sim,
            event(&format!("EvBacklog{n:02}"), "after the handover"),
        )
        .await;
    }
    every_acked_event_reached_the_app_once(&sim, &app).await;
    assert_eq!(incumbent.exit_code().await, 0, "{}", incumbent.stderr());
}

#[tokio::test]
async fn a_corrupt_inbox_stops_the_start_with_exit_65_and_what_to_do() {
    let sim = simulator(|_| {}).await;
    let host = Host::new();
    let file = host.inbox_file();
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(&file, vec![b'x'; 16 * 1024]).unwrap();
    let (_, url) = vacant_address().await;
    let mut daemon = host.start(&sim, &url, "");
    assert_eq!(daemon.exit_code().await, 65, "{}", daemon.stderr());
    let said = daemon.stderr();
    assert!(said.contains(&file.display().to_string()), "{said}");
    assert!(
        said.contains("is corrupt") && said.contains("Move it"),
        "{said}"
    );
    // Not started over: the file is as it was.
    assert_eq!(std::fs::read(&file).unwrap(), vec![b'x'; 16 * 1024]);
}

/// `flowcoachctl ARGS` for the daemon of `host`; its output, which must be a success.
async fn ctl_ok(host: &Host, args: &[&str]) -> String {
    let dir = host.dir();
    let output =
        flowcoach_harness::ctl::run(args, &[("FLOWCOACH_RUNTIME_DIR", dir.as_str())]).await;
    assert!(output.status.success(), "flowcoachctl {args:?}: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test]
async fn flowcoachctl_inbox_shows_lists_retries_and_drops_dead_letters() {
    let sim = simulator(|_| {}).await;
    let host = Host::new();
    let (addr, url) = vacant_address().await;
    let mut daemon = host.start(&sim, &url, "max_age = \"1s\"\n");
    connected(&sim).await;
    acked(&sim, event("EvDead1", "secret words")).await;
    acked(&sim, event("EvDead2", "more words")).await;
    daemon
        .wait_log_count("inbox: envelope kept as a dead letter", 2)
        .await;

    metric_reaches(&host, "flowcoach_inbox_dead_letters", 2.0).await;
    let counts = ctl_ok(&host, &["inbox"]).await;
    assert!(
        counts.contains("0 pending") && counts.contains("2 dead letters"),
        "{counts}"
    );
    assert!(
        counts.contains(&host.inbox_file().display().to_string()),
        "{counts}"
    );
    let list = ctl_ok(&host, &["inbox", "list", "--dead"]).await;
    let rows: Vec<&str> = list.lines().skip(1).collect();
    assert_eq!(rows.len(), 2, "{list}");
    assert!(
        rows.iter()
            .all(|r| r.contains("dead") && r.contains("message")),
        "{list}"
    );
    assert!(
        !list.contains("secret words"),
        "no payloads unless asked: {list}"
    );
    let with_payload = ctl_ok(&host, &["inbox", "list", "--dead", "--payload"]).await;
    assert!(with_payload.contains("secret words"), "{with_payload}");
    assert!(ctl_ok(&host, &["inbox", "list"]).await.lines().count() == 1);

    let first_id = rows[0].split_whitespace().next().unwrap();
    let dropped = ctl_ok(&host, &["inbox", "drop", first_id]).await;
    assert!(dropped.contains("1 envelope(s) dropped"), "{dropped}");
    let app = app_on(addr).await;
    let retried = ctl_ok(&host, &["inbox", "retry", "--dead"]).await;
    assert!(retried.contains("1 envelope(s) pending again"), "{retried}");
    let seen = app.wait_seen(1).await;
    assert_eq!(event_id(&seen[0]), "EvDead2");

    // status shows the writer's latest count, taken within seconds of a change.
    metric_reaches(&host, "flowcoach_inbox_dead_letters", 0.0).await;
    let status = daemon.status_json().await;
    assert_eq!(status["inbox"]["dead"], 0, "{status}");
    daemon.stop().await;
    assert_eq!(seen_counts(&app).len(), 1);
}

#[tokio::test]
async fn health_is_degraded_while_the_oldest_pending_event_is_older_than_stale_after() {
    let sim = simulator(|_| {}).await;
    let host = Host::new();
    let (_addr, url) = vacant_address().await;
    let mut daemon = host.start(&sim, &url, "stale_after = \"1s\"\n");
    connected(&sim).await;
    acked(&sim, event("EvStale", "waiting")).await;
    // Bounded: the age grows by itself, the verdict follows the clock.
    let deadline = tokio::time::Instant::now() + WAIT;
    let health = loop {
        let status = daemon.status_json().await;
        let reason = status["health"]["reason"].as_str().unwrap_or_default();
        if reason.contains("inbox.stale_after") {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never stale: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(health["health"]["health"], "degraded", "{health}");
    assert!(
        health["inbox"]["pending"].as_u64().unwrap()
            + health["inbox"]["delivering"].as_u64().unwrap()
            == 1,
        "{health}"
    );
    let metrics = ctl_ok(&host, &["metrics"]).await;
    assert_eq!(value(&metrics, "flowcoach_inbox_pending"), Some(1.0));
    assert_eq!(value(&metrics, "flowcoach_inbox_dead_letters"), Some(0.0));
    assert!(value(&metrics, "flowcoach_inbox_oldest_pending_age_seconds").unwrap() >= 1.0);
    assert_eq!(value(&metrics, "flowcoach_inbox_trouble"), Some(0.0));
    daemon.stop().await;
}

/// The inbox's gauges follow its latest count, which the writer takes after a change: wait
/// (bounded) for `series` to show `expected`.
async fn metric_reaches(host: &Host, series: &str, expected: f64) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let metrics = ctl_ok(host, &["metrics"]).await;
        if value(&metrics, series) == Some(expected) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} never reached {expected}:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A small tmpfs the test mounts (as root) and unmounts when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// `None` (the test is skipped, loudly) when not root, unless FLOWCOACH_TMPFS_TESTS=1
    /// requires it.
    fn mount(size: &str) -> Option<Tmpfs> {
        if !nix::unistd::geteuid().is_root() {
            assert!(
                std::env::var("FLOWCOACH_TMPFS_TESTS").as_deref() != Ok("1"),
                "FLOWCOACH_TMPFS_TESTS=1 but not running as root"
            );
            eprintln!(
                "SKIPPED: mounting a tmpfs needs root; set FLOWCOACH_TMPFS_TESTS=1 to require it"
            );
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(status.success(), "mount -t tmpfs: {status}");
        Some(Tmpfs { dir })
    }

    fn path(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// Writes a file until the file system is full; returns its path.
    fn fill(&self) -> std::path::PathBuf {
        use std::io::Write;
        let path = self.path().join("filler");
        let mut file = std::fs::File::create(&path).unwrap();
        let chunk = vec![0u8; 4096];
        loop {
            match file.write_all(&chunk) {
                Ok(()) => {}
                Err(error) if error.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(error) => panic!("filling the tmpfs: {error}"),
            }
        }
        let _ = file.sync_all();
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// A message event with `bytes` of text: a few of them need more room than a full disk
/// has, whatever the database has preallocated.
fn big_event(event_id: &str, bytes: usize) -> flowcoach_sim::EnvelopeSpec {
    event(event_id, &"x".repeat(bytes))
}

#[tokio::test]
async fn a_full_disk_acks_nothing_it_cannot_store_and_recovers_on_its_own() {
    let Some(tmpfs) = Tmpfs::mount("4m") else {
        return;
    };
    // Slack redelivers what is not acked, every 500 ms, for as long as the test needs.
    let sim = simulator(|c| {
        c.ack_deadline = Duration::from_millis(500);
        c.max_retries = 1000;
    })
    .await;
    let host = Host::new();
    let app = App::start(Reply::Ok("text/plain", String::new())).await;
    let state = tmpfs.path().display().to_string();
    let dir = host.dir();
    let mut daemon = Daemon::start_with(
        &sim,
        &config(&app.url(), INBOX),
        &[
            ("FLOWCOACH_RUNTIME_DIR", dir.as_str()),
            ("STATE_DIRECTORY", state.as_str()),
            ("SLACK_SIGNING_SECRET", SECRET),
        ],
    );
    connected(&sim).await;
    acked(&sim, event("EvRoom", "while there is room")).await;
    app.wait_seen(1).await;

    let filler = tmpfs.fill();
    let ids: Vec<String> = (0..20).map(|n| format!("EvFull{n:02}")).collect();
    let envelopes: Vec<String> = ids
        .iter()
        .map(|id| sim.inject(APP, big_event(id, 20_000)))
        .collect();
    let trouble = daemon
        .wait_log("inbox cannot write", |l| l["cause"] == "the disk is full")
        .await;
    assert!(
        trouble["path"].as_str().unwrap().starts_with(&state),
        "{trouble}"
    );
    // Redelivered by Slack, and still not acked while the disk is full.
    let record = sim
        .wait_until(WAIT, |r| {
            envelopes.iter().any(|id| {
                r.envelope(id)
                    .is_some_and(|e| e.deliveries.len() >= 3 && e.acked_at.is_none())
            })
        })
        .await
        .expect("an envelope redelivered and never acked");
    let unacked = envelopes.iter().filter(|id| !record.is_acked(id)).count();
    assert!(unacked > 0);
    let status = daemon.status_json().await;
    assert_eq!(status["health"]["health"], "unhealthy", "{status}");
    assert!(
        status["health"]["reason"]
            .as_str()
            .unwrap()
            .contains("the disk is full"),
        "{status}"
    );
    let metrics = ctl_ok(&host, &["metrics"]).await;
    assert_eq!(value(&metrics, "flowcoach_inbox_trouble"), Some(1.0));

    std::fs::remove_file(filler).unwrap();
    daemon.wait_log("inbox writes again", |_| true).await;
    every_acked_event_reached_the_app_once(&sim, &app).await;
    let record = sim.record();
    assert!(
        envelopes.iter().all(|id| record.is_acked(id)),
        "all acked once there was room"
    );
    // One line for the cause, however many envelopes and retries it cost.
    assert_eq!(
        daemon
            .count_by("inbox cannot write", "cause")
            .get("the disk is full"),
        Some(&1),
        "{}",
        daemon.stderr()
    );
    let status = daemon.status_json().await;
    assert_eq!(status["health"]["health"], "healthy", "{status}");
    daemon.stop().await;
}

#[tokio::test]
async fn past_max_bytes_the_oldest_dead_letters_are_pruned() {
    let sim = simulator(|_| {}).await;
    let host = Host::new();
    let (_addr, url) = vacant_address().await;
    let mut daemon = host.start(&sim, &url, "max_age = \"1s\"\nmax_bytes = 1048576\n");
    connected(&sim).await;
    let mut envelopes = Vec::new();
    for n in 0..80 {
        let record = acked(&sim, big_event(&format!("EvBig{n:02}"), 20_000)).await;
        envelopes.push(record.envelope_id);
    }
    let pruned = daemon
        .wait_log(
            "inbox over inbox.max_bytes: pruned the oldest dead letters",
            |_| true,
        )
        .await;
    assert!(pruned["pruned"].as_u64().unwrap() > 0, "{pruned}");
    // Oldest dead letters first, among those dead at the time: an envelope dies at its
    // first attempt past max_age, and retries are jittered, so the oldest envelope is not
    // always among the first dead. The newest one outlives any prune that leaves some.
    let dead = ctl_ok(&host, &["inbox", "list", "--dead", "--limit", "1000"]).await;
    let waiting = ctl_ok(&host, &["inbox", "list", "--limit", "1000"]).await;
    let pruned: Vec<&String> = envelopes
        .iter()
        .filter(|id| !dead.contains(id.as_str()) && !waiting.contains(id.as_str()))
        .collect();
    assert!(!pruned.is_empty(), "{dead}");
    assert!(
        !pruned.contains(&envelopes.last().unwrap()),
        "the newest was pruned: {dead}"
    );
    let counts = ctl_ok(&host, &["inbox"]).await;
    assert!(!counts.contains("80 dead letters"), "{counts}");
    daemon.stop().await;
}
