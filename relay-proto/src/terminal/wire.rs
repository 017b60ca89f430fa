//! The terminal's half of the frame codec: it encodes only what a terminal sends and
//! decodes only what a relay sends to a terminal.
//!
//! Why not [`crate::frame`]: that codec serves both directions through serde and
//! postcard, and on a microcontroller every frame type it can decode or encode is linked
//! in, with serde's visitor machinery for each. This module writes and reads the same
//! postcard bytes by hand (varints, length-prefixed strings, variant indices), for the
//! eight frames a terminal sends and the eight it receives: a few hundred bytes of flash
//! instead of several kilobytes. The bytes on the wire are identical; the tests check
//! every frame both ways against `frame`'s codec, and arbitrary input decodes here
//! exactly when it decodes there.

use crate::codes::{DemandError, ErrorCode, RejectReason, ReleaseReason};
use crate::frame::{
    DemandResult, FrameType, HEADER_LEN, LIST_PAGE, ListAnswer, MAGIC, MAX_CONTROL, Redirect,
    VERSION,
};
use crate::ident::{NodeAddress, Password, ResumeToken, ServiceName, Text, UserId};

/// A frame the relay sends to a terminal, decoded.
// No allocator, so no boxing: a decoded frame lives on the stack once and is moved out.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Inbound {
    LoginOk {
        /// The capabilities in force (docs/PROTOCOL.md §9).
        caps: u32,
        keepalive_ms: u32,
        max_payload: u16,
        token: ResumeToken,
    },
    KeepAliveAck,
    ListAnswer(ListAnswer),
    Notice {
        session: u32,
        from: UserId,
        service: ServiceName,
    },
    DemandResult(DemandResult),
    Terminate,
    Release(ReleaseReason),
    Error {
        code: ErrorCode,
        text: Text,
        /// Seconds to wait before logging in again (`Throttled`, [`caps::RETRY_AFTER`]).
        retry_after: Option<u32>,
    },
    /// A DATA header: the next `len` bytes are payload.
    Data(u16),
}

/// Why received bytes are not a frame a relay may send to a terminal. The terminal closes
/// the connection either way, so one value is enough.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Malformed;

/// Parses one frame from the start of `input`: `Ok(None)` until the whole frame (or the
/// whole DATA header) is there, else the frame and the bytes it took.
///
/// Never inlined, like `Connection::on_frame`: one copy of the decoded frame instead of
/// per-field loads and stores in the caller. 208 B of flash on the firmware.
#[inline(never)]
pub(crate) fn parse(input: &[u8]) -> Result<Option<(Inbound, usize)>, Malformed> {
    let [ty, hi, lo, ..] = *input else {
        return Ok(None);
    };
    let len = u16::from_be_bytes([hi, lo]);
    let ty = FrameType::from_u8(ty).ok_or(Malformed)?;
    if ty == FrameType::Data {
        return if len == 0 {
            Err(Malformed)
        } else {
            Ok(Some((Inbound::Data(len), HEADER_LEN)))
        };
    }
    let end = HEADER_LEN + usize::from(len);
    if usize::from(len) > MAX_CONTROL {
        return Err(Malformed);
    }
    let Some(payload) = input.get(HEADER_LEN..end) else {
        return Ok(None);
    };
    let mut r = Reader(payload);
    let frame = match ty {
        FrameType::LoginOk => Inbound::LoginOk {
            caps: r.varint_u32()?,
            keepalive_ms: r.varint_u32()?,
            max_payload: r.varint_u16()?,
            token: ResumeToken::from_slice(r.bytes()?).ok_or(Malformed)?,
        },
        FrameType::KeepAliveAck => {
            r.varint_u32()?;
            Inbound::KeepAliveAck
        }
        FrameType::ListAnswer => {
            let mut users = heapless::Vec::new();
            for _ in 0..r.count(LIST_PAGE)? {
                users.push(r.user()?).map_err(|_| Malformed)?;
            }
            let next = match r.byte()? {
                0 => None,
                1 => Some(r.varint_u32()?),
                _ => return Err(Malformed),
            };
            Inbound::ListAnswer(ListAnswer { users, next })
        }
        FrameType::Notice => Inbound::Notice {
            session: r.varint_u32()?,
            from: r.user()?,
            service: ServiceName::new(r.str()?).map_err(|_| Malformed)?,
        },
        FrameType::DemandResult => Inbound::DemandResult(match r.varint_u32()? {
            0 => DemandResult::Accepted {
                session: r.varint_u32()?,
            },
            1 => DemandResult::Failed {
                error: r.demand_error()?,
                text: r.text()?,
            },
            2 => DemandResult::Redirect(Redirect {
                address: NodeAddress::new(r.str()?).map_err(|_| Malformed)?,
                fingerprint: r.array()?,
            }),
            _ => return Err(Malformed),
        }),
        FrameType::Terminate => Inbound::Terminate,
        FrameType::Release => Inbound::Release(release_reason(r.varint_u32()?)?),
        FrameType::Error => Inbound::Error {
            code: error_code(r.varint_u32()?)?,
            text: r.text()?,
            retry_after: if r.0.is_empty() {
                None
            } else {
                Some(r.varint_u32()?)
            },
        },
        // What only terminals send: a relay that sends it is broken.
        _ => return Err(Malformed),
    };
    // Every payload byte must belong to the frame.
    if !r.0.is_empty() {
        return Err(Malformed);
    }
    Ok(Some((frame, end)))
}

