//! Many seeds, many terminals: the invariants of the sequence under random schedules.
//!
//! Each seed builds a relay with 50+ terminals (echo servers, clients, rejecters, a
//! terminal that never answers, one that hangs mid-session, one that logs out and one
//! that is replaced by a newer login), runs random demands with random payloads through
//! pipes that split deliveries at random, and checks:
//! - every byte a client sends reaches the server exactly once, in order, before the
//!   client's TERMINATE does, and comes back byte-exact (echo);
//! - demands to absent, forbidden, rejecting and silent terminals get the right error;
//! - no session outlives a logout, a replaced instance or a dead connection: at the end
//!   no session is running and every started one ended;
//! - a hung terminal is detected within the keep-alive deadline and its peers are told;
//! - spare connections are replenished;
//! - the online list is exact.
//!
//! `RELAY_SIM_SEEDS` sets the number of seeds (default 1,000).

use std::collections::BTreeSet;

use relay_proto::codes::{DemandError, ErrorCode, RejectReason, ReleaseReason};
use relay_proto::relay::{self, Fixed, Heap, Policy, Storage};
use relay_proto::sim::{Role, Sim};
use relay_proto::terminal::{Config, Event, Handle};
use relay_proto::{Duration, UserId};

const STEPS: usize = 2_000_000;

/// Nobody may reach `vault`.
struct NoVault;

