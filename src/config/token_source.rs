//! Where the app token comes from. First found wins: a systemd credential, a file named in
//! the environment's configuration, then `SLACK_APP_TOKEN`.

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{ConfigError, EnvSource, env};
use crate::token::AppToken;

/// The credential name for `LoadCredential=slack-app-token:/etc/flowcoach/app-token`.
pub const CREDENTIAL_NAME: &str = "slack-app-token";

/// Where a token was found: shown in status output, never the token itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `$CREDENTIALS_DIRECTORY/slack-app-token` (systemd `LoadCredential=`).
    Credential(PathBuf),
    /// The environment's `token_file`.
    File(PathBuf),
    /// The `SLACK_APP_TOKEN` variable.
    Variable,
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Credential(path) => write!(f, "systemd credential {}", path.display()),
            TokenSource::File(path) => write!(f, "file {}", path.display()),
            TokenSource::Variable => f.write_str(env::APP_TOKEN),
        }
    }
}

/// Finds and reads the token; the error lists every place that was tried.
pub fn read_token(
    env: &dyn EnvSource,
    token_file: Option<&Path>,
) -> Result<(AppToken, TokenSource), ConfigError> {
    let mut tried = Vec::new();
    if let Some(dir) = env.var(env::CREDENTIALS_DIRECTORY) {
        let path = Path::new(&dir).join(CREDENTIAL_NAME);
        if path.exists() {
            // systemd makes credentials readable by the service alone.
            return parse_file(&path, TokenSource::Credential(path.clone()));
        }
        tried.push(format!("credential {} (not found)", path.display()));
    }
    if let Some(path) = token_file {
        match std::fs::metadata(path) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(ConfigError::TokenFileTooOpen {
                        path: path.to_owned(),
                        mode,
                    });
                }
                return parse_file(path, TokenSource::File(path.to_owned()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tried.push(format!("file {} (not found)", path.display()));
            }
            Err(source) => {
                return Err(ConfigError::TokenFile {
                    path: path.to_owned(),
                    reason: source.to_string(),
                });
            }
        }
    }
    if let Some(raw) = env.var(env::APP_TOKEN) {
        let token = AppToken::parse(&raw).map_err(|error| ConfigError::BadToken {
            source_name: TokenSource::Variable.to_string(),
            error,
        })?;
        return Ok((token, TokenSource::Variable));
    }
    tried.push(format!("{} (unset)", env::APP_TOKEN));
    Err(ConfigError::MissingToken {
        tried: tried.join(", "),
    })
}

fn parse_file(path: &Path, source: TokenSource) -> Result<(AppToken, TokenSource), ConfigError> {
    let raw = std::fs::read_to_string(path).map_err(|e| ConfigError::TokenFile {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let token = AppToken::parse(&raw).map_err(|error| ConfigError::BadToken {
        source_name: source.to_string(),
        error,
    })?;
    Ok((token, source))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const TOKEN: &str = "xapp-1-A0FILE0001-1-secretvalue";

    fn token_file(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, format!("{TOKEN}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn a_credential_wins_over_a_file_and_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        token_file(dir.path(), CREDENTIAL_NAME, 0o400);
        let file = token_file(dir.path(), "other", 0o600);
        let creds = dir.path().to_str().unwrap();
        let (token, source) = read_token(
            &[
                (env::CREDENTIALS_DIRECTORY, creds),
                (env::APP_TOKEN, "xapp-1-A0VAR-1-x"),
            ],
            Some(&file),
        )
        .unwrap();
        assert_eq!(token.expose_secret(), TOKEN);
        assert!(matches!(source, TokenSource::Credential(_)));
    }

    #[test]
    fn a_file_wins_over_the_variable_and_shows_where_it_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let file = token_file(dir.path(), "dev.token", 0o600);
        let (_, source) = read_token(&[(env::APP_TOKEN, "xapp-1-A0VAR-1-x")], Some(&file)).unwrap();
        assert_eq!(source.to_string(), format!("file {}", file.display()));
    }

    #[test]
    fn a_file_readable_by_others_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for mode in [0o644, 0o640, 0o604] {
            let file = token_file(dir.path(), "open.token", mode);
            let error = read_token(&[], Some(&file)).unwrap_err().to_string();
            assert!(error.contains("chmod 600"), "{mode:o}: {error}");
            assert!(!error.contains("secretvalue"));
        }
    }

    #[test]
    fn the_variable_is_the_last_resort_and_absence_lists_what_was_tried() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.token");
        let (_, source) = read_token(&[(env::APP_TOKEN, TOKEN)], Some(&missing)).unwrap();
        assert_eq!(source, TokenSource::Variable);
        let error = read_token(&[], Some(&missing)).unwrap_err().to_string();
        assert!(error.contains("missing.token (not found)"), "{error}");
        assert!(error.contains("SLACK_APP_TOKEN (unset)"), "{error}");
    }
}
