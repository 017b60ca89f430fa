//! Sessions the relay requests itself, for a raw TCP client of a published port (issue
//! 13): the client speaks no protocol, so the host runs the requester's side of the
//! connection in its place.
//!
//! [`Relay::demand_local`] makes a connection with no LOGIN: it joins the relay's own
//! requester instance of `requester` (one instance, [`LOCAL_INSTANCE`], for all such
//! connections) and routes its DEMAND at once, exactly as a DEMAND from a terminal: the
//! access rule, the target's presence, the per-account limits, the session accounting
//! and events are the router's. From then on it is an ordinary connection: its output
//! is the frames a requester would get (DEMAND_RESULT, DATA, TERMINATE, RELEASE, or an
//! ERROR and a close), its input the frames a requester sends (DATA, KEEPALIVE,
//! TERMINATE). The host translates between those frames and the raw bytes of its TCP
//! client; which clients may get here at all is the host's gate (the published port's
//! source allow-list), not a credential.

use super::instances::{Admitted, RELAY_CAPS};
use super::{ConnId, Handback, Policy, Relay, RelayError, Slab, Storage};
use crate::frame::Demand;
use crate::ident::{ResumeToken, UserId};
use crate::time::Instant;

/// The instance number of the relay's own requester instance. Password logins draw
/// theirs at random, so a terminal's instance never joins this one in practice; a
/// resumption would also need a genuine token for it, which the relay never issues.
pub const LOCAL_INSTANCE: u64 = 0;

