//! systemd integration: `sd_notify(3)` messages (`READY=1`, `STATUS=`, `STOPPING=1`,
//! `WATCHDOG=1`, `EXTEND_TIMEOUT_USEC=`, `MAINPID=`), a watchdog fed from the same health
//! judgement as `flowcoachctl health`, and timeout extensions while a drain runs.
//!
//! Everything here is a no-op when the service manager gave no `NOTIFY_SOCKET`. The main
//! process sends every message (`NotifyAccess=main`, systemd's default).

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use sd_notify::NotifyState;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::health;
use crate::state::{ConnectionStatus, InstanceState, Phase};

/// A send blocks only while systemd's receive queue is full; past this the message is
/// dropped (and logged) rather than stall the runtime any longer.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// How often the status line is refreshed while draining: the number of envelopes in
/// flight changes without a state notification.
const DRAIN_REFRESH: Duration = Duration::from_secs(1);

/// The sending end of systemd's notification socket. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Systemd {
    target: Option<Arc<Target>>,
}

#[derive(Debug)]
struct Target {
    socket: UnixDatagram,
    addr: SocketAddr,
    /// `NOTIFY_SOCKET` as given, for log lines.
    name: String,
}

impl Systemd {
    /// Notifications to `$NOTIFY_SOCKET`; does nothing when it is unset.
    pub fn from_env() -> Systemd {
        match std::env::var_os("NOTIFY_SOCKET") {
            Some(socket) => Systemd::with_socket(socket),
            None => Systemd { target: None },
        }
    }

    /// Notifications to `socket`: an absolute path, or `@name` for the abstract namespace
    /// (as in `NOTIFY_SOCKET`). An unusable value is logged and notifications are disabled.
    pub fn with_socket(socket: impl AsRef<OsStr>) -> Systemd {
        let socket = socket.as_ref();
        match Target::open(socket) {
            Ok(target) => Systemd {
                target: Some(Arc::new(target)),
            },
            Err(error) => {
                tracing::warn!(
                    socket = %socket.to_string_lossy(),
                    %error,
                    "cannot use the systemd notification socket: not notifying systemd"
                );
                Systemd { target: None }
            }
        }
    }

    /// `READY=1`: start-up is complete (and the watchdog, if any, is armed).
    pub fn ready(&self) {
        self.notify(&[NotifyState::Ready]);
    }

    /// `STATUS=…`: one line for `systemctl status`; line breaks become spaces.
    pub fn status(&self, line: &str) {
        let line = one_line(line);
        self.notify(&[NotifyState::Status(&line)]);
    }

    /// `STOPPING=1`: the service has begun to shut down.
    pub fn stopping(&self) {
        self.notify(&[NotifyState::Stopping]);
    }

    /// `EXTEND_TIMEOUT_USEC=`: the current start/stop timeout is extended so that the
    /// service has at least `by` from now (at most about 71 minutes).
    pub fn extend_timeout(&self, by: Duration) {
        self.notify(&[NotifyState::ExtendTimeoutUsec(usec(by))]);
    }

    /// `WATCHDOG=1`: the service is alive.
    pub fn watchdog_ping(&self) {
        self.notify(&[NotifyState::Watchdog]);
    }

    /// `MAINPID=`: another process becomes the service's main process (a handover).
    pub fn main_pid(&self, pid: u32) {
        self.notify(&[NotifyState::MainPid(pid)]);
    }

    fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends `states` in one datagram. Failures are logged at debug level: systemd's
    /// notifications are advisory and must never take the service down.
    fn notify(&self, states: &[NotifyState<'_>]) {
        let Some(target) = &self.target else {
            return;
        };
        let mut datagram = String::new();
        for state in states {
            let _ = writeln!(datagram, "{state}");
        }
        let outcome = target
            .socket
            .send_to_addr(datagram.as_bytes(), &target.addr);
        let error = match outcome {
            Ok(sent) if sent == datagram.len() => return,
            Ok(sent) => format!("short write: {sent} of {} bytes", datagram.len()),
            Err(error) => error.to_string(),
        };
        tracing::debug!(
            socket = %target.name,
            notification = datagram.trim_end(),
            %error,
            "systemd notification not sent"
        );
    }
}

impl Target {
    fn open(raw: &OsStr) -> io::Result<Target> {
        let bytes = raw.as_bytes();
        let addr = match bytes.first() {
            Some(b'@') => SocketAddr::from_abstract_name(&bytes[1..])?,
            Some(b'/') => SocketAddr::from_pathname(Path::new(raw))?,
            _ => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not an absolute path nor an abstract socket name (@…)",
                ));
            }
        };
        let socket = UnixDatagram::unbound()?;
        socket.set_write_timeout(Some(SEND_TIMEOUT))?;
        Ok(Target {
            socket,
            addr,
            name: raw.to_string_lossy().into_owned(),
        })
    }
}

