//! Framing: every frame is `type (1 byte) | length (2 bytes, big-endian) | payload`.
//!
//! Control payloads are postcard-encoded structs of bounded size ([`MAX_CONTROL`]); the
//! payload of a DATA frame is the application's bytes, which the relay forwards without
//! looking at them. Parsing is streaming: [`parse`] returns `Ok(None)` until a whole
//! control frame (or a whole DATA *header*) is there, so callers never need to buffer a
//! DATA payload to read the frame after it.

use heapless::Vec;
use nom::Parser;
use nom::number::streaming::{be_u16, u8 as be_u8};
use serde::{Deserialize, Serialize};

use crate::codes::{DemandError, ErrorCode, RejectReason, ReleaseReason};
use crate::ident::{NodeAddress, Password, ResumeToken, ServiceName, Text, UserId};

/// Bytes before every payload: type and length.
pub const HEADER_LEN: usize = 3;
/// Largest control payload. A LIST_ANSWER of 8 longest user IDs is the largest frame.
pub const MAX_CONTROL: usize = 320;
/// Largest DATA payload the wire format can carry. A relay may announce a lower bound in
/// LOGIN_OK; a sender never exceeds the bound it was given.
pub const MAX_PAYLOAD: usize = u16::MAX as usize;
/// A buffer of this size holds any control frame, header included.
pub const MAX_CONTROL_FRAME: usize = HEADER_LEN + MAX_CONTROL;
/// User IDs in one LIST_ANSWER page.
pub const LIST_PAGE: usize = 8;

/// `RELY`, first bytes of every LOGIN payload: tells a stray client from a terminal.
pub const MAGIC: [u8; 4] = *b"RELY";
/// The protocol version this crate speaks.
pub const VERSION: u8 = 1;

/// Capability bits, announced in LOGIN and confirmed (intersected) in LOGIN_OK.
pub mod caps {
    /// The terminal keeps spare connections logged in with a resumption credential.
    pub const RESUME: u32 = 1 << 0;
    /// The terminal may ask for the online list.
    pub const LIST: u32 = 1 << 1;
    /// This instance only demands and lists: it never replaces the user ID's reachable
    /// instance and is never a demand target (docs/PROTOCOL.md §9, §10.1). Not in
    /// [`ALL`]: a terminal that does not set it is a reachable instance, as in version 1.
    pub const REQUESTER: u32 = 1 << 2;
    /// The terminal decodes ERROR `Throttled` with its retry-after field (a terminal that
    /// did not announce it gets the frame without the field).
    pub const RETRY_AFTER: u32 = 1 << 3;
    /// The terminal follows DEMAND_RESULT `Redirect` (the target is homed on another node
    /// of the same service, docs/PROTOCOL.md §3.9). Not in [`ALL`]: only a terminal that
    /// can open a connection to another relay announces it; one that does not gets
    /// `TargetOffline` for such a target, as before.
    pub const REDIRECT: u32 = 1 << 4;
    /// Every capability a terminal of any kind announces ([`REQUESTER`] aside, which
    /// chooses the kind).
    pub const ALL: u32 = RESUME | LIST | RETRY_AFTER;
}

/// The frame type byte. The values are the protocol; see docs/PROTOCOL.md.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum FrameType {
    Login = 0x01,
    LoginOk = 0x02,
    KeepAlive = 0x03,
    KeepAliveAck = 0x04,
    List = 0x05,
    ListAnswer = 0x06,
    Demand = 0x07,
    Notice = 0x08,
    Accept = 0x09,
    Reject = 0x0A,
    DemandResult = 0x0B,
    Data = 0x0C,
    Terminate = 0x0D,
    Release = 0x0E,
    Logout = 0x0F,
    Error = 0x10,
}

impl FrameType {
    pub const fn from_u8(b: u8) -> Option<FrameType> {
        use FrameType::*;
        Some(match b {
            0x01 => Login,
            0x02 => LoginOk,
            0x03 => KeepAlive,
            0x04 => KeepAliveAck,
            0x05 => List,
            0x06 => ListAnswer,
            0x07 => Demand,
            0x08 => Notice,
            0x09 => Accept,
            0x0A => Reject,
            0x0B => DemandResult,
            0x0C => Data,
            0x0D => Terminate,
            0x0E => Release,
            0x0F => Logout,
            0x10 => Error,
            _ => return None,
        })
    }
}

