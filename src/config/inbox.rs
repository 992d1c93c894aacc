//! `[inbox]`: the durable inbox. Events (and interactions that take no answer) are acked
//! once they are on disk, then delivered from there to the handler or the app.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use super::ranges::{self, CountIn, DurationIn, HOUR, MINUTE, ms, secs};
use super::{ConfigError, EnvSource, env};

/// `[inbox]` as written; every key has a default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InboxSettings {
    /// Off: events are acked as before, on accept (or, behind `[forward]`, once the app
    /// took them), and what a crash interrupts is lost or left to Slack's retries.
    pub enabled: bool,
    /// The database file; default [`default_file_name`] in the state directory.
    pub path: Option<PathBuf>,
    /// An envelope not delivered this long after it arrived becomes a dead letter.
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// The file's size cap: past it, the oldest dead letters are pruned.
    pub max_bytes: u64,
    /// The first wait before an envelope's delivery is retried; it doubles per attempt.
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    /// The longest wait between two attempts for one envelope.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Health is degraded while the oldest pending envelope is older than this.
    #[serde(with = "humantime_serde")]
    pub stale_after: Duration,
}

impl Default for InboxSettings {
    fn default() -> Self {
        InboxSettings {
            enabled: true,
            path: None,
            max_age: 24 * HOUR,
            max_bytes: 1 << 30,
            retry_initial: secs(1),
            retry_max: 5 * MINUTE,
            stale_after: 5 * MINUTE,
        }
    }
}

/// `<app>.<env>.inbox.sqlite`: one inbox per app and environment, as with the lock file.
pub fn default_file_name(app: &str, environment: &str) -> String {
    format!("{app}.{environment}.inbox.sqlite")
}

/// No place for the inbox was found.
#[derive(Debug, thiserror::Error)]
#[error(
    "inbox: no state directory: set STATE_DIRECTORY (systemd's StateDirectory=), XDG_STATE_HOME or HOME, set inbox.path, or turn the inbox off with inbox.enabled = false"
)]
pub struct NoStateDirectory;

impl InboxSettings {
    /// The database file: `inbox.path`, else `file_name` in the first of
    /// `$STATE_DIRECTORY` (systemd's `StateDirectory=`), `$XDG_STATE_HOME/flowcoach`,
    /// `$HOME/.local/state/flowcoach`.
    pub fn file(&self, env: &dyn EnvSource, file_name: &str) -> Result<PathBuf, NoStateDirectory> {
        if let Some(path) = &self.path {
            return Ok(path.clone());
        }
        let var = |name: &str| {
            env.var(name)
                .filter(|value| !value.is_empty())
                .map(PathBuf::from)
        };
        let absolute = |dir: PathBuf| dir.is_absolute().then_some(dir);
        let dir = var(env::STATE_DIRECTORY)
            .and_then(|dirs| {
                // Several directories are separated by ':'; the first is ours.
                let dirs = dirs.to_string_lossy().into_owned();
                dirs.split(':')
                    .find(|dir| !dir.is_empty())
                    .map(PathBuf::from)
            })
            .or_else(|| {
                var(env::XDG_STATE_HOME)
                    .and_then(absolute)
                    .map(|d| d.join("flowcoach"))
            })
            .or_else(|| {
                var(env::HOME)
                    .and_then(absolute)
                    .map(|d| d.join(".local/state/flowcoach"))
            })
            .ok_or(NoStateDirectory)?;
        Ok(dir.join(file_name))
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self
            .path
            .as_deref()
            .is_some_and(|p: &Path| !p.is_absolute())
        {
            return Err(super::invalid("inbox.path", "must be an absolute path"));
        }
        ranges::durations(&[
            DurationIn {
                field: "inbox.max_age",
                value: self.max_age,
                min: secs(1),
                max: 30 * 24 * HOUR,
                why: "",
            },
            DurationIn {
                field: "inbox.retry_initial",
                value: self.retry_initial,
                min: ms(10),
                max: HOUR,
                why: "",
            },
            DurationIn {
                field: "inbox.retry_max",
                value: self.retry_max,
                min: self.retry_initial,
                max: 24 * HOUR,
                why: "not below inbox.retry_initial",
            },
            DurationIn {
                field: "inbox.stale_after",
                value: self.stale_after,
                min: secs(1),
                max: 30 * 24 * HOUR,
                why: "",
            },
        ])?;
        ranges::counts(&[CountIn {
            field: "inbox.max_bytes",
            value: self.max_bytes,
            min: 1 << 20,
            max: 1 << 50,
            why: "at least 1 MiB",
        }])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    struct Vars(HashMap<&'static str, &'static str>);

    impl EnvSource for Vars {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).map(|v| (*v).to_owned())
        }
    }

    fn file(vars: &[(&'static str, &'static str)]) -> Result<PathBuf, NoStateDirectory> {
        InboxSettings::default().file(
            &Vars(vars.iter().copied().collect()),
            "A1.prod.inbox.sqlite",
        )
    }

    #[test]
    fn the_state_directory_comes_first_then_xdg_then_home() {
        let all = [
            ("STATE_DIRECTORY", "/var/lib/flowcoach:/var/lib/other"),
            ("XDG_STATE_HOME", "/home/u/.state"),
            ("HOME", "/home/u"),
        ];
        assert_eq!(
            file(&all).unwrap(),
            Path::new("/var/lib/flowcoach/A1.prod.inbox.sqlite")
        );
        assert_eq!(
            file(&all[1..]).unwrap(),
            Path::new("/home/u/.state/flowcoach/A1.prod.inbox.sqlite")
        );
        assert_eq!(
            file(&all[2..]).unwrap(),
            Path::new("/home/u/.local/state/flowcoach/A1.prod.inbox.sqlite")
        );
        assert!(file(&[("XDG_STATE_HOME", "relative")]).is_err());
    }
}
