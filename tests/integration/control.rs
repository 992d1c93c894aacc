//! The control socket: the protocol through the real `flowcoachctl` binary, socket
//! discovery, hostile clients, access control and socket activation, all on real unix
//! sockets with the server running in the test process.

use std::os::fd::AsFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::task::JoinHandle;
use tokio::time::timeout;
use tokio_util::sync::CancellationToken;

use flowcoach::control::ControlContext;
use flowcoach::control::access::{AccessPolicy, Peer};
use flowcoach::control::client::{self, ClientError};
use flowcoach::control::protocol::{
    Command, MAX_MESSAGE_BYTES, PROTOCOL_VERSION, Response, StatusReport,
};
use flowcoach::control::server::{self, Limits};
use flowcoach::health::Health;
use flowcoach::metrics::Exposition;
use flowcoach::metrics::labels::EnvelopeType;
use flowcoach::state::{Counters, InstanceInfo, InstanceState, Phase};
use flowcoach_harness::activation::Activation;

/// Bound for anything a test waits on.
const WAIT: Duration = Duration::from_secs(10);
const APP: &str = "A0TEST0001";

fn connected_state() -> Arc<InstanceState> {
    let state = Arc::new(InstanceState::new(InstanceInfo::current("test")));
    state.update(|status| {
        status.phase = Phase::Connected;
        status.app_id = Some(APP.to_owned());
        status.connected_since = Some(SystemTime::now() - Duration::from_secs(3723));
        status.sockets_open = 1;
        status.num_connections = Some(1);
        status.last_disconnect = Some("refresh_requested".to_owned());
    });
    for _ in 0..3 {
        state
            .counters
            .envelopes_received
            .bump(EnvelopeType::EventsApi);
        state.counters.envelopes_acked.bump(EnvelopeType::EventsApi);
    }
    Counters::bump(&state.counters.rotations);
    state
}

fn context(state: Arc<InstanceState>, access: AccessPolicy) -> Arc<ControlContext> {
    Arc::new(ControlContext {
        inbox: None,
        exposition: Arc::new(Exposition::new(state.clone(), Duration::from_secs(300))),
        state,
        token_source: tokio::sync::watch::channel("SLACK_APP_TOKEN".to_owned()).1,
        started_at: SystemTime::now() - Duration::from_secs(7200),
        outage_budget: Duration::from_secs(300),
        access,
        handover: None,
    })
}

/// The daemon's own policy: root and this process's user.
fn own_policy() -> AccessPolicy {
    AccessPolicy::new("").unwrap()
}

/// A control server on `<dir>/<name>`, stopped when dropped.
struct Server {
    path: PathBuf,
    state: Arc<InstanceState>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<()>>,
}

impl Server {
    fn start(dir: &Path, name: &str, limits: Limits, access: AccessPolicy) -> Server {
        let path = dir.join(name);
        let listener = server::bind(&path).unwrap();
        let state = connected_state();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(server::serve_with(
            listener,
            context(state.clone(), access),
            limits,
            shutdown.clone(),
        ));
        Server {
            path,
            state,
            shutdown,
            task: Some(task),
        }
    }

    fn default(dir: &Path) -> Server {
        Server::start(dir, "A0TEST0001.test.sock", Limits::default(), own_policy())
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        let task = self.task.take().unwrap();
        timeout(WAIT, task)
            .await
            .expect("serve ends on shutdown")
            .unwrap();
    }

    async fn ask(&self, command: Command) -> Result<Response, ClientError> {
        client::request(&self.path, command, WAIT).await
    }

