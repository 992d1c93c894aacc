//! Human-readable answers for flowcoachctl.

use std::fmt::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::protocol::{ClusterReport, InboxEntry, InboxReport, StatusReport};
use crate::health::Health;

/// "healthy", "degraded: REASON" or "unhealthy: REASON".
pub fn health(health: &Health) -> String {
    match health {
        Health::Healthy => "healthy".to_owned(),
        Health::Degraded(reason) => format!("degraded: {reason}"),
        Health::Unhealthy(reason) => format!("unhealthy: {reason}"),
    }
}

/// The status report as a few aligned lines, durations counted up to `now` (unix seconds).
pub fn status(report: &StatusReport, now: u64) -> String {
    let r = report;
    let c = &r.counters;
    let mut out = String::new();
    let mut line = |label: &str, text: String| {
        let _ = writeln!(out, "{:<14}{text}", format!("{label}:"));
    };
    let app = r
        .app_id
        .as_deref()
        .map_or_else(String::new, |app| format!(", app {app}"));
    let mut head = format!(
        "flowcoach {}, pid {} on {}, environment {}{app}",
        r.version, r.pid, r.host, r.environment
    );
    head.push('\n');
    let since = r.connected_since.map_or_else(String::new, |since| {
        format!(
            " (since {}, up {})",
            timestamp(since),
            duration(now.saturating_sub(since))
        )
    });
    line("state", format!("{}{since}", r.phase));
    if let Some(step) = &r.handover {
        line("handover", step.clone());
    }
    line(
        "started",
        format!("{}, up {}", timestamp(r.started_at), duration(r.uptime_s)),
    );
    let counted = match (r.num_connections, r.connected_since) {
        (Some(n), _) => format!("{n} counted by Slack"),
        (None, Some(_)) => "Slack's hello gave no count".to_owned(),
        (None, None) => "not counted by Slack yet".to_owned(),
    };
    line("sockets", format!("{} ours, {counted}", r.sockets_open));
    let last = r
        .last_disconnect
        .as_deref()
        .map_or_else(String::new, |cause| format!(" (last disconnect: {cause})"));
    line(
        "reconnects",
        format!("{}{last}, rotations {}", r.reconnects, r.rotations),
    );
    if let Some(pacing) = &r.pacing {
        line("pacing", pacing.clone());
    }
    line(
        "envelopes",
        format!(
            "received {}, acked {}, deduplicated {}, deferred {}, in flight {}",
            c.envelopes_received,
            c.envelopes_acked,
            c.envelopes_deduplicated,
            c.envelopes_deferred,
            c.in_flight
        ),
    );
    line(
        "handlers",
        format!(
            "{} errors, {} late responses",
            c.handler_errors, c.late_responses
        ),
    );
    line(
        "bad input",
        format!(
            "{} malformed, {} unknown, {} binary, {} oversized frames; {} acks failed",
            c.frames_malformed,
            c.frames_unknown,
            c.frames_binary,
            c.frames_oversized,
            c.acks_failed
        ),
    );
    if let Some(url) = &r.app_url {
        let last = r
            .app_last_error
            .as_deref()
            .map_or_else(String::new, |error| format!(" (last error: {error})"));
        line(
            "app",
            format!(
                "{url}: forwarded {}, failed {}, late {}{last}",
                c.forwarded, c.forward_failed, c.late_responses
            ),
        );
    }
    if let Some(inbox) = &r.inbox {
        line("inbox", inbox_depth(inbox));
    }
    if let Some(cluster) = &r.cluster {
        line("cluster", cluster_head(cluster));
    }
    line("token", format!("from {}", r.token_source));
    line("health", health(&r.health));
    if let Some(cluster) = &r.cluster {
        out.push_str(&members(cluster));
    }
    head + &out
}

/// "it on postgres://flow@db/flowcoach as m1, 3 members".
fn cluster_head(cluster: &ClusterReport) -> String {
    let trouble = cluster
        .trouble
        .as_deref()
        .map_or_else(String::new, |trouble| format!(" ({trouble})"));
    format!(
        "{} on {} as {}, {} member{}{trouble}",
        cluster.name,
        cluster.store,
        cluster.member,
        cluster.members.len(),
        if cluster.members.len() == 1 { "" } else { "s" }
    )
}

