//! One harness for the integration tests and the benchmarks: a simulator in the calling
//! process and flowcoach as a real child process, its JSON log lines collected so callers
//! wait on events instead of sleeping.

pub mod activation;
pub mod binaries;
pub mod bolt;
pub mod cargo;
pub mod ctl;
mod daemon;
pub mod gate;
pub mod logs;
pub mod lost_commit;
pub mod postgres;
pub mod process;
pub mod prometheus;

pub use daemon::*;