impl Policy for NoVault {
    fn may_reach(&self, _from: &UserId, to: &UserId) -> bool {
        to.as_str() != "vault"
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn failed<S: Storage>(sim: &Sim<NoVault, S>, node: usize, h: Handle) -> Option<DemandError> {
    // The latest answer on that handle decides.
    let answer = sim.nodes[node].events.iter().rev().find(|e| {
        matches!(e, Event::DemandFailed { handle, .. } | Event::Accepted { handle, .. } if *handle == h)
    });
    match answer {
        Some(Event::DemandFailed { error, .. }) => Some(*error),
        _ => None,
    }
}

fn run_seed<S: Storage>(seed: u64) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut sim: Sim<NoVault, S> = Sim::with(seed, relay::Config::default(), NoVault);
    sim.max_chunk = 1 + rng.below(700);
    let cfg = |spare| Config {
        spare,
        ..Config::default()
    };

    let servers: Vec<usize> = (0..24)
        .map(|i| sim.add(&format!("srv-{i}"), Role::Echo, cfg(1 + (i % 3) as u8)))
        .collect();
    let clients: Vec<usize> = (0..22)
        .map(|i| sim.add(&format!("cli-{i}"), Role::Sink, cfg(2)))
        .collect();
    let _rejecter = sim.add("no", Role::Reject(RejectReason::NotAllowed), cfg(1));
    let _mute = sim.add("mute", Role::Ignore, cfg(1));
    let _vault = sim.add("vault", Role::Echo, cfg(1));
    let hung = sim.add("hung", Role::Echo, cfg(1));
    let leaver = sim.add("leaver", Role::Echo, cfg(1));
    sim.settle(STEPS);

    // Everyone logged in, with its spares.
    for (i, n) in sim.nodes.iter().enumerate() {
        assert!(n.terminal().is_up(), "seed {seed}: node {i} up");
    }
    assert_eq!(sim.relay.terminal_count(), sim.nodes.len(), "seed {seed}");

    // The online list, paged, is exact: everyone the asker may reach (not `vault`).
    let mut online = BTreeSet::new();
    let mut cursor = 0;
    loop {
        sim.request_online(clients[0], cursor).unwrap();
        sim.settle(STEPS);
        let page = sim.nodes[clients[0]]
            .terminal()
            .online_page()
            .unwrap()
            .clone();
        online.extend(page.users.iter().map(|u| u.as_str().to_owned()));
        match page.next {
            Some(n) => cursor = n,
            None => break,
        }
    }
    let all: BTreeSet<String> = sim
        .nodes
        .iter()
        .map(|n| n.terminal().user().as_str().to_owned())
        .filter(|u| u != "vault")
        .collect();
    assert_eq!(online, all, "seed {seed}: online list");

    // Error demands.
    let c = clients[1];
    for (target, want) in [
        ("ghost", DemandError::TargetOffline),
        ("vault", DemandError::Forbidden),
        ("no", DemandError::Rejected(RejectReason::NotAllowed)),
    ] {
        let h = sim.demand(c, target, "svc").unwrap();
        sim.settle(STEPS);
        assert_eq!(
            failed(&sim, c, h),
            Some(want),
            "seed {seed}: demand to {target}"
        );
    }
    let h = sim.demand(c, "mute", "svc").unwrap();
    sim.sleep(Duration::from_secs(11), STEPS);
    assert_eq!(
        failed(&sim, c, h),
        Some(DemandError::Timeout),
        "seed {seed}: demand to mute"
    );

    // Sessions: each client demands a random server (some the hung one and the leaver)
    // and sends a random payload, then terminates.
    let mut sent = Vec::new();
    for &c in &clients[2..] {
        let target = match rng.below(10) {
            0 => hung,
            1 => leaver,
            _ => servers[rng.below(servers.len())],
        };
        let name = sim.nodes[target].terminal().user().as_str().to_owned();
        let h = sim.demand(c, &name, "echo").unwrap();
        let len = 1 + rng.below(6000);
        let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        sim.send(c, h, &data, true);
        sent.push((c, h, target, data));
    }
    // Let things start, then the hung terminal freezes and the leaver logs out.
    for _ in 0..rng.below(3000) {
        sim.step();
    }
    sim.pause(hung);
    sim.logout(leaver);
    // A newer instance of srv-0 replaces the running one.
    let replacement = sim.add("srv-0", Role::Echo, cfg(1));
    // Demands that raced for a target's only spare are retried, as a real client does.
    for _round in 0..5 {
        sim.settle(STEPS);
        for entry in sent.iter_mut() {
            let (c, h, target, data) = entry;
            if failed(&sim, *c, *h) != Some(DemandError::NoIdleConnection) {
                continue;
            }
            let name = sim.nodes[*target].terminal().user().as_str().to_owned();
            if let Ok(nh) = sim.demand(*c, &name, "echo") {
                sim.send(*c, nh, data, true);
                *h = nh;
            }
        }
    }
    sim.sleep(Duration::from_secs(200), STEPS);

    let old = servers[0];
    assert!(
        sim.nodes[old].events.iter().any(|e| matches!(
            e,
            Event::LoginRefused {
                code: ErrorCode::Replaced,
                ..
            }
        )),
        "seed {seed}: replaced instance told: {:?}",
        sim.nodes[old].events
    );
    assert_eq!(
        sim.links_of(old),
        0,
        "seed {seed}: replaced instance lost its connections"
    );
    assert_eq!(
        sim.relay_links_of(hung),
        0,
        "seed {seed}: hung terminal's connections closed by the relay:\n{}",
        sim.describe_links(hung)
    );
    assert!(
        !sim.relay.is_online(&UserId::new("hung").unwrap()),
        "seed {seed}"
    );
    assert!(
        !sim.relay.is_online(&UserId::new("leaver").unwrap()),
        "seed {seed}"
    );
    assert!(sim.nodes[replacement].terminal().is_up(), "seed {seed}");

    let mut busy = 0;
    for (c, h, target, data) in &sent {
        let node = &sim.nodes[*c];
        let session = node.sessions.get(&h.0).copied();
        let accepted = node
            .events
            .iter()
            .any(|e| matches!(e, Event::Accepted { handle, .. } if handle == h));
        // The session ends with RELEASE, or (peer dead mid-payload) with its connection.
        let end = node.events.iter().find_map(|e| match e {
            Event::SessionEnded { handle, reason } if handle == h => Some(*reason),
            Event::Closed { handle, .. } if handle == h => Some(ReleaseReason::PeerLost),
            _ => None,
        });
        if !accepted {
            let err = failed(&sim, *c, *h);
            if err == Some(DemandError::NoIdleConnection) {
                // Two demands raced for a target's only spare: a legitimate answer.
                busy += 1;
                continue;
            }
            // Otherwise only a demand to a terminal that went away may fail.
            assert!(
                matches!(
                    err,
                    Some(
                        DemandError::TargetGone | DemandError::TargetOffline | DemandError::Timeout
                    )
                ),
                "seed {seed}: unexpected demand failure {err:?}"
            );
            assert!(
                [hung, leaver, old].contains(target),
                "seed {seed}: demand to a healthy server failed"
            );
            continue;
        }
        let session = session.unwrap();
        match end {
            Some(ReleaseReason::Normal) => {
                assert_eq!(
                    node.received.get(&h.0),
                    Some(data),
                    "seed {seed}: echo byte-exact"
                );
                // The server had every byte when the client's TERMINATE reached it.
                let at_end = sim.nodes.iter().find_map(|n| n.at_peer_end.get(&session));
                assert_eq!(at_end, Some(data), "seed {seed}: all data before TERMINATE");
            }
            Some(ReleaseReason::PeerLost | ReleaseReason::PeerLoggedOut) => {
                assert!(
                    [hung, leaver, old].contains(target),
                    "seed {seed}: healthy session broke"
                );
                // Whatever arrived is a prefix of what was sent, in order, no duplicates.
                let got = node.received.get(&h.0).cloned().unwrap_or_default();
                assert!(
                    data.starts_with(&got),
                    "seed {seed}: partial echo is a prefix"
                );
            }
            other => panic!(
                "seed {seed}: session on {h:?} to {} ended with {other:?}\nclient events: {:?}\nclient links:\n{}target links:\n{}",
                sim.nodes[*target].terminal().user(),
                node.events,
                sim.describe_links(*c),
                sim.describe_links(*target)
            ),
        }
    }

    assert!(
        busy < sent.len() / 2,
        "seed {seed}: {busy} of {} demands found no idle connection",
        sent.len()
    );

    // Nothing outlives its terminal: no session runs, every started one ended.
    let started = sim
        .relay_events
        .iter()
        .filter(|e| matches!(e, relay::Event::SessionStarted { .. }))
        .count();
    let ended = sim
        .relay_events
        .iter()
        .filter(|e| matches!(e, relay::Event::SessionEnded { .. }))
        .count();
    assert_eq!(started, ended, "seed {seed}: started vs ended sessions");
    assert_eq!(sim.relay.stats().active_sessions, 0, "seed {seed}");
    // Both data paths ran: the router's, and handed-out pairs (relay::Pair).
    assert!(sim.pairs_handed > 0, "seed {seed}: no session handed out");
    // And sessions ended through their pair (both TERMINATEs), then by the router.
    assert!(sim.pairs_finished > 0, "seed {seed}: no pair finished");

    // Spares replenished on every healthy terminal.
    for &s in servers[1..].iter().chain(&clients) {
        let n = &sim.nodes[s];
        assert!(
            n.terminal().idle_connections() >= 1,
            "seed {seed}: {} has a spare",
            n.terminal().user()
        );
    }
}

fn seeds() -> u64 {
    std::env::var("RELAY_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000)
}

#[test]
fn many_seeds_many_terminals() {
    for seed in 0..seeds() {
        run_seed::<Heap>(seed);
    }
    eprintln!("simulated {} seeds of 51 terminals", seeds());
}

/// The smallest fixed tables the scenario fits: its 51 terminals at their peak of
/// connections (97 fail some seeds: a terminal cannot open its spares), and the event
/// queue one call may fill.
type Smallest = Fixed<CONNS, 51, { relay::max_events_per_call(CONNS) }>;
const CONNS: usize = 98;

/// The same on the fixed (no_std) tables at their smallest: every queue and list of the
/// core runs at its bound.
#[test]
fn many_seeds_on_the_smallest_fixed_tables() {
    for seed in 0..seeds() {
        run_seed::<Smallest>(seed);
    }
    eprintln!("simulated {} seeds on Fixed<{CONNS}, 51, ..>", seeds());
}
