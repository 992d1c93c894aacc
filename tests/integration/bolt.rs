//! The example Bolt apps (`examples/bolt-python`, `examples/bolt-js`), unmodified and in
//! HTTP mode with signature checking on, behind a real flowcoach against the simulator: each
//! interaction reaches the app and its answer reaches Slack, in the ack or through the Web
//! API. Each test runs for both languages; without the packages it skips loudly, or fails
//! under `FLOWCOACH_BOLT=1` (CI installs them and sets it).

use std::time::Duration;

use flowcoach_harness::bolt::{Bolt, BoltApp};
use flowcoach_harness::{APP, Daemon, FAST_CONFIG, WAIT, acked, connected, simulator};
use flowcoach_sim::{
    EnvelopeSpec, SIM_CHANNEL_ID, SIM_TEAM_ID, SIM_USER_ID, SimConfig, Simulator, bot_user_id,
    fake_bot_token, fake_signing_secret,
};
use serde_json::{Value, json};

const FALLBACK: &str = "The app is restarting, try again in a minute";

/// Runs `$test(Bolt::Python)` and `$test(Bolt::JavaScript)` as `$test::python` and
/// `$test::javascript`.
macro_rules! for_both_apps {
    ($($test:ident),* $(,)?) => {$(
        mod $test {
            use super::*;

            #[tokio::test]
            async fn python() {
                if Bolt::Python.runnable(concat!("bolt::", stringify!($test), "::python")) {
                    super::$test(Bolt::Python).await;
                }
            }

            #[tokio::test]
            async fn javascript() {
                if Bolt::JavaScript.runnable(concat!("bolt::", stringify!($test), "::javascript")) {
                    super::$test(Bolt::JavaScript).await;
                }
            }
        }
    )*};
}

for_both_apps!(
    each_interaction_reaches_the_app_and_its_answer_reaches_slack,
    a_request_signed_with_another_secret_is_refused_by_bolt,
    a_stopped_app_gets_the_redelivery_with_its_retry_number_once_it_is_back,
    a_slash_command_slower_than_the_response_deadline_is_acked_in_time_without_its_answer,
);

/// What the app runs with: the simulated app's signing secret and bot token, the
/// simulator's Web API.
fn app_env(sim: &Simulator) -> Vec<(&'static str, String)> {
    vec![
        ("SLACK_SIGNING_SECRET", fake_signing_secret(APP)),
        ("SLACK_BOT_TOKEN", fake_bot_token(APP)),
        ("SLACK_API_URL", sim.api_url()),
    ]
}

async fn start_app(bolt: Bolt, port: u16, sim: &Simulator) -> BoltApp {
    let env = app_env(sim);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    BoltApp::start(bolt, port, &env).await
}

/// flowcoach forwarding to `app`, signing with `secret`, connected; `extra`: more of its
/// configuration (TOML sections). Without the inbox, so that events the app did not take
/// are left to Slack's redelivery.
async fn flowcoach(sim: &Simulator, app: &BoltApp, secret: &str, extra: &str) -> Daemon {
    let config = format!(
        "{FAST_CONFIG}\n[forward]\nurl = \"{}\"\nfallback_text = \"{FALLBACK}\"\n[inbox]\nenabled = false\n{extra}\n",
        app.url()
    );
    let daemon = Daemon::start_with(sim, &config, &[("SLACK_SIGNING_SECRET", secret)]);
    connected(sim).await;
    daemon
}

/// The simulator (adjusted), the app on a free port and flowcoach in front of it,
/// signing with the app's secret.
async fn bolt_behind_flowcoach(
    bolt: Bolt,
    adjust: impl FnOnce(&mut SimConfig),
) -> (Simulator, BoltApp, Daemon) {
    let sim = simulator(adjust).await;
    let app = start_app(bolt, 0, &sim).await;
    let daemon = flowcoach(&sim, &app, &fake_signing_secret(APP), "").await;
    (sim, app, daemon)
}

