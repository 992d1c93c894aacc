//! The [`Store`] in a shared PostgreSQL database, for `[cluster]`: every member keeps what
//! it receives there, and delivers what any member received.
//!
//! - Ack = committed: the writer acks after `COMMIT` returns, as with SQLite.
//! - Deduplication across members: one row per (cluster, dedup key); of two members
//!   inserting the same key, one insert wins, the other finds it (`ON CONFLICT DO
//!   NOTHING` waits for the first transaction, then does nothing).
//! - Delivery by exactly one member: claims take due envelopes with `FOR UPDATE SKIP
//!   LOCKED` and mark them with the member and a lease; a live member renews the lease
//!   of its claims at each heartbeat (`crate::cluster`), so a slow delivery stays its own;
//!   a member that dies holding claims loses them when the lease runs out (leases are on
//!   the database's clock).
//!
//! The synchronous `postgres` client fits the writer, which is one thread making one
//! transaction at a time; it reconnects on the next call after the connection broke.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use postgres::error::SqlState;
use postgres::{Client, GenericClient, NoTls, Statement};

use super::{
    Applied, Change, Counts, Due, InboxError, Listed, Settlement, Store, Trouble, Upkeep,
    UpkeepDone, Which,
};
use crate::config::Cluster;

/// The schema this build writes.
const SCHEMA_VERSION: i32 = 2;

