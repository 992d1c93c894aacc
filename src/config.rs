//! Configuration: one TOML file (optional) plus environment overrides, validated up front so
//! a bad setting stops the service with a message naming the field (exit 78).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::control::access::{AccessError, AccessPolicy};
use crate::signing_secret::SigningSecretError;
use crate::token::{AppToken, TokenError};
use ranges::{CountIn, DurationIn, HOUR, MINUTE, ms, secs};

/// Environment variables the service and flowcoachctl read, all in this one place. Later
/// packaging and outside checks rely on these names.
pub mod env {
    pub const APP_TOKEN: &str = "SLACK_APP_TOKEN";
    /// Set by flowcoach for a successor it starts: the number of an inherited pipe that
    /// holds what `SLACK_APP_TOKEN` and `SLACK_SIGNING_SECRET` held, so that neither is
    /// ever in its environment.
    pub const APP_TOKEN_FD: &str = "FLOWCOACH_APP_TOKEN_FD";
    /// The app's signing secret, for `[forward]`; taken out of the environment like
    /// `SLACK_APP_TOKEN`, and passed to a successor through the same pipe.
    pub const SIGNING_SECRET: &str = "SLACK_SIGNING_SECRET";
    pub const API_URL: &str = "FLOWCOACH_SLACK_API_URL";
    pub const CONFIG: &str = "FLOWCOACH_CONFIG";
    pub const LOG: &str = "FLOWCOACH_LOG";
    pub const LOG_FORMAT: &str = "FLOWCOACH_LOG_FORMAT";

    // Those that choose the runtime directory (`service::paths::runtime_dirs`), in order
    // of precedence.
    /// Set by systemd for a unit with `RuntimeDirectory=`; several directories are
    /// separated by ':'.
    pub const SYSTEMD_RUNTIME_DIRECTORY: &str = "RUNTIME_DIRECTORY";
    /// An operator's explicit choice.
    pub const RUNTIME_DIR: &str = "FLOWCOACH_RUNTIME_DIR";
    /// The per-user runtime directory of a login session.
    pub const XDG_RUNTIME_DIR: &str = "XDG_RUNTIME_DIR";

    /// The control socket's path, for flowcoachctl
    /// ([`crate::control::discover::find_socket`]).
    pub const CONTROL_SOCKET: &str = "FLOWCOACH_CONTROL_SOCKET";
    /// The environment to run (`--env` wins over it).
    pub const ENVIRONMENT: &str = "FLOWCOACH_ENV";
    /// Set by systemd for a unit with `LoadCredential=`.
    pub const CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";

    // Those that choose the inbox's directory (`InboxSettings::file`), in order.
    /// Set by systemd for a unit with `StateDirectory=`; several are separated by ':'.
    pub const STATE_DIRECTORY: &str = "STATE_DIRECTORY";
    pub const XDG_STATE_HOME: &str = "XDG_STATE_HOME";
    pub const HOME: &str = "HOME";

    /// The password of `[cluster]`'s PostgreSQL, libpq's variable; taken out of the
    /// environment like `SLACK_APP_TOKEN`.
    pub const PGPASSWORD: &str = "PGPASSWORD";
}

mod cluster;
mod environments;
mod forward;
mod inbox;
mod ranges;
mod token_source;
pub mod token_variable;

pub use cluster::{Cluster, ClusterSettings, PASSWORD_CREDENTIAL, SOCKETS_PER_APP};
pub use environments::{AppMismatch, AppPin, EnvironmentSettings, Whose};
pub use forward::{Forward, ForwardSettings, describe_urls};
pub use inbox::{InboxSettings, NoStateDirectory, default_file_name as inbox_file_name};
pub use token_source::{CREDENTIAL_NAME, SIGNING_SECRET_CREDENTIAL, SecretKind, TokenSource};

pub const DEFAULT_API_URL: &str = "https://slack.com/api";

