//! Unit tests of the terminal next to its transitions: a relay scripted frame by frame,
//! and what the terminal writes and reports in answer.

extern crate std;

use std::vec::Vec;

use super::*;
use crate::frame::{self, DemandResult, Frame, LoginOk, Notice, Parsed, Redirect};
use crate::ident::ResumeToken;

/// A terminal with two slots, and the clock.
struct Rig {
    t: Terminal<2>,
    now: Instant,
}

const H0: Handle = Handle(0);

impl Rig {
    /// A terminal whose first connection (`H0`) has logged in; its LOGIN was written.
    fn up() -> Rig {
        Rig::up_as(Config::default()).0
    }

    /// The same with `config`, and the LOGIN it wrote.
    fn up_as(config: Config) -> (Rig, frame::Login) {
        let mut r = Rig {
            t: Terminal::new(
                config,
                UserId::new("dev").unwrap(),
                Password::new("pw").unwrap(),
                7,
            ),
            now: Instant::from_secs(1),
        };
        r.t.start(r.now);
        assert_eq!(r.events(), [Event::Open(H0)]);
        r.t.connected(H0, r.now);
        let [Frame::Login(login)] = &r.sent(H0)[..] else {
            panic!("LOGIN first");
        };
        let login = login.clone();
        r.feed(
            H0,
            Frame::LoginOk(LoginOk {
                caps: frame::caps::ALL,
                keepalive_ms: 30_000,
                max_payload: 4096,
                token: ResumeToken::from_slice(b"token").unwrap(),
            }),
        );
        assert_eq!(r.events()[0], Event::LoggedIn);
        (r, login)
    }

    fn events(&mut self) -> Vec<Event> {
        core::iter::from_fn(|| self.t.poll_event()).collect()
    }

    /// The relay sends `f` on `h`, all at once.
    fn feed(&mut self, h: Handle, f: Frame) {
        let mut buf = [0u8; frame::MAX_CONTROL_FRAME];
        let n = f.encode(&mut buf).unwrap();
        assert_eq!(
            self.t.handle_input(h, self.now, &buf[..n]),
            Offer::Consumed(n)
        );
    }

    /// The control frames `h` writes now.
    fn sent(&mut self, h: Handle) -> Vec<Frame> {
        let mut buf = [0u8; MIN_TRANSMIT_BUF];
        let n = self.t.poll_transmit(h, self.now, &mut buf).unwrap();
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < n {
            let (parsed, used) = frame::parse(&buf[pos..n]).unwrap().unwrap();
            let Parsed::Control(f) = parsed else {
                panic!("DATA header in control output");
            };
            out.push(f);
            pos += used;
        }
        out
    }

    /// A NOTICE for session `session` arrives on `h`.
    fn notice(&mut self, h: Handle, session: u32) {
        self.feed(
            h,
            Frame::Notice(Notice {
                session,
                from: UserId::new("peer").unwrap(),
                service: ServiceName::new("echo").unwrap(),
            }),
        );
        assert!(matches!(self.events()[..], [Event::Notice { .. }, ..]));
    }
}

#[test]
fn accept_then_terminate_before_a_flush_sends_both() {
    let mut r = Rig::up();
    r.notice(H0, 5);
    r.t.accept(H0, r.now).unwrap();
    r.t.terminate(H0).unwrap();
    assert_eq!(r.sent(H0), [Frame::Accept { session: 5 }, Frame::Terminate]);
}

#[test]
fn list_then_accept_before_a_flush_sends_both() {
    let mut r = Rig::up();
    assert_eq!(r.t.request_online(0), Ok(H0));
    r.notice(H0, 6);
    r.t.accept(H0, r.now).unwrap();
    assert_eq!(
        r.sent(H0),
        [Frame::List { cursor: 0 }, Frame::Accept { session: 6 }]
    );
}

#[test]
fn accept_then_logout_before_a_flush_sends_both() {
    let mut r = Rig::up();
    r.notice(H0, 7);
    r.t.accept(H0, r.now).unwrap();
    r.t.logout(r.now);
    assert_eq!(r.sent(H0), [Frame::Accept { session: 7 }, Frame::Logout]);
}

#[test]
fn reject_then_logout_before_a_flush_sends_both() {
    let mut r = Rig::up();
    r.notice(H0, 8);
    r.t.reject(H0, RejectReason::Busy).unwrap();
    r.t.logout(r.now);
    let sent = r.sent(H0);
    assert!(
        matches!(sent[..], [Frame::Reject(ref j), Frame::Logout] if j.session == 8),
        "{sent:?}"
    );
}