/// Reads postcard's encoding from the front of a payload.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, Malformed> {
        let (&b, rest) = self.0.split_first().ok_or(Malformed)?;
        self.0 = rest;
        Ok(b)
    }

    /// LEB128 of at most `max_bytes` bytes whose value fits `bits`, as postcard reads it.
    fn varint(&mut self, max_bytes: u32, bits: u32) -> Result<u32, Malformed> {
        let mut out = 0u32;
        for i in 0..max_bytes {
            let b = self.byte()?;
            out |= u32::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                let last_max = (1u32 << (bits % 7)) - 1;
                return if i == max_bytes - 1 && u32::from(b) > last_max {
                    Err(Malformed)
                } else {
                    Ok(out)
                };
            }
        }
        Err(Malformed)
    }

    fn varint_u32(&mut self) -> Result<u32, Malformed> {
        self.varint(5, 32)
    }

    fn varint_u16(&mut self) -> Result<u16, Malformed> {
        self.varint(3, 16).map(|v| v as u16)
    }

    /// A sequence length, refused above `max` (the bounded vector's capacity).
    fn count(&mut self, max: usize) -> Result<usize, Malformed> {
        let n = self.varint_u32()? as usize;
        if n > max { Err(Malformed) } else { Ok(n) }
    }

    /// Length-prefixed bytes.
    fn bytes(&mut self) -> Result<&'a [u8], Malformed> {
        let n = self.varint_u32()? as usize;
        if n > self.0.len() {
            return Err(Malformed);
        }
        let (b, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(b)
    }

    /// `N` raw bytes (a fixed-size array: no length prefix).
    fn array<const N: usize>(&mut self) -> Result<[u8; N], Malformed> {
        let (head, rest) = self.0.split_first_chunk::<N>().ok_or(Malformed)?;
        self.0 = rest;
        Ok(*head)
    }

    fn str(&mut self) -> Result<&'a str, Malformed> {
        core::str::from_utf8(self.bytes()?).map_err(|_| Malformed)
    }

    fn user(&mut self) -> Result<UserId, Malformed> {
        UserId::new(self.str()?).map_err(|_| Malformed)
    }

    fn text(&mut self) -> Result<Text, Malformed> {
        Text::new(self.str()?).map_err(|_| Malformed)
    }

    fn demand_error(&mut self) -> Result<DemandError, Malformed> {
        Ok(match self.varint_u32()? {
            0 => DemandError::TargetOffline,
            1 => DemandError::NoIdleConnection,
            2 => DemandError::Forbidden,
            3 => DemandError::Rejected(reject_reason(self.varint_u32()?)?),
            4 => DemandError::Timeout,
            5 => DemandError::TooManySessions,
            6 => DemandError::TargetGone,
            _ => return Err(Malformed),
        })
    }
}

