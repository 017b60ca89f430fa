//! Relays as one service (issue 15): two `relay serve` processes on one PostgreSQL
//! database, which the test starts itself (tests/postgres_support.rs; it fails when
//! PostgreSQL is not installed). Accounts are edited with `relay user … --config` of one
//! node, as an operator would, and the other node must follow within a second; a token
//! issued by one node starts a login on the other without a password check; a demand for
//! a device on the other node is redirected there.

/// The redirect figures: an ignored test, run explicitly.
#[path = "cluster_figures.rs"]
mod figures;
#[path = "fleet.rs"]
mod fleet;
#[path = "login_client.rs"]
mod login_client;
#[path = "postgres_support.rs"]
mod postgres_support;
#[path = "host_support.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use login_client::*;
use postgres_support::Postgres;
use relay_proto::ErrorCode;
use support::*;

/// How soon an account change made through one node must count on the other.
const WITHIN: Duration = Duration::from_secs(1);

/// A database and two nodes on it, each with its own directory (certificate, channel
/// keys) and a /metrics port.
struct Cluster {
    nodes: Vec<(Relay, u16)>,
    pg: Postgres,
    _turn: std::sync::MutexGuard<'static, ()>,
}

/// One cluster at a time: each is a PostgreSQL server and two relays, and the tests
/// measure how soon a change arrives.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

impl Cluster {
    fn start(n: usize) -> Cluster {
        Cluster::start_with(n, "")
    }

    /// `n` nodes whose `[limits]` section is `limits`.
    fn start_with(n: usize, limits: &str) -> Cluster {
        let turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
        let pg = Postgres::start();
        let url = pg.create_database("relay");
        let nodes = (0..n)
            .map(|_| {
                let metrics = free_port();
                let top = format!("database = \"{url}\"\nmetrics = \"127.0.0.1:{metrics}\"\n");
                (Relay::start_with(&top, limits), metrics)
            })
            .collect();
        Cluster {
            nodes,
            pg,
            _turn: turn,
        }
    }

    fn node(&self, i: usize) -> &Relay {
        &self.nodes[i].0
    }

    /// `relay user ARGS --config` of node `i` (its `database` names the store).
    fn user(&self, i: usize, args: &[&str]) {
        let mut child = Command::new(relay_bin())
            .arg("user")
            .args(args)
            .arg("--config")
            .arg(self.node(i).dir.path().join("relay.toml"))
            .env_remove("RELAY_DB")
            .env_remove("RELAY_DATABASE")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("relay user");
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(PASSWORD.as_bytes()).unwrap();
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "relay user {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn add(&self, i: usize, name: &str) {
        self.user(i, &["add", name, "--password-stdin"]);
    }

    /// Waits until the database records `instance` (the first 8 bytes of its tokens) as
    /// `user`'s current one, or none with `None`: the node that changed it writes it in
    /// the background.
    fn wait_recorded(&self, user: &str, token: Option<&[u8]>) {
        let want = match token {
            Some(t) => i64::from_be_bytes(t[..8].try_into().unwrap()).to_string(),
            None => String::new(),
        };
        let sql = format!(
            "SELECT coalesce(instance::text, '') FROM relay.instances WHERE account = '{user}'"
        );
        self.wait_sql(&sql, &want);
    }