#[test]
fn a_demand_accepted_then_terminated_sends_terminate() {
    let mut r = Rig::up();
    let h =
        r.t.demand(
            UserId::new("cam").unwrap(),
            ServiceName::new("ssh").unwrap(),
            r.now,
        )
        .unwrap();
    assert!(matches!(r.sent(h)[..], [Frame::Demand(_)]));
    r.feed(
        h,
        Frame::DemandResult(DemandResult::Accepted { session: 9 }),
    );
    r.t.terminate(h).unwrap();
    r.t.logout(r.now);
    assert_eq!(r.sent(h), [Frame::Terminate, Frame::Logout]);
}

#[test]
fn a_release_before_the_flush_voids_the_sessions_accept_and_terminate() {
    let mut r = Rig::up();
    assert_eq!(r.t.request_online(0), Ok(H0));
    r.notice(H0, 10);
    r.t.accept(H0, r.now).unwrap();
    r.t.terminate(H0).unwrap();
    r.feed(
        H0,
        Frame::Release {
            reason: crate::codes::ReleaseReason::Cancelled,
        },
    );
    assert_eq!(r.sent(H0), [Frame::List { cursor: 0 }]);
}

#[test]
fn nothing_is_owed_after_logout() {
    let mut r = Rig::up();
    r.notice(H0, 11);
    r.t.logout(r.now);
    assert_eq!(r.t.accept(H0, r.now), Err(SendError::NotLoggedIn));
    assert_eq!(r.sent(H0), [Frame::Logout]);
}

/// A host that does not drain events after every call still gets every event: the
/// terminal refuses input while an event waits, instead of dropping the oldest.
#[test]
fn no_event_is_dropped_when_the_host_drains_late() {
    let mut r = Rig::up();
    let mut seen = Vec::new();
    for session in 0..40 {
        let mut buf = [0u8; frame::MAX_CONTROL_FRAME];
        let n = Frame::Notice(Notice {
            session,
            from: UserId::new("peer").unwrap(),
            service: ServiceName::new("echo").unwrap(),
        })
        .encode(&mut buf)
        .unwrap();
        loop {
            match r.t.handle_input(H0, r.now, &buf[..n]) {
                Offer::Consumed(m) if m == n => break,
                // Refused until the host drains.
                _ => seen.extend(r.events()),
            }
        }
        r.t.reject(H0, RejectReason::Busy).unwrap();
        r.sent(H0);
    }
    seen.extend(r.events());
    let notices: Vec<u32> = seen
        .iter()
        .filter_map(|e| match e {
            Event::Notice { session, .. } => Some(*session),
            _ => None,
        })
        .collect();
    assert_eq!(notices, (0..40).collect::<Vec<_>>());
}

/// Every connection of a terminal closing in one call (the relay says `Replaced`): each
/// `Closed`, then `Down` and `LoginRefused`, reported in that order, none lost even
/// with the smallest terminal.
#[test]
fn a_replaced_terminal_reports_every_close() {
    let mut r = Rig::up();
    // A demand takes the idle connection: the pool opens a second.
    r.t.demand(UserId::new("cam").unwrap(), ServiceName::default(), r.now)
        .unwrap();
    r.t.handle_timeout(r.now);
    assert_eq!(r.events(), [Event::Open(Handle(1))]);
    r.feed(
        H0,
        Frame::Error {
            code: ErrorCode::Replaced,
            text: Text::lossy("x"),
            retry_after: None,
        },
    );
    let events = r.events();
    assert!(
        matches!(
            events[..],
            [
                Event::Closed { handle: H0, .. },
                Event::Closed {
                    handle: Handle(1),
                    ..
                },
                Event::Down,
                Event::LoginRefused {
                    code: ErrorCode::Replaced,
                    ..
                }
            ]
        ),
        "{events:?}"
    );
}

#[test]
fn a_requester_announces_the_requester_bit_and_a_reachable_terminal_does_not() {
    let requester = Config {
        kind: Kind::Requester,
        ..Config::default()
    };
    let (_, login) = Rig::up_as(requester);
    assert_eq!(login.hello.caps, frame::caps::ALL | frame::caps::REQUESTER);
    let (_, login) = Rig::up_as(Config::default());
    assert_eq!(login.hello.caps, frame::caps::ALL);
}

/// A demand on `H0` whose DEMAND was written.
fn demanding(r: &mut Rig) {
    let h =
        r.t.demand(UserId::new("cam").unwrap(), ServiceName::default(), r.now)
            .unwrap();
    assert_eq!(h, H0);
    assert!(matches!(r.sent(H0)[..], [Frame::Demand(_)]));
    // The pool's spare connection, at once.
    assert_eq!(r.events(), [Event::Open(Handle(1))]);
}