fn one_line(line: &str) -> String {
    line.replace(['\n', '\r'], " ")
}

fn usec(duration: Duration) -> u32 {
    u32::try_from(duration.as_micros()).unwrap_or(u32::MAX)
}

/// The watchdog interval systemd asks for: `WATCHDOG_USEC`, honoured only when
/// `WATCHDOG_PID` is unset or names this process (it may have been inherited from a
/// parent). `None` when there is no watchdog.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|interval| !interval.is_zero())
}

/// The `STATUS=` line for `status`, with `in_flight` envelopes being handled.
pub fn status_line(status: &ConnectionStatus, in_flight: u64) -> String {
    let line = phase_line(status, in_flight);
    match &status.handover {
        Some(step) => format!("{line}; {step}"),
        None => line,
    }
}

fn phase_line(status: &ConnectionStatus, in_flight: u64) -> String {
    match &status.phase {
        Phase::Connected => {
            let app = status.app_id.as_deref().unwrap_or("Slack");
            let sockets = plural(u64::from(status.sockets_open), "socket", "sockets");
            match status.num_connections {
                Some(total) => format!("connected to {app} ({sockets}; Slack counts {total})"),
                None => format!("connected to {app} ({sockets})"),
            }
        }
        Phase::Draining => format!(
            "draining: {} in flight",
            plural(in_flight, "envelope", "envelopes")
        ),
        phase @ (Phase::Starting | Phase::Connecting) => match &status.last_disconnect {
            Some(cause) if status.down_since.is_some() => {
                format!("{phase} (last disconnect: {cause})")
            }
            _ => phase.to_string(),
        },
        phase @ (Phase::Reconnecting { .. } | Phase::Stopped) => phase.to_string(),
    }
}

fn plural(n: u64, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

/// Reports the service's state to systemd: `READY=1` once, the first time a connection has
/// said hello, and `STATUS=` on every change (refreshed while draining).
///
/// Runs until `stop` is cancelled, then sends the latest status if it changed. Cancel it
/// after the drain, not at the stop signal, or the drain goes unreported.
pub fn spawn_status_reporter(
    systemd: Systemd,
    state: Arc<InstanceState>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if !systemd.enabled() {
            return;
        }
        let mut changes = state.subscribe();
        let mut ready_sent = false;
        let mut last_line = String::new();
        loop {
            let status = changes.borrow_and_update().clone();
            let line = status_line(&status, state.counters.in_flight.load(Ordering::Relaxed));
            // A watch keeps only the latest value, so a short-lived `Connected` may never be
            // seen; `app_id` is set by the first hello and stays.
            let ready =
                !ready_sent && (status.phase == Phase::Connected || status.app_id.is_some());
            if ready {
                // One datagram: systemd shows the status the moment the unit turns active.
                systemd.notify(&[NotifyState::Ready, NotifyState::Status(&line)]);
                ready_sent = true;
                last_line = line;
            } else if line != last_line {
                systemd.status(&line);
                last_line = line;
            }
            let draining = status.phase == Phase::Draining;
            tokio::select! {
                () = stop.cancelled() => break,
                changed = changes.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                () = tokio::time::sleep(DRAIN_REFRESH), if draining => {}
            }
        }
        let line = status_line(
            &changes.borrow(),
            state.counters.in_flight.load(Ordering::Relaxed),
        );
        if line != last_line {
            systemd.status(&line);
        }
    })
}

/// Feeds systemd's watchdog every `interval / 2` while the service judges itself fit to go
/// on ([`health::watchdog_verdict`]): an outage beyond `outage_budget` stops the pings and
/// systemd restarts the service when the interval runs out.
///
/// The pings come from a task on the same runtime as everything else (a current-thread
/// runtime in the daemon): if that runtime is wedged by a blocking handler or a busy loop,
/// the pings stop too, and that is the point.
///
/// Runs until `stop` is cancelled: cancel it after the drain, so that a drain is watched
/// like the rest of the service's life.
pub fn spawn_watchdog(
    systemd: Systemd,
    state: Arc<InstanceState>,
    outage_budget: Duration,
    interval: Duration,
    stop: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if !systemd.enabled() {
            return;
        }
        let period = (interval / 2).max(Duration::from_millis(1));
        let mut ticks = tokio::time::interval(period);
        // After a stall, one ping, not a burst that would hide how late it is.
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tracing::info!(
            interval_ms = interval.as_millis() as u64,
            ping_every_ms = period.as_millis() as u64,
            "feeding the systemd watchdog"
        );
        let mut starving = false;
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let verdict =
                health::watchdog_verdict(&state.status(), outage_budget, SystemTime::now());
            match verdict {
                Ok(()) => {
                    systemd.watchdog_ping();
                    if starving {
                        starving = false;
                        tracing::info!("healthy again: feeding the systemd watchdog again");
                    }
                }
                Err(reason) if !starving => {
                    starving = true;
                    tracing::warn!(
                        reason,
                        "unhealthy: no longer feeding the systemd watchdog, which restarts the service unless it recovers"
                    );
                }
                Err(_) => {}
            }
        }
    })
}

