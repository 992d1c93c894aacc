//! The Slack app-level token, kept out of every log line, error and status output.

use std::fmt;

/// An app-level token (`xapp-…`). `Debug` and `Display` show only the non-secret prefix, so
/// the token can be logged by accident without leaking.
#[derive(Clone, PartialEq, Eq)]
pub struct AppToken(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("the token is empty")]
    Empty,
    #[error(
        "the token does not start with \"xapp-\": Socket Mode needs an app-level token (scope connections:write), not a bot or user token"
    )]
    NotAppLevel,
    #[error("the token contains whitespace or control characters")]
    BadCharacters,
}

impl AppToken {
    /// Validates the token's shape. Surrounding whitespace (a trailing newline in a token
    /// file) is trimmed.
    pub fn parse(raw: &str) -> Result<Self, TokenError> {
        let token = raw.trim();
        if token.is_empty() {
            return Err(TokenError::Empty);
        }
        if token.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(TokenError::BadCharacters);
        }
        if !token.starts_with("xapp-") {
            return Err(TokenError::NotAppLevel);
        }
        Ok(AppToken(token.to_owned()))
    }

    /// The secret itself, for the `Authorization` header only.
    pub fn expose_secret(&self) -> &str {
        &self.0
    }

    /// The app ID the token appears to belong to. The token format
    /// (`xapp-1-A08FU15EA2Y-<digits>-<hex>`) is undocumented, so this is only an early hint;
    /// `hello.connection_info.app_id` is the truth.
    pub fn app_id_hint(&self) -> Option<&str> {
        let field = self.0.split('-').nth(2)?;
        let looks_like_app_id = field.len() > 1
            && field.starts_with('A')
            && field
                .chars()
                .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit());
        looks_like_app_id.then_some(field)
    }

    /// The part that is safe to show: `xapp-1-A08FU15EA2Y-…`.
    fn redacted_prefix(&self) -> String {
        match self.app_id_hint() {
            Some(app) => {
                let version = self.0.split('-').nth(1).unwrap_or("");
                format!("xapp-{version}-{app}-…")
            }
            None => "xapp-…".to_owned(),
        }
    }
}

impl fmt::Debug for AppToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AppToken({})", self.redacted_prefix())
    }
}

impl fmt::Display for AppToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted_prefix())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "xapp-1-A08FU15EA2Y-8123456789-0a1b2c3d4e5f";

    #[test]
    fn display_and_debug_never_show_the_secret() {
        let token = AppToken::parse(SECRET).unwrap();
        assert_eq!(token.to_string(), "xapp-1-A08FU15EA2Y-…");
        assert_eq!(format!("{token:?}"), "AppToken(xapp-1-A08FU15EA2Y-…)");
        assert!(!format!("{token:?}{token}").contains("0a1b2c"));
    }

    #[test]
    fn app_id_hint_comes_from_the_middle_field() {
        assert_eq!(
            AppToken::parse(SECRET).unwrap().app_id_hint(),
            Some("A08FU15EA2Y")
        );
        let odd = AppToken::parse("xapp-opaque").unwrap();
        assert_eq!(odd.app_id_hint(), None);
        assert_eq!(odd.to_string(), "xapp-…");
    }

    #[test]
    fn shape_is_checked() {
        assert_eq!(AppToken::parse("  \n"), Err(TokenError::Empty));
        assert_eq!(
            AppToken::parse("xoxb-123-456"),
            Err(TokenError::NotAppLevel)
        );
        assert_eq!(AppToken::parse("xapp-1 2"), Err(TokenError::BadCharacters));
        assert_eq!(
            AppToken::parse(&format!("{SECRET}\n"))
                .unwrap()
                .expose_secret(),
            SECRET
        );
    }
}