/// The settings file, as written by an operator. Every section and field is optional.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    /// The environment to run when neither `--env` nor `FLOWCOACH_ENV` says: shown in
    /// status answers and logs, and part of the lock's and the control socket's names.
    pub environment: String,
    /// Per-environment app pinning and token files, `[environments.NAME]`.
    pub environments: BTreeMap<String, EnvironmentSettings>,
    pub conflicts: ConflictSettings,
    pub slack: SlackSettings,
    pub connection: ConnectionSettings,
    pub dispatch: DispatchSettings,
    pub service: ServiceSettings,
    pub control: ControlSettings,
    pub handover: HandoverSettings,
    pub log: LogSettings,
    pub metrics: MetricsSettings,
    /// `[forward]`: the app behind flowcoach, in HTTP mode. Without it, the built-in bot
    /// answers.
    pub forward: Option<ForwardSettings>,
    pub inbox: InboxSettings,
    /// `[cluster]`: several hosts on a shared PostgreSQL. Without it, one host.
    pub cluster: Option<ClusterSettings>,
}

/// What to do when Slack counts sockets of other clients for this app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtherClientsPolicy {
    /// Say so (log, STATUS=, status, health degraded) and keep serving.
    Warn,
    /// Say so and stop with exit 75: this app must have one client.
    Exit,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConflictSettings {
    pub other_clients: OtherClientsPolicy,
    /// After this many `too_many_websockets` in a row, health is unhealthy with a
    /// diagnosis pointing at other clients of the app.
    pub too_many_websockets_unhealthy_after: u32,
    /// Slack keeps counting a socket for a while after it is gone: our own sockets closed
    /// this recently are not taken for other clients.
    #[serde(with = "humantime_serde")]
    pub own_socket_grace: Duration,
}