/// Versions of the schema are rows of `flowcoach_schema`; each says the oldest version of
/// flowcoach's schema code that still works with it (`compatible_from`), so two releases
/// can run side by side during a rolling upgrade as long as the newer schema allows it.
const SCHEMA_TABLE: &str = "
CREATE TABLE IF NOT EXISTS flowcoach_schema (
    version integer PRIMARY KEY,
    compatible_from integer NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

const SCHEMA_V1: &str = "
CREATE TABLE flowcoach_envelopes (
    id bigserial PRIMARY KEY,
    cluster text NOT NULL,
    envelope_id text NOT NULL,
    kind text NOT NULL,
    event_type text,
    dedup_key text NOT NULL,
    -- the whole envelope as received, JSON
    payload text NOT NULL,
    state text NOT NULL CHECK (state IN ('pending', 'delivering', 'dead')),
    attempts integer NOT NULL DEFAULT 0,
    -- times from the members' clocks are Unix milliseconds
    next_attempt_at bigint NOT NULL,
    last_error text,
    received_at bigint NOT NULL,
    received_by text NOT NULL,
    claimed_by text,
    -- on the database's clock, so members' clocks need not agree
    claimed_until timestamptz
);
CREATE INDEX flowcoach_envelopes_due ON flowcoach_envelopes (cluster, state, next_attempt_at, id);
CREATE INDEX flowcoach_envelopes_by_id ON flowcoach_envelopes (cluster, state, id);
CREATE TABLE flowcoach_seen_keys (
    cluster text NOT NULL,
    dedup_key text NOT NULL,
    seen_at bigint NOT NULL,
    PRIMARY KEY (cluster, dedup_key)
);
CREATE INDEX flowcoach_seen_keys_by_age ON flowcoach_seen_keys (cluster, seen_at);
CREATE TABLE flowcoach_members (
    cluster text NOT NULL,
    member text NOT NULL,
    sockets integer NOT NULL,
    health text NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    PRIMARY KEY (cluster, member)
);
INSERT INTO flowcoach_schema (version, compatible_from) VALUES (1, 1);
";

/// Membership (`crate::cluster`): who the members are, for status, the other-clients
/// diagnosis and the socket budget. Version 1 builds never touch `flowcoach_members`, so
/// they keep working with it (`compatible_from` stays 1).
const SCHEMA_V2: &str = "
ALTER TABLE flowcoach_members
    ADD COLUMN host text NOT NULL DEFAULT '',
    ADD COLUMN pid integer NOT NULL DEFAULT 0,
    ADD COLUMN version text NOT NULL DEFAULT '',
    ADD COLUMN health_reason text,
    -- connection.sockets: the member holds twice that during rotations
    ADD COLUMN sockets_wanted integer NOT NULL DEFAULT 1,
    -- the sockets Slack may count for it now (recently closed ones, one being opened)
    ADD COLUMN sockets_counted integer NOT NULL DEFAULT 1,
    ADD COLUMN started_at timestamptz NOT NULL DEFAULT now();
INSERT INTO flowcoach_schema (version, compatible_from) VALUES (2, 1);
";

/// How long connecting may take when the URL does not say (`connect_timeout`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One connection and the statements prepared on it.
struct Connection {
    client: Client,
    statements: HashMap<&'static str, Statement>,
}

pub struct PostgresStore {
    cluster: String,
    member: String,
    lease_secs: f64,
    link: Link,
    connection: Option<Connection>,
}

/// How to reach the shared store: the connection settings and where it is, for errors.
/// Each user (the inbox's writer, the membership) has a connection of its own.
pub(crate) struct Link {
    config: postgres::Config,
    /// Where the store is, for errors: no password.
    place: PathBuf,
}

impl Link {
    pub(crate) fn new(cluster: &Cluster) -> Link {
        let mut config = cluster.store.clone();
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // A peer gone without a word (a host lost, a partition) is noticed in about a
        // minute, not after the kernel's two hours.
        config.keepalives_idle(Duration::from_secs(30));
        config.application_name(&format!("flowcoach {}", cluster.member));
        Link {
            config,
            place: PathBuf::from(format!(
                "{} (cluster {})",
                cluster.store_description, cluster.name
            )),
        }
    }

    /// A new connection, the schema created or checked on it.
    pub(crate) fn connect(&self) -> Result<Client, InboxError> {
        let mut client = self.config.connect(NoTls).map_err(|e| self.error(&e))?;
        migrate(&mut client).map_err(|e| match e {
            Migration::Sql(e) => self.error(&e),
            Migration::TooNew { version, needs } => InboxError {
                trouble: Trouble::Incompatible,
                path: self.place.clone(),
                detail: format!(
                    "the shared schema is at version {version}, which needs a flowcoach that knows version {needs} or later (this one knows {SCHEMA_VERSION}): upgrade this member"
                ),
            },
        })?;
        Ok(client)
    }

    /// `error` by its cause.
    pub(crate) fn error(&self, error: &postgres::Error) -> InboxError {
        pg_error(&self.place, error)
    }
}

/// Whether `error` broke the connection: the next call must connect again.
pub(crate) fn connection_lost(error: &postgres::Error) -> bool {
    error.is_closed() || io_cause(error)
}

impl PostgresStore {
    /// The store of `cluster`. Connects and creates or checks the schema now; if the
    /// database cannot be reached, the error says so ([`Trouble::Unreachable`]) and the
    /// store still works, connecting on each later call until it can.
    pub fn open(cluster: &Cluster) -> (Self, Result<(), InboxError>) {
        let mut store = PostgresStore {
            link: Link::new(cluster),
            cluster: cluster.name.clone(),
            member: cluster.member.clone(),
            lease_secs: cluster.lease.as_secs_f64(),
            connection: None,
        };
        let connected = store.connection().map(|_| ());
        (store, connected)
    }

    /// The live connection, made (and the schema checked) if there is none.
    fn connection(&mut self) -> Result<&mut Connection, InboxError> {
        if self
            .connection
            .as_ref()
            .is_some_and(|c| c.client.is_closed())
        {
            self.connection = None;
        }
        if self.connection.is_none() {
            let client = self.link.connect()?;
            self.connection = Some(Connection {
                client,
                statements: HashMap::new(),
            });
        }
        Ok(self.connection.as_mut().expect("connected just above"))
    }

    /// Runs `work` on the connection; a failure that broke it makes the next call
    /// connect again.
    fn with<T>(
        &mut self,
        work: impl FnOnce(&mut Connection, &Scope) -> Result<T, postgres::Error>,
    ) -> Result<T, InboxError> {
        let scope = Scope {
            cluster: self.cluster.clone(),
            member: self.member.clone(),
            lease_secs: self.lease_secs,
        };
        let place = self.link.place.clone();
        let connection = self.connection()?;
        work(connection, &scope).map_err(|e| {
            if connection_lost(&e) {
                self.connection = None;
            }
            pg_error(&place, &e)
        })
    }
}

/// What every statement is scoped by.
struct Scope {
    cluster: String,
    member: String,
    lease_secs: f64,
}

enum Migration {
    Sql(postgres::Error),
    TooNew { version: i32, needs: i32 },
}

impl From<postgres::Error> for Migration {
    fn from(error: postgres::Error) -> Self {
        Migration::Sql(error)
    }
}

/// Creates the schema, or checks this build can use the one there. One member at a time
/// (an advisory lock), so members starting together create it once.
fn migrate(client: &mut Client) -> Result<(), Migration> {
    let mut tx = client.transaction()?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('flowcoach_schema'))",
        &[],
    )?;
    // Not a NOTICE in every member's log at each connect ("already exists, skipping").
    tx.batch_execute("SET LOCAL client_min_messages = warning")?;
    tx.batch_execute(SCHEMA_TABLE)?;
    let newest = tx.query_opt(
        "SELECT version, compatible_from FROM flowcoach_schema ORDER BY version DESC LIMIT 1",
        &[],
    )?;
    match newest.map(|row| (row.get::<_, i32>(0), row.get::<_, i32>(1))) {
        None => tx.batch_execute(&format!("{SCHEMA_V1}{SCHEMA_V2}"))?,
        // Made by an older release, which keeps working with the newer schema.
        Some((1, _)) => tx.batch_execute(SCHEMA_V2)?,
        Some((version, needs)) if version > SCHEMA_VERSION && needs > SCHEMA_VERSION => {
            return Err(Migration::TooNew { version, needs });
        }
        // This version's, or a newer one that still works with this build.
        Some(_) => {}
    }
    tx.commit()?;
    Ok(())
}

