//! Whatever arrives on the socket, flowcoach logs it, counts it and keeps serving.

mod common;

use common::{APP, Daemon, WAIT, simulator};
use flowcoach::sim::{EnvelopeSpec, RawFrame, Simulator};
use nix::sys::signal::Signal;
use serde_json::json;

async fn acked(sim: &Simulator, event_id: &str) {
    let id = sim.inject(
        APP,
        EnvelopeSpec::Event {
            event_id: event_id.into(),
            event: json!({"type": "message"}),
        },
    );
    sim.wait_until(WAIT, |r| {
        r.envelope(&id).is_some_and(|e| e.acked_at.is_some())
    })
    .await
    .unwrap_or_else(|e| panic!("{event_id} not acked: {e:?}"));
}

#[tokio::test]
async fn bad_frames_are_logged_counted_and_survived() {
    let sim = simulator(|_| {}).await;
    let mut daemon = Daemon::start(&sim, "");
    sim.wait_until(WAIT, |r| {
        r.sockets.first().is_some_and(|s| s.hello_at.is_some())
    })
    .await
    .unwrap();
    let socket = sim.open_sockets(APP)[0];
    let cases: [(RawFrame, &str); 8] = [
        (
            RawFrame::Text("{not json".into()),
            "ignored a malformed frame",
        ),
        (
            RawFrame::Text(r#"["an","array"]"#.into()),
            "ignored a malformed frame",
        ),
        (
            RawFrame::Binary(vec![0, 159, 146, 150]),
            "ignored a binary frame",
        ),
        (
            RawFrame::Text(r#"{"type":"surprise"}"#.into()),
            "ignored a frame of unknown type",
        ),
        (
            RawFrame::Text(
                r#"{"type":"workflow_step","envelope_id":"unknown-kind-1","payload":{}}"#.into(),
            ),
            "acked an envelope of unknown type",
        ),
        (
            RawFrame::Text(r#"{"type":"events_api","payload":{"event_id":"EvNoId"}}"#.into()),
            "ignored a malformed frame",
        ),
        (
            RawFrame::Text(r#"{"envelope_id":"x"}"#.into()),
            "ignored a malformed frame",
        ),
        (
            RawFrame::Text(
                r#"{"type":"hello","num_connections":1,"connection_info":{"app_id":"A0SIMAPP01"}}"#
                    .into(),
            ),
            "repeated hello",
        ),
    ];
    for (round, (frame, expected_log)) in cases.into_iter().enumerate() {
        let seen = daemon
            .count_by(expected_log, "message")
            .values()
            .sum::<usize>();
        sim.send_raw(socket, frame);
        daemon.wait_log_count(expected_log, seen + 1).await;
        // The same socket still carries envelopes after each bad frame.
        acked(&sim, &format!("EvAfterBadFrame{round}")).await;
    }
    // The envelope of unknown type was sent raw, so the simulator did not know its id:
    // its ack is the one "unknown" ack, and nothing else was acked that should not be.
    assert_eq!(
        sim.record().unknown_acks,
        1,
        "an envelope of unknown type is acked so Slack does not retry it"
    );
    // An events_api envelope without an inner event (app_rate_limited) is handled, not fatal.
    let id = sim.inject(
        APP,
        EnvelopeSpec::EventWithoutInner {
            event_id: None,
            payload: json!({"type": "app_rate_limited", "minute_rate_limited": 1}),
        },
    );
    sim.wait_until(WAIT, |r| {
        r.envelope(&id).is_some_and(|e| e.acked_at.is_some())
    })
    .await
    .unwrap();
    daemon
        .wait_log("event handled", |l| l["event_type"] == "app_rate_limited")
        .await;
    acked(&sim, "EvStillServing").await;
    let record = sim.record();
    assert_eq!(
        record.sockets.len(),
        1,
        "the connection was kept throughout"
    );
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.exit_code().await, 0);
}

#[tokio::test]
async fn an_oversized_message_costs_the_connection_not_the_service() {
    let sim = simulator(|_| {}).await;
    let mut daemon = Daemon::start(&sim, "");
    sim.wait_until(WAIT, |r| {
        r.sockets.first().is_some_and(|s| s.hello_at.is_some())
    })
    .await
    .unwrap();
    let socket = sim.open_sockets(APP)[0];
    // max_message_bytes is 64 KiB in FAST_CONFIG.
    let huge = format!(
        r#"{{"type":"events_api","envelope_id":"big","payload":{{"blob":"{}"}}}}"#,
        "x".repeat(200_000)
    );
    sim.send_raw(socket, RawFrame::Text(huge));
    daemon
        .wait_log("oversized message from Slack", |_| true)
        .await;
    sim.wait_until(WAIT, |r| {
        r.sockets.iter().filter(|s| s.hello_at.is_some()).count() >= 2
    })
    .await
    .expect("reconnected");
    acked(&sim, "EvAfterHuge").await;
    daemon.signal(Signal::SIGTERM);
    assert_eq!(daemon.exit_code().await, 0);
}
