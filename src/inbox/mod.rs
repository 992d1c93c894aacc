//! The durable inbox: what flowcoach acks, it keeps until it is delivered.
//!
//! Events (and interactions that take no answer) go to the [`writer`], which commits
//! everything waiting in one transaction and acks only then; [`delivery`] hands them from
//! the store to the handler or the app, with retries, until delivered or a dead letter.
//! Deduplication keys live in the store too, so a redelivery after a restart, or to a
//! successor, is acked and not delivered again.
//!
//! [`Store`] is the whole interface to the database: nothing above it knows SQL or SQLite
//! ([`sqlite`] on one host, [`postgres`] shared by the members of a `[cluster]`).

pub mod delivery;
pub mod postgres;
pub mod sqlite;
pub mod writer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::config::{
    Cluster, Config, DispatchSettings, EnvSource, InboxSettings, NoStateDirectory, inbox_file_name,
};
use crate::dispatch::{Handler, PendingAck};
use crate::host::paths::{UNKNOWN_APP, ensure_dir, safe_name};
use crate::state::InstanceState;
use flowcoach_protocol::{Envelope, EnvelopeKind, PayloadSummary};

/// What went wrong with the store, by the cause an operator acts on: one log line per
/// cause, not one per envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Trouble {
    DiskFull,
    ReadOnly,
    PermissionDenied,
    Corrupt,
    Locked,
    /// The shared store (PostgreSQL) does not answer: down, restarting, unreachable.
    Unreachable,
    /// The shared store's schema is newer than this build can use.
    Incompatible,
    /// Any other failure of the store or the disk under it.
    Io,
}

impl fmt::Display for Trouble {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Trouble::DiskFull => "the disk is full",
            Trouble::ReadOnly => "the file or its file system is read-only",
            Trouble::PermissionDenied => "permission denied",
            Trouble::Corrupt => "the database is corrupt",
            Trouble::Locked => "the database stays locked by another process",
            Trouble::Unreachable => "the shared store cannot be reached",
            Trouble::Incompatible => "the shared store's schema is too new for this version",
            Trouble::Io => "input/output error",
        })
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("inbox {}: {trouble}: {detail}", path.display())]
pub struct InboxError {
    pub trouble: Trouble,
    pub path: PathBuf,
    /// The store's own words, for the log.
    pub detail: String,
}

/// An envelope to keep, as received.
#[derive(Debug, Clone)]
pub struct NewEnvelope {
    pub envelope_id: String,
    pub kind: EnvelopeKind,
    /// `event.type` of an event, `type` of an interaction.
    pub event_type: Option<String>,
    /// What identifies it across Slack's redeliveries: the event id, else the envelope id.
    pub dedup_key: String,
    /// The whole envelope as JSON, as it is delivered later.
    pub body: String,
    pub received_at: SystemTime,
}

/// A kept envelope handed out for delivery.
#[derive(Debug, Clone)]
pub struct Due {
    pub id: i64,
    pub attempts: u32,
    pub received_at: SystemTime,
    pub body: String,
}

/// How one delivery attempt ended.
#[derive(Debug, Clone)]
pub enum Settlement {
    /// Taken: the envelope is removed (its dedup key stays for the window).
    Delivered,
    /// Failed: tried again at `at`.
    Retry { at: SystemTime, error: String },
    /// Failed past `max_age`: kept as a dead letter.
    Dead { error: String },
}

/// One change to the store; a batch of them is applied in one transaction.
#[derive(Debug, Clone)]
pub enum Change {
    /// Keeps the envelope unless its dedup key was seen: [`Applied::Accepted`].
    Accept(NewEnvelope),
    /// Hands out up to `limit` pending envelopes due at `now`, oldest first, and marks
    /// them as being delivered. A `probe` takes the one with the earliest retry time,
    /// due or not: it tests whether a failing target is back.
    Claim {
        limit: usize,
        probe: bool,
        now: SystemTime,
    },
    Settle {
        id: i64,
        settlement: Settlement,
    },
    /// Envelopes marked as being delivered by this member but not in `keep` become
    /// pending again: a process that no longer delivers (it crashed or handed over)
    /// claimed them, or a claim committed although its answer was lost with the
    /// connection, so nobody delivers them.
    Unclaim {
        keep: Vec<i64>,
    },
    /// Pending envelopes waiting for a retry become due at `now`: the target is back.
    Expedite {
        now: SystemTime,
    },
    /// Dead letters (one, or all) become pending again, due at `now`.
    Retry {
        which: Which,
        now: SystemTime,
    },
    /// Removes an envelope, pending or dead.
    Drop {
        id: i64,
    },
}

