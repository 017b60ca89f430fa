//! The relay's login check: what [`relay_proto::relay::Event::Authenticate`] asks and
//! [`Verdict`] answers. Off the core lock and on a blocking thread where it hashes.
//!
//! - A **password** login first asks the [`LoginThrottle`] (a throttled source costs no
//!   argon2 run), then verifies the password; the failure or success is counted.
//! - A **resumption** token is checked with its HMAC only (no argon2, so a relay restart
//!   does not cause a hashing storm) and is never throttled: it cannot be guessed, and a
//!   device's token must work however many passwords others get wrong.
//!
//! Token revocation, checked on every resumption: the MAC covers the account's credential
//! stamp (a password change or a re-created account revokes every token), and the token's
//! instance must be the account's current one, which the core reports
//! ([`Event::InstanceStarted`], [`Event::InstanceEnded`]): a replaced instance's tokens get
//! `Replaced`, a logged-out instance's `ResumeRejected`. The current instances are written
//! to the store in the background (one row per account, so bounded), so revocations
//! survive a restart, and a token is checked against the store's record (one indexed read)
//! unless this relay's own newer change is not written yet: relays that share a database
//! then agree on every account's current instance.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use relay_proto::frame::Credential;
use relay_proto::relay::{Event, InstanceEnd, Kind, Refusal, Verdict};
use relay_proto::{Password, ResumeToken, UserId};
use tokio::sync::{Notify, Semaphore, watch};

use crate::config::Limits;
use crate::metrics::{LoginMethod, LoginOutcome, Metrics};
use crate::retired::{MAX_RETIRED, Retired};
use crate::store::{AccountName, AccountStore, AccountsSnapshot, VerifyError};
use crate::throttle::{DEFAULT_MAX_TRACKED, LoginThrottle};
use crate::token::{InstanceId, TokenKey};

/// A login the core asks about ([`Event::Authenticate`]).
#[derive(Debug)]
pub struct Login {
    pub user: UserId,
    pub credential: Credential,
    /// What the LOGIN asks to be: reachable tokens must be the account's current instance.
    pub kind: Kind,
}

/// How long a resumption credential stays valid after it is issued.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Everything a login check needs.
#[derive(Debug)]
pub struct Auth {
    store: Arc<dyn AccountStore>,
    tokens: TokenKey,
    throttle: Mutex<LoginThrottle>,
    metrics: Arc<Metrics>,
    accounts: watch::Receiver<Arc<AccountsSnapshot>>,
    /// Wakes the account watcher at once (see [`Auth::snapshot_current`]).
    refresh_accounts: Arc<Notify>,
    instances: Arc<Instances>,
    /// Requester instances that logged out ([`crate::retired`]).
    retired: Mutex<Retired>,
    /// Password checks running at once: one per core, so argon2 never takes every blocking
    /// thread and the quick store reads of token logins do not queue behind a guesser's.
    hashing: Semaphore,
}

/// Each account's current instance (`None`: logged out; absent: never recorded, so any
/// genuine token of the account may start its instance), and the changes the writer
/// has not stored yet.
#[derive(Debug, Default)]
struct Instances {
    current: Mutex<HashMap<String, Option<u64>>>,
    unsaved: Mutex<HashMap<String, Option<u64>>>,
    /// The epoch of this relay's last written record per account
    /// ([`AccountStore::set_instance`]); changed under the `unsaved` lock.
    epochs: Mutex<HashMap<String, u64>>,
    /// Wakes the writer.
    save: Notify,
}

impl Instances {
    fn set(&self, user: &str, instance: Option<u64>) {
        lock(&self.current).insert(user.to_owned(), instance);
        lock(&self.unsaved).insert(user.to_owned(), instance);
        self.save.notify_one();
    }

    fn get(&self, user: &str) -> Option<Option<u64>> {
        lock(&self.current).get(user).copied()
    }

    /// This relay's change of `user`'s instance that the store may not hold yet.
    fn unsaved(&self, user: &str) -> Option<Option<u64>> {
        lock(&self.unsaved).get(user).copied()
    }

