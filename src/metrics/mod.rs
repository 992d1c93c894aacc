//! Prometheus metrics: what the instance counts and knows, in the Prometheus text format or
//! OpenMetrics, for the `/metrics` endpoint ([`server`]) and `flowcoachctl metrics` alike.
//!
//! Counters have one record each, [`crate::state::Counters`], read at each scrape; the
//! histograms ([`timings`]) are observed where the time is known. Labels are fixed enums
//! ([`labels`]), so the number of series does not grow with traffic.

mod instance;
pub mod labels;
mod process;
pub mod server;
pub mod timings;

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{prometheus_text, text};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::state::InstanceState;

/// The exposition formats a scraper may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// The Prometheus text format, version 0.0.4: what anything that scrapes understands.
    Text,
    /// OpenMetrics 1.0 text, for scrapers that ask for it.
    OpenMetrics,
}

impl Format {
    /// Chooses by an `Accept` header: OpenMetrics when it is asked for, else the text format.
    pub fn from_accept(accept: Option<&str>) -> Self {
        match accept {
            Some(accept) if accept.contains("application/openmetrics-text") => Format::OpenMetrics,
            _ => Format::Text,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Format::Text => "text/plain; version=0.0.4; charset=utf-8",
            Format::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        }
    }
}

/// Every metric of one instance.
#[derive(Debug)]
pub struct Exposition {
    registry: Registry,
}

impl Exposition {
    pub fn new(state: Arc<InstanceState>, outage_budget: Duration) -> Self {
        let mut registry = Registry::default();
        registry.register(
            "flowcoach_build",
            "The version of the running flowcoach",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let timings = &state.timings;
        registry.register_with_unit(
            "flowcoach_ack_latency",
            "From an envelope's receipt to its ack written to the socket",
            Unit::Seconds,
            timings.ack_latency.clone(),
        );
        registry.register_with_unit(
            "flowcoach_forward_latency",
            "Round trips to the app behind [forward], any outcome",
            Unit::Seconds,
            timings.forward_latency.clone(),
        );
        registry.register_with_unit(
            "flowcoach_handover_duration",
            "From a successor's takeover request to holding the app (observed by the successor)",
            Unit::Seconds,
            timings.handover_duration.clone(),
        );
        registry.register_collector(Box::new(instance::InstanceCollector::new(
            state,
            outage_budget,
        )));
        registry.register_collector(Box::new(process::ProcessCollector));
        Exposition { registry }
    }

    pub fn render(&self, format: Format) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail; a collector's error would be a bug in it.
        let written = match format {
            Format::Text => prometheus_text::encode(&mut out, &self.registry),
            Format::OpenMetrics => text::encode(&mut out, &self.registry),
        };
        debug_assert!(written.is_ok(), "encoding the metrics failed");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::labels::EnvelopeType;
    use crate::state::InstanceInfo;

    fn exposition() -> (Arc<InstanceState>, Exposition) {
        let state = Arc::new(InstanceState::new(InstanceInfo::current("test")));
        let exposition = Exposition::new(state.clone(), Duration::from_secs(300));
        (state, exposition)
    }

    #[test]
    fn counts_by_type_in_both_formats() {
        let (state, exposition) = exposition();
        state
            .counters
            .envelopes_acked
            .bump(EnvelopeType::SlashCommands);
        let text = exposition.render(Format::Text);
        assert!(text.contains("flowcoach_envelopes_acked_total{type=\"slash_commands\"} 1\n"));
        assert!(text.contains("flowcoach_build_info{version=\""));
        assert!(!text.contains("# EOF"));
        let open = exposition.render(Format::OpenMetrics);
        assert!(open.ends_with("# EOF\n"));
        assert!(open.contains("# UNIT flowcoach_ack_latency_seconds seconds"));
    }

    #[test]
    fn chooses_the_format_by_accept() {
        assert_eq!(Format::from_accept(None), Format::Text);
        assert_eq!(
            Format::from_accept(Some(
                "application/openmetrics-text;version=1.0.0,text/plain;q=0.5"
            )),
            Format::OpenMetrics
        );
        assert_eq!(Format::from_accept(Some("text/plain")), Format::Text);
    }
}
