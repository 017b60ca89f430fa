//! Deterministic simulations of the whole sequence: terminals, relay core and pipes in
//! memory, split deliveries, simulated clock.

use relay_proto::codes::{DemandError, RejectReason, ReleaseReason};
use relay_proto::sim::{Role, Sim};
use relay_proto::terminal::{Config, Event};
use relay_proto::{Duration, Instant};

const STEPS: usize = 200_000;

fn cfg() -> Config {
    Config {
        spare: 2,
        ..Config::default()
    }
}

fn pattern(len: usize, salt: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt))
        .collect()
}

#[test]
fn login_spares_demand_echo_and_release() {
    let mut sim = Sim::new(1);
    let cam = sim.add("cam-1", Role::Echo, cfg());
    let alice = sim.add("alice", Role::Echo, cfg());
    sim.settle(STEPS);
    assert!(sim.nodes[cam].terminal().is_up());
    assert_eq!(sim.nodes[cam].terminal().idle_connections(), 2);
    assert_eq!(sim.relay.terminal_count(), 2);

    let h = sim.demand(alice, "cam-1", "echo").unwrap();
    sim.settle(STEPS);
    assert!(
        sim.nodes[alice]
            .events
            .iter()
            .any(|e| matches!(e, Event::Accepted { handle, .. } if *handle == h))
    );
    // Both sides opened a new spare (steps 10-14).
    assert_eq!(sim.nodes[alice].terminal().idle_connections(), 2);
    assert_eq!(sim.nodes[cam].terminal().idle_connections(), 2);

    let data = pattern(100_000, 7);
    sim.send(alice, h, &data, true);
    sim.settle(STEPS);
    let got = &sim.nodes[alice].received[&h.0];
    let first_diff = got.iter().zip(&data).position(|(a, b)| a != b);
    assert!(
        got == &data,
        "echo came back byte-exact: got {} of {} bytes, first difference at {first_diff:?}; alice events {:?}",
        got.len(),
        data.len(),
        sim.nodes[alice].events
    );
    assert!(sim.nodes[alice].events.iter().any(|e| matches!(e, Event::SessionEnded { handle, reason: ReleaseReason::Normal } if *handle == h)));
    assert_eq!(
        sim.nodes[alice].terminal().idle_connections(),
        3,
        "the session's connection is idle again"
    );
}

#[test]
fn demand_errors() {
    let mut sim = Sim::new(2);
    let a = sim.add("a", Role::Echo, cfg());
    sim.add("no", Role::Reject(RejectReason::UnknownService), cfg());
    sim.add("mute", Role::Ignore, cfg());
    sim.settle(STEPS);
    let expect = |sim: &mut Sim, target: &str, want: DemandError| {
        let h = sim.demand(a, target, "x").unwrap();
        sim.run_until(sim.now + Duration::from_secs(15), STEPS);
        let got = sim.nodes[a].events.iter().rev().find_map(|e| match e {
            Event::DemandFailed { handle, error, .. } if *handle == h => Some(*error),
            _ => None,
        });
        assert_eq!(got, Some(want), "demand to {target}");
    };
    expect(&mut sim, "ghost", DemandError::TargetOffline);
    expect(
        &mut sim,
        "no",
        DemandError::Rejected(RejectReason::UnknownService),
    );
    expect(&mut sim, "mute", DemandError::Timeout);
}

#[test]
fn silent_terminal_is_detected_and_peer_told() {
    let mut sim = Sim::new(3);
    let cam = sim.add("cam", Role::Echo, cfg());
    let a = sim.add("a", Role::Echo, cfg());
    sim.settle(STEPS);
    let h = sim.demand(a, "cam", "").unwrap();
    sim.settle(STEPS);
    sim.pause(cam);
    let t0 = sim.now;
    sim.run_until(t0 + Duration::from_secs(200), STEPS);
    let ended = sim.nodes[a].events.iter().any(|e| matches!(e, Event::SessionEnded { handle, reason: ReleaseReason::PeerLost } if *handle == h));
    assert!(ended, "peer told its session is over");
    assert!(!sim.relay.is_online(&"cam".try_into().unwrap()));
    let _ = Instant::ZERO;
}

