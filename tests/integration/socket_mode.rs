//! flowcoach as a real process against the simulator over real sockets: connecting,
//! acking, answering in the ack, rotation, reconnects, exit codes.

use std::time::Duration;

use flowcoach_harness::{
    APP, Daemon, WAIT, acked, connected, event, fast_config_with, first_socket_closed_cleanly,
    simulator, slash, wait_hellos,
};
use flowcoach_sim::{CloseKind, HelloStyle, LoadMix, LoadSpec, OpenResponse, Record};

#[tokio::test]
async fn connects_acks_events_and_stops_cleanly() {
    let sim = simulator(|_| {}).await;
    let mut daemon = Daemon::start_connected(&sim).await;
    daemon.wait_log("connected to Slack", |_| true).await;

    let ids: Vec<String> = (0..20)
        .map(|i| sim.inject(APP, event(&format!("Ev{i}"), "hi")))
        .collect();
    let record = sim.wait_acked(WAIT, &ids).await.expect("every event acked");
    for id in &ids {
        let envelope = record.envelope(id).unwrap();
        assert_eq!(
            envelope.deliveries.len(),
            1,
            "acked before the deadline, never redelivered"
        );
        assert!(envelope.ack_payload.is_none());
    }
    daemon
        .wait_log("event handled", |l| {
            l["event_id"] == "Ev19" && l["channel"] == "C0SIM"
        })
        .await;

    daemon.stop().await;
    first_socket_closed_cleanly(&sim).await;
    daemon.assert_token_never_printed();
}

#[tokio::test]
async fn drops_the_socket_itself_when_slack_keeps_tcp_open_after_close() {
    // The simulator, like Slack, does not close TCP after the close handshake.
    let sim = simulator(|c| c.hold_tcp_after_close = Duration::from_secs(30)).await;
    let mut daemon = Daemon::start_connected(&sim).await;
    daemon.stop().await;
    let record = sim
        .wait_until(WAIT, |r| r.sockets[0].tcp_closed_at.is_some())
        .await
        .expect("flowcoach drops TCP");
    let socket = &record.sockets[0];
    let lingered = socket.tcp_closed_at.unwrap() - socket.closed_at.unwrap();
    assert!(
        lingered < Duration::from_secs(3),
        "TCP held {lingered:?} after Close"
    );
}

#[tokio::test]
async fn a_bare_hello_is_accepted_without_inventing_a_count() {
    let sim = simulator(|c| c.hello = HelloStyle::Bare).await;
    let mut daemon = Daemon::start_connected(&sim).await;
    daemon
        .wait_log("Slack's hello lacks num_connections", |_| true)
        .await;
    acked(&sim, event("EvAfterBareHello", "hi")).await;
    let status = daemon.status_json().await;
    assert_eq!(status["phase_name"], "connected", "{status}");
    assert_eq!(
        status["num_connections"],
        serde_json::Value::Null,
        "{status}"
    );
    assert_eq!(status["app_id"], APP, "the token's app: {status}");
    // The next connection says the same bare hello: that is not said again.
    sim.disconnect(sim.open_sockets(APP)[0], "refresh_requested");
    daemon.wait_log_count("connected to Slack", 2).await;
    let said = daemon.count_by("Slack's hello lacks", "message");
    assert_eq!(said.values().sum::<usize>(), 1, "{said:?}");
    daemon.stop().await;
}

#[tokio::test]
async fn slash_command_is_answered_in_the_ack() {
    let sim = simulator(|_| {}).await;
    let mut daemon = Daemon::start_connected(&sim).await;
    let payload = acked(&sim, slash("status"))
        .await
        .ack_payload
        .expect("answer in the ack");
    let text = payload["text"].as_str().unwrap();
    assert!(text.contains(&format!("pid {}", daemon.pid())), "{text}");
    assert!(text.contains("environment test"), "{text}");
    assert!(text.contains("connected since"), "{text}");
    daemon.stop().await;
}

