//! End-to-end with Podman: the image built from `Containerfile` (runtime stage on a local
//! Debian 12 base, binaries from `cargo build --release`), run as Podman runs it under
//! Quadlet, against the simulator in this process.
//!
//! The containers join this process's network namespace (`--network=ns:/proc/<pid>/ns/net`),
//! so the daemon inside reaches the simulator on 127.0.0.1: traffic stays on loopback and
//! the simulator's `Record` stays here for assertions (clean Close, acks, no gap).
//!
//! Opt-in: `FLOWCOACH_E2E=1`, as root, with podman installed (`.ci/run` does all of it).
//! `CONTAINERS_CONF` defaults to `packaging/podman/containers.conf` (what this kind of
//! machine needs); the base image to `localhost/bookworm-base`, made with
//! `packaging/podman/import-base.sh` when missing (`FLOWCOACH_E2E_PODMAN_BASE` names
//! another one). Run with `--test-threads=1`.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::process::Command;

use flowcoach_harness::{
    APP, FAST_CONFIG, WAIT, acked, event, simulator, slash, token, token_secret,
};
use flowcoach_protocol::EnvelopeKind;
use flowcoach_sim::{CloseKind, LoadMix, LoadSpec, Record, Simulator};

use crate::{repo, target_dir};

mod app;

/// The image the tests build and run.
const IMAGE: &str = "localhost/flowcoach:e2e";
/// The runtime base when `FLOWCOACH_E2E_PODMAN_BASE` is not set.
const DEFAULT_BASE: &str = "localhost/bookworm-base";
/// The image's user.
const UID: &str = "10001";
/// Any one podman command (a build included) finishes within this.
const PODMAN_TIMEOUT: Duration = Duration::from_secs(180);

// ---------------------------------------------------------------------------------------
// Gate and setup

/// `CONTAINERS_CONF` for podman: the caller's, else the project's.
fn containers_conf() -> OsString {
    std::env::var_os("CONTAINERS_CONF")
        .filter(|conf| !conf.is_empty())
        .unwrap_or_else(|| {
            repo()
                .join("packaging/podman/containers.conf")
                .into_os_string()
        })
}

fn base_image() -> String {
    std::env::var("FLOWCOACH_E2E_PODMAN_BASE").unwrap_or_else(|_| DEFAULT_BASE.to_owned())
}

/// Builds the image once per test binary (release binaries, base image, `podman build`);
/// its name. Blocking: call it before the simulator starts.
fn image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(build_image);
    IMAGE
}

