//! relay-host: the relay server and the Linux terminal around relay-proto's state machines.
//!
//! This crate does I/O, timers, TLS, storage, configuration, CLI, logs and metrics; every
//! protocol decision lives in relay-proto.
//!
//! - [`store`]: accounts, passwords (argon2id), access rules, the server secret (SQLite, or
//!   PostgreSQL for relays that share one database).
//! - [`token`]: resumption credentials (HMAC-SHA256 with the server secret).
//! - [`auth`]: the login check (throttle, password, token) that answers the core.
//! - [`channel`]: the device channel (Noise NK, pinned relay key) on the TLS port.
//! - [`tls`]: server identity (given or generated), client trust (roots, CA file, pin).
//! - [`config`]: `relay serve` configuration (TOML) and limits.
//! - [`listen`]: accepting connections (TLS, cap, deadline), signals, store watching.
//! - [`throttle`]: failed-login back-off per (account, source), network and account.
//! - [`metrics`]: Prometheus metrics and their HTTP endpoint; [`admin`]: the dashboard.
//! - [`reload`]: `relay serve` on SIGHUP (config, certificate, limits).
//! - [`server`]: `relay serve`, the protocol core on sockets; [`fifo`]: its per-connection
//!   FIFOs; `splice`: payload socket to socket on Linux.
//! - [`presence`]: where each user ID of a cluster is logged in, for redirects.
//! - [`client`]: the Linux terminal (`expose`, `connect`, `online`).
//! - [`cli`]: the `relay` command line; [`relays`]: the terminal's config file.

pub mod admin;
pub mod auth;
pub mod channel;
pub mod cli;
pub mod client;
pub mod config;
pub mod fifo;
mod hashing;
pub mod listen;
pub mod metrics;
pub mod plain;
pub mod presence;
pub mod published;
pub mod relays;
pub mod reload;
mod retired;
pub mod server;
#[cfg(target_os = "linux")]
pub mod splice;
pub mod store;
pub mod throttle;
pub mod tls;
pub mod token;
pub mod workers;

/// A real PostgreSQL for the store's tests, shared with the end-to-end tests.
#[cfg(test)]
#[path = "../../tests/postgres_support.rs"]
mod test_postgres;
