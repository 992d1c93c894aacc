//! `[cluster]`: members on separate runtime and state directories, one app token, one
//! simulator spreading envelopes over their sockets, one real PostgreSQL started by the
//! test. Each acked event reaches the app once, whichever member received it, through a
//! member's kill -9 and restart, another's handover and a restart of PostgreSQL, and the
//! app always has an open socket.

use std::collections::HashSet;
use std::time::{Duration, SystemTime};

use flowcoach::config::ClusterSettings;
use flowcoach::inbox::postgres::PostgresStore;
use flowcoach::inbox::{Applied, Change, NewEnvelope, Settlement, Store};
use flowcoach_harness::lost_commit::LostCommits;
use flowcoach_harness::postgres::{self, Postgres};
use flowcoach_harness::process::{self, Strays};
use flowcoach_harness::{APP, Daemon, WAIT, acked, ctl, event, simulator, slash};
use flowcoach_sim::{CloseKind, LoadMix, LoadSpec, Simulator};
use nix::sys::signal::Signal;
use tokio::net::TcpListener;

use crate::forward::{App, Reply, SECRET, config, flowcoach_check, vacant_address};
use crate::handover::{acks_beyond, exited, handed_to};
use crate::inbox::{acked_count, app_on, every_acked_event_reached_the_app_once};

/// Retries fast enough for a test.
const INBOX: &str = "[inbox]\nretry_initial = \"50ms\"\nretry_max = \"500ms\"\n";

/// One member: a host of its own (runtime and state directories).
struct Member {
    dir: tempfile::TempDir,
    name: String,
}

impl Member {
    fn new(name: &str) -> Member {
        Member {
            dir: tempfile::tempdir().unwrap(),
            name: name.to_owned(),
        }
    }

    /// flowcoach forwarding to `url` (`extra` may add per-kind URLs), a member of the
    /// cluster `it` in `pg` over TCP, with the password in `PGPASSWORD`.
    fn start(&self, sim: &Simulator, pg: &Postgres, url: &str, lease: &str, extra: &str) -> Daemon {
        self.launch(sim, &self.config(&pg.tcp_url(), url, lease, extra))
    }

    /// What [`Member::start`] runs with, the store at `store`.
    fn config(&self, store: &str, url: &str, lease: &str, extra: &str) -> String {
        let cluster = self.cluster(store, &format!("lease = \"{lease}\""));
        config(url, &format!("{extra}\n{INBOX}{cluster}"))
    }

    /// `[cluster]` for this member of the cluster `it` in the store at `store`, with
    /// `extra` keys.
    fn cluster(&self, store: &str, extra: &str) -> String {
        format!(
            "[cluster]\nstore = \"{store}\"\nname = \"it\"\nmember = \"{}\"\n{extra}\n",
            self.name
        )
    }

    /// flowcoach with `config_text` on this member's runtime and state directories, the
    /// password in `PGPASSWORD`.
    fn launch(&self, sim: &Simulator, config_text: &str) -> Daemon {
        self.launch_args(sim, config_text, &[])
    }

    /// [`Member::launch`] with these arguments (`--takeover`).
    fn launch_args(&self, sim: &Simulator, config_text: &str, args: &[&str]) -> Daemon {
        let dir = self.dir.path().display().to_string();
        Daemon::start_args(
            sim,
            config_text,
            &[
                ("FLOWCOACH_RUNTIME_DIR", dir.as_str()),
                ("SLACK_SIGNING_SECRET", SECRET),
                ("PGPASSWORD", postgres::PASSWORD),
            ],
            args,
        )
    }
}

fn load(count: u64) -> LoadSpec {
    LoadSpec {
        count,
        rate_per_sec: Some(500.0),
        max_outstanding: None,
        mix: LoadMix::EventsOnly,
    }
}

fn store_of(pg: &Postgres, member: &str, lease: Duration) -> PostgresStore {
    store_in(pg, "store-test", member, lease)
}

fn store_in(pg: &Postgres, cluster: &str, member: &str, lease: Duration) -> PostgresStore {
    let cluster = ClusterSettings {
        store: pg.socket_url(),
        name: cluster.to_owned(),
        member: Some(member.to_owned()),
        max_members: 3,
        lease,
        heartbeat: None,
        password_file: None,
    }
    .validate(&[])
    .unwrap();
    let (store, connected) = PostgresStore::open(&cluster);
    connected.unwrap();
    store
}

fn accept(key: &str) -> Change {
    Change::Accept(NewEnvelope {
        envelope_id: format!("env-{key}"),
        kind: flowcoach_protocol::EnvelopeKind::EventsApi,
        event_type: Some("message".into()),
        dedup_key: key.into(),
        body: format!("{{\"envelope_id\":\"env-{key}\"}}"),
        received_at: SystemTime::now(),
    })
}

fn fresh(applied: &[Applied]) -> Vec<bool> {
    applied
        .iter()
        .map(|a| match a {
            Applied::Accepted { fresh } => *fresh,
            other => panic!("not an accept: {other:?}"),
        })
        .collect()
}

