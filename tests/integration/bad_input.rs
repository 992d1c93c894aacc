//! Whatever arrives on the socket, flowcoach logs it, counts it and keeps serving.

use flowcoach_harness::{APP, Daemon, WAIT, acked, event, simulator, wait_hellos};
use flowcoach_sim::{EnvelopeSpec, RawFrame, Simulator, SocketId};
use serde_json::json;

/// flowcoach connected to a simulator; the socket it uses.
async fn start_connected() -> (Simulator, Daemon, SocketId) {
    let sim = simulator(|_| {}).await;
    let daemon = Daemon::start_connected(&sim).await;
    let socket = sim.open_sockets(APP)[0];
    (sim, daemon, socket)
}

#[tokio::test]
async fn bad_frames_are_logged_counted_and_survived() {
    let (sim, mut daemon, socket) = start_connected().await;
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
        acked(&sim, event(&format!("EvAfterBadFrame{round}"), "hi")).await;
    }
    // The envelope of unknown type was sent raw, so the simulator did not know its id:
    // its ack is the one "unknown" ack, and nothing else was acked that should not be.
    assert_eq!(
        sim.record().unknown_acks,
        1,
        "an envelope of unknown type is acked so Slack does not retry it"
    );
    // An events_api envelope without an inner event (app_rate_limited) is handled, not fatal.
    acked(
        &sim,
        EnvelopeSpec::EventWithoutInner {
            event_id: None,
            payload: json!({"type": "app_rate_limited", "minute_rate_limited": 1}),
        },
    )
    .await;
    daemon
        .wait_log("event handled", |l| l["event_type"] == "app_rate_limited")
        .await;
    acked(&sim, event("EvStillServing", "hi")).await;
    let record = sim.record();
    assert_eq!(
        record.sockets.len(),
        1,
        "the connection was kept throughout"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn an_envelope_without_a_payload_is_acked_and_counted_as_malformed() {
    let (sim, mut daemon, socket) = start_connected().await;
    let frames = [
        r#"{"type":"events_api","envelope_id":"no-payload","accepts_response_payload":false}"#,
        r#"{"type":"events_api","envelope_id":"null-payload","payload":null}"#,
    ];
    for (round, frame) in frames.into_iter().enumerate() {
        sim.send_raw(socket, RawFrame::Text(frame.into()));
        // The simulator did not send these envelopes itself: their acks count as unknown.
        sim.wait_until(WAIT, |r| r.unknown_acks > round as u64)
            .await
            .unwrap_or_else(|e| panic!("{frame} not acked: {e:?}"));
        daemon
            .wait_log_count("acked an envelope without a payload", round + 1)
            .await;
    }
    let status = daemon.status_json().await;
    assert_eq!(status["counters"]["frames_malformed"], 2, "{status}");
    acked(&sim, event("EvAfterNoPayload", "hi")).await;
    daemon.stop().await;
}

#[tokio::test]
async fn an_oversized_message_costs_the_connection_not_the_service() {
    let (sim, mut daemon, socket) = start_connected().await;
    // max_message_bytes is 64 KiB in FAST_CONFIG.
    let huge = format!(
        r#"{{"type":"events_api","envelope_id":"big","payload":{{"blob":"{}"}}}}"#,
        "x".repeat(200_000)
    );
    sim.send_raw(socket, RawFrame::Text(huge));
    daemon
        .wait_log("oversized message from Slack", |_| true)
        .await;
    wait_hellos(&sim, 2).await;
    acked(&sim, event("EvAfterHuge", "hi")).await;
    daemon.stop().await;
}
