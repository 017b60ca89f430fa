//! `relay serve` configuration: a TOML file for everything the flags set, plus the limits.
//! Flags override the file; the file overrides the defaults. Every field has a default that
//! works, so an empty file (or none) is a valid configuration.
//!
//! ```toml
//! listen = "0.0.0.0:7835"
//! db = "/var/lib/relay/relay.db"
//! # database = "postgres://relay@db.example/relay"   # accounts shared by several relays
//! metrics = "127.0.0.1:9835"
//!
//! [limits]
//! handshake_timeout = "10s"
//! max_connections_per_account = 256
//! ```

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use relay_proto::NodeAddress;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::cli::ServerAddr;

/// The relay's fixed, documented TCP port (TLS).
pub const DEFAULT_PORT: u16 = 7835;

/// The default listen address: every interface, [`DEFAULT_PORT`].
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), DEFAULT_PORT);

/// The default account store path (relative to the working directory).
pub const DEFAULT_DB: &str = "relay.db";

/// Everything `relay serve` needs besides the account store's contents.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServeConfig {
    /// TLS listen address.
    pub listen: SocketAddr,
    /// In a cluster, the address terminals reach this relay at (its `relay.nodes` row,
    /// which other nodes' redirects name); none: `listen`, which then must not be an
    /// every-interface address (0.0.0.0, [::]), as no terminal can be sent there.
    pub advertise: Option<ServerAddr>,
    /// Account store path (SQLite). With `database`, only where the generated certificate
    /// and channel keys go (beside it): no SQLite file is made.
    pub db: PathBuf,
    /// Accounts in PostgreSQL instead (`postgres://user:password@host/dbname`): relays that
    /// name the same database share accounts, access rules and the token key.
    pub database: Option<String>,
    /// PEM certificate chain; with `key`. Neither: a generated self-signed certificate.
    pub cert: Option<PathBuf>,
    /// PEM private key; with `cert`.
    pub key: Option<PathBuf>,
    /// Where to serve Prometheus `/metrics` and `/healthz`; none by default.
    pub metrics: Option<SocketAddr>,
    /// The dashboard's token: needed (`?token=…`) when `metrics` is not a loopback address;
    /// without it the dashboard answers only on loopback.
    pub admin_token: Option<String>,
    /// An extra plain-TCP listener for devices without TLS. Passwords cross it in clear, so
    /// it is never on by default and is logged loudly when set.
    pub allow_plain: Option<SocketAddr>,
    /// Move DATA payload between two plain-TCP connections with `splice(2)` (Linux):
    /// socket to pipe to socket, never through user space. TLS connections always copy.
    /// Off by default: measured on loopback with iperf3 it was slower than the one copy
    /// through user space (see docs/relay-host-config.md), so the copy is the default.
    pub splice: bool,
    /// Threads that run the relay's connections, each a tokio current-thread runtime that
    /// connections are dealt to in turn; none: one per core. 1 runs everything on the main
    /// thread (see `crate::workers` for why, and the measurement).
    pub worker_threads: Option<usize>,
    /// Published ports (`[[published]]` tables): a port of the relay mapped to a device's
    /// service for plain TCP clients from the listed networks. None by default.
    pub published: Vec<crate::published::Published>,
    /// Resource limits.
    pub limits: Limits,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN,
            advertise: None,
            db: PathBuf::from(DEFAULT_DB),
            database: None,
            cert: None,
            key: None,
            metrics: None,
            admin_token: None,
            allow_plain: None,
            splice: false,
            worker_threads: None,
            published: Vec::new(),
            limits: Limits::default(),
        }
    }
}

