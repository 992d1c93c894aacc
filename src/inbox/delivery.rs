//! Delivery from the inbox to the handler (the built-in bot, or the app behind
//! `[forward]`): oldest first, a bounded number at once, each failure retried later with
//! capped, jittered backoff, until delivered or older than `max_age` (a dead letter).
//!
//! While the target fails, only one envelope at a time is tried (a probe, at most
//! [`PROBE_EVERY`] apart), not every pending one: a target that is down is not flooded,
//! logs one failure per probe, and is found back within seconds; then everything waiting
//! is due at once.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::writer::Writer;
use super::{Applied, Change, Due, Settlement};
use crate::dispatch::{Handler, Incoming};
use crate::slack::backoff::Backoff;
use flowcoach_protocol::Envelope;

/// The longest wait between two probes of a failing target.
const PROBE_EVERY: Duration = Duration::from_secs(5);
/// How often retries that came due are looked for, without news from the writer; and the
/// wait after the store failed.
const POLL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Copy)]
pub struct DeliverySettings {
    pub max_concurrent: usize,
    pub retry_initial: Duration,
    pub retry_max: Duration,
    pub max_age: Duration,
}

/// Delivery running; [`Running::stop`] ends it.
pub struct Running {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Running {
    /// Stops claiming; resolves once the deliveries under way have ended and their
    /// outcome is stored.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }

    /// Stops claiming now; [`Running::stop`] then waits for the rest.
    pub fn cancel(&self) {
        self.stop.cancel();
    }
}

/// Starts delivering what the inbox holds, and what it is given from now on.
pub fn start(writer: Writer, handler: Arc<dyn Handler>, settings: DeliverySettings) -> Running {
    let stop = CancellationToken::new();
    let task = tokio::spawn(
        Deliverer {
            writer,
            handler,
            settings,
        }
        .run(stop.clone()),
    );
    Running { stop, task }
}

struct Deliverer {
    writer: Writer,
    handler: Arc<dyn Handler>,
    settings: DeliverySettings,
}

impl Deliverer {
    async fn run(self, stop: CancellationToken) {
        // What a crashed process, or a predecessor, was delivering is pending again: it
        // delivers no longer (the lock is ours).
        loop {
            match self
                .writer
                .change(Change::Unclaim { keep: Vec::new() })
                .await
            {
                Ok(Applied::Count(count)) if count > 0 => {
                    tracing::info!(count, "inbox: resuming deliveries that were under way");
                    break;
                }
                Ok(_) => break,
                // The writer reports the cause.
                Err(_) => {
                    if tokio::time::timeout(POLL, stop.cancelled()).await.is_ok() {
                        return;
                    }
                }
            }
        }
        let self_ = Arc::new(self);
        let tracker = TaskTracker::new();
        // (id, delivered) of each attempt that ended.
        let (done_tx, mut done) = mpsc::unbounded_channel::<(i64, bool)>();
        let settings = self_.settings;
        let mut in_flight = BTreeSet::new();
        // A claim failed: the store may have committed it all the same (the connection
        // broke before its answer came). Its envelopes would wait marked as ours, their
        // lease renewed by our heartbeat, delivered by nobody: released before claiming
        // again, all but those under way.
        let mut unclaim_first = false;
        let mut probes = Backoff::new(
            settings.retry_initial.min(PROBE_EVERY),
            settings.retry_max.min(PROBE_EVERY),
        );
        // `Some(when the next probe is due)` while the target fails.
        let mut failing: Option<Instant> = None;
        loop {
            let now = Instant::now();
            let room = match failing {
                Some(probe_at) => usize::from(in_flight.is_empty() && now >= probe_at),
                // Refilled in batches, not one claim (one transaction) per delivery.
                None if in_flight.len() > settings.max_concurrent / 2 => 0,
                None => settings.max_concurrent - in_flight.len(),
            };
            let mut wait = POLL;
            if room > 0 && unclaim_first {
                let keep = in_flight.iter().copied().collect();
                unclaim_first = self_.writer.change(Change::Unclaim { keep }).await.is_err();
            }
            if room > 0 && !unclaim_first {
                let claim = Change::Claim {
                    limit: room,
                    probe: failing.is_some(),
                    now: SystemTime::now(),
                };
                match self_.writer.change(claim).await {
                    Ok(Applied::Claimed(due)) => {
                        if due.is_empty() && failing.is_some() {
                            // Nothing left to try it with: what we put off while it
                            // failed is due again, for whoever delivers next.
                            failing = None;
                            probes.reset();
                            let _ = self_
                                .writer
                                .change(Change::Expedite {
                                    now: SystemTime::now(),
                                })
                                .await;
                        }
                        for due in due {
                            in_flight.insert(due.id);
                            let deliverer = self_.clone();
                            let done = done_tx.clone();
                            tracker.spawn(async move {
                                let id = due.id;
                                let delivered = deliverer.deliver(due).await;
                                let _ = done.send((id, delivered));
                            });
                        }
                    }
                    Ok(_) => {}
                    Err(_) => {
                        unclaim_first = true;
                        wait = POLL;
                    }
                }
            }
            if let Some(probe_at) = failing {
                wait = probe_at
                    .saturating_duration_since(now)
                    .max(Duration::from_millis(1));
            }
            tokio::select! {
                biased;
                () = stop.cancelled() => break,
                Some(first) = done.recv() => {
                    let mut outcomes = vec![first];
                    while let Ok(outcome) = done.try_recv() {
                        outcomes.push(outcome);
                    }
                    for (id, _) in &outcomes {
                        in_flight.remove(id);
                    }
                    // Any success says the target works; else the last failure counts.
                    let delivered = outcomes.iter().any(|(_, delivered)| *delivered);
                    match (delivered, failing) {
                        (true, Some(_)) => {
                            failing = None;
                            probes.reset();
                            tracing::info!("inbox: delivery works again; delivering what waited");
                            let _ = self_.writer.change(Change::Expedite { now: SystemTime::now() }).await;
                        }
                        (false, _) => {
                            if failing.is_none() {
                                tracing::warn!(
                                    "inbox: delivery failing; trying one envelope at a time until it works"
                                );
                            }
                            failing = Some(Instant::now() + probes.next_delay(&mut rand::rng()));
                        }
                        (true, None) => {}
                    }
                }
                () = self_.writer.kept.notified(), if failing.is_none() => {}
                () = tokio::time::sleep(wait) => {}
            }
        }
        tracker.close();
        tracker.wait().await;
    }

