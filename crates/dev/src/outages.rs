//! `flowcoach-dev bench --drops N` and `--storm SECONDS`: what Slack-side failures cost.
//! A dropped connection: how long the app has no open socket (with one socket, and with
//! `[connection] sockets = 2`). A Slack that answers every hello with a disconnect: how
//! often flowcoach calls `apps.connections.open` (rotations per minute).

use std::time::Duration;

use flowcoach_harness::{Daemon, Logs};
use flowcoach_sim::{DEFAULT_APP_ID, Record, SimConfig, Simulator};
use serde::Serialize;
use tokio::time::Instant;

use crate::bench::Spread;

const WAIT: Duration = Duration::from_secs(30);

/// What `--drops N` measures.
#[derive(Debug, Serialize)]
pub struct DropsReport {
    pub drops: u32,
    pub sockets: usize,
    /// From the drop to the replacement's hello, in ms.
    pub replaced_ms: Spread,
    /// Stretches with no open socket of the app, as the simulator saw them.
    pub zero_open_stretches: usize,
    /// Each of them, in ms.
    pub zero_open_ms: Spread,
}

/// Drops one socket `drops` times (TCP reset, no Close), each time once the connections
/// have been up for longer than `stable_after`.
pub async fn drops(drops: u32, sockets: usize) -> Result<DropsReport, String> {
    let sim = Simulator::start(SimConfig {
        server_ping_interval: None,
        ..SimConfig::default()
    })
    .await
    .map_err(|e| format!("simulator: {e}"))?;
    let stable_after = Duration::from_secs(1);
    // Only the daemon's own settings: an older flowcoach without `sockets` is measured
    // with one socket.
    let config = if sockets > 1 {
        format!("[connection]\nstable_after = \"1s\"\nsockets = {sockets}\n")
    } else {
        "[connection]\nstable_after = \"1s\"\n".to_owned()
    };
    let mut daemon = Daemon::launch(
        &sim,
        &config,
        &[("FLOWCOACH_LOG", "warn")],
        &[],
        Logs::Collect,
    );
    sim.wait_until(WAIT, |r| r.open_sockets(DEFAULT_APP_ID) >= sockets)
        .await
        .map_err(|e| format!("flowcoach did not connect: {e:?}"))?;
    let mut replaced = Vec::new();
    for _ in 0..drops {
        // A benchmark, not a test: it lets the connections prove stable, as in production.
        tokio::time::sleep(stable_after + Duration::from_millis(500)).await;
        let hellos = sim.record().hellos();
        let victim = sim.open_sockets(DEFAULT_APP_ID)[0];
        let dropped = Instant::now();
        sim.drop_socket(victim);
        let record = sim
            .wait_until(WAIT, |r| {
                r.hellos() > hellos && r.open_sockets(DEFAULT_APP_ID) >= sockets
            })
            .await
            .map_err(|e| format!("no replacement after a drop: {e:?}"))?;
        let hello = record
            .sockets
            .iter()
            .filter_map(|s| s.hello_at)
            .max()
            .ok_or("no hello recorded")?;
        replaced.push(hello.saturating_duration_since(dropped).as_secs_f64() * 1e3);
    }
    let stretches = sim.record().zero_open_durations(DEFAULT_APP_ID, None);
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let _ = tokio::time::timeout(WAIT, daemon.child.wait()).await;
    sim.shutdown().await;
    Ok(DropsReport {
        drops,
        sockets,
        replaced_ms: Spread::of(replaced),
        zero_open_stretches: stretches.len(),
        zero_open_ms: Spread::of(stretches.iter().map(|d| d.as_secs_f64() * 1e3).collect()),
    })
}

pub fn print_drops(r: &DropsReport) {
    println!(
        "flowcoach-dev bench: {} dropped connections, {} socket(s)",
        r.drops, r.sockets
    );
    Spread::print_header();
    r.replaced_ms.print_row("drop to hello");
    r.zero_open_ms.print_row("no socket open");
    println!("  stretches with no socket open: {}", r.zero_open_stretches);
}

/// What `--storm SECONDS` measures.
#[derive(Debug, Serialize)]
pub struct StormReport {
    pub seconds: f64,
    pub reason: String,
    pub open_calls: usize,
    pub open_calls_per_minute: f64,
}

/// A Slack that answers every hello with a disconnect of `reason`, for `seconds`.
pub async fn storm(seconds: u64, reason: &str) -> Result<StormReport, String> {
    let sim = Simulator::start(SimConfig {
        server_ping_interval: None,
        disconnect_after_hello: Some(reason.to_owned()),
        warning_grace: Duration::from_secs(1),
        ..SimConfig::default()
    })
    .await
    .map_err(|e| format!("simulator: {e}"))?;
    let mut daemon = Daemon::launch(&sim, "", &[("FLOWCOACH_LOG", "warn")], &[], Logs::Collect);
    let started = Instant::now();
    sim.wait_until(WAIT, |r: &Record| !r.open_calls.is_empty())
        .await
        .map_err(|e| format!("flowcoach did not call Slack: {e:?}"))?;
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let open_calls = sim.record().open_calls.len();
    let elapsed = started.elapsed().as_secs_f64();
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    let _ = tokio::time::timeout(WAIT, daemon.child.wait()).await;
    sim.shutdown().await;
    Ok(StormReport {
        seconds: elapsed,
        reason: reason.to_owned(),
        open_calls,
        open_calls_per_minute: open_calls as f64 * 60.0 / elapsed,
    })
}

pub fn print_storm(r: &StormReport) {
    println!(
        "flowcoach-dev bench: every hello answered with disconnect {} for {:.0} s",
        r.reason, r.seconds
    );
    println!(
        "  apps.connections.open calls  {:>8} ({:.1} a minute)",
        r.open_calls, r.open_calls_per_minute
    );
}