fn reject_reason(i: u32) -> Result<RejectReason, Malformed> {
    Ok(match i {
        0 => RejectReason::UnknownService,
        1 => RejectReason::NotAllowed,
        2 => RejectReason::Busy,
        3 => RejectReason::ServiceUnavailable,
        4 => RejectReason::Other,
        _ => return Err(Malformed),
    })
}

fn release_reason(i: u32) -> Result<ReleaseReason, Malformed> {
    Ok(match i {
        0 => ReleaseReason::Normal,
        1 => ReleaseReason::PeerLost,
        2 => ReleaseReason::PeerLoggedOut,
        3 => ReleaseReason::Cancelled,
        4 => ReleaseReason::ShuttingDown,
        5 => ReleaseReason::EndedByOperator,
        _ => return Err(Malformed),
    })
}

fn error_code(i: u32) -> Result<ErrorCode, Malformed> {
    use ErrorCode::*;
    const CODES: [ErrorCode; 19] = [
        BadFrame,
        UnknownFrameType,
        FrameTooLarge,
        BadMagic,
        VersionMismatch,
        UnexpectedFrame,
        AuthFailed,
        ResumeRejected,
        Throttled,
        Replaced,
        TooManyConnections,
        UnknownSession,
        HandshakeTimeout,
        KeepAliveTimeout,
        ShuttingDown,
        AccountRemoved,
        Busy,
        NotLoggedIn,
        Kicked,
    ];
    CODES.get(i as usize).copied().ok_or(Malformed)
}

/// What every LOGIN of a terminal is made of, borrowed from it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LoginAs<'a> {
    pub(crate) user: &'a UserId,
    pub(crate) password: &'a Password,
    pub(crate) token: Option<&'a ResumeToken>,
    /// The capability bits announced ([`crate::terminal::Kind::caps`]).
    pub(crate) caps: u32,
}

/// A frame a terminal sends, borrowing what it carries.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outbound<'a> {
    Login {
        user: &'a UserId,
        caps: u32,
        credential: Cred<'a>,
    },
    KeepAlive(u32),
    List(u32),
    Demand {
        target: &'a UserId,
        service: &'a ServiceName,
    },
    Accept(u32),
    /// The text is the reason's ([`RejectReason::describe`]).
    Reject {
        session: u32,
        reason: RejectReason,
    },
    Terminate,
    Logout,
}

/// The credential of a LOGIN, borrowed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Cred<'a> {
    Password(&'a Password),
    Resume(&'a ResumeToken),
}

/// The output buffer is too small for the frame; what was written does not count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NoRoom;

impl Outbound<'_> {
    /// Encodes the whole frame at the start of `buf`, returning its length.
    pub(crate) fn encode(&self, buf: &mut [u8]) -> Result<usize, NoRoom> {
        let mut w = Writer {
            buf,
            len: HEADER_LEN,
        };
        let ty = match *self {
            Outbound::Login {
                user,
                caps,
                credential,
            } => {
                w.raw(&MAGIC)?;
                w.raw(&[VERSION])?;
                w.varint(caps)?;
                w.str(user.as_str())?;
                match credential {
                    Cred::Password(p) => {
                        w.varint(0)?;
                        w.str(p.as_str())?;
                    }
                    Cred::Resume(t) => {
                        w.varint(1)?;
                        w.bytes(t.as_bytes())?;
                    }
                }
                FrameType::Login
            }
            Outbound::KeepAlive(seq) => {
                w.varint(seq)?;
                FrameType::KeepAlive
            }
            Outbound::List(cursor) => {
                w.varint(cursor)?;
                FrameType::List
            }
            Outbound::Demand { target, service } => {
                w.str(target.as_str())?;
                w.str(service.as_str())?;
                FrameType::Demand
            }
            Outbound::Accept(session) => {
                w.varint(session)?;
                FrameType::Accept
            }
            Outbound::Reject { session, reason } => {
                w.varint(session)?;
                w.varint(reason as u32)?;
                w.str(reason.describe())?;
                FrameType::Reject
            }
            Outbound::Terminate => FrameType::Terminate,
            Outbound::Logout => FrameType::Logout,
        };
        let len = w.len;
        let payload = (len - HEADER_LEN) as u16;
        let [hi, lo] = payload.to_be_bytes();
        w.buf
            .get_mut(..HEADER_LEN)
            .ok_or(NoRoom)?
            .copy_from_slice(&[ty as u8, hi, lo]);
        Ok(len)
    }
}

