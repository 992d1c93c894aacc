//! Environments and conflicts: dev and prod kept apart, token sources, app pinning, other
//! clients of the same app detected, token rotation on SIGHUP.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use flowcoach_harness::{
    APP, Daemon, FAST_CONFIG, WAIT, acked, all_acked_in_time, event, simulator, token,
};
use flowcoach_sim::{LoadMix, LoadSpec, Record, Simulator};
use nix::sys::signal::Signal;

const DEV_APP: &str = "A0DEV00001";

/// dev and prod side by side in one file; the simulator's app plays prod.
fn two_environments(dev_token_file: Option<&Path>) -> String {
    let dev_file = dev_token_file
        .map(|path| format!("token_file = {:?}\n", path.display().to_string()))
        .unwrap_or_default();
    format!(
        "{FAST_CONFIG}\n[environments.dev]\napp_id = \"{DEV_APP}\"\n{dev_file}\n[environments.prod]\napp_id = \"{APP}\"\n"
    )
}

fn write_token(dir: &Path, name: &str, token: &str, mode: u32) -> std::path::PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    path
}

fn check_config(config_text: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), config_text).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_flowcoach"));
    command
        .arg("--config")
        .arg(file.path())
        .arg("check-config")
        .args(args)
        .env_clear()
        // Where the inbox would go (check-config creates nothing).
        .env("STATE_DIRECTORY", "/var/lib/flowcoach");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().unwrap()
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

async fn ctl(args: &[&str], runtime_dir: &Path) -> Output {
    let dir = runtime_dir.display().to_string();
    flowcoach_harness::ctl::run(args, &[("FLOWCOACH_RUNTIME_DIR", dir.as_str())]).await
}

/// A token the simulator's app accepts besides the first: where a rotation moves to.
const ROTATED: &str = "xapp-2-A0SIMAPP01-2-newsecret";

/// A configuration whose environment prod is pinned to the simulator's app and reads its
/// token from `token_file`.
fn prod_config(token_file: &Path) -> String {
    format!(
        "{FAST_CONFIG}\n[environments.prod]\napp_id = \"{APP}\"\ntoken_file = {:?}\n",
        token_file.display().to_string()
    )
}

async fn hellos(sim: &Simulator, count: usize) -> Record {
    sim.wait_until(WAIT, |r| r.hellos() >= count)
        .await
        .expect("hellos")
}

#[tokio::test]
async fn a_dev_run_given_the_prod_token_refuses_and_says_why() {
    let sim = simulator(|_| {}).await;
    let expected = format!(
        "env dev is pinned to {DEV_APP}, but this token belongs to {APP}, the app of env prod"
    );
    let checked = check_config(
        &two_environments(None),
        &["--env", "dev"],
        &[("SLACK_APP_TOKEN", &token())],
    );
    assert_eq!(checked.status.code(), Some(78), "{}", text(&checked));
    assert!(text(&checked).contains(&expected), "{}", text(&checked));

    let mut daemon = Daemon::start_args(&sim, &two_environments(None), &[], &["--env", "dev"]);
    assert_eq!(daemon.exit_code().await, 78);
    assert!(daemon.stderr().contains(&expected), "{}", daemon.stderr());
    assert!(
        sim.record().open_calls.is_empty(),
        "refused before connecting"
    );

    // FLOWCOACH_ENV selects the same way, and prod with its own token is fine.
    let prod = check_config(
        &two_environments(None),
        &[],
        &[("SLACK_APP_TOKEN", &token()), ("FLOWCOACH_ENV", "prod")],
    );
    assert_eq!(prod.status.code(), Some(0), "{}", text(&prod));
    let out = text(&prod);
    assert!(
        out.contains("environment:  prod") && out.contains(&format!("pinned app:   {APP}")),
        "{out}"
    );
    assert!(out.contains(&format!("{APP}.prod.pid")), "{out}");
    assert!(
        out.contains(&format!("other envs:   dev ({DEV_APP})")),
        "{out}"
    );
}