    /// A status request must succeed, promptly.
    async fn assert_answers(&self) {
        let started = Instant::now();
        match self.ask(Command::Status).await {
            Ok(Response::Status(report)) => assert_eq!(report.pid, std::process::id()),
            other => panic!("expected a status answer, got {other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(2), "slow answer");
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

async fn flowcoachctl(args: &[&str], env: &[(&str, &str)]) -> Run {
    let output = flowcoach_harness::ctl::run(args, env).await;
    Run {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Writes `bytes` and reads the answer until the server closes.
async fn raw_exchange(path: &Path, bytes: &[u8]) -> String {
    let mut stream = UnixStream::connect(path).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut answer = Vec::new();
    timeout(WAIT, (&mut stream).take(1 << 20).read_to_end(&mut answer))
        .await
        .expect("the server answers and closes")
        .unwrap();
    String::from_utf8(answer).unwrap()
}

fn error_message(answer: &str) -> String {
    match serde_json::from_str::<Response>(answer.trim_end()) {
        Ok(Response::Error { message, .. }) => message,
        other => panic!("expected an error answer, got {other:?} from {answer:?}"),
    }
}

#[tokio::test]
async fn status_and_health_through_flowcoachctl() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::default(dir.path());
    let socket = server.path.to_str().unwrap();
    let mode = std::fs::metadata(&server.path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660);

    let run = flowcoachctl(&["status", "--socket", socket], &[]).await;
    assert_eq!(run.code, Some(0), "{}{}", run.stdout, run.stderr);
    let pid = std::process::id();
    for expected in [
        format!("pid {pid} on "),
        format!("environment test, app {APP}\n"),
        "state:        connected (since ".to_owned(),
        ", up 1h 2m)".to_owned(),
        "sockets:      1 ours, 1 counted by Slack\n".to_owned(),
        "reconnects:   0 (last disconnect: refresh_requested), rotations 1\n".to_owned(),
        "envelopes:    received 3, acked 3, deduplicated 0, deferred 0, in flight 0\n".to_owned(),
        "token:        from SLACK_APP_TOKEN\n".to_owned(),
        "health:       healthy\n".to_owned(),
    ] {
        assert!(
            run.stdout.contains(&expected),
            "{expected:?} in:\n{}",
            run.stdout
        );
    }

    let run = flowcoachctl(&["--socket", socket, "status", "--json"], &[]).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    let report: StatusReport = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(report.pid, pid);
    assert_eq!(report.app_id.as_deref(), Some(APP));
    assert_eq!(report.phase_name, "connected");
    assert_eq!(report.counters.envelopes_received, 3);
    assert_eq!(report.rotations, 1);
    assert!(report.uptime_s >= 7200);
    assert_eq!(report.health, Health::Healthy);

    let run = flowcoachctl(&["health", "--socket", socket], &[]).await;
    assert_eq!((run.code, run.stdout.as_str()), (Some(0), "healthy\n"));

    server.state.update(|status| {
        status.num_connections = Some(3);
        status.other_connections = Some(2);
    });
    let run = flowcoachctl(&["health", "--socket", socket], &[]).await;
    assert_eq!(run.code, Some(1));
    assert!(
        run.stdout
            .starts_with("degraded: Slack counted 3 open sockets"),
        "{}",
        run.stdout
    );

    server.state.set_phase(Phase::Stopped);
    server
        .state
        .update(|status| status.num_connections = Some(1));
    let run = flowcoachctl(&["health", "--socket", socket], &[]).await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (Some(1), "unhealthy: stopped\n")
    );
    server.stop().await;
}

#[tokio::test]
async fn no_daemon_means_exit_2_for_health_and_1_for_status() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.sock");
    let missing = missing.to_str().unwrap();
    let run = flowcoachctl(&["health", "--socket", missing], &[]).await;
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(
        run.stderr.contains(&format!(
            "no flowcoach answers at {missing}: is it running?"
        )),
        "{}",
        run.stderr
    );
    let run = flowcoachctl(&["status", "--socket", missing], &[]).await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);

    // A socket file whose daemon is gone (connection refused).
    let server = Server::default(dir.path());
    let path = server.path.clone();
    server.stop().await;
    let run = flowcoachctl(&["health", "--socket", path.to_str().unwrap()], &[]).await;
    assert_eq!(run.code, Some(2), "{}", run.stderr);
    assert!(
        run.stderr.contains("no flowcoach answers"),
        "{}",
        run.stderr
    );
    // bind replaces the stale socket.
    let again = Server::default(dir.path());
    again.assert_answers().await;
}

#[tokio::test]
async fn the_socket_is_found_in_the_runtime_directory() {
    let dir = tempfile::tempdir().unwrap();
    let runtime_dir = [("FLOWCOACH_RUNTIME_DIR", dir.path().to_str().unwrap())];
    let run = flowcoachctl(&["health"], &runtime_dir).await;
    assert_eq!(run.code, Some(2));
    assert!(
        run.stderr.contains("no flowcoach control socket"),
        "{}",
        run.stderr
    );

    let test = Server::default(dir.path());
    std::fs::write(dir.path().join("A0TEST0001.test.pid"), "1").unwrap();
    let run = flowcoachctl(&["health"], &runtime_dir).await;
    assert_eq!(
        (run.code, run.stdout.as_str()),
        (Some(0), "healthy\n"),
        "{}",
        run.stderr
    );

    let prod = Server::start(
        dir.path(),
        "A0TEST0001.prod.sock",
        Limits::default(),
        own_policy(),
    );
    prod.state.set_phase(Phase::Draining);
    let run = flowcoachctl(&["status"], &runtime_dir).await;
    assert_eq!(run.code, Some(1));
    assert!(
        run.stderr.contains("several flowcoach control sockets")
            && run
                .stderr
                .contains("A0TEST0001.prod.sock, A0TEST0001.test.sock")
            && run.stderr.contains("--env"),
        "{}",
        run.stderr
    );
    let run = flowcoachctl(&["health"], &runtime_dir).await;
    assert_eq!(run.code, Some(2));

    let run = flowcoachctl(&["health", "--env", "prod"], &runtime_dir).await;
    assert_eq!(run.code, Some(1));
    assert_eq!(run.stdout, "degraded: draining before stopping\n");
    let run = flowcoachctl(&["health", "--app", APP, "--env", "test"], &runtime_dir).await;
    assert_eq!(run.code, Some(0));
    let variable = [("FLOWCOACH_CONTROL_SOCKET", test.path.to_str().unwrap())];
    let run = flowcoachctl(&["health"], &variable).await;
    assert_eq!(run.code, Some(0), "{}", run.stderr);
}

#[tokio::test]
async fn usage_errors_exit_64_help_and_version_exit_0() {
    for (args, code) in [
        (&[][..], 64),
        (&["status", "--bogus"][..], 64),
        (&["health", "--timeout", "soon"][..], 64),
        (&["frobnicate"][..], 64),
        (&["--version"][..], 0),
        (&["--help"][..], 0),
        (&["status", "--help"][..], 0),
    ] {
        let run = flowcoachctl(args, &[]).await;
        assert_eq!(
            run.code,
            Some(code),
            "{args:?}: {}{}",
            run.stdout,
            run.stderr
        );
    }
}

#[tokio::test]
async fn garbage_and_bad_requests_get_errors_naming_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::default(dir.path());
    for (request, expected) in [
        (&b"hello there\n"[..], "not JSON"),
        (b"\xff\xfe\x00garbage\n", "not JSON"),
        (b"[1,2]\n", "expected a JSON object"),
        (b"{\"command\":\"status\"}\n", "no \"version\" field"),
        (
            b"{\"version\":\"one\",\"command\":\"status\"}\n",
            "protocol number",
        ),
        (
            b"{\"version\":1,\"command\":\"reboot\"}\n",
            "unknown variant `reboot`",
        ),
        (b"{\"version\":1}\n", "command"),
    ] {
        let answer = raw_exchange(&server.path, request).await;
        let message = error_message(&answer);
        assert!(message.contains(expected), "{request:?}: {message}");
        server.assert_answers().await;
    }
    // A request without the newline, ended by the client's half-close, is still served.
    let mut stream = UnixStream::connect(&server.path).await.unwrap();
    stream
        .write_all(br#"{"version":1,"command":"health"}"#)
        .await
        .unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = String::new();
    timeout(WAIT, stream.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with(r#"{"response":"health""#), "{answer}");
}

#[tokio::test]
async fn a_version_mismatch_names_both_versions() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::default(dir.path());
    // Even a command this daemon does not know: the version is checked first.
    for request in [
        &b"{\"version\":2,\"command\":\"status\"}\n"[..],
        b"{\"version\":2,\"command\":\"handover\",\"fd\":3}\n",
    ] {
        let answer = raw_exchange(&server.path, request).await;
        let response: Response = serde_json::from_str(answer.trim_end()).unwrap();
        assert_eq!(
            response,
            Response::Error {
                message: "flowcoachctl speaks protocol 2, this daemon 1: use the flowcoachctl of the same release".to_owned(),
                protocol: Some(PROTOCOL_VERSION),
            }
        );
    }
    server.assert_answers().await;
}

#[tokio::test]
async fn a_10_mb_line_is_cut_off_after_64_kib() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::default(dir.path());
    let stream = UnixStream::connect(&server.path).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let flood = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        let mut written = 0usize;
        while written < 10 << 20 {
            match writer.write(&chunk).await {
                Ok(n) => written += n,
                Err(_) => return (written, true),
            }
        }
        (written, false)
    });
    let mut answer = Vec::new();
    timeout(WAIT, reader.read_to_end(&mut answer))
        .await
        .expect("the server answers and closes")
        .ok();
    let message = error_message(&String::from_utf8_lossy(&answer));
    assert!(message.contains("too long"), "{message}");
    let (written, failed) = timeout(WAIT, flood)
        .await
        .expect("the writer stops")
        .unwrap();
    assert!(failed, "the server read all {written} bytes");
    assert!(written < 10 << 20, "{written}");
    server.assert_answers().await;
}

