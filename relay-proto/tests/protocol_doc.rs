//! The hex examples in `docs/PROTOCOL.md` are real frames.
//!
//! Every fenced block with the info string `hex frame=<FrameType>` is decoded with
//! [`frame::parse`]: it must hold exactly one frame (a DATA block: the header and exactly
//! `len` payload bytes), of the named type, and encoding the decoded value again must give
//! the same bytes. The line right after the block, `Decoded: `…``, must be the decoded
//! value's `Debug` form, secrets shown (for DATA: the header, then the payload). Every frame type must
//! have at least one example.
//!
//! The defaults and bounds of §7 and §8 are the code's (and relay-host-config.md's), and
//! every frame §6.2 says a state does not allow gets the answer it says.

mod harness;

use std::collections::{BTreeMap, BTreeSet};

use harness::{T0, demand, enc, error_code, feed, logged_in, login, output};
use relay_proto::codes::{ErrorCode, RejectReason, ReleaseReason};
use relay_proto::frame::{
    self, Credential, DemandResult, Frame, FrameType, ListAnswer, LoginOk, Notice, Parsed, Reject,
};
use relay_proto::relay::{self, AllowAll, ConnId, Fixed, Relay};
use relay_proto::{ResumeToken, ServiceName, Text, UserId};

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

// ---- §7 and §8: the defaults and bounds the text gives are the code's ----

const HOST_CONFIG_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/relay-host-config.md");

/// A default as the docs write it: `30 s`, `"10s"`, `65,535`: milliseconds for
/// durations, the number otherwise.
fn value(text: &str) -> Option<u64> {
    let t = text.trim().trim_matches('"').replace(',', "");
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num.parse().ok()?;
    match unit.trim() {
        "" => Some(n),
        "s" => Some(n * 1000),
        "ms" => Some(n),
        _ => None,
    }
}

/// `(setting, default)` of every row of PROTOCOL.md's §7 and §8 tables whose `setting`
/// column is a `name` in backticks.
fn doc_settings(doc: &str) -> BTreeMap<String, String> {
    let start = doc.find("\n## 7. ").expect("§7");
    let end = doc.find("\n## 9. ").expect("§9");
    let mut out = BTreeMap::new();
    for line in doc[start..end].lines().filter(|l| l.starts_with('|')) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        // | name | `setting` | [side |] default | rule |
        let Some(setting) = cells
            .get(2)
            .and_then(|c| c.strip_prefix('`')?.strip_suffix('`'))
        else {
            continue;
        };
        let default = if cells.len() == 7 { cells[4] } else { cells[3] };
        out.insert(setting.to_string(), default.to_string());
    }
    out
}

