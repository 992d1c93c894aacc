//! Log output: the systemd journal, natively, when stderr is connected to it; otherwise
//! human-readable text (coloured on a terminal only) or JSON lines on stderr. The level
//! can be changed at run time; dependencies are held at `info` whatever it says.

use std::io::IsTerminal;

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, Registry, reload};

use crate::config::{LogFormat, LogSettings};

/// The journal's `SYSLOG_IDENTIFIER` (`journalctl -t flowcoach`).
const SYSLOG_IDENTIFIER: &str = "flowcoach";

type Filtered = Layered<Targets, Layered<reload::Layer<EnvFilter, Registry>, Registry>>;
type Output = Box<dyn Layer<Filtered> + Send + Sync>;

/// Changes the log level of the installed subscriber (for SIGHUP).
#[derive(Debug, Clone)]
pub struct LogHandle {
    filter: reload::Handle<EnvFilter, Registry>,
}

impl LogHandle {
    /// Replaces the filter with `level` (`info`, `flowcoach=debug`, …); an invalid filter
    /// leaves the current one in place.
    pub fn set_level(&self, level: &str) -> Result<(), String> {
        let filter =
            EnvFilter::try_new(level).map_err(|e| format!("invalid log level {level:?}: {e}"))?;
        self.filter
            .reload(filter)
            .map_err(|e| format!("cannot change the log level: {e}"))
    }
}

/// Installs the global subscriber. The level was validated with the configuration.
///
/// Under systemd with stderr connected to the journal, events go to journald with their
/// fields as journal fields (prefixed `F_`, e.g. `F_ENVELOPE_ID`, so that no field can
/// overwrite `MESSAGE`, `PRIORITY` and the like); `settings.format` then does not apply.
pub fn init(settings: &LogSettings) -> LogHandle {
    let mut journal_error = None;
    let output: Output = match stderr_is_journal().then(tracing_journald::layer) {
        Some(Ok(journal)) => journal
            .with_syslog_identifier(SYSLOG_IDENTIFIER.to_owned())
            .boxed(),
        Some(Err(error)) => {
            journal_error = Some(error);
            stderr_output(settings.format, stderr_colours(), std::io::stderr)
        }
        None => stderr_output(settings.format, stderr_colours(), std::io::stderr),
    };
    let (subscriber, handle) = subscriber(&settings.level, output);
    if let Err(error) = subscriber.try_init() {
        eprintln!("flowcoach: cannot install the logger: {error}");
    }
    if let Some(error) = journal_error {
        tracing::warn!(%error, "stderr is the journal but journald's socket cannot be used: logging to stderr");
    }
    handle
}

fn subscriber(level: &str, output: Output) -> (impl tracing::Subscriber + Send + Sync, LogHandle) {
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let subscriber = Registry::default()
        .with(filter)
        .with(dependency_cap())
        .with(output);
    (subscriber, LogHandle { filter: handle })
}

/// A limit no level setting lifts: at `debug` and `trace`, the websocket, HTTP and TLS
/// crates log whole frames (envelope payloads: message text, user data) and the request
/// line of the websocket handshake (the single-use connection URL). Only flowcoach's own
/// events go below `info`.
fn dependency_cap() -> Targets {
    Targets::new()
        .with_target(env!("CARGO_CRATE_NAME"), LevelFilter::TRACE)
        .with_default(LevelFilter::INFO)
}

/// Colour only for a person watching (not in a file, a pipe or a log collector), and
/// not when `NO_COLOR` asks for none.
fn stderr_colours() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn stderr_output<W>(format: LogFormat, colours: bool, writer: W) -> Output
where
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(writer)
        .with_ansi(colours)
        .with_target(false);
    match format {
        LogFormat::Json => layer.json().flatten_event(true).boxed(),
        LogFormat::Text => layer.boxed(),
    }
}

/// Whether stderr is the stream systemd connected to the journal: `JOURNAL_STREAM` is set
/// and names stderr's device and inode. A child inherits the variable with a redirected
/// stderr, so the variable alone proves nothing.
fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stat) = nix::sys::stat::fstat(std::io::stderr()) else {
        return false;
    };
    value
        .to_str()
        .is_some_and(|value| journal_stream_matches(value, (stat.st_dev, stat.st_ino)))
}

/// Whether `JOURNAL_STREAM`'s `value` (`<dev>:<ino>`, decimal) names `(dev, ino)`.
fn journal_stream_matches(value: &str, (dev, ino): (u64, u64)) -> bool {
    value.split_once(':').is_some_and(|(d, i)| {
        d.parse::<u64>().is_ok_and(|d| d == dev) && i.parse::<u64>().is_ok_and(|i| i == ino)
    })
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn journal_stream_must_name_stderr() {
        assert!(journal_stream_matches("64769:123456", (64769, 123456)));
        assert!(!journal_stream_matches("64769:123457", (64769, 123456)));
        assert!(!journal_stream_matches("64768:123456", (64769, 123456)));
        for malformed in [
            "",
            "64769",
            "64769:",
            ":123456",
            "a:b",
            "64769:123456:1",
            " 64769:123456",
        ] {
            assert!(
                !journal_stream_matches(malformed, (64769, 123456)),
                "{malformed:?}"
            );
        }
    }

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Capture {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    #[test]
    fn the_level_can_be_changed_at_run_time() {
        let capture = Capture::default();
        let writer = capture.clone();
        let output = stderr_output(LogFormat::Json, false, move || writer.clone());
        let (subscriber, handle) = subscriber("info", output);
        tracing::subscriber::with_default(subscriber, || {
            tracing::debug!("hidden at info");
            tracing::info!(answer = 42, "shown at info");
            handle.set_level("debug").unwrap();
            tracing::debug!("shown at debug");
            let error = handle.set_level("flowcoach=loud").unwrap_err();
            assert!(error.contains("invalid log level"), "{error}");
            tracing::debug!("still at debug");
            handle.set_level("warn").unwrap();
            tracing::info!("hidden at warn");
        });
        let text = capture.text();
        let messages: Vec<String> = text
            .lines()
            .map(|line| {
                let value: serde_json::Value = serde_json::from_str(line).unwrap();
                value["message"].as_str().unwrap().to_owned()
            })
            .collect();
        assert_eq!(
            messages,
            ["shown at info", "shown at debug", "still at debug"],
            "{text}"
        );
        assert!(text.contains(r#""answer":42"#), "{text}");
    }

    #[test]
    fn dependencies_stay_at_info_whatever_the_level() {
        let capture = Capture::default();
        let writer = capture.clone();
        let output = stderr_output(LogFormat::Json, false, move || writer.clone());
        let (subscriber, _handle) = subscriber("trace", output);
        tracing::subscriber::with_default(subscriber, || {
            tracing::trace!(target: "tungstenite::protocol", "frame payload");
            tracing::debug!(target: "hyper_util::client", "connection details");
            tracing::info!(target: "rustls::client", "shown at info");
            tracing::trace!("our own trace");
        });
        let text = capture.text();
        assert!(!text.contains("frame payload"), "{text}");
        assert!(!text.contains("connection details"), "{text}");
        assert!(text.contains("shown at info"), "{text}");
        assert!(text.contains("our own trace"), "{text}");
    }
}
