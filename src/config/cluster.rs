//! `[cluster]`: several hosts serving one app together on a shared PostgreSQL. With it,
//! the inbox and its deduplication keys live in the database named by `store`, shared by
//! every member of the cluster `name`; without it, each host keeps its own SQLite inbox.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use super::ranges::{self, CountIn, DurationIn, HOUR, secs};
use super::token_source::{self, SecretKind};
use super::{ConfigError, EnvSource, env, invalid};

/// The credential name for `LoadCredential=postgres-password:…`.
pub const PASSWORD_CREDENTIAL: &str = "postgres-password";

/// The places the store's password may come from, like the app token's.
pub const PASSWORD: SecretKind = SecretKind {
    what: "PostgreSQL password",
    credential: PASSWORD_CREDENTIAL,
    file_field: "cluster.password_file",
    variable: env::PGPASSWORD,
};

/// Slack's limit of open sockets per app: every member's sockets count, and a handover
/// briefly doubles one member's.
pub const SOCKETS_PER_APP: u64 = 10;

/// `[cluster]` as written. `store` is the one required key.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSettings {
    /// A libpq connection string: `postgres://user@host:5432/db`, or with a unix-socket
    /// directory, `postgres:///db?host=/run/postgresql`. No password: that comes from
    /// the credential, `password_file` or `PGPASSWORD`.
    pub store: String,
    /// The cluster's name: members with the same name share one inbox. Several clusters
    /// (say one per environment) may share a database.
    #[serde(default = "default_name")]
    pub name: String,
    /// This host's name among the members; default: the host name. Claims of a member
    /// are released when it starts again under the same name.
    #[serde(default)]
    pub member: Option<String>,
    /// Members at most.
    #[serde(default = "default_max_members")]
    pub max_members: u64,
    /// How long a member's claim on an envelope lasts: a member that dies holding one,
    /// its envelope goes to another member after this. Longer than a delivery takes.
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub lease: Duration,
    /// How often a member says it is alive (and renews its claims); default: a third of
    /// the lease, so two missed heartbeats still keep it a member.
    #[serde(default, with = "humantime_serde")]
    pub heartbeat: Option<Duration>,
    /// A file holding the password (mode 0600), when no credential gives it.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

fn default_name() -> String {
    "default".to_owned()
}

fn default_max_members() -> u64 {
    3
}

fn default_lease() -> Duration {
    secs(60)
}

/// The store's password: `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct StorePassword(String);

impl StorePassword {
    /// The password for the connection, and nothing else.
    pub fn expose_secret(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for StorePassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StorePassword(…)")
    }
}

/// `[cluster]` validated, with the password if one was found.
#[derive(Debug, Clone)]
pub struct Cluster {
    /// The connection settings, password included (never shown).
    pub store: postgres::Config,
    /// Where the store is, for logs and status: no password.
    pub store_description: String,
    pub name: String,
    pub member: String,
    pub max_members: u64,
    pub lease: Duration,
    pub heartbeat: Duration,
    /// Where the password came from, if one was (never the password).
    pub password_source: Option<token_source::TokenSource>,
}

impl ClusterSettings {
    /// Checks every field, then looks for the password (none is fine: a unix socket with
    /// peer authentication needs none).
    pub fn validate(&self, env: &dyn EnvSource) -> Result<Cluster, ConfigError> {
        let mut store = postgres::Config::from_str(&self.store).map_err(|e| {
            invalid(
                "cluster.store",
                format!("not a PostgreSQL connection string: {e}"),
            )
        })?;
        if store.get_password().is_some() {
            return Err(invalid(
                "cluster.store",
                format!(
                    "holds a password: give it as the credential {PASSWORD_CREDENTIAL}, in cluster.password_file or in {} instead",
                    env::PGPASSWORD
                ),
            ));
        }
        if store.get_ssl_mode() == postgres::config::SslMode::Require {
            return Err(invalid(
                "cluster.store",
                "sslmode=require: TLS to PostgreSQL is not supported yet; use a unix socket or a loopback/private address with sslmode=disable",
            ));
        }
        if store.get_hosts().is_empty() {
            return Err(invalid(
                "cluster.store",
                "names no host: give one (postgres://host/db) or a unix-socket directory (postgres:///db?host=/run/postgresql)",
            ));
        }
        check_name("cluster.name", &self.name)?;
        let member = match &self.member {
            Some(member) => member.clone(),
            None => nix::unistd::gethostname()
                .map_err(|e| invalid("cluster.member", format!("no host name to default to: {e}")))?
                .to_string_lossy()
                .into_owned(),
        };
        check_name("cluster.member", &member)?;
        ranges::counts(&[CountIn {
            field: "cluster.max_members",
            value: self.max_members,
            min: 1,
            max: SOCKETS_PER_APP,
            why: "Slack allows an app 10 sockets, and each member holds at least one",
        }])?;
        ranges::durations(&[DurationIn {
            field: "cluster.lease",
            value: self.lease,
            min: secs(1),
            max: HOUR,
            why: "",
        }])?;
        let heartbeat = self.heartbeat.unwrap_or(self.lease / 3);
        ranges::durations(&[DurationIn {
            field: "cluster.heartbeat",
            value: heartbeat,
            min: Duration::from_millis(100),
            max: self.lease / 2,
            why: "at most half the lease: a member that misses one heartbeat is still a member",
        }])?;
        let store_description = describe(&store);
        let password_source = match token_source::read_secret(
            env,
            self.password_file.as_deref(),
            &PASSWORD,
            |raw, _| Ok(StorePassword(raw.trim_end_matches(['\r', '\n']).to_owned())),
        ) {
            Ok((password, source)) => {
                store.password(password.expose_secret());
                Some(source)
            }
            Err(ConfigError::MissingSecret { .. }) => None,
            Err(error) => return Err(error),
        };
        // Without it, libpq's default would be the user's own name as database and role.
        if store.get_dbname().is_none() {
            return Err(invalid(
                "cluster.store",
                "names no database: postgres://host/DATABASE",
            ));
        }
        Ok(Cluster {
            store,
            store_description,
            name: self.name.clone(),
            member,
            max_members: self.max_members,
            lease: self.lease,
            heartbeat,
            password_source,
        })
    }
}

