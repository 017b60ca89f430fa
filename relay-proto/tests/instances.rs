//! Finding 1 of issue 10: one account, many processes. A LOGIN with `caps::REQUESTER`
//! starts a *requester* instance: it never replaces anything, is never a demand target,
//! and any number of them (up to `max_requesters_per_account`) run beside the user ID's
//! one *reachable* instance. Newest-wins stays among reachable instances (every version-1
//! terminal). Checked frame by frame on the fixed (no_std) storage.

mod harness;

use harness::{T0, demand, enc, error_code, output};
use relay_proto::codes::{DemandError, ErrorCode};
use relay_proto::frame::{Credential, DemandResult, Frame, Hello, Login, caps};
use relay_proto::relay::{self, AllowAll, ConnId, Event, Fixed, Relay, Verdict};
use relay_proto::{Password, ResumeToken, UserId};

type Core = harness::Core<Fixed<16, 8, { relay::max_events_per_call(16) }>>;

/// A relay whose host gives every password login a new instance (1, 2, …) and a token
/// naming it, and accepts any token that names one.
struct Host {
    r: Core,
    instances: u64,
}

impl Host {
    fn new(config: relay::Config) -> Self {
        Host {
            r: Relay::new(config, AllowAll),
            instances: 0,
        }
    }

    /// A new connection sends LOGIN with `caps` and `credential`; the frames it gets
    /// back and whether it closes.
    fn login(
        &mut self,
        user: &str,
        caps: u32,
        credential: Credential,
    ) -> (ConnId, Vec<Frame>, bool) {
        let c = self.r.accept(T0).unwrap();
        let login = Frame::Login(Login {
            hello: Hello::current(caps),
            user: UserId::new(user).unwrap(),
            credential,
        });
        self.r.handle_input(T0, c, &enc(&login));
        self.answer();
        let (frames, close) = output(&mut self.r, c);
        (c, frames, close)
    }

    fn answer(&mut self) {
        let mut asked = Vec::new();
        while let Some(e) = self.r.poll_event() {
            if let Event::Authenticate {
                conn, credential, ..
            } = e
            {
                asked.push((conn, credential));
            }
        }
        for (conn, credential) in asked {
            let instance = match credential {
                Credential::Password(_) => {
                    self.instances += 1;
                    self.instances
                }
                Credential::Resume(t) => u64::from_be_bytes(t.as_bytes().try_into().unwrap()),
            };
            let token = ResumeToken::from_slice(&instance.to_be_bytes()).unwrap();
            self.r
                .login_verdict(T0, conn, Verdict::Accept { instance, token });
        }
    }

    /// A password login that succeeds: the connection and the caps LOGIN_OK confirmed.
    fn up(&mut self, user: &str, caps: u32) -> (ConnId, u32) {
        let (c, frames, close) = self.login(user, caps, password());
        match &frames[..] {
            [Frame::LoginOk(ok)] if !close => (c, ok.caps),
            _ => panic!("{user}: {frames:?} close={close}"),
        }
    }

    fn feed(&mut self, c: ConnId, bytes: &[u8]) -> (Vec<Frame>, bool) {
        self.r.handle_input(T0, c, bytes);
        self.answer();
        output(&mut self.r, c)
    }
}

fn password() -> Credential {
    Credential::Password(Password::new("pw").unwrap())
}

fn token(instance: u64) -> Credential {
    Credential::Resume(ResumeToken::from_slice(&instance.to_be_bytes()).unwrap())
}

const REQ: u32 = caps::ALL | caps::REQUESTER;

fn quiet(h: &mut Host, conns: &[ConnId]) {
    for &c in conns {
        let (frames, close) = output(&mut h.r, c);
        assert!(
            frames.is_empty() && !close,
            "{c:?}: {frames:?} close={close}"
        );
    }
}

#[test]
fn two_requesters_and_one_reachable_of_one_user_at_once() {
    let mut h = Host::new(relay::Config::default());
    let (dev, dev_caps) = h.up("dev", caps::ALL);
    let (r1, r1_caps) = h.up("dev", REQ);
    let (r2, r2_caps) = h.up("dev", REQ);
    assert_eq!(dev_caps, caps::ALL, "a version-1 login is reachable");
    assert_eq!(r1_caps, REQ, "LOGIN_OK confirms the requester bit");
    assert_eq!(r2_caps, REQ);
    quiet(&mut h, &[dev, r1, r2]);
    assert_eq!(h.r.terminal_count(), 3);
    assert!(h.r.is_online(&UserId::new("dev").unwrap()));

    // The online list counts the user ID once.
    let (frames, _) = h.feed(r1, &enc(&Frame::List { cursor: 0 }));
    let [Frame::ListAnswer(page)] = &frames[..] else {
        panic!("{frames:?}")
    };
    assert_eq!(page.users.len(), 1);
}

