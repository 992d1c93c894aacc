//! The group-commit thread: the only user of the store. Everything waiting in its queue
//! is applied in one transaction, made durable, and only then are the acks of the
//! envelopes in it sent. Socket tasks never wait on the disk: they queue and go on.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{Notify, oneshot};

use super::{Applied, Change, Counts, InboxError, Listed, NewEnvelope, Store, Trouble, Upkeep};
use crate::dispatch::{PendingAck, send_ack};
use crate::metrics::labels::EnvelopeType;
use crate::state::{InboxTrouble, InstanceState};
use flowcoach_protocol::EnvelopeKind;

/// Most changes in one transaction: a bound on how long the first of them waits.
const MAX_BATCH: usize = 2048;
/// With nothing to do this long, the writer does its housekeeping.
const IDLE: Duration = Duration::from_millis(500);
/// Under constant load, housekeeping still runs this often.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// The writer's queue is full: the envelope is left unacked for Slack to redeliver.
#[derive(Debug, thiserror::Error)]
#[error("the inbox's write queue is full")]
pub struct Full;

enum Job {
    Accept {
        envelope: NewEnvelope,
        ack: PendingAck,
    },
    Change {
        change: Change,
        reply: oneshot::Sender<Result<Applied, InboxError>>,
    },
    Counts(oneshot::Sender<Result<Counts, InboxError>>),
    List {
        dead: bool,
        bodies: bool,
        limit: usize,
        reply: oneshot::Sender<Result<Vec<Listed>, InboxError>>,
    },
}

/// The queue into the writer thread. Cheap to clone.
#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Job>,
    /// Envelopes queued and not yet committed: bounded, so a stalled disk costs
    /// redeliveries, not memory.
    queued: Arc<AtomicUsize>,
    bound: usize,
    /// Notified after a commit that kept new envelopes: delivery has work.
    pub kept: Arc<Notify>,
}

/// What the writer needs besides the store.
pub struct WriterSettings {
    /// Envelopes queued at most.
    pub bound: usize,
    /// How long dedup keys are remembered.
    pub dedup_window: Duration,
    pub max_bytes: u64,
    /// Published with the counts, for health.
    pub stale_after: Duration,
}

impl Writer {
    /// Starts the writer thread over `store`.
    pub fn start(
        store: Box<dyn Store>,
        settings: WriterSettings,
        state: Arc<InstanceState>,
    ) -> std::io::Result<Writer> {
        let (jobs, queue) = mpsc::channel();
        let writer = Writer {
            jobs,
            queued: Arc::new(AtomicUsize::new(0)),
            bound: settings.bound,
            kept: Arc::new(Notify::new()),
        };
        let thread = Thread {
            store,
            queue,
            queued: writer.queued.clone(),
            kept: writer.kept.clone(),
            state,
            settings,
            trouble: None,
            over_cap: false,
            last_upkeep: Instant::now(),
            dirty: false,
        };
        std::thread::Builder::new()
            .name("inbox-writer".to_owned())
            .spawn(move || thread.run())?;
        Ok(writer)
    }

    /// Queues an envelope; it is acked once committed, or left unacked if it cannot be.
    pub fn accept(&self, envelope: NewEnvelope, ack: PendingAck) -> Result<(), Full> {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.bound {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(Full);
        }
        self.jobs
            .send(Job::Accept { envelope, ack })
            .map_err(|_| Full)
    }

    /// Applies one change (with whatever else is waiting) and returns its result.
    pub async fn change(&self, change: Change) -> Result<Applied, InboxError> {
        let (reply, answer) = oneshot::channel();
        self.ask(Job::Change { change, reply }, answer).await
    }

    pub async fn counts(&self) -> Result<Counts, InboxError> {
        let (reply, answer) = oneshot::channel();
        self.ask(Job::Counts(reply), answer).await
    }

    pub async fn list(
        &self,
        dead: bool,
        bodies: bool,
        limit: usize,
    ) -> Result<Vec<Listed>, InboxError> {
        let (reply, answer) = oneshot::channel();
        self.ask(
            Job::List {
                dead,
                bodies,
                limit,
                reply,
            },
            answer,
        )
        .await
    }