fn no_idle() -> Frame {
    Frame::DemandResult(DemandResult::Failed {
        error: DemandError::NoIdleConnection,
        text: Text::lossy("target has no idle connection"),
    })
}

#[test]
fn no_idle_connection_is_retried_after_the_retry_delay_without_an_event() {
    let mut r = Rig::up();
    demanding(&mut r);
    r.feed(H0, no_idle());
    assert_eq!(r.events(), []);
    assert_eq!(r.sent(H0), []);
    let retry = r.now + Config::default().demand_retry;
    assert!(r.t.poll_timeout().is_some_and(|t| t <= retry));
    r.now = retry;
    r.t.handle_timeout(r.now);
    assert!(matches!(r.sent(H0)[..], [Frame::Demand(_)]));
    r.feed(
        H0,
        Frame::DemandResult(DemandResult::Accepted { session: 3 }),
    );
    assert!(matches!(
        r.events()[..],
        [Event::Accepted { session: 3, .. }]
    ));
}

#[test]
fn no_idle_connection_past_the_patience_is_reported() {
    let mut r = Rig::up();
    demanding(&mut r);
    r.now = r.now + Config::default().demand_patience;
    r.feed(H0, no_idle());
    assert!(matches!(
        r.events()[..],
        [Event::DemandFailed {
            error: DemandError::NoIdleConnection,
            ..
        }]
    ));
    assert_eq!(r.t.idle_connections(), 1);
}

#[test]
fn other_demand_failures_are_reported_at_once() {
    let mut r = Rig::up();
    demanding(&mut r);
    r.feed(
        H0,
        Frame::DemandResult(DemandResult::Failed {
            error: DemandError::TargetOffline,
            text: Text::lossy("offline"),
        }),
    );
    assert!(matches!(
        r.events()[..],
        [Event::DemandFailed {
            error: DemandError::TargetOffline,
            ..
        }]
    ));
}

// One test per row of PROTOCOL.md §6.1's transition table not covered above.

/// The cause `h`'s connection closed with, from the events.
fn closed(events: &[Event], h: Handle) -> Option<Cause> {
    events.iter().find_map(|e| match e {
        Event::Closed { handle, cause } if *handle == h => Some(cause.clone()),
        _ => None,
    })
}

fn error(code: ErrorCode) -> Frame {
    Frame::Error {
        code,
        text: Text::lossy(code.describe()),
        retry_after: None,
    }
}

#[test]
fn connecting_past_the_handshake_deadline_closes() {
    let mut r = Rig {
        t: Terminal::new(
            Config::default(),
            UserId::new("dev").unwrap(),
            Password::new("pw").unwrap(),
            7,
        ),
        now: Instant::from_secs(1),
    };
    r.t.start(r.now);
    assert_eq!(r.events(), [Event::Open(H0)]);
    r.now = r.now + Config::default().handshake_timeout;
    r.t.handle_timeout(r.now);
    assert_eq!(closed(&r.events(), H0), Some(Cause::HandshakeTimeout));
}

#[test]
fn a_refused_token_falls_back_to_the_password_once_when_down() {
    let mut r = Rig::up();
    // The relay goes away; the terminal, down, reconnects with its token.
    r.t.transport_closed(H0, r.now);
    r.events();
    r.now = r.now + Duration::from_secs(120);
    r.t.handle_timeout(r.now);
    assert_eq!(r.events(), [Event::Open(H0)]);
    r.t.connected(H0, r.now);
    let [Frame::Login(login)] = &r.sent(H0)[..] else {
        panic!("LOGIN");
    };
    assert!(matches!(login.credential, frame::Credential::Resume(_)));
    r.feed(H0, error(ErrorCode::ResumeRejected));
    let [Frame::Login(login)] = &r.sent(H0)[..] else {
        panic!("a second LOGIN");
    };
    assert!(matches!(login.credential, frame::Credential::Password(_)));
    // A refused password then is final: the terminal stops.
    r.feed(H0, error(ErrorCode::AuthFailed));
    let events = r.events();
    assert_eq!(
        closed(&events, H0),
        Some(Cause::Relay(ErrorCode::AuthFailed))
    );
    assert!(events.iter().any(|e| matches!(
        e,
        Event::LoginRefused {
            code: ErrorCode::AuthFailed,
            ..
        }
    )));
    r.t.handle_timeout(r.now + Duration::from_secs(600));
    assert_eq!(r.events(), [], "stopped: no reconnect");
}