/// The fixed start of every LOGIN payload, decoded on its own so that a version mismatch
/// is told apart from a malformed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 4],
    pub version: u8,
    pub caps: u32,
}

impl Hello {
    pub const fn current(caps: u32) -> Hello {
        Hello {
            magic: MAGIC,
            version: VERSION,
            caps,
        }
    }
}

/// How a terminal proves who it is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Credential {
    /// The account password: checked with the store's costly hash. Once per terminal.
    Password(Password),
    /// The credential from an earlier LOGIN_OK: cheap to check; joins the current instance.
    Resume(ResumeToken),
}

/// Step (2)(11): a terminal logs in on a new connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Login {
    pub hello: Hello,
    pub user: UserId,
    pub credential: Credential,
}

/// Step (3)(12), positive answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginOk {
    /// Capabilities both sides have.
    pub caps: u32,
    /// How often the terminal must send a keep-alive on a quiet connection, in ms.
    pub keepalive_ms: u32,
    /// Largest DATA payload the relay accepts.
    pub max_payload: u16,
    /// Credential for extra connections of this instance.
    pub token: ResumeToken,
}

/// One page of the online list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListAnswer {
    pub users: Vec<UserId, LIST_PAGE>,
    /// Cursor for the next page, or `None` after the last one.
    pub next: Option<u32>,
}

/// Step (6): ask the relay for a session with `target`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Demand {
    pub target: UserId,
    pub service: ServiceName,
}

/// Step (7): the relay tells the target who asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    pub session: u32,
    pub from: UserId,
    pub service: ServiceName,
}

/// Step (8), negative.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    pub session: u32,
    pub reason: RejectReason,
    pub text: Text,
}

/// Where a demand's target is reachable instead: another node of the same service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Redirect {
    /// The node's address, as a terminal connects to it (`host:port`).
    pub address: NodeAddress,
    /// The SHA-256 fingerprint of the node's TLS certificate: the terminal pins it, so it
    /// trusts the node exactly as far as it trusts the relay that redirected it.
    pub fingerprint: [u8; 32],
}

/// Step (9): the answer to a demand.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DemandResult {
    Accepted {
        session: u32,
    },
    Failed {
        error: DemandError,
        text: Text,
    },
    /// The target is not here but on another node: demand again there, once. Sent only to
    /// a connection whose LOGIN announced [`caps::REDIRECT`].
    Redirect(Redirect),
}

/// A control frame, decoded. DATA is not here: its payload streams (see [`Parsed`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Login(Login),
    LoginOk(LoginOk),
    KeepAlive {
        seq: u32,
    },
    KeepAliveAck {
        seq: u32,
    },
    List {
        cursor: u32,
    },
    ListAnswer(ListAnswer),
    Demand(Demand),
    Notice(Notice),
    Accept {
        session: u32,
    },
    Reject(Reject),
    DemandResult(DemandResult),
    Terminate,
    Release {
        reason: ReleaseReason,
    },
    Logout,
    /// `retry_after`: seconds to wait before logging in again, sent only with `Throttled`
    /// and only to a terminal that announced [`caps::RETRY_AFTER`] (older decoders refuse
    /// trailing bytes).
    Error {
        code: ErrorCode,
        text: Text,
        retry_after: Option<u32>,
    },
}

/// What [`parse`] found at the start of the input.
// No allocator, so no boxing: a parsed frame lives on the stack once and is moved out.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// A whole control frame.
    Control(Frame),
    /// A DATA header: the next `len` bytes after it are payload.
    DataHeader { len: u16 },
}

/// Why bytes are not a frame. Each maps to the [`ErrorCode`] a relay answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum DecodeError {
    UnknownType(u8),
    /// A control frame longer than [`MAX_CONTROL`].
    TooLarge {
        ty: FrameType,
        len: u16,
    },
    /// The payload does not decode as the frame type's structure (or has bytes left over).
    BadPayload(FrameType),
    /// A DATA frame with no payload.
    EmptyData,
    BadMagic,
    Version(u8),
}

