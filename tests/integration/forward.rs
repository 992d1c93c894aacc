//! `[forward]`: flowcoach re-sends each envelope to an app in HTTP mode, signed as Slack
//! signs, and acks with the app's answers. The app is an HTTP server in the test process
//! that verifies every signature; flowcoach is a real process against the simulator.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use flowcoach_harness::process::{self, Strays};
use flowcoach_harness::{APP, Daemon, FAST_CONFIG, WAIT, acked, connected, ctl, simulator};
use flowcoach_protocol::signature::{SIGNATURE_HEADER, SignatureError, TIMESTAMP_HEADER, verify};
use flowcoach_sim::{EnvelopeSpec, Simulator};
use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::watch;

pub(crate) const SECRET: &str = "fwd-s3cr3t-8f742231b10e8888abcd99";

/// What the app answers next.
#[derive(Debug, Clone)]
pub(crate) enum Reply {
    /// 200 with this content type and body.
    Ok(&'static str, String),
    Status(u16),
    /// This status with `X-Slack-No-Retry: 1`.
    NoRetry(u16),
    /// The reply after a delay.
    Slow(Duration, Box<Reply>),
    /// Never answers.
    Hang,
    /// 302 to this path of the app.
    Redirect(&'static str),
    /// 200 with a body of this many bytes, streamed in chunks (no Content-Length).
    Huge(usize),
}

/// One request as the app saw it.
#[derive(Debug, Clone)]
pub(crate) struct Seen {
    path: String,
    content_type: String,
    retry_num: Option<String>,
    retry_reason: Option<String>,
    pub(crate) body: Vec<u8>,
    pub(crate) signature: Result<(), SignatureError>,
}

impl Seen {
    fn form(&self) -> Vec<(String, String)> {
        url::form_urlencoded::parse(&self.body)
            .into_owned()
            .collect()
    }

    fn field(&self, name: &str) -> String {
        self.form()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
            .unwrap_or_else(|| panic!("no field {name} in {:?}", self))
    }
}

struct AppState {
    reply: Mutex<Reply>,
    seen: watch::Sender<Vec<Seen>>,
}

/// The app: an HTTP server on loopback (or a unix socket) that records and verifies every
/// request.
pub(crate) struct App {
    /// The URL's authority: `127.0.0.1:port`, or `localhost` on a unix socket.
    authority: String,
    state: Arc<AppState>,
    task: tokio::task::JoinHandle<()>,
}

impl App {
    pub(crate) async fn start(reply: Reply) -> App {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), reply)
    }

    pub(crate) fn start_on(listener: TcpListener, reply: Reply) -> App {
        let authority = listener.local_addr().unwrap().to_string();
        Self::serve(listener, authority, reply)
    }

    /// The app listening on a unix socket at `path`, as `[forward] socket` reaches it.
    fn start_on_unix(path: &std::path::Path, reply: Reply) -> App {
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        Self::serve(listener, "localhost".to_owned(), reply)
    }