#[test]
fn logging_in_and_any_other_frame_closes() {
    let mut r = Rig {
        t: Terminal::new(
            Config::default(),
            UserId::new("dev").unwrap(),
            Password::new("pw").unwrap(),
            7,
        ),
        now: Instant::from_secs(1),
    };
    r.t.start(r.now);
    r.events();
    r.t.connected(H0, r.now);
    r.sent(H0);
    r.feed(H0, Frame::Terminate);
    assert_eq!(closed(&r.events(), H0), Some(Cause::Protocol));
}

#[test]
fn a_notice_withdrawn_by_release_leaves_the_connection_idle() {
    let mut r = Rig::up();
    r.notice(H0, 12);
    r.feed(
        H0,
        Frame::Release {
            reason: crate::codes::ReleaseReason::Cancelled,
        },
    );
    assert!(matches!(
        r.events()[..],
        [Event::SessionEnded { handle: H0, .. }]
    ));
    assert_eq!(r.t.idle_connections(), 1);
}

#[test]
fn a_notice_crossing_our_demand_is_ignored() {
    let mut r = Rig::up();
    demanding(&mut r);
    r.feed(
        H0,
        Frame::Notice(Notice {
            session: 13,
            from: UserId::new("peer").unwrap(),
            service: ServiceName::default(),
        }),
    );
    assert!(!r.events().iter().any(|e| matches!(e, Event::Notice { .. })));
    r.feed(
        H0,
        Frame::DemandResult(DemandResult::Accepted { session: 14 }),
    );
    assert!(
        r.events()
            .iter()
            .any(|e| matches!(e, Event::Accepted { session: 14, .. }))
    );
}

#[test]
fn the_peers_terminate_then_data_closes() {
    let mut r = Rig::up();
    r.notice(H0, 15);
    r.t.accept(H0, r.now).unwrap();
    r.sent(H0);
    r.feed(H0, Frame::Terminate);
    assert_eq!(r.events(), [Event::PeerTerminated { handle: H0 }]);
    let header = frame::data_header(1).unwrap();
    assert_eq!(
        r.t.handle_input(H0, r.now, &header),
        Offer::Consumed(header.len())
    );
    assert_eq!(closed(&r.events(), H0), Some(Cause::Protocol));
}

#[test]
fn data_or_release_on_an_idle_connection_closes() {
    let mut r = Rig::up();
    let header = frame::data_header(4).unwrap();
    r.t.handle_input(H0, r.now, &header);
    assert_eq!(closed(&r.events(), H0), Some(Cause::Protocol));
    let mut r = Rig::up();
    r.feed(
        H0,
        Frame::Release {
            reason: crate::codes::ReleaseReason::Normal,
        },
    );
    assert_eq!(closed(&r.events(), H0), Some(Cause::Protocol));
}

#[test]
fn keepalive_is_sent_when_due_and_silence_past_the_deadline_closes() {
    let mut r = Rig::up();
    // LOGIN_OK said 30 s; the first KEEPALIVE is due within 30 s ± 10%.
    let due = r.t.poll_timeout().unwrap();
    assert!(due <= r.now + Duration::from_secs(33));
    r.now = due;
    r.t.handle_timeout(r.now);
    assert!(matches!(r.sent(H0)[..], [Frame::KeepAlive { .. }]));
    r.now = Instant::from_secs(1) + Duration::from_secs(30) + Config::default().ack_timeout;
    r.t.handle_timeout(r.now);
    assert_eq!(closed(&r.events(), H0), Some(Cause::KeepAliveTimeout));
}

#[test]
fn errors_while_idle_fatal_closes_non_fatal_is_reported() {
    let mut r = Rig::up();
    r.feed(H0, error(ErrorCode::UnknownSession));
    assert!(matches!(
        r.events()[..],
        [Event::RelayError {
            code: ErrorCode::UnknownSession,
            ..
        }]
    ));
    assert_eq!(r.t.idle_connections(), 1);
    r.feed(H0, error(ErrorCode::ShuttingDown));
    assert_eq!(
        closed(&r.events(), H0),
        Some(Cause::Relay(ErrorCode::ShuttingDown))
    );
}

#[test]
fn logout_closes_once_written() {
    let mut r = Rig::up();
    r.t.logout(r.now);
    assert_eq!(r.sent(H0), [Frame::Logout]);
    assert_eq!(r.events(), []);
    assert_eq!(r.sent(H0), []);
    assert_eq!(closed(&r.events(), H0), Some(Cause::Local));
}

