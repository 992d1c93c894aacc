//! Latency histograms, observed where the time is known: the ack when its frame is written,
//! the forward when the app has answered, the handover when the successor holds the app.

use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;

/// Seconds, finest around Slack's 3 s ack deadline: an alert compares the 99th percentile
/// with 2.5 s, so 2.5 and 3 are bucket bounds.
const ACK_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 2.5, 3.0, 5.0,
];
/// Seconds an HTTP round trip to the app behind `[forward]` may take, up to its timeouts.
const FORWARD_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Seconds a handover may take, up to its default 30 s timeout and beyond.
const HANDOVER_BUCKETS: [f64; 9] = [0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

#[derive(Debug, Clone)]
pub struct Timings {
    /// From an envelope's receipt to its ack written to the socket.
    pub ack_latency: Histogram,
    /// From sending an envelope to the app behind `[forward]` to its answer (any outcome).
    pub forward_latency: Histogram,
    /// From a successor's takeover request to holding the app.
    pub handover_duration: Histogram,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            ack_latency: Histogram::new(ACK_BUCKETS),
            forward_latency: Histogram::new(FORWARD_BUCKETS),
            handover_duration: Histogram::new(HANDOVER_BUCKETS),
        }
    }
}

/// Observes `elapsed` in seconds.
pub fn observe(histogram: &Histogram, elapsed: Duration) {
    histogram.observe(elapsed.as_secs_f64());
}