/// Bounds on everything a client can make the relay hold. Durations are written like
/// `"10s"`, `"1m 30s"`, `"250ms"` in the file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest frame payload accepted, in bytes (the protocol's length field is 16 bits).
    pub max_frame_payload: u16,
    /// Open connections (idle or in a session) per account. Each session takes one
    /// connection on each side, so this bounds an account's sessions plus its spares.
    pub max_connections_per_account: u16,
    /// Concurrent sessions per account.
    pub max_sessions_per_account: u16,
    /// Open connections in all.
    pub max_total_connections: u32,
    /// A connection that has not logged in by then is closed (no slowloris).
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// How often an idle connection sends a keep-alive.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    /// An idle connection silent for this long is closed.
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// A demand the target has not answered by then fails.
    #[serde(with = "humantime_serde")]
    pub demand_timeout: Duration,
    /// Failed logins of one account (all sources) before its back-off starts (SECURITY.md).
    pub login_failures_per_account_per_minute: u32,
    /// Failed logins from one source network (all accounts) before its back-off starts.
    pub login_failures_per_source_per_minute: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frame_payload: 65_535,
            max_connections_per_account: 256,
            max_sessions_per_account: 128,
            max_total_connections: 200_000,
            handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(90),
            demand_timeout: Duration::from_secs(10),
            login_failures_per_account_per_minute: 10,
            login_failures_per_source_per_minute: 30,
        }
    }
}

/// The configuration is unreadable or inconsistent.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config file {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this configuration.
    #[error("config file {}: {message}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's explanation (with line and column).
        message: String,
    },
    /// The values contradict each other or are out of range.
    #[error("config: {0}")]
    Invalid(String),
}

impl ServeConfig {
    /// The address the other nodes of a cluster give terminals for this one (its
    /// `relay.nodes` row, redirects, `relay_node_info`).
    pub fn advertised(&self) -> String {
        match &self.advertise {
            Some(a) => a.to_string(),
            None => self.listen.to_string(),
        }
    }

    /// Reads and validates a TOML file. Relative `db`, `cert` and `key` paths in it are
    /// taken relative to the file's directory (so the file means the same whatever the
    /// current directory); the default `db` stays relative to the current directory.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::from_toml(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        let dir = path.parent().unwrap_or(Path::new(""));
        let beside = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        if text
            .parse::<toml::Table>()
            .is_ok_and(|t| t.contains_key("db"))
        {
            beside(&mut config.db);
        }
        config
            .cert
            .iter_mut()
            .chain(config.key.iter_mut())
            .for_each(beside);
        Ok(config)
    }

    /// Parses and validates TOML text.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: e.message().to_owned() + &location(text, e.span()),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the values against each other. Run again after flags override the file.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(m.to_owned()));
        if self.cert.is_some() != self.key.is_some() {
            return invalid("cert and key go together: set both or neither");
        }
        if let Some(url) = &self.database {
            check_database_url(url)?;
        }
        if self.allow_plain == Some(self.listen) {
            return invalid("allow_plain must be a different address from listen");
        }
        if self.worker_threads == Some(0) {
            return invalid("worker_threads must be at least 1");
        }
        for (i, p) in self.published.iter().enumerate() {
            if p.allow.is_empty() {
                return Err(ConfigError::Invalid(format!(
                    "published port {}: allow must list the source networks (CIDRs) that may connect",
                    p.listen
                )));
            }
            let taken = [Some(self.listen), self.allow_plain, self.metrics]
                .into_iter()
                .flatten()
                .chain(self.published[..i].iter().map(|q| q.listen));
            if taken.into_iter().any(|a| a == p.listen) {
                return Err(ConfigError::Invalid(format!(
                    "published port {}: the address is already used by another listener",
                    p.listen
                )));
            }
        }
        let l = &self.limits;
        for (name, value) in [
            ("max_frame_payload", u32::from(l.max_frame_payload)),
            (
                "max_connections_per_account",
                u32::from(l.max_connections_per_account),
            ),
            (
                "max_sessions_per_account",
                u32::from(l.max_sessions_per_account),
            ),
            ("max_total_connections", l.max_total_connections),
            (
                "login_failures_per_account_per_minute",
                l.login_failures_per_account_per_minute,
            ),
            (
                "login_failures_per_source_per_minute",
                l.login_failures_per_source_per_minute,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid(format!(
                    "limits.{name} must be at least 1"
                )));
            }
        }
        for (name, value) in [
            ("handshake_timeout", l.handshake_timeout),
            ("keepalive_interval", l.keepalive_interval),
            ("keepalive_timeout", l.keepalive_timeout),
            ("demand_timeout", l.demand_timeout),
        ] {
            if value.is_zero() {
                return Err(ConfigError::Invalid(format!(
                    "limits.{name} must be longer than zero"
                )));
            }
        }
        if l.keepalive_timeout <= l.keepalive_interval {
            return invalid("limits.keepalive_timeout must be longer than keepalive_interval");
        }
        if l.max_sessions_per_account > l.max_connections_per_account {
            return invalid(
                "limits.max_sessions_per_account cannot exceed max_connections_per_account \
                 (each session uses one connection)",
            );
        }
        Ok(())
    }
}