/// A terminal whose first connection logged in with a LOGIN_OK carrying `caps`.
fn up_with_caps(config: Config, caps: u32) -> Rig {
    let mut r = Rig {
        t: Terminal::new(
            config,
            UserId::new("dev").unwrap(),
            Password::new("pw").unwrap(),
            7,
        ),
        now: Instant::from_secs(1),
    };
    r.t.start(r.now);
    assert_eq!(r.events(), [Event::Open(H0)]);
    r.t.connected(H0, r.now);
    r.sent(H0);
    r.feed(
        H0,
        Frame::LoginOk(LoginOk {
            caps,
            keepalive_ms: 30_000,
            max_payload: 4096,
            token: ResumeToken::from_slice(b"token").unwrap(),
        }),
    );
    r
}

#[test]
fn no_online_list_from_a_relay_without_list() {
    let mut r = up_with_caps(Config::default(), frame::caps::RESUME);
    assert_eq!(r.events()[0], Event::LoggedIn);
    assert_eq!(r.t.caps(), frame::caps::RESUME);
    assert_eq!(
        r.t.request_online(0),
        Err(SendError::Unsupported(Unsupported::List))
    );
    assert_eq!(r.sent(H0), []);
}

#[test]
fn no_resumption_and_no_spare_with_a_relay_without_resume() {
    let config = Config {
        spare: 2,
        ..Config::default()
    };
    let mut r = up_with_caps(config, frame::caps::LIST);
    // Another connection would need the token (or a second password login, which
    // replaces this one): the terminal stays at one.
    assert_eq!(r.events(), [Event::LoggedIn]);
    assert_eq!(r.t.open_connections(), 1);
    // Lost, it logs in again with the password.
    r.t.transport_closed(H0, r.now);
    r.now = r.now + Duration::from_secs(120);
    r.t.handle_timeout(r.now);
    let opened: Vec<Handle> = r
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::Open(h) => Some(h),
            _ => None,
        })
        .collect();
    let [h] = opened[..] else {
        panic!("one connection: {opened:?}");
    };
    r.t.connected(h, r.now);
    let [Frame::Login(login)] = &r.sent(h)[..] else {
        panic!("LOGIN");
    };
    assert!(matches!(login.credential, frame::Credential::Password(_)));
}

#[test]
fn a_requester_on_a_relay_without_requester_is_told_it_runs_reachable() {
    let config = Config {
        kind: Kind::Requester,
        ..Config::default()
    };
    let mut r = up_with_caps(config.clone(), frame::caps::ALL);
    assert_eq!(r.events()[0], Event::LoggedIn);
    assert_eq!(r.t.runs_as(), Some(Kind::Reachable));
    let mut r = up_with_caps(config, frame::caps::ALL | frame::caps::REQUESTER);
    assert_eq!(r.events()[0], Event::LoggedIn);
    assert_eq!(r.t.runs_as(), Some(Kind::Requester));
}

#[test]
fn a_demand_without_an_idle_connection_rides_the_next_one_to_log_in() {
    let mut r = Rig::up();
    demanding(&mut r);
    // H0 is busy, H1 (the spare) is coming up: the second demand waits for its login.
    let h1 = Handle(1);
    let second =
        r.t.demand(UserId::new("cam").unwrap(), ServiceName::default(), r.now);
    assert_eq!(second, Ok(h1));
    // The pool still wants a spare of its own: H1 is taken.
    assert_eq!(r.t.open_connections(), 2);
    r.t.connected(h1, r.now);
    assert!(matches!(r.sent(h1)[..], [Frame::Login(_)]));
    r.feed(
        h1,
        Frame::LoginOk(LoginOk {
            caps: frame::caps::ALL,
            keepalive_ms: 30_000,
            max_payload: 4096,
            token: ResumeToken::from_slice(b"token").unwrap(),
        }),
    );
    assert!(matches!(r.sent(h1)[..], [Frame::Demand(_)]));
    assert_eq!(r.t.idle_connections(), 0);
}

#[test]
fn a_demand_with_every_slot_busy_is_refused() {
    let mut r = Rig::up();
    demanding(&mut r);
    let cam = || UserId::new("cam").unwrap();
    assert_eq!(
        r.t.demand(cam(), ServiceName::default(), r.now),
        Ok(Handle(1))
    );
    assert_eq!(
        r.t.demand(cam(), ServiceName::default(), r.now),
        Err(SendError::NoIdleConnection)
    );
}

