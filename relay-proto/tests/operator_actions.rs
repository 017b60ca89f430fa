//! What the relay's operator does to running terminals and sessions, frame by frame on
//! the fixed (no_std) storage: a kick closes a user's connections with an honest reason;
//! ending one session releases both sides and leaves them logged in.

mod harness;

use harness::{demand, enc, error_code, feed, logged_in, output};
use relay_proto::UserId;
use relay_proto::codes::{ErrorCode, ReleaseReason};
use relay_proto::frame::{Frame, data_header};
use relay_proto::relay::{self, AllowAll, ConnId, Event, Fixed, Relay};

type Core = harness::Core<Fixed<8, 4, { relay::max_events_per_call(8) }>>;

fn core() -> Core {
    Relay::new(relay::Config::default(), AllowAll)
}

/// `a` and `b` in a session (a demanded b); both outputs flushed. The session's number.
fn session(r: &mut Core) -> (ConnId, ConnId, u32) {
    let b = logged_in(r, "b");
    let a = logged_in(r, "a");
    feed(r, a, &demand("b"));
    let (frames, _) = output(r, b);
    let [Frame::Notice(n)] = &frames[..] else {
        panic!("{frames:?}")
    };
    feed(r, b, &enc(&Frame::Accept { session: n.session }));
    output(r, a);
    (a, b, n.session)
}

fn released(frames: &[Frame]) -> Option<ReleaseReason> {
    frames.iter().find_map(|f| match f {
        Frame::Release { reason } => Some(*reason),
        _ => None,
    })
}

/// A kick says what happened (not "account removed": the account stays) and closes every
/// connection of the user; its session's peer learns that the peer logged out.
#[test]
fn a_kick_closes_the_users_connections_with_kicked() {
    let mut r = core();
    let (a, b, _) = session(&mut r);
    r.kick_user(&UserId::new("b").unwrap());
    let (frames, close) = output(&mut r, b);
    assert_eq!(error_code(&frames), Some(ErrorCode::Kicked), "{frames:?}");
    assert!(close);
    let (frames, close) = output(&mut r, a);
    assert_eq!(released(&frames), Some(ReleaseReason::PeerLoggedOut));
    assert!(!close);
    assert!(!r.is_online(&UserId::new("b").unwrap()));
    // The account is still there: the kicked user may log in again at once.
    logged_in(&mut r, "b");
}

/// The reason of the one `SessionEnded` event among the core's events.
fn ended_reason(r: &mut Core) -> Option<ReleaseReason> {
    let mut reason = None;
    while let Some(e) = r.poll_event() {
        if let Event::SessionEnded { reason: why, .. } = e {
            assert!(reason.replace(why).is_none(), "two SessionEnded");
        }
    }
    reason
}

/// The operator ends one session: both sides get RELEASE `EndedByOperator`, stay logged
/// in and may start another; the event says why. An unknown session changes nothing.
/// While it runs, its byte counts are there to read.
#[test]
fn ending_a_session_releases_both_sides() {
    let mut r = core();
    let (a, b, session) = session(&mut r);
    ended_reason(&mut r);
    assert!(!r.close_session(session + 1));
    let mut data = data_header(3).unwrap().to_vec();
    data.extend([1, 2, 3]);
    feed(&mut r, a, &data);
    output(&mut r, b);
    assert_eq!(output(&mut r, b).0, [], "payload written: unlocked");
    let counts: Vec<_> = r.session_bytes().collect();
    assert_eq!(counts, [(session, 3, 0)], "a demanded: up");
    assert!(r.close_session(session));
    assert_eq!(ended_reason(&mut r), Some(ReleaseReason::EndedByOperator));
    assert_eq!(r.session_bytes().count(), 0);
    for conn in [a, b] {
        let (frames, close) = output(&mut r, conn);
        assert_eq!(
            frames,
            [Frame::Release {
                reason: ReleaseReason::EndedByOperator
            }]
        );
        assert!(!close);
    }
    assert!(!r.close_session(session), "ended once");
    feed(&mut r, a, &demand("b"));
    let (frames, _) = output(&mut r, b);
    assert!(matches!(frames[..], [Frame::Notice(_)]), "{frames:?}");
}

