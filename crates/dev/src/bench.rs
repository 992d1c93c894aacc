//! `flowcoach-dev bench`: throughput, CPU per envelope, ack latency and resident memory of a
//! flowcoach process (the child, not the simulator) under a steady envelope stream (the
//! inbox in SQLite, in PostgreSQL with `--postgres`, or off); with
//! `--handovers N`, what N handovers in a row cost under a steady stream of events, slash
//! commands and interactions; with `--bolt-compare SECONDS`, a Bolt app in Socket Mode
//! against the same app behind flowcoach.

use std::process::ExitCode;
use std::time::Duration;

use flowcoach::control::client;
use flowcoach::control::protocol::{Command, Response};
use flowcoach::host::paths::InstancePaths;
use flowcoach_harness::logs::handled_events;
use flowcoach_harness::postgres::{self, Postgres};
use flowcoach_harness::process::{self, Strays};
use flowcoach_harness::prometheus;
use flowcoach_harness::{Daemon, Logs};
use flowcoach_sim::{DEFAULT_APP_ID, LoadMix, LoadSpec, Record, SimConfig, Simulator};
use nix::sys::signal::Signal;
use serde::Serialize;
use tokio::time::Instant;

use crate::noop_app::NoOpApp;
use crate::{BenchArgs, StreamMix, bolt_compare, outages};

const WAIT: Duration = Duration::from_secs(30);

/// The figures one run produces.
#[derive(Debug, Serialize)]
pub struct BenchReport {
    pub envelopes: u64,
    pub window: usize,
    /// Envelopes per second offered; `None`: as fast as the window allows.
    pub rate: Option<f64>,
    /// The stream started on a connection that replaced a dropped one.
    pub after_reconnect: bool,
    /// Each envelope was forwarded to a no-op app in HTTP mode and acked after its 200:
    /// the ack latency includes that round trip.
    pub forward: bool,
    /// With `forward`: requests the app answered.
    pub app_requests: Option<u64>,
    /// Events were acked once on disk (the durable inbox), not on accept.
    pub inbox: bool,
    /// The inbox was in PostgreSQL (`[cluster]`), not in SQLite: acked once committed.
    pub postgres: bool,
    /// The metrics endpoint was on and scraped every second.
    pub metrics: bool,
    /// With `metrics`: scrapes answered, and the series in the last one.
    pub scrapes: Option<u64>,
    pub series: Option<usize>,
    pub seconds: f64,
    pub envelopes_per_second: f64,
    pub cpu_us_per_envelope: f64,
    /// With `postgres`: the CPU of the PostgreSQL server and its sessions, per envelope,
    /// on top of flowcoach's own.
    pub store_cpu_us_per_envelope: Option<f64>,
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
    if let Some(drops) = args.drops {
        return report(
            outages::drops(drops, args.sockets),
            args.json,
            outages::print_drops,
        );
    }
    if let Some(seconds) = args.bolt_compare {
        return report(
            bolt_compare::compare(seconds, args.rate.unwrap_or(20.0)),
            args.json,
            bolt_compare::print_table,
        );
    }
    if let Some(seconds) = args.storm {
        return report(
            outages::storm(seconds, &args.storm_reason),
            args.json,
            outages::print_storm,
        );
    }
    report(bench(args), args.json, print_table)
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
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("flowcoach-dev bench: {error}");
            ExitCode::FAILURE
        }
    }
}

