//! flowcoach's integration tests, one binary (one link instead of one per file): real
//! flowcoach processes, real unix sockets and signals, and the real Socket Mode protocol
//! against the simulator (`flowcoach-harness`, `flowcoach-sim`).

mod bad_input;
mod bolt;
mod cli;
mod cluster;
mod control;
mod dispatch;
mod environments;
mod forward;
mod handover;
mod inbox;
mod instance_lock;
mod logging;
mod metrics;
mod readme;
mod service;
mod socket_mode;
mod systemd_notify;
