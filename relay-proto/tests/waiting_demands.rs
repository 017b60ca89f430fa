//! A demand to a terminal whose connections are all busy waits for the terminal's next
//! idle connection (its terminal opens one to keep its spares), oldest first, within the
//! demand deadline; and a terminal may hold many more connections than a handful.
//! Checked frame by frame against the core, on the fixed-capacity (no_std) storage.

mod harness;

use harness::{T0, demand, enc, feed, joined, logged_in, output, resume};
use relay_proto::UserId;
use relay_proto::codes::{DemandError, ErrorCode};
use relay_proto::frame::{DemandResult, Frame};
use relay_proto::relay::{self, AllowAll, ConnId, Fixed, Relay};

type Core = harness::Core<Fixed<512, 8, { relay::max_events_per_call(512) }>>;

fn core(config: relay::Config) -> Core {
    Relay::new(config, AllowAll)
}

fn notice_in(frames: &[Frame]) -> Option<u32> {
    frames.iter().find_map(|f| match f {
        Frame::Notice(n) => Some(n.session),
        _ => None,
    })
}

/// The session number of the NOTICE `target` has to send now, if any.
fn notice(r: &mut Core, target: ConnId) -> Option<u32> {
    notice_in(&output(r, target).0)
}

/// A further connection of `user` logs in; the NOTICE that follows its LOGIN_OK, if any.
fn spare(r: &mut Core, user: &str) -> (ConnId, Option<u32>) {
    let (c, rest) = joined(r, &resume(user));
    (c, notice_in(&rest))
}

/// The DEMAND_RESULT `requester` has to send now, if any.
fn result(r: &mut Core, requester: ConnId) -> Option<DemandResult> {
    let (frames, _) = output(r, requester);
    frames.into_iter().find_map(|f| match f {
        Frame::DemandResult(d) => Some(d),
        _ => None,
    })
}

fn failed(error: DemandError) -> impl Fn(&Option<DemandResult>) -> bool {
    move |r| matches!(r, Some(DemandResult::Failed { error: e, .. }) if *e == error)
}

/// `dev` with one connection, `cli` with `n`; all of cli's connections demand dev.
/// Returns (relay, dev's connection, cli's connections).
fn crowd(config: relay::Config, n: usize) -> (Core, ConnId, Vec<ConnId>) {
    let mut r = core(config);
    let dev = logged_in(&mut r, "dev");
    let mut cli = vec![logged_in(&mut r, "cli")];
    while cli.len() < n {
        cli.push(spare(&mut r, "cli").0);
    }
    for &c in &cli {
        feed(&mut r, c, &demand("dev"));
    }
    (r, dev, cli)
}

#[test]
fn demands_wait_for_the_targets_next_idle_connection_oldest_first() {
    let (mut r, dev, cli) = crowd(relay::Config::default(), 3);
    // The first takes dev's only connection; the other two wait, unanswered.
    let s0 = notice(&mut r, dev).expect("notice on the idle connection");
    assert_eq!(result(&mut r, cli[1]), None, "waiting, not refused");
    assert_eq!(result(&mut r, cli[2]), None, "waiting, not refused");
    feed(&mut r, dev, &enc(&Frame::Accept { session: s0 }));
    assert!(
        matches!(result(&mut r, cli[0]), Some(DemandResult::Accepted { session }) if session == s0)
    );

    // dev's terminal opens a spare: the oldest waiting demand takes it at once.
    let (extra, s1) = spare(&mut r, "dev");
    let s1 = s1.expect("the new connection is noticed");
    feed(&mut r, extra, &enc(&Frame::Accept { session: s1 }));
    assert!(
        matches!(result(&mut r, cli[1]), Some(DemandResult::Accepted { session }) if session == s1)
    );
    assert_eq!(result(&mut r, cli[2]), None, "still waiting");

    // The session on dev's first connection ends: once RELEASE is out, the connection
    // is idle again and serves the last waiting demand.
    feed(&mut r, cli[0], &enc(&Frame::Terminate));
    feed(&mut r, dev, &enc(&Frame::Terminate));
    let (frames, _) = output(&mut r, dev);
    assert!(
        frames.iter().any(|f| matches!(f, Frame::Release { .. })),
        "{frames:?}"
    );
    let s2 = notice(&mut r, dev).expect("idle again, noticed");
    feed(&mut r, dev, &enc(&Frame::Accept { session: s2 }));
    assert!(
        matches!(result(&mut r, cli[2]), Some(DemandResult::Accepted { session }) if session == s2)
    );
    assert_eq!(r.stats().active_sessions, 2);
}