impl Connection {
    /// `sql` prepared once per connection.
    fn prepared(
        statements: &mut HashMap<&'static str, Statement>,
        client: &mut impl GenericClient,
        sql: &'static str,
    ) -> Result<Statement, postgres::Error> {
        if let Some(statement) = statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = client.prepare(sql)?;
        statements.insert(sql, statement.clone());
        Ok(statement)
    }
}

fn pg_error(place: &std::path::Path, error: &postgres::Error) -> InboxError {
    let trouble = match error.code() {
        Some(code) if *code == SqlState::DISK_FULL || *code == SqlState::OUT_OF_MEMORY => {
            Trouble::DiskFull
        }
        // A standby after a failover, or a database made read-only.
        Some(code) if *code == SqlState::READ_ONLY_SQL_TRANSACTION => Trouble::ReadOnly,
        Some(code)
            if *code == SqlState::INSUFFICIENT_PRIVILEGE
                || *code == SqlState::INVALID_PASSWORD
                || *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION =>
        {
            Trouble::PermissionDenied
        }
        Some(code) if *code == SqlState::DATA_CORRUPTED || *code == SqlState::INDEX_CORRUPTED => {
            Trouble::Corrupt
        }
        Some(code)
            if *code == SqlState::LOCK_NOT_AVAILABLE
                || *code == SqlState::T_R_DEADLOCK_DETECTED =>
        {
            Trouble::Locked
        }
        Some(code)
            if *code == SqlState::ADMIN_SHUTDOWN
                || *code == SqlState::CRASH_SHUTDOWN
                || *code == SqlState::CANNOT_CONNECT_NOW =>
        {
            Trouble::Unreachable
        }
        Some(_) => Trouble::Io,
        // No answer from the server: it is down, restarting, or not reachable.
        None if error.is_closed() || io_cause(error) => Trouble::Unreachable,
        None => Trouble::Io,
    };
    InboxError {
        trouble,
        path: place.to_owned(),
        detail: error.to_string(),
    }
}

