//! Logins under attack (issue 11), against the real `relay serve` binary on loopback: a
//! scripted guesser speaks the protocol over the plain listener from source addresses of
//! its choice (127.x.y.z), while the legitimate device logs in with its password and its
//! token.

#[path = "login_client.rs"]
mod login_client;
#[path = "host_support.rs"]
mod support;

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use login_client::*;
use relay_proto::ErrorCode;
use relay_proto::frame::{Credential, caps};
use support::*;

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
    let _turn = sharing();
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

/// Issue 11, finding 4, for requester instances (protocol core v2: `relay connect`,
/// `relay online`): the token of one that logged out must not start it again.
#[test]
fn finding4_logout_revokes_a_requester_token() {
    let _turn = sharing();
    let relay = Relay::start("");
    relay.add_user("cam");
    let requester = caps::ALL | caps::REQUESTER;
    let mut c = Client::connect(&relay, LOCAL);
    let Answer::Ok(t) = c.login_with(requester, "cam", password(PASSWORD)) else {
        panic!("requester login")
    };
    let mut again = Client::connect(&relay, LOCAL);
    assert!(matches!(
        again.login_with(requester, "cam", token(&t)),
        Answer::Ok(_)
    ));
    c.logout();
    let mut after = Client::connect(&relay, LOCAL);
    assert_eq!(
        after.login_with(requester, "cam", token(&t)),
        Answer::Refused(ErrorCode::ResumeRejected, None)
    );
}

/// Issue 11, finding 4: a token survived a password change.
#[test]
fn finding4_password_change_revokes_the_token() {
    let _turn = sharing();
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
    let _turn = sharing();
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
    let _turn = sharing();
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

/// The tests that measure time run alone ([`measuring`]); the others may share the
/// machine with each other ([`sharing`]).
static TURNS: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn measuring() -> std::sync::RwLockWriteGuard<'static, ()> {
    TURNS.write().unwrap_or_else(|e| e.into_inner())
}

fn sharing() -> std::sync::RwLockReadGuard<'static, ()> {
    TURNS.read().unwrap_or_else(|e| e.into_inner())
}

