//! The account store in PostgreSQL, for relays that share one database (docs/CLUSTER.md):
//! every node reads the same accounts, access rules and resumption-token key, so a terminal
//! may log in on any node with a token another node issued.
//!
//! The [`AccountStore`] trait is blocking (SQLite's shape, and the CLI has no runtime), so
//! the store owns a small runtime of its own: each call runs its queries there on a pooled
//! connection and waits for the answer. Argon2 never runs on that runtime: `verify_password`
//! fetches the hash and checks it on the caller's thread, as the SQLite store does.
//!
//! Changes reach the other nodes at once: triggers on the accounts and access tables move
//! the generation counter and `NOTIFY relay_accounts` in the same transaction, and
//! [`AccountStore::watch_changes`] keeps one connection that `LISTEN`s and wakes the
//! server's watcher (which still polls the generation every second, in case that
//! connection is down).
//!
//! The schema lives in its own PostgreSQL schema, `relay`, and is versioned: migration N
//! runs once, in one transaction under an advisory lock, so nodes starting together cannot
//! run it twice; a database migrated by a newer relay is refused ([`StoreError::SchemaTooNew`]).
//!
//! A running relay is also a row of `relay.nodes` ([`PgStore::join`]) with a heartbeat
//! every second, and fences itself ([`AccountStore::fencing`]) when it cannot write it
//! (docs/CLUSTER.md, parts 3 and 6). Every presence write notifies the other nodes
//! ([`AccountStore::watch_presence`]), so the newest login of a user ID wins across
//! nodes (part 4).

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use argon2::password_hash::rand_core::{OsRng, RngCore};
use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod};
use tokio::sync::Notify;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::presence::Presence;

use super::{
    AccessRule, AccountInfo, AccountName, AccountStore, ServerSecret, StoreError, VerifyError,
    credential_stamp, hash_password, now_unix, stored_name, verify_stored,
};

/// The schema version this code creates and understands: the number of [`MIGRATIONS`].
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// The channel the triggers notify on a change of accounts or access rules.
const CHANNEL: &str = "relay_accounts";

/// Connections per process: a relay's queries are short (a generation check per login,
/// a hash fetch per password login), so a few serve thousands of logins a second.
const POOL_SIZE: usize = 8;

/// How long a query waits for a pooled connection, and a new connection for the server,
/// before the call fails (a login then fails and is retried by its terminal).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the change listener waits before reconnecting after losing its connection.
const RELISTEN_AFTER: Duration = Duration::from_secs(1);

/// The key of the advisory lock that serialises migrations (any constant; "relay" in ASCII).
const MIGRATION_LOCK: i64 = 0x72_656c_6179;