impl DecodeError {
    pub const fn code(self) -> ErrorCode {
        match self {
            DecodeError::UnknownType(_) => ErrorCode::UnknownFrameType,
            DecodeError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::BadPayload(_) | DecodeError::EmptyData => ErrorCode::BadFrame,
            DecodeError::BadMagic => ErrorCode::BadMagic,
            DecodeError::Version(_) => ErrorCode::VersionMismatch,
        }
    }
}

/// Why a frame could not be encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum EncodeError {
    /// The output buffer is too small; nothing was written that counts.
    BufferTooSmall,
    /// A DATA payload length outside `1..=MAX_PAYLOAD`.
    BadDataLength,
}

/// Parses one frame (or DATA header) from the start of `input`.
///
/// `Ok(None)` means "need more bytes": keep them and call again with more. On success the
/// second value is how many bytes the frame (or the DATA header) took.
pub fn parse(input: &[u8]) -> Result<Option<(Parsed, usize)>, DecodeError> {
    let header = (be_u8::<&[u8], ()>, be_u16).parse(input);
    let Ok((rest, (ty, len))) = header else {
        return Ok(None); // streaming parsers only fail with Incomplete on a short header
    };
    let ty = FrameType::from_u8(ty).ok_or(DecodeError::UnknownType(ty))?;
    if ty == FrameType::Data {
        return if len == 0 {
            Err(DecodeError::EmptyData)
        } else {
            Ok(Some((Parsed::DataHeader { len }, HEADER_LEN)))
        };
    }
    if usize::from(len) > MAX_CONTROL {
        return Err(DecodeError::TooLarge { ty, len });
    }
    let take = nom::bytes::streaming::take::<u16, &[u8], ()>(len).parse(rest);
    let Ok((_, payload)) = take else {
        return Ok(None);
    };
    let frame = decode_payload(ty, payload)?;
    Ok(Some((
        Parsed::Control(frame),
        HEADER_LEN + usize::from(len),
    )))
}

/// Decodes a postcard payload that must use every byte.
fn exact<'a, T: Deserialize<'a>>(ty: FrameType, payload: &'a [u8]) -> Result<T, DecodeError> {
    match postcard::take_from_bytes(payload) {
        Ok((v, [])) => Ok(v),
        _ => Err(DecodeError::BadPayload(ty)),
    }
}

fn decode_payload(ty: FrameType, p: &[u8]) -> Result<Frame, DecodeError> {
    Ok(match ty {
        FrameType::Login => {
            // The hello first, alone: its fields decide how to read the rest.
            let (hello, _) =
                postcard::take_from_bytes::<Hello>(p).map_err(|_| DecodeError::BadPayload(ty))?;
            if hello.magic != MAGIC {
                return Err(DecodeError::BadMagic);
            }
            if hello.version != VERSION {
                return Err(DecodeError::Version(hello.version));
            }
            Frame::Login(exact(ty, p)?)
        }
        FrameType::LoginOk => Frame::LoginOk(exact(ty, p)?),
        FrameType::KeepAlive => Frame::KeepAlive { seq: exact(ty, p)? },
        FrameType::KeepAliveAck => Frame::KeepAliveAck { seq: exact(ty, p)? },
        FrameType::List => Frame::List {
            cursor: exact(ty, p)?,
        },
        FrameType::ListAnswer => Frame::ListAnswer(exact(ty, p)?),
        FrameType::Demand => Frame::Demand(exact(ty, p)?),
        FrameType::Notice => Frame::Notice(exact(ty, p)?),
        FrameType::Accept => Frame::Accept {
            session: exact(ty, p)?,
        },
        FrameType::Reject => Frame::Reject(exact(ty, p)?),
        FrameType::DemandResult => Frame::DemandResult(exact(ty, p)?),
        FrameType::Terminate => {
            exact::<()>(ty, p)?;
            Frame::Terminate
        }
        FrameType::Release => Frame::Release {
            reason: exact(ty, p)?,
        },
        FrameType::Logout => {
            exact::<()>(ty, p)?;
            Frame::Logout
        }
        FrameType::Error => {
            let ((code, text), rest) =
                postcard::take_from_bytes(p).map_err(|_| DecodeError::BadPayload(ty))?;
            let retry_after = match rest {
                [] => None,
                rest => Some(exact(ty, rest)?),
            };
            Frame::Error {
                code,
                text,
                retry_after,
            }
        }
        FrameType::Data => unreachable_data(),
    })
}