/// Issue 11, finding 5: throttling was a silent hang. Now ERROR Throttled carries the wait
/// and a one-shot command prints it in one line and exits non-zero, at once.
#[test]
fn finding5_throttled_one_shot_command_says_so_and_exits() {
    let _turn = sharing();
    let relay = Relay::start("");
    relay.add_user("cam");
    let wait = throttle(&relay, LOCAL, "cam", 8, 8);
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
    let _turn = measuring();
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
        // Alternate which goes first, so a burst of load elsewhere hits both alike.
        let k = Ipv4Addr::new(127, 1, i, 1);
        let u = Ipv4Addr::new(127, 2, i, 1);
        if i % 2 == 0 {
            known.push(time(k, "cam"));
            unknown.push(time(u, "nobody"));
        } else {
            unknown.push(time(u, "nobody"));
            known.push(time(k, "cam"));
        }
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
/// returns the wait. Guesses go in rounds of `parallel`, as a guesser's would, so the
/// back-off grows without waiting it out.
fn throttle(relay: &Relay, source: Ipv4Addr, user: &str, secs: u32, parallel: usize) -> u32 {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "never throttled");
        let answers: Vec<Answer> = std::thread::scope(|s| {
            let guesses: Vec<_> = (0..parallel)
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

/// Issue 11, item 2: a throttled `relay expose` waits the relay's retry-after, saying so
/// once, and then logs in.
#[test]
fn throttled_expose_waits_and_logs_in() {
    let _turn = sharing();
    let relay = Relay::start("");
    relay.add_user("cam");
    let wait = throttle(&relay, LOCAL, "cam", 4, 1);
    let expose = Proc::spawn(
        "expose cam",
        relay.terminal("cam", &["expose", "--service", "x=127.0.0.1:9"]),
    );
    expose.wait_for(
        "logged in to the relay",
        Duration::from_secs(u64::from(wait) + 15),
    );
    assert_eq!(expose.count("retry in"), 1, "{}", expose.log());
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
    let _turn = sharing();
    let relay = Relay::start("");
    for u in ["me", "cam", "secret"] {
        relay.add_user(u);
    }
    relay.user_cmd(&["allow", "me", "--targets", "cam"]);
    let _online: Vec<_> = ["cam", "secret"].map(|u| log_in(&relay, u).0).into();
    // `relay online` is a requester instance: it lists reachable terminals only, so "me"
    // (not online as a device) is not in it, and "secret" is outside its rule.
    assert_eq!(relay.online_list("me"), ["cam"]);
}

/// Guesses from each of `sources` (round-robin, in `threads` threads, until `until`),
/// each on the accounts `users` in turn. A source whose answer was `Throttled` is left
/// alone until its wait has passed, as a patient guesser would. Returns the guesses the
/// relay checked (answered `AuthFailed`) and the sources that got at least one.
fn guess(
    relay: &Relay,
    sources: &[Ipv4Addr],
    users: &[&str],
    threads: usize,
    until: Instant,
) -> (u32, usize) {
    use std::sync::atomic::{AtomicU32, Ordering};
    let checked = AtomicU32::new(0);
    let lucky = AtomicU32::new(0);
    std::thread::scope(|s| {
        for slice in sources.chunks(sources.len().div_ceil(threads)) {
            let (checked, lucky) = (&checked, &lucky);
            s.spawn(move || {
                let mut next = vec![Instant::now(); slice.len()];
                let mut got = vec![false; slice.len()];
                let mut turn = 0usize;
                while Instant::now() < until {
                    let now = Instant::now();
                    let Some(i) = (0..slice.len()).find(|&i| next[i] <= now) else {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    };
                    let user = users[turn % users.len()];
                    turn += 1;
                    match login_once(relay, slice[i], user, password("guess")) {
                        Answer::Refused(ErrorCode::AuthFailed, _) => {
                            checked.fetch_add(1, Ordering::Relaxed);
                            if !std::mem::replace(&mut got[i], true) {
                                lucky.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Answer::Refused(ErrorCode::Throttled, wait) => {
                            let wait = Duration::from_secs(wait.unwrap_or(1).into());
                            next[i] = Instant::now() + wait;
                        }
                        other => panic!("a guess got {other:?}"),
                    }
                }
            });
        }
    });
    (checked.into_inner(), lucky.into_inner() as usize)
}

/// The device logs in with its password, then with that login's token, from its own
/// address, every 300 ms until `until`. Every login must succeed within `limit`; returns
/// the password and token login times.
fn device(relay: &Relay, until: Instant, limit: Duration) -> (Vec<Duration>, Vec<Duration>) {
    let source = Ipv4Addr::new(127, 200, 0, 1);
    let (mut by_password, mut by_token) = (Vec::new(), Vec::new());
    while Instant::now() < until {
        let start = Instant::now();
        let mut c = Client::connect(relay, source);
        let Answer::Ok(t) = c.login("cam", password(PASSWORD)) else {
            panic!("the device's password was refused during the attack");
        };
        by_password.push(start.elapsed());
        let start = Instant::now();
        let answer = login_once(relay, source, "cam", token(&t));
        assert!(matches!(answer, Answer::Ok(_)), "token refused: {answer:?}");
        by_token.push(start.elapsed());
        for d in [by_password.last(), by_token.last()].into_iter().flatten() {
            assert!(*d < limit, "a device login took {d:?}");
        }
        drop(c);
        std::thread::sleep(Duration::from_millis(300));
    }
    (by_password, by_token)
}

fn per_minute(n: u32, window: Duration) -> f64 {
    f64::from(n) * 60.0 / window.as_secs_f64()
}

fn median_max(mut v: Vec<Duration>) -> String {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "{} logins, median {:.0} ms, max {:.0} ms",
        v.len(),
        ms(v[v.len() / 2]),
        ms(v[v.len() - 1])
    )
}

/// Issue 11, item 7: a guesser works on the device's account from one address, then from
/// 1,000 addresses (each in its own /24) while another sprays five accounts from one
/// address; the device logs in with its password and its token throughout and always gets
/// in within a few seconds. Prints the guess rates and the device's login times.
#[test]
fn attack_guessers_never_keep_the_device_out() {
    const ONE: Duration = Duration::from_secs(8);
    const MANY: Duration = Duration::from_secs(12);
    let limit = Duration::from_secs(3);
    let _turn = measuring();
    let relay = Relay::start("");
    let spray: Vec<String> = (0..5).map(|i| format!("user{i}")).collect();
    for u in std::iter::once("cam").chain(spray.iter().map(String::as_str)) {
        relay.add_user(u);
    }
    let spray: Vec<&str> = spray.iter().map(String::as_str).collect();
    let thousand: Vec<Ipv4Addr> = (0..1000u32)
        .map(|i| Ipv4Addr::new(127, 1 + (i / 250) as u8, (i % 250) as u8, 1))
        .collect();
    let start = Instant::now();
    let end = start + ONE + MANY;
    let ((one, _), (many, lucky), (sprayed, _), (by_password, by_token)) =
        std::thread::scope(|s| {
            let device = s.spawn(|| device(&relay, end, limit));
            let one_source = [Ipv4Addr::new(127, 100, 0, 1)];
            let one = guess(&relay, &one_source, &["cam"], 1, start + ONE);
            let many = s.spawn(|| guess(&relay, &thousand, &["cam"], 12, end));
            let spray_source = [Ipv4Addr::new(127, 101, 0, 1)];
            let sprayed = guess(&relay, &spray_source, &spray, 1, end);
            (one, many.join().unwrap(), sprayed, device.join().unwrap())
        });
    println!(
        "guesses on one account from 1 address: {one} in {}s = {:.0}/min",
        ONE.as_secs(),
        per_minute(one, ONE)
    );
    println!(
        "guesses on one account from 1,000 addresses: {many} in {}s = {:.0}/min \
         ({lucky} addresses got one or more)",
        MANY.as_secs(),
        per_minute(many, MANY)
    );
    println!(
        "guesses on {} accounts from 1 address: {sprayed} in {}s = {:.0}/min per account",
        spray.len(),
        MANY.as_secs(),
        per_minute(sprayed, MANY) / spray.len() as f64
    );
    println!(
        "device during the attack: password {}; token {}",
        median_max(by_password),
        median_max(by_token)
    );
}
