//! `flowcoach-dev demo`: flowcoach against the built-in simulator, narrated. Shows a
//! connect, a real bot behind flowcoach (the demo app in HTTP mode: a mention answered with
//! `chat.postMessage`, `/hello` answered in the ack), a zero-gap rotation, an abrupt drop
//! and a clean stop.

use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use serde_json::json;
use tokio::time::{Instant, sleep};

use flowcoach_harness::{Daemon, Logs};
use flowcoach_sim::{
    CloseKind, DEFAULT_APP_ID, EnvelopeSpec, LoadMix, LoadSpec, SIM_CHANNEL_ID, SimConfig,
    Simulator, fake_bot_token, fake_signing_secret,
};

use crate::DemoArgs;
use crate::app::{AppConfig, DemoApp};

const WAIT: Duration = Duration::from_secs(15);

pub fn run(args: &DemoArgs) -> ExitCode {
    let outcome = super::runtime().and_then(|rt| {
        rt.block_on(demo(args.duration))
            .map_err(std::io::Error::other)
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("demo: failed: {error}");
            ExitCode::FAILURE
        }
    }
}

fn say(text: impl AsRef<str>) {
    println!("\n>>> demo: {}", text.as_ref());
}

async fn demo(duration: Duration) -> Result<(), String> {
    let config = SimConfig {
        warning_grace: Duration::from_secs(3),
        ..SimConfig::default()
    };
    let sim = Simulator::start(config)
        .await
        .map_err(|e| format!("simulator: {e}"))?;
    say(format!(
        "Socket Mode simulator listening, Web API at {}",
        sim.api_url()
    ));
    let secret = fake_signing_secret(DEFAULT_APP_ID);
    let app = DemoApp::start(
        SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
        AppConfig {
            signing_secret: secret.clone(),
            bot_token: fake_bot_token(DEFAULT_APP_ID),
            api_url: sim.api_url(),
        },
    )
    .await
    .map_err(|e| format!("the demo app: {e}"))?;
    say(format!(
        "the demo app, a Slack app in HTTP mode as a Bolt app would be, serves {}; \
         it calls the simulator's Web API back with its bot token",
        app.url
    ));
    // Defaults for everything else: what a first run with only a token and an app would do.
    // The signing secret goes through the environment, as the token does.
    let config = format!("[forward]\nurl = \"{}\"\n", app.url);
    let mut daemon = Daemon::launch(
        &sim,
        &config,
        &[("SLACK_SIGNING_SECRET", secret.as_str())],
        &[],
        Logs::Show,
    );
    let started = Instant::now();
    say(format!(
        "started flowcoach (pid {}) forwarding to the app; its own log lines follow",
        daemon.pid()
    ));
    sim.wait_until(WAIT, |r| r.hellos() >= 1)
        .await
        .map_err(|e| format!("flowcoach did not connect: {e:?}"))?;
    say(
        "connected: the simulator sent hello; events start flowing at 3 per second, each one forwarded to the app",
    );
    let load = sim.start_load(
        DEFAULT_APP_ID,
        LoadSpec {
            count: (duration.as_secs_f64() * 3.0) as u64,
            rate_per_sec: Some(3.0),
            max_outstanding: None,
            mix: LoadMix::Mixed,
        },
    );

    sleep(Duration::from_secs(1)).await;
    say("someone mentions the bot in a channel (an app_mention event)");
    sim.inject(
        DEFAULT_APP_ID,
        EnvelopeSpec::app_mention("EvDEMOMENTION", DEFAULT_APP_ID, SIM_CHANNEL_ID, "hi"),
    );
    let record = sim
        .wait_until(WAIT, |r| {
            r.api_calls_of("chat.postMessage")
                .any(|c| c.body["channel"] == SIM_CHANNEL_ID)
        })
        .await
        .map_err(|e| format!("the app did not reply to the mention: {e:?}"))?;
    let reply = record
        .api_calls_of("chat.postMessage")
        .find(|c| c.body["channel"] == SIM_CHANNEL_ID)
        .map_or("", |c| c.body["text"].as_str().unwrap_or_default());
    say(format!(
        "flowcoach forwarded it, signed, to the app, which replied with chat.postMessage \
         to the simulator's Web API: {reply:?} in {SIM_CHANNEL_ID}"
    ));

    let hello = EnvelopeSpec::slash_command("/hello", "");
    let answer = sim
        .inject_and_wait_ack(DEFAULT_APP_ID, hello, WAIT)
        .await
        .map_err(|e| format!("slash command not acked: {e:?}"))?
        .ack_payload
        .unwrap_or(json!(null));
    say(format!(
        "`/hello` was answered by the app in its HTTP response, which flowcoach put in the ack: {}",
        answer["text"].as_str().unwrap_or("(no text)")
    ));

    let first = sim.open_sockets(DEFAULT_APP_ID)[0];
    say("Slack announces a refresh (disconnect reason `warning`)");
    sim.disconnect(first, "warning");
    let record = sim
        .wait_until(WAIT, |r| {
            r.hellos() >= 2
                && r.sockets
                    .iter()
                    .any(|s| s.id == first && s.closed_at.is_some())
        })
        .await
        .map_err(|e| format!("no rotation: {e:?}"))?;
    say(format!(
        "rotated: the new socket said hello before the old one closed; stretches with no open socket: {}",
        record.zero_open_stretches(DEFAULT_APP_ID)
    ));

    let current = sim.open_sockets(DEFAULT_APP_ID)[0];
    say("the connection drops without a word (TCP reset)");
    sim.drop_socket(current);
    sim.wait_until(WAIT, |r| r.hellos() >= 3)
        .await
        .map_err(|e| format!("no reconnect: {e:?}"))?;
    say("reconnected through the backoff");

    let remaining = duration.saturating_sub(started.elapsed());
    sleep(remaining).await;
    load.abort();
    say("stopping flowcoach with SIGTERM, as systemd would");
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let status = tokio::time::timeout(WAIT, daemon.child.wait())
        .await
        .map_err(|_| "flowcoach did not stop in time".to_owned())?
        .map_err(|e| e.to_string())?;
    let record = sim.record();
    let acked = record
        .envelopes
        .iter()
        .filter(|e| e.acked_at.is_some())
        .count();
    let redelivered = record
        .envelopes
        .iter()
        .filter(|e| e.deliveries.len() > 1)
        .count();
    let clean_close = record
        .sockets
        .last()
        .is_some_and(|s| s.close == Some(CloseKind::ClientCloseHandshake));
    say(format!(
        "flowcoach exited with {status}; envelopes sent {}, acked {acked}, redelivered {redelivered}; \
         sockets opened {}; last socket closed with a clean close handshake: {clean_close}",
        record.envelopes.len(),
        record.sockets.len(),
    ));
    say(format!(
        "the app's replies: Web API calls {}, response_url posts {}",
        record.api_calls.iter().filter(|c| c.ok()).count(),
        record
            .response_url_posts
            .iter()
            .filter(|p| !p.refused)
            .count(),
    ));
    drop(app);
    sim.shutdown().await;
    if status.success() && clean_close {
        Ok(())
    } else {
        Err("flowcoach did not stop cleanly".to_owned())
    }
}