impl ServeConfig {
    /// A cluster node's [`Self::advertised`] address must be one a terminal can be sent
    /// to (a redirect carries it, docs/CLUSTER.md part 5): not an every-interface address,
    /// and short enough for the redirect frame. Checked when `relay serve` joins a
    /// cluster, not by [`Self::validate`]: `relay user --config` of the same file only
    /// needs its `database`.
    pub fn check_advertised(&self) -> Result<(), ConfigError> {
        let unspecified = match &self.advertise {
            Some(a) => a.host.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified()),
            None => self.listen.ip().is_unspecified(),
        };
        if unspecified {
            return Err(ConfigError::Invalid(format!(
                "a relay with a database tells the other relays where terminals reach it, and \
                 {} is every interface, not an address to reach: set advertise = \"HOST:PORT\" \
                 (or --advertise HOST:PORT) to this relay's public name or address",
                self.advertised()
            )));
        }
        NodeAddress::new(&self.advertised()).map_err(|e| {
            ConfigError::Invalid(format!(
                "advertise {}: not usable in a redirect ({e}; at most 64 bytes)",
                self.advertised()
            ))
        })?;
        Ok(())
    }
}

/// `url` must name a PostgreSQL database; the message never repeats it (it may hold a
/// password).
pub fn check_database_url(url: &str) -> Result<(), ConfigError> {
    if !crate::store::postgres::is_url(url) {
        return Err(ConfigError::Invalid(
            "database must be a postgres:// or postgresql:// URL".into(),
        ));
    }
    url.parse::<tokio_postgres::Config>()
        .map(drop)
        .map_err(|e| ConfigError::Invalid(format!("database URL: {e}")))
}

/// " at line L, column C" for a parser error span, so the message points at the mistake.
fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let before = &text[..span.start.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    format!(" (line {line}, column {column})")
}

#[cfg(test)]
mod tests {
    use super::*;

    const DB: &str = "database = \"postgres://relay@db.example/relay\"\n";

    /// `text` parsed, and whether a cluster node may start with it.
    fn advertised(text: &str) -> Result<String, ConfigError> {
        let c = ServeConfig::from_toml(&format!("{DB}{text}"))?;
        c.check_advertised()?;
        Ok(c.advertised())
    }

    /// A cluster node must advertise an address terminals can be sent to: accepted
    /// before with every-interface listeners (the others then redirected to 0.0.0.0).
    #[test]
    fn a_cluster_node_listening_everywhere_must_advertise() {
        for listen in ["", "listen = \"[::]:7835\"\n"] {
            let err = advertised(listen).unwrap_err();
            assert!(err.to_string().contains("advertise"), "{err}");
        }
        let everywhere = advertised("advertise = \"0.0.0.0:7835\"\n");
        assert!(everywhere.is_err(), "advertising every interface");
        let a = advertised("advertise = \"relay.example\"\n").unwrap();
        assert_eq!(a, "relay.example:7835", "the default port");
        let a = advertised("listen = \"10.0.0.5:443\"\n").unwrap();
        assert_eq!(a, "10.0.0.5:443", "the listen address by default");
        let long = format!("advertise = \"{}.example:1\"\n", "a".repeat(60));
        assert!(advertised(&long).is_err(), "too long for a redirect");
        // A single relay advertises nothing: every interface is fine.
        ServeConfig::default().validate().unwrap();
    }

