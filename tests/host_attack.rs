//! Logins under attack (issue 11), against the real `relay serve` binary on loopback: a
//! scripted guesser speaks the protocol over the plain listener from source addresses of
//! its choice (127.x.y.z), while the legitimate device logs in with its password and its
//! token.

#[path = "host_support.rs"]
mod support;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Stdio;
use std::time::{Duration, Instant};

use relay_proto::frame::{self, Credential, Frame, Hello, Login, Parsed, caps};
use relay_proto::{ErrorCode, Password, ResumeToken, UserId};
use support::*;

/// What the relay answered to one LOGIN.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// LOGIN_OK, with the token.
    Ok(Vec<u8>),
    /// ERROR, with the retry-after it carried.
    Refused(ErrorCode, Option<u32>),
}

/// One protocol connection to the relay's plain listener, from `source`.
struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    fn connect(relay: &Relay, source: Ipv4Addr) -> Client {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        sock.bind(&SocketAddr::from((source, 0)).into())
            .expect("bind a 127.x.y.z source");
        let server = SocketAddr::from((Ipv4Addr::LOCALHOST, relay.plain_port));
        sock.connect(&server.into()).expect("connect to the relay");
        let stream: TcpStream = sock.into();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    fn login(&mut self, user: &str, credential: Credential) -> Answer {
        let frame = Frame::Login(Login {
            hello: Hello::current(caps::ALL),
            user: UserId::new(user).unwrap(),
            credential,
        });
        let mut out = [0u8; 512];
        let n = frame.encode(&mut out).unwrap();
        self.stream.write_all(&out[..n]).expect("send LOGIN");
        loop {
            match frame::parse(&self.buf).expect("a valid frame from the relay") {
                Some((Parsed::Control(f), n)) => {
                    self.buf.drain(..n);
                    match f {
                        Frame::LoginOk(ok) => return Answer::Ok(ok.token.as_bytes().to_vec()),
                        Frame::Error {
                            code, retry_after, ..
                        } => return Answer::Refused(code, retry_after),
                        _ => {}
                    }
                }
                Some((Parsed::DataHeader { .. }, _)) => panic!("DATA before login"),
                None => {
                    let mut chunk = [0u8; 1024];
                    let n = self.stream.read(&mut chunk).expect("read from the relay");
                    assert!(n > 0, "the relay closed without an answer");
                    self.buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
    }
}

impl Client {
    /// Sends LOGOUT and waits for the relay to close the connection.
    fn logout(mut self) {
        let mut out = [0u8; 16];
        let n = Frame::Logout.encode(&mut out).unwrap();
        self.stream.write_all(&out[..n]).unwrap();
        let mut rest = Vec::new();
        let _ = self.stream.read_to_end(&mut rest);
    }
}

fn password(p: &str) -> Credential {
    Credential::Password(Password::new(p).unwrap())
}

fn token(t: &[u8]) -> Credential {
    Credential::Resume(ResumeToken::from_slice(t).unwrap())
}

/// A password login of `user` from 127.0.0.1: the logged-in connection and its token.
fn log_in(relay: &Relay, user: &str) -> (Client, Vec<u8>) {
    let mut c = Client::connect(relay, LOCAL);
    match c.login(user, password(PASSWORD)) {
        Answer::Ok(t) => (c, t),
        other => panic!("login of {user}: {other:?}"),
    }
}

/// `relay user ARGS --db …` with `stdin`.
fn user_cmd_stdin(relay: &Relay, args: &[&str], stdin: &str) {
    let mut child = std::process::Command::new(relay_bin())
        .arg("user")
        .args(args)
        .arg("--db")
        .arg(relay.db())
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "relay user {args:?}");
}

/// Issue 11, finding 4: a token survived LOGOUT of its instance (and a relay restart).
#[test]
fn finding4_logout_revokes_the_token_for_good() {
    let mut relay = Relay::start("");
    relay.add_user("cam");
    let (c, t) = log_in(&relay, "cam");
    c.logout();
    let refused = Answer::Refused(ErrorCode::ResumeRejected, None);
    assert_eq!(login_once(&relay, LOCAL, "cam", token(&t)), refused);
    relay.stop();
    relay.launch();
    assert_eq!(login_once(&relay, LOCAL, "cam", token(&t)), refused);
    // The password still works, and its new token too.
    let (_c, t2) = log_in(&relay, "cam");
    assert!(matches!(
        login_once(&relay, LOCAL, "cam", token(&t2)),
        Answer::Ok(_)
    ));
}

/// Issue 11, finding 4: a token survived a password change.
#[test]
fn finding4_password_change_revokes_the_token() {
    let relay = Relay::start("");
    relay.add_user("cam");
    let (c, t) = log_in(&relay, "cam");
    user_cmd_stdin(
        &relay,
        &["passwd", "cam", "--password-stdin"],
        "another one",
    );
    let refused = Answer::Refused(ErrorCode::ResumeRejected, None);
    assert_eq!(
        login_once(&relay, LOCAL, "cam", token(&t)),
        refused,
        "online"
    );
    drop(c);
    assert_eq!(
        login_once(&relay, LOCAL, "cam", token(&t)),
        refused,
        "offline"
    );
}

/// Issue 11, finding 4: a token survived deleting the account and creating it again.
#[test]
fn finding4_recreated_account_revokes_the_token() {
    let relay = Relay::start("");
    relay.add_user("cam");
    let (c, t) = log_in(&relay, "cam");
    drop(c);
    relay.user_cmd(&["del", "cam"]);
    relay.add_user("cam");
    assert_eq!(
        login_once(&relay, LOCAL, "cam", token(&t)),
        Answer::Refused(ErrorCode::ResumeRejected, None)
    );
}

/// Issue 11, finding 4: once the user was offline, a replaced instance's token started
/// that instance again. It must get `Replaced` (and stop), not start.
#[test]
fn finding4_replaced_instance_token_is_refused_when_offline() {
    let relay = Relay::start("");
    relay.add_user("cam");
    let (mut old, t_old) = log_in(&relay, "cam");
    let (new, _) = log_in(&relay, "cam");
    // The old instance learns it was replaced; then the new one drops off the network.
    let mut rest = Vec::new();
    let _ = old.stream.read_to_end(&mut rest);
    drop(new);
    assert_eq!(
        login_once(&relay, LOCAL, "cam", token(&t_old)),
        Answer::Refused(ErrorCode::Replaced, None)
    );
}

/// One LOGIN on a connection of its own.
fn login_once(relay: &Relay, source: Ipv4Addr, user: &str, credential: Credential) -> Answer {
    Client::connect(relay, source).login(user, credential)
}

const LOCAL: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// Issue 11, finding 5: throttling was a silent hang. Now ERROR Throttled carries the wait
/// and a one-shot command prints it in one line and exits non-zero, at once.
#[test]
fn finding5_throttled_one_shot_command_says_so_and_exits() {
    let relay = Relay::start("");
    relay.add_user("cam");
    let wait = throttle(&relay, LOCAL, "cam", 8);
    eprintln!("the guesser's address must wait {wait}s");
    let started = Instant::now();
    let mut online = relay.terminal_plain("cam", &["online"]);
    let out = online
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(out, Duration::from_secs(15));
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("relay online: {stderr}");
    assert!(!out.status.success(), "exit status must be non-zero");
    assert!(
        stderr.contains("retry in") && stderr.contains("Throttled"),
        "{stderr}"
    );
    assert_eq!(
        stderr.lines().filter(|l| l.contains("retry in")).count(),
        1,
        "one line: {stderr}"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// Issue 11, finding 3: a login for an unknown user ID was answered 40 times faster than
/// one for a known user ID with a wrong password. Median answer times over 60 tries each,
/// interleaved, each from a fresh address (so the throttle stays out of it).
#[test]
fn finding3_unknown_and_known_user_ids_take_the_same_time() {
    const TRIES: u8 = 60;
    let relay = Relay::start("");
    relay.add_user("cam");
    let time = |source: Ipv4Addr, user: &str| {
        let mut c = Client::connect(&relay, source);
        let start = Instant::now();
        let answer = c.login(user, password("wrong"));
        assert_eq!(answer, Answer::Refused(ErrorCode::AuthFailed, None));
        start.elapsed()
    };
    let (mut known, mut unknown) = (Vec::new(), Vec::new());
    for i in 0..TRIES {
        known.push(time(Ipv4Addr::new(127, 1, i, 1), "cam"));
        unknown.push(time(Ipv4Addr::new(127, 2, i, 1), "nobody"));
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (k, u) = (median(&mut known), median(&mut unknown));
    let ratio = u.as_secs_f64() / k.as_secs_f64();
    println!(
        "median login answer over {TRIES} tries: unknown user ID {:.2} ms, known user ID \
         (wrong password) {:.2} ms, ratio {ratio:.2}",
        u.as_secs_f64() * 1e3,
        k.as_secs_f64() * 1e3
    );
    assert!((0.8..=1.25).contains(&ratio), "ratio {ratio:.2}");
}

/// Guesses `user`'s password from `source` until the relay says to wait at least `secs`;
/// returns the wait. Guesses go in parallel rounds, as a guesser's would, so the back-off
/// grows without waiting it out.
fn throttle(relay: &Relay, source: Ipv4Addr, user: &str, secs: u32) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "never throttled");
        let answers: Vec<Answer> = std::thread::scope(|s| {
            let guesses: Vec<_> = (0..8)
                .map(|_| s.spawn(|| login_once(relay, source, user, password("wrong"))))
                .collect();
            guesses.into_iter().map(|g| g.join().unwrap()).collect()
        });
        for a in answers {
            match a {
                Answer::Refused(ErrorCode::Throttled, Some(wait)) if wait >= secs => return wait,
                Answer::Refused(ErrorCode::Throttled, Some(wait)) => {
                    std::thread::sleep(Duration::from_secs(wait.into()));
                    break;
                }
                Answer::Refused(ErrorCode::AuthFailed, None) => {}
                other => panic!("unexpected answer to a wrong password: {other:?}"),
            }
        }
    }
}

/// Waits for `child` to exit, killing it (and failing) after `timeout`.
fn wait_output(mut child: std::process::Child, timeout: Duration) -> std::process::Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > timeout {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "no answer within {timeout:?} (a silent hang): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Issue 11, finding 6: `relay online` listed every logged-in user ID whatever the access
/// rules said. An account sees itself and the user IDs its rule lets it reach.
#[test]
fn finding6_the_online_list_follows_the_access_rule() {
    let relay = Relay::start("");
    for u in ["me", "cam", "secret"] {
        relay.add_user(u);
    }
    relay.user_cmd(&["allow", "me", "--targets", "cam"]);
    let _online: Vec<_> = ["cam", "secret"].map(|u| log_in(&relay, u).0).into();
    let out = relay
        .terminal_plain("me", &["online"])
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    let mut listed: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    listed.sort();
    assert_eq!(listed, ["cam", "me"]);
}
