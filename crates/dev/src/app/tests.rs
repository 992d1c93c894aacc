//! The demo app over real HTTP, with the simulator as its Web API: signed requests are
//! served, anything else refused.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use flowcoach_protocol::signature::sign;
use flowcoach_sim::{
    DEFAULT_APP_ID, EnvelopeSpec, SIM_USER_ID, SimConfig, Simulator, fake_bot_token,
    fake_signing_secret,
};

use super::*;

const STEP: Duration = Duration::from_secs(5);

struct Setup {
    sim: Simulator,
    app: DemoApp,
    secret: String,
}

async fn setup() -> Setup {
    let sim = Simulator::start(SimConfig::default()).await.unwrap();
    let secret = fake_signing_secret(DEFAULT_APP_ID);
    let config = AppConfig {
        signing_secret: secret.clone(),
        bot_token: fake_bot_token(DEFAULT_APP_ID),
        api_url: sim.api_url(),
    };
    let app = DemoApp::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), config)
        .await
        .unwrap();
    Setup { sim, app, secret }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Sends `body` to the app as Slack would, signed with `secret` at `timestamp` (unsigned
/// when `secret` is `None`); returns the status and the body.
async fn send(
    setup: &Setup,
    content_type: &str,
    body: &str,
    secret: Option<&str>,
    timestamp: u64,
) -> (u16, String) {
    let mut request = reqwest::Client::new()
        .post(&setup.app.url)
        .header("content-type", content_type)
        .body(body.to_owned());
    if let Some(secret) = secret {
        request = request
            .header(TIMESTAMP_HEADER, timestamp.to_string())
            .header(
                SIGNATURE_HEADER,
                sign(secret.as_bytes(), timestamp, body.as_bytes()),
            );
    }
    let response = tokio::time::timeout(STEP, request.send())
        .await
        .expect("answered in time")
        .expect("HTTP works");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap())
}

async fn signed(setup: &Setup, content_type: &str, body: &str) -> (u16, String) {
    send(setup, content_type, body, Some(&setup.secret), now()).await
}

fn form(fields: &[(&str, &str)]) -> String {
    url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish()
}

const JSON: &str = "application/json";
const FORM: &str = "application/x-www-form-urlencoded";

#[tokio::test]
async fn requests_without_a_valid_signature_are_refused() {
    let setup = setup().await;
    let mention = json!({"type": "event_callback", "event_id": "Ev1",
        "event": {"type": "app_mention", "channel": "C1", "user": "U1", "text": "hi"}})
    .to_string();
    let refused = [
        send(&setup, JSON, &mention, None, now()).await,
        send(&setup, JSON, &mention, Some("another secret"), now()).await,
        send(&setup, JSON, &mention, Some(&setup.secret), now() - 600).await,
    ];
    for (status, _) in refused {
        assert_eq!(status, 401);
    }
    // A body changed after signing is refused too.
    let mut request = reqwest::Client::new()
        .post(&setup.app.url)
        .header("content-type", JSON)
        .header(TIMESTAMP_HEADER, now().to_string())
        .header(
            SIGNATURE_HEADER,
            sign(setup.secret.as_bytes(), now(), mention.as_bytes()),
        );
    request = request.body(mention.replace("hi", "ho"));
    assert_eq!(request.send().await.unwrap().status().as_u16(), 401);

    // The same event, signed, is answered: the refused ones did nothing.
    let (status, _) = signed(&setup, JSON, &mention).await;
    assert_eq!(status, 200);
    let record = setup
        .sim
        .wait_until(STEP, |r| !r.api_calls.is_empty())
        .await
        .unwrap();
    assert_eq!(record.api_calls.len(), 1);
    setup.sim.shutdown().await;
}

#[tokio::test]
async fn url_verification_is_answered_with_the_challenge() {
    let setup = setup().await;
    let body = json!({"type": "url_verification", "token": "t", "challenge": "c-123"});
    let (status, answer) = signed(&setup, JSON, &body.to_string()).await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&answer).unwrap()["challenge"],
        "c-123"
    );
    setup.sim.shutdown().await;
}

