//! The hex examples in `docs/PROTOCOL.md` are real frames.
//!
//! Every fenced block with the info string `hex frame=<FrameType>` is decoded with
//! [`frame::parse`]: it must hold exactly one frame (a DATA block: the header and exactly
//! `len` payload bytes), of the named type, and encoding the decoded value again must give
//! the same bytes. The line right after the block, `Decoded: `…``, must be the decoded
//! value's `Debug` form, secrets shown (for DATA: the header, then the payload). Every frame type must
//! have at least one example.

use std::collections::{BTreeMap, BTreeSet};

use relay_proto::frame::{self, Credential, Frame, FrameType, Parsed};

const DOC_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/PROTOCOL.md");

fn doc() -> String {
    std::fs::read_to_string(DOC_PATH).unwrap_or_else(|e| panic!("{DOC_PATH}: {e}"))
}

#[derive(Debug, Clone)]
struct Example {
    /// 1-based line of the opening fence, for messages.
    line: usize,
    name: String,
    hex: String,
    note: Option<String>,
}

/// Every ```hex block of `doc`, with the annotation line that follows it.
fn examples(doc: &str) -> Result<Vec<Example>, String> {
    let lines: Vec<&str> = doc.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(info) = lines[i].trim_start().strip_prefix("```hex") else {
            i += 1;
            continue;
        };
        let line = i + 1;
        let name = info
            .split_whitespace()
            .find_map(|w| w.strip_prefix("frame="))
            .ok_or_else(|| format!("line {line}: ```hex block without frame=<Type>"))?
            .to_string();
        let mut hex = String::new();
        i += 1;
        loop {
            let l = lines
                .get(i)
                .ok_or_else(|| format!("line {line}: ```hex block never closed"))?;
            i += 1;
            if l.trim_start().starts_with("```") {
                break;
            }
            hex.push_str(l);
            hex.push(' ');
        }
        let note = lines
            .get(i)
            .and_then(|l| l.trim().strip_prefix("Decoded: `"))
            .and_then(|l| l.strip_suffix('`'))
            .map(str::to_string);
        out.push(Example {
            line,
            name,
            hex,
            note,
        });
    }
    Ok(out)
}

fn bytes_of(hex: &str) -> Result<Vec<u8>, String> {
    hex.split_whitespace()
        .map(|t| {
            if t.len() == 2 {
                u8::from_str_radix(t, 16).map_err(|_| format!("bad hex byte {t:?}"))
            } else {
                Err(format!("bad hex byte {t:?} (write two digits per byte)"))
            }
        })
        .collect()
}

/// Every frame type the crate knows, by its `Debug` name.
fn frame_types() -> BTreeMap<String, FrameType> {
    (0..=u8::MAX)
        .filter_map(FrameType::from_u8)
        .map(|t| (format!("{t:?}"), t))
        .collect()
}

/// The decoded value as the annotation shows it: its `Debug` form, with the password and
/// the resumption token (which `Debug` redacts) shown, so that a wrong byte in them is
/// caught too.
fn describe(f: &Frame) -> String {
    let mut s = format!("{f:?}");
    let (password, token) = match f {
        Frame::Login(l) => match &l.credential {
            Credential::Password(p) => (Some(p.as_str()), None),
            Credential::Resume(t) => (None, Some(t.as_bytes())),
        },
        Frame::LoginOk(ok) => (None, Some(ok.token.as_bytes())),
        _ => (None, None),
    };
    if let Some(p) = password {
        s = s.replace(
            "Password(Password(<redacted>))",
            &format!("Password({p:?})"),
        );
    }
    if let Some(t) = token {
        s = s.replace(
            &format!("ResumeToken(<{} bytes redacted>)", t.len()),
            &format!("ResumeToken({t:02x?})"),
        );
    }
    s
}

