//! Bounded, validated text fields: user IDs, service names, passwords, reasons, tokens.
//!
//! Each type checks its bound and character rules when it is built *and* when it is
//! decoded from the wire, so a value of the type is always valid: code that holds a
//! `UserId` never re-checks it.

use core::fmt;
use heapless::{String, Vec};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest user ID, in bytes of UTF-8.
pub const MAX_USER_ID: usize = 32;
/// Longest service name, in bytes of UTF-8.
pub const MAX_SERVICE: usize = 32;
/// Longest password, in bytes of UTF-8.
pub const MAX_PASSWORD: usize = 128;
/// Longest human-readable reason or error text, in bytes of UTF-8.
pub const MAX_TEXT: usize = 64;
/// Longest node address (`host:port`) in a redirect, in bytes of UTF-8.
pub const MAX_ADDRESS: usize = 64;
/// Longest resumption token, in bytes. The relay chooses the format (relay-host: 48 bytes).
pub const MAX_TOKEN: usize = 64;

/// Why a text field was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum IdentError {
    Empty,
    TooLong,
    /// A control character, white space or `/` (which separates `user/service` on the CLI).
    BadChar,
}

impl fmt::Display for IdentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IdentError::Empty => "empty",
            IdentError::TooLong => "too long",
            IdentError::BadChar => "contains a control character, white space or '/'",
        })
    }
}

fn check_name(s: &str, max: usize, allow_empty: bool) -> Result<(), IdentError> {
    if s.is_empty() && !allow_empty {
        return Err(IdentError::Empty);
    }
    if s.len() > max {
        return Err(IdentError::TooLong);
    }
    if s.chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == '/')
    {
        return Err(IdentError::BadChar);
    }
    Ok(())
}

/// Declares a validated string newtype with serde support that re-validates on decode.
/// Its length is a `u8` (every bound is at most 64 bytes): 7 bytes less per field than a
/// `usize`, in every table entry that holds one.
macro_rules! text_type {
    ($(#[$doc:meta])* $name:ident, $max:expr, $check:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
        pub struct $name(String<$max, u8>);

        impl $name {
            /// Checks `s` against the field's rules.
            pub fn new(s: &str) -> Result<Self, IdentError> {
                let check: fn(&str) -> Result<(), IdentError> = $check;
                check(s)?;
                let mut v = String::new();
                v.push_str(s).map_err(|_| IdentError::TooLong)?;
                Ok($name(v))
            }

            pub fn as_str(&self) -> &str {
                self.0.as_str()
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.0.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <&str>::deserialize(d)?;
                $name::new(s).map_err(|_| serde::de::Error::custom(stringify!($name)))
            }
        }

        impl TryFrom<&str> for $name {
            type Error = IdentError;
            fn try_from(s: &str) -> Result<Self, IdentError> {
                $name::new(s)
            }
        }

        #[cfg(feature = "defmt")]
        impl defmt::Format for $name {
            fn format(&self, f: defmt::Formatter<'_>) {
                defmt::write!(f, "{=str}", self.0.as_str())
            }
        }
    };
}

text_type!(
    /// A terminal's account name: 1 to 32 bytes of UTF-8, no control characters, white
    /// space or `/`.
    UserId,
    MAX_USER_ID,
    |s| check_name(s, MAX_USER_ID, false)
);

text_type!(
    /// The service a demand asks for (`ssh`, `http`): 0 to 32 bytes, same characters as
    /// a user ID. Empty means the target's default service.
    ServiceName,
    MAX_SERVICE,
    |s| check_name(s, MAX_SERVICE, true)
);

text_type!(
    /// Free text that explains an error or a rejection: up to 64 bytes of UTF-8, no
    /// control characters.
    Text,
    MAX_TEXT,
    |s| {
        if s.len() > MAX_TEXT {
            Err(IdentError::TooLong)
        } else if s.chars().any(char::is_control) {
            Err(IdentError::BadChar)
        } else {
            Ok(())
        }
    }
);

text_type!(
    /// Where another node of the relay service listens, as terminals connect to it
    /// (`relay.example:7835`, `[2001:db8::1]:7835`): 1 to 64 bytes, the characters of a
    /// user ID.
    NodeAddress,
    MAX_ADDRESS,
    |s| check_name(s, MAX_ADDRESS, false)
);

text_type!(
    /// A password: 1 to 128 bytes of UTF-8. Its `Debug` never shows it.
    Password,
    MAX_PASSWORD,
    |s| {
        if s.is_empty() {
            Err(IdentError::Empty)
        } else if s.len() > MAX_PASSWORD {
            Err(IdentError::TooLong)
        } else {
            Ok(())
        }
    }
);

impl Text {
    /// The `Display` form of `v`, cut to fit like [`Text::lossy`].
    pub fn display(v: &impl fmt::Display) -> Self {
        let mut s: String<MAX_TEXT> = String::new();
        // A full buffer stops the write early: exactly the cut we want.
        let _ = fmt::write(&mut Truncating(&mut s), format_args!("{v}"));
        Text::lossy(&s)
    }

    /// Builds a text, cutting it at a character boundary to fit and replacing control
    /// characters, for messages that must always go out.
    pub fn lossy(s: &str) -> Self {
        let mut v: String<MAX_TEXT, u8> = String::new();
        for c in s.chars() {
            let c = if c.is_control() { '?' } else { c };
            if v.push(c).is_err() {
                break;
            }
        }
        Text(v)
    }
}

/// A resumption credential issued by the relay at login: opaque to terminals, at most
/// 64 bytes. Its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ResumeToken(pub Vec<u8, MAX_TOKEN>);

impl ResumeToken {
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        Vec::from_slice(b).ok().map(ResumeToken)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for NodeAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for NodeAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

impl fmt::Debug for ResumeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ResumeToken(<{} bytes redacted>)", self.0.len())
    }
}

/// A `fmt::Write` into a bounded string that keeps what fits and then reports an error.
struct Truncating<'a, const N: usize>(&'a mut String<N>);

impl<const N: usize> fmt::Write for Truncating<'_, N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            self.0.push(c).map_err(|_| fmt::Error)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_id_rules() {
        assert!(UserId::new("cam-1").is_ok());
        assert!(UserId::new("ユーザー").is_ok());
        assert_eq!(UserId::new(""), Err(IdentError::Empty));
        assert_eq!(UserId::new("a b"), Err(IdentError::BadChar));
        assert_eq!(UserId::new("a/b"), Err(IdentError::BadChar));
        assert_eq!(UserId::new("a\u{0}"), Err(IdentError::BadChar));
        assert_eq!(UserId::new(&"x".repeat(33)), Err(IdentError::TooLong));
        assert!(UserId::new(&"x".repeat(32)).is_ok());
        assert!(ServiceName::new("").is_ok());
    }

    #[test]
    fn lossy_text_fits() {
        let t = Text::lossy(&"é".repeat(40));
        assert!(t.as_str().len() <= MAX_TEXT);
        assert_eq!(Text::lossy("a\nb").as_str(), "a?b");
    }

    #[test]
    fn secrets_are_redacted() {
        extern crate std;
        let p = Password::new("hunter2").unwrap();
        assert!(!std::format!("{p:?}").contains("hunter2"));
    }
}