#[test]
fn a_demand_while_reconnecting_waits_for_the_back_off_and_the_login() {
    let mut r = Rig::up();
    r.t.transport_closed(H0, r.now);
    let down = r.events();
    assert!(down.contains(&Event::Down), "{down:?}");
    // In back-off: the demand holds a slot, and nothing opens before the back-off ends.
    let h =
        r.t.demand(UserId::new("cam").unwrap(), ServiceName::default(), r.now)
            .unwrap();
    assert_eq!(r.events(), []);
    let at = r.t.poll_timeout().unwrap();
    assert!(at > r.now);
    r.now = at;
    r.t.handle_timeout(r.now);
    assert_eq!(r.events(), [Event::Open(h)]);
    r.t.connected(h, r.now);
    assert!(matches!(r.sent(h)[..], [Frame::Login(_)]));
    r.feed(
        h,
        Frame::LoginOk(LoginOk {
            caps: frame::caps::ALL,
            keepalive_ms: 30_000,
            max_payload: 4096,
            token: ResumeToken::from_slice(b"token").unwrap(),
        }),
    );
    assert!(matches!(r.sent(h)[..], [Frame::Demand(_)]));
}

#[test]
fn no_demand_once_logged_out() {
    let mut r = Rig::up();
    r.t.logout(r.now);
    assert_eq!(
        r.t.demand(UserId::new("cam").unwrap(), ServiceName::default(), r.now),
        Err(SendError::NotLoggedIn)
    );
}

#[test]
fn a_waiting_demand_outlives_failed_reconnects_until_its_patience() {
    let mut r = Rig::up();
    r.t.transport_closed(H0, r.now);
    r.events();
    let h =
        r.t.demand(UserId::new("cam").unwrap(), ServiceName::default(), r.now)
            .unwrap();
    let patience_ends = r.now + Config::default().demand_patience;
    // Each failed attempt holds the slot again: Open after Open, no Closed, until the
    // patience runs out; then the demand ends with its connection.
    let mut attempts = 0;
    loop {
        r.now = r.t.poll_timeout().unwrap();
        r.t.handle_timeout(r.now);
        match &r.events()[..] {
            [] => continue,
            [Event::Open(o)] if *o == h => attempts += 1,
            other => panic!("attempt {attempts}: {other:?}"),
        }
        r.t.connect_failed(h, r.now);
        let events = r.events();
        if closed(&events, h).is_some() {
            assert!(r.now >= patience_ends, "gave up early: {events:?}");
            break;
        }
        assert_eq!(events, [], "attempt {attempts}");
    }
    assert!(attempts >= 3, "{attempts}");
}

#[cfg(feature = "redirect")]
/// Redirects (docs/PROTOCOL.md §10.6): a requester that follows them, with a demand for
/// `cam` written on `H0` and the pool's spare `H1` opening.
fn redirectable() -> (Rig, frame::Login) {
    let follows = Config {
        kind: Kind::Requester,
        follow_redirects: true,
        ..Config::default()
    };
    let (mut r, login) = Rig::up_as(follows);
    demanding(&mut r);
    (r, login)
}

fn node7() -> Redirect {
    Redirect {
        address: crate::ident::NodeAddress::new("10.0.0.7:7835").unwrap(),
        fingerprint: [7; 32],
    }
}

fn redirect() -> Frame {
    Frame::DemandResult(DemandResult::Redirect(node7()))
}

#[cfg(feature = "redirect")]
/// `H0`'s demand, redirected: the terminal moves the handle to node 7, which it reaches
/// and logs in to with the token as a requester that does not follow redirects, its
/// DEMAND right behind the LOGIN (no round trip of its own).
fn detoured() -> Rig {
    let (mut r, _) = redirectable();
    r.feed(H0, redirect());
    assert_eq!(
        r.events(),
        [Event::Redirected {
            handle: H0,
            to: node7()
        }]
    );
    r.t.connected(H0, r.now);
    let sent = r.sent(H0);
    let [Frame::Login(login), Frame::Demand(d)] = &sent[..] else {
        panic!("{sent:?}");
    };
    assert_eq!(d.target.as_str(), "cam");
    assert_eq!(login.hello.caps, frame::caps::ALL | frame::caps::REQUESTER);
    assert_eq!(
        login.credential,
        frame::Credential::Resume(ResumeToken::from_slice(b"token").unwrap())
    );
    r
}

#[cfg(feature = "redirect")]
fn login_ok_there() -> Frame {
    Frame::LoginOk(LoginOk {
        caps: frame::caps::ALL | frame::caps::REQUESTER,
        keepalive_ms: 20_000,
        max_payload: 4096,
        token: ResumeToken::from_slice(b"other").unwrap(),
    })
}

