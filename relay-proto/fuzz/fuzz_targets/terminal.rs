//! A terminal fed arbitrary bytes from a "relay" on its connections, with timers and
//! application calls in any order, draining its events only now and then: never panics,
//! `Payload` never claims more bytes than offered, and input refused while an event
//! waits (`Blocked`) is taken once the events are drained.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::terminal::{self, Config, Event, Handle, Kind, Offer, Terminal};
use relay_proto::{Duration, Instant, Password, RejectReason, ServiceName, UserId};

fuzz_target!(|data: &[u8]| {
    let kind = if data.first().is_some_and(|b| b & 1 == 1) {
        Kind::Requester
    } else {
        Kind::Reachable
    };
    // A requester follows redirects: a DEMAND_RESULT Redirect moves its connection to a
    // detour (Event::Redirected, then `connected` as after Open).
    let config = Config {
        kind,
        spare: 2,
        follow_redirects: kind == Kind::Requester,
        ..Config::default()
    };
    let mut t: Terminal<4> = Terminal::new(
        config,
        UserId::new("dev").unwrap(),
        Password::new("pw").unwrap(),
        1,
    );
    let mut now = Instant::from_secs(1);
    t.start(now);
    let mut buf = [0u8; terminal::MIN_TRANSMIT_BUF];
    let mut open: Vec<Handle> = Vec::new();
    let drain = |t: &mut Terminal<4>, open: &mut Vec<Handle>, now: Instant| {
        while let Some(e) = t.poll_event() {
            match e {
                Event::Open(h) => {
                    t.connected(h, now);
                    open.push(h);
                }
                Event::Redirected { handle, .. } => {
                    t.connected(handle, now);
                    if !open.contains(&handle) {
                        open.push(handle);
                    }
                }
                Event::Closed { handle, .. } => open.retain(|h| *h != handle),
                Event::Notice { handle, session, .. } => {
                    let _ = if session % 2 == 0 {
                        t.accept(handle, now)
                    } else {
                        t.reject(handle, RejectReason::Busy)
                    };
                }
                _ => {}
            }
        }
    };
    for chunk in data.chunks(17) {
        let Some((&sel, bytes)) = chunk.split_first() else { continue };
        let h = open.get(usize::from(sel) % open.len().max(1)).copied();
        match sel % 8 {
            0 => {
                now = now + Duration::from_millis(u64::from(sel) * 500);
                t.handle_timeout(now);
            }
            1 => {
                let _ = t.demand(UserId::new("peer").unwrap(), ServiceName::default(), now);
            }
            2 => {
                let _ = t.request_online(u32::from(sel));
            }
            3 => drain(&mut t, &mut open, now),
            4 => {
                if let Some(h) = h {
                    let _ = t.terminate(h);
                    let _ = t.send_data(h, usize::from(sel));
                }
            }
            5 if sel > 250 => t.logout(now),
            _ => {
                let Some(h) = h else { continue };
                let _ = t.poll_transmit(h, now, &mut buf);
                let mut pos = 0;
                while pos < bytes.len() {
                    match t.handle_input(h, now, &bytes[pos..]) {
                        Offer::Consumed(n) | Offer::Payload(n) => {
                            assert!(n <= bytes.len() - pos);
                            if n == 0 {
                                break;
                            }
                            pos += n;
                        }
                        Offer::Blocked => {
                            drain(&mut t, &mut open, now);
                            assert_ne!(t.handle_input(h, now, &bytes[pos..]), Offer::Blocked);
                            break;
                        }
                        Offer::NeedMore => break,
                    }
                }
            }
        }
    }
});
