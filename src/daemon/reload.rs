//! SIGHUP: read the configuration again and apply what can change while running.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::watch;

use crate::config::{Config, EnvSource, Settings};
use crate::logging::LogHandle;
use crate::token::AppToken;

/// Holds what a reload needs: where the configuration came from, and the channels its
/// parts listen on.
pub struct Reloader {
    pub path: Option<PathBuf>,
    /// The environment chosen at start: a reload never switches to another one.
    pub environment: String,
    pub live: watch::Sender<Settings>,
    pub tokens: Arc<watch::Sender<AppToken>>,
    /// Where the current token came from, for status answers.
    pub token_source: watch::Sender<String>,
    pub log: LogHandle,
}

impl Reloader {
    /// Reloads; a configuration that does not validate is refused whole and the running
    /// one stays.
    pub fn reload(&self, env: &dyn EnvSource) {
        let config = match Config::load(self.path.as_deref(), Some(&self.environment), env) {
            Ok(config) => config,
            Err(error) => {
                tracing::error!(%error, "reload refused; the running configuration stays");
                return;
            }
        };
        let current = self.tokens.borrow().clone();
        if config.token != current {
            // The lock and the control socket are named after the token's app.
            if config.token.app_id_hint() != current.app_id_hint() {
                tracing::error!(
                    token = %config.token,
                    "reload refused: the new token belongs to another app, which needs a restart"
                );
                return;
            }
            tracing::info!(token = %config.token, source = %config.token_source, "new app token");
            self.tokens.send_replace(config.token.clone());
        }
        // The token may stay the same while its source changes (a token file now
        // holds what the variable held): status answers name where it comes from now.
        self.token_source
            .send_replace(config.token_source.to_string());
        let new = config.settings;
        let old = self.live.borrow().clone();
        for field in restart_only_changes(&old, &new) {
            tracing::warn!(
                field,
                "changed in the configuration, but takes effect only after a restart"
            );
        }
        if new.log.level != old.log.level
            && let Err(error) = self.log.set_level(&new.log.level)
        {
            tracing::error!(%error, "log level not changed");
        }
        self.live.send_replace(new);
        tracing::info!(
            "configuration reloaded: connection settings apply from the next connection, response deadline and drain budget at once"
        );
    }
}

/// Fields read once at start: a change needs a restart (or a handover).
fn restart_only_changes(old: &Settings, new: &Settings) -> Vec<&'static str> {
    let checks = [
        ("environment", old.environment != new.environment),
        ("slack", old.slack != new.slack),
        (
            "dispatch.max_concurrent_handlers",
            old.dispatch.max_concurrent_handlers != new.dispatch.max_concurrent_handlers,
        ),
        (
            "dispatch.max_queued_handlers",
            old.dispatch.max_queued_handlers != new.dispatch.max_queued_handlers,
        ),
        (
            "dispatch.dedup_ttl",
            old.dispatch.dedup_ttl != new.dispatch.dedup_ttl,
        ),
        (
            "dispatch.dedup_capacity",
            old.dispatch.dedup_capacity != new.dispatch.dedup_capacity,
        ),
        (
            "connection.sockets",
            old.connection.sockets != new.connection.sockets,
        ),
        ("service", old.service != new.service),
        ("environments", old.environments != new.environments),
        ("control", old.control != new.control),
        ("log.format", old.log.format != new.log.format),
        ("forward", old.forward != new.forward),
    ];
    checks
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(field, _)| field)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn live_fields_are_not_reported_as_needing_a_restart() {
        let old = Settings::default();
        let mut new = old.clone();
        new.connection.ping_interval = Duration::from_secs(9);
        new.dispatch.response_deadline = Duration::from_secs(1);
        new.log.level = "debug".into();
        assert!(restart_only_changes(&old, &new).is_empty());
        new.environment = "other".into();
        new.dispatch.dedup_capacity = 5000;
        assert_eq!(
            restart_only_changes(&old, &new),
            ["environment", "dispatch.dedup_capacity"]
        );
    }
}
