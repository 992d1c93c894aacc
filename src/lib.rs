//! flowcoach: a Slack Socket Mode bot service built to run under systemd and Podman.

pub mod bot;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod daemon;
mod deadline;
pub mod dispatch;
pub mod exit;
pub mod forward;
pub mod handover;
pub mod health;
pub mod host;
mod http_body;
pub mod inbox;
pub mod logging;
pub mod metrics;
pub mod signing_secret;
pub mod slack;
pub mod state;
pub mod token;
