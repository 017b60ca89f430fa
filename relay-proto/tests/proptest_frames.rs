//! Property tests: every control frame with arbitrary valid fields encodes and decodes back
//! to itself, at every split point the decoder asks for more bytes, and arbitrary bytes
//! never make `parse` panic or claim more bytes than it was given.

use proptest::prelude::*;
use relay_proto::codes::{DemandError, ErrorCode, RejectReason, ReleaseReason};
use relay_proto::frame::{
    self, Credential, Demand, DemandResult, Frame, Hello, ListAnswer, Login, LoginOk, Notice,
    Parsed, Redirect, Reject,
};
use relay_proto::{NodeAddress, Password, ResumeToken, ServiceName, Text, UserId};

fn user() -> impl Strategy<Value = UserId> {
    "[a-zA-Z0-9._@é-]{1,10}".prop_filter_map("fits", |s| UserId::new(&s).ok())
}
fn service() -> impl Strategy<Value = ServiceName> {
    "[a-z0-9-]{0,32}".prop_map(|s| ServiceName::new(&s).unwrap())
}
fn text() -> impl Strategy<Value = Text> {
    "[ -~]{0,64}".prop_map(|s| Text::new(&s).unwrap())
}
fn token() -> impl Strategy<Value = ResumeToken> {
    proptest::collection::vec(any::<u8>(), 0..=64)
        .prop_map(|v| ResumeToken::from_slice(&v).unwrap())
}
fn error_code() -> impl Strategy<Value = ErrorCode> {
    (0u8..=17).prop_map(|i| {
        let mut b = [0u8; 8];
        let n = postcard::to_slice(&i, &mut b).unwrap().len();
        postcard::from_bytes(&b[..n]).unwrap()
    })
}
fn reject_reason() -> impl Strategy<Value = RejectReason> {
    prop_oneof![
        Just(RejectReason::UnknownService),
        Just(RejectReason::NotAllowed),
        Just(RejectReason::Busy),
        Just(RejectReason::ServiceUnavailable),
        Just(RejectReason::Other),
    ]
}
fn release_reason() -> impl Strategy<Value = ReleaseReason> {
    prop_oneof![
        Just(ReleaseReason::Normal),
        Just(ReleaseReason::PeerLost),
        Just(ReleaseReason::PeerLoggedOut),
        Just(ReleaseReason::Cancelled),
        Just(ReleaseReason::ShuttingDown),
        Just(ReleaseReason::EndedByOperator),
    ]
}
fn demand_error() -> impl Strategy<Value = DemandError> {
    prop_oneof![
        Just(DemandError::TargetOffline),
        Just(DemandError::NoIdleConnection),
        Just(DemandError::Forbidden),
        reject_reason().prop_map(DemandError::Rejected),
        Just(DemandError::Timeout),
        Just(DemandError::TooManySessions),
        Just(DemandError::TargetGone),
    ]
}

fn any_frame() -> impl Strategy<Value = Frame> {
    let credential = prop_oneof![
        "[ -~]{1,128}".prop_map(|p| Credential::Password(Password::new(&p).unwrap())),
        token().prop_map(Credential::Resume),
    ];
    prop_oneof![
        (user(), credential, any::<u32>()).prop_map(|(user, credential, caps)| Frame::Login(
            Login {
                hello: Hello::current(caps),
                user,
                credential
            }
        )),
        (any::<u32>(), any::<u32>(), any::<u16>(), token()).prop_map(
            |(caps, keepalive_ms, max_payload, token)| {
                Frame::LoginOk(LoginOk {
                    caps,
                    keepalive_ms,
                    max_payload,
                    token,
                })
            }
        ),
        any::<u32>().prop_map(|seq| Frame::KeepAlive { seq }),
        any::<u32>().prop_map(|seq| Frame::KeepAliveAck { seq }),
        any::<u32>().prop_map(|cursor| Frame::List { cursor }),
        (
            proptest::collection::vec(user(), 0..=frame::LIST_PAGE),
            any::<Option<u32>>()
        )
            .prop_map(|(u, next)| {
                Frame::ListAnswer(ListAnswer {
                    users: heapless::Vec::from_slice(&u).unwrap(),
                    next,
                })
            }),
        (user(), service()).prop_map(|(target, service)| Frame::Demand(Demand { target, service })),
        (any::<u32>(), user(), service()).prop_map(|(session, from, service)| Frame::Notice(
            Notice {
                session,
                from,
                service
            }
        )),
        any::<u32>().prop_map(|session| Frame::Accept { session }),
        (any::<u32>(), reject_reason(), text()).prop_map(|(session, reason, text)| Frame::Reject(
            Reject {
                session,
                reason,
                text
            }
        )),
        any::<u32>().prop_map(|session| Frame::DemandResult(DemandResult::Accepted { session })),
        (demand_error(), text())
            .prop_map(|(error, text)| Frame::DemandResult(DemandResult::Failed { error, text })),
        ("[a-zA-Z0-9.:\\[\\]-]{1,64}", any::<[u8; 32]>()).prop_map(|(address, fingerprint)| {
            Frame::DemandResult(DemandResult::Redirect(Redirect {
                address: NodeAddress::new(&address).unwrap(),
                fingerprint,
            }))
        }),
        Just(Frame::Terminate),
        release_reason().prop_map(|reason| Frame::Release { reason }),
        Just(Frame::Logout),
        (error_code(), text(), any::<Option<u32>>()).prop_map(|(code, text, retry_after)| {
            Frame::Error {
                code,
                text,
                retry_after,
            }
        }),
    ]
}

proptest! {
    #[test]
    fn control_frames_roundtrip_and_stream(f in any_frame()) {
        let mut buf = [0u8; frame::MAX_CONTROL_FRAME];
        let n = f.encode(&mut buf).unwrap();
        prop_assert_eq!(frame::parse(&buf[..n]), Ok(Some((Parsed::Control(f.clone()), n))));
        for cut in 0..n {
            prop_assert_eq!(frame::parse(&buf[..cut]), Ok(None));
        }
        // Followed by other bytes, the frame still ends where it ends.
        let mut longer = buf[..n].to_vec();
        longer.extend_from_slice(&[0x03, 0x00]);
        prop_assert_eq!(frame::parse(&longer), Ok(Some((Parsed::Control(f), n))));
    }

    #[test]
    fn data_headers_roundtrip(len in 1usize..=frame::MAX_PAYLOAD) {
        let h = frame::data_header(len).unwrap();
        prop_assert_eq!(frame::parse(&h), Ok(Some((Parsed::DataHeader { len: len as u16 }, 3))));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
        if let Ok(Some((_, n))) = frame::parse(&bytes) {
            prop_assert!(n > 0 && n <= bytes.len());
        }
    }
}
