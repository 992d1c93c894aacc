//! What an instance needs of its host: where the runtime files live, the lock that keeps
//! one instance per app and environment, and the systemd service manager.

pub mod lock;
pub mod paths;
pub mod systemd;
