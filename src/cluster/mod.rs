//! Membership of a `[cluster]`: each member registers in the shared store at start (if
//! the cluster has room: [`budget`]), heartbeats every `cluster.heartbeat`, and leaves on
//! a clean stop; a member silent for longer than the lease counts as gone. What the
//! heartbeats find feeds `flowcoachctl status`, the other-clients diagnosis (the other
//! members' sockets are not strangers') and health.
//!
//! The synchronous `postgres` client runs on a thread of its own, with a connection of
//! its own: heartbeats do not queue behind the inbox's writes.

pub mod budget;
mod roster;

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use postgres::Client;
use serde::Serialize;
use tokio::sync::{oneshot, watch};

use crate::config::{Cluster, Settings};
use crate::health::{self, Health};
use crate::inbox::postgres::{Link, connection_lost};
use crate::inbox::{InboxError, Trouble};
use crate::state::{ConnectionStatus, InstanceState, Phase};

pub use budget::Refused;

/// How long a hello waits for a fresh view of the members before judging Slack's count
/// with the last one.
const REFRESH_WAIT: Duration = Duration::from_secs(2);

/// One member as its latest heartbeat described it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Member {
    pub name: String,
    pub host: String,
    pub pid: u32,
    pub version: String,
    /// Sockets it holds open.
    pub sockets: u32,
    /// Its `connection.sockets`.
    pub sockets_wanted: u32,
    /// Sockets Slack may count for it: one being opened, one closed a moment ago.
    pub sockets_counted: u32,
    /// healthy, degraded or unhealthy.
    pub health: String,
    pub health_reason: Option<String>,
    /// How old its heartbeat was when read.
    pub heartbeat_age: Duration,
}

/// The cluster as this member sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClusterView {
    pub name: String,
    /// Where the store is: no password.
    pub store: String,
    /// This member's name.
    pub member: String,
    /// The live members, this one included, by name.
    pub members: Vec<Member>,
    /// When `members` was read.
    pub read_at: Option<SystemTime>,
    /// Why heartbeats fail, until one succeeds (health: degraded).
    pub trouble: Option<String>,
}