/// Writes postcard's encoding after the header, never past the buffer or
/// [`MAX_CONTROL`].
struct Writer<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl Writer<'_> {
    fn raw(&mut self, b: &[u8]) -> Result<(), NoRoom> {
        let end = self.len + b.len();
        if end > HEADER_LEN + MAX_CONTROL {
            return Err(NoRoom);
        }
        self.buf
            .get_mut(self.len..end)
            .ok_or(NoRoom)?
            .copy_from_slice(b);
        self.len = end;
        Ok(())
    }

    fn varint(&mut self, mut v: u32) -> Result<(), NoRoom> {
        loop {
            let low = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                return self.raw(&[low]);
            }
            self.raw(&[low | 0x80])?;
        }
    }

    fn bytes(&mut self, b: &[u8]) -> Result<(), NoRoom> {
        self.varint(b.len() as u32)?;
        self.raw(b)
    }

    fn str(&mut self, s: &str) -> Result<(), NoRoom> {
        self.bytes(s.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use crate::frame::{
        self, Credential, Demand, Frame, Hello, Login, LoginOk, Notice, Parsed, Reject,
    };
    use proptest::prelude::*;
    use std::vec::Vec;

    const ERROR_CODES: usize = 19;

    /// What `frame`'s codec makes of the same bytes, as an `Inbound`. Frames a relay
    /// never sends to a terminal map to `None`.
    fn reference(input: &[u8]) -> Result<Option<(Option<Inbound>, usize)>, ()> {
        let Some((parsed, n)) = frame::parse(input).map_err(|_| ())? else {
            return Ok(None);
        };
        let inbound = match parsed {
            Parsed::DataHeader { len } => Some(Inbound::Data(len)),
            Parsed::Control(f) => match f {
                Frame::LoginOk(ok) => Some(Inbound::LoginOk {
                    caps: ok.caps,
                    keepalive_ms: ok.keepalive_ms,
                    max_payload: ok.max_payload,
                    token: ok.token,
                }),
                Frame::KeepAliveAck { .. } => Some(Inbound::KeepAliveAck),
                Frame::ListAnswer(page) => Some(Inbound::ListAnswer(page)),
                Frame::Notice(n) => Some(Inbound::Notice {
                    session: n.session,
                    from: n.from,
                    service: n.service,
                }),
                Frame::DemandResult(r) => Some(Inbound::DemandResult(r)),
                Frame::Terminate => Some(Inbound::Terminate),
                Frame::Release { reason } => Some(Inbound::Release(reason)),
                Frame::Error {
                    code,
                    text,
                    retry_after,
                } => Some(Inbound::Error {
                    code,
                    text,
                    retry_after,
                }),
                _ => None,
            },
        };
        Ok(Some((inbound, n)))
    }

    /// The two codecs agree on `input`: same frame and length, both want more bytes, or
    /// both refuse it. The one difference: a frame type only terminals send is refused
    /// here from its header on.
    fn agree(input: &[u8]) {
        use FrameType::*;
        let terminal_only = input
            .first()
            .and_then(|&t| FrameType::from_u8(t))
            .is_some_and(|t| {
                matches!(
                    t,
                    Login | KeepAlive | List | Demand | Accept | Reject | Logout
                )
            });
        match (reference(input), parse(input)) {
            (Ok(Some((Some(a), n))), Ok(Some((b, m)))) => {
                assert_eq!((a, n), (b, m), "{input:02x?}");
            }
            (Ok(Some((None, _))) | Ok(None), Err(Malformed)) if terminal_only => {}
            (Ok(None), Ok(None)) | (Err(()), Err(Malformed)) => {}
            (a, b) => panic!("{input:02x?}: frame says {a:?}, wire says {b:?}"),
        }
    }

    fn encoded(f: &Frame) -> Vec<u8> {
        let mut buf = [0u8; frame::MAX_CONTROL_FRAME];
        let n = f.encode(&mut buf).unwrap();
        buf[..n].to_vec()
    }

    fn user() -> impl Strategy<Value = UserId> {
        "[a-z0-9é-]{1,32}".prop_filter_map("fits", |s| UserId::new(&s).ok())
    }

    fn text() -> impl Strategy<Value = Text> {
        ".{0,40}".prop_map(|s| Text::lossy(&s))
    }

    fn reject_reason_s() -> impl Strategy<Value = RejectReason> {
        (0u32..5).prop_map(|i| reject_reason(i).unwrap())
    }

    fn demand_error_s() -> impl Strategy<Value = DemandError> {
        (0u32..7, reject_reason_s()).prop_map(|(i, r)| match i {
            0 => DemandError::TargetOffline,
            1 => DemandError::NoIdleConnection,
            2 => DemandError::Forbidden,
            3 => DemandError::Rejected(r),
            4 => DemandError::Timeout,
            5 => DemandError::TooManySessions,
            _ => DemandError::TargetGone,
        })
    }

    /// Every frame a relay sends to a terminal, with arbitrary contents.
    fn relay_frame() -> impl Strategy<Value = Frame> {
        prop_oneof![
            (
                any::<u32>(),
                any::<u32>(),
                any::<u16>(),
                prop::collection::vec(any::<u8>(), 0..=64)
            )
                .prop_map(|(caps, keepalive_ms, max_payload, t)| Frame::LoginOk(
                    LoginOk {
                        caps,
                        keepalive_ms,
                        max_payload,
                        token: ResumeToken::from_slice(&t).unwrap(),
                    }
                )),
            any::<u32>().prop_map(|seq| Frame::KeepAliveAck { seq }),
            (
                prop::collection::vec(user(), 0..=LIST_PAGE),
                any::<Option<u32>>()
            )
                .prop_map(|(u, next)| Frame::ListAnswer(ListAnswer {
                    users: heapless::Vec::from_slice(&u).unwrap(),
                    next,
                })),
            (any::<u32>(), user(), user()).prop_map(|(session, from, s)| {
                Frame::Notice(Notice {
                    session,
                    from,
                    service: ServiceName::new(s.as_str()).unwrap(),
                })
            }),
            any::<u32>()
                .prop_map(|session| Frame::DemandResult(DemandResult::Accepted { session })),
            (demand_error_s(), text()).prop_map(|(error, text)| Frame::DemandResult(
                DemandResult::Failed { error, text }
            )),
            ("[a-z0-9.:\\[\\]-]{1,64}", any::<[u8; 32]>()).prop_map(|(a, fingerprint)| {
                Frame::DemandResult(DemandResult::Redirect(Redirect {
                    address: NodeAddress::new(&a).unwrap(),
                    fingerprint,
                }))
            }),
            Just(Frame::Terminate),
            (0u32..5).prop_map(|i| Frame::Release {
                reason: release_reason(i).unwrap()
            }),
            ((0..ERROR_CODES as u32), text(), any::<Option<u32>>()).prop_map(
                |(i, text, retry_after)| Frame::Error {
                    code: error_code(i).unwrap(),
                    text,
                    retry_after,
                }
            ),
        ]
    }

    #[test]
    fn error_codes_follow_their_discriminants() {
        for i in 0..ERROR_CODES as u32 {
            assert_eq!(error_code(i).unwrap() as u32, i);
        }
        assert_eq!(error_code(ERROR_CODES as u32), Err(Malformed));
    }

    proptest! {
        /// Whatever a relay sends decodes here as it does in `frame`, at every cut.
        #[test]
        fn relay_frames_decode_as_frame_decodes_them(f in relay_frame()) {
            let bytes = encoded(&f);
            for cut in 0..=bytes.len() {
                agree(&bytes[..cut]);
            }
            let (inbound, n) = parse(&bytes).unwrap().unwrap();
            prop_assert_eq!(n, bytes.len());
            prop_assert!(!matches!(inbound, Inbound::Data(_)));
        }

        /// Corrupted frames: both codecs refuse the same bytes and accept the same bytes.
        #[test]
        fn corrupted_frames_agree(
            f in relay_frame(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        ) {
            let mut bytes = encoded(&f);
            for (i, b) in flips {
                let i = i.index(bytes.len());
                bytes[i] = b;
            }
            agree(&bytes);
        }

        #[test]
        fn arbitrary_bytes_agree(bytes in prop::collection::vec(any::<u8>(), 0..80)) {
            agree(&bytes);
        }

        /// Every frame a terminal sends is byte-identical to `frame`'s encoding.
        #[test]
        fn terminal_frames_encode_as_frame_encodes_them(
            user in user(),
            target in user(),
            password in "[ -~]{1,128}",
            token in prop::collection::vec(any::<u8>(), 0..=64),
            n in any::<u32>(),
            reason in reject_reason_s(),
        ) {
            let password = Password::new(&password).unwrap();
            let token = ResumeToken::from_slice(&token).unwrap();
            let service = ServiceName::new(target.as_str()).unwrap();
            let cases = [
                (
                    Outbound::Login {
                        user: &user,
                        caps: n,
                        credential: Cred::Password(&password),
                    },
                    None,
                ),
                (
                    Outbound::Login { user: &user, caps: n, credential: Cred::Resume(&token) },
                    None,
                ),
                (Outbound::KeepAlive(n), Some(Frame::KeepAlive { seq: n })),
                (Outbound::List(n), Some(Frame::List { cursor: n })),
                (
                    Outbound::Demand { target: &target, service: &service },
                    Some(Frame::Demand(Demand { target: target.clone(), service: service.clone() })),
                ),
                (Outbound::Accept(n), Some(Frame::Accept { session: n })),
                (
                    Outbound::Reject { session: n, reason },
                    Some(Frame::Reject(Reject {
                        session: n,
                        reason,
                        text: Text::lossy(reason.describe()),
                    })),
                ),
                (Outbound::Terminate, Some(Frame::Terminate)),
                (Outbound::Logout, Some(Frame::Logout)),
            ];
            for (out, reference) in cases {
                let reference = reference.unwrap_or_else(|| match out {
                    Outbound::Login { user, caps, credential } => Frame::Login(Login {
                        hello: Hello::current(caps),
                        user: user.clone(),
                        credential: match credential {
                            Cred::Password(p) => Credential::Password(p.clone()),
                            Cred::Resume(t) => Credential::Resume(t.clone()),
                        },
                    }),
                    _ => unreachable!(),
                });
                let want = encoded(&reference);
                let mut buf = [0u8; frame::MAX_CONTROL_FRAME];
                let n = out.encode(&mut buf).unwrap();
                prop_assert_eq!(&buf[..n], &want[..]);
                // Too small a buffer is refused, never overrun.
                prop_assert_eq!(out.encode(&mut buf[..n - 1]), Err(NoRoom));
            }
        }
    }
}
