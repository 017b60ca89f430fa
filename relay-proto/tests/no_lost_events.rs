//! Finding 3 of issue 10: no event is ever dropped, so no connection is left behind.
//!
//! A host learns which connections have output only from [`Event::Wake`]; a wake that is
//! lost leaves a connection in Closing forever on a no_std relay (no deadline runs for
//! it). These tests drive the core only through its events, as a host does, on the
//! smallest fixed storage the scenario fits, and check that every connection of a
//! removed user is closed, whatever removes it (operator, LOGOUT, a newer login), and
//! that demands waiting for a terminal are served by every connection that frees up in
//! one call (the core's "kick" list used to hold 8 and drop the rest).

mod harness;

use harness::{T0, demand, enc, feed, joined, logged_in, login, output, resume};
use relay_proto::frame::{DemandResult, Frame};
use relay_proto::relay::{self, AllowAll, ConnId, Event, Fixed, Relay, Storage, Verdict};
use relay_proto::{ResumeToken, UserId};

/// 32 connections, 3 terminals, and room for the events one call may emit
/// ([`relay::max_events_per_call`]`(32)` = 35): a host drains them after every call.
type Small = Fixed<32, 3, 40>;
type Core<S> = harness::Core<S>;

/// What the host saw while it drained the core: frames per connection, closed ones.
#[derive(Default)]
struct Seen {
    frames: Vec<(ConnId, Frame)>,
    closed: Vec<ConnId>,
}

/// Drains events the way a host must, until nothing is left: a Wake is answered with
/// `poll_transmit`, a close with `closed`; logins are accepted (instance 1).
fn settle<S: Storage>(r: &mut Core<S>, seen: &mut Seen) {
    while let Some(e) = r.poll_event() {
        match e {
            // A wake for a connection the host has closed meanwhile is harmless.
            Event::Wake(c) if r.conn_entry(c).is_some() => {
                let (frames, close) = output(r, c);
                seen.frames.extend(frames.into_iter().map(|f| (c, f)));
                if close {
                    r.closed(c);
                    seen.closed.push(c);
                }
            }
            Event::Authenticate { conn, .. } => r.login_verdict(
                T0,
                conn,
                Verdict::Accept {
                    instance: 1,
                    token: ResumeToken::from_slice(harness::TOKEN).unwrap(),
                },
            ),
            _ => {}
        }
    }
}

/// `user` with `n` connections, every one flushed (no output pending).
fn with_conns<S: Storage>(r: &mut Core<S>, user: &str, n: usize) -> Vec<ConnId> {
    let mut conns = vec![logged_in(r, user)];
    while conns.len() < n {
        let (c, rest) = joined(r, &resume(user));
        assert!(rest.is_empty(), "{rest:?}");
        conns.push(c);
    }
    conns
}

/// `dev` holds 16 connections, each in a session with one of `cli`'s 16: the table is
/// full. Returns (relay, dev's, cli's).
fn full_of_sessions() -> (Core<Small>, Vec<ConnId>, Vec<ConnId>) {
    let mut r: Core<Small> = Relay::new(relay::Config::default(), AllowAll);
    let dev = with_conns(&mut r, "dev", 16);
    let cli = with_conns(&mut r, "cli", 16);
    for &c in &cli {
        feed(&mut r, c, &demand("dev"));
        let noticed = dev
            .iter()
            .copied()
            .find_map(|d| {
                output(&mut r, d).0.into_iter().find_map(|f| match f {
                    Frame::Notice(n) => Some((d, n.session)),
                    _ => None,
                })
            })
            .expect("an idle connection of dev is noticed");
        feed(
            &mut r,
            noticed.0,
            &enc(&Frame::Accept { session: noticed.1 }),
        );
        let (frames, _) = output(&mut r, c);
        assert!(
            matches!(
                frames[..],
                [Frame::DemandResult(DemandResult::Accepted { .. })]
            ),
            "{frames:?}"
        );
    }
    assert_eq!(r.connection_count(), 32);
    assert_eq!(r.stats().active_sessions, 16);
    (r, dev, cli)
}