/// Whether the connection itself failed (refused, reset, timed out).
fn io_cause(error: &postgres::Error) -> bool {
    std::error::Error::source(error).is_some_and(|source| source.is::<std::io::Error>())
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

const SEE_KEYS: &str = "INSERT INTO flowcoach_seen_keys (cluster, dedup_key, seen_at)
     SELECT $1, key, $3 FROM unnest($2::text[]) AS key ORDER BY key
     ON CONFLICT DO NOTHING RETURNING dedup_key";
const KEEP: &str = "INSERT INTO flowcoach_envelopes
     (cluster, received_by, envelope_id, kind, event_type, dedup_key, payload, state, next_attempt_at, received_at)
     SELECT $1, $2, e.envelope_id, e.kind, e.event_type, e.dedup_key, e.payload, 'pending', e.received_at, e.received_at
     FROM unnest($3::text[], $4::text[], $5::text[], $6::text[], $7::text[], $8::bigint[])
         WITH ORDINALITY AS e(envelope_id, kind, event_type, dedup_key, payload, received_at, n)
     ORDER BY e.n";
const CLAIM: &str = "WITH due AS (
         SELECT id FROM flowcoach_envelopes
         WHERE cluster = $1 AND ((state = 'pending' AND next_attempt_at <= $2)
             OR (state = 'delivering' AND claimed_until < now()))
         ORDER BY id LIMIT $3 FOR UPDATE SKIP LOCKED)
     UPDATE flowcoach_envelopes e
     SET state = 'delivering', claimed_by = $4, claimed_until = now() + $5::float8 * interval '1 second'
     FROM due WHERE e.id = due.id
     RETURNING e.id, e.attempts, e.received_at, e.payload";
const PROBE: &str = "WITH due AS (
         SELECT id FROM flowcoach_envelopes
         WHERE cluster = $1 AND state = 'pending' AND $2::bigint = $2
         ORDER BY next_attempt_at, id LIMIT $3 FOR UPDATE SKIP LOCKED)
     UPDATE flowcoach_envelopes e
     SET state = 'delivering', claimed_by = $4, claimed_until = now() + $5::float8 * interval '1 second'
     FROM due WHERE e.id = due.id
     RETURNING e.id, e.attempts, e.received_at, e.payload";
const DELIVERED: &str = "DELETE FROM flowcoach_envelopes WHERE cluster = $1 AND id = $2";
const RETRY_LATER: &str = "UPDATE flowcoach_envelopes
     SET state = 'pending', attempts = attempts + 1, next_attempt_at = $4, last_error = $5,
         claimed_by = NULL, claimed_until = NULL
     WHERE cluster = $1 AND id = $2 AND claimed_by = $3";
const DEAD: &str = "UPDATE flowcoach_envelopes
     SET state = 'dead', attempts = attempts + 1, last_error = $4, claimed_by = NULL, claimed_until = NULL
     WHERE cluster = $1 AND id = $2 AND claimed_by = $3";
/// Only this member's claims: others' are theirs until their lease runs out.
const UNCLAIM: &str = "UPDATE flowcoach_envelopes
     SET state = 'pending', claimed_by = NULL, claimed_until = NULL
     WHERE cluster = $1 AND state = 'delivering' AND claimed_by = $2 AND NOT (id = ANY($3))";
const EXPEDITE: &str = "UPDATE flowcoach_envelopes SET next_attempt_at = $2
     WHERE cluster = $1 AND state = 'pending' AND next_attempt_at > $2";
const RETRY_ONE: &str = "UPDATE flowcoach_envelopes SET state = 'pending', next_attempt_at = $3
     WHERE cluster = $1 AND id = $2 AND state != 'delivering'";
const RETRY_DEAD: &str = "UPDATE flowcoach_envelopes SET state = 'pending', next_attempt_at = $2
     WHERE cluster = $1 AND state = 'dead'";
const DROP: &str =
    "DELETE FROM flowcoach_envelopes WHERE cluster = $1 AND id = $2 AND state != 'delivering'";
const COUNTS: &str = "SELECT state, COUNT(*), MIN(received_at) FROM flowcoach_envelopes
     WHERE cluster = $1 GROUP BY state";
const LIST_DEAD: &str =
    "SELECT id, envelope_id, kind, event_type, state, attempts, last_error, received_at, payload
     FROM flowcoach_envelopes WHERE cluster = $1 AND state = 'dead' ORDER BY id LIMIT $2";
