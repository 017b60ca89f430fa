//! The operator dashboard, served beside `/metrics` on the admin listener: logged-in
//! terminals, running sessions, recent failed and throttled logins, a button that kicks a
//! terminal (closes its connections; the account stays) and one that ends a session.
//!
//! The server feeds a [`Board`] from the core's events (it keeps no state of its own that
//! the core does not announce) and receives the operator's requests as [`AdminRequest`]s,
//! which it carries out through the core's API under the core's lock. The page is plain
//! HTML that reloads itself every two seconds: no script, nothing to build.
//!
//! The buttons POST to URLs that carry a random nonce of this run, which only a reader of
//! the page knows: another site open in the operator's browser cannot forge them (CSRF).

use std::collections::{BTreeMap, VecDeque};
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::SystemTime;

use tokio::sync::mpsc;

/// Failed logins kept for the page.
const RECENT_FAILURES: usize = 20;

/// What the operator asked for on the page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminRequest {
    /// Close this user's connections, telling its terminals so (the account stays).
    Kick(String),
    /// End this running session; both sides stay logged in.
    EndSession(u32),
    /// Someone is looking at the page: hand the sessions' byte counts to
    /// [`Board::counted`], for its next reload (nobody looking, nothing counted).
    CountBytes,
}

#[derive(Debug)]
struct TerminalRow {
    peer: String,
    since: SystemTime,
    logins: u32,
}

#[derive(Debug)]
struct SessionRow {
    from: String,
    to: String,
    service: String,
    since: SystemTime,
    /// Payload bytes (requester to target, target to requester) at the last count.
    bytes: (u64, u64),
}

#[derive(Debug)]
struct FailureRow {
    at: SystemTime,
    user: String,
    peer: String,
    why: String,
}

#[derive(Debug, Default)]
struct State {
    terminals: BTreeMap<String, TerminalRow>,
    sessions: BTreeMap<u32, SessionRow>,
    failures: VecDeque<FailureRow>,
}

/// The dashboard's view of the relay, and the way back to the server.
#[derive(Debug)]
pub struct Board {
    state: Mutex<State>,
    requests: mpsc::UnboundedSender<AdminRequest>,
    /// Carried by the page's buttons and required by every action (hex, random per run).
    nonce: String,
}

