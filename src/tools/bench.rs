//! `flowcoach bench`: throughput, CPU per envelope, ack latency and resident memory of a
//! flowcoach process (the child, not the simulator) under a steady envelope stream; with
//! `--handovers N`, what N handovers in a row cost under a steady stream of events, slash
//! commands and interactions.

use std::collections::HashMap;
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::time::Instant;

use crate::cli::{BenchArgs, StreamMix};
use crate::config::env;
use crate::control::client;
use crate::control::protocol::{Command, Response};
use crate::exit;
use crate::service::paths::InstancePaths;
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
    if let Some(handovers) = args.handovers {
        return run_handovers(args, handovers);
    }
    report(bench(args.envelopes, args.window), args.json, print_table)
}

/// Runs one benchmark on the tools' runtime and prints its report as a table or JSON.
fn report<R: Serialize>(
    benchmark: impl Future<Output = Result<R, String>>,
    json: bool,
    print: fn(&R),
) -> ExitCode {
    let outcome =
        super::runtime().and_then(|rt| rt.block_on(benchmark).map_err(std::io::Error::other));
    match outcome {
        Ok(report) => {
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).unwrap_or_default()
                );
            } else {
                print(&report);
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

/// What `--handovers N` measures.
#[derive(Debug, Serialize)]
pub struct HandoverBenchReport {
    pub handovers: u32,
    pub strict: bool,
    pub rate_per_sec: f64,
    /// `events`, or `mixed` (slash commands and interactions among the events).
    pub mix: &'static str,
    /// From the request to the answer, as the incumbent counts it (`took_ms`).
    pub took_ms: Spread,
    /// From the request to the answer, as the caller sees it.
    pub wall_ms: Spread,
    /// Stretches with no socket open for the app, as the simulator saw them.
    pub zero_open_stretches: usize,
    /// The longest of them (`Record::longest_zero_open`).
    pub longest_zero_open_ms: f64,
    /// Each of them, in ms (one per handover in strict mode, none in overlap).
    pub zero_open_ms: Spread,
    pub envelopes: usize,
    /// Envelopes delivered more than once (left unacked by a draining incumbent, or held
    /// by a successor beyond the ack deadline): Slack's redelivery at work.
    pub redelivered: usize,
    /// Acked later than the ack deadline after their first delivery: an event that waited
    /// for Slack's redelivery.
    pub acked_late: usize,
    /// Never acked, or given up by the simulator (a slash command or an interaction is
    /// never redelivered: its user sees a failure).
    pub lost: usize,
    /// Event ids with more than one "event handled" log line, over every process.
    pub handled_twice: usize,
    /// Acked events with no "event handled" log line.
    pub acked_not_handled: usize,
}

/// Minimum, median and maximum.
#[derive(Debug, Default, Serialize)]
pub struct Spread {
    pub min: f64,
    pub median: f64,
    pub max: f64,
}

impl Spread {
    fn of(mut values: Vec<f64>) -> Spread {
        values.sort_by(f64::total_cmp);
        match (values.first(), values.last()) {
            (Some(min), Some(max)) => Spread {
                min: *min,
                median: values[values.len() / 2],
                max: *max,
            },
            _ => Spread::default(),
        }
    }
}

fn run_handovers(args: &BenchArgs, handovers: u32) -> ExitCode {
    report(
        bench_handovers(handovers, args.strict, args.rate, args.mix),
        args.json,
        print_handover_table,
    )
}

fn print_handover_table(r: &HandoverBenchReport) {
    println!(
        "flowcoach bench: {} handovers ({}), {:.0} envelopes/s ({})",
        r.handovers,
        if r.strict {
            "strict: break before make"
        } else {
            "overlap"
        },
        r.rate_per_sec,
        r.mix
    );
    println!("                         min     median        max");
    let row = |name: &str, s: &Spread| {
        println!(
            "  {name:<18} {:>7.1} {:>10.1} {:>10.1} ms",
            s.min, s.median, s.max
        );
    };
    row("took (daemon)", &r.took_ms);
    row("took (caller)", &r.wall_ms);
    row("no socket open", &r.zero_open_ms);
    println!(
        "  longest with no socket open  {:>8.1} ms ({} stretches)",
        r.longest_zero_open_ms, r.zero_open_stretches
    );
    println!("  envelopes          {:>10}", r.envelopes);
    println!("    redelivered      {:>10}", r.redelivered);
    println!("    acked too late   {:>10}", r.acked_late);
    println!("    lost             {:>10}", r.lost);
    println!("    handled twice    {:>10}", r.handled_twice);
    println!("    acked, unhandled {:>10}", r.acked_not_handled);
}

/// The environment of the benchmark's instances (names the lock and control socket).
const BENCH_ENVIRONMENT: &str = "bench";

async fn bench_handovers(
    handovers: u32,
    strict: bool,
    rate: f64,
    mix: StreamMix,
) -> Result<HandoverBenchReport, String> {
    if rate.is_nan() || rate <= 0.0 {
        return Err("--rate must be positive".to_owned());
    }
    let dir = BenchDir::create()?;
    let config_path = dir.0.join("flowcoach.toml");
    std::fs::write(
        &config_path,
        format!("environment = \"{BENCH_ENVIRONMENT}\"\n[handover]\nstrict = {strict}\n"),
    )
    .map_err(|e| format!("writing {}: {e}", config_path.display()))?;
    let sim = Simulator::start(SimConfig {
        server_ping_interval: None,
        ..SimConfig::default()
    })
    .await
    .map_err(|e| format!("simulator: {e}"))?;
    let ack_deadline = sim.config().ack_deadline;
    let token = sim.config().apps[0].tokens[0].clone();
    let socket = InstancePaths::new(&dir.0, Some(DEFAULT_APP_ID), BENCH_ENVIRONMENT).socket;

    let mut first = spawn_logged(&sim, &token, &config_path, &dir.0)
        .map_err(|e| format!("starting flowcoach: {e}"))?;
    let stderr = first.stderr.take().ok_or("no stderr pipe")?;
    // Every instance writes to this one pipe: a successor inherits its predecessor's
    // stderr. It ends when the last of them exits.
    let handled = tokio::spawn(count_handled(stderr));
    // Successors are not our children: whichever holds the app is stopped however this ends.
    let mut holder = Holder(first.id().ok_or("flowcoach exited at once")?);
    sim.wait_until(WAIT, |r| r.open_sockets(DEFAULT_APP_ID) >= 1)
        .await
        .map_err(|e| format!("flowcoach did not connect: {e:?}"))?;

    let load = sim.start_load(
        DEFAULT_APP_ID,
        LoadSpec {
            count: (rate * 3600.0) as u64,
            rate_per_sec: Some(rate),
            max_outstanding: None,
            mix: match mix {
                StreamMix::Events => LoadMix::EventsOnly,
                StreamMix::Mixed => LoadMix::Mixed,
            },
        },
    );
    // Handovers a tenth of a second of stream apart, at least one envelope.
    let spacing = ((rate / 10.0) as usize).max(1);
    let mut acks = acked_beyond(&sim, 0, spacing * 5).await?;
    let mut took = Vec::new();
    let mut wall = Vec::new();
    let mut reaped_first = false;
    for round in 0..handovers {
        let asked = Instant::now();
        let answer = client::request(&socket, Command::Handover, Duration::from_secs(120))
            .await
            .map_err(|e| format!("handover {}: {e}", round + 1))?;
        wall.push(asked.elapsed().as_secs_f64() * 1e3);
        let successor = match answer {
            Response::HandedOver {
                successor_pid,
                took_ms,
            } => {
                took.push(took_ms as f64);
                successor_pid
            }
            Response::Error { message, .. } => {
                return Err(format!("handover {}: {message}", round + 1));
            }
            other => return Err(format!("handover {}: unexpected {other:?}", round + 1)),
        };
        // The next request must reach the successor: the old instance still accepts on the
        // shared control socket until it has exited.
        if reaped_first {
            wait_exited(holder.0).await?;
        } else {
            tokio::time::timeout(WAIT, first.wait())
                .await
                .map_err(|_| "the first instance did not exit after its handover")?
                .map_err(|e| e.to_string())?;
            reaped_first = true;
        }
        holder.0 = successor;
        acks = acked_beyond(&sim, acks, spacing).await?;
    }
    load.abort();
    // Left unacked by a draining incumbent: redelivered after the ack deadline.
    let settled = sim
        .wait_until(Duration::from_secs(30), |r| {
            r.envelopes
                .iter()
                .all(|e| e.acked_at.is_some() || e.gave_up)
        })
        .await
        .unwrap_or_else(|timeout| timeout.record);
    let now = Instant::now();
    let stretches = settled.zero_open_durations(DEFAULT_APP_ID, None);
    let longest = settled.longest_zero_open(DEFAULT_APP_ID, now);

    terminate_pid(holder.0);
    let handled = tokio::time::timeout(WAIT, handled)
        .await
        .map_err(|_| format!("pid {} did not stop after SIGTERM", holder.0))?
        .map_err(|e| e.to_string())?;
    sim.shutdown().await;

    let acked_events: Vec<&str> = settled
        .envelopes
        .iter()
        .filter(|e| e.acked_at.is_some())
        .filter_map(|e| e.event_id.as_deref())
        .collect();
    Ok(HandoverBenchReport {
        handovers,
        strict,
        rate_per_sec: rate,
        mix: match mix {
            StreamMix::Events => "events",
            StreamMix::Mixed => "mixed",
        },
        took_ms: Spread::of(took),
        wall_ms: Spread::of(wall),
        zero_open_stretches: stretches.len(),
        longest_zero_open_ms: longest.as_secs_f64() * 1e3,
        zero_open_ms: Spread::of(stretches.iter().map(|d| d.as_secs_f64() * 1e3).collect()),
        envelopes: settled.envelopes.len(),
        redelivered: settled
            .envelopes
            .iter()
            .filter(|e| e.deliveries.len() > 1)
            .count(),
        acked_late: settled
            .envelopes
            .iter()
            .filter(|e| e.ack_delay().is_some_and(|delay| delay > ack_deadline))
            .count(),
        lost: settled
            .envelopes
            .iter()
            .filter(|e| e.acked_at.is_none() || e.gave_up)
            .count(),
        handled_twice: handled.values().filter(|n| **n > 1).count(),
        acked_not_handled: acked_events
            .iter()
            .filter(|id| !handled.contains_key(**id))
            .count(),
    })
}

/// A private runtime directory (lock, control socket, configuration), removed at the end.
struct BenchDir(std::path::PathBuf);

impl BenchDir {
    fn create() -> Result<BenchDir, String> {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::env::temp_dir().join(format!("flowcoach-bench-{}", std::process::id()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| format!("creating {}: {e}", path.display()))?;
        Ok(BenchDir(path))
    }
}

impl Drop for BenchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `flowcoach --config <config> run` against `sim`, logging JSON at info (the "event
/// handled" lines are counted) to a pipe, with nothing else of our environment.
fn spawn_logged(
    sim: &Simulator,
    token: &str,
    config: &std::path::Path,
    runtime_dir: &std::path::Path,
) -> std::io::Result<tokio::process::Child> {
    let mut command = tokio::process::Command::new(std::env::current_exe()?);
    command
        .arg("--config")
        .arg(config)
        .arg("run")
        .env_clear()
        .env(env::APP_TOKEN, token)
        .env(env::API_URL, sim.api_url())
        .env(env::LOG, "info")
        .env(env::LOG_FORMAT, "json")
        .env(env::RUNTIME_DIR, runtime_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command.spawn()
}

/// Reads JSON log lines to the end; "event handled" lines per event id.
async fn count_handled(stderr: tokio::process::ChildStderr) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    let mut lines = BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if value["message"] == "event handled"
            && let Some(event_id) = value["event_id"].as_str()
        {
            *counts.entry(event_id.to_owned()).or_insert(0) += 1;
        }
    }
    counts
}

/// Waits until `more` envelopes have been acked beyond `since`; the new count.
async fn acked_beyond(sim: &Simulator, since: usize, more: usize) -> Result<usize, String> {
    let count = |r: &Record| r.envelopes.iter().filter(|e| e.acked_at.is_some()).count();
    sim.wait_until(WAIT, |r| count(r) >= since + more)
        .await
        .map(|r| count(&r))
        .map_err(|e| format!("the event stream stalled: {e:?}"))
}

/// Waits until a process that is not our child has exited.
async fn wait_exited(pid: u32) -> Result<(), String> {
    let deadline = Instant::now() + WAIT;
    while !exited(pid) {
        if Instant::now() >= deadline {
            return Err(format!("pid {pid} did not exit after handing over"));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// The instance holding the app, stopped (SIGTERM) when dropped unless already gone.
struct Holder(u32);

impl Drop for Holder {
    fn drop(&mut self) {
        if !exited(self.0) {
            terminate_pid(self.0);
        }
    }
}

/// Whether a process that is not our child has exited (or is a zombie nobody reaped).
fn exited(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => true,
    }
}

fn terminate_pid(pid: u32) {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
}