#[tokio::test]
async fn hello_naming_another_app_stops_the_service() {
    // A token whose app cannot be read from it: only Slack's hello tells.
    let opaque = "xapp-opaque-secret";
    let sim = simulator(|c| c.apps[0].tokens.push(opaque.into())).await;
    let mut daemon = Daemon::start_args(
        &sim,
        &two_environments(None),
        &[("SLACK_APP_TOKEN", opaque)],
        &["--env", "dev"],
    );
    assert_eq!(daemon.exit_code().await, 78);
    let said = daemon.stderr();
    assert!(
        said.contains(&format!(
            "env dev is pinned to {DEV_APP}, but Slack's hello says this token belongs to {APP}, the app of env prod"
        )),
        "{said}"
    );
}

#[tokio::test]
async fn an_unknown_environment_is_refused_naming_the_known_ones() {
    let checked = check_config(
        &two_environments(None),
        &["--env", "staging"],
        &[("SLACK_APP_TOKEN", &token())],
    );
    assert_eq!(checked.status.code(), Some(78));
    assert!(text(&checked).contains("dev, prod"), "{}", text(&checked));
}

#[tokio::test]
async fn token_sources_in_order_and_where_the_token_came_from() {
    let sim = simulator(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let config = prod_config(&dir.path().join("prod.token"));

    // A token file of the environment (mode 600) wins over the variable.
    write_token(dir.path(), "prod.token", &token(), 0o600);
    let mut daemon = Daemon::start_args(
        &sim,
        &config,
        &[("SLACK_APP_TOKEN", "xapp-1-A0SIMAPP01-9-wrong")],
        &["--env", "prod"],
    );
    daemon.wait_log("connected to Slack", |_| true).await;
    let status = ctl(&["status"], &daemon.runtime_dir).await;
    let out = text(&status);
    assert!(
        out.contains(&format!(
            "from file {}",
            dir.path().join("prod.token").display()
        )),
        "{out}"
    );
    assert!(
        !out.contains("simsecret") && !out.contains(&flowcoach_harness::token_secret()),
        "{out}"
    );
    daemon.stop().await;

    // A systemd credential wins over the file.
    let creds = tempfile::tempdir().unwrap();
    write_token(creds.path(), "slack-app-token", &token(), 0o400);
    let checked = check_config(
        &config,
        &["--env", "prod"],
        &[("CREDENTIALS_DIRECTORY", creds.path().to_str().unwrap())],
    );
    assert!(
        text(&checked).contains("from systemd credential"),
        "{}",
        text(&checked)
    );

    // Without file or credential, the variable.
    std::fs::remove_file(dir.path().join("prod.token")).unwrap();
    let checked = check_config(
        &config,
        &["--env", "prod"],
        &[("SLACK_APP_TOKEN", &token())],
    );
    assert!(
        text(&checked).contains("(from SLACK_APP_TOKEN)"),
        "{}",
        text(&checked)
    );

    // A token file readable by others is refused, even with the variable set.
    write_token(dir.path(), "prod.token", &token(), 0o644);
    let mut refused = Daemon::start_args(&sim, &config, &[], &["--env", "prod"]);
    assert_eq!(refused.exit_code().await, 78);
    assert!(
        refused.stderr().contains("readable by group or others"),
        "{}",
        refused.stderr()
    );
    refused.assert_token_never_printed();
}

#[tokio::test]
async fn another_client_of_the_app_is_detected_within_one_hello() {
    let sim = simulator(|_| {}).await;
    // Separate runtime directories: the second process stands for another host.
    let mut first = Daemon::start(&sim, "");
    hellos(&sim, 1).await;
    let mut second = Daemon::start(&sim, "");
    second
        .wait_log(
            "Slack counts 2 open sockets for app A0SIMAPP01 but this instance holds 1",
            |l| l["others"] == 1,
        )
        .await;
    let health = ctl(&["health"], &second.runtime_dir).await;
    assert_eq!(health.status.code(), Some(1));
    assert!(
        text(&health).contains("another client"),
        "{}",
        text(&health)
    );
    let status = ctl(&["status", "--json"], &second.runtime_dir).await;
    let report: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(report["num_connections"], 2);
    second.stop().await;
    first.stop().await;
}

#[tokio::test]
async fn the_exit_policy_stops_with_75_when_another_client_is_connected() {
    let sim = simulator(|_| {}).await;
    let mut first = Daemon::start(&sim, "");
    hellos(&sim, 1).await;
    let mut second = Daemon::start(&sim, "[conflicts]\nother_clients = \"exit\"\n");
    assert_eq!(second.exit_code().await, 75);
    assert!(
        second.stderr().contains("another client"),
        "{}",
        second.stderr()
    );
    acked(&sim, event("EvFirstStillServes", "x")).await;
    first.stop().await;
}

#[tokio::test]
async fn our_own_recent_sockets_are_not_taken_for_other_clients() {
    // After an abrupt drop, Slack still counts the dead socket at the next hello.
    let sim = simulator(|c| c.stale_socket_ttl = std::time::Duration::from_secs(30)).await;
    let mut daemon = Daemon::start(&sim, "");
    let record = hellos(&sim, 1).await;
    sim.make_stale(record.sockets[0].id);
    daemon
        .wait_log("connected to Slack", |l| l["num_connections"] == 2)
        .await;
    let health = ctl(&["health"], &daemon.runtime_dir).await;
    assert_eq!(health.status.code(), Some(0), "{}", text(&health));
    daemon.stop().await;
}

#[tokio::test]
async fn repeated_too_many_websockets_make_health_unhealthy_with_a_diagnosis() {
    let sim = simulator(|c| c.max_sockets_per_app = 1).await;
    let mut holder = Daemon::start(&sim, "");
    hellos(&sim, 1).await;
    let mut refused = Daemon::start(
        &sim,
        "[conflicts]\ntoo_many_websockets_unhealthy_after = 2\n",
    );
    refused
        .wait_log_count("Slack refused the connection with too_many_websockets", 2)
        .await;
    let health = ctl(&["health"], &refused.runtime_dir).await;
    assert_eq!(health.status.code(), Some(1));
    let said = text(&health);
    assert!(said.starts_with("unhealthy: Slack refused"), "{said}");
    assert!(
        said.contains("other clients hold app A0SIMAPP01's sockets"),
        "{said}"
    );
    refused.stop().await;
    holder.stop().await;
}

#[tokio::test]
async fn a_new_token_on_sighup_moves_the_connection_without_a_gap() {
    let sim = simulator(|c| c.apps[0].tokens.push(ROTATED.into())).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_token(dir.path(), "prod.token", &token(), 0o600);
    let config = prod_config(&file);
    let mut daemon = Daemon::start_args(
        &sim,
        &config,
        &[("SLACK_APP_TOKEN", "")],
        &["--env", "prod"],
    );
    hellos(&sim, 1).await;
    let load = sim.start_load(
        APP,
        flowcoach_sim::LoadSpec {
            count: 200,
            rate_per_sec: Some(100.0),
            max_outstanding: None,
            mix: flowcoach_sim::LoadMix::EventsOnly,
        },
    );
    write_token(dir.path(), "prod.token.new", ROTATED, 0o600);
    std::fs::rename(dir.path().join("prod.token.new"), &file).unwrap();
    daemon.signal(Signal::SIGHUP);
    let record = sim
        .wait_until(WAIT, |r| {
            r.hellos() >= 2
                && r.open_calls.last().and_then(|c| c.token.as_deref()) == Some(ROTATED)
                && r.sockets[0].closed_at.is_some()
        })
        .await
        .expect("rotated to the new token");
    assert_eq!(
        record.zero_open_stretches(APP),
        0,
        "no moment without a connection"
    );
    tokio::time::timeout(WAIT, load).await.unwrap().unwrap();
    sim.wait_until(WAIT, |r| r.envelopes.len() == 200 && r.all_acked())
        .await
        .expect("every envelope acked");
    daemon
        .wait_log("the app token changed", |l| {
            l["token"] == "xapp-2-A0SIMAPP01-…"
        })
        .await;
    daemon.assert_token_never_printed();
    assert!(!daemon.stderr().contains("newsecret"));
    daemon.stop().await;
}

#[tokio::test]
async fn after_a_sighup_rotation_status_names_where_the_token_comes_from_now() {
    let sim = simulator(|c| c.apps[0].tokens.push(ROTATED.into())).await;
    let dir = tempfile::tempdir().unwrap();
    // The environment names a token file that does not exist yet: the variable is used.
    let file = dir.path().join("prod.token");
    let config = prod_config(&file);
    let mut daemon = Daemon::start_args(&sim, &config, &[], &["--env", "prod"]);
    hellos(&sim, 1).await;
    let before = text(&ctl(&["status"], &daemon.runtime_dir).await);
    assert!(
        before.contains("token:        from SLACK_APP_TOKEN"),
        "{before}"
    );
    write_token(dir.path(), "prod.token", ROTATED, 0o600);
    daemon.signal(Signal::SIGHUP);
    daemon.wait_log("new app token", |_| true).await;
    sim.wait_until(WAIT, |r| {
        r.hellos() >= 2 && r.open_calls.last().and_then(|c| c.token.as_deref()) == Some(ROTATED)
    })
    .await
    .expect("rotated to the token of the file");
    let after = text(&ctl(&["status"], &daemon.runtime_dir).await);
    assert!(
        after.contains(&format!("token:        from file {}", file.display())),
        "{after}"
    );
    assert!(!after.contains("newsecret"), "{after}");
    daemon.stop().await;
}

/// Token changes under a stream of events, slash commands and interactions: each moves the
/// connection, and what reaches the retiring socket after its Close is acked on the new
/// one, so every envelope is acked on its first delivery, within the ack deadline.
#[tokio::test]
async fn token_rotations_under_a_mixed_stream_ack_every_envelope_in_time() {
    const ROTATIONS: usize = 10;
    let sim = simulator(|c| c.apps[0].tokens.push(ROTATED.into())).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write_token(dir.path(), "prod.token", &token(), 0o600);
    let config = prod_config(&file);
    let mut daemon = Daemon::start_args(
        &sim,
        &config,
        &[("SLACK_APP_TOKEN", "")],
        &["--env", "prod"],
    );
    hellos(&sim, 1).await;
    let load = sim.start_load(
        APP,
        LoadSpec {
            count: 100_000,
            rate_per_sec: Some(200.0),
            max_outstanding: None,
            mix: LoadMix::Mixed,
        },
    );
    let acked = |r: &Record| r.envelopes.iter().filter(|e| e.acked_at.is_some()).count();
    for round in 1..=ROTATIONS {
        let next = if round % 2 == 1 {
            ROTATED.to_owned()
        } else {
            token()
        };
        write_token(dir.path(), "prod.token.new", &next, 0o600);
        std::fs::rename(dir.path().join("prod.token.new"), &file).unwrap();
        daemon.signal(Signal::SIGHUP);
        // The retired socket has closed, and the stream goes on through the new one.
        let before = acked(&sim.record());
        sim.wait_until(WAIT, |r| {
            r.hellos() > round
                && r.sockets[round - 1].closed_at.is_some()
                && acked(r) >= before + 20
        })
        .await
        .unwrap_or_else(|e| panic!("rotation {round}: {e}"));
    }
    load.abort();
    let record = all_acked_in_time(&sim).await;
    assert_eq!(record.hellos(), ROTATIONS + 1, "{record}");
    daemon.stop().await;
}
