//! The real Prometheus server (Debian's `prometheus` package) and `promtool`, as child
//! processes: a server with a temporary configuration and storage scraping flowcoach on
//! loopback, and PromQL queries over its HTTP API.

use std::net::SocketAddr;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, Command};

use crate::WAIT;

/// Set to `1` (as CI does), a test needing Prometheus fails when it is not installed
/// ([`crate::gate`]).
pub const MANDATORY_VARIABLE: &str = "FLOWCOACH_PROMETHEUS";

/// How often the server scrapes: the shortest interval Prometheus takes in its stride.
const SCRAPE_INTERVAL: &str = "1s";
/// How often a query is asked again while waiting for a scrape to show something.
const QUERY_EVERY: Duration = Duration::from_millis(250);

/// The line Prometheus logs once its HTTP API answers.
const READY_LINE: &str = "Server is ready to receive web requests.";

/// Why Prometheus cannot run here, if it cannot: `prometheus` and `promtool` must both
/// answer `--version`.
pub fn missing() -> Option<String> {
    for program in ["prometheus", "promtool"] {
        let ran = std::process::Command::new(program)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        match ran {
            Ok(status) if status.success() => {}
            Ok(status) => return Some(format!("`{program} --version` failed ({status})")),
            Err(e) => {
                return Some(format!(
                    "{program} cannot be run ({e}); install it with `apt-get install prometheus`"
                ));
            }
        }
    }
    None
}

/// Whether `test` should run: see [`crate::gate::runnable`].
pub fn runnable(test: &str) -> bool {
    crate::gate::runnable(test, missing(), MANDATORY_VARIABLE)
}

/// `promtool ARGS`, with `stdin` on its standard input; its output, whatever the status.
pub async fn promtool(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn promtool");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.as_bytes()).await.unwrap();
    drop(input);
    tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("promtool finished in time")
        .expect("promtool ran")
}

/// `GET http://TARGET/metrics` with `accept`, as a scraper asks: the content type and the
/// body of a 200 answer.
pub async fn scrape(target: SocketAddr, accept: Option<&str>) -> (String, String) {
    let mut request = reqwest::Client::new().get(format!("http://{target}/metrics"));
    if let Some(accept) = accept {
        request = request.header("Accept", accept);
    }
    let response = tokio::time::timeout(WAIT, request.send())
        .await
        .expect("the endpoint answers in time")
        .expect("the endpoint answers");
    assert_eq!(response.status(), 200, "{target}/metrics");
    let content_type = response.headers()["content-type"]
        .to_str()
        .unwrap()
        .to_owned();
    (content_type, response.text().await.unwrap())
}

/// Scrapes `target` until the exposition satisfies `done`, at most [`WAIT`]: a counter is
/// bumped just after the write it counts, which its peer may see first.
pub async fn scrape_until(target: SocketAddr, done: impl Fn(&str) -> bool) -> String {
    let mut last = String::new();
    let waited = tokio::time::timeout(WAIT, async {
        let mut every = tokio::time::interval(QUERY_EVERY);
        loop {
            every.tick().await;
            last = scrape(target, None).await.1;
            if done(&last) {
                return;
            }
        }
    })
    .await;
    assert!(
        waited.is_ok(),
        "{target}/metrics never satisfied the wait:\n{last}"
    );
    last
}

/// The value of `series` (its name and labels, exactly as exposed) in `exposition`.
pub fn value(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?.strip_prefix(' ')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

/// The series in `exposition`: its lines that are not comments.
pub fn series_count(exposition: &str) -> usize {
    exposition
        .lines()
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .count()
}

/// One sample of a PromQL answer: its labels and value.
#[derive(Debug, Clone)]
pub struct Sample {
    pub labels: Value,
    pub value: f64,
}

/// A running Prometheus server scraping one target.
pub struct Prometheus {
    child: Child,
    url: String,
    client: reqwest::Client,
    log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus on a free loopback port, scraping `target`'s `/metrics` every
    /// second into temporary storage, and waits until its API answers.
    pub async fn start(target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: {SCRAPE_INTERVAL}\n  evaluation_interval: {SCRAPE_INTERVAL}\n\
                 scrape_configs:\n  - job_name: flowcoach\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let mut child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn prometheus");
        let (log, mut ready) =
            crate::process::watch_stderr(child.stderr.take().unwrap(), READY_LINE);
        let became_ready = tokio::time::timeout(WAIT, ready.wait_for(|ready| *ready)).await;
        assert!(
            matches!(became_ready, Ok(Ok(_))),
            "Prometheus did not become ready:\n{}",
            log.lock().unwrap()
        );
        Prometheus {
            child,
            url: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
            log,
            _dir: dir,
        }
    }

    /// What Prometheus logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Answers an instant PromQL query.
    pub async fn query(&self, promql: &str) -> Vec<Sample> {
        let answer: Value = self
            .client
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", promql)])
            .send()
            .await
            .expect("Prometheus answers")
            .json()
            .await
            .expect("a JSON answer");
        assert_eq!(answer["status"], "success", "{promql}: {answer}");
        answer["data"]["result"]
            .as_array()
            .expect("a vector")
            .iter()
            .map(|sample| Sample {
                labels: sample["metric"].clone(),
                value: sample["value"][1]
                    .as_str()
                    .and_then(|v| v.parse().ok())
                    .expect("a number"),
            })
            .collect()
    }

    /// Asks `promql` until its answer satisfies `done`, at most [`WAIT`]: the answer
    /// changes only when a scrape lands, which nothing announces.
    pub async fn wait_for(&self, promql: &str, done: impl Fn(&[Sample]) -> bool) -> Vec<Sample> {
        let mut last = Vec::new();
        let waited = tokio::time::timeout(WAIT, async {
            let mut every = tokio::time::interval(QUERY_EVERY);
            loop {
                every.tick().await;
                last = self.query(promql).await;
                if done(&last) {
                    return;
                }
            }
        })
        .await;
        assert!(
            waited.is_ok(),
            "{promql}: last answer {last:?}\nPrometheus log:\n{}",
            self.log()
        );
        last
    }

    pub async fn stop(&mut self) {
        let _ = self.child.kill().await;
    }
}

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}
