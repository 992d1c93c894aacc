//! flowcoach: a Slack Socket Mode bot service built to run under systemd and Podman.

pub mod bot;
pub mod config;
pub mod dispatch;
pub mod sim;
pub mod slack;
pub mod state;
pub mod token;
