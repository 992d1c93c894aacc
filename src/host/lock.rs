//! One instance per app and environment per host: an exclusive `flock(2)` on the PID file.
//!
//! The lock, not the PID written in the file, is the truth. The kernel releases a flock when
//! the last descriptor of its open file description is closed, however the holder ended
//! (`kill -9` included), so a stale file never blocks a start, and a PID is never used to
//! decide whether the holder is alive (PIDs are reused).
//!
//! A flock belongs to the open file description, not to the process: a duplicate of the
//! descriptor passed to a successor (SCM_RIGHTS, or inherited across exec with CLOEXEC
//! cleared) holds the same lock, and the lock ends only when every copy is closed. That is
//! why this module never calls `LOCK_UN` (nor uses `nix::fcntl::Flock`, whose `Drop` does):
//! unlocking would take the lock away from a successor sharing the description.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::errno::Errno;
use nix::fcntl::{FlockArg, OFlag};
use serde::{Deserialize, Serialize};

/// Who holds the lock: written as the second line of the PID file, as JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HolderInfo {
    pub pid: u32,
    pub environment: String,
    pub app_id: String,
    /// Unix seconds; 0 when unknown.
    pub started_at: u64,
    /// Empty when unknown.
    pub control_socket: PathBuf,
}

/// `environment` and `app_id` of a holder known by its PID alone.
pub const UNKNOWN: &str = "unknown";

/// Attempts before giving up when the file keeps being replaced between open and lock.
const MAX_ATTEMPTS: usize = 10;

/// More than a PID file ever needs; a bigger file is read only this far.
const MAX_FILE_BYTES: usize = 64 * 1024;

/// How long a start that finds the lock held waits for the file to name a running holder:
/// the winner of a simultaneous start writes its content just after its `flock`.
const SETTLE_TIMEOUT: Duration = Duration::from_millis(500);
/// Pause between two reads while waiting for that.
const SETTLE_PAUSE: Duration = Duration::from_millis(2);

impl HolderInfo {
    /// This process, started now.
    pub fn new(
        environment: impl Into<String>,
        app_id: impl Into<String>,
        control_socket: impl Into<PathBuf>,
    ) -> Self {
        let started_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        HolderInfo {
            pid: std::process::id(),
            environment: environment.into(),
            app_id: app_id.into(),
            started_at,
            control_socket: control_socket.into(),
        }
    }

    /// A holder known only from a conventional PID file (a single line with the PID):
    /// environment and app ID are [`UNKNOWN`], `started_at` is 0 and `control_socket` empty.
    pub fn pid_only(pid: u32) -> Self {
        HolderInfo {
            pid,
            environment: UNKNOWN.to_owned(),
            app_id: UNKNOWN.to_owned(),
            started_at: 0,
            control_socket: PathBuf::new(),
        }
    }

