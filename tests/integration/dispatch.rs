//! Dispatch semantics with handlers written for the test, the supervisor running in the
//! test process against the simulator over real sockets.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flowcoach::config::{Config, env};
use flowcoach::dispatch::{Dispatcher, Handler, HandlerFuture, Incoming};
use flowcoach::slack::api::SlackApi;
use flowcoach::slack::supervisor::Supervisor;
use flowcoach::state::{InstanceInfo, InstanceState};
use flowcoach_harness::{APP, WAIT, event, simulator, slash, token};
use flowcoach_sim::Simulator;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Records invocations per dedup key and the peak of concurrent invocations; sleeps as
/// long as the event's text says (`"sleep:MS"`) and answers slash commands with their text.
#[derive(Default)]
struct Recorder {
    calls: Mutex<HashMap<String, usize>>,
    running: AtomicUsize,
    peak: AtomicUsize,
    started: tokio::sync::watch::Sender<usize>,
    finished: tokio::sync::watch::Sender<usize>,
}

impl Recorder {
    async fn wait_started(&self, count: usize) {
        let mut started = self.started.subscribe();
        tokio::time::timeout(WAIT, started.wait_for(|n| *n >= count))
            .await
            .expect("handlers start")
            .unwrap();
    }

    async fn wait_finished(&self, count: usize) {
        let mut finished = self.finished.subscribe();
        tokio::time::timeout(WAIT, finished.wait_for(|n| *n >= count))
            .await
            .expect("handlers finish")
            .unwrap();
    }

    fn calls(&self, key: &str) -> usize {
        self.calls.lock().unwrap().get(key).copied().unwrap_or(0)
    }
}

struct RecordingHandler(Arc<Recorder>);

impl Handler for RecordingHandler {
    fn handle(&self, incoming: Incoming) -> HandlerFuture {
        let recorder = self.0.clone();
        Box::pin(async move {
            let key = incoming
                .summary
                .event_id
                .clone()
                .unwrap_or_else(|| incoming.envelope.envelope_id.clone());
            *recorder.calls.lock().unwrap().entry(key).or_insert(0) += 1;
            let now = recorder.running.fetch_add(1, Ordering::SeqCst) + 1;
            recorder.peak.fetch_max(now, Ordering::SeqCst);
            recorder.started.send_modify(|n| *n += 1);
            let payload: serde_json::Value =
                serde_json::from_str(incoming.envelope.payload.get()).unwrap();
            let text = payload["text"]
                .as_str()
                .or(payload["event"]["text"].as_str())
                .unwrap_or_default()
                .to_owned();
            if let Some(ms) = text.strip_prefix("sleep:") {
                tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
            }
            recorder.running.fetch_sub(1, Ordering::SeqCst);
            recorder.finished.send_modify(|n| *n += 1);
            Ok(Some(json!({ "text": format!("answer to {text}") })))
        })
    }
}

