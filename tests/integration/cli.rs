//! The command line: configuration checks, exit codes, the token kept out of output.

use std::io::Write;
use std::process::{Command, Output};

const TOKEN: &str = "xapp-1-A0CLITEST1-42-cafe0123456789";

fn flowcoach(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_flowcoach"));
    command.args(args).env_clear();
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().unwrap()
}

fn config_file(text: &str) -> tempfile::NamedTempFile {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    file.write_all(text.as_bytes()).unwrap();
    file
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn check_config_accepts_a_good_configuration_and_redacts_the_token() {
    let file = config_file("environment = \"prod\"\n");
    let output = flowcoach(
        &["check-config", "--config", file.path().to_str().unwrap()],
        &[("SLACK_APP_TOKEN", TOKEN)],
    );
    let out = text(&output);
    assert_eq!(output.status.code(), Some(0), "{out}");
    assert!(out.contains("environment:  prod"), "{out}");
    assert!(out.contains("xapp-1-A0CLITEST1-…"), "{out}");
    assert!(!out.contains("cafe0123456789"), "{out}");
}

#[test]
fn check_config_names_the_bad_field_and_exits_78() {
    for (file_text, field) in [
        ("[connection]\nping_interval = \"never\"\n", "ping_interval"),
        (
            "[dispatch]\nresponse_deadline = \"5s\"\n",
            "dispatch.response_deadline",
        ),
        (
            "[slack]\napi_url = \"http://slack.example/api\"\n",
            "slack.api_url",
        ),
        ("[conection]\n", "conection"),
        ("this is not toml", "flowcoach.toml"),
    ] {
        let file = tempfile::Builder::new()
            .suffix("flowcoach.toml")
            .tempfile()
            .unwrap();
        std::fs::write(file.path(), file_text).unwrap();
        let output = flowcoach(
            &["check-config", "--config", file.path().to_str().unwrap()],
            &[("SLACK_APP_TOKEN", TOKEN)],
        );
        let out = text(&output);
        assert_eq!(output.status.code(), Some(78), "{file_text}: {out}");
        assert!(out.contains(field), "{file_text}: {out}");
    }
}

#[test]
fn config_path_comes_from_the_environment_too() {
    let file = config_file("environment = \"from-env\"\n");
    let output = flowcoach(
        &["check-config"],
        &[
            ("SLACK_APP_TOKEN", TOKEN),
            ("FLOWCOACH_CONFIG", file.path().to_str().unwrap()),
        ],
    );
    assert!(text(&output).contains("environment:  from-env"));
}

#[test]
fn a_missing_or_wrong_token_is_a_configuration_error() {
    let missing = flowcoach(&["check-config"], &[]);
    assert_eq!(missing.status.code(), Some(78));
    assert!(text(&missing).contains("SLACK_APP_TOKEN"));
    let bot_token = flowcoach(
        &["check-config"],
        &[("SLACK_APP_TOKEN", "xoxb-1-secretbot")],
    );
    assert_eq!(bot_token.status.code(), Some(78));
    assert!(text(&bot_token).contains("app-level token"));
    assert!(!text(&bot_token).contains("secretbot"));
    // The daemon refuses to start the same way.
    let run = flowcoach(&["run"], &[]);
    assert_eq!(run.status.code(), Some(78));
}

#[test]
fn usage_errors_exit_64_and_help_exits_0() {
    assert_eq!(flowcoach(&["--bogus"], &[]).status.code(), Some(64));
    let help = flowcoach(&["--help"], &[]);
    assert_eq!(help.status.code(), Some(0));
    assert!(text(&help).contains("check-config"));
    let version = Command::new(env!("CARGO_BIN_EXE_flowcoachctl"))
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(version.status.code(), Some(0));
    assert!(text(&version).contains(env!("CARGO_PKG_VERSION")));
}