/// Checks one example; `Err` says what is wrong with it.
fn check(ex: &Example) -> Result<FrameType, String> {
    let at = format!("line {} (frame={})", ex.line, ex.name);
    let fail = |m: String| format!("{at}: {m}");
    let ty = *frame_types()
        .get(&ex.name)
        .ok_or_else(|| fail("frame= names no FrameType".into()))?;
    let bytes = bytes_of(&ex.hex).map_err(fail)?;
    if bytes.is_empty() {
        return Err(fail("empty block".into()));
    }
    let (parsed, n) = frame::parse(&bytes)
        .map_err(|e| fail(format!("does not decode: {e:?}")))?
        .ok_or_else(|| fail("incomplete frame".into()))?;
    let note = ex
        .note
        .as_deref()
        .ok_or_else(|| fail("no `Decoded: `...`` line right after the block".into()))?;
    match parsed {
        Parsed::Control(f) => {
            if f.frame_type() != ty {
                return Err(fail(format!("decodes as {:?}", f.frame_type())));
            }
            if n != bytes.len() {
                return Err(fail(format!(
                    "{} bytes after the frame's {n}: a block holds exactly one frame",
                    bytes.len() - n
                )));
            }
            // Streaming: every strict prefix asks for more bytes.
            for cut in 0..n {
                if frame::parse(&bytes[..cut]) != Ok(None) {
                    return Err(fail(format!("the first {cut} bytes do not ask for more")));
                }
            }
            let mut buf = [0u8; frame::MAX_CONTROL_FRAME];
            let m = f
                .encode(&mut buf)
                .map_err(|e| fail(format!("re-encoding failed: {e:?}")))?;
            if buf[..m] != bytes[..] {
                return Err(fail(format!("re-encodes differently: {:02x?}", &buf[..m])));
            }
            let want = describe(&f);
            if note != want {
                return Err(fail(format!("annotation {note:?}, decoded value {want:?}")));
            }
        }
        Parsed::DataHeader { len } => {
            if ty != FrameType::Data {
                return Err(fail("decodes as Data".into()));
            }
            let payload = &bytes[n..];
            if payload.len() != usize::from(len) {
                return Err(fail(format!(
                    "header says {len} payload bytes, the block has {}",
                    payload.len()
                )));
            }
            let mut again = frame::data_header(payload.len())
                .map_err(|e| fail(format!("re-encoding failed: {e:?}")))?
                .to_vec();
            again.extend_from_slice(payload);
            if again != bytes {
                return Err(fail(format!("re-encodes differently: {again:02x?}")));
            }
            let want = format!("{parsed:?}, payload b\"{}\"", payload.escape_ascii());
            if note != want {
                return Err(fail(format!("annotation {note:?}, decoded value {want:?}")));
            }
        }
    }
    Ok(ty)
}

#[test]
fn every_hex_example_is_exactly_one_real_frame() {
    let examples = examples(&doc()).unwrap();
    assert!(
        !examples.is_empty(),
        "docs/PROTOCOL.md has no ```hex examples"
    );
    let mut errors = Vec::new();
    let mut seen = BTreeSet::new();
    for ex in &examples {
        match check(ex) {
            Ok(ty) => {
                seen.insert(format!("{ty:?}"));
            }
            Err(e) => errors.push(e),
        }
    }
    assert!(errors.is_empty(), "wrong examples:\n{}", errors.join("\n"));
    let missing: Vec<String> = frame_types()
        .into_keys()
        .filter(|name| !seen.contains(name))
        .collect();
    assert!(
        missing.is_empty(),
        "frame types without a hex example: {missing:?}"
    );
}

/// The checker itself: a damaged copy of each example must be refused.
#[test]
fn a_wrong_example_is_refused() {
    let examples = examples(&doc()).unwrap();
    for ex in &examples {
        let bytes = bytes_of(&ex.hex).unwrap();
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x} ")).collect::<String>();
        // One byte more, one byte less, the last byte changed.
        let mut longer = bytes.clone();
        longer.push(0);
        let mut changed = bytes.clone();
        *changed.last_mut().unwrap() ^= 0x01;
        for bad in [longer.as_slice(), &bytes[..bytes.len() - 1], &changed] {
            let damaged = Example {
                hex: hex(bad),
                ..ex.clone()
            };
            assert!(check(&damaged).is_err(), "not refused: {damaged:?}");
        }
        // The wrong type name, and the wrong annotation.
        let other = if ex.name == "Logout" {
            "Terminate"
        } else {
            "Logout"
        };
        let renamed = Example {
            name: other.into(),
            ..ex.clone()
        };
        assert!(check(&renamed).is_err(), "not refused: {renamed:?}");
        let misnoted = Example {
            note: ex.note.as_ref().map(|n| format!("{n} ")),
            ..ex.clone()
        };
        assert!(check(&misnoted).is_err(), "not refused: {misnoted:?}");
    }
}