impl Default for ConflictSettings {
    fn default() -> Self {
        ConflictSettings {
            other_clients: OtherClientsPolicy::Warn,
            too_many_websockets_unhealthy_after: 3,
            own_socket_grace: Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HandoverSettings {
    /// Break before make: the incumbent closes its connection before the successor opens
    /// one; envelopes sent meanwhile wait for Slack's redelivery. Default: overlap, where
    /// the successor says hello first and no moment is without a connection.
    pub strict: bool,
    /// How long a successor may take to start and connect before the handover is rolled
    /// back.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for HandoverSettings {
    fn default() -> Self {
        HandoverSettings {
            strict: false,
            timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceSettings {
    /// While reconnecting, the service counts as degraded, not unhealthy, for this long:
    /// the systemd watchdog keeps being fed, so a Slack outage does not turn into a
    /// restart loop. Beyond it, health is unhealthy and the watchdog is no longer fed.
    #[serde(with = "humantime_serde")]
    pub outage_budget: Duration,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ControlSettings {
    /// Members of this group may use the control socket, besides root and the daemon's
    /// own user. Empty: nobody else.
    pub group: String,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        ServiceSettings {
            outage_budget: Duration::from_secs(300),
        }
    }
}

/// `[metrics]`: the Prometheus endpoint, off unless `listen` is set or systemd passes a
/// socket named `metrics`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsSettings {
    /// Where `/metrics` listens, e.g. `127.0.0.1:9464`.
    pub listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlackSettings {
    /// Web API base; `http://` is accepted for loopback addresses only (the simulator).
    pub api_url: String,
    /// Append `debug_reconnects=true` to the websocket URL: Slack then refreshes the
    /// connection after about 360 s instead of hours, which exercises rotation.
    pub debug_reconnects: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionSettings {
    /// A client ping is sent when nothing has arrived for this long.
    #[serde(with = "humantime_serde")]
    pub ping_interval: Duration,
    /// The connection is declared dead when nothing (pong or any frame) arrives within this
    /// time after a ping: half-open connections are found within ping_interval + pong_timeout.
    #[serde(with = "humantime_serde")]
    pub pong_timeout: Duration,
    /// How long a new socket may take to send `hello`.
    #[serde(with = "humantime_serde")]
    pub hello_timeout: Duration,
    /// After sending Close, how long to wait for Slack's reply before dropping the socket.
    #[serde(with = "humantime_serde")]
    pub close_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// A connection that stays up this long resets the backoff: a server that sends `hello`
    /// and then drops us at once cannot drive a tight reconnect loop.
    #[serde(with = "humantime_serde")]
    pub stable_after: Duration,
    /// Lower bound for the wait after `too_many_websockets`: reconnecting at once only adds
    /// to the app's socket count.
    #[serde(with = "humantime_serde")]
    pub too_many_websockets_backoff: Duration,
    /// Inbound messages larger than this end the connection (a resync is not possible).
    pub max_message_bytes: usize,
    /// Sockets kept open at once: with more than one, losing a socket costs nothing while
    /// it is replaced, since the others keep taking envelopes. Read at start.
    pub sockets: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchSettings {
    /// Handlers running at once.
    pub max_concurrent_handlers: usize,
    /// Accepted envelopes waiting for a handler slot. Beyond this, envelopes are left
    /// unacked so that Slack redelivers them instead of us losing them.
    pub max_queued_handlers: usize,
    /// How long a handler may take to answer in the ack (slash commands, interactions)
    /// before we ack without a payload; Slack's deadline is 3 s.
    #[serde(with = "humantime_serde")]
    pub response_deadline: Duration,
    /// How long an event id is remembered to drop redeliveries (Slack retries for minutes).
    #[serde(with = "humantime_serde")]
    pub dedup_ttl: Duration,
    /// Upper bound on remembered event ids, so memory stays bounded under any load.
    pub dedup_capacity: usize,
    /// On shutdown, how long in-flight handlers get to finish and ack.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// A `tracing` filter, e.g. `info` or `flowcoach=debug`.
    pub level: String,
    pub format: LogFormat,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            environment: "default".to_owned(),
            environments: BTreeMap::new(),
            conflicts: ConflictSettings::default(),
            slack: SlackSettings::default(),
            connection: ConnectionSettings::default(),
            dispatch: DispatchSettings::default(),
            service: ServiceSettings::default(),
            control: ControlSettings::default(),
            handover: HandoverSettings::default(),
            log: LogSettings::default(),
            metrics: MetricsSettings::default(),
            forward: None,
            inbox: InboxSettings::default(),
            cluster: None,
        }
    }
}

impl Default for SlackSettings {
    fn default() -> Self {
        SlackSettings {
            api_url: DEFAULT_API_URL.to_owned(),
            debug_reconnects: false,
        }
    }
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        ConnectionSettings {
            ping_interval: Duration::from_secs(5),
            pong_timeout: Duration::from_secs(5),
            hello_timeout: Duration::from_secs(10),
            close_timeout: Duration::from_secs(1),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            stable_after: Duration::from_secs(30),
            too_many_websockets_backoff: Duration::from_secs(10),
            max_message_bytes: 4 << 20,
            sockets: 1,
        }
    }
}

impl Default for DispatchSettings {
    fn default() -> Self {
        DispatchSettings {
            max_concurrent_handlers: 64,
            max_queued_handlers: 4096,
            response_deadline: Duration::from_millis(2500),
            dedup_ttl: Duration::from_secs(15 * 60),
            // Slack's Events API sends at most 30 000 events an hour per workspace and app,
            // 7 500 per 15 minutes: room for more than two workspaces at full rate, in
            // about 0.5 MiB. Apps in many workspaces raise it.
            dedup_capacity: 20_000,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

impl Default for LogSettings {
    fn default() -> Self {
        LogSettings {
            level: "info".to_owned(),
            format: LogFormat::Text,
        }
    }
}

/// Everything the daemon needs: validated settings plus the token.
#[derive(Debug, Clone)]
pub struct Config {
    pub settings: Settings,
    pub api_url: Url,
    pub token: AppToken,
    /// Where the token came from, for status output (never the token itself).
    pub token_source: TokenSource,
    /// The app the environment is pinned to, if the file pins one.
    pub pinned_app: Option<String>,
    /// The settings file, if one was read.
    pub path: Option<PathBuf>,
    /// Who may use the control socket: `control.group` resolved at load, so that
    /// `check-config` refuses an unknown group as `run` does.
    pub access: AccessPolicy,
    /// `[forward]` validated, with the app's signing secret.
    pub forward: Option<Forward>,
    /// `[cluster]` validated, with the store's password.
    pub cluster: Option<Cluster>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    #[error("{}", missing_secret(kind, tried))]
    MissingSecret {
        kind: &'static SecretKind,
        tried: String,
    },
    #[error("{source_name}: {error}")]
    BadToken {
        source_name: String,
        #[source]
        error: TokenError,
    },
    #[error("{source_name}: {error}")]
    BadSigningSecret {
        source_name: String,
        #[source]
        error: SigningSecretError,
    },
    #[error(
        "{} file {path} ({}) is readable by group or others (mode {mode:o}): chmod 600 it, and keep it owned by the service's user",
        kind.what, kind.file_field
    )]
    SecretFileTooOpen {
        kind: &'static SecretKind,
        path: PathBuf,
        mode: u32,
    },
    #[error("{} file {path}: {reason}", kind.what)]
    SecretFile {
        kind: &'static SecretKind,
        path: PathBuf,
        reason: String,
    },
    /// The token belongs to another app than the environment is pinned to.
    #[error(transparent)]
    AppMismatch(#[from] AppMismatch),
    #[error("control.group: {0}")]
    ControlGroup(#[source] AccessError),
}

fn missing_secret(kind: &SecretKind, tried: &str) -> String {
    if kind.variable == env::APP_TOKEN {
        format!(
            "no Slack app token (tried {tried}): set {} to the app-level token (xapp-…), or give the environment a token_file",
            env::APP_TOKEN
        )
    } else {
        format!(
            "forward: no signing secret (tried {tried}): [forward] needs the app's signing secret, from the credential {}, the environment's {} or {}",
            kind.credential, kind.file_field, kind.variable
        )
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// Where to read variables from: the process environment in production, a map in tests.
pub trait EnvSource {
    fn var(&self, name: &str) -> Option<String>;
}

/// The real process environment.
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        // Once taken out of the environment, secrets are read from where they were put.
        if let Some(taken) = token_variable::taken(name) {
            return taken;
        }
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl<const N: usize> EnvSource for [(&str, &str); N] {
    fn var(&self, name: &str) -> Option<String> {
        self.iter()
            .find(|(key, _)| *key == name)
            .map(|(_, value)| (*value).to_owned())
    }
}

impl Settings {
    /// Reads and parses a settings file; unknown keys are errors (a typo must not be
    /// silently ignored).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string().trim_end().replace('\n', " "),
        })
    }

    fn apply_env(&mut self, env: &dyn EnvSource) {
        if let Some(url) = env.var(env::API_URL) {
            self.slack.api_url = url;
        }
        if let Some(level) = env.var(env::LOG) {
            self.log.level = level;
        }
        if let Some(format) = env.var(env::LOG_FORMAT) {
            self.log.format = match format.as_str() {
                "json" => LogFormat::Json,
                _ => LogFormat::Text,
            };
        }
    }

    /// Checks every field; the error names the first bad one.
    pub fn validate(&self) -> Result<Url, ConfigError> {
        let env_ok = !self.environment.is_empty()
            && self
                .environment
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !env_ok {
            return Err(invalid(
                "environment",
                format!(
                    "{:?} must be a non-empty name of letters, digits, '-' or '_'",
                    self.environment
                ),
            ));
        }
        let api_url = validate_api_url(&self.slack.api_url)?;
        self.connection.validate()?;
        self.dispatch.validate()?;
        self.conflicts.validate()?;
        self.service.validate()?;
        self.handover.validate()?;
        self.inbox.validate()?;
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log.level) {
            return Err(invalid("log.level", e.to_string()));
        }
        Ok(api_url)
    }
}

/// `https://` anywhere; plain `http://` only on loopback, where the simulator runs.
pub fn validate_api_url(raw: &str) -> Result<Url, ConfigError> {
    let field = "slack.api_url";
    let url = Url::parse(raw).map_err(|e| invalid(field, format!("{raw:?} is not a URL: {e}")))?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        "http" => Err(invalid(
            field,
            format!("{raw:?} uses plain http, which is accepted for loopback addresses only"),
        )),
        other => Err(invalid(
            field,
            format!("{raw:?} has scheme {other:?}; expected https"),
        )),
    }
}

/// True for `127.0.0.0/8`, `::1` and `localhost`.
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name == "localhost",
        None => false,
    }
}

/// The most sockets `connection.sockets` may ask for: twice that (rotation overlap) plus as
/// many again for a successor during a handover stays within Slack's 10 per app.
pub const MAX_SOCKETS: usize = 3;

impl ConnectionSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        ranges::durations(&[
            DurationIn {
                field: "connection.ping_interval",
                value: self.ping_interval,
                min: ms(100),
                max: 10 * MINUTE,
                why: "",
            },
            DurationIn {
                field: "connection.pong_timeout",
                value: self.pong_timeout,
                min: ms(100),
                max: 10 * MINUTE,
                why: "",
            },
            DurationIn {
                field: "connection.hello_timeout",
                value: self.hello_timeout,
                min: ms(100),
                max: 10 * MINUTE,
                why: "",
            },
            DurationIn {
                field: "connection.close_timeout",
                value: self.close_timeout,
                min: ms(1),
                max: secs(10),
                why: "Slack does not close TCP after the close handshake",
            },
            DurationIn {
                field: "connection.backoff_initial",
                value: self.backoff_initial,
                min: ms(10),
                max: 10 * MINUTE,
                why: "",
            },
            DurationIn {
                field: "connection.backoff_max",
                value: self.backoff_max,
                min: self.backoff_initial,
                max: HOUR,
                why: "not below connection.backoff_initial",
            },
            DurationIn {
                field: "connection.stable_after",
                value: self.stable_after,
                min: secs(1),
                max: HOUR,
                why: "a connection up this long resets the backoff",
            },
            DurationIn {
                field: "connection.too_many_websockets_backoff",
                value: self.too_many_websockets_backoff,
                min: ms(100),
                max: HOUR,
                why: "",
            },
        ])?;
        ranges::counts(&[
            CountIn {
                field: "connection.max_message_bytes",
                value: ranges::count(self.max_message_bytes),
                min: 64 * 1024,
                max: 64 << 20,
                why: "Slack's interactive payloads can be large",
            },
            CountIn {
                field: "connection.sockets",
                value: ranges::count(self.sockets),
                min: 1,
                max: ranges::count(MAX_SOCKETS),
                why: "each socket overlaps with its replacement during a rotation, and a handover doubles them for a moment, all within Slack's limit of 10 sockets per app",
            },
        ])
    }
}

impl DispatchSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        ranges::durations(&[
            DurationIn {
                field: "dispatch.response_deadline",
                value: self.response_deadline,
                min: ms(1),
                max: ms(2999),
                why: "below 3s, Slack's ack deadline",
            },
            DurationIn {
                field: "dispatch.dedup_ttl",
                value: self.dedup_ttl,
                min: 10 * MINUTE,
                max: 24 * HOUR,
                why: "Slack redelivers events for minutes",
            },
            DurationIn {
                field: "dispatch.drain_timeout",
                value: self.drain_timeout,
                min: Duration::ZERO,
                max: 10 * MINUTE,
                why: "",
            },
        ])?;
        ranges::counts(&[
            CountIn {
                field: "dispatch.max_concurrent_handlers",
                value: ranges::count(self.max_concurrent_handlers),
                min: 1,
                max: 10_000,
                why: "",
            },
            CountIn {
                field: "dispatch.max_queued_handlers",
                value: ranges::count(self.max_queued_handlers),
                min: 0,
                max: 1_000_000,
                why: "",
            },
            CountIn {
                field: "dispatch.dedup_capacity",
                value: ranges::count(self.dedup_capacity),
                min: 1000,
                max: 5_000_000,
                why: "about 20 bytes an entry",
            },
        ])
    }
}