/// Awaits `future` (a drain) while asking systemd for more time: `EXTEND_TIMEOUT_USEC` of
/// twice `step`, at once and then every `step`, so that a drain still within its own budget
/// is not killed by `TimeoutStopSec=`. `future` must be bounded on its own.
pub async fn extend_while<F: Future>(systemd: &Systemd, future: F, step: Duration) -> F::Output {
    if !systemd.enabled() {
        return future.await;
    }
    let step = step.max(Duration::from_millis(1));
    let mut ticks = tokio::time::interval(step);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut future = std::pin::pin!(future);
    loop {
        tokio::select! {
            biased;
            output = &mut future => return output,
            _ = ticks.tick() => systemd.extend_timeout(step * 2),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connected() -> ConnectionStatus {
        ConnectionStatus {
            phase: Phase::Connected,
            app_id: Some("A0SIMAPP01".into()),
            sockets_open: 1,
            num_connections: Some(1),
            ..ConnectionStatus::default()
        }
    }

    #[test]
    fn connected_names_the_app_and_the_sockets() {
        assert_eq!(
            status_line(&connected(), 0),
            "connected to A0SIMAPP01 (1 socket; Slack counts 1)"
        );
        let rotating = ConnectionStatus {
            sockets_open: 2,
            num_connections: Some(3),
            ..connected()
        };
        assert_eq!(
            status_line(&rotating, 5),
            "connected to A0SIMAPP01 (2 sockets; Slack counts 3)"
        );
        let no_count = ConnectionStatus {
            num_connections: None,
            ..connected()
        };
        assert_eq!(
            status_line(&no_count, 0),
            "connected to A0SIMAPP01 (1 socket)"
        );
    }

    #[test]
    fn reconnecting_reads_as_the_phase() {
        let status = ConnectionStatus {
            phase: Phase::Reconnecting {
                delay: Duration::from_millis(4200),
                cause: "too_many_websockets".into(),
            },
            ..ConnectionStatus::default()
        };
        assert_eq!(
            status_line(&status, 0),
            "reconnecting in 4.2s after too_many_websockets"
        );
    }

    #[test]
    fn connecting_after_an_outage_names_the_cause() {
        let mut status = ConnectionStatus {
            phase: Phase::Connecting,
            ..ConnectionStatus::default()
        };
        assert_eq!(status_line(&status, 0), "connecting");
        status.last_disconnect = Some("stale (no pong)".into());
        status.down_since = Some(SystemTime::now());
        assert_eq!(
            status_line(&status, 0),
            "connecting (last disconnect: stale (no pong))"
        );
        assert_eq!(status_line(&ConnectionStatus::default(), 0), "starting");
    }

    #[test]
    fn draining_counts_envelopes_in_flight() {
        let status = ConnectionStatus {
            phase: Phase::Draining,
            ..connected()
        };
        assert_eq!(status_line(&status, 3), "draining: 3 envelopes in flight");
        assert_eq!(status_line(&status, 1), "draining: 1 envelope in flight");
        assert_eq!(status_line(&status, 0), "draining: 0 envelopes in flight");
        let stopped = ConnectionStatus {
            phase: Phase::Stopped,
            ..status
        };
        assert_eq!(status_line(&stopped, 0), "stopped");
    }

    #[test]
    fn status_is_one_line_and_usec_saturate() {
        assert_eq!(one_line("a\nb\r\nc"), "a b  c");
        assert_eq!(usec(Duration::from_millis(1500)), 1_500_000);
        assert_eq!(usec(Duration::from_secs(10 * 3600)), u32::MAX);
    }

    #[test]
    fn unusable_sockets_disable_notifications() {
        assert!(!Systemd::with_socket("relative/path").enabled());
        assert!(!Systemd::with_socket("").enabled());
        assert!(Systemd::with_socket("/run/does-not-matter-until-sent").enabled());
        // Sending to a socket that does not exist is logged, not fatal.
        Systemd::with_socket("/nonexistent/notify").ready();
    }
}
