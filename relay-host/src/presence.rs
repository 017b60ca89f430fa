//! Where each user ID of the cluster is reachable: the in-memory copy of the presence rows
//! (`relay.instances`, docs/CLUSTER.md part 4) and of the live nodes (`relay.nodes`), that
//! the protocol core asks when a DEMAND names a user ID not logged in here
//! ([`relay_proto::relay::Policy::locate`]). The core is synchronous and runs under the
//! server's lock, so the answer must come from memory: this copy is read at start, kept
//! current by `NOTIFY relay_presence` (the store's trigger on the rows, migrations 4 and
//! 5, so every writer is heard; the same notifications newest-wins hears,
//! [`crate::store::AccountStore::watch_presence`]) and read again whole after each
//! reconnection of the store's listener; the nodes are read
//! every second, and a node whose heartbeat is more than [`DEAD_AFTER`] old is ignored
//! (its rows say nothing: the device is reconnecting elsewhere).

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use deadpool_postgres::Pool;
use prometheus_client::metrics::gauge::Gauge;
use relay_proto::UserId;
use relay_proto::frame::Redirect;
use relay_proto::ident::NodeAddress;
use relay_proto::relay::{Node, REMOTE_POSITIONS};

use crate::store::StoreError;
use crate::store::postgres::{PRESENCE, listen, pool_error};
use crate::tls::Fingerprint;

/// A node whose heartbeat is older than this is dead to the others (docs/CLUSTER.md).
pub const DEAD_AFTER: Duration = Duration::from_secs(3);

/// How often the nodes' table is read (their heartbeats are written every second).
const NODES_EVERY: Duration = Duration::from_secs(1);

/// How long a full read of the rows that failed waits before it is tried again.
const REREAD_AFTER: Duration = Duration::from_secs(1);

/// The cluster's presence, as this node knows it. Cheap to read under the core's lock.
#[derive(Debug)]
pub struct Presence {
    /// This node's id in `relay.nodes`: a user ID homed here is never redirected.
    me: String,
    state: RwLock<State>,
    /// How many nodes (this one included) the last read of the table found alive: the
    /// `relay_cluster_nodes_alive` gauge ([`crate::metrics::Metrics::cluster_node`]).
    alive: Gauge,
}

#[derive(Debug, Default)]
struct State {
    /// Each account's latest row: the node its reachable instance is logged in to (`None`:
    /// logged out), and the row's epoch, so an older notification never undoes a newer
    /// row read meanwhile.
    homes: HashMap<String, (Option<String>, i64)>,
    /// Every account seen since start, by its position in the online list's part for the
    /// other nodes ([`Presence::remote`]): stable, so a cursor keeps pointing at it.
    accounts: Vec<String>,
    positions: HashMap<String, u32>,
    /// The positions of the accounts whose latest row names another node (alive or not).
    away: BTreeSet<u32>,
    /// Every node seen since start, by [`Node`] number (its index: stable, so a redirect
    /// queued in the core names the same node when it is written).
    nodes: Vec<NodeEntry>,
    by_id: HashMap<String, u32>,
}

#[derive(Debug)]
struct NodeEntry {
    /// What a terminal needs to reach it; `None` if its row's address or fingerprint is
    /// not one a redirect can carry.
    redirect: Option<Redirect>,
    /// Its heartbeat is at most [`DEAD_AFTER`] old.
    alive: bool,
}

/// One presence row, as the trigger sends it.
#[derive(Debug, PartialEq, Eq)]
struct Row {
    account: String,
    /// `None`: logged out (or the account is gone).
    node: Option<String>,
    epoch: i64,
}

impl Row {
    /// The trigger's payload, `node instance epoch account` (`-` for no node or no
    /// instance: a row with no instance is logged out, or its account is gone).
    fn parse(payload: &str) -> Option<Row> {
        let mut fields = payload.splitn(4, ' ');
        let (node, instance) = (fields.next()?, fields.next()?);
        let epoch = fields.next()?.parse().ok()?;
        let account = fields.next()?.to_owned();
        let reachable = node != "-" && instance != "-";
        Some(Row {
            account,
            node: reachable.then(|| node.to_owned()),
            epoch,
        })
    }
}

/// One row of `relay.nodes`.
#[derive(Debug)]
pub struct NodeRow {
    pub id: String,
    pub address: String,
    pub fingerprint: String,
    pub alive: bool,
}

impl Presence {
    /// An empty copy for node `me`.
    pub fn new(me: String) -> Self {
        Self {
            me,
            state: RwLock::default(),
            alive: Gauge::default(),
        }
    }

