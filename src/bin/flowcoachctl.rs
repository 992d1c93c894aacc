//! flowcoachctl: the control client for a running flowcoach.

use std::process::ExitCode;

use clap::Parser;

use flowcoach::control::cli::CtlCli;
use flowcoach::control::ctl;
use flowcoach::exit;

fn main() -> ExitCode {
    match CtlCli::try_parse() {
        Ok(cli) => ctl::run(&cli),
        Err(error) => {
            let _ = error.print();
            exit::code(if error.use_stderr() {
                exit::USAGE
            } else {
                exit::OK
            })
        }
    }
}
