//! Which control socket `flowcoachctl` talks to.
//!
//! `--socket PATH`, else `$FLOWCOACH_CONTROL_SOCKET`, else a socket in the runtime
//! directories, found with the daemon's rules ([`paths::runtime_dirs`]):
//! `$RUNTIME_DIRECTORY` (its first path), else `$FLOWCOACH_RUNTIME_DIR`, else
//! `/run/flowcoach` for root, else `$XDG_RUNTIME_DIR/flowcoach`, else
//! `/tmp/flowcoach-<euid>`. Without either variable, a user other than root also looks in
//! `/run/flowcoach`, where a system-wide daemon's socket is (for members of its control
//! group). Sockets are named `<app>.<env>.sock`: with `--app` and `--env` that file is used;
//! otherwise the single socket matching the given filter, and several are an error that
//! lists them.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use crate::config::EnvSource;
use crate::host::paths;

/// The variables discovery reads (`CONTROL_SOCKET` and those of the runtime directory) are
/// defined with all the others in [`crate::config::env`].
pub use crate::config::env;

/// Narrows the choice when several instances run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Selector<'a> {
    /// `--app`: the Slack app ID (the first part of the socket's name).
    pub app: Option<&'a str>,
    /// `--env`: the environment (the second part).
    pub environment: Option<&'a str>,
}

impl Selector<'_> {
    fn matches(&self, file_name: &str) -> bool {
        let Some((app, environment)) = file_name
            .strip_suffix(".sock")
            .and_then(|stem| stem.split_once('.'))
        else {
            return self.app.is_none() && self.environment.is_none();
        };
        self.app.is_none_or(|want| want == app)
            && self.environment.is_none_or(|want| want == environment)
    }

    fn describe(&self) -> String {
        match (self.app, self.environment) {
            (None, None) => String::new(),
            (Some(app), None) => format!(" for app {app}"),
            (None, Some(environment)) => format!(" for environment {environment}"),
            (Some(app), Some(environment)) => {
                format!(" for app {app} in environment {environment}")
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    #[error(
        "no flowcoach control socket{filter} in {looked_in}: is flowcoach running? (give --socket PATH if it uses another directory)"
    )]
    NotFound { filter: String, looked_in: String },
    #[error(
        "several flowcoach control sockets in {}: {}; choose one with --socket PATH or --env NAME (or --app ID)",
        dir.display(),
        found.join(", ")
    )]
    Ambiguous { dir: PathBuf, found: Vec<String> },
}

/// The socket to talk to; see the module documentation for the rules.
pub fn find_socket(
    socket: Option<&Path>,
    selector: Selector<'_>,
    env: &dyn EnvSource,
    euid: u32,
) -> Result<PathBuf, DiscoverError> {
    if let Some(socket) = socket {
        return Ok(socket.to_owned());
    }
    if let Some(socket) = env.var(env::CONTROL_SOCKET).filter(|s| !s.is_empty()) {
        return Ok(PathBuf::from(socket));
    }
    let dirs = paths::runtime_dirs(env, euid == 0, euid);
    if let (Some(app), Some(environment)) = (selector.app, selector.environment) {
        let name = format!("{app}.{environment}.sock");
        let found = dirs.iter().map(|dir| dir.join(&name)).find(|p| p.exists());
        // When none exists, the first candidate gives the client's "no daemon" message.
        return Ok(found.unwrap_or_else(|| dirs[0].join(&name)));
    }
    let mut looked_in = Vec::new();
    for dir in &dirs {
        let mut found = match sockets_in(dir, selector) {
            Ok(found) => found,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                looked_in.push(dir.display().to_string());
                continue;
            }
            Err(error) => {
                looked_in.push(format!("{} ({error})", dir.display()));
                continue;
            }
        };
        match found.len() {
            0 => looked_in.push(dir.display().to_string()),
            1 => return Ok(dir.join(found.remove(0))),
            _ => {
                return Err(DiscoverError::Ambiguous {
                    dir: dir.clone(),
                    found,
                });
            }
        }
    }
    Err(DiscoverError::NotFound {
        filter: selector.describe(),
        looked_in: looked_in.join(", "),
    })
}