impl Board {
    /// A board and the receiver of the operator's requests (the server's to carry out).
    /// Fails only if the system has no randomness for the nonce.
    pub fn new() -> std::io::Result<(Self, mpsc::UnboundedReceiver<AdminRequest>)> {
        let mut random = [0u8; 16];
        getrandom::getrandom(&mut random).map_err(std::io::Error::other)?;
        let (tx, rx) = mpsc::unbounded_channel();
        let board = Self {
            state: Mutex::default(),
            requests: tx,
            nonce: random.iter().map(|b| format!("{b:02x}")).collect(),
        };
        Ok((board, rx))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection of `user` logged in (the first one is the terminal's login).
    pub fn logged_in(&self, user: &str, peer: &str) {
        let mut st = self.state();
        let row = st.terminals.entry(user.to_owned()).or_insert(TerminalRow {
            peer: peer.to_owned(),
            since: SystemTime::now(),
            logins: 0,
        });
        row.logins += 1;
    }

    /// `user` has no terminal logged in any more.
    pub fn offline(&self, user: &str) {
        self.state().terminals.remove(user);
    }

    /// A session started.
    pub fn session_started(&self, session: u32, from: &str, to: &str, service: &str) {
        let row = SessionRow {
            from: from.to_owned(),
            to: to.to_owned(),
            service: service.to_owned(),
            since: SystemTime::now(),
            bytes: (0, 0),
        };
        self.state().sessions.insert(session, row);
    }

    /// A session ended.
    pub fn session_ended(&self, session: u32) {
        self.state().sessions.remove(&session);
    }

    /// The running sessions' byte counts: (session, up, down).
    pub fn counted(&self, counts: impl Iterator<Item = (u32, u64, u64)>) {
        let mut st = self.state();
        for (session, up, down) in counts {
            if let Some(row) = st.sessions.get_mut(&session) {
                row.bytes = (up, down);
            }
        }
    }

    /// A login failed or was throttled; the oldest of [`RECENT_FAILURES`] goes.
    pub fn login_failed(&self, user: &str, peer: &str, why: &str) {
        let mut st = self.state();
        if st.failures.len() == RECENT_FAILURES {
            st.failures.pop_back();
        }
        st.failures.push_front(FailureRow {
            at: SystemTime::now(),
            user: user.to_owned(),
            peer: peer.to_owned(),
            why: why.to_owned(),
        });
    }

    /// Passes an operator's request to the server.
    fn request(&self, r: AdminRequest) -> bool {
        self.requests.send(r).is_ok()
    }

    /// The page.
    pub fn render(&self, token: Option<&str>) -> String {
        let st = self.state();
        let now = SystemTime::now();
        let age = |t: SystemTime| {
            let secs = now.duration_since(t).map_or(0, |d| d.as_secs());
            humantime::format_duration(std::time::Duration::from_secs(secs)).to_string()
        };
        let mut q = format!("&amp;nonce={}", self.nonce);
        if let Some(t) = token {
            let _ = write!(q, "&amp;token={}", percent_encode(t));
        }
        let mut html = String::from(HEAD);
        let _ = write!(
            html,
            "<h2>Logged-in terminals ({})</h2>",
            st.terminals.len()
        );
        html.push_str(KICK_NOTE);
        html.push_str("<table id=terminals><tr><th>user</th><th>from</th><th>logged in for</th><th>connection logins</th><th></th></tr>");
        for (user, t) in &st.terminals {
            let (u, in_url) = (escape(user), percent_encode(user));
            let _ = write!(
                html,
                "<tr id=\"terminal-{u}\"><td>{u}</td><td>{}</td><td>{}</td><td>{}</td><td><form method=post action=\"/kick?user={in_url}{q}\"><button id=\"kick-{u}\">kick</button></form></td></tr>",
                escape(&t.peer),
                age(t.since),
                t.logins
            );
        }
        let _ = write!(
            html,
            "</table><h2>Running sessions ({})</h2>",
            st.sessions.len()
        );
        html.push_str(END_NOTE);
        html.push_str("<table id=sessions><tr><th>session</th><th>from</th><th>to</th><th>service</th><th>running for</th><th>bytes up</th><th>bytes down</th><th></th></tr>");
        for (id, s) in &st.sessions {
            let _ = write!(
                html,
                "<tr id=\"session-{id}\"><td>{id}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=up>{}</td><td class=down>{}</td><td><form method=post action=\"/end?session={id}{q}\"><button id=\"end-{id}\">end</button></form></td></tr>",
                escape(&s.from),
                escape(&s.to),
                escape(&s.service),
                age(s.since),
                s.bytes.0,
                s.bytes.1
            );
        }
        html.push_str("</table><h2>Recent failed and throttled logins</h2><table id=failures><tr><th>ago</th><th>user</th><th>from</th><th>why</th></tr>");
        for f in &st.failures {
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                age(f.at),
                escape(&f.user),
                escape(&f.peer),
                escape(&f.why)
            );
        }
        html.push_str("</table></body></html>\n");
        html
    }
}

const HEAD: &str = "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=2><title>relay</title><style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 10px;text-align:left}</style></head><body><h1>Relay</h1>";

/// What a kick does, said where the button is.
const KICK_NOTE: &str = "<p>A kick closes the terminal's connections now (it is told: <i>connections closed by the operator</i>). Its account stays, so a device logs in again after its back-off: to keep it out, delete the account (<code>relay user del NAME</code>).</p>";

/// What ending a session does.
const END_NOTE: &str = "<p><i>end</i> ends that session: both sides are told (<i>the relay's operator ended the session</i>) and stay logged in.</p>";

/// A query value as it goes into a URL: every byte but `A-Z a-z 0-9 - . _ ~` as `%XX`
/// (user IDs may hold `&`, `#`, `%`, `+`).
fn percent_encode(s: &str) -> String {
    s.bytes().fold(String::new(), |mut out, b| {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                out.push(b as char)
            }
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
        out
    })
}