/// `key = value` lines of relay-host-config.md's `[limits]` block.
fn host_limits(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .skip_while(|l| l.trim() != "[limits]")
        .skip(1)
        .take_while(|l| !l.starts_with("```"))
        .filter_map(|l| {
            let l = l.split('#').next()?;
            let (k, v) = l.split_once('=')?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// The code's defaults, by setting name.
fn code_settings() -> BTreeMap<&'static str, u64> {
    let c = relay_proto::relay::Config::default();
    BTreeMap::from([
        ("keepalive_interval", c.keepalive_interval.as_millis()),
        ("keepalive_timeout", c.keepalive_timeout.as_millis()),
        ("handshake_timeout", c.handshake_timeout.as_millis()),
        ("demand_timeout", c.demand_timeout.as_millis()),
        ("max_frame_payload", c.max_frame_payload.into()),
        (
            "max_connections_per_account",
            c.max_connections_per_account.into(),
        ),
        (
            "max_sessions_per_account",
            c.max_sessions_per_account.into(),
        ),
        ("max_login_attempts", c.max_login_attempts.into()),
        (
            "max_requesters_per_account",
            c.max_requesters_per_account.into(),
        ),
        ("MAX_PAYLOAD", frame::MAX_PAYLOAD as u64),
        ("MAX_CONTROL", frame::MAX_CONTROL as u64),
        ("LIST_PAGE", frame::LIST_PAGE as u64),
    ])
}

#[test]
fn the_defaults_and_bounds_tables_are_the_codes() {
    let doc = doc_settings(&doc());
    let host_text = std::fs::read_to_string(HOST_CONFIG_PATH).unwrap();
    let host = host_limits(&host_text);
    assert!(host.len() >= 8, "relay-host-config.md [limits]: {host:?}");
    let code = code_settings();
    let mut errors = Vec::new();
    for (name, want) in &code {
        match doc.get(*name).map(|d| value(d)) {
            Some(Some(v)) if v == *want => {}
            other => errors.push(format!("PROTOCOL.md {name}: {other:?}, code {want}")),
        }
    }
    for (name, text) in &doc {
        let v = value(text);
        if let Some(h) = host.get(name)
            && value(h) != v
        {
            errors.push(format!(
                "{name}: PROTOCOL.md {text}, relay-host-config.md {h}"
            ));
        }
        if !code.contains_key(name.as_str()) && !host.contains_key(name) {
            errors.push(format!("PROTOCOL.md names `{name}`: no such setting"));
        }
    }
    for (name, h) in &host {
        if let Some(&want) = code.get(name.as_str())
            && value(h) != Some(want)
        {
            errors.push(format!("relay-host-config.md {name} = {h}, code {want}"));
        }
        if !doc.contains_key(name) {
            errors.push(format!(
                "relay-host-config.md {name}: not in PROTOCOL.md §7/§8"
            ));
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}

// ---- §6.2: every frame a state does not allow gets what the table says ----

type Core = harness::Core<Fixed<8, 4, { relay::max_events_per_call(8) }>>;

/// The relay's answer to a frame: an ERROR (and whether it closes), or nothing.
#[derive(Debug, PartialEq)]
enum Answer {
    Error(ErrorCode, bool),
    Nothing,
}

/// "ERROR UnexpectedFrame", "ERROR NotLoggedIn, close", "nothing".
fn answer_of(text: &str) -> Answer {
    if text == "nothing" {
        return Answer::Nothing;
    }
    let (code, close) = match text.strip_suffix(", close") {
        Some(c) => (c, true),
        None => (text, false),
    };
    let code = match code.strip_prefix("ERROR ").expect(text) {
        "NotLoggedIn" => ErrorCode::NotLoggedIn,
        "UnexpectedFrame" => ErrorCode::UnexpectedFrame,
        "UnknownSession" => ErrorCode::UnknownSession,
        other => panic!("§6.2's table answers {other}: add it here"),
    };
    Answer::Error(code, close)
}

/// The bytes of a frame named as §6.2 names it (ACCEPT and REJECT name no waiting
/// session; DATA carries one byte).
fn frame_bytes(name: &str) -> Vec<u8> {
    let user = || UserId::new("z").unwrap();
    let f = match name {
        "LOGIN" => return login("a", "pw"),
        "DEMAND" => return demand("b"),
        "DATA" => return vec![0x0C, 0, 1, 0x55],
        "KEEPALIVE" => Frame::KeepAlive { seq: 1 },
        "LIST" => Frame::List { cursor: 0 },
        "ACCEPT" => Frame::Accept { session: 999 },
        "REJECT" => Frame::Reject(Reject {
            session: 999,
            reason: RejectReason::Busy,
            text: Text::default(),
        }),
        "TERMINATE" => Frame::Terminate,
        "LOGOUT" => Frame::Logout,
        "LOGIN_OK" => Frame::LoginOk(LoginOk {
            caps: 0,
            keepalive_ms: 1,
            max_payload: 1,
            token: ResumeToken::default(),
        }),
        "KEEPALIVE_ACK" => Frame::KeepAliveAck { seq: 1 },
        "LIST_ANSWER" => Frame::ListAnswer(ListAnswer {
            users: Default::default(),
            next: None,
        }),
        "NOTICE" => Frame::Notice(Notice {
            session: 1,
            from: user(),
            service: ServiceName::default(),
        }),
        "DEMAND_RESULT" => Frame::DemandResult(DemandResult::Accepted { session: 1 }),
        "RELEASE" => Frame::Release {
            reason: ReleaseReason::Normal,
        },
        "ERROR" => Frame::Error {
            code: ErrorCode::Busy,
            text: Text::default(),
            retry_after: None,
        },
        other => panic!("§6.2 names a frame {other:?}"),
    };
    enc(&f)
}

/// The first NOTICE `conn` has to send.
fn noticed(r: &mut Core, conn: ConnId) -> u32 {
    let (frames, _) = output(r, conn);
    frames
        .iter()
        .find_map(|f| match f {
            Frame::Notice(n) => Some(n.session),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{frames:?}"))
}

/// A relay and a connection in the state §6.2 names, its output flushed (but for
/// Releasing, whose RELEASE is still to write).
fn in_state(name: &str) -> (Core, ConnId) {
    let mut r: Core = Relay::new(relay::Config::default(), AllowAll);
    if name == "Handshake" {
        let c = r.accept(T0).unwrap();
        return (r, c);
    }
    let b = logged_in(&mut r, "b");
    let a = logged_in(&mut r, "a");
    let c = match name {
        "Idle" => a,
        "Demanding" => {
            feed(&mut r, a, &demand("b"));
            a
        }
        "Noticed" => {
            feed(&mut r, a, &demand("b"));
            noticed(&mut r, b);
            b
        }
        "Waiting" => {
            let other = logged_in(&mut r, "c");
            feed(&mut r, other, &demand("b"));
            noticed(&mut r, b);
            feed(&mut r, a, &demand("b"));
            a
        }
        "Session" | "Session after its own TERMINATE" | "Releasing" => {
            feed(&mut r, a, &demand("b"));
            let session = noticed(&mut r, b);
            feed(&mut r, b, &enc(&Frame::Accept { session }));
            match name {
                "Session after its own TERMINATE" => feed(&mut r, a, &enc(&Frame::Terminate)),
                "Releasing" => {
                    output(&mut r, a);
                    r.closed(b);
                    return (r, a);
                }
                _ => vec![],
            };
            a
        }
        other => panic!("§6.2 names a state {other:?}"),
    };
    output(&mut r, c);
    (r, c)
}

/// Rows `state | frames | relay sends` of §6.2's "Frames a state does not allow".
fn not_allowed(doc: &str) -> Vec<(String, Vec<String>, String)> {
    let start = doc
        .find("**Frames a state does not allow**")
        .expect("the table");
    doc[start..]
        .lines()
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let frames = cells[2]
                .split(" (")
                .next()
                .unwrap()
                .split(", ")
                .map(String::from)
                .collect();
            (cells[1].to_string(), frames, cells[3].to_string())
        })
        .collect()
}

#[test]
fn every_frame_a_state_does_not_allow_gets_what_the_state_table_says() {
    let rows = not_allowed(&doc());
    assert!(rows.len() >= 10, "{rows:?}");
    let mut errors = Vec::new();
    for (state, frames, sends) in &rows {
        let want = answer_of(sends);
        for name in frames {
            let (mut r, c) = in_state(state);
            feed(&mut r, c, &frame_bytes(name));
            let (out, close) = output(&mut r, c);
            let got = match error_code(&out) {
                Some(code) => Answer::Error(code, close),
                None if close => Answer::Error(ErrorCode::BadFrame, true),
                None => Answer::Nothing,
            };
            if got != want {
                errors.push(format!("{state} + {name}: {got:?}, §6.2 says {want:?}"));
            }
        }
    }
    assert!(errors.is_empty(), "{}", errors.join("\n"));
}
