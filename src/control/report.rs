//! Building the answers from the service's shared state.

use std::time::{SystemTime, UNIX_EPOCH};

use super::ControlContext;
use super::protocol::{HealthReport, StatusReport, phase_name};
use crate::health;

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
