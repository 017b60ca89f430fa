//! What the relay's operator does to running terminals and sessions, frame by frame on
//! the fixed (no_std) storage: a kick closes a user's connections with an honest reason.

mod harness;

use harness::{demand, enc, error_code, feed, logged_in, output};
use relay_proto::UserId;
use relay_proto::codes::{ErrorCode, ReleaseReason};
use relay_proto::frame::Frame;
use relay_proto::relay::{self, AllowAll, ConnId, Fixed, Relay};

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