    /// This node's id in `relay.nodes`.
    pub fn me(&self) -> &str {
        &self.me
    }

    /// The gauge of live nodes, which [`Presence::set_nodes`] keeps.
    pub fn alive_gauge(&self) -> Gauge {
        self.alive.clone()
    }

    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The live node other than this one where `user`'s reachable instance is.
    pub fn locate(&self, user: &UserId) -> Option<Node> {
        self.read().located(&self.me, user.as_str())
    }

    /// The first user ID at or after position `from` that [`Presence::locate`] finds on
    /// another live node, with its position: the other nodes' part of the online list
    /// ([`relay_proto::relay::Policy::remote`]).
    pub fn remote(&self, from: u32) -> Option<(u32, UserId)> {
        let st = self.read();
        st.away.range(from..).find_map(|&pos| {
            let account = st.accounts.get(pos as usize)?;
            st.located(&self.me, account)?;
            Some((pos, UserId::new(account).ok()?))
        })
    }

    /// Where `node` is, while it is alive.
    pub fn node(&self, node: Node) -> Option<Redirect> {
        let st = self.read();
        let entry = st.nodes.get(node.0 as usize)?;
        entry.alive.then(|| entry.redirect.clone()).flatten()
    }

    /// Takes a row from a notification or a full read: applied unless an as new or newer
    /// one of the same account was applied already.
    fn apply(&self, row: Row) {
        let mut st = self.write();
        let newer = st
            .homes
            .get(&row.account)
            .is_none_or(|(_, epoch)| row.epoch >= *epoch);
        if !newer {
            return;
        }
        let away = row.node.as_ref().is_some_and(|node| *node != self.me);
        if let Some(pos) = st.position(&row.account) {
            if away {
                st.away.insert(pos);
            } else {
                st.away.remove(&pos);
            }
        }
        st.homes.insert(row.account, (row.node, row.epoch));
    }

    /// The nodes' table as read now: known nodes not in it are dead.
    pub fn set_nodes(&self, rows: Vec<NodeRow>) {
        let alive = rows.iter().filter(|r| r.alive).count();
        self.alive.set(i64::try_from(alive).unwrap_or(i64::MAX));
        let mut st = self.write();
        for entry in &mut st.nodes {
            entry.alive = false;
        }
        for row in rows {
            let redirect = redirect_of(&row.address, &row.fingerprint);
            let n = match st.by_id.get(&row.id) {
                Some(&n) => n,
                None => {
                    let n = st.nodes.len() as u32;
                    st.nodes.push(NodeEntry {
                        redirect: None,
                        alive: false,
                    });
                    st.by_id.insert(row.id, n);
                    n
                }
            };
            if let Some(entry) = st.nodes.get_mut(n as usize) {
                *entry = NodeEntry {
                    redirect,
                    alive: row.alive,
                };
            }
        }
    }
}

impl State {
    /// The live node other than `me` where `account`'s reachable instance is, if a
    /// redirect can name it.
    fn located(&self, me: &str, account: &str) -> Option<Node> {
        let (Some(node), _) = self.homes.get(account)? else {
            return None;
        };
        if node == me {
            return None;
        }
        let n = *self.by_id.get(node)?;
        let entry = self.nodes.get(n as usize)?;
        (entry.alive && entry.redirect.is_some()).then_some(Node(n))
    }

    /// `account`'s position in the online list, given at its first row; `None` once
    /// [`REMOTE_POSITIONS`] accounts have one (the list then leaves the newer ones out).
    fn position(&mut self, account: &str) -> Option<u32> {
        if let Some(&pos) = self.positions.get(account) {
            return Some(pos);
        }
        let pos = u32::try_from(self.accounts.len())
            .ok()
            .filter(|p| *p < REMOTE_POSITIONS)?;
        self.accounts.push(account.to_owned());
        self.positions.insert(account.to_owned(), pos);
        Some(pos)
    }
}

/// The redirect to a node with this address and fingerprint, as `relay.nodes` holds them.
fn redirect_of(address: &str, fingerprint: &str) -> Option<Redirect> {
    let address = NodeAddress::new(address).ok()?;
    let fingerprint = fingerprint.parse::<Fingerprint>().ok()?.0;
    Some(Redirect {
        address,
        fingerprint,
    })
}

