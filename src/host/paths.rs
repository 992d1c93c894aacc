//! Where the instance's runtime files live: the runtime directory, and in it the lock (PID)
//! file and the control socket of one app in one environment.

use std::fs::DirBuilder;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::config::EnvSource;

/// The variables that choose the runtime directory (`SYSTEMD_RUNTIME_DIRECTORY`,
/// `RUNTIME_DIR`, `XDG_RUNTIME_DIR`, in order of precedence) are defined with all the others
/// in [`crate::config::env`].
pub use crate::config::env;

/// The runtime directory of a root instance without any variable set.
pub const SYSTEM_RUNTIME_DIR: &str = "/run/flowcoach";

/// The name used in file names when the token gives no app ID hint.
pub const UNKNOWN_APP: &str = "unknown-app";

/// Where the lock file and the control socket go: the first of [`runtime_dirs`], with
/// this process's effective user ID for the last resort.
pub fn runtime_dir(env: &dyn EnvSource, euid_is_root: bool) -> PathBuf {
    let euid = nix::unistd::geteuid().as_raw();
    let mut dirs = runtime_dirs(env, euid_is_root, euid);
    dirs.swap_remove(0)
}

/// The runtime directories in order, never empty. The first is where an instance keeps its
/// lock file and control socket, first match wins:
///
/// 1. `$RUNTIME_DIRECTORY` (systemd's `RuntimeDirectory=`; the first of several paths);
/// 2. `$FLOWCOACH_RUNTIME_DIR`;
/// 3. `/run/flowcoach` when running as root;
/// 4. `$XDG_RUNTIME_DIR/flowcoach` (ignored when relative, as the XDG spec requires);
/// 5. `/tmp/flowcoach-<euid>`, a last resort for a user without a login session. `/tmp` is
///    shared: another user could create that directory first. [`ensure_dir`] refuses a
///    directory that others may write to and the lock file is opened without following
///    symlinks, but a service should set one of the variables above.
///
/// When neither variable is set, a user other than root gets [`SYSTEM_RUNTIME_DIR`] as a
/// second candidate: where a system-wide instance's files are, for a client looking for a
/// daemon ([`crate::control::discover`]).
///
/// Empty variables count as unset.
pub fn runtime_dirs(env: &dyn EnvSource, euid_is_root: bool, euid: u32) -> Vec<PathBuf> {
    let var = |name: &str| env.var(name).filter(|value| !value.is_empty());
    if let Some(dirs) = var(env::SYSTEMD_RUNTIME_DIRECTORY)
        && let Some(first) = dirs.split(':').find(|dir| !dir.is_empty())
    {
        return vec![PathBuf::from(first)];
    }
    if let Some(dir) = var(env::RUNTIME_DIR) {
        return vec![PathBuf::from(dir)];
    }
    let system = PathBuf::from(SYSTEM_RUNTIME_DIR);
    if euid_is_root {
        return vec![system];
    }
    let own = match var(env::XDG_RUNTIME_DIR).map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir.join("flowcoach"),
        _ => PathBuf::from(format!("/tmp/flowcoach-{euid}")),
    };
    vec![own, system]
}

/// The runtime files of one app in one environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstancePaths {
    pub dir: PathBuf,
    /// `<dir>/<app>.<env>.pid`: the flock'ed PID file.
    pub lock: PathBuf,
    /// `<dir>/<app>.<env>.sock`: the control socket.
    pub socket: PathBuf,
}

