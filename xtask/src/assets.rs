//! `cargo xtask assets --out DIR`: man pages and shell completions for both binaries,
//! generated from their clap definitions (`flowcoach::cli`, `flowcoach::control::cli`) so
//! that they can never disagree with the real command lines. Run at packaging time
//! (`packaging/build.sh`); the packages install what it writes:
//!
//! ```text
//! DIR/man/flowcoach.1, flowcoach-<subcommand>.1, flowcoachctl.1, flowcoachctl-<subcommand>.1
//! DIR/completions/bash/flowcoach, flowcoachctl
//! DIR/completions/zsh/_flowcoach, _flowcoachctl
//! DIR/completions/fish/flowcoach.fish, flowcoachctl.fish
//! ```
//!
//! The output depends on nothing but the definitions (and `SOURCE_DATE_EPOCH` for the man
//! pages' date, when set), so packages build reproducibly.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use clap::{Command, CommandFactory};
use clap_complete::Shell;
use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, roman};

use flowcoach::cli::DaemonCli;
use flowcoach::config::{CREDENTIAL_NAME, SIGNING_SECRET_CREDENTIAL, env};
use flowcoach::control::cli::CtlCli;
use flowcoach::host::paths::SYSTEM_RUNTIME_DIR;

const MANUAL: &str = "flowcoach manual";

/// The man pages' NAME lines and descriptions (`--help` shows the package's description).
const DAEMON_ABOUT: &str =
    "keep a Slack app connected over Socket Mode, as a systemd service with zero-gap upgrades";
const DAEMON_DESCRIPTION: &str = "flowcoach keeps a Slack app connected over Socket Mode: it acks and dispatches events, slash commands and interactions, rotates connections without a gap and survives Slack's disconnects. flowcoach run (the default) is the service: it follows the sd_notify contract (readiness, status, watchdog), takes its control socket from systemd, holds one lock per app and environment on the host, and hands its connection over to a successor without a gap (flowcoachctl handover, systemctl reload). The token comes from the systemd credential slack-app-token, the environment's token_file or SLACK_APP_TOKEN, never from the command line. flowcoach check-config validates the configuration and the token without connecting.";
const CTL_ABOUT: &str = "talk to a running flowcoach over its control socket";
const CTL_DESCRIPTION: &str = "flowcoachctl asks a running flowcoach, over its control socket, for its status and health, and starts a handover to the flowcoach binary on disk (what systemctl reload flowcoach runs). With the packaged units the sockets are /run/flowcoach/control.sock and /run/flowcoach/control.NAME.sock (select one with --env NAME).";

/// Writes the man pages and completions into `out`; returns the files written.
pub fn generate(out: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let date = source_date();
    let binaries = [
        (
            "flowcoach",
            DaemonCli::command(),
            DAEMON_ABOUT,
            DAEMON_DESCRIPTION,
            daemon_sections(),
        ),
        (
            "flowcoachctl",
            CtlCli::command(),
            CTL_ABOUT,
            CTL_DESCRIPTION,
            ctl_sections(),
        ),
    ];
    for (name, command, about, description, extra) in binaries {
        let page = command.clone().about(about).long_about(description);
        written.extend(man_pages(page, &extra, &date, &out.join("man"))?);
        written.extend(completions(name, &command, &out.join("completions"))?);
    }
    Ok(written)
}

/// The pages of `command` and of each visible subcommand (`flowcoach-run.1`, …), the way
/// `man flowcoach` lists them. `extra` goes at the end of the top-level page.
fn man_pages(command: Command, extra: &Roff, date: &str, dir: &Path) -> io::Result<Vec<PathBuf>> {
    fs::create_dir_all(dir)?;
    let mut command = command.disable_help_subcommand(true);
    command.build();
    let mut written = Vec::new();
    let subcommands: Vec<Command> = command.get_subcommands().cloned().collect();
    for sub in subcommands {
        let page = page(sub, date);
        let path = dir.join(page.get_filename());
        let mut text = Vec::new();
        page.render(&mut text)?;
        fs::write(&path, text)?;
        written.push(path);
    }
    let page = page(command, date);
    let path = dir.join(page.get_filename());
    let mut text = Vec::new();
    page.render(&mut text)?;
    extra.to_writer(&mut text)?;
    fs::write(&path, text)?;
    written.push(path);
    Ok(written)
}

fn page(command: Command, date: &str) -> Man {
    Man::new(command).manual(MANUAL).date(date)
}

