//! `[forward]`: the app behind flowcoach, in HTTP mode. Each envelope is re-sent to it as
//! the signed request Slack would send in HTTP mode.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use super::ranges::{self, CountIn, DurationIn, MINUTE, ms};
use super::{ConfigError, TokenSource, invalid};
use crate::signing_secret::SigningSecret;

/// `[forward]` as written. `url` is the one required key.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardSettings {
    /// The app's Request URL for everything, as Bolt serves it (`…/slack/events`).
    pub url: String,
    /// Per-kind URLs, for frameworks that serve events, commands and interactions apart.
    #[serde(default)]
    pub events_url: Option<String>,
    #[serde(default)]
    pub commands_url: Option<String>,
    #[serde(default)]
    pub interactions_url: Option<String>,
    /// A unix socket the app listens on instead of TCP: every request goes to it, the
    /// URLs still giving the path and the Host header (`http://localhost/slack/events`).
    #[serde(default)]
    pub socket: Option<PathBuf>,
    /// The whole request, connecting included. Slack allows an app 3 s.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Requests to the app at once.
    #[serde(default = "default_max_concurrent")]
    pub max_concurrent: usize,
    /// The ephemeral reply to a slash command whose app is down or failing; empty: none.
    #[serde(default = "default_fallback_text")]
    pub fallback_text: String,
    /// The most of an answer that is read; a longer one is a failure.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
}

fn default_timeout() -> Duration {
    Duration::from_secs(3)
}

fn default_max_concurrent() -> usize {
    32
}

fn default_fallback_text() -> String {
    "The app is not answering right now (it may be restarting); try again in a minute.".to_owned()
}

fn default_max_response_bytes() -> usize {
    64 * 1024
}

/// `[forward]` validated, with the signing secret.
#[derive(Debug, Clone)]
pub struct Forward {
    pub events_url: Url,
    pub commands_url: Url,
    pub interactions_url: Url,
    pub socket: Option<PathBuf>,
    pub timeout: Duration,
    pub max_concurrent: usize,
    pub fallback_text: String,
    pub max_response_bytes: usize,
    pub signing_secret: SigningSecret,
    /// Where the secret came from, for check-config and the start log (never the secret).
    pub secret_source: TokenSource,
}

/// The URLs as `check-config` and `flowcoachctl status` show them: one, or one per kind.
pub fn describe_urls(events: &Url, commands: &Url, interactions: &Url) -> String {
    if events == commands && commands == interactions {
        events.to_string()
    } else {
        format!("events {events}, commands {commands}, interactions {interactions}")
    }
}

impl Forward {
    pub fn describe_urls(&self) -> String {
        let urls = describe_urls(&self.events_url, &self.commands_url, &self.interactions_url);
        match &self.socket {
            Some(socket) => format!("{urls} over the unix socket {}", socket.display()),
            None => urls,
        }
    }
}

impl ForwardSettings {
    /// Checks every field, then finds the signing secret with `find_secret`.
    pub(super) fn validate(
        &self,
        find_secret: impl FnOnce() -> Result<(SigningSecret, TokenSource), ConfigError>,
    ) -> Result<Forward, ConfigError> {
        let url = parse_url("forward.url", &self.url)?;
        let or_url = |field, value: &Option<String>| match value {
            Some(raw) => parse_url(field, raw),
            None => Ok(url.clone()),
        };
        let events_url = or_url("forward.events_url", &self.events_url)?;
        let commands_url = or_url("forward.commands_url", &self.commands_url)?;
        let interactions_url = or_url("forward.interactions_url", &self.interactions_url)?;
        if let Some(socket) = &self.socket {
            check_socket_path(socket)?;
        }
        self.validate_ranges()?;
        let (signing_secret, secret_source) = find_secret()?;
        Ok(Forward {
            events_url,
            commands_url,
            interactions_url,
            socket: self.socket.clone(),
            timeout: self.timeout,
            max_concurrent: self.max_concurrent,
            fallback_text: self.fallback_text.clone(),
            max_response_bytes: self.max_response_bytes,
            signing_secret,
            secret_source,
        })
    }

    fn validate_ranges(&self) -> Result<(), ConfigError> {
        ranges::durations(&[DurationIn {
            field: "forward.timeout",
            value: self.timeout,
            min: ms(10),
            max: MINUTE,
            why: "",
        }])?;
        ranges::counts(&[
            CountIn {
                field: "forward.max_concurrent",
                value: ranges::count(self.max_concurrent),
                min: 1,
                max: 10_000,
                why: "",
            },
            CountIn {
                field: "forward.max_response_bytes",
                value: ranges::count(self.max_response_bytes),
                min: 1024,
                max: 16 << 20,
                why: "an answer travels in an ack, which Slack takes below 20 000 bytes",
            },
        ])?;
        if self.fallback_text.len() > 3000 {
            return Err(invalid(
                "forward.fallback_text",
                "is longer than 3000 characters, Slack's limit for a message's text",
            ));
        }
        Ok(())
    }
}

/// An `http://` or `https://` URL with a host: any host the operator names (the app runs
/// beside flowcoach, often on loopback or a private network).
fn parse_url(field: &'static str, raw: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(raw).map_err(|e| invalid(field, format!("{raw:?} is not a URL: {e}")))?;
    match url.scheme() {
        "http" | "https" if url.host().is_some() => Ok(url),
        "http" | "https" => Err(invalid(field, format!("{raw:?} names no host"))),
        other => Err(invalid(
            field,
            format!("{raw:?} has scheme {other:?}; expected http or https"),
        )),
    }
}

/// The app's socket need not exist yet (the app may start after flowcoach), but its path
/// must be absolute: a relative one would depend on the working directory of the day.
fn check_socket_path(socket: &std::path::Path) -> Result<(), ConfigError> {
    if socket.is_absolute() {
        Ok(())
    } else {
        Err(invalid(
            "forward.socket",
            format!("{:?} is not an absolute path", socket.display().to_string()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_must_be_http_or_https_with_a_host() {
        assert!(parse_url("forward.url", "http://10.0.0.7:3000/slack/events").is_ok());
        assert!(parse_url("forward.url", "https://app.example/slack/events").is_ok());
        for bad in ["ftp://x/y", "unix:/run/app.sock", "not a url", "http://"] {
            let error = parse_url("forward.url", bad).unwrap_err().to_string();
            assert!(error.starts_with("forward.url: "), "{bad}: {error}");
        }
    }

    #[test]
    fn the_apps_socket_path_must_be_absolute() {
        assert!(check_socket_path(std::path::Path::new("/run/mybot/http.sock")).is_ok());
        let error = check_socket_path(std::path::Path::new("mybot.sock"))
            .unwrap_err()
            .to_string();
        assert!(error.starts_with("forward.socket: "), "{error}");
    }
}
