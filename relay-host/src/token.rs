//! Resumption credentials: what a logged-in terminal shows on its extra connections instead
//! of its password, so argon2 runs once per terminal login and a relay restart does not
//! cause a hashing storm (the key is the store's persistent [`ServerSecret`]).
//!
//! Layout, 48 bytes:
//!
//! ```text
//! instance id (u64 BE) ‖ expiry, Unix seconds (u64 BE) ‖ HMAC-SHA256(secret, user ‖ 0x00 ‖ stamp BE ‖ instance BE ‖ expiry BE)
//! ```
//!
//! The user name is not in the credential (the terminal sends it beside it) but is under the
//! MAC, so a credential is worthless for any other account. The 0x00 separator cannot occur
//! in a valid name, so no two inputs share a MAC input. `stamp` is the account's credential
//! stamp ([`crate::store::AccountInfo::credential`]), new with the account and with every
//! password change: neither is in the credential, so a password change or a deleted and
//! re-created account revokes every credential issued before, with no list to keep. A
//! credential is valid while `now < expiry`; whether its instance may still run is the
//! caller's check ([`crate::auth`]).

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;
use thiserror::Error;

use crate::store::ServerSecret;

/// Length of a resumption credential in bytes.
pub const TOKEN_LEN: usize = 48;

const MAC_LEN: usize = 32;

/// The terminal instance a credential belongs to (a new password login starts a new one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceId(pub u64);

/// Why a credential was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TokenError {
    /// Not [`TOKEN_LEN`] bytes.
    #[error("resumption credential has the wrong length")]
    Malformed,
    /// Genuine, but past its expiry.
    #[error("resumption credential has expired")]
    Expired,
    /// Not issued by this relay for this account (forged, altered, or another account's).
    #[error("resumption credential is not valid for this account")]
    BadMac,
}

/// Issues and checks resumption credentials with one server secret. `Debug` hides the key.
#[derive(Clone)]
pub struct TokenKey {
    /// Keyed once; cloning the keyed state is cheaper than re-deriving it per credential.
    mac: Hmac<Sha256>,
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenKey(..)")
    }
}