/// bash, zsh and fish completions for `command`, in one directory per shell, under the
/// names each shell's vendor directory expects.
fn completions(name: &'static str, command: &Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut command = command.clone();
    let mut written = Vec::new();
    for (shell, file) in [
        (Shell::Bash, name.to_owned()),
        (Shell::Zsh, format!("_{name}")),
        (Shell::Fish, format!("{name}.fish")),
    ] {
        let shell_dir = dir.join(shell.to_string());
        fs::create_dir_all(&shell_dir)?;
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut command, name, &mut text);
        let path = shell_dir.join(file);
        fs::write(&path, text)?;
        written.push(path);
    }
    Ok(written)
}

/// `SOURCE_DATE_EPOCH` as `YYYY-MM-DD` (reproducible builds), else no date.
fn source_date() -> String {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|value| value.trim().parse::<u64>().ok())
        .map(|secs| {
            let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            humantime::format_rfc3339_seconds(time).to_string()[..10].to_owned()
        })
        .unwrap_or_default()
}

/// One `.TP` entry: a bold term and its description.
fn item(roff: &mut Roff, term: &str, text: &str) {
    roff.control("TP", []);
    roff.text([bold(term)]);
    roff.text([roman(text)]);
}

fn section(roff: &mut Roff, title: &str) {
    roff.control("SH", [title]);
}

fn daemon_sections() -> Roff {
    let mut roff = Roff::default();
    section(&mut roff, "ENVIRONMENT");
    item(
        &mut roff,
        env::APP_TOKEN,
        "The Slack app-level token (xapp-…), when neither a systemd credential nor the environment's token_file provides one. Never give the token on the command line.",
    );
    item(
        &mut roff,
        env::SIGNING_SECRET,
        "The signing secret of the app behind [forward], when neither a systemd credential nor the environment's signing_secret_file provides one. Never give it on the command line.",
    );
    item(
        &mut roff,
        env::CREDENTIALS_DIRECTORY,
        &format!(
            "Set by systemd for LoadCredential=: the token is read from its file {CREDENTIAL_NAME} first, the signing secret from {SIGNING_SECRET_CREDENTIAL}."
        ),
    );
    item(
        &mut roff,
        env::CONFIG,
        "The settings file, when --config is not given.",
    );
    item(
        &mut roff,
        env::ENVIRONMENT,
        "The environment to run, when --env is not given; else the file's environment key.",
    );
    item(
        &mut roff,
        env::API_URL,
        "The Slack Web API base URL (default https://slack.com/api).",
    );
    item(
        &mut roff,
        env::LOG,
        "A tracing filter such as info or flowcoach=debug.",
    );
    item(&mut roff, env::LOG_FORMAT, "text or json.");
    item(
        &mut roff,
        env::SYSTEMD_RUNTIME_DIRECTORY,
        &format!(
            "Set by systemd for RuntimeDirectory=: where the lock file and the control socket go; else {}, else {SYSTEM_RUNTIME_DIR} for root or $XDG_RUNTIME_DIR/flowcoach.",
            env::RUNTIME_DIR
        ),
    );

    section(&mut roff, "FILES");
    item(
        &mut roff,
        "/etc/flowcoach/flowcoach.toml",
        "The settings file of the packaged service units.",
    );
    item(
        &mut roff,
        "/etc/flowcoach/slack-app-token, /etc/flowcoach/NAME.token",
        "The token of flowcoach.service and of flowcoach@NAME.service, passed as a systemd credential (LoadCredential=); mode 0600, owned by root.",
    );
    item(
        &mut roff,
        &format!("{SYSTEM_RUNTIME_DIR}/APP.ENV.pid"),
        "The instance lock: one instance per Slack app and environment on a host.",
    );
    item(
        &mut roff,
        &format!("{SYSTEM_RUNTIME_DIR}/control.sock, {SYSTEM_RUNTIME_DIR}/control.NAME.sock"),
        "The control sockets of the packaged units (flowcoach.socket, flowcoach@NAME.socket), for flowcoachctl(1); without socket activation the daemon binds APP.ENV.sock beside its lock.",
    );

    section(&mut roff, "SIGNALS");
    item(
        &mut roff,
        "SIGTERM, SIGINT",
        "Stop taking envelopes, let in-flight handlers finish within dispatch.drain_timeout, close the connection and exit 0; a second signal exits at once.",
    );
    item(
        &mut roff,
        "SIGHUP",
        "Reload the settings file and the token (rotation without a gap).",
    );

    exit_status(
        &mut roff,
        &[
            ("0", "Clean stop."),
            ("1", "Any other failure."),
            ("64", "Bad command line."),
            (
                "69",
                "The [cluster] has no room for this member (cluster.max_members, or Slack's 10 sockets per app): restarting cannot help (RestartPreventExitStatus=69).",
            ),
            ("75", "Another instance holds the app on this host."),
            (
                "78",
                "Bad configuration, a missing or bad token, or a permanent Slack error: restarting cannot help (RestartPreventExitStatus=78).",
            ),
        ],
    );
    see_also(
        &mut roff,
        &[
            ("flowcoachctl", "1"),
            ("systemctl", "1"),
            ("systemd.exec", "5"),
        ],
    );
    roff
}