fn build_image() {
    let started = Instant::now();
    crate::release_build(&["--bins"]);
    eprintln!("release binaries ready after {:?}", started.elapsed());

    let base = base_image();
    if !podman_blocking(&["image", "exists", &base])
        .status
        .success()
    {
        assert_eq!(
            base, DEFAULT_BASE,
            "FLOWCOACH_E2E_PODMAN_BASE={base}: no such image"
        );
        let status = std::process::Command::new(repo().join("packaging/podman/import-base.sh"))
            .arg(&base)
            .env("CONTAINERS_CONF", containers_conf())
            .stdin(Stdio::null())
            .status()
            .expect("run packaging/podman/import-base.sh");
        assert!(status.success(), "packaging/podman/import-base.sh failed");
        eprintln!("base image {base} imported after {:?}", started.elapsed());
    }

    // The build context: the repository (its .containerignore lets in the two binaries),
    // as a user builds it; or, with another target directory, just the binaries.
    let release = target_dir().join("release");
    let scratch;
    let context = if release == repo().join("target/release") {
        repo()
    } else {
        scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().join("target/release");
        std::fs::create_dir_all(&dir).unwrap();
        for bin in ["flowcoach", "flowcoachctl"] {
            std::fs::copy(release.join(bin), dir.join(bin)).unwrap();
        }
        scratch.path().to_owned()
    };
    let containerfile = repo().join("Containerfile");
    let output = podman_blocking(&[
        "build",
        // HEALTHCHECK exists in the docker format only.
        "--format",
        "docker",
        "--network",
        "none",
        "--target",
        "prebuilt",
        "--build-arg",
        &format!("RUNTIME_BASE={base}"),
        "--tag",
        IMAGE,
        "--file",
        containerfile.to_str().unwrap(),
        context.to_str().unwrap(),
    ]);
    assert!(
        output.status.success(),
        "podman build failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("image {IMAGE} built after {:?}", started.elapsed());
}

// ---------------------------------------------------------------------------------------
// Running podman

fn podman_blocking(args: &[&str]) -> Output {
    std::process::Command::new("podman")
        .args(args)
        .env("CONTAINERS_CONF", containers_conf())
        .stdin(Stdio::null())
        .output()
        .expect("run podman")
}

fn podman_command(args: &[&str]) -> Command {
    let mut command = Command::new("podman");
    command
        .args(args)
        .env("CONTAINERS_CONF", containers_conf())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

/// Runs podman to the end (asynchronously: the simulator runs on this runtime).
async fn podman(args: &[&str]) -> Output {
    run(podman_command(args), args).await
}

async fn run(mut command: Command, args: &[&str]) -> Output {
    tokio::time::timeout(PODMAN_TIMEOUT, command.output())
        .await
        .unwrap_or_else(|_| panic!("podman {args:?} did not finish"))
        .expect("run podman")
}

/// Runs podman, which must succeed; its stdout, trimmed.
async fn podman_ok(args: &[&str]) -> String {
    let output = podman(args).await;
    assert!(
        output.status.success(),
        "podman {args:?}: {}",
        said(&output)
    );
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn said(output: &Output) -> String {
    format!(
        "{}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// A name no other test run uses.
fn unique(kind: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "flowcoach-e2e-{kind}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

// ---------------------------------------------------------------------------------------
// Things the tests create, removed however a test ends (containers first: declare them
// last).

/// `podman <kind> create <args…>`, which must succeed.
fn podman_create(kind: &str, args: &[&str]) {
    let mut all = vec![kind, "create"];
    all.extend_from_slice(args);
    let output = podman_blocking(&all);
    assert!(
        output.status.success(),
        "podman {kind} create: {}",
        said(&output)
    );
}

/// A Podman secret: the simulator's token, or another secret.
struct Secret {
    name: String,
}

impl Secret {
    fn create() -> Secret {
        Secret::holding("token", &token())
    }

    /// A secret named after `kind` holding `contents`.
    fn holding(kind: &str, contents: &str) -> Secret {
        let name = unique(kind);
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, contents).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        podman_create("secret", &[&name, file.to_str().unwrap()]);
        Secret { name }
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        podman_blocking(&["secret", "rm", &self.name]);
    }
}

/// A named volume for the runtime directory, shared by the containers of one test.
struct Volume {
    name: String,
}

impl Volume {
    /// `kind`: what it holds, in its name (`run`, `state`).
    fn create(kind: &str) -> Volume {
        let name = unique(kind);
        podman_create("volume", &[&name]);
        Volume { name }
    }
}

impl Drop for Volume {
    fn drop(&mut self) {
        podman_blocking(&["volume", "rm", "--force", &self.name]);
    }
}

/// The settings file mounted at /etc/flowcoach/flowcoach.toml (the image's
/// `FLOWCOACH_CONFIG`): [`FAST_CONFIG`], environment "test".
struct ConfigFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl ConfigFile {
    fn new() -> ConfigFile {
        ConfigFile::with("")
    }

    /// [`FAST_CONFIG`] and `extra`.
    fn with(extra: &str) -> ConfigFile {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("flowcoach.toml");
        std::fs::write(&path, format!("{FAST_CONFIG}{extra}")).unwrap();
        // The container's user must read it.
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        ConfigFile { _dir: dir, path }
    }
}

/// Where the container's runtime directory (lock, control socket) and state directory
/// (the durable inbox) live. The Quadlet unit mounts a volume on each.
enum Runtime<'a> {
    /// A tmpfs of its own, owned by the container's user, and a state volume of its own.
    Tmpfs,
    /// Named volumes, shared with other containers (a successor takes over both).
    Volume { run: &'a Volume, state: &'a Volume },
}

struct Setup<'a> {
    sim: &'a Simulator,
    secret: &'a Secret,
    config: &'a ConfigFile,
    runtime: Runtime<'a>,
    /// `--sdnotify=container`, with podman's `NOTIFY_SOCKET` set to this.
    notify: Option<&'a Path>,
    /// Arguments after the image name (replacing the image's `run`).
    args: &'a [&'a str],
    /// The pod the container joins, with its network; without one, the container joins
    /// this process's network namespace.
    pod: Option<&'a Pod>,
    /// The app's signing secret for `[forward]`, as the credential `slack-signing-secret`.
    signing_secret: Option<&'a Secret>,
}

/// A pod on this process's network (`--network host`: the simulator's loopback), removed
/// with its containers on drop.
struct Pod {
    name: String,
}

impl Pod {
    fn create() -> Pod {
        let name = unique("pod");
        podman_create("pod", &["--name", &name, "--network", "host"]);
        Pod { name }
    }
}

impl Drop for Pod {
    fn drop(&mut self) {
        podman_blocking(&["pod", "rm", "--force", "--time", "0", &self.name]);
    }
}

/// A container started with `podman run -d`, removed on drop.
struct Container {
    name: String,
    /// The state volume of a container that has one of its own, removed after it.
    _state: Option<Volume>,
}

impl Container {
    /// `podman run -d` with the options the Quadlet unit in packaging/podman generates
    /// (read-only root, no capabilities, no new privileges, the token as a secret, a
    /// stop timeout beyond the drain budget), joined to this process's network namespace.
    async fn run(setup: Setup<'_>) -> Container {
        let name = unique("c");
        let network = match setup.pod {
            Some(pod) => format!("--pod={}", pod.name),
            None => format!("--network=ns:/proc/{}/ns/net", std::process::id()),
        };
        let secret = |secret: &Secret, target: &str| {
            format!(
                "{},target={target},uid={UID},gid={UID},mode=0400",
                secret.name
            )
        };
        let token = secret(setup.secret, "slack-app-token");
        let signing_secret = setup
            .signing_secret
            .map(|signing| secret(signing, "slack-signing-secret"));
        let config = format!(
            "{}:/etc/flowcoach/flowcoach.toml:ro",
            setup.config.path.display()
        );
        let api_url = format!("FLOWCOACH_SLACK_API_URL={}", setup.sim.api_url());
        let runtime = match &setup.runtime {
            Runtime::Tmpfs => "/run/flowcoach:rw,mode=0750,U".to_owned(),
            Runtime::Volume { run, .. } => format!("{}:/run/flowcoach", run.name),
        };
        let (state_volume, own_state) = match &setup.runtime {
            Runtime::Tmpfs => {
                let volume = Volume::create("state");
                (volume.name.clone(), Some(volume))
            }
            Runtime::Volume { state, .. } => (state.name.clone(), None),
        };
        let state = format!("{state_volume}:/var/lib/flowcoach");
        let mut args = vec![
            "run",
            "--detach",
            "--name",
            &name,
            &network,
            "--security-opt=no-new-privileges",
            "--cap-drop=all",
            "--read-only",
            "--read-only-tmpfs=false",
            "--tmpfs",
            "/run/secrets:rw,mode=0755",
            "--secret",
            &token,
            "--volume",
            &config,
            match setup.runtime {
                Runtime::Tmpfs => "--tmpfs",
                Runtime::Volume { .. } => "--volume",
            },
            &runtime,
            "--volume",
            &state,
            "--env",
            &api_url,
            "--env",
            "FLOWCOACH_LOG_FORMAT=json",
            "--stop-timeout=40",
        ];
        if let Some(signing_secret) = &signing_secret {
            args.extend(["--secret", signing_secret]);
        }
        if setup.notify.is_some() {
            args.push("--sdnotify=container");
        }
        args.push(IMAGE);
        args.extend_from_slice(setup.args);
        let mut command = podman_command(&args);
        if let Some(notify) = setup.notify {
            command.env("NOTIFY_SOCKET", notify);
        }
        let output = run(command, &args).await;
        let container = Container {
            name,
            _state: own_state,
        };
        assert!(output.status.success(), "podman run: {}", said(&output));
        container
    }

    /// Everything the container wrote (the daemon logs to stderr).
    async fn logs(&self) -> String {
        let output = podman(&["logs", &self.name]).await;
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    }

    /// The daemon's JSON log lines.
    async fn log_lines(&self) -> Vec<Value> {
        self.logs()
            .await
            .lines()
            .filter_map(|line| serde_json::from_str(line).ok())
            .collect()
    }

    async fn inspect(&self, format: &str) -> String {
        podman_ok(&["inspect", "--format", format, &self.name]).await
    }

    /// `podman exec` (as the image's user).
    async fn exec(&self, args: &[&str]) -> Output {
        let mut all = vec!["exec", self.name.as_str()];
        all.extend_from_slice(args);
        podman(&all).await
    }

    /// `podman healthcheck run`: the image's HEALTHCHECK (`flowcoachctl health`).
    /// `flowcoachctl status --json` in the container, which must succeed; its report.
    async fn status_json(&self) -> Value {
        let report = self
            .exec(&["/usr/local/bin/flowcoachctl", "status", "--json"])
            .await;
        assert!(
            report.status.success(),
            "flowcoachctl status: {}",
            said(&report)
        );
        serde_json::from_slice(&report.stdout).unwrap()
    }

    async fn healthcheck(&self) -> Output {
        podman(&["healthcheck", "run", &self.name]).await
    }

    /// Waits until the container has exited; its exit code.
    async fn exit_code(&self) -> i32 {
        let deadline = Instant::now() + WAIT;
        loop {
            let status = self.inspect("{{.State.Status}}").await;
            if status == "exited" || status == "stopped" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "container {} still {status}; its log:\n{}",
                self.name,
                self.logs().await
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.inspect("{{.State.ExitCode}}").await.parse().unwrap()
    }

    /// `podman stop`: SIGTERM (the image's STOPSIGNAL) to the daemon, PID 1; must exit 0.
    async fn stop(&self) {
        podman_ok(&["stop", &self.name]).await;
        let code = self.exit_code().await;
        assert_eq!(
            code,
            0,
            "exit code after podman stop; log:\n{}",
            self.logs().await
        );
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        podman_blocking(&["rm", "--force", "--time", "0", &self.name]);
    }
}

/// A stand-in for systemd's notification socket, given to podman as `NOTIFY_SOCKET`.
struct NotifySocket {
    _dir: tempfile::TempDir,
    path: PathBuf,
    socket: tokio::net::UnixDatagram,
    received: Vec<String>,
}

impl NotifySocket {
    fn bind() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let socket = tokio::net::UnixDatagram::bind(&path).unwrap();
        NotifySocket {
            _dir: dir,
            path,
            socket,
            received: Vec::new(),
        }
    }

    /// Waits for a datagram with the line `line`; everything received so far.
    async fn wait_for(&mut self, line: &str, container: &Container) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        let mut buffer = vec![0u8; 4096];
        while !self.received.iter().any(|d| d.lines().any(|l| l == line)) {
            match tokio::time::timeout_at(deadline, self.socket.recv(&mut buffer)).await {
                Ok(Ok(n)) => self
                    .received
                    .push(String::from_utf8_lossy(&buffer[..n]).into_owned()),
                Ok(Err(error)) => panic!("notify socket: {error}"),
                Err(_) => panic!(
                    "no {line} within {WAIT:?}; received {:?}; container log:\n{}",
                    self.received,
                    container.logs().await
                ),
            }
        }
        self.received.clone()
    }
}

// ---------------------------------------------------------------------------------------
// Simulator helpers

/// Waits until the daemon in `container` has a connection with a hello.
async fn connected(sim: &Simulator, container: &Container) -> Record {
    match sim
        .wait_until(WAIT, |r| r.hellos() >= 1 && r.open_sockets(APP) >= 1)
        .await
    {
        Ok(record) => record,
        Err(error) => panic!(
            "flowcoach in the container did not connect: {error}\nits log:\n{}",
            container.logs().await
        ),
    }
}

/// "event handled" log lines per event_id, over every container's log.
async fn handled(containers: &[&Container]) -> HashMap<String, usize> {
    let mut lines = Vec::new();
    for container in containers {
        lines.extend(container.log_lines().await);
    }
    flowcoach_harness::logs::handled_events(&lines)
}

// ---------------------------------------------------------------------------------------
// Tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_image_serves_reports_ready_and_healthy_and_stops_with_a_clean_close() {
    if !crate::enabled(
        "the_image_serves_reports_ready_and_healthy_and_stops_with_a_clean_close",
        &crate::PODMAN,
    ) {
        return;
    }
    let image = image();
    let started = Instant::now();

    // What the image declares.
    let inspected: Value =
        serde_json::from_str(&podman_ok(&["image", "inspect", image]).await).unwrap();
    let inspected = &inspected[0];
    assert_eq!(
        inspected["Config"]["Entrypoint"],
        serde_json::json!(["/usr/local/bin/flowcoach"])
    );
    assert_eq!(inspected["Config"]["Cmd"], serde_json::json!(["run"]));
    assert_eq!(inspected["Config"]["User"], format!("{UID}:{UID}"));
    assert_eq!(inspected["Config"]["StopSignal"], "SIGTERM");
    assert_eq!(
        inspected["Healthcheck"]["Test"],
        serde_json::json!(["CMD", "/usr/local/bin/flowcoachctl", "health"]),
        "the HEALTHCHECK (kept by --format docker): {inspected}"
    );

    let sim = simulator(|_| {}).await;
    let secret = Secret::create();
    let config = ConfigFile::new();
    let mut notify = NotifySocket::bind();
    // The image's own entrypoint and command: the daemon.
    let container = Container::run(Setup {
        sim: &sim,
        secret: &secret,
        config: &config,
        runtime: Runtime::Tmpfs,
        notify: Some(&notify.path),
        args: &[],
        pod: None,
        signing_secret: None,
    })
    .await;
    connected(&sim, &container).await;
    let connected_after = started.elapsed();

    // --sdnotify=container: the daemon's READY=1 reaches podman's NOTIFY_SOCKET through
    // conmon.
    let notifications = notify.wait_for("READY=1", &container).await;
    eprintln!("notifications through conmon: {notifications:?}");

    // It serves: an event is acked, and /flowcoach status answers from PID 1.
    acked(&sim, event("EvPODMAN1", "hello from the test")).await;
    let status = acked(&sim, slash("status")).await;
    let answer = status
        .ack_payload
        .expect("status answers in the ack")
        .to_string();
    assert!(answer.contains("pid 1,"), "{answer}");

    // The health check as Podman runs it, and flowcoachctl in the container.
    let health = container.healthcheck().await;
    assert!(
        health.status.success(),
        "podman healthcheck run: {}",
        said(&health)
    );
    let report = container.status_json().await;
    assert_eq!(report["pid"], 1, "{report}");
    assert_eq!(report["phase_name"], "connected", "{report}");
    assert_eq!(
        report["environment"], "test",
        "the mounted settings: {report}"
    );
    assert!(
        report["token_source"]
            .as_str()
            .is_some_and(|s| s.contains("/run/secrets/slack-app-token")),
        "the token comes from the secret: {report}"
    );

    // PID 1 runs as the image's user, with no capabilities and no new privileges.
    let proc_status = container.exec(&["cat", "/proc/1/status"]).await;
    let proc_status = String::from_utf8_lossy(&proc_status.stdout).into_owned();
    let field = |name: &str| {
        proc_status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.split_whitespace().next().unwrap_or_default().to_owned())
            .unwrap_or_default()
    };
    assert_eq!(field("Uid:"), UID, "{proc_status}");
    assert_eq!(field("CapEff:"), "0000000000000000", "{proc_status}");
    assert_eq!(field("NoNewPrivs:"), "1", "{proc_status}");

    // podman stop: SIGTERM, a Close handshake, exit 0.
    let stopping = Instant::now();
    container.stop().await;
    let stop_took = stopping.elapsed();
    let record = sim
        .wait_until(WAIT, |r| r.sockets[0].close.is_some())
        .await
        .expect("the socket closed");
    assert_eq!(
        record.sockets[0].close,
        Some(CloseKind::ClientCloseHandshake),
        "{record}"
    );
    assert!(record.all_acked(), "{record}");
    let logs = container.logs().await;
    assert!(
        !logs.contains(&token_secret()),
        "the token leaked into the container's log"
    );
    eprintln!(
        "connected {connected_after:?} after the start of the test; podman stop took {stop_took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_health_check_fails_without_slack_and_without_a_daemon() {
    if !crate::enabled(
        "the_health_check_fails_without_slack_and_without_a_daemon",
        &crate::PODMAN,
    ) {
        return;
    }
    let image = image();
    let sim = simulator(|_| {}).await;
    let secret = Secret::create();
    let config = ConfigFile::new();
    let container = Container::run(Setup {
        sim: &sim,
        secret: &secret,
        config: &config,
        runtime: Runtime::Tmpfs,
        notify: None,
        args: &[],
        pod: None,
        signing_secret: None,
    })
    .await;
    connected(&sim, &container).await;
    let health = container.healthcheck().await;
    assert!(
        health.status.success(),
        "while connected: {}",
        said(&health)
    );

    // Slack goes away: the daemon reconnects, degraded, and the check fails.
    sim.shutdown().await;
    let deadline = Instant::now() + WAIT;
    loop {
        let health = container.healthcheck().await;
        if health.status.code() == Some(1) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the health check still passes without Slack: {}",
            said(&health)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ctl = container
        .exec(&["/usr/local/bin/flowcoachctl", "health"])
        .await;
    assert_eq!(
        ctl.status.code(),
        Some(1),
        "flowcoachctl health: {}",
        said(&ctl)
    );

    // A clean stop while reconnecting.
    container.stop().await;

    // No daemon at all: exit 2.
    let lonely = podman(&[
        "run",
        "--rm",
        "--network=none",
        "--entrypoint",
        "/usr/local/bin/flowcoachctl",
        image,
        "health",
    ])
    .await;
    assert_eq!(lonely.status.code(), Some(2), "{}", said(&lonely));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_container_takes_over_from_another_through_a_shared_runtime_volume() {
    if !crate::enabled(
        "a_container_takes_over_from_another_through_a_shared_runtime_volume",
        &crate::PODMAN,
    ) {
        return;
    }
    image();
    let sim = simulator(|_| {}).await;
    let secret = Secret::create();
    let config = ConfigFile::new();
    let volume = Volume::create("run");
    let state = Volume::create("state");
    let setup = |args: &'static [&'static str]| Setup {
        sim: &sim,
        secret: &secret,
        config: &config,
        runtime: Runtime::Volume {
            run: &volume,
            state: &state,
        },
        notify: None,
        args,
        pod: None,
        signing_secret: None,
    };
    let first = Container::run(setup(&[])).await;
    connected(&sim, &first).await;

    // A steady stream of events across the handover.
    let load = sim.start_load(
        APP,
        LoadSpec {
            count: 400,
            rate_per_sec: Some(100.0),
            max_outstanding: None,
            mix: LoadMix::EventsOnly,
        },
    );
    sim.wait_until(WAIT, |r| {
        r.envelopes.iter().filter(|e| e.acked_at.is_some()).count() >= 50
    })
    .await
    .expect("the first container acks the stream");

    let handing_over = Instant::now();
    let second = Container::run(setup(&["--takeover"])).await;
    let code = first.exit_code().await;
    let handover_took = handing_over.elapsed();
    assert_eq!(
        code,
        0,
        "the first container after handing over:\n{}",
        first.logs().await
    );
    let first_log = first.logs().await;
    assert!(
        first_log.contains("handed the app over"),
        "the first container's log:\n{first_log}"
    );

    // The second one holds the app: the control socket in the shared volume answers from
    // it, and a plain start in a third container is refused (75): the lock went along.
    let hostname = second.inspect("{{.Config.Hostname}}").await;
    let report = second.status_json().await;
    assert_eq!(report["host"], hostname.as_str(), "{report}");
    let health = second.healthcheck().await;
    assert!(health.status.success(), "{}", said(&health));
    let third = Container::run(setup(&[])).await;
    assert_eq!(third.exit_code().await, 75, "{}", third.logs().await);

    // Nothing lost, nothing handled twice, never without a socket.
    load.await.unwrap();
    let record = sim
        .wait_until(WAIT, |r| {
            r.all_acked() || r.envelopes.iter().any(|e| e.gave_up)
        })
        .await
        .expect("every envelope acked");
    assert!(record.all_acked(), "envelopes given up:\n{record}");
    assert_eq!(
        record.zero_open_stretches(APP),
        0,
        "a moment without a socket:\n{record}"
    );
    assert_eq!(
        record.sockets[0].close,
        Some(CloseKind::ClientCloseHandshake),
        "the first container's socket:\n{record}"
    );
    let expected: Vec<String> = record
        .envelopes
        .iter()
        .filter(|e| e.kind == EnvelopeKind::EventsApi)
        .filter_map(|e| e.event_id.clone())
        .collect();
    assert_eq!(expected.len(), 400);
    let deadline = Instant::now() + WAIT;
    let counts = loop {
        // Log lines trail the acks (events are acked before they are handled).
        let counts = handled(&[&first, &second]).await;
        if expected.iter().all(|id| counts.contains_key(id)) || Instant::now() >= deadline {
            break counts;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "handled more than once: {twice:?}");
    let missing = expected
        .iter()
        .filter(|id| !counts.contains_key(*id))
        .count();
    assert_eq!(missing, 0, "acked events never handled");

    second.stop().await;
    eprintln!(
        "handover between containers: first exited {handover_took:?} after the second started"
    );
}