    /// Polls `sql` every 20 ms until psql prints `want`; fails after 15 s.
    fn wait_sql(&self, sql: &str, want: &str) {
        let start = Instant::now();
        loop {
            let got = self.pg.psql("relay", sql);
            if got.trim() == want {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(15),
                "{sql}: {got:?}, not {want:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The value of `series` (a full Prometheus series name) on node `i`; 0 if absent.
    fn metric(&self, i: usize, series: &str) -> f64 {
        let mut s = TcpStream::connect(("127.0.0.1", self.nodes[i].1)).expect("metrics port");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut page = String::new();
        s.read_to_string(&mut page).unwrap();
        page.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Polls node `i`'s `series` every 10 ms until `ok` holds; fails after 10 s.
    fn wait_metric(&self, i: usize, series: &str, ok: impl Fn(f64) -> bool) {
        let start = Instant::now();
        loop {
            let v = self.metric(i, series);
            if ok(v) {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "node {i}: {series} is {v}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

const LOCAL: Ipv4Addr = Ipv4Addr::LOCALHOST;
const PASSWORD_OK: &str = "relay_logins_total{method=\"password\",outcome=\"ok\"}";
const TOKEN_OK: &str = "relay_logins_total{method=\"resumption\",outcome=\"ok\"}";
const REPLACED_ELSEWHERE: &str = "relay_replaced_from_other_nodes_total";
const ALIVE: &str = "relay_cluster_nodes_alive";

/// One echo round trip through a `relay connect --listen` port: whether the demand was
/// accepted and the bytes came back.
fn echo_works(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if s.write_all(b"ping").is_err() || s.shutdown(Shutdown::Write).is_err() {
        return false;
    }
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back);
    back == b"ping"
}

#[test]
fn an_account_added_through_one_node_logs_in_on_the_other_at_once() {
    let c = Cluster::start(2);
    c.add(0, "cam");
    let started = Instant::now();
    let answer = Client::connect(c.node(1), LOCAL).login("cam", password(PASSWORD));
    assert!(matches!(answer, Answer::Ok(_)), "{answer:?}");
    assert!(started.elapsed() < WITHIN, "took {:?}", started.elapsed());
    // And a changed password counts there at once too.
    c.user(0, &["passwd", "cam", "--password-stdin"]);
    let again = Client::connect(c.node(1), LOCAL).login("cam", password("wrong one"));
    assert!(matches!(again, Answer::Refused(..)), "{again:?}");
}

/// A token issued by one node starts a login on the other, with no argon2 run there; and
/// back again, including after the device's instance changed on the first node while the
/// second still remembered an older one.
#[test]
fn a_token_from_one_node_is_accepted_by_the_other() {
    let c = Cluster::start(2);
    c.add(0, "cam");
    // The device logs in on node 1 first, so node 1 remembers that instance as current.
    let (first, old) = {
        let mut client = Client::connect(c.node(1), LOCAL);
        match client.login("cam", password(PASSWORD)) {
            Answer::Ok(t) => (client, t),
            other => panic!("{other:?}"),
        }
    };
    // It moves to node 0 with its password: a new instance, which node 0 records.
    drop(first);
    let on0 = Client::connect(c.node(0), LOCAL).login("cam", password(PASSWORD));
    let Answer::Ok(token) = on0 else {
        panic!("password login on node 0: {on0:?}")
    };
    assert_ne!(token[..8], old[..8], "a new instance");
    c.wait_recorded("cam", Some(&token));
    let password_logins_1 = c.metric(1, PASSWORD_OK);
    // It resumes on node 1 with node 0's token (node 1 remembered the older instance).
    let answer = Client::connect(c.node(1), LOCAL).login("cam", login_client::token(&token));
    let Answer::Ok(token1) = answer else {
        panic!("node 1 refused node 0's token: {answer:?}")
    };
    assert_eq!(c.metric(1, TOKEN_OK), 1.0);
    assert_eq!(
        c.metric(1, PASSWORD_OK),
        password_logins_1,
        "no password check on node 1"
    );
    // Node 1's token works on node 0 as well.
    let back = Client::connect(c.node(0), LOCAL).login("cam", login_client::token(&token1));
    assert!(matches!(back, Answer::Ok(_)), "{back:?}");
}

/// Token revocation holds across nodes: the token of an instance that logged out on one
/// node, or that another node's password login replaced, is refused on every node.
#[test]
fn a_token_revoked_on_one_node_is_refused_on_the_other() {
    let c = Cluster::start(2);
    c.add(0, "cam");
    let mut on0 = Client::connect(c.node(0), LOCAL);
    let Answer::Ok(token) = on0.login("cam", password(PASSWORD)) else {
        panic!("password login on node 0")
    };
    on0.logout();
    c.wait_recorded("cam", None);
    let answer = Client::connect(c.node(1), LOCAL).login("cam", login_client::token(&token));
    assert!(
        matches!(
            answer,
            Answer::Refused(relay_proto::ErrorCode::ResumeRejected, _)
        ),
        "{answer:?}"
    );

    let Answer::Ok(old) = Client::connect(c.node(0), LOCAL).login("cam", password(PASSWORD)) else {
        panic!("password login on node 0")
    };
    let Answer::Ok(new) = Client::connect(c.node(1), LOCAL).login("cam", password(PASSWORD)) else {
        panic!("password login on node 1")
    };
    c.wait_recorded("cam", Some(&new));
    let answer = Client::connect(c.node(0), LOCAL).login("cam", login_client::token(&old));
    assert!(
        matches!(answer, Answer::Refused(relay_proto::ErrorCode::Replaced, _)),
        "{answer:?}"
    );
}

#[test]
fn an_access_rule_changed_through_one_node_applies_on_the_other_within_a_second() {
    let c = Cluster::start(2);
    c.add(0, "cam");
    c.add(0, "alice");
    let echo = echo_service();
    let on1 = c.node(1);
    let _cam = on1.expose("cam", &["--service", &format!("echo=127.0.0.1:{echo}")]);
    let (_alice, port) = on1.forward("alice", "cam/echo");
    assert!(echo_works(port), "alice reaches cam through node 1");

    // alice stays logged in on node 1: only the change, not a login, can tell node 1.
    c.user(0, &["allow", "alice", "--none"]);
    let started = Instant::now();
    while echo_works(port) {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "node 1 never applied the new rule"
        );
    }
    let took = started.elapsed();
    eprintln!("access rule changed through node 0: applied on node 1 after {took:?}");
    assert!(took < WITHIN, "the rule took {took:?} to apply on node 1");
}

#[test]
fn an_account_deleted_through_one_node_ends_its_sessions_on_the_other_within_a_second() {
    let c = Cluster::start(2);
    c.add(0, "cam");
    c.add(0, "alice");
    let echo = echo_service();
    let on1 = c.node(1);
    let _cam = on1.expose("cam", &["--service", &format!("echo=127.0.0.1:{echo}")]);
    let (_alice, port) = on1.forward("alice", "cam/echo");
    // A session that stays open: bytes go through, then it waits.
    let mut session = TcpStream::connect(("127.0.0.1", port)).unwrap();
    session
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    session.write_all(b"ping").unwrap();
    let mut back = [0u8; 4];
    session.read_exact(&mut back).unwrap();
    assert_eq!(&back, b"ping");
    c.wait_metric(1, "relay_active_sessions", |v| v == 1.0);

    c.user(0, &["del", "cam"]);
    let started = Instant::now();
    // The session ends: its local connection reaches end of file.
    let mut rest = Vec::new();
    let _ = session.read_to_end(&mut rest);
    let took = started.elapsed();
    eprintln!("account deleted through node 0: its session on node 1 ended after {took:?}");
    assert!(
        took < WITHIN,
        "the session ended {took:?} after the deletion"
    );
    c.wait_metric(1, "relay_active_sessions", |v| v == 0.0);
    // cam's connections are gone from node 1, and cam cannot log in anywhere.
    for node in 0..2 {
        let answer = Client::connect(c.node(node), LOCAL).login("cam", password(PASSWORD));
        assert!(matches!(answer, Answer::Refused(..)), "{answer:?}");
    }
}

/// tokio-postgres logs every query's parameters at debug level: with `RUST_LOG=debug`,
/// `relay user add` printed the new password's argon2 hash (and `relay serve` the token
/// key). Never again, whatever RUST_LOG says.
#[test]
fn query_parameters_never_reach_the_log() {
    let c = Cluster::start(1);
    let mut child = Command::new(relay_bin())
        .args(["user", "add", "cam", "--password-stdin", "--config"])
        .arg(c.node(0).dir.path().join("relay.toml"))
        .env("RUST_LOG", "trace")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(PASSWORD.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("tokio_postgres"),
        "debug logging was on: {log}"
    );
    assert!(!log.contains("argon2id"), "{log}");
}

/// Each node registers in `relay.nodes` with its address and certificate fingerprint and
/// writes a heartbeat every second (the database's clock); a node killed with SIGKILL
/// stops beating and counts as dead 3 s after its last beat; a node stopped with SIGTERM
/// removes its row.
#[test]
fn nodes_register_and_beat_and_a_killed_one_goes_stale() {
    let mut c = Cluster::start(2);
    let live = "SELECT count(*) FROM relay.nodes WHERE heartbeat > now() - interval '3 seconds'";
    c.wait_sql(live, "2");
    let mut fingerprints = [c.node(0).fingerprint.clone(), c.node(1).fingerprint.clone()];
    fingerprints.sort();
    let registered = c.pg.psql(
        "relay",
        "SELECT string_agg(fingerprint, ',' ORDER BY fingerprint) FROM relay.nodes",
    );
    assert_eq!(registered.trim(), fingerprints.join(","));
    let addresses = c.pg.psql(
        "relay",
        "SELECT string_agg(address, ',' ORDER BY address) FROM relay.nodes",
    );
    let mut expected: Vec<String> = (0..2)
        .map(|i| format!("127.0.0.1:{}", c.node(i).tls_port))
        .collect();
    expected.sort();
    assert_eq!(addresses.trim(), expected.join(","));

    let (fp0, fp1) = (c.node(0).fingerprint.clone(), c.node(1).fingerprint.clone());
    let beat0 = format!(
        "SELECT extract(epoch FROM heartbeat) FROM relay.nodes WHERE fingerprint = '{fp0}'"
    );
    let first = c.pg.psql("relay", &beat0);
    let start = Instant::now();
    while c.pg.psql("relay", &beat0) == first {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "node 0 did not beat"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // Each node's /metrics says which node it is, where terminals reach it, and how
    // many nodes it sees alive.
    for i in 0..2 {
        let fp = &c.node(i).fingerprint;
        let id = c.pg.psql(
            "relay",
            &format!("SELECT id FROM relay.nodes WHERE fingerprint = '{fp}'"),
        );
        let port = c.node(i).tls_port;
        let info = format!(
            "relay_node_info{{node=\"{}\",address=\"127.0.0.1:{port}\"}}",
            id.trim()
        );
        assert_eq!(c.metric(i, &info), 1.0, "node {i}: {info}");
        c.wait_metric(i, ALIVE, |v| v == 2.0);
    }

    drop(c.nodes[1].0.proc.take()); // SIGKILL
    let killed = Instant::now();
    c.wait_sql(live, "1");
    c.wait_metric(0, ALIVE, |v| v == 1.0);
    eprintln!(
        "node 1 killed: dead to the others after {:?}",
        killed.elapsed()
    );
    let alive = format!(
        "SELECT count(*) FROM relay.nodes WHERE fingerprint = '{fp0}' \
         AND heartbeat > now() - interval '3 seconds'"
    );
    assert_eq!(c.pg.psql("relay", &alive).trim(), "1", "node 0 beats on");
    let stale = format!("SELECT count(*) FROM relay.nodes WHERE fingerprint = '{fp1}'");
    assert_eq!(
        c.pg.psql("relay", &stale).trim(),
        "1",
        "a killed node's row stays"
    );

    c.nodes[0].0.stop();
    let gone = format!("SELECT count(*) FROM relay.nodes WHERE fingerprint = '{fp0}'");
    assert_eq!(
        c.pg.psql("relay", &gone).trim(),
        "0",
        "a stopped node leaves"
    );
}

/// Presence: the row of a device's current instance says which node recorded it and
/// when (an epoch every node agrees on); it follows the device from node to node and
/// keeps the node when the device logs out.
#[test]
fn presence_follows_the_device_between_nodes() {
    let c = Cluster::start(2);
    c.add(0, "cam");
    let homed = "SELECT n.fingerprint || ' ' || i.epoch FROM relay.instances i \
                 JOIN relay.nodes n ON n.id = i.node WHERE i.account = 'cam'";
    let on = |node: usize| {
        let mut client = Client::connect(c.node(node), LOCAL);
        let Answer::Ok(token) = client.login("cam", password(PASSWORD)) else {
            panic!("password login on node {node}")
        };
        c.wait_recorded("cam", Some(&token));
        let row = c.pg.psql("relay", homed);
        let (fingerprint, epoch) = row.trim().split_once(' ').expect("a presence row");
        assert_eq!(fingerprint, c.node(node).fingerprint);
        (client, epoch.parse::<i64>().unwrap())
    };
    let (first, e0) = on(0);
    drop(first);
    let (second, e1) = on(1);
    assert!(e1 > e0, "epochs grow: {e0} then {e1}");
    second.logout();
    c.wait_recorded("cam", None);
    let row = c.pg.psql("relay", homed);
    assert!(row.starts_with(&c.node(1).fingerprint), "{row}");
}

/// A node whose write of a device's current instance fails (the database refused it for a
/// moment) writes it again with its next change: it used to be dropped, and the database
/// then held an older instance, whose tokens other nodes would accept.
#[test]
fn an_instance_record_the_database_refused_is_written_later() {
    let c = Cluster::start(1);
    c.add(0, "cam");
    c.add(0, "dev");
    c.pg.psql(
        "relay",
        "CREATE FUNCTION relay.refuse() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN RAISE EXCEPTION 'refused for the test'; END $$; \
         CREATE TRIGGER refuse BEFORE INSERT OR UPDATE ON relay.instances \
         FOR EACH ROW EXECUTE FUNCTION relay.refuse();",
    );
    let rollbacks = "SELECT xact_rollback FROM pg_stat_database WHERE datname = 'relay'";
    let before: u64 = c.pg.psql("relay", rollbacks).trim().parse().unwrap();
    let Answer::Ok(token) = Client::connect(c.node(0), LOCAL).login("cam", password(PASSWORD))
    else {
        panic!("password login of cam")
    };
    // The write was refused once the database counts one more failed transaction (the
    // node's warning is a log line, which a test does not wait on).
    c.wait_sql(
        &format!("SELECT xact_rollback > {before} FROM pg_stat_database WHERE datname = 'relay'"),
        "t",
    );
    c.pg.psql("relay", "DROP TRIGGER refuse ON relay.instances");
    // The next change on the node (another device's login) sends both.
    let Answer::Ok(_) = Client::connect(c.node(0), LOCAL).login("dev", password(PASSWORD)) else {
        panic!("password login of dev")
    };
    c.wait_recorded("cam", Some(&token));
}

/// Waits until node `from` redirects a DEMAND for `target` (it has heard of the device's
/// presence row and of its node's heartbeat); returns the redirect. A requester that
/// announces `REDIRECT` asks every 20 ms, for at most 10 s.
fn redirect_from(c: &Cluster, from: usize, target: &str) -> relay_proto::frame::Redirect {
    use relay_proto::frame::{DemandResult, caps};
    let mut client = Client::connect(c.node(from), LOCAL);
    let follows = caps::ALL | caps::REQUESTER | caps::REDIRECT;
    assert!(matches!(
        client.login_with(follows, "alice", password(PASSWORD)),
        Answer::Ok(_)
    ));
    let start = Instant::now();
    loop {
        match client.demand(target) {
            DemandResult::Redirect(to) => return to,
            other => assert!(
                start.elapsed() < Duration::from_secs(10),
                "node {from} never redirected: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A demand made on node 1 for a device logged in to node 0: node 1 redirects it there
/// (node 0's address and certificate fingerprint), `relay connect` follows, and a
/// mebibyte comes back byte for byte through node 0 alone (three hops: no byte crosses
/// node 1). Before redirects, node 1 answered `TargetOffline`.
#[test]
fn a_demand_for_a_device_on_another_node_is_redirected_there() {
    let c = Cluster::start(2);
    c.add(0, "cam");
    c.add(0, "alice");
    let echo = echo_service();
    let _cam = c
        .node(0)
        .expose("cam", &["--service", &format!("echo=127.0.0.1:{echo}")]);
    let to = redirect_from(&c, 1, "cam");
    assert_eq!(
        to.address.as_str(),
        format!("127.0.0.1:{}", c.node(0).tls_port)
    );
    let fingerprint: Vec<String> = to.fingerprint.iter().map(|b| format!("{b:02X}")).collect();
    assert_eq!(fingerprint.join(":"), c.node(0).fingerprint);

    let (_alice, port) = c.node(1).forward("alice", "cam/echo");
    let mut data = vec![0u8; 1 << 20];
    fill(&mut data, &mut 15);
    let back = round_trip(port, &data);
    assert!(back == data, "{} bytes came back, not the same", back.len());
    const REDIRECTED: &str = "relay_demands_total{outcome=\"redirected\"}";
    const ACCEPTED: &str = "relay_demands_total{outcome=\"accepted\"}";
    assert!(
        c.metric(1, REDIRECTED) >= 2.0,
        "the probe's and relay connect's"
    );
    assert_eq!(c.metric(1, ACCEPTED), 0.0, "no session on node 1");
    assert_eq!(c.metric(0, ACCEPTED), 1.0, "the session is node 0's");
    // And again: each demand is redirected once, on its own.
    assert!(echo_works(port));
    assert_eq!(c.metric(0, ACCEPTED), 2.0);
}

/// A terminal that does not announce `REDIRECT` (every terminal before redirects) gets
/// what it always got for a device on another node: `TargetOffline`; so does a device
/// homed nowhere, and, once the device logs out, a terminal that does announce it.
#[test]
fn an_old_terminal_gets_target_offline_for_a_device_on_another_node() {
    use relay_proto::frame::{DemandResult, caps};
    let c = Cluster::start(2);
    c.add(0, "cam");
    c.add(0, "alice");
    let mut cam = Client::connect(c.node(0), LOCAL);
    assert!(matches!(
        cam.login("cam", password(PASSWORD)),
        Answer::Ok(_)
    ));
    redirect_from(&c, 1, "cam");
    let offline = |r: &DemandResult| {
        matches!(
            r,
            DemandResult::Failed {
                error: relay_proto::DemandError::TargetOffline,
                ..
            }
        )
    };
    let mut old = Client::connect(c.node(1), LOCAL);
    assert!(matches!(
        old.login_with(caps::ALL | caps::REQUESTER, "alice", password(PASSWORD)),
        Answer::Ok(_)
    ));
    let answer = old.demand("cam");
    assert!(offline(&answer), "{answer:?}");

    cam.logout();
    let mut new = Client::connect(c.node(1), LOCAL);
    let follows = caps::ALL | caps::REQUESTER | caps::REDIRECT;
    assert!(matches!(
        new.login_with(follows, "alice", password(PASSWORD)),
        Answer::Ok(_)
    ));
    let start = Instant::now();
    loop {
        let answer = new.demand("cam");
        if offline(&answer) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "still redirected after the logout: {answer:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An account deleted while its device is logged in to node 0, then made again: node 1
/// forgets where the old one was (migration 5 announces a deleted presence row), so a
/// demand for the new account, logged in nowhere, is `TargetOffline` at once, not a
/// redirect to node 0. Red before migration 5: node 1 kept redirecting.
#[test]
fn an_account_deleted_and_made_again_is_not_redirected_to_its_old_node() {
    use relay_proto::frame::{DemandResult, caps};
    let c = Cluster::start(2);
    c.add(0, "cam");
    c.add(0, "alice");
    let mut cam = Client::connect(c.node(0), LOCAL);
    assert!(matches!(
        cam.login("cam", password(PASSWORD)),
        Answer::Ok(_)
    ));
    redirect_from(&c, 1, "cam");
    c.user(0, &["del", "cam"]);
    // Node 0 has closed the device (it writes no row for an account that is gone).
    let closed = cam.next_error();
    assert!(
        matches!(closed, None | Some(ErrorCode::AccountRemoved)),
        "{closed:?}"
    );
    c.add(0, "cam");
    let mut alice = Client::connect(c.node(1), LOCAL);
    let follows = caps::ALL | caps::REQUESTER | caps::REDIRECT;
    assert!(matches!(
        alice.login_with(follows, "alice", password(PASSWORD)),
        Answer::Ok(_)
    ));
    let start = Instant::now();
    loop {
        match alice.demand("cam") {
            DemandResult::Failed {
                error: relay_proto::DemandError::TargetOffline,
                ..
            } => break,
            other => assert!(
                start.elapsed() < WITHIN,
                "still answered {other:?} {:?} after the account was made again",
                start.elapsed()
            ),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Newest wins across nodes: a password login on node 1 for a user ID whose reachable
/// instance runs on node 0 moves the presence row to node 1 with a higher epoch, and
/// node 0, told by NOTIFY, ends its instance with ERROR `Replaced`, as a second login on
/// node 0 itself would. Red before: node 0's connection stayed logged in.
#[test]
fn newest_wins_across_nodes() {
    let c = Cluster::start(2);
    c.add(0, "cam");
    let epoch = "SELECT epoch FROM relay.instances WHERE account = 'cam'";
    let mut older = Client::connect(c.node(0), LOCAL);
    let Answer::Ok(t0) = older.login("cam", password(PASSWORD)) else {
        panic!("password login on node 0")
    };
    c.wait_recorded("cam", Some(&t0));
    let e0: i64 = c.pg.psql("relay", epoch).trim().parse().unwrap();
    c.wait_metric(0, "relay_logged_in_terminals", |v| v == 1.0);

    let start = Instant::now();
    let mut newer = Client::connect(c.node(1), LOCAL);
    let Answer::Ok(t1) = newer.login("cam", password(PASSWORD)) else {
        panic!("password login on node 1")
    };
    assert_eq!(older.next_error(), Some(ErrorCode::Replaced));
    eprintln!(
        "newest wins: node 0's instance replaced {:?} after the login on node 1",
        start.elapsed()
    );
    c.wait_recorded("cam", Some(&t1));
    let e1: i64 = c.pg.psql("relay", epoch).trim().parse().unwrap();
    assert!(e1 > e0, "epochs: {e0} then {e1}");
    c.wait_metric(0, "relay_logged_in_terminals", |v| v == 0.0);
    assert_eq!(c.metric(1, "relay_logged_in_terminals"), 1.0);
    assert_eq!(
        c.metric(0, REPLACED_ELSEWHERE),
        1.0,
        "counted where it ended"
    );
    assert_eq!(c.metric(1, REPLACED_ELSEWHERE), 0.0);
    // The replaced instance stops: its token is refused with Replaced on either node.
    for node in 0..2 {
        let again = Client::connect(c.node(node), LOCAL).login("cam", token(&t0));
        assert_eq!(
            again,
            Answer::Refused(ErrorCode::Replaced, None),
            "node {node}"
        );
    }
    // The newer one stays.
    assert_eq!(c.metric(1, "relay_logged_in_terminals"), 1.0);
    drop(newer);
}

/// Idle terminals must outlive a long test: the fleet sends no keep-alives.
const PATIENT: &str = "keepalive_interval = \"5m\"\nkeepalive_timeout = \"10m\"";

impl Cluster {
    /// Node `i`'s plain listener.
    fn plain(&self, i: usize) -> std::net::SocketAddr {
        (Ipv4Addr::LOCALHOST, self.node(i).plain_port).into()
    }

    /// Accounts `t0` … `t{n-1}` (one argon2 hash, copied by SQL) and for each the LOGIN
    /// frame of a reachable terminal resuming with a token minted from the database's key
    /// (any node accepts it: no argon2 at login either).
    fn token_logins(&self, n: usize) -> Vec<Vec<u8>> {
        use relay_host::store::ServerSecret;
        use relay_host::token::{InstanceId, TokenKey};
        use relay_proto::frame::{Credential, Frame, Hello, Login, caps};
        self.add(0, "seed");
        self.pg.psql(
            "relay",
            &format!(
                "INSERT INTO relay.accounts (name, phc, created, restricted, credential) \
                 SELECT 't' || i, phc, created, restricted, credential \
                 FROM relay.accounts, generate_series(0, {}) AS i WHERE name = 'seed'",
                n - 1
            ),
        );
        let stamp: i64 = self
            .pg
            .psql(
                "relay",
                "SELECT credential FROM relay.accounts WHERE name = 'seed'",
            )
            .trim()
            .parse()
            .unwrap();
        let hex = self.pg.psql(
            "relay",
            "SELECT encode(secret, 'hex') FROM relay.server_secret",
        );
        let hex = hex.trim();
        let secret: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
            .collect();
        let key = TokenKey::new(&ServerSecret::from_bytes(secret.try_into().unwrap()));
        let expiry = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600;
        (0..n)
            .map(|i| {
                let user = format!("t{i}");
                let token = key.issue(&user, stamp as u64, InstanceId(i as u64 + 1), expiry);
                let frame = Frame::Login(Login {
                    hello: Hello::current(caps::ALL),
                    user: relay_proto::UserId::new(&user).unwrap(),
                    credential: Credential::Resume(
                        relay_proto::ResumeToken::from_slice(&token).unwrap(),
                    ),
                });
                let mut buf = [0u8; 512];
                let len = frame.encode(&mut buf).unwrap();
                buf[..len].to_vec()
            })
            .collect()
    }

    /// Password logins node `i` has checked (argon2 runs), whatever their outcome.
    fn password_checks(&self, i: usize) -> f64 {
        ["ok", "failed"]
            .iter()
            .map(|o| {
                self.metric(
                    i,
                    &format!("relay_logins_total{{method=\"password\",outcome=\"{o}\"}}"),
                )
            })
            .sum()
    }

    /// The user IDs node `i`'s dashboard shows logged in (its admin view).
    fn homed(&self, i: usize) -> std::collections::BTreeSet<String> {
        dashboard_users(self.nodes[i].1)
    }

    /// Signals every process of the database server (the postmaster and its backends).
    fn signal_database(&self, sig: i32) {
        let root = self.pg.pid() as i32;
        let mut pids = vec![root];
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
            // "pid (comm) state ppid …": the fields after the last ')'.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<i32>().ok());
            if ppid == Some(root) {
                pids.push(pid);
            }
        }
        for pid in pids {
            assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "signal {sig} to {pid}");
        }
    }
}

/// The user IDs the dashboard on admin port `port` shows logged in.
fn dashboard_users(port: u16) -> std::collections::BTreeSet<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("admin port");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut page = String::new();
    s.read_to_string(&mut page).unwrap();
    page.split("id=\"terminal-")
        .skip(1)
        .filter_map(|rest| rest.split('"').next().map(str::to_owned))
        .collect()
}

/// Samples two nodes' dashboards in a loop: node 0, node 1, node 0 again. A user ID on
/// node 0 both times and on node 1 between was on both at once.
struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(usize, Vec<String>)>,
}

impl Sampler {
    fn start(ports: [u16; 2]) -> Sampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let (mut samples, mut doubles) = (0, Vec::new());
            let mut before = dashboard_users(ports[0]);
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                let other = dashboard_users(ports[1]);
                let after = dashboard_users(ports[0]);
                doubles.extend(
                    before
                        .intersection(&after)
                        .filter(|u| other.contains(*u))
                        .cloned(),
                );
                before = after;
                samples += 1;
            }
            (samples, doubles)
        });
        Sampler { stop, thread }
    }

    /// Stops; the number of samples and the user IDs seen on both nodes at once.
    fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

impl Cluster {
    /// Pauses the database (SIGSTOP) for `pause`, checking that `nodes` fence meanwhile,
    /// then lets it go on (SIGCONT). Returns how long the nodes took to fence.
    fn pause_database(&self, nodes: &[usize], pause: Duration) -> Duration {
        self.signal_database(libc::SIGSTOP);
        let paused = Instant::now();
        for &i in nodes {
            self.wait_metric(i, "relay_fenced", |v| v == 1.0);
        }
        let fenced = paused.elapsed();
        for &i in nodes {
            // Closing thousands of connections takes a moment.
            wait_until(Duration::from_secs(10), "the fenced node empties", || {
                self.homed(i).is_empty()
            });
        }
        // The pause the scenario is about.
        std::thread::sleep(pause.saturating_sub(paused.elapsed()));
        self.signal_database(libc::SIGCONT);
        fenced
    }
}

/// `relay expose` of `user` with every node's plain listener in `--server`, node 0
/// first, serving `echo` on `port`.
fn expose_everywhere(c: &Cluster, user: &str, port: u16) -> Proc {
    let servers: Vec<String> = (0..c.nodes.len()).map(|i| c.plain(i).to_string()).collect();
    let mut cmd = Command::new(relay_bin());
    cmd.args(["expose", "--plain", "--server", &servers.join(",")])
        .args([
            "--user",
            user,
            "--service",
            &format!("echo=127.0.0.1:{port}"),
        ])
        .env("RELAY_PASSWORD", PASSWORD);
    let p = Proc::spawn(&format!("expose {user}"), cmd);
    p.wait_for("logged in to the relay", Duration::from_secs(20));
    p
}

/// Polls `ok` every 10 ms; fails with `what` after `within`. Returns the time it took.
fn wait_until(within: Duration, what: &str, mut ok: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < within, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    start.elapsed()
}

/// `kill -9` of the node that holds every terminal: they all log in again through the
/// other two (with their tokens: no password check anywhere), the real `relay expose`
/// with several `--server` addresses among them, reachable through its new node.
#[test]
fn a_killed_node_s_terminals_are_reachable_again_through_the_others() {
    const N: usize = 200;
    let mut c = Cluster::start_with(3, PATIENT);
    let logins = c.token_logins(N);
    let fleet = fleet::Fleet::start((0..3).map(|i| c.plain(i)).collect(), logins, |_| 0);
    c.add(0, "cam");
    c.add(0, "laptop");
    let echo = echo_service();
    let _cam = expose_everywhere(&c, "cam", echo);
    wait_until(Duration::from_secs(60), "every terminal on node 0", || {
        fleet.on(0) == N
    });
    c.wait_metric(0, "relay_logged_in_terminals", |v| v == N as f64 + 1.0);
    let checks = c.password_checks(1) + c.password_checks(2);

    let killed = fleet.now_ms();
    drop(c.nodes[0].0.proc.take()); // SIGKILL
    let all = wait_until(
        Duration::from_secs(30),
        "every terminal on nodes 1 and 2",
        || fleet.on(1) + fleet.on(2) == N,
    );
    let mut took: Vec<u64> = fleet.login_times().iter().map(|t| t - killed).collect();
    took.sort();
    eprintln!(
        "node 0 killed with {N} terminals: 99 % reachable again after {} ms, all after {all:?}",
        took[N * 99 / 100 - 1]
    );
    wait_until(Duration::from_secs(30), "cam on node 1", || {
        c.metric(1, "relay_logged_in_terminals") + c.metric(2, "relay_logged_in_terminals")
            == N as f64 + 1.0
    });
    // The real terminal took the next address of its list: node 1.
    let (_fwd, port) = c.node(1).forward("laptop", "cam/echo");
    assert!(echo_works(port), "cam reachable through node 1");
    assert_eq!(
        c.password_checks(1) + c.password_checks(2) - checks,
        1.0,
        "only laptop's own login checked a password: the moved terminals used tokens"
    );
}

/// The database paused (SIGSTOP) for 5 s: both nodes fence (close their terminals,
/// refuse logins) within 2 s, so no user ID is ever reachable on both, sampled from
/// their dashboards throughout; after SIGCONT every terminal is reachable again.
#[test]
fn a_paused_database_never_leaves_a_user_id_on_two_nodes() {
    const N: usize = 50;
    let c = Cluster::start_with(2, PATIENT);
    let logins = c.token_logins(N);
    let fleet = fleet::Fleet::start(vec![c.plain(0), c.plain(1)], logins, |i| i % 2);
    c.add(0, "cam");
    let _cam = expose_everywhere(&c, "cam", echo_service());
    wait_until(Duration::from_secs(60), "every terminal up", || {
        fleet.up() == N
    });

    let sampler = Sampler::start([c.nodes[0].1, c.nodes[1].1]);
    let fenced = c.pause_database(&[0, 1], Duration::from_secs(5));
    eprintln!("database paused: both nodes fenced after {fenced:?}");
    let resumed = wait_until(Duration::from_secs(60), "every terminal up again", || {
        fleet.up() == N
    });
    wait_until(Duration::from_secs(60), "cam back", || {
        c.homed(0).contains("cam") || c.homed(1).contains("cam")
    });
    eprintln!("database resumed: every terminal reachable again after {resumed:?}");
    for i in 0..2 {
        assert_eq!(c.metric(i, "relay_fenced"), 0.0, "node {i} unfenced");
    }
    let (samples, doubles) = sampler.finish();
    eprintln!(
        "{samples} samples of both nodes' presence: {} user IDs on two nodes",
        doubles.len()
    );
    assert!(samples > 10, "{samples} samples");
    assert!(doubles.is_empty(), "on two nodes at once: {doubles:?}");
}

/// A node stopped with SIGTERM drains: every terminal gets ERROR `ShuttingDown`, which
/// is no failure to it, and moves to its next relay address within 250 ms (plus the
/// login there); the real `relay expose` with both nodes in `--server` is reachable
/// through node 1 soon after.
#[test]
fn a_draining_node_s_terminals_move_to_the_next_relay() {
    const N: usize = 50;
    let mut c = Cluster::start_with(2, PATIENT);
    let fleet = fleet::Fleet::start(vec![c.plain(0), c.plain(1)], c.token_logins(N), |_| 0);
    c.add(0, "cam");
    c.add(0, "laptop");
    let _cam = expose_everywhere(&c, "cam", echo_service());
    wait_until(Duration::from_secs(60), "every terminal on node 0", || {
        fleet.on(0) == N
    });
    assert!(c.homed(0).contains("cam"));
    let stopping = Instant::now();
    c.nodes[0].0.proc().signal("-TERM");
    let moved = wait_until(Duration::from_secs(30), "cam on node 1", || {
        c.homed(1).contains("cam")
    });
    eprintln!("node 0 draining: cam (relay expose) reachable through node 1 after {moved:?}");
    wait_until(Duration::from_secs(30), "every terminal on node 1", || {
        fleet.on(1) == N
    });
    let (ok, log) = c.nodes[0]
        .0
        .proc
        .take()
        .unwrap()
        .wait_exit(Duration::from_secs(15));
    assert!(ok, "node 0 exits 0 after draining:\n{log}");
    eprintln!("node 0 stopped {:?} after SIGTERM", stopping.elapsed());
    let (_fwd, port) = c.node(1).forward("laptop", "cam/echo");
    assert!(echo_works(port), "cam reachable through node 1");
}

/// The median of `v` (sorted in place).
fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Issue 15's failure figures, ignored by default (10,000 terminals, or
/// `RELAY_CLUSTER_TERMINALS`; `RELAY_CLUSTER_ROUNDS` fresh clusters, 3 by default), medians
/// printed:
///
/// - seconds from `kill -9` of one of 3 nodes until 99 % of the terminals are reachable
///   again (logged in on a live node), and until all are (target ≤ 10 s);
/// - password checks (argon2 runs) on the surviving nodes meanwhile (target 0: the
///   terminals resume with their tokens);
/// - user IDs on two nodes at once while the database is then paused for 5 s, sampled
///   from both survivors' dashboards (target 0).
///
/// `RELAY_CLUSTER_TERMINALS=10000 cargo test -p relay-tests --test host_cluster -- --ignored --nocapture figures`
#[test]
#[ignore]
fn figures_failover_and_database_pause() {
    let n: usize = std::env::var("RELAY_CLUSTER_TERMINALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let rounds: usize = std::env::var("RELAY_CLUSTER_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let (mut t99, mut t100, mut checks, mut doubles) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        let mut c = Cluster::start_with(3, PATIENT);
        let fleet = fleet::Fleet::start(
            (0..3).map(|i| c.plain(i)).collect(),
            c.token_logins(n),
            |i| i % 3,
        );
        let up = wait_until(Duration::from_secs(600), "every terminal up", || {
            fleet.up() == n
        });
        let on0 = fleet.on(0);
        let before = c.password_checks(1) + c.password_checks(2);
        let killed = Instant::now();
        drop(c.nodes[0].0.proc.take()); // SIGKILL
        let at99 = wait_until(Duration::from_secs(300), "99 % up again", || {
            fleet.on(1) + fleet.on(2) >= n * 99 / 100
        });
        wait_until(Duration::from_secs(300), "all up again", || {
            fleet.on(1) + fleet.on(2) == n
        });
        let all = killed.elapsed();
        let argon2 = c.password_checks(1) + c.password_checks(2) - before;

        let sampler = Sampler::start([c.nodes[1].1, c.nodes[2].1]);
        let fenced = c.pause_database(&[1, 2], Duration::from_secs(5));
        let resumed = wait_until(Duration::from_secs(300), "all up after the pause", || {
            fleet.up() == n
        });
        let (samples, both) = sampler.finish();
        eprintln!(
            "round {round}: {n} terminals up in {up:.1?}; node 0 killed holding {on0}: 99 % \
             reachable again after {at99:.2?}, all after {all:.2?}, {argon2} password checks; \
             database paused 5 s: fenced after {fenced:.2?}, all up {resumed:.2?} after SIGCONT, \
             {} user IDs on two nodes in {samples} samples",
            both.len()
        );
        t99.push(at99.as_secs_f64());
        t100.push(all.as_secs_f64());
        checks.push(argon2);
        doubles.push(both.len() as f64);
    }
    eprintln!(
        "medians of {rounds} rounds, {n} terminals, 3 nodes: 99 % reachable again {:.2} s \
         after kill -9 (all: {:.2} s), {} argon2 verifications, {} user IDs held by two \
         nodes during a 5 s database pause",
        median(&mut t99),
        median(&mut t100),
        median(&mut checks),
        median(&mut doubles)
    );
}

/// A device that resumes with its token on another node moves its presence there (the
/// row names node 1 with a newer epoch), and what is left of it on node 0 closes without
/// an ERROR (`Replaced` would stop the device): a user ID is reachable on one node.
#[test]
fn a_device_resuming_on_another_node_takes_its_presence_along() {
    let c = Cluster::start(2);
    c.add(0, "cam");
    let homed = "SELECT n.fingerprint FROM relay.instances i \
                 JOIN relay.nodes n ON n.id = i.node WHERE i.account = 'cam'";
    let mut left = Client::connect(c.node(0), LOCAL);
    let Answer::Ok(t) = left.login("cam", password(PASSWORD)) else {
        panic!("password login on node 0")
    };
    c.wait_sql(homed, &c.node(0).fingerprint);
    let mut moved = Client::connect(c.node(1), LOCAL);
    let Answer::Ok(_) = moved.login("cam", token(&t)) else {
        panic!("token login on node 1")
    };
    c.wait_sql(homed, &c.node(1).fingerprint);
    assert_eq!(left.next_error(), None, "closed without an ERROR");
    c.wait_metric(0, "relay_logged_in_terminals", |v| v == 0.0);
    assert_eq!(c.metric(1, "relay_logged_in_terminals"), 1.0);
    drop(moved);
}

/// `relay online` on one node lists the devices logged in to the others too, under the
/// same access rule as its own (before, node 1 listed only its own terminals); once a
/// killed node is dead to the others (its heartbeat 3 s stale), its devices leave their
/// lists.
#[test]
fn relay_online_lists_the_whole_cluster_and_forgets_a_dead_node() {
    let mut c = Cluster::start(2);
    for u in ["cam", "dev", "secret", "alice"] {
        c.add(0, u);
    }
    c.user(0, &["allow", "alice", "--targets", "cam,dev"]);
    let echo = echo_service();
    let service = format!("echo=127.0.0.1:{echo}");
    let _cam = c.node(0).expose("cam", &["--service", &service]);
    let _secret = c.node(0).expose("secret", &["--service", &service]);
    let _dev = c.node(1).expose("dev", &["--service", &service]);
    // Both devices log in at their own pace: wait until each node lists both (the
    // other node's through its presence copy), then check the whole list.
    let both = |seen: &[String]| ["cam", "dev"].iter().all(|u| seen.iter().any(|s| s == u));
    for n in [1, 0] {
        let mut seen = Vec::new();
        let took = wait_until(Duration::from_secs(10), "a node lists cam and dev", || {
            seen = c.node(n).online_list("alice");
            both(&seen)
        });
        eprintln!("node {n} listed cam and dev after {took:?}");
        assert_eq!(seen, ["cam", "dev"], "node {n}: once each, not secret");
    }

    drop(c.nodes[0].0.proc.take()); // SIGKILL
    let killed = Instant::now();
    wait_until(Duration::from_secs(10), "node 1 forgets cam", || {
        c.node(1).online_list("alice") == ["dev"]
    });
    let after = killed.elapsed();
    eprintln!("node 0 killed: its devices left node 1's list after {after:?}");
    assert!(
        after >= Duration::from_secs(1),
        "only once its heartbeat is stale"
    );
}

/// A node listening on every interface (`0.0.0.0`) must say where terminals reach it:
/// without `--advertise`, `relay serve` refuses to start (before, it registered
/// `0.0.0.0:PORT`, and the other nodes redirected terminals there); with it, its
/// `relay.nodes` row, which redirects carry, holds the advertised address.
#[test]
fn a_node_listening_everywhere_must_advertise_where_terminals_reach_it() {
    let c = Cluster::start(1);
    let url = c
        .node(0)
        .config
        .split("database = \"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the database URL in node 0's config")
        .to_owned();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let serve = |extra: &[&str]| {
        let mut cmd = Command::new(relay_bin());
        cmd.args([
            "serve",
            "--database",
            &url,
            "--listen",
            &format!("0.0.0.0:{port}"),
        ])
        .arg("--db")
        .arg(dir.path().join("relay.db"))
        .args(extra)
        .env_remove("RELAY_CONFIG");
        cmd
    };
    let refused = serve(&[]).stderr(Stdio::piped()).output().unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "started: {err}");
    assert!(err.contains("advertise = \"HOST:PORT\""), "{err}");

    let advertised = format!("127.0.0.1:{port}");
    let node = Proc::spawn("relay", serve(&["--advertise", &advertised]));
    node.wait_for_n("listening", 1, Duration::from_secs(20));
    c.wait_sql(
        &format!("SELECT count(*) FROM relay.nodes WHERE address = '{advertised}'"),
        "1",
    );
    assert_eq!(
        c.pg.psql(
            "relay",
            "SELECT count(*) FROM relay.nodes WHERE address LIKE '0.0.0.0:%'"
        )
        .trim(),
        "0"
    );
}

/// A draining node is no target for redirects: from its SIGTERM on, the others answer a
/// demand for a device still homed on it `TargetOffline` while it drains (before, they
/// sent requesters to the leaving node until its row went, up to its 5 s grace later).
/// The drain is held open by a session through node 0 whose requester reads nothing.
#[test]
fn a_draining_node_is_no_redirect_target() {
    use relay_proto::frame::{DemandResult, caps};
    let c = Cluster::start(2);
    c.add(0, "cam");
    c.add(0, "alice");
    let echo = echo_service();
    let _cam = c
        .node(0)
        .expose("cam", &["--service", &format!("echo=127.0.0.1:{echo}")]);
    redirect_from(&c, 1, "cam");
    let (_alice, port) = c.node(0).forward("alice", "cam/echo");
    let mut stuck = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stuck
        .set_write_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let chunk = vec![0u8; 1 << 16];
    while stuck.write_all(&chunk).is_ok() {}

    let mut client = Client::connect(c.node(1), LOCAL);
    let follows = caps::ALL | caps::REQUESTER | caps::REDIRECT;
    assert!(matches!(
        client.login_with(follows, "alice", password(PASSWORD)),
        Answer::Ok(_)
    ));
    let fp0 = c.node(0).fingerprint.clone();
    let row = format!("SELECT count(*) FROM relay.nodes WHERE fingerprint = '{fp0}'");
    c.nodes[0].0.proc().signal("-TERM");
    let sigterm = Instant::now();
    loop {
        let answer = client.demand("cam");
        // Rows only go: present now, present at the answer.
        let present = c.pg.psql("relay", &row).trim() == "1";
        match answer {
            DemandResult::Redirect(_) => assert!(
                sigterm.elapsed() < Duration::from_secs(10),
                "node 1 still redirects to the draining node 0"
            ),
            DemandResult::Failed { .. } => {
                assert!(present, "node 0 had left: this was no drain");
                break;
            }
            other => panic!("{other:?}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "node 0 draining: node 1 stopped redirecting to it {:?} after SIGTERM",
        sigterm.elapsed()
    );
}
