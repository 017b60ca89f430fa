//! Every class of bad input gets a defined outcome, checked frame by frame against the
//! relay core directly (no harness): an ERROR frame with the right code, then close for
//! fatal codes or carry on for the others. A session running alongside is not disturbed.
//! Uses the fixed-capacity (no_std) storage.

mod harness;

use harness::{T0, enc, error_code, feed, login, output};
use relay_proto::codes::ErrorCode;
use relay_proto::frame::{self, Demand, DemandResult, Frame, Parsed, data_header};
use relay_proto::relay::{self, AllowAll, ConnId, Event, Fixed, Offer, Relay, Verdict};
use relay_proto::{Duration, ResumeToken, ServiceName, UserId};

type Core = harness::Core<Fixed<16, 8, 64>>;

fn core() -> Core {
    Relay::new(relay::Config::default(), AllowAll)
}

/// Fresh connection fed `bytes`: the error it gets and whether it closes.
fn outcome(bytes: &[u8]) -> (Option<ErrorCode>, bool) {
    let mut r = core();
    let c = r.accept(T0).unwrap();
    feed(&mut r, c, bytes);
    let (frames, close) = output(&mut r, c);
    (error_code(&frames), close)
}

#[test]
fn malformed_frames_before_login() {
    // Truncated frames wait for more bytes; nothing is sent yet.
    assert_eq!(outcome(&login("a", "pw")[..5]), (None, false));
    assert_eq!(outcome(&[0x01]), (None, false));
    // Unknown type, oversize length, bad payloads.
    assert_eq!(
        outcome(&[0x7F, 0, 0]),
        (Some(ErrorCode::UnknownFrameType), true)
    );
    assert_eq!(
        outcome(b"GET / HTTP/1.1\r\n\r\n"),
        (Some(ErrorCode::UnknownFrameType), true)
    );
    assert_eq!(
        outcome(&[0x16, 0x03, 0x01, 0x02, 0x00]),
        (Some(ErrorCode::UnknownFrameType), true),
        "a TLS hello on a plain port"
    );
    assert_eq!(
        outcome(&[0x01, 0xFF, 0xFF]),
        (Some(ErrorCode::FrameTooLarge), true)
    );
    assert_eq!(
        outcome(&[0x03, 0, 2, 0xFF, 0xFF]),
        (Some(ErrorCode::BadFrame), true),
        "bad postcard payload"
    );
    // Wrong magic, future version.
    let mut l = login("a", "pw");
    l[3] = b'X';
    assert_eq!(outcome(&l), (Some(ErrorCode::BadMagic), true));
    let mut l = login("a", "pw");
    l[7] = 2;
    assert_eq!(outcome(&l), (Some(ErrorCode::VersionMismatch), true));
    // Non-UTF-8 and overlong user IDs: the payload does not decode.
    let mut l = login("abc", "pw");
    let at = l.windows(3).position(|w| w == b"abc").unwrap();
    l[at] = 0xFF;
    assert_eq!(outcome(&l), (Some(ErrorCode::BadFrame), true));
    let mut long = login("a", "pw");
    let at = long.iter().rposition(|&b| b == 1).unwrap(); // the user ID's length byte
    long[at] = 33;
    long.splice(at + 1..at + 2, std::iter::repeat_n(b'x', 33));
    let len = (long.len() - 3) as u16;
    long[1..3].copy_from_slice(&len.to_be_bytes());
    assert_eq!(outcome(&long), (Some(ErrorCode::BadFrame), true));
    // Anything but LOGIN first: data, keep-alive, demand.
    assert_eq!(
        outcome(&[0x0C, 0, 1, 0x41]),
        (Some(ErrorCode::NotLoggedIn), true)
    );
    assert_eq!(
        outcome(&enc(&Frame::KeepAlive { seq: 1 })),
        (Some(ErrorCode::NotLoggedIn), true)
    );
    // An empty DATA frame.
    assert_eq!(outcome(&[0x0C, 0, 0]), (Some(ErrorCode::BadFrame), true));
}

fn logged_in(r: &mut Core, user: &str) -> ConnId {
    harness::logged_in(r, user)
}

#[test]
fn wrong_password_is_retried_then_throttled() {
    let mut r = core();
    let c = r.accept(T0).unwrap();
    for _ in 0..2 {
        feed(&mut r, c, &login("a", "nope"));
        assert_eq!(
            output(&mut r, c),
            (
                vec![Frame::Error {
                    code: ErrorCode::AuthFailed,
                    text: relay_proto::Text::lossy(ErrorCode::AuthFailed.describe()),
                    retry_after: None,
                }],
                false
            )
        );
    }
    feed(&mut r, c, &login("a", "nope"));
    let (frames, close) = output(&mut r, c);
    assert_eq!(
        (error_code(&frames), close),
        (Some(ErrorCode::Throttled), true)
    );
}

