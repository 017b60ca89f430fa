//! argon2id password verification on reused memory.
//!
//! `PasswordVerifier::verify_password` allocates and fills its 19 MiB of argon2 memory
//! afresh on every call. Whether that memory comes back from the allocator warm or has to
//! be faulted in from the kernel depends on which blocking thread ran the last check, so
//! two identical checks took 18 ms or 25 ms: enough to tell a known user ID from an
//! unknown one by the answer time (issue 11, finding 3). Here every check takes its memory
//! from a small pool of blocks that earlier checks filled, so a known account's hash and
//! the dummy hash of an unknown one cost the same, and less.

use std::sync::Mutex;

use argon2::password_hash::{Error, Output, PasswordHash};
use argon2::{Algorithm, Argon2, Block, Params, Version};

/// Memory of finished checks, for the next ones. The relay runs at most one check per
/// core at a time, so the pool stays at a few buffers; [`MAX_SPARE`] bounds it anyway.
static SPARE: Mutex<Vec<Vec<Block>>> = Mutex::new(Vec::new());
const MAX_SPARE: usize = 8;

/// Whether `password` hashes to `hash` (argon2, with the parameters the PHC string
/// names). The digests are compared in constant time ([`Output`]'s `==`).
pub fn verify(password: &[u8], hash: &PasswordHash<'_>) -> Result<bool, Error> {
    let algorithm = Algorithm::try_from(hash.algorithm)?;
    let version = match hash.version {
        Some(v) => Version::try_from(v)?,
        None => Version::default(),
    };
    let params = Params::try_from(hash)?;
    let expected = hash.hash.ok_or(Error::PhcStringField)?;
    let mut salt = [0u8; 64];
    let salt = hash
        .salt
        .ok_or(Error::PhcStringField)?
        .decode_b64(&mut salt)?;
    let mut out = [0u8; Output::MAX_LENGTH];
    let out = out.get_mut(..expected.len()).ok_or(Error::OutputSize {
        provided: std::cmp::Ordering::Greater,
        expected: Output::MAX_LENGTH,
    })?;
    let mut blocks = take(params.block_count());
    let hashed = Argon2::new(algorithm, version, params).hash_password_into_with_memory(
        password,
        salt,
        out,
        &mut blocks,
    );
    give_back(blocks);
    hashed?;
    Ok(Output::new(out)? == expected)
}

/// `n` blocks of argon2 memory: a spare buffer of that size, or a new one.
fn take(n: usize) -> Vec<Block> {
    let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
    match spare.iter().position(|b| b.len() == n) {
        Some(i) => spare.swap_remove(i),
        None => vec![Block::default(); n],
    }
}

fn give_back(blocks: Vec<Block>) {
    let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
    if spare.len() < MAX_SPARE {
        spare.push(blocks);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use argon2::PasswordHasher;
    use argon2::password_hash::SaltString;
    use argon2::password_hash::rand_core::OsRng;

    fn phc(password: &str) -> String {
        let params = Params::new(64, 1, 1, None).unwrap();
        let salt = SaltString::generate(&mut OsRng);
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password(password.as_bytes(), &salt)
            .unwrap()
            .to_string()
    }

    #[test]
    fn the_right_password_and_only_it_verifies() {
        let phc = phc("correct horse");
        let hash = PasswordHash::new(&phc).unwrap();
        for _ in 0..3 {
            assert_eq!(verify(b"correct horse", &hash), Ok(true));
            assert_eq!(verify(b"correct hors", &hash), Ok(false));
        }
    }

    #[test]
    fn agrees_with_the_crates_own_verifier() {
        use argon2::PasswordVerifier;
        let phc = phc("pw-one-two");
        let hash = PasswordHash::new(&phc).unwrap();
        for pw in ["pw-one-two", "pw-one-twx", ""] {
            let theirs = Argon2::default()
                .verify_password(pw.as_bytes(), &hash)
                .is_ok();
            assert_eq!(verify(pw.as_bytes(), &hash), Ok(theirs), "{pw:?}");
        }
    }
}