impl ConflictSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        ranges::durations(&[DurationIn {
            field: "conflicts.own_socket_grace",
            value: self.own_socket_grace,
            min: Duration::ZERO,
            max: HOUR,
            why: "",
        }])?;
        ranges::counts(&[CountIn {
            field: "conflicts.too_many_websockets_unhealthy_after",
            value: ranges::count(self.too_many_websockets_unhealthy_after),
            min: 1,
            max: 1000,
            why: "refusals in a row",
        }])
    }
}

impl ServiceSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        ranges::durations(&[DurationIn {
            field: "service.outage_budget",
            value: self.outage_budget,
            min: secs(1),
            max: 7 * 24 * HOUR,
            why: "",
        }])
    }
}

impl HandoverSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        ranges::durations(&[DurationIn {
            field: "handover.timeout",
            value: self.timeout,
            min: secs(1),
            max: HOUR,
            why: "",
        }])
    }
}

impl Config {
    /// Loads the file named by `path` (else `$FLOWCOACH_CONFIG`, else none: defaults),
    /// selects the environment (`requested`, else `$FLOWCOACH_ENV`, else the file's),
    /// applies environment overrides, validates, finds the token and checks it against
    /// the environment's pinned app.
    pub fn load(
        path: Option<&Path>,
        requested: Option<&str>,
        env: &dyn EnvSource,
    ) -> Result<Config, ConfigError> {
        let path = path
            .map(Path::to_path_buf)
            .or_else(|| env.var(env::CONFIG).map(PathBuf::from));
        let mut settings = match &path {
            Some(path) => Settings::from_file(path)?,
            None => Settings::default(),
        };
        settings.apply_env(env);
        settings.environment = environments::select(
            requested,
            env.var(env::ENVIRONMENT),
            &settings.environment,
            &settings.environments,
        )?;
        let api_url = settings.validate()?;
        environments::validate(&settings.environments)?;
        let access =
            AccessPolicy::new(&settings.control.group).map_err(ConfigError::ControlGroup)?;
        let chosen = settings
            .environments
            .get(&settings.environment)
            .cloned()
            .unwrap_or_default();
        let (token, token_source) = token_source::read_token(env, chosen.token_file.as_deref())?;
        let forward = match &settings.forward {
            Some(forward) => Some(forward.validate(|| {
                token_source::read_signing_secret(env, chosen.signing_secret_file.as_deref())
            })?),
            None => None,
        };
        let cluster = match &settings.cluster {
            Some(_) if !settings.inbox.enabled => {
                return Err(invalid(
                    "inbox.enabled",
                    "is false, but [cluster] keeps the members' inbox in its shared store: remove one of them",
                ));
            }
            Some(cluster) => Some(cluster.validate(env)?),
            None => None,
        };
        if let Some(hint) = token.app_id_hint() {
            AppPin::new(
                &settings.environment,
                chosen.app_id.as_deref(),
                &settings.environments,
            )
            .check(hint, Whose::Token)?;
        }
        Ok(Config {
            settings,
            api_url,
            token,
            token_source,
            pinned_app: chosen.app_id,
            path,
            access,
            forward,
            cluster,
        })
    }

