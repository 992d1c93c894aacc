//! Where the app token and the app's signing secret come from. First found wins: a
//! systemd credential, a file named in the environment's configuration, then a variable
//! (`SLACK_APP_TOKEN`, `SLACK_SIGNING_SECRET`).

use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use super::{ConfigError, EnvSource, env};
use crate::signing_secret::SigningSecret;
use crate::token::AppToken;

/// The credential name for `LoadCredential=slack-app-token:/etc/flowcoach/app-token`.
pub const CREDENTIAL_NAME: &str = "slack-app-token";
/// The credential name for `LoadCredential=slack-signing-secret:…`.
pub const SIGNING_SECRET_CREDENTIAL: &str = "slack-signing-secret";

/// One kind of secret and the places it may be found.
#[derive(Debug)]
pub struct SecretKind {
    /// In messages: "token", "signing secret".
    pub what: &'static str,
    /// The systemd credential's name.
    pub credential: &'static str,
    /// The key of `[environments.NAME]` naming a file.
    pub file_field: &'static str,
    /// The environment variable, the last resort.
    pub variable: &'static str,
}

pub const APP_TOKEN: SecretKind = SecretKind {
    what: "token",
    credential: CREDENTIAL_NAME,
    file_field: "token_file",
    variable: env::APP_TOKEN,
};

pub const SIGNING_SECRET: SecretKind = SecretKind {
    what: "signing secret",
    credential: SIGNING_SECRET_CREDENTIAL,
    file_field: "signing_secret_file",
    variable: env::SIGNING_SECRET,
};

/// Where a secret was found: shown in status output, never the secret itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenSource {
    /// `$CREDENTIALS_DIRECTORY/<credential>` (systemd `LoadCredential=`).
    Credential(PathBuf),
    /// The environment's `token_file` or `signing_secret_file`.
    File(PathBuf),
    /// The variable of this name.
    Variable(&'static str),
}

impl fmt::Display for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSource::Credential(path) => write!(f, "systemd credential {}", path.display()),
            TokenSource::File(path) => write!(f, "file {}", path.display()),
            TokenSource::Variable(name) => f.write_str(name),
        }
    }
}

/// Finds and reads the token; the error lists every place that was tried.
pub fn read_token(
    env: &dyn EnvSource,
    token_file: Option<&Path>,
) -> Result<(AppToken, TokenSource), ConfigError> {
    read_secret(env, token_file, &APP_TOKEN, |raw, source| {
        AppToken::parse(raw).map_err(|error| ConfigError::BadToken {
            source_name: source.to_string(),
            error,
        })
    })
}

/// Finds and reads the app's signing secret, like the token.
pub fn read_signing_secret(
    env: &dyn EnvSource,
    secret_file: Option<&Path>,
) -> Result<(SigningSecret, TokenSource), ConfigError> {
    read_secret(env, secret_file, &SIGNING_SECRET, |raw, source| {
        SigningSecret::parse(raw).map_err(|error| ConfigError::BadSigningSecret {
            source_name: source.to_string(),
            error,
        })
    })
}

pub(super) fn read_secret<T>(
    env: &dyn EnvSource,
    file: Option<&Path>,
    kind: &'static SecretKind,
    parse: impl Fn(&str, &TokenSource) -> Result<T, ConfigError>,
) -> Result<(T, TokenSource), ConfigError> {
    let mut tried = Vec::new();
    if let Some(dir) = env.var(env::CREDENTIALS_DIRECTORY) {
        let path = Path::new(&dir).join(kind.credential);
        if path.exists() {
            // systemd makes credentials readable by the service alone.
            let source = TokenSource::Credential(path.clone());
            let raw = read_file(&path, kind)?;
            return Ok((parse(&raw, &source)?, source));
        }
        tried.push(format!("credential {} (not found)", path.display()));
    }
    if let Some(path) = file {
        match std::fs::metadata(path) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(ConfigError::SecretFileTooOpen {
                        kind,
                        path: path.to_owned(),
                        mode,
                    });
                }
                let source = TokenSource::File(path.to_owned());
                let raw = read_file(path, kind)?;
                return Ok((parse(&raw, &source)?, source));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tried.push(format!("file {} (not found)", path.display()));
            }
            Err(source) => {
                return Err(ConfigError::SecretFile {
                    kind,
                    path: path.to_owned(),
                    reason: source.to_string(),
                });
            }
        }
    }
    if let Some(raw) = env.var(kind.variable) {
        let source = TokenSource::Variable(kind.variable);
        return Ok((parse(&raw, &source)?, source));
    }
    tried.push(format!("{} (unset)", kind.variable));
    Err(ConfigError::MissingSecret {
        kind,
        tried: tried.join(", "),
    })
}

fn read_file(path: &Path, kind: &'static SecretKind) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError::SecretFile {
        kind,
        path: path.to_owned(),
        reason: e.to_string(),
    })
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
    fn the_signing_secret_has_the_same_sources_and_checks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SIGNING_SECRET_CREDENTIAL);
        std::fs::write(&path, "8f742231b10e8888abcd99yyyzzz85a5\n").unwrap();
        let creds = dir.path().to_str().unwrap();
        let (secret, source) =
            read_signing_secret(&[(env::CREDENTIALS_DIRECTORY, creds)], None).unwrap();
        assert_eq!(secret.expose_secret(), b"8f742231b10e8888abcd99yyyzzz85a5");
        assert!(matches!(source, TokenSource::Credential(_)));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let error = read_signing_secret(&[], Some(&path))
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("signing_secret_file") && error.contains("chmod 600"),
            "{error}"
        );
        assert!(!error.contains("8f742231"), "{error}");
        let missing = read_signing_secret(&[], None).unwrap_err().to_string();
        assert!(
            missing.contains("SLACK_SIGNING_SECRET (unset)"),
            "{missing}"
        );
    }

    #[test]
    fn the_variable_is_the_last_resort_and_absence_lists_what_was_tried() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.token");
        let (_, source) = read_token(&[(env::APP_TOKEN, TOKEN)], Some(&missing)).unwrap();
        assert_eq!(source, TokenSource::Variable(env::APP_TOKEN));
        let error = read_token(&[], Some(&missing)).unwrap_err().to_string();
        assert!(error.contains("missing.token (not found)"), "{error}");
        assert!(error.contains("SLACK_APP_TOKEN (unset)"), "{error}");
    }
}
