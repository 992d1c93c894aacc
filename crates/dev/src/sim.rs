//! `flowcoach-dev sim`: the simulator on a fixed address, for trying flowcoach by hand.

use std::process::ExitCode;

use flowcoach::config::LogSettings;
use flowcoach_sim::{
    EnvelopeSpec, LoadMix, LoadSpec, SIM_CHANNEL_ID, SimApp, SimConfig, Simulator, fake_bot_token,
    fake_signing_secret, fake_token,
};

use crate::SimArgs;

pub fn run(args: &SimArgs) -> ExitCode {
    flowcoach::logging::init(&LogSettings::default());
    let outcome = super::runtime().and_then(|rt| rt.block_on(serve(args)));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("flowcoach-dev sim: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn serve(args: &SimArgs) -> std::io::Result<()> {
    let token = fake_token(&args.app_id);
    let config = SimConfig {
        apps: vec![SimApp {
            app_id: args.app_id.clone(),
            tokens: vec![token.clone()],
        }],
        rotate_after: args.rotate_every,
        ..SimConfig::default()
    };
    let sim = Simulator::start_on(args.listen, config).await?;
    println!(
        "Socket Mode simulator for app {} is listening.",
        args.app_id
    );
    println!("Point flowcoach at it (in another shell):");
    println!(
        "  SLACK_APP_TOKEN={token} FLOWCOACH_SLACK_API_URL={} flowcoach run",
        sim.api_url()
    );
    let secret = fake_signing_secret(&args.app_id);
    println!(
        "A bot in HTTP mode behind it: with `[forward] url = \"http://127.0.0.1:3001/slack/events\"` \
         in flowcoach's configuration and SLACK_SIGNING_SECRET={secret} in its environment, run"
    );
    println!(
        "  SLACK_SIGNING_SECRET={secret} SLACK_BOT_TOKEN={} PORT=3001 SLACK_API_URL={} flowcoach-dev app",
        fake_bot_token(&args.app_id),
        sim.api_url()
    );
    if args.rate > 0.0 {
        sim.start_load(
            &args.app_id,
            LoadSpec {
                count: u64::MAX,
                rate_per_sec: Some(args.rate),
                max_outstanding: None,
                mix: LoadMix::Mixed,
            },
        );
    }
    if let Some(every) = args.mention_every {
        tokio::spawn(mention_now_and_then(
            sim.clone(),
            args.app_id.clone(),
            every,
        ));
    }
    tokio::signal::ctrl_c().await?;
    sim.shutdown().await;
    Ok(())
}

/// Mentions the app's bot in the simulator's channel every `every`, for a bot behind
/// flowcoach to answer (its replies show in the simulator's log).
async fn mention_now_and_then(sim: Simulator, app_id: String, every: std::time::Duration) {
    let mut ticks = tokio::time::interval(every);
    for n in 1.. {
        ticks.tick().await;
        let mention = EnvelopeSpec::app_mention(
            format!("EvMENTION{n}"),
            &app_id,
            SIM_CHANNEL_ID,
            &format!("hello #{n}"),
        );
        sim.inject(&app_id, mention);
    }
}