fn mention(event_id: &str) -> EnvelopeSpec {
    EnvelopeSpec::app_mention(event_id, APP, SIM_CHANNEL_ID, "ship it")
}

/// What the example's mention handler says in reply to [`mention`].
fn mention_reply() -> String {
    format!(
        "Hello <@{SIM_USER_ID}>! You said: <@{}> ship it",
        bot_user_id(APP)
    )
}

/// What it says in reply to Slack's `retry`th redelivery of [`mention`]: the request's
/// `X-Slack-Retry-Num`, as Bolt exposes it.
fn mention_reply_to_retry(retry: u32) -> String {
    format!("{} (Slack's retry {retry})", mention_reply())
}

/// The texts of the messages the bot posted so far.
fn posted(sim: &Simulator) -> Vec<Value> {
    sim.record()
        .api_calls_of("chat.postMessage")
        .map(|call| {
            assert!(call.ok(), "{call:?}");
            assert_eq!(call.app_id.as_deref(), Some(APP));
            assert_eq!(call.body["channel"], SIM_CHANNEL_ID);
            call.body["text"].clone()
        })
        .collect()
}

async fn wait_posted(sim: &Simulator, count: usize) -> Vec<Value> {
    sim.wait_until(WAIT, |r| {
        r.api_calls_of("chat.postMessage").count() >= count
    })
    .await
    .unwrap_or_else(|e| panic!("fewer than {count} chat.postMessage: {e:?}"));
    posted(sim)
}

/// A click on the `approve` button of a message in the simulator's channel.
fn button_click() -> EnvelopeSpec {
    EnvelopeSpec::Interactive {
        payload: json!({
            "type": "block_actions",
            "team": { "id": SIM_TEAM_ID, "domain": "sim" },
            "user": { "id": SIM_USER_ID, "team_id": SIM_TEAM_ID },
            "api_app_id": APP,
            "trigger_id": "1.2.4",
            "channel": { "id": SIM_CHANNEL_ID },
            "container": { "type": "message", "channel_id": SIM_CHANNEL_ID },
            "actions": [{
                "type": "button", "action_id": "approve", "block_id": "request",
                "value": "deploy-42",
            }],
        }),
        accepts_response_payload: false,
    }
}

/// The sign-up modal submitted with `email`.
fn view_submission(email: &str) -> EnvelopeSpec {
    EnvelopeSpec::Interactive {
        payload: json!({
            "type": "view_submission",
            "team": { "id": SIM_TEAM_ID, "domain": "sim" },
            "user": { "id": SIM_USER_ID, "team_id": SIM_TEAM_ID },
            "api_app_id": APP,
            "trigger_id": "1.2.3",
            "view": {
                "id": "V0SIM",
                "type": "modal",
                "callback_id": "signup",
                "team_id": SIM_TEAM_ID,
                "app_id": APP,
                "state": { "values": { "email_block": { "email": {
                    "type": "plain_text_input", "value": email,
                } } } },
            },
        }),
        accepts_response_payload: true,
    }
}

/// The external select `team` asking for options matching `typed`.
fn block_suggestion(typed: &str) -> EnvelopeSpec {
    EnvelopeSpec::Interactive {
        payload: json!({
            "type": "block_suggestion",
            "team": { "id": SIM_TEAM_ID, "domain": "sim" },
            "user": { "id": SIM_USER_ID, "team_id": SIM_TEAM_ID },
            "api_app_id": APP,
            "action_id": "team",
            "block_id": "team_block",
            "value": typed,
        }),
        accepts_response_payload: true,
    }
}

fn option(team: &str) -> Value {
    json!({ "text": { "type": "plain_text", "text": team }, "value": team })
}

