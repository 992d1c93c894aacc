//! The flowcoach daemon.

use std::process::ExitCode;

use clap::Parser;

use flowcoach::cli::{DaemonCli, DaemonCommand};
use flowcoach::config::{Config, ProcessEnv, token_variable};
use flowcoach::control::server::from_systemd;
use flowcoach::daemon::{self, Startup};
use flowcoach::host::paths::{InstancePaths, runtime_dir};
use flowcoach::{exit, logging};

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
    }
}

/// Takes the secrets out of the process environment (`SLACK_APP_TOKEN`,
/// `SLACK_SIGNING_SECRET`, or the pipe of a predecessor), so that `/proc/PID/environ` and
/// children do not show them.
fn take_token_variable() -> Result<(), ExitCode> {
    // SAFETY: called first in the daemon's commands, before the async runtime or any
    // other thread exists: nothing reads the environment concurrently.
    unsafe { token_variable::take_from_environment() }.map_err(|error| {
        eprintln!("flowcoach: {error}");
        exit::code(exit::FAILURE)
    })
}

fn load_config(cli: &DaemonCli) -> Result<Config, ExitCode> {
    take_token_variable()?;
    Config::load(
        cli.config.as_deref(),
        cli.environment.as_deref(),
        &ProcessEnv,
    )
    .map_err(|error| {
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
    let paths = InstancePaths::new(
        runtime_dir(&ProcessEnv, nix::unistd::geteuid().is_root()),
        config.token.app_id_hint(),
        &config.settings.environment,
    );
    let others: Vec<String> = config
        .settings
        .environments
        .iter()
        .filter(|(name, _)| **name != config.settings.environment)
        .map(|(name, env)| format!("{name} ({})", env.app_id.as_deref().unwrap_or("not pinned")))
        .collect();
    println!("configuration OK");
    println!("  file:         {file}");
    println!("  environment:  {}", config.settings.environment);
    println!(
        "  pinned app:   {}",
        config.pinned_app.as_deref().unwrap_or("none (not pinned)")
    );
    println!(
        "  token:        {} (from {})",
        config.token, config.token_source
    );
    println!(
        "  token's app:  {}",
        config
            .token
            .app_id_hint()
            .unwrap_or("not readable from the token")
    );
    println!("  api url:      {}", config.api_url);
    match &config.forward {
        Some(forward) => {
            println!("  forward to:   {}", forward.describe_urls());
            println!("  signing secret: from {}", forward.secret_source);
        }
        None => println!("  forward to:   none (the built-in bot answers)"),
    }
    match &config.cluster {
        Some(cluster) => {
            println!("  inbox:        shared by the cluster's members (the store below)");
            println!(
                "  cluster:      {} (this member: {}, at most {} members)",
                cluster.name, cluster.member, cluster.max_members
            );
            println!("  store:        {}", cluster.store_description);
            match &cluster.password_source {
                Some(source) => println!("  store password: from {source}"),
                None => println!("  store password: none (the server must not ask for one)"),
            }
            println!(
                "  claim lease:  {}, heartbeat every {}",
                humantime::format_duration(cluster.lease),
                humantime::format_duration(cluster.heartbeat)
            );
        }
        None => match flowcoach::inbox::file(&config, &ProcessEnv) {
            Ok(Some(path)) => println!("  inbox:        {}", path.display()),
            Ok(None) => println!("  inbox:        off (events acked on accept)"),
            Err(error) => {
                eprintln!("flowcoach: {error}");
                return exit::code(exit::CONFIG);
            }
        },
    }
    println!("  lock file:    {}", paths.lock.display());
    println!("  control:      {}", paths.socket.display());
    if !others.is_empty() {
        println!("  other envs:   {}", others.join(", "));
    }
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
    let passed = match from_systemd() {
        Ok(passed) => passed,
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
        passed,
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