/// Keeps `presence` current from the database until the runtime stops: the nodes every
/// [`NODES_EVERY`], the rows at every (re)connection of the store's listener and at each
/// notification.
pub async fn follow(
    config: tokio_postgres::Config,
    pool: Pool,
    target: String,
    presence: Arc<Presence>,
) {
    tokio::spawn(read_nodes(pool.clone(), target.clone(), presence.clone()));
    let database = target.clone();
    let on = move |payload: Option<&str>| match payload {
        Some(payload) => match Row::parse(payload) {
            Some(row) => presence.apply(row),
            None => tracing::warn!("presence notification not understood: {payload}"),
        },
        // Listening (again): what changed while nobody listened is read whole.
        None => {
            tokio::spawn(reread_rows(
                pool.clone(),
                database.clone(),
                presence.clone(),
            ));
        }
    };
    listen(config, target, PRESENCE, on).await;
}

/// Reads the rows whole, again every [`REREAD_AFTER`] until that succeeds.
async fn reread_rows(pool: Pool, target: String, presence: Arc<Presence>) {
    let mut healthy = true;
    while let Err(e) = read_rows(&pool, &target, &presence).await {
        if healthy {
            tracing::warn!(database = %target, "cannot read the presence rows: {e}");
        }
        healthy = false;
        tokio::time::sleep(REREAD_AFTER).await;
    }
}

/// Every presence row, read whole.
async fn read_rows(pool: &Pool, target: &str, presence: &Presence) -> Result<(), StoreError> {
    let client = pool.get().await.map_err(|e| pool_error(target, e))?;
    let rows = client
        .query(
            "SELECT account, CASE WHEN instance IS NULL THEN NULL ELSE node END, epoch
             FROM relay.instances",
            &[],
        )
        .await?;
    for r in rows {
        presence.apply(Row {
            account: r.get(0),
            node: r.get(1),
            epoch: r.get(2),
        });
    }
    Ok(())
}