/// After `dev` is gone: all 16 of its connections closed, every peer released.
fn check_dev_gone(r: &Core<Small>, seen: &Seen, dev: &[ConnId], cli: &[ConnId]) {
    for d in dev {
        assert!(seen.closed.contains(d), "{d:?} left open");
    }
    for c in cli {
        assert!(
            seen.frames
                .iter()
                .any(|(k, f)| k == c && matches!(f, Frame::Release { .. })),
            "{c:?} never told its session ended"
        );
    }
    assert_eq!(r.stats().active_sessions, 0);
}

/// Only `cli`'s connections are left.
fn check_only(r: &Core<Small>, cli: &[ConnId]) {
    assert_eq!(r.connection_count(), cli.len());
    assert!(!r.is_online(&UserId::new("dev").unwrap()));
}

#[test]
fn removing_a_user_with_16_connections_closes_all_of_them() {
    let (mut r, dev, cli) = full_of_sessions();
    let mut seen = Seen::default();
    r.remove_user(&UserId::new("dev").unwrap());
    settle(&mut r, &mut seen);
    check_dev_gone(&r, &seen, &dev, &cli);
    check_only(&r, &cli);
}

#[test]
fn a_logout_with_16_connections_closes_all_of_them() {
    let (mut r, dev, cli) = full_of_sessions();
    let mut seen = Seen::default();
    // LOGOUT on a connection in a session is legal (it ends all of them).
    r.handle_input(T0, dev[0], &enc(&Frame::Logout));
    settle(&mut r, &mut seen);
    check_dev_gone(&r, &seen, &dev, &cli);
    check_only(&r, &cli);
}

#[test]
fn a_replacing_login_with_16_connections_closes_all_of_them() {
    let (mut r, dev, cli) = full_of_sessions();
    let mut seen = Seen::default();
    // Make room for the newer instance's connection: one of cli's goes.
    r.closed(cli[15]);
    settle(&mut r, &mut seen);
    let newer = r.accept(T0).unwrap();
    r.handle_input(T0, newer, &login("dev", "pw"));
    settle(&mut r, &mut seen);
    check_dev_gone(&r, &seen, &dev, &cli[..15]);
    assert_eq!(
        r.connection_count(),
        16,
        "cli's 15 and the newer instance's"
    );
    assert!(
        r.is_online(&UserId::new("dev").unwrap()),
        "the newer one is"
    );
}

/// Every connection that frees up in one call serves a waiting demand: `mid` has 11
/// connections, one in a session with `top`'s only connection and ten waiting for `top`;
/// `low`'s 10 connections wait for `mid`. `top` goes: mid's ten waiting connections are
/// idle at once and each must take one of low's demands.
#[test]
fn every_connection_freed_in_one_call_serves_a_waiting_demand() {
    let mut r: Core<Small> = Relay::new(relay::Config::default(), AllowAll);
    let top = with_conns(&mut r, "top", 1)[0];
    let mid = with_conns(&mut r, "mid", 11);
    feed(&mut r, mid[0], &demand("top"));
    let session = output(&mut r, top)
        .0
        .into_iter()
        .find_map(|f| match f {
            Frame::Notice(n) => Some(n.session),
            _ => None,
        })
        .unwrap();
    feed(&mut r, top, &enc(&Frame::Accept { session }));
    for &m in &mid[1..] {
        feed(&mut r, m, &demand("top"));
    }
    let low = with_conns(&mut r, "low", 10);
    for &l in &low {
        feed(&mut r, l, &demand("mid"));
    }
    output(&mut r, mid[0]);
    for &c in mid[1..].iter().chain(&low) {
        assert!(output(&mut r, c).0.is_empty(), "all wait, nothing to say");
    }

    let mut seen = Seen::default();
    r.remove_user(&UserId::new("top").unwrap());
    settle(&mut r, &mut seen);
    let noticed = mid[1..]
        .iter()
        .filter(|m| {
            seen.frames
                .iter()
                .any(|(k, f)| k == *m && matches!(f, Frame::Notice(_)))
        })
        .count();
    assert_eq!(noticed, 10, "each freed connection takes a waiting demand");
}
