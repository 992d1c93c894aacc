//! The [`Store`] in an SQLite file in WAL mode: one writer connection, durable commits
//! (`synchronous=FULL`), inspectable with `sqlite3`.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{Connection, ErrorCode, OpenFlags, TransactionBehavior, params};

use super::{
    Applied, Change, Counts, Due, InboxError, Listed, Settlement, Store, Trouble, Upkeep,
    UpkeepDone, Which,
};

/// The schema this build writes; `PRAGMA user_version` holds it.
const SCHEMA_VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE envelopes (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    envelope_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    event_type TEXT,
    dedup_key TEXT NOT NULL,
    -- the whole envelope as received, JSON
    payload TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'delivering', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    -- times are Unix milliseconds
    next_attempt_at INTEGER NOT NULL,
    last_error TEXT,
    received_at INTEGER NOT NULL
);
CREATE INDEX envelopes_by_state ON envelopes (state, id);
CREATE INDEX envelopes_by_retry ON envelopes (state, next_attempt_at, id);
CREATE TABLE seen_keys (
    dedup_key TEXT PRIMARY KEY,
    seen_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX seen_keys_by_age ON seen_keys (seen_at);
";

/// Pages of cache: the working set is the tail of two tables, and resident memory counts.
const CACHE_PAGES: i64 = 64;
/// How long a statement waits for another process's transaction (a handover's
/// predecessor) before the store counts as locked.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The WAL file is cut back to this many bytes after a checkpoint that emptied it.
const WAL_SIZE_LIMIT: i64 = 4 << 20;
/// Dead letters pruned per statement while the file is over its cap.
const PRUNE_STEP: i64 = 100;

pub struct SqliteStore {
    conn: Connection,
    path: PathBuf,
}

impl SqliteStore {
    /// Opens (or creates, mode 0600) the inbox at `path` and checks it: a corrupt file is
    /// refused ([`Trouble::Corrupt`]), never started over. The check reads the whole
    /// file: on a large inbox, start takes longer (about a second per few hundred MB).
    pub fn open(path: &Path) -> Result<Self, InboxError> {
        let error = |trouble, detail: String| InboxError {
            trouble,
            path: path.to_owned(),
            detail,
        };
        // Created here, not by SQLite, for its mode: the WAL and shared-memory files
        // SQLite adds take the same.
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                let trouble = match e.kind() {
                    std::io::ErrorKind::PermissionDenied => Trouble::PermissionDenied,
                    std::io::ErrorKind::ReadOnlyFilesystem => Trouble::ReadOnly,
                    std::io::ErrorKind::StorageFull => Trouble::DiskFull,
                    _ => Trouble::Io,
                };
                error(trouble, e.to_string())
            })?;
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| sql_error(path, e))?;
        let mut store = SqliteStore {
            conn,
            path: path.to_owned(),
        };
        store.setup().map_err(|e| sql_error(path, e))?;
        store.check()?;
        store.migrate()?;
        Ok(store)
    }

    fn setup(&mut self) -> rusqlite::Result<()> {
        self.conn.busy_timeout(BUSY_TIMEOUT)?;
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
        debug_assert_eq!(mode, "wal");
        // FULL: a commit is on disk before the acks it carries are sent.
        self.conn.pragma_update(None, "synchronous", "FULL")?;
        self.conn.pragma_update(None, "cache_size", CACHE_PAGES)?;
        // Checkpoints run when the writer is idle (`upkeep`), never inside the commit an
        // ack waits for.
        self.conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        self.conn
            .pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
        Ok(())
    }

    fn check(&mut self) -> Result<(), InboxError> {
        let verdict: String = self
            .conn
            .query_row("PRAGMA quick_check", [], |row| row.get(0))
            .map_err(|e| self.error(e))?;
        if verdict != "ok" {
            return Err(InboxError {
                trouble: Trouble::Corrupt,
                path: self.path.clone(),
                detail: verdict,
            });
        }
        Ok(())
    }

    fn migrate(&mut self) -> Result<(), InboxError> {
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |row| row.get(0))
            .map_err(|e| self.error(e))?;
        match version {
            SCHEMA_VERSION => Ok(()),
            0 => {
                let tx = self
                    .conn
                    .transaction_with_behavior(TransactionBehavior::Immediate)
                    .map_err(|e| sql_error(&self.path, e))?;
                // Another process (a successor starting) may have created it meanwhile.
                let version: i64 = tx
                    .query_row("PRAGMA user_version", [], |row| row.get(0))
                    .map_err(|e| sql_error(&self.path, e))?;
                if version == 0 {
                    tx.execute_batch(SCHEMA)
                        .and_then(|()| tx.pragma_update(None, "user_version", SCHEMA_VERSION))
                        .map_err(|e| sql_error(&self.path, e))?;
                }
                tx.commit().map_err(|e| sql_error(&self.path, e))
            }
            newer => Err(InboxError {
                trouble: Trouble::Corrupt,
                path: self.path.clone(),
                detail: format!(
                    "schema version {newer} is not one this flowcoach knows ({SCHEMA_VERSION}): written by a newer version?"
                ),
            }),
        }
    }

    fn error(&self, error: rusqlite::Error) -> InboxError {
        sql_error(&self.path, error)
    }

    fn used_bytes(&self) -> rusqlite::Result<u64> {
        let pragma = |name: &str| -> rusqlite::Result<i64> {
            self.conn
                .query_row(&format!("PRAGMA {name}"), [], |row| row.get(0))
        };
        let used = (pragma("page_count")? - pragma("freelist_count")?) * pragma("page_size")?;
        Ok(used.max(0) as u64)
    }
}