/// Reads `relay.nodes` every [`NODES_EVERY`], judging heartbeats by the database's clock;
/// a draining node (SIGTERM, migration 6) is not alive either: no redirect to it.
async fn read_nodes(pool: Pool, target: String, presence: Arc<Presence>) {
    let mut tick = tokio::time::interval(NODES_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let dead_after = format!("{} milliseconds", DEAD_AFTER.as_millis());
    let mut healthy = true;
    loop {
        tick.tick().await;
        let read = async {
            let client = pool.get().await.map_err(|e| pool_error(&target, e))?;
            let rows = client
                .query(
                    "SELECT id, address, fingerprint,
                            heartbeat > now() - $1::text::interval AND NOT draining
                     FROM relay.nodes",
                    &[&dead_after],
                )
                .await?;
            Ok::<_, StoreError>(
                rows.into_iter()
                    .map(|r| NodeRow {
                        id: r.get(0),
                        address: r.get(1),
                        fingerprint: r.get(2),
                        alive: r.get(3),
                    })
                    .collect(),
            )
        };
        match read.await {
            Ok(rows) => {
                presence.set_nodes(rows);
                healthy = true;
            }
            Err(e) => {
                if healthy {
                    tracing::warn!(database = %target, "cannot read the cluster's nodes: {e}");
                }
                healthy = false;
                // Unknown is not alive: redirect nowhere until the table is read again.
                presence.set_nodes(Vec::new());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fp(b: u8) -> String {
        Fingerprint([b; 32]).to_string()
    }

    fn node(id: &str, alive: bool) -> NodeRow {
        NodeRow {
            id: id.into(),
            address: format!("{id}.example:7835"),
            fingerprint: fp(id.len() as u8),
            alive,
        }
    }

    fn row(account: &str, node: Option<&str>, epoch: i64) -> Row {
        Row {
            account: account.into(),
            node: node.map(Into::into),
            epoch,
        }
    }

    fn cam() -> UserId {
        UserId::new("cam").unwrap()
    }

    #[test]
    fn a_user_on_a_live_node_is_located_there() {
        let p = Presence::new("me".into());
        p.set_nodes(vec![node("me", true), node("b", true)]);
        p.apply(row("cam", Some("b"), 1));
        let n = p.locate(&cam()).unwrap();
        let to = p.node(n).unwrap();
        assert_eq!(to.address.as_str(), "b.example:7835");
        assert_eq!(to.fingerprint, [1; 32]);
    }

    #[test]
    fn no_redirect_to_here_a_dead_node_or_a_logged_out_user() {
        let p = Presence::new("me".into());
        p.set_nodes(vec![node("me", true), node("dead", false)]);
        p.apply(row("cam", Some("me"), 1));
        assert_eq!(p.locate(&cam()), None, "homed here");
        p.apply(row("cam", Some("dead"), 2));
        assert_eq!(p.locate(&cam()), None, "stale heartbeat");
        p.apply(row("cam", None, 3));
        assert_eq!(p.locate(&UserId::new("nobody").unwrap()), None);
        assert_eq!(p.locate(&cam()), None, "logged out");
    }

    /// A node that goes from the table (or stale) after `locate` named it: `node` says
    /// so when the redirect is written.
    #[test]
    fn a_node_named_earlier_that_died_has_no_redirect() {
        let p = Presence::new("me".into());
        p.set_nodes(vec![node("b", true)]);
        p.apply(row("cam", Some("b"), 1));
        let n = p.locate(&cam()).unwrap();
        p.set_nodes(vec![]);
        assert_eq!(p.node(n), None);
        p.set_nodes(vec![node("b", true)]);
        assert_eq!(p.locate(&cam()), Some(n), "the same number when it is back");
    }

    #[test]
    fn an_older_row_never_undoes_a_newer_one() {
        let p = Presence::new("me".into());
        p.set_nodes(vec![node("b", true), node("cc", true)]);
        p.apply(row("cam", Some("cc"), 5));
        p.apply(row("cam", Some("b"), 4));
        let to = p.node(p.locate(&cam()).unwrap()).unwrap();
        assert_eq!(to.address.as_str(), "cc.example:7835");
        p.apply(row("cam", None, 6));
        p.apply(row("cam", Some("b"), 5));
        assert_eq!(p.locate(&cam()), None);
    }

    #[test]
    fn a_node_row_a_redirect_cannot_carry_is_never_a_target() {
        let p = Presence::new("me".into());
        let mut bad = node("b", true);
        bad.fingerprint = "not hex".into();
        p.set_nodes(vec![bad]);
        p.apply(row("cam", Some("b"), 1));
        assert_eq!(p.locate(&cam()), None);
    }

    fn listed(p: &Presence) -> Vec<(u32, String)> {
        let mut out = Vec::new();
        let mut from = 0;
        while let Some((pos, user)) = p.remote(from) {
            out.push((pos, user.as_str().to_owned()));
            from = pos + 1;
        }
        out
    }

    /// The other nodes' part of the online list: user IDs on live nodes other than this
    /// one, each at the position it got first, which a move or a logout does not change.
    #[test]
    fn the_online_list_names_users_on_other_live_nodes_at_stable_positions() {
        let p = Presence::new("me".into());
        p.set_nodes(vec![node("me", true), node("b", true), node("dead", false)]);
        p.apply(row("cam", Some("b"), 1));
        p.apply(row("here", Some("me"), 2));
        p.apply(row("gone", Some("dead"), 3));
        p.apply(row("out", None, 4));
        p.apply(row("dev", Some("b"), 5));
        assert_eq!(listed(&p), [(0, "cam".into()), (4, "dev".into())]);
        p.apply(row("cam", None, 6));
        assert_eq!(listed(&p), [(4, "dev".into())], "logged out");
        p.apply(row("cam", Some("b"), 7));
        p.set_nodes(vec![node("me", true), node("b", true), node("dead", true)]);
        assert_eq!(
            listed(&p),
            [(0, "cam".into()), (2, "gone".into()), (4, "dev".into())],
            "back at its position; a node alive again counts"
        );
        p.apply(row("dev", Some("me"), 8));
        assert_eq!(p.remote(3), None, "homed here now");
    }

    #[test]
    fn the_gauge_counts_the_live_nodes_of_the_last_read() {
        let p = Presence::new("me".into());
        let alive = p.alive_gauge();
        p.set_nodes(vec![node("me", true), node("b", true), node("dead", false)]);
        assert_eq!(alive.get(), 2);
        p.set_nodes(Vec::new());
        assert_eq!(alive.get(), 0, "a table that cannot be read: none alive");
    }

    #[test]
    fn the_triggers_payload_decodes() {
        assert_eq!(Row::parse("n1 42 7 cam"), Some(row("cam", Some("n1"), 7)));
        // Logged out, a deleted row, a row no node wrote: not reachable anywhere.
        assert_eq!(Row::parse("n1 - 8 cam"), Some(row("cam", None, 8)));
        assert_eq!(Row::parse("- 42 9 cam"), Some(row("cam", None, 9)));
        assert_eq!(Row::parse("n1 42 cam"), None);
    }
}
