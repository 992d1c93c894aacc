//! End to end on a real systemd: flowcoach's Debian package installed in a Debian bookworm
//! machine booted with systemd-nspawn, talking to the simulator that runs in this test
//! process on the host's loopback (the machine shares the host's network).
//!
//! Opt-in and root only: `FLOWCOACH_E2E=1 cargo test --test e2e -- --test-threads=1 systemd::`
//! (each test is skipped with a message otherwise). The rootfs is made once with
//! debootstrap and cached in `target/e2e/`; every test boots its own machine from it
//! (`--volatile=overlay`, well under a second), so the tests are independent. The package
//! is the newest `target/debian/flowcoach_*.deb` (`packaging/build.sh`). Harness: the
//! other modules of `tests/e2e/`.

mod app;

use std::collections::BTreeMap;
use std::time::Duration;

use flowcoach_sim::{CloseKind, LoadMix, LoadSpec, Record, SimApp, SimConfig, Simulator};
use serde_json::Value;

use crate::deb::{self, Deb};
use crate::machine::{Machine, Props};
use crate::{Phase, rootfs};
use flowcoach_harness::{APP, event, simulator, token};

const UNIT: &str = "flowcoach.service";
/// Our drop-in: where the simulator is (and test-only settings).
const DROP_IN: &str = "/etc/systemd/system/flowcoach.service.d/e2e.conf";
const CONFIG: &str = "/etc/flowcoach/flowcoach.toml";
/// What systemd needs for a unit to settle (start, stop, restart, watchdog).
const SETTLE: Duration = Duration::from_secs(30);
/// Bound on the simulator seeing something the daemon in the machine does.
const SIM_WAIT: Duration = Duration::from_secs(30);

/// The properties every assertion about the service's life looks at.
const LIFE: &[&str] = &[
    "ActiveState",
    "SubState",
    "Result",
    "MainPID",
    "ExecMainPID",
    "ExecMainCode",
    "ExecMainStatus",
    "NRestarts",
    "InvocationID",
    "ActiveEnterTimestamp",
    "StatusText",
];

/// A booted machine with the package installed and the service started against `sim`.
struct Setup {
    machine: Machine,
    sim: Simulator,
    deb: Deb,
}

/// Skips (returns `None`) unless enabled; otherwise [`installed`], then [`configure`] with
/// `drop_in_extra` added to the `[Service]` drop-in, then [`start`].
async fn installed_and_started(test: &str, drop_in_extra: &str) -> Option<Setup> {
    let setup = installed(test).await?;
    configure(&setup, drop_in_extra).await;
    start(&setup).await;
    Some(setup)
}

/// Skips (returns `None`) unless enabled; otherwise a booted machine with the package
/// installed by `dpkg -i`, as an operator does before providing the token (the package's
/// units are enabled and started, and skipped for want of the token).
async fn installed(test: &str) -> Option<Setup> {
    installed_against(test, |_| {}).await
}

/// [`installed`], with `adjust` applied to the simulator's configuration.
async fn installed_against(test: &str, adjust: impl FnOnce(&mut SimConfig)) -> Option<Setup> {
    if !crate::enabled(test, &crate::SYSTEMD) {
        return None;
    }
    let deb = Deb::open(&deb::under_test()).await;
    let rootfs = rootfs::ensure(&deb.depends).await;
    let sim = simulator(adjust).await;
    let machine = Machine::boot(&rootfs).await;
    dpkg_install(&machine, &deb).await;
    Some(Setup { machine, sim, deb })
}

/// `dpkg -i` of `deb` in the machine (copied to /root first); keeps changed conffiles.
async fn dpkg_install(machine: &Machine, deb: &Deb) -> String {
    let name = format!("{}_{}_{}.deb", deb.package, deb.version, deb.architecture);
    let inside = format!("/root/{name}");
    std::fs::copy(&deb.path, machine.host_path(&inside)).unwrap();
    let phase = Phase::start(format!("dpkg -i {name}"));
    let output = machine
        .sh_ok(&format!("dpkg --force-confold -i {inside} 2>&1"))
        .await;
    phase.done();
    output
}