/// Which envelopes a [`Change::Retry`] means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Which {
    One(i64),
    AllDead,
}

/// The result of one [`Change`], in the same order.
#[derive(Debug)]
pub enum Applied {
    /// `fresh` is false for a duplicate: acked, not kept again.
    Accepted {
        fresh: bool,
    },
    Claimed(Vec<Due>),
    /// How many envelopes a change touched.
    Count(u64),
}

/// The inbox's depth, for `status`, `flowcoachctl inbox` and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub pending: u64,
    pub delivering: u64,
    pub dead: u64,
    /// When the oldest pending (or delivering) envelope arrived.
    pub oldest_pending: Option<SystemTime>,
}

impl Counts {
    /// The oldest pending envelope's age at `now`.
    pub fn oldest_pending_age(&self, now: SystemTime) -> Option<Duration> {
        self.oldest_pending
            .map(|at| now.duration_since(at).unwrap_or_default())
    }
}

/// One row of `flowcoachctl inbox list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listed {
    pub id: i64,
    pub envelope_id: String,
    pub kind: String,
    pub event_type: Option<String>,
    pub state: String,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub received_at: SystemTime,
    /// The envelope, only when asked for.
    pub body: Option<String>,
}

/// Housekeeping done when the writer is idle.
#[derive(Debug, Clone, Copy)]
pub struct Upkeep {
    /// Dedup keys seen before this are forgotten.
    pub forget_seen_before: SystemTime,
    /// Past this size, the oldest dead letters are pruned.
    pub max_bytes: u64,
}

/// What housekeeping did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UpkeepDone {
    pub dead_pruned: u64,
    /// The file is still over its cap after pruning every dead letter.
    pub over_cap: bool,
}

/// The durable store behind the inbox. Calls come from one thread (the writer's).
pub trait Store: Send + 'static {
    /// Applies `changes` in one durable transaction: all or nothing, on disk when this
    /// returns `Ok`.
    fn apply(&mut self, changes: &[Change]) -> Result<Vec<Applied>, InboxError>;
    fn counts(&mut self) -> Result<Counts, InboxError>;
    /// Oldest first; dead letters only, or all but them.
    fn list(&mut self, dead: bool, bodies: bool, limit: usize) -> Result<Vec<Listed>, InboxError>;
    fn upkeep(&mut self, upkeep: Upkeep) -> Result<UpkeepDone, InboxError>;
}

/// Where the inbox of `config`'s app and environment is (`None`: the inbox is off).
pub fn file(config: &Config, env: &dyn EnvSource) -> Result<Option<PathBuf>, NoStateDirectory> {
    let settings = &config.settings.inbox;
    if !settings.enabled {
        return Ok(None);
    }
    let name = inbox_file_name(
        &safe_name(config.token.app_id_hint().unwrap_or(UNKNOWN_APP)),
        &safe_name(&config.settings.environment),
    );
    settings.file(env, &name).map(Some)
}

/// The inbox of one running instance: its writer thread, and what delivery needs.
pub struct Inbox {
    writer: writer::Writer,
    delivery: delivery::DeliverySettings,
    path: PathBuf,
}

