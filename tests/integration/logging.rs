//! What the daemon writes to its log: no colour codes where no terminal reads them, and
//! nothing from the websocket, HTTP and TLS crates' trace output (payloads, the
//! single-use connection URL) whatever level is asked for.

use flowcoach_harness::{Daemon, FAST_CONFIG, acked, connected, event, simulator};

#[tokio::test]
async fn at_trace_level_no_payload_and_no_connection_url_reach_the_log() {
    const CANARY: &str = "canary-text-of-a-user-message";
    let sim = simulator(|_| {}).await;
    let mut daemon = Daemon::start_with(&sim, FAST_CONFIG, &[("FLOWCOACH_LOG", "trace")]);
    connected(&sim).await;
    acked(&sim, event("EvTraceCanary", CANARY)).await;
    daemon.stop().await;
    let said = daemon.stderr();
    // The event was handled and logged by flowcoach itself (without its text).
    assert!(said.contains("EvTraceCanary"), "{said}");
    assert!(
        !said.contains(CANARY),
        "an envelope's payload in the log:\n{said}"
    );
    assert!(
        !said.contains("ticket=") && !said.contains("/link/"),
        "the websocket URL in the log:\n{said}"
    );
    daemon.assert_token_never_printed();
}

#[tokio::test]
async fn text_logs_to_a_pipe_carry_no_colour_codes() {
    let sim = simulator(|_| {}).await;
    let mut daemon = Daemon::start_with(&sim, FAST_CONFIG, &[("FLOWCOACH_LOG_FORMAT", "text")]);
    connected(&sim).await;
    daemon.stop().await;
    let said = daemon.stderr();
    assert!(said.contains("flowcoach starting"), "{said}");
    assert!(!said.contains('\x1b'), "escape codes in the log:\n{said:?}");
}
