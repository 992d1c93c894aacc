//! Running as a service on one host: where the runtime files live and the lock that keeps
//! one instance per app and environment.

pub mod lock;
pub mod paths;
pub mod systemd;