    fn serve<L>(listener: L, authority: String, reply: Reply) -> App
    where
        L: axum::serve::Listener,
        L::Addr: std::fmt::Debug,
    {
        let state = Arc::new(AppState {
            reply: Mutex::new(reply),
            seen: watch::Sender::new(Vec::new()),
        });
        let router = axum::Router::new()
            .fallback(answer)
            .with_state(state.clone());
        let task = tokio::spawn(async move {
            axum::serve(listener, router).await.unwrap();
        });
        App {
            authority,
            state,
            task,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://{}/slack/events", self.authority)
    }

    fn set(&self, reply: Reply) {
        *self.state.reply.lock().unwrap() = reply;
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.state.seen.borrow().clone()
    }

    /// Waits until the app has seen `count` requests; all of them.
    pub(crate) async fn wait_seen(&self, count: usize) -> Vec<Seen> {
        // The count only: a long run's requests would bury the failure.
        self.try_wait_seen(count).await.unwrap_or_else(|seen| {
            panic!(
                "the app saw {} of {count} requests within {WAIT:?}",
                seen.len()
            )
        })
    }

    /// Waits until the app has seen `count` requests: all of them, or (after [`WAIT`])
    /// the fewer it saw.
    pub(crate) async fn try_wait_seen(&self, count: usize) -> Result<Vec<Seen>, Vec<Seen>> {
        let mut seen = self.state.seen.subscribe();
        match tokio::time::timeout(WAIT, seen.wait_for(|s| s.len() >= count)).await {
            Ok(seen) => Ok(seen.unwrap().clone()),
            Err(_) => Err(self.seen()),
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn answer(
    State(app): State<Arc<AppState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let text = |name: &str| headers.get(name).map(|v| v.to_str().unwrap().to_owned());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let signature = verify(
        SECRET.as_bytes(),
        &text(TIMESTAMP_HEADER).unwrap_or_default(),
        &text(SIGNATURE_HEADER).unwrap_or_default(),
        &body,
        now,
    );
    app.seen.send_modify(|seen| {
        seen.push(Seen {
            path: uri.path().to_owned(),
            content_type: text("content-type").unwrap_or_default(),
            retry_num: text("x-slack-retry-num"),
            retry_reason: text("x-slack-retry-reason"),
            body: body.to_vec(),
            signature,
        })
    });
    let reply = app.reply.lock().unwrap().clone();
    respond(reply).await
}

async fn respond(reply: Reply) -> Response {
    match reply {
        Reply::Ok(content_type, body) => {
            ([(header::CONTENT_TYPE, content_type)], body).into_response()
        }
        Reply::Status(code) => StatusCode::from_u16(code).unwrap().into_response(),
        Reply::NoRetry(code) => (
            StatusCode::from_u16(code).unwrap(),
            [("x-slack-no-retry", "1")],
        )
            .into_response(),
        Reply::Slow(delay, then) => {
            tokio::time::sleep(delay).await;
            Box::pin(respond(*then)).await
        }
        Reply::Hang => std::future::pending().await,
        Reply::Redirect(path) => (StatusCode::FOUND, [(header::LOCATION, path)]).into_response(),
        Reply::Huge(bytes) => {
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let chunks = (0..bytes / chunk.len()).map(move |_| Ok::<_, Infallible>(chunk.clone()));
            Body::from_stream(futures_util::stream::iter(chunks)).into_response()
        }
    }
}

/// After the `[forward]` settings: the path without the inbox, where an event the app did
/// not take is left unacked for Slack's redelivery.
const NO_INBOX: &str = "[inbox]\nenabled = false";

pub(crate) fn config(url: &str, extra: &str) -> String {
    format!("{FAST_CONFIG}\n[forward]\nurl = \"{url}\"\n{extra}\n")
}

/// flowcoach forwarding to `url`, the secret in `SLACK_SIGNING_SECRET`, connected.
async fn forwarding(sim: &Simulator, url: &str, extra: &str) -> Daemon {
    let daemon = Daemon::start_with(
        sim,
        &config(url, extra),
        &[("SLACK_SIGNING_SECRET", SECRET)],
    );
    connected(sim).await;
    daemon
}

/// An address where nothing listens (yet): the app is down.
pub(crate) async fn vacant_address() -> (SocketAddr, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    (addr, format!("http://{addr}/slack/events"))
}

fn interaction() -> EnvelopeSpec {
    EnvelopeSpec::Interactive {
        payload: json!({
            "type": "block_actions",
            "user": { "id": "U0SIM" },
            "actions": [{ "action_id": "approve", "value": "a&b=c é" }],
        }),
        accepts_response_payload: false,
    }
}

fn event_payload(event_id: &str, text: &str) -> Value {
    json!({
        "type": "event_callback",
        "event_id": event_id,
        "team_id": "T0SIM",
        "api_app_id": APP,
        "event": { "type": "message", "channel": "C0SIM", "user": "U0SIM", "text": text },
    })
}

fn event(event_id: &str) -> EnvelopeSpec {
    EnvelopeSpec::EventWithoutInner {
        event_id: Some(event_id.to_owned()),
        payload: event_payload(event_id, "hello"),
    }
}

#[tokio::test]
async fn envelopes_arrive_as_slack_sends_them_in_http_mode_signed() {
    let sim = simulator(|_| {}).await;
    let app = App::start(Reply::Ok("text/plain", String::new())).await;
    let mut daemon = forwarding(&sim, &app.url(), "").await;

    let payload = event_payload("EvFwd1", "héllo \"quoted\" </script> ✓ \\ \u{1}");
    let event = acked(
        &sim,
        EnvelopeSpec::EventWithoutInner {
            event_id: Some("EvFwd1".into()),
            payload: payload.clone(),
        },
    )
    .await;
    assert_eq!(event.ack_payload, None);
    // Acked once on disk, then delivered from the inbox: the app has it before the rest.
    app.wait_seen(1).await;
    let slash = acked(
        &sim,
        EnvelopeSpec::slash_command("/deploy", "prod & more=1 é"),
    )
    .await;
    assert_eq!(slash.ack_payload, None, "an empty answer shows nothing");
    acked(&sim, interaction()).await;

    let seen = app.wait_seen(3).await;
    for request in &seen {
        assert_eq!(request.path, "/slack/events");
        assert_eq!(request.signature, Ok(()), "{request:?}");
        assert_eq!(request.retry_num, None);
    }
    // The event: its payload, byte for byte as the simulator sent it.
    assert_eq!(seen[0].content_type, "application/json");
    assert_eq!(
        seen[0].body,
        serde_json::to_string(&payload).unwrap().as_bytes()
    );
    // The slash command: its fields, form-encoded.
    assert_eq!(seen[1].content_type, "application/x-www-form-urlencoded");
    assert_eq!(seen[1].field("command"), "/deploy");
    assert_eq!(seen[1].field("text"), "prod & more=1 é");
    assert_eq!(seen[1].field("user_id"), "U0SIM");
    assert!(!seen[1].field("trigger_id").is_empty());
    // The interaction: one field, payload=<its JSON>.
    assert_eq!(seen[2].content_type, "application/x-www-form-urlencoded");
    assert_eq!(seen[2].form().len(), 1);
    let interaction: Value = serde_json::from_str(&seen[2].field("payload")).unwrap();
    assert_eq!(interaction["actions"][0]["value"], "a&b=c é");

    let status = daemon.status_json().await;
    assert_eq!(status["app_url"], app.url());
    assert_eq!(status["counters"]["forwarded"], 3);
    assert_eq!(status["health"]["health"], "healthy");
    // The secret is nowhere: not in the logs, the status or the process's environment.
    let environ = std::fs::read(format!("/proc/{}/environ", daemon.pid())).unwrap();
    daemon.stop().await;
    let stderr = daemon.stderr();
    assert!(
        stderr.contains(&app.url()),
        "the start log names the app's URL"
    );
    for (what, text) in [
        ("logs", stderr),
        ("status", status.to_string()),
        (
            "environment",
            String::from_utf8_lossy(&environ).into_owned(),
        ),
    ] {
        assert!(
            !text.contains(SECRET),
            "the signing secret is in the {what}: {text}"
        );
    }
}

#[tokio::test]
async fn an_app_on_a_unix_socket_gets_every_request_and_answers_in_the_ack() {
    let sim = simulator(|_| {}).await;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("app.sock");
    let answer = json!({ "text": "over the socket" });
    let app = App::start_on_unix(&socket, Reply::Ok("application/json", answer.to_string()));
    let mut daemon = forwarding(
        &sim,
        &app.url(),
        &format!("socket = \"{}\"", socket.display()),
    )
    .await;

    let slash = acked(&sim, EnvelopeSpec::slash_command("/deploy", "prod")).await;
    assert_eq!(slash.ack_payload, Some(answer));
    acked(&sim, event("EvUnix1")).await;
    let seen = app.wait_seen(2).await;
    assert!(seen.iter().all(|s| s.signature.is_ok()), "{seen:?}");
    assert!(seen.iter().all(|s| s.path == "/slack/events"), "{seen:?}");
    let status = daemon.status_json().await;
    assert_eq!(
        status["app_url"],
        format!(
            "http://localhost/slack/events over the unix socket {}",
            socket.display()
        )
    );
    daemon.stop().await;
}

#[tokio::test]
async fn a_failing_app_leaves_events_to_slacks_redelivery() {
    let sim = simulator(|c| c.ack_deadline = Duration::from_secs(1)).await;
    let app = App::start(Reply::Status(500)).await;
    let mut daemon = forwarding(&sim, &app.url(), NO_INBOX).await;

    let id = sim.inject(APP, event("EvFail1"));
    let failed = daemon
        .wait_log("the app did not take the envelope", |l| l["status"] == 500)
        .await;
    assert_eq!(failed["envelope_id"], id.as_str());
    daemon
        .wait_log("handler failed; envelope left unacked", |_| true)
        .await;
    assert!(!sim.record().is_acked(&id), "a 500 must not ack the event");
    let status = daemon.status_json().await;
    assert_eq!(status["health"]["health"], "degraded", "{status}");
    assert!(
        status["health"]["reason"]
            .as_str()
            .unwrap()
            .contains("HTTP 500"),
        "{status}"
    );
    assert!(
        status["app_last_error"]
            .as_str()
            .unwrap()
            .contains("HTTP 500")
    );

    // The app recovers: Slack's redelivery is forwarded again (not taken for a duplicate),
    // says it is a retry, and is acked once the app took it.
    app.set(Reply::Ok("text/plain", String::new()));
    sim.wait_acked(WAIT, &[&id])
        .await
        .expect("acked after the app took it");
    let seen = app.seen();
    assert!(seen.len() >= 2, "{seen:?}\n{}", daemon.stderr());
    let retry = seen.last().unwrap();
    assert_eq!(retry.signature, Ok(()));
    assert_eq!(
        retry.retry_num.as_deref(),
        Some(&*(seen.len() - 1).to_string())
    );
    assert_eq!(retry.retry_reason.as_deref(), Some("timeout"));
    assert_eq!(retry.body, seen[0].body);
    let status = daemon.status_json().await;
    assert_eq!(status["health"]["health"], "healthy", "{status}");
    daemon.stop().await;
}

#[tokio::test]
async fn a_stopped_app_gets_the_redelivery_once_it_is_back() {
    let sim = simulator(|c| c.ack_deadline = Duration::from_secs(1)).await;
    let (addr, url) = vacant_address().await;
    let mut daemon = forwarding(&sim, &url, NO_INBOX).await;

    let id = sim.inject(APP, event("EvDown1"));
    let failed = daemon
        .wait_log("the app did not take the envelope", |_| true)
        .await;
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("cannot connect to the app"),
        "{failed}"
    );
    daemon
        .wait_log("handler failed; envelope left unacked", |_| true)
        .await;
    assert!(!sim.record().is_acked(&id));

    let app = App::start_on(TcpListener::bind(addr).await.unwrap(), Reply::Status(200));
    let record = sim
        .wait_acked(WAIT, &[&id])
        .await
        .expect("acked once the app is back");
    let seen = app.wait_seen(1).await;
    assert_eq!(seen[0].signature, Ok(()));
    assert!(seen[0].retry_num.is_some(), "{seen:?}");
    let deliveries = &record.envelope(&id).unwrap().deliveries;
    assert!(deliveries.len() >= 2, "{deliveries:?}");
    daemon.stop().await;
}

#[tokio::test]
async fn the_apps_answer_to_a_slash_command_rides_in_the_ack() {
    let sim = simulator(|_| {}).await;
    let answer = json!({ "response_type": "in_channel", "text": "Deploying *prod*" });
    let app = App::start(Reply::Ok("application/json", answer.to_string())).await;
    let commands = format!("commands_url = \"http://{}/commands\"", app.authority);
    let mut daemon = forwarding(&sim, &app.url(), &commands).await;

    let slash = acked(&sim, EnvelopeSpec::slash_command("/deploy", "prod")).await;
    assert_eq!(slash.ack_payload, Some(answer));
    assert_eq!(
        app.wait_seen(1).await[0].path,
        "/commands",
        "the per-kind URL"
    );
    app.set(Reply::Ok("text/plain; charset=utf-8", "On it.".into()));
    let slash = acked(&sim, EnvelopeSpec::slash_command("/deploy", "dev")).await;
    assert_eq!(slash.ack_payload, Some(json!({ "text": "On it." })));
    let line = daemon
        .wait_log("the app answered", |l| l["answered"] == true)
        .await;
    assert_eq!(line["status"], 200);
    daemon.stop().await;
}

#[tokio::test]
async fn a_slow_app_is_acked_without_its_answer() {
    let sim = simulator(|_| {}).await;
    let app = App::start(Reply::Slow(
        Duration::from_millis(1500),
        Box::new(Reply::Ok(
            "application/json",
            r#"{"text":"too late"}"#.into(),
        )),
    ))
    .await;
    let mut daemon = forwarding(
        &sim,
        &app.url(),
        "[dispatch]\nresponse_deadline = \"300ms\"",
    )
    .await;

    let slash = acked(&sim, EnvelopeSpec::slash_command("/deploy", "prod")).await;
    assert_eq!(slash.ack_payload, None);
    daemon
        .wait_log("handler answered after the response deadline", |l| {
            l["envelope_id"] == slash.envelope_id.as_str()
        })
        .await;
    daemon.wait_log("the app answered", |_| true).await;
    let status = daemon.status_json().await;
    assert_eq!(status["counters"]["late_responses"], 1);
    daemon.stop().await;
}

#[tokio::test]
async fn a_slash_command_whose_app_is_down_or_failing_gets_the_fallback_text() {
    let sim = simulator(|_| {}).await;
    let (_, url) = vacant_address().await;
    let fallback = "FlowCoach's app is restarting, try again in a minute";
    let mut daemon = forwarding(&sim, &url, &format!("fallback_text = \"{fallback}\"")).await;

    let slash = acked(&sim, EnvelopeSpec::slash_command("/deploy", "prod")).await;
    assert_eq!(
        slash.ack_payload,
        Some(json!({ "response_type": "ephemeral", "text": fallback }))
    );
    let line = daemon
        .wait_log("the app did not take the envelope", |_| true)
        .await;
    assert_eq!(line["envelope_id"], slash.envelope_id.as_str());
    assert_eq!(line["kind"], "slash_commands");
    daemon.stop().await;
}

#[tokio::test]
async fn oversized_redirected_and_hanging_answers_are_failures() {
    let sim = simulator(|_| {}).await;
    let app = App::start(Reply::Huge(10 << 20)).await;
    let mut daemon = forwarding(
        &sim,
        &app.url(),
        "timeout = \"500ms\"\nfallback_text = \"down\"",
    )
    .await;
    let fallback = Some(json!({ "response_type": "ephemeral", "text": "down" }));

    let cases = [
        (Reply::Huge(10 << 20), "exceeds forward.max_response_bytes"),
        (
            Reply::Redirect("/moved"),
            "(a redirect to /moved), which is not followed",
        ),
        (Reply::Hang, "no answer from the app within 500ms"),
        (
            Reply::Ok(
                "application/json",
                json!({ "text": "x".repeat(30_000) }).to_string(),
            ),
            "does not fit in an ack",
        ),
    ];
    for (reply, error) in cases {
        app.set(reply);
        let slash = acked(&sim, EnvelopeSpec::slash_command("/deploy", "prod")).await;
        assert_eq!(slash.ack_payload, fallback, "{error}");
        let line = daemon
            .wait_log("the app did not take the envelope", |l| {
                l["envelope_id"] == slash.envelope_id.as_str()
            })
            .await;
        assert!(line["error"].as_str().unwrap().contains(error), "{line}");
    }
    let huge = daemon
        .wait_log("the app did not take the envelope", |l| {
            l["error"].as_str().unwrap().contains("max_response_bytes")
        })
        .await;
    assert_eq!(huge["status"], 200);
    assert!(
        app.seen().iter().all(|s| s.path == "/slack/events"),
        "a redirect is not followed"
    );
    daemon.stop().await;
}

#[tokio::test]
async fn an_app_asking_for_no_retry_gets_no_retry() {
    let sim = simulator(|c| c.ack_deadline = Duration::from_secs(1)).await;
    let app = App::start(Reply::NoRetry(500)).await;
    let mut daemon = forwarding(&sim, &app.url(), "").await;

    let event = acked(&sim, event("EvNoRetry")).await;
    assert_eq!(event.deliveries.len(), 1);
    daemon.wait_log("acked all the same", |_| true).await;
    assert_eq!(app.seen().len(), 1);
    daemon.stop().await;
}

pub(crate) fn flowcoach_check(config: &str, env: &[(&str, &str)]) -> (i32, String) {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), config).unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_flowcoach"))
        .args(["--config", file.path().to_str().unwrap(), "check-config"])
        .env_clear()
        .env("SLACK_APP_TOKEN", flowcoach_harness::token())
        // Where the inbox would go (check-config creates nothing).
        .env("STATE_DIRECTORY", "/var/lib/flowcoach")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code().unwrap_or(-1), text)
}

