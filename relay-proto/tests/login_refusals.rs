//! The host refuses a login with a reason ([`Refusal`]); the core picks the ERROR the
//! terminal gets, with `Throttled`'s retry-after only for terminals that decode it.

mod harness;

use harness::{T0, enc, output};
use relay_proto::codes::ErrorCode;
use relay_proto::frame::{Credential, Frame, Hello, Login, caps};
use relay_proto::relay::{
    self, AllowAll, ConnId, Event, Heap, InstanceEnd, Kind, Offer, Refusal, Relay, Verdict,
};
use relay_proto::{Duration, Password, ResumeToken, Text, UserId};

type Core = Relay<Heap, AllowAll>;

fn core() -> Core {
    Relay::new(relay::Config::default(), AllowAll)
}

/// Sends a LOGIN announcing `caps` on a new connection; returns the connection.
fn login(r: &mut Core, caps: u32, credential: Credential) -> ConnId {
    let c = r.accept(T0).unwrap();
    let bytes = enc(&Frame::Login(Login {
        hello: Hello::current(caps),
        user: UserId::new("cam").unwrap(),
        credential,
    }));
    assert_eq!(r.handle_input(T0, c, &bytes), Offer::Consumed(bytes.len()));
    while let Some(e) = r.poll_event() {
        if matches!(e, Event::Authenticate { .. }) {
            return c;
        }
    }
    panic!("no Authenticate event")
}

fn password() -> Credential {
    Credential::Password(Password::new("pw").unwrap())
}

fn token() -> Credential {
    Credential::Resume(ResumeToken::from_slice(b"t").unwrap())
}

fn refused(caps: u32, credential: Credential, why: Refusal) -> (Vec<Frame>, bool) {
    let mut r = core();
    let c = login(&mut r, caps, credential);
    r.login_verdict(T0, c, Verdict::Refuse(why));
    output(&mut r, c)
}

fn error(code: ErrorCode, text: &str, retry_after: Option<u32>) -> Frame {
    Frame::Error {
        code,
        text: Text::lossy(text),
        retry_after,
    }
}

#[test]
fn throttled_carries_the_wait_for_terminals_that_read_it() {
    let why = Refusal::Throttled {
        retry_after: Duration::from_millis(22_100),
    };
    let text = "too many failed logins, retry in 23s";
    assert_eq!(
        refused(caps::ALL, password(), why),
        (vec![error(ErrorCode::Throttled, text, Some(23))], true)
    );
    // A terminal that did not announce RETRY_AFTER gets the frame it always decoded.
    assert_eq!(
        refused(caps::RESUME | caps::LIST, password(), why),
        (vec![error(ErrorCode::Throttled, text, None)], true)
    );
}

#[test]
fn each_refusal_has_its_code() {
    let cases = [
        (password(), Refusal::BadCredential, ErrorCode::AuthFailed),
        (token(), Refusal::BadCredential, ErrorCode::ResumeRejected),
        (token(), Refusal::TokenRevoked, ErrorCode::ResumeRejected),
        (token(), Refusal::Replaced, ErrorCode::Replaced),
    ];
    for (credential, why, code) in cases {
        let (frames, close) = refused(caps::ALL, credential, why);
        assert_eq!(frames, [error(code, code.describe(), None)], "{why:?}");
        assert_eq!(close, code.is_fatal());
    }
}

fn accept(r: &mut Core, c: ConnId, instance: u64) -> Vec<Event> {
    let token = ResumeToken::from_slice(b"t").unwrap();
    r.login_verdict(T0, c, Verdict::Accept { instance, token });
    core::iter::from_fn(|| r.poll_event()).collect()
}

/// The host learns when an instance starts and when it ends for good, so it can revoke
/// that instance's tokens.
#[test]
fn instances_start_and_end_as_events() {
    let mut r = core();
    let cam = UserId::new("cam").unwrap();
    let c1 = login(&mut r, caps::ALL, password());
    let started = accept(&mut r, c1, 7);
    assert!(started.contains(&Event::InstanceStarted {
        user: cam.clone(),
        instance: 7
    }));
    // A resumption joins the instance: nothing starts, nothing arrives.
    let c2 = login(&mut r, caps::ALL, token());
    let joined = accept(&mut r, c2, 7);
    assert!(!joined.iter().any(|e| matches!(
        e,
        Event::InstanceStarted { .. } | Event::InstanceArrived { .. }
    )));
    // A newer password login replaces it.
    let c3 = login(&mut r, caps::ALL, password());
    let replaced = accept(&mut r, c3, 8);
    assert!(replaced.contains(&Event::InstanceEnded {
        user: cam.clone(),
        instance: 7,
        how: InstanceEnd::Replaced,
        kind: Kind::Reachable,
    }));
    assert!(replaced.contains(&Event::InstanceStarted {
        user: cam.clone(),
        instance: 8
    }));
    // LOGOUT ends it.
    let bytes = enc(&Frame::Logout);
    r.handle_input(T0, c3, &bytes);
    let out: Vec<Event> = core::iter::from_fn(|| r.poll_event()).collect();
    assert!(out.contains(&Event::InstanceEnded {
        user: cam,
        instance: 8,
        how: InstanceEnd::LoggedOut,
        kind: Kind::Reachable,
    }));
}

/// A resumption of an instance this relay does not run (it ran on another relay of a
/// cluster, or before a restart) brings it here: `InstanceArrived`, not `InstanceStarted`
/// (its tokens stay valid).
#[test]
fn a_resumed_instance_new_here_arrives() {
    let mut r = core();
    let c = login(&mut r, caps::ALL, token());
    let events = accept(&mut r, c, 7);
    assert!(
        events.contains(&Event::InstanceArrived {
            user: UserId::new("cam").unwrap(),
            instance: 7
        }),
        "{events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::InstanceStarted { .. }))
    );
    // A requester's resumption arrives unreported, as its start is.
    let c = login(&mut r, caps::ALL | caps::REQUESTER, token());
    let events = accept(&mut r, c, 9);
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::InstanceArrived { .. })),
        "{events:?}"
    );
}

/// A requester instance starts unreported (it replaces nothing), but its LOGOUT is
/// reported with its kind, so the host can revoke its tokens too.
#[test]
fn a_requester_instance_reports_its_logout() {
    let mut r = core();
    let c = login(&mut r, caps::ALL | caps::REQUESTER, password());
    let started = accept(&mut r, c, 9);
    assert!(
        !started
            .iter()
            .any(|e| matches!(e, Event::InstanceStarted { .. }))
    );
    r.handle_input(T0, c, &enc(&Frame::Logout));
    let out: Vec<Event> = core::iter::from_fn(|| r.poll_event()).collect();
    assert!(out.contains(&Event::InstanceEnded {
        user: UserId::new("cam").unwrap(),
        instance: 9,
        how: InstanceEnd::LoggedOut,
        kind: Kind::Requester,
    }));
}