impl InstancePaths {
    /// `app_hint` is the token's app ID hint ([`crate::token::AppToken::app_id_hint`]);
    /// without one the files are named after [`UNKNOWN_APP`]. App and environment are
    /// validated elsewhere, but any character other than ASCII letters, digits, '-' and '_'
    /// is replaced with '_' here too, so a name can never leave the directory or hide as a
    /// dot file.
    ///
    /// A unix socket path is limited to 107 bytes: keep `dir` short.
    pub fn new(dir: impl Into<PathBuf>, app_hint: Option<&str>, environment: &str) -> Self {
        let dir = dir.into();
        let app = safe_name(app_hint.unwrap_or(UNKNOWN_APP));
        let stem = format!("{app}.{}", safe_name(environment));
        InstancePaths {
            lock: dir.join(format!("{stem}.pid")),
            socket: dir.join(format!("{stem}.sock")),
            dir,
        }
    }
}

/// `name` with every character outside `[A-Za-z0-9_-]` replaced by '_'; "_" for an empty
/// name.
pub(crate) fn safe_name(name: &str) -> String {
    if name.is_empty() {
        return "_".to_owned();
    }
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Creates `dir` (and missing parents) with mode 0750 if it does not exist. An existing
/// directory keeps its mode (systemd's `RuntimeDirectoryMode=` decides), but one that
/// anybody may write to without the sticky bit is refused: others could replace the lock
/// file. Errors name the path.
pub fn ensure_dir(dir: &Path) -> io::Result<()> {
    let named = |e: io::Error, what: &str| {
        io::Error::new(
            e.kind(),
            format!("{what} runtime directory {}: {e}", dir.display()),
        )
    };
    DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)
        .map_err(|e| named(e, "cannot create"))?;
    let metadata = std::fs::metadata(dir).map_err(|e| named(e, "cannot inspect"))?;
    let mode = metadata.permissions().mode();
    if mode & 0o002 != 0 && mode & 0o1000 == 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "runtime directory {} is writable by everybody (mode {:o}): another user could replace the lock file; use a private directory",
                dir.display(),
                mode & 0o7777
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [(&str, &str); 3] = [
        (
            env::SYSTEMD_RUNTIME_DIRECTORY,
            "/run/flowcoach-unit:/run/other",
        ),
        (env::RUNTIME_DIR, "/srv/flowcoach/run"),
        (env::XDG_RUNTIME_DIR, "/run/user/1000"),
    ];

    #[test]
    fn systemd_runtime_directory_wins_and_only_its_first_path_counts() {
        assert_eq!(
            runtime_dir(&ALL, false),
            PathBuf::from("/run/flowcoach-unit")
        );
        assert_eq!(
            runtime_dir(&ALL, true),
            PathBuf::from("/run/flowcoach-unit")
        );
        let single = [(env::SYSTEMD_RUNTIME_DIRECTORY, "/run/x")];
        assert_eq!(runtime_dir(&single, false), PathBuf::from("/run/x"));
    }

    #[test]
    fn then_the_operators_choice() {
        let env = [
            (env::SYSTEMD_RUNTIME_DIRECTORY, ""),
            (env::RUNTIME_DIR, "/srv/flowcoach/run"),
            (env::XDG_RUNTIME_DIR, "/run/user/1000"),
        ];
        assert_eq!(runtime_dir(&env, true), PathBuf::from("/srv/flowcoach/run"));
        assert_eq!(
            runtime_dir(&env, false),
            PathBuf::from("/srv/flowcoach/run")
        );
    }

    #[test]
    fn then_run_for_root_and_the_session_directory_for_users() {
        let env = [(env::XDG_RUNTIME_DIR, "/run/user/1000")];
        assert_eq!(runtime_dir(&env, true), PathBuf::from(SYSTEM_RUNTIME_DIR));
        assert_eq!(
            runtime_dir(&env, false),
            PathBuf::from("/run/user/1000/flowcoach")
        );
    }

    #[test]
    fn last_resort_is_a_per_user_directory_in_tmp() {
        let expected = PathBuf::from(format!("/tmp/flowcoach-{}", nix::unistd::geteuid()));
        assert_eq!(runtime_dir(&[], false), expected);
        let relative_xdg = [(env::XDG_RUNTIME_DIR, "run/user")];
        assert_eq!(runtime_dir(&relative_xdg, false), expected);
        let empty = [(env::XDG_RUNTIME_DIR, ""), (env::RUNTIME_DIR, "")];
        assert_eq!(runtime_dir(&empty, false), expected);
    }

    #[test]
    fn runtime_directories_follow_the_daemons_rules() {
        assert_eq!(
            runtime_dirs(&ALL, false, 1000),
            vec![PathBuf::from("/run/flowcoach-unit")]
        );
        let operator = [(env::RUNTIME_DIR, "/srv/run")];
        assert_eq!(
            runtime_dirs(&operator, true, 0),
            vec![PathBuf::from("/srv/run")]
        );
        let user = [(env::XDG_RUNTIME_DIR, "/run/user/1000")];
        assert_eq!(
            runtime_dirs(&user, true, 0),
            vec![PathBuf::from(SYSTEM_RUNTIME_DIR)]
        );
        // A client of another user also looks where a system-wide daemon is.
        assert_eq!(
            runtime_dirs(&user, false, 1000),
            vec![
                PathBuf::from("/run/user/1000/flowcoach"),
                PathBuf::from(SYSTEM_RUNTIME_DIR)
            ]
        );
        assert_eq!(
            runtime_dirs(&[(env::XDG_RUNTIME_DIR, "relative")], false, 1000)[0],
            PathBuf::from("/tmp/flowcoach-1000")
        );
    }

    #[test]
    fn file_names_carry_app_and_environment() {
        let paths = InstancePaths::new("/run/flowcoach", Some("A08FU15EA2Y"), "prod");
        assert_eq!(paths.dir, PathBuf::from("/run/flowcoach"));
        assert_eq!(
            paths.lock,
            PathBuf::from("/run/flowcoach/A08FU15EA2Y.prod.pid")
        );
        assert_eq!(
            paths.socket,
            PathBuf::from("/run/flowcoach/A08FU15EA2Y.prod.sock")
        );
        let unknown = InstancePaths::new("/d", None, "dev_1-x");
        assert_eq!(unknown.lock, PathBuf::from("/d/unknown-app.dev_1-x.pid"));
        assert_eq!(unknown.socket, PathBuf::from("/d/unknown-app.dev_1-x.sock"));
    }

    #[test]
    fn names_are_defensive() {
        let paths = InstancePaths::new("/d", Some("../../etc/passwd"), "a/b c.é");
        assert_eq!(paths.lock, PathBuf::from("/d/______etc_passwd.a_b_c__.pid"));
        assert_eq!(paths.lock.parent(), Some(Path::new("/d")));
        let empty = InstancePaths::new("/d", Some(""), "");
        assert_eq!(empty.lock, PathBuf::from("/d/_._.pid"));
        let dots = InstancePaths::new("/d", Some(".."), "..");
        assert_eq!(dots.socket, PathBuf::from("/d/__.__.sock"));
    }

    #[test]
    fn ensure_dir_creates_a_private_directory_once() {
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("a/flowcoach");
        ensure_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode & !0o750, 0, "mode {mode:o}");
        assert_eq!(mode & 0o700, 0o700, "mode {mode:o}");
        // An existing directory is accepted and keeps its mode.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        ensure_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn ensure_dir_errors_name_the_path() {
        let base = tempfile::tempdir().unwrap();
        let file = base.path().join("not-a-dir");
        std::fs::write(&file, "").unwrap();
        let err = ensure_dir(&file).unwrap_err().to_string();
        assert!(err.contains(&file.display().to_string()), "{err}");
        let below_file = file.join("flowcoach");
        let err = ensure_dir(&below_file).unwrap_err().to_string();
        assert!(err.contains(&below_file.display().to_string()), "{err}");

        let open = base.path().join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let err = ensure_dir(&open).unwrap_err().to_string();
        assert!(err.contains("writable by everybody"), "{err}");
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        ensure_dir(&open).unwrap();
    }
}