#[test]
fn forward_settings_are_checked_and_reported() {
    use std::os::unix::fs::PermissionsExt;

    let secret = [("SLACK_SIGNING_SECRET", SECRET)];
    let (code, text) = flowcoach_check(
        "[forward]\nurl = \"http://10.0.0.7:3000/slack/events\"\ncommands_url = \"https://app.example/commands\"\n",
        &secret,
    );
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains("forward to:   events http://10.0.0.7:3000/slack/events, commands https://app.example/commands, interactions http://10.0.0.7:3000/slack/events"),
        "{text}"
    );
    assert!(
        text.contains("signing secret: from SLACK_SIGNING_SECRET"),
        "{text}"
    );
    assert!(!text.contains(SECRET), "{text}");

    for (config, field) in [
        (
            "[forward]\nurl = \"ftp://app/slack/events\"\n",
            "forward.url",
        ),
        (
            "[forward]\nurl = \"http://app/\"\nevents_url = \"app\"\n",
            "forward.events_url",
        ),
        (
            "[forward]\nurl = \"http://app/\"\ntimeout = \"2h\"\n",
            "forward.timeout",
        ),
        (
            "[forward]\nurl = \"http://app/\"\nmax_concurrent = 0\n",
            "forward.max_concurrent",
        ),
        (
            "[forward]\nurl = \"http://localhost/\"\nsocket = \"app.sock\"\n",
            "forward.socket",
        ),
        ("[forward]\ntimeout = \"1s\"\n", "url"),
    ] {
        let (code, text) = flowcoach_check(config, &secret);
        assert_eq!(code, 78, "{config}: {text}");
        assert!(text.contains(field), "{config}: {text}");
    }

    // No secret anywhere.
    let (code, text) = flowcoach_check("[forward]\nurl = \"http://app/\"\n", &[]);
    assert_eq!(code, 78, "{text}");
    assert!(
        text.contains("no signing secret") && text.contains("SLACK_SIGNING_SECRET (unset)"),
        "{text}"
    );

    // A secret file others can read.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("signing-secret");
    std::fs::write(&file, SECRET).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = format!(
        "environment = \"prod\"\n[environments.prod]\nsigning_secret_file = \"{}\"\n[forward]\nurl = \"http://app/\"\n",
        file.display()
    );
    let (code, text) = flowcoach_check(&config, &secret);
    assert_eq!(code, 78, "{text}");
    assert!(
        text.contains("signing_secret_file") && text.contains("chmod 600"),
        "{text}"
    );
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (code, text) = flowcoach_check(&config, &[]);
    assert_eq!(code, 0, "{text}");
    assert!(
        text.contains(&format!("signing secret: from file {}", file.display())),
        "{text}"
    );
}

