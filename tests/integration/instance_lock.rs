//! The instance lock between real processes.
//!
//! The child processes are this test binary itself: run with `FLOWCOACH_LOCK_CHILD=<lock
//! path>`, the `lock_child` test acquires the lock and reports on stdout; without it, that
//! test does nothing. Every wait is bounded, and the events waited for are lines on a
//! child's stdout or the end of it, never sleeps.

use std::cell::Cell;
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::{RwLock, mpsc};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flowcoach::host::lock::{HolderInfo, InstanceLock, LockError, read_holder};

/// Lock path for the child; its presence makes `lock_child` act.
const CHILD_PATH: &str = "FLOWCOACH_LOCK_CHILD";
/// Set: print "ready", wait for stdin to end (the start barrier), then lock and stay alive
/// until killed. Unset: lock at once, then hold until stdin ends.
const CHILD_BARRIER: &str = "FLOWCOACH_LOCK_CHILD_BARRIER";
/// Marks the child's report lines among libtest's own output.
const MARK: &str = "@@lock-child@@ ";
const APP: &str = "A0LOCKTEST1";
const ENVIRONMENT: &str = "prod";
const TIMEOUT: Duration = Duration::from_secs(30);

/// Held shared while a child starts, exclusively by [`close_now`]. A child that another
/// test thread is spawning holds a copy of every descriptor of this process, CLOEXEC or
/// not, until its exec has closed them, which the kernel does after `spawn` has already
/// returned. A child's first report proves it is past that point, so the shared hold lasts
/// from before `spawn` until that report.
static SPAWNING: RwLock<()> = RwLock::new(());

/// Drops `lock` while no child is starting: when this returns, no other process holds a
/// copy of its descriptor and the lock is really released.
fn close_now<T>(lock: T) {
    let _no_spawn = SPAWNING.write().unwrap_or_else(|e| e.into_inner());
    drop(lock);
}

/// The child's side: app [`APP`], environment [`ENVIRONMENT`], and as its control socket
/// the lock path with `.sock`.
#[test]
fn lock_child() {
    let Some(path) = std::env::var_os(CHILD_PATH).map(PathBuf::from) else {
        return;
    };
    let barrier = std::env::var_os(CHILD_BARRIER).is_some();
    let say = |line: &str| {
        let mut out = io::stdout().lock();
        writeln!(out, "{MARK}{line}").unwrap();
        out.flush().unwrap();
    };
    if barrier {
        say("ready");
        io::copy(&mut io::stdin().lock(), &mut io::sink()).unwrap();
    }
    let info = HolderInfo::new(ENVIRONMENT, APP, path.with_extension("sock"));
    let _lock = match InstanceLock::acquire(&path, &info) {
        Ok(lock) => {
            say("locked");
            Some(lock)
        }
        Err(error @ LockError::Held { .. }) => {
            say(&format!("held: {error}"));
            None
        }
        Err(error) => {
            say(&format!("error: {error}"));
            None
        }
    };
    if barrier {
        // Killed by the parent; the sleep only bounds the life of an orphan.
        std::thread::sleep(Duration::from_secs(120));
    } else {
        io::copy(&mut io::stdin().lock(), &mut io::sink()).unwrap();
    }
}

/// A child acquirer; killed and reaped when dropped.
struct Child {
    process: std::process::Child,
    stdin: Option<ChildStdin>,
    /// Report lines, then `None` at the end of stdout.
    reports: mpsc::Receiver<Option<String>>,
    /// The first report, received while starting.
    first: Cell<Option<String>>,
}

impl Child {
    /// Locks at once and holds until its stdin is closed ([`Child::finish`]).
    fn spawn(path: &Path) -> Child {
        Child::start(path, None)
    }

    /// Reports "ready", then waits for `barrier` to end before locking; holds until killed.
    fn spawn_behind(path: &Path, barrier: Stdio) -> Child {
        Child::start(path, Some(barrier))
    }