#[tokio::test]
async fn a_mention_is_answered_in_the_channel() {
    let setup = setup().await;
    let body = json!({"type": "event_callback", "event_id": "Ev2", "api_app_id": DEFAULT_APP_ID,
        "event": {"type": "app_mention", "channel": "C0SIM", "user": SIM_USER_ID,
                  "text": "<@U0SIMAPP01> hi", "ts": "1.000001"}});
    let (status, answer) = signed(&setup, JSON, &body.to_string()).await;
    assert_eq!((status, answer.as_str()), (200, ""));
    let record = setup
        .sim
        .wait_until(STEP, |r| r.api_calls_of("chat.postMessage").count() == 1)
        .await
        .unwrap();
    let call = &record.api_calls[0];
    assert_eq!(call.app_id.as_deref(), Some(DEFAULT_APP_ID));
    assert_eq!(call.body["channel"], "C0SIM");
    let text = call.body["text"].as_str().unwrap();
    assert!(
        text.starts_with(&format!("Hello <@{SIM_USER_ID}>!")),
        "{text}"
    );

    // A message without "hello" is left alone; one with it is greeted.
    let quiet = json!({"type": "event_callback", "event_id": "Ev3",
        "event": {"type": "message", "channel": "C0SIM", "user": SIM_USER_ID, "text": "lunch?"}});
    let hello = json!({"type": "event_callback", "event_id": "Ev4",
        "event": {"type": "message", "channel": "C0SIM2", "user": SIM_USER_ID, "text": "Hello bot"}});
    assert_eq!(signed(&setup, JSON, &quiet.to_string()).await.0, 200);
    assert_eq!(signed(&setup, JSON, &hello.to_string()).await.0, 200);
    let record = setup
        .sim
        .wait_until(STEP, |r| r.api_calls_of("chat.postMessage").count() == 2)
        .await
        .unwrap();
    assert_eq!(record.api_calls[1].body["channel"], "C0SIM2");
    setup.sim.shutdown().await;
}

#[tokio::test]
async fn hello_is_answered_in_the_response_body() {
    let setup = setup().await;
    let command = form(&[
        ("command", "/hello"),
        ("text", ""),
        ("user_id", SIM_USER_ID),
        ("channel_id", "C0SIM"),
    ]);
    let (status, answer) = signed(&setup, FORM, &command).await;
    assert_eq!(status, 200);
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["response_type"], "ephemeral");
    let text = answer["text"].as_str().unwrap();
    assert!(
        text.starts_with(&format!("Hello <@{SIM_USER_ID}>!")),
        "{text}"
    );

    let other = form(&[("command", "/other"), ("user_id", SIM_USER_ID)]);
    let (_, answer) = signed(&setup, FORM, &other).await;
    assert!(answer.contains("knows /hello"), "{answer}");
    setup.sim.shutdown().await;
}

#[tokio::test]
async fn a_button_press_is_answered_through_its_response_url() {
    let setup = setup().await;
    // An interaction the simulator knows of, so that its response_url is one it accepts.
    let envelope_id = setup.sim.inject(
        DEFAULT_APP_ID,
        EnvelopeSpec::Interactive {
            payload: json!({"type": "block_actions"}),
            accepts_response_payload: true,
        },
    );
    let payload = json!({"type": "block_actions", "user": {"id": SIM_USER_ID},
        "response_url": setup.sim.response_url(&envelope_id),
        "actions": [{"action_id": "wave", "value": "1"}]});
    let (status, answer) = signed(&setup, FORM, &form(&[("payload", &payload.to_string())])).await;
    assert_eq!((status, answer.as_str()), (200, ""));
    let record = setup
        .sim
        .wait_until(STEP, |r| !r.response_url_posts.is_empty())
        .await
        .unwrap();
    let post = &record.response_url_posts[0];
    assert!(!post.refused);
    assert_eq!(post.envelope_id, envelope_id);
    assert!(post.body["text"].as_str().unwrap().contains("wave"));
    setup.sim.shutdown().await;
}
