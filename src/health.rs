//! One judgement of the service's health, used by `flowcoachctl health`, container health
//! checks and the systemd watchdog alike.

use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::state::{ConnectionStatus, Phase};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "health", content = "reason", rename_all = "snake_case")]
pub enum Health {
    Healthy,
    /// Working, but someone should look: reconnecting within the outage budget, other
    /// clients on the app, draining.
    Degraded(String),
    /// Not doing its job: an outage beyond the budget, stopped.
    Unhealthy(String),
}

/// Whether the systemd watchdog should be fed: only what a restart can cure stops it. An
/// outage beyond `outage_budget` and a stopped service do; a conflict with other clients of
/// the app does not (a restart would only add to it).
pub fn watchdog_verdict(
    status: &ConnectionStatus,
    outage_budget: Duration,
    now: SystemTime,
) -> Result<(), String> {
    match evaluate_connection(status, outage_budget, now) {
        Health::Unhealthy(reason) => Err(reason),
        Health::Healthy | Health::Degraded(_) => Ok(()),
    }
}

/// Judges `status` at `now`; an outage longer than `outage_budget` is unhealthy, and so is a
/// diagnosed conflict with other clients of the app.
pub fn evaluate(status: &ConnectionStatus, outage_budget: Duration, now: SystemTime) -> Health {
    if let Some(conflict) = &status.conflict {
        return Health::Unhealthy(conflict.clone());
    }
    // Nothing new can be acked; a restart would not free the disk (the watchdog stays
    // fed), an operator has to.
    if let Some(trouble) = &status.inbox_trouble
        && !trouble.passes_by_itself()
    {
        return Health::Unhealthy(trouble.reason.clone());
    }
    let connection = match evaluate_connection(status, outage_budget, now) {
        Health::Unhealthy(reason) => return Health::Unhealthy(reason),
        Health::Degraded(reason) => Some(reason),
        Health::Healthy => None,
    };
    // The app behind flowcoach failing, the inbox behind or its shared store away: someone
    // should look, but a restart of flowcoach would not help (the watchdog stays fed).
    let reasons: Vec<String> = connection
        .into_iter()
        .chain(status.app_failing.iter().map(|error| {
            format!(
                "the app at {} is failing: {error}",
                status.app_url.as_deref().unwrap_or("[forward] url")
            )
        }))
        .chain(inbox_backlog(status, now))
        .chain(status.inbox_trouble.iter().map(|t| t.reason.clone()))
        .chain(
            status
                .cluster
                .as_ref()
                .and_then(|view| view.trouble.clone()),
        )
        .collect();
    if reasons.is_empty() {
        Health::Healthy
    } else {
        Health::Degraded(reasons.join("; "))
    }
}

/// Why health is degraded when the inbox's oldest pending envelope is older than
/// `inbox.stale_after`: delivery is stuck or far behind.
fn inbox_backlog(status: &ConnectionStatus, now: SystemTime) -> Option<String> {
    let (counts, stale_after) = status.inbox.as_ref()?;
    let age = counts.oldest_pending_age(now)?;
    (age > *stale_after).then(|| {
        format!(
            "the oldest event in the inbox has waited {} (inbox.stale_after is {}); {} pending",
            humantime::format_duration(Duration::from_secs(age.as_secs())),
            humantime::format_duration(*stale_after),
            counts.pending + counts.delivering
        )
    })
}