    fn start(path: &Path, barrier: Option<Stdio>) -> Child {
        let mut command = Command::new(std::env::current_exe().unwrap());
        command
            .args([
                "--exact",
                "instance_lock::lock_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_PATH, path)
            .env_remove(CHILD_BARRIER)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let with_barrier = barrier.is_some();
        match barrier {
            Some(stdin) => command.env(CHILD_BARRIER, "1").stdin(stdin),
            None => command.stdin(Stdio::piped()),
        };
        let starting = SPAWNING.read().unwrap_or_else(|e| e.into_inner());
        let mut process = command.spawn().unwrap();
        let stdout = process.stdout.take().unwrap();
        let (sender, reports) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some((_, report)) = line.split_once(MARK) {
                    let _ = sender.send(Some(report.to_owned()));
                }
            }
            let _ = sender.send(None);
        });
        let stdin = if with_barrier {
            None
        } else {
            process.stdin.take()
        };
        let child = Child {
            process,
            stdin,
            reports,
            first: Cell::new(None),
        };
        child.first.set(Some(child.receive_report()));
        drop(starting);
        child
    }

    fn pid(&self) -> u32 {
        self.process.id()
    }

    fn next_report(&self) -> String {
        self.first.take().unwrap_or_else(|| self.receive_report())
    }

    fn receive_report(&self) -> String {
        match self.reports.recv_timeout(TIMEOUT) {
            Ok(Some(report)) => report,
            Ok(None) => panic!("child {} ended without a report", self.pid()),
            Err(_) => panic!("no report from child {} within {TIMEOUT:?}", self.pid()),
        }
    }

    /// Closes its stdin and reaps it: its descriptors, the lock's included, are closed.
    fn finish(mut self) {
        drop(self.stdin.take());
        match self.reports.recv_timeout(TIMEOUT) {
            Ok(None) => {}
            other => panic!("child {} did not end: {other:?}", self.pid()),
        }
        let status = self.process.wait().unwrap();
        assert!(status.success(), "child {}: {status}", self.pid());
    }

    /// SIGKILL (which cannot be ignored), then reap: once `wait` returns, the kernel has
    /// closed its descriptors.
    fn kill9(mut self) {
        self.process.kill().unwrap();
        self.process.wait().unwrap();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn lock_path(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join(format!("{APP}.prod.pid"))
}

#[test]
fn a_second_acquirer_is_told_who_holds_the_lock() {
    let dir = tempfile::tempdir().unwrap();
    let path = lock_path(&dir);
    let before = now();
    let first = Child::spawn(&path);
    assert_eq!(first.next_report(), "locked");

    let error = InstanceLock::acquire(&path, &HolderInfo::new("prod", APP, "/unused")).unwrap_err();
    let LockError::Held {
        path: held_path,
        holder: Some(holder),
    } = &error
    else {
        panic!("expected Held with a holder, got {error:?}");
    };
    assert_eq!(held_path, &path);
    assert_eq!(holder.pid, first.pid());
    assert_eq!(holder.environment, "prod");
    assert_eq!(holder.app_id, APP);
    assert_eq!(holder.control_socket, path.with_extension("sock"));
    assert!((before..=now()).contains(&holder.started_at), "{holder:?}");
    let since =
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(holder.started_at));
    assert_eq!(
        error.to_string(),
        format!(
            "app {APP} (environment prod) is already held by pid {}, running since {since}; \
             its control socket is {} (lock file {})",
            first.pid(),
            path.with_extension("sock").display(),
            path.display()
        )
    );

    // Another process is told the same.
    let second = Child::spawn(&path);
    let report = second.next_report();
    assert!(
        report.starts_with("held: app ") && report.contains(&format!("pid {},", first.pid())),
        "{report}"
    );
    second.finish();

    // Once the holder has ended, the lock is free again.
    first.finish();
    let lock = InstanceLock::acquire(&path, &HolderInfo::new("prod", APP, "/s")).unwrap();
    assert_eq!(read_holder(lock.path()).unwrap().pid, std::process::id());
}

/// Twenty starters of the lock at `path`, released together; each one's report.
fn twenty_at_once(path: &Path) -> (Vec<Child>, Vec<String>) {
    let (barrier, release) = io::pipe().unwrap();
    let children: Vec<Child> = (0..20)
        .map(|_| Child::spawn_behind(path, Stdio::from(barrier.try_clone().unwrap())))
        .collect();
    drop(barrier);
    for child in &children {
        assert_eq!(child.next_report(), "ready");
    }
    // All twenty are waiting on the same pipe: closing its only writer starts them together.
    drop(release);
    let reports = children.iter().map(Child::next_report).collect();
    (children, reports)
}

