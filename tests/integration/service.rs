//! The daemon as a service on one host: one instance per app, exit 75 naming the holder,
//! recovery after `kill -9`, socket activation, graceful drain on SIGTERM.

use std::process::Stdio;
use std::time::Duration;

use flowcoach_harness::{
    APP, Daemon, WAIT, acked, connected, event, first_socket_closed_cleanly, simulator, token,
};
use flowcoach_sim::{LoadMix, LoadSpec, Simulator};
use nix::sys::signal::Signal;

fn shared_dir_env(dir: &std::path::Path) -> [(&'static str, String); 1] {
    [("FLOWCOACH_RUNTIME_DIR", dir.display().to_string())]
}

fn start_in(sim: &Simulator, dir: &std::path::Path) -> Daemon {
    let [(key, value)] = shared_dir_env(dir);
    Daemon::start_with(
        sim,
        flowcoach_harness::FAST_CONFIG,
        &[(key, value.as_str())],
    )
}

async fn ctl(args: &[&str], socket: &std::path::Path) -> std::process::Output {
    let socket = socket.display().to_string();
    let args = [args, &["--socket", socket.as_str()]].concat();
    flowcoach_harness::ctl::run(&args, &[]).await
}

fn socket_path(dir: &std::path::Path) -> std::path::PathBuf {
    dir.join(format!("{APP}.test.sock"))
}

#[tokio::test]
async fn a_second_instance_exits_75_naming_the_first() {
    let sim = simulator(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut first = start_in(&sim, dir.path());
    connected(&sim).await;
    first.wait_log("connected to Slack", |_| true).await;

    let mut second = start_in(&sim, dir.path());
    assert_eq!(second.exit_code().await, 75);
    let said = second.stderr();
    let pid = first.pid().to_string();
    assert!(said.contains(&format!("pid {pid}")), "{said}");
    assert!(said.contains("environment test"), "{said}");
    assert!(said.contains("connected since"), "{said}");
    assert!(
        said.contains(&socket_path(dir.path()).display().to_string()),
        "{said}"
    );
    // The second never reached Slack.
    assert_eq!(sim.record().open_calls.len(), 1);

    first.stop().await;
}

#[tokio::test]
async fn of_twenty_simultaneous_starts_exactly_one_runs() {
    let sim = simulator(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut daemons: Vec<Daemon> = (0..20).map(|_| start_in(&sim, dir.path())).collect();
    connected(&sim).await;
    let mut exits = Vec::new();
    let mut running = Vec::new();
    let mut losers = Vec::new();
    for mut daemon in daemons.drain(..) {
        // The losers exit on their own; the winner keeps running.
        match tokio::time::timeout(Duration::from_secs(10), daemon.child.wait()).await {
            Ok(status) => {
                exits.push(status.unwrap().code());
                losers.push(daemon);
            }
            Err(_) => running.push(daemon),
        }
    }
    assert_eq!(running.len(), 1, "exits: {exits:?}");
    assert!(exits.iter().all(|code| *code == Some(75)), "{exits:?}");
    assert_eq!(
        sim.record().open_calls.len(),
        1,
        "only the winner reached Slack"
    );
    let mut winner = running.pop().unwrap();
    // Every loser named the winner, even one that looked while the winner was still
    // writing the PID file.
    let named = format!("pid {},", winner.pid());
    for loser in &mut losers {
        loser.exit_code().await;
        let said = loser.stderr();
        assert!(said.contains(&named), "the winner is {named}: {said}");
    }
    winner.stop().await;
}

#[tokio::test]
async fn a_stale_lock_after_kill_9_does_not_block_the_next_start() {
    let sim = simulator(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let mut victim = start_in(&sim, dir.path());
    connected(&sim).await;
    victim.signal(Signal::SIGKILL);
    victim.child.wait().await.unwrap();
    // The PID file and the socket file are still there, naming a dead process.
    assert!(dir.path().join(format!("{APP}.test.pid")).exists());
    let mut next = start_in(&sim, dir.path());
    next.wait_log("connected to Slack", |_| true).await;
    let pid_file = std::fs::read_to_string(dir.path().join(format!("{APP}.test.pid"))).unwrap();
    assert_eq!(
        pid_file.lines().next(),
        Some(next.pid().to_string().as_str())
    );
    let status = ctl(&["status"], &socket_path(dir.path())).await;
    assert_eq!(status.status.code(), Some(0), "{status:?}");
    next.stop().await;
}

#[tokio::test]
async fn flowcoachctl_reports_on_the_running_daemon() {
    let sim = simulator(|_| {}).await;
    let mut daemon = Daemon::start_connected(&sim).await;
    daemon.wait_log("connected to Slack", |_| true).await;
    let socket = socket_path(&daemon.runtime_dir);
    let status = ctl(&["status"], &socket).await;
    let text = String::from_utf8_lossy(&status.stdout).to_string();
    assert_eq!(status.status.code(), Some(0), "{status:?}");
    assert!(text.contains(&format!("pid {}", daemon.pid())), "{text}");
    assert!(text.contains("connected"), "{text}");
    assert!(text.contains("SLACK_APP_TOKEN"), "{text}");
    assert!(!text.contains(&flowcoach_harness::token_secret()), "{text}");
    let json = ctl(&["status", "--json"], &socket).await;
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["app_id"], APP);
    assert_eq!(report["sockets_open"], 1);
    let health = ctl(&["health"], &socket).await;
    assert_eq!(health.status.code(), Some(0), "{health:?}");
    // Found without --socket: the only daemon in the runtime directory.
    let found = std::process::Command::new(env!("CARGO_BIN_EXE_flowcoachctl"))
        .arg("health")
        .env_clear()
        .env("FLOWCOACH_RUNTIME_DIR", &daemon.runtime_dir)
        .output()
        .unwrap();
    assert_eq!(found.status.code(), Some(0), "{found:?}");
    daemon.stop().await;
    let gone = ctl(&["health"], &socket).await;
    assert_eq!(gone.status.code(), Some(2), "no daemon answers");
}

#[tokio::test]
async fn sigterm_under_load_acks_every_accepted_envelope_and_closes_cleanly() {
    let sim = simulator(|_| {}).await;
    let mut daemon = Daemon::start_connected(&sim).await;
    let load = sim.start_load(
        APP,
        LoadSpec {
            count: 400,
            rate_per_sec: Some(200.0),
            max_outstanding: None,
            mix: LoadMix::Mixed,
        },
    );
    sim.wait_until(WAIT, |r| {
        r.envelopes.iter().filter(|e| e.acked_at.is_some()).count() >= 100
    })
    .await
    .unwrap();
    daemon.stop().await;
    load.abort();
    let record = first_socket_closed_cleanly(&sim).await;
    // Envelopes delivered before the stop were acked; those that arrived while stopping
    // were left for Slack to redeliver, and said so.
    let delivered: Vec<_> = record
        .envelopes
        .iter()
        .filter(|e| !e.deliveries.is_empty())
        .collect();
    let unacked = delivered.iter().filter(|e| e.acked_at.is_none()).count();
    let deferred = [
        "the service is stopping",
        "envelope arrived after our Close",
    ]
    .iter()
    .map(|message| daemon.count_by(message, "message").values().sum::<usize>())
    .sum::<usize>()
        // Kept in the inbox but not yet acked when the socket's retirement came: on disk,
        // so Slack's redelivery is deduplicated and nothing is delivered twice.
        + daemon
            .logs()
            .iter()
            .filter(|line| {
                line["message"] == "acks still pending at the retirement deadline; closing anyway"
            })
            .map(|line| line["pending"].as_u64().unwrap() as usize)
            .sum::<usize>();
    assert_eq!(
        unacked, deferred,
        "every unacked envelope was deliberately left for redelivery"
    );
    assert!(delivered.len() - unacked >= 100);
    daemon.assert_token_never_printed();
}

#[tokio::test]
async fn control_socket_from_systemd_socket_activation() {
    let sim = simulator(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("activated.sock");
    let runtime = tempfile::tempdir().unwrap();
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(config.path(), flowcoach_harness::FAST_CONFIG).unwrap();
    // systemd-socket-activate clears the environment: everything goes through -E.
    let mut child = tokio::process::Command::new("systemd-socket-activate")
        .arg("-l")
        .arg(&socket)
        .arg("--fdname=control")
        .arg(format!("--setenv=SLACK_APP_TOKEN={}", token()))
        .arg(format!(
            "--setenv=FLOWCOACH_SLACK_API_URL={}",
            sim.api_url()
        ))
        .arg(format!(
            "--setenv=FLOWCOACH_RUNTIME_DIR={}",
            runtime.path().display()
        ))
        .arg(env!("CARGO_BIN_EXE_flowcoach"))
        .arg("--config")
        .arg(config.path())
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("systemd-socket-activate (package systemd) is installed");
    // It says "Listening on …" once the socket is bound, then starts flowcoach on the
    // first connection, which waits in the backlog meanwhile.
    let stderr = child.stderr.take().unwrap();
    let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stderr));
    tokio::time::timeout(WAIT, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("Listening on") {
                return;
            }
        }
        panic!("systemd-socket-activate ended without listening");
    })
    .await
    .expect("socket bound");
    let status = ctl(&["status", "--json", "--timeout", "15s"], &socket).await;
    assert!(status.status.success(), "{status:?}");
    let report: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(report["pid"].as_u64().is_some());
    // The daemon did not bind a socket of its own in its runtime directory.
    assert!(!runtime.path().join(format!("{APP}.test.sock")).exists());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(report["pid"].as_u64().unwrap() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    let exit = tokio::time::timeout(WAIT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(exit.code(), Some(0));
}

#[tokio::test]
async fn sighup_reloads_what_can_change_and_refuses_a_bad_file() {
    let sim = simulator(|_| {}).await;
    let mut daemon = Daemon::start_connected(&sim).await;
    let original = std::fs::read_to_string(daemon.config_path()).unwrap();

    let changed = original.replace("ping_interval = \"1s\"", "ping_interval = \"2s\"")
        + "\n[log]\nlevel = \"debug\"\n[dispatch]\ndedup_capacity = 5000\n";
    std::fs::write(daemon.config_path(), changed).unwrap();
    daemon.signal(Signal::SIGHUP);
    daemon.wait_log("configuration reloaded", |_| true).await;
    daemon
        .wait_log(
            "changed in the configuration, but takes effect only after a restart",
            |l| l["field"] == "dispatch.dedup_capacity",
        )
        .await;

    std::fs::write(
        daemon.config_path(),
        "[connection]\nping_interval = \"soon\"\n",
    )
    .unwrap();
    daemon.signal(Signal::SIGHUP);
    daemon
        .wait_log("reload refused; the running configuration stays", |l| {
            l["error"]
                .as_str()
                .is_some_and(|e| e.contains("ping_interval"))
        })
        .await;
    // Still serving.
    acked(&sim, event("EvAfterReload", "hi")).await;
    daemon.stop().await;
}

#[tokio::test]
async fn a_token_of_another_app_is_refused_once_hello_names_the_app() {
    // The simulator's app is A0SIMAPP01; this token's hint says A0OTHERAPP.
    let sim = simulator(|c| c.apps[0].tokens.push("xapp-1-A0OTHERAPP-1-cafe".into())).await;
    let mut daemon = Daemon::start_with(
        &sim,
        flowcoach_harness::FAST_CONFIG,
        &[("SLACK_APP_TOKEN", "xapp-1-A0OTHERAPP-1-cafe")],
    );
    assert_eq!(daemon.exit_code().await, 78);
    let said = daemon.stderr();
    assert!(said.contains("A0OTHERAPP") && said.contains(APP), "{said}");
}