/// The names of the sockets in `dir` that `selector` accepts, sorted.
fn sockets_in(dir: &Path, selector: Selector<'_>) -> std::io::Result<Vec<String>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if name.ends_with(".sock")
            && entry.file_type().is_ok_and(|t| t.is_socket())
            && selector.matches(&name)
        {
            found.push(name);
        }
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(dir: &Path, name: &str) -> std::os::unix::net::UnixListener {
        std::os::unix::net::UnixListener::bind(dir.join(name)).unwrap()
    }

    #[test]
    fn an_explicit_socket_wins_then_the_variable() {
        let env = [(env::CONTROL_SOCKET, "/from/env.sock")];
        let given = find_socket(Some(Path::new("/given.sock")), Selector::default(), &env, 0);
        assert_eq!(given.unwrap(), PathBuf::from("/given.sock"));
        let from_env = find_socket(None, Selector::default(), &env, 0);
        assert_eq!(from_env.unwrap(), PathBuf::from("/from/env.sock"));
    }

    #[test]
    fn runtime_directories_are_the_daemons() {
        let user = [(env::XDG_RUNTIME_DIR, "/run/user/1000")];
        let absent = Selector {
            app: Some("A0NOSUCHAPP"),
            environment: Some("prod"),
        };
        // No such socket anywhere: the first directory names it.
        assert_eq!(
            find_socket(None, absent, &user, 1000).unwrap(),
            PathBuf::from("/run/user/1000/flowcoach/A0NOSUCHAPP.prod.sock")
        );
        assert_eq!(
            find_socket(None, absent, &user, 0).unwrap(),
            Path::new(paths::SYSTEM_RUNTIME_DIR).join("A0NOSUCHAPP.prod.sock")
        );
    }

    #[test]
    fn one_socket_is_found_several_need_a_choice() {
        let dir = tempfile::tempdir().unwrap();
        let env = [(env::RUNTIME_DIR, dir.path().to_str().unwrap())];
        let none = find_socket(None, Selector::default(), &env, 1000).unwrap_err();
        assert!(matches!(none, DiscoverError::NotFound { .. }), "{none}");

        let _prod = socket(dir.path(), "A1.prod.sock");
        std::fs::write(dir.path().join("A1.prod.pid"), "1").unwrap();
        std::fs::write(dir.path().join("not-a-socket.sock"), "").unwrap();
        let one = find_socket(None, Selector::default(), &env, 1000).unwrap();
        assert_eq!(one, dir.path().join("A1.prod.sock"));

        let _dev = socket(dir.path(), "A1.dev.sock");
        let several = find_socket(None, Selector::default(), &env, 1000)
            .unwrap_err()
            .to_string();
        assert!(
            several.contains("A1.dev.sock, A1.prod.sock") && several.contains("--env"),
            "{several}"
        );
        let dev = Selector {
            environment: Some("dev"),
            ..Selector::default()
        };
        assert_eq!(
            find_socket(None, dev, &env, 1000).unwrap(),
            dir.path().join("A1.dev.sock")
        );
        let other_app = Selector {
            app: Some("A2"),
            ..Selector::default()
        };
        let error = find_socket(None, other_app, &env, 1000).unwrap_err();
        assert!(error.to_string().contains("for app A2"), "{error}");
    }

    #[test]
    fn app_and_environment_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let env = [(env::RUNTIME_DIR, dir.path().to_str().unwrap())];
        let both = Selector {
            app: Some("A9"),
            environment: Some("prod"),
        };
        assert_eq!(
            find_socket(None, both, &env, 0).unwrap(),
            dir.path().join("A9.prod.sock")
        );
    }
}