#[cfg(feature = "redirect")]
#[test]
fn a_terminal_that_follows_redirects_announces_it() {
    let (_, login) = redirectable();
    assert_eq!(
        login.hello.caps,
        frame::caps::ALL | frame::caps::REQUESTER | frame::caps::REDIRECT
    );
}

#[cfg(feature = "redirect")]
#[test]
fn a_redirected_demand_is_made_again_at_the_other_node_on_the_same_handle() {
    let mut r = detoured();
    r.feed(H0, login_ok_there());
    // The detour's LOGIN_OK is its own: no event, our relay's caps and token stay.
    assert_eq!(r.events(), []);
    assert_eq!(r.t.caps(), frame::caps::ALL);
    assert_eq!(r.sent(H0), [], "the DEMAND went with the LOGIN");
    r.feed(
        H0,
        Frame::DemandResult(DemandResult::Accepted { session: 3 }),
    );
    assert!(matches!(
        r.events()[..],
        [Event::Accepted {
            handle: H0,
            session: 3,
            ..
        }]
    ));
    // The session's end closes the detour: it never idles at a relay not ours.
    r.feed(
        H0,
        Frame::Release {
            reason: ReleaseReason::Normal,
        },
    );
    assert_eq!(
        r.events(),
        [
            Event::SessionEnded {
                handle: H0,
                reason: ReleaseReason::Normal
            },
            Event::Closed {
                handle: H0,
                cause: Cause::Local
            }
        ]
    );
    assert!(r.t.is_up(), "our own relay's login is untouched");
}

/// At most one redirect per demand: a second one (a relay should not send it, the
/// detour did not announce REDIRECT) fails the demand as `TargetOffline`.
#[cfg(feature = "redirect")]
#[test]
fn a_second_redirect_fails_the_demand() {
    let mut r = detoured();
    r.feed(H0, login_ok_there());
    r.sent(H0);
    r.feed(H0, redirect());
    assert_eq!(
        r.events(),
        [
            Event::DemandFailed {
                handle: H0,
                error: DemandError::TargetOffline,
                text: Text::display(&DemandError::TargetOffline),
            },
            Event::Closed {
                handle: H0,
                cause: Cause::Local
            }
        ]
    );
}

/// A refused login at the other node, even a fatal `Replaced`, ends that demand only:
/// the terminal neither stops nor backs off nor falls back to its password there.
#[cfg(feature = "redirect")]
#[test]
fn a_refused_login_at_the_other_node_fails_the_demand_only() {
    for code in [ErrorCode::ResumeRejected, ErrorCode::Replaced] {
        let mut r = detoured();
        r.feed(
            H0,
            Frame::Error {
                code,
                text: Text::lossy(code.describe()),
                retry_after: None,
            },
        );
        let events = r.events();
        assert!(
            matches!(
                &events[..],
                [
                    Event::DemandFailed {
                        handle: H0,
                        error: DemandError::TargetOffline,
                        text,
                    },
                    Event::Closed { handle: H0, .. },
                ] if text.as_str() == code.describe()
            ),
            "{code:?}: {events:?}"
        );
        assert!(r.t.is_up(), "{code:?}");
        // The next demand goes out on our relay's connection at once.
        r.t.connected(Handle(1), r.now);
        r.sent(Handle(1));
        r.feed(Handle(1), login_ok_there());
        assert_eq!(
            r.t.demand(UserId::new("cam").unwrap(), ServiceName::default(), r.now),
            Ok(Handle(1))
        );
    }
}

/// A detour whose transport fails ends its demand with the handle; it is not opened
/// again, neither there nor at our relay.
#[cfg(feature = "redirect")]
#[test]
fn a_detour_that_cannot_connect_ends_its_demand() {
    let (mut r, _) = redirectable();
    r.feed(H0, redirect());
    r.events();
    r.t.connect_failed(H0, r.now);
    assert_eq!(
        r.events(),
        [Event::Closed {
            handle: H0,
            cause: Cause::Transport
        }]
    );
    r.now = r.now + Duration::from_secs(30);
    r.t.handle_timeout(r.now);
    assert!(!r.events().contains(&Event::Open(H0)));
}

