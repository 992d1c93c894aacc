//! A PostgreSQL server of the test's own, from the distribution's server package: a new
//! cluster (`initdb`) in a temporary directory, run as the unprivileged `postgres` user
//! when the tests run as root, listening on `127.0.0.1` (password required) and on a
//! unix socket in that directory (trusted), stopped when dropped. Never the system's
//! packaged server.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use nix::sys::signal::Signal;
use tokio::process::{Child, Command};

use crate::WAIT;

/// Set to `1` (as CI does), a test needing PostgreSQL fails instead of skipping when the
/// server package is missing.
pub const MANDATORY_VARIABLE: &str = "FLOWCOACH_POSTGRES";

/// Where Debian's server packages put their programs, one directory per major version.
const SERVER_DIRS: &str = "/usr/lib/postgresql";

/// The role the tests connect as, and its password (over TCP only).
pub const USER: &str = "flowcoach";
pub const PASSWORD: &str = "test-only-pg-password";
pub const DATABASE: &str = "postgres";

/// The line the server logs once it accepts connections.
const READY_LINE: &str = "database system is ready to accept connections";

/// The newest installed server's `bin` directory.
fn server_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir(SERVER_DIRS)
        .ok()?
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// Whether a test needing PostgreSQL should run: yes with the server installed; without
/// it, a failure if [`MANDATORY_VARIABLE`] is `1`, else a `SKIPPED` line and no.
pub fn runnable(test: &str) -> bool {
    if server_bin().is_some() {
        return true;
    }
    let why = format!(
        "no PostgreSQL server under {SERVER_DIRS}/*/bin; install it with `apt-get install postgresql`"
    );
    if std::env::var(MANDATORY_VARIABLE).is_ok_and(|v| v == "1") {
        panic!("{test}: {why} ({MANDATORY_VARIABLE}=1 makes this test mandatory)");
    }
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED {test}: {why}; set {MANDATORY_VARIABLE}=1 to make it fail instead"
    );
    false
}

/// A running server of the test's own.
pub struct Postgres {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    server: Option<Server>,
}

struct Server {
    child: Child,
    log: Arc<Mutex<String>>,
}

impl Postgres {
    /// Makes a new cluster and starts it on a free port; returns once it accepts
    /// connections.
    pub async fn start() -> Postgres {
        let bin = server_bin().expect("checked by runnable()");
        let dir = tempfile::tempdir().expect("temporary directory");
        // The server refuses to run as root: the directory is the postgres user's.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700))
            .expect("chmod");
        let password_file = dir.path().join("password");
        std::fs::write(&password_file, PASSWORD).expect("password file");
        if let Some(user) = server_user() {
            for path in [dir.path(), &password_file] {
                nix::unistd::chown(path, Some(user.uid), Some(user.gid)).expect("chown");
            }
        }
        let status = as_server_user(&bin.join("initdb"))
            .args([
                "--no-sync",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
            ])
            .arg(format!("--username={USER}"))
            .arg(format!("--pwfile={}", password_file.display()))
            .arg("-D")
            .arg(dir.path().join("data"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .await
            .expect("initdb runs");
        assert!(
            status.status.success(),
            "initdb failed: {}",
            String::from_utf8_lossy(&status.stderr)
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut postgres = Postgres {
            bin,
            dir,
            port,
            server: None,
        };
        postgres.start_server().await;
        postgres
    }

    async fn start_server(&mut self) {
        let mut child = as_server_user(&self.bin.join("postgres"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-c", "listen_addresses=127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-k")
            .arg(self.dir.path())
            // Enough for several members' connections and the tests' own.
            .args(["-c", "max_connections=50"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("postgres starts");
        let (log, mut ready) =
            crate::process::watch_stderr(child.stderr.take().expect("piped"), READY_LINE);
        let became_ready = tokio::time::timeout(WAIT, ready.wait_for(|ready| *ready))
            .await
            .is_ok_and(|seen| seen.is_ok());
        assert!(
            became_ready,
            "postgres did not become ready within {WAIT:?}: {}",
            log.lock().unwrap()
        );
        self.server = Some(Server { child, log });
    }

    /// Stops the server (a fast shutdown: sessions are ended, nothing committed is
    /// lost) and waits until it has exited.
    pub async fn stop(&mut self) {
        let Some(mut server) = self.server.take() else {
            return;
        };
        if let Some(pid) = server.child.id() {
            crate::process::signal(pid, Signal::SIGINT);
        }
        let exited = tokio::time::timeout(WAIT, server.child.wait()).await;
        assert!(exited.is_ok(), "postgres did not stop within {WAIT:?}");
    }

    /// Stops the server (if it runs) and starts it again on the same port and data.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start_server().await;
    }

    /// The server's main process (its sessions are its children), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.server.as_ref().and_then(|s| s.child.id())
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The directory of its unix socket.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// A connection string over TCP (its password is [`PASSWORD`], given apart).
    pub fn tcp_url(&self) -> String {
        tcp_url(self.port)
    }

    /// A connection string over the unix socket (trusted: no password).
    pub fn socket_url(&self) -> String {
        format!(
            "postgres://{USER}@/{DATABASE}?host={}&port={}",
            self.dir.path().display(),
            self.port
        )
    }

    /// What the server logged so far, for failure messages.
    pub fn log(&self) -> String {
        self.server
            .as_ref()
            .map(|s| s.log.lock().unwrap().clone())
            .unwrap_or_default()
    }

    /// Runs `sql` with `psql` over the unix socket and returns its unaligned output.
    pub async fn psql(&self, sql: &str) -> String {
        let output = as_server_user(&self.bin.join("psql"))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.dir.path())
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", USER, "-d", DATABASE, "-c", sql])
            .output()
            .await
            .expect("psql runs");
        assert!(
            output.status.success(),
            "psql {sql:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}

/// The `postgres` user when we are root (the server refuses to run as root).
fn server_user() -> Option<nix::unistd::User> {
    nix::unistd::geteuid().is_root().then(|| {
        nix::unistd::User::from_name("postgres")
            .expect("user database")
            .expect("the postgres user, which the server package creates")
    })
}

/// `program` run as [`server_user`], else as ourselves: the process itself, not a
/// wrapper, so that signals reach it.
fn as_server_user(program: &Path) -> Command {
    let mut command = Command::new(program);
    if let Some(user) = server_user() {
        command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    command
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(server) = &self.server
            && let Some(pid) = server.child.id()
        {
            // Immediate shutdown: the data directory goes with the test.
            crate::process::signal(pid, Signal::SIGQUIT);
        }
    }
}

/// A connection string to the test's server (or a proxy to it) on `port` of `127.0.0.1`.
pub fn tcp_url(port: u16) -> String {
    format!("postgres://{USER}@127.0.0.1:{port}/{DATABASE}?sslmode=disable")
}