#[test]
fn a_requester_never_replaces_and_is_never_noticed() {
    let mut h = Host::new(relay::Config::default());
    let (dev, _) = h.up("dev", caps::ALL);
    let reqs: Vec<ConnId> = (0..3).map(|_| h.up("dev", REQ).0).collect();
    quiet(&mut h, &[dev]);

    // Each requester of dev demands dev itself (its device): only dev's reachable
    // connection is noticed, one demand at a time.
    let (frames, _) = h.feed(reqs[0], &demand("dev"));
    assert!(frames.is_empty(), "{frames:?}");
    let (frames, _) = output(&mut h.r, dev);
    assert!(matches!(frames[..], [Frame::Notice(_)]), "{frames:?}");
    quiet(&mut h, &reqs);

    // A user ID with only requester instances takes no demands, and is not listed.
    let (cli, _) = h.up("cli", REQ);
    let (frames, _) = h.feed(dev, &demand("cli"));
    assert!(
        matches!(
            &frames[..],
            [Frame::DemandResult(DemandResult::Failed {
                error: DemandError::TargetOffline,
                ..
            })]
        ),
        "{frames:?}"
    );
    assert!(!h.r.is_online(&UserId::new("cli").unwrap()));
    let (frames, _) = h.feed(cli, &enc(&Frame::List { cursor: 0 }));
    let [Frame::ListAnswer(page)] = &frames[..] else {
        panic!("{frames:?}")
    };
    assert_eq!(
        page.users.iter().map(|u| u.as_str()).collect::<Vec<_>>(),
        ["dev"]
    );
}

#[test]
fn a_new_reachable_login_replaces_only_the_old_reachable_one() {
    let mut h = Host::new(relay::Config::default());
    let (old, _) = h.up("dev", caps::ALL);
    let (r1, _) = h.up("dev", REQ);
    let (r2, _) = h.up("dev", REQ);
    let (new, _) = h.up("dev", caps::ALL);
    let (frames, close) = output(&mut h.r, old);
    assert_eq!(error_code(&frames), Some(ErrorCode::Replaced));
    assert!(close);
    h.r.closed(old);
    quiet(&mut h, &[r1, r2, new]);
    assert_eq!(h.r.terminal_count(), 3);

    // The newer reachable instance is the demand target now.
    let (frames, _) = h.feed(r1, &demand("dev"));
    assert!(frames.is_empty(), "{frames:?}");
    let (frames, _) = output(&mut h.r, new);
    assert!(matches!(frames[..], [Frame::Notice(_)]), "{frames:?}");
}

#[test]
fn a_requester_resumption_joins_its_own_instance() {
    let mut h = Host::new(relay::Config::default());
    let (dev, _) = h.up("dev", caps::ALL); // instance 1
    let (r1, _) = h.up("dev", REQ); // instance 2
    let (r3, _) = h.up("dev", REQ); // instance 3
    // A further connection of instance 2 (even one that forgot the bit) joins it.
    let (spare, frames, close) = h.login("dev", caps::ALL, token(2));
    assert!(
        matches!(&frames[..], [Frame::LoginOk(ok)] if ok.caps == REQ),
        "{frames:?}"
    );
    assert!(!close);
    assert_eq!(h.r.terminal_count(), 3, "no new instance");

    // A LOGOUT of instance 2 closes both its connections, nothing else.
    h.r.handle_input(T0, r1, &enc(&Frame::Logout));
    for c in [r1, spare] {
        let (frames, close) = output(&mut h.r, c);
        assert!(close, "{c:?}: {frames:?}");
        h.r.closed(c);
    }
    quiet(&mut h, &[dev, r3]);
    assert_eq!(h.r.terminal_count(), 2);

    // The reachable instance's token joins the reachable instance as before.
    let (_, frames, _) = h.login("dev", caps::ALL, token(1));
    assert!(
        matches!(&frames[..], [Frame::LoginOk(ok)] if ok.caps == caps::ALL),
        "{frames:?}"
    );
}

#[test]
fn requesters_are_bounded_per_account() {
    let config = relay::Config {
        max_requesters_per_account: 2,
        ..relay::Config::default()
    };
    let mut h = Host::new(config);
    let (dev, _) = h.up("dev", caps::ALL);
    let (r1, _) = h.up("dev", REQ);
    let (r2, _) = h.up("dev", REQ);
    let (_, frames, close) = h.login("dev", REQ, password());
    assert_eq!(error_code(&frames), Some(ErrorCode::TooManyConnections));
    assert!(close);
    quiet(&mut h, &[dev, r1, r2]);
    // The bound is on requesters: a reachable login still replaces the reachable one.
    h.up("dev", caps::ALL);
    assert_eq!(h.r.terminal_count(), 3);
}