    #[test]
    fn empty_file_gives_the_defaults() {
        let c = ServeConfig::from_toml("").unwrap();
        assert_eq!(c, ServeConfig::default());
        assert_eq!(c.listen.to_string(), "0.0.0.0:7835");
        assert_eq!(c.db, PathBuf::from("relay.db"));
        assert_eq!(c.limits.max_frame_payload, 65_535);
        assert_eq!(c.limits.handshake_timeout, Duration::from_secs(10));
        c.validate().unwrap();
    }

    #[test]
    fn full_file() {
        let c = ServeConfig::from_toml(
            r#"
            listen = "[::]:7000"
            db = "/var/lib/relay/relay.db"
            cert = "/etc/relay/cert.pem"
            key = "/etc/relay/key.pem"
            metrics = "127.0.0.1:9835"
            allow_plain = "0.0.0.0:7836"
            splice = true
            worker_threads = 1

            [limits]
            max_frame_payload = 16384
            max_connections_per_account = 4
            max_sessions_per_account = 2
            max_total_connections = 1000
            handshake_timeout = "5s"
            keepalive_interval = "15s"
            keepalive_timeout = "1m"
            demand_timeout = "2500ms"
            login_failures_per_account_per_minute = 3
            login_failures_per_source_per_minute = 6
            "#,
        )
        .unwrap();
        assert_eq!(c.listen.port(), 7000);
        assert_eq!(c.metrics, Some("127.0.0.1:9835".parse().unwrap()));
        assert_eq!(c.allow_plain, Some("0.0.0.0:7836".parse().unwrap()));
        assert!(c.splice);
        assert!(!ServeConfig::default().splice);
        assert_eq!(c.worker_threads, Some(1));
        assert_eq!(ServeConfig::default().worker_threads, None);
        assert_eq!(c.limits.keepalive_timeout, Duration::from_secs(60));
        assert_eq!(c.limits.demand_timeout, Duration::from_millis(2500));
        assert_eq!(c.limits.max_sessions_per_account, 2);
    }