#[test]
fn exactly_one_of_twenty_simultaneous_starters_wins() {
    let dir = tempfile::tempdir().unwrap();
    let path = lock_path(&dir);
    let (children, reports) = twenty_at_once(&path);
    let winners: Vec<&Child> = children
        .iter()
        .zip(&reports)
        .filter(|(_, report)| *report == "locked")
        .map(|(child, _)| child)
        .collect();
    let held = reports.iter().filter(|r| r.starts_with("held: ")).count();
    assert_eq!((winners.len(), held), (1, 19), "{reports:#?}");
    assert_eq!(read_holder(&path).unwrap().pid, winners[0].pid());
}

#[test]
fn a_killed_holder_never_blocks_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = lock_path(&dir);
    let holder = Child::spawn(&path);
    assert_eq!(holder.next_report(), "locked");
    let killed_pid = holder.pid();
    holder.kill9();
    // The file still names the killed holder; that is no reason to refuse.
    assert_eq!(read_holder(&path).unwrap().pid, killed_pid);

    let next = Child::spawn(&path);
    assert_eq!(next.next_report(), "locked");
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().next(), Some(next.pid().to_string().as_str()));
    let info = read_holder(&path).unwrap();
    assert_eq!((info.pid, info.environment.as_str()), (next.pid(), "prod"));
}

#[test]
fn a_pid_file_naming_a_live_process_does_not_block_either() {
    // PIDs are reused: a file naming a live process (here pid 1 and ourselves) whose lock
    // nobody holds is stale.
    let dir = tempfile::tempdir().unwrap();
    let path = lock_path(&dir);
    for stale in ["1\n".to_owned(), format!("{}\n", std::process::id())] {
        std::fs::write(&path, &stale).unwrap();
        let child = Child::spawn(&path);
        assert_eq!(child.next_report(), "locked");
        assert_eq!(read_holder(&path).unwrap().pid, child.pid());
        child.finish();
    }
}

/// Someone deletes or renames the lock file while it is held. The path is then free, and a
/// newcomer correctly takes it: it locks a new file, and from then on the path's lock is the
/// newcomer's. (The old holder keeps a lock on an inode that no path leads to: nobody can
/// contend for it, so a third starter is refused by the newcomer, not by the old holder.)
///
/// The race that `acquire`'s fstat/lstat comparison closes is the other way round: a
/// starter opens the file, it is unlinked or replaced before the starter's flock, and the
/// starter then locks the orphaned inode while another process creates and locks a file at
/// the path. Without the check both would run. It cannot be timed from outside a process;
/// the unit test `an_unlinked_or_replaced_inode_is_noticed_after_locking` in
/// `host::lock` drives that interleaving step by step.
#[test]
fn a_deleted_or_renamed_lock_file_leaves_the_path_to_a_newcomer() {
    let dir = tempfile::tempdir().unwrap();
    let path = lock_path(&dir);
    let moved = dir.path().join("moved-away.pid");
    let remove = |path: &Path| std::fs::remove_file(path).unwrap();
    let rename = |path: &Path| std::fs::rename(path, &moved).unwrap();
    for (how, replace) in [("deleted", &remove as &dyn Fn(&Path)), ("renamed", &rename)] {
        let holder = Child::spawn(&path);
        assert_eq!(holder.next_report(), "locked", "{how}");
        let old_inode = std::fs::metadata(&path).unwrap().ino();
        replace(&path);

        let newcomer = Child::spawn(&path);
        assert_eq!(newcomer.next_report(), "locked", "{how}");
        assert_ne!(std::fs::metadata(&path).unwrap().ino(), old_inode, "{how}");
        assert_eq!(read_holder(&path).unwrap().pid, newcomer.pid(), "{how}");

        let third = Child::spawn(&path);
        let report = third.next_report();
        assert!(
            report.contains(&format!("pid {},", newcomer.pid())),
            "{how}: {report}"
        );
        third.finish();
        newcomer.finish();
        holder.finish();
    }
}