/// The token as a credential file (root's, 0600) where the unit loads it from, and a
/// drop-in with the simulator's URL (and `extra`), then `daemon-reload`.
async fn configure(setup: &Setup, extra: &str) {
    let machine = &setup.machine;
    machine.write(&setup.deb.token_path(), token(), 0o600);
    machine.write(
        DROP_IN,
        format!(
            "[Service]\nEnvironment=FLOWCOACH_SLACK_API_URL={}\n{extra}\n",
            setup.sim.api_url()
        ),
        0o644,
    );
    machine.ok(&["systemctl", "daemon-reload"]).await;
}

/// `systemctl start`: for `Type=notify` it returns once `READY=1` arrived (or fails).
async fn start(setup: &Setup) {
    let phase = Phase::start("systemctl start flowcoach (until READY=1)");
    let output = setup.machine.exec(&["systemctl", "start", UNIT]).await;
    assert!(
        output.status.success(),
        "systemctl start {UNIT} failed: {}\n{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        setup.machine.status(UNIT).await,
        setup.machine.journal_text(UNIT, 60).await
    );
    phase.done();
    connected(&setup.sim, 1).await;
}

/// Waits until the simulator has seen `hellos` hellos and has a socket open.
async fn connected(sim: &Simulator, hellos: usize) -> Record {
    sim.wait_until(SIM_WAIT, |r| {
        r.hellos() >= hellos && r.open_sockets(APP) >= 1
    })
    .await
    .unwrap_or_else(|e| panic!("the daemon in the machine did not connect: {e:?}"))
}

async fn life(machine: &Machine) -> Props {
    machine.show(UNIT, LIFE).await
}

fn running(props: &Props) -> bool {
    props["ActiveState"] == "active" && props["SubState"] == "running"
}

/// The journal entries of the unit whose message starts with `message`.
fn messages<'a>(journal: &'a [Value], message: &str) -> Vec<&'a Value> {
    journal
        .iter()
        .filter(|e| {
            e["MESSAGE"]
                .as_str()
                .is_some_and(|m| m.starts_with(message))
        })
        .collect()
}

/// The journal entries of the unit whose message contains `text` (systemd's own start
/// with the unit's name).
fn containing<'a>(journal: &'a [Value], text: &str) -> Vec<&'a Value> {
    journal
        .iter()
        .filter(|e| e["MESSAGE"].as_str().is_some_and(|m| m.contains(text)))
        .collect()
}

/// Runs a steady stream of `count` message events at `rate`/s while `during` runs; then
/// waits until the simulator has every one acked and checks, from the journal, that each
/// was handled exactly once (`event handled` lines per `F_EVENT_ID`).
async fn exactly_once_across<F: Future<Output = ()>>(
    setup: &Setup,
    count: u64,
    rate: f64,
    during: impl FnOnce() -> F,
) -> Record {
    let sim = &setup.sim;
    let before = sim.record().envelopes.len();
    let load = sim.start_load(
        APP,
        LoadSpec {
            count,
            rate_per_sec: Some(rate),
            max_outstanding: None,
            mix: LoadMix::EventsOnly,
        },
    );
    // Let the stream get going before the interesting part.
    sim.wait_until(SIM_WAIT, |r| {
        r.envelopes[before..]
            .iter()
            .filter(|e| e.acked_at.is_some())
            .count()
            >= (count / 5) as usize
    })
    .await
    .unwrap_or_else(|e| panic!("the stream is not being acked: {e:?}"));
    during().await;
    let stream_time = Duration::from_secs_f64(count as f64 / rate);
    tokio::time::timeout(stream_time + SIM_WAIT, load)
        .await
        .expect("the load finished injecting")
        .unwrap();
    // Redeliveries (3 s ack deadline, several attempts) bound how long acking can take.
    let record = sim
        .wait_until(SIM_WAIT, |r| r.all_acked())
        .await
        .unwrap_or_else(|e| panic!("envelopes left unacked:\n{}", e.record));
    // A last event after all others: once it is in the journal, so are they.
    let sentinel = format!("EvSentinel{before}");
    flowcoach_harness::acked(sim, event(&sentinel, "the last one")).await;
    setup
        .machine
        .wait_journal(UNIT, "for the sentinel event", SIM_WAIT, |e| {
            e["F_EVENT_ID"] == sentinel.as_str()
        })
        .await;
    let journal = setup.machine.journal(UNIT).await;
    let mut handled: BTreeMap<String, usize> = BTreeMap::new();
    for entry in messages(&journal, "event handled") {
        if let Some(id) = entry["F_EVENT_ID"].as_str() {
            *handled.entry(id.to_owned()).or_default() += 1;
        }
    }
    let streamed: Vec<&str> = record.envelopes[before..]
        .iter()
        .filter_map(|e| e.event_id.as_deref())
        .collect();
    assert_eq!(streamed.len() as u64, count);
    let lost: Vec<&&str> = streamed
        .iter()
        .filter(|id| !handled.contains_key(**id))
        .collect();
    let twice: Vec<(&&str, usize)> = streamed
        .iter()
        .filter_map(|id| handled.get(*id).filter(|n| **n > 1).map(|n| (id, *n)))
        .collect();
    let gave_up = record.envelopes.iter().filter(|e| e.gave_up).count();
    let redelivered = record.envelopes[before..]
        .iter()
        .filter(|e| e.deliveries.len() > 1)
        .count();
    eprintln!(
        "e2e: {count} events streamed: {} handled once, {redelivered} redelivered by the \
         simulator, lost {}, handled twice {}",
        streamed.len() - lost.len() - twice.len(),
        lost.len(),
        twice.len()
    );
    assert!(
        lost.is_empty() && twice.is_empty() && gave_up == 0,
        "lost (never handled): {lost:?}\nhandled more than once: {twice:?}\ngiven up: {gave_up}\n{record}"
    );
    record
}

