//! Whether the cluster has room for one more member: `cluster.max_members`, one host per
//! member name, and Slack's 10 sockets per app. Every member holds twice its
//! `connection.sockets` during rotations (each socket overlaps with its replacement), and
//! a handover adds a successor's sockets for a moment: room for one at a time is kept.

use std::fmt::Write;

use super::Member;
use crate::config::SOCKETS_PER_APP;

/// Who wants to join.
#[derive(Debug, Clone)]
pub struct Joining<'a> {
    pub cluster: &'a str,
    pub name: &'a str,
    pub host: &'a str,
    /// Its `connection.sockets`.
    pub sockets_wanted: u32,
    pub max_members: u64,
}

/// Why a member may not join; it stops (exit 69) instead of taking a share of the app's
/// sockets that Slack would refuse to another member.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error(
        "cluster {cluster} already has {count} live members, its cluster.max_members: {members}. This member ({name}) does not start: stop one of them, or raise cluster.max_members (each member counts against Slack's 10 sockets per app)"
    )]
    TooManyMembers {
        cluster: String,
        name: String,
        count: usize,
        members: String,
    },
    #[error(
        "cluster {cluster} would need up to {needed} sockets with this member ({name}), over Slack's limit of {limit} per app: each member holds twice its connection.sockets while rotating, and a handover adds one member's sockets for a moment. Live members: {members}. Lower connection.sockets, or stop a member"
    )]
    OverSocketBudget {
        cluster: String,
        name: String,
        needed: u64,
        limit: u64,
        members: String,
    },
    #[error(
        "the member name {name} is in use in cluster {cluster} by host {host} (pid {pid}), which is alive: give each host its own cluster.member"
    )]
    NameTaken {
        cluster: String,
        name: String,
        host: String,
        pid: u32,
    },
}

/// The most sockets of the app at one moment with `members`: each at its rotation peak,
/// one of them handing over.
pub fn peak_sockets(wanted: impl IntoIterator<Item = u32> + Clone) -> u64 {
    let rotations: u64 = wanted.clone().into_iter().map(|w| 2 * u64::from(w)).sum();
    let handover = wanted.into_iter().map(u64::from).max().unwrap_or(0);
    rotations + handover
}

/// Admits `joining` among the `live` members, or says why not. A live member of the same
/// name on the same host is this member's earlier self (a restart, a handover): its
/// place is taken over, not counted twice.
pub fn admit(joining: &Joining<'_>, live: &[Member]) -> Result<(), Refused> {
    if let Some(taken) = live
        .iter()
        .find(|m| m.name == joining.name && m.host != joining.host)
    {
        return Err(Refused::NameTaken {
            cluster: joining.cluster.to_owned(),
            name: joining.name.to_owned(),
            host: taken.host.clone(),
            pid: taken.pid,
        });
    }
    let others: Vec<&Member> = live.iter().filter(|m| m.name != joining.name).collect();
    let members = || {
        let mut listed = String::new();
        for (i, m) in others.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            let _ = write!(
                listed,
                "{sep}{} on {} ({} socket{})",
                m.name,
                m.host,
                m.sockets_wanted,
                if m.sockets_wanted == 1 { "" } else { "s" }
            );
        }
        listed
    };
    if others.len() as u64 >= joining.max_members {
        return Err(Refused::TooManyMembers {
            cluster: joining.cluster.to_owned(),
            name: joining.name.to_owned(),
            count: others.len(),
            members: members(),
        });
    }
    let needed = peak_sockets(
        others
            .iter()
            .map(|m| m.sockets_wanted)
            .chain([joining.sockets_wanted]),
    );
    if needed > SOCKETS_PER_APP {
        return Err(Refused::OverSocketBudget {
            cluster: joining.cluster.to_owned(),
            name: joining.name.to_owned(),
            needed,
            limit: SOCKETS_PER_APP,
            members: members(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn member(name: &str, host: &str, sockets_wanted: u32) -> Member {
        Member {
            name: name.into(),
            host: host.into(),
            pid: 42,
            version: "0.1.0".into(),
            sockets: sockets_wanted,
            sockets_wanted,
            sockets_counted: sockets_wanted,
            health: "healthy".into(),
            health_reason: None,
            heartbeat_age: Duration::ZERO,
        }
    }

    fn joining(name: &'static str, host: &'static str, sockets_wanted: u32) -> Joining<'static> {
        Joining {
            cluster: "it",
            name,
            host,
            sockets_wanted,
            max_members: 10,
        }
    }

    #[test]
    fn four_one_socket_members_fit_a_fifth_does_not() {
        let live: Vec<Member> = (1..=4)
            .map(|i| member(&format!("m{i}"), &format!("h{i}"), 1))
            .collect();
        assert_eq!(admit(&joining("m4", "h4", 1), &live[..3]), Ok(()));
        let refused = admit(&joining("m5", "h5", 1), &live).unwrap_err();
        assert!(
            matches!(&refused, Refused::OverSocketBudget { needed: 11, .. }),
            "{refused}"
        );
        assert!(refused.to_string().contains("m1 on h1 (1 socket)"));
    }

    #[test]
    fn a_restart_or_handover_takes_its_own_place_and_a_name_is_one_hosts() {
        let live = vec![member("m1", "h1", 2), member("m2", "h2", 2)];
        // 2·2 + 2·2 + 2 = 10: room for m2 again, not for a third.
        assert_eq!(admit(&joining("m2", "h2", 2), &live), Ok(()));
        assert!(matches!(
            admit(&joining("m3", "h3", 2), &live),
            Err(Refused::OverSocketBudget { needed: 14, .. })
        ));
        assert!(matches!(
            admit(&joining("m2", "elsewhere", 1), &live),
            Err(Refused::NameTaken { pid: 42, .. })
        ));
    }

    #[test]
    fn max_members_counts_the_others() {
        let live = vec![member("m1", "h1", 1)];
        let mut one = joining("m2", "h2", 1);
        one.max_members = 1;
        let refused = admit(&one, &live).unwrap_err();
        assert!(
            refused
                .to_string()
                .starts_with("cluster it already has 1 live members, its cluster.max_members"),
            "{refused}"
        );
        assert_eq!(admit(&joining("m1", "h1", 1), &live), Ok(()));
    }
}
