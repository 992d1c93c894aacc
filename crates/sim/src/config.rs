//! What the simulated Slack knows (apps and their tokens) and how it paces connections.

use std::time::Duration;

use super::spec::SIM_TEAM_ID;

/// The app the default configuration serves.
pub const DEFAULT_APP_ID: &str = "A0SIMAPP01";

/// Settings of a [`Simulator`](super::Simulator). The defaults copy Slack's observed values.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub apps: Vec<SimApp>,
    /// Slack allows 10 open sockets per app (not per token); stale ones count.
    pub max_sockets_per_app: usize,
    /// Unacked envelopes are redelivered (events) or given up (others) after this.
    pub ack_deadline: Duration,
    /// Redeliveries of an unacked `events_api` envelope before it is given up.
    pub max_retries: u32,
    /// Interval of the websocket Ping frames the sim sends; `None` sends none.
    pub server_ping_interval: Option<Duration>,
    /// After a `warning` disconnect the sim closes the socket after this.
    pub warning_grace: Duration,
    /// After any other disconnect reason the sim closes the socket after this.
    pub refresh_grace: Duration,
    /// Like Slack, the sim keeps TCP open after the close handshake and drops it only after
    /// this, so clients must drop it themselves.
    pub hold_tcp_after_close: Duration,
    /// A stale (half-open) socket counts toward the app's sockets until this has passed.
    pub stale_socket_ttl: Duration,
    /// Seconds, announced in `hello.debug_info.approximate_connection_time`.
    pub approximate_connection_time: u64,
    /// Like `debug_reconnects`: at this age each socket gets `warning`, then
    /// `refresh_requested` once the warning grace has passed, then is closed.
    pub rotate_after: Option<Duration>,
    /// What an admitted socket is told first.
    pub hello: HelloStyle,
    /// Answers every `hello` at once with a disconnect of this reason (`warning`,
    /// `refresh_requested`, anything): a server that never lets a connection settle.
    pub disconnect_after_hello: Option<String>,
}

/// The first frame on an admitted socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HelloStyle {
    /// Slack's: `num_connections`, `connection_info.app_id` and `debug_info`.
    #[default]
    Full,
    /// `{"type":"hello"}` alone, which Slack's SDKs accept too.
    Bare,
    /// Nothing: the socket is open and counts toward the app's sockets, but gets no hello
    /// and no envelopes, as if Slack were slow to say hello.
    Withheld,
}

/// One Slack app and the app-level tokens that may open connections for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimApp {
    pub app_id: String,
    pub tokens: Vec<String>,
}

impl SimApp {
    /// An app whose only token is [`fake_token`]`(app_id)`.
    pub fn new(app_id: &str) -> Self {
        SimApp {
            app_id: app_id.to_owned(),
            tokens: vec![fake_token(app_id)],
        }
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        let mut app = SimApp::new(DEFAULT_APP_ID);
        // The literal token earlier drafts of the test plan named; kept so both spellings work.
        app.tokens
            .push(format!("xapp-1-{DEFAULT_APP_ID}-1-simsecret"));
        SimConfig {
            apps: vec![app],
            max_sockets_per_app: 10,
            ack_deadline: Duration::from_secs(3),
            max_retries: 3,
            server_ping_interval: Some(Duration::from_secs(10)),
            warning_grace: Duration::from_secs(10),
            refresh_grace: Duration::from_secs(1),
            hold_tcp_after_close: Duration::from_secs(5),
            stale_socket_ttl: Duration::from_secs(30),
            approximate_connection_time: 18060,
            rotate_after: None,
            hello: HelloStyle::Full,
            disconnect_after_hello: None,
        }
    }
}

impl SimConfig {
    /// How long a socket stays open after a disconnect frame with this reason.
    pub(super) fn close_grace(&self, reason: &str) -> Duration {
        if reason == "warning" {
            self.warning_grace
        } else {
            self.refresh_grace
        }
    }

    pub(super) fn app_for_token(&self, token: &str) -> Option<&SimApp> {
        self.apps
            .iter()
            .find(|app| app.tokens.iter().any(|t| t == token))
    }

    /// The app whose bot token ([`fake_bot_token`]) this is.
    pub(super) fn app_for_bot_token(&self, token: &str) -> Option<&SimApp> {
        self.apps
            .iter()
            .find(|app| fake_bot_token(&app.app_id) == token)
    }
}

