//! flowcoachctl's commands: find the socket, ask, print, pick the exit code.

use std::process::ExitCode;
use std::time::Duration;

use super::cli::{CtlCli, CtlCommand, InboxAction};
use super::client;
use super::discover::{self, Selector};
use super::protocol::{Command, Response};
use super::render;
use crate::config::ProcessEnv;
use crate::exit;

/// `flowcoachctl health` when no daemon could be asked: distinct from 1 (unhealthy) so a
/// health check can tell "down" from "not answering".
const HEALTH_NO_ANSWER: u8 = 2;

const TIMEOUT: Duration = Duration::from_secs(5);
const HANDOVER_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs one flowcoachctl command and returns its exit code.
pub fn run(cli: &CtlCli) -> ExitCode {
    let (command, failure) = match cli.command {
        CtlCommand::Status { .. } => (Command::Status, exit::FAILURE),
        CtlCommand::Health => (Command::Health, HEALTH_NO_ANSWER),
        CtlCommand::Metrics { openmetrics } => (Command::Metrics { openmetrics }, exit::FAILURE),
        CtlCommand::Handover => (Command::Handover, exit::FAILURE),
        CtlCommand::Inbox { ref action } => (inbox_command(action.as_ref()), exit::FAILURE),
    };
    let response = match ask(cli, command) {
        Ok(response) => response,
        Err(message) => {
            eprintln!("flowcoachctl: {message}");
            return exit::code(failure);
        }
    };
    match (&cli.command, response) {
        (CtlCommand::Status { json: true }, Response::Status(report)) => {
            match serde_json::to_string_pretty(&report) {
                Ok(text) => println!("{text}"),
                Err(error) => {
                    eprintln!("flowcoachctl: cannot print the report: {error}");
                    return exit::code(exit::FAILURE);
                }
            }
            exit::code(exit::OK)
        }
        (CtlCommand::Status { json: false }, Response::Status(report)) => {
            print!("{}", render::status(&report, render::now()));
            exit::code(exit::OK)
        }
        (CtlCommand::Health, Response::Health(report)) => {
            println!("{}", render::health(&report.health));
            exit::code(if report.health == crate::health::Health::Healthy {
                exit::OK
            } else {
                exit::FAILURE
            })
        }
        (CtlCommand::Metrics { .. }, Response::Metrics { exposition }) => {
            print!("{exposition}");
            exit::code(exit::OK)
        }
        (
            CtlCommand::Handover,
            Response::HandedOver {
                successor_pid,
                took_ms,
            },
        ) => {
            println!("handed over to pid {successor_pid} in {took_ms} ms");
            exit::code(exit::OK)
        }
        (CtlCommand::Inbox { .. }, Response::Inbox(report)) => {
            print!("{}", render::inbox(&report));
            exit::code(exit::OK)
        }
        (
            CtlCommand::Inbox { .. },
            Response::InboxList {
                envelopes,
                truncated,
            },
        ) => {
            print!("{}", render::inbox_list(&envelopes, truncated));
            exit::code(exit::OK)
        }
        (CtlCommand::Inbox { action }, Response::InboxChanged { count }) => {
            let done = match action {
                Some(InboxAction::Drop { .. }) => "dropped",
                _ => "pending again",
            };
            println!("{count} envelope(s) {done}");
            // Naming an envelope that is not there (or being delivered) is a failure.
            exit::code(
                if count == 0 && !matches!(action, Some(InboxAction::Retry { dead: true, .. })) {
                    exit::FAILURE
                } else {
                    exit::OK
                },
            )
        }
        (_, other) => {
            eprintln!("flowcoachctl: unexpected answer from flowcoach: {other:?}");
            exit::code(failure)
        }
    }
}

fn inbox_command(action: Option<&InboxAction>) -> Command {
    match action {
        None => Command::Inbox,
        Some(&InboxAction::List {
            dead,
            payload,
            limit,
        }) => Command::InboxList {
            dead,
            payload,
            limit,
        },
        Some(&InboxAction::Retry { id, .. }) => Command::InboxRetry { id },
        Some(&InboxAction::Drop { id }) => Command::InboxDrop { id },
    }
}

/// The daemon's answer, or what to tell the user instead (an error answer included).
fn ask(cli: &CtlCli, command: Command) -> Result<Response, String> {
    let selector = Selector {
        app: cli.app.as_deref(),
        environment: cli.environment.as_deref(),
    };
    let euid = nix::unistd::Uid::effective().as_raw();
    let path = discover::find_socket(cli.socket.as_deref(), selector, &ProcessEnv, euid)
        .map_err(|error| error.to_string())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start the async runtime: {error}"))?;
    let default_timeout = match command {
        // Starting a successor, its connect and the drain all happen within the answer.
        Command::Handover => HANDOVER_TIMEOUT,
        _ => TIMEOUT,
    };
    let response = runtime
        .block_on(client::request(
            &path,
            command,
            cli.timeout.unwrap_or(default_timeout),
        ))
        .map_err(|error| error.to_string())?;
    match response {
        Response::Error { message, .. } => Err(message),
        response => Ok(response),
    }
}