/// The lock lives in the open file description: a duplicate of the descriptor (what a
/// successor receives in a handover) keeps it after the original is dropped, and it ends
/// only when the last copy is closed.
#[test]
fn a_handed_on_descriptor_keeps_the_lock_until_it_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let path = lock_path(&dir);
    let lock = InstanceLock::acquire(&path, &HolderInfo::new("prod", APP, "/old.sock")).unwrap();
    let handed_on = lock.as_fd().try_clone_to_owned().unwrap();
    drop(lock);

    let child = Child::spawn(&path);
    assert!(child.next_report().starts_with("held: "));
    child.finish();

    let successor = HolderInfo {
        pid: 4242,
        ..HolderInfo::new("prod", APP, "/new.sock")
    };
    let adopted = InstanceLock::adopt(handed_on, &path, &successor).unwrap();
    assert_eq!(read_holder(&path), Some(successor.clone()));

    // A descriptor of the same file that is not the holder's is refused, and the holder is
    // read from the start of the file whatever the descriptor's offset.
    let mut stranger = std::fs::File::open(&path).unwrap();
    io::Read::read_exact(&mut stranger, &mut [0; 3]).unwrap();
    let stranger = stranger.into();
    let error = InstanceLock::adopt(stranger, &path, &successor).unwrap_err();
    assert!(
        matches!(&error, LockError::Held { holder: Some(h), .. } if h.pid == 4242),
        "{error:?}"
    );

    close_now(adopted);
    let child = Child::spawn(&path);
    assert_eq!(child.next_report(), "locked");
    child.finish();
}

#[test]
fn update_rewrites_the_whole_content() {
    let dir = tempfile::tempdir().unwrap();
    let path = lock_path(&dir);
    let long = HolderInfo {
        control_socket: PathBuf::from("/a/rather/long/path/to/the/control/socket.sock"),
        ..HolderInfo::new("production-environment", APP, "/x")
    };
    let lock = InstanceLock::acquire(&path, &long).unwrap();
    let short = HolderInfo {
        pid: 7,
        ..HolderInfo::new("p", "A1", "/s")
    };
    lock.update(&short).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        text,
        format!("7\n{}\n", serde_json::to_string(&short).unwrap())
    );
    assert_eq!(read_holder(&path), Some(short));
}

#[test]
fn read_holder_handles_garbage_and_plain_pid_files() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.pid");
    assert_eq!(read_holder(&path), None, "missing file");
    for garbage in [
        &b""[..],
        b"\n",
        b"hello\nworld\n",
        b"\xff\xfe\x00",
        b"{\"pid\":1}\n",
    ] {
        std::fs::write(&path, garbage).unwrap();
        assert_eq!(read_holder(&path), None, "{garbage:?}");
    }
    std::fs::write(&path, "4242\n").unwrap();
    assert_eq!(read_holder(&path), Some(HolderInfo::pid_only(4242)));
    std::fs::write(&path, "4242\nnot json\n").unwrap();
    assert_eq!(read_holder(&path), Some(HolderInfo::pid_only(4242)));
    let info = HolderInfo::pid_only(4242);
    assert_eq!(
        (info.environment.as_str(), info.app_id.as_str()),
        ("unknown", "unknown")
    );
    assert_eq!((info.started_at, info.control_socket), (0, PathBuf::new()));
}

/// A loser reads the PID file right after the winner's `flock`, possibly before the winner
/// has written its own content: it must still name the winner, never the previous holder
/// (a dead pid left in the file) or nobody (a fresh, empty file). Twenty starters at once,
/// several rounds, half of them over a file naming a dead holder.
#[test]
fn every_loser_of_simultaneous_starts_names_the_live_winner() {
    const ROUNDS: usize = 8;
    let dir = tempfile::tempdir().unwrap();
    let path = lock_path(&dir);
    let dead = {
        let mut gone = Command::new("true").spawn().unwrap();
        gone.wait().unwrap();
        gone.id()
    };
    let mut wrong = Vec::new();
    for round in 0..ROUNDS {
        if round % 2 == 0 {
            let previous = HolderInfo {
                pid: dead,
                ..HolderInfo::new(ENVIRONMENT, APP, path.with_extension("sock"))
            };
            std::fs::write(
                &path,
                format!("{dead}\n{}\n", serde_json::to_string(&previous).unwrap()),
            )
            .unwrap();
        } else {
            let _ = std::fs::remove_file(&path);
        }
        let (children, reports) = twenty_at_once(&path);
        let winners: Vec<u32> = children
            .iter()
            .zip(&reports)
            .filter(|(_, report)| *report == "locked")
            .map(|(child, _)| child.pid())
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {reports:#?}");
        let named = format!("pid {},", winners[0]);
        wrong.extend(
            reports
                .iter()
                .filter(|report| *report != "locked" && !report.contains(&named))
                .map(|report| format!("round {round}, winner {}: {report}", winners[0])),
        );
        // Killed and reaped: the winner's lock is free for the next round.
        drop(children);
    }
    assert!(
        wrong.is_empty(),
        "{} of {} losers did not name the winner:\n{}",
        wrong.len(),
        ROUNDS * 19,
        wrong.join("\n")
    );
}