/// A query value from a URL (`%XX` and `+` as a space, as forms send it); `None` if it is
/// not valid percent-encoded UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let mut out = Vec::with_capacity(s.len());
    let mut bytes = s.bytes();
    while let Some(b) = bytes.next() {
        out.push(match b {
            b'%' => {
                let hex = [bytes.next()?, bytes.next()?];
                u8::from_str_radix(std::str::from_utf8(&hex).ok()?, 16).ok()?
            }
            b'+' => b' ',
            b => b,
        });
    }
    String::from_utf8(out).ok()
}

/// HTML-escapes user IDs and addresses (they come from the network).
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Who may use the dashboard: anyone who reaches a loopback listener; elsewhere only with
/// the configured `admin_token` (and without one, nobody).
#[derive(Debug)]
pub struct Access {
    /// The admin listener's address.
    pub listen: SocketAddr,
    /// `admin_token` from the config.
    pub token: Option<String>,
}

/// The parts of an HTTP request the dashboard looks at.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// POST (else GET).
    pub post: bool,
    pub path: &'a str,
    pub query: &'a str,
    /// The `Host` header ("" without one).
    pub host: &'a str,
}

/// What the dashboard answers to one request.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    /// The page, with the token to carry in its links.
    Page(String),
    /// Done: back to the page.
    SeeOther(String),
    /// No token, or the wrong one.
    Forbidden,
    /// Not a dashboard request.
    NotMine,
}

impl Access {
    /// With a token, whoever knows it. Without, a loopback listener asked for by a
    /// loopback name: a page of another site whose name was re-pointed at 127.0.0.1 (DNS
    /// rebinding) sends its own name as `Host` and is refused, so it cannot read the nonce.
    fn allowed(&self, query: &BTreeMap<String, String>, host: &str) -> bool {
        match &self.token {
            Some(t) => same_secret(query.get("token").map_or("", String::as_str), t),
            None => self.listen.ip().is_loopback() && loopback_host(host),
        }
    }
}

