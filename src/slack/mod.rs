//! Everything that speaks to Slack: the Web API call, one websocket connection
//! and the supervisor that keeps them alive.

pub mod api;
pub mod backoff;
pub mod connection;
pub mod supervisor;
pub mod throttle;