// ---------------------------------------------------------------------------------------
// The harness itself, with this build's binary and a minimal unit (no package needed).

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn harness_boots_systemd_and_runs_this_builds_daemon_against_the_host_simulator() {
    if !crate::enabled(
        "harness_boots_systemd_and_runs_this_builds_daemon",
        &crate::SYSTEMD,
    ) {
        return;
    }
    let total = Phase::start("test harness");
    let rootfs = rootfs::ensure(&[]).await;
    let sim = simulator(|_| {}).await;
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_flowcoach"))
        .parent()
        .unwrap()
        .to_owned();
    let machine = Machine::boot_with(
        &rootfs,
        &[format!("--bind-ro={}:/opt/build", bin.display())],
    )
    .await;
    machine.write("/etc/flowcoach-e2e/token", token(), 0o600);
    machine.write(
        "/etc/flowcoach-e2e/flowcoach.toml",
        "environment = \"e2e\"\n",
        0o644,
    );
    machine.write(
        "/etc/systemd/system/flowcoach-build.service",
        format!(
            "[Service]\nType=notify\nNotifyAccess=all\n\
             ExecStart=/opt/build/flowcoach --config /etc/flowcoach-e2e/flowcoach.toml\n\
             Environment=FLOWCOACH_SLACK_API_URL={}\n\
             LoadCredential=slack-app-token:/etc/flowcoach-e2e/token\n\
             RuntimeDirectory=flowcoach\nStateDirectory=flowcoach\nWatchdogSec=10\n",
            sim.api_url()
        ),
        0o644,
    );
    machine.ok(&["systemctl", "daemon-reload"]).await;
    machine.ok(&["systemctl", "start", "flowcoach-build"]).await;
    connected(&sim, 1).await;
    let props = machine
        .show("flowcoach-build", &["ActiveState", "StatusText"])
        .await;
    assert_eq!(props["ActiveState"], "active");
    assert!(
        props["StatusText"].starts_with(&format!("connected to {APP}")),
        "{props:?}"
    );
    let acked = flowcoach_harness::acked(&sim, event("EvHarness", "hello from the host")).await;
    assert!(acked.acked_at.is_some());
    // Native journal fields arrive from inside the machine.
    machine
        .wait_journal("flowcoach-build", "event handled", SETTLE, |e| {
            e["F_EVENT_ID"] == "EvHarness"
        })
        .await;
    machine.ok(&["systemctl", "stop", "flowcoach-build"]).await;
    let record = sim
        .wait_until(SIM_WAIT, |r| r.sockets[0].close.is_some())
        .await
        .unwrap();
    assert_eq!(
        record.sockets[0].close,
        Some(CloseKind::ClientCloseHandshake)
    );
    machine.shutdown().await;
    total.done();
}

// ---------------------------------------------------------------------------------------
// The package.