/// DATA never reaches payload decoding: `parse` returns its header first.
#[cold]
fn unreachable_data() -> Frame {
    Frame::Error {
        code: ErrorCode::BadFrame,
        text: Text::lossy(""),
        retry_after: None,
    }
}

impl Frame {
    pub const fn frame_type(&self) -> FrameType {
        match self {
            Frame::Login(_) => FrameType::Login,
            Frame::LoginOk(_) => FrameType::LoginOk,
            Frame::KeepAlive { .. } => FrameType::KeepAlive,
            Frame::KeepAliveAck { .. } => FrameType::KeepAliveAck,
            Frame::List { .. } => FrameType::List,
            Frame::ListAnswer(_) => FrameType::ListAnswer,
            Frame::Demand(_) => FrameType::Demand,
            Frame::Notice(_) => FrameType::Notice,
            Frame::Accept { .. } => FrameType::Accept,
            Frame::Reject(_) => FrameType::Reject,
            Frame::DemandResult(_) => FrameType::DemandResult,
            Frame::Terminate => FrameType::Terminate,
            Frame::Release { .. } => FrameType::Release,
            Frame::Logout => FrameType::Logout,
            Frame::Error { .. } => FrameType::Error,
        }
    }

    /// Encodes the whole frame into `buf`, returning its length.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, EncodeError> {
        if buf.len() < HEADER_LEN {
            return Err(EncodeError::BufferTooSmall);
        }
        let (head, body) = buf.split_at_mut(HEADER_LEN);
        let cap = body.len().min(MAX_CONTROL);
        let body = &mut body[..cap];
        let written = match self {
            Frame::Login(v) => postcard::to_slice(v, body),
            Frame::LoginOk(v) => postcard::to_slice(v, body),
            Frame::KeepAlive { seq } | Frame::KeepAliveAck { seq } => postcard::to_slice(seq, body),
            Frame::List { cursor } => postcard::to_slice(cursor, body),
            Frame::ListAnswer(v) => postcard::to_slice(v, body),
            Frame::Demand(v) => postcard::to_slice(v, body),
            Frame::Notice(v) => postcard::to_slice(v, body),
            Frame::Accept { session } => postcard::to_slice(session, body),
            Frame::Reject(v) => postcard::to_slice(v, body),
            Frame::DemandResult(v) => postcard::to_slice(v, body),
            Frame::Terminate | Frame::Logout => postcard::to_slice(&(), body),
            Frame::Release { reason } => postcard::to_slice(reason, body),
            Frame::Error {
                code,
                text,
                retry_after: None,
            } => postcard::to_slice(&(code, text), body),
            Frame::Error {
                code,
                text,
                retry_after: Some(secs),
            } => postcard::to_slice(&(code, text, secs), body),
        }
        .map_err(|_| EncodeError::BufferTooSmall)?
        .len();
        write_header(head, self.frame_type(), written);
        Ok(HEADER_LEN + written)
    }
}

fn write_header(head: &mut [u8], ty: FrameType, len: usize) {
    head[0] = ty as u8;
    head[1..3].copy_from_slice(&(len as u16).to_be_bytes());
}

