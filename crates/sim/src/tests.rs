//! The simulator over real sockets, with tokio-tungstenite as the client.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream, connect_async};

use super::*;
use flowcoach_protocol::{Envelope, Hello, Inbound, parse_inbound};
use serde_json::json;

type Client = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Bound for every single wait in these tests.
const STEP: Duration = Duration::from_secs(3);

fn quick_config() -> SimConfig {
    SimConfig {
        server_ping_interval: None,
        refresh_grace: Duration::from_millis(100),
        hold_tcp_after_close: Duration::from_millis(300),
        stale_socket_ttl: Duration::from_millis(300),
        ..SimConfig::default()
    }
}

/// Calls `apps.connections.open`; returns the HTTP status, `Retry-After` and JSON body.
async fn open_call(sim: &Simulator, token: Option<&str>) -> (u16, Option<String>, Value) {
    let mut request =
        reqwest::Client::new().post(format!("{}/apps.connections.open", sim.api_url()));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = tokio::time::timeout(STEP, request.send())
        .await
        .expect("answered in time")
        .expect("HTTP works");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let body = response.text().await.unwrap();
    (
        status,
        retry_after,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

async fn open_url(sim: &Simulator) -> String {
    let (status, _, body) = open_call(sim, Some(&fake_token(DEFAULT_APP_ID))).await;
    assert_eq!(status, 200);
    assert_eq!(body["ok"], true, "{body}");
    body["url"].as_str().unwrap().to_owned()
}

async fn dial(url: &str) -> Result<Client, tungstenite::Error> {
    tokio::time::timeout(STEP, connect_async(url))
        .await
        .expect("handshake in time")
        .map(|(ws, _)| ws)
}

/// The next text frame (pings are skipped).
async fn next_text(ws: &mut Client) -> String {
    loop {
        let message = tokio::time::timeout(STEP, ws.next())
            .await
            .expect("a frame in time")
            .expect("socket open")
            .expect("readable frame");
        match message {
            Message::Text(text) => return text.to_string(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

async fn next_hello(ws: &mut Client) -> Hello {
    match parse_inbound(&next_text(ws).await) {
        Ok(Inbound::Hello(hello)) => hello,
        other => panic!("expected hello, got {other:?}"),
    }
}

async fn next_envelope(ws: &mut Client) -> Envelope {
    match parse_inbound(&next_text(ws).await) {
        Ok(Inbound::Envelope(envelope)) => envelope,
        other => panic!("expected an envelope, got {other:?}"),
    }
}

/// Opens a socket for the default app and reads its hello.
async fn connect(sim: &Simulator) -> (Client, Hello) {
    let mut ws = dial(&open_url(sim).await).await.expect("upgrade accepted");
    let hello = next_hello(&mut ws).await;
    (ws, hello)
}

async fn ack(ws: &mut Client, envelope_id: &str) {
    let frame = format!(r#"{{"envelope_id":"{envelope_id}"}}"#);
    ws.send(Message::text(frame)).await.unwrap();
}

fn event(event_id: &str) -> EnvelopeSpec {
    EnvelopeSpec::message(event_id, "C1", "hi")
}

#[tokio::test]
async fn envelope_round_trip_and_client_close() {
    let sim = Simulator::start(quick_config()).await.unwrap();
    let (mut ws, hello) = connect(&sim).await;
    assert_eq!(hello.num_connections, Some(1));
    assert_eq!(hello.app_id(), Some(DEFAULT_APP_ID));
    assert_eq!(
        hello.debug_info.unwrap().approximate_connection_time,
        Some(18060)
    );

    let id = sim.inject(DEFAULT_APP_ID, event("Ev1"));
    let envelope = next_envelope(&mut ws).await;
    assert_eq!(envelope.envelope_id, id);
    assert_eq!(envelope.retry_attempt, Some(0));
    assert_eq!(envelope.retry_reason.as_deref(), Some(""));
    assert_eq!(envelope.summary().event_id.as_deref(), Some("Ev1"));
    ack(&mut ws, &id).await;
    let record = sim.wait_acked(STEP, &[&id]).await.unwrap();
    let socket = record.sockets[0].id;
    assert_eq!(record.envelope(&id).unwrap().ack_socket, Some(socket));
    assert_eq!(record.open_calls[0].outcome, "ok");
    assert!(record.open_calls[0].token_ok);

    // The client closes: the handshake completes, then the client drops TCP itself.
    ws.close(None).await.unwrap();
    drop(ws);
    let record = sim
        .wait_until(STEP, |r| r.sockets[0].tcp_closed_at.is_some())
        .await
        .unwrap();
    assert_eq!(
        record.sockets[0].close,
        Some(CloseKind::ClientCloseHandshake)
    );
    assert_eq!(record.open_sockets(DEFAULT_APP_ID), 0);
    assert_eq!(record.zero_open_stretches(DEFAULT_APP_ID), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn envelopes_wait_for_a_socket() {
    let sim = Simulator::start(quick_config()).await.unwrap();
    let id = sim.inject(DEFAULT_APP_ID, event("EvEarly"));
    let (mut ws, _) = connect(&sim).await;
    assert_eq!(next_envelope(&mut ws).await.envelope_id, id);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_reused_ticket_is_refused_with_401() {
    let sim = Simulator::start(quick_config()).await.unwrap();
    let url = open_url(&sim).await;
    let _first = dial(&url).await.expect("first use works");
    match dial(&url).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 401),
        other => panic!("reuse was not refused: {other:?}"),
    }
    let record = sim
        .wait_until(STEP, |r| r.sockets.len() == 2)
        .await
        .unwrap();
    assert_eq!(record.sockets[1].rejected_handshake, Some(401));
    assert_eq!(record.sockets[1].app_id, DEFAULT_APP_ID);
    sim.shutdown().await;
}

#[tokio::test]
async fn a_scripted_handshake_status_refuses_the_upgrade() {
    let sim = Simulator::start(quick_config()).await.unwrap();
    sim.set_handshake_status(Some(409));
    match dial(&open_url(&sim).await).await {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 409),
        other => panic!("upgrade was not refused: {other:?}"),
    }
    sim.set_handshake_status(None);
    let (_ws, hello) = connect(&sim).await;
    assert_eq!(hello.num_connections, Some(1));
    sim.shutdown().await;
}

#[tokio::test]
async fn the_eleventh_socket_gets_too_many_websockets() {
    let sim = Simulator::start(quick_config()).await.unwrap();
    let mut clients = Vec::new();
    for n in 1..=10 {
        let (ws, hello) = connect(&sim).await;
        assert_eq!(hello.num_connections, Some(n));
        clients.push(ws);
    }
    let mut eleventh = dial(&open_url(&sim).await).await.expect("upgrade accepted");
    let frame: Value = serde_json::from_str(&next_text(&mut eleventh).await).unwrap();
    assert_eq!(frame["type"], "disconnect");
    assert_eq!(frame["reason"], "too_many_websockets");
    let closing = tokio::time::timeout(STEP, eleventh.next()).await.unwrap();
    assert!(
        matches!(closing, Some(Ok(Message::Close(_)))),
        "{closing:?}"
    );
    let record = sim.record();
    let refused = &record.sockets[10];
    assert_eq!(refused.close, Some(CloseKind::TooManyWebsockets));
    assert!(refused.hello.is_none());
    assert_eq!(record.open_sockets(DEFAULT_APP_ID), 10);
    sim.shutdown().await;
}

#[tokio::test]
async fn web_api_errors() {
    let sim = Simulator::start(quick_config()).await.unwrap();
    let (status, _, body) = open_call(&sim, None).await;
    assert_eq!((status, body["error"].as_str()), (200, Some("not_authed")));
    let (_, _, body) = open_call(&sim, Some("xapp-1-A0NOPE-1-00")).await;
    assert_eq!(body["error"], "invalid_auth");

    let token = fake_token(DEFAULT_APP_ID);
    sim.push_open_response(OpenResponse::RateLimited {
        retry_after_secs: 7,
    });
    sim.push_open_response(OpenResponse::HttpStatus(503));
    let (status, retry_after, body) = open_call(&sim, Some(&token)).await;
    assert_eq!((status, retry_after.as_deref()), (429, Some("7")));
    assert_eq!(body["error"], "ratelimited");
    let (status, _, body) = open_call(&sim, Some(&token)).await;
    assert_eq!((status, body), (503, Value::String("oops".into())));
    let (_, _, body) = open_call(&sim, Some(&token)).await;
    assert_eq!(body["ok"], true);

    let outcomes: Vec<String> = sim
        .record()
        .open_calls
        .into_iter()
        .map(|c| c.outcome)
        .collect();
    assert_eq!(
        outcomes,
        ["not_authed", "invalid_auth", "http 429", "http 503", "ok"]
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn unacked_events_are_redelivered_then_given_up() {
    let sim = Simulator::start(SimConfig {
        ack_deadline: Duration::from_millis(150),
        max_retries: 1,
        ..quick_config()
    })
    .await
    .unwrap();
    let (mut ws, _) = connect(&sim).await;
    let id = sim.inject(DEFAULT_APP_ID, event("EvRetry"));
    let first = next_envelope(&mut ws).await;
    let retry = next_envelope(&mut ws).await;
    assert_eq!(
        (first.envelope_id.as_str(), first.retry_attempt),
        (id.as_str(), Some(0))
    );
    assert_eq!(
        (retry.envelope_id.as_str(), retry.retry_attempt),
        (id.as_str(), Some(1))
    );
    assert_eq!(retry.retry_reason.as_deref(), Some("timeout"));
    let record = sim
        .wait_until(STEP, |r| r.envelope(&id).is_some_and(|e| e.gave_up))
        .await
        .unwrap();
    assert_eq!(record.envelope(&id).unwrap().deliveries.len(), 2);
    // A late ack still counts as the ack, after the give-up.
    ack(&mut ws, &id).await;
    sim.wait_acked(STEP, &[&id]).await.unwrap();
    sim.shutdown().await;
}

#[tokio::test]
async fn disconnect_then_close_after_the_grace() {
    let sim = Simulator::start(quick_config()).await.unwrap();
    let (mut ws, _) = connect(&sim).await;
    let socket = sim.open_sockets(DEFAULT_APP_ID)[0];
    sim.disconnect(socket, "refresh_requested");
    let frame: Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
    assert_eq!(frame["reason"], "refresh_requested");
    assert_eq!(frame["debug_info"]["host"], "sim");
    // No envelope goes to a disconnecting socket: this one waits for the next socket.
    let id = sim.inject(DEFAULT_APP_ID, event("EvAfterDisconnect"));
    let closing = tokio::time::timeout(STEP, ws.next()).await.unwrap();
    assert!(
        matches!(closing, Some(Ok(Message::Close(_)))),
        "{closing:?}"
    );
    let record = sim.record();
    assert_eq!(
        record.sockets[0].close,
        Some(CloseKind::ServerClosed("refresh_requested".into()))
    );
    assert!(record.envelope(&id).unwrap().deliveries.is_empty());
    let (mut next, hello) = connect(&sim).await;
    assert_eq!(hello.num_connections, Some(1));
    assert_eq!(next_envelope(&mut next).await.envelope_id, id);
    sim.shutdown().await;
}

#[tokio::test]
async fn stale_sockets_count_until_they_expire() {
    let sim = Simulator::start(quick_config()).await.unwrap();
    let (_stale, _) = connect(&sim).await;
    let socket = sim.open_sockets(DEFAULT_APP_ID)[0];
    sim.make_stale(socket);
    let (_fresh, hello) = connect(&sim).await;
    assert_eq!(
        hello.num_connections,
        Some(2),
        "the stale socket still counts"
    );
    let record = sim
        .wait_until(STEP, |r| r.sockets[0].close.is_some())
        .await
        .unwrap();
    assert_eq!(record.sockets[0].close, Some(CloseKind::StaleExpired));
    assert!(record.sockets[0].stale);
    assert_eq!(sim.open_sockets(DEFAULT_APP_ID).len(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn load_respects_its_window() {
    let sim = Simulator::start(quick_config()).await.unwrap();
    let (mut ws, _) = connect(&sim).await;
    let load = sim.start_load(
        DEFAULT_APP_ID,
        LoadSpec {
            count: 30,
            rate_per_sec: None,
            max_outstanding: Some(4),
            mix: LoadMix::Mixed,
        },
    );
    for _ in 0..30 {
        let envelope = next_envelope(&mut ws).await;
        let unacked = sim
            .record()
            .envelopes
            .iter()
            .filter(|e| e.acked_at.is_none())
            .count();
        assert!(unacked <= 4, "{unacked} unacked at once");
        ack(&mut ws, &envelope.envelope_id).await;
    }
    tokio::time::timeout(STEP, load).await.unwrap().unwrap();
    let record = sim
        .wait_until(STEP, |r| r.envelopes.len() == 30 && r.all_acked())
        .await
        .unwrap();
    assert_eq!(record.unknown_acks, 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn wait_until_times_out_with_the_record() {
    let sim = Simulator::start(quick_config()).await.unwrap();
    sim.inject(DEFAULT_APP_ID, event("EvNobodyHome"));
    let timeout = sim
        .wait_until(Duration::from_millis(50), |r| r.all_acked())
        .await
        .unwrap_err();
    assert_eq!(timeout.record.envelopes.len(), 1);
    let printed = format!("{timeout:?}");
    assert!(printed.contains("not met within 50ms"), "{printed}");
    assert!(printed.contains("unacked"), "{printed}");
    sim.shutdown().await;
}

#[tokio::test]
async fn rotation_sends_warning_then_refresh_requested_then_closes() {
    let sim = Simulator::start(SimConfig {
        rotate_after: Some(Duration::from_millis(100)),
        warning_grace: Duration::from_millis(100),
        ..quick_config()
    })
    .await
    .unwrap();
    let (mut ws, _) = connect(&sim).await;
    for reason in ["warning", "refresh_requested"] {
        let frame: Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
        assert_eq!(
            (frame["type"].as_str(), frame["reason"].as_str()),
            (Some("disconnect"), Some(reason))
        );
    }
    let closing = tokio::time::timeout(STEP, ws.next()).await.unwrap();
    assert!(
        matches!(closing, Some(Ok(Message::Close(_)))),
        "{closing:?}"
    );
    let socket = &sim.record().sockets[0];
    assert_eq!(socket.disconnect_sent.as_deref(), Some("warning"));
    assert_eq!(
        socket.close,
        Some(CloseKind::ServerClosed("refresh_requested".into()))
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn pings_both_ways_and_abrupt_drops() {
    let sim = Simulator::start(SimConfig {
        server_ping_interval: Some(Duration::from_millis(50)),
        ..quick_config()
    })
    .await
    .unwrap();
    let (mut ws, _) = connect(&sim).await;
    let ping = tokio::time::timeout(STEP, ws.next()).await.unwrap();
    assert!(matches!(ping, Some(Ok(Message::Ping(_)))), "{ping:?}");
    ws.send(Message::Ping("client".into())).await.unwrap();
    sim.wait_until(STEP, |r| r.sockets[0].client_pings == 1)
        .await
        .unwrap();

    // The client vanishes without a Close frame.
    drop(ws);
    let record = sim
        .wait_until(STEP, |r| r.sockets[0].close.is_some())
        .await
        .unwrap();
    assert_eq!(record.sockets[0].close, Some(CloseKind::ClientDroppedTcp));

    // The sim drops a socket without a Close frame.
    let (mut ws, _) = connect(&sim).await;
    sim.drop_socket(sim.open_sockets(DEFAULT_APP_ID)[0]);
    loop {
        match tokio::time::timeout(STEP, ws.next()).await.unwrap() {
            Some(Ok(Message::Ping(_))) => continue,
            Some(Ok(Message::Close(_))) => panic!("a Close frame was sent"),
            _ => break,
        }
    }
    let record = sim
        .wait_until(STEP, |r| r.sockets[1].close.is_some())
        .await
        .unwrap();
    assert_eq!(record.sockets[1].close, Some(CloseKind::ServerDropped));
    sim.shutdown().await;
}

#[tokio::test]
async fn every_hello_can_be_answered_with_a_disconnect() {
    let sim = Simulator::start(SimConfig {
        disconnect_after_hello: Some("something_new".to_owned()),
        ..quick_config()
    })
    .await
    .unwrap();
    for socket in 0..2 {
        let (mut ws, _) = connect(&sim).await;
        let frame: Value = serde_json::from_str(&next_text(&mut ws).await).unwrap();
        assert_eq!(
            (frame["type"].as_str(), frame["reason"].as_str()),
            (Some("disconnect"), Some("something_new"))
        );
        let record = sim
            .wait_until(STEP, |r| r.sockets[socket].close.is_some())
            .await
            .unwrap();
        assert_eq!(
            record.sockets[socket].close,
            Some(CloseKind::ServerClosed("something_new".into()))
        );
    }
    sim.shutdown().await;
}

/// POSTs `body` to `url` (JSON when it is an object, else the string as a form) with this
/// bearer token; returns the HTTP status and the JSON answer.
async fn post(url: &str, token: Option<&str>, body: Value) -> (u16, Value) {
    let mut request = reqwest::Client::new().post(url);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request = match body {
        Value::String(form) => request
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form),
        json => request.json(&json),
    };
    let response = tokio::time::timeout(STEP, request.send())
        .await
        .expect("answered in time")
        .expect("HTTP works");
    let status = response.status().as_u16();
    (status, response.json().await.expect("a JSON answer"))
}

async fn bot_call(sim: &Simulator, method: &str, body: Value) -> Value {
    let url = format!("{}/{method}", sim.api_url());
    let (status, answer) = post(&url, Some(&fake_bot_token(DEFAULT_APP_ID)), body).await;
    assert_eq!(status, 200, "{answer}");
    answer
}

#[tokio::test]
async fn a_bot_posts_messages_and_opens_views() {
    let sim = Simulator::start(quick_config()).await.unwrap();
    let posted = bot_call(
        &sim,
        "chat.postMessage",
        json!({"channel": "C1", "text": "hello", "blocks": [{"type": "divider"}]}),
    )
    .await;
    assert_eq!(posted["ok"], true, "{posted}");
    assert_eq!(posted["channel"], "C1");
    let ts = posted["ts"].as_str().unwrap();
    assert_eq!(posted["message"]["ts"], ts);
    assert_eq!(posted["message"]["text"], "hello");
    assert_eq!(posted["message"]["user"], bot_user_id(DEFAULT_APP_ID));
    assert_eq!(posted["message"]["bot_id"], bot_id(DEFAULT_APP_ID));
    assert_eq!(posted["message"]["blocks"][0]["type"], "divider");

    // The same method with a form body, as many clients send it.
    let form = bot_call(
        &sim,
        "chat.postMessage",
        Value::String("channel=C2&text=in%20a%20thread&thread_ts=1.000001".into()),
    )
    .await;
    assert_eq!(form["channel"], "C2");
    assert_eq!(form["message"]["thread_ts"], "1.000001");
    assert_ne!(form["ts"], posted["ts"]);
    let no_text = bot_call(&sim, "chat.postMessage", json!({"channel": "C1"})).await;
    assert_eq!(no_text["error"], "no_text");

    let ephemeral = bot_call(
        &sim,
        "chat.postEphemeral",
        json!({"channel": "C1", "user": "U1", "text": "psst"}),
    )
    .await;
    assert_eq!(ephemeral["ok"], true, "{ephemeral}");
    assert!(ephemeral["message_ts"].is_string());

    let view = json!({"type": "modal", "external_id": "x1",
        "title": {"type": "plain_text", "text": "Hi"}, "blocks": []});
    let opened = bot_call(
        &sim,
        "views.open",
        json!({"trigger_id": "1.2.3", "view": view}),
    )
    .await;
    assert_eq!(opened["ok"], true, "{opened}");
    let id = opened["view"]["id"].as_str().unwrap();
    assert_eq!(opened["view"]["title"]["text"], "Hi");
    // A form body carries the view as a string of JSON.
    let by_id = bot_call(
        &sim,
        "views.update",
        Value::String(format!(
            "view_id={id}&view=%7B%22type%22%3A%22modal%22%2C%22blocks%22%3A%5B%5D%7D"
        )),
    )
    .await;
    assert_eq!(by_id["view"]["id"], id, "{by_id}");
    let by_external = bot_call(
        &sim,
        "views.update",
        json!({"external_id": "x1", "view": {"type": "modal", "blocks": []}}),
    )
    .await;
    assert_eq!(by_external["view"]["id"], id, "{by_external}");
    let unknown = bot_call(
        &sim,
        "views.update",
        json!({"view_id": "V0NOPE", "view": {"type": "modal"}}),
    )
    .await;
    assert_eq!(unknown["error"], "not_found");

    let auth = bot_call(&sim, "auth.test", Value::String(String::new())).await;
    assert_eq!(auth["ok"], true);
    assert_eq!(auth["user_id"], bot_user_id(DEFAULT_APP_ID));
    assert_eq!(auth["bot_id"], bot_id(DEFAULT_APP_ID));
    assert_eq!(auth["team_id"], SIM_TEAM_ID);

    let record = sim.record();
    let methods: Vec<(&str, bool)> = record
        .api_calls
        .iter()
        .map(|c| (c.method.as_str(), c.ok()))
        .collect();
    assert_eq!(
        methods,
        [
            ("chat.postMessage", true),
            ("chat.postMessage", true),
            ("chat.postMessage", false),
            ("chat.postEphemeral", true),
            ("views.open", true),
            ("views.update", true),
            ("views.update", true),
            ("views.update", false),
            ("auth.test", true),
        ]
    );
    assert_eq!(record.api_calls[1].body["text"], "in a thread");
    assert_eq!(record.api_calls[1].app_id.as_deref(), Some(DEFAULT_APP_ID));
    assert_eq!(record.api_calls_of("chat.postMessage").count(), 2);
    sim.shutdown().await;
}

#[tokio::test]
async fn bot_methods_want_the_bot_token() {
    let sim = Simulator::start(quick_config()).await.unwrap();
    let url = format!("{}/chat.postMessage", sim.api_url());
    let message = json!({"channel": "C1", "text": "hi"});
    for (token, error) in [
        (None, "not_authed"),
        (Some(fake_token(DEFAULT_APP_ID)), "not_allowed_token_type"),
        (Some(fake_bot_token("A0OTHER")), "invalid_auth"),
    ] {
        let (status, answer) = post(&url, token.as_deref(), message.clone()).await;
        assert_eq!((status, answer["error"].as_str()), (200, Some(error)));
    }
    let (status, answer) = post(
        &format!("{}/chat.unfurl", sim.api_url()),
        Some(&fake_bot_token(DEFAULT_APP_ID)),
        message,
    )
    .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (404, Some("unknown_method"))
    );
    let record = sim.record();
    assert_eq!(record.api_calls.len(), 3);
    assert!(
        record
            .api_calls
            .iter()
            .all(|c| !c.ok() && c.app_id.is_none())
    );
    assert_eq!(record.api_calls_of("chat.postMessage").count(), 0);
    sim.shutdown().await;
}

#[tokio::test]
async fn response_urls_take_replies() {
    let sim = Simulator::start(quick_config()).await.unwrap();
    let (mut ws, _) = connect(&sim).await;
    let command = sim.inject(
        DEFAULT_APP_ID,
        EnvelopeSpec::slash_command("/hello", "there"),
    );
    let envelope = next_envelope(&mut ws).await;
    let payload: Value = serde_json::from_str(envelope.payload.get()).unwrap();
    let url = payload["response_url"].as_str().unwrap().to_owned();
    assert_eq!(url, sim.response_url(&command));
    let action = sim.inject(
        DEFAULT_APP_ID,
        EnvelopeSpec::Interactive {
            payload: json!({"type": "block_actions", "actions": []}),
            accepts_response_payload: true,
        },
    );
    let envelope = next_envelope(&mut ws).await;
    let payload: Value = serde_json::from_str(envelope.payload.get()).unwrap();
    assert!(
        payload["response_url"]
            .as_str()
            .unwrap()
            .ends_with(&format!("/response/{action}"))
    );

    let reply = json!({"response_type": "in_channel", "text": "later"});
    let (status, answer) = post(&url, None, reply).await;
    assert_eq!((status, answer["ok"].as_bool()), (200, Some(true)));
    let record = sim
        .wait_until(STEP, |r| !r.response_url_posts.is_empty())
        .await
        .unwrap();
    let posted = &record.response_url_posts[0];
    assert_eq!(posted.envelope_id, command);
    assert_eq!(posted.body["text"], "later");
    assert!(!posted.refused);

    let bogus = url.replace(&command, "nope");
    let (status, _) = post(&bogus, None, json!({"text": "x"})).await;
    assert_eq!(status, 404);
    assert!(sim.record().response_url_posts[1].refused);
    sim.shutdown().await;
}