/// Install, configure, start: a notify service that is active only once READY=1 came,
/// shows its live STATUS=, runs as the flowcoach user, and whose control socket answers the
/// admin group and nobody else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn installed_package_runs_as_a_ready_notify_service_with_live_status_and_guarded_control() {
    let total = Phase::start("test install/ready/status/control");
    let Some(setup) = installed("installed_package_runs_as_a_ready_notify_service").await else {
        return;
    };
    let machine = &setup.machine;

    // Without a token the units are enabled, and skipped rather than failed.
    let enabled = machine
        .sh("systemctl is-enabled flowcoach.service flowcoach.socket")
        .await;
    assert_eq!(
        String::from_utf8_lossy(&enabled.stdout).trim(),
        "enabled\nenabled",
        "{enabled:?}"
    );
    let idle = machine
        .show(UNIT, &["ActiveState", "Result", "ConditionResult"])
        .await;
    assert_eq!(idle["ActiveState"], "inactive", "{idle:?}");
    assert_eq!(idle["Result"], "success", "{idle:?}");
    assert_eq!(idle["ConditionResult"], "no", "skipped: {idle:?}");
    assert_eq!(setup.sim.record().open_calls.len(), 0);
    machine.ok(&["getent", "group", "flowcoach"]).await;

    configure(&setup, "").await;
    start(&setup).await;

    let props = machine
        .show(
            UNIT,
            &["Type", "ActiveState", "SubState", "StatusText", "MainPID"],
        )
        .await;
    // Type=notify: "active" is reached only when READY=1 arrived.
    assert_eq!(props["Type"], "notify", "{props:?}");
    assert!(running(&props), "{props:?}");
    let connected_to = format!("connected to {APP}");
    assert!(props["StatusText"].starts_with(&connected_to), "{props:?}");
    let status = machine.status(UNIT).await;
    assert!(
        status.contains(&format!("Status: \"{connected_to}")),
        "systemctl status shows the live STATUS=:\n{status}"
    );
    let user = machine
        .ok(&["stat", "-c", "%U", &format!("/proc/{}", props["MainPID"])])
        .await;
    assert_eq!(user.trim(), "flowcoach", "the daemon runs as its own user");

    // The admin group may use flowcoachctl; another user may not.
    machine
        .ok(&[
            "useradd",
            "--create-home",
            "--groups",
            "flowcoach",
            "fcadmin",
        ])
        .await;
    machine.ok(&["useradd", "--create-home", "outsider"]).await;
    let answer = machine
        .ok(&["runuser", "-u", "fcadmin", "--", "flowcoachctl", "status"])
        .await;
    assert!(
        answer.contains(&format!("pid {}", props["MainPID"]))
            && answer.contains(&format!("app {APP}"))
            && answer.contains("connected")
            && answer.contains("slack-app-token"),
        "flowcoachctl status as a member of group flowcoach:\n{answer}"
    );
    assert!(
        !answer.contains(&flowcoach_harness::token_secret()),
        "{answer}"
    );
    for argv in [
        &["runuser", "-u", "outsider", "--", "flowcoachctl", "status"][..],
        &[
            "runuser",
            "-u",
            "outsider",
            "--",
            "flowcoachctl",
            "--socket",
            "/run/flowcoach/control.sock",
            "status",
        ][..],
    ] {
        let refused = machine.exec(argv).await;
        let said = String::from_utf8_lossy(&refused.stderr).to_lowercase();
        assert!(
            !refused.status.success() && refused.stdout.is_empty(),
            "{argv:?} must be refused: {refused:?}"
        );
        assert!(
            said.contains("permission denied") || said.contains("no flowcoach"),
            "{argv:?}: {said}"
        );
    }
    let health = machine.exec(&["flowcoachctl", "health"]).await;
    assert_eq!(health.status.code(), Some(0), "root may ask: {health:?}");

    setup.machine.shutdown().await;
    total.done();
}

/// `systemctl reload` under a steady stream of events: a new main process takes over in the
/// same service invocation, Slack always has a socket open, and every event is handled
/// exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_hands_over_to_a_new_process_without_losing_or_repeating_an_event() {
    let total = Phase::start("test reload");
    let Some(setup) = installed_and_started("reload_hands_over_to_a_new_process", "").await else {
        return;
    };
    let machine = &setup.machine;
    let before = life(machine).await;
    let record = exactly_once_across(&setup, 600, 100.0, || async {
        let phase = Phase::start("systemctl reload flowcoach (handover)");
        machine.ok(&["systemctl", "reload", UNIT]).await;
        phase.done();
    })
    .await;
    let after = life(machine).await;
    assert!(running(&after), "{after:?}");
    assert_ne!(after["MainPID"], before["MainPID"], "a new main process");
    assert_eq!(
        after["InvocationID"], before["InvocationID"],
        "not restarted"
    );
    assert_eq!(after["NRestarts"], before["NRestarts"]);
    assert_eq!(
        record.zero_open_stretches(APP),
        0,
        "the app always had a socket open:\n{record}"
    );
    let first = record.socket(1).unwrap();
    assert_eq!(
        first.close,
        Some(CloseKind::ClientCloseHandshake),
        "{record}"
    );
    assert_eq!(setup.sim.record().open_sockets(APP), 1);
    live_status_after_handover(machine).await;
    setup.machine.shutdown().await;
    total.done();
}

