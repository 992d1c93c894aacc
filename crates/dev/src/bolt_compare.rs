//! `flowcoach-dev bench --bolt-compare SECONDS`: the same Bolt for Python app
//! (`examples/bolt-python`) run two ways against one simulated Slack that rotates its
//! connections and drops one now and then: in Socket Mode with Bolt's own
//! `SocketModeHandler`, and in HTTP mode behind flowcoach. Both get the same stream of
//! mentions; the app answers each with `chat.postMessage`, which the simulator records, so
//! an event handled twice shows as two replies naming it.

use std::collections::HashMap;
use std::time::Duration;

use flowcoach_harness::bolt::{Bolt, BoltApp, SocketModeBoltApp};
use flowcoach_harness::{Daemon, Logs};
use flowcoach_sim::{
    DEFAULT_APP_ID, EnvelopeSpec, Record, SIM_CHANNEL_ID, SimConfig, Simulator, fake_bot_token,
    fake_signing_secret, fake_token,
};
use nix::sys::signal::Signal;
use serde::Serialize;
use tokio::time::{Instant, MissedTickBehavior};

use crate::bench::AckLatencies;

const APP: &str = DEFAULT_APP_ID;
const WAIT: Duration = Duration::from_secs(30);
/// Each connection is rotated (`warning`, then `refresh_requested`) at this age, as with
/// Slack's `debug_reconnects`.
const ROTATE_AFTER: Duration = Duration::from_secs(20);
/// The oldest open connection is dropped (TCP reset, no Close) this often.
const DROP_EVERY: Duration = Duration::from_secs(15);
/// What the stream's event ids start with; each mention's text names its event.
const EVENT_PREFIX: &str = "EvCMP";

/// What `--bolt-compare` measures, once per way of running the app.
#[derive(Debug, Serialize)]
pub struct BoltCompareReport {
    pub seconds: u64,
    pub rate_per_sec: f64,
    pub rotate_after_s: u64,
    pub drop_every_s: u64,
    pub ack_deadline_ms: u64,
    pub socket_mode: Outcome,
    pub behind_flowcoach: Outcome,
}

/// What became of one run's stream.
#[derive(Debug, Serialize)]
pub struct Outcome {
    pub events: usize,
    /// Connections Slack said hello on (the first, rotations, replacements of drops).
    pub connections: usize,
    /// Acked later than the ack deadline after their first delivery.
    pub acked_late: usize,
    /// Delivered more than once.
    pub redelivered: usize,
    /// Never acked (given up by Slack after its retries).
    pub never_acked: usize,
    /// Events the app answered more than once.
    pub handled_twice: usize,
    /// Events the app never answered.
    pub not_handled: usize,
    pub ack_p50_ms: f64,
    pub ack_p99_ms: f64,
}

/// How the app meets Slack.
#[derive(Debug, Clone, Copy)]
enum Way {
    SocketMode,
    BehindFlowcoach,
}

pub async fn compare(seconds: u64, rate: f64) -> Result<BoltCompareReport, String> {
    if rate.is_nan() || rate <= 0.0 {
        return Err("--rate must be positive".to_owned());
    }
    if let Some(why) = Bolt::Python.missing() {
        return Err(why);
    }
    let events = (seconds as f64 * rate) as u64;
    let socket_mode = run(Way::SocketMode, events, rate).await?;
    let behind_flowcoach = run(Way::BehindFlowcoach, events, rate).await?;
    Ok(BoltCompareReport {
        seconds,
        rate_per_sec: rate,
        rotate_after_s: ROTATE_AFTER.as_secs(),
        drop_every_s: DROP_EVERY.as_secs(),
        ack_deadline_ms: SimConfig::default().ack_deadline.as_millis() as u64,
        socket_mode,
        behind_flowcoach,
    })
}

/// The running app, and flowcoach in front of it when there is one.
enum Running {
    SocketMode(SocketModeBoltApp),
    /// Boxed: a daemon handle is large, and there is one of these.
    BehindFlowcoach(BoltApp, Box<Daemon>),
}

impl Running {
    async fn start(way: Way, sim: &Simulator) -> Running {
        let secret = fake_signing_secret(APP);
        let bot_token = fake_bot_token(APP);
        let api_url = sim.api_url();
        let mut env = vec![
            ("SLACK_SIGNING_SECRET", secret.as_str()),
            ("SLACK_BOT_TOKEN", bot_token.as_str()),
            ("SLACK_API_URL", api_url.as_str()),
        ];
        match way {
            Way::SocketMode => {
                let app_token = fake_token(APP);
                env.push(("SLACK_APP_TOKEN", app_token.as_str()));
                Running::SocketMode(SocketModeBoltApp::start(&env))
            }
            Way::BehindFlowcoach => {
                let app = BoltApp::start(Bolt::Python, 0, &env).await;
                let config = format!("[forward]\nurl = \"{}\"\n", app.url());
                let daemon = Daemon::launch(
                    sim,
                    &config,
                    &[("FLOWCOACH_LOG", "warn"), ("SLACK_SIGNING_SECRET", &secret)],
                    &[],
                    Logs::Collect,
                );
                Running::BehindFlowcoach(app, Box::new(daemon))
            }
        }
    }

