//! The flowcoach daemon and its offline tools (simulator, demo).

use std::process::ExitCode;

use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

use flowcoach::cli::{DaemonCli, DaemonCommand};
use flowcoach::config::{Config, ProcessEnv};
use flowcoach::{daemon, exit, logging, tools};

fn main() -> ExitCode {
    let cli = match DaemonCli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return exit::code(if error.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            });
        }
    };
    match cli.command {
        None | Some(DaemonCommand::Run) => run(&cli),
        Some(DaemonCommand::CheckConfig) => check_config(&cli),
        Some(DaemonCommand::Sim(ref args)) => tools::sim_cli::run(args),
        Some(DaemonCommand::Demo(ref args)) => tools::demo::run(args),
        Some(DaemonCommand::Bench(ref args)) => tools::bench::run(args),
    }
}

fn load_config(cli: &DaemonCli) -> Result<Config, ExitCode> {
    Config::load(cli.config.as_deref(), &ProcessEnv).map_err(|error| {
        eprintln!("flowcoach: configuration error: {error}");
        exit::code(exit::CONFIG)
    })
}

fn check_config(cli: &DaemonCli) -> ExitCode {
    let config = match load_config(cli) {
        Ok(config) => config,
        Err(code) => return code,
    };
    let file = config
        .path
        .as_ref()
        .map_or_else(|| "none (defaults)".to_owned(), |p| p.display().to_string());
    println!("configuration OK");
    println!("  file:        {file}");
    println!("  environment: {}", config.settings.environment);
    println!("  api url:     {}", config.api_url);
    println!(
        "  token:       {} (from {})",
        config.token, config.token_source
    );
    println!(
        "  app id hint: {}",
        config.token.app_id_hint().unwrap_or("none in token")
    );
    exit::code(exit::OK)
}

fn run(cli: &DaemonCli) -> ExitCode {
    let config = match load_config(cli) {
        Ok(config) => config,
        Err(code) => return code,
    };
    logging::init(&config.settings.log);
    // One thread: Socket Mode traffic is a few hundred envelopes a second at most, and a
    // single-threaded runtime keeps CPU per envelope and memory lowest. Handlers are async;
    // CPU-heavy work goes to spawn_blocking.
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("flowcoach: cannot start the async runtime: {error}");
            return exit::code(exit::FAILURE);
        }
    };
    runtime.block_on(async {
        let shutdown = CancellationToken::new();
        if let Err(error) = watch_signals(shutdown.clone()) {
            eprintln!("flowcoach: cannot install signal handlers: {error}");
            return exit::code(exit::FAILURE);
        }
        match daemon::serve(config, shutdown).await {
            Ok(()) => exit::code(exit::OK),
            Err(error) => {
                tracing::error!(%error, "flowcoach stopped on an error");
                eprintln!("flowcoach: {error}");
                exit::code(error.exit_code())
            }
        }
    })
}

/// SIGTERM or SIGINT starts a graceful stop; a second one exits at once.
fn watch_signals(shutdown: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        let mut received = 0;
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            received += 1;
            if received > 1 {
                tracing::warn!(signal = name, "second stop signal: exiting at once");
                std::process::exit(i32::from(exit::FAILURE));
            }
            tracing::info!(signal = name, "stopping: draining in-flight envelopes");
            shutdown.cancel();
        }
    });
    Ok(())
}
