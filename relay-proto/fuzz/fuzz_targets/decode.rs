//! The frame decoder on arbitrary bytes: never panics; whatever decodes re-encodes to
//! something that decodes to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relay_proto::frame::{self, Parsed};

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    while let Ok(Some((parsed, n))) = frame::parse(rest) {
        assert!(n > 0 && n <= rest.len());
        if let Parsed::Control(f) = parsed {
            let mut buf = [0u8; frame::MAX_CONTROL_FRAME];
            let m = f.encode(&mut buf).expect("a decoded frame fits");
            match frame::parse(&buf[..m]) {
                Ok(Some((Parsed::Control(g), k))) => {
                    assert_eq!(f, g);
                    assert_eq!(k, m);
                }
                other => panic!("re-encoded frame does not decode: {other:?}"),
            }
        }
        rest = &rest[n..];
    }
});
