//! The flowcoach daemon and its offline tools (simulator, demo, benchmark).

use std::process::ExitCode;

use clap::Parser;

use flowcoach::cli::{DaemonCli, DaemonCommand};
use flowcoach::config::{Config, ProcessEnv};
use flowcoach::control::server::from_systemd;
use flowcoach::daemon::{self, Startup};
use flowcoach::{exit, logging, tools};

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
    let log = logging::init(&config.settings.log);
    // The path, resolved now: after a package upgrade replaces the file, a successor must
    // start from the new binary at this path, not from the deleted one we run.
    let exe = match std::env::current_exe() {
        Ok(exe) => exe,
        Err(error) => {
            eprintln!("flowcoach: cannot find its own binary: {error}");
            return exit::code(exit::FAILURE);
        }
    };
    // Before the runtime starts: no other thread may be reading the environment.
    let control_listener = match from_systemd() {
        Ok(listener) => listener,
        Err(error) => {
            eprintln!("flowcoach: socket activation: {error}");
            return exit::code(exit::FAILURE);
        }
    };
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
    let startup = Startup {
        config,
        control_listener,
        log,
        exe,
        takeover: cli.takeover,
    };
    match runtime.block_on(daemon::run(startup)) {
        Ok(()) => exit::code(exit::OK),
        Err(error) => {
            tracing::error!(%error, "flowcoach stopped on an error");
            eprintln!("flowcoach: {error}");
            exit::code(error.exit_code())
        }
    }
}
