//! The README's "Under systemd": the packaged `flowcoach.service` with `[forward]` and the
//! signing secret as its credential, and the app in a unit of its own,
//! `examples/systemd/mybot.service`, with the demo app (`flowcoach-dev app`, release build)
//! as the app. Both read their secrets from systemd credentials: never in argv, the
//! environment systemd shows, or the journal.

use super::{CONFIG, Setup, UNIT, configure, installed_against, start};
use crate::round_trip::{self, assert_no_secret};
use crate::{Phase, repo};

const APP_UNIT: &str = "mybot.service";
/// Where the example unit loads the two secrets from.
const SIGNING_SECRET: &str = "/etc/flowcoach/slack-signing-secret";
const BOT_TOKEN: &str = "/etc/mybot/bot-token";
/// The example's app command, and what the test runs instead.
const EXAMPLE_APP: &str = "/opt/mybot/venv/bin/python /opt/mybot/app.py";
const DEMO_APP: &str = "/opt/mybot/flowcoach-dev app";

/// The app's settings for this machine: the port it serves on and the simulator's Web API,
/// as an operator's drop-in would set them.
const APP_DROP_IN: &str = "/etc/systemd/system/mybot.service.d/e2e.conf";

/// Installs the app as the README says: the secrets root's, the example unit (its app
/// command replaced), `[forward]` in flowcoach's settings; flowcoach's drop-in gets the
/// signing secret credential (`systemctl edit flowcoach`).
async fn install_the_app(setup: &Setup, port: u16) {
    let machine = &setup.machine;
    machine.write(SIGNING_SECRET, round_trip::signing_secret(), 0o600);
    machine.write(BOT_TOKEN, round_trip::bot_token(), 0o600);
    let binary = machine.host_path("/opt/mybot/flowcoach-dev");
    std::fs::create_dir_all(binary.parent().unwrap()).unwrap();
    std::fs::copy(crate::demo_app(), &binary).unwrap();
    let example = std::fs::read_to_string(repo().join("examples/systemd/mybot.service")).unwrap();
    assert!(
        example.contains(EXAMPLE_APP),
        "the example runs {EXAMPLE_APP}"
    );
    machine.write(
        &format!("/etc/systemd/system/{APP_UNIT}"),
        example.replace(EXAMPLE_APP, DEMO_APP),
        0o644,
    );
    machine.write(
        APP_DROP_IN,
        format!(
            "[Service]\nEnvironment=PORT={port} SLACK_API_URL={}\n",
            setup.sim.api_url()
        ),
        0o644,
    );
    let config = machine.host_path(CONFIG);
    let settings = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, settings + &round_trip::forward_section(port)).unwrap();
    configure(
        setup,
        &format!("LoadCredential=slack-signing-secret:{SIGNING_SECRET}"),
    )
    .await;
}

/// Starts the app's unit and waits until it serves (its first line in the journal).
async fn start_the_app(setup: &Setup) {
    let machine = &setup.machine;
    let since = machine.show(APP_UNIT, &["InvocationID"]).await;
    machine.ok(&["systemctl", "start", APP_UNIT]).await;
    let invocation = machine.show(APP_UNIT, &["InvocationID"]).await["InvocationID"].clone();
    assert_ne!(invocation, since["InvocationID"], "a new start");
    machine
        .wait_journal(APP_UNIT, "saying it serves", round_trip::WAIT, |e| {
            e["_SYSTEMD_INVOCATION_ID"] == invocation.as_str()
                && e["MESSAGE"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("The demo app serves"))
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_in_its_own_unit_answers_through_the_packaged_flowcoach() {
    let total = Phase::start("test app in its own unit");
    let test = "an_app_in_its_own_unit_answers_through_the_packaged_flowcoach";
    if crate::enabled(test, &crate::SYSTEMD) {
        // Built before the simulator runs: the build blocks.
        crate::demo_app();
    }
    let Some(setup) = installed_against(test, round_trip::redelivering).await else {
        return;
    };
    let machine = &setup.machine;
    let port = round_trip::vacant_port();
    install_the_app(&setup, port).await;
    machine.ok(&["systemctl", "enable", APP_UNIT]).await;
    start_the_app(&setup).await;
    start(&setup).await;

    round_trip::the_app_answers(&setup.sim).await;
    let status = machine.ok(&["flowcoachctl", "status"]).await;
    assert!(
        status.contains(&format!("http://127.0.0.1:{port}/slack/events")),
        "status names the app:\n{status}"
    );

    // The app's unit stopped: flowcoach stands in for commands, keeps events in its inbox.
    machine.ok(&["systemctl", "stop", APP_UNIT]).await;
    let id = round_trip::while_the_app_is_down(&setup.sim).await;
    start_the_app(&setup).await;
    round_trip::once_the_app_is_back(&setup.sim, &id).await;

    // The secrets: not on any command line, not in what systemd shows, not in the journal.
    let command_lines = machine
        .sh_ok("for f in /proc/[0-9]*/cmdline; do tr '\\0' ' ' < $f; echo; done")
        .await;
    assert!(
        command_lines.contains(DEMO_APP),
        "the app runs:\n{command_lines}"
    );
    assert_no_secret("a command line", &command_lines);
    for unit in [UNIT, APP_UNIT] {
        let shown = machine.ok(&["systemctl", "show", unit]).await;
        assert_no_secret(&format!("systemctl show {unit}"), &shown);
        let journal = machine.journal_text(unit, 1000).await;
        assert_no_secret(&format!("the journal of {unit}"), &journal);
    }
    setup.machine.shutdown().await;
    total.done();
}