#[tokio::test]
async fn the_built_in_bot_shows_no_app_in_status() {
    let sim = simulator(|_| {}).await;
    let mut daemon = Daemon::start_connected(&sim).await;
    let status = daemon.status_json().await;
    assert_eq!(status["app_url"], Value::Null);
    let output = ctl::run(
        &["status"],
        &[(
            "FLOWCOACH_RUNTIME_DIR",
            daemon.runtime_dir.to_str().unwrap(),
        )],
    )
    .await;
    assert!(!String::from_utf8_lossy(&output.stdout).contains("\napp:"));
    daemon.stop().await;
}

/// `flowcoachctl handover` to a successor the daemon starts: its pid, to be stopped.
async fn hand_over(daemon: &Daemon) -> (u32, Strays) {
    let dir = daemon.runtime_dir.display().to_string();
    let output = ctl::run(
        &["--timeout", "30s", "handover"],
        &[("FLOWCOACH_RUNTIME_DIR", dir.as_str())],
    )
    .await;
    assert!(output.status.success(), "{output:?}\n{}", daemon.stderr());
    let successor: u32 = String::from_utf8_lossy(&output.stdout)
        .strip_prefix("handed over to pid ")
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("not a completed handover: {output:?}"));
    let mut strays = Strays::default();
    strays.add(successor);
    (successor, strays)
}