/// A terminal that does not follow redirects (every terminal without the `redirect`
/// feature: a device) never announces `REDIRECT`, whatever its kind; a redirect a relay
/// sends it anyway fails that demand as `TargetOffline`, and the connection stays idle
/// for the next demand.
#[test]
fn a_terminal_that_does_not_follow_takes_a_redirect_as_target_offline() {
    for kind in [Kind::Reachable, Kind::Requester] {
        let config = Config {
            kind,
            ..Config::default()
        };
        let (mut r, login) = Rig::up_as(config);
        assert_eq!(login.hello.caps & frame::caps::REDIRECT, 0, "{kind:?}");
        demanding(&mut r);
        r.feed(H0, redirect());
        assert_eq!(
            r.events(),
            [Event::DemandFailed {
                handle: H0,
                error: DemandError::TargetOffline,
                text: Text::display(&DemandError::TargetOffline),
            }],
            "{kind:?}"
        );
        assert_eq!(r.t.idle_connections(), 1, "{kind:?}");
        let again =
            r.t.demand(UserId::new("cam").unwrap(), ServiceName::default(), r.now);
        assert_eq!(again, Ok(H0), "{kind:?}");
        assert!(matches!(r.sent(H0)[..], [Frame::Demand(_)]), "{kind:?}");
    }
}

/// Several relay addresses (a cluster): the terminal moves to the next one when it loses
/// its relay, once per loss (the other connections to the lost relay close with the old
/// index), and again when a connection to the new one fails while down; losing one of
/// several logged-in connections is not losing the relay.
#[test]
fn a_lost_relay_moves_the_next_connections_to_the_next_address_once() {
    let mut r = Rig::up();
    assert_eq!(r.t.relay(), 0);
    // A demand takes H0: the spare H1 opens, to the same relay, and logs in.
    r.t.demand(UserId::new("cam").unwrap(), ServiceName::default(), r.now)
        .unwrap();
    r.t.handle_timeout(r.now);
    assert_eq!(r.events(), [Event::Open(Handle(1))]);
    r.t.connected(Handle(1), r.now);
    assert!(matches!(r.sent(Handle(1))[..], [Frame::Login(_)]));
    r.feed(
        Handle(1),
        Frame::LoginOk(LoginOk {
            caps: frame::caps::ALL,
            keepalive_ms: 30_000,
            max_payload: 4096,
            token: ResumeToken::from_slice(b"token").unwrap(),
        }),
    );
    r.events();
    r.t.transport_closed(H0, r.now);
    r.events();
    assert!(r.t.is_up());
    assert_eq!(r.t.relay(), 0, "one connection of two lost: same relay");
    r.t.transport_closed(Handle(1), r.now);
    r.events();
    assert_eq!(r.t.relay(), 1, "the last one lost: the next address");
    // After the back-off the terminal opens one connection (down: one at a time), to
    // address 1; it fails, and the next goes to address 2.
    r.now = r.now + Duration::from_secs(120);
    r.t.handle_timeout(r.now);
    let [Event::Open(h)] = r.events()[..] else {
        panic!("one Open after the back-off")
    };
    r.t.connect_failed(h, r.now);
    r.events();
    assert_eq!(r.t.relay(), 2);
}

/// The connections a lost relay held close one after another: the first moves the
/// terminal on, the rest (opened to the old address) do not move it again.
#[test]
fn the_other_connections_of_a_lost_relay_do_not_move_the_terminal_again() {
    let mut r = Rig::up();
    r.t.demand(UserId::new("cam").unwrap(), ServiceName::default(), r.now)
        .unwrap();
    r.t.handle_timeout(r.now);
    assert_eq!(r.events(), [Event::Open(Handle(1))]);
    r.t.transport_closed(H0, r.now);
    r.events();
    assert_eq!(r.t.relay(), 1);
    r.t.connect_failed(Handle(1), r.now);
    r.events();
    assert_eq!(r.t.relay(), 1, "H1 was opened to the lost relay");
}

/// ERROR `ShuttingDown` (the relay stops, drains or is fenced): not a failure. The next
/// connection goes to the next address within 250 ms, not after the 0.5 s back-off a
/// lost connection waits; and the back-off is not raised by it.
#[test]
fn shutting_down_moves_to_the_next_relay_within_250_ms() {
    let mut r = Rig::up();
    r.feed(H0, error(ErrorCode::ShuttingDown));
    let events = r.events();
    assert_eq!(
        closed(&events, H0),
        Some(Cause::Relay(ErrorCode::ShuttingDown))
    );
    assert_eq!(r.t.relay(), 1);
    r.now = r.now + Duration::from_millis(250);
    r.t.handle_timeout(r.now);
    assert_eq!(r.events(), [Event::Open(H0)], "moved within 250 ms");

    // A connection lost otherwise waits the back-off (0.5 s ± 25 %).
    let mut r = Rig::up();
    r.t.transport_closed(H0, r.now);
    r.events();
    r.now = r.now + Duration::from_millis(250);
    r.t.handle_timeout(r.now);
    assert_eq!(r.events(), [], "still backing off");
}
