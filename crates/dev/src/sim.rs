//! `flowcoach-dev sim`: the simulator on a fixed address, for trying flowcoach by hand.

use std::process::ExitCode;

use flowcoach::config::LogSettings;
use flowcoach_sim::{LoadMix, LoadSpec, SimApp, SimConfig, Simulator, fake_token};

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
    tokio::signal::ctrl_c().await?;
    sim.shutdown().await;
    Ok(())
}