    async fn ask<T>(
        &self,
        job: Job,
        answer: oneshot::Receiver<Result<T, InboxError>>,
    ) -> Result<T, InboxError> {
        let gone = || InboxError {
            trouble: Trouble::Io,
            path: Default::default(),
            detail: "the inbox writer has stopped".to_owned(),
        };
        self.jobs.send(job).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

/// A change's reply, waiting for its transaction.
enum Waiting {
    Ack(PendingAck, EnvelopeKind),
    Reply(oneshot::Sender<Result<Applied, InboxError>>),
}

struct Thread {
    store: Box<dyn Store>,
    queue: mpsc::Receiver<Job>,
    queued: Arc<AtomicUsize>,
    kept: Arc<Notify>,
    state: Arc<InstanceState>,
    settings: WriterSettings,
    /// The cause of the current failure, if the latest commit failed: logged once.
    trouble: Option<Trouble>,
    over_cap: bool,
    last_upkeep: Instant,
    /// Commits since the last upkeep.
    dirty: bool,
}

impl Thread {
    fn run(mut self) {
        self.upkeep();
        loop {
            let first = match self.queue.recv_timeout(IDLE) {
                Ok(job) => job,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if self.dirty || self.last_upkeep.elapsed() >= UPKEEP_EVERY * 12 {
                        self.upkeep();
                    }
                    continue;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let mut changes = Vec::new();
            let mut waiting = Vec::new();
            let mut reads = Vec::new();
            let mut next = Some(first);
            while let Some(job) = next.take() {
                match job {
                    Job::Accept { envelope, ack } => {
                        let kind = envelope.kind;
                        changes.push(Change::Accept(envelope));
                        waiting.push(Waiting::Ack(ack, kind));
                    }
                    Job::Change { change, reply } => {
                        changes.push(change);
                        waiting.push(Waiting::Reply(reply));
                    }
                    read => reads.push(read),
                }
                if changes.len() < MAX_BATCH {
                    next = self.queue.try_recv().ok();
                }
            }
            if !changes.is_empty() {
                self.commit(&changes, waiting);
            }
            for read in reads {
                self.read(read);
            }
            if self.last_upkeep.elapsed() >= UPKEEP_EVERY {
                self.upkeep();
            }
        }
    }

    fn commit(&mut self, changes: &[Change], waiting: Vec<Waiting>) {
        let accepts = changes
            .iter()
            .filter(|c| matches!(c, Change::Accept(_)))
            .count();
        let result = self.store.apply(changes);
        self.queued.fetch_sub(accepts, Ordering::AcqRel);
        let state = self.state.clone();
        let counters = &state.counters;
        match result {
            Ok(applied) => {
                self.dirty = true;
                // Only a commit that stored envelopes proves the trouble over: on a full
                // disk, small changes (a claim) can still fit in space the file has.
                if accepts > 0 {
                    self.recovered();
                }
                let mut kept = false;
                for ((applied, waiting), change) in applied.into_iter().zip(waiting).zip(changes) {
                    match (waiting, applied) {
                        (Waiting::Ack(ack, _), Applied::Accepted { fresh }) => {
                            if fresh {
                                kept = true;
                            } else if let Change::Accept(envelope) = change {
                                counters
                                    .envelopes_deduplicated
                                    .bump(EnvelopeType::from(envelope.kind));
                                tracing::info!(
                                    envelope_id = %envelope.envelope_id,
                                    event_id = %envelope.dedup_key,
                                    "duplicate delivery acked again, not handled again"
                                );
                            }
                            send_ack(counters, ack, None);
                        }
                        (Waiting::Reply(reply), applied) => {
                            let _ = reply.send(Ok(applied));
                        }
                        (Waiting::Ack(..), _) => unreachable!("an accept answers with Accepted"),
                    }
                }
                if kept {
                    self.kept.notify_one();
                }
            }
            Err(error) => {
                self.troubled(&error);
                for waiting in waiting {
                    match waiting {
                        // Dropped unsent: Slack redelivers it, and it is tried again.
                        Waiting::Ack(ack, kind) => {
                            counters.envelopes_deferred.bump(EnvelopeType::from(kind));
                            drop(ack);
                        }
                        Waiting::Reply(reply) => {
                            let _ = reply.send(Err(error.clone()));
                        }
                    }
                }
            }
        }
    }

    fn read(&mut self, job: Job) {
        match job {
            Job::Counts(reply) => {
                let _ = reply.send(self.store.counts());
            }
            Job::List {
                dead,
                bodies,
                limit,
                reply,
            } => {
                let _ = reply.send(self.store.list(dead, bodies, limit));
            }
            Job::Accept { .. } | Job::Change { .. } => unreachable!("not a read"),
        }
    }

    fn upkeep(&mut self) {
        self.last_upkeep = Instant::now();
        self.dirty = false;
        let upkeep = Upkeep {
            forget_seen_before: SystemTime::now()
                .checked_sub(self.settings.dedup_window)
                .unwrap_or(SystemTime::UNIX_EPOCH),
            max_bytes: self.settings.max_bytes,
        };
        match self.store.counts() {
            Ok(counts) => {
                let stale_after = self.settings.stale_after;
                self.state.update(|s| s.inbox = Some((counts, stale_after)));
            }
            Err(error) => self.troubled(&error),
        }
        match self.store.upkeep(upkeep) {
            Ok(done) => {
                if done.dead_pruned > 0 {
                    tracing::warn!(
                        pruned = done.dead_pruned,
                        max_bytes = self.settings.max_bytes,
                        "inbox over inbox.max_bytes: pruned the oldest dead letters"
                    );
                }
                if done.over_cap && !self.over_cap {
                    tracing::warn!(
                        max_bytes = self.settings.max_bytes,
                        "inbox over inbox.max_bytes with no dead letter left to prune: pending envelopes are kept"
                    );
                }
                self.over_cap = done.over_cap;
            }
            // Housekeeping fails for the same causes as commits; those are reported.
            Err(error) => self.troubled(&error),
        }
    }

    /// One log line per cause, and health unhealthy until a commit succeeds.
    fn troubled(&mut self, error: &InboxError) {
        if self.trouble == Some(error.trouble) {
            return;
        }
        self.trouble = Some(error.trouble);
        tracing::error!(
            path = %error.path.display(),
            cause = %error.trouble,
            detail = %error.detail,
            "inbox cannot write: envelopes stay unacked (Slack redelivers them) until it can"
        );
        let trouble = InboxTrouble {
            trouble: error.trouble,
            reason: error.to_string(),
        };
        self.state.update(|s| s.inbox_trouble = Some(trouble));
    }

    fn recovered(&mut self) {
        if let Some(trouble) = self.trouble.take() {
            tracing::info!(after = %trouble, "inbox writes again");
            self.state.update(|s| s.inbox_trouble = None);
        }
    }
}
