//! The Prometheus metrics of a real flowcoach against the simulator: the `/metrics`
//! endpoint in both formats, `flowcoachctl metrics`, bounded cardinality, the endpoint kept
//! across a handover, and the real tools: `promtool` on the exposition and on the alert
//! rules, and the Prometheus server scraping flowcoach. Tests that need Prometheus skip
//! loudly without it, or fail under `FLOWCOACH_PROMETHEUS=1` (CI installs it and sets it).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use flowcoach_harness::activation::Activation;
use flowcoach_harness::process::{self, Strays};
use flowcoach_harness::prometheus::{
    self, Prometheus, promtool, scrape, scrape_until, series_count, value,
};
use flowcoach_harness::{
    APP, Daemon, FAST_CONFIG, Logs, WAIT, connected, ctl, event, simulator, slash,
};
use flowcoach_sim::{EnvelopeSpec, Simulator};
use nix::sys::signal::Signal;
use serde_json::json;

const ENDPOINT: &str = "[metrics]\nlisten = \"127.0.0.1:0\"\n";

/// flowcoach with its endpoint on a free loopback port, connected; the endpoint's address.
async fn with_endpoint(sim: &Simulator) -> (Daemon, SocketAddr) {
    let mut daemon = Daemon::start(sim, ENDPOINT);
    let line = daemon.wait_log("metrics endpoint on", |_| true).await;
    let address = line["address"].as_str().unwrap().parse().unwrap();
    connected(sim).await;
    (daemon, address)
}

fn rules_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("packaging/prometheus")
}

