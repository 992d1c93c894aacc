//! The instance's counters and connection state, read at each scrape: the figures have one
//! record (src/state.rs), which `status` reads too.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

use super::labels::{ByLabel, Label};
use crate::health::{self, Health};
use crate::state::{ConnectionStatus, InstanceState, Phase};

/// The phases of the lifecycle, as values of `flowcoach_phase{phase}`.
const PHASES: [&str; 6] = [
    "starting",
    "connecting",
    "connected",
    "reconnecting",
    "draining",
    "stopped",
];
const HEALTH_STATES: [&str; 3] = ["healthy", "degraded", "unhealthy"];

#[derive(Debug)]
pub struct InstanceCollector {
    state: Arc<InstanceState>,
    outage_budget: Duration,
}

impl InstanceCollector {
    pub fn new(state: Arc<InstanceState>, outage_budget: Duration) -> Self {
        InstanceCollector {
            state,
            outage_budget,
        }
    }
}

impl Collector for InstanceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let e = &mut encoder;
        let c = &self.state.counters;
        labelled(
            e,
            "flowcoach_envelopes_received",
            "Envelopes received from Slack",
            &c.envelopes_received,
        )?;
        labelled(
            e,
            "flowcoach_envelopes_acked",
            "Acks written to Slack",
            &c.envelopes_acked,
        )?;
        labelled(
            e,
            "flowcoach_envelopes_deduplicated",
            "Redeliveries acked again, not handled again",
            &c.envelopes_deduplicated,
        )?;
        labelled(
            e,
            "flowcoach_envelopes_deferred",
            "Envelopes left unacked for Slack to redeliver (queue full)",
            &c.envelopes_deferred,
        )?;
        counter(
            e,
            "flowcoach_acks_failed",
            "Acks that could not be sent",
            &c.acks_failed,
        )?;
        counter(
            e,
            "flowcoach_late_responses",
            "Handler answers after the response deadline, acked without them",
            &c.late_responses,
        )?;
        counter(
            e,
            "flowcoach_handler_errors",
            "Handler invocations that failed",
            &c.handler_errors,
        )?;
        forward_outcomes(e, &c.forwarded, &c.forward_failed)?;
        counter(
            e,
            "flowcoach_connects",
            "Connection attempts (apps.connections.open, then the websocket)",
            &c.connects,
        )?;
        labelled(
            e,
            "flowcoach_connection_opens",
            "apps.connections.open calls by outcome",
            &c.connection_opens,
        )?;
        labelled(
            e,
            "flowcoach_reconnects",
            "Connections replaced after they ended, by cause",
            &c.reconnects,
        )?;
        counter(
            e,
            "flowcoach_rotations",
            "Connections replaced make-before-break (Slack's refresh)",
            &c.rotations,
        )?;
        labelled(
            e,
            "flowcoach_disconnects",
            "disconnect messages from Slack, by reason",
            &c.disconnects,
        )?;
        counter(
            e,
            "flowcoach_too_many_websockets",
            "Connections Slack refused with too_many_websockets",
            &c.too_many_websockets,
        )?;
        labelled(
            e,
            "flowcoach_handovers",
            "Handovers, by outcome",
            &c.handovers,
        )?;
        let bad_frames = [
            ("malformed", &c.frames_malformed),
            ("unknown", &c.frames_unknown),
            ("binary", &c.frames_binary),
            ("oversized", &c.frames_oversized),
        ];
        let mut frames = e.encode_descriptor(
            "flowcoach_frames_rejected",
            "Frames from Slack that were not envelopes flowcoach could handle",
            None,
            MetricType::Counter,
        )?;
        for (kind, count) in bad_frames {
            ConstCounter::new(count.load(Ordering::Relaxed))
                .encode(frames.encode_family(&[("kind", kind)])?)?;
        }
        gauge(
            e,
            "flowcoach_in_flight",
            "Envelopes handed to the handler and not finished",
            c.in_flight.load(Ordering::Relaxed) as i64,
        )?;
        self.encode_status(e)
    }
}