#[test]
fn frames_illegal_in_state_after_login() {
    let mut r = core();
    let a = logged_in(&mut r, "a");
    // A second login, an ACCEPT for no session, a REJECT likewise, a relay-only frame,
    // TERMINATE outside a session: errors, the connection stays.
    for (bytes, code) in [
        (login("a", "pw"), ErrorCode::UnexpectedFrame),
        (
            enc(&Frame::Accept { session: 42 }),
            ErrorCode::UnknownSession,
        ),
        (
            enc(&Frame::Release {
                reason: relay_proto::ReleaseReason::Normal,
            }),
            ErrorCode::UnexpectedFrame,
        ),
    ] {
        feed(&mut r, a, &bytes);
        let (frames, close) = output(&mut r, a);
        assert_eq!(
            (error_code(&frames), close),
            (Some(code), false),
            "{bytes:02x?}"
        );
    }
    // DATA and TERMINATE on an idle connection: what a terminal sent before the RELEASE
    // of its session reached it. Dropped quietly; the stream stays in sync.
    let mut junk = data_header(4).unwrap().to_vec();
    junk.extend(b"junk");
    let mut bytes = [
        junk.clone(),
        enc(&Frame::Terminate),
        enc(&Frame::KeepAlive { seq: 9 }),
    ]
    .concat();
    feed(&mut r, a, &bytes);
    assert_eq!(
        output(&mut r, a),
        (vec![Frame::KeepAliveAck { seq: 9 }], false)
    );
    // DATA while a demand is pending (no session yet): error, payload skipped, in sync.
    let _b = logged_in(&mut r, "b");
    let demand = Demand {
        target: UserId::new("b").unwrap(),
        service: ServiceName::default(),
    };
    feed(&mut r, a, &enc(&Frame::Demand(demand)));
    bytes = [junk, enc(&Frame::KeepAlive { seq: 10 })].concat();
    feed(&mut r, a, &bytes);
    let (frames, close) = output(&mut r, a);
    assert_eq!(error_code(&frames), Some(ErrorCode::UnexpectedFrame));
    assert!(
        frames.contains(&Frame::KeepAliveAck { seq: 10 }),
        "{frames:?}"
    );
    assert!(!close);
    // Garbage after login is fatal.
    feed(&mut r, a, &[0xEE, 0, 0]);
    assert!(output(&mut r, a).1);
}

#[test]
fn bad_input_does_not_disturb_a_running_session() {
    let mut r = core();
    let a = logged_in(&mut r, "a");
    let b = logged_in(&mut r, "b");
    feed(
        &mut r,
        a,
        &enc(&Frame::Demand(Demand {
            target: UserId::new("b").unwrap(),
            service: ServiceName::default(),
        })),
    );
    let (frames, _) = output(&mut r, b);
    let Frame::Notice(n) = &frames[0] else {
        panic!("{frames:?}")
    };
    feed(&mut r, b, &enc(&Frame::Accept { session: n.session }));
    let (frames, _) = output(&mut r, a);
    assert!(matches!(
        frames[0],
        Frame::DemandResult(DemandResult::Accepted { .. })
    ));

    // Hostile connections come and go.
    for garbage in [
        &[0xFFu8, 0xFF, 0xFF][..],
        &[0x01, 0xFF, 0xFF],
        b"\x0c\x00\x01x",
        &login("b", "wrong"),
    ] {
        let h = r.accept(T0).unwrap();
        feed(&mut r, h, garbage);
        let _ = output(&mut r, h);
        r.closed(h);
    }
    // A stalled one times out; the session's connections do not.
    let stall = r.accept(T0).unwrap();
    let later = T0 + Duration::from_secs(11);
    r.handle_timeout(later, stall);
    assert!(output(&mut r, stall).1);
    r.handle_timeout(later, a);
    r.handle_timeout(later, b);

    // Data still flows, byte-exact, split anywhere.
    let mut bytes = data_header(5).unwrap().to_vec();
    bytes.extend(b"hello");
    // As a host does: keep what the core could not use yet, offer it again with more.
    let mut fwd = Vec::new();
    let mut pending = Vec::new();
    for chunk in bytes.chunks(2) {
        pending.extend_from_slice(chunk);
        let used = harness::offer(&mut r, a, &pending, &mut fwd);
        pending.drain(..used);
    }
    let payload: Vec<u8> = fwd
        .iter()
        .flat_map(|(to, p)| {
            assert_eq!(*to, b);
            p.clone()
        })
        .collect();
    assert_eq!(payload, b"hello");
    assert_eq!(r.stats().active_sessions, 1);
    assert!(r.is_online(&UserId::new("b").unwrap()));
}