fn claim(store: &mut PostgresStore, limit: usize) -> Vec<i64> {
    let applied = store
        .apply(&[Change::Claim {
            limit,
            probe: false,
            now: SystemTime::now(),
        }])
        .unwrap();
    match &applied[..] {
        [Applied::Claimed(due)] => due.iter().map(|d| d.id).collect(),
        other => panic!("not a claim: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_store_dedups_across_members_claims_once_and_frees_a_dead_members_claims_after_its_lease()
 {
    if !postgres::runnable("cluster store") {
        return;
    }
    let pg = Postgres::start().await;
    let lease = Duration::from_secs(3);
    tokio::task::spawn_blocking(move || {
        let mut a = store_of(&pg, "a", lease);
        let mut b = store_of(&pg, "b", lease);
        // One insert wins, across members and within a batch.
        assert_eq!(
            fresh(
                &a.apply(&[accept("k1"), accept("k2"), accept("k1")])
                    .unwrap()
            ),
            [true, true, false]
        );
        assert_eq!(
            fresh(&b.apply(&[accept("k2"), accept("k3")]).unwrap()),
            [false, true]
        );
        // Two members accepting the same keys at once, in opposite orders: each key is
        // kept once, and neither transaction fails (no deadlock).
        let keys: Vec<String> = (0..400).map(|i| format!("race-{i:03}")).collect();
        let racers: Vec<_> = [false, true]
            .into_iter()
            .map(|reversed| {
                let mut keys = keys.clone();
                if reversed {
                    keys.reverse();
                }
                let mut store = store_of(&pg, if reversed { "b" } else { "a" }, lease);
                std::thread::spawn(move || {
                    let mut kept = 0;
                    for batch in keys.chunks(40) {
                        let changes: Vec<Change> = batch.iter().map(|k| accept(k)).collect();
                        kept += fresh(&store.apply(&changes).unwrap())
                            .into_iter()
                            .filter(|f| *f)
                            .count();
                    }
                    kept
                })
            })
            .collect();
        let kept: usize = racers.into_iter().map(|r| r.join().unwrap()).sum();
        assert_eq!(kept, keys.len());
        let counts = b.counts().unwrap();
        assert_eq!(counts.pending, 3 + 400);

        // Claims are exclusive: what one member holds, the other does not get.
        let held_by_b = claim(&mut b, 401);
        assert_eq!(held_by_b.len(), 401);
        let held_by_a = claim(&mut a, 1000);
        assert_eq!(held_by_a.len(), 2);
        assert!(held_by_b.iter().all(|id| !held_by_a.contains(id)));
        let settled: Vec<Change> = held_by_b
            .iter()
            .map(|id| Change::Settle {
                id: *id,
                settlement: Settlement::Delivered,
            })
            .collect();
        b.apply(&settled).unwrap();
        // `a` dies holding its two: they stay its own until the lease runs out…
        drop(a);
        assert_eq!(claim(&mut b, 10), Vec::<i64>::new());
        // …then they are b's (bounded wait: the lease is 3 s).
        let deadline = std::time::Instant::now() + WAIT;
        let taken = loop {
            let taken = claim(&mut b, 10);
            if !taken.is_empty() || std::time::Instant::now() >= deadline {
                break taken;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        assert_eq!(
            taken.iter().collect::<HashSet<_>>(),
            held_by_a.iter().collect()
        );
        // Another cluster in the same database sees none of it.
        let mut other = store_in(&pg, "another", "a", lease);
        assert_eq!(other.counts().unwrap(), Default::default());
        assert_eq!(claim(&mut other, 10), Vec::<i64>::new());
        drop(pg);
    })
    .await
    .unwrap();
}

/// `flowcoachctl handover` on `member`'s control socket; the successor's pid, once the
/// incumbent has exited 0.
async fn hand_over(member: &Member, incumbent: &mut Daemon) -> u32 {
    let socket = member.dir.path().join(format!("{APP}.test.sock"));
    let socket = socket.display().to_string();
    let output = ctl::run(&["--socket", &socket, "--timeout", "30s", "handover"], &[]).await;
    let successor = handed_to(&output);
    assert_eq!(exited(incumbent).await, 0, "{}", incumbent.stderr());
    successor
}

/// The scenario: three members under 500 events/s; one is killed (kill -9) and
/// started again, another hands over to a successor, PostgreSQL stops and starts again.
/// Every event the simulator saw acked reaches the app exactly once, the app always had
/// an open socket, and no member was ever refused with `too_many_websockets`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_members_through_a_kill_9_a_restart_a_handover_and_a_postgresql_restart_deliver_each_event_once()
 {
    if !postgres::runnable("cluster scenario") {
        return;
    }
    let mut pg = Postgres::start().await;
    let sim = simulator(|_| {}).await;
    // The app is down while a member dies: a delivery under way at a kill -9 may have
    // reached the app unrecorded (that is at-least-once, as everywhere); this way every
    // event acked meanwhile waits in the shared store instead. The lease outlasts the
    // PostgreSQL restart, so no claim moves to another member while its delivery's
    // outcome waits to be stored; and it is short, for a claim whose commit PostgreSQL's
    // stop cut off unanswered is taken up again only when the lease runs out.
    let (addr, url) = vacant_address().await;
    const LEASE: &str = "5s";
    let members: Vec<Member> = ["m1", "m2", "m3"].map(Member::new).into();
    let mut daemons = start_connected(&members, &sim, &pg, &url, LEASE, "").await;
    let mut strays = Strays::default();
    // More than the scenario needs: stopped once it is over.
    let stream = sim.start_load(APP, load(500 * 600));
    let mut acks = acks_beyond(&sim, 0, 1000).await;

    // m1 dies without a word; what it had not acked, Slack gives to the others.
    daemons[0].signal(Signal::SIGKILL);
    daemons[0].exit_code().await;
    acks = acks_beyond(&sim, acks, 1000).await;
    // …and comes back under the same name, releasing what it had claimed.
    daemons[0] = members[0].start(&sim, &pg, &url, LEASE, "");
    sim.wait_until(WAIT, |r| r.hellos() >= 4)
        .await
        .unwrap_or_else(|e| panic!("m1 did not connect again: {e}\n{}", daemons[0].stderr()));
    acks = acks_beyond(&sim, acks, 1000).await;

    // The app comes up: the backlog and the stream flow to it from every member.
    let app = app_on(addr).await;
    app.wait_seen(1000).await;

    // m2 hands over to a successor of its own (same host, same member name).
    let successor = hand_over(&members[1], &mut daemons[1]).await;
    strays.add(successor);
    acks = acks_beyond(&sim, acks, 1000).await;

    // PostgreSQL goes away (the members notice) and comes back.
    pg.stop().await;
    daemons[2]
        .wait_log("inbox cannot write", |l| {
            l["cause"] == "the shared store cannot be reached"
        })
        .await;
    pg.restart().await;
    acks = acks_beyond(&sim, acks, 1000).await;
    stream.abort();

    every_acked_event_reached_the_app_once(&sim, &app).await;
    let record = sim.record();
    assert!(acks >= 5000, "{record}");
    assert_eq!(
        record.zero_open_stretches(APP),
        0,
        "the app had no open socket at some point:\n{record}"
    );
    let refused: Vec<_> = record
        .sockets
        .iter()
        .filter(|s| s.close == Some(CloseKind::TooManyWebsockets))
        .map(|s| s.id)
        .collect();
    assert!(
        refused.is_empty(),
        "too_many_websockets on {refused:?}:\n{record}"
    );
    // The simulator spread the stream over every member's socket.
    let acking: HashSet<_> = record
        .envelopes
        .iter()
        .filter_map(|e| e.ack_socket)
        .collect();
    assert!(acking.len() >= 3, "acks came from {acking:?}");

    process::signal(successor, Signal::SIGTERM);
    strays.gone(successor, WAIT).await.unwrap();
    daemons.remove(1);
    for daemon in &mut daemons {
        daemon.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_restart_acks_nothing_uncommitted_and_slash_commands_are_still_answered() {
    if !postgres::runnable("cluster PostgreSQL restart") {
        return;
    }
    let mut pg = Postgres::start().await;
    let sim = simulator(|_| {}).await;
    let app = App::start_on(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        Reply::Ok("text/plain", String::new()),
    );
    // Slash commands to an app of their own, so the events' app counts events only.
    let commands = App::start_on(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        Reply::Ok("application/json", "{\"text\":\"pong\"}".to_owned()),
    );
    let extra = format!("commands_url = \"{}\"", commands.url());
    let members: Vec<Member> = ["m1", "m2"].map(Member::new).into();
    let mut daemons = start_connected(&members, &sim, &pg, &app.url(), "5s", &extra).await;
    let stream = sim.start_load(APP, load(3000));
    sim.wait_until(WAIT, |r| acked_count(r) >= 500)
        .await
        .unwrap_or_else(|e| panic!("the stream stalled: {e}"));
    pg.stop().await;
    // Down: no commit, so no ack (the count at the end proves it: every acked event
    // reaches the app); yet a slash command needs no store.
    for daemon in &mut daemons {
        daemon
            .wait_log("inbox cannot write", |l| {
                l["cause"] == "the shared store cannot be reached"
            })
            .await;
    }
    let answered = acked(&sim, slash("ping")).await;
    assert_eq!(
        answered.ack_payload.as_ref().map(|p| p["text"].clone()),
        Some("pong".into()),
        "{answered:?}"
    );
    // The store comes back by itself (a restart, a failover): degraded, not unhealthy.
    for daemon in &daemons {
        let status = daemon.status_json().await;
        assert_eq!(status["health"]["health"], "degraded", "{status}");
        assert!(
            status["health"]["reason"]
                .as_str()
                .unwrap()
                .contains("the shared store cannot be reached"),
            "{status}"
        );
    }
    pg.restart().await;
    for daemon in &mut daemons {
        daemon.wait_log("inbox writes again", |_| true).await;
    }
    stream.await.unwrap();
    every_acked_event_reached_the_app_once(&sim, &app).await;
    for daemon in &mut daemons {
        daemon.stop().await;
    }
}

/// PostgreSQL commits a claim but its answer is lost with the connection: the member
/// does not know the envelope is marked as its own, and its heartbeat would renew that
/// claim for ever. It releases the claim once the store answers again, and delivers the
/// envelope long before the lease (far beyond the test's wait) could run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_commit_answer_is_lost_is_released_and_delivered_once() {
    if !postgres::runnable("cluster lost claim") {
        return;
    }
    let pg = Postgres::start().await;
    let proxy = LostCommits::start(&pg).await;
    let sim = simulator(|_| {}).await;
    let app = App::start_on(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        Reply::Ok("text/plain", String::new()),
    );
    let member = Member::new("m1");
    let lease = "600s";
    let mut daemon = member.launch(&sim, &member.config(&proxy.url(), &app.url(), lease, ""));
    sim.wait_until(WAIT, |r| r.hellos() >= 1)
        .await
        .unwrap_or_else(|e| panic!("no connection: {e}\n{}", daemon.stderr()));
    // Delivery works through the proxy.
    acked(&sim, event("Ev-before", "before")).await;
    app.wait_seen(1).await;

    proxy.arm(1);
    acked(&sim, event("Ev-lost", "its claim's answer is lost")).await;
    app.wait_seen(2).await;
    assert_eq!(proxy.lost(), 1, "no claim's commit was lost");
    daemon
        .wait_log("inbox cannot write", |l| {
            l["cause"] == "the shared store cannot be reached"
        })
        .await;
    every_acked_event_reached_the_app_once(&sim, &app).await;
    daemon.stop().await;
}

/// Every one of `members` started against `pg`, each with a connection to Slack.
async fn start_connected(
    members: &[Member],
    sim: &Simulator,
    pg: &Postgres,
    url: &str,
    lease: &str,
    extra: &str,
) -> Vec<Daemon> {
    let before = sim.record().hellos();
    let daemons: Vec<Daemon> = members
        .iter()
        .map(|m| m.start(sim, pg, url, lease, extra))
        .collect();
    sim.wait_until(WAIT, |r| r.hellos() >= before + members.len())
        .await
        .unwrap_or_else(|e| panic!("not every member connected: {e}\n{}", daemons[0].stderr()));
    daemons
}

/// The members' names in a `status --json` report, as listed.
fn member_names(status: &serde_json::Value) -> Vec<String> {
    status["cluster"]["members"]
        .as_array()
        .unwrap_or_else(|| panic!("no members in {status}"))
        .iter()
        .map(|m| m["name"].as_str().unwrap().to_owned())
        .collect()
}

/// The set of names as a member logs it (`cluster members changed`).
fn logged(names: &[&str]) -> String {
    format!("{names:?}")
}

/// `status --json` once it satisfies `pred`: views change at heartbeats (bounded wait).
async fn status_until(
    daemon: &Daemon,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = daemon.status_json().await;
        if pred(&status) {
            return status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "status never came to it within {WAIT:?}: {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn health_text(daemon: &Daemon) -> String {
    let dir = daemon.runtime_dir.display().to_string();
    let output =
        flowcoach_harness::ctl::run(&["health"], &[("FLOWCOACH_RUNTIME_DIR", dir.as_str())]).await;
    String::from_utf8_lossy(&output.stdout).into_owned() + &String::from_utf8_lossy(&output.stderr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_member_lists_the_same_members_and_a_killed_one_is_gone_after_the_lease() {
    if !postgres::runnable("cluster membership") {
        return;
    }
    let pg = Postgres::start().await;
    let sim = simulator(|_| {}).await;
    let (_, url) = vacant_address().await;
    let members: Vec<Member> = ["m1", "m2", "m3"].map(Member::new).into();
    let mut daemons = start_connected(&members, &sim, &pg, &url, "2s", "").await;
    let all = logged(&["m1", "m2", "m3"]);
    for daemon in &mut daemons {
        daemon
            .wait_log("cluster members changed", |l| l["members"] == all.as_str())
            .await;
    }
    // `status --json` on each member: the same members, with what each is.
    for daemon in &daemons {
        let status = status_until(daemon, |status| {
            status["cluster"]["members"]
                .as_array()
                .is_some_and(|members| {
                    members
                        .iter()
                        .all(|m| m["sockets"] == 1 && m["health"] == "healthy")
                })
        })
        .await;
        assert_eq!(member_names(&status), ["m1", "m2", "m3"], "{status}");
        let cluster = &status["cluster"];
        assert_eq!(cluster["name"], "it");
        // Where the store is, never its password.
        let store = cluster["store"].as_str().unwrap();
        assert!(pg.tcp_url().starts_with(store), "{status}");
        assert!(!status.to_string().contains(postgres::PASSWORD), "{status}");
        for (member, owner) in cluster["members"].as_array().unwrap().iter().zip(&daemons) {
            assert_eq!(member["pid"], owner.pid(), "{member}");
            assert!(member["host"].as_str().is_some_and(|h| !h.is_empty()));
            assert!(
                member["heartbeat_age_ms"].as_u64().unwrap() < 2000,
                "{member}"
            );
        }
    }
    let text = flowcoach_harness::ctl::run(
        &["status"],
        &[(
            "FLOWCOACH_RUNTIME_DIR",
            members[1].dir.path().to_str().unwrap(),
        )],
    )
    .await;
    let text = String::from_utf8_lossy(&text.stdout).into_owned();
    assert!(text.contains("cluster:      it on postgres://"), "{text}");
    assert!(text.contains("as m2, 3 members"), "{text}");
    assert!(!text.contains(postgres::PASSWORD), "{text}");

    // kill -9: no goodbye; the others count it as gone once its lease ran out.
    daemons[0].signal(Signal::SIGKILL);
    daemons[0].exit_code().await;
    let rest = logged(&["m2", "m3"]);
    for daemon in &mut daemons[1..] {
        daemon
            .wait_log("cluster members changed", |l| {
                l["members"] == rest.as_str() && l["left"] == logged(&["m1"]).as_str()
            })
            .await;
        assert_eq!(member_names(&daemon.status_json().await), ["m2", "m3"]);
    }
    // Whichever member noticed first said so, naming it.
    let gone: usize = daemons[1..]
        .iter()
        .map(|d| {
            d.count_by("a member stopped heartbeating", "member")
                .get("m1")
                .copied()
                .unwrap_or(0)
        })
        .sum();
    assert!(gone >= 1, "{}", daemons[1].stderr());

    // A clean stop leaves at once: no wait for the lease.
    daemons[1].stop().await;
    daemons[2]
        .wait_log("cluster members changed", |l| {
            l["members"] == logged(&["m3"]).as_str()
        })
        .await;
    daemons[2].stop().await;
    assert_eq!(pg.psql("SELECT count(*) FROM flowcoach_members").await, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_not_other_clients_but_a_stranger_with_the_same_token_is() {
    if !postgres::runnable("cluster other clients") {
        return;
    }
    let pg = Postgres::start().await;
    let sim = simulator(|_| {}).await;
    let (_, url) = vacant_address().await;
    let members: Vec<Member> = ["m1", "m2", "m3"].map(Member::new).into();
    let mut daemons = start_connected(&members, &sim, &pg, &url, "5s", "").await;
    let all = logged(&["m1", "m2", "m3"]);
    for daemon in &mut daemons {
        daemon
            .wait_log("cluster members changed", |l| l["members"] == all.as_str())
            .await;
    }
    // Slack counted the other members' sockets (the last to connect saw all three), and
    // no member took them for another client's.
    let mut counted = Vec::new();
    for daemon in &daemons {
        counted.push(daemon.status_json().await["num_connections"].clone());
        assert!(
            !daemon.stderr().contains("belong to another client"),
            "{}",
            daemon.stderr()
        );
        let health = health_text(daemon).await;
        assert!(!health.contains("another client"), "{health}");
    }
    assert!(counted.contains(&serde_json::json!(3)), "{counted:?}");

    for daemon in &mut daemons {
        daemon.stop().await;
    }

    // A stranger: the same token, no member of the cluster. Members connecting one after
    // the other each find it in Slack's count, and nobody else.
    let mut stranger = Daemon::start(&sim, "");
    sim.wait_until(WAIT, |r| r.hellos() >= 4)
        .await
        .unwrap_or_else(|e| panic!("the stranger did not connect: {e}"));
    let mut daemons = Vec::new();
    for (i, member) in members.iter().enumerate() {
        let mut daemon = member.start(&sim, &pg, &url, "5s", "");
        let said = daemon.wait_log("Slack counts", |_| true).await;
        assert_eq!(said["others"], 1, "{said}");
        assert_eq!(said["num_connections"], i + 2, "{said}");
        let health = health_text(&daemon).await;
        assert!(health.contains("another client"), "{health}");
        daemons.push(daemon);
    }
    stranger.stop().await;
    for daemon in &mut daemons {
        daemon.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_beyond_max_members_or_the_socket_budget_is_refused_with_69() {
    if !postgres::runnable("cluster budget") {
        return;
    }
    let pg = Postgres::start().await;
    let sim = simulator(|_| {}).await;
    let (_, url) = vacant_address().await;
    // Two sockets each: 2·2 + 2·2 while rotating, 2 more in a handover = Slack's 10.
    let two_sockets = |m: &Member| {
        format!(
            "{}\n[forward]\nurl = \"{url}\"\n{INBOX}{}",
            flowcoach_harness::fast_config_with(&[("sockets", "2")]),
            m.cluster(&pg.tcp_url(), "max_members = 3\nlease = \"5s\"")
        )
    };
    let members: Vec<Member> = ["m1", "m2", "m3"].map(Member::new).into();
    let mut daemons: Vec<Daemon> = members[..2]
        .iter()
        .map(|m| m.launch(&sim, &two_sockets(m)))
        .collect();
    sim.wait_until(WAIT, |r| r.hellos() >= 4)
        .await
        .unwrap_or_else(|e| panic!("not every member connected: {e}\n{}", daemons[0].stderr()));
    let mut third = members[2].launch(&sim, &two_sockets(&members[2]));
    assert_eq!(third.exit_code().await, 69, "{}", third.stderr());
    let said = third.stderr();
    assert!(
        said.contains("cluster it would need up to 14 sockets with this member (m3), over Slack's limit of 10 per app"),
        "{said}"
    );
    assert!(said.contains("m1 on ") && said.contains("m2 on "), "{said}");

    // One socket would fit the sockets, but not cluster.max_members = 2.
    let one_socket = config(
        &url,
        &format!(
            "{INBOX}{}",
            members[2].cluster(&pg.tcp_url(), "max_members = 2\nlease = \"5s\"")
        ),
    );
    let mut fourth = members[2].launch(&sim, &one_socket);
    assert_eq!(fourth.exit_code().await, 69, "{}", fourth.stderr());
    assert!(
        fourth
            .stderr()
            .contains("cluster it already has 2 live members, its cluster.max_members"),
        "{}",
        fourth.stderr()
    );
    // Refused before connecting: Slack never saw a socket of theirs.
    assert_eq!(sim.record().hellos(), 4);
    for daemon in &mut daemons {
        daemon.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_delivery_keeps_its_claim_past_the_lease() {
    if !postgres::runnable("cluster claim renewal") {
        return;
    }
    let pg = Postgres::start().await;
    let sim = simulator(|_| {}).await;
    // The app takes four leases to answer: without renewal another member would take
    // the envelope after one and deliver it again.
    let app = App::start_on(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        Reply::Slow(
            Duration::from_secs(4),
            Box::new(Reply::Ok("text/plain", String::new())),
        ),
    );
    let members: Vec<Member> = ["m1", "m2"].map(Member::new).into();
    let mut daemons =
        start_connected(&members, &sim, &pg, &app.url(), "1s", "timeout = \"10s\"").await;
    acked(&sim, flowcoach_harness::event("EvSlowOne", "slow")).await;
    app.wait_seen(1).await;
    // Bounded: until one member counts the delivery as done.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let mut forwarded = 0;
        for daemon in &daemons {
            forwarded += daemon.status_json().await["counters"]["forwarded"]
                .as_u64()
                .unwrap();
        }
        if forwarded >= 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the delivery never ended"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(app.seen().len(), 1, "delivered twice");
    assert_eq!(
        pg.psql("SELECT count(*) FROM flowcoach_envelopes").await,
        "0"
    );
    for daemon in &mut daemons {
        daemon.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_schema_is_upgraded_in_place_and_a_newer_compatible_one_is_used() {
    if !postgres::runnable("cluster schema versions") {
        return;
    }
    let pg = Postgres::start().await;
    // What the first release with [cluster] created (schema version 1).
    pg.psql(
        "CREATE TABLE flowcoach_schema (version integer PRIMARY KEY, compatible_from integer NOT NULL,
             applied_at timestamptz NOT NULL DEFAULT now());
         CREATE TABLE flowcoach_members (cluster text NOT NULL, member text NOT NULL,
             sockets integer NOT NULL, health text NOT NULL, heartbeat_at timestamptz NOT NULL,
             PRIMARY KEY (cluster, member));
         CREATE TABLE flowcoach_envelopes (id bigserial PRIMARY KEY, cluster text NOT NULL,
             envelope_id text NOT NULL, kind text NOT NULL, event_type text, dedup_key text NOT NULL,
             payload text NOT NULL, state text NOT NULL, attempts integer NOT NULL DEFAULT 0,
             next_attempt_at bigint NOT NULL, last_error text, received_at bigint NOT NULL,
             received_by text NOT NULL, claimed_by text, claimed_until timestamptz);
         CREATE TABLE flowcoach_seen_keys (cluster text NOT NULL, dedup_key text NOT NULL,
             seen_at bigint NOT NULL, PRIMARY KEY (cluster, dedup_key));
         INSERT INTO flowcoach_schema (version, compatible_from) VALUES (1, 1);",
    )
    .await;
    let pg = std::sync::Arc::new(pg);
    let shared = pg.clone();
    tokio::task::spawn_blocking(move || {
        let mut store = store_of(&shared, "a", Duration::from_secs(5));
        assert_eq!(fresh(&store.apply(&[accept("k1")]).unwrap()), [true]);
    })
    .await
    .unwrap();
    assert_eq!(
        pg.psql("SELECT string_agg(version || ':' || compatible_from, ',' ORDER BY version) FROM flowcoach_schema")
            .await,
        "1:1,2:1"
    );
    // An older member's statements still work on the new schema: version 1 never
    // touches the members table, and its envelope statements are unchanged.
    assert_eq!(
        pg.psql("SELECT count(*) FROM flowcoach_envelopes WHERE dedup_key = 'k1'")
            .await,
        "1"
    );
    // A newer release that says it works with version 2 is used; one that does not is
    // refused with a sentence.
    pg.psql("INSERT INTO flowcoach_schema (version, compatible_from) VALUES (3, 2)")
        .await;
    let shared = pg.clone();
    tokio::task::spawn_blocking(move || {
        store_of(&shared, "a", Duration::from_secs(5));
    })
    .await
    .unwrap();
    pg.psql("INSERT INTO flowcoach_schema (version, compatible_from) VALUES (4, 3)")
        .await;
    let shared = pg.clone();
    let refused = tokio::task::spawn_blocking(move || {
        let cluster = ClusterSettings {
            store: shared.socket_url(),
            name: "store-test".into(),
            member: Some("a".into()),
            max_members: 3,
            lease: Duration::from_secs(5),
            heartbeat: None,
            password_file: None,
        }
        .validate(&[])
        .unwrap();
        PostgresStore::open(&cluster).1.unwrap_err()
    })
    .await
    .unwrap();
    assert_eq!(refused.trouble, flowcoach::inbox::Trouble::Incompatible);
    assert!(refused.detail.contains("upgrade this member"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_fail_while_postgresql_is_away_and_recover_on_their_own() {
    if !postgres::runnable("cluster heartbeats outage") {
        return;
    }
    let mut pg = Postgres::start().await;
    let sim = simulator(|_| {}).await;
    let (_, url) = vacant_address().await;
    let members: Vec<Member> = ["m1", "m2"].map(Member::new).into();
    let mut daemons: Vec<Daemon> = members
        .iter()
        .map(|m| m.start(&sim, &pg, &url, "5s", ""))
        .collect();
    let both = logged(&["m1", "m2"]);
    for daemon in &mut daemons {
        daemon
            .wait_log("cluster members changed", |l| l["members"] == both.as_str())
            .await;
    }
    pg.stop().await;
    for daemon in &mut daemons {
        daemon.wait_log("cluster heartbeats fail", |_| true).await;
        // Still serving, the last view kept, the trouble said.
        let status = daemon.status_json().await;
        assert_eq!(member_names(&status), ["m1", "m2"], "{status}");
        assert!(
            status["cluster"]["trouble"]
                .as_str()
                .is_some_and(|t| t.contains("cluster heartbeats fail")),
            "{status}"
        );
        assert_eq!(status["phase_name"], "connected", "{status}");
    }
    pg.restart().await;
    for daemon in &mut daemons {
        daemon
            .wait_log("cluster heartbeats work again", |_| true)
            .await;
        let status = status_until(daemon, |s| s["cluster"]["trouble"].is_null()).await;
        assert_eq!(member_names(&status), ["m1", "m2"], "{status}");
    }
    for daemon in &mut daemons {
        daemon.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_handover_keeps_the_members_place_under_the_successors_pid() {
    if !postgres::runnable("cluster handover membership") {
        return;
    }
    let pg = Postgres::start().await;
    let sim = simulator(|_| {}).await;
    let (_, url) = vacant_address().await;
    let members: Vec<Member> = ["m1", "m2"].map(Member::new).into();
    let mut daemons: Vec<Daemon> = members
        .iter()
        .map(|m| m.start(&sim, &pg, &url, "5s", ""))
        .collect();
    let both = logged(&["m1", "m2"]);
    for daemon in &mut daemons {
        daemon
            .wait_log("cluster members changed", |l| l["members"] == both.as_str())
            .await;
    }
    let mut successor = members[0].launch_args(
        &sim,
        &members[0].config(&pg.tcp_url(), &url, "5s", ""),
        &["--takeover"],
    );
    assert_eq!(daemons[0].exit_code().await, 0, "{}", daemons[0].stderr());
    let pid = u64::from(successor.pid().unsigned_abs());
    // m2 sees m1 under its new pid; m1 never left, and nobody was a stranger.
    let status = status_until(&daemons[1], |s| s["cluster"]["members"][0]["pid"] == pid).await;
    assert_eq!(member_names(&status), ["m1", "m2"], "{status}");
    let status = status_until(&successor, |s| s["cluster"]["members"][0]["pid"] == pid).await;
    assert_eq!(member_names(&status), ["m1", "m2"], "{status}");
    for daemon in [&daemons[1], &successor] {
        let changes = daemon.count_by("cluster members changed", "left");
        assert!(
            changes.keys().all(|left| left == "[]"),
            "{changes:?}\n{}",
            daemon.stderr()
        );
        assert!(!daemon.stderr().contains("belong to another client"));
    }
    successor.stop().await;
    daemons[1].stop().await;
    assert_eq!(pg.psql("SELECT count(*) FROM flowcoach_members").await, "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_started_while_postgresql_is_away_serves_and_joins_once_it_is_back() {
    if !postgres::runnable("cluster join later") {
        return;
    }
    let mut pg = Postgres::start().await;
    let sim = simulator(|_| {}).await;
    let (_, url) = vacant_address().await;
    pg.stop().await;
    let member = Member::new("m1");
    let mut daemon = member.start(&sim, &pg, &url, "5s", "");
    sim.wait_until(WAIT, |r| r.hellos() >= 1)
        .await
        .unwrap_or_else(|e| panic!("the member did not connect: {e}\n{}", daemon.stderr()));
    daemon.wait_log("cluster heartbeats fail", |_| true).await;
    let status = daemon.status_json().await;
    assert!(status["cluster"]["trouble"].is_string(), "{status}");
    pg.restart().await;
    daemon.wait_log("joined the cluster", |_| true).await;
    let status = status_until(&daemon, |s| s["cluster"]["trouble"].is_null()).await;
    assert_eq!(member_names(&status), ["m1"], "{status}");
    daemon.stop().await;
}

#[test]
fn check_config_reports_the_cluster_without_its_password_and_refuses_bad_settings() {
    use std::os::unix::fs::PermissionsExt;

    let password = "pg-secret-for-check-config";
    let cluster = "[cluster]\nstore = \"postgres://flowcoach@db.example:5433/flowcoach?sslmode=disable\"\nname = \"prod\"\nmember = \"host-a\"\nlease = \"90s\"\n";
    let (code, text) = flowcoach_check(cluster, &[("PGPASSWORD", password)]);
    assert_eq!(code, 0, "{text}");
    for line in [
        "cluster:      prod (this member: host-a, at most 3 members)",
        "store:        postgres://flowcoach@db.example:5433/flowcoach",
        "store password: from PGPASSWORD",
        "claim lease:  1m 30s, heartbeat every 30s",
        "inbox:        shared by the cluster's members",
    ] {
        assert!(text.contains(line), "{line:?} in {text}");
    }
    assert!(!text.contains(password), "{text}");

    // The systemd credential, and a unix socket with no password at all.
    let credentials = tempfile::tempdir().unwrap();
    std::fs::write(credentials.path().join("postgres-password"), password).unwrap();
    let (code, text) = flowcoach_check(
        cluster,
        &[(
            "CREDENTIALS_DIRECTORY",
            credentials.path().to_str().unwrap(),
        )],
    );
    assert_eq!(code, 0, "{text}");
    let credential = credentials.path().join("postgres-password");
    assert!(
        text.contains(&format!(
            "store password: from systemd credential {}",
            credential.display()
        )),
        "{text}"
    );
    assert!(!text.contains(password), "{text}");
    let (code, text) = flowcoach_check(
        "[cluster]\nstore = \"postgres:///flowcoach?host=/run/postgresql\"\nmember = \"host-b\"\n",
        &[],
    );
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("store:        postgres:///flowcoach?host=/run/postgresql")
            && text.contains("cluster:      default (this member: host-b")
            && text.contains("store password: none"),
        "{text}"
    );

    // A password file others can read: refused, naming the field, never showing it.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pg-password");
    std::fs::write(&file, password).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let with_file = format!("{cluster}password_file = \"{}\"\n", file.display());
    let (code, text) = flowcoach_check(&with_file, &[]);
    assert_eq!(code, 78, "{text}");
    assert!(text.contains("cluster.password_file"), "{text}");
    assert!(!text.contains(password), "{text}");
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, text) = flowcoach_check(&with_file, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&format!("store password: from file {}", file.display())),
        "{text}"
    );

    let store = |url: &str| format!("[cluster]\nstore = \"{url}\"\nmember = \"a\"\n");
    for (config, field) in [
        (store("postgres://u:hunter2@db/flowcoach"), "cluster.store"),
        (
            store("postgres://db/flowcoach?sslmode=require"),
            "cluster.store",
        ),
        (store("postgres://db"), "cluster.store"),
        (store("not a connection string"), "cluster.store"),
        (
            format!("{}name = \"two words\"\n", store("postgres://db/f")),
            "cluster.name",
        ),
        (
            "[cluster]\nstore = \"postgres://db/f\"\nmember = \"a/b\"\n".to_owned(),
            "cluster.member",
        ),
        (
            format!("{}max_members = 11\n", store("postgres://db/f")),
            "cluster.max_members",
        ),
        (
            format!("{}lease = \"0s\"\n", store("postgres://db/f")),
            "cluster.lease",
        ),
        (
            format!("[inbox]\nenabled = false\n{}", store("postgres://db/f")),
            "inbox.enabled",
        ),
    ] {
        let (code, text) = flowcoach_check(&config, &[]);
        assert_eq!(code, 78, "{config}: {text}");
        assert!(text.contains(field), "{config}: {text}");
        assert!(!text.contains("hunter2"), "{config}: {text}");
    }
}
