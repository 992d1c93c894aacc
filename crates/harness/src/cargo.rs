//! Building the workspace's binaries from a program that cargo started (a test, the
//! development binary under `cargo run`).

use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};

/// Runs `cargo build` with `args` in `workspace`, with the cargo the caller was started by
/// (`$CARGO`) and without the variables cargo sets for the caller: build scripts that
/// watch one of them (ring watches `CARGO_MANIFEST_DIR`) would otherwise rebuild on every
/// alternation with a plain `cargo build`.
pub fn build(workspace: &Path, args: &[&str]) -> std::io::Result<ExitStatus> {
    command(workspace, args).status()
}

/// The command [`build`] runs, for a caller that adds to its environment.
pub fn command(workspace: &Path, args: &[&str]) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut build = Command::new(cargo);
    build
        .arg("build")
        .args(args)
        .current_dir(workspace)
        .stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let set_for_the_caller = [
            "CARGO_MANIFEST_",
            "CARGO_PKG_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|prefix| key.starts_with(prefix))
            || [
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
            ]
            .contains(&key.as_ref());
        if set_for_the_caller {
            build.env_remove(key.as_ref());
        }
    }
    build
}