#[test]
fn oversize_data_for_the_relay_limit() {
    let mut r: Core = Relay::new(
        relay::Config {
            max_frame_payload: 1024,
            ..Default::default()
        },
        AllowAll,
    );
    let c = r.accept(T0).unwrap();
    feed(&mut r, c, &login("a", "pw"));
    let _ = output(&mut r, c);
    feed(&mut r, c, &data_header(1025).unwrap());
    let (frames, close) = output(&mut r, c);
    assert_eq!(
        (error_code(&frames), close),
        (Some(ErrorCode::FrameTooLarge), true)
    );
}

/// `a` and `b` logged in and paired; returns (relay, a, b).
fn session() -> (Core, ConnId, ConnId) {
    let mut r = core();
    let a = logged_in(&mut r, "a");
    let b = logged_in(&mut r, "b");
    let demand = Demand {
        target: UserId::new("b").unwrap(),
        service: ServiceName::default(),
    };
    feed(&mut r, a, &enc(&Frame::Demand(demand)));
    let (frames, _) = output(&mut r, b);
    let Frame::Notice(n) = &frames[0] else {
        panic!("{frames:?}")
    };
    feed(&mut r, b, &enc(&Frame::Accept { session: n.session }));
    let _ = output(&mut r, a);
    (r, a, b)
}

#[test]
fn data_after_own_terminate_is_refused_and_not_forwarded() {
    let (mut r, a, b) = session();
    feed(&mut r, a, &enc(&Frame::Terminate));
    let (frames, _) = output(&mut r, b);
    assert_eq!(frames, vec![Frame::Terminate]);
    let mut bytes = data_header(3).unwrap().to_vec();
    bytes.extend(b"bad");
    let fwd = feed(&mut r, a, &bytes);
    assert!(
        fwd.is_empty(),
        "payload after TERMINATE must not reach the peer: {fwd:?}"
    );
    let (frames, close) = output(&mut r, a);
    assert_eq!(
        (error_code(&frames), close),
        (Some(ErrorCode::UnexpectedFrame), false)
    );
    // b's stream is untouched: nothing more for it.
    assert_eq!(output(&mut r, b), (vec![], false));
}

#[test]
fn receiver_mid_payload_is_closed_when_the_sender_dies() {
    let (mut r, a, b) = session();
    // Header parsed and flushed to b (as the host must before any payload), then the
    // first payload bytes: b is mid-frame now.
    assert!(feed(&mut r, a, &data_header(100).unwrap()).is_empty());
    let mut buf = [0u8; relay::MIN_TRANSMIT_BUF];
    assert_eq!(r.poll_transmit(b, &mut buf).unwrap().len, 3);
    let fwd = feed(&mut r, a, &[7u8; 10]);
    assert_eq!(fwd, vec![(b, vec![7u8; 10])]);
    r.closed(a);
    // b cannot be told in-band (its stream is inside a DATA frame): it is closed.
    let t = r.poll_transmit(b, &mut buf).unwrap();
    assert_eq!((t.len, t.close), (0, true));
}

#[test]
fn full_terminal_table_refuses_login_without_wedging_the_connection() {
    let mut r: Relay<Fixed<4, 1, 16>, AllowAll> = Relay::new(relay::Config::default(), AllowAll);
    let a = r.accept(T0).unwrap();
    let b = r.accept(T0).unwrap();
    let run = |r: &mut Relay<Fixed<4, 1, 16>, AllowAll>, c: ConnId, bytes: &[u8]| {
        assert!(matches!(r.handle_input(T0, c, bytes), Offer::Consumed(_)));
        while let Some(e) = r.poll_event() {
            if let Event::Authenticate { conn, .. } = e {
                let token = ResumeToken::from_slice(b"t").unwrap();
                r.login_verdict(T0, conn, Verdict::Accept { instance: 1, token });
            }
        }
        let mut buf = [0u8; relay::MIN_TRANSMIT_BUF];
        let t = r.poll_transmit(c, &mut buf).unwrap();
        (
            frame::parse(&buf[..t.len]).unwrap().map(|(p, _)| p),
            t.close,
        )
    };
    assert!(matches!(
        run(&mut r, a, &login("a", "pw")),
        (Some(Parsed::Control(Frame::LoginOk(_))), false)
    ));
    let busy = run(&mut r, b, &login("b", "pw"));
    assert!(
        matches!(
            busy,
            (
                Some(Parsed::Control(Frame::Error {
                    code: ErrorCode::Busy,
                    ..
                })),
                false
            )
        ),
        "{busy:?}"
    );
    // The table frees up; the same connection may log in again at once.
    r.closed(a);
    assert!(matches!(
        run(&mut r, b, &login("b", "pw")),
        (Some(Parsed::Control(Frame::LoginOk(_))), false)
    ));
}

