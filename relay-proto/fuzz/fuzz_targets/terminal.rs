//! A terminal fed arbitrary bytes from a "relay" on its connections, with timers: never
//! panics, and `Payload` never claims more bytes than offered.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::terminal::{self, Config, Event, Handle, Offer, Terminal};
use relay_proto::{Duration, Instant, Password, ServiceName, UserId};

fuzz_target!(|data: &[u8]| {
    let mut t: Terminal<4> = Terminal::new(
        Config::default(),
        UserId::new("dev").unwrap(),
        Password::new("pw").unwrap(),
        1,
    );
    let mut now = Instant::from_secs(1);
    t.start(now);
    let mut buf = [0u8; terminal::MIN_TRANSMIT_BUF];
    let mut open: Vec<Handle> = Vec::new();
    for chunk in data.chunks(17) {
        while let Some(e) = t.poll_event() {
            match e {
                Event::Open(h) => {
                    t.connected(h, now);
                    open.push(h);
                }
                Event::Closed { handle, .. } => open.retain(|h| *h != handle),
                Event::Notice { handle, .. } => {
                    let _ = t.accept(handle, now);
                }
                _ => {}
            }
        }
        let Some((&sel, bytes)) = chunk.split_first() else { continue };
        match sel % 5 {
            0 => {
                now = now + Duration::from_millis(u64::from(sel) * 500);
                t.handle_timeout(now);
            }
            1 => {
                let _ = t.demand(UserId::new("peer").unwrap(), ServiceName::default(), now);
            }
            _ => {
                let Some(&h) = open.get(usize::from(sel) % open.len().max(1)) else { continue };
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
                        Offer::NeedMore | Offer::Blocked => break,
                    }
                }
                let _ = t.send_data(h, 10);
            }
        }
    }
});
