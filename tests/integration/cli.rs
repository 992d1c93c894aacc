//! The command line: configuration checks, exit codes, the token kept out of output.

use std::io::Write;
use std::process::{Command, Output};

use flowcoach_harness::{Daemon, simulator};

const TOKEN: &str = "xapp-1-A0CLITEST1-42-cafe0123456789";

fn flowcoach(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_flowcoach"));
    command.args(args).env_clear();
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().unwrap()
}

/// `check-config` of the file at `path` (holding `file_text`) must exit 78 naming `field`;
/// what it said.
fn check_config_refused(path: &std::path::Path, file_text: &str, field: &str) -> String {
    let output = flowcoach(
        &["check-config", "--config", path.to_str().unwrap()],
        &[("SLACK_APP_TOKEN", TOKEN)],
    );
    let out = text(&output);
    assert_eq!(output.status.code(), Some(78), "{file_text}: {out}");
    assert!(out.contains(field), "{file_text}: {out}");
    out
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
        &[("SLACK_APP_TOKEN", TOKEN), STATE],
    );
    let out = text(&output);
    assert_eq!(output.status.code(), Some(0), "{out}");
    assert!(out.contains("environment:  prod"), "{out}");
    assert!(out.contains("xapp-1-A0CLITEST1-…"), "{out}");
    assert!(!out.contains("cafe0123456789"), "{out}");
    assert!(
        out.contains("inbox:        /var/lib/flowcoach/A0CLITEST1.prod.inbox.sqlite"),
        "{out}"
    );
    // No place for the inbox: refused as `run` refuses it.
    let output = flowcoach(
        &["check-config", "--config", file.path().to_str().unwrap()],
        &[("SLACK_APP_TOKEN", TOKEN)],
    );
    let out = text(&output);
    assert_eq!(output.status.code(), Some(78), "{out}");
    assert!(out.contains("STATE_DIRECTORY"), "{out}");
}

/// Where the inbox goes, as systemd's `StateDirectory=` says.
const STATE: (&str, &str) = ("STATE_DIRECTORY", "/var/lib/flowcoach");

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
        check_config_refused(file.path(), file_text, field);
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
    // The daemon's command line is the daemon's alone: the simulator, the demo and the
    // benchmarks are flowcoach-dev's.
    for tool in ["sim", "demo", "bench", "generate-assets"] {
        assert!(
            !text(&help)
                .lines()
                .any(|line| line.trim_start().starts_with(tool)),
            "{tool} in:\n{}",
            text(&help)
        );
        assert_eq!(flowcoach(&[tool], &[]).status.code(), Some(64), "{tool}");
    }
    let version = Command::new(env!("CARGO_BIN_EXE_flowcoachctl"))
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(version.status.code(), Some(0));
    assert!(text(&version).contains(env!("CARGO_PKG_VERSION")));
}

/// Values that parse but are out of range, each with the field the refusal must name:
/// huge integers (a semaphore's limit, a sum that wraps), huge durations (a clock that
/// overflows), zero where zero means nothing, a group that does not exist.
const OUT_OF_RANGE: &[(&str, &str)] = &[
    (
        "[dispatch]\nmax_concurrent_handlers = 9223372036854775807\n",
        "dispatch.max_concurrent_handlers",
    ),
    (
        "[dispatch]\nmax_queued_handlers = 18446744073709551615\n",
        "dispatch.max_queued_handlers",
    ),
    (
        "[dispatch]\ndedup_capacity = 18446744073709551615\n",
        "dispatch.dedup_capacity",
    ),
    (
        "[connection]\nmax_message_bytes = 18446744073709551615\n",
        "connection.max_message_bytes",
    ),
    (
        "[connection]\nstable_after = \"500000000000y\"\n",
        "connection.stable_after",
    ),
    (
        "[connection]\nping_interval = \"500000000000y\"\n",
        "connection.ping_interval",
    ),
    (
        "[handover]\ntimeout = \"500000000000y\"\n",
        "handover.timeout",
    ),
    (
        "[conflicts]\nown_socket_grace = \"500000000000y\"\n",
        "conflicts.own_socket_grace",
    ),
    (
        "[connection]\nstable_after = \"0s\"\n",
        "connection.stable_after",
    ),
    (
        "[connection]\ntoo_many_websockets_backoff = \"0s\"\n",
        "connection.too_many_websockets_backoff",
    ),
    (
        "[service]\noutage_budget = \"0s\"\n",
        "service.outage_budget",
    ),
    (
        "[conflicts]\ntoo_many_websockets_unhealthy_after = 0\n",
        "conflicts.too_many_websockets_unhealthy_after",
    ),
    (
        "[control]\ngroup = \"no-such-group-flowcoach-test\"\n",
        "control.group",
    ),
];

#[test]
fn check_config_refuses_values_out_of_range_naming_the_field_and_the_range() {
    for (file_text, field) in OUT_OF_RANGE {
        let file = config_file(file_text);
        let out = check_config_refused(file.path(), file_text, field);
        let explained = out.contains("must be from") || out.contains("no group named");
        assert!(explained, "{file_text}: {out}");
    }
}

#[tokio::test]
async fn run_refuses_values_out_of_range_before_connecting() {
    let sim = simulator(|_| {}).await;
    for (file_text, field) in OUT_OF_RANGE {
        let mut daemon = Daemon::start_with(&sim, file_text, &[]);
        let code = daemon.exit_code().await;
        let said = daemon.stderr();
        assert_eq!(code, 78, "{file_text}: {said}");
        assert!(said.contains(field), "{file_text}: {said}");
    }
    assert!(
        sim.record().open_calls.is_empty(),
        "refused before connecting"
    );
}

#[test]
fn the_defaults_and_the_bounds_of_each_range_are_valid() {
    let file = config_file(
        "[connection]\nping_interval = \"10m\"\nstable_after = \"1s\"\nmax_message_bytes = 67108864\n\
         [dispatch]\nmax_concurrent_handlers = 10000\nmax_queued_handlers = 0\n\
         [handover]\ntimeout = \"1h\"\n",
    );
    let output = flowcoach(
        &["check-config", "--config", file.path().to_str().unwrap()],
        &[("SLACK_APP_TOKEN", TOKEN), STATE],
    );
    assert_eq!(output.status.code(), Some(0), "{}", text(&output));
    let defaults = flowcoach(&["check-config"], &[("SLACK_APP_TOKEN", TOKEN), STATE]);
    assert_eq!(defaults.status.code(), Some(0), "{}", text(&defaults));
}