async fn rotates_without_a_gap(reason: &str) {
    let sim = simulator(|c| {
        c.warning_grace = Duration::from_secs(2);
        c.refresh_grace = Duration::from_millis(500);
    })
    .await;
    let mut daemon = Daemon::start_connected(&sim).await;
    let load = sim.start_load(
        APP,
        flowcoach_sim::LoadSpec {
            count: 200,
            rate_per_sec: Some(50.0),
            max_outstanding: None,
            mix: flowcoach_sim::LoadMix::EventsOnly,
        },
    );
    let first = sim.open_sockets(APP)[0];
    sim.disconnect(first, reason);
    let record = sim
        .wait_until(WAIT, |r| {
            r.sockets.len() >= 2
                && r.sockets[0].closed_at.is_some()
                && r.sockets[1].hello_at.is_some()
        })
        .await
        .expect("rotated");
    assert_eq!(
        record.zero_open_stretches(APP),
        0,
        "no instant without an open socket"
    );
    tokio::time::timeout(WAIT, load).await.unwrap().unwrap();
    let record = sim
        .wait_until(WAIT, |r| r.envelopes.len() == 200 && r.all_acked())
        .await
        .expect("every envelope acked");
    assert!(record.envelopes.iter().all(|e| !e.gave_up));
    assert_eq!(record.zero_open_stretches(APP), 0);
    daemon
        .wait_log("rotated to a new connection", |_| true)
        .await;
    daemon.stop().await;
}

#[tokio::test]
async fn warning_rotates_with_zero_gap() {
    rotates_without_a_gap("warning").await;
}

#[tokio::test]
async fn refresh_requested_rotates_with_zero_gap() {
    rotates_without_a_gap("refresh_requested").await;
}

/// SIGTERM ends the daemon with exit 0 within [`WAIT`], logging no error.
async fn stops_cleanly(daemon: &mut Daemon) {
    daemon.stop().await;
    let errors: Vec<_> = daemon
        .logs()
        .into_iter()
        .filter(|l| l["level"] == "ERROR")
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
}