/// A wedged daemon (SIGSTOP) stops feeding the watchdog: systemd aborts it (SIGABRT,
/// result `watchdog`), restarts it, and it connects again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_daemon_is_aborted_by_the_watchdog_restarted_and_reconnects() {
    let total = Phase::start("test watchdog");
    // The package's WatchdogSec=30s made short, to keep the test quick; the package's
    // Restart=on-failure and RestartSec= are what is exercised.
    let Some(setup) = installed_and_started(
        "a_frozen_daemon_is_aborted_by_the_watchdog",
        "WatchdogSec=4s",
    )
    .await
    else {
        return;
    };
    let machine = &setup.machine;
    let before = life(machine).await;
    let hellos = setup.sim.record().hellos();
    let frozen = before["MainPID"].clone();
    let phase = Phase::start("SIGSTOP until the watchdog restarted the service");
    machine.sh_ok(&format!("kill -STOP {frozen}")).await;
    machine
        .wait_journal(UNIT, "Result=watchdog", SETTLE, |e| {
            e["UNIT_RESULT"] == "watchdog"
                || e["MESSAGE"]
                    .as_str()
                    .is_some_and(|m| m.contains("Failed with result 'watchdog'"))
        })
        .await;
    let restarted_count = (before["NRestarts"].parse::<u32>().unwrap() + 1).to_string();
    let after = machine
        .wait_show(UNIT, LIFE, "restarted and running", SETTLE, |p| {
            running(p) && p["NRestarts"] == restarted_count
        })
        .await;
    phase.done();
    assert_ne!(after["MainPID"], frozen);
    assert_ne!(after["InvocationID"], before["InvocationID"]);
    let journal = machine.journal(UNIT).await;
    for said in [
        "Watchdog timeout".to_owned(),
        format!("Killing process {frozen} (flowcoach) with signal SIGABRT"),
        "Main process exited, code=killed, status=6/ABRT".to_owned(),
    ] {
        assert!(
            !containing(&journal, &said).is_empty(),
            "{said:?} in the journal:\n{}",
            machine.journal_text(UNIT, 40).await
        );
    }
    // A new hello: the restarted daemon reconnected.
    let record = connected(&setup.sim, hellos + 1).await;
    assert!(record.hellos() > hellos);
    flowcoach_harness::acked(&setup.sim, event("EvAfterWatchdog", "still there?")).await;
    setup.machine.shutdown().await;
    total.done();
}

/// A configuration that does not validate: exit 78, the unit failed, and no restart loop
/// (`RestartPreventExitStatus=78`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_configuration_exits_78_and_is_not_restarted() {
    let total = Phase::start("test bad configuration");
    let Some(setup) = installed_and_started("a_bad_configuration_exits_78", "").await else {
        return;
    };
    let machine = &setup.machine;
    let config = machine.host_path(CONFIG);
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("e2e_no_such_key = true\n{good}")).unwrap();
    let open_calls = setup.sim.record().open_calls.len();

    let restart = machine.exec(&["systemctl", "restart", UNIT]).await;
    assert!(
        !restart.status.success(),
        "the restart must fail: {restart:?}"
    );
    let failed = machine
        .wait_show(UNIT, LIFE, "failed", SETTLE, |p| {
            p["ActiveState"] == "failed"
        })
        .await;
    assert_eq!(failed["SubState"], "failed", "{failed:?}");
    assert_eq!(failed["Result"], "exit-code", "{failed:?}");
    assert_eq!(failed["ExecMainStatus"], "78", "{failed:?}");
    let journal = machine.journal(UNIT).await;
    assert!(
        journal.iter().any(|e| {
            e["SYSLOG_IDENTIFIER"] == "flowcoach"
                && e["MESSAGE"]
                    .as_str()
                    .is_some_and(|m| m.contains("e2e_no_such_key"))
        }),
        "the log names the bad key:\n{}",
        machine.journal_text(UNIT, 30).await
    );
    // "failed", not "auto-restart": systemd has decided not to restart. Watch for longer
    // than RestartSec= to see it keep to that.
    let restart_sec = machine.show(UNIT, &["RestartUSec"]).await["RestartUSec"].clone();
    let quiet = humantime::parse_duration(&restart_sec).unwrap_or(Duration::from_secs(5))
        + Duration::from_secs(1);
    tokio::time::sleep(quiet).await;
    let later = life(machine).await;
    assert_eq!(later["ActiveState"], "failed", "{later:?}");
    assert_eq!(later["NRestarts"], failed["NRestarts"], "no restart");
    assert_eq!(
        later["ExecMainPID"], failed["ExecMainPID"],
        "no new process"
    );
    assert_eq!(
        setup.sim.record().open_calls.len(),
        open_calls,
        "the failed start never reached Slack"
    );
    setup.machine.shutdown().await;
    total.done();
}