fn print_table(r: &BenchReport) {
    let rate = r.rate.map_or_else(
        || "as fast as acked".to_owned(),
        |rate| format!("{rate} per second"),
    );
    println!(
        "flowcoach-dev bench: {} envelopes, window {}, {rate}{}",
        r.envelopes,
        r.window,
        if r.after_reconnect {
            ", after a reconnect"
        } else {
            ""
        }
    );
    if r.postgres {
        println!(
            "  inbox in PostgreSQL ([cluster], loopback TCP): events acked once committed there"
        );
    } else if r.inbox {
        println!("  durable inbox on: events acked once committed to disk (fsync)");
    }
    if let Some(requests) = r.app_requests {
        println!("  forwarded to a no-op app in HTTP mode: {requests} requests answered");
    }
    if let (Some(scrapes), Some(series)) = (r.scrapes, r.series) {
        println!("  metrics endpoint on: {scrapes} scrapes, {series} series in the last one");
    }
    println!(
        "  throughput        {:>10.0} envelopes/s",
        r.envelopes_per_second
    );
    println!(
        "  client CPU        {:>10.2} µs/envelope",
        r.cpu_us_per_envelope
    );
    if let Some(store) = r.store_cpu_us_per_envelope {
        println!("  PostgreSQL CPU    {store:>10.2} µs/envelope");
    }
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

async fn bench(args: &BenchArgs) -> Result<BenchReport, String> {
    let (envelopes, window) = (args.envelopes, args.window);
    let config = SimConfig {
        // Under full load nothing should be redelivered: the figure is the steady state.
        ack_deadline: Duration::from_secs(60),
        server_ping_interval: None,
        ..SimConfig::default()
    };
    let sim = Simulator::start(config)
        .await
        .map_err(|e| format!("simulator: {e}"))?;
    let app = if args.forward {
        Some(
            NoOpApp::start()
                .await
                .map_err(|e| format!("the no-op app: {e}"))?,
        )
    } else {
        None
    };
    let mut config = app.as_ref().map_or_else(String::new, |app| {
        format!(
            "[forward]\nurl = \"{}\"\nmax_concurrent = {window}\n",
            app.url
        )
    });
    if args.no_inbox {
        config.push_str("[inbox]\nenabled = false\n");
    }
    let postgres = if args.postgres {
        if !postgres::runnable("flowcoach-dev bench --postgres") {
            return Err("--postgres needs the PostgreSQL server package".to_owned());
        }
        let pg = Postgres::start().await;
        config.push_str(&format!(
            "[cluster]\nstore = \"{}\"\nname = \"bench\"\nmember = \"bench\"\n",
            pg.tcp_url()
        ));
        Some(pg)
    } else {
        None
    };
    if args.metrics {
        config.push_str("[metrics]\nlisten = \"127.0.0.1:0\"\n");
    }
    // warn: the built-in handler's per-event info line is filtered out, which makes it the
    // no-op handler the figures are about.
    // With --metrics, the daemon's own start-up lines too: the endpoint's address is in one.
    let level = if args.metrics {
        "warn,flowcoach::daemon=info"
    } else {
        "warn"
    };
    let mut env = vec![("FLOWCOACH_LOG", level)];
    if app.is_some() {
        env.push(("SLACK_SIGNING_SECRET", "bench-signing-secret"));
    }
    if postgres.is_some() {
        env.push(("PGPASSWORD", postgres::PASSWORD));
    }
    let mut daemon = Daemon::launch(&sim, &config, &env, &[], Logs::Collect);
    let pid = daemon.pid() as u32;
    sim.wait_until(WAIT, |r| r.sockets.iter().any(|s| s.hello_at.is_some()))
        .await
        .map_err(|e| format!("flowcoach did not connect: {e:?}"))?;
    let endpoint = if args.metrics {
        let line = daemon.wait_log("metrics endpoint on", |_| true).await;
        let address = line["address"].as_str().unwrap_or_default();
        Some(
            address
                .parse::<std::net::SocketAddr>()
                .map_err(|e| format!("the metrics endpoint's address {address:?}: {e}"))?,
        )
    } else {
        None
    };
    // Let start-up allocations settle before reading the idle figure.
    tokio::time::sleep(Duration::from_millis(500)).await;
    if args.after_reconnect {
        // A socket that replaced a dropped one: how an ack travels then is what matters
        // (without TCP_NODELAY it waited for the server's delayed ACK).
        let first = sim.open_sockets(DEFAULT_APP_ID)[0];
        sim.drop_socket(first);
        sim.wait_until(WAIT, |r| r.hellos() >= 2)
            .await
            .map_err(|e| format!("flowcoach did not reconnect: {e:?}"))?;
    }
    let idle = process::usage(pid)?;
    let store_idle = postgres.as_ref().map(store_cpu);

    let started = Instant::now();
    let load = sim.start_load(
        DEFAULT_APP_ID,
        LoadSpec {
            count: envelopes,
            rate_per_sec: args.rate,
            max_outstanding: Some(window),
            mix: LoadMix::EventsOnly,
        },
    );
    let mut peak_rss = idle.rss_kib;
    let mut peak_anon = idle.rss_anon_kib;
    let mut scrapes = 0u64;
    let mut last_scrape = String::new();
    let all_acked = |r: &Record| {
        r.envelopes.len() as u64 >= envelopes && r.envelopes.iter().all(|e| e.acked_at.is_some())
    };
    let sampler = async {
        loop {
            if let Ok(stats) = process::usage(pid) {
                peak_rss = peak_rss.max(stats.rss_kib);
                peak_anon = peak_anon.max(stats.rss_anon_kib);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let scraper = async {
        let Some(endpoint) = endpoint else {
            return std::future::pending().await;
        };
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            every.tick().await;
            last_scrape = prometheus::scrape(endpoint, None).await.1;
            scrapes += 1;
        }
    };
    let finished = tokio::select! {
        done = sim.wait_until(Duration::from_secs(600), all_acked) => done,
        () = sampler => unreachable!("the sampler never ends"),
        () = scraper => unreachable!("the scraper never ends"),
    };
    if let Some(endpoint) = endpoint {
        last_scrape = prometheus::scrape(endpoint, None).await.1;
        scrapes += 1;
    }
    let record = finished.map_err(|e| format!("not every envelope was acked: {e:?}"))?;
    let elapsed = started.elapsed();
    let _ = load.await;
    let loaded = process::usage(pid)?;
    let store_loaded = postgres.as_ref().map(store_cpu);
    peak_rss = peak_rss.max(loaded.rss_kib);
    peak_anon = peak_anon.max(loaded.rss_anon_kib);

    daemon.signal(Signal::SIGTERM);
    let _ = tokio::time::timeout(WAIT, daemon.child.wait()).await;
    sim.shutdown().await;
    drop(postgres);

    let latencies = AckLatencies::of(&record);
    let percentile = |p| latencies.percentile_us(p);
    let cpu = loaded.cpu.saturating_sub(idle.cpu);
    Ok(BenchReport {
        envelopes,
        window,
        rate: args.rate,
        after_reconnect: args.after_reconnect,
        forward: args.forward,
        app_requests: app.as_ref().map(NoOpApp::requests),
        inbox: !args.no_inbox,
        postgres: args.postgres,
        metrics: args.metrics,
        scrapes: args.metrics.then_some(scrapes),
        series: args.metrics.then(|| prometheus::series_count(&last_scrape)),
        seconds: elapsed.as_secs_f64(),
        envelopes_per_second: envelopes as f64 / elapsed.as_secs_f64(),
        cpu_us_per_envelope: cpu.as_secs_f64() * 1e6 / envelopes as f64,
        store_cpu_us_per_envelope: store_loaded.zip(store_idle).map(|(loaded, idle)| {
            loaded.saturating_sub(idle).as_secs_f64() * 1e6 / envelopes as f64
        }),
        ack_latency_p50_us: percentile(0.50),
        ack_latency_p99_us: percentile(0.99),
        rss_idle_kib: idle.rss_kib,
        rss_peak_under_load_kib: peak_rss,
        rss_anon_idle_kib: idle.rss_anon_kib,
        rss_anon_peak_under_load_kib: peak_anon,
    })
}

/// CPU time so far of the PostgreSQL server and its sessions (one process each).
fn store_cpu(pg: &Postgres) -> Duration {
    let Some(server) = pg.pid() else {
        return Duration::ZERO;
    };
    std::iter::once(server)
        .chain(process::children(server))
        .filter_map(|pid| process::usage(pid).ok())
        .map(|usage| usage.cpu)
        .sum()
}

/// From each acked envelope's first delivery to its ack, sorted.
pub struct AckLatencies(Vec<u64>);

impl AckLatencies {
    pub fn of(record: &Record) -> AckLatencies {
        let mut micros: Vec<u64> = record
            .envelopes
            .iter()
            .filter_map(|e| Some(e.ack_delay()?.as_micros() as u64))
            .collect();
        micros.sort_unstable();
        AckLatencies(micros)
    }

    /// The `p`th quantile (0.5: the median) in µs; 0 when nothing was acked.
    pub fn percentile_us(&self, p: f64) -> u64 {
        match self.0.len() {
            0 => 0,
            n => self.0[((n - 1) as f64 * p) as usize],
        }
    }
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
    /// The header of the rows [`Spread::print_row`] prints.
    pub fn print_header() {
        println!("                         min     median        max");
    }

    /// One row of a table: `name`, then the three figures in ms.
    pub fn print_row(&self, name: &str) {
        println!(
            "  {name:<18} {:>7.1} {:>10.1} {:>10.1} ms",
            self.min, self.median, self.max
        );
    }

    pub fn of(mut values: Vec<f64>) -> Spread {
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
        bench_handovers(handovers, args.strict, args.rate.unwrap_or(200.0), args.mix),
        args.json,
        print_handover_table,
    )
}

fn print_handover_table(r: &HandoverBenchReport) {
    println!(
        "flowcoach-dev bench: {} handovers ({}), {:.0} envelopes/s ({})",
        r.handovers,
        if r.strict {
            "strict: break before make"
        } else {
            "overlap"
        },
        r.rate_per_sec,
        r.mix
    );
    Spread::print_header();
    r.took_ms.print_row("took (daemon)");
    r.wall_ms.print_row("took (caller)");
    r.zero_open_ms.print_row("no socket open");
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
    let sim = Simulator::start(SimConfig {
        server_ping_interval: None,
        ..SimConfig::default()
    })
    .await
    .map_err(|e| format!("simulator: {e}"))?;
    let ack_deadline = sim.config().ack_deadline;
    let config = format!("environment = \"{BENCH_ENVIRONMENT}\"\n[handover]\nstrict = {strict}\n");
    // JSON at info: the "event handled" lines are counted. Every instance writes to this
    // one's stderr: a successor inherits its predecessor's.
    let mut first = Daemon::launch(&sim, &config, &[], &[], Logs::Collect);
    let socket =
        InstancePaths::new(&first.runtime_dir, Some(DEFAULT_APP_ID), BENCH_ENVIRONMENT).socket;
    // Successors are not our children: whichever holds the app is stopped however this ends.
    let mut strays = Strays::default();
    let mut holder = first.pid() as u32;
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
        strays.add(successor);
        // The next request must reach the successor: the old instance still accepts on the
        // shared control socket until it has exited.
        if reaped_first {
            strays.gone(holder, WAIT).await?;
        } else {
            tokio::time::timeout(WAIT, first.child.wait())
                .await
                .map_err(|_| "the first instance did not exit after its handover")?
                .map_err(|e| e.to_string())?;
            reaped_first = true;
        }
        holder = successor;
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

    process::signal(holder, Signal::SIGTERM);
    strays
        .gone(holder, WAIT)
        .await
        .map_err(|_| format!("pid {holder} did not stop after SIGTERM"))?;
    sim.shutdown().await;
    let handled = handled_events(&first.logs());

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

/// Waits until `more` envelopes have been acked beyond `since`; the new count.
async fn acked_beyond(sim: &Simulator, since: usize, more: usize) -> Result<usize, String> {
    let count = |r: &Record| r.envelopes.iter().filter(|e| e.acked_at.is_some()).count();
    sim.wait_until(WAIT, |r| count(r) >= since + more)
        .await
        .map(|r| count(&r))
        .map_err(|e| format!("the event stream stalled: {e:?}"))
}