impl TokenKey {
    /// A key from the store's server secret.
    pub fn new(secret: &ServerSecret) -> Self {
        let mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes())
            .expect("HMAC accepts keys of any length");
        Self { mac }
    }

    fn mac_for(&self, user: &str, stamp: u64, instance: u64, expiry: u64) -> Hmac<Sha256> {
        let mut mac = self.mac.clone();
        mac.update(user.as_bytes());
        mac.update(&[0]);
        mac.update(&stamp.to_be_bytes());
        mac.update(&instance.to_be_bytes());
        mac.update(&expiry.to_be_bytes());
        mac
    }

    /// A credential for `user`'s `instance`, valid until `expiry` (Unix seconds) and while
    /// the account's credential stamp is `stamp`.
    pub fn issue(
        &self,
        user: &str,
        stamp: u64,
        instance: InstanceId,
        expiry: u64,
    ) -> [u8; TOKEN_LEN] {
        let mut out = [0u8; TOKEN_LEN];
        out[..8].copy_from_slice(&instance.0.to_be_bytes());
        out[8..16].copy_from_slice(&expiry.to_be_bytes());
        out[16..].copy_from_slice(
            &self
                .mac_for(user, stamp, instance.0, expiry)
                .finalize()
                .into_bytes(),
        );
        out
    }

    /// Checks `token` for `user`, whose credential stamp is `stamp`, at time `now` (Unix
    /// seconds) and returns its instance. The MAC is checked first and in constant time, so
    /// a forged credential is always [`TokenError::BadMac`] whatever expiry it claims.
    pub fn verify(
        &self,
        user: &str,
        stamp: u64,
        token: &[u8],
        now: u64,
    ) -> Result<InstanceId, TokenError> {
        let token: &[u8; TOKEN_LEN] = token.try_into().map_err(|_| TokenError::Malformed)?;
        let instance = u64::from_be_bytes(token[..8].try_into().expect("8 bytes"));
        let expiry = u64::from_be_bytes(token[8..16].try_into().expect("8 bytes"));
        let tag: &[u8; MAC_LEN] = token[16..].try_into().expect("32 bytes");
        self.mac_for(user, stamp, instance, expiry)
            .verify_slice(tag)
            .map_err(|_| TokenError::BadMac)?;
        if now >= expiry {
            return Err(TokenError::Expired);
        }
        Ok(InstanceId(instance))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> TokenKey {
        TokenKey::new(&ServerSecret::from_bytes([byte; 32]))
    }

    #[test]
    fn round_trip() {
        let k = key(1);
        let t = k.issue("cam-1", 5, InstanceId(42), 1_000);
        assert_eq!(t.len(), TOKEN_LEN);
        assert_eq!(&t[..8], &42u64.to_be_bytes());
        assert_eq!(&t[8..16], &1_000u64.to_be_bytes());
        assert_eq!(k.verify("cam-1", 5, &t, 999), Ok(InstanceId(42)));
    }

    #[test]
    fn expiry_is_exclusive() {
        let k = key(1);
        let t = k.issue("cam-1", 5, InstanceId(1), 1_000);
        assert_eq!(k.verify("cam-1", 5, &t, 1_000), Err(TokenError::Expired));
        assert_eq!(k.verify("cam-1", 5, &t, u64::MAX), Err(TokenError::Expired));
    }

    #[test]
    fn other_user_or_other_key_is_rejected() {
        let k = key(1);
        let t = k.issue("alice", 5, InstanceId(7), 1_000);
        assert_eq!(k.verify("bob", 5, &t, 0), Err(TokenError::BadMac));
        assert_eq!(k.verify("alic", 5, &t, 0), Err(TokenError::BadMac));
        assert_eq!(k.verify("alice\0", 5, &t, 0), Err(TokenError::BadMac));
        assert_eq!(key(2).verify("alice", 5, &t, 0), Err(TokenError::BadMac));
    }

    #[test]
    fn any_flipped_bit_is_rejected() {
        let k = key(9);
        let t = k.issue("dev", 5, InstanceId(0x0102_0304_0506_0708), 5_000);
        for byte in 0..TOKEN_LEN {
            for bit in 0..8 {
                let mut bad = t;
                bad[byte] ^= 1 << bit;
                // Including a later expiry or a changed instance: the MAC covers both.
                assert_eq!(
                    k.verify("dev", 5, &bad, 0),
                    Err(TokenError::BadMac),
                    "{byte}.{bit}"
                );
            }
        }
    }

    #[test]
    fn a_forged_expired_credential_is_bad_mac_not_expired() {
        let k = key(3);
        let mut t = k.issue("dev", 5, InstanceId(1), 10);
        t[20] ^= 1;
        assert_eq!(k.verify("dev", 5, &t, 100), Err(TokenError::BadMac));
    }

    #[test]
    fn wrong_length_is_malformed() {
        let k = key(1);
        let t = k.issue("dev", 5, InstanceId(1), 10);
        assert_eq!(k.verify("dev", 5, &t[..47], 0), Err(TokenError::Malformed));
        assert_eq!(k.verify("dev", 5, &[], 0), Err(TokenError::Malformed));
        let mut long = t.to_vec();
        long.push(0);
        assert_eq!(k.verify("dev", 5, &long, 0), Err(TokenError::Malformed));
    }

    /// A password change or a re-created account (a new stamp) revokes the credential.
    #[test]
    fn another_stamp_is_rejected() {
        let k = key(1);
        let t = k.issue("cam", 5, InstanceId(1), 1_000);
        assert_eq!(k.verify("cam", 6, &t, 0), Err(TokenError::BadMac));
    }

    #[test]
    fn debug_hides_the_key() {
        assert_eq!(format!("{:?}", key(1)), "TokenKey(..)");
    }
}