#[tokio::test]
async fn a_successor_gets_the_signing_secret_through_the_pipe() {
    let sim = simulator(|_| {}).await;
    let app = App::start(Reply::Status(200)).await;
    let mut daemon = forwarding(&sim, &app.url(), "").await;
    let (successor, mut strays) = hand_over(&daemon).await;
    let incumbent = tokio::time::timeout(WAIT, daemon.child.wait())
        .await
        .expect("the incumbent exits")
        .unwrap();
    assert!(incumbent.success(), "{}", daemon.stderr());

    // The successor signs with the secret it got through the pipe, never its environment.
    acked(&sim, event("EvAfterHandover")).await;
    let seen = app.wait_seen(1).await;
    assert_eq!(seen[0].signature, Ok(()));
    let environ = std::fs::read(format!("/proc/{successor}/environ")).unwrap();
    assert!(!String::from_utf8_lossy(&environ).contains(SECRET));
    assert!(!daemon.stderr().contains(SECRET));
    process::signal(successor, Signal::SIGTERM);
    strays.gone(successor, WAIT).await.unwrap();
}

#[tokio::test]
async fn a_redelivery_while_the_app_still_has_the_event_waits_for_its_answer() {
    let sim = simulator(|c| c.ack_deadline = Duration::from_millis(500)).await;
    let app = App::start(Reply::Slow(
        Duration::from_millis(1200),
        Box::new(Reply::Status(200)),
    ))
    .await;
    let mut daemon = forwarding(&sim, &app.url(), &format!("timeout = \"5s\"\n{NO_INBOX}")).await;

    let id = sim.inject(APP, event("EvSlow1"));
    // Slack redelivers before the app answered: neither forwarded again nor acked, since
    // the app may still fail it.
    let deferred = daemon
        .wait_log(
            "a redelivery while the handler still has the first delivery",
            |_| true,
        )
        .await;
    assert_eq!(deferred["envelope_id"], id.as_str());
    assert!(!sim.record().is_acked(&id));
    sim.wait_acked(WAIT, &[&id])
        .await
        .expect("acked once the app answered");
    assert_eq!(app.seen().len(), 1, "forwarded once");
    daemon.stop().await;
}

