//! Everything that speaks to Slack: the Web API call, one websocket connection
//! and the supervisor that keeps one alive.

pub mod api;
pub mod backoff;
pub mod connection;
pub mod supervisor;