#[test]
fn a_burst_of_demands_waits_for_the_targets_new_spares() {
    let mut sim = Sim::new(4);
    let cam = sim.add(
        "cam",
        Role::Echo,
        Config {
            spare: 1,
            ..Config::default()
        },
    );
    let clients: Vec<usize> = (0..3)
        .map(|i| sim.add(&format!("c{i}"), Role::Echo, cfg()))
        .collect();
    sim.settle(STEPS);
    assert_eq!(sim.nodes[cam].terminal().idle_connections(), 1);
    // Three demands at once for a terminal with one idle connection: the relay holds
    // two of them until cam's terminal has opened new spares, and none fails.
    let handles: Vec<_> = clients
        .iter()
        .map(|&c| (c, sim.demand(c, "cam", "echo").unwrap()))
        .collect();
    sim.settle(STEPS);
    for (c, h) in handles {
        let node = &sim.nodes[c];
        assert!(
            node.events
                .iter()
                .any(|e| matches!(e, Event::Accepted { handle, .. } if *handle == h)),
            "{:?}",
            node.events
        );
    }
}

/// The terminal driver over bounded pipes whose writes sometimes fail: a failed write
/// closes that connection (the session on it ends, the terminal reconnects), never
/// corrupts a stream. Every echo either comes back byte-exact or its session reports
/// how it ended; both terminals are up again afterwards.
#[test]
fn bounded_pipes_with_write_errors() {
    let (mut clean_sessions, mut broken_sessions) = (0, 0);
    for seed in 0..40 {
        let mut sim = Sim::new(seed);
        sim.pipe_capacity = 700;
        sim.write_errors_per_mille = 5;
        let cam = sim.add("cam", Role::Echo, cfg());
        let alice = sim.add("alice", Role::Sink, cfg());
        sim.sleep(Duration::from_secs(5), STEPS);
        let mut sent = Vec::new();
        // Two sessions, one per idle connection. (Four demands used to run two: the
        // others found no idle connection and failed at once. Now they wait for a
        // connection of their own and run too, and with four sessions through these
        // pipes hardly any ends clean: 0 of 160 over these seeds, 6 of 80 with two.)
        for i in 0..2u8 {
            if let Ok(h) = sim.demand(alice, "cam", "echo") {
                let data = pattern(5_000 + 1_000 * usize::from(i), i);
                sim.send(alice, h, &data, true);
                sent.push((h, data));
            }
        }
        sim.sleep(Duration::from_secs(60), STEPS);
        for (h, data) in sent {
            let node = &sim.nodes[alice];
            let clean = node.events.iter().any(|e| {
                matches!(e, Event::SessionEnded { handle, reason: ReleaseReason::Normal } if *handle == h)
            });
            if clean {
                clean_sessions += 1;
                assert_eq!(
                    node.received[&h.0], data,
                    "seed {seed}: {h:?} echoed exactly"
                );
            } else {
                broken_sessions += 1;
                let told = node.events.iter().any(|e| match e {
                    Event::SessionEnded { handle, .. }
                    | Event::Closed { handle, .. }
                    | Event::DemandFailed { handle, .. } => *handle == h,
                    _ => false,
                });
                assert!(told, "seed {seed}: {h:?} neither echoed nor ended");
            }
        }
        sim.write_errors_per_mille = 0;
        sim.sleep(Duration::from_secs(120), STEPS);
        for n in [cam, alice] {
            assert!(
                sim.nodes[n].terminal().is_up(),
                "seed {seed}: node {n} up again"
            );
        }
    }
    // Both outcomes happened: the failing writes were exercised, and not everywhere.
    assert!(
        clean_sessions > 0 && broken_sessions > 0,
        "{clean_sessions} clean, {broken_sessions} broken"
    );
}
