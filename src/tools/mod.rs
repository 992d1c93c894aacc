//! Offline tools built on the simulator: `flowcoach sim`, `flowcoach demo` and
//! `flowcoach bench`. Each runs flowcoach as a real child process, so what they show and
//! measure is the daemon itself.

pub mod assets;
pub mod bench;
mod child;
pub mod demo;
pub mod sim_cli;

/// The tools run the simulator on a multi-threaded runtime of their own: the child
/// process is measured, not this one.
fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}
