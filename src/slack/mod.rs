//! Everything that speaks to Slack: wire types, the Web API call, one websocket connection
//! and the supervisor that keeps them alive.

pub mod api;
pub mod backoff;
pub mod connection;
pub mod supervisor;
pub mod throttle;
pub mod wire;

/// A deadline that never comes, for `select!` arms that are switched off.
pub(crate) fn far_future() -> tokio::time::Instant {
    tokio::time::Instant::now() + std::time::Duration::from_secs(86_400 * 365)
}
