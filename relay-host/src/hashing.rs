//! argon2id password verification on reused memory.
//!
//! `PasswordVerifier::verify_password` allocates and fills its 19 MiB of argon2 memory
//! afresh on every call. Whether that memory comes back from the allocator warm or has to
//! be faulted in from the kernel depends on which blocking thread ran the last check, so
//! two identical checks took 18 ms or 25 ms: enough to tell a known user ID from an
//! unknown one by the answer time (issue 11, finding 3). Here every check takes its memory
//! from a small pool of blocks that earlier checks filled, so a known account's hash and
//! the dummy hash of an unknown one cost the same, and less.
//!
//! Spare memory left unused for [`SPARE_IDLE`] goes back to the system
//! ([`forget_idle`]): a relay whose logins came in a burst does not keep 19 MiB per
//! check for good (seen as 48 MiB of RSS at 1,000 requests per second, issue 13). After a
//! quiet spell the next checks start cold, known and unknown user IDs alike, so the
//! answer time still tells them apart no better than before. The spell is short: the pool
//! is for checks that follow each other (a burst of logins, an attack), and a relay that
//! forwards data without logins should not hold a login's memory (with a minute, one
//! terminal's login was 19 of relay serve's 30 MiB of RSS in the bench's 1,000 req/s
//! figure, docs/BENCHMARKS.md).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{Error, Output, PasswordHash};
use argon2::{Algorithm, Argon2, Block, Params, Version};

/// Memory of finished checks, for the next ones, with when each was given back. The relay
/// runs at most one check per core at a time, so the pool stays at a few buffers;
/// [`MAX_SPARE`] bounds it anyway.
static SPARE: Mutex<Vec<(Vec<Block>, Instant)>> = Mutex::new(Vec::new());
const MAX_SPARE: usize = 8;

/// How long spare memory waits for the next check before [`forget_idle`] frees it: far
/// longer than the 20 ms a check takes, so the checks of a burst keep it warm.
pub const SPARE_IDLE: Duration = Duration::from_secs(2);

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
    match spare.iter().position(|(b, _)| b.len() == n) {
        Some(i) => spare.swap_remove(i).0,
        None => vec![Block::default(); n],
    }
}

fn give_back(blocks: Vec<Block>) {
    let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
    if spare.len() < MAX_SPARE {
        spare.push((blocks, Instant::now()));
    }
}

/// Frees the spare memory no check used for [`SPARE_IDLE`] before `now`, and returns how
/// many buffers it freed. The relay calls it every few seconds.
pub fn forget_idle(now: Instant) -> usize {
    let idle: Vec<_> = {
        let mut spare = SPARE.lock().unwrap_or_else(|e| e.into_inner());
        let (keep, idle) = spare
            .drain(..)
            .partition(|(_, since)| now.saturating_duration_since(*since) < SPARE_IDLE);
        *spare = keep;
        idle
    };
    let freed = idle.len();
    drop(idle);
    if freed > 0 {
        return_to_system();
    }
    freed
}

/// glibc keeps freed memory of this size in its heap (its mmap threshold rises to the
/// largest block freed), so the RSS would not drop without asking it to trim.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn return_to_system() {
    // SAFETY: malloc_trim only releases free heap pages; it takes no pointers.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn return_to_system() {}

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
    fn spare_memory_is_kept_for_a_while_then_freed() {
        // A memory size no other test uses: tests run at once and share the pool.
        let params = Params::new(72, 1, 1, None).unwrap();
        let salt = SaltString::generate(&mut OsRng);
        let phc = Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password(b"pw", &salt)
            .unwrap()
            .to_string();
        let hash = PasswordHash::new(&phc).unwrap();
        assert_eq!(verify(b"pw", &hash), Ok(true));
        let now = Instant::now();
        let spare = |n: usize| SPARE.lock().unwrap().iter().any(|(b, _)| b.len() == n);
        let n = Params::try_from(&hash).unwrap().block_count();
        assert!(spare(n), "a finished check leaves its memory for the next");
        assert_eq!(forget_idle(now), 0, "not idle yet");
        assert!(spare(n));
        assert!(forget_idle(now + SPARE_IDLE + Duration::from_secs(1)) >= 1);
        assert!(!spare(n), "idle memory is freed");
        assert_eq!(
            verify(b"pw", &hash),
            Ok(true),
            "and checks go on without it"
        );
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