#[tokio::test]
async fn the_endpoint_counts_what_the_simulator_sent_in_both_formats() {
    let sim = simulator(|_| {}).await;
    let (mut daemon, address) = with_endpoint(&sim).await;
    let mut ids: Vec<String> = (0..3)
        .map(|i| sim.inject(APP, event(&format!("EvM{i}"), "hi")))
        .collect();
    ids.extend((0..2).map(|_| sim.inject(APP, slash("help"))));
    sim.wait_acked(WAIT, &ids).await.expect("all acked");

    let text = scrape_until(address, |text| {
        value(text, "flowcoach_ack_latency_seconds_count") == Some(5.0)
    })
    .await;
    let sample = |series: &str| value(&text, series);
    assert_eq!(
        sample("flowcoach_envelopes_received_total{type=\"events_api\"}"),
        Some(3.0)
    );
    assert_eq!(
        sample("flowcoach_envelopes_received_total{type=\"slash_commands\"}"),
        Some(2.0)
    );
    assert_eq!(
        sample("flowcoach_envelopes_acked_total{type=\"events_api\"}"),
        Some(3.0)
    );
    assert_eq!(
        sample("flowcoach_envelopes_acked_total{type=\"slash_commands\"}"),
        Some(2.0)
    );
    assert_eq!(
        sample("flowcoach_envelopes_acked_total{type=\"interactive\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample("flowcoach_connection_opens_total{outcome=\"ok\"}"),
        Some(1.0)
    );
    assert_eq!(sample("flowcoach_phase{phase=\"connected\"}"), Some(1.0));
    assert_eq!(sample("flowcoach_sockets_open"), Some(1.0));
    assert_eq!(sample("flowcoach_slack_connections"), Some(1.0));
    assert_eq!(sample("flowcoach_health{state=\"healthy\"}"), Some(1.0));
    let version = format!(
        "flowcoach_build_info{{version=\"{}\"}}",
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(sample(&version), Some(1.0));
    assert!(sample("process_resident_memory_bytes").is_some_and(|rss| rss > 1e6));
    assert!(sample("process_open_fds").is_some_and(|fds| fds > 3.0));
    assert!(!text.contains(&flowcoach_harness::token_secret()));

    let (content_type, _) = scrape(address, None).await;
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let (content_type, open) = scrape(
        address,
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
    )
    .await;
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    assert!(open.ends_with("# EOF\n"));
    assert!(open.contains("flowcoach_envelopes_acked_total{type=\"events_api\"} 3"));

    let missing = reqwest::get(format!("http://{address}/other"))
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
    daemon.stop().await;
}

#[tokio::test]
async fn flowcoachctl_metrics_prints_the_exposition_without_the_endpoint() {
    let sim = simulator(|_| {}).await;
    let mut daemon = Daemon::start_connected(&sim).await;
    flowcoach_harness::acked(&sim, event("EvCtl", "hi")).await;
    let dir = daemon.runtime_dir.display().to_string();
    let env = [("FLOWCOACH_RUNTIME_DIR", dir.as_str())];
    let output = ctl::run(&["metrics"], &env).await;
    assert!(output.status.success(), "{output:?}");
    let text = String::from_utf8(output.stdout).unwrap();
    assert_eq!(
        value(
            &text,
            "flowcoach_envelopes_received_total{type=\"events_api\"}"
        ),
        Some(1.0)
    );
    assert!(text.contains("# TYPE flowcoach_ack_latency_seconds histogram"));
    let output = ctl::run(&["metrics", "--openmetrics"], &env).await;
    assert!(
        String::from_utf8(output.stdout)
            .unwrap()
            .ends_with("# EOF\n")
    );
    assert!(
        daemon
            .logs()
            .iter()
            .all(|line| line["message"] != "metrics endpoint on"),
        "off by default"
    );
    daemon.stop().await;
}

/// Series for the app's users and channels would grow with them: the count after many
/// envelopes from distinct users in distinct channels is the count before.
#[tokio::test]
async fn the_series_count_stays_fixed_under_varied_users_and_channels() {
    const ENVELOPES: u64 = 2_000;
    let sim = simulator(|_| {}).await;
    let (mut daemon, address) = with_endpoint(&sim).await;
    let before = series_count(&scrape(address, None).await.1);
    let ids: Vec<String> = (0..ENVELOPES)
        .map(|n| {
            let spec = match n % 3 {
                0 => EnvelopeSpec::Event {
                    event_id: format!("EvCard{n}"),
                    event: json!({
                        "type": "message", "channel": format!("C{n:08}"), "user": format!("U{n:08}"),
                        "text": "hi", "ts": format!("{n}.000100"), "channel_type": "channel",
                    }),
                },
                1 => EnvelopeSpec::slash_command("/flowcoach", format!("help {n}")),
                _ => EnvelopeSpec::Interactive {
                    payload: json!({
                        "type": "block_actions", "user": {"id": format!("U{n:08}")},
                        "channel": {"id": format!("C{n:08}")}, "trigger_id": format!("t{n}"),
                        "actions": [{"action_id": format!("a{n}"), "value": n.to_string()}],
                    }),
                    accepts_response_payload: false,
                },
            };
            sim.inject(APP, spec)
        })
        .collect();
    sim.wait_acked(Duration::from_secs(120), &ids)
        .await
        .expect("all acked");
    let after = scrape_until(address, |text| {
        value(text, "flowcoach_ack_latency_seconds_count") == Some(ENVELOPES as f64)
    })
    .await;
    assert_eq!(series_count(&after), before, "{after}");
    daemon.stop().await;
}

/// Under systemd the socket unit holds the port (`FileDescriptorName=metrics`): flowcoach
/// serves on what it is passed, with no `[metrics]` setting and no right to bind.
#[tokio::test]
async fn serves_on_the_socket_systemd_passes() {
    let sim = simulator(|_| {}).await;
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = socket.local_addr().unwrap();
    let activation = Activation::new(&[(&socket, "metrics")]);
    let mut daemon =
        Daemon::launch_activated(&sim, FAST_CONFIG, &[], &[], Logs::Collect, Some(activation));
    drop(socket);
    connected(&sim).await;
    daemon.wait_log("metrics endpoint on", |_| true).await;
    let text = scrape_until(address, |text| {
        value(text, "flowcoach_phase{phase=\"connected\"}") == Some(1.0)
    })
    .await;
    assert_eq!(value(&text, "flowcoach_sockets_open"), Some(1.0));
    daemon.stop().await;
}

#[tokio::test]
async fn a_handover_keeps_the_endpoint() {
    let sim = simulator(|_| {}).await;
    let (mut incumbent, address) = with_endpoint(&sim).await;
    let dir = incumbent.runtime_dir.display().to_string();
    let env = [("FLOWCOACH_RUNTIME_DIR", dir.as_str())];
    let output = ctl::run(&["--timeout", "30s", "handover"], &env).await;
    assert!(output.status.success(), "{output:?}");
    let mut strays = Strays::default();
    let successor = output_pid(&output.stdout);
    strays.add(successor);
    // The successor answers on the same address, and counts the handover it completed.
    let text = scrape_until(address, |text| {
        value(text, "flowcoach_handovers_total{outcome=\"completed\"}") == Some(1.0)
    })
    .await;
    assert_eq!(
        value(&text, "flowcoach_handover_duration_seconds_count"),
        Some(1.0)
    );
    flowcoach_harness::acked(&sim, event("EvAfter", "hi")).await;
    let _ = tokio::time::timeout(WAIT, incumbent.child.wait()).await;
    process::signal(successor, Signal::SIGTERM);
    strays.gone(successor, WAIT).await.unwrap();
}

/// `handed over to pid N in M ms` → N.
fn output_pid(stdout: &[u8]) -> u32 {
    String::from_utf8_lossy(stdout)
        .strip_prefix("handed over to pid ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .expect("a completed handover")
}

#[tokio::test]
async fn promtool_finds_the_exposition_clean() {
    if !prometheus::runnable("metrics::promtool_finds_the_exposition_clean") {
        return;
    }
    let sim = simulator(|_| {}).await;
    let (mut daemon, address) = with_endpoint(&sim).await;
    flowcoach_harness::acked(&sim, slash("help")).await;
    let (_, text) = scrape(address, None).await;
    let checked = promtool(&["check", "metrics"], &text).await;
    assert!(checked.status.success(), "{checked:?}\n{text}");
    assert!(
        checked.stdout.is_empty() && checked.stderr.is_empty(),
        "{checked:?}"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn promtool_checks_and_tests_the_alert_rules() {
    if !prometheus::runnable("metrics::promtool_checks_and_tests_the_alert_rules") {
        return;
    }
    let dir = rules_dir();
    let rules = dir.join("flowcoach-rules.yml");
    let checked = promtool(&["check", "rules", rules.to_str().unwrap()], "").await;
    assert!(checked.status.success(), "{checked:?}");
    let tests = dir.join("flowcoach-rules.test.yml");
    let tested = promtool(&["test", "rules", tests.to_str().unwrap()], "").await;
    assert!(tested.status.success(), "{tested:?}");
}

/// The real Prometheus server scrapes flowcoach: a PromQL query shows the envelopes the
/// simulator counted and the rotation it caused.
#[tokio::test]
async fn prometheus_scrapes_the_envelopes_and_the_rotation_the_simulator_caused() {
    if !prometheus::runnable(
        "metrics::prometheus_scrapes_the_envelopes_and_the_rotation_the_simulator_caused",
    ) {
        return;
    }
    let sim = simulator(|c| c.refresh_grace = Duration::from_millis(500)).await;
    let (mut daemon, address) = with_endpoint(&sim).await;
    let mut server = Prometheus::start(address).await;
    server
        .wait_for("up{job=\"flowcoach\"}", |samples| {
            samples.len() == 1 && samples[0].value == 1.0
        })
        .await;
    let ids: Vec<String> = (0..25)
        .map(|i| sim.inject(APP, event(&format!("EvProm{i}"), "hi")))
        .collect();
    sim.wait_acked(WAIT, &ids).await.expect("all acked");
    sim.disconnect(sim.open_sockets(APP)[0], "refresh_requested");
    let record = sim
        .wait_until(WAIT, |r| {
            r.sockets.len() == 2 && r.sockets[1].hello_at.is_some()
        })
        .await
        .expect("rotated");
    let acked_by_sim = record
        .envelopes
        .iter()
        .filter(|e| e.acked_at.is_some())
        .count() as f64;

    let acked = server
        .wait_for(
            "sum(flowcoach_envelopes_acked_total{job=\"flowcoach\", type=\"events_api\"})",
            |s| s.first().is_some_and(|s| s.value == acked_by_sim),
        )
        .await;
    assert_eq!(acked[0].value, 25.0);
    server
        .wait_for("flowcoach_rotations_total{job=\"flowcoach\"}", |s| {
            s.first().is_some_and(|s| s.value == 1.0)
        })
        .await;
    server
        .wait_for(
            "flowcoach_disconnects_total{job=\"flowcoach\", reason=\"refresh_requested\"}",
            |s| s.first().is_some_and(|s| s.value == 1.0),
        )
        .await;
    server.stop().await;
    daemon.stop().await;
}