/// `systemctl stop`: the daemon closes its Slack connection with a Close handshake and the
/// unit ends with result success.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_closes_the_connection_cleanly_and_ends_in_success() {
    let total = Phase::start("test stop");
    let Some(setup) = installed_and_started("stop_closes_the_connection_cleanly", "").await else {
        return;
    };
    let machine = &setup.machine;
    for n in 0..3 {
        flowcoach_harness::acked(&setup.sim, event(&format!("EvBeforeStop{n}"), "hi")).await;
    }
    let phase = Phase::start("systemctl stop flowcoach");
    machine.ok(&["systemctl", "stop", UNIT]).await;
    phase.done();
    let props = life(machine).await;
    assert_eq!(props["ActiveState"], "inactive", "{props:?}");
    assert_eq!(props["Result"], "success", "{props:?}");
    assert_eq!(props["ExecMainStatus"], "0", "{props:?}");
    let record = setup
        .sim
        .wait_until(SIM_WAIT, |r| r.sockets.iter().all(|s| s.close.is_some()))
        .await
        .unwrap_or_else(|e| panic!("a socket stayed open:\n{}", e.record));
    assert_eq!(record.sockets.len(), 1, "{record}");
    assert_eq!(
        record.sockets[0].close,
        Some(CloseKind::ClientCloseHandshake),
        "{record}"
    );
    assert!(record.all_acked(), "{record}");
    setup.machine.shutdown().await;
    total.done();
}

/// `systemctl stop` after a reload: the successor of the handover, which systemd did not
/// start itself, gets the same graceful stop as the original process (SIGTERM, drain,
/// Close), not a SIGKILL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_after_a_reload_lets_the_successor_drain_and_close_cleanly() {
    let total = Phase::start("test stop after reload");
    let Some(setup) =
        installed_and_started("stop_after_a_reload_lets_the_successor_drain", "").await
    else {
        return;
    };
    let machine = &setup.machine;
    let before = life(machine).await;
    machine.ok(&["systemctl", "reload", UNIT]).await;
    let successor = life(machine).await["MainPID"].clone();
    assert_ne!(successor, before["MainPID"]);
    flowcoach_harness::acked(&setup.sim, event("EvAfterReload", "hi")).await;
    let phase = Phase::start("systemctl stop flowcoach (after a handover)");
    machine.ok(&["systemctl", "stop", UNIT]).await;
    phase.done();
    let props = life(machine).await;
    assert_eq!(props["ActiveState"], "inactive", "{props:?}");
    assert_eq!(props["Result"], "success", "{props:?}");
    stopped_by_sigterm_alone(machine).await;
    let journal = machine.journal(UNIT).await;
    assert!(
        messages(&journal, "flowcoach stopped")
            .iter()
            .any(|e| e["_PID"] == successor.as_str()),
        "the successor (pid {successor}) stopped on its own:\n{}",
        machine.journal_text(UNIT, 30).await
    );
    let record = setup
        .sim
        .wait_until(SIM_WAIT, |r| r.open_sockets(APP) == 0)
        .await
        .unwrap_or_else(|e| panic!("a socket stayed open:\n{}", e.record));
    let last = record.sockets.last().unwrap();
    assert_eq!(
        last.close,
        Some(CloseKind::ClientCloseHandshake),
        "the successor's socket:\n{record}"
    );
    setup.machine.shutdown().await;
    total.done();
}

