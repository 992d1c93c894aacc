//! Building the answers from the service's shared state.

use std::time::{SystemTime, UNIX_EPOCH};

use super::ControlContext;
use super::protocol::{
    ClusterReport, HealthReport, InboxEntry, InboxReport, MemberReport, StatusReport, phase_name,
};
use crate::cluster::ClusterView;
use crate::health;
use crate::inbox::{Counts, Listed};

fn unix_seconds(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

impl StatusReport {
    /// A snapshot of the daemon as of now.
    pub fn collect(ctx: &ControlContext) -> StatusReport {
        let now = SystemTime::now();
        let state = &ctx.state;
        let status = state.status();
        let counters = state.counters.snapshot();
        let health = health::evaluate(&status, ctx.outage_budget, now);
        StatusReport {
            pid: state.instance.pid,
            host: state.instance.host.clone(),
            version: state.instance.version.to_owned(),
            environment: state.instance.environment.clone(),
            app_id: status.app_id,
            phase: status.phase.to_string(),
            phase_name: phase_name(&status.phase).to_owned(),
            started_at: unix_seconds(ctx.started_at),
            uptime_s: now
                .duration_since(ctx.started_at)
                .unwrap_or_default()
                .as_secs(),
            connected_since: status.connected_since.map(unix_seconds),
            sockets_open: status.sockets_open,
            num_connections: status.num_connections,
            reconnects: counters.reconnects,
            rotations: counters.rotations,
            last_disconnect: status.last_disconnect,
            pacing: status.pacing,
            handover: status.handover,
            counters,
            token_source: ctx.token_source.borrow().clone(),
            health,
            app_url: status.app_url,
            app_last_error: status.app_last_error,
            inbox: ctx
                .inbox
                .as_ref()
                .zip(status.inbox)
                .map(|(inbox, (counts, _))| InboxReport::new(inbox.path(), &counts, now)),
            cluster: status.cluster.map(|view| ClusterReport::new(view, now)),
        }
    }
}

impl ClusterReport {
    pub fn new(view: ClusterView, now: SystemTime) -> ClusterReport {
        let since_read = view
            .read_at
            .and_then(|at| now.duration_since(at).ok())
            .unwrap_or_default();
        ClusterReport {
            name: view.name,
            store: view.store,
            member: view.member,
            members: view
                .members
                .into_iter()
                .map(|m| MemberReport {
                    name: m.name,
                    host: m.host,
                    pid: m.pid,
                    version: m.version,
                    sockets: m.sockets,
                    health: m.health,
                    health_reason: m.health_reason,
                    heartbeat_age_ms: u64::try_from((m.heartbeat_age + since_read).as_millis())
                        .unwrap_or(u64::MAX),
                })
                .collect(),
            trouble: view.trouble,
        }
    }
}

impl InboxReport {
    pub fn new(path: &std::path::Path, counts: &Counts, now: SystemTime) -> InboxReport {
        InboxReport {
            path: path.display().to_string(),
            pending: counts.pending,
            delivering: counts.delivering,
            dead: counts.dead,
            oldest_pending_age_s: counts.oldest_pending_age(now).map(|age| age.as_secs()),
        }
    }
}

impl InboxEntry {
    pub fn new(listed: Listed, now: SystemTime) -> InboxEntry {
        InboxEntry {
            id: listed.id,
            envelope_id: listed.envelope_id,
            kind: listed.kind,
            event_type: listed.event_type,
            state: listed.state,
            attempts: listed.attempts,
            last_error: listed.last_error,
            age_s: now
                .duration_since(listed.received_at)
                .unwrap_or_default()
                .as_secs(),
            payload: listed.body,
        }
    }
}

impl HealthReport {
    pub fn collect(ctx: &ControlContext) -> HealthReport {
        let status = ctx.state.status();
        HealthReport {
            health: health::evaluate(&status, ctx.outage_budget, SystemTime::now()),
            phase: status.phase.to_string(),
        }
    }
}