async fn each_interaction_reaches_the_app_and_its_answer_reaches_slack(bolt: Bolt) {
    let (sim, app, mut daemon) = bolt_behind_flowcoach(bolt, |_| {}).await;

    // A mention: acked once the app took it, answered with chat.postMessage.
    let event = acked(&sim, mention("EvBolt1")).await;
    assert_eq!(event.ack_payload, None);
    assert_eq!(wait_posted(&sim, 1).await, [json!(mention_reply())]);

    // A slash command: the app's ack("…") is the ack's payload.
    let slash = acked(&sim, EnvelopeSpec::slash_command("/hello", "world")).await;
    assert_eq!(
        slash.ack_payload,
        Some(json!({ "text": format!("Hello, <@{SIM_USER_ID}>! (world)") }))
    );

    // A button: acked empty, answered through the interaction's response_url.
    let button = acked(&sim, button_click()).await;
    assert_eq!(button.ack_payload, None);
    let record = sim
        .wait_until(WAIT, |r| !r.response_url_posts.is_empty())
        .await
        .unwrap_or_else(|e| panic!("no response_url post: {e:?}\n{}", app.output()));
    let post = &record.response_url_posts[0];
    assert_eq!(post.envelope_id, button.envelope_id);
    assert!(!post.refused, "{post:?}");
    assert_eq!(post.body["text"], format!("Approved by <@{SIM_USER_ID}>."));

    // A modal submission: the validation errors.
    let view = acked(&sim, view_submission("not-an-email")).await;
    assert_eq!(
        view.ack_payload,
        Some(json!({
            "response_action": "errors",
            "errors": { "email_block": "That is not an email address." },
        }))
    );

    // A valid one: an empty ack, which closes the modal.
    let view = acked(&sim, view_submission("ada@example.com")).await;
    assert_eq!(view.ack_payload, None);

    // An external select: the options matching what was typed.
    let suggestion = acked(&sim, block_suggestion("es")).await;
    assert_eq!(
        suggestion.ack_payload,
        Some(json!({ "options": [option("design"), option("sales")] }))
    );

    let status = daemon.status_json().await;
    assert_eq!(status["counters"]["forwarded"], 6, "{status}");
    assert_eq!(status["counters"]["forward_failed"], 0, "{status}");
    assert_eq!(status["health"]["health"], "healthy", "{status}");
    daemon.stop().await;
    let output = app.output();
    assert!(
        !output.contains(&fake_signing_secret(APP)),
        "the app printed its secret:\n{output}"
    );
}

async fn a_request_signed_with_another_secret_is_refused_by_bolt(bolt: Bolt) {
    let sim = simulator(|_| {}).await;
    let app = start_app(bolt, 0, &sim).await;
    let mut daemon = flowcoach(&sim, &app, "0123456789abcdef0123456789abcdef", "").await;

    let id = sim.inject(APP, mention("EvBoltForged"));
    let failed = daemon
        .wait_log("the app did not take the envelope", |l| {
            l["envelope_id"] == id.as_str()
        })
        .await;
    assert_eq!(failed["status"], 401, "{failed}\n{}", app.output());
    daemon
        .wait_log("handler failed; envelope left unacked", |l| {
            l["envelope_id"] == id.as_str()
        })
        .await;
    assert!(!sim.record().is_acked(&id), "a refused event stays unacked");
    // Bolt refused it before any listener ran.
    assert_eq!(posted(&sim), Vec::<Value>::new());

    // A slash command it refuses gets the fallback text, not silence.
    let slash = acked(&sim, EnvelopeSpec::slash_command("/hello", "world")).await;
    assert_eq!(
        slash.ack_payload,
        Some(json!({ "response_type": "ephemeral", "text": FALLBACK }))
    );

    let status = daemon.status_json().await;
    assert_eq!(status["counters"]["forwarded"], 0, "{status}");
    assert!(
        status["counters"]["forward_failed"].as_u64() >= Some(2),
        "{status}"
    );
    assert!(
        status["app_last_error"]
            .as_str()
            .is_some_and(|e| e.contains("401")),
        "{status}"
    );
    assert_eq!(status["health"]["health"], "degraded", "{status}");
    daemon.stop().await;
}