fn check_name(field: &'static str, name: &str) -> Result<(), ConfigError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("{name:?} must be 1 to 63 letters, digits, '-', '_' or '.'"),
        ))
    }
}

/// `postgres://user@host:port/db`, a unix-socket directory as `?host=`: never the
/// password.
fn describe(store: &postgres::Config) -> String {
    use postgres::config::Host;
    let port = |i: usize| {
        let ports = store.get_ports();
        ports
            .get(i)
            .or(ports.first())
            .map(|p| format!(":{p}"))
            .unwrap_or_default()
    };
    let (mut tcp, mut unix) = (Vec::new(), Vec::new());
    for (i, host) in store.get_hosts().iter().enumerate() {
        match host {
            Host::Tcp(name) => tcp.push(format!("{name}{}", port(i))),
            Host::Unix(dir) => unix.push(dir.display().to_string()),
        }
    }
    let user = store
        .get_user()
        .map(|u| format!("{u}@"))
        .unwrap_or_default();
    let db = store.get_dbname().unwrap_or_default();
    let mut described = format!("postgres://{user}{}/{db}", tcp.join(","));
    if !unix.is_empty() {
        described.push_str(&format!("?host={}", unix.join(",")));
    }
    described
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(store: &str) -> ClusterSettings {
        ClusterSettings {
            store: store.to_owned(),
            name: default_name(),
            member: Some("host-a".to_owned()),
            max_members: default_max_members(),
            lease: default_lease(),
            heartbeat: None,
            password_file: None,
        }
    }

    #[test]
    fn url_forms_and_the_password_from_the_environment_never_shown() {
        let env = [(env::PGPASSWORD, "s3cret-pw")];
        let cluster = settings("postgres://flow@db.example:5433/flowcoach?sslmode=disable")
            .validate(&env)
            .unwrap();
        assert_eq!(
            cluster.store_description,
            "postgres://flow@db.example:5433/flowcoach"
        );
        assert_eq!(cluster.store.get_password(), Some(&b"s3cret-pw"[..]));
        assert!(!format!("{cluster:?}").contains("s3cret"));
        let unix = settings("postgres:///flowcoach?host=/run/postgresql")
            .validate(&[])
            .unwrap();
        assert_eq!(
            unix.store_description,
            "postgres:///flowcoach?host=/run/postgresql"
        );
        assert_eq!(unix.password_source, None);
    }

    #[test]
    fn refusals_name_the_field() {
        let error = |store: &str| settings(store).validate(&[]).unwrap_err().to_string();
        assert!(error("postgres://u:pw@h/db").starts_with("cluster.store: holds a password"));
        assert!(error("postgres://h/db?sslmode=require").contains("TLS"));
        assert!(error("postgres://h").contains("no database"));
        let mut many = settings("postgres://h/db");
        many.max_members = 11;
        assert!(
            many.validate(&[])
                .unwrap_err()
                .to_string()
                .starts_with("cluster.max_members: 11 is out of range")
        );
        let mut slow = settings("postgres://h/db");
        slow.heartbeat = Some(secs(40));
        assert!(
            slow.validate(&[])
                .unwrap_err()
                .to_string()
                .starts_with("cluster.heartbeat: 40s is out of range: must be from 100ms to 30s")
        );
        slow.heartbeat = None;
        assert_eq!(slow.validate(&[]).unwrap().heartbeat, secs(20));
    }
}
