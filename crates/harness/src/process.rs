//! Processes that are not our children (successors an incumbent started), seen from
//! `/proc`: whether they are gone, their CPU time and memory, and signals by pid.

use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::time::Instant;

/// Whether a process has ended: gone, or a zombie nobody has reaped yet.
pub fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

/// Waits until `pid` has ended, at most `bound`.
pub async fn wait_gone(pid: u32, bound: Duration) -> Result<(), String> {
    let deadline = Instant::now() + bound;
    while !gone(pid) {
        if Instant::now() >= deadline {
            return Err(format!("pid {pid} did not exit within {bound:?}"));
        }
        // /proc has no change notification for another process's end: poll, briefly.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Sends `signal` to `pid`, ignoring a process that is already gone.
pub fn signal(pid: u32, signal: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
}

/// Processes to kill (SIGKILL) when this is dropped, however the caller ends, unless seen
/// gone before: by then their pids may belong to somebody else.
#[derive(Debug, Default)]
pub struct Strays(Vec<u32>);

impl Strays {
    pub fn add(&mut self, pid: u32) {
        self.0.push(pid);
    }

    /// Waits until `pid` has exited (at most `bound`); from then on it is not ours to kill.
    pub async fn gone(&mut self, pid: u32, bound: Duration) -> Result<(), String> {
        wait_gone(pid, bound).await?;
        self.0.retain(|p| *p != pid);
        Ok(())
    }
}

impl Drop for Strays {
    fn drop(&mut self) {
        for pid in &self.0 {
            if !gone(*pid) {
                signal(*pid, Signal::SIGKILL);
            }
        }
    }
}

/// The processes whose parent is `pid`, from `/proc`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|stat| {
                // The parent is the second field after the command name.
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(pid)
            })
        })
        .collect()
}

/// CPU time (user + system) and resident memory of a process.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub cpu: Duration,
    pub rss_kib: u64,
    /// Heap and stacks; the rest of the resident set is mapped files (the binary, libc).
    pub rss_anon_kib: u64,
}

/// Reads `pid`'s [`Usage`] from `/proc/PID/stat` and `/proc/PID/status`.
pub fn usage(pid: u32) -> Result<Usage, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("reading /proc/{pid}/stat: {e}"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    let cpu = Duration::from_secs_f64((ticks(11) + ticks(12)) as f64 / hz as f64);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("reading /proc/{pid}/status: {e}"))?;
    let kib = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Ok(Usage {
        cpu,
        rss_kib: kib("VmRSS:"),
        rss_anon_kib: kib("RssAnon:"),
    })
}

/// A server's stderr, kept line by line for failure messages, with a flag that turns true
/// at the first line containing `ready_line` (the server saying it serves).
pub fn watch_stderr(
    stderr: tokio::process::ChildStderr,
    ready_line: &'static str,
) -> (
    std::sync::Arc<std::sync::Mutex<String>>,
    tokio::sync::watch::Receiver<bool>,
) {
    use tokio::io::AsyncBufReadExt;
    let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let (ready_tx, ready) = tokio::sync::watch::channel(false);
    let collected = log.clone();
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(ready_line) {
                let _ = ready_tx.send(true);
            }
            let mut log = collected.lock().unwrap();
            log.push_str(&line);
            log.push('\n');
        }
    });
    (log, ready)
}
