//! `flowcoach bench`: throughput, CPU per envelope, ack latency and resident memory of a
//! flowcoach process (the child, not the simulator) under a steady envelope stream.

use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::cli::BenchArgs;
use crate::exit;
use crate::sim::{DEFAULT_APP_ID, LoadMix, LoadSpec, Record, SimConfig, Simulator};
use crate::tools::child::{self, Logs};

const WAIT: Duration = Duration::from_secs(30);

/// The figures one run produces.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub envelopes: u64,
    pub window: usize,
    pub seconds: f64,
    pub envelopes_per_second: f64,
    pub cpu_us_per_envelope: f64,
    pub ack_latency_p50_us: u64,
    pub ack_latency_p99_us: u64,
    pub rss_idle_kib: u64,
    pub rss_peak_under_load_kib: u64,
    /// Of which heap and stacks (the rest is the binary's and libraries' mapped pages).
    pub rss_anon_idle_kib: u64,
    pub rss_anon_peak_under_load_kib: u64,
}

pub fn run(args: &BenchArgs) -> ExitCode {
    let outcome = super::runtime().and_then(|rt| {
        rt.block_on(bench(args.envelopes, args.window))
            .map_err(std::io::Error::other)
    });
    match outcome {
        Ok(report) => {
            if args.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print_table(&report);
            }
            exit::code(exit::OK)
        }
        Err(error) => {
            eprintln!("flowcoach bench: {error}");
            exit::code(exit::FAILURE)
        }
    }
}

fn print_table(r: &BenchReport) {
    println!(
        "flowcoach bench: {} envelopes, window {}",
        r.envelopes, r.window
    );
    println!(
        "  throughput        {:>10.0} envelopes/s",
        r.envelopes_per_second
    );
    println!(
        "  client CPU        {:>10.2} µs/envelope",
        r.cpu_us_per_envelope
    );
    println!("  ack latency p50   {:>10} µs", r.ack_latency_p50_us);
    println!("  ack latency p99   {:>10} µs", r.ack_latency_p99_us);
    println!(
        "  RSS idle          {:>10.1} MiB",
        r.rss_idle_kib as f64 / 1024.0
    );
    println!(
        "  RSS peak, load    {:>10.1} MiB",
        r.rss_peak_under_load_kib as f64 / 1024.0
    );
    println!(
        "    of which anon   {:>10.1} MiB idle, {:.1} MiB peak",
        r.rss_anon_idle_kib as f64 / 1024.0,
        r.rss_anon_peak_under_load_kib as f64 / 1024.0
    );
}

async fn bench(envelopes: u64, window: usize) -> Result<BenchReport, String> {
    let config = SimConfig {
        // Under full load nothing should be redelivered: the figure is the steady state.
        ack_deadline: Duration::from_secs(60),
        server_ping_interval: None,
        ..SimConfig::default()
    };
    let token = config.apps[0].tokens[0].clone();
    let sim = Simulator::start(config)
        .await
        .map_err(|e| format!("simulator: {e}"))?;
    // warn: the built-in handler's per-event info line is filtered out, which makes it the
    // no-op handler the figures are about.
    let mut daemon = child::spawn(&sim, &token, "warn", Logs::Discard)
        .map_err(|e| format!("starting flowcoach: {e}"))?;
    let pid = daemon.id().ok_or("flowcoach exited at once")?;
    sim.wait_until(WAIT, |r| r.sockets.iter().any(|s| s.hello_at.is_some()))
        .await
        .map_err(|e| format!("flowcoach did not connect: {e:?}"))?;
    // Let start-up allocations settle before reading the idle figure.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = proc_stats(pid)?;

    let started = Instant::now();
    let load = sim.start_load(
        DEFAULT_APP_ID,
        LoadSpec {
            count: envelopes,
            rate_per_sec: None,
            max_outstanding: Some(window),
            mix: LoadMix::EventsOnly,
        },
    );
    let mut peak_rss = idle.rss_kib;
    let mut peak_anon = idle.rss_anon_kib;
    let all_acked = |r: &Record| {
        r.envelopes.len() as u64 >= envelopes && r.envelopes.iter().all(|e| e.acked_at.is_some())
    };
    let sampler = async {
        loop {
            if let Ok(stats) = proc_stats(pid) {
                peak_rss = peak_rss.max(stats.rss_kib);
                peak_anon = peak_anon.max(stats.rss_anon_kib);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let finished = tokio::select! {
        done = sim.wait_until(Duration::from_secs(600), all_acked) => done,
        () = sampler => unreachable!("the sampler never ends"),
    };
    let record = finished.map_err(|e| format!("not every envelope was acked: {e:?}"))?;
    let elapsed = started.elapsed();
    let _ = load.await;
    let loaded = proc_stats(pid)?;
    peak_rss = peak_rss.max(loaded.rss_kib);
    peak_anon = peak_anon.max(loaded.rss_anon_kib);

    child::terminate(&daemon);
    let _ = tokio::time::timeout(WAIT, daemon.wait()).await;
    sim.shutdown().await;

    let mut latencies: Vec<u64> = record
        .envelopes
        .iter()
        .filter_map(|e| Some((e.acked_at? - e.deliveries.first()?.at).as_micros() as u64))
        .collect();
    latencies.sort_unstable();
    let percentile = |p: f64| latencies[((latencies.len() - 1) as f64 * p) as usize];
    let cpu = loaded.cpu.saturating_sub(idle.cpu);
    Ok(BenchReport {
        envelopes,
        window,
        seconds: elapsed.as_secs_f64(),
        envelopes_per_second: envelopes as f64 / elapsed.as_secs_f64(),
        cpu_us_per_envelope: cpu.as_secs_f64() * 1e6 / envelopes as f64,
        ack_latency_p50_us: percentile(0.50),
        ack_latency_p99_us: percentile(0.99),
        rss_idle_kib: idle.rss_kib,
        rss_peak_under_load_kib: peak_rss,
        rss_anon_idle_kib: idle.rss_anon_kib,
        rss_anon_peak_under_load_kib: peak_anon,
    })
}

/// CPU time (user + system) and resident memory of a process, from /proc.
struct ProcStats {
    cpu: Duration,
    rss_kib: u64,
    rss_anon_kib: u64,
}

fn proc_stats(pid: u32) -> Result<ProcStats, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("reading /proc/{pid}/stat: {e}"))?;
    // Fields after the command name, which is in parentheses and may contain spaces.
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5), 12 and 13 after the name.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as u64;
    let cpu = Duration::from_secs_f64((ticks(11) + ticks(12)) as f64 / hz as f64);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("reading /proc/{pid}/status: {e}"))?;
    let kib = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    Ok(ProcStats {
        cpu,
        rss_kib: kib("VmRSS:"),
        rss_anon_kib: kib("RssAnon:"),
    })
}
