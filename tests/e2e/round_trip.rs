//! What an app in HTTP mode behind the packaged flowcoach must see and answer, whatever
//! runs the two (systemd units, Podman containers): the demo app (`flowcoach-dev app`)
//! answering a mention with `chat.postMessage` and `/hello` in the ack, and, while it is
//! stopped, the fallback text for commands and Slack's redelivery of events, handled once
//! it is back.

use std::time::Duration;

use flowcoach_harness::APP;
use flowcoach_sim::{
    EnvelopeRecord, EnvelopeSpec, SIM_CHANNEL_ID, SIM_USER_ID, SimConfig, Simulator,
    fake_bot_token, fake_signing_secret,
};
use serde_json::{Value, json};

/// What flowcoach answers a slash command with while the app is down.
pub const FALLBACK: &str = "mybot is restarting, try again in a minute";
/// Bound on the simulator seeing what the app or flowcoach does.
pub const WAIT: Duration = Duration::from_secs(30);

/// The simulator for these tests: a short ack deadline and retries enough to redeliver an
/// event until the app is back, however long its restart takes, should flowcoach leave one
/// unacked (with the inbox on, as packaged, it acks once the event is on disk).
pub fn redelivering(config: &mut SimConfig) {
    config.ack_deadline = Duration::from_secs(1);
    config.max_retries = 60;
}

/// The app's signing secret (flowcoach signs with it, the app checks with it).
pub fn signing_secret() -> String {
    fake_signing_secret(APP)
}

/// The app's bot token, for its Web API calls.
pub fn bot_token() -> String {
    fake_bot_token(APP)
}

/// The `[forward]` section for an app on 127.0.0.1:`port`.
pub fn forward_section(port: u16) -> String {
    format!(
        "\n[forward]\nurl = \"http://127.0.0.1:{port}/slack/events\"\nfallback_text = \"{FALLBACK}\"\n"
    )
}

/// A free TCP port on the loopback for the app (the machines and containers share it).
pub fn vacant_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

fn mention(event_id: &str) -> EnvelopeSpec {
    EnvelopeSpec::app_mention(event_id, APP, SIM_CHANNEL_ID, "are you there?")
}

/// The texts of the app's `chat.postMessage` calls, once there are `count` of them.
async fn posted(sim: &Simulator, count: usize) -> Vec<Value> {
    let record = sim
        .wait_until(WAIT, |r| {
            r.api_calls_of("chat.postMessage").count() >= count
        })
        .await
        .unwrap_or_else(|e| panic!("fewer than {count} chat.postMessage from the app: {e:?}"));
    record
        .api_calls_of("chat.postMessage")
        .map(|call| {
            assert!(call.ok(), "{call:?}");
            assert_eq!(call.app_id.as_deref(), Some(APP), "{call:?}");
            assert_eq!(call.body["channel"], SIM_CHANNEL_ID, "{call:?}");
            call.body["text"].clone()
        })
        .collect()
}

async fn acked(sim: &Simulator, spec: EnvelopeSpec) -> EnvelopeRecord {
    sim.inject_and_wait_ack(APP, spec, WAIT)
        .await
        .unwrap_or_else(|e| panic!("not acked: {e:?}"))
}

/// `/hello`, answered by the app in the ack.
async fn hello_answered_in_the_ack(sim: &Simulator) {
    let slash = acked(sim, EnvelopeSpec::slash_command("/hello", "")).await;
    assert_eq!(
        slash.ack_payload,
        Some(json!({
            "response_type": "ephemeral",
            "text": format!(
                "Hello <@{SIM_USER_ID}>! (answered in the ack by the demo app behind flowcoach)"
            ),
        }))
    );
}

/// The reply the app posts to a mention.
fn greeting() -> Value {
    json!(format!(
        "Hello <@{SIM_USER_ID}>! (answered by the demo app behind flowcoach)"
    ))
}

/// The app answers through flowcoach: a mention with `chat.postMessage`, `/hello` in the
/// ack. The app has posted nothing before.
pub async fn the_app_answers(sim: &Simulator) {
    let event = acked(sim, mention("EvMybot1")).await;
    assert_eq!(event.ack_payload, None);
    assert_eq!(posted(sim, 1).await, [greeting()]);
    hello_answered_in_the_ack(sim).await;
}

/// With the app stopped: a mention is acked all the same, once the durable inbox has it
/// on disk (Slack has nothing to redeliver), and `/hello` gets the fallback text. Returns
/// the mention's envelope id.
pub async fn while_the_app_is_down(sim: &Simulator) -> String {
    let id = sim.inject(APP, mention("EvMybotDown"));
    sim.wait_acked(WAIT, &[&id])
        .await
        .unwrap_or_else(|e| panic!("the mention was not acked into the inbox: {e:?}"));
    let slash = acked(sim, EnvelopeSpec::slash_command("/hello", "")).await;
    assert_eq!(
        slash.ack_payload,
        Some(json!({ "response_type": "ephemeral", "text": FALLBACK }))
    );
    id
}

/// The app back: the inbox delivers the mention `id` to it, handled once (one more
/// `chat.postMessage`), and `/hello` is its own again.
pub async fn once_the_app_is_back(sim: &Simulator, id: &str) {
    assert_eq!(posted(sim, 2).await, [greeting(), greeting()]);
    hello_answered_in_the_ack(sim).await;
    // The ack above came after the inbox's delivery of the mention: it was not handled
    // twice, and Slack saw it acked.
    assert_eq!(posted(sim, 2).await.len(), 2);
    assert!(sim.record().is_acked(id));
}

/// `text` contains neither of the app's secrets nor flowcoach's token.
pub fn assert_no_secret(what: &str, text: &str) {
    for (name, secret) in [
        ("signing secret", signing_secret()),
        ("bot token", bot_token()),
        ("app token", flowcoach_harness::token_secret()),
    ] {
        assert!(
            !text.contains(&secret),
            "the {name} shows in {what}:\n{text}"
        );
    }
}
