//! The README's "With Podman": flowcoach's image and the app, each in a container of its own,
//! in one pod, the secrets as Podman secrets read from files under `/run/secrets`. The app
//! is the demo app (`flowcoach-dev app`, release build, bind-mounted) on the base image, run
//! through `sh -c` as the README runs a Bolt app. Differences from the README's commands,
//! for the test: the pod is on this process's network (`--network host`) to reach the
//! simulator on the loopback, the app's port is a free one, and flowcoach's container runs
//! with the options of the Quadlet unit ([`Container::run`]).

use std::time::Instant;

use super::{
    ConfigFile, Container, Pod, Runtime, Secret, Setup, base_image, image, podman, podman_ok, said,
    unique,
};
use crate::round_trip::{self, assert_no_secret};
use flowcoach_sim::Simulator;

/// How the README's app container reads its secrets: files, into the variables Bolt reads.
const FROM_SECRETS: &str = "SLACK_SIGNING_SECRET=\"$(cat /run/secrets/slack-signing-secret)\" \
     SLACK_BOT_TOKEN=\"$(cat /run/secrets/slack-bot-token)\" exec /opt/mybot/flowcoach-dev app";

/// The app's container in `pod`: `podman run -d --pod … --secret … sh -c …`.
async fn run_the_app(
    pod: &Pod,
    signing_secret: &Secret,
    bot_token: &Secret,
    port: u16,
    sim: &Simulator,
) -> Container {
    let name = unique("app");
    let binary = format!(
        "{}:/opt/mybot/flowcoach-dev:ro",
        crate::demo_app().display()
    );
    let signing_secret = format!(
        "{},target=slack-signing-secret,mode=0400",
        signing_secret.name
    );
    let bot_token = format!("{},target=slack-bot-token,mode=0400", bot_token.name);
    let port = format!("PORT={port}");
    let api_url = format!("SLACK_API_URL={}", sim.api_url());
    let base = base_image();
    let output = podman(&[
        "run",
        "--detach",
        "--pod",
        &pod.name,
        "--name",
        &name,
        "--secret",
        &signing_secret,
        "--secret",
        &bot_token,
        "--env",
        "HOST=127.0.0.1",
        "--env",
        &port,
        "--env",
        &api_url,
        "--volume",
        &binary,
        &base,
        "sh",
        "-c",
        FROM_SECRETS,
    ])
    .await;
    let container = Container { name, _state: None };
    assert!(
        output.status.success(),
        "podman run (the app): {}",
        said(&output)
    );
    container
}

/// Waits until the app in `container` has said `times` times that it serves.
async fn serving(container: &Container, times: usize) {
    let deadline = Instant::now() + round_trip::WAIT;
    loop {
        let logs = container.logs().await;
        if logs.matches("The demo app serves").count() >= times {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the app did not start; its log:\n{logs}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_app_in_its_own_container_answers_through_flowcoachs_in_one_pod() {
    if !crate::enabled(
        "an_app_in_its_own_container_answers_through_flowcoachs_in_one_pod",
        &crate::PODMAN,
    ) {
        return;
    }
    // Both built before the simulator runs: the builds block.
    image();
    crate::demo_app();
    let sim = flowcoach_harness::simulator(round_trip::redelivering).await;
    let port = round_trip::vacant_port();
    let token = Secret::create();
    let signing_secret = Secret::holding("signing-secret", &round_trip::signing_secret());
    let bot_token = Secret::holding("bot-token", &round_trip::bot_token());
    let config = ConfigFile::with(&round_trip::forward_section(port));
    let pod = Pod::create();

    let app = run_the_app(&pod, &signing_secret, &bot_token, port, &sim).await;
    serving(&app, 1).await;
    let flowcoach = Container::run(Setup {
        sim: &sim,
        secret: &token,
        config: &config,
        runtime: Runtime::Tmpfs,
        notify: None,
        args: &[],
        pod: Some(&pod),
        signing_secret: Some(&signing_secret),
    })
    .await;
    super::connected(&sim, &flowcoach).await;

    round_trip::the_app_answers(&sim).await;
    let report = flowcoach.status_json().await;
    assert!(
        report
            .to_string()
            .contains(&format!("http://127.0.0.1:{port}/slack/events")),
        "status names the app: {report}"
    );

    // The app's container stopped (SIGTERM): flowcoach stands in for commands and keeps
    // events in its inbox; started again, the app gets them from the inbox.
    podman_ok(&["stop", &app.name]).await;
    let id = round_trip::while_the_app_is_down(&sim).await;
    podman_ok(&["start", &app.name]).await;
    serving(&app, 2).await;
    round_trip::once_the_app_is_back(&sim, &id).await;

    // The secrets: not in what Podman shows of either container, nor in their logs.
    for container in [&app, &flowcoach] {
        let inspected = podman_ok(&["inspect", &container.name]).await;
        assert_no_secret(&format!("podman inspect {}", container.name), &inspected);
        assert_no_secret(
            &format!("the log of {}", container.name),
            &container.logs().await,
        );
    }
    flowcoach.stop().await;
}
