//! Environments (`dev`, `prod`, …): which one runs, its token file, and the app it is
//! pinned to, so a development run can never take production events.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::ConfigError;

/// One `[environments.NAME]` section.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EnvironmentSettings {
    /// The Slack app this environment must talk to (`A…`): checked against the token
    /// before connecting and against Slack's `hello` after.
    pub app_id: Option<String>,
    /// A file holding this environment's token; must not be readable by group or others.
    pub token_file: Option<PathBuf>,
    /// A file holding the signing secret of the app behind `[forward]`; must not be
    /// readable by group or others.
    pub signing_secret_file: Option<PathBuf>,
}

/// Picks the environment to run: `--env`, else `$FLOWCOACH_ENV`, else the file's
/// `environment`. When the file defines environments, it must be one of them.
pub fn select(
    requested: Option<&str>,
    from_variable: Option<String>,
    from_file: &str,
    defined: &BTreeMap<String, EnvironmentSettings>,
) -> Result<String, ConfigError> {
    let name = requested
        .map(str::to_owned)
        .or(from_variable)
        .unwrap_or_else(|| from_file.to_owned());
    if !defined.is_empty() && !defined.contains_key(&name) {
        let known: Vec<&str> = defined.keys().map(String::as_str).collect();
        return Err(ConfigError::Invalid {
            field: "environment",
            reason: format!(
                "unknown environment {name:?}: the configuration defines {}",
                known.join(", ")
            ),
        });
    }
    Ok(name)
}

/// Checks the app IDs the file pins: `A` followed by capitals and digits.
pub fn validate(defined: &BTreeMap<String, EnvironmentSettings>) -> Result<(), ConfigError> {
    for (name, environment) in defined {
        if let Some(app) = &environment.app_id {
            let looks_right = app.len() > 1
                && app.starts_with('A')
                && app
                    .chars()
                    .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit());
            if !looks_right {
                return Err(ConfigError::Invalid {
                    field: "environments.*.app_id",
                    reason: format!(
                        "environment {name}: {app:?} is not a Slack app ID (A followed by capitals and digits)"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// The environment that pins `app`, if any.
pub fn owner_of<'a>(
    defined: &'a BTreeMap<String, EnvironmentSettings>,
    app: &str,
) -> Option<&'a str> {
    defined
        .iter()
        .find(|(_, environment)| environment.app_id.as_deref() == Some(app))
        .map(|(name, _)| name.as_str())
}

/// The sentence for an app that is not the one `environment` is pinned to, e.g. "env dev
/// is pinned to A0DEV…, but this token belongs to A08FU15EA2Y, the app of env prod".
pub fn mismatch_message(
    environment: &str,
    pinned: &str,
    actual: &str,
    whose: &str,
    defined: &BTreeMap<String, EnvironmentSettings>,
) -> String {
    let owner = owner_of(defined, actual)
        .map(|other| format!(", the app of env {other}"))
        .unwrap_or_default();
    format!("env {environment} is pinned to {pinned}, but {whose} {actual}{owner}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two() -> BTreeMap<String, EnvironmentSettings> {
        let mut defined = BTreeMap::new();
        for (name, app) in [("dev", "A0DEV00001"), ("prod", "A08FU15EA2Y")] {
            defined.insert(
                name.to_owned(),
                EnvironmentSettings {
                    app_id: Some(app.to_owned()),
                    token_file: None,
                    signing_secret_file: None,
                },
            );
        }
        defined
    }

    #[test]
    fn the_flag_beats_the_variable_beats_the_file() {
        let defined = two();
        assert_eq!(
            select(Some("dev"), Some("prod".into()), "prod", &defined).unwrap(),
            "dev"
        );
        assert_eq!(
            select(None, Some("dev".into()), "prod", &defined).unwrap(),
            "dev"
        );
        assert_eq!(select(None, None, "prod", &defined).unwrap(), "prod");
    }

    #[test]
    fn unknown_environments_are_refused_with_the_known_ones() {
        let error = select(Some("staging"), None, "prod", &two())
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("staging") && error.contains("dev, prod"),
            "{error}"
        );
        // Without [environments], any name goes (a single-environment file).
        assert_eq!(
            select(Some("x"), None, "default", &BTreeMap::new()).unwrap(),
            "x"
        );
    }

    #[test]
    fn the_mismatch_names_both_apps_and_the_other_environment() {
        let message = mismatch_message(
            "dev",
            "A0DEV00001",
            "A08FU15EA2Y",
            "this token belongs to",
            &two(),
        );
        assert_eq!(
            message,
            "env dev is pinned to A0DEV00001, but this token belongs to A08FU15EA2Y, the app of env prod"
        );
        let stranger = mismatch_message(
            "dev",
            "A0DEV00001",
            "A0ELSE",
            "this token belongs to",
            &two(),
        );
        assert!(stranger.ends_with("belongs to A0ELSE"));
    }

    #[test]
    fn app_ids_are_checked() {
        let mut defined = two();
        defined.get_mut("dev").unwrap().app_id = Some("dev-app".into());
        assert!(
            validate(&defined)
                .unwrap_err()
                .to_string()
                .contains("dev-app")
        );
    }
}