    /// Whether a record of `user` with `epoch`, written by another relay, is newer than
    /// this relay's: none of ours is waiting to be written (it would be newer still), and
    /// the last one written has an older epoch.
    fn outranked(&self, user: &str, epoch: u64) -> bool {
        let unsaved = lock(&self.unsaved);
        !unsaved.contains_key(user) && lock(&self.epochs).get(user).is_none_or(|&e| e < epoch)
    }

    /// The store's record of `user`, read because the store is newer than this copy.
    fn remember(&self, user: &str, instance: Option<u64>) {
        lock(&self.current).insert(user.to_owned(), instance);
    }

    /// Writes the unsaved changes to `store`, in one batch on a blocking thread. They
    /// count as unsaved until written, so [`Auth`] never takes the store's older record
    /// over them meanwhile; one that fails stays unsaved and goes with the next batch.
    async fn write(&self, store: &Arc<dyn AccountStore>) {
        let batch = lock(&self.unsaved).clone();
        if batch.is_empty() {
            return;
        }
        let store = store.clone();
        let written = tokio::task::spawn_blocking(move || {
            batch
                .into_iter()
                .filter_map(
                    |(user, instance)| match store.set_instance(&user, instance) {
                        Ok(epoch) => Some((user, instance, epoch)),
                        Err(e) => {
                            tracing::warn!(%user, "cannot record the current instance: {e}");
                            None
                        }
                    },
                )
                .collect::<Vec<_>>()
        })
        .await;
        match written {
            Ok(batch) => {
                let mut unsaved = lock(&self.unsaved);
                let mut epochs = lock(&self.epochs);
                for (user, instance, epoch) in batch {
                    // A newer change made during the write stays for the next one.
                    if unsaved.get(&user) == Some(&instance) {
                        unsaved.remove(&user);
                    }
                    epochs.insert(user, epoch);
                }
            }
            Err(e) => tracing::warn!("recording current instances: {e}"),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Auth {
    /// The login check over `store`, with the throttle's budgets from `limits`.
    pub fn new(
        store: Arc<dyn AccountStore>,
        limits: &Limits,
        metrics: Arc<Metrics>,
        accounts: watch::Receiver<Arc<AccountsSnapshot>>,
        refresh_accounts: Arc<Notify>,
    ) -> anyhow::Result<Self> {
        let tokens = TokenKey::new(&store.server_secret()?);
        let instances = Arc::new(Instances {
            current: Mutex::new(store.instances()?),
            ..Instances::default()
        });
        // The one writer, so the store sees the changes in their order.
        tokio::spawn({
            let (instances, store) = (instances.clone(), store.clone());
            async move {
                loop {
                    instances.save.notified().await;
                    instances.write(&store).await;
                }
            }
        });
        Ok(Self {
            store,
            tokens,
            throttle: Mutex::new(LoginThrottle::new(
                limits.login_failures_per_account_per_minute,
                limits.login_failures_per_source_per_minute,
                DEFAULT_MAX_TRACKED,
            )),
            metrics,
            accounts,
            refresh_accounts,
            instances,
            retired: Mutex::new(Retired::new(TOKEN_LIFETIME, MAX_RETIRED)),
            hashing: Semaphore::new(std::thread::available_parallelism().map_or(1, usize::from)),
        })
    }

    /// A reloaded configuration (SIGHUP): the throttle's new numbers if they changed (its
    /// counts start afresh then), and the account store read at once (its access rules).
    pub fn reconfigure(&self, old: &Limits, new: &Limits) {
        let per = |l: &Limits| {
            (
                l.login_failures_per_account_per_minute,
                l.login_failures_per_source_per_minute,
            )
        };
        if per(old) != per(new) {
            *self.throttle() = LoginThrottle::new(
                new.login_failures_per_account_per_minute,
                new.login_failures_per_source_per_minute,
                DEFAULT_MAX_TRACKED,
            );
        }
        self.refresh_accounts.notify_one();
    }

    /// Whether another relay's record of `user`'s reachable instance, with `epoch`
    /// ([`crate::store::AccountStore::watch_presence`]), is newer than this relay's: then
    /// the instance here, if any other, is replaced (newest wins across relays).
    pub fn outranked(&self, user: &str, epoch: u64) -> bool {
        self.instances.outranked(user, epoch)
    }

    /// Stores what the background writer has not yet (at shutdown).
    pub async fn flush(&self) {
        self.instances.write(&self.store).await;
    }

    /// The verdict on `login` from `peer`.
    pub async fn check(&self, login: &Login, peer: SocketAddr) -> Verdict {
        let user = &login.user;
        match &login.credential {
            Credential::Password(password) => self.password(user, peer, password.clone()).await,
            Credential::Resume(token) => self.resume(user, token, login.kind).await,
        }
    }

    /// The core started or ended an instance (a password login, LOGOUT, replacement): the
    /// started reachable one is the account's only current instance, a logged-out one
    /// leaves none; a logged-out requester instance is retired.
    pub fn instance_changed(&self, event: Event) {
        match event {
            // Started here, or moved here from another relay: its presence is here now.
            Event::InstanceStarted { user, instance }
            | Event::InstanceArrived { user, instance } => {
                self.instances.set(user.as_str(), Some(instance))
            }
            Event::InstanceEnded {
                instance,
                how: InstanceEnd::LoggedOut,
                kind: Kind::Requester,
                ..
            } => lock(&self.retired).retire(instance, std::time::Instant::now()),
            Event::InstanceEnded {
                user,
                instance,
                how: InstanceEnd::LoggedOut,
                kind: Kind::Reachable,
            } if self.instances.get(user.as_str()) == Some(Some(instance)) => {
                self.instances.set(user.as_str(), None)
            }
            _ => {}
        }
    }

    fn throttle(&self) -> MutexGuard<'_, LoginThrottle> {
        lock(&self.throttle)
    }

    async fn password(&self, user: &UserId, peer: SocketAddr, password: Password) -> Verdict {
        let ip = peer.ip();
        let checked = self
            .throttle()
            .check(user.as_str(), ip, std::time::Instant::now());
        if let Err(t) = checked {
            tracing::info!(%user, %peer, "login throttled: {t}");
            self.metrics
                .login(LoginMethod::Password, LoginOutcome::Throttled);
            let retry_after = relay_proto::Duration::from_millis(t.retry_after.as_millis() as u64);
            return Verdict::Refuse(Refusal::Throttled { retry_after });
        }
        if !self.verify_password(user, password).await {
            self.throttle()
                .record_failure(user.as_str(), ip, std::time::Instant::now());
            self.metrics
                .login(LoginMethod::Password, LoginOutcome::Failed);
            return Verdict::Refuse(Refusal::BadCredential);
        }
        self.throttle().record_success(user.as_str(), ip);
        let mut b = [0u8; 8];
        if getrandom::getrandom(&mut b).is_err() {
            return Verdict::Refuse(Refusal::BadCredential);
        }
        self.accept(
            user,
            LoginMethod::Password,
            InstanceId(u64::from_le_bytes(b)),
        )
        .await
    }

    /// Whether `password` is `user`'s, with argon2 on a blocking thread.
    async fn verify_password(&self, user: &UserId, password: Password) -> bool {
        let Ok(_permit) = self.hashing.acquire().await else {
            return false;
        };
        let store = self.store.clone();
        let name = AccountName::new(user.as_str());
        let result = tokio::task::spawn_blocking(move || {
            let name = name.map_err(|_| VerifyError::UnknownAccount)?;
            store.verify_password(&name, password.as_str())
        })
        .await;
        match result {
            Ok(Ok(())) => true,
            Ok(Err(VerifyError::UnknownAccount | VerifyError::WrongPassword)) => false,
            Ok(Err(VerifyError::Store(e))) => {
                tracing::warn!("account store: {e}");
                false
            }
            Err(e) => {
                tracing::warn!("password check: {e}");
                false
            }
        }
    }

    async fn resume(&self, user: &UserId, token: &ResumeToken, kind: Kind) -> Verdict {
        let refusal = match self.resumable(user, token, kind).await {
            Ok(instance) => return self.accept(user, LoginMethod::Resumption, instance).await,
            Err(refusal) => refusal,
        };
        self.metrics
            .login(LoginMethod::Resumption, LoginOutcome::Failed);
        Verdict::Refuse(refusal)
    }

    /// The instance `token` may start, or why not. The account must exist (a deleted
    /// account's credentials die with it), the MAC must hold with its current credential
    /// stamp, and a reachable instance must be the account's current one (a requester
    /// instance replaces nothing and is never replaced: its tokens are not tracked).
    async fn resumable(
        &self,
        user: &UserId,
        token: &ResumeToken,
        kind: Kind,
    ) -> Result<InstanceId, Refusal> {
        // A change made a moment ago (a password, a deletion) must count now.
        self.snapshot_current().await;
        let stamp = self.accounts.borrow().credential(user.as_str());
        let stamp = stamp.ok_or(Refusal::BadCredential)?;
        let instance = self
            .tokens
            .verify(user.as_str(), stamp, token.as_bytes(), unix_now())
            .map_err(|_| Refusal::BadCredential)?;
        if kind == Kind::Requester {
            return match lock(&self.retired).contains(instance.0) {
                true => Err(Refusal::TokenRevoked),
                false => Ok(instance),
            };
        }
        match self.current_instance(user.as_str()).await {
            None => Ok(instance),
            Some(Some(current)) if current == instance.0 => Ok(instance),
            Some(Some(_)) => Err(Refusal::Replaced),
            Some(None) => Err(Refusal::TokenRevoked),
        }
    }

    /// `user`'s current instance, to check a token against: this relay's own change while
    /// the store may not hold it yet, else the store's record. The store decides because
    /// relays that share a database (docs/CLUSTER.md) record there the instances they
    /// start and end: a device that moved to another relay has a newer instance than this
    /// relay's copy says, and one that logged out there has none. Only when the store cannot
    /// answer does this relay's copy decide alone.
    async fn current_instance(&self, user: &str) -> Option<Option<u64>> {
        if let Some(ours) = self.instances.unsaved(user) {
            return Some(ours);
        }
        let known = self.instances.get(user);
        let store = self.store.clone();
        let name = user.to_owned();
        match tokio::task::spawn_blocking(move || store.instance(&name)).await {
            Ok(Ok(recorded)) => {
                if let Some(instance) = recorded {
                    self.instances.remember(user, instance);
                }
                recorded
            }
            Ok(Err(e)) => {
                tracing::warn!(%user, "cannot read the current instance: {e}");
                known
            }
            Err(e) => {
                tracing::warn!(%user, "reading the current instance: {e}");
                known
            }
        }
    }

    /// Accepts the login as `instance`, with a fresh token for it.
    async fn accept(&self, user: &UserId, method: LoginMethod, instance: InstanceId) -> Verdict {
        self.snapshot_current().await;
        let Some(stamp) = self.accounts.borrow().credential(user.as_str()) else {
            // Deleted while we checked.
            return Verdict::Refuse(Refusal::BadCredential);
        };
        self.metrics.login(method, LoginOutcome::Ok);
        let expiry = unix_now() + TOKEN_LIFETIME.as_secs();
        let token = self.tokens.issue(user.as_str(), stamp, instance, expiry);
        Verdict::Accept {
            instance: instance.0,
            token: ResumeToken::from_slice(&token).unwrap_or_default(),
        }
    }

    /// Makes sure the accounts snapshot (which the access rule reads) is current before a
    /// login is answered: an account added, or a rule changed, a moment ago would otherwise
    /// be unknown for up to a poll (1 s). One cheap query per login; the poll still covers
    /// changes made while a terminal stays logged in.
    async fn snapshot_current(&self) {
        let store = self.store.clone();
        let Ok(Ok(generation)) = tokio::task::spawn_blocking(move || store.generation()).await
        else {
            return;
        };
        if self.accounts.borrow().generation() == generation {
            return;
        }
        self.refresh_accounts.notify_one();
        let mut rx = self.accounts.clone();
        let wait = rx.wait_for(|s| s.generation() >= generation);
        let _ = tokio::time::timeout(Duration::from_secs(2), wait).await;
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