const LIST_LIVE: &str =
    "SELECT id, envelope_id, kind, event_type, state, attempts, last_error, received_at, payload
     FROM flowcoach_envelopes WHERE cluster = $1 AND state != 'dead' ORDER BY id LIMIT $2";
const FORGET: &str = "DELETE FROM flowcoach_seen_keys WHERE cluster = $1 AND seen_at < $2";

/// Keeps the accepted envelopes whose keys no member has seen, and answers each accept
/// in `changes` (by index) in `applied`. Keys are inserted in one statement, sorted: two
/// members inserting overlapping keys take their row locks in the same order, so they
/// wait for each other instead of deadlocking.
fn accept_all(
    tx: &mut postgres::Transaction<'_>,
    statements: &mut HashMap<&'static str, Statement>,
    scope: &Scope,
    changes: &[Change],
    applied: &mut [Option<Applied>],
) -> Result<(), postgres::Error> {
    let accepts: Vec<(usize, &super::NewEnvelope)> = changes
        .iter()
        .enumerate()
        .filter_map(|(i, change)| match change {
            Change::Accept(new) => Some((i, new)),
            _ => None,
        })
        .collect();
    if accepts.is_empty() {
        return Ok(());
    }
    let mut keys: Vec<&str> = accepts
        .iter()
        .map(|(_, new)| new.dedup_key.as_str())
        .collect();
    keys.sort_unstable();
    keys.dedup();
    let see = Connection::prepared(statements, tx, SEE_KEYS)?;
    let mut fresh_keys: std::collections::HashSet<String> = tx
        .query(&see, &[&scope.cluster, &keys, &millis(SystemTime::now())])?
        .into_iter()
        .map(|row| row.get(0))
        .collect();
    let mut fresh = Vec::new();
    for (i, new) in accepts {
        // The first of a key in the batch is kept; a second one is a duplicate.
        let is_fresh = fresh_keys.remove(&new.dedup_key);
        applied[i] = Some(Applied::Accepted { fresh: is_fresh });
        if is_fresh {
            fresh.push(new);
        }
    }
    if fresh.is_empty() {
        return Ok(());
    }
    let column = |f: fn(&super::NewEnvelope) -> Option<&str>| -> Vec<Option<&str>> {
        fresh.iter().map(|new| f(new)).collect()
    };
    let received: Vec<i64> = fresh.iter().map(|new| millis(new.received_at)).collect();
    let keep = Connection::prepared(statements, tx, KEEP)?;
    tx.execute(
        &keep,
        &[
            &scope.cluster,
            &scope.member,
            &column(|n| Some(&n.envelope_id)),
            &column(|n| Some(n.kind.as_str())),
            &column(|n| n.event_type.as_deref()),
            &column(|n| Some(&n.dedup_key)),
            &column(|n| Some(&n.body)),
            &received,
        ],
    )?;
    Ok(())
}

fn claimed(rows: Vec<postgres::Row>) -> Vec<Due> {
    let mut due: Vec<Due> = rows
        .into_iter()
        .map(|row| Due {
            id: row.get(0),
            attempts: u32::try_from(row.get::<_, i32>(1)).unwrap_or(0),
            received_at: time(row.get(2)),
            body: row.get(3),
        })
        .collect();
    // RETURNING keeps no order: oldest first, as claimed.
    due.sort_by_key(|due| due.id);
    due
}