/// The header of a DATA frame carrying `len` payload bytes; the payload follows it.
pub fn data_header(len: usize) -> Result<[u8; HEADER_LEN], EncodeError> {
    if len == 0 || len > MAX_PAYLOAD {
        return Err(EncodeError::BadDataLength);
    }
    let mut h = [0; HEADER_LEN];
    write_header(&mut h, FrameType::Data, len);
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(f: Frame) {
        let mut buf = [0u8; MAX_CONTROL_FRAME];
        let n = f.encode(&mut buf).unwrap();
        assert_eq!(parse(&buf[..n]), Ok(Some((Parsed::Control(f), n))));
        for cut in 0..n {
            assert_eq!(parse(&buf[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn every_control_frame_roundtrips_and_streams() {
        let user = UserId::new("cam-1").unwrap();
        roundtrip(Frame::Login(Login {
            hello: Hello::current(caps::ALL),
            user: user.clone(),
            credential: Credential::Password(Password::new("pw").unwrap()),
        }));
        roundtrip(Frame::KeepAlive { seq: 7 });
        roundtrip(Frame::DemandResult(DemandResult::Redirect(Redirect {
            address: NodeAddress::new("[2001:db8::1]:7835").unwrap(),
            fingerprint: [0xab; 32],
        })));
        roundtrip(Frame::Terminate);
        roundtrip(Frame::Logout);
        roundtrip(Frame::Release {
            reason: ReleaseReason::PeerLost,
        });
        roundtrip(Frame::Error {
            code: ErrorCode::Replaced,
            text: Text::lossy("x"),
            retry_after: None,
        });
        roundtrip(Frame::Error {
            code: ErrorCode::Throttled,
            text: Text::lossy("x"),
            retry_after: Some(300),
        });
    }

    /// ERROR Throttled with its retry-after is the old frame plus one varint: what a
    /// terminal without [`caps::RETRY_AFTER`] would refuse, so the relay sends it only to
    /// terminals that announce the bit.
    #[test]
    fn retry_after_is_one_trailing_varint() {
        let mut buf = [0u8; 64];
        let n = Frame::Error {
            code: ErrorCode::Throttled,
            text: Text::lossy("t"),
            retry_after: Some(300),
        }
        .encode(&mut buf)
        .unwrap();
        assert_eq!(&buf[..n], &[0x10, 0, 5, 8, 1, b't', 0xac, 0x02]);
        // Two trailing varints are still malformed.
        let bad = [0x10, 0, 6, 8, 1, b't', 0x01, 0x02, 0x03];
        assert!(parse(&bad[..]).is_err());
    }

    /// A redirect is variant 2: the address as a string, then the fingerprint's 32 raw
    /// bytes (an array has no length prefix). A short or an empty address is malformed.
    #[test]
    fn redirect_layout() {
        let mut buf = [0u8; MAX_CONTROL_FRAME];
        let n = Frame::DemandResult(DemandResult::Redirect(Redirect {
            address: NodeAddress::new("n:1").unwrap(),
            fingerprint: [7; 32],
        }))
        .encode(&mut buf)
        .unwrap();
        assert_eq!(&buf[..8], &[0x0b, 0, 37, 2, 3, b'n', b':', b'1']);
        assert_eq!(&buf[8..n], &[7; 32]);
        let short = [0x0b, 0, 36, 2, 3, b'n', b':', b'1'];
        let mut cut = [0u8; 39];
        cut[..8].copy_from_slice(&short);
        assert!(parse(&cut).is_err());
        let empty = [0x0b, 0, 34, 2, 0];
        let mut bytes = [0u8; 37];
        bytes[..5].copy_from_slice(&empty);
        assert!(parse(&bytes).is_err());
    }

    #[test]
    fn largest_list_answer_fits() {
        let mut users = Vec::new();
        for i in 0..LIST_PAGE {
            let mut s = heapless::String::<32>::new();
            for _ in 0..32 {
                s.push(char::from(b'a' + i as u8)).unwrap();
            }
            users.push(UserId::new(&s).unwrap()).unwrap();
        }
        roundtrip(Frame::ListAnswer(ListAnswer {
            users,
            next: Some(u32::MAX),
        }));
    }

    #[test]
    fn data_header_streams() {
        let h = data_header(5).unwrap();
        assert_eq!(parse(&h), Ok(Some((Parsed::DataHeader { len: 5 }, 3))));
        assert_eq!(parse(&[0x0C, 0, 0]), Err(DecodeError::EmptyData));
        assert_eq!(data_header(0), Err(EncodeError::BadDataLength));
    }

    #[test]
    fn bad_inputs_have_defined_errors() {
        assert_eq!(parse(&[0x7f, 0, 0]), Err(DecodeError::UnknownType(0x7f)));
        assert!(matches!(
            parse(&[0x03, 0xff, 0xff]),
            Err(DecodeError::TooLarge { .. })
        ));
        // KEEPALIVE with a trailing byte.
        assert_eq!(
            parse(&[0x03, 0, 2, 1, 1]),
            Err(DecodeError::BadPayload(FrameType::KeepAlive))
        );
        // LOGIN with a wrong magic and with a future version.
        assert_eq!(
            parse(&[0x01, 0, 6, b'H', b'T', b'T', b'P', 1, 0]),
            Err(DecodeError::BadMagic)
        );
        assert_eq!(
            parse(&[0x01, 0, 6, b'R', b'E', b'L', b'Y', 2, 0]),
            Err(DecodeError::Version(2))
        );
    }
}
