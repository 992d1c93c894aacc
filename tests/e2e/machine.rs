//! A Debian machine with a real systemd as PID 1, booted with systemd-nspawn from the
//! cached rootfs, sharing the host's network (loopback included).
//!
//! `systemd-nspawn -D ROOTFS --boot --register=no --keep-unit --volatile=overlay`: the tree
//! is the lower layer of an overlay whose upper layer is a tmpfs, so every machine starts
//! from the pristine rootfs and leaves nothing behind. `--register=no --keep-unit` because
//! no machined (nor systemd) runs on the host; `machinectl` and `systemd-run -M` therefore
//! do not work, and commands run inside with `nsenter -t <PID 1 of the machine> -a`.
//!
//! cgroups: nspawn puts the machine in `payload/` under its own cgroup, so each nspawn is
//! started in a cgroup of its own (`fce2e-<name>` under the test's, in every hierarchy
//! systemd uses), or two machines would share one tree and manage each other's services.
//! The machine's systemd runs on the unified hierarchy (cgroup v2, as Debian 12 does on a
//! real host) when the host has one mounted; on this project's hybrid hosts nspawn would
//! otherwise give it the legacy name=systemd hierarchy, where systemd in a container does
//! not wait for a process it did not start (a handover's successor) to exit after SIGTERM
//! but SIGKILLs it at once. `FLOWCOACH_E2E_CGROUP=host` keeps nspawn's own choice.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};

use super::{Phase, work_dir};

/// Bound on booting (nspawn up, then `systemctl is-system-running --wait`).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on one command inside (dpkg included).
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Bound on the machine's shutdown after SIGTERM to nspawn.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(30);

const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The `systemctl show` properties of a unit, by name.
pub type Props = BTreeMap<String, String>;

pub struct Machine {
    pub name: String,
    nspawn: Option<std::process::Child>,
    /// The machine's PID 1 (its systemd), as the host sees it.
    leader: i32,
    console_log: PathBuf,
    cgroups: Cgroups,
}

impl Machine {
    /// Boots a machine from `rootfs` and waits until its boot has finished.
    pub async fn boot(rootfs: &Path) -> Machine {
        Self::boot_with(rootfs, &[]).await
    }