fn ctl_sections() -> Roff {
    let mut roff = Roff::default();
    section(&mut roff, "ENVIRONMENT");
    item(
        &mut roff,
        env::CONTROL_SOCKET,
        "The control socket, when --socket is not given.",
    );
    item(
        &mut roff,
        env::RUNTIME_DIR,
        &format!(
            "Where to look for control sockets (*.sock, filtered by --env NAME as *.NAME.sock and --app ID as ID.*.sock); else {SYSTEM_RUNTIME_DIR} for root, else $XDG_RUNTIME_DIR/flowcoach and then {SYSTEM_RUNTIME_DIR}."
        ),
    );

    section(&mut roff, "PERMISSIONS");
    roff.text([roman(
        "The daemon lets in root, its own user and the members of its configured control group (the packaged configuration says flowcoach): add an administrator with ",
    ), bold("usermod -aG flowcoach NAME"), roman(".")]);

    exit_status(
        &mut roff,
        &[
            ("0", "Done; for health: healthy."),
            (
                "1",
                "Failed (for handover: rolled back, the running instance keeps serving); for health: degraded or unhealthy.",
            ),
            ("2", "health only: no daemon answered."),
            ("64", "Bad command line."),
        ],
    );
    see_also(&mut roff, &[("flowcoach", "1"), ("systemctl", "1")]);
    roff
}

fn exit_status(roff: &mut Roff, codes: &[(&str, &str)]) {
    section(roff, "EXIT STATUS");
    for (code, meaning) in codes {
        item(roff, code, meaning);
    }
}

fn see_also(roff: &mut Roff, pages: &[(&str, &str)]) {
    section(roff, "SEE ALSO");
    let mut inlines = Vec::new();
    for (index, (name, number)) in pages.iter().enumerate() {
        if index > 0 {
            inlines.push(roman(", "));
        }
        inlines.push(bold(*name));
        inlines.push(roman(format!("({number})")));
    }
    roff.text(inlines);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_pages_and_completions_for_both_binaries() {
        let dir = tempfile::tempdir().unwrap();
        let files = generate(dir.path()).unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| {
                p.strip_prefix(dir.path())
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        for expected in [
            "man/flowcoach.1",
            "man/flowcoach-run.1",
            "man/flowcoach-check-config.1",
            "man/flowcoachctl.1",
            "man/flowcoachctl-handover.1",
            "completions/bash/flowcoach",
            "completions/zsh/_flowcoachctl",
            "completions/fish/flowcoachctl.fish",
        ] {
            assert!(
                names.iter().any(|n| n == expected),
                "{expected} in {names:?}"
            );
        }
        // The daemon's pages and completions know the daemon alone: the development tools
        // (simulator, demo, benchmark) live in another binary.
        for tool in ["sim", "demo", "bench", "generate-assets"] {
            assert!(
                !names
                    .iter()
                    .any(|n| n.contains(&format!("flowcoach-{tool}"))),
                "{names:?}"
            );
        }
        let page = fs::read_to_string(dir.path().join("man/flowcoach.1")).unwrap();
        assert!(page.contains("EXIT STATUS"), "{page}");
        assert!(page.contains("keep a Slack app connected"), "{page}");
        assert!(page.contains("SLACK_APP_TOKEN"), "{page}");
        assert!(!page.contains("simulator"), "{page}");
        let bash = fs::read_to_string(dir.path().join("completions/bash/flowcoachctl")).unwrap();
        assert!(bash.contains("handover"), "{bash}");
        let bash = fs::read_to_string(dir.path().join("completions/bash/flowcoach")).unwrap();
        assert!(
            bash.contains("check-config") && !bash.contains("bench"),
            "{bash}"
        );
    }
}