struct Running {
    recorder: Arc<Recorder>,
    state: Arc<InstanceState>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

async fn run(sim: &Simulator, dispatch_settings: &str) -> Running {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    write!(
        file,
        "{}\n[dispatch]\n{dispatch_settings}\n",
        flowcoach_harness::FAST_CONFIG
    )
    .unwrap();
    let api_url = sim.api_url();
    let token = token();
    let config = Config::load(
        Some(file.path()),
        None,
        &[
            (env::APP_TOKEN, token.as_str()),
            (env::API_URL, api_url.as_str()),
        ],
    )
    .unwrap();
    let recorder = Arc::new(Recorder::default());
    let state = Arc::new(InstanceState::new(InstanceInfo::current("test")));
    let (_, live) = tokio::sync::watch::channel(config.settings.clone());
    let dispatcher = Arc::new(Dispatcher::new(
        Arc::new(RecordingHandler(recorder.clone())),
        live.clone(),
        state.clone(),
    ));
    let api = SlackApi::new(&config.api_url, false).unwrap();
    let supervisor = Supervisor::new(
        api,
        config.token.clone(),
        config.app_pin(),
        live,
        dispatcher,
        state.clone(),
    );
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    let task = tokio::spawn(async move {
        supervisor
            .run(stop)
            .await
            .expect("supervisor ended with an error");
    });
    sim.wait_until(WAIT, |r| {
        r.open_sockets(APP) == 1 && r.sockets[0].hello_at.is_some()
    })
    .await
    .expect("connected");
    Running {
        recorder,
        state,
        shutdown,
        task,
    }
}

#[tokio::test]
async fn a_slow_handler_does_not_delay_other_acks() {
    let sim = simulator(|_| {}).await;
    let running = run(&sim, "").await;
    let slow = sim.inject(APP, event("EvSlow", "sleep:4000"));
    let fast: Vec<_> = (0..10)
        .map(|i| sim.inject(APP, event(&format!("EvFast{i}"), "go")))
        .collect();
    let all: Vec<&String> = fast.iter().chain([&slow]).collect();
    let record = sim.wait_acked(WAIT, &all).await.unwrap();
    for id in all {
        let envelope = record.envelope(id).unwrap();
        assert_eq!(envelope.deliveries.len(), 1, "{id} was redelivered");
        let latency = envelope.acked_at.unwrap() - envelope.deliveries[0].at;
        assert!(
            latency < Duration::from_secs(1),
            "{id} acked after {latency:?}"
        );
    }
    running.stop().await;
}

#[tokio::test]
async fn responses_ride_in_the_ack_or_the_ack_goes_without_them_before_the_deadline() {
    let sim = simulator(|_| {}).await;
    let running = run(&sim, "response_deadline = \"1s\"").await;
    let quick = sim.inject(APP, slash("quick"));
    let late = sim.inject(APP, slash("sleep:2500"));
    let record = sim.wait_acked(WAIT, &[&quick, &late]).await.unwrap();
    let quick = record.envelope(&quick).unwrap();
    assert_eq!(quick.ack_payload, Some(json!({"text": "answer to quick"})));
    let late = record.envelope(&late).unwrap();
    assert_eq!(late.ack_payload, None, "acked without the late answer");
    assert_eq!(
        late.deliveries.len(),
        1,
        "acked before Slack's 3 s deadline"
    );
    let waited = late.acked_at.unwrap() - late.deliveries[0].at;
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    let state = running.state.clone();
    running.stop().await;
    assert_eq!(state.counters.snapshot().late_responses, 1);
}

#[tokio::test]
async fn handlers_run_concurrently_up_to_the_bound() {
    let sim = simulator(|_| {}).await;
    let running = run(&sim, "max_concurrent_handlers = 3").await;
    let ids: Vec<_> = (0..12)
        .map(|i| sim.inject(APP, event(&format!("EvC{i}"), "sleep:300")))
        .collect();
    sim.wait_acked(WAIT, &ids).await.unwrap();
    running.recorder.wait_finished(12).await;
    assert_eq!(running.recorder.peak.load(Ordering::SeqCst), 3);
    running.stop().await;
}

#[tokio::test]
async fn redeliveries_are_acked_but_handled_once() {
    let sim = simulator(|_| {}).await;
    let running = run(&sim, "").await;
    let deliveries: Vec<_> = (0..3)
        .map(|_| sim.inject(APP, event("EvRetried", "hello")))
        .collect();
    sim.wait_acked(WAIT, &deliveries).await.unwrap();
    assert_eq!(running.recorder.calls("EvRetried"), 1);
    assert_eq!(running.state.counters.snapshot().envelopes_deduplicated, 2);
    running.stop().await;
}

#[tokio::test]
async fn a_full_queue_leaves_envelopes_for_redelivery_and_loses_nothing() {
    let sim = simulator(|c| c.ack_deadline = Duration::from_millis(1500)).await;
    let running = run(
        &sim,
        "max_concurrent_handlers = 1\nmax_queued_handlers = 0\nresponse_deadline = \"2s\"",
    )
    .await;
    // The slash command holds the only slot (its ack waits for the answer); the event that
    // follows finds no room, is left unacked, and Slack's redelivery is handled.
    let busy = sim.inject(APP, slash("sleep:1000"));
    let deferred = sim.inject(APP, event("EvDeferred", "x"));
    let record = sim.wait_acked(WAIT, &[&busy, &deferred]).await.unwrap();
    let envelope = record.envelope(&deferred).unwrap();
    assert!(envelope.deliveries.len() >= 2, "left for redelivery");
    assert_eq!(envelope.deliveries[1].retry_attempt, 1);
    assert_eq!(running.recorder.calls("EvDeferred"), 1);
    assert!(running.state.counters.snapshot().envelopes_deferred >= 1);
    running.stop().await;
}

#[tokio::test]
async fn stopping_drains_slow_handlers_acks_them_and_closes_cleanly() {
    let sim = simulator(|_| {}).await;
    let running = run(&sim, "response_deadline = \"2s\"\ndrain_timeout = \"5s\"").await;
    // Slash commands whose answers (and so acks) are still pending when the stop comes.
    let slow: Vec<_> = (0..5)
        .map(|_| sim.inject(APP, slash("sleep:1200")))
        .collect();
    let events: Vec<_> = (0..5)
        .map(|i| sim.inject(APP, event(&format!("EvDrain{i}"), "sleep:1200")))
        .collect();
    running.recorder.wait_started(10).await;
    let stop_requested = tokio::time::Instant::now();
    let state = running.state.clone();
    running.stop().await;
    let stopped_after = stop_requested.elapsed();
    assert!(
        stopped_after < Duration::from_secs(5),
        "drain took {stopped_after:?}"
    );
    let record = sim.record();
    for id in slow.iter().chain(&events) {
        let envelope = record.envelope(id).unwrap();
        assert!(
            envelope.acked_at.is_some(),
            "{id} not acked before the socket closed"
        );
    }
    for id in &slow {
        let answer = record.envelope(id).unwrap().ack_payload.clone();
        assert_eq!(answer, Some(json!({"text": "answer to sleep:1200"})));
    }
    assert_eq!(
        record.sockets[0].close,
        Some(flowcoach_sim::CloseKind::ClientCloseHandshake)
    );
    assert_eq!(state.counters.snapshot().in_flight, 0);
}