    /// One attempt; true when the handler took the envelope. Its outcome is stored before
    /// this returns (retried while the store fails, until delivery stops).
    async fn deliver(&self, due: Due) -> bool {
        let (delivered, settlement) = match serde_json::from_str::<Envelope>(&due.body) {
            Ok(envelope) => {
                let summary = envelope.summary();
                match self.handler.handle(Incoming { envelope, summary }).await {
                    Ok(_) => (true, Settlement::Delivered),
                    Err(error) => (false, self.failed(&due, &error.to_string())),
                }
            }
            Err(error) => (
                // Not the target's failure: no reason to slow the others down.
                true,
                Settlement::Dead {
                    error: format!("unreadable envelope in the inbox: {error}"),
                },
            ),
        };
        if let Settlement::Dead { error } = &settlement {
            tracing::warn!(
                id = due.id,
                attempts = due.attempts + 1,
                error,
                "inbox: envelope kept as a dead letter (flowcoachctl inbox list --dead)"
            );
        }
        let settle = Change::Settle {
            id: due.id,
            settlement,
        };
        while self.writer.change(settle.clone()).await.is_err() {
            tokio::time::sleep(POLL).await;
        }
        delivered
    }

    fn failed(&self, due: &Due, error: &str) -> Settlement {
        let now = SystemTime::now();
        let age = now.duration_since(due.received_at).unwrap_or_default();
        if age >= self.settings.max_age {
            return Settlement::Dead {
                error: error.to_owned(),
            };
        }
        let delay = Backoff::new(self.settings.retry_initial, self.settings.retry_max)
            .after_failures(due.attempts)
            .next_delay(&mut rand::rng());
        Settlement::Retry {
            at: now + delay,
            error: error.to_owned(),
        }
    }
}