#[tokio::test]
async fn sigterm_while_waiting_for_hello_stops_cleanly() {
    let sim = simulator(|c| c.hello = HelloStyle::Withheld).await;
    // A hello timeout far beyond the wait for the exit: only a prompt stop passes.
    let config = fast_config_with(&[("hello_timeout", r#""60s""#)]);
    let mut daemon = Daemon::start_with(&sim, &config, &[]);
    sim.wait_until(WAIT, |r| !r.sockets.is_empty())
        .await
        .expect("flowcoach opens a socket");
    stops_cleanly(&mut daemon).await;
    let record = sim
        .wait_until(WAIT, |r| r.sockets[0].closed_at.is_some())
        .await
        .expect("the socket is released");
    // Closed as every socket of ours is, not dropped.
    assert_eq!(record.sockets[0].client_close_code, Some(1000), "{record}");
}

#[tokio::test]
async fn sigterm_with_a_dead_socket_stops_cleanly() {
    let sim = simulator(|c| c.server_ping_interval = None).await;
    // Liveness checks far off: the socket is dead, and not yet found out, at SIGTERM.
    let config = fast_config_with(&[("ping_interval", r#""60s""#), ("pong_timeout", r#""60s""#)]);
    let mut daemon = Daemon::start_with(&sim, &config, &[]);
    connected(&sim).await;
    sim.make_stale(sim.open_sockets(APP)[0]);
    stops_cleanly(&mut daemon).await;
}

#[tokio::test]
async fn stale_connection_is_detected_and_replaced() {
    let sim = simulator(|c| c.server_ping_interval = None).await;
    let mut daemon = Daemon::start_connected(&sim).await;
    let socket = sim.open_sockets(APP)[0];
    sim.make_stale(socket);
    // ping_interval 1s + pong_timeout 1s in FAST_CONFIG: well within the wait bound.
    daemon
        .wait_log(
            "no pong or frame from Slack in time: connection is stale",
            |_| true,
        )
        .await;
    // Reconnected after the stale socket, and served on the new one.
    wait_hellos(&sim, 2).await;
    acked(&sim, event("EvAfterStale", "hi")).await;
    daemon.stop().await;
}

#[tokio::test]
async fn invalid_auth_exits_78_with_a_clear_message() {
    let sim = simulator(|_| {}).await;
    sim.set_open_response(Some(OpenResponse::Error("invalid_auth".into())));
    let mut daemon = Daemon::start(&sim, "");
    assert_eq!(daemon.exit_code().await, 78);
    let stderr = daemon.stderr();
    assert!(stderr.contains("invalid_auth"), "{stderr}");
    assert!(stderr.contains("app-level token"), "{stderr}");
    assert_eq!(
        sim.record().open_calls.len(),
        1,
        "a permanent error is not retried"
    );
    daemon.assert_token_never_printed();
}

#[tokio::test]
async fn link_disabled_exits_78() {
    let sim = simulator(|_| {}).await;
    let mut daemon = Daemon::start_connected(&sim).await;
    sim.disconnect(sim.open_sockets(APP)[0], "link_disabled");
    assert_eq!(daemon.exit_code().await, 78);
    assert!(daemon.stderr().contains("Socket Mode is switched off"));
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let sim = simulator(|_| {}).await;
    sim.push_open_response(OpenResponse::RateLimited {
        retry_after_secs: 2,
    });
    let mut daemon = Daemon::start(&sim, "");
    let record = connected(&sim).await;
    assert_eq!(record.open_calls[0].outcome, "http 429");
    let waited = record.open_calls[1].at - record.open_calls[0].at;
    assert!(waited >= Duration::from_secs(2), "retried after {waited:?}");
    daemon.stop().await;
}

#[tokio::test]
async fn an_absurd_retry_after_is_capped_and_said() {
    let sim = simulator(|_| {}).await;
    sim.push_open_response(OpenResponse::RateLimited {
        retry_after_secs: u64::MAX,
    });
    let mut daemon = Daemon::start(&sim, "");
    let said = daemon
        .wait_log(
            "apps.connections.open asked to retry after more than",
            |_| true,
        )
        .await;
    assert_eq!(said["retry_after_s"], u64::MAX);
    assert_eq!(said["waiting_s"], 60);
    daemon.stop().await;
}

#[tokio::test]
async fn handshake_conflict_is_retried() {
    let sim = simulator(|_| {}).await;
    sim.set_handshake_status(Some(409));
    let mut daemon = Daemon::start(&sim, "");
    sim.wait_until(WAIT, |r| r.open_calls.len() >= 2)
        .await
        .expect("retries");
    sim.set_handshake_status(None);
    connected(&sim).await;
    daemon.stop().await;
}

#[tokio::test]
async fn too_many_websockets_storm_backs_off_and_diagnoses() {
    // The app's only socket slot is held by another instance with the same token: the
    // situation that started this project.
    let sim = simulator(|c| c.max_sockets_per_app = 1).await;
    let mut incumbent = Daemon::start_connected(&sim).await;
    let mut second = Daemon::start(&sim, "");
    let refused = |r: &Record| {
        r.sockets
            .iter()
            .filter(|s| s.close == Some(CloseKind::TooManyWebsockets))
            .count()
    };
    let record = sim
        .wait_until(WAIT, |r| refused(r) >= 5)
        .await
        .expect("the second instance keeps trying, slowly");
    let attempts: Vec<_> = record
        .sockets
        .iter()
        .filter(|s| s.close == Some(CloseKind::TooManyWebsockets))
        .map(|s| s.opened_at)
        .collect();
    for pair in attempts.windows(2) {
        let gap = pair[1] - pair[0];
        // too_many_websockets_backoff is 500ms in FAST_CONFIG: never a faster redial.
        assert!(gap >= Duration::from_millis(500), "redialled after {gap:?}");
    }
    second
        .wait_log(
            "Slack refused the connection with too_many_websockets",
            |l| {
                l["message"]
                    .as_str()
                    .unwrap()
                    .contains("Other clients hold this app's sockets")
            },
        )
        .await;
    // The incumbent is untouched: still one socket, still serving.
    acked(&sim, event("EvIncumbent", "hi")).await;
    second.stop().await;
    incumbent.stop().await;
}

#[tokio::test]
async fn unannounced_drops_reconnect_through_the_backoff() {
    let sim = simulator(|_| {}).await;
    let mut daemon = Daemon::start_connected(&sim).await;
    for round in 1..=4 {
        let socket = sim.open_sockets(APP)[0];
        sim.drop_socket(socket);
        wait_hellos(&sim, round + 1).await;
    }
    let record = sim.record();
    // A fresh URL per connect: a reused ticket would be refused with HTTP 401.
    assert!(
        record
            .sockets
            .iter()
            .all(|s| s.rejected_handshake.is_none())
    );
    assert_eq!(record.open_calls.len(), record.sockets.len());
    let opens: Vec<_> = record.sockets.iter().map(|s| s.opened_at).collect();
    // The first drop is replaced at once; the next ones, with no stable connection in
    // between (stable_after is 30s), back off from backoff_initial (200ms in FAST_CONFIG).
    for (pair, dropped) in opens.windows(2).zip(&record.sockets).skip(1) {
        let gap = pair[1] - dropped.closed_at.unwrap_or(pair[0]);
        assert!(
            gap >= Duration::from_millis(200),
            "reconnected after {gap:?}"
        );
    }
    daemon.stop().await;
}

#[tokio::test]
async fn a_drop_after_a_stable_connection_reconnects_at_once() {
    let sim = simulator(|_| {}).await;
    let config = fast_config_with(&[
        ("backoff_initial", "\"10s\""),
        ("backoff_max", "\"20s\""),
        ("stable_after", "\"1s\""),
    ]);
    let mut daemon = Daemon::start_with(&sim, &config, &[]);
    connected(&sim).await;
    // Well below backoff_initial: a reconnect within it did not wait for the backoff.
    let bound = Duration::from_secs(5);
    sim.drop_socket(sim.open_sockets(APP)[0]);
    sim.wait_until(bound, |r| r.hellos() >= 2 && r.open_sockets(APP) == 1)
        .await
        .expect("the first drop is replaced at once");
    // Once the replacement has proved stable, the next drop is replaced at once too.
    daemon
        .wait_log(
            "connection stable; the next loss reconnects at once",
            |_| true,
        )
        .await;
    sim.drop_socket(sim.open_sockets(APP)[0]);
    sim.wait_until(bound, |r| r.hellos() >= 3 && r.open_sockets(APP) == 1)
        .await
        .expect("a drop after a stable connection is replaced at once");
    daemon.stop().await;
}

/// Slack answers every hello with a disconnect of `reason`: flowcoach paces its rotations
/// instead of calling `apps.connections.open` in a tight loop, and says so.
async fn a_disconnect_after_every_hello_is_paced(reason: &str) {
    let sim = simulator(|c| {
        c.disconnect_after_hello = Some(reason.to_owned());
        c.warning_grace = Duration::from_secs(1);
    })
    .await;
    let config = fast_config_with(&[("backoff_initial", "\"500ms\""), ("backoff_max", "\"5s\"")]);
    let mut daemon = Daemon::start_with(&sim, &config, &[]);
    let paced = daemon.wait_log("reconnects paced", |_| true).await;
    let text = paced["message"].as_str().unwrap();
    assert!(
        text.contains(reason) && text.contains("in a row"),
        "{paced}"
    );
    // At most one replacement per 500ms (backoff_initial) after the first, immediate one:
    // about 10 calls in these 4 seconds, where an unpaced client makes thousands.
    let window = Duration::from_secs(4);
    if let Ok(record) = sim.wait_until(window, |r| r.open_calls.len() > 12).await {
        panic!("apps.connections.open called more than 12 times within 4s:\n{record}");
    }
    let status = daemon.status_json().await;
    let pacing = status["pacing"].as_str().unwrap_or_default();
    assert!(pacing.contains("in a row"), "{status}");
    assert!(
        daemon
            .count_by("reconnects paced", "socket")
            .values()
            .sum::<usize>()
            <= 4,
        "the diagnosis is rate-limited"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_refresh_requested_after_every_hello_is_paced() {
    a_disconnect_after_every_hello_is_paced("refresh_requested").await;
}

#[tokio::test]
async fn a_warning_after_every_hello_is_paced() {
    a_disconnect_after_every_hello_is_paced("warning").await;
}

#[tokio::test]
async fn an_unknown_disconnect_after_every_hello_is_paced() {
    a_disconnect_after_every_hello_is_paced("something_new").await;
}

#[tokio::test]
async fn with_two_sockets_losing_one_leaves_no_gap() {
    let sim = simulator(|c| c.refresh_grace = Duration::from_millis(500)).await;
    let config = fast_config_with(&[("sockets", "2")]);
    let mut daemon = Daemon::start_with(&sim, &config, &[]);
    sim.wait_until(WAIT, |r| r.open_sockets(APP) == 2)
        .await
        .expect("two sockets");
    let load = sim.start_load(
        APP,
        LoadSpec {
            count: 200,
            rate_per_sec: Some(50.0),
            max_outstanding: None,
            mix: LoadMix::EventsOnly,
        },
    );
    sim.wait_until(WAIT, |r| {
        r.envelopes.iter().filter(|e| e.acked_at.is_some()).count() >= 20
    })
    .await
    .expect("envelopes acked");
    // One socket lost, then the other asked to rotate: each is replaced on its own.
    sim.drop_socket(sim.open_sockets(APP)[0]);
    sim.wait_until(WAIT, |r| r.hellos() >= 3 && r.open_sockets(APP) == 2)
        .await
        .expect("the lost socket is replaced");
    sim.disconnect(sim.open_sockets(APP)[0], "refresh_requested");
    sim.wait_until(WAIT, |r| r.hellos() >= 4 && r.open_sockets(APP) == 2)
        .await
        .expect("the rotated socket is replaced");
    tokio::time::timeout(WAIT, load).await.unwrap().unwrap();
    let record = sim
        .wait_until(WAIT, |r| r.envelopes.len() == 200 && r.all_acked())
        .await
        .expect("every envelope acked");
    assert_eq!(
        record.zero_open_stretches(APP),
        0,
        "no instant without an open socket:\n{record}"
    );
    // Slack's count is all ours: no other client is diagnosed.
    daemon
        .wait_log("connected to Slack", |l| {
            l["ours"] == 2 && l["num_connections"] == 2
        })
        .await;
    assert!(
        !daemon.stderr().contains("belong to another client"),
        "{}",
        daemon.stderr()
    );
    let status = daemon.status_json().await;
    assert_eq!(status["sockets_open"], 2, "{status}");
    daemon.stop().await;
}

#[tokio::test]
async fn failed_attempts_are_logged_with_their_cause_and_delay_and_rate_limited() {
    let sim = simulator(|_| {}).await;
    sim.push_open_response(OpenResponse::Error("fatal_error".into()));
    sim.push_open_response(OpenResponse::HttpStatus(500));
    sim.push_open_response(OpenResponse::RateLimited {
        retry_after_secs: 1,
    });
    sim.set_open_response(Some(OpenResponse::HttpStatus(503)));
    let config = fast_config_with(&[("backoff_max", "\"1s\""), ("stable_after", "\"1s\"")]);
    let mut daemon = Daemon::start_with(&sim, &config, &[]);
    let failure = "could not connect to Slack";
    for (cause, at_least_ms) in [
        ("fatal_error", 200),
        ("HTTP 500", 200),
        ("rate limited", 1000),
    ] {
        daemon
            .wait_log(failure, |l| {
                l["cause"].as_str().is_some_and(|c| c.contains(cause))
                    && l["delay_ms"].as_u64().is_some_and(|d| d >= at_least_ms)
            })
            .await;
    }
    // An outage goes on: the first lines came at once, the next ones are held back.
    sim.wait_until(WAIT, |r| r.open_calls.len() >= 8)
        .await
        .expect("attempts go on");
    assert_eq!(
        daemon.count_by(failure, "cause").values().sum::<usize>(),
        3,
        "{}",
        daemon.stderr()
    );
    sim.set_open_response(None);
    connected(&sim).await;
    daemon
        .wait_log(
            "connection stable; the next loss reconnects at once",
            |_| true,
        )
        .await;
    // A refused websocket URL, logged at once after the outage was over, with the count of
    // the lines held back.
    sim.set_handshake_status(Some(409));
    sim.drop_socket(sim.open_sockets(APP)[0]);
    daemon
        .wait_log(failure, |l| {
            l["cause"].as_str().is_some_and(|c| c.contains("409"))
                && l["delay_ms"].is_u64()
                && l["suppressed"].as_u64().is_some_and(|n| n >= 4)
        })
        .await;
    sim.set_handshake_status(None);
    wait_hellos(&sim, 2).await;
    daemon.stop().await;
}