fn apply_one(
    tx: &mut postgres::Transaction<'_>,
    statements: &mut HashMap<&'static str, Statement>,
    scope: &Scope,
    change: &Change,
) -> Result<Applied, postgres::Error> {
    let mut run = |sql: &'static str, params: &[&(dyn postgres::types::ToSql + Sync)]| {
        let statement = Connection::prepared(statements, tx, sql)?;
        tx.execute(&statement, params)
    };
    let cluster = &scope.cluster;
    Ok(match change {
        Change::Accept(_) => unreachable!("accepts are applied together"),
        Change::Claim { limit, probe, now } => {
            let limit = i64::try_from(*limit).unwrap_or(i64::MAX);
            let sql = if *probe { PROBE } else { CLAIM };
            let statement = Connection::prepared(statements, tx, sql)?;
            let rows = tx.query(
                &statement,
                &[
                    cluster,
                    &millis(*now),
                    &limit,
                    &scope.member,
                    &scope.lease_secs,
                ],
            )?;
            Applied::Claimed(claimed(rows))
        }
        Change::Settle { id, settlement } => Applied::Count(match settlement {
            Settlement::Delivered => run(DELIVERED, &[cluster, id])?,
            Settlement::Retry { at, error } => run(
                RETRY_LATER,
                &[cluster, id, &scope.member, &millis(*at), error],
            )?,
            Settlement::Dead { error } => run(DEAD, &[cluster, id, &scope.member, error])?,
        }),
        Change::Unclaim { keep } => Applied::Count(run(UNCLAIM, &[cluster, &scope.member, keep])?),
        Change::Expedite { now } => Applied::Count(run(EXPEDITE, &[cluster, &millis(*now)])?),
        Change::Retry { which, now } => Applied::Count(match which {
            Which::One(id) => run(RETRY_ONE, &[cluster, id, &millis(*now)])?,
            Which::AllDead => run(RETRY_DEAD, &[cluster, &millis(*now)])?,
        }),
        Change::Drop { id } => Applied::Count(run(DROP, &[cluster, id])?),
    })
}

impl Store for PostgresStore {
    fn apply(&mut self, changes: &[Change]) -> Result<Vec<Applied>, InboxError> {
        self.with(|connection, scope| {
            let statements = &mut connection.statements;
            let mut tx = connection.client.transaction()?;
            let mut applied: Vec<Option<Applied>> = changes.iter().map(|_| None).collect();
            // Accepts first, together: the rest (claims, settlements) do not depend on
            // envelopes kept in the same transaction.
            accept_all(&mut tx, statements, scope, changes, &mut applied)?;
            for (change, slot) in changes.iter().zip(applied.iter_mut()) {
                if slot.is_none() {
                    *slot = Some(apply_one(&mut tx, statements, scope, change)?);
                }
            }
            tx.commit()?;
            Ok(applied
                .into_iter()
                .map(|a| a.expect("every change answered"))
                .collect())
        })
    }

    fn counts(&mut self) -> Result<Counts, InboxError> {
        self.with(|connection, scope| {
            let statement =
                Connection::prepared(&mut connection.statements, &mut connection.client, COUNTS)?;
            let mut counts = Counts::default();
            for row in connection.client.query(&statement, &[&scope.cluster])? {
                let state: String = row.get(0);
                let count = u64::try_from(row.get::<_, i64>(1)).unwrap_or(0);
                let oldest: Option<i64> = row.get(2);
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
        })
    }

    fn list(&mut self, dead: bool, bodies: bool, limit: usize) -> Result<Vec<Listed>, InboxError> {
        self.with(|connection, scope| {
            let sql = if dead { LIST_DEAD } else { LIST_LIVE };
            let statement =
                Connection::prepared(&mut connection.statements, &mut connection.client, sql)?;
            let limit = i64::try_from(limit).unwrap_or(i64::MAX);
            Ok(connection
                .client
                .query(&statement, &[&scope.cluster, &limit])?
                .into_iter()
                .map(|row| Listed {
                    id: row.get(0),
                    envelope_id: row.get(1),
                    kind: row.get(2),
                    event_type: row.get(3),
                    state: row.get(4),
                    attempts: u32::try_from(row.get::<_, i32>(5)).unwrap_or(0),
                    last_error: row.get(6),
                    received_at: time(row.get(7)),
                    body: if bodies { Some(row.get(8)) } else { None },
                })
                .collect())
        })
    }

    /// Forgets old dedup keys. `inbox.max_bytes` is the local file's cap: the shared
    /// database's size is its operators' to watch.
    fn upkeep(&mut self, upkeep: Upkeep) -> Result<UpkeepDone, InboxError> {
        self.with(|connection, scope| {
            let statement =
                Connection::prepared(&mut connection.statements, &mut connection.client, FORGET)?;
            connection.client.execute(
                &statement,
                &[&scope.cluster, &millis(upkeep.forget_seen_before)],
            )?;
            Ok(UpkeepDone::default())
        })
    }
}