/// Migration N (1-based) takes the schema from version N-1 to N. Append only: a shipped
/// migration never changes.
const MIGRATIONS: &[&str] = &[
    // 1: accounts, access rules, the token key, each account's current instance, and the
    // generation counter with the triggers that move it and notify the other nodes.
    "
    CREATE TABLE relay.accounts (
        name       text PRIMARY KEY,
        phc        text NOT NULL,                  -- argon2id PHC string
        created    bigint NOT NULL,                -- Unix seconds
        restricted boolean NOT NULL DEFAULT false, -- true: only the targets in access
        credential bigint NOT NULL                 -- stamp that tokens are bound to
    );
    CREATE TABLE relay.access (
        account text NOT NULL REFERENCES relay.accounts (name) ON DELETE CASCADE,
        target  text NOT NULL,
        PRIMARY KEY (account, target)
    );
    CREATE TABLE relay.server_secret (
        id     integer PRIMARY KEY CHECK (id = 1),
        secret bytea NOT NULL CHECK (length(secret) = 32)
    );
    CREATE TABLE relay.instances (
        account  text PRIMARY KEY REFERENCES relay.accounts (name) ON DELETE CASCADE,
        instance bigint                            -- NULL: logged out
    );
    CREATE TABLE relay.generation (
        id    integer PRIMARY KEY CHECK (id = 1),
        value bigint NOT NULL
    );
    INSERT INTO relay.generation (id, value) VALUES (1, 0);
    CREATE FUNCTION relay.accounts_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        UPDATE relay.generation SET value = value + 1 WHERE id = 1;
        PERFORM pg_notify('relay_accounts', '');
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER accounts_changed AFTER INSERT OR UPDATE OR DELETE ON relay.accounts
        FOR EACH STATEMENT EXECUTE FUNCTION relay.accounts_changed();
    CREATE TRIGGER access_changed AFTER INSERT OR UPDATE OR DELETE ON relay.access
        FOR EACH STATEMENT EXECUTE FUNCTION relay.accounts_changed();
    ",
    // 2: the relays serving from this database, each with a heartbeat in the database's
    // clock (docs/CLUSTER.md, part 3).
    "
    CREATE TABLE relay.nodes (
        id          text PRIMARY KEY,              -- random per process start
        address     text NOT NULL,                 -- where terminals reach it
        fingerprint text NOT NULL,                 -- its TLS certificate, SHA-256
        started     timestamptz NOT NULL DEFAULT now(),
        heartbeat   timestamptz NOT NULL DEFAULT now()
    );
    ",
    // 3: presence (docs/CLUSTER.md, part 4). Each account's current instance row already
    // changes exactly at login, logout and replacement, so it also says which node
    // recorded it and when, in an order every node agrees on: one write, not two.
    "
    CREATE SEQUENCE relay.presence_epoch;
    ALTER TABLE relay.instances
        ADD COLUMN node  text,                     -- relay.nodes id; NULL: not a node
        ADD COLUMN epoch bigint NOT NULL DEFAULT 0; -- from relay.presence_epoch
    ",
    // 4: newest wins across nodes (docs/CLUSTER.md, part 4): every presence write tells
    // the nodes, in commit order, 'node instance epoch account' ('-' for no instance).
    "
    CREATE FUNCTION relay.presence_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        PERFORM pg_notify('relay_presence', concat_ws(' ', coalesce(NEW.node, '-'),
            coalesce(NEW.instance::text, '-'), NEW.epoch, NEW.account));
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER presence_changed AFTER INSERT OR UPDATE ON relay.instances
        FOR EACH ROW EXECUTE FUNCTION relay.presence_changed();
    ",
    // 5: a deleted row (its account removed) is announced too, as logged out ('-' for
    // its instance): the nodes' copy of the presence (crate::presence), which redirects
    // demands, forgets it at once. Newest-wins (AccountStore::watch_presence) ignores a
    // row with no instance.
    "
    CREATE OR REPLACE FUNCTION relay.presence_changed() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        IF TG_OP = 'DELETE' THEN
            PERFORM pg_notify('relay_presence', concat_ws(' ', coalesce(OLD.node, '-'), '-',
                OLD.epoch, OLD.account));
        ELSE
            PERFORM pg_notify('relay_presence', concat_ws(' ', coalesce(NEW.node, '-'),
                coalesce(NEW.instance::text, '-'), NEW.epoch, NEW.account));
        END IF;
        RETURN NULL;
    END
    $$;
    CREATE TRIGGER presence_deleted AFTER DELETE ON relay.instances
        FOR EACH ROW EXECUTE FUNCTION relay.presence_changed();
    ",
    // 6: a node that received SIGTERM says so, and the others stop counting it alive
    // (no redirects to it) while it drains (docs/CLUSTER.md, part 7).
    "ALTER TABLE relay.nodes ADD COLUMN draining boolean NOT NULL DEFAULT false;",
];

/// The channel the presence trigger notifies on (migration 4).
pub(crate) const PRESENCE: &str = "relay_presence";

/// How often a node writes its heartbeat. The others count it dead 3 s after its last
/// one (docs/CLUSTER.md, part 3).
pub const HEARTBEAT_EVERY: Duration = Duration::from_secs(1);

