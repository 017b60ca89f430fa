//! Drives the relay core directly, as a host would, one call at a time: frames in,
//! frames out, logins answered on the spot. Shared by the tests that check the core's
//! answers frame by frame (no simulated terminals).

#![allow(dead_code)] // each test file uses its own part of it

use relay_proto::codes::ErrorCode;
use relay_proto::frame::{self, Credential, Demand, Frame, Hello, Login, Parsed, caps};
use relay_proto::relay::{self, AllowAll, ConnId, Event, Offer, Relay, Storage, Verdict};
use relay_proto::{Instant, Password, ResumeToken, ServiceName, UserId};

pub type Core<S> = Relay<S, AllowAll>;

pub const T0: Instant = Instant::from_secs(100);

/// The resumption credential every accepted login gets (the harness's instance is 1).
pub const TOKEN: &[u8] = b"t";

pub fn enc(f: &Frame) -> Vec<u8> {
    let mut b = [0u8; frame::MAX_CONTROL_FRAME];
    let n = f.encode(&mut b).unwrap();
    b[..n].to_vec()
}

pub fn login(user: &str, pw: &str) -> Vec<u8> {
    login_with(user, Credential::Password(Password::new(pw).unwrap()))
}

/// LOGIN of a further connection of `user`'s running instance.
pub fn resume(user: &str) -> Vec<u8> {
    login_with(
        user,
        Credential::Resume(ResumeToken::from_slice(TOKEN).unwrap()),
    )
}

fn login_with(user: &str, credential: Credential) -> Vec<u8> {
    enc(&Frame::Login(Login {
        hello: Hello::current(caps::ALL),
        user: UserId::new(user).unwrap(),
        credential,
    }))
}

pub fn demand(target: &str) -> Vec<u8> {
    enc(&Frame::Demand(Demand {
        target: UserId::new(target).unwrap(),
        service: ServiceName::default(),
    }))
}

/// Feeds `bytes` to `conn` as the host would, answering logins (password "pw" and the
/// token [`TOKEN`] are right). Returns the payload forwards it was told to do.
pub fn feed<S: Storage>(r: &mut Core<S>, conn: ConnId, bytes: &[u8]) -> Vec<(ConnId, Vec<u8>)> {
    let mut fwd = Vec::new();
    offer(r, conn, bytes, &mut fwd);
    fwd
}

/// Offers `bytes` to `conn` until the core needs more, appending the payload forwards to
/// `fwd`. Returns how many bytes it took: a host keeps the rest and offers it again with
/// what arrives next.
pub fn offer<S: Storage>(
    r: &mut Core<S>,
    conn: ConnId,
    bytes: &[u8],
    fwd: &mut Vec<(ConnId, Vec<u8>)>,
) -> usize {
    let mut pos = 0;
    while pos < bytes.len() {
        match r.handle_input(T0, conn, &bytes[pos..]) {
            Offer::Consumed(n) => pos += n,
            Offer::Forward { to, n } => {
                fwd.push((to, bytes[pos..pos + n].to_vec()));
                pos += n;
            }
            // Logins are answered after every step (below): a held LOGIN has none.
            Offer::NeedMore | Offer::Hold => break,
        }
        answer_logins(r);
    }
    pos
}

pub fn answer_logins<S: Storage>(r: &mut Core<S>) {
    let mut pending = Vec::new();
    while let Some(e) = r.poll_event() {
        if let Event::Authenticate {
            conn, credential, ..
        } = e
        {
            pending.push((conn, credential));
        }
    }
    for (conn, credential) in pending {
        let ok = match &credential {
            Credential::Password(p) => p.as_str() == "pw",
            Credential::Resume(t) => t.as_bytes() == TOKEN,
        };
        let verdict = if ok {
            Verdict::Accept {
                instance: 1,
                token: ResumeToken::from_slice(TOKEN).unwrap(),
            }
        } else {
            Verdict::Refuse(relay::Refusal::BadCredential)
        };
        r.login_verdict(T0, conn, verdict);
    }
}

/// Everything `conn` would send now, decoded; and whether it must close.
pub fn output<S: Storage>(r: &mut Core<S>, conn: ConnId) -> (Vec<Frame>, bool) {
    let mut buf = [0u8; relay::MIN_TRANSMIT_BUF];
    let t = r.poll_transmit(conn, &mut buf).unwrap();
    let mut frames = Vec::new();
    let mut pos = 0;
    while pos < t.len {
        match frame::parse(&buf[pos..t.len]).unwrap().unwrap() {
            (Parsed::Control(f), n) => {
                frames.push(f);
                pos += n;
            }
            (Parsed::DataHeader { len }, n) => {
                frames.push(Frame::Error {
                    code: ErrorCode::BadFrame,
                    text: relay_proto::Text::lossy(&format!("data {len}")),
                    retry_after: None,
                });
                pos += n;
            }
        }
    }
    (frames, t.close)
}

pub fn error_code(frames: &[Frame]) -> Option<ErrorCode> {
    frames.iter().find_map(|f| match f {
        Frame::Error { code, .. } => Some(*code),
        _ => None,
    })
}

/// A new connection that logs in with `bytes` (a LOGIN) and gets LOGIN_OK; the frames
/// that follow it in the same output.
pub fn joined<S: Storage>(r: &mut Core<S>, bytes: &[u8]) -> (ConnId, Vec<Frame>) {
    let c = r.accept(T0).unwrap();
    feed(r, c, bytes);
    let (mut frames, close) = output(r, c);
    assert!(
        matches!(frames.first(), Some(Frame::LoginOk(_))),
        "{frames:?}"
    );
    assert!(!close);
    frames.remove(0);
    (c, frames)
}

/// `user`'s first connection, logged in with its password.
pub fn logged_in<S: Storage>(r: &mut Core<S>, user: &str) -> ConnId {
    let (c, rest) = joined(r, &login(user, "pw"));
    assert!(rest.is_empty(), "{rest:?}");
    c
}
