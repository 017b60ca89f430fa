//! Criterion benchmarks of the sans-IO core: control frames encoded+decoded per second,
//! and DATA bytes per second through the relay core's forwarding path (header parsed,
//! header queued on the peer, payload handed to the "host" as `Forward`). No sockets:
//! this is the core's own cost, the ceiling the host's I/O runs under.
//!
//! `cargo bench -p relay-proto --features sim --bench core`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use relay_proto::frame::{self, Credential, Demand, Frame, Hello, Login, Parsed, caps};
use relay_proto::relay::{self, AllowAll, ConnId, Event, Heap, Offer, Relay, Verdict};
use relay_proto::{ErrorCode, Instant, Password, ResumeToken, ServiceName, UserId};
use std::hint::black_box;

fn frames() -> Vec<Frame> {
    vec![
        Frame::KeepAlive { seq: 12345 },
        Frame::Demand(Demand {
            target: UserId::new("camera-0042").unwrap(),
            service: ServiceName::new("ssh").unwrap(),
        }),
        Frame::Login(Login {
            hello: Hello::current(caps::ALL),
            user: UserId::new("camera-0042").unwrap(),
            credential: Credential::Resume(ResumeToken::from_slice(&[7; 48]).unwrap()),
        }),
        Frame::Error {
            code: ErrorCode::Replaced,
            text: relay_proto::Text::lossy(ErrorCode::Replaced.describe()),
            retry_after: None,
        },
    ]
}

fn codec(c: &mut Criterion) {
    let fs = frames();
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(fs.len() as u64));
    g.bench_function("encode+decode", |b| {
        let mut buf = [0u8; frame::MAX_CONTROL_FRAME];
        b.iter(|| {
            for f in &fs {
                let n = f.encode(&mut buf).unwrap();
                let parsed = frame::parse(black_box(&buf[..n])).unwrap().unwrap();
                black_box(parsed);
            }
        })
    });
    g.finish();
}

/// A relay core with `a` in a session with `b`.
fn paired() -> (Relay<Heap, AllowAll>, ConnId, ConnId) {
    let mut r = Relay::new(relay::Config::default(), AllowAll);
    let now = Instant::from_secs(1);
    let mut buf = vec![0u8; relay::MIN_TRANSMIT_BUF];
    let feed = |r: &mut Relay<Heap, AllowAll>, c: ConnId, f: Frame| {
        let mut b = [0u8; frame::MAX_CONTROL_FRAME];
        let n = f.encode(&mut b).unwrap();
        assert!(matches!(
            r.handle_input(now, c, &b[..n]),
            Offer::Consumed(_)
        ));
        while let Some(e) = r.poll_event() {
            if let Event::Authenticate { conn, .. } = e {
                r.login_verdict(
                    now,
                    conn,
                    Verdict::Accept {
                        instance: 1,
                        token: ResumeToken::default(),
                    },
                );
            }
        }
    };
    let login = |u: &str| {
        Frame::Login(Login {
            hello: Hello::current(caps::ALL),
            user: UserId::new(u).unwrap(),
            credential: Credential::Password(Password::new("pw").unwrap()),
        })
    };
    let a = r.accept(now).unwrap();
    let b = r.accept(now).unwrap();
    feed(&mut r, a, login("a"));
    feed(&mut r, b, login("b"));
    feed(
        &mut r,
        a,
        Frame::Demand(Demand {
            target: UserId::new("b").unwrap(),
            service: ServiceName::default(),
        }),
    );
    let t = r.poll_transmit(b, &mut buf).unwrap();
    let mut session = 0;
    let mut pos = 0;
    while pos < t.len {
        let (p, n) = frame::parse(&buf[pos..t.len]).unwrap().unwrap();
        if let Parsed::Control(Frame::Notice(notice)) = p {
            session = notice.session;
        }
        pos += n;
    }
    feed(&mut r, b, Frame::Accept { session });
    let _ = r.poll_transmit(a, &mut buf);
    (r, a, b)
}

fn forwarding(c: &mut Criterion) {
    let mut g = c.benchmark_group("forward");
    for size in [1024usize, 16 * 1024, 65535] {
        let (mut r, a, b) = paired();
        let now = Instant::from_secs(2);
        let mut input = frame::data_header(size).unwrap().to_vec();
        input.extend(std::iter::repeat_n(0xA5u8, size));
        let mut out = vec![0u8; relay::MIN_TRANSMIT_BUF];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_function(format!("data frame {size} B"), |bench| {
            bench.iter(|| {
                let mut pos = 0;
                let mut moved = 0;
                while pos < input.len() {
                    match r.handle_input(now, a, &input[pos..]) {
                        Offer::Consumed(n) => pos += n,
                        Offer::Forward { to, n } => {
                            let t = r.poll_transmit(to, &mut out).unwrap();
                            black_box(&out[..t.len]);
                            moved += black_box(&input[pos..pos + n]).len();
                            pos += n;
                        }
                        Offer::NeedMore | Offer::Hold => unreachable!(),
                    }
                }
                while r.poll_event().is_some() {}
                let _ = r.poll_transmit(b, &mut out);
                assert_eq!(moved, size);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, codec, forwarding);
criterion_main!(benches);