    /// The app this instance must talk to: the pinned one, else the token's hint.
    pub fn app_pin(&self) -> AppPin {
        let expected = self
            .pinned_app
            .as_deref()
            .or_else(|| self.token.app_id_hint());
        AppPin::new(
            &self.settings.environment,
            expected,
            &self.settings.environments,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const TOKEN: &str = "xapp-1-A0TEST-1-abcdef";

    fn write_config(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        file.write_all(text.as_bytes()).unwrap();
        file
    }

    #[test]
    fn defaults_need_only_a_token() {
        let config = Config::load(None, None, &[(env::APP_TOKEN, TOKEN)]).unwrap();
        assert_eq!(config.api_url.as_str(), "https://slack.com/api");
        assert_eq!(config.settings.environment, "default");
        assert_eq!(config.token.expose_secret(), TOKEN);
    }

    #[test]
    fn file_then_environment() {
        let file = write_config(
            "environment = \"prod\"\n[slack]\napi_url = \"https://example.test/api\"\n\
             [connection]\nping_interval = \"3s\"\n",
        );
        let config = Config::load(
            Some(file.path()),
            None,
            &[
                (env::APP_TOKEN, TOKEN),
                (env::API_URL, "http://127.0.0.1:9/api"),
            ],
        )
        .unwrap();
        assert_eq!(config.settings.environment, "prod");
        assert_eq!(config.api_url.as_str(), "http://127.0.0.1:9/api");
        assert_eq!(config.settings.connection.ping_interval.as_secs(), 3);
    }

    #[test]
    fn config_path_from_the_environment() {
        let file = write_config("environment = \"staging\"\n");
        let path = file.path().to_str().unwrap();
        let config =
            Config::load(None, None, &[(env::APP_TOKEN, TOKEN), (env::CONFIG, path)]).unwrap();
        assert_eq!(config.settings.environment, "staging");
    }

    fn error_for(file_text: &str) -> String {
        let file = write_config(file_text);
        Config::load(Some(file.path()), None, &[(env::APP_TOKEN, TOKEN)])
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn errors_name_the_field() {
        assert!(error_for("[connection]\nping_intervall = \"3s\"\n").contains("ping_intervall"));
        assert!(error_for("[connection]\nping_interval = \"soon\"\n").contains("ping_interval"));
        assert!(
            error_for("[slack]\napi_url = \"http://slack.com/api\"\n").contains("slack.api_url")
        );
        assert!(
            error_for("[dispatch]\nresponse_deadline = \"3s\"\n")
                .contains("dispatch.response_deadline")
        );
        assert!(error_for("[dispatch]\ndedup_ttl = \"1m\"\n").contains("dispatch.dedup_ttl"));
        assert!(error_for("environment = \"a b\"\n").contains("environment"));
        assert!(error_for("[log]\nlevel = \"=(\"\n").contains("log.level"));
        assert!(error_for("[connection]\nbackoff_max = \"1ms\"\n").contains("backoff_max"));
        for sockets in ["0", "4"] {
            let error = error_for(&format!("[connection]\nsockets = {sockets}\n"));
            assert!(
                error.contains("connection.sockets") && error.contains("10 sockets per app"),
                "{error}"
            );
        }
    }

    #[test]
    fn token_problems_are_reported_without_the_token() {
        let missing = Config::load(None, None, &[]).unwrap_err();
        assert!(matches!(missing, ConfigError::MissingSecret { .. }));
        let bot = Config::load(None, None, &[(env::APP_TOKEN, "xoxb-secret-value")]).unwrap_err();
        let text = bot.to_string();
        assert!(text.contains(env::APP_TOKEN) && !text.contains("secret-value"));
    }

    #[test]
    fn unreadable_file_is_reported_with_its_path() {
        let err = Config::load(
            Some(Path::new("/nonexistent/flowcoach.toml")),
            None,
            &[(env::APP_TOKEN, TOKEN)],
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/flowcoach.toml"));
    }
}