/// Whether an HTTP `Host` (`127.0.0.1:9835`, `[::1]:9835`, `localhost`) names loopback.
fn loopback_host(host: &str) -> bool {
    let name = host
        .rsplit_once(':')
        .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
        .map_or(host, |(name, _)| name);
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Whether `given` is `secret`, in a time that depends on neither's bytes nor on where
/// they first differ: both are hashed to fixed-length digests first (so a wrong length
/// takes the same path as wrong bytes), which are then compared in constant time. A
/// missing token is the empty string, refused the same way.
fn same_secret(given: &str, secret: &str) -> bool {
    use sha2::{Digest, Sha256};
    use subtle::ConstantTimeEq;
    let (a, b) = (Sha256::digest(given), Sha256::digest(secret));
    bool::from(a.ct_eq(&b)) && !secret.is_empty()
}

/// The dashboard's part of the admin listener: `GET /`, `POST /kick?user=NAME` and
/// `POST /end?session=N`; a POST needs the page's nonce. `host`: the request's `Host`.
pub fn answer(board: &Board, access: &Access, req: Request<'_>) -> Answer {
    let Request {
        post,
        path,
        query,
        host,
    } = req;
    let query: BTreeMap<String, String> = query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_owned(), percent_decode(v)?)))
        .collect();
    let back = || match query.get("token") {
        Some(t) => format!("/?token={}", percent_encode(t)),
        None => "/".to_owned(),
    };
    let request = match (post, path) {
        (false, "/") if access.allowed(&query, host) => {
            board.request(AdminRequest::CountBytes);
            return Answer::Page(board.render(query.get("token").map(String::as_str)));
        }
        (false, "/") => return Answer::Forbidden,
        (true, "/kick") => query.get("user").cloned().map(AdminRequest::Kick),
        (true, "/end") => query
            .get("session")
            .and_then(|s| s.parse().ok())
            .map(AdminRequest::EndSession),
        _ => return Answer::NotMine,
    };
    let nonce = query.get("nonce").map_or("", String::as_str);
    if !access.allowed(&query, host) || !same_secret(nonce, &board.nonce) {
        return Answer::Forbidden;
    }
    if let Some(r) = request {
        board.request(r);
    }
    Answer::SeeOther(back())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `answer` to a request sent to `Host: 127.0.0.1:9835`.
    fn ask(board: &Board, access: &Access, post: bool, path: &str, query: &str) -> Answer {
        let host = "127.0.0.1:9835";
        answer(
            board,
            access,
            Request {
                post,
                path,
                query,
                host,
            },
        )
    }

    /// A page of another site whose name now resolves to 127.0.0.1 gets nothing from a
    /// loopback dashboard: its `Host` is its own name. Loopback names and addresses pass.
    #[test]
    fn a_rebound_name_is_refused() {
        let (board, _rx) = Board::new().unwrap();
        let local = Access {
            listen: "127.0.0.1:9835".parse().unwrap(),
            token: None,
        };
        let get = |host| {
            answer(
                &board,
                &local,
                Request {
                    post: false,
                    path: "/",
                    query: "",
                    host,
                },
            )
        };
        for host in [
            "127.0.0.1:9835",
            "localhost:9835",
            "LOCALHOST",
            "[::1]:9835",
            "127.0.0.2",
        ] {
            assert!(matches!(get(host), Answer::Page(_)), "{host}");
        }
        for host in [
            "evil.example:9835",
            "evil.example",
            "",
            "127.0.0.1.evil.example:9835",
            "localhost.evil",
        ] {
            assert_eq!(get(host), Answer::Forbidden, "{host}");
        }
    }

    #[test]
    fn page_lists_and_kick_is_passed_on() {
        let (board, mut rx) = Board::new().unwrap();
        board.logged_in("cam<1>", "127.0.0.1:5");
        board.session_started(7, "me", "cam<1>", "ssh");
        board.login_failed("eve", "10.0.0.1:9", "wrong password");
        let local = Access {
            listen: "127.0.0.1:9835".parse().unwrap(),
            token: None,
        };
        let Answer::Page(page) = ask(&board, &local, false, "/", "") else {
            panic!("no page")
        };
        assert!(
            page.contains("cam&lt;1&gt;") && !page.contains("cam<1>"),
            "{page}"
        );
        assert!(page.contains("wrong password") && page.contains("<td>7</td>"));
        assert_eq!(rx.try_recv().unwrap(), AdminRequest::CountBytes);
        board.counted([(7, 1234, 56), (8, 1, 1)].into_iter());
        let Answer::Page(page) = ask(&board, &local, false, "/", "") else {
            panic!("no page")
        };
        assert!(
            page.contains("<td class=up>1234</td><td class=down>56</td>"),
            "{page}"
        );
        assert_eq!(rx.try_recv().unwrap(), AdminRequest::CountBytes);
        let nonce = format!("nonce={}", board.nonce);
        assert!(
            page.contains(&format!("/kick?user=cam%3C1%3E&amp;{nonce}")),
            "{page}"
        );
        assert!(
            page.contains(&format!("/end?session=7&amp;{nonce}")),
            "{page}"
        );
        assert_eq!(
            ask(&board, &local, true, "/kick", &format!("user=cam&{nonce}")),
            Answer::SeeOther("/".into())
        );
        assert_eq!(rx.try_recv().unwrap(), AdminRequest::Kick("cam".into()));
        assert_eq!(
            ask(&board, &local, true, "/end", &format!("session=7&{nonce}")),
            Answer::SeeOther("/".into())
        );
        assert_eq!(rx.try_recv().unwrap(), AdminRequest::EndSession(7));
        assert!(rx.try_recv().is_err());
        board.offline("cam<1>");
        board.session_ended(7);
        let Answer::Page(page) = ask(&board, &local, false, "/", "") else {
            panic!("no page")
        };
        assert!(!page.contains("cam&lt;1&gt;"));
    }

    /// Another site open in the operator's browser can POST to a loopback dashboard (a
    /// form needs no script) but cannot read the page's nonce: without it, nothing happens.
    /// User IDs may hold `&`, `#`, `%` and `+`: the page's kick URL names the whole ID
    /// (it stopped at the `&`), and a token with such bytes works too.
    #[test]
    fn names_and_tokens_survive_the_url() {
        let (board, mut rx) = Board::new().unwrap();
        let odd = "a&b#c%d+e=f";
        board.logged_in(odd, "127.0.0.1:5");
        let guarded = Access {
            listen: "127.0.0.1:9835".parse().unwrap(),
            token: Some("t&k%n".into()),
        };
        let Answer::Page(page) = ask(&board, &guarded, false, "/", "token=t%26k%25n") else {
            panic!("no page")
        };
        let action = page
            .split("action=\"/kick?")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .expect("a kick button")
            .replace("&amp;", "&");
        assert_eq!(rx.try_recv().unwrap(), AdminRequest::CountBytes);
        assert_eq!(
            ask(&board, &guarded, true, "/kick", &action),
            Answer::SeeOther("/?token=t%26k%25n".into())
        );
        assert_eq!(rx.try_recv().unwrap(), AdminRequest::Kick(odd.into()));
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%2"), None);
    }

    #[test]
    fn actions_need_the_pages_nonce() {
        let (board, mut rx) = Board::new().unwrap();
        let local = Access {
            listen: "127.0.0.1:9835".parse().unwrap(),
            token: None,
        };
        for (path, query) in [
            ("/kick", "user=cam".to_owned()),
            ("/kick", "user=cam&nonce=00".to_owned()),
            ("/end", "session=7".to_owned()),
            ("/end", format!("session=7&nonce={}0", board.nonce)),
        ] {
            assert_eq!(
                ask(&board, &local, true, path, &query),
                Answer::Forbidden,
                "{path}?{query}"
            );
        }
        assert!(rx.try_recv().is_err());
        let (other, _rx) = Board::new().unwrap();
        assert_ne!(board.nonce, other.nonce);
        assert_eq!(board.nonce.len(), 32);
    }

    #[test]
    fn token_comparison_does_not_stop_at_the_first_difference() {
        assert!(same_secret("s3cret", "s3cret"));
        for wrong in ["", "s", "s3cre", "s3cres", "x3cret", "s3cret0", "S3CRET"] {
            assert!(!same_secret(wrong, "s3cret"), "{wrong:?}");
        }
        // An empty configured token lets nobody in, not the empty guess.
        assert!(!same_secret("", ""));
        // The path is the same for any guess: two digests of 32 bytes, one comparison
        // that reads all of them (subtle), whatever the guess's length or first wrong byte.
    }

    #[test]
    fn beyond_loopback_only_with_the_token() {
        let (board, _rx) = Board::new().unwrap();
        let open = Access {
            listen: "0.0.0.0:9835".parse().unwrap(),
            token: None,
        };
        assert_eq!(ask(&board, &open, false, "/", ""), Answer::Forbidden);
        let guarded = Access {
            listen: "0.0.0.0:9835".parse().unwrap(),
            token: Some("s3cret".into()),
        };
        assert_eq!(
            ask(&board, &guarded, false, "/", "token=x"),
            Answer::Forbidden
        );
        assert!(matches!(
            ask(&board, &guarded, false, "/", "token=s3cret"),
            Answer::Page(_)
        ));
        assert_eq!(ask(&board, &guarded, false, "/", ""), Answer::Forbidden);
        // `admin_token = ""` is a mistake, not an open door.
        let empty = Access {
            listen: "0.0.0.0:9835".parse().unwrap(),
            token: Some(String::new()),
        };
        assert_eq!(ask(&board, &empty, false, "/", "token="), Answer::Forbidden);
        assert_eq!(
            ask(
                &board,
                &empty,
                true,
                "/kick",
                &format!("token=&user=a&nonce={}", board.nonce)
            ),
            Answer::Forbidden
        );
        assert_eq!(
            ask(&board, &guarded, false, "/metrics", ""),
            Answer::NotMine
        );
    }
}