    #[test]
    fn mistakes_are_reported_with_their_place() {
        let err = ServeConfig::from_toml("listen = \"0.0.0.0:7835\"\nlisten_addr = 1\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("listen_addr") && err.contains("line 2"),
            "{err}"
        );
        let err = ServeConfig::from_toml("[limits]\nhandshake_timeout = \"ten\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn inconsistent_values_are_refused() {
        for (text, needle) in [
            ("cert = \"c.pem\"", "cert and key"),
            (
                "[limits]\nmax_total_connections = 0",
                "max_total_connections",
            ),
            ("[limits]\nhandshake_timeout = \"0s\"", "handshake_timeout"),
            ("[limits]\nkeepalive_timeout = \"30s\"", "keepalive_timeout"),
            (
                "[limits]\nmax_sessions_per_account = 300",
                "max_sessions_per_account",
            ),
            ("allow_plain = \"0.0.0.0:7835\"", "allow_plain"),
            ("worker_threads = 0", "worker_threads must be at least 1"),
            (
                "[limits]\nmax_frame_payload = 65536",
                "expected u16 (line 2",
            ),
        ] {
            let err = ServeConfig::from_toml(text).unwrap_err().to_string();
            assert!(err.contains(needle), "{text}: {err}");
        }
    }

    #[test]
    fn database_is_a_postgres_url_never_echoed() {
        let c =
            ServeConfig::from_toml("database = \"postgres://relay:pw@db:5433/relay\"\n").unwrap();
        assert_eq!(
            c.database.as_deref(),
            Some("postgres://relay:pw@db:5433/relay")
        );
        for bad in [
            "relay.db",
            "mysql://u:s3cret@h/d",
            "postgres://u:s3cret@h:notaport/d",
        ] {
            let err = ServeConfig::from_toml(&format!("database = \"{bad}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("database") && !err.contains("s3cret"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        let err = ServeConfig::load(&path).unwrap_err().to_string();
        assert!(err.contains("relay.toml"), "{err}");
        std::fs::write(&path, "listen = 5").unwrap();
        let err = ServeConfig::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("relay.toml") && err.contains("line 1"),
            "{err}"
        );
    }

    /// Finding 6 of issue 14: a relative `db` in the file followed the current directory.
    #[test]
    fn relative_paths_in_a_file_are_beside_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.toml");
        std::fs::write(
            &path,
            "db = \"state/r.db\"\ncert = \"c.pem\"\nkey = \"/k.pem\"\n",
        )
        .unwrap();
        let c = ServeConfig::load(&path).unwrap();
        assert_eq!(c.db, dir.path().join("state/r.db"));
        assert_eq!(c.cert, Some(dir.path().join("c.pem")));
        assert_eq!(c.key, Some(PathBuf::from("/k.pem")));
        std::fs::write(&path, "").unwrap();
        assert_eq!(
            ServeConfig::load(&path).unwrap().db,
            PathBuf::from("relay.db")
        );
    }

    /// The published-port example of docs/relay-host-config.md is what it says.
    #[test]
    fn the_documented_published_ports_parse() {
        let doc = include_str!("../../docs/relay-host-config.md");
        let section = &doc[doc.find("## Published ports").expect("the section")..];
        let start = section.find("```toml\n").expect("a toml block") + "```toml\n".len();
        let end = start + section[start..].find("```").expect("its end");
        let c = ServeConfig::from_toml(&section[start..end]).unwrap();
        let [web, db] = &c.published[..] else {
            panic!("{:?}", c.published)
        };
        assert_eq!(web.listen.to_string(), "0.0.0.0:8080");
        assert_eq!((web.target.as_str(), web.service.as_str()), ("cam", "web"));
        assert!(web.admits("192.0.2.77".parse().unwrap()));
        assert!(web.admits("203.0.113.7".parse().unwrap()));
        assert!(!web.admits("203.0.113.8".parse().unwrap()));
        assert!(db.admits("127.0.0.1".parse().unwrap()));
        assert!(!db.admits("::1".parse().unwrap()));
    }

    #[test]
    fn a_published_port_needs_an_allow_list_and_an_address_of_its_own() {
        let port = |listen: &str, allow: &str| {
            format!("[[published]]\nlisten = \"{listen}\"\ntarget = \"cam\"\nallow = [{allow}]\n")
        };
        let missing = ServeConfig::from_toml(&port("127.0.0.1:80", "")).unwrap_err();
        assert!(missing.to_string().contains("allow must list"), "{missing}");
        let twice = port("127.0.0.1:80", "\"::1\"").repeat(2);
        let clash = ServeConfig::from_toml(&twice).unwrap_err();
        assert!(clash.to_string().contains("already used"), "{clash}");
        let on_listen = port("0.0.0.0:7835", "\"::1\"");
        assert!(ServeConfig::from_toml(&on_listen).is_err());
        assert!(ServeConfig::from_toml(&port("127.0.0.1:80", "\"10.0.0.0/40\"")).is_err());
        let bad_target =
            "[[published]]\nlisten = \"127.0.0.1:80\"\ntarget = \"a/b\"\nallow = [\"::1\"]\n";
        assert!(ServeConfig::from_toml(bad_target).is_err());
    }

    #[test]
    fn documented_defaults_are_the_real_ones() {
        let doc = include_str!("../../docs/relay-host-config.md");
        let start = doc.find("```toml\n").expect("a toml block") + "```toml\n".len();
        let end = start + doc[start..].find("```").expect("its end");
        let documented = ServeConfig::from_toml(&doc[start..end]).unwrap();
        assert_eq!(documented, ServeConfig::default());
    }
}