#[tokio::test]
async fn a_silent_client_is_dropped_after_the_timeout_without_holding_others_up() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        exchange_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let server = Server::start(dir.path(), "t.sock", limits, own_policy());
    let started = Instant::now();
    let mut silent = UnixStream::connect(&server.path).await.unwrap();
    // Others are served while it sits there.
    server.assert_answers().await;
    let mut answer = String::new();
    timeout(WAIT, silent.read_to_string(&mut answer))
        .await
        .expect("the silent client is dropped")
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(error_message(&answer).contains("timed out"), "{answer}");
    server.assert_answers().await;
}

#[tokio::test]
async fn clients_that_never_read_do_not_block_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::default(dir.path());
    let mut deaf = Vec::new();
    for _ in 0..20 {
        let mut stream = UnixStream::connect(&server.path).await.unwrap();
        stream
            .write_all(b"{\"version\":1,\"command\":\"status\"}\n")
            .await
            .unwrap();
        deaf.push(stream);
    }
    server.assert_answers().await;
    drop(deaf);
    server.stop().await;
}

/// 1000 connections opened and held without a request: each new one takes the slot of the
/// one that has waited longest for its request line, which is told so and closed. A
/// request in the meantime is answered, and the oldest held connections were closed at
/// once, not left hanging.
#[tokio::test]
async fn a_thousand_idle_connections_make_room_for_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        exchange_timeout: Duration::from_secs(60),
        request_timeout: Duration::from_secs(60),
        ..Limits::default()
    };
    let server = Server::start(dir.path(), "t.sock", limits, own_policy());
    let mut held = Vec::new();
    for i in 0..1000 {
        held.push(UnixStream::connect(&server.path).await.unwrap());
        if i % 50 == 0 {
            tokio::task::yield_now().await;
        }
    }
    server.assert_answers().await;
    // The first one was dropped to make room: its read ends at once with the reason.
    let mut line = String::new();
    timeout(WAIT, BufReader::new(&mut held[0]).read_line(&mut line))
        .await
        .expect("dropped at once")
        .unwrap();
    assert!(error_message(&line).contains("waited longest"), "{line:?}");
    drop(held);
    server.assert_answers().await;
}