fn evaluate_connection(
    status: &ConnectionStatus,
    outage_budget: Duration,
    now: SystemTime,
) -> Health {
    if let Some(down_since) = status.down_since {
        let down_for = now.duration_since(down_since).unwrap_or_default();
        let cause = status.last_disconnect.as_deref().unwrap_or("unknown cause");
        if down_for > outage_budget {
            return Health::Unhealthy(format!(
                "no Slack connection for {}s (after {cause}), beyond the outage budget of {}s",
                down_for.as_secs(),
                outage_budget.as_secs()
            ));
        }
        return Health::Degraded(format!(
            "reconnecting for {}s after {cause}",
            down_for.as_secs()
        ));
    }
    match &status.phase {
        Phase::Connected => match status.other_connections {
            Some(others) if others > 0 => Health::Degraded(format!(
                "Slack counted {} open sockets for this app at the latest hello, {others} of them another client's",
                status.num_connections.unwrap_or(others)
            )),
            _ => Health::Healthy,
        },
        Phase::Starting | Phase::Connecting | Phase::Reconnecting { .. } => {
            Health::Degraded(format!("not connected yet ({})", status.phase))
        }
        Phase::Draining => Health::Degraded("draining before stopping".to_owned()),
        Phase::Stopped => Health::Unhealthy("stopped".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inbox::Trouble;
    use crate::state::InboxTrouble;

    const BUDGET: Duration = Duration::from_secs(300);

    fn connected() -> ConnectionStatus {
        ConnectionStatus {
            phase: Phase::Connected,
            sockets_open: 1,
            num_connections: Some(1),
            ..ConnectionStatus::default()
        }
    }

    #[test]
    fn connected_alone_is_healthy() {
        assert_eq!(
            evaluate(&connected(), BUDGET, SystemTime::now()),
            Health::Healthy
        );
    }

    #[test]
    fn an_old_inbox_backlog_degrades_and_a_store_that_cannot_write_is_unhealthy() {
        let now = SystemTime::now();
        let counts = crate::inbox::Counts {
            pending: 3,
            oldest_pending: Some(now - Duration::from_secs(600)),
            ..Default::default()
        };
        let backlog = ConnectionStatus {
            inbox: Some((counts, Duration::from_secs(300))),
            ..connected()
        };
        assert!(
            matches!(evaluate(&backlog, BUDGET, now), Health::Degraded(r) if r.contains("waited 10m") && r.contains("inbox.stale_after"))
        );
        let fresh = ConnectionStatus {
            inbox: Some((counts, Duration::from_secs(900))),
            ..connected()
        };
        assert_eq!(evaluate(&fresh, BUDGET, now), Health::Healthy);
        let full = ConnectionStatus {
            inbox_trouble: Some(InboxTrouble {
                trouble: Trouble::DiskFull,
                reason: "inbox /x: the disk is full: database or disk is full".into(),
            }),
            ..backlog.clone()
        };
        assert!(
            matches!(evaluate(&full, BUDGET, now), Health::Unhealthy(r) if r.contains("disk is full"))
        );
        // A restart would not free the disk: the watchdog stays fed.
        assert!(watchdog_verdict(&full, BUDGET, now).is_ok());
        let shared_store_away = ConnectionStatus {
            inbox_trouble: Some(InboxTrouble {
                trouble: Trouble::Unreachable,
                reason: "inbox postgres://db/flowcoach: the shared store cannot be reached".into(),
            }),
            ..fresh
        };
        assert!(
            matches!(evaluate(&shared_store_away, BUDGET, now), Health::Degraded(r) if r.contains("cannot be reached"))
        );
    }

    #[test]
    fn failing_cluster_heartbeats_degrade() {
        let status = ConnectionStatus {
            cluster: Some(crate::cluster::ClusterView {
                name: "it".into(),
                store: "postgres://db/flowcoach".into(),
                member: "m1".into(),
                members: Vec::new(),
                read_at: None,
                trouble: Some("cluster heartbeats fail: the shared store cannot be reached".into()),
            }),
            ..connected()
        };
        let now = SystemTime::now();
        assert!(
            matches!(evaluate(&status, BUDGET, now), Health::Degraded(r) if r.starts_with("cluster heartbeats fail"))
        );
        assert!(watchdog_verdict(&status, BUDGET, now).is_ok());
    }

    #[test]
    fn other_clients_degrade() {
        let status = ConnectionStatus {
            num_connections: Some(3),
            other_connections: Some(2),
            ..connected()
        };
        let health = evaluate(&status, BUDGET, SystemTime::now());
        assert!(matches!(&health, Health::Degraded(r) if r.contains("another client's")));
        assert!(watchdog_verdict(&status, BUDGET, SystemTime::now()).is_ok());
    }

    #[test]
    fn outages_degrade_then_turn_unhealthy_past_the_budget() {
        let now = SystemTime::now();
        let status = ConnectionStatus {
            phase: Phase::Connecting,
            down_since: Some(now - Duration::from_secs(30)),
            last_disconnect: Some("stale (no pong)".into()),
            ..ConnectionStatus::default()
        };
        let health = evaluate(&status, BUDGET, now);
        assert!(matches!(&health, Health::Degraded(r) if r.contains("stale")));
        let later = now + BUDGET;
        let health = evaluate(&status, BUDGET, later);
        assert!(matches!(&health, Health::Unhealthy(r) if r.contains("outage budget")));
        assert!(watchdog_verdict(&status, BUDGET, later).is_err());
    }

    #[test]
    fn a_failing_app_degrades_but_keeps_the_watchdog_fed() {
        let status = ConnectionStatus {
            app_url: Some("http://127.0.0.1:3000/slack/events".into()),
            app_failing: Some("the app answered HTTP 500".into()),
            ..connected()
        };
        let now = SystemTime::now();
        assert!(
            matches!(evaluate(&status, BUDGET, now), Health::Degraded(r) if r.contains("127.0.0.1:3000") && r.contains("HTTP 500"))
        );
        assert!(watchdog_verdict(&status, BUDGET, now).is_ok());
    }

    #[test]
    fn a_conflict_is_unhealthy_but_keeps_the_watchdog_fed() {
        let status = ConnectionStatus {
            conflict: Some("too_many_websockets 3 times in a row".into()),
            ..connected()
        };
        let now = SystemTime::now();
        assert!(
            matches!(evaluate(&status, BUDGET, now), Health::Unhealthy(r) if r.contains("in a row"))
        );
        assert!(watchdog_verdict(&status, BUDGET, now).is_ok());
    }

    #[test]
    fn starting_and_draining_are_degraded_stopped_is_unhealthy() {
        let now = SystemTime::now();
        let mut status = ConnectionStatus::default();
        assert!(matches!(
            evaluate(&status, BUDGET, now),
            Health::Degraded(_)
        ));
        status.phase = Phase::Draining;
        assert!(matches!(
            evaluate(&status, BUDGET, now),
            Health::Degraded(_)
        ));
        status.phase = Phase::Stopped;
        assert!(matches!(
            evaluate(&status, BUDGET, now),
            Health::Unhealthy(_)
        ));
    }
}
