//! flowcoachctl: the control client for a running flowcoach.

use std::process::ExitCode;

use clap::Parser;

use flowcoach::cli::CtlCli;
use flowcoach::exit;

fn main() -> ExitCode {
    match CtlCli::try_parse() {
        Ok(CtlCli {}) => {
            eprintln!("flowcoachctl: no command given; see --help");
            exit::code(exit::USAGE)
        }
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
