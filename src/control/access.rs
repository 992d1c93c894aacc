//! Who may use the control socket: root, the daemon's own user, and members of the
//! configured `control.group`. Callers are identified by the kernel (`SO_PEERCRED`), not by
//! anything they say.

use std::ffi::CString;
use std::fmt;

use nix::unistd::{Gid, Group, Uid, User};

/// The caller on the other end of a control connection, as the kernel reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    pub uid: u32,
    /// The caller's primary (effective) group.
    pub gid: u32,
    pub pid: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct ControlGroup {
    name: String,
    gid: u32,
}

/// The access rule of one daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessPolicy {
    daemon_uid: u32,
    group: Option<ControlGroup>,
}

#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    #[error("there is no group named {0:?}")]
    UnknownGroup(String),
    #[error("cannot look up group {name:?}: {source}")]
    Lookup { name: String, source: nix::Error },
}

/// Why a caller was turned away; the text is what the caller is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub uid: u32,
    group: Option<String>,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.group {
            Some(group) => write!(
                f,
                "permission denied: uid {} is not root, the daemon's user or a member of group {group}",
                self.uid
            ),
            None => write!(
                f,
                "permission denied: uid {} is not root or the daemon's user (no control.group is configured)",
                self.uid
            ),
        }
    }
}

impl std::error::Error for Refusal {}

impl AccessPolicy {
    /// The policy for this process: root, the effective user, and members of `group_name`
    /// (none when empty). Looks the group up (NSS: may block), so call it at start-up.
    pub fn new(group_name: &str) -> Result<AccessPolicy, AccessError> {
        let group = if group_name.is_empty() {
            None
        } else {
            let group = Group::from_name(group_name)
                .map_err(|source| AccessError::Lookup {
                    name: group_name.to_owned(),
                    source,
                })?
                .ok_or_else(|| AccessError::UnknownGroup(group_name.to_owned()))?;
            Some((group_name, group.gid.as_raw()))
        };
        Ok(AccessPolicy::from_parts(Uid::effective().as_raw(), group))
    }

    /// A policy from explicit ids, without any lookup: root, `daemon_uid`, and members of
    /// `group` (name, gid).
    pub fn from_parts(daemon_uid: u32, group: Option<(&str, u32)>) -> AccessPolicy {
        AccessPolicy {
            daemon_uid,
            group: group.map(|(name, gid)| ControlGroup {
                name: name.to_owned(),
                gid,
            }),
        }
    }

    /// The decision, given the caller's supplementary groups (not consulted when the uid
    /// or the primary group already decides).
    pub fn check(&self, peer: &Peer, supplementary_groups: &[u32]) -> Result<(), Refusal> {
        if self.allowed_without_lookup(peer) {
            return Ok(());
        }
        match &self.group {
            Some(group) if supplementary_groups.contains(&group.gid) => Ok(()),
            _ => Err(Refusal {
                uid: peer.uid,
                group: self.group.as_ref().map(|g| g.name.clone()),
            }),
        }
    }

    fn allowed_without_lookup(&self, peer: &Peer) -> bool {
        peer.uid == 0
            || peer.uid == self.daemon_uid
            || self.group.as_ref().is_some_and(|g| g.gid == peer.gid)
    }

    /// [`check`](Self::check) for a real caller: its supplementary groups are looked up
    /// (NSS may block: off the async thread) only when nothing else decides.
    pub async fn authorize(&self, peer: &Peer) -> Result<(), Refusal> {
        if self.group.is_none() || self.allowed_without_lookup(peer) {
            return self.check(peer, &[]);
        }
        let uid = peer.uid;
        let groups = tokio::task::spawn_blocking(move || supplementary_groups(uid))
            .await
            .unwrap_or_default();
        self.check(peer, &groups)
    }
}

/// All groups of the user `uid` (as in /etc/group and other NSS sources); empty when the
/// user is unknown.
fn supplementary_groups(uid: u32) -> Vec<u32> {
    let Ok(Some(user)) = User::from_uid(Uid::from_raw(uid)) else {
        return Vec::new();
    };
    let Ok(name) = CString::new(user.name) else {
        return Vec::new();
    };
    nix::unistd::getgrouplist(&name, user.gid)
        .unwrap_or_default()
        .into_iter()
        .map(Gid::as_raw)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(uid: u32, gid: u32) -> Peer {
        Peer {
            uid,
            gid,
            pid: Some(1),
        }
    }

    #[test]
    fn root_and_the_daemons_user_are_allowed() {
        let policy = AccessPolicy::from_parts(1000, None);
        assert_eq!(policy.check(&peer(0, 0), &[]), Ok(()));
        assert_eq!(policy.check(&peer(1000, 1000), &[]), Ok(()));
        let refusal = policy.check(&peer(1001, 1000), &[]).unwrap_err();
        assert_eq!(refusal.uid, 1001);
        assert!(
            refusal.to_string().contains("no control.group"),
            "{refusal}"
        );
    }

    #[test]
    fn group_members_by_primary_or_supplementary_group() {
        let policy = AccessPolicy::from_parts(1000, Some(("flowcoach", 950)));
        assert_eq!(policy.check(&peer(2000, 950), &[]), Ok(()));
        assert_eq!(policy.check(&peer(2000, 2000), &[2000, 950]), Ok(()));
        let refusal = policy.check(&peer(2000, 2000), &[2000, 10]).unwrap_err();
        assert_eq!(
            refusal.to_string(),
            "permission denied: uid 2000 is not root, the daemon's user or a member of group flowcoach"
        );
    }

    #[test]
    fn an_unknown_group_is_a_configuration_error() {
        let error = AccessPolicy::new("no-such-group-flowcoach-test").unwrap_err();
        assert!(matches!(error, AccessError::UnknownGroup(_)));
        assert_eq!(
            error.to_string(),
            "there is no group named \"no-such-group-flowcoach-test\""
        );
        let root = AccessPolicy::new("root").unwrap();
        assert_eq!(root.check(&peer(4242, 0), &[]), Ok(()));
    }

    #[tokio::test]
    async fn authorize_looks_up_supplementary_groups() {
        // root's groups include gid 0 on any system.
        let policy = AccessPolicy::from_parts(1, Some(("root", 0)));
        let caller = Peer {
            uid: Uid::effective().as_raw(),
            gid: Gid::effective().as_raw(),
            pid: None,
        };
        let expected = if caller.uid == 0 || caller.gid == 0 {
            Ok(())
        } else {
            policy.check(&caller, &supplementary_groups(caller.uid))
        };
        assert_eq!(policy.authorize(&caller).await, expected);
        let nobody = Peer {
            uid: 65534,
            gid: 65534,
            pid: None,
        };
        assert!(policy.authorize(&nobody).await.is_err());
    }
}