/// A table of the members: name, host, pid, sockets, health, heartbeat age.
fn members(cluster: &ClusterReport) -> String {
    let mut out = format!(
        "\n{:<2}{:<20} {:<24} {:>8} {:>7} {:>10}  {}\n",
        "", "MEMBER", "HOST", "PID", "SOCKETS", "HEARTBEAT", "HEALTH"
    );
    for m in &cluster.members {
        let this = if m.name == cluster.member { "*" } else { "" };
        let health = match &m.health_reason {
            Some(reason) => format!("{}: {reason}", m.health),
            None => m.health.clone(),
        };
        let _ = writeln!(
            out,
            "{this:<2}{:<20} {:<24} {:>8} {:>7} {:>10}  {health}",
            m.name,
            m.host,
            m.pid,
            m.sockets,
            format!("{:.1}s ago", m.heartbeat_age_ms as f64 / 1000.0),
        );
    }
    out
}

/// "3 pending (oldest waits 2m 5s), 1 delivering, 0 dead letters".
fn inbox_depth(inbox: &InboxReport) -> String {
    let oldest = inbox.oldest_pending_age_s.map_or_else(String::new, |age| {
        format!(" (oldest waits {})", duration(age))
    });
    format!(
        "{} pending{oldest}, {} delivering, {} dead letters",
        inbox.pending, inbox.delivering, inbox.dead
    )
}

/// `flowcoachctl inbox`: the depth and the file.
pub fn inbox(report: &InboxReport) -> String {
    format!("{}\nfile: {}\n", inbox_depth(report), report.path)
}

/// `flowcoachctl inbox list`: one line per envelope (then its payload, when asked for).
pub fn inbox_list(envelopes: &[InboxEntry], truncated: bool) -> String {
    let mut out = format!(
        "{:<8} {:<12} {:<14} {:<20} {:<10} {:>8} {:>9}  {}\n",
        "ID", "STATE", "KIND", "TYPE", "ENVELOPE", "ATTEMPTS", "AGE", "LAST ERROR"
    );
    for e in envelopes {
        let _ = writeln!(
            out,
            "{:<8} {:<12} {:<14} {:<20} {:<10} {:>8} {:>9}  {}",
            e.id,
            e.state,
            e.kind,
            e.event_type.as_deref().unwrap_or("-"),
            e.envelope_id,
            e.attempts,
            duration(e.age_s),
            e.last_error.as_deref().unwrap_or("-"),
        );
        if let Some(payload) = &e.payload {
            let _ = writeln!(out, "    {payload}");
        }
    }
    if truncated {
        out.push_str("(more: the list was cut to fit one answer; use --limit)\n");
    }
    out
}

fn timestamp(unix_seconds: u64) -> String {
    let time = UNIX_EPOCH + Duration::from_secs(unix_seconds);
    humantime::format_rfc3339_seconds(time).to_string()
}

/// "42s", "3m 12s", "2h 3m", "4d 5h": the two largest units.
fn duration(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m {s}s"),
        (0, _, _) => format!("{h}h {m}m"),
        _ => format!("{d}d {h}h"),
    }
}