/// Why this process may not serve as a member.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(transparent)]
    Refused(#[from] Refused),
    /// The store answered, but not with a usable schema or rights: as with the inbox.
    #[error("cannot register in the cluster's store: {0}")]
    Store(#[source] InboxError),
}

enum Message {
    /// Something a heartbeat reports changed (sockets, health).
    Beat,
    /// A heartbeat now; answered when the members are read.
    Refresh(oneshot::Sender<()>),
    Leave(oneshot::Sender<()>),
}

/// Asks the membership for a fresh view; cheap to clone.
#[derive(Clone)]
pub struct Members {
    messages: mpsc::Sender<Message>,
}

impl Members {
    /// Heartbeats now and reads who is alive, so Slack's count at a hello is judged
    /// against the members' sockets of this moment (bounded: else the last view is used).
    pub async fn refresh(&self) {
        let (done, read) = oneshot::channel();
        if self.messages.send(Message::Refresh(done)).is_ok() {
            let _ = tokio::time::timeout(REFRESH_WAIT, read).await;
        }
    }
}

/// This process's membership: heartbeating until [`Membership::leave`].
pub struct Membership {
    members: Members,
    thread: JoinHandle<()>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Membership {
    /// Registers in the cluster and starts heartbeating. A store that cannot be reached
    /// is no reason not to serve (slash commands need none): the member registers once
    /// it can, and health is degraded until then.
    pub async fn join(
        cluster: &Cluster,
        state: Arc<InstanceState>,
        live: watch::Receiver<Settings>,
    ) -> Result<Membership, JoinError> {
        let (messages, mailbox) = mpsc::channel();
        let (joined_tx, joined) = oneshot::channel();
        let mut heart = Heart::new(cluster, state.clone(), live.clone());
        let thread = std::thread::Builder::new()
            .name("cluster-members".into())
            .spawn(move || {
                let first = heart.register();
                let refused = first.is_err();
                let _ = joined_tx.send(first);
                if !refused {
                    heart.run(&mailbox);
                }
            })
            .map_err(|error| {
                JoinError::Store(InboxError {
                    trouble: Trouble::Io,
                    path: cluster.store_description.clone().into(),
                    detail: error.to_string(),
                })
            })?;
        let joined = joined.await.unwrap_or(Ok(()));
        if let Err(error) = joined {
            let _ = thread.join();
            return Err(error);
        }
        let members = Members { messages };
        let watcher = tokio::spawn(watch_changes(state, live, members.clone()));
        Ok(Membership {
            members,
            thread,
            watcher,
        })
    }

    pub fn members(&self) -> Members {
        self.members.clone()
    }

    /// Leaves the cluster (a clean stop): the others stop counting this member at once.
    pub async fn leave(self) {
        self.watcher.abort();
        let (done, left) = oneshot::channel();
        if self.members.messages.send(Message::Leave(done)).is_ok() {
            let _ = left.await;
        }
        let _ = tokio::task::spawn_blocking(move || self.thread.join()).await;
    }
}

/// A heartbeat as soon as the sockets or the health word change, not only on the interval.
async fn watch_changes(
    state: Arc<InstanceState>,
    live: watch::Receiver<Settings>,
    members: Members,
) {
    let mut changes = state.subscribe();
    let said = |status: &ConnectionStatus| {
        let budget = live.borrow().service.outage_budget;
        let (word, _) = health_words(&health::evaluate(status, budget, SystemTime::now()));
        (status.sockets_open, word)
    };
    let mut last = said(&changes.borrow_and_update());
    while changes.changed().await.is_ok() {
        let now = said(&changes.borrow_and_update());
        if now != last {
            last = now;
            if members.messages.send(Message::Beat).is_err() {
                return;
            }
        }
    }
}

fn health_words(health: &Health) -> (&'static str, Option<String>) {
    match health {
        Health::Healthy => ("healthy", None),
        Health::Degraded(reason) => ("degraded", Some(reason.clone())),
        Health::Unhealthy(reason) => ("unhealthy", Some(reason.clone())),
    }
}

/// The heartbeat thread's state.
struct Heart {
    link: Link,
    client: Option<Client>,
    me: roster::Me,
    heartbeat: Duration,
    state: Arc<InstanceState>,
    live: watch::Receiver<Settings>,
    registered: bool,
    /// Our open sockets at recent heartbeats: Slack may still count one closed lately.
    recent_sockets: VecDeque<(Instant, u32)>,
    /// The trouble last logged, so that each cause is said once.
    trouble: Option<Trouble>,
}

impl Heart {
    fn new(cluster: &Cluster, state: Arc<InstanceState>, live: watch::Receiver<Settings>) -> Heart {
        state.update(|s| {
            s.cluster = Some(ClusterView {
                name: cluster.name.clone(),
                store: cluster.store_description.clone(),
                member: cluster.member.clone(),
                members: Vec::new(),
                read_at: None,
                trouble: None,
            });
        });
        Heart {
            link: Link::new(cluster),
            client: None,
            me: roster::Me {
                cluster: cluster.name.clone(),
                name: cluster.member.clone(),
                host: state.instance.host.clone(),
                pid: i32::try_from(state.instance.pid).unwrap_or(i32::MAX),
                version: state.instance.version.to_owned(),
                lease_secs: cluster.lease.as_secs_f64(),
                max_members: cluster.max_members,
            },
            heartbeat: cluster.heartbeat,
            state,
            live,
            registered: false,
            recent_sockets: VecDeque::new(),
            trouble: None,
        }
    }

    fn run(&mut self, messages: &mpsc::Receiver<Message>) {
        let mut next = Instant::now() + self.heartbeat;
        loop {
            match messages.recv_timeout(next.saturating_duration_since(Instant::now())) {
                Ok(Message::Beat) => self.beat(),
                Ok(Message::Refresh(done)) => {
                    self.beat();
                    let _ = done.send(());
                }
                Ok(Message::Leave(done)) => {
                    self.leave();
                    let _ = done.send(());
                    return;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.beat();
                    next = Instant::now() + self.heartbeat;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// The first registration: refused if the cluster has no room. A store that cannot
    /// be reached is not a refusal: registering is tried again at each heartbeat.
    fn register(&mut self) -> Result<(), JoinError> {
        let beat = self.describe();
        let me = self.me.clone();
        let result = match self.connected() {
            Ok(client) => match roster::register(client, &me, &beat) {
                Ok(members) => Ok(members),
                Err(roster::RegisterError::Refused(refused)) => Err(JoinError::Refused(refused)),
                Err(roster::RegisterError::Sql(error)) => {
                    Err(JoinError::Store(self.link.error(&error)))
                }
            },
            Err(error) => Err(error),
        };
        match result {
            Ok(members) => {
                self.registered = true;
                tracing::info!(
                    cluster = %self.me.cluster,
                    member = %self.me.name,
                    "joined the cluster"
                );
                self.seen(members, Vec::new());
                Ok(())
            }
            Err(JoinError::Store(error))
                if matches!(error.trouble, Trouble::Unreachable | Trouble::Io) =>
            {
                self.failed(&error);
                Ok(())
            }
            Err(error) => Err(error),
        }
    }

    fn connected(&mut self) -> Result<&mut Client, JoinError> {
        if self.client.as_ref().is_some_and(Client::is_closed) {
            self.client = None;
        }
        if self.client.is_none() {
            self.client = Some(self.link.connect().map_err(JoinError::Store)?);
        }
        Ok(self.client.as_mut().expect("connected just above"))
    }

    fn beat(&mut self) {
        if !self.registered {
            match self.register() {
                Ok(()) => {}
                // Serving already (the store was away at the start): said, not fatal.
                Err(JoinError::Refused(refused)) => {
                    tracing::error!(%refused, "the cluster has no room for this member");
                }
                Err(JoinError::Store(error)) => self.failed(&error),
            }
            return;
        }
        let beat = self.describe();
        let me = self.me.clone();
        let result = match self.connected() {
            Ok(client) => roster::heartbeat(client, &me, &beat).map_err(|error| {
                let lost = connection_lost(&error);
                (self.link.error(&error), lost)
            }),
            Err(JoinError::Store(error)) => Err((error, false)),
            Err(JoinError::Refused(_)) => unreachable!("connecting refuses nothing"),
        };
        match result {
            Ok(seen) => self.seen(seen.members, seen.gone),
            Err((error, lost)) => {
                if lost {
                    self.client = None;
                }
                self.failed(&error);
            }
        }
    }

    /// This member as the next heartbeat describes it.
    fn describe(&mut self) -> roster::Beat {
        let status = self.state.status();
        let (wanted, grace, budget) = {
            let live = self.live.borrow();
            (
                live.connection.sockets,
                live.conflicts.own_socket_grace,
                live.service.outage_budget,
            )
        };
        let now = Instant::now();
        self.recent_sockets.push_back((now, status.sockets_open));
        while self
            .recent_sockets
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) > grace)
        {
            self.recent_sockets.pop_front();
        }
        let wanted = u32::try_from(wanted).unwrap_or(u32::MAX);
        // Slack still counts a socket closed a moment ago; and while connecting, one it
        // counts already may not have said hello yet. Once connected, only what is (or
        // just was) open: a stranger is not hidden behind a member's allowance.
        let connecting = matches!(
            status.phase,
            Phase::Starting | Phase::Connecting | Phase::Reconnecting { .. }
        );
        let counted = self
            .recent_sockets
            .iter()
            .map(|(_, open)| *open)
            .max()
            .unwrap_or(0)
            .max(if connecting { wanted } else { 0 })
            // During a handover our row stands for the predecessor's sockets too.
            + self.state.predecessor_sockets.load(Ordering::Relaxed);
        let (health, health_reason) =
            health_words(&health::evaluate(&status, budget, SystemTime::now()));
        let int = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
        roster::Beat {
            sockets: int(status.sockets_open),
            sockets_wanted: int(wanted),
            sockets_counted: int(counted),
            health,
            health_reason,
        }
    }

    /// A successful read of the members: the view, the others' sockets, who came and went.
    fn seen(&mut self, members: Vec<Member>, gone: Vec<Member>) {
        if self.trouble.take().is_some() {
            tracing::info!("cluster heartbeats work again");
        }
        for member in &gone {
            tracing::warn!(
                member = %member.name,
                host = %member.host,
                pid = member.pid,
                silent_s = member.heartbeat_age.as_secs(),
                "a member stopped heartbeating longer than the lease ago: counted as gone"
            );
        }
        let others: u32 = members
            .iter()
            .filter(|m| m.name != self.me.name)
            .map(|m| m.sockets_counted)
            .sum();
        self.state.member_sockets.store(others, Ordering::Relaxed);
        let before: BTreeSet<String> = self
            .state
            .status()
            .cluster
            .map(|view| view.members.into_iter().map(|m| m.name).collect())
            .unwrap_or_default();
        let now: BTreeSet<String> = members.iter().map(|m| m.name.clone()).collect();
        if now != before {
            tracing::info!(
                members = ?now.iter().collect::<Vec<_>>(),
                joined = ?now.difference(&before).collect::<Vec<_>>(),
                left = ?before.difference(&now).collect::<Vec<_>>(),
                "cluster members changed"
            );
        }
        self.state.update(|s| {
            if let Some(view) = &mut s.cluster {
                view.members = members;
                view.read_at = Some(SystemTime::now());
                view.trouble = None;
            }
        });
    }

    fn failed(&mut self, error: &InboxError) {
        if self.trouble != Some(error.trouble) {
            tracing::warn!(
                %error,
                "cluster heartbeats fail: this member's place and its view of the others are kept as they were until they work again"
            );
            self.trouble = Some(error.trouble);
        }
        let trouble = format!("cluster heartbeats fail: {}", error.trouble);
        self.state.update(|s| {
            if let Some(view) = &mut s.cluster {
                view.trouble = Some(trouble);
            }
        });
    }

    fn leave(&mut self) {
        if !self.registered {
            return;
        }
        let me = self.me.clone();
        match self.connected() {
            Ok(client) => match roster::leave(client, &me) {
                Ok(_) => tracing::info!(member = %me.name, "left the cluster"),
                Err(error) => {
                    tracing::warn!(%error, "cannot leave the cluster: the others count this member as gone after the lease")
                }
            },
            Err(error) => {
                tracing::warn!(%error, "cannot leave the cluster: the others count this member as gone after the lease")
            }
        }
    }
}