/// The template unit: `flowcoach@dev` serves another app (its own token file, lock and
/// control socket) beside `flowcoach.service`, and `flowcoachctl --env dev` finds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_instance_runs_beside_the_main_unit_with_its_own_token_and_socket() {
    const DEV_APP: &str = "A0SIMDEV01";
    let total = Phase::start("test template instance");
    let Some(setup) = installed_against("a_template_instance_runs_beside_the_main_unit", |c| {
        c.apps.push(SimApp::new(DEV_APP))
    })
    .await
    else {
        return;
    };
    configure(&setup, "").await;
    start(&setup).await;
    let machine = &setup.machine;
    let dev_token = setup.sim.config().apps[1].tokens[0].clone();
    machine.write("/etc/flowcoach/dev.token", &dev_token, 0o600);
    machine.write(
        "/etc/systemd/system/flowcoach@.service.d/e2e.conf",
        format!(
            "[Service]\nEnvironment=FLOWCOACH_SLACK_API_URL={}\n",
            setup.sim.api_url()
        ),
        0o644,
    );
    machine.ok(&["systemctl", "daemon-reload"]).await;
    machine.ok(&["systemctl", "start", "flowcoach@dev"]).await;
    let dev = machine
        .show("flowcoach@dev", &["ActiveState", "StatusText"])
        .await;
    assert_eq!(dev["ActiveState"], "active", "{dev:?}");
    assert!(
        dev["StatusText"].starts_with(&format!("connected to {DEV_APP}")),
        "{dev:?}"
    );
    setup
        .sim
        .wait_until(SIM_WAIT, |r| {
            r.open_sockets(APP) == 1 && r.open_sockets(DEV_APP) == 1
        })
        .await
        .unwrap_or_else(|e| panic!("both apps connected:\n{}", e.record));
    let answer = machine
        .ok(&["flowcoachctl", "--env", "dev", "status"])
        .await;
    assert!(answer.contains(&format!("app {DEV_APP}")), "{answer}");
    assert!(answer.contains("environment dev"), "{answer}");
    // Without a choice, two sockets are ambiguous: flowcoachctl says so.
    let both = machine.exec(&["flowcoachctl", "status"]).await;
    assert!(!both.status.success(), "{both:?}");
    let main = machine.show(UNIT, &["ActiveState"]).await;
    assert_eq!(main["ActiveState"], "active");
    let reply = flowcoach_harness::acked(&setup.sim, event("EvMain", "to the main app")).await;
    assert_eq!(reply.app_id, APP);
    let reply = setup
        .sim
        .inject_and_wait_ack(DEV_APP, event("EvDev", "to the dev app"), SIM_WAIT)
        .await
        .unwrap_or_else(|e| panic!("the dev app's event was not acked: {e:?}"));
    assert_eq!(reply.app_id, DEV_APP);
    machine.ok(&["systemctl", "stop", "flowcoach@dev"]).await;
    setup.machine.shutdown().await;
    total.done();
}

/// systemd never had to SIGKILL a flowcoach process: every stop was graceful.
async fn stopped_by_sigterm_alone(machine: &Machine) {
    let journal = machine.journal(UNIT).await;
    let killed = containing(&journal, "with signal SIGKILL");
    assert!(
        killed.is_empty(),
        "systemd SIGKILLed flowcoach instead of letting it drain (after a handover systemd 252 \
         supervises a main PID that was not its child and does not wait for it after SIGTERM):\n{}",
        machine.journal_text(UNIT, 30).await
    );
}

