//! `relay serve` on SIGHUP: reads its configuration again (the flags it was started with
//! still override the file), swaps the certificate new connections get, tells the server
//! the new limits, and logs every key that changed and whether it applies now.
//!
//! Running sessions are not touched: a TLS connection keeps the certificate it was
//! accepted with, and nothing is closed. What only a restart can change (listeners, the
//! account store, the protocol core's deadlines and bounds) is logged as such.

use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use rustls::ServerConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::ServeConfig;
use crate::tls::ServerIdentity;

/// Keys whose new value takes effect at once; every other change waits for a restart.
const LIVE: [&str; 5] = [
    "cert",
    "key",
    "published",
    "limits.login_failures_per_account_per_minute",
    "limits.login_failures_per_source_per_minute",
];

/// Keys whose values are secrets: a change is logged, the values never are (a database
/// URL may hold a password).
const SECRET: [&str; 2] = ["admin_token", "database"];

/// How to read the configuration again: the file, then the original flags on top.
pub type Resolve = Box<dyn Fn() -> anyhow::Result<ServeConfig> + Send + Sync>;

/// The relay's certificate as `config` names it: given, or generated beside the store.
pub fn identity(config: &ServeConfig) -> anyhow::Result<ServerIdentity> {
    let identity = match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => ServerIdentity::load(cert, key)?,
        _ => ServerIdentity::load_or_generate(&config.db)?.0,
    };
    // rustls checks that the key belongs to the certificate.
    identity.server_config()?;
    Ok(identity)
}

/// The certificate handed to each new TLS handshake; replaced on reload.
#[derive(Debug)]
struct CertSwitch(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CertSwitch {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|e| e.into_inner()).clone())
    }
}

fn certified(identity: &ServerIdentity) -> anyhow::Result<Arc<CertifiedKey>> {
    let provider = rustls::crypto::ring::default_provider();
    let key = CertifiedKey::from_der(identity.certs.clone(), identity.key.clone_key(), &provider)
        .context("TLS certificate and key")?;
    Ok(Arc::new(key))
}

/// The running configuration and what SIGHUP needs to replace it.
pub struct Reloader {
    resolve: Resolve,
    current: ServeConfig,
    fingerprint: String,
    cert: Arc<CertSwitch>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("current", &self.current)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

impl Reloader {
    /// For a relay started with `config` and `identity`; `resolve` reads the config again.
    pub fn new(
        config: ServeConfig,
        identity: &ServerIdentity,
        resolve: Resolve,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            resolve,
            current: config,
            fingerprint: identity.fingerprint().to_string(),
            cert: Arc::new(CertSwitch(RwLock::new(certified(identity)?))),
        })
    }

    /// The TLS server configuration whose certificate follows reloads.
    pub fn tls_config(&self) -> anyhow::Result<Arc<ServerConfig>> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(self.cert.clone());
        Ok(Arc::new(config))
    }

    /// Calls `apply(old, new)` after each SIGHUP that read a valid configuration; a bad one
    /// is logged and changes nothing. Runs until the process ends.
    pub async fn run(mut self, apply: impl Fn(&ServeConfig, &ServeConfig)) {
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => return tracing::warn!("cannot watch for SIGHUP: {e}"),
        };
        while hup.recv().await.is_some() {
            match self.reload() {
                Ok(new) => {
                    apply(&self.current, &new);
                    self.current = new;
                }
                Err(e) => tracing::error!("SIGHUP: config not reloaded, nothing changed: {e:#}"),
            }
        }
    }

    /// Reads the configuration, swaps the certificate, logs the changes.
    fn reload(&mut self) -> anyhow::Result<ServeConfig> {
        let new = (self.resolve)()?;
        let identity = identity(&new)?;
        let mut changes = changes(&self.current, &new)?;
        let fingerprint = identity.fingerprint().to_string();
        if fingerprint != self.fingerprint {
            changes.push(format!(
                "cert fingerprint: {} -> {fingerprint} (now)",
                self.fingerprint
            ));
            *self.cert.0.write().unwrap_or_else(|e| e.into_inner()) = certified(&identity)?;
            self.fingerprint = fingerprint;
        }
        match changes.is_empty() {
            true => tracing::info!("SIGHUP: reloaded the config: nothing changed"),
            false => tracing::info!("SIGHUP: reloaded the config: {}", changes.join("; ")),
        }
        Ok(new)
    }
}

/// `key: old -> new (now | at the next start)` for every key whose value differs.
fn changes(old: &ServeConfig, new: &ServeConfig) -> anyhow::Result<Vec<String>> {
    let flat = |c: &ServeConfig| -> anyhow::Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        flatten("", &toml::Value::try_from(c)?, &mut out);
        Ok(out)
    };
    let (before, after) = (flat(old)?, flat(new)?);
    let value_of = |list: &[(String, String)], key: &str| {
        list.iter()
            .find(|(k, _)| k == key)
            .map_or_else(|| "none".to_owned(), |(_, v)| v.clone())
    };
    let mut keys: Vec<&String> = before.iter().chain(&after).map(|(k, _)| k).collect();
    keys.sort();
    keys.dedup();
    Ok(keys
        .into_iter()
        .filter_map(|key| {
            let (was, is) = (value_of(&before, key), value_of(&after, key));
            let when = match LIVE.contains(&key.as_str()) {
                true => "now",
                false => "at the next start",
            };
            match SECRET.contains(&key.as_str()) {
                true => (was != is).then(|| format!("{key}: changed, not shown ({when})")),
                false => (was != is).then(|| format!("{key}: {was} -> {is} ({when})")),
            }
        })
        .collect())
}

fn flatten(prefix: &str, value: &toml::Value, out: &mut Vec<(String, String)>) {
    match value {
        toml::Value::Table(table) => {
            for (k, v) in table {
                let key = match prefix {
                    "" => k.clone(),
                    p => format!("{p}.{k}"),
                };
                flatten(&key, v, out);
            }
        }
        leaf => out.push((prefix.to_owned(), leaf.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_name_each_key_and_when_it_applies() {
        let old = ServeConfig::default();
        let new = ServeConfig::from_toml(
            "metrics = \"127.0.0.1:9835\"\n[limits]\nlogin_failures_per_source_per_minute = 7\n",
        )
        .unwrap();
        assert_eq!(
            changes(&old, &new).unwrap(),
            [
                "limits.login_failures_per_source_per_minute: 30 -> 7 (now)",
                "metrics: none -> \"127.0.0.1:9835\" (at the next start)",
            ]
        );
        assert!(changes(&old, &old).unwrap().is_empty());
    }

    #[test]
    fn the_admin_token_is_never_logged() {
        let old = ServeConfig::from_toml("admin_token = \"old-s3cret\"\n").unwrap();
        let new = ServeConfig::from_toml("admin_token = \"new-s3cret\"\n").unwrap();
        assert_eq!(
            changes(&old, &new).unwrap(),
            ["admin_token: changed, not shown (at the next start)"]
        );
    }
}
