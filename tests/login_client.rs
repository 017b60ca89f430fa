//! A protocol client for end-to-end tests that speak LOGIN themselves (the attack and
//! cluster tests): one connection to a relay's plain listener from a source address of
//! the test's choice (127.x.y.z), and what the relay answered.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use relay_proto::frame::{self, Credential, Frame, Hello, Login, Parsed, caps};
use relay_proto::{ErrorCode, Password, ResumeToken, UserId};

use crate::support::Relay;

/// What the relay answered to one LOGIN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// LOGIN_OK, with the token.
    Ok(Vec<u8>),
    /// ERROR, with the retry-after it carried.
    Refused(ErrorCode, Option<u32>),
}

/// One protocol connection to the relay's plain listener, from `source`.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(relay: &Relay, source: Ipv4Addr) -> Client {
        let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        sock.bind(&SocketAddr::from((source, 0)).into())
            .expect("bind a 127.x.y.z source");
        let server = SocketAddr::from((Ipv4Addr::LOCALHOST, relay.plain_port));
        sock.connect(&server.into()).expect("connect to the relay");
        let stream: TcpStream = sock.into();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn login(&mut self, user: &str, credential: Credential) -> Answer {
        self.login_with(caps::ALL, user, credential)
    }

    /// LOGIN announcing `caps` (with [`caps::REQUESTER`]: a requester instance).
    pub fn login_with(&mut self, caps: u32, user: &str, credential: Credential) -> Answer {
        let frame = Frame::Login(Login {
            hello: Hello::current(caps),
            user: UserId::new(user).unwrap(),
            credential,
        });
        let mut out = [0u8; 512];
        let n = frame.encode(&mut out).unwrap();
        self.stream.write_all(&out[..n]).expect("send LOGIN");
        loop {
            match frame::parse(&self.buf).expect("a valid frame from the relay") {
                Some((Parsed::Control(f), n)) => {
                    self.buf.drain(..n);
                    match f {
                        Frame::LoginOk(ok) => return Answer::Ok(ok.token.as_bytes().to_vec()),
                        Frame::Error {
                            code, retry_after, ..
                        } => return Answer::Refused(code, retry_after),
                        _ => {}
                    }
                }
                Some((Parsed::DataHeader { .. }, _)) => panic!("DATA before login"),
                None => {
                    let mut chunk = [0u8; 1024];
                    let n = self.stream.read(&mut chunk).expect("read from the relay");
                    assert!(n > 0, "the relay closed without an answer");
                    self.buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
    }
}

impl Client {
    /// Sends DEMAND for `target` (default service) and returns the DEMAND_RESULT.
    pub fn demand(&mut self, target: &str) -> frame::DemandResult {
        let d = Frame::Demand(frame::Demand {
            target: UserId::new(target).unwrap(),
            service: relay_proto::ServiceName::default(),
        });
        let mut out = [0u8; 512];
        let n = d.encode(&mut out).unwrap();
        self.stream.write_all(&out[..n]).expect("send DEMAND");
        loop {
            match frame::parse(&self.buf).expect("a valid frame from the relay") {
                Some((Parsed::Control(Frame::DemandResult(r)), n)) => {
                    self.buf.drain(..n);
                    return r;
                }
                Some((Parsed::Control(_), n)) => {
                    self.buf.drain(..n);
                }
                Some((Parsed::DataHeader { .. }, _)) => panic!("DATA before a demand result"),
                None => {
                    let mut chunk = [0u8; 1024];
                    let n = self.stream.read(&mut chunk).expect("read from the relay");
                    assert!(n > 0, "the relay closed without a demand result");
                    self.buf.extend_from_slice(&chunk[..n]);
                }
            }
        }
    }

    /// Reads until the relay sends an ERROR (its code) or closes (`None`).
    pub fn next_error(&mut self) -> Option<ErrorCode> {
        loop {
            match frame::parse(&self.buf).expect("a valid frame from the relay") {
                Some((parsed, n)) => {
                    self.buf.drain(..n);
                    if let Parsed::Control(Frame::Error { code, .. }) = parsed {
                        return Some(code);
                    }
                }
                None => {
                    let mut chunk = [0u8; 1024];
                    match self.stream.read(&mut chunk) {
                        Ok(0) | Err(_) => return None,
                        Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                    }
                }
            }
        }
    }

    /// Sends LOGOUT and waits for the relay to close the connection.
    pub fn logout(mut self) {
        let mut out = [0u8; 16];
        let n = Frame::Logout.encode(&mut out).unwrap();
        self.stream.write_all(&out[..n]).unwrap();
        let mut rest = Vec::new();
        let _ = self.stream.read_to_end(&mut rest);
    }
}

pub fn password(p: &str) -> Credential {
    Credential::Password(Password::new(p).unwrap())
}

pub fn token(t: &[u8]) -> Credential {
    Credential::Resume(ResumeToken::from_slice(t).unwrap())
}