/// A node this long after the start of its last heartbeat write that succeeded (its own
/// monotonic clock) fences itself: it closes its terminals and refuses logins until a
/// write succeeds. Less than the others' 3 s death threshold (counted from the same
/// write's `now()`, which is no earlier): the margin lets the closes take effect, so no
/// user ID is reachable on two nodes.
pub const FENCE_AFTER: Duration = Duration::from_secs(2);

/// How often a node compares its last written heartbeat with [`FENCE_AFTER`].
const FENCE_CHECK: Duration = Duration::from_millis(100);

/// Rows of nodes dead for this long are deleted by whichever node notices.
const FORGET_AFTER: Duration = Duration::from_secs(3600);

/// What a node tells the others about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    /// Where terminals reach it (host:port).
    pub address: String,
    /// Its TLS certificate's SHA-256 fingerprint, as terminals pin it.
    pub fingerprint: String,
}

/// This process's row in `relay.nodes`, kept fresh by a heartbeat every
/// [`HEARTBEAT_EVERY`]; deleted when dropped (a clean stop), left to go stale otherwise.
#[derive(Debug)]
pub struct Membership {
    store: Arc<PgStore>,
    id: String,
    heartbeat: tokio::task::JoinHandle<()>,
}

impl Membership {
    /// Marks this node draining (SIGTERM): the others' next read of `relay.nodes`
    /// counts it not alive, so they stop redirecting demands to it while its terminals
    /// move. Its row goes when the membership is dropped.
    pub fn drain(&self) {
        let id = self.id.clone();
        let marked = self.store.run(move |client| async move {
            client
                .execute(
                    "UPDATE relay.nodes SET draining = true WHERE id = $1",
                    &[&id],
                )
                .await?;
            Ok(())
        });
        match marked {
            Ok(()) => tracing::info!(node = %self.id, "marked draining in relay.nodes"),
            Err(e) => tracing::warn!("cannot mark this node draining in relay.nodes: {e}"),
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.heartbeat.abort();
        let id = self.id.clone();
        let left = self.store.run(move |client| async move {
            client
                .execute("DELETE FROM relay.nodes WHERE id = $1", &[&id])
                .await?;
            Ok(())
        });
        if let Err(e) = left {
            tracing::warn!("cannot remove this node from relay.nodes: {e}");
        }
    }
}

/// The PostgreSQL account store. Cheap to share: one per process.
pub struct PgStore {
    /// Where, for messages: the URL without its password.
    target: String,
    config: tokio_postgres::Config,
    pool: Pool,
    /// Runs every query (see the module docs). `None` only while dropping.
    runtime: Option<tokio::runtime::Runtime>,
    /// This process's id in `relay.nodes`, once it [joined](Self::join): recorded with the
    /// instances it starts and ends.
    node: std::sync::OnceLock<String>,
    /// `true` while fenced ([`AccountStore::fencing`]), once it joined.
    fenced: std::sync::OnceLock<tokio::sync::watch::Receiver<bool>>,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // The last handle may go inside the server's runtime, where a blocking shutdown
        // would panic; the pool's connections and the listener just stop.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Whether `text` names a PostgreSQL database (`postgres://…` or `postgresql://…`).
pub fn is_url(text: &str) -> bool {
    text.starts_with("postgres://") || text.starts_with("postgresql://")
}

/// `url` without its password, for logs and error messages.
fn redacted(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(tokio_postgres::config::Host::Tcp(h)) => h.clone(),
        Some(tokio_postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "localhost".to_owned(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let user = config
        .get_user()
        .map(|u| format!("{u}@"))
        .unwrap_or_default();
    let db = config.get_dbname().unwrap_or("");
    format!("postgresql://{user}{host}:{port}/{db}")
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/dbname`, any
    /// libpq parameter in the query string), creating or upgrading the schema and the
    /// server secret if needed.
    pub fn open(url: &str) -> Result<Self, StoreError> {
        let mut config = tokio_postgres::Config::from_str(url)
            .map_err(|e| StoreError::Database(format!("bad database URL: {e}")))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.application_name("relay");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("relay-db")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Database(format!("starting the database runtime: {e}")))?;
        let manager = Manager::from_config(
            config.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .build()
            .map_err(|e| StoreError::Database(format!("connection pool: {e}")))?;
        let store = Self {
            target: redacted(&config),
            config,
            pool,
            runtime: Some(runtime),
            node: std::sync::OnceLock::new(),
            fenced: std::sync::OnceLock::new(),
        };
        // The first connection: a failure here names the database (never its password).
        store.run(migrate).map_err(|e| match e {
            StoreError::Postgres(e) => {
                StoreError::Database(format!("{}: {}", store.target, detail(&e)))
            }
            other => other,
        })?;
        Ok(store)
    }

    /// Runs `work` on a pooled connection in the store's runtime and waits for its result.
    fn run<T, F, Fut>(&self, work: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(Object) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send,
    {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let pool = self.pool.clone();
        let target = self.target.clone();
        self.runtime().spawn(async move {
            let result = match pool.get().await {
                Ok(client) => work(client).await,
                Err(e) => Err(pool_error(&target, e)),
            };
            // The caller waits on `rx` until this send: it cannot be gone.
            let _ = tx.send(result);
        });
        rx.recv()
            .map_err(|_| StoreError::Database("the database runtime stopped".into()))?
    }

    /// Registers this process as a node of the cluster and starts its heartbeat.
    pub fn join(self: &Arc<Self>, node: NodeInfo) -> Result<Membership, StoreError> {
        let mut raw = [0u8; 16];
        OsRng.fill_bytes(&mut raw);
        let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let row = (id.clone(), node.clone());
        // The row's heartbeat (the database's now()) is no earlier than this.
        let written = tokio::time::Instant::now();
        self.run(move |client| async move {
            let (id, node) = row;
            insert_node(&client, &id, &node).await
        })?;
        tracing::info!(node = %id, "joined the cluster (relay.nodes)");
        // Only `relay serve` joins, once: set succeeds.
        let _ = self.node.set(id.clone());
        let (fence, fenced) = tokio::sync::watch::channel(false);
        let _ = self.fenced.set(fenced);
        let heartbeat = self.runtime().spawn(heartbeat(
            self.pool.clone(),
            id.clone(),
            node,
            self.target.clone(),
            (fence, written),
        ));
        Ok(Membership {
            store: self.clone(),
            id,
            heartbeat,
        })
    }

    /// This node's copy of the cluster's presence, kept current from now on (see
    /// [`crate::presence`]); call after [`Self::join`], which names this node.
    pub fn follow_presence(&self) -> Arc<Presence> {
        let me = self.node.get().cloned().unwrap_or_default();
        let presence = Arc::new(Presence::new(me));
        self.runtime().spawn(crate::presence::follow(
            self.config.clone(),
            self.pool.clone(),
            self.target.clone(),
            presence.clone(),
        ));
        presence
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        self.runtime
            .as_ref()
            .expect("the runtime is only taken when dropping")
    }
}

/// `e` with its cause: tokio-postgres's own text is only the kind ("db error").
pub(super) fn detail(e: &tokio_postgres::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// A pool failure as a store error: PostgreSQL's own errors keep their detail.
pub(crate) fn pool_error(target: &str, e: deadpool_postgres::PoolError) -> StoreError {
    match e {
        deadpool_postgres::PoolError::Backend(e) => e.into(),
        other => StoreError::Database(format!("{target}: {other}")),
    }
}

/// Creates or upgrades the schema, and creates the server secret if there is none.
async fn migrate(mut client: Object) -> Result<(), StoreError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE SCHEMA IF NOT EXISTS relay;
         CREATE TABLE IF NOT EXISTS relay.migrations (
             version integer PRIMARY KEY,
             applied timestamptz NOT NULL DEFAULT now()
         );",
    )
    .await?;
    let found: i64 = tx
        .query_one(
            "SELECT coalesce(max(version), 0)::bigint FROM relay.migrations",
            &[],
        )
        .await?
        .get(0);
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            known: SCHEMA_VERSION,
        });
    }
    for (version, sql) in (1..).zip(MIGRATIONS).skip(found as usize) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO relay.migrations (version) VALUES ($1)",
            &[&version],
        )
        .await?;
        tracing::info!(version, "account database migrated");
    }
    let mut secret = [0u8; 32];
    OsRng.fill_bytes(&mut secret);
    tx.execute(
        "INSERT INTO relay.server_secret (id, secret) VALUES (1, $1) ON CONFLICT (id) DO NOTHING",
        &[&&secret[..]],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Reads an access rule inside transaction `client`.
async fn read_rule(
    client: &tokio_postgres::Transaction<'_>,
    name: &str,
    restricted: bool,
) -> Result<AccessRule, StoreError> {
    if !restricted {
        return Ok(AccessRule::anyone());
    }
    let rows = client
        .query(
            "SELECT target FROM relay.access WHERE account = $1 ORDER BY target",
            &[&name],
        )
        .await?;
    let targets = rows
        .into_iter()
        .map(|r| stored_name(r.get(0)))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(AccessRule::only(targets))
}

impl AccountStore for PgStore {
    fn add(&self, name: &AccountName, password: &str) -> Result<(), StoreError> {
        let phc = hash_password(password)?;
        let owned = name.clone();
        let inserted = self.run(move |client| async move {
            let stmt = client
                .prepare_cached(
                    "INSERT INTO relay.accounts (name, phc, created, credential)
                     VALUES ($1, $2, $3, $4)",
                )
                .await?;
            let (created, stamp) = (now_unix() as i64, credential_stamp());
            Ok(client
                .execute(&stmt, &[&owned.as_str(), &phc, &created, &stamp])
                .await)
        })?;
        match inserted {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some(&SqlState::UNIQUE_VIOLATION) => {
                Err(StoreError::AlreadyExists(name.clone()))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn delete(&self, name: &AccountName) -> Result<(), StoreError> {
        let owned = name.as_str().to_owned();
        // Its access rule and current instance go with it (ON DELETE CASCADE).
        let n = self.run(move |client| async move {
            let stmt = client
                .prepare_cached("DELETE FROM relay.accounts WHERE name = $1")
                .await?;
            Ok(client.execute(&stmt, &[&owned]).await?)
        })?;
        match n {
            0 => Err(StoreError::NoSuchAccount(name.clone())),
            _ => Ok(()),
        }
    }

    fn set_password(&self, name: &AccountName, password: &str) -> Result<(), StoreError> {
        let phc = hash_password(password)?;
        let owned = name.as_str().to_owned();
        let n = self.run(move |client| async move {
            let stmt = client
                .prepare_cached(
                    "UPDATE relay.accounts SET phc = $2, credential = $3 WHERE name = $1",
                )
                .await?;
            Ok(client
                .execute(&stmt, &[&owned, &phc, &credential_stamp()])
                .await?)
        })?;
        match n {
            0 => Err(StoreError::NoSuchAccount(name.clone())),
            _ => Ok(()),
        }
    }

    fn list(&self) -> Result<Vec<AccountInfo>, StoreError> {
        self.run(|mut client| async move {
            // One snapshot: the accounts and their rules as of one moment.
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let rows = tx
                .query(
                    "SELECT name, created, restricted, credential FROM relay.accounts
                     ORDER BY name COLLATE \"C\"",
                    &[],
                )
                .await?;
            let mut out = Vec::with_capacity(rows.len());
            for row in rows {
                let name: String = row.get(0);
                let access = read_rule(&tx, &name, row.get(2)).await?;
                out.push(AccountInfo {
                    name: stored_name(name)?,
                    created: u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
                    access,
                    credential: row.get::<_, i64>(3) as u64,
                });
            }
            tx.commit().await?;
            Ok(out)
        })
    }

    fn exists(&self, name: &AccountName) -> Result<bool, StoreError> {
        let owned = name.as_str().to_owned();
        self.run(move |client| async move {
            let stmt = client
                .prepare_cached("SELECT 1 FROM relay.accounts WHERE name = $1")
                .await?;
            Ok(client.query_opt(&stmt, &[&owned]).await?.is_some())
        })
    }

    fn verify_password(&self, name: &AccountName, password: &str) -> Result<(), VerifyError> {
        let owned = name.as_str().to_owned();
        let phc: Option<String> = self.run(move |client| async move {
            let stmt = client
                .prepare_cached("SELECT phc FROM relay.accounts WHERE name = $1")
                .await?;
            Ok(client.query_opt(&stmt, &[&owned]).await?.map(|r| r.get(0)))
        })?;
        // Argon2 runs here, on the caller's thread, not on the store's runtime.
        verify_stored(name, password, phc)
    }

    fn access_rule(&self, name: &AccountName) -> Result<AccessRule, StoreError> {
        let owned = name.as_str().to_owned();
        let rule = self.run(move |mut client| async move {
            let tx = client
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let row = tx
                .query_opt(
                    "SELECT restricted FROM relay.accounts WHERE name = $1",
                    &[&owned],
                )
                .await?;
            let rule = match row {
                Some(row) => Some(read_rule(&tx, &owned, row.get(0)).await?),
                None => None,
            };
            tx.commit().await?;
            Ok(rule)
        })?;
        rule.ok_or_else(|| StoreError::NoSuchAccount(name.clone()))
    }

    fn set_access_rule(&self, name: &AccountName, rule: &AccessRule) -> Result<(), StoreError> {
        let owned = name.as_str().to_owned();
        let targets: Option<Vec<String>> = rule
            .allow
            .as_ref()
            .map(|list| list.iter().map(|t| t.as_str().to_owned()).collect());
        let found = self.run(move |mut client| async move {
            let tx = client.transaction().await?;
            let n = tx
                .execute(
                    "UPDATE relay.accounts SET restricted = $2 WHERE name = $1",
                    &[&owned, &targets.is_some()],
                )
                .await?;
            if n == 0 {
                return Ok(false);
            }
            tx.execute("DELETE FROM relay.access WHERE account = $1", &[&owned])
                .await?;
            if let Some(targets) = &targets {
                tx.execute(
                    "INSERT INTO relay.access (account, target)
                     SELECT $1, t FROM unnest($2::text[]) AS t ON CONFLICT DO NOTHING",
                    &[&owned, targets],
                )
                .await?;
            }
            tx.commit().await?;
            Ok(true)
        })?;
        match found {
            true => Ok(()),
            false => Err(StoreError::NoSuchAccount(name.clone())),
        }
    }

    fn server_secret(&self) -> Result<ServerSecret, StoreError> {
        let bytes: Vec<u8> = self.run(|client| async move {
            let row = client
                .query_one("SELECT secret FROM relay.server_secret WHERE id = 1", &[])
                .await?;
            Ok(row.get(0))
        })?;
        let bytes: [u8; 32] = bytes
            .try_into()
            .map_err(|_| StoreError::Corrupt("server secret is not 32 bytes".into()))?;
        Ok(ServerSecret::from_bytes(bytes))
    }

    fn generation(&self) -> Result<u64, StoreError> {
        self.run(|client| async move {
            let stmt = client
                .prepare_cached("SELECT value FROM relay.generation WHERE id = 1")
                .await?;
            Ok(client.query_one(&stmt, &[]).await?.get::<_, i64>(0) as u64)
        })
    }

    fn instances(&self) -> Result<HashMap<String, Option<u64>>, StoreError> {
        self.run(|client| async move {
            let rows = client
                .query("SELECT account, instance FROM relay.instances", &[])
                .await?;
            Ok(rows
                .into_iter()
                .map(|r| (r.get(0), r.get::<_, Option<i64>>(1).map(|i| i as u64)))
                .collect())
        })
    }

    fn instance(&self, name: &str) -> Result<Option<Option<u64>>, StoreError> {
        let owned = name.to_owned();
        self.run(move |client| async move {
            let stmt = client
                .prepare_cached("SELECT instance FROM relay.instances WHERE account = $1")
                .await?;
            let row = client.query_opt(&stmt, &[&owned]).await?;
            Ok(row.map(|r| r.get::<_, Option<i64>>(0).map(|i| i as u64)))
        })
    }

    fn set_instance(&self, name: &str, instance: Option<u64>) -> Result<u64, StoreError> {
        let owned = name.to_owned();
        let instance = instance.map(|i| i as i64);
        let node = self.node.get().cloned();
        self.run(move |client| async move {
            // Only for accounts that exist: a late write must not outlive a deletion.
            let stmt = client
                .prepare_cached(
                    "INSERT INTO relay.instances (account, instance, node, epoch)
                     SELECT $1, $2, $3, nextval('relay.presence_epoch')
                     WHERE EXISTS (SELECT 1 FROM relay.accounts WHERE name = $1)
                     ON CONFLICT (account) DO UPDATE SET instance = EXCLUDED.instance,
                         node = EXCLUDED.node, epoch = EXCLUDED.epoch
                     RETURNING epoch",
                )
                .await?;
            let row = client.query_opt(&stmt, &[&owned, &instance, &node]).await?;
            Ok(row.map_or(0, |r| r.get::<_, i64>(0) as u64))
        })
    }

    fn watch_changes(&self, wake: Arc<Notify>) {
        let on = move |_: Option<&str>| wake.notify_one();
        self.runtime().spawn(listen(
            self.config.clone(),
            self.target.clone(),
            CHANNEL,
            on,
        ));
    }

    fn fencing(&self) -> Option<tokio::sync::watch::Receiver<bool>> {
        self.fenced.get().cloned()
    }

    fn watch_presence(&self, moved: tokio::sync::mpsc::UnboundedSender<super::Presence>) {
        let me = self.node.get().cloned();
        let on = move |payload: Option<&str>| {
            if let Some(p) = payload.and_then(|p| foreign_presence(p, me.as_deref())) {
                // The server is gone only while it stops.
                let _ = moved.send(p);
            }
        };
        self.runtime().spawn(listen(
            self.config.clone(),
            self.target.clone(),
            PRESENCE,
            on,
        ));
    }
}

async fn insert_node(client: &Object, id: &str, node: &NodeInfo) -> Result<(), StoreError> {
    client
        .execute(
            "INSERT INTO relay.nodes (id, address, fingerprint) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET heartbeat = now()",
            &[&id, &node.address, &node.fingerprint],
        )
        .await?;
    Ok(())
}

/// Writes node `id`'s heartbeat every [`HEARTBEAT_EVERY`] (the database's clock), and
/// deletes the rows of nodes dead for [`FORGET_AFTER`]. `fence` says `true` once
/// [`FENCE_AFTER`] has passed since the *start* of the last write that succeeded (`join`'s
/// first, then this loop's; the database's `now()` in it is no earlier, so this node
/// fences before the others may count it dead, however long the write took), and `false`
/// again at the next success. A
/// write that hangs (a paused database does not answer at all) is given up after
/// [`FENCE_AFTER`]; the fence is checked while it waits.
async fn heartbeat(
    pool: Pool,
    id: String,
    node: NodeInfo,
    target: String,
    (fence, mut written): (tokio::sync::watch::Sender<bool>, tokio::time::Instant),
) {
    let mut tick = tokio::time::interval(HEARTBEAT_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let forget = format!("{} seconds", FORGET_AFTER.as_secs());
    let mut healthy = true;
    loop {
        tick.tick().await;
        let started = tokio::time::Instant::now();
        let beat = tokio::time::timeout(FENCE_AFTER, async {
            let client = pool.get().await.map_err(|e| pool_error(&target, e))?;
            // An upsert: a row deleted meanwhile (by hand) comes back.
            insert_node(&client, &id, &node).await?;
            client
                .execute(
                    "DELETE FROM relay.nodes WHERE heartbeat < now() - $1::text::interval",
                    &[&forget],
                )
                .await?;
            Ok::<_, StoreError>(())
        });
        tokio::pin!(beat);
        // While the write waits, the fence is checked: a hung write must fence too.
        let outcome = loop {
            tokio::select! {
                r = &mut beat => break r.unwrap_or_else(|_| {
                    Err(StoreError::Database(format!("{target}: the heartbeat write timed out")))
                }),
                () = tokio::time::sleep(FENCE_CHECK) => set_fence(&fence, &id, written),
            }
        };
        match outcome {
            Ok(()) => {
                written = started;
                if !healthy {
                    tracing::info!(node = %id, "heartbeat written again");
                    healthy = true;
                }
            }
            Err(e) if healthy => {
                tracing::warn!(node = %id, "cannot write the heartbeat: {e}");
                healthy = false;
            }
            Err(_) => {}
        }
        set_fence(&fence, &id, written);
    }
}

/// Fenced while the last heartbeat written is older than [`FENCE_AFTER`].
fn set_fence(fence: &tokio::sync::watch::Sender<bool>, id: &str, written: tokio::time::Instant) {
    let fenced = written.elapsed() >= FENCE_AFTER;
    fence.send_if_modified(|was| {
        if *was == fenced {
            return false;
        }
        match fenced {
            true => tracing::warn!(node = %id, "no heartbeat written for {FENCE_AFTER:?}: fenced (closing every terminal connection, refusing logins)"),
            false => tracing::info!(node = %id, "heartbeat written again: serving terminals again"),
        }
        *was = fenced;
        true
    });
}

/// A presence notification's payload ('node instance epoch account', migration 4) as a
/// reachable instance recorded by a node other than `me`; `None` for this node's own
/// records, logouts and anything malformed.
fn foreign_presence(payload: &str, me: Option<&str>) -> Option<super::Presence> {
    let mut fields = payload.splitn(4, ' ');
    let node = fields.next()?;
    let instance = fields.next()?.parse::<i64>().ok()?;
    let epoch = fields.next()?.parse::<i64>().ok()?;
    let account = fields.next()?;
    (Some(node) != me).then(|| super::Presence {
        account: account.to_owned(),
        instance: instance as u64,
        epoch: epoch as u64,
    })
}

/// Keeps a connection that `LISTEN`s on `channel` and calls `on` with each notification's
/// payload, and with `None` after each (re)connection for what happened while it was
/// away. Runs until the store's runtime stops.
pub(crate) async fn listen(
    config: tokio_postgres::Config,
    target: String,
    channel: &'static str,
    on: impl Fn(Option<&str>) + Clone + Send + 'static,
) {
    let mut healthy = true;
    loop {
        match config.connect(NoTls).await {
            Ok((client, mut connection)) => {
                let told = on.clone();
                // The connection must be polled for the LISTEN to go out; its messages are
                // the notifications.
                let mut driver = tokio::spawn(async move {
                    while let Some(message) =
                        std::future::poll_fn(|cx| connection.poll_message(cx)).await
                    {
                        match message {
                            Ok(AsyncMessage::Notification(n)) => told(Some(n.payload())),
                            Ok(_) => {}
                            Err(e) => return e.to_string(),
                        }
                    }
                    "closed by the server".to_owned()
                });
                match client.batch_execute(&format!("LISTEN {channel}")).await {
                    Ok(()) => {
                        if !healthy {
                            tracing::info!(database = %target, channel, "listening again");
                        }
                        healthy = true;
                        on(None);
                        let why = (&mut driver).await.unwrap_or_else(|e| e.to_string());
                        tracing::warn!(database = %target, channel, "the listener lost its connection: {why}");
                    }
                    Err(e) if healthy => {
                        tracing::warn!(database = %target, channel, "cannot listen: {e}");
                        healthy = false;
                    }
                    Err(_) => {}
                }
                driver.abort();
            }
            Err(e) if healthy => {
                tracing::warn!(database = %target, channel, "cannot listen: {e}");
                healthy = false;
            }
            Err(_) => {}
        }
        tokio::time::sleep(RELISTEN_AFTER).await;
    }
}