    fn output(&self) -> String {
        match self {
            Running::SocketMode(app) => app.output(),
            Running::BehindFlowcoach(app, _) => app.output(),
        }
    }

    async fn stop(self) {
        match self {
            Running::SocketMode(mut app) => app.stop().await,
            Running::BehindFlowcoach(mut app, mut daemon) => {
                daemon.signal(Signal::SIGTERM);
                let _ = tokio::time::timeout(WAIT, daemon.child.wait()).await;
                app.stop().await;
            }
        }
    }
}

async fn run(way: Way, events: u64, rate: f64) -> Result<Outcome, String> {
    let sim = Simulator::start(SimConfig {
        rotate_after: Some(ROTATE_AFTER),
        ..SimConfig::default()
    })
    .await
    .map_err(|e| format!("simulator: {e}"))?;
    let running = Running::start(way, &sim).await;
    if let Err(e) = sim.wait_until(WAIT, |r| r.hellos() >= 1).await {
        let output = running.output();
        running.stop().await;
        return Err(format!(
            "{way:?}: the app did not connect: {e:?}\nits output:\n{output}"
        ));
    }

    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
    let mut next_drop = Instant::now() + DROP_EVERY;
    for n in 0..events {
        tick.tick().await;
        let event_id = format!("{EVENT_PREFIX}{n}");
        let text = format!("compare {event_id}");
        sim.inject(
            APP,
            EnvelopeSpec::app_mention(&event_id, APP, SIM_CHANNEL_ID, &text),
        );
        if Instant::now() >= next_drop {
            if let Some(oldest) = sim.open_sockets(APP).first() {
                sim.drop_socket(*oldest);
            }
            next_drop += DROP_EVERY;
        }
    }

    // Settled: every event acked or given up after Slack's retries, and answered.
    let ack_deadline = sim.config().ack_deadline;
    let settle = ack_deadline * (sim.config().max_retries + 2) + WAIT;
    let settled = |r: &Record| {
        r.envelopes
            .iter()
            .all(|e| e.acked_at.is_some() || e.gave_up)
            && replies(r).len() >= r.envelopes.iter().filter(|e| e.acked_at.is_some()).count()
    };
    let record = sim
        .wait_until(settle, settled)
        .await
        .unwrap_or_else(|timeout| timeout.record);
    running.stop().await;
    sim.shutdown().await;

    let replies = replies(&record);
    let latencies = AckLatencies::of(&record);
    let ms = |p| latencies.percentile_us(p) as f64 / 1e3;
    Ok(Outcome {
        events: record.envelopes.len(),
        connections: record.hellos(),
        acked_late: record
            .envelopes
            .iter()
            .filter(|e| e.ack_delay().is_some_and(|delay| delay > ack_deadline))
            .count(),
        redelivered: record
            .envelopes
            .iter()
            .filter(|e| e.deliveries.len() > 1)
            .count(),
        never_acked: record
            .envelopes
            .iter()
            .filter(|e| e.acked_at.is_none())
            .count(),
        handled_twice: replies.values().filter(|n| **n > 1).count(),
        not_handled: record
            .envelopes
            .iter()
            .filter_map(|e| e.event_id.as_deref())
            .filter(|id| !replies.contains_key(*id))
            .count(),
        ack_p50_ms: ms(0.50),
        ack_p99_ms: ms(0.99),
    })
}

/// The app's replies (`chat.postMessage`), counted by the event they answer: the mention's
/// text names it, and the reply quotes the text.
fn replies(record: &Record) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for call in record.api_calls_of("chat.postMessage") {
        let event = call.body["text"].as_str().and_then(|text| {
            text.split_whitespace()
                .find(|w| w.starts_with(EVENT_PREFIX))
        });
        if let Some(event) = event {
            *counts.entry(event.to_owned()).or_default() += 1;
        }
    }
    counts
}

pub fn print_table(r: &BoltCompareReport) {
    println!(
        "flowcoach-dev bench: the Bolt for Python example, {} s of mentions at {} per second; \
         connections rotated at {} s of age, one dropped every {} s; ack deadline {} ms",
        r.seconds, r.rate_per_sec, r.rotate_after_s, r.drop_every_s, r.ack_deadline_ms
    );
    println!("                      SocketModeHandler   behind flowcoach");
    let (a, b) = (&r.socket_mode, &r.behind_flowcoach);
    let row = |name: &str, a: usize, b: usize| println!("  {name:<18} {a:>18} {b:>18}");
    row("events", a.events, b.events);
    row("connections", a.connections, b.connections);
    row("acked late", a.acked_late, b.acked_late);
    row("redelivered", a.redelivered, b.redelivered);
    row("never acked", a.never_acked, b.never_acked);
    row("handled twice", a.handled_twice, b.handled_twice);
    row("not handled", a.not_handled, b.not_handled);
    println!(
        "  {:<18} {:>15.1} ms {:>15.1} ms",
        "ack p50", a.ack_p50_ms, b.ack_p50_ms
    );
    println!(
        "  {:<18} {:>15.1} ms {:>15.1} ms",
        "ack p99", a.ack_p99_ms, b.ack_p99_ms
    );
}