/// Upgrading the package while it serves a steady stream hands over to the new binary (new
/// main process, same invocation: never stopped, never restarted) without losing or
/// repeating an event; purging then removes everything the package installed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_hands_over_without_restart_and_purge_removes_everything() {
    let total = Phase::start("test upgrade and purge");
    let Some(setup) = installed_and_started("upgrade_hands_over_without_restart", "").await else {
        return;
    };
    let machine = &setup.machine;
    let newer = setup.deb.bumped("+e2e1").await;
    let before = life(machine).await;
    let jobs_before = jobs(&machine.journal(UNIT).await);

    let mut said = String::new();
    let record = exactly_once_across(&setup, 600, 100.0, || async {
        said = dpkg_install(machine, &newer).await;
    })
    .await;
    let installed_version = machine
        .ok(&["dpkg-query", "-W", "-f=${Version}", &setup.deb.package])
        .await;
    assert_eq!(installed_version, newer.version);
    let after = life(machine).await;
    assert!(running(&after), "{after:?}\n{said}");
    assert_ne!(
        after["MainPID"], before["MainPID"],
        "handed over to a new process:\n{said}"
    );
    assert_eq!(
        after["InvocationID"], before["InvocationID"],
        "same invocation: not restarted\n{said}"
    );
    assert_eq!(
        after["ActiveEnterTimestamp"],
        before["ActiveEnterTimestamp"]
    );
    assert_eq!(after["NRestarts"], before["NRestarts"]);
    let jobs_after = jobs(&machine.journal(UNIT).await);
    for kind in ["start", "stop", "restart"] {
        assert_eq!(
            jobs_after.get(kind),
            jobs_before.get(kind),
            "no {kind} job during the upgrade; jobs before {jobs_before:?}, after {jobs_after:?}"
        );
    }
    assert_eq!(
        record.zero_open_stretches(APP),
        0,
        "the app always had a socket open:\n{record}"
    );
    live_status_after_handover(machine).await;

    // Purge: nothing the package installed stays, nor its configuration and state.
    let listed = machine.ok(&["dpkg", "-L", &setup.deb.package]).await;
    let rootfs = rootfs::ensure(&setup.deb.depends).await;
    let phase = Phase::start("dpkg --purge");
    let purge = machine
        .sh_ok(&format!("dpkg --purge {} 2>&1", setup.deb.package))
        .await;
    phase.done();
    // Our own additions are the operator's to remove.
    machine
        .ok(&["rm", "-rf", "/etc/systemd/system/flowcoach.service.d"])
        .await;
    let left: Vec<&str> = listed
        .lines()
        .filter(|path| path.starts_with('/') && *path != "/.")
        // Directories of the base system (/usr/bin, …) stay, of course.
        .filter(|path| !rootfs.join(path.trim_start_matches('/')).exists())
        .filter(|path| machine.exists(path))
        .collect();
    assert!(left.is_empty(), "left by purge: {left:?}\n{purge}");
    for dir in ["/etc/flowcoach", "/var/lib/flowcoach", "/run/flowcoach"] {
        assert!(!machine.exists(dir), "{dir} left by purge\n{purge}");
    }
    let found = machine
        .sh_ok("find /etc /usr /lib /var /run /root -name '*flowcoach*' ! -name '*.deb'")
        .await;
    assert_eq!(
        found.trim(),
        "",
        "files named after flowcoach left by purge"
    );
    let gone = machine.show(UNIT, &["LoadState", "ActiveState"]).await;
    assert_eq!(gone["LoadState"], "not-found", "{gone:?}");
    let processes = machine
        .sh_ok("cat /proc/[0-9]*/comm 2>/dev/null | grep -c '^flowcoach' || true")
        .await;
    assert_eq!(processes.trim(), "0", "no flowcoach process left");
    stopped_by_sigterm_alone(machine).await;
    let last = setup
        .sim
        .wait_until(SIM_WAIT, |r| r.open_sockets(APP) == 0)
        .await
        .unwrap_or_else(|e| panic!("a socket stayed open after purge:\n{}", e.record));
    assert!(
        last.sockets
            .iter()
            .filter(|s| s.hello.is_some())
            .all(|s| s.close == Some(CloseKind::ClientCloseHandshake)),
        "every socket was closed cleanly:\n{last}"
    );
    setup.machine.shutdown().await;
    total.done();
}

/// After a handover, `systemctl status` shows the successor's live `STATUS=`, not what
/// the old process said on its way out.
async fn live_status_after_handover(machine: &Machine) {
    let props = machine.show(UNIT, &["StatusText", "MainPID"]).await;
    assert!(
        props["StatusText"].starts_with(&format!("connected to {APP}")),
        "after the handover systemd shows STATUS={:?} although pid {} serves: the old \
         process's last STATUS= came after MAINPID= (NotifyAccess=all)\n{}",
        props["StatusText"],
        props["MainPID"],
        machine.journal_text(UNIT, 25).await
    );
}

/// How many jobs of each type (start, stop, reload, restart) systemd finished for the
/// unit, from the journal's `JOB_TYPE` fields.
fn jobs(journal: &[Value]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for entry in journal {
        if let Some(kind) = entry["JOB_TYPE"].as_str() {
            *counts.entry(kind.to_owned()).or_default() += 1;
        }
    }
    counts
}
