//! The end-to-end tests: the `.deb` on a real systemd (`systemd`) and the image with Podman
//! (`podman`). Run them as root, one at a time:
//!
//! ```text
//! FLOWCOACH_E2E=1 cargo test --test e2e -- --test-threads=1 systemd::
//! FLOWCOACH_E2E=1 cargo test --test e2e -- --test-threads=1 podman::
//! ```
//!
//! The systemd side's harness: a Debian bookworm rootfs made once with debootstrap and cached under `target/e2e/`, machines
//! booted from it with `systemd-nspawn --boot --volatile=overlay` (every run starts from
//! the pristine tree; writes go to a tmpfs that disappears with the machine), commands run
//! inside with `nsenter`, and the packaged `.deb`.
//!
//! The machines share the host's network namespace (no `--private-network`), so a daemon
//! inside reaches the simulator that the test runs on the host's 127.0.0.1: all traffic
//! stays on loopback, and the simulator's `Record` stays in the test for assertions.
//!
//! Knobs (all optional): `FLOWCOACH_E2E=1` enables the tests; `FLOWCOACH_E2E_DEB` names the
//! package (default: the newest `target/debian/flowcoach_*.deb`); `FLOWCOACH_E2E_MIRROR` the
//! Debian mirror for debootstrap (default: the first one in `/etc/apt/sources.list*`);
//! `FLOWCOACH_E2E_KEEP_LOGS=1` keeps console and journal logs of passing runs too.

mod deb;
mod machine;
mod podman;
mod rootfs;
mod round_trip;
mod systemd;

use std::path::PathBuf;
use std::process::{Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What a group of end-to-end tests runs on: its name in the skip message, and the tools
/// (with the Debian package that brings each) it cannot do without.
pub struct Needs {
    pub what: &'static str,
    pub tools: &'static [(&'static str, &'static str)],
}

/// The systemd tests' needs.
pub const SYSTEMD: Needs = Needs {
    what: "on a real systemd (needs root, debootstrap, systemd-nspawn and the .deb from packaging/build.sh)",
    tools: &[
        ("debootstrap", "debootstrap"),
        ("systemd-nspawn", "systemd-container"),
        ("nsenter", "util-linux"),
        ("dpkg-deb", "dpkg"),
    ],
};

/// The Podman tests' needs.
pub const PODMAN: Needs = Needs {
    what: "with Podman (needs root, podman, runc and debootstrap; see .ci/run)",
    tools: &[("podman", "podman"), ("runc", "runc")],
};

/// True when the end-to-end tests should run; otherwise says why not on stderr.
///
/// They need root and are opt-in: booting machines, building images and installing
/// packages is not what a plain `cargo test` should do.
pub fn enabled(test: &str, needs: &Needs) -> bool {
    if std::env::var("FLOWCOACH_E2E").as_deref() != Ok("1") {
        eprintln!(
            "SKIPPED {test}: end-to-end test {}; set FLOWCOACH_E2E=1 to run it",
            needs.what
        );
        return false;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED {test}: FLOWCOACH_E2E=1 but not running as root");
        return false;
    }
    for (tool, package) in needs.tools {
        assert!(
            which(tool).is_some(),
            "FLOWCOACH_E2E=1 but {tool} is missing: apt-get install -y {package}"
        );
    }
    true
}

fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|dir| dir.join(tool))
        .find(|candidate| candidate.is_file())
}

/// The workspace's root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Cargo's target directory (`CARGO_TARGET_DIR`, else `target/` in the workspace).
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => repo().join(dir),
        _ => repo().join("target"),
    }
}

/// `cargo build --release --locked ARGS`, as `packaging/build.sh` builds: with its
/// `SOURCE_DATE_EPOCH` (the caller's, else the last commit's time), which ring's build
/// script watches: another value would rebuild the release binaries. A no-op when they are
/// up to date. Blocking: call it before the simulator starts.
pub fn release_build(args: &[&str]) {
    let mut all = vec!["--release", "--locked"];
    all.extend_from_slice(args);
    let mut build = flowcoach_harness::cargo::command(&repo(), &all);
    if std::env::var_os("SOURCE_DATE_EPOCH").is_none()
        && let Ok(log) = std::process::Command::new("git")
            .args(["log", "-1", "--format=%ct"])
            .current_dir(repo())
            .stdin(Stdio::null())
            .output()
        && log.status.success()
    {
        build.env(
            "SOURCE_DATE_EPOCH",
            String::from_utf8_lossy(&log.stdout).trim(),
        );
    }
    let status = build.status().expect("run cargo build --release");
    assert!(status.success(), "cargo build --release {args:?} failed");
}

/// The demo app in HTTP mode (`flowcoach-dev app`), release build: the app the tests put
/// behind the packaged flowcoach, in a unit or a container of its own. Built once.
pub fn demo_app() -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| release_build(&["--package", "flowcoach-dev", "--bin", "flowcoach-dev"]));
    target_dir().join("release/flowcoach-dev")
}

/// `target/e2e`: the cached rootfs, repacked packages, logs of machines.
pub fn work_dir() -> PathBuf {
    let dir = target_dir().join("e2e");
    std::fs::create_dir_all(&dir).expect("create target/e2e");
    dir
}

/// Runs a command on the host, bounded by `timeout`; panics when it cannot be run or takes
/// too long. The caller judges the exit status.
pub async fn host(program: &str, args: &[&str], timeout: Duration) -> Output {
    let what = format!("{program} {}", args.join(" "));
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(output) => output.unwrap_or_else(|e| panic!("{what}: {e}")),
        Err(_) => panic!("{what} did not finish within {timeout:?}"),
    }
}

/// [`host`], which must succeed; returns its stdout.
pub async fn host_ok(program: &str, args: &[&str], timeout: Duration) -> String {
    let output = host(program, args, timeout).await;
    assert!(
        output.status.success(),
        "{program} {} failed ({}):\n{}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Prints how long a phase took, so the CI log shows where the time goes.
pub struct Phase {
    what: String,
    started: Instant,
}

impl Phase {
    pub fn start(what: impl Into<String>) -> Phase {
        Phase {
            what: what.into(),
            started: Instant::now(),
        }
    }

    pub fn done(self) -> Duration {
        let took = self.started.elapsed();
        eprintln!("e2e timing: {}: {:.2}s", self.what, took.as_secs_f64());
        took
    }
}
