//! Finding 4 of issue 10, the points where a client written from docs/PROTOCOL.md alone
//! met different behaviour: each is now specified and checked here, frame by frame, on
//! the fixed (no_std) storage.

mod harness;

use harness::{T0, demand, enc, error_code, feed, logged_in, login, output};
use relay_proto::codes::ErrorCode;
use relay_proto::frame::{Frame, data_header};
use relay_proto::relay::{self, AllowAll, ConnId, Fixed, Relay};

type Core = harness::Core<Fixed<8, 4, { relay::max_events_per_call(8) }>>;

fn core() -> Core {
    Relay::new(relay::Config::default(), AllowAll)
}

/// `a` and `b` in a session (a demanded b); both outputs flushed.
fn session(r: &mut Core) -> (ConnId, ConnId) {
    let b = logged_in(r, "b");
    let a = logged_in(r, "a");
    feed(r, a, &demand("b"));
    let (frames, _) = output(r, b);
    let [Frame::Notice(n)] = &frames[..] else {
        panic!("{frames:?}")
    };
    feed(r, b, &enc(&Frame::Accept { session: n.session }));
    output(r, a);
    (a, b)
}

/// §6.2: frames right behind a LOGIN (one write) wait for its verdict and are then
/// handled as on a logged-in connection: a KEEPALIVE is answered, a DEMAND routed.
#[test]
fn frames_pipelined_behind_login_are_handled_after_the_verdict() {
    let mut r = core();
    let b = logged_in(&mut r, "b");
    let a = r.accept(T0).unwrap();
    let mut write = login("a", "pw");
    write.extend(enc(&Frame::KeepAlive { seq: 0 }));
    write.extend(demand("b"));
    assert_eq!(feed(&mut r, a, &write), vec![]);
    let (frames, close) = output(&mut r, a);
    assert!(!close, "{frames:?}");
    assert!(
        matches!(
            frames[..],
            [Frame::LoginOk(_), Frame::KeepAliveAck { seq: 0 }]
        ),
        "{frames:?}"
    );
    let (frames, _) = output(&mut r, b);
    assert!(matches!(frames[..], [Frame::Notice(_)]), "{frames:?}");
}

/// §6.2: behind a refused LOGIN the connection is back in Handshake, where anything but
/// LOGIN is NotLoggedIn (fatal).
#[test]
fn frames_pipelined_behind_a_refused_login_meet_the_handshake() {
    let mut r = core();
    let b = r.accept(T0).unwrap();
    let mut write = login("b", "wrong");
    write.extend(enc(&Frame::KeepAlive { seq: 0 }));
    feed(&mut r, b, &write);
    let (frames, close) = output(&mut r, b);
    assert_eq!(
        error_code(&frames),
        Some(ErrorCode::NotLoggedIn),
        "{frames:?}"
    );
    assert!(close);
}

/// §3.3: every KEEPALIVE gets its own KEEPALIVE_ACK, also those that arrive while a
/// forwarded payload is being written on the connection (the ACKs follow the payload).
#[test]
fn every_keepalive_is_answered_even_behind_a_payload() {
    let mut r = core();
    let (a, b) = session(&mut r);
    let mut data = data_header(10).unwrap().to_vec();
    data.extend([7; 5]);
    let fwd = feed(&mut r, a, &data);
    assert_eq!(fwd.len(), 1);
    // b's stream now carries the DATA header: b is locked until the payload is out.
    let mut buf = [0u8; relay::MIN_TRANSMIT_BUF];
    assert_eq!(r.poll_transmit(b, &mut buf).unwrap().len, 3);
    for seq in 0..3 {
        feed(&mut r, b, &enc(&Frame::KeepAlive { seq }));
    }
    assert_eq!(r.poll_transmit(b, &mut buf).unwrap().len, 0, "mid-payload");
    feed(&mut r, a, &[7; 5]);
    assert_eq!(
        output(&mut r, b).0,
        vec![],
        "the last bytes are not written yet"
    );
    let (frames, _) = output(&mut r, b);
    assert_eq!(
        frames,
        (0..3)
            .map(|seq| Frame::KeepAliveAck { seq })
            .collect::<Vec<_>>()
    );
}

/// §3.10, §3.11: DATA and TERMINATE on an Idle connection are dropped without an answer
/// (the payload is skipped): they may have crossed the RELEASE of a session the relay
/// ended (the peer lost), and the terminal cannot tell. The connection stays usable.
#[test]
fn data_and_terminate_on_an_idle_connection_are_dropped_quietly() {
    let mut r = core();
    let a = logged_in(&mut r, "a");
    let mut write = data_header(4).unwrap().to_vec();
    write.extend(b"late");
    write.extend(enc(&Frame::Terminate));
    write.extend(enc(&Frame::KeepAlive { seq: 9 }));
    assert_eq!(feed(&mut r, a, &write), vec![]);
    let (frames, close) = output(&mut r, a);
    assert_eq!(frames, vec![Frame::KeepAliveAck { seq: 9 }]);
    assert!(!close);
}