fn sql_error(path: &Path, error: rusqlite::Error) -> InboxError {
    let trouble = match &error {
        rusqlite::Error::SqliteFailure(failure, _) => match failure.code {
            ErrorCode::DiskFull => Trouble::DiskFull,
            ErrorCode::ReadOnly => Trouble::ReadOnly,
            ErrorCode::PermissionDenied
            | ErrorCode::CannotOpen
            | ErrorCode::AuthorizationForStatementDenied => Trouble::PermissionDenied,
            ErrorCode::DatabaseCorrupt | ErrorCode::NotADatabase => Trouble::Corrupt,
            ErrorCode::DatabaseBusy | ErrorCode::DatabaseLocked => Trouble::Locked,
            _ => Trouble::Io,
        },
        _ => Trouble::Io,
    };
    InboxError {
        trouble,
        path: path.to_owned(),
        detail: error.to_string(),
    }
}

fn millis(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis()
        .try_into()
        .unwrap_or(i64::MAX)
}

fn time(millis: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(millis.max(0) as u64)
}

fn apply_one(tx: &rusqlite::Transaction<'_>, change: &Change) -> rusqlite::Result<Applied> {
    Ok(match change {
        Change::Accept(new) => {
            let received = millis(new.received_at);
            let fresh = tx
                .prepare_cached(
                    "INSERT INTO seen_keys (dedup_key, seen_at) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                )?
                .execute(params![new.dedup_key, received])?
                == 1;
            if fresh {
                tx.prepare_cached(
                    "INSERT INTO envelopes (envelope_id, kind, event_type, dedup_key, payload, state, next_attempt_at, received_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, 'pending', ?6, ?6)",
                )?
                .execute(params![
                    new.envelope_id,
                    new.kind.as_str(),
                    new.event_type,
                    new.dedup_key,
                    new.body,
                    received
                ])?;
            }
            Applied::Accepted { fresh }
        }
        Change::Claim { limit, probe, now } => {
            let limit = i64::try_from(*limit).unwrap_or(i64::MAX);
            // A probe takes the envelope whose retry comes first, due or not.
            let (order, due_by) = if *probe {
                ("next_attempt_at, id", i64::MAX)
            } else {
                ("id", millis(*now))
            };
            let mut select = tx.prepare_cached(&format!(
                "SELECT id, attempts, received_at, payload FROM envelopes
                 WHERE state = 'pending' AND next_attempt_at <= ?1 ORDER BY {order} LIMIT ?2"
            ))?;
            let due = select
                .query_map(params![due_by, limit], |row| {
                    Ok(Due {
                        id: row.get(0)?,
                        attempts: row.get(1)?,
                        received_at: time(row.get(2)?),
                        body: row.get(3)?,
                    })
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let mut mark =
                tx.prepare_cached("UPDATE envelopes SET state = 'delivering' WHERE id = ?1")?;
            for envelope in &due {
                mark.execute([envelope.id])?;
            }
            Applied::Claimed(due)
        }
        Change::Settle { id, settlement } => Applied::Count(match settlement {
            Settlement::Delivered => tx
                .prepare_cached("DELETE FROM envelopes WHERE id = ?1")?
                .execute([id])?,
            Settlement::Retry { at, error } => tx
                .prepare_cached(
                    "UPDATE envelopes SET state = 'pending', attempts = attempts + 1, next_attempt_at = ?2, last_error = ?3 WHERE id = ?1",
                )?
                .execute(params![id, millis(*at), error])?,
            Settlement::Dead { error } => tx
                .prepare_cached(
                    "UPDATE envelopes SET state = 'dead', attempts = attempts + 1, last_error = ?2 WHERE id = ?1",
                )?
                .execute(params![id, error])?,
        } as u64),
        Change::Unclaim { keep } => Applied::Count(tx.execute(
            "UPDATE envelopes SET state = 'pending' WHERE state = 'delivering'
             AND id NOT IN (SELECT value FROM json_each(?1))",
            [serde_json::to_string(keep).expect("ids serialize")],
        )? as u64),
        Change::Expedite { now } => Applied::Count(tx.execute(
            "UPDATE envelopes SET next_attempt_at = ?1 WHERE state = 'pending' AND next_attempt_at > ?1",
            [millis(*now)],
        )? as u64),
        Change::Retry { which, now } => Applied::Count(match which {
            Which::One(id) => tx.execute(
                "UPDATE envelopes SET state = 'pending', next_attempt_at = ?2 WHERE id = ?1 AND state != 'delivering'",
                params![id, millis(*now)],
            )?,
            Which::AllDead => tx.execute(
                "UPDATE envelopes SET state = 'pending', next_attempt_at = ?1 WHERE state = 'dead'",
                [millis(*now)],
            )?,
        } as u64),
        Change::Drop { id } => Applied::Count(tx.execute(
            "DELETE FROM envelopes WHERE id = ?1 AND state != 'delivering'",
            [id],
        )? as u64),
    })
}

impl Store for SqliteStore {
    fn apply(&mut self, changes: &[Change]) -> Result<Vec<Applied>, InboxError> {
        let path = self.path.clone();
        // Acks wait for what this commit stores: it is on disk (fsync) before it returns.
        // Deliveries' bookkeeping alone is not worth a sync: the next durable commit (or
        // a checkpoint) writes it, and a crash before that at worst delivers again.
        let durable = changes.iter().any(|c| matches!(c, Change::Accept(_)));
        let run = |conn: &mut Connection| -> rusqlite::Result<Vec<Applied>> {
            conn.pragma_update(None, "synchronous", if durable { "FULL" } else { "NORMAL" })?;
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let applied = changes
                .iter()
                .map(|change| apply_one(&tx, change))
                .collect::<rusqlite::Result<Vec<_>>>()?;
            tx.commit()?;
            Ok(applied)
        };
        run(&mut self.conn).map_err(|e| sql_error(&path, e))
    }

    fn counts(&mut self) -> Result<Counts, InboxError> {
        let mut counts = Counts::default();
        let mut select = self
            .conn
            .prepare_cached(
                "SELECT state, COUNT(*), MIN(received_at) FROM envelopes GROUP BY state",
            )
            .map_err(|e| sql_error(&self.path, e))?;
        let rows = select
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    row.get::<_, i64>(1)? as u64,
                    row.get::<_, Option<i64>>(2)?,
                ))
            })
            .and_then(|rows| rows.collect::<rusqlite::Result<Vec<_>>>())
            .map_err(|e| sql_error(&self.path, e))?;
        for (state, count, oldest) in rows {
            match state.as_str() {
                "pending" => counts.pending = count,
                "delivering" => counts.delivering = count,
                _ => counts.dead = count,
            }
            if state != "dead"
                && let Some(oldest) = oldest.map(time)
            {
                counts.oldest_pending =
                    Some(counts.oldest_pending.map_or(oldest, |o| o.min(oldest)));
            }
        }
        Ok(counts)
    }

    fn list(&mut self, dead: bool, bodies: bool, limit: usize) -> Result<Vec<Listed>, InboxError> {
        let sql = if dead {
            "SELECT id, envelope_id, kind, event_type, state, attempts, last_error, received_at, payload
             FROM envelopes WHERE state = 'dead' ORDER BY id LIMIT ?1"
        } else {
            "SELECT id, envelope_id, kind, event_type, state, attempts, last_error, received_at, payload
             FROM envelopes WHERE state != 'dead' ORDER BY id LIMIT ?1"
        };
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let mut select = self
            .conn
            .prepare_cached(sql)
            .map_err(|e| sql_error(&self.path, e))?;
        select
            .query_map([limit], |row| {
                Ok(Listed {
                    id: row.get(0)?,
                    envelope_id: row.get(1)?,
                    kind: row.get(2)?,
                    event_type: row.get(3)?,
                    state: row.get(4)?,
                    attempts: row.get(5)?,
                    last_error: row.get(6)?,
                    received_at: time(row.get(7)?),
                    body: if bodies { Some(row.get(8)?) } else { None },
                })
            })
            .and_then(|rows| rows.collect())
            .map_err(|e| sql_error(&self.path, e))
    }

    fn upkeep(&mut self, upkeep: Upkeep) -> Result<UpkeepDone, InboxError> {
        let path = self.path.clone();
        let mut done = UpkeepDone::default();
        let mut run = || -> rusqlite::Result<()> {
            self.conn.execute(
                "DELETE FROM seen_keys WHERE seen_at < ?1",
                [millis(upkeep.forget_seen_before)],
            )?;
            while self.used_bytes()? > upkeep.max_bytes {
                let pruned = self.conn.execute(
                    "DELETE FROM envelopes WHERE id IN
                     (SELECT id FROM envelopes WHERE state = 'dead' ORDER BY id LIMIT ?1)",
                    [PRUNE_STEP],
                )?;
                if pruned == 0 {
                    done.over_cap = true;
                    break;
                }
                done.dead_pruned += pruned as u64;
            }
            // The checkpoint the commits skip. PASSIVE: it never waits for another
            // process (a successor); what it cannot copy now, the next upkeep does. The
            // WAL file keeps its size (up to WAL_SIZE_LIMIT) and is written over from the
            // start: an ack's sync then changes no file size, which would cost a journal
            // commit of the file system on top.
            let _: (i64, i64, i64) =
                self.conn
                    .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                        Ok((row.get(0)?, row.get(1)?, row.get(2)?))
                    })?;
            Ok(())
        };
        run().map_err(|e| sql_error(&path, e))?;
        Ok(done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbox::NewEnvelope;

    fn envelope(key: &str) -> Change {
        Change::Accept(NewEnvelope {
            envelope_id: format!("env-{key}"),
            kind: flowcoach_protocol::EnvelopeKind::EventsApi,
            event_type: Some("message".into()),
            dedup_key: key.into(),
            body: format!("{{\"envelope_id\":\"env-{key}\"}}"),
            received_at: SystemTime::now(),
        })
    }

    /// Up to 10 envelopes due at `now`.
    fn claim(store: &mut SqliteStore, now: SystemTime) -> Vec<Due> {
        let Applied::Claimed(due) = store
            .apply(&[Change::Claim {
                limit: 10,
                probe: false,
                now,
            }])
            .unwrap()
            .remove(0)
        else {
            panic!("not a claim");
        };
        due
    }

    #[test]
    fn duplicates_are_not_kept_twice_and_claims_come_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inbox.sqlite");
        let mut store = SqliteStore::open(&path).unwrap();
        let applied = store
            .apply(&[envelope("a"), envelope("b"), envelope("a")])
            .unwrap();
        assert!(matches!(
            applied.as_slice(),
            [
                Applied::Accepted { fresh: true },
                Applied::Accepted { fresh: true },
                Applied::Accepted { fresh: false }
            ]
        ));
        drop(store);
        // Reopened: the keys are still known.
        let mut store = SqliteStore::open(&path).unwrap();
        assert!(matches!(
            store.apply(&[envelope("b")]).unwrap()[0],
            Applied::Accepted { fresh: false }
        ));
        let now = SystemTime::now();
        let due = claim(&mut store, now);
        assert_eq!(due.len(), 2);
        assert!(due[0].id < due[1].id);
        assert_eq!(store.counts().unwrap().delivering, 2);
        store
            .apply(&[
                Change::Settle {
                    id: due[0].id,
                    settlement: Settlement::Delivered,
                },
                Change::Unclaim { keep: Vec::new() },
            ])
            .unwrap();
        let counts = store.counts().unwrap();
        assert_eq!((counts.pending, counts.delivering, counts.dead), (1, 0, 0));
        // A claim being delivered is kept when the others are released.
        let due = claim(&mut store, now);
        store
            .apply(&[Change::Unclaim {
                keep: vec![due[0].id],
            }])
            .unwrap();
        assert_eq!(store.counts().unwrap().delivering, 1);
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }

    #[test]
    fn a_file_that_is_not_a_database_is_refused_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("inbox.sqlite");
        std::fs::write(&path, vec![b'x'; 8192]).unwrap();
        let error = SqliteStore::open(&path).err().expect("refused");
        assert_eq!(error.trouble, Trouble::Corrupt);
    }
}