#[tokio::test]
async fn an_event_the_app_still_has_at_a_handover_is_forwarded_again_by_the_successor() {
    let sim = simulator(|c| c.ack_deadline = Duration::from_secs(1)).await;
    let app = App::start(Reply::Slow(
        Duration::from_secs(2),
        Box::new(Reply::Status(200)),
    ))
    .await;
    // No drain: the incumbent hands over while the app still has the event.
    let extra = &format!("timeout = \"10s\"\n{NO_INBOX}\n[dispatch]\ndrain_timeout = \"0s\"");
    let mut daemon = forwarding(&sim, &app.url(), extra).await;
    let id = sim.inject(APP, event("EvHandedOver"));
    app.wait_seen(1).await;

    let (successor, mut strays) = hand_over(&daemon).await;
    tokio::time::timeout(WAIT, daemon.child.wait())
        .await
        .expect("the incumbent exits")
        .unwrap();

    // The incumbent never got its answer: the successor must not take the redelivery for
    // a duplicate, but forward it.
    sim.wait_acked(WAIT, &[&id])
        .await
        .expect("acked by the successor");
    let seen = app.wait_seen(2).await;
    assert!(seen[1].retry_num.is_some(), "{seen:?}");
    process::signal(successor, Signal::SIGTERM);
    strays.gone(successor, WAIT).await.unwrap();
}