#[test]
fn demand_crossing_a_notice_on_the_same_connection() {
    let mut r = core();
    let a = logged_in(&mut r, "a");
    let b = logged_in(&mut r, "b");
    let to = |u: &str| {
        enc(&Frame::Demand(Demand {
            target: UserId::new(u).unwrap(),
            service: ServiceName::default(),
        }))
    };
    // b demands a: the relay picks a's only connection for the notice...
    feed(&mut r, b, &to("a"));
    // ...while a, not having seen it, demands b on that same connection.
    feed(&mut r, a, &to("b"));
    // b's demand is answered NoIdleConnection (it may retry), which frees b's connection;
    // a's demand goes ahead as a notice to b, after that result (else b, still demanding,
    // would take it for a crossed notice and ignore it).
    let (frames, _) = output(&mut r, b);
    assert!(
        matches!(
            &frames[..],
            [
                Frame::DemandResult(DemandResult::Failed {
                    error: relay_proto::DemandError::NoIdleConnection,
                    ..
                }),
                Frame::Notice(_)
            ]
        ),
        "{frames:?}"
    );
    let (frames, close) = output(&mut r, a);
    assert_eq!(
        (frames, close),
        (vec![], false),
        "no error for a: the crossing is normal"
    );
}

#[test]
fn frames_queued_during_a_payload_go_out_after_its_last_byte() {
    let (mut r, a, b) = session();
    let mut buf = [0u8; relay::MIN_TRANSMIT_BUF];
    // The header reaches b; b is inside a DATA frame now.
    assert!(feed(&mut r, a, &data_header(4).unwrap()).is_empty());
    assert_eq!(r.poll_transmit(b, &mut buf).unwrap().len, 3);
    // Meanwhile b's keep-alive wants an ack on b's stream: it must wait.
    feed(&mut r, b, &enc(&Frame::KeepAlive { seq: 5 }));
    assert_eq!(r.poll_transmit(b, &mut buf).unwrap().len, 0);
    // The last payload bytes: a host that flushes b right after `Forward`, before
    // writing them (the contract's order), must get nothing yet.
    assert_eq!(feed(&mut r, a, b"data"), vec![(b, b"data".to_vec())]);
    assert_eq!(
        r.poll_transmit(b, &mut buf).unwrap().len,
        0,
        "nothing may precede the payload's end"
    );
    // After the payload, the ack.
    assert_eq!(
        output(&mut r, b),
        (vec![Frame::KeepAliveAck { seq: 5 }], false)
    );
}

#[test]
fn shutdown_never_writes_into_an_unfinished_payload() {
    let (mut r, a, b) = session();
    let mut buf = [0u8; relay::MIN_TRANSMIT_BUF];
    assert!(feed(&mut r, a, &data_header(100).unwrap()).is_empty());
    assert_eq!(r.poll_transmit(b, &mut buf).unwrap().len, 3);
    r.shutdown();
    // b is mid-payload: closed without a frame; a gets its ERROR.
    let t = r.poll_transmit(b, &mut buf).unwrap();
    assert_eq!((t.len, t.close), (0, true));
    let (frames, close) = output(&mut r, a);
    assert_eq!(
        (error_code(&frames), close),
        (Some(ErrorCode::ShuttingDown), true)
    );
}

#[test]
fn back_to_back_frames_when_the_host_flushes_before_the_payload() {
    let (mut r, a, b) = session();
    let mut buf = [0u8; relay::MIN_TRANSMIT_BUF];
    let mut stream = Vec::new();
    // The other legal order: flush the receiver first (to reserve room there), then offer
    // the payload. Two DATA frames back to back must reach b as two whole frames.
    for payload in [&b"first"[..], b"second"] {
        assert!(feed(&mut r, a, &data_header(payload.len()).unwrap()).is_empty());
        let (to, _) = r.forward_target(a).unwrap();
        let t = r.poll_transmit(to, &mut buf).unwrap();
        stream.extend_from_slice(&buf[..t.len]);
        for (to, bytes) in feed(&mut r, a, payload) {
            assert_eq!(to, b);
            stream.extend(bytes);
        }
    }
    let t = r.poll_transmit(b, &mut buf).unwrap();
    stream.extend_from_slice(&buf[..t.len]);
    let mut expect = data_header(5).unwrap().to_vec();
    expect.extend(b"first");
    expect.extend(data_header(6).unwrap());
    expect.extend(b"second");
    assert_eq!(stream, expect);
}
