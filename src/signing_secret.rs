//! The app's signing secret, with which flowcoach signs what it forwards to the app: kept
//! out of every log line, error and status output.

use std::fmt;

/// The signing secret of the app behind `[forward]` ("Basic Information" → Signing
/// Secret). `Debug` and `Display` never show any of it.
#[derive(Clone, PartialEq, Eq)]
pub struct SigningSecret(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SigningSecretError {
    #[error("the signing secret is empty")]
    Empty,
    #[error("the signing secret contains whitespace or control characters")]
    BadCharacters,
}

impl SigningSecret {
    /// Validates the secret's shape. Surrounding whitespace (a trailing newline in a file)
    /// is trimmed.
    pub fn parse(raw: &str) -> Result<Self, SigningSecretError> {
        let secret = raw.trim();
        if secret.is_empty() {
            return Err(SigningSecretError::Empty);
        }
        if secret.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(SigningSecretError::BadCharacters);
        }
        Ok(SigningSecret(secret.to_owned()))
    }

    /// The key for the request signature, and nothing else.
    pub fn expose_secret(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SigningSecret(…)")
    }
}

impl fmt::Display for SigningSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("…")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_shown_and_trimmed() {
        let secret = SigningSecret::parse("8f742231b10e8888abcd99yyyzzz85a5\n").unwrap();
        assert_eq!(secret.expose_secret(), b"8f742231b10e8888abcd99yyyzzz85a5");
        assert!(!format!("{secret:?}{secret}").contains("8f74"));
        assert_eq!(SigningSecret::parse(" "), Err(SigningSecretError::Empty));
        assert_eq!(
            SigningSecret::parse("a b"),
            Err(SigningSecretError::BadCharacters)
        );
    }
}