/// A token shaped like Slack's app-level tokens (`xapp-1-{app_id}-1-<hex>`). It is derived
/// from the app id, so a test can compute the token the default configuration accepts.
pub fn fake_token(app_id: &str) -> String {
    format!("xapp-1-{app_id}-1-{}", stable_hex(app_id, 64))
}

/// The bot token (`xoxb-…`) the simulated Web API accepts for `app_id`'s bot, derived from
/// the app id like [`fake_token`]: what a bot behind flowcoach calls `chat.postMessage` with.
pub fn fake_bot_token(app_id: &str) -> String {
    format!(
        "xoxb-{SIM_TEAM_ID}-{app_id}-{}",
        stable_hex(&format!("bot {app_id}"), 24)
    )
}

/// The signing secret the simulated Slack holds for `app_id` (32 hex digits, like
/// Slack's), for signing what is sent to the app in HTTP mode and for the app to verify.
pub fn fake_signing_secret(app_id: &str) -> String {
    stable_hex(&format!("signing {app_id}"), 32)
}

/// The user id of `app_id`'s bot user: what `auth.test` names and bot messages carry.
pub fn bot_user_id(app_id: &str) -> String {
    format!("U{}", app_id.strip_prefix('A').unwrap_or(app_id))
}

/// The bot id (`B…`) of `app_id`'s bot.
pub fn bot_id(app_id: &str) -> String {
    format!("B{}", app_id.strip_prefix('A').unwrap_or(app_id))
}

/// `len` hex digits that depend only on `input` (FNV-1a, one round per 16 digits). Not a
/// secret: the sim only needs stable, token-looking strings.
pub(super) fn stable_hex(input: &str, len: usize) -> String {
    let mut out = String::with_capacity(len + 16);
    let mut round: u64 = 0;
    while out.len() < len {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325 ^ round;
        for byte in input.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        out.push_str(&format!("{hash:016x}"));
        round += 1;
    }
    out.truncate(len);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_tokens_are_stable_and_slack_shaped() {
        let token = fake_token("A0SIMAPP01");
        assert_eq!(token, fake_token("A0SIMAPP01"));
        assert_ne!(token, fake_token("A0SIMAPP02"));
        let hex = token.strip_prefix("xapp-1-A0SIMAPP01-1-").unwrap();
        assert_eq!(hex.len(), 64);
        assert!(hex.chars().all(|c| c.is_ascii_hexdigit()));
    }

    #[test]
    fn default_config_accepts_the_default_app_tokens() {
        let config = SimConfig::default();
        let app = config.app_for_token(&fake_token(DEFAULT_APP_ID)).unwrap();
        assert_eq!(app.app_id, DEFAULT_APP_ID);
        assert!(
            config
                .app_for_token("xapp-1-A0SIMAPP01-1-simsecret")
                .is_some()
        );
        assert!(config.app_for_token("xapp-1-nope").is_none());
    }

    #[test]
    fn bot_tokens_and_secrets_are_per_app() {
        let config = SimConfig::default();
        let bot = fake_bot_token(DEFAULT_APP_ID);
        assert!(bot.starts_with("xoxb-T0SIM-A0SIMAPP01-"), "{bot}");
        assert_eq!(
            config.app_for_bot_token(&bot).map(|a| a.app_id.as_str()),
            Some(DEFAULT_APP_ID)
        );
        assert!(
            config
                .app_for_bot_token(&fake_token(DEFAULT_APP_ID))
                .is_none()
        );
        assert!(
            config
                .app_for_bot_token(&fake_bot_token("A0OTHER"))
                .is_none()
        );
        let secret = fake_signing_secret(DEFAULT_APP_ID);
        assert_eq!(secret.len(), 32);
        assert_ne!(secret, fake_signing_secret("A0OTHER"));
        assert_eq!(bot_user_id(DEFAULT_APP_ID), "U0SIMAPP01");
        assert_eq!(bot_id(DEFAULT_APP_ID), "B0SIMAPP01");
    }

    #[test]
    fn warning_gets_the_long_grace() {
        let config = SimConfig::default();
        assert_eq!(config.close_grace("warning"), config.warning_grace);
        assert_eq!(
            config.close_grace("refresh_requested"),
            config.refresh_grace
        );
        assert_eq!(config.close_grace("link_disabled"), config.refresh_grace);
    }
}