/// Now as unix seconds.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::protocol::MemberReport;
    use crate::state::CounterSnapshot;

    #[test]
    fn durations_use_the_two_largest_units() {
        assert_eq!(duration(42), "42s");
        assert_eq!(duration(192), "3m 12s");
        assert_eq!(duration(2 * 3600 + 3 * 60 + 9), "2h 3m");
        assert_eq!(duration(4 * 86_400 + 5 * 3600), "4d 5h");
    }

    #[test]
    fn status_reads_as_a_summary() {
        let report = StatusReport {
            pid: 1234,
            host: "box".into(),
            version: "0.1.0".into(),
            environment: "prod".into(),
            app_id: Some("A08FU15EA2Y".into()),
            phase: "connected".into(),
            phase_name: "connected".into(),
            started_at: 1_796_026_000,
            uptime_s: 8000,
            connected_since: Some(1_796_026_213),
            sockets_open: 1,
            num_connections: Some(1),
            reconnects: 2,
            rotations: 5,
            last_disconnect: Some("refresh_requested".into()),
            pacing: None,
            handover: None,
            counters: CounterSnapshot {
                envelopes_received: 120,
                envelopes_acked: 120,
                envelopes_deduplicated: 3,
                ..CounterSnapshot::default()
            },
            token_source: "SLACK_APP_TOKEN".into(),
            health: Health::Healthy,
            app_url: None,
            app_last_error: None,
            inbox: None,
            cluster: None,
        };
        let text = status(&report, 1_796_026_213 + 2 * 3600 + 3 * 60);
        let expected = "\
flowcoach 0.1.0, pid 1234 on box, environment prod, app A08FU15EA2Y
state:        connected (since 2026-11-30T08:10:13Z, up 2h 3m)
started:      2026-11-30T08:06:40Z, up 2h 13m
sockets:      1 ours, 1 counted by Slack
reconnects:   2 (last disconnect: refresh_requested), rotations 5
envelopes:    received 120, acked 120, deduplicated 3, deferred 0, in flight 0
handlers:     0 errors, 0 late responses
bad input:    0 malformed, 0 unknown, 0 binary, 0 oversized frames; 0 acks failed
token:        from SLACK_APP_TOKEN
health:       healthy
";
        assert_eq!(text, expected);
        let bare_hello = StatusReport {
            num_connections: None,
            ..report.clone()
        };
        assert!(
            status(&bare_hello, 1_796_026_213)
                .contains("sockets:      1 ours, Slack's hello gave no count\n")
        );
        let forwarding = StatusReport {
            app_url: Some("http://127.0.0.1:3000/slack/events".into()),
            app_last_error: Some("the app answered HTTP 500".into()),
            counters: CounterSnapshot {
                forwarded: 7,
                forward_failed: 2,
                late_responses: 1,
                ..report.counters
            },
            ..report.clone()
        };
        assert!(
            status(&forwarding, 1_796_026_213).contains(
                "\napp:          http://127.0.0.1:3000/slack/events: forwarded 7, failed 2, late 1 (last error: the app answered HTTP 500)\n"
            )
        );
        let inbox = StatusReport {
            inbox: Some(InboxReport {
                path: "/var/lib/flowcoach/A1.prod.inbox.sqlite".into(),
                pending: 12,
                delivering: 2,
                dead: 1,
                oldest_pending_age_s: Some(125),
            }),
            ..report.clone()
        };
        assert!(status(&inbox, 1_796_026_213).contains(
            "\ninbox:        12 pending (oldest waits 2m 5s), 2 delivering, 1 dead letters\n"
        ));
        let member = |name: &str, health: &str, reason: Option<&str>| MemberReport {
            name: name.into(),
            host: format!("host-{name}"),
            pid: 4242,
            version: "0.1.0".into(),
            sockets: 1,
            health: health.into(),
            health_reason: reason.map(Into::into),
            heartbeat_age_ms: 1250,
        };
        let clustered = StatusReport {
            cluster: Some(ClusterReport {
                name: "it".into(),
                store: "postgres://flow@db:5432/flowcoach".into(),
                member: "m2".into(),
                members: vec![
                    member("m1", "healthy", None),
                    member("m2", "degraded", Some("reconnecting for 3s after warning")),
                ],
                trouble: None,
            }),
            ..report.clone()
        };
        let text = status(&clustered, 1_796_026_213);
        assert!(
            text.contains(
                "\ncluster:      it on postgres://flow@db:5432/flowcoach as m2, 2 members\n"
            ),
            "{text}"
        );
        assert!(
            text.ends_with(
                "\n  MEMBER               HOST                          PID SOCKETS  HEARTBEAT  HEALTH\n  \
                 m1                   host-m1                      4242       1   1.2s ago  healthy\n\
                 * m2                   host-m2                      4242       1   1.2s ago  degraded: reconnecting for 3s after warning\n"
            ),
            "{text}"
        );
        let paced = StatusReport {
            pacing: Some("Slack ended 4 connections of socket 1 in a row".into()),
            ..report
        };
        let text = status(&paced, 1_796_026_213);
        assert!(
            text.contains("\npacing:       Slack ended 4 connections of socket 1 in a row\n"),
            "{text}"
        );
        assert_eq!(
            health(&Health::Degraded("reconnecting".into())),
            "degraded: reconnecting"
        );
    }
}