impl<S: Storage, P: Policy, H: Handback> Relay<S, P, H> {
    /// A new connection of the relay's own, requesting `demand` as `requester` (see the
    /// module). `Err(TableFull)`: no room, nothing was created. Otherwise the outcome is
    /// the connection's output, as for a terminal's DEMAND: call [`Relay::poll_transmit`]
    /// on its wake. A connection the requester instance has no room for (more than
    /// `max_connections_per_account`) gets ERROR `TooManyConnections` and closes.
    pub fn demand_local(
        &mut self,
        now: Instant,
        requester: UserId,
        demand: Demand,
    ) -> Result<ConnId, RelayError> {
        let conn = self.accept(now)?;
        let key = conn.key();
        let admitted = Admitted {
            user: requester,
            password: false,
            caps: RELAY_CAPS,
            instance: LOCAL_INSTANCE,
            token: ResumeToken::default(),
            local: true,
        };
        self.admit(now, key, admitted);
        if self.conns.get(key).is_some_and(|c| c.is_idle()) {
            self.route(now, key, demand);
        }
        if self.conns.get(key).is_some_and(|c| c.has_output()) {
            self.wake(key);
        }
        self.serve_kicks();
        Ok(conn)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{Config, Event, Fixed, MIN_TRANSMIT_BUF, Offer, Verdict};
    use super::*;
    use crate::codes::{DemandError, ErrorCode, ReleaseReason};
    use crate::frame::{self, Credential, DemandResult, Frame, Hello, Login, Parsed, caps};
    use crate::ident::{Password, ServiceName};

    type R = Relay<Fixed<6, 3, 9>, Only>;

    /// The access rule of these tests: the relay (`pub`) may reach `dev` only.
    #[derive(Debug, Default)]
    struct Only;

    impl Policy for Only {
        fn may_reach(&self, from: &UserId, to: &UserId) -> bool {
            from.as_str() != "pub" || to.as_str() == "dev"
        }
    }

    fn t(s: u64) -> Instant {
        Instant::from_secs(s)
    }

    fn user(s: &str) -> UserId {
        UserId::new(s).unwrap()
    }

    fn enc(f: &Frame) -> heapless::Vec<u8, 512> {
        let mut b = [0u8; 512];
        let n = f.encode(&mut b).unwrap();
        heapless::Vec::from_slice(&b[..n]).unwrap()
    }

    fn events(r: &mut R) -> heapless::Vec<Event, 16> {
        let mut v = heapless::Vec::new();
        while let Some(e) = r.poll_event() {
            if !matches!(e, Event::Wake(_)) {
                v.push(e).unwrap();
            }
        }
        v
    }

    /// The frames `c` has to send, decoded (with a flag: close after them).
    fn frames(r: &mut R, c: ConnId) -> (heapless::Vec<Frame, 8>, bool) {
        let mut buf = [0u8; MIN_TRANSMIT_BUF];
        let tx = r.poll_transmit(c, &mut buf).unwrap();
        let mut out = heapless::Vec::new();
        let mut rest = &buf[..tx.len];
        while let Ok(Some((p, n))) = frame::parse(rest) {
            if let Parsed::Control(f) = p {
                out.push(f).unwrap();
            }
            rest = &rest[n..];
        }
        (out, tx.close)
    }

    fn login(r: &mut R, name: &str) -> ConnId {
        let c = r.accept(t(0)).unwrap();
        let f = enc(&Frame::Login(Login {
            hello: Hello::current(caps::ALL),
            user: user(name),
            credential: Credential::Password(Password::new("pw").unwrap()),
        }));
        assert_eq!(r.handle_input(t(0), c, &f), Offer::Consumed(f.len()));
        let token = ResumeToken::from_slice(&[1]).unwrap();
        r.login_verdict(t(0), c, Verdict::Accept { instance: 7, token });
        events(r);
        frames(r, c);
        c
    }

    fn demand(to: &str) -> Demand {
        Demand {
            target: user(to),
            service: ServiceName::new("http").unwrap(),
        }
    }

    /// The relay's connection to `dev`, accepted: (local, device).
    fn running(r: &mut R) -> (ConnId, ConnId) {
        let dev = login(r, "dev");
        let local = r.demand_local(t(1), user("pub"), demand("dev")).unwrap();
        assert!(events(r).is_empty(), "no login of its own is reported");
        let (f, _) = frames(r, dev);
        let [Frame::Notice(n)] = f.as_slice() else {
            panic!("{f:?}")
        };
        assert_eq!((n.from.as_str(), n.service.as_str()), ("pub", "http"));
        let a = enc(&Frame::Accept { session: n.session });
        r.handle_input(t(1), dev, &a);
        let e = events(r);
        assert!(
            matches!(&e[..], [Event::SessionStarted { from, .. }] if from.as_str() == "pub"),
            "{e:?}"
        );
        let (f, close) = frames(r, local);
        assert!(!close);
        assert!(
            matches!(
                f.as_slice(),
                [Frame::DemandResult(DemandResult::Accepted { .. })]
            ),
            "only the result, no LOGIN_OK: {f:?}"
        );
        (local, dev)
    }

    #[test]
    fn an_accepted_local_demand_carries_data_both_ways() {
        let mut r = R::new(Config::default(), Only);
        let (local, dev) = running(&mut r);
        let data = [0x0C, 0, 2, b'h', b'i'];
        assert_eq!(r.handle_input(t(2), local, &data), Offer::Consumed(3));
        assert_eq!(
            r.handle_input(t(2), local, &data[3..]),
            Offer::Forward { to: dev, n: 2 }
        );
        assert_eq!(r.handle_input(t(2), dev, &data), Offer::Consumed(3));
        assert_eq!(
            r.handle_input(t(2), dev, &data[3..]),
            Offer::Forward { to: local, n: 2 }
        );
        assert_eq!(r.stats().bytes_relayed, 4);
    }

    #[test]
    fn a_local_demand_the_access_rule_forbids_is_refused() {
        let mut r = R::new(Config::default(), Only);
        login(&mut r, "other");
        let local = r.demand_local(t(1), user("pub"), demand("other")).unwrap();
        let e = events(&mut r);
        assert!(
            matches!(
                &e[..],
                [Event::DemandFailed {
                    error: DemandError::Forbidden,
                    ..
                }]
            ),
            "{e:?}"
        );
        let (f, _) = frames(&mut r, local);
        assert!(
            matches!(
                f.as_slice(),
                [Frame::DemandResult(DemandResult::Failed {
                    error: DemandError::Forbidden,
                    ..
                })]
            ),
            "{f:?}"
        );
    }

    #[test]
    fn a_local_demand_for_an_offline_target_fails() {
        let mut r = R::new(Config::default(), Only);
        let local = r.demand_local(t(1), user("pub"), demand("dev")).unwrap();
        let e = events(&mut r);
        assert!(
            matches!(
                &e[..],
                [Event::DemandFailed {
                    error: DemandError::TargetOffline,
                    ..
                }]
            ),
            "{e:?}"
        );
        let (f, _) = frames(&mut r, local);
        assert!(matches!(
            f.as_slice(),
            [Frame::DemandResult(DemandResult::Failed {
                error: DemandError::TargetOffline,
                ..
            })]
        ));
        r.closed(local);
        assert_eq!(r.terminal_count(), 0, "the relay's instance ends with it");
    }

    #[test]
    fn the_device_ending_the_session_reaches_the_local_side() {
        let mut r = R::new(Config::default(), Only);
        let (local, dev) = running(&mut r);
        r.handle_input(t(2), dev, &[0x0D, 0, 0]);
        let (f, _) = frames(&mut r, local);
        assert_eq!(f.as_slice(), [Frame::Terminate]);
        r.handle_input(t(2), local, &[0x0D, 0, 0]);
        let e = events(&mut r);
        assert!(
            matches!(
                &e[..],
                [Event::SessionEnded {
                    reason: ReleaseReason::Normal,
                    ..
                }]
            ),
            "{e:?}"
        );
        let (f, _) = frames(&mut r, local);
        assert!(matches!(f.as_slice(), [Frame::Release { .. }]), "{f:?}");
    }

    #[test]
    fn the_client_closing_ends_the_session() {
        let mut r = R::new(Config::default(), Only);
        let (local, dev) = running(&mut r);
        r.closed(local);
        let e = events(&mut r);
        assert!(
            matches!(
                &e[..],
                [Event::SessionEnded {
                    reason: ReleaseReason::PeerLost,
                    ..
                }]
            ),
            "{e:?}"
        );
        let (f, _) = frames(&mut r, dev);
        assert!(
            matches!(
                f.as_slice(),
                [Frame::Release {
                    reason: ReleaseReason::PeerLost
                }]
            ),
            "{f:?}"
        );
        assert_eq!(r.terminal_count(), 1, "the device stays");
    }

    /// All local connections are one requester instance: its connection bound holds.
    #[test]
    fn local_connections_share_the_account_limits() {
        let config = Config {
            max_connections_per_account: 1,
            ..Config::default()
        };
        let mut r = R::new(config, Only);
        let (_local, _) = running(&mut r);
        let second = r.demand_local(t(3), user("pub"), demand("dev")).unwrap();
        events(&mut r);
        let (f, close) = frames(&mut r, second);
        assert!(close, "{f:?}");
        assert!(
            matches!(
                f.as_slice(),
                [Frame::Error {
                    code: ErrorCode::TooManyConnections,
                    ..
                }]
            ),
            "{f:?}"
        );
    }
}