impl InstanceCollector {
    fn encode_status(&self, e: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let status = self.state.status();
        let now = SystemTime::now();
        let phase = match status.phase {
            Phase::Starting => "starting",
            Phase::Connecting => "connecting",
            Phase::Connected => "connected",
            Phase::Reconnecting { .. } => "reconnecting",
            Phase::Draining => "draining",
            Phase::Stopped => "stopped",
        };
        state_set(
            e,
            "flowcoach_phase",
            "The lifecycle phase (1 for the current one)",
            "phase",
            &PHASES,
            phase,
        )?;
        gauge(
            e,
            "flowcoach_sockets_open",
            "Websockets this instance holds open (two during a rotation)",
            i64::from(status.sockets_open),
        )?;
        if let Some(n) = status.num_connections {
            gauge(
                e,
                "flowcoach_slack_connections",
                "Slack's num_connections at the latest hello: every open socket of the app",
                i64::from(n),
            )?;
        }
        if let Some(n) = status.other_connections {
            gauge(
                e,
                "flowcoach_other_clients_sockets",
                "Sockets of other clients of the app at the latest hello",
                i64::from(n),
            )?;
        }
        let down_for = status
            .down_since
            .map(|since| now.duration_since(since).unwrap_or_default())
            .unwrap_or_default();
        seconds(
            e,
            "flowcoach_outage",
            "How long no socket has been connected (0 while connected)",
            down_for,
        )?;
        seconds(
            e,
            "flowcoach_outage_budget",
            "The configured outage budget (service.outage_budget)",
            self.outage_budget,
        )?;
        let health = match health::evaluate(&status, self.outage_budget, now) {
            Health::Healthy => "healthy",
            Health::Degraded(_) => "degraded",
            Health::Unhealthy(_) => "unhealthy",
        };
        state_set(
            e,
            "flowcoach_health",
            "The health `flowcoachctl health` and the watchdog judge (1 for the current state)",
            "state",
            &HEALTH_STATES,
            health,
        )?;
        gauge(
            e,
            "flowcoach_watchdog_fed",
            "1 while the watchdog verdict feeds systemd's watchdog",
            i64::from(health::watchdog_verdict(&status, self.outage_budget, now).is_ok()),
        )?;
        gauge(
            e,
            "flowcoach_app_failing",
            "1 while the app behind [forward] is failing",
            i64::from(status.app_failing.is_some()),
        )?;
        encode_inbox(e, &status, now)
    }
}

/// The inbox's depth as of its latest count (the writer counts every few seconds while it
/// works), only when this instance has an inbox; the age is taken at the scrape.
fn encode_inbox(
    e: &mut DescriptorEncoder,
    status: &ConnectionStatus,
    now: SystemTime,
) -> Result<(), std::fmt::Error> {
    let Some((counts, _)) = &status.inbox else {
        return Ok(());
    };
    let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
    gauge(
        e,
        "flowcoach_inbox_pending",
        "Acked envelopes in the inbox waiting for delivery (those being delivered included)",
        count(counts.pending + counts.delivering),
    )?;
    gauge(
        e,
        "flowcoach_inbox_delivering",
        "Envelopes of the inbox being delivered now",
        count(counts.delivering),
    )?;
    gauge(
        e,
        "flowcoach_inbox_dead_letters",
        "Envelopes the inbox gave up on (inbox.max_age passed): see flowcoachctl inbox list --dead",
        count(counts.dead),
    )?;
    seconds(
        e,
        "flowcoach_inbox_oldest_pending_age",
        "How long the oldest envelope waiting for delivery has been in the inbox (0 when none)",
        counts.oldest_pending_age(now).unwrap_or_default(),
    )?;
    gauge(
        e,
        "flowcoach_inbox_trouble",
        "1 while the inbox cannot store envelopes (they are left unacked for Slack to redeliver)",
        i64::from(status.inbox_trouble.is_some()),
    )
}

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: &AtomicU64,
) -> Result<(), std::fmt::Error> {
    let counter = ConstCounter::new(value.load(Ordering::Relaxed));
    counter.encode(e.encode_descriptor(name, help, None, counter.metric_type())?)
}

fn labelled<L: Label>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    counts: &ByLabel<L>,
) -> Result<(), std::fmt::Error> {
    let mut family = e.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (label, count) in counts.iter() {
        ConstCounter::new(count).encode(family.encode_family(&[(L::KEY, label.as_str())])?)?;
    }
    Ok(())
}

fn forward_outcomes(
    e: &mut DescriptorEncoder,
    ok: &AtomicU64,
    failed: &AtomicU64,
) -> Result<(), std::fmt::Error> {
    let mut family = e.encode_descriptor(
        "flowcoach_forwards",
        "Envelopes sent to the app behind [forward], by outcome",
        None,
        MetricType::Counter,
    )?;
    for (outcome, count) in [("ok", ok), ("failed", failed)] {
        ConstCounter::new(count.load(Ordering::Relaxed))
            .encode(family.encode_family(&[("outcome", outcome)])?)?;
    }
    Ok(())
}

fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: i64,
) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(value);
    gauge.encode(e.encode_descriptor(name, help, None, gauge.metric_type())?)
}

fn seconds(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: Duration,
) -> Result<(), std::fmt::Error> {
    let gauge = ConstGauge::new(value.as_secs_f64());
    gauge.encode(e.encode_descriptor(name, help, Some(&Unit::Seconds), gauge.metric_type())?)
}

/// One gauge per possible value, 1 for `current`, so that every series always exists.
fn state_set(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    key: &str,
    values: &[&str],
    current: &str,
) -> Result<(), std::fmt::Error> {
    let mut family = e.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for value in values {
        ConstGauge::new(i64::from(*value == current))
            .encode(family.encode_family(&[(key, *value)])?)?;
    }
    Ok(())
}