/// Idle connections and half-open ones (a partial request line, never finished) fill every
/// slot: `flowcoachctl health`, as a container health check runs it, still answers at once
/// with exit 0, again and again.
#[tokio::test]
async fn idle_and_half_open_connections_do_not_keep_health_checks_out() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::default(dir.path());
    let socket = server.path.to_str().unwrap().to_owned();
    let mut hostile = Vec::new();
    for round in 0..3 {
        for _ in 0..Limits::default().max_clients + 8 {
            hostile.push(UnixStream::connect(&server.path).await.unwrap());
            let mut half_open = UnixStream::connect(&server.path).await.unwrap();
            // Refused at once by a server without room: then this write fails.
            let _ = half_open.write_all(br#"{"version":1,"command":"hea"#).await;
            hostile.push(half_open);
        }
        for command in ["health", "status"] {
            let mut ctl = tokio::process::Command::new(env!("CARGO_BIN_EXE_flowcoachctl"));
            ctl.args([command, "--socket", &socket])
                .env_clear()
                .kill_on_drop(true);
            let output = timeout(Duration::from_secs(2), ctl.output())
                .await
                .unwrap_or_else(|_| panic!("round {round}: {command} did not answer at once"))
                .unwrap();
            assert_eq!(
                output.status.code(),
                Some(0),
                "round {round}: {command}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
    drop(hostile);
    server.stop().await;
}

/// A connection that sends nothing is dropped once its request deadline passes, well
/// before the exchange's own bound.
#[tokio::test]
async fn the_request_line_has_a_deadline_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let limits = Limits {
        exchange_timeout: Duration::from_secs(60),
        request_timeout: Duration::from_millis(300),
        ..Limits::default()
    };
    let server = Server::start(dir.path(), "t.sock", limits, own_policy());
    let mut slow = UnixStream::connect(&server.path).await.unwrap();
    slow.write_all(br#"{"version":1,"#).await.unwrap();
    let mut answer = String::new();
    timeout(WAIT, slow.read_to_string(&mut answer))
        .await
        .expect("the slow client is dropped")
        .unwrap();
    let message = error_message(&answer);
    assert!(message.contains("request line"), "{message}");
    server.assert_answers().await;
}

#[test]
fn the_access_decision_uses_uid_and_groups() {
    let me = nix::unistd::Uid::effective().as_raw();
    let other = me.wrapping_add(4321).max(1);
    let policy = AccessPolicy::from_parts(other, Some(("flowcoach-ops", 4242)));
    let caller = |uid, gid| Peer {
        uid,
        gid,
        pid: Some(99),
    };
    assert!(policy.check(&caller(0, 0), &[]).is_ok(), "root");
    assert!(
        policy.check(&caller(other, 1), &[]).is_ok(),
        "the daemon's user"
    );
    assert!(
        policy.check(&caller(5000, 4242), &[]).is_ok(),
        "primary group"
    );
    assert!(
        policy.check(&caller(5000, 5000), &[7, 4242]).is_ok(),
        "member"
    );
    let refusal = policy.check(&caller(5000, 5000), &[5000]).unwrap_err();
    assert_eq!(
        refusal.to_string(),
        "permission denied: uid 5000 is not root, the daemon's user or a member of group flowcoach-ops"
    );
}

/// A caller outside the policy is refused by the running server: as root, a real
/// `flowcoachctl` running as `nobody`; otherwise this process against a policy that
/// names another user.
#[tokio::test]
async fn refused_callers_get_permission_denied() {
    use std::os::unix::process::CommandExt;

    let dir = tempfile::tempdir().unwrap();
    let me = nix::unistd::Uid::effective().as_raw();
    let group = Some(("flowcoach-ops", 4242));
    if me != 0 {
        let policy = AccessPolicy::from_parts(me.wrapping_add(4321), group);
        let server = Server::start(dir.path(), "t.sock", Limits::default(), policy);
        match server.ask(Command::Status).await {
            Ok(Response::Error { message, .. }) => assert_eq!(
                message,
                format!(
                    "permission denied: uid {me} is not root, the daemon's user or a member of group flowcoach-ops"
                )
            ),
            other => panic!("expected a refusal, got {other:?}"),
        }
        eprintln!("not root: skipping the refused flowcoachctl running as another user");
        return;
    }
    let policy = AccessPolicy::from_parts(0, group);
    let server = Server::start(dir.path(), "t.sock", Limits::default(), policy);
    // Reachable for nobody: the directory, the socket, and a copy of the binary.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&server.path, std::fs::Permissions::from_mode(0o666)).unwrap();
    let binary = dir.path().join("flowcoachctl");
    std::fs::copy(env!("CARGO_BIN_EXE_flowcoachctl"), &binary).unwrap();
    std::fs::set_permissions(&binary, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut command = std::process::Command::new(&binary);
    command
        .args(["status", "--socket"])
        .arg(&server.path)
        .env_clear()
        .uid(65534)
        .gid(65534);
    let mut command = tokio::process::Command::from(command);
    // Another test's child, forked while the copy was open for writing, can make exec fail
    // with ETXTBSY for a moment: try again.
    let output = timeout(WAIT, async {
        loop {
            match command.output().await {
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                result => return result,
            }
        }
    })
    .await
    .expect("flowcoachctl hung")
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "permission denied: uid 65534 is not root, the daemon's user or a member of group flowcoach-ops"
        ),
        "{stderr}"
    );
    // The daemon's own user still gets in.
    server.assert_answers().await;
}

#[tokio::test]
async fn bind_leaves_files_that_are_not_sockets_alone() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.sock");
    std::fs::write(&path, "precious").unwrap();
    let error = server::bind(&path).unwrap_err();
    assert!(error.to_string().contains("not a socket"), "{error}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}

const SYSTEMD_CHILD: &str = "FLOWCOACH_TEST_SYSTEMD_CHILD";

/// Socket activation as systemd does it: two fds, `LISTEN_FDNAMES=other:control`,
/// `LISTEN_PID` set to the child's pid; the child serves on the one named `control`.
#[tokio::test]
async fn from_systemd_takes_the_socket_named_control() {
    let dir = tempfile::tempdir().unwrap();
    let other = std::os::unix::net::UnixListener::bind(dir.path().join("other.sock")).unwrap();
    let control = std::os::unix::net::UnixListener::bind(dir.path().join("control.sock")).unwrap();
    let activation = Activation::new(&[(&other, "other"), (&control, "control")]);
    let mut command = Activation::command(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            "control::systemd_child",
            "--ignored",
            "--nocapture",
        ])
        .env(SYSTEMD_CHILD, "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .kill_on_drop(true);
    activation.pass(&mut command);
    let child = command.spawn().unwrap();
    let child_pid = child.id().unwrap();
    drop(command);
    // The socket is listening already: the request waits in the backlog until the child
    // serves it.
    let response = client::request(&dir.path().join("control.sock"), Command::Status, WAIT).await;
    match response {
        Ok(Response::Status(report)) => assert_eq!(report.pid, child_pid),
        other => panic!("expected the child's status, got {other:?}"),
    }
    let other_answer = client::request(
        &dir.path().join("other.sock"),
        Command::Health,
        Duration::from_millis(300),
    )
    .await;
    assert!(
        matches!(other_answer, Err(ClientError::Timeout { .. })),
        "{other_answer:?}"
    );
    drop(child);
}

#[test]
#[ignore = "runs in the child process of from_systemd_takes_the_socket_named_control"]
fn systemd_child() {
    if std::env::var_os(SYSTEMD_CHILD).is_none() {
        return;
    }
    let listener = server::from_systemd()
        .expect("from_systemd")
        .control
        .expect("a socket named control");
    assert!(server::from_systemd().is_err(), "taken twice");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let listener = tokio::net::UnixListener::from_std(listener).unwrap();
        let ctx = context(connected_state(), own_policy());
        let _ = timeout(WAIT, server::serve(listener, ctx, CancellationToken::new())).await;
    });
}

#[test]
fn without_socket_activation_there_is_nothing_to_take() {
    // The test process is not socket-activated (LISTEN_PID is not ours, if set at all).
    let passed = server::from_systemd().unwrap();
    assert!(passed.control.is_none() && passed.metrics.is_none());
}

#[tokio::test]
async fn a_response_is_never_longer_than_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::default(dir.path());
    let long = "x".repeat(MAX_MESSAGE_BYTES);
    server
        .state
        .update(|status| status.last_disconnect = Some(long));
    match server.ask(Command::Status).await {
        Ok(Response::Error { message, .. }) => {
            assert!(message.contains("longer than"), "{message}")
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

const EMFILE_CHILD: &str = "FLOWCOACH_TEST_EMFILE_CHILD";

/// With the fd table full, `accept` fails with EMFILE while a connection waits: the server
/// must pause between attempts instead of spinning, and serve the connection once fds are
/// free again. Run in a child process: the fd table is per process.
#[tokio::test]
async fn accept_errors_do_not_spin() {
    let mut command = tokio::process::Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--exact",
            "control::emfile_child",
            "--ignored",
            "--nocapture",
        ])
        .env(EMFILE_CHILD, "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = timeout(WAIT * 2, command.output())
        .await
        .expect("the child finishes")
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(output.status.success(), "{text}");
    assert!(text.contains("1 passed"), "{text}");
}

#[test]
#[ignore = "runs in the child process of accept_errors_do_not_spin"]
fn emfile_child() {
    use nix::sys::resource::{Resource, UsageWho, getrlimit, getrusage, setrlimit};

    if std::env::var_os(EMFILE_CHILD).is_none() {
        return;
    }
    let cpu = || {
        let usage = getrusage(UsageWho::RUSAGE_SELF).unwrap();
        let micros = |t: nix::sys::time::TimeVal| {
            Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
        };
        micros(usage.user_time()) + micros(usage.system_time())
    };
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, 256, hard).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.sock");
        let listener = server::bind(&path).unwrap();
        let shutdown = CancellationToken::new();
        let ctx = context(connected_state(), own_policy());
        let serving = tokio::spawn(server::serve(listener, ctx, shutdown.clone()));
        // Connected (in the backlog) before the server runs, then every fd taken.
        let waiting = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let mut hoard = Vec::new();
        loop {
            match waiting.as_fd().try_clone_to_owned() {
                Ok(fd) => hoard.push(fd),
                Err(e) if e.raw_os_error() == Some(nix::libc::EMFILE) => break,
                Err(e) => panic!("{e}"),
            }
        }
        let before = cpu();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let spent = cpu() - before;
        assert!(
            spent < Duration::from_millis(200),
            "spun: {spent:?} of CPU in 500ms"
        );
        drop(hoard);
        waiting.set_nonblocking(true).unwrap();
        let mut waiting = UnixStream::from_std(waiting).unwrap();
        waiting
            .write_all(b"{\"version\":1,\"command\":\"health\"}\n")
            .await
            .unwrap();
        let mut answer = String::new();
        timeout(WAIT, waiting.read_to_string(&mut answer))
            .await
            .expect("served once fds are free")
            .unwrap();
        assert!(answer.starts_with(r#"{"response":"health""#), "{answer}");
        shutdown.cancel();
        timeout(WAIT, serving).await.unwrap().unwrap();
    });
}