    /// `"<pid>\n"` (a conventional PID file) then the JSON line.
    fn file_content(&self) -> io::Result<String> {
        let json = serde_json::to_string(self)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(format!("{}\n{json}\n", self.pid))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds the lock; `holder` is what its PID file says, if readable.
    #[error("{}", held_message(path, holder.as_ref()))]
    Held {
        path: PathBuf,
        holder: Option<HolderInfo>,
    },
    #[error("cannot lock {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

impl LockError {
    /// Makes an I/O error about the lock file at `path` into a `LockError`.
    fn io(path: &Path) -> impl Fn(io::Error) -> LockError + '_ {
        move |source| LockError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// One sentence naming the holder, e.g. "app A08FU15EA2Y (environment prod) is already held
/// by pid 4242, running since 2026-11-30T08:10:13Z; its control socket is
/// /run/flowcoach/A08FU15EA2Y.prod.sock (lock file /run/flowcoach/A08FU15EA2Y.prod.pid)".
/// Unknown parts are left out. Text from the file is escaped: it goes to logs.
fn held_message(path: &Path, holder: Option<&HolderInfo>) -> String {
    let lock_file = path.display();
    let Some(holder) = holder else {
        return format!(
            "the instance lock is already held by another process, whose details are not readable yet (lock file {lock_file})"
        );
    };
    let mut message = if holder.app_id == UNKNOWN && holder.environment == UNKNOWN {
        "the instance lock".to_owned()
    } else {
        format!(
            "app {} (environment {})",
            holder.app_id.escape_debug(),
            holder.environment.escape_debug()
        )
    };
    let _ = write!(message, " is already held by pid {}", holder.pid);
    // humantime formats years up to 9999 only.
    if holder.started_at != 0 && holder.started_at < 253_402_300_800 {
        let since = UNIX_EPOCH + Duration::from_secs(holder.started_at);
        let _ = write!(
            message,
            ", running since {}",
            humantime::format_rfc3339_seconds(since)
        );
    }
    if !holder.control_socket.as_os_str().is_empty() {
        let socket = holder.control_socket.display().to_string();
        let _ = write!(message, "; its control socket is {}", socket.escape_debug());
    }
    let _ = write!(message, " (lock file {lock_file})");
    message
}

/// The held lock. It is released when its descriptor, and every duplicate of it, is closed:
/// dropping this value releases it unless the descriptor was handed on. (A child that
/// another thread is spawning at that moment holds a copy until its exec closes it, a
/// window of microseconds.)
///
/// Dropping does not delete the file, on purpose: a starter may have opened the old inode
/// just before the unlink and would then lock an orphaned inode while the next starter
/// creates and locks a fresh file at the path, and two instances would run. [`acquire`]
/// notices an orphaned inode after locking and retries, but tools such as `flock(1)` in a
/// script do not, and a file left behind costs nothing: the next holder overwrites it.
///
/// [`acquire`]: InstanceLock::acquire
#[derive(Debug)]
pub struct InstanceLock {
    file: File,
    path: PathBuf,
}

/// The result of trying to lock an opened lock file.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    Locked,
    Held,
    /// The path no longer names the inode we opened: try again with a fresh open.
    Replaced,
}

impl InstanceLock {
    /// Takes the lock at `path` without blocking and writes `info` into the file.
    ///
    /// The file is opened with `O_RDWR|O_CREAT|O_CLOEXEC|O_NOFOLLOW` (mode 0644 before the
    /// umask), so children spawned without a handover do not inherit the lock. Its content
    /// is written only once the lock is held.
    ///
    /// The file may be replaced or removed between our `open` and our `flock`. Without a
    /// check we would then hold a lock on an inode no path leads to, while the next starter
    /// creates a new file at the path and locks that: two instances. So after locking,
    /// `fstat` of our descriptor is compared with `lstat` of the path (device and inode);
    /// on a mismatch the descriptor is closed and the whole attempt repeated, at most 10
    /// times. The same check runs when the lock is busy: a busy orphaned inode does not mean
    /// the path is taken.
    pub fn acquire(path: &Path, info: &HolderInfo) -> Result<InstanceLock, LockError> {
        let io_error = LockError::io(path);
        for _ in 0..MAX_ATTEMPTS {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .mode(0o644)
                .custom_flags((OFlag::O_CLOEXEC | OFlag::O_NOFOLLOW).bits())
                .open(path)
                .map_err(&io_error)?;
            if let Some(lock) = InstanceLock::lock_file(file, path, info)? {
                return Ok(lock);
            }
        }
        Err(io_error(io::Error::other(format!(
            "the file was replaced or removed {MAX_ATTEMPTS} times while it was being locked; is another program deleting it?"
        ))))
    }

    /// Takes over a lock handed on by a predecessor (a descriptor received over SCM_RIGHTS
    /// or inherited across exec) and writes `info` into the file.
    ///
    /// The lock is asserted again on `fd`: a no-op when its open file description already
    /// holds it, so there is no gap; if nobody held it, it is taken now. `Held` means the
    /// descriptor is not the holder's; an `Io` error, that it no longer belongs to `path`.
    pub fn adopt(fd: OwnedFd, path: &Path, info: &HolderInfo) -> Result<InstanceLock, LockError> {
        InstanceLock::lock_file(File::from(fd), path, info)?.ok_or_else(|| {
            LockError::io(path)(io::Error::other(
                "the handed-over descriptor is not the file at this path (it was replaced or removed)",
            ))
        })
    }

    /// Locks the opened `file` ([`lock_opened`]) and writes `info` into it. `Held` names
    /// the holder; `None` means that `path` no longer leads to `file`.
    fn lock_file(
        file: File,
        path: &Path,
        info: &HolderInfo,
    ) -> Result<Option<InstanceLock>, LockError> {
        let io_error = LockError::io(path);
        match lock_opened(&file, path).map_err(&io_error)? {
            Attempt::Locked => {
                let lock = InstanceLock {
                    file,
                    path: path.to_owned(),
                };
                lock.update(info).map_err(io_error)?;
                Ok(Some(lock))
            }
            Attempt::Held => Err(LockError::Held {
                path: path.to_owned(),
                holder: read_settled_holder(&file),
            }),
            // Dropping `file` closes it, which releases a lock taken on the old inode.
            Attempt::Replaced => Ok(None),
        }
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The locked descriptor, to hand on to a successor. Whoever holds a duplicate of it
    /// holds the lock.
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Rewrites the file's content: `"<pid>\n"` and one line of JSON.
    ///
    /// The new content is written over the old from offset 0 and the file is truncated
    /// after, not before: a reader never finds it empty, and what it may see in between
    /// (the new lines followed by the old tail) still parses as the new holder.
    pub fn update(&self, info: &HolderInfo) -> io::Result<()> {
        let content = info.file_content()?;
        self.file.write_all_at(content.as_bytes(), 0)?;
        self.file.set_len(content.len() as u64)
    }
}

/// Tries the lock on `file` without blocking, then checks that `path` still leads to it.
fn lock_opened(file: &File, path: &Path) -> io::Result<Attempt> {
    // `nix::fcntl::flock` is deprecated in favour of `Flock`, whose `Drop` unlocks the open
    // file description: that would release a lock handed on to a successor.
    #[allow(deprecated)]
    let result = nix::fcntl::flock(file.as_raw_fd(), FlockArg::LockExclusiveNonblock);
    let locked = match result {
        Ok(()) => true,
        Err(Errno::EWOULDBLOCK) => false,
        Err(errno) => return Err(errno.into()),
    };
    let opened = file.metadata()?;
    let same = match std::fs::symlink_metadata(path) {
        Ok(current) => current.dev() == opened.dev() && current.ino() == opened.ino(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => false,
        Err(e) => return Err(e),
    };
    Ok(match (same, locked) {
        (false, _) => Attempt::Replaced,
        (true, true) => Attempt::Locked,
        (true, false) => Attempt::Held,
    })
}

/// What the PID file at `path` says about its holder.
///
/// The JSON line when it parses (and agrees with the first line's PID); else
/// [`HolderInfo::pid_only`] when the first line is a PID (a conventional PID file, or a
/// file caught mid-write); else `None` (missing, empty or garbage). This says nothing about
/// whether the holder is alive: only the lock does.
pub fn read_holder(path: &Path) -> Option<HolderInfo> {
    read_holder_from(&File::open(path).ok()?)
}

/// What the PID file says about the process holding its lock, once it says it.
///
/// A holder writes the file only after its `flock` succeeded, so a process that has just
/// lost the race may find, for a moment, the previous holder's content (a pid that is gone)
/// or an empty file. It reads again until the content is complete (our writer always
/// records `started_at`) and names a running process, for at most [`SETTLE_TIMEOUT`]; then
/// it takes what is there (a holder in another pid namespace, a conventional PID file).
fn read_settled_holder(file: &File) -> Option<HolderInfo> {
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let holder = read_holder_from(file);
        let settled = holder
            .as_ref()
            .is_some_and(|holder| holder.started_at != 0 && is_running(holder.pid));
        if settled || Instant::now() >= deadline {
            return holder;
        }
        std::thread::sleep(SETTLE_PAUSE);
    }
}

/// Whether `pid` is a running process: it exists and is not a zombie waiting to be reaped.
fn is_running(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else {
        return false;
    };
    if nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None) == Err(Errno::ESRCH) {
        return false;
    }
    // The state follows the command name, which may itself contain ") ".
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// Reads from offset 0 whatever the descriptor's own offset (a handed-over descriptor
/// shares it with its predecessor).
fn read_holder_from(file: &File) -> Option<HolderInfo> {
    let mut bytes = Vec::new();
    let mut chunk = [0; 4096];
    while bytes.len() < MAX_FILE_BYTES {
        let read = file.read_at(&mut chunk, bytes.len() as u64).ok()?;
        if read == 0 {
            break;
        }
        bytes.extend_from_slice(&chunk[..read]);
    }
    parse_holder(&String::from_utf8_lossy(&bytes))
}

fn parse_holder(text: &str) -> Option<HolderInfo> {
    let mut lines = text.lines();
    let pid = lines
        .next()
        .and_then(|line| line.trim().parse::<u32>().ok())
        .filter(|&pid| pid > 0);
    if let Some(json) = lines.next()
        && let Ok(info) = serde_json::from_str::<HolderInfo>(json)
        && pid == Some(info.pid)
    {
        return Some(info);
    }
    pid.map(HolderInfo::pid_only)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> HolderInfo {
        let since = humantime::parse_rfc3339("2026-11-30T08:10:13Z").unwrap();
        HolderInfo {
            pid: 4242,
            environment: "prod".to_owned(),
            app_id: "A08FU15EA2Y".to_owned(),
            started_at: since.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            control_socket: PathBuf::from("/run/flowcoach/A08FU15EA2Y.prod.sock"),
        }
    }

    fn held(holder: Option<HolderInfo>) -> String {
        LockError::Held {
            path: PathBuf::from("/run/flowcoach/A08FU15EA2Y.prod.pid"),
            holder,
        }
        .to_string()
    }

    #[test]
    fn held_is_one_sentence_naming_the_holder() {
        assert_eq!(
            held(Some(example())),
            "app A08FU15EA2Y (environment prod) is already held by pid 4242, running since \
             2026-11-30T08:10:13Z; its control socket is /run/flowcoach/A08FU15EA2Y.prod.sock \
             (lock file /run/flowcoach/A08FU15EA2Y.prod.pid)"
        );
        assert_eq!(
            held(Some(HolderInfo::pid_only(77))),
            "the instance lock is already held by pid 77 (lock file /run/flowcoach/A08FU15EA2Y.prod.pid)"
        );
        assert_eq!(
            held(None),
            "the instance lock is already held by another process, whose details are not \
             readable yet (lock file /run/flowcoach/A08FU15EA2Y.prod.pid)"
        );
    }

    #[test]
    fn held_survives_odd_file_content() {
        let odd = HolderInfo {
            started_at: u64::MAX,
            app_id: "A\nB".to_owned(),
            ..example()
        };
        let text = held(Some(odd));
        assert!(
            text.starts_with(
                "app A\\nB (environment prod) is already held by pid 4242; its control socket"
            ),
            "{text}"
        );
    }

    #[test]
    fn content_is_a_pid_line_then_json() {
        let content = example().file_content().unwrap();
        let mut lines = content.lines();
        assert_eq!(lines.next(), Some("4242"));
        assert_eq!(parse_holder(&content), Some(example()));
        assert!(content.ends_with('\n'));
    }

    #[test]
    fn parsing_falls_back_to_the_pid() {
        assert_eq!(parse_holder("4242\n"), Some(HolderInfo::pid_only(4242)));
        assert_eq!(parse_holder(" 4242 "), Some(HolderInfo::pid_only(4242)));
        assert_eq!(
            parse_holder("4242\n{\"pid\":42"),
            Some(HolderInfo::pid_only(4242))
        );
        // A JSON line that disagrees with the first line: caught mid-write.
        let other = HolderInfo {
            pid: 1,
            ..example()
        };
        let mixed = format!("4242\n{}\n", serde_json::to_string(&other).unwrap());
        assert_eq!(parse_holder(&mixed), Some(HolderInfo::pid_only(4242)));
        // The new lines followed by an old, longer tail (an update in progress).
        let tail = format!("{}old tail\n", example().file_content().unwrap());
        assert_eq!(parse_holder(&tail), Some(example()));
        for garbage in ["", "\n", "0\n", "-1\n", "pid\n{}", "99999999999\n"] {
            assert_eq!(parse_holder(garbage), None, "{garbage:?}");
        }
    }

    fn open(path: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .unwrap()
    }

    #[test]
    fn an_unlinked_or_replaced_inode_is_noticed_after_locking() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.env.pid");

        // Opened, then unlinked before the flock: we must not count that as holding.
        let orphan = open(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(lock_opened(&orphan, &path).unwrap(), Attempt::Replaced);

        // Opened, then replaced by a new file (rename over it).
        let old = open(&path);
        let fresh = dir.path().join("fresh");
        std::fs::write(&fresh, "").unwrap();
        std::fs::rename(&fresh, &path).unwrap();
        assert_eq!(lock_opened(&old, &path).unwrap(), Attempt::Replaced);

        // The current file: locked; a second description of it: held.
        let current = open(&path);
        assert_eq!(lock_opened(&current, &path).unwrap(), Attempt::Locked);
        let second = open(&path);
        assert_eq!(lock_opened(&second, &path).unwrap(), Attempt::Held);

        // A busy inode that the path no longer leads to does not make the path taken.
        std::fs::remove_file(&path).unwrap();
        let _ = open(&path);
        assert_eq!(lock_opened(&second, &path).unwrap(), Attempt::Replaced);
    }

    #[test]
    fn only_existing_unreaped_processes_are_running() {
        assert!(is_running(std::process::id()));
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Wait until it has exited without reaping it: a zombie holds no lock.
        // SAFETY: a zeroed siginfo_t is a valid out-parameter; WNOWAIT leaves the child
        // to `wait` below.
        let observed = unsafe {
            let mut info: nix::libc::siginfo_t = std::mem::zeroed();
            nix::libc::waitid(
                nix::libc::P_PID,
                pid,
                &mut info,
                nix::libc::WEXITED | nix::libc::WNOWAIT,
            )
        };
        assert_eq!(observed, 0);
        assert!(!is_running(pid), "a zombie");
        child.wait().unwrap();
        assert!(!is_running(pid), "a reaped pid");
        assert!(!is_running(u32::MAX));
    }

    #[test]
    fn a_symlink_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("precious");
        std::fs::write(&target, "keep me").unwrap();
        let path = dir.path().join("app.env.pid");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let err = InstanceLock::acquire(&path, &example()).unwrap_err();
        assert!(matches!(err, LockError::Io { .. }), "{err}");
        assert!(err.to_string().contains(&path.display().to_string()));
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
    }
}