/// A side the host is writing a payload into cannot be told in-band: it closes, the
/// other side gets its RELEASE, and the rest of the payload it was sending is dropped.
#[test]
fn ending_a_session_mid_payload_closes_only_the_locked_side() {
    let mut r = core();
    let (a, b, session) = session(&mut r);
    let mut data = data_header(10).unwrap().to_vec();
    data.extend([7; 5]);
    assert_eq!(feed(&mut r, a, &data).len(), 1);
    let mut buf = [0u8; relay::MIN_TRANSMIT_BUF];
    assert_eq!(
        r.poll_transmit(b, &mut buf).unwrap().len,
        3,
        "b mid-payload"
    );
    assert!(r.close_session(session));
    let (frames, close) = output(&mut r, b);
    assert_eq!((frames, close), (vec![], true));
    let (frames, close) = output(&mut r, a);
    assert_eq!(
        frames,
        [Frame::Release {
            reason: ReleaseReason::EndedByOperator
        }]
    );
    assert!(!close);
    assert_eq!(feed(&mut r, a, &[7; 5]), vec![], "the rest is dropped");
    feed(&mut r, a, &enc(&Frame::KeepAlive { seq: 4 }));
    assert_eq!(output(&mut r, a).0, [Frame::KeepAliveAck { seq: 4 }]);
}

/// A newer login of a user ID on another relay of a cluster (docs/CLUSTER.md): its
/// reachable instance here ends exactly as a local replacement ends it (ERROR `Replaced`,
/// the `Replaced` and `InstanceEnded` events; its session's peer gets RELEASE
/// `PeerLoggedOut`).
#[test]
fn a_replacement_on_another_relay_ends_the_instance_with_replaced() {
    let mut r = core();
    let (a, b, _) = session(&mut r);
    // The harness accepts every login as instance 1.
    let (user, instance) = (UserId::new("b").unwrap(), 1);
    while r.poll_event().is_some() {}
    assert!(r.replace_user(&user, instance ^ 1));
    let (frames, close) = output(&mut r, b);
    assert_eq!(error_code(&frames), Some(ErrorCode::Replaced), "{frames:?}");
    assert!(close);
    let (frames, close) = output(&mut r, a);
    assert_eq!(released(&frames), Some(ReleaseReason::PeerLoggedOut));
    assert!(!close);
    assert!(!r.is_online(&user));
    let events: Vec<Event> = std::iter::from_fn(|| r.poll_event()).collect();
    assert!(
        events.contains(&Event::Replaced { user: user.clone() }),
        "{events:?}"
    );
    assert!(
        events.iter().any(|e| matches!(
            e,
            Event::InstanceEnded { instance: i, how: relay::InstanceEnd::Replaced, .. } if *i == instance
        )),
        "{events:?}"
    );
    assert!(!r.replace_user(&user, instance), "nothing left to replace");
}

/// An instance that moved to another relay (it resumed there with its token): what is
/// left of it here closes without a frame (its terminal is elsewhere, and `Replaced`
/// would stop it), its session's peer gets RELEASE `PeerLost`, and nothing says its
/// instance ended.
#[test]
fn an_instance_that_moved_to_another_relay_closes_here_without_a_frame() {
    let mut r = core();
    let (a, b, _) = session(&mut r);
    let user = UserId::new("b").unwrap();
    while r.poll_event().is_some() {}
    assert!(r.replace_user(&user, 1), "the harness's instance is 1");
    let (frames, close) = output(&mut r, b);
    assert_eq!(error_code(&frames), None, "{frames:?}");
    assert!(close);
    let (frames, _) = output(&mut r, a);
    assert_eq!(released(&frames), Some(ReleaseReason::PeerLost));
    assert!(!r.is_online(&user));
    let events: Vec<Event> = std::iter::from_fn(|| r.poll_event()).collect();
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::InstanceEnded { .. } | Event::Replaced { .. })),
        "{events:?}"
    );
}