    /// [`Machine::boot`] with more nspawn options (e.g. `--bind-ro=HOST:INSIDE`).
    pub async fn boot_with(rootfs: &Path, nspawn_args: &[String]) -> Machine {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "fce2e-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let logs = work_dir().join("logs");
        std::fs::create_dir_all(&logs).unwrap();
        let console_log = logs.join(format!("{name}.console.log"));
        let console = std::fs::File::create(&console_log).unwrap();
        let phase = Phase::start(format!("boot {name}"));
        let cgroups = Cgroups::create(&name);
        // The shell moves itself into the machine's cgroups, then becomes nspawn.
        let mut script: String = cgroups
            .dirs
            .iter()
            .map(|dir| format!("echo $$ > '{}/cgroup.procs' && ", dir.display()))
            .collect();
        script.push_str("exec \"$@\"");
        let mut command = std::process::Command::new("/bin/sh");
        if cgroups.unified {
            command.env("SYSTEMD_NSPAWN_UNIFIED_HIERARCHY", "1");
        }
        let nspawn = command
            .args(["-c", &script, "sh", "systemd-nspawn"])
            .arg("-D")
            .arg(rootfs)
            .args([
                "--boot",
                "--register=no",
                "--keep-unit",
                "--console=read-only",
                "--volatile=overlay",
                "-M",
                &name,
            ])
            .args(nspawn_args)
            .env("SYSTEMD_LOG_COLOR", "0")
            .stdin(Stdio::null())
            .stdout(console.try_clone().unwrap())
            .stderr(console)
            .spawn()
            .expect("start systemd-nspawn (package systemd-container)");
        let nspawn_pid = nspawn.id() as i32;
        let mut machine = Machine {
            name,
            nspawn: Some(nspawn),
            leader: 0,
            console_log,
            cgroups,
        };
        // The machine's PID 1 is nspawn's child; it is up once its private bus socket is.
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            if let Some(status) = machine.nspawn.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "systemd-nspawn exited while booting ({status}):\n{}",
                    machine.console()
                );
            }
            if let Some(leader) = child_of(nspawn_pid)
                && Path::new(&format!("/proc/{leader}/root/run/systemd/private")).exists()
            {
                machine.leader = leader;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no systemd bus in the machine within {BOOT_TIMEOUT:?}:\n{}",
                machine.console()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // systemd tells when the boot is over: no polling needed.
        let state = machine
            .exec_timeout(&["systemctl", "is-system-running", "--wait"], BOOT_TIMEOUT)
            .await;
        let state = String::from_utf8_lossy(&state.stdout).trim().to_owned();
        if state != "running" {
            let failed = machine.sh("systemctl --failed --no-legend --plain").await;
            panic!(
                "the machine booted {state:?}, not running; failed units:\n{}",
                String::from_utf8_lossy(&failed.stdout)
            );
        }
        phase.done();
        machine
    }

    /// `inside` (an absolute path in the machine) seen from the host.
    pub fn host_path(&self, inside: &str) -> PathBuf {
        let relative = inside.trim_start_matches('/');
        PathBuf::from(format!("/proc/{}/root", self.leader)).join(relative)
    }

    /// Writes a file in the machine (parents created) with `mode`.
    pub fn write(&self, inside: &str, contents: impl AsRef<[u8]>, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        let path = self.host_path(inside);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {inside}: {e}"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    pub fn exists(&self, inside: &str) -> bool {
        self.host_path(inside).symlink_metadata().is_ok()
    }

    /// Runs `argv` in the machine (all its namespaces, a clean environment).
    pub async fn exec(&self, argv: &[&str]) -> Output {
        self.exec_timeout(argv, COMMAND_TIMEOUT).await
    }

    pub async fn exec_timeout(&self, argv: &[&str], timeout: Duration) -> Output {
        let what = argv.join(" ");
        let child = self
            .command(argv)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("nsenter {what}: {e}"));
        match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(output) => output.unwrap(),
            Err(_) => panic!("`{what}` in {} took more than {timeout:?}", self.name),
        }
    }

    /// `nsenter` into the machine, ready to spawn `argv`.
    pub fn command(&self, argv: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new("nsenter");
        command
            .arg("-t")
            .arg(self.leader.to_string())
            .arg("-a")
            .arg("--")
            .args(argv)
            .env_clear()
            .env("PATH", PATH)
            .env("LANG", "C.UTF-8")
            .env("TERM", "dumb")
            .env("SYSTEMD_COLORS", "0")
            .env("SYSTEMD_PAGER", "")
            .env("DEBIAN_FRONTEND", "noninteractive");
        command
    }

    /// `argv`, which must succeed; its stdout.
    pub async fn ok(&self, argv: &[&str]) -> String {
        let output = self.exec(argv).await;
        assert!(
            output.status.success(),
            "`{}` in {} failed ({}):\n{}{}",
            argv.join(" "),
            self.name,
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// A shell script in the machine.
    pub async fn sh(&self, script: &str) -> Output {
        self.exec(&["/bin/sh", "-c", script]).await
    }

    /// A shell script that must succeed; its stdout.
    pub async fn sh_ok(&self, script: &str) -> String {
        self.ok(&["/bin/sh", "-c", script]).await
    }

    /// `systemctl show -p …` of `unit`.
    pub async fn show(&self, unit: &str, props: &[&str]) -> Props {
        let props = props.join(",");
        let text = self.ok(&["systemctl", "show", "-p", &props, unit]).await;
        text.lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    /// Polls `systemctl show` until `pred` holds, at most `timeout`; systemd offers no
    /// event for a unit's state to a client without D-Bus, so this is the bounded loop.
    pub async fn wait_show(
        &self,
        unit: &str,
        props: &[&str],
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Props) -> bool,
    ) -> Props {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.show(unit, props).await;
            if pred(&now) {
                return now;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{unit}: {what} not reached within {timeout:?}; last {now:?}\n{}\n{}",
                    self.status(unit).await,
                    self.journal_text(unit, 60).await
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `systemctl status` as text (never fails: inactive units exit non-zero).
    pub async fn status(&self, unit: &str) -> String {
        let output = self
            .exec(&[
                "systemctl",
                "status",
                "--no-pager",
                "--full",
                "-n",
                "0",
                unit,
            ])
            .await;
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The last `lines` journal lines about `unit`, for failure messages.
    pub async fn journal_text(&self, unit: &str, lines: usize) -> String {
        let n = lines.to_string();
        let output = self
            .exec(&[
                "journalctl",
                "-u",
                unit,
                "--no-pager",
                "-n",
                &n,
                "-o",
                "short-precise",
            ])
            .await;
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Every journal entry about `unit` (its processes' and systemd's), as JSON objects.
    pub async fn journal(&self, unit: &str) -> Vec<Value> {
        let text = self
            .ok(&["journalctl", "-u", unit, "--no-pager", "-o", "json"])
            .await;
        text.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Follows the journal of `unit` (`journalctl -f`, from its first entry) until an
    /// entry satisfies `pred`; returns it. Bounded by `timeout`.
    pub async fn wait_journal(
        &self,
        unit: &str,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        // nsenter forks the command into the machine's PID namespace and does not pass
        // signals on: killing nsenter would leave journalctl behind (and make the machine's
        // shutdown wait for it). So the shell says its PID, `exec`s journalctl, and is
        // ended from inside; `timeout` is the safety net.
        let limit = (timeout.as_secs() + 5).to_string();
        let script =
            format!("echo $$; exec timeout {limit} journalctl -u '{unit}' -f -n all -o json");
        let mut child = self
            .command(&["/bin/sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("journalctl -f");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut inner_pid = None;
        let found = tokio::time::timeout(timeout, async {
            while let Ok(Some(line)) = lines.next_line().await {
                if inner_pid.is_none() {
                    inner_pid = line.trim().parse::<u32>().ok();
                    continue;
                }
                if let Ok(entry) = serde_json::from_str::<Value>(&line)
                    && pred(&entry)
                {
                    return Some(entry);
                }
            }
            None
        })
        .await;
        if let Some(pid) = inner_pid {
            self.sh(&format!("kill {pid} 2>/dev/null")).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        match found {
            Ok(Some(entry)) => entry,
            _ => panic!(
                "{unit}: no journal entry {what} within {timeout:?}\n{}",
                self.journal_text(unit, 60).await
            ),
        }
    }

    /// Powers the machine off (SIGTERM to nspawn) and waits for it; returns how long.
    pub async fn shutdown(mut self) -> Duration {
        let started = Instant::now();
        let mut nspawn = self.nspawn.take().unwrap();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(nspawn.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        loop {
            if nspawn.try_wait().unwrap().is_some() {
                break;
            }
            if Instant::now() >= deadline {
                let _ = nspawn.kill();
                let _ = nspawn.wait();
                panic!(
                    "{} did not power off within {SHUTDOWN_TIMEOUT:?} after SIGTERM:\n{}",
                    self.name,
                    self.console()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let took = started.elapsed();
        self.cgroups.remove();
        eprintln!(
            "e2e timing: shutdown {}: {:.2}s",
            self.name,
            took.as_secs_f64()
        );
        if std::env::var("FLOWCOACH_E2E_KEEP_LOGS").as_deref() != Ok("1") {
            let _ = std::fs::remove_file(&self.console_log);
        }
        took
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.console_log).unwrap_or_default()
    }
}

impl Drop for Machine {
    /// A test that panicked leaves its journal beside the console log, then the machine is
    /// powered off (bounded; killed if it does not go).
    fn drop(&mut self) {
        let Some(mut nspawn) = self.nspawn.take() else {
            return;
        };
        if std::thread::panicking() && self.leader != 0 {
            let journal = work_dir()
                .join("logs")
                .join(format!("{}.journal.log", self.name));
            if let Ok(file) = std::fs::File::create(&journal) {
                let _ = std::process::Command::new("timeout")
                    .args(["20", "nsenter", "-t", &self.leader.to_string(), "-a", "--"])
                    .args(["journalctl", "--no-pager", "-o", "short-precise"])
                    .env_clear()
                    .env("PATH", PATH)
                    .stdin(Stdio::null())
                    .stdout(file)
                    .stderr(Stdio::null())
                    .status();
                eprintln!(
                    "e2e: {} journal: {}, console: {}",
                    self.name,
                    journal.display(),
                    self.console_log.display()
                );
            }
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(nspawn.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = nspawn.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if !matches!(nspawn.try_wait(), Ok(Some(_))) {
            let _ = nspawn.kill();
            let _ = nspawn.wait();
        }
        self.cgroups.remove();
    }
}

/// The cgroups one machine's nspawn runs in, one per hierarchy.
struct Cgroups {
    dirs: Vec<PathBuf>,
    /// A cgroup v2 hierarchy is among them: boot the machine on it.
    unified: bool,
}

impl Cgroups {
    /// `fce2e-<name>` under this process's cgroup in the cgroup v2 hierarchy and in the
    /// legacy name=systemd one, where mounted.
    fn create(name: &str) -> Cgroups {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mut dirs = Vec::new();
        let mut unified = false;
        for line in mounts.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let [_, mount, kind, options, ..] = fields[..] else {
                continue;
            };
            // /proc/self/cgroup lines: "0::/path" (v2), "N:name=systemd:/path" (v1).
            let key = match kind {
                "cgroup2" => "",
                "cgroup" if options.split(',').any(|o| o == "name=systemd") => "name=systemd",
                _ => continue,
            };
            let Some(path) = own.lines().find_map(|l| {
                let mut parts = l.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                (controllers == key).then_some(path)
            }) else {
                continue;
            };
            let dir = Path::new(mount)
                .join(path.trim_start_matches('/'))
                .join(format!("fce2e-{name}"));
            if std::fs::create_dir(&dir).is_ok() {
                unified |= kind == "cgroup2";
                dirs.push(dir);
            }
        }
        let unified = unified && std::env::var("FLOWCOACH_E2E_CGROUP").as_deref() != Ok("host");
        Cgroups { dirs, unified }
    }

    /// Removes the (by now empty) trees, deepest first; what is still busy stays.
    fn remove(&mut self) {
        fn remove_tree(dir: &Path) {
            if let Ok(entries) = std::fs::read_dir(dir) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        remove_tree(&entry.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(dir);
        }
        for dir in self.dirs.drain(..) {
            remove_tree(&dir);
        }
    }
}

/// A child process of `parent`, from `/proc/*/stat` (the field after the command name).
fn child_of(parent: i32) -> Option<i32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<i32>().ok());
        if ppid == Some(parent) {
            return Some(pid);
        }
    }
    None
}