impl fmt::Debug for Inbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Inbox")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl Inbox {
    /// Opens the store at `path` (creating its directory) and starts the writer.
    pub fn open(
        path: &Path,
        settings: &InboxSettings,
        dispatch: &DispatchSettings,
        state: Arc<InstanceState>,
    ) -> Result<Inbox, InboxError> {
        let io_error = |error: std::io::Error| InboxError {
            trouble: match error.kind() {
                std::io::ErrorKind::PermissionDenied => Trouble::PermissionDenied,
                std::io::ErrorKind::ReadOnlyFilesystem => Trouble::ReadOnly,
                std::io::ErrorKind::StorageFull => Trouble::DiskFull,
                _ => Trouble::Io,
            },
            path: path.to_owned(),
            detail: error.to_string(),
        };
        if let Some(dir) = path.parent() {
            ensure_dir(dir).map_err(io_error)?;
        }
        let store = sqlite::SqliteStore::open(path)?;
        Inbox::start(Box::new(store), path, settings, dispatch, state).map_err(io_error)
    }

    /// Opens the shared store of `[cluster]` and starts the writer. A database that
    /// cannot be reached yet is not an error: envelopes stay unacked (Slack redelivers
    /// them, possibly to another member) until it can be.
    pub fn open_shared(
        cluster: &Cluster,
        settings: &InboxSettings,
        dispatch: &DispatchSettings,
        state: Arc<InstanceState>,
    ) -> Result<Inbox, InboxError> {
        // The synchronous client runs a runtime of its own, which cannot start on a thread
        // of ours: it connects on a thread of its own (as the writer uses it later).
        let (store, connected) = std::thread::scope(|scope| {
            scope
                .spawn(|| postgres::PostgresStore::open(cluster))
                .join()
                .expect("opening the store does not panic")
        });
        match connected {
            Err(error) if error.trouble == Trouble::Unreachable => tracing::warn!(
                store = %cluster.store_description,
                detail = %error.detail,
                "the cluster's store cannot be reached yet: events stay unacked until it can"
            ),
            other => other?,
        }
        let place = PathBuf::from(format!(
            "{} (cluster {})",
            cluster.store_description, cluster.name
        ));
        Inbox::start(Box::new(store), &place, settings, dispatch, state).map_err(|error| {
            InboxError {
                trouble: Trouble::Io,
                path: place.clone(),
                detail: error.to_string(),
            }
        })
    }

    fn start(
        store: Box<dyn Store>,
        place: &Path,
        settings: &InboxSettings,
        dispatch: &DispatchSettings,
        state: Arc<InstanceState>,
    ) -> std::io::Result<Inbox> {
        let writer = writer::Writer::start(
            store,
            writer::WriterSettings {
                bound: dispatch.max_queued_handlers,
                dedup_window: dispatch.dedup_ttl,
                max_bytes: settings.max_bytes,
                stale_after: settings.stale_after,
            },
            state,
        )?;
        Ok(Inbox {
            writer,
            delivery: delivery::DeliverySettings {
                max_concurrent: dispatch.max_concurrent_handlers,
                retry_initial: settings.retry_initial,
                retry_max: settings.retry_max,
                max_age: settings.max_age,
            },
            path: place.to_owned(),
        })
    }

    /// Where the store is: the SQLite file, or the shared database and cluster.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Queues `envelope` to be kept; `ack` is sent once it is on disk (or was seen
    /// before), and dropped unsent if it cannot be stored.
    pub fn keep(
        &self,
        envelope: &Envelope,
        summary: &PayloadSummary,
        ack: PendingAck,
    ) -> Result<(), writer::Full> {
        let event_type = match envelope.kind {
            EnvelopeKind::EventsApi => summary.event.as_ref().and_then(|e| e.kind.clone()),
            _ => summary.kind.clone(),
        };
        let kept = NewEnvelope {
            envelope_id: envelope.envelope_id.clone(),
            kind: envelope.kind,
            event_type,
            dedup_key: summary
                .event_id
                .clone()
                .unwrap_or_else(|| envelope.envelope_id.clone()),
            // An envelope is plain data with a JSON payload: it always serialises.
            body: serde_json::to_string(envelope).expect("an envelope serialises"),
            received_at: SystemTime::now(),
        };
        self.writer.accept(kept, ack)
    }

    /// Starts delivering to `handler`: only while this process holds the instance.
    pub fn deliver(&self, handler: Arc<dyn Handler>) -> delivery::Running {
        delivery::start(self.writer.clone(), handler, self.delivery)
    }

    /// The inbox's depth now; what `status`, `flowcoachctl inbox` and metrics show.
    pub async fn counts(&self) -> Result<Counts, InboxError> {
        self.writer.counts().await
    }

    pub async fn list(
        &self,
        dead: bool,
        bodies: bool,
        limit: usize,
    ) -> Result<Vec<Listed>, InboxError> {
        self.writer.list(dead, bodies, limit).await
    }

    /// Applies one change (`retry`, `drop` from flowcoachctl): how many envelopes it
    /// touched.
    pub async fn change(&self, change: Change) -> Result<u64, InboxError> {
        match self.writer.change(change).await? {
            Applied::Count(count) => Ok(count),
            Applied::Accepted { .. } | Applied::Claimed(_) => Ok(0),
        }
    }
}
