//! The members table in the shared store: registering (with the budget check), the
//! heartbeat, who is alive, and leaving. Times are on the database's clock, so the
//! members' clocks need not agree.

use std::time::Duration;

use postgres::Client;

use super::Member;
use super::budget::{self, Joining, Refused};

/// Who this member is, and how long a silent member still counts.
#[derive(Debug, Clone)]
pub struct Me {
    pub cluster: String,
    pub name: String,
    pub host: String,
    pub pid: i32,
    pub version: String,
    pub lease_secs: f64,
    pub max_members: u64,
}

/// What a heartbeat says about this member.
#[derive(Debug, Clone)]
pub struct Beat {
    pub sockets: i32,
    pub sockets_wanted: i32,
    pub sockets_counted: i32,
    pub health: &'static str,
    pub health_reason: Option<String>,
}

/// What a heartbeat found.
#[derive(Debug)]
pub struct Seen {
    /// The live members, this one included (unless another process took its place).
    pub members: Vec<Member>,
    /// Members whose heartbeat stopped longer than a lease ago, removed by this beat.
    pub gone: Vec<Member>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error(transparent)]
    Sql(#[from] postgres::Error),
}

const COLUMNS: &str = "member, host, pid, version, sockets, sockets_wanted, sockets_counted, health, health_reason, EXTRACT(EPOCH FROM now() - heartbeat_at)::float8";

fn member(row: &postgres::Row) -> Member {
    let count = |i: usize| u32::try_from(row.get::<_, i32>(i)).unwrap_or(0);
    Member {
        name: row.get(0),
        host: row.get(1),
        pid: count(2),
        version: row.get(3),
        sockets: count(4),
        sockets_wanted: count(5),
        sockets_counted: count(6),
        health: row.get(7),
        health_reason: row.get(8),
        heartbeat_age: Duration::try_from_secs_f64(row.get::<_, f64>(9).max(0.0))
            .unwrap_or_default(),
    }
}

fn live(tx: &mut postgres::Transaction<'_>, me: &Me) -> Result<Vec<Member>, postgres::Error> {
    let rows = tx.query(
        &format!(
            "SELECT {COLUMNS} FROM flowcoach_members
             WHERE cluster = $1 AND heartbeat_at > now() - $2::float8 * interval '1 second'
             ORDER BY member"
        ),
        &[&me.cluster, &me.lease_secs],
    )?;
    Ok(rows.iter().map(member).collect())
}

/// Writes this member's row. `only_if_ours`: not over a row another process of the same
/// name wrote since (a successor after a handover); then nothing is written.
fn upsert(
    tx: &mut postgres::Transaction<'_>,
    me: &Me,
    beat: &Beat,
    only_if_ours: bool,
) -> Result<u64, postgres::Error> {
    let guard = if only_if_ours {
        "WHERE flowcoach_members.host = EXCLUDED.host AND flowcoach_members.pid = EXCLUDED.pid"
    } else {
        ""
    };
    tx.execute(
        &format!(
            "INSERT INTO flowcoach_members
                 (cluster, member, host, pid, version, sockets, sockets_wanted, sockets_counted, health, health_reason, heartbeat_at, started_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now(), now())
             ON CONFLICT (cluster, member) DO UPDATE SET
                 host = EXCLUDED.host, pid = EXCLUDED.pid, version = EXCLUDED.version,
                 sockets = EXCLUDED.sockets, sockets_wanted = EXCLUDED.sockets_wanted,
                 sockets_counted = EXCLUDED.sockets_counted, health = EXCLUDED.health,
                 health_reason = EXCLUDED.health_reason, heartbeat_at = now(),
                 started_at = CASE WHEN flowcoach_members.pid = EXCLUDED.pid
                     THEN flowcoach_members.started_at ELSE now() END
             {guard}"
        ),
        &[
            &me.cluster,
            &me.name,
            &me.host,
            &me.pid,
            &me.version,
            &beat.sockets,
            &beat.sockets_wanted,
            &beat.sockets_counted,
            &beat.health,
            &beat.health_reason,
        ],
    )
}

/// Joins the cluster if it has room ([`budget::admit`]). One member at a time (an
/// advisory lock per cluster), so two starting together cannot both take the last place.
pub fn register(client: &mut Client, me: &Me, beat: &Beat) -> Result<Vec<Member>, RegisterError> {
    let mut tx = client.transaction()?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('flowcoach_members'), hashtext($1))",
        &[&me.cluster],
    )?;
    let members = live(&mut tx, me)?;
    budget::admit(
        &Joining {
            cluster: &me.cluster,
            name: &me.name,
            host: &me.host,
            sockets_wanted: u32::try_from(beat.sockets_wanted).unwrap_or(1),
            max_members: me.max_members,
        },
        &members,
    )?;
    upsert(&mut tx, me, beat, false)?;
    let members = live(&mut tx, me)?;
    tx.commit()?;
    Ok(members)
}

/// One heartbeat: this member's row, its claims renewed (a slow delivery stays its own),
/// members gone longer than a lease removed, and who is alive now.
pub fn heartbeat(client: &mut Client, me: &Me, beat: &Beat) -> Result<Seen, postgres::Error> {
    let mut tx = client.transaction()?;
    let ours = upsert(&mut tx, me, beat, true)? > 0;
    if ours {
        tx.execute(
            "UPDATE flowcoach_envelopes
             SET claimed_until = now() + $3::float8 * interval '1 second'
             WHERE cluster = $1 AND claimed_by = $2 AND state = 'delivering'",
            &[&me.cluster, &me.name, &me.lease_secs],
        )?;
    }
    let gone = tx
        .query(
            &format!(
                "DELETE FROM flowcoach_members
                 WHERE cluster = $1 AND heartbeat_at <= now() - $2::float8 * interval '1 second'
                 RETURNING {COLUMNS}"
            ),
            &[&me.cluster, &me.lease_secs],
        )?
        .iter()
        .map(member)
        .collect();
    let members = live(&mut tx, me)?;
    tx.commit()?;
    Ok(Seen { members, gone })
}

/// Leaves the cluster: this process's row only (after a handover, the row is the
/// successor's).
pub fn leave(client: &mut Client, me: &Me) -> Result<u64, postgres::Error> {
    client.execute(
        "DELETE FROM flowcoach_members WHERE cluster = $1 AND member = $2 AND host = $3 AND pid = $4",
        &[&me.cluster, &me.name, &me.host, &me.pid],
    )
}
