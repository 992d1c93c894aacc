//! Load generation for benchmarks and soak tests: many envelopes at a rate, optionally with
//! a window of unacked envelopes so a slow client is measured rather than buried.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::time::{Instant, sleep_until};

use super::spec::{EnvelopeSpec, SIM_USER_ID};
use super::state::Shared;

/// How many envelopes, how fast, and of which kinds.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    pub count: u64,
    /// Envelopes per second; `None` injects as fast as the window allows.
    pub rate_per_sec: Option<f64>,
    /// At most this many injected envelopes neither acked nor given up at once.
    pub max_outstanding: Option<usize>,
    pub mix: LoadMix,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LoadMix {
    #[default]
    EventsOnly,
    /// Mostly message events, one slash command and one block action in every ten.
    Mixed,
}

/// Channels the load spreads its messages over, so per-channel ordering in the client is
/// exercised without serialising everything onto one channel.
const LOAD_CHANNELS: u64 = 8;

/// Without a rate, give the runtime a turn this often so sockets keep writing.
const YIELD_EVERY: u64 = 64;

/// The `n`th envelope of a load run `run`.
fn load_envelope(run: u64, n: u64, mix: LoadMix) -> EnvelopeSpec {
    let channel = format!("C0SIM{:02}", n % LOAD_CHANNELS);
    match (mix, n % 10) {
        (LoadMix::Mixed, 3) => EnvelopeSpec::slash_command("/flowcoach", format!("load {n}")),
        (LoadMix::Mixed, 7) => EnvelopeSpec::Interactive {
            payload: json!({
                "type": "block_actions",
                "user": {"id": SIM_USER_ID},
                "channel": {"id": channel},
                "trigger_id": super::spec::trigger_id(n),
                "actions": [{"action_id": "sim_load", "value": n.to_string()}],
            }),
            accepts_response_payload: true,
        },
        _ => EnvelopeSpec::message(format!("EvLOAD{run}x{n}"), &channel, &format!("load {n}")),
    }
}

/// Injects `load.count` envelopes for `app_id`, pacing by rate and window; ends early on
/// shutdown.
pub(super) async fn run_load(shared: Arc<Shared>, app_id: String, load: LoadSpec, run: u64) {
    let started = Instant::now();
    let window = load.max_outstanding.map(|w| w.max(1));
    let mut changes = shared.subscribe();
    let mut outstanding: Vec<String> = Vec::with_capacity(window.unwrap_or(0));
    for n in 0..load.count {
        if let Some(rate) = load.rate_per_sec.filter(|r| *r > 0.0) {
            // Scheduled times, not sleeps between injections, so the average rate holds
            // even when the timer fires late.
            let due = started + Duration::from_secs_f64(n as f64 / rate);
            tokio::select! {
                () = shared.shutdown.cancelled() => return,
                () = sleep_until(due) => {}
            }
        } else if n % YIELD_EVERY == YIELD_EVERY - 1 {
            tokio::task::yield_now().await;
        }
        if let Some(window) = window {
            loop {
                changes.borrow_and_update();
                shared.read(|inner| {
                    outstanding.retain(|id| inner.deliveries.is_outstanding(id));
                });
                if outstanding.len() < window {
                    break;
                }
                tokio::select! {
                    () = shared.shutdown.cancelled() => return,
                    changed = changes.changed() => if changed.is_err() { return },
                }
            }
        }
        let spec = load_envelope(run, n, load.mix);
        let id = shared.update(|inner| inner.inject(&app_id, spec, Instant::now()));
        if window.is_some() {
            outstanding.push(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowcoach_protocol::EnvelopeKind;

    fn kinds(mix: LoadMix) -> Vec<EnvelopeKind> {
        (0..20)
            .map(|n| {
                load_envelope(1, n, mix)
                    .into_content("A1", n, "http://127.0.0.1:9/response/x")
                    .kind
            })
            .collect()
    }

    #[test]
    fn events_only_is_events_only() {
        assert!(
            kinds(LoadMix::EventsOnly)
                .iter()
                .all(|k| *k == EnvelopeKind::EventsApi)
        );
    }

    #[test]
    fn mixed_is_mostly_events() {
        let kinds = kinds(LoadMix::Mixed);
        let events = kinds
            .iter()
            .filter(|k| **k == EnvelopeKind::EventsApi)
            .count();
        assert_eq!(events, 16);
        assert!(kinds.contains(&EnvelopeKind::SlashCommands));
        assert!(kinds.contains(&EnvelopeKind::Interactive));
    }

    #[test]
    fn event_ids_differ_between_runs_and_envelopes() {
        let id = |run, n| match load_envelope(run, n, LoadMix::EventsOnly) {
            EnvelopeSpec::Event { event_id, .. } => event_id,
            other => panic!("not an event: {other:?}"),
        };
        assert_ne!(id(1, 0), id(1, 1));
        assert_ne!(id(1, 0), id(2, 0));
    }
}