#[test]
fn a_waiting_demand_fails_at_its_deadline_and_frees_its_slots() {
    let config = relay::Config {
        max_sessions_per_account: 2,
        ..relay::Config::default()
    };
    let timeout = config.demand_timeout;
    let (mut r, dev, cli) = crowd(config, 2);
    let s0 = notice(&mut r, dev).unwrap();
    feed(&mut r, dev, &enc(&Frame::Accept { session: s0 }));
    assert!(r.poll_timeout(cli[1]).is_some_and(|t| t <= T0 + timeout));
    r.handle_timeout(T0 + timeout, cli[1]);
    assert!(failed(DemandError::NoIdleConnection)(&result(
        &mut r, cli[1]
    )));
    // Its session slot is free again: cli (at 2 sessions before) may demand once more,
    // and that demand waits rather than failing with TooManySessions.
    feed(&mut r, cli[1], &demand("dev"));
    assert_eq!(result(&mut r, cli[1]), None);
}

#[test]
fn waiting_demands_fail_when_the_target_goes_offline() {
    let (mut r, dev, cli) = crowd(relay::Config::default(), 3);
    assert!(notice(&mut r, dev).is_some());
    r.closed(dev);
    // The noticed one learns the target is gone, and so do the two waiting.
    for &c in &cli {
        assert!(failed(DemandError::TargetGone)(&result(&mut r, c)), "{c:?}");
    }
    assert!(!r.is_online(&UserId::new("dev").unwrap()));
}

#[test]
fn a_requester_that_leaves_stops_waiting() {
    let (mut r, dev, cli) = crowd(relay::Config::default(), 3);
    assert!(notice(&mut r, dev).is_some());
    r.closed(cli[1]);
    // dev's next connection goes to cli[2], the one still waiting.
    let (extra, s) = spare(&mut r, "dev");
    feed(
        &mut r,
        extra,
        &enc(&Frame::Accept {
            session: s.unwrap(),
        }),
    );
    assert!(matches!(
        result(&mut r, cli[2]),
        Some(DemandResult::Accepted { .. })
    ));
    // And no demand is left waiting for dev: its next connection stays idle.
    assert_eq!(spare(&mut r, "dev").1, None);
}

#[test]
fn a_terminal_holds_hundreds_of_sessions_up_to_its_limit() {
    const N: usize = 200;
    let config = relay::Config {
        max_connections_per_account: N as u16,
        max_sessions_per_account: N as u16,
        ..relay::Config::default()
    };
    let (mut r, dev, cli) = crowd(config, N);
    let mut devs = vec![(dev, notice(&mut r, dev))];
    while devs.len() < N {
        devs.push(spare(&mut r, "dev"));
    }
    for &(d, s) in &devs {
        let s = s.expect("every waiting demand gets a connection");
        feed(&mut r, d, &enc(&Frame::Accept { session: s }));
    }
    for &c in &cli {
        assert!(matches!(
            result(&mut r, c),
            Some(DemandResult::Accepted { .. })
        ));
    }
    assert_eq!(r.stats().active_sessions, N as u64);
    // One connection more than the limit is refused.
    let extra = r.accept(T0).unwrap();
    feed(&mut r, extra, &resume("dev"));
    let (frames, close) = output(&mut r, extra);
    assert_eq!(
        harness::error_code(&frames),
        Some(ErrorCode::TooManyConnections)
    );
    assert!(close);
    // Closing them all in any order leaves the terminal's list consistent: the
    // terminal goes offline with its last connection, not before.
    let odd = devs.iter().skip(1).step_by(2);
    for &(d, _) in odd.rev().chain(devs.iter().step_by(2)) {
        assert!(r.is_online(&UserId::new("dev").unwrap()));
        r.closed(d);
    }
    assert!(!r.is_online(&UserId::new("dev").unwrap()));
    assert_eq!(r.stats().active_sessions, 0);
}