async fn a_stopped_app_gets_the_redelivery_with_its_retry_number_once_it_is_back(bolt: Bolt) {
    let (sim, mut app, mut daemon) = bolt_behind_flowcoach(bolt, |c| {
        c.ack_deadline = Duration::from_secs(1);
        // Redelivered until the app is back, however long its interpreter takes to start.
        c.max_retries = 60;
    })
    .await;
    app.stop().await;

    let id = sim.inject(APP, mention("EvBoltDown"));
    daemon
        .wait_log("the app did not take the envelope", |l| {
            l["envelope_id"] == id.as_str()
        })
        .await;
    assert!(!sim.record().is_acked(&id));
    // While it is down, a slash command gets the fallback text.
    let slash = acked(&sim, EnvelopeSpec::slash_command("/hello", "anyone?")).await;
    assert_eq!(
        slash.ack_payload,
        Some(json!({ "response_type": "ephemeral", "text": FALLBACK }))
    );

    // Back on its port: Slack's redelivery reaches it and is handled once.
    let app = start_app(bolt, app.port(), &sim).await;
    let record = sim
        .wait_acked(WAIT, &[&id])
        .await
        .unwrap_or_else(|e| panic!("not acked once the app is back: {e:?}\n{}", app.output()));
    let deliveries = &record.envelope(&id).unwrap().deliveries;
    assert!(deliveries.len() >= 2, "{deliveries:?}");
    // The delivery it took is the last: acked at once, nothing was redelivered after it.
    let taken = deliveries.last().unwrap().retry_attempt;
    assert!(taken >= 1, "{deliveries:?}");
    assert_eq!(
        wait_posted(&sim, 1).await,
        [json!(mention_reply_to_retry(taken))],
        "{}",
        app.output()
    );
    let slash = acked(&sim, EnvelopeSpec::slash_command("/hello", "back")).await;
    assert_eq!(
        slash.ack_payload,
        Some(json!({ "text": format!("Hello, <@{SIM_USER_ID}>! (back)") }))
    );
    // Every redelivery after the one it took was acked as a duplicate, not handled again.
    assert_eq!(posted(&sim).len(), 1, "{}", app.output());
    daemon.stop().await;
}

async fn a_slash_command_slower_than_the_response_deadline_is_acked_in_time_without_its_answer(
    bolt: Bolt,
) {
    let sim = simulator(|_| {}).await;
    let app = start_app(bolt, 0, &sim).await;
    let mut daemon = flowcoach(
        &sim,
        &app,
        &fake_signing_secret(APP),
        "[dispatch]\nresponse_deadline = \"500ms\"",
    )
    .await;

    // `/slow 1.5` answers after 1.5 s: past the response deadline, within Slack's.
    let slash = acked(&sim, EnvelopeSpec::slash_command("/slow", "1.5")).await;
    assert_eq!(slash.ack_payload, None);
    assert!(!slash.gave_up, "{slash:?}");
    assert!(
        slash.ack_delay().unwrap() < sim.config().ack_deadline,
        "{slash:?}"
    );
    let id = slash.envelope_id.as_str();
    daemon
        .wait_log("handler answered after the response deadline", |l| {
            l["envelope_id"] == id
        })
        .await;
    // The late answer is logged, not sent.
    daemon
        .wait_log("the app answered", |l| {
            l["envelope_id"] == id && l["answered"] == true && l["status"] == 200
        })
        .await;
    let status = daemon.status_json().await;
    assert_eq!(status["counters"]["late_responses"], 1, "{status}");
    assert_eq!(status["counters"]["forwarded"], 1, "{status}");
    assert_eq!(status["health"]["health"], "healthy", "{status}");
    daemon.stop().await;
}
